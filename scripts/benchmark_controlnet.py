"""What a control image costs: the union ControlNet against the UNet on real SDXL shapes, and on
a GPU the whole request at 1024² with and without ControlNet, with peak memory.

Without --weights: random weights at real shapes (bf16 on a CPU, fp16 on CUDA), one batch-2 call
of the UNet and of the ControlNet at the given latent, and what go_fast's schedule makes of them
(on go_fast's cached steps both run only up to their first down block). With --weights DIR (full-size
weights from `scripts/build_tiny_weights.py --full-size --out DIR`, or real ones): the engine's
own requests, plain / canny / depth, go_fast off and on, and torch.cuda.max_memory_allocated.
Prints Markdown tables for docs/performance.md.

Usage: python scripts/benchmark_controlnet.py [--latent 32] [--rounds 3] [--weights DIR --steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import CONTROL_MODES
from engine.control import shallow_residuals
from engine.deepcache import DeepFeatureCache
from scripts.benchmark_go_fast import plan
from scripts.build_tiny_weights import FULL, build_controlnet, build_unet


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """Best and median of each call over rounds that run every call in turn, so load that comes
    and goes on a shared machine weighs on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(timed(call))
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def components(latent: int, rounds: int, steps: int) -> None:
    """One UNet call and one ControlNet call at real shapes, and a go_fast run's work in UNet calls."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16  # no fast fp16 matmul on a CPU
    torch.set_grad_enabled(False)
    torch.set_flush_denormal(True)  # random weights make denormals, slow on x86 and not on a GPU
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        unet = build_unet(FULL).eval()
        controlnet = build_controlnet(FULL).eval()
    torch.set_default_dtype(torch.float32)
    config = unet.config
    batch = 2  # classifier-free guidance
    sample = torch.randn(batch, 4, latent, latent, dtype=dtype, device=device)
    text = torch.randn(batch, 77, config.cross_attention_dim, dtype=dtype, device=device)
    size = float(latent * 8)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(batch, pooled, dtype=dtype, device=device),
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=dtype, device=device),
    }
    control_type = torch.zeros(batch, controlnet.config.num_control_type, dtype=dtype, device=device)
    control_type[:, CONTROL_MODES["canny"]] = 1
    cond = [torch.rand(batch, 3, latent * 8, latent * 8, dtype=dtype, device=device)]

    control_kwargs = {
        "sample": sample,
        "timestep": 500,
        "encoder_hidden_states": text,
        "controlnet_cond": cond,
        "control_type": control_type,
        "control_type_idx": [CONTROL_MODES["canny"]],
        "conditioning_scale": [0.8],
        "added_cond_kwargs": added,
        "return_dict": False,
    }

    def run_controlnet() -> tuple:
        return controlnet(**control_kwargs)

    def controlnet_first_block() -> tuple:
        return shallow_residuals(controlnet, len(unet.up_blocks[-1].resnets), **control_kwargs)

    down, mid = run_controlnet()
    residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def whole() -> None:
        unet(sample, 500, text, added_cond_kwargs=added, **residuals)

    cache = DeepFeatureCache(unet, lambda: [True, True, False])

    def shallow() -> None:
        with cache.installed():
            cache.calls = 1  # a full step fills the deep features (not timed apart) ...
            whole()
            start = time.perf_counter()
            whole()  # ... and step 2 reuses them
            shallow_times.append(time.perf_counter() - start)

    shallow_times: list[float] = []
    calls = {
        "UNet, whole (s)": whole,
        "ControlNet, whole (s)": run_controlnet,
        "ControlNet, to its first down block (s)": controlnet_first_block,
        "shallow": shallow,
    }
    rows = interleaved(calls, rounds)
    rows["UNet, shallow path (s)"] = (min(shallow_times), statistics.median(shallow_times))
    del rows["shallow"]
    full, control, control_short, short = (rows[k][0] for k in rows)
    steps_plan = plan(steps)
    plain = steps * full
    fast = sum((full if whole else short) * half for whole, half in steps_plan)
    fast_control = fast + sum((control if whole else control_short) * half for whole, half in steps_plan)
    print(f"device {device}, {dtype}, batch 2, latent {latent} ({latent * 8} px), best / median of {rounds}\n")
    print("| measure | value |\n|---|---|")
    for name, (best, median) in rows.items():
        print(f"| {name} | {best:.3f} / {median:.3f} |")
    print(f"| ControlNet / whole UNet: whole, to its first block | {control / full:.2f}, {control_short / full:.2f} |")
    print(
        f"| {steps} steps, go_fast off: without / with ControlNet (s) | {plain:.1f} / {plain + steps * control:.1f} |"
    )
    print(f"| {steps} steps, go_fast on: without / with ControlNet (s) | {fast:.1f} / {fast_control:.1f} |")


def photo(size: int) -> Image.Image:
    image = Image.fromarray(np.tile(np.linspace(40, 220, size, dtype=np.uint8)[:, None, None], (1, size, 3)))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 8, size // 3, size // 2, size * 5 // 6), fill=(20, 30, 90))
    draw.rectangle((size // 2, size // 8, size * 7 // 8, size // 2), fill=(240, 200, 60))
    return image


def requests(weights: Path, steps: int, rounds: int) -> None:
    """Whole requests through the engine at the model's native size, plain and with ControlNet."""
    from engine.generator import Engine
    from engine.request import GenerationRequest

    start = time.perf_counter()
    engine = Engine.load(weights)
    print(f"Engine.load with ControlNet and depth estimator: {time.perf_counter() - start:.2f} s\n")
    base = GenerationRequest(prompt="a lighthouse on a cliff", seed=1, num_inference_steps=steps, safety_checker=False)
    control = {"control_image": photo(1024)}
    cases = {
        "plain": {},
        "canny": {**control, "control_type": "canny"},
        "depth": {**control, "control_type": "depth"},
    }
    print("| request | go_fast | best / median (s) | peak GPU memory (GiB) |\n|---|---|---|---|")
    for go_fast in (False, True):
        for name, extra in cases.items():
            req = GenerationRequest(**{**base.__dict__, "go_fast": go_fast, **extra})
            engine.generate(req)  # warm-up
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            times = [timed(lambda r=req: engine.generate(r)) for _ in range(rounds)]
            best, median = min(times), statistics.median(times)
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
            print(f"| {name} | {go_fast} | {best:.3f} / {median:.3f} | {peak:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side for the component timings (128 = 1024 px)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", type=Path, default=None, help="time whole requests on these weights")
    args = parser.parse_args()
    if args.weights is not None:
        requests(args.weights, args.steps, args.rounds)
    else:
        components(args.latent, args.rounds, args.steps)


if __name__ == "__main__":
    main()
