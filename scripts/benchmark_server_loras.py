"""What a LoRA adds to a prediction through the real Cog server, on the tiny weights: one LoRA, two,
and switching between two cached ones, each against a plain request; prints a Markdown table.

The first wave, with unfused PEFT adapters, measured this at 1.26-1.56x plain (one LoRA),
1.48-2.08x (two) and about 2x repeating one (a switch). Rounds are interleaved, so a busy
machine slows every case alike; the medians are the ones to read. LoRAs are local files (what a
cache hit resolves to), so no download is timed.

Usage: python scripts/benchmark_server_loras.py [--rounds 12] [--steps 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import StableDiffusionXLPipeline
from diffusers.utils.logging import disable_progress_bar

from engine.config import DEFAULT_MODEL, weights_root
from test_folder.conftest import CogServer
from test_folder.emulators import file_host
from test_folder.lora_factory import diffusers_lora, kohya_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    root = weights_root()
    disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionXLPipeline.from_pretrained(root / DEFAULT_MODEL)  # only for the LoRAs' shapes
        # Served over loopback HTTP: the server reads no path of its own (docs/reliability.md).
        host = file_host(
            {
                "a.safetensors": diffusers_lora(pipe, Path(tmp) / "a", seed=1, text=True).read_bytes(),
                "b.safetensors": kohya_lora(pipe, Path(tmp) / "b.safetensors", seed=2, text=True).read_bytes(),
            }
        )
        a, b = f"{host.url}/a.safetensors", f"{host.url}/b.safetensors"
        base = {"prompt": "a lighthouse at dusk", "num_inference_steps": args.steps, "seed": 1, "output_format": "png"}
        cases: dict[str, Any] = {
            "plain": lambda i: base,
            "one LoRA, the same each time": lambda i: {**base, "lora_weights": a},
            "two LoRAs, the same each time": lambda i: {**base, "lora_weights": a, "extra_lora": b},
            "one LoRA, switching A <-> B": lambda i: {**base, "lora_weights": (a, b)[i % 2]},
        }
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        with CogServer(root, Path(tmp) / "server.log") as server:

            def timed(name: str, i: int) -> float:
                start = time.perf_counter()
                status, body = server.predict(cases[name](i))
                if status != 200 or body.get("status") != "succeeded":
                    raise RuntimeError(f"{name}: {status} {body.get('error')}")
                return time.perf_counter() - start

            for name in cases:  # warm: every LoRA parsed once
                for i in range(2):
                    timed(name, i)
            for i in range(args.rounds):
                for name in cases:
                    seconds[name].append(timed(name, i))
    plain = statistics.median(seconds["plain"])
    print(f"{args.rounds} interleaved rounds, {args.steps} steps, tiny weights, through `python -m cog.server.http`\n")
    print("| request | median (s) | best (s) | median / plain |\n|---|---|---|---|")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.3f} | {min(times):.3f} | {median / plain:.2f}x |")


if __name__ == "__main__":
    main()
