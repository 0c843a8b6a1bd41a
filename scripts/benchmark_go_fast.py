"""go_fast's UNet work on real SDXL shapes (random weights, CPU): a full UNet call against the
shallow path that reuses deep features, and what go_fast's schedule makes of a whole run.

The shallow path's share is measured at the given latent size; at 1024² (a 128 latent) the deep
blocks' attention grows faster than the shallow convolutions, so the share measured at a smaller
latent is an upper bound there. Prints a Markdown table for the README.

Usage: python scripts/benchmark_go_fast.py [--latent 64] [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import GO_FAST_CFG_CUTOFF, GO_FAST_DEEP_CACHE_INTERVAL, GO_FAST_DEEP_CACHE_START
from engine.deepcache import DeepFeatureCache
from scripts.build_tiny_weights import FULL, build_unet


def schedule(steps: int) -> list[tuple[bool, float]]:
    """(whole UNet?, batch factor) of each step under go_fast, from the engine's own rules."""
    cache = DeepFeatureCache(torch.nn.Module(), lambda: steps, GO_FAST_DEEP_CACHE_START, GO_FAST_DEEP_CACHE_INTERVAL)
    cache.features = torch.empty(0)  # as after the first full step
    cutoff = max(1, round(steps * GO_FAST_CFG_CUTOFF))
    return [(cache.is_full(step), 1.0 if step < cutoff else 0.5) for step in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # 5 GB of random weights instead of 10
    unet = build_unet(FULL).eval()
    torch.set_default_dtype(torch.float32)
    config = unet.config
    batch = 2  # classifier-free guidance
    sample = torch.randn(batch, 4, args.latent, args.latent, dtype=torch.bfloat16)
    text = torch.randn(batch, 77, config.cross_attention_dim, dtype=torch.bfloat16)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = float(args.latent * 8)
    added = {
        "text_embeds": torch.randn(batch, pooled, dtype=torch.bfloat16),
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.bfloat16),
    }
    cache = DeepFeatureCache(unet, lambda: 10, start=0.0, interval=2)
    full_s, shallow_s = [], []
    with cache.installed():
        unet(sample, 500, text, added_cond_kwargs=added, return_dict=False)  # warm-up, fills the features
        for _ in range(args.rounds):  # interleaved, so a busy machine slows both alike
            cache.calls = 1  # a full step
            start = time.perf_counter()
            unet(sample, 500, text, added_cond_kwargs=added, return_dict=False)
            full_s.append(time.perf_counter() - start)
            cache.calls = 2  # a step that reuses the deep features
            start = time.perf_counter()
            unet(sample, 500, text, added_cond_kwargs=added, return_dict=False)
            shallow_s.append(time.perf_counter() - start)
    full, shallow = min(full_s), min(shallow_s)
    steps = schedule(args.steps)
    plain_work = float(args.steps)
    cfg_only = sum(factor for _, factor in steps)
    go_fast = sum(factor * (1.0 if whole else shallow / full) for whole, factor in steps)
    rows = [
        ("torch", torch.__version__),
        ("CPU threads", str(torch.get_num_threads())),
        ("latent (px)", f"{args.latent} ({args.latent * 8})"),
        ("full UNet call, batch 2, bf16 (s, best / median)", f"{full:.2f} / {statistics.median(full_s):.2f}"),
        ("shallow path call (s, best / median)", f"{shallow:.2f} / {statistics.median(shallow_s):.2f}"),
        ("shallow / full", f"{shallow / full:.3f}"),
        (f"whole-UNet steps of {args.steps} under go_fast", str(sum(whole for whole, _ in steps))),
        (f"UNet work, {args.steps} steps: plain", f"{plain_work:.1f}"),
        ("UNet work: CFG cutoff only (the first go_fast)", f"{cfg_only:.1f} ({plain_work / cfg_only:.2f}x)"),
        ("UNet work: go_fast (cutoff + deep features)", f"{go_fast:.1f} ({plain_work / go_fast:.2f}x)"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
