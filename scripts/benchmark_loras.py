"""LoRA benchmark: switching on the tiny model and at real SDXL shapes, and UNet step time with
fused LoRAs; prints a Markdown table for docs/performance.md.

- Switching, through the engine's LoraSet: first load (parse + fuse), a warm switch A -> B (both
  parsed before), a scale-only change, and for comparison the naive switch from A to B
  (`unload_lora_weights()` of A's unfused adapter + `load_lora_weights()` of B) and diffusers' own fused switch
  (`unfuse_lora()`, unload, load, `fuse_lora()`). Tiny model, and real SDXL shapes with random weights
  (a rank-32 LoRA on every attention projection of the UNet).
- UNet step time at real SDXL shapes: plain, one and two fused LoRAs, and one unfused PEFT
  adapter (what the engine did before fusing), best of interleaved rounds.
- Resident memory over 100 A <-> B switches on the tiny model.
- LyCORIS formats through the general write path (ΔW built per weight in fp32 from the factors):
  a warm fuse of a LoKr and of a DoRA file (a LoCon with dora_scale, made by LyCORIS's modules)
  against a plain LoRA of the same rank on the same weights, and the UNet step with each fused.

Real-size weights are bf16: this CPU has no fast fp16 matmul (about 3 GFLOPS against 400 in
bf16), and bf16 moves the same bytes as the fp16 a GPU uses. The step runs at a small latent
(`--latent`, 32 = 256 px) so a round takes seconds on two cores; every weight has its real shape.

Usage: python scripts/benchmark_loras.py [--skip-full-size] [--latent 32] [--rounds 3] [--switch-rounds 5]
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
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save_file

from engine.loras import LoraSet
from engine.request import LocalLora
from scripts.build_tiny_weights import FULL, TINY, build_model
from test_folder.lora_factory import UNET_TARGETS, diffusers_lora, lycoris_state


def _seconds(fn: Callable[[], object], setup: Callable[[], object] = lambda: None, repeat: int = 3) -> float:
    """Best of `repeat` timings of fn, each after an untimed setup."""
    best = float("inf")
    for _ in range(repeat):
        setup()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _pair(pipe: StableDiffusionXLPipeline, root: Path, rank: int) -> tuple[LocalLora, LocalLora]:
    a = LocalLora("a", diffusers_lora(pipe, root / "a", seed=1, rank=rank), 1.0, "A")
    b = LocalLora("b", diffusers_lora(pipe, root / "b", seed=2, rank=rank), 1.0, "B")
    return a, b


def lycoris_pair(pipe: StableDiffusionXLPipeline, root: Path, rank: int) -> tuple[LocalLora, LocalLora]:
    """A LoKr (factor 8, both sides split where the rank allows) and a DoRA LoCon of this rank on
    every attention projection of the UNet, the plain LoRA's weights."""
    targets = [("unet", name) for name, _ in pipe.unet.named_modules() if name.endswith(tuple(UNET_TARGETS))]
    made = {
        "lokr": lycoris_state(
            pipe, "lokr", 3, targets=targets, lora_dim=rank, alpha=rank, factor=8, decompose_both=True
        ),
        "dora": lycoris_state(pipe, "locon", 4, targets=targets, lora_dim=rank, alpha=rank, dora=True),
    }
    files = [_saved(pipe, root, name, state) for name, state in made.items()]
    return files[0], files[1]


def oft_lora(pipe: StableDiffusionXLPipeline, root: Path, block: int) -> LocalLora:
    """A LyCORIS diag-OFT of this block size on every attention projection of the UNet: its W' is
    a rotation of W0, computed at fuse time."""
    targets = [("unet", name) for name, _ in pipe.unet.named_modules() if name.endswith(tuple(UNET_TARGETS))]
    return _saved(pipe, root, "oft", lycoris_state(pipe, "diag-oft", 5, targets=targets, lora_dim=block))


def _saved(pipe: StableDiffusionXLPipeline, root: Path, name: str, state: dict[str, torch.Tensor]) -> LocalLora:
    save_file({k: v.to("cpu", pipe.unet.dtype) for k, v in state.items()}, root / f"{name}.safetensors")
    return LocalLora(name, root / f"{name}.safetensors", 1.0, name)


def general_path(loras: LoraSet, plain: LocalLora, lokr: LocalLora, dora: LocalLora, rounds: int) -> list[str]:
    """Seconds to fuse each file from the base, all three parsed before (best of interleaved rounds)."""
    cases = {"plain": plain, "lokr": lokr, "dora": dora}
    for lora in cases.values():
        loras.apply([lora])
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, lora in cases.items():
            best[name] = min(best[name], _seconds(lambda lora=lora: loras.apply([lora]), lambda: loras.apply([]), 1))
    loras.apply([])
    return [f"{best[n]:.3f}" for n in cases]


def switching(pipe: StableDiffusionXLPipeline, loras: LoraSet, a: LocalLora, b: LocalLora, rounds: int) -> list[str]:
    """Seconds for: first load, warm switch, scale-only change, the naive switch, diffusers' own
    fused switch (best of interleaved rounds, so a busy machine slows every side alike); and the
    warm switch's speed-up over both. `unfuse_lora` subtracts, so the base drifts after the fused
    case (timings only: the next restore copies the exact weights back)."""

    def cold() -> None:
        loras.apply([])
        loras.warm.clear()

    def naive_a() -> None:  # A loaded as an unfused adapter, as the naive engine leaves it
        loras.apply([])
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(a.path), adapter_name="naive_a")

    def naive() -> None:
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(b.path), adapter_name="naive_b")

    def library_fused(lora: LocalLora) -> Callable[[], None]:
        def switch() -> None:
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
            pipe.load_lora_weights(str(lora.path), adapter_name=f"fused_{lora.key}")
            pipe.fuse_lora()

        return switch

    def warm_a() -> None:  # both parsed (`cold` dropped them), A active
        loras.apply([b])
        loras.apply([a])

    half_b = LocalLora("b", b.path, 0.5, "B")
    cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {  # name: (setup, timed)
        "first": (cold, lambda: loras.apply([a])),
        "switch": (warm_a, lambda: loras.apply([b])),
        "rescale": (lambda: loras.apply([b]), lambda: loras.apply([half_b])),
        "naive": (naive_a, naive),
        "library fused": (library_fused(a), library_fused(b)),
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, (setup, timed) in cases.items():
            best[name] = min(best[name], _seconds(timed, setup=setup, repeat=1))
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    speed_ups = [f"{best[n] / best['switch']:.1f}x" for n in ("naive", "library fused")]
    return [f"{best[n]:.3f}" for n in cases] + speed_ups


def steps(
    pipe: StableDiffusionXLPipeline,
    loras: LoraSet,
    a: LocalLora,
    b: LocalLora,
    formats: tuple[LocalLora, LocalLora],
    latent: int,
    rounds: int,
) -> list[str]:
    """Best UNet step time of interleaved rounds (each case warmed up by one untimed step): plain,
    one and two fused LoRAs, one unfused adapter, a fused LoKr and a fused DoRA."""
    unet = pipe.unet
    dtype = unet.dtype
    sample = torch.randn(2, 4, latent, latent, dtype=dtype)  # batch 2: classifier-free guidance
    context = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=dtype)
    added = {
        "text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim, dtype=dtype),
        "time_ids": torch.randn(2, 6, dtype=dtype),
    }

    def step() -> None:
        unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added)

    def warmed(setup: Callable[[], object]) -> Callable[[], None]:
        return lambda: (setup(), step())

    def unfused() -> None:
        loras.apply([])
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(a.path), adapter_name="unfused")

    cases: dict[str, Callable[[], object]] = {
        "plain": lambda: loras.apply([]),
        "one": lambda: loras.apply([a]),
        "two": lambda: loras.apply([a, b]),
        "unfused": unfused,
        "lokr": lambda: loras.apply([formats[0]]),
        "dora": lambda: loras.apply([formats[1]]),
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, setup in cases.items():
            best[name] = min(best[name], _seconds(step, setup=warmed(setup), repeat=2))
            pipe.unload_lora_weights()
    loras.apply([])
    plain = best["plain"]
    return [f"{best[n]:.2f} ({best[n] / plain:.3f}x)" if n != "plain" else f"{plain:.2f}" for n in cases]


def memory(pipe: StableDiffusionXLPipeline, loras: LoraSet, a: LocalLora, b: LocalLora) -> str:
    for i in range(10):  # warm allocator caches, the parsed LoRAs and the saved weights first
        loras.apply([a if i % 2 else b])
    before = _rss_mib()
    for i in range(100):
        loras.apply([a if i % 2 else b])
    after = _rss_mib()
    loras.apply([])
    return f"{after - before:+.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-full-size", action="store_true", help="only the tiny model")
    parser.add_argument("--latent", type=int, default=32, help="latent side for the step timing (128 = 1024 px)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the real-size step timing")
    parser.add_argument("--switch-rounds", type=int, default=5, help="interleaved rounds of the switch timings")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    # Random weights make denormal activations, which x86 computes slowly and GPUs do not: without
    # flushing them, step times depend on the weights' values, not on what the forward runs.
    torch.set_flush_denormal(True)
    diffusers_logging.set_verbosity_error()  # the naive loads warn that the LoRAs hold no text-encoder keys
    switch_names = [
        "first load of a LoRA: parse + fuse (s)",
        "warm switch A → B, both parsed before (s)",
        "scale-only change (s)",
        "naive switch A → B: `unload_lora_weights()` + `load_lora_weights()`, unfused (s)",
        "diffusers' fused switch: `unfuse_lora`, unload, load, `fuse_lora` (s)",
        "warm switch speed-up over naive",
        "warm switch speed-up over diffusers' fused switch",
    ]
    step_names = [
        "UNet step, plain (s)",
        "UNet step, one fused rank-32 LoRA (s, x plain)",
        "UNet step, two fused rank-32 LoRAs (s, x plain)",
        "UNet step, one unfused PEFT adapter, as before (s, x plain)",
        "UNet step, one fused LoKr (s, x plain)",
        "UNet step, one fused DoRA LoCon (s, x plain)",
    ]
    format_names = [
        "fuse from the base, parsed before: plain LoRA (s)",
        "fuse from the base, parsed before: LoKr (s)",
        "fuse from the base, parsed before: DoRA LoCon (s)",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = build_model(1, TINY)
        a, b = _pair(tiny, root / "tiny", rank=4)
        tiny_switch = switching(tiny, LoraSet(tiny, "tiny"), a, b, args.switch_rounds)
        tiny_memory = memory(tiny, LoraSet(tiny, "tiny"), a, b)
        tiny_formats = general_path(LoraSet(tiny, "tiny"), a, *lycoris_pair(tiny, root, 4), args.switch_rounds)
        full_switch = [""] * len(switch_names)
        full_steps = [""] * len(step_names)
        full_formats = [""] * len(format_names)
        if not args.skip_full_size:
            torch.set_default_dtype(torch.bfloat16)  # half the memory for 3.5B random parameters
            full = build_model(1, FULL)
            torch.set_default_dtype(torch.float32)
            a, b = _pair(full, root / "full", rank=32)
            loras = LoraSet(full, "SDXL-size")
            full_switch = switching(full, loras, a, b, args.switch_rounds)
            formats = lycoris_pair(full, root, 32)
            full_formats = general_path(loras, a, *formats, args.switch_rounds)
            full_steps = steps(full, loras, a, b, formats, args.latent, args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, step latent {args.latent}²\n")
    print("| measure | tiny | SDXL-size |\n|---|---|---|")
    for name, tiny_value, full_value in zip(switch_names, tiny_switch, full_switch, strict=True):
        print(f"| {name} | {tiny_value} | {full_value} |")
    for name, tiny_value, full_value in zip(format_names, tiny_formats, full_formats, strict=True):
        print(f"| {name} | {tiny_value} | {full_value} |")
    for name, full_value in zip(step_names, full_steps, strict=True):
        print(f"| {name} | | {full_value} |")
    print(f"| RSS growth over 100 A ↔ B switches (MiB) | {tiny_memory} | |")


if __name__ == "__main__":
    main()
