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

Usage: python scripts/benchmark_soak.py [-n 200] [--every 25] [--steps 4] [--lora A --lora B]
(weights from $WEIGHTS_DIR, as the predictor; the tiny ones from `make weights` work.)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image

from engine.config import MODEL_IDS, OUTPUT_FORMATS, weights_root
from engine.generator import Engine
from engine.request import GenerationRequest, LoraSpec
from test_folder.lora_factory import diffusers_lora, kohya_lora
from utils import save_image
from weights import lora_store


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


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
            prompt=rng.choice(["a lighthouse at dusk", "a cat in a hat, watercolor", "portrait of TOK, studio light"]),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200, help="mixed predictions between the two probes")
    parser.add_argument("--every", type=int, default=25, help="print resident memory every this many")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lora", action="append", default=[], help="a LoRA source; give two, or none")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    args = parser.parse_args()
    if len(args.lora) not in (0, 2):
        parser.error("give --lora twice (A and B), or not at all")

    start = time.perf_counter()
    engine = Engine.load(weights_root(), loras=lora_store())
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        out = Path(tmp)
        loras = args.lora or made_loras(engine, out)
        probe = GenerationRequest(
            prompt="a red bicycle leaning on a blue wall",
            num_inference_steps=args.steps,
            seed=1234,
            loras=(LoraSpec(loras[0], 1.0),),
        )
        first = encoded(engine, probe, "png", out)
        requests = mixed_requests(engine, args.n, loras, args.steps, args.seed)
        rss = [rss_mib()]
        print(f"after load and the first probe: RSS {rss[0]:.0f} MiB")
        images = 0
        loop = time.perf_counter()
        for i, (req, fmt) in enumerate(requests, 1):
            images += len(encoded(engine, req, fmt, out))
            if i % args.every == 0 or i == len(requests):
                rss.append(rss_mib())
                print(f"{i:5d} predictions, {images:5d} images: RSS {rss[-1]:.0f} MiB")
        seconds = time.perf_counter() - loop
        last = encoded(engine, probe, "png", out)

    growth = (rss[-1] - rss[1]) / rss[1] * 100 if len(rss) > 1 else 0.0
    same = first == last
    print(
        f"\n{args.n} predictions ({images} images) in {seconds:.1f}s, {seconds / max(args.n, 1):.2f}s each; "
        f"total {time.perf_counter() - start:.1f}s"
    )
    print(f"RSS first interval {rss[1]:.0f} MiB -> end {rss[-1]:.0f} MiB ({growth:+.1f}%), peak {max(rss):.0f} MiB")
    digests = [hashlib.sha256(files[0]).hexdigest()[:16] for files in (first, last)]
    print(f"probe PNG sha256 start {digests[0]}, end {digests[1]}")
    print("same-seed output byte-identical at start and end:", "yes" if same else "NO")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
