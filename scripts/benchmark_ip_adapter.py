"""What the IP-Adapter costs: setup time, resident memory, and request latency with a reference.

Two modes:
- engine (default): the real engine loaded from `--weights` with and without the `ip-adapter`
  folder (a linked copy without it), then plain and IP-Adapter requests interleaved at the model's
  native size. Full-size random weights are built first when the folder is empty (`--tiny` builds
  and uses the tiny ones instead, to check the script on a CPU; its numbers mean nothing). On a
  GPU it also reports allocated and peak GPU memory.
- `--parts`: real SDXL shapes with random bf16 weights and no engine, for a machine without a GPU
  or the memory for two full models: loading the adapter into one UNet, the image encoder's
  forward on one reference (twice: Plus encodes a blank image for the negative side), and one
  batch-2 UNet forward at a small latent with and without the adapter installed.

Usage: python scripts/benchmark_ip_adapter.py --weights /tmp/full-weights [--steps 30] [--runs 3] [--tiny]
       python scripts/benchmark_ip_adapter.py --parts [--latent 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import IP_ADAPTER_DIR, IP_ADAPTER_WEIGHT_NAME
from engine.generator import Engine
from engine.ip_adapter import IpAdapter
from engine.request import GenerationRequest
from scripts.build_tiny_weights import FULL, TINY, build_all, build_ip_adapter, build_unet

Rows = list[tuple[str, str]]


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f}"


def _param_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def reference(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (768, 768, 3), dtype=np.uint8))


def engine_rows(weights: Path, steps: int, runs: int, tiny: bool, scratch: Path) -> Rows:
    rows: Rows = []
    build_all(weights, shape=TINY if tiny else FULL)
    without = scratch / "weights-without-ip"
    without.mkdir()
    for folder in weights.iterdir():
        if folder.name != IP_ADAPTER_DIR:
            (without / folder.name).symlink_to(folder.resolve())
    cuda = torch.cuda.is_available()
    loads: dict[str, list[float]] = {"without": [], "with": []}
    allocated: dict[str, int] = {}
    for _ in range(runs):  # interleaved, so the page cache favours neither
        for name, root in (("without", without), ("with", weights)):
            if cuda:
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
            t, engine = _timed(lambda r=root: Engine.load(r))
            loads[name].append(t)
            if cuda:
                allocated[name] = torch.cuda.memory_allocated() - base
            del engine
    rows.append(
        (
            f"Engine.load without / with the IP-Adapter, best of {runs} (s)",
            f"{min(loads['without']):.2f} / {min(loads['with']):.2f}",
        )
    )
    engine = Engine.load(weights)
    model = engine.models["illustrious-xl"]
    adapter = model.ip_adapter
    assert adapter is not None
    rows.append(("IP-Adapter modules, shared by every model (GiB)", _gib(_param_bytes(adapter.modules))))
    rows.append(("image encoder, shared (GiB)", _gib(_param_bytes(adapter.image_encoder))))
    if cuda:
        rows.append(
            (
                "GPU memory allocated after load, without / with (GiB)",
                f"{_gib(allocated['without'])} / {_gib(allocated['with'])}",
            )
        )
    req = GenerationRequest(prompt="a lighthouse at dusk", num_inference_steps=steps, seed=1, safety_checker=False)
    cases = {
        "plain": req,
        "one reference": replace(req, ip_adapter_images=(reference(1),)),
        "two references": replace(req, ip_adapter_images=(reference(1), reference(2))),
    }
    for fast in (False, True):
        timings: dict[str, list[float]] = {name: [] for name in cases}
        peaks: dict[str, int] = {}
        for case in cases.values():
            engine.generate(replace(case, go_fast=fast))  # warm-up
        for _ in range(runs):
            for name, case in cases.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                run = replace(case, go_fast=fast)
                timings[name].append(_timed(lambda r=run: engine.generate(r))[0])
                if cuda:
                    peaks[name] = torch.cuda.max_memory_allocated()
        plain = min(timings["plain"])
        size = model.native_resolution
        for name, times in timings.items():
            rows.append(
                (
                    f"{size}x{size}, {steps} steps, go_fast {'on' if fast else 'off'}, {name}: "
                    "best / median (s), x plain",
                    f"{min(times):.3f} / {statistics.median(times):.3f}, {min(times) / plain:.3f}x",
                )
            )
        if cuda:
            rows.append(
                (
                    f"peak GPU memory, go_fast {'on' if fast else 'off'}: " + " / ".join(peaks) + " (GiB)",
                    " / ".join(_gib(v) for v in peaks.values()),
                )
            )
    return rows


def parts_rows(latent: int, runs: int, scratch: Path) -> Rows:
    """Real SDXL shapes, random bf16 weights, no engine."""
    rows: Rows = []
    dtype = torch.bfloat16  # CPUs without fast fp16 matmul run bf16 at full speed
    torch.set_flush_denormal(True)  # random weights make denormal activations, slow on x86 only
    torch.manual_seed(0)
    folder = scratch / "ip-adapter-full"
    encoder, state = build_ip_adapter(FULL)
    encoder.to(torch.float16).save_pretrained(folder / "image_encoder")
    save_file({k: v.to(torch.float16) for k, v in state.items()}, folder / IP_ADAPTER_WEIGHT_NAME)
    del encoder, state
    torch.set_default_dtype(dtype)  # built in bf16: an fp32 copy would need 10 GB
    unet = build_unet(FULL)
    torch.set_default_dtype(torch.float32)
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet, scheduler=None
    )
    load_s, adapter = _timed(lambda: IpAdapter(pipe, folder))
    rows.append(("load_ip_adapter into one real-size UNet, file in page cache (s)", f"{load_s:.2f}"))
    rows.append(("adapter modules (GiB, bf16)", _gib(_param_bytes(adapter.modules))))
    rows.append(("image encoder ViT-H/14 (GiB, bf16)", _gib(_param_bytes(adapter.image_encoder))))
    encode = []
    with adapter.installed(0.6):
        for _ in range(runs):
            encode.append(_timed(lambda: adapter.embeds(pipe, [reference(1)], guided=True))[0])
        embeds = adapter.embeds(pipe, [reference(1)], guided=True)
    rows.append(
        ("encode one reference, guided (s, best / median)", f"{min(encode):.2f} / {statistics.median(encode):.2f}")
    )
    sample = torch.randn(2, 4, latent, latent, dtype=dtype)
    text = torch.randn(2, 77, 2048, dtype=dtype)
    added = {"text_embeds": torch.randn(2, 1280, dtype=dtype), "time_ids": torch.randn(2, 6, dtype=dtype)}
    steps: dict[str, list[float]] = {"plain": [], "IP-Adapter": []}
    with torch.no_grad():
        unet(sample, 500, text, added_cond_kwargs=added)  # warm-up
        for _ in range(runs):
            steps["plain"].append(_timed(lambda: unet(sample, 500, text, added_cond_kwargs=added))[0])
            with adapter.installed(0.6):
                kwargs = {**added, "image_embeds": embeds}
                steps["IP-Adapter"].append(_timed(lambda k=kwargs: unet(sample, 500, text, added_cond_kwargs=k))[0])
    plain = min(steps["plain"])
    for name, times in steps.items():
        rows.append(
            (
                f"UNet forward, batch 2, {latent * 8}x{latent * 8} px, {name} (s, best / median, x plain)",
                f"{min(times):.2f} / {statistics.median(times):.2f}, {min(times) / plain:.3f}x",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="check the engine mode on the tiny weights")
    parser.add_argument("--parts", action="store_true", help="real shapes, random bf16, no engine (CPU)")
    parser.add_argument("--latent", type=int, default=32, help="--parts: latent side (32 = 256 px)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    rows: Rows = [("device", device), ("torch", torch.__version__)]
    if not args.parts and args.weights is None:
        parser.error("--weights is required unless --parts")
    with tempfile.TemporaryDirectory(prefix="benchmark-ip-adapter-") as scratch:
        if args.parts:
            rows += parts_rows(args.latent, args.runs, Path(scratch))
        else:
            rows += engine_rows(args.weights, args.steps, args.runs, args.tiny, Path(scratch))
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
