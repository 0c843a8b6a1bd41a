"""Write bake/configs/sdxl: SDXL's model_index, component configs and tokenizer files, no weights.

The bake converts single-file checkpoints with `from_single_file(config=...)`, which needs a
local diffusers folder to know the architecture without asking the hub. The configs come from
the same real-size SDXL shapes as build_tiny_weights.py --full-size (built on the meta device,
so nothing is allocated), and the tokenizers carry the real CLIP vocabulary.

Usage: python scripts/write_config_folder.py [--out bake/configs/sdxl]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import REPO_ROOT
from scripts.build_tiny_weights import FULL, build_model


def write(out: Path) -> None:
    with torch.device("meta"):
        pipe = build_model(0, FULL)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pipe.save_config(out)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(out / name)
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).config.save_pretrained(out / name)
    for name in ("tokenizer", "tokenizer_2"):
        getattr(pipe, name).save_pretrained(out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bake" / "configs" / "sdxl")
    args = parser.parse_args()
    write(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
