"""Training speed of `cog train`: steps/s, total time and peak GPU memory, per model, batch size and
optimizer, and whether the fixed probe's loss fell.

For the training numbers of docs/performance.md on a GPU host, with real weights or real-size random ones
(`scripts/build_tiny_weights.py --full-size`). The images are synthetic (ten patterned squares at
the training resolution); nothing is downloaded. A batch that runs out of memory is reported as
such and the next one still runs. On a CPU host with tiny weights, `--optimizer` with every name
checks that each optimizer that runs here lowers the probe loss (8-bit names run their 32-bit
optimizer there, as the training log says).

Usage: python scripts/benchmark_train.py [--weights DIR] [--steps 1000] [--resolution 1024]
           [--batch 1 4] [--model illustrious-xl sdxl] [--optimizer adamw8bit prodigy ...]
           [--gradient-checkpointing] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import MODEL_IDS, weights_root
from training.request import OPTIMIZERS, TrainingRequest
from training.trainer import train

IMAGES = 10


def synthetic_zip(path: Path, side: int) -> Path:
    """Ten stripe patterns of different widths and colours, PNG, in one zip."""
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(IMAGES):
            pixels = np.zeros((side, side, 3), np.uint8)
            pixels[:, :: 8 + i] = (255, 40 * i % 256, 0)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "PNG")
            archive.writestr(f"img{i}.png", buf.getvalue())
    return path


def run(root: Path, archive: Path, model: str, batch: int, optimizer: str, args: argparse.Namespace, out: Path) -> dict:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    request = TrainingRequest(
        archive,
        steps=args.steps,
        batch_size=batch,
        resolution=str(args.resolution),
        model=model,
        optimizer=optimizer,
        gradient_checkpointing=args.gradient_checkpointing,
        autocaption=False,
        seed=1,
    )
    start = time.perf_counter()
    try:
        result = train(request, root, out)
    except torch.OutOfMemoryError:
        return {"model": model, "batch": batch, "optimizer": optimizer, "error": "out of memory"}
    return {
        "model": model,
        "batch": batch,
        "optimizer": optimizer,
        "probe_loss": [round(result.probe_loss_before, 4), round(result.probe_loss_after, 4)],
        "steps_per_second": round(result.steps_per_second, 3),
        "total_seconds": round(time.perf_counter() - start, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--model", nargs="+", default=list(MODEL_IDS))
    parser.add_argument("--optimizer", nargs="+", default=["adamw8bit"], choices=OPTIMIZERS)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    root = args.weights or weights_root()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        archive = synthetic_zip(Path(tmp) / "images.zip", args.resolution)
        rows = [
            run(root, archive, model, batch, optimizer, args, Path(tmp) / "out")
            for model in args.model
            for batch in args.batch
            for optimizer in args.optimizer
        ]
    print(f"device: {device}; {args.steps} steps at {args.resolution}, {IMAGES} images")
    print("| model | batch | optimizer | steps/s | total (s) | peak GPU memory (GiB) | probe loss |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['batch']} | {row['optimizer']} | {row['error']} | | | |")
        else:
            before, after = row["probe_loss"]
            print(
                f"| {row['model']} | {row['batch']} | {row['optimizer']} | {row['steps_per_second']} "
                f"| {row['total_seconds']} | {row['peak_gib'] if row['peak_gib'] is not None else 'n/a'} "
                f"| {before} -> {after}{'' if after < before else ' (did not fall)'} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"device": device, "steps": args.steps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
