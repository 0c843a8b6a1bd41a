"""GPU benchmark on real-size SDXL shapes with random weights: setup, go_fast, LoRAs, switches
(the fuse alone, and request start to the first UNet step), ControlNet, IP-Adapter, upscale,
compile, memory.

Builds the full-size random weights first when the folder is empty (see build_tiny_weights.py
--full-size), then drives the real engine. Prints a Markdown table for docs/performance.md.
`--tiny` runs the same script on the tiny weights (on the CPU too), to check it before GPU time
is spent on it; its numbers mean nothing.

Usage: python scripts/benchmark_gpu.py --weights /tmp/full-weights [--steps 30] [--runs 3] [--tiny]
           [--compile auto|on|off|only] [--json OUT]
On a lent GPU machine, scripts/gpu_session.sh runs it (docs/performance.md, "Running it on a lent GPU").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.compiling import compile_wanted
from engine.config import LOCAL_FILES_ENV, MAX_OUTPUTS, SETUP_DIRS, UPSCALER_DIR
from engine.devices import default_device, default_dtype
from engine.generator import Engine
from engine.request import Credentials, GenerationRequest, LoraSpec
from engine.upscale import Upscaler
from scripts.benchmark_loras import lycoris_pair, oft_lora
from scripts.build_tiny_weights import FULL, TINY, build_all
from test_folder.lora_factory import diffusers_lora
from weights import lora_store, lora_warm_max_bytes


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> tuple[float, object]:
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    return time.perf_counter() - start, result


def _to_first_step(engine: Engine, req: GenerationRequest) -> float:
    """Seconds from calling the engine to the first UNet step's start, with the device's queue
    drained there, so the LoRA fuse and the text encoders queued before it are counted."""
    first: list[float] = []

    def mark(module: torch.nn.Module, args: tuple) -> None:
        if not first:
            _sync()
            first.append(time.perf_counter())

    handle = engine.models[req.model].txt2img.unet.register_forward_pre_hook(mark)
    try:
        _sync()
        start = time.perf_counter()
        engine.generate(req)
    finally:
        handle.remove()
    return first[0] - start


class Table:
    """Rows printed as they are measured, the JSON rewritten after each: a run cut short by the
    device's time limit still leaves every number taken before it."""

    def __init__(self, json_path: Path | None) -> None:
        self.rows: dict[str, str] = {}
        self.json_path = json_path
        print("| measure | value |\n|---|---|", flush=True)

    def add(self, name: str, value: str) -> None:
        self.rows[name] = value
        print(f"| {name} | {value} |", flush=True)
        if self.json_path:
            self.json_path.write_text(json.dumps(self.rows, indent=2))


def _upscale_rows(engine: Engine, plain: GenerationRequest, args: argparse.Namespace, table: Table) -> None:
    """upscale=4x: its setup (a second copy is loaded to time it), the latency it adds to a plain
    request, and its own peak memory on top of the resident models, at 1:1 and at Flux's widest size."""
    device = default_device()
    load_s, upscaler = _timed(lambda: Upscaler(args.weights / UPSCALER_DIR, device, default_dtype(device)))
    weights_mib = sum(p.numel() * p.element_size() for p in upscaler.model.parameters()) / 2**20
    del upscaler
    table.add("upscaler load, Swin2SR x4 (s)", f"{load_s:.2f}")
    table.add("upscaler weights (MiB)", f"{weights_mib:.0f}")
    four = replace(plain, upscale="4x")
    engine.generate(four)  # warm-up
    runs: dict[str, list[float]] = {"plain": [], "4x": []}
    for _ in range(args.runs):  # interleaved, as above
        for name, case in (("plain", plain), ("4x", four)):
            runs[name].append(_timed(lambda c=case: engine.generate(c))[0])
    best = min(runs["4x"]) - min(runs["plain"])
    median = statistics.median(runs["4x"]) - statistics.median(runs["plain"])
    # engine.generate returns images: the time to encode a 16-megapixel file (predict.py) is not in it.
    table.add(f"upscale 4x, added to a {args.steps}-step request: best / median (s)", f"{best:.3f} / {median:.3f}")
    assert engine.upscaler is not None
    for aspect in ("1:1", "21:9"):
        image = engine.generate(replace(plain, aspect_ratio=aspect))[0].image
        if torch.cuda.is_available():
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t, result = _timed(lambda im=image: engine.upscaler.upscale(im, 4))
        name = f"upscale 4x alone, {image.width}x{image.height} -> {result.width}x{result.height}"
        table.add(f"{name} (s)", f"{t:.3f}")
        if torch.cuda.is_available():
            peak = (torch.cuda.max_memory_allocated() - resident) / 2**30
            table.add(f"{name}: peak GPU memory above the resident models (GiB)", f"{peak:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--tiny", action="store_true", help="check the script on the tiny weights")
    parser.add_argument(
        "--compile",
        default="auto",
        help="also time the compiled UNets: auto (on CUDA), on, off; only: setup, then the compiled rows alone",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # The LoRA files this script writes are named by path: the operator's folder is opened to them.
    os.environ[LOCAL_FILES_ENV] = str(args.weights.resolve())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    table = Table(args.json)
    table.add("GPU", device)
    table.add("torch", torch.__version__)
    size = 128 if args.tiny else 1024

    build_s, _ = _timed(lambda: build_all(args.weights, shape=TINY if args.tiny else FULL))
    table.add("build random full-size weights (s, skipped if present)", f"{build_s:.1f}")

    # Every file setup loads (the optional folders too, when built), so the ratio compares like with like.
    files = sorted(p for m in SETUP_DIRS for p in (args.weights / m).rglob("*.safetensors"))
    size_gb = sum(p.stat().st_size for p in files) / 1e9
    raw_s, _ = _timed(lambda: [load_file(p, device="cuda" if torch.cuda.is_available() else "cpu") for p in files])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    table.add(f"raw safetensors read to GPU, every file setup loads, {size_gb:.1f} GB (s)", f"{raw_s:.2f}")

    setup_s, engine = _timed(
        lambda: Engine.load(args.weights, lora_source=lora_store(), compile="off", warm_max_bytes=lora_warm_max_bytes())
    )
    table.add("Engine.load, both models + checker + the optional folders built, uncompiled (s)", f"{setup_s:.2f}")
    table.add("setup / raw read", f"{setup_s / raw_s:.2f}x")

    req = GenerationRequest(prompt="a lighthouse at dusk", num_inference_steps=args.steps, seed=1)
    if args.compile == "only":  # a second device call: setup again, then the compiled rows alone
        lora = diffusers_lora(engine.models[req.model].txt2img, args.weights / "bench-lora", seed=7, rank=32)
        plain = replace(req, go_fast=False)
        lora_case = replace(plain, loras=(LoraSpec(str(lora), 0.8),))
        _compiled(engine, {"plain": plain, "one rank-32 LoRA": lora_case}, args.runs, size, args.steps, table)
        return
    # Interleaved rounds, so clock and neighbour noise hit both settings alike.
    runs: dict[bool, list[float]] = {False: [], True: []}
    outputs = {}
    for fast in (False, True):
        engine.generate(replace(req, go_fast=fast))  # warm-up
    for _ in range(args.runs):
        for fast in (False, True):
            t, result = _timed(lambda f=fast: engine.generate(replace(req, go_fast=f)))
            runs[fast].append(t)
            outputs[fast] = np.asarray(result[0].image, dtype=np.int16)
    latency = {fast: min(times) for fast, times in runs.items()}
    for fast, label in ((False, "off"), (True, "on")):
        table.add(
            f"{size}x{size}, {args.steps} steps, go_fast {label}: best / median of {args.runs} (s)",
            f"{latency[fast]:.3f} / {statistics.median(runs[fast]):.3f}",
        )
    batches: list[int] = []
    hook = engine.models[req.model].txt2img.unet.register_forward_pre_hook(
        lambda module, a: batches.append(a[0].shape[0])
    )
    engine.generate(replace(req, go_fast=True))
    hook.remove()
    table.add("go_fast UNet calls at batch 2 / batch 1", f"{batches.count(2)} / {batches.count(1)}")
    table.add("go_fast speed-up", f"{latency[False] / latency[True]:.2f}x")
    diff = np.abs(outputs[True] - outputs[False])
    table.add("go_fast on vs off: mean / max pixel difference (0-255)", f"{diff.mean():.1f} / {diff.max()}")

    switch_s, _ = _timed(lambda: engine.generate(replace(req, model="sdxl")))
    back_s, _ = _timed(lambda: engine.generate(req))
    table.add("first request on the other model, both resident (s)", f"{switch_s:.3f}")
    table.add("and back (s)", f"{back_s:.3f}")
    # The LoRA and long-prompt paths on fp16 CUDA: one rank-32 LoRA, a weighted 130-token prompt.
    pipe = engine.models[req.model].txt2img
    lora_a = diffusers_lora(pipe, args.weights / "bench-lora", seed=7, rank=32)
    lora_b = diffusers_lora(pipe, args.weights / "bench-lora-b", seed=8, rank=32)
    long_prompt = "(masterpiece:1.2), [lowres], " + ", ".join(["1girl", "solo", "long hair", "blue eyes"] * 12)
    one = replace(req, go_fast=False, loras=(LoraSpec(str(lora_a), 0.8),))
    # LyCORIS files as LyCORIS's own modules save them, on every attention projection of the UNet.
    lokr, dora = lycoris_pair(pipe, args.weights, rank=32)
    oft = oft_lora(pipe, args.weights, block=32)
    cases = {
        "plain": replace(req, go_fast=False),
        "weighted 130-token prompt": replace(req, go_fast=False, prompt=long_prompt),
        "one rank-32 LoRA": one,
        "two rank-32 LoRAs": replace(one, loras=(*one.loras, LoraSpec(str(lora_b), 0.6))),
        "a rank-32 LoKr (LyCORIS)": replace(one, loras=(LoraSpec(str(lokr.path), 0.8),)),
        "a rank-32 DoRA LoCon (LyCORIS)": replace(one, loras=(LoraSpec(str(dora.path), 0.8),)),
        "a block-32 diag-OFT (LyCORIS)": replace(one, loras=(LoraSpec(str(oft.path), 0.8),)),
    }
    # Issue 12's features on the same plain request, when baked: their added latency, interleaved.
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    if engine.control.controlnet is not None:
        cases["ControlNet, canny"] = replace(cases["plain"], control_image=photo, control_type="canny")
    if any(model.ip_adapter is not None for model in engine.models.values()):
        cases["IP-Adapter, one reference"] = replace(cases["plain"], ip_adapter_images=(photo,))
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):  # interleaved; each case is entered once untimed (its switch), then timed
        for name, case in cases.items():
            engine.generate(case)
            timings[name].append(_timed(lambda c=case: engine.generate(c))[0])
    plain = min(timings["plain"])
    for name, times in timings.items():
        table.add(
            f"{size}x{size}, {args.steps} steps, go_fast off, {name}: best / median (s), x plain",
            f"{min(times):.3f} / {statistics.median(times):.3f}, {min(times) / plain:.3f}x",
        )
    # Warm switches: both LoRAs parsed and cached; only the fused weights change.
    loras = engine.models[req.model].lora_set
    fetched = engine.lora_source.fetch_all([(str(lora_a), 0.8), (str(lora_b), 0.8)], Credentials())
    switches: dict[str, list[float]] = {"A -> B": [], "B -> A": [], "scale only": [], "to none": []}
    for _ in range(args.runs):
        loras.apply([fetched[0]])
        switches["A -> B"].append(_timed(lambda: loras.apply([fetched[1]]))[0])
        switches["B -> A"].append(_timed(lambda: loras.apply([fetched[0]]))[0])
        switches["scale only"].append(_timed(lambda: loras.apply([replace(fetched[0], scale=0.4)]))[0])
        switches["to none"].append(_timed(lambda: loras.apply([]))[0])
    for name, times in switches.items():
        table.add(f"warm LoRA switch {name}: best / median (s)", f"{min(times):.3f} / {statistics.median(times):.3f}")
    # Issue 10's measure: from request start to the first UNet step, the LoRA the same as the last
    # request's or switched (both warm: parsed and cached), interleaved.
    a, b = (replace(one, loras=(LoraSpec(str(path), 0.8),), num_inference_steps=2) for path in (lora_a, lora_b))
    to_step: dict[str, list[float]] = {"same LoRA": [], "switch A -> B": [], "switch B -> A": []}
    engine.generate(a)
    for _ in range(args.runs):
        to_step["same LoRA"].append(_to_first_step(engine, a))
        to_step["switch A -> B"].append(_to_first_step(engine, b))
        to_step["switch B -> A"].append(_to_first_step(engine, a))
    for name, times in to_step.items():
        table.add(
            f"request start to first UNet step, {name}: best / median (s)",
            f"{min(times):.3f} / {statistics.median(times):.3f}",
        )
    if compile_wanted(args.compile, torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        _compiled(engine, cases, args.runs, size, args.steps, table)
    if torch.cuda.is_available():
        table.add("peak GPU memory allocated (GiB)", f"{torch.cuda.max_memory_allocated() / 2**30:.1f}")
        _memory_rows(engine, replace(req, go_fast=False), size, table)
    _upscale_rows(engine, replace(req, go_fast=False), args, table)


def _memory_rows(engine: Engine, plain: GenerationRequest, size: int, table: Table) -> None:
    """What holds the peak (CUDA only): the weights resident now, a plain request's peak above them,
    and the VAE decode's own share of it (the fp16-fix VAE decodes in fp16, with no fp32 copy)."""
    engine.models[plain.model].lora_set.apply([])
    torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated()
    table.add("GPU memory held by the resident weights, no LoRA (GiB)", f"{resident / 2**30:.1f}")
    torch.cuda.reset_peak_memory_stats()
    engine.generate(plain)
    above = (torch.cuda.max_memory_allocated() - resident) / 2**30
    table.add(f"peak of a plain {size}x{size} request above the resident weights (GiB)", f"{above:.2f}")
    vae = engine.models[plain.model].txt2img.vae
    latents = torch.randn(1, 4, size // 8, size // 8, device="cuda", dtype=vae.dtype)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        vae.decode(latents / vae.config.scaling_factor)
    decode = (torch.cuda.max_memory_allocated() - resident) / 2**30
    table.add(f"of which the VAE decode at {size}x{size}, {vae.dtype} (GiB)", f"{decode:.2f}")
    # The largest request the schema takes at this size: every output at once, in one batch.
    torch.cuda.reset_peak_memory_stats()
    engine.generate(replace(plain, num_outputs=MAX_OUTPUTS))
    largest = (torch.cuda.max_memory_allocated() - resident) / 2**30
    table.add(f"peak of {MAX_OUTPUTS} outputs at {size}x{size} above the resident weights (GiB)", f"{largest:.2f}")


def _compiled(
    engine: Engine, cases: dict[str, GenerationRequest], runs: int, size: int, steps: int, table: Table
) -> None:
    """The same engine after setup's compile and warm-up: plain, go_fast, one LoRA (interleaved)."""
    compile_s, _ = _timed(lambda: engine.compile("inductor"))
    table.add("compile + warm-up, both models (s)", f"{compile_s:.1f}")
    compiled_cases = {
        "plain": cases["plain"],
        "plain, go_fast on": replace(cases["plain"], go_fast=True),
        "one rank-32 LoRA": cases["one rank-32 LoRA"],
    }
    timings: dict[str, list[float]] = {name: [] for name in compiled_cases}
    for _ in range(runs):
        for name, case in compiled_cases.items():
            engine.generate(case)
            timings[name].append(_timed(lambda c=case: engine.generate(c))[0])
    for name, times in timings.items():
        table.add(
            f"compiled, {size}x{size}, {steps} steps, {name}: best / median (s)",
            f"{min(times):.3f} / {statistics.median(times):.3f}",
        )


if __name__ == "__main__":
    main()
