"""LoRA switching and download benchmark; prints Markdown tables for the README.

- On the tiny model (through the engine's LoraSet) and on real-size SDXL shapes with random
  fp16 weights on the CPU (a rank-32 LoRA on every attention projection): first load, a switch
  A -> B with both files cached, a scale-only change, and the naive switch
  (`unload_lora_weights()` + `load_lora_weights()`) for comparison.
- Resident memory over 100 A <-> B switches on the tiny model.

Usage: python scripts/benchmark_loras.py [--skip-full-size]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import StableDiffusionXLPipeline

from engine.loras import LoraSet
from engine.request import LocalLora
from scripts.build_tiny_weights import FULL, TINY, build_model
from test_folder.lora_factory import diffusers_lora


def _seconds(fn: Callable[[], object], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def switching(pipe: StableDiffusionXLPipeline, root: Path, rank: int, label: str) -> list[tuple[str, str]]:
    a = LocalLora("a", diffusers_lora(pipe, root / "a", seed=1, rank=rank), 1.0, "A")
    b = LocalLora("b", diffusers_lora(pipe, root / "b", seed=2, rank=rank), 1.0, "B")
    loras = LoraSet(pipe, label)

    def first() -> None:
        loras.apply([])
        loras.apply([a])

    def switch() -> None:
        loras.apply([a])
        loras.apply([b])

    def rescale() -> None:
        loras.apply([b])
        loras.apply([LocalLora("b", b.path, 0.5, "B")])

    def naive() -> None:
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(b.path), adapter_name="naive")

    rows = [
        (f"{label}: first load of A (s)", f"{_seconds(first):.3f}"),
        (f"{label}: apply A, then switch to cached B (s)", f"{_seconds(switch):.3f}"),
        (f"{label}: apply B, then scale-only change (s)", f"{_seconds(rescale):.3f}"),
    ]
    loras.apply([])
    rows.append((f"{label}: naive unload_lora_weights() + load_lora_weights() (s)", f"{_seconds(naive):.3f}"))
    pipe.unload_lora_weights()
    return rows


def memory(pipe: StableDiffusionXLPipeline, root: Path) -> list[tuple[str, str]]:
    a = LocalLora("a", diffusers_lora(pipe, root / "ma", seed=3), 1.0, "A")
    b = LocalLora("b", diffusers_lora(pipe, root / "mb", seed=4), 1.0, "B")
    loras = LoraSet(pipe, "tiny")
    for i in range(10):  # warm allocator caches first
        loras.apply([a if i % 2 else b])
    before = _rss_mib()
    for i in range(100):
        loras.apply([a if i % 2 else b])
    after = _rss_mib()
    loras.apply([])
    return [("tiny: RSS growth over 100 A <-> B switches (MiB)", f"{after - before:+.1f}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-full-size", action="store_true", help="only the tiny model")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = [("torch", torch.__version__), ("CPU threads", str(torch.get_num_threads()))]
        tiny = build_model(1, TINY)
        rows += switching(tiny, root / "tiny", rank=4, label="tiny")
        rows += memory(tiny, root / "mem")
        if not args.skip_full_size:
            torch.set_default_dtype(torch.float16)  # half the memory for 3.5B random parameters
            full = build_model(1, FULL)
            torch.set_default_dtype(torch.float32)
            rows += switching(full, root / "full", rank=32, label="SDXL-size, CPU, rank 32")
            del full
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
