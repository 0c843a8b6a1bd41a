"""Cold start on this machine: Engine.load against a raw read of the same safetensors bytes.

Usage: python scripts/benchmark_setup.py [--weights DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import MODEL_IDS, SAFETY_CHECKER_DIR, weights_root
from engine.generator import Engine
from engine.request import GenerationRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = args.weights or weights_root()
    files = sorted(p for m in (*MODEL_IDS, SAFETY_CHECKER_DIR) for p in (root / m).rglob("*.safetensors"))
    size_mb = sum(p.stat().st_size for p in files) / 2**20

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    raw = best(lambda: [load_file(p) for p in files])
    setup = best(lambda: Engine.load(root))
    engine = Engine.load(root)
    req = GenerationRequest(prompt="a lighthouse", num_inference_steps=2, seed=1)
    engine.generate(req)
    switch = best(lambda: engine.generate(replace(req, model="sdxl")))
    print("| measure | value |\n|---|---|")
    print(f"| device | {'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} threads |")
    print(f"| raw safetensors read, {size_mb:.1f} MiB (s) | {raw:.3f} |")
    print(f"| Engine.load, both models + checker (s) | {setup:.3f} |")
    print(f"| setup / raw read | {setup / raw:.1f}x |")
    print(f"| 2-step request on the other model, both resident (s) | {switch:.3f} |")


if __name__ == "__main__":
    main()
