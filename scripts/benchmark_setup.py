"""Cold start on this machine: Engine.load against a raw read of the same safetensors bytes.

`--dtype float16 --setup-only` times real-size weights on a CPU machine: they load as stored, with
no conversion, and no request runs (CPU fp16 matmuls are too slow to time one).

Usage: python scripts/benchmark_setup.py [--weights DIR] [--runs 3] [--dtype float16] [--setup-only]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import SETUP_DIRS, weights_root
from engine.generator import Engine
from engine.request import GenerationRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    parser.add_argument("--setup-only", action="store_true", help="skip the request on the other model")
    args = parser.parse_args()
    root = args.weights or weights_root()
    # Every file setup loads (the optional folders too, when built), so the ratio compares like with like.
    files = sorted(p for m in SETUP_DIRS for p in (root / m).rglob("*.safetensors"))
    size_mb = sum(p.stat().st_size for p in files) / 2**20

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def read_all() -> None:
        """Every byte of the files, once (safetensors maps files on a CPU and reads lazily)."""
        buffer = bytearray(1 << 26)
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass

    raw = best(read_all)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    setup = best(lambda: Engine.load(root, dtype=dtype))
    print("| measure | value |\n|---|---|")
    print(f"| device | {'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} threads |")
    print(f"| raw safetensors read, {size_mb:.1f} MiB (s) | {raw:.3f} |")
    print(f"| Engine.load, both models + checker + the optional folders present (s) | {setup:.3f} |")
    print(f"| setup / raw read | {setup / raw:.1f}x |")
    if not args.setup_only:
        engine = Engine.load(root, dtype=dtype)
        req = GenerationRequest(prompt="a lighthouse", num_inference_steps=2, seed=1)
        engine.generate(req)
        switch = best(lambda: engine.generate(replace(req, model="sdxl")))
        print(f"| 2-step request on the other model, both resident (s) | {switch:.3f} |")


if __name__ == "__main__":
    main()
