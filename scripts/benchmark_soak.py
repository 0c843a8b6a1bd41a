"""Soak benchmark: many mixed predictions through one engine; memory must stay flat and a
repeated request must give the same bytes at the end as at the start.

The mix cycles through both models, LoRAs switching (none, A, B, A+B), txt2img / img2img /
inpaint, every output format and 1-2 outputs, and, when they are baked, a ControlNet (canny or
tile), a reference image (IP-Adapter) and the 2x upscaler, each in a share of the requests, from a
fixed random sequence. A probe request
(fixed seed, PNG, LoRA A) runs first and last; its encoded bytes must be identical. Resident
memory is printed every --every predictions. LoRAs come from --lora (any form lora_weights
takes); without them, two are made for the loaded model with test_folder/lora_factory.py and
passed as data: URIs, so no network is needed.

`--server` runs the same kind of mix through the real Cog server (`python -m cog.server.http`,
as `make serve`) and reads the resident memory of its worker process, where predictions run on
coglet's threads, and the CPU time that process spent (what grew, and what bounding it costs:
docs/reliability.md). The
ControlNet strength and the IP-Adapter scale vary per request. `--long` is the bar of issue 24:
1,000 predictions, memory read every 10, and the trend over predictions 200 to 800 checked
(at most 0.03 MiB per prediction, never more than 4% above its value at 200).

Usage: python scripts/benchmark_soak.py [-n 200] [--every 25] [--steps 4] [--lora A --lora B]
                                        [--server] [--long]
(weights from $WEIGHTS_DIR, as the predictor; the tiny ones from `make weights` work.)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image

from engine.config import CONTROLNET_DIR, IP_ADAPTER_DIR, MODEL_IDS, OUTPUT_FORMATS, UPSCALER_DIR, weights_root
from engine.generator import Engine
from engine.request import GenerationRequest, LoraSpec
from test_folder.lora_factory import diffusers_lora, kohya_lora
from utils import save_image
from weights import lora_store, lora_warm_max_bytes

# Issue 24's bar over a long mixed soak: no upward trend between these predictions, and no point
# after the first of them more than TREND_MAX_RISE above its value there.
TREND_SPAN = (200, 800)
TREND_MAX_SLOPE_MIB = 0.03
TREND_MAX_RISE = 0.04
PROMPTS = ["a lighthouse at dusk", "a cat in a hat, watercolor", "portrait of TOK, studio light"]
LORA_INPUTS = (("lora_weights", "lora_scale"), ("extra_lora", "extra_lora_scale"))
# What the worker's memory depends on (cog.yaml, Makefile; setup sets any that is unset: engine/allocator.py).
MEMORY_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
MEMORY_VARIABLES += ("LRU_CACHE_CAPACITY",)


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def print_probe(files: list[bytes]) -> None:
    """The probe's digest: the same across runs and settings when memory settings leave pixels alone."""
    print("probe sha256:", hashlib.sha256(b"".join(files)).hexdigest()[:16])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (less swayed by other load than wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def trend(samples: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(least-squares slope in MiB per prediction, largest rise over the value at the span's start)
    over TREND_SPAN; None when the run did not reach its end."""
    first, last = TREND_SPAN
    span = [(i, mib) for i, mib in samples if first <= i <= last]
    if not span or span[0][0] != first or span[-1][0] != last:
        return None
    mean_i = sum(i for i, _ in span) / len(span)
    mean_m = sum(m for _, m in span) / len(span)
    slope = sum((i - mean_i) * (m - mean_m) for i, m in span) / sum((i - mean_i) ** 2 for i, _ in span)
    base = span[0][1]
    return slope, max(m for _, m in span) / base - 1


def report_trend(samples: list[tuple[int, float]]) -> bool:
    """Print the bar's two numbers; True when both are within it (or the run was too short to say)."""
    result = trend(samples)
    if result is None:
        print(f"(trend over predictions {TREND_SPAN[0]}-{TREND_SPAN[1]} needs samples at both; use --long)")
        return True
    slope, rise = result
    ok = slope <= TREND_MAX_SLOPE_MIB and rise <= TREND_MAX_RISE
    print(
        f"RSS trend over predictions {TREND_SPAN[0]}-{TREND_SPAN[1]}: {slope:+.4f} MiB/prediction "
        f"(bar {TREND_MAX_SLOPE_MIB}), highest {rise * 100:+.1f}% over its value at {TREND_SPAN[0]} "
        f"(bar {TREND_MAX_RISE * 100:.0f}%): {'within' if ok else 'OVER'}"
    )
    return ok


def made_loras(engine: Engine, root: Path) -> list[str]:
    """Two LoRAs for the default model's shapes (diffusers and kohya layouts), as data: URIs."""
    pipe = engine.models[MODEL_IDS[0]].txt2img
    paths = [diffusers_lora(pipe, root / "a", seed=1, text=True), kohya_lora(pipe, root / "b.safetensors", seed=2)]
    return ["data:application/octet-stream;base64," + base64.b64encode(p.read_bytes()).decode() for p in paths]


def encoded(engine: Engine, req: GenerationRequest, fmt: str, out: Path) -> list[bytes]:
    """What a user downloads: each output encoded with its parameters, as predict.py writes it."""
    files = []
    for i, result in enumerate(engine.generate(req)):
        path = save_image(result.image, result.parameters.to_a1111(), fmt, 80, out / f"{i}.{fmt}")
        files.append(path.read_bytes())
        path.unlink()
    return files


def mixed_requests(
    engine: Engine, n: int, loras: list[str], steps: int, seed: int
) -> list[tuple[GenerationRequest, str]]:
    rng = random.Random(seed)
    reference = Image.radial_gradient("L").convert("RGB")
    source = Image.linear_gradient("L").convert("RGB").resize((192, 128))
    mask = Image.new("L", (192, 128), 0)
    mask.paste(255, (48, 32, 144, 96))
    lora_sets = [(), (loras[0],), (loras[1],), tuple(loras)]
    requests = []
    for i in range(n):
        mode = ("txt2img", "img2img", "inpaint")[i % 3]
        req = GenerationRequest(
            prompt=rng.choice(PROMPTS),
            negative_prompt=rng.choice(["", "blurry"]),
            model=MODEL_IDS[i % len(MODEL_IDS)],
            megapixels=rng.choice(["1", "0.5", "0.25"]),
            aspect_ratio=rng.choice(["1:1", "16:9", "2:3"]),
            image=source if mode != "txt2img" else None,
            mask=mask if mode == "inpaint" else None,
            num_outputs=rng.choice([1, 1, 2]),
            num_inference_steps=steps,
            seed=rng.randrange(2**32),
            loras=tuple(LoraSpec(src, rng.choice([0.5, 1.0])) for src in lora_sets[i % len(lora_sets)]),
        )
        if engine.control.controlnet is not None and i % 4 == 1:
            req = replace(req, control_image=source, control_type=rng.choice(["canny", "tile"]))
        if any(m.ip_adapter is not None for m in engine.models.values()) and i % 5 == 2:
            req = replace(req, ip_adapter_images=(reference,), ip_adapter_scale=rng.choice([0.4, 0.8]))
        if engine.upscaler is not None and i % 7 == 3:
            req = replace(req, megapixels="0.25", upscale="2x")
        requests.append((req, OUTPUT_FORMATS[i % len(OUTPUT_FORMATS)]))
    return requests


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def server_inputs(n: int, loras: list[str], steps: int, seed: int) -> list[dict[str, Any]]:
    """The mix as the server's JSON inputs: as mixed_requests, with the ControlNet strength and the
    IP-Adapter scale drawn anew for each request that uses them (each baked one in its share)."""
    root = weights_root()
    rng = random.Random(seed)
    reference = data_uri(Image.radial_gradient("L").convert("RGB"))
    source = data_uri(Image.linear_gradient("L").convert("RGB").resize((192, 128)))
    mask_image = Image.new("L", (192, 128), 0)
    mask_image.paste(255, (48, 32, 144, 96))
    mask = data_uri(mask_image)
    inputs = []
    for i in range(n):
        mode = ("txt2img", "img2img", "inpaint")[i % 3]
        one: dict[str, Any] = {
            "prompt": rng.choice(
                ["a lighthouse at dusk", "a cat in a hat, watercolor", "portrait of TOK, studio light"]
            ),
            "negative_prompt": rng.choice(["", "blurry"]),
            "model": MODEL_IDS[i % len(MODEL_IDS)],
            "megapixels": rng.choice(["1", "0.5", "0.25"]),
            "aspect_ratio": rng.choice(["1:1", "16:9", "2:3"]),
            "num_outputs": rng.choice([1, 1, 2]),
            "num_inference_steps": steps,
            "seed": rng.randrange(2**32),
            "output_format": OUTPUT_FORMATS[i % len(OUTPUT_FORMATS)],
        }
        if mode != "txt2img":
            one["image"] = source
        if mode == "inpaint":
            one["mask"] = mask
        chosen = [(), (loras[0],), (loras[1],), tuple(loras)][i % 4]
        for (key, scale_key), src in zip(LORA_INPUTS, chosen, strict=False):
            one.update({key: src, scale_key: rng.choice([0.5, 1])})
        if (root / CONTROLNET_DIR).is_dir() and i % 4 == 1:
            one.update(control_image=source, control_type=rng.choice(["canny", "tile"]))
            one["control_strength"] = round(rng.uniform(0.1, 1.5), 3)
        if (root / IP_ADAPTER_DIR).is_dir() and i % 5 == 2:
            one.update(ip_adapter_image=[reference], ip_adapter_scale=round(rng.uniform(0.1, 1.5), 3))
        if (root / UPSCALER_DIR).is_dir() and i % 7 == 3:
            one.update(megapixels="0.25", upscale="2x")
        inputs.append(one)
    return inputs


def worker_pid(server_pid: int) -> int:
    """coglet's worker: the descendant process running `coglet.server._run_worker()`."""
    pending = [server_pid]
    while pending:
        pid = pending.pop()
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                if b"_run_worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
                pending.append(int(child))
    raise RuntimeError("no coglet worker process found under the server")


def soak_server(args: argparse.Namespace, out: Path) -> tuple[list[tuple[int, float]], int, bool]:
    """The mix through the real Cog server; samples of the worker's RSS by prediction count."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.logging import disable_progress_bar

    from test_folder.conftest import CogServer

    disable_progress_bar()

    if args.lora:
        loras = args.lora
    else:  # made for the default model's shapes, then the pipeline is dropped: only the server holds one
        pipe = StableDiffusionXLPipeline.from_pretrained(weights_root() / MODEL_IDS[0], local_files_only=True)
        paths = [diffusers_lora(pipe, out / "a", seed=1, text=True), kohya_lora(pipe, out / "b.safetensors", seed=2)]
        loras = ["data:application/octet-stream;base64," + base64.b64encode(p.read_bytes()).decode() for p in paths]
        del pipe
    probe = {"prompt": "a red bicycle leaning on a blue wall", "num_inference_steps": args.steps, "seed": 1234}
    probe |= {"lora_weights": loras[0], "output_format": "png"}
    with CogServer(weights_root(), out / "server.log") as server:
        pid = worker_pid(server.proc.pid)
        first = _served(server, probe)
        samples = [(0, rss_mib(pid))]
        print(f"worker {pid} after setup and the first probe: RSS {samples[0][1]:.0f} MiB")
        cpu = cpu_seconds(pid)
        images = 0
        for i, inputs in enumerate(server_inputs(args.n, loras, args.steps, args.seed), 1):
            images += len(_served(server, inputs))
            if i % args.every == 0 or i == args.n:
                samples.append((i, rss_mib(pid)))
                print(f"{i:5d} predictions, {images:5d} images: worker RSS {samples[-1][1]:.0f} MiB", flush=True)
        cpu = cpu_seconds(pid) - cpu
        last = _served(server, probe)
    print_probe(first)
    print(f"worker CPU time over the mix: {cpu:.1f}s, {cpu / max(args.n, 1):.3f}s per prediction")
    return samples, images, first == last


def _served(server: Any, inputs: dict[str, Any]) -> list[bytes]:
    status, body = server.predict(inputs)
    if status != 200 or body.get("status") != "succeeded":
        raise RuntimeError(f"prediction failed ({status}): {body.get('error') or body}")
    return [base64.b64decode(uri.split(",", 1)[1]) for uri in body["output"]]


def soak_engine(args: argparse.Namespace, out: Path) -> tuple[list[tuple[int, float]], int, bool]:
    """The mix through one engine in this process; samples of this process's RSS."""
    engine = Engine.load(weights_root(), lora_source=lora_store(), warm_max_bytes=lora_warm_max_bytes())
    loras = args.lora or made_loras(engine, out)
    probe = GenerationRequest(
        prompt="a red bicycle leaning on a blue wall",
        num_inference_steps=args.steps,
        seed=1234,
        loras=(LoraSpec(loras[0], 1.0),),
    )
    first = encoded(engine, probe, "png", out)
    requests = mixed_requests(engine, args.n, loras, args.steps, args.seed)
    samples = [(0, rss_mib())]
    print(f"after load and the first probe: RSS {samples[0][1]:.0f} MiB")
    images = 0
    for i, (req, fmt) in enumerate(requests, 1):
        images += len(encoded(engine, req, fmt, out))
        if i % args.every == 0 or i == len(requests):
            samples.append((i, rss_mib()))
            print(f"{i:5d} predictions, {images:5d} images: RSS {samples[-1][1]:.0f} MiB", flush=True)
    last = encoded(engine, probe, "png", out)
    print_probe(first)
    return samples, images, first == last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200, help="mixed predictions between the two probes")
    parser.add_argument("--every", type=int, default=25, help="print resident memory every this many")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lora", action="append", default=[], help="a LoRA source; give two, or none")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--server", action="store_true", help="through the real Cog server; the worker's RSS")
    parser.add_argument("--long", action="store_true", help="1,000 predictions, RSS every 10, the trend checked")
    args = parser.parse_args()
    if len(args.lora) not in (0, 2):
        parser.error("give --lora twice (A and B), or not at all")
    if args.long:
        args.n, args.every = max(args.n, 1000), 10

    start = time.perf_counter()
    print(" ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in MEMORY_VARIABLES))
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        loop = time.perf_counter()
        samples, images, same = (soak_server if args.server else soak_engine)(args, Path(tmp))
        seconds = time.perf_counter() - loop
    rss = [mib for _, mib in samples]
    growth = (rss[-1] - rss[1]) / rss[1] * 100 if len(rss) > 1 else 0.0
    print(
        f"\n{args.n} predictions ({images} images) in {seconds:.1f}s, {seconds / max(args.n, 1):.2f}s each; "
        f"total {time.perf_counter() - start:.1f}s"
    )
    print(f"RSS first interval {rss[1]:.0f} MiB -> end {rss[-1]:.0f} MiB ({growth:+.1f}%), peak {max(rss):.0f} MiB")
    flat = report_trend(samples)
    print("same-seed output byte-identical at start and end:", "yes" if same else "NO")
    sys.exit(0 if same and flat else 1)


if __name__ == "__main__":
    main()
