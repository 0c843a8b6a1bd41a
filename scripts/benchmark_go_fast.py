"""go_fast's UNet work: what its schedule removes per scheduler, counted by hooks on real pipeline
runs, and the cost of a shallow-path call against a full one on real SDXL shapes.

1. Schedule (`--weights`, the tiny model that `make demo` builds): each scheduler runs one request
   of `--steps` steps with go_fast off and on; forward hooks count the UNet calls, their batch
   sizes (guided = 2) and the calls that reach the mid block (whole UNet). The schedule depends on
   the sigmas only, which the tiny model shares with SDXL (same noise schedule config).
2. Cost of a shallow-path call against a full one at SDXL's real shapes and `--latent` size: by
   default their floating-point operations, counted by torch's FlopCounterMode on the meta device
   (no weights, no compute, seconds); with `--time`, wall clock of random bf16 weights on this
   machine's CPU (where attention weighs more than on a GPU). `--shallow-share X` skips both.

UNet work = sum over calls of (batch / 2) x (1 for a whole call, the shallow share for a cached one),
against the plain pipeline's one unit per step. Prints Markdown tables for docs/go-fast.md.

Usage: python scripts/benchmark_go_fast.py [--steps 28] [--latent 128] [--time --rounds 3] [--shallow-share X]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import DEFAULT_SCHEDULER, GO_FAST_GUIDANCE_MIN_SIGMA
from engine.deepcache import DeepFeatureCache
from engine.generator import Engine
from engine.request import GenerationRequest
from engine.schedulers import SCHEDULERS, make_scheduler
from engine.steps import first_unguided_step, noise_levels, whole_steps
from scripts.build_tiny_weights import FULL, build_unet

# SDXL's noise schedule (its scheduler_config.json), for plans without a pipeline.
SDXL_NOISE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def plan(steps: int, scheduler: str = DEFAULT_SCHEDULER) -> list[tuple[bool, float]]:
    """(whole UNet?, batch factor) of each step under go_fast on SDXL's noise schedule, by the engine's rules."""
    made = make_scheduler(scheduler, SDXL_NOISE)
    made.set_timesteps(steps)
    sigmas = noise_levels(SimpleNamespace(scheduler=made, num_timesteps=steps))
    cutoff = first_unguided_step(sigmas, GO_FAST_GUIDANCE_MIN_SIGMA) or steps
    return [(whole, 1.0 if step < cutoff else 0.5) for step, whole in enumerate(whole_steps(sigmas))]


def counted(engine: Engine, req: GenerationRequest) -> list[tuple[int, bool]]:
    """(batch, whole?) of every UNet call of one request, read by forward pre-hooks."""
    unet = engine.models[req.model].txt2img.unet
    calls: list[list] = []
    hooks = [
        unet.register_forward_pre_hook(lambda module, args: calls.append([args[0].shape[0], False])),
        unet.mid_block.register_forward_pre_hook(lambda *_: calls[-1].__setitem__(1, True)),
    ]
    try:
        engine.generate(req)
    finally:
        for hook in hooks:
            hook.remove()
    return [(batch, whole) for batch, whole in calls]


def unet_inputs(unet: torch.nn.Module, latent: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A batch-2 call's inputs at SDXL's shapes, on the UNet's device."""
    config, device, batch = unet.config, unet.device, 2  # batch 2: classifier-free guidance
    sample = torch.randn(batch, 4, latent, latent, dtype=dtype, device=device)
    text = torch.randn(batch, 77, config.cross_attention_dim, dtype=dtype, device=device)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = float(latent * 8)
    added = {
        "text_embeds": torch.randn(batch, pooled, dtype=dtype, device=device),
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=dtype, device=device),
    }
    return sample, text, added


def counted_share(latent: int) -> tuple[float, list[tuple[str, str]]]:
    """Shallow-path FLOPs over full-call FLOPs at this latent size, and the table rows."""
    with torch.device("meta"):
        unet = build_unet(FULL).eval()
    sample, text, added = unet_inputs(unet, latent, torch.float32)
    cache = DeepFeatureCache(unet, lambda: [True, True, False])
    counts = []
    with cache.installed():
        for call in (1, 2):  # step 1 is whole (and leaves the features), step 2 reuses
            cache.calls = call
            with FlopCounterMode(display=False) as counter:
                unet(sample, 500, text, added_cond_kwargs=added, return_dict=False)
            counts.append(counter.get_total_flops())
    full, shallow = counts
    rows = [
        ("latent (px)", f"{latent} ({latent * 8})"),
        ("full UNet call, batch 2 (TFLOP)", f"{full / 1e12:.2f}"),
        ("shallow path call (TFLOP)", f"{shallow / 1e12:.3f}"),
        ("shallow / full", f"{shallow / full:.3f}"),
    ]
    return shallow / full, rows


def timed_share(latent: int, rounds: int) -> tuple[float, list[tuple[str, str]]]:
    """Best shallow-path time over best full-call time at this latent size, and the table rows."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # 5 GB of random weights instead of 10
    unet = build_unet(FULL).eval()
    torch.set_default_dtype(torch.float32)
    sample, text, added = unet_inputs(unet, latent, torch.bfloat16)
    cache = DeepFeatureCache(unet, lambda: [True, True, False])
    full_s, shallow_s = [], []
    with cache.installed():
        unet(sample, 500, text, added_cond_kwargs=added, return_dict=False)  # warm-up, fills the features
        for _ in range(rounds):  # interleaved, so a busy machine slows both alike
            for call, times in ((1, full_s), (2, shallow_s)):  # step 1 is whole, step 2 reuses
                cache.calls = call
                start = time.perf_counter()
                unet(sample, 500, text, added_cond_kwargs=added, return_dict=False)
                times.append(time.perf_counter() - start)
    full, shallow = min(full_s), min(shallow_s)
    rows = [
        ("torch, CPU threads", f"{torch.__version__}, {torch.get_num_threads()}"),
        ("latent (px)", f"{latent} ({latent * 8})"),
        ("full UNet call, batch 2, bf16 (s, best / median)", f"{full:.2f} / {statistics.median(full_s):.2f}"),
        ("shallow path call (s, best / median)", f"{shallow:.2f} / {statistics.median(shallow_s):.2f}"),
        ("shallow / full", f"{shallow / full:.3f}"),
    ]
    return shallow / full, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=Path("weights"), help="tiny weights (make demo)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024 px)")
    parser.add_argument("--time", action="store_true", help="time random bf16 weights on the CPU instead")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (with --time)")
    parser.add_argument("--shallow-share", type=float, help="skip the measurement, use this shallow / full")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    share = args.shallow_share
    if share is None:
        share, rows = timed_share(args.latent, args.rounds) if args.time else counted_share(args.latent)
        print("| measure | value |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value} |")
        print()
    engine = Engine.load(args.weights)
    req = GenerationRequest(prompt="a lighthouse at dusk", num_inference_steps=args.steps, seed=1, megapixels="0.25")
    print(f"| scheduler, {args.steps} steps | whole UNet calls | guided calls | UNet work vs go_fast off |")
    print("|---|---|---|---|")
    for name in SCHEDULERS:
        plain = counted(engine, replace(req, scheduler=name, go_fast=False))
        fast = counted(engine, replace(req, scheduler=name, go_fast=True))
        assert all(batch == 2 and whole for batch, whole in plain), "go_fast off runs every step whole and guided"
        work = sum(batch / 2 * (1.0 if whole else share) for batch, whole in fast)
        whole = sum(whole for _, whole in fast)
        guided = sum(batch == 2 for batch, _ in fast)
        print(f"| {name} | {whole} | {guided} | {work:.1f} / {len(plain)} ({1 - work / len(plain):.0%} less) |")
    print(f"\nshallow / full used: {share:.3f}")


if __name__ == "__main__":
    main()
