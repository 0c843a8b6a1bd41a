"""Inputs a careless user or an attacker sends, through the real Cog server.

Every case must end in a 422 naming the field, or a failed prediction whose message is readable,
raised by the project's own error types, and free of server paths and secrets; the server stays
READY after each. The positive cases below show what is bounded: an image's proportions, seeds.
"""

from __future__ import annotations

import base64
import io
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save

from test_folder.conftest import CogServer, decode_data_uri, image_data_uri
from test_folder.lora_factory import loha_file, sd15_like_lora
from utils import read_parameters

# Generation, where a case gets that far, is as small as the tiny model allows.
BASE = {"prompt": "a cat", "num_inference_steps": 2, "megapixels": "0.25", "output_format": "png"}
HF_SECRET = "hf_corpusSecret0123456789"
CIVITAI_SECRET = "civitaiCorpusSecret0123456789"
# The project's own error types: coglet shows the class name of whatever escaped predict().
OWN_ERRORS = ("InputError", "WeightsError", "WeightsMissingError", "AllImagesFlaggedError")


def data_uri(data: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png(size: tuple[int, int], mode: str = "RGB") -> str:
    return image_data_uri(Image.new(mode, size))


def png_bytes(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def _not_a_lora() -> bytes:
    return save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)})


SMALL_IMAGE = png((64, 64))
# 400 megapixels in 50 KB: refused from its header, never decoded.
HUGE_PNG = data_uri(png_bytes((20000, 20000), "1"), "image/png")

# (id, extra inputs, expected: "422" or a fragment of the failure message)
SCHEMA_CASES: list[tuple[str, dict[str, Any]]] = [
    # types
    ("prompt-int", {"prompt": 123}),
    ("prompt-null", {"prompt": None}),
    ("prompt-list", {"prompt": ["a", "b"]}),
    ("num_outputs-str", {"num_outputs": "2"}),
    ("num_outputs-float", {"num_outputs": 1.5}),
    ("steps-bool", {"num_inference_steps": True}),
    ("guidance-str", {"guidance": "high"}),
    ("guidance-null", {"guidance": None}),
    ("seed-float", {"seed": 1.5}),
    ("seed-str", {"seed": "42"}),
    ("go_fast-str", {"go_fast": "yes"}),
    ("safety-int", {"disable_safety_checker": 1}),
    ("lora_scale-str", {"lora_scale": "1"}),
    ("width-str", {"aspect_ratio": "custom", "width": "512", "height": 512}),
    ("quality-float", {"output_quality": 50.5}),
    ("image-int", {"image": 42}),
    ("mask-object", {"mask": {"url": "x"}}),
    ("aspect-int", {"aspect_ratio": 1}),
    ("megapixels-number", {"megapixels": 1}),
    ("hf-token-int", {"hf_api_token": 123}),
    ("civitai-token-object", {"civitai_api_token": {"token": "x"}}),
    ("lora-list", {"lora_weights": ["a/b"]}),
    ("negative-int", {"negative_prompt": 5}),
    # ranges
    ("num_outputs-0", {"num_outputs": 0}),
    ("num_outputs-5", {"num_outputs": 5}),
    ("num_outputs-negative", {"num_outputs": -1}),
    ("steps-0", {"num_inference_steps": 0}),
    ("steps-51", {"num_inference_steps": 51}),
    ("guidance-negative", {"guidance": -1}),
    ("guidance-11", {"guidance": 11}),
    ("strength-negative", {"prompt_strength": -0.1}),
    ("strength-1.5", {"prompt_strength": 1.5}),
    ("quality-negative", {"output_quality": -1}),
    ("quality-101", {"output_quality": 101}),
    ("lora_scale-low", {"lora_scale": -1.5}),
    ("extra_lora_scale-high", {"extra_lora_scale": 4}),
    ("width-100", {"aspect_ratio": "custom", "width": 100, "height": 512}),
    ("height-5000", {"aspect_ratio": "custom", "width": 512, "height": 5000}),
    ("cfg-negative", {"cfg_scale": -1}),
    ("cfg-21", {"cfg_scale": 21}),
    ("clip_skip-negative", {"clip_skip": -1}),
    ("clip_skip-5", {"clip_skip": 5}),
    # choices
    ("aspect-7:3", {"aspect_ratio": "7:3"}),
    ("aspect-empty", {"aspect_ratio": ""}),
    ("format-gif", {"output_format": "gif"}),
    ("format-upper", {"output_format": "PNG"}),
    ("megapixels-4", {"megapixels": "4"}),
    ("scheduler-unknown", {"scheduler": "Heun"}),
    ("model-flux", {"model": "flux-dev"}),
    ("model-empty", {"model": ""}),
    ("generation_data-int", {"generation_data": 5}),
    ("generation_data-list", {"generation_data": ["a cat", "Steps: 2"]}),
]

FAILED_CASES: list[tuple[str, dict[str, Any], str]] = [
    # values the schema cannot express
    ("prompt-empty", {"prompt": ""}, "prompt is empty"),
    ("prompt-blank", {"prompt": " \n\t "}, "prompt is empty"),
    ("custom-no-height", {"aspect_ratio": "custom", "width": 512}, 'aspect_ratio "custom" needs both'),
    ("custom-no-width", {"aspect_ratio": "custom", "height": 512}, 'aspect_ratio "custom" needs both'),
    ("model-custom-absent", {"model": "custom"}, "no custom checkpoint is baked"),
    # generation data
    ("generation_data-size", {"generation_data": "a cat\nSteps: 2, Sampler: Euler a, Size: 1024"}, "Size: 1024"),
    (
        "generation_data-tag-without-hash",
        {"generation_data": "a cat <lora:mystery:0.6>\nSteps: 2, Sampler: Euler a, Seed: 1"},
        "tag <lora:mystery:0.6> names a LoRA without a hash",
    ),
    ("generation_data-blank", {"generation_data": "\n \n"}, "neither a prompt nor"),
    # images
    ("image-text", {"image": data_uri(b"hello", "text/plain")}, "image could not be read as an image"),
    ("image-empty", {"image": "data:image/png;base64,"}, "image could not be read as an image"),
    ("image-truncated", {"image": data_uri(png_bytes((300, 300))[:60], "image/png")}, "image could not be read"),
    ("image-svg", {"image": data_uri(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")}, "PNG, JPEG"),
    ("image-not-a-uri", {"image": "not a uri"}, "image is a path on the server"),
    ("image-empty-string", {"image": ""}, "image is a path on the server"),
    ("image-too-large", {"image": HUGE_PNG}, "image is too large: at most 150 megapixels"),
    ("img2img-no-step", {"image": SMALL_IMAGE, "num_inference_steps": 1}, "leave no denoising step"),
    ("img2img-strength-0", {"image": SMALL_IMAGE, "prompt_strength": 0}, "leave no denoising step"),
    ("image-unreachable", {"image": "http://127.0.0.1:9/x.png"}, "127.0.0.1"),
    # masks
    ("mask-without-image", {"mask": png((64, 64), "L")}, "mask needs an image"),
    ("mask-text", {"image": SMALL_IMAGE, "mask": data_uri(b"zzz", "text/plain")}, "mask could not be read"),
    ("mask-empty-string", {"image": SMALL_IMAGE, "mask": ""}, "mask is a path on the server"),
    (
        "mask-truncated",
        {"image": SMALL_IMAGE, "mask": data_uri(png_bytes((64, 64), "L")[:50], "image/png")},
        "mask could not be read",
    ),
    ("mask-proportions", {"image": png((64, 128)), "mask": png((128, 64), "L")}, "mask is 128x64 but image is 64x128"),
    ("mask-too-large", {"image": SMALL_IMAGE, "mask": HUGE_PNG}, "mask is too large"),
    ("mask-no-step", {"image": SMALL_IMAGE, "mask": png((64, 64), "L"), "num_inference_steps": 1}, "no denoising"),
    # credentials: a failure never shows the token
    ("hf-token-bad-lora", {"lora_weights": "nowhere", "hf_api_token": HF_SECRET}, "cannot tell where LoRA"),
    (
        "civitai-token-bad-url",
        {"lora_weights": "https://civitai.com/user/someone", "civitai_api_token": CIVITAI_SECRET},
        "unrecognised CivitAI URL",
    ),
    (
        "token-in-lora-url",
        {"lora_weights": f"https://civitai.com/images/1?token={CIVITAI_SECRET}"},
        "unrecognised CivitAI URL",
    ),
    # LoRA strings refused today without any network
    ("lora-one-word", {"lora_weights": "mylora"}, "cannot tell where LoRA"),
    ("lora-four-parts", {"lora_weights": "a/b/c/d"}, "cannot tell where LoRA"),
    ("lora-civitai-slug", {"lora_weights": "civitai.com/models/abc"}, "unrecognised CivitAI URL"),
    ("lora-javascript", {"lora_weights": "javascript:alert(1)"}, "cannot tell where LoRA"),
    ("extra-lora-one-word", {"extra_lora": "mylora"}, "cannot tell where LoRA"),
    ("lora-data-bad-base64", {"lora_weights": "data:application/octet-stream;base64,@@@"}, "not valid base64"),
    ("lora-data-not-safetensors", {"lora_weights": data_uri(b"not a safetensors file")}, "not a valid .safetensors"),
    ("lora-data-checkpoint", {"lora_weights": data_uri(_not_a_lora())}, "is a full checkpoint"),
    # server paths (one refusal whatever they name: engine/server_files.py) and schemes not read
    ("lora-etc-passwd", {"lora_weights": "/etc/passwd"}, "the LoRA is a path on the server"),
    ("lora-missing-local", {"lora_weights": "./nowhere.safetensors"}, "the LoRA is a path on the server"),
    ("lora-parent-path", {"lora_weights": "../up.safetensors"}, "the LoRA is a path on the server"),
    ("lora-home-path", {"lora_weights": "~/mine.safetensors"}, "the LoRA is a path on the server"),
    ("lora-directory", {"lora_weights": "/usr"}, "the LoRA is a path on the server"),
    ("lora-file-scheme", {"lora_weights": "file:///etc/x.safetensors"}, "the LoRA is a path on the server"),
    ("lora-ftp", {"extra_lora": "ftp://host/x.safetensors"}, "serve the file over https instead"),
    ("lora-s3", {"lora_weights": "s3://bucket/x.safetensors"}, "pass a presigned https URL"),
    ("lora-gs", {"lora_weights": "gs://bucket/x.safetensors"}, "pass a signed https URL"),
    ("lora-empty-host", {"lora_weights": "https://"}, "has no valid host name"),
    (
        "lora-url-with-password",
        {"lora_weights": f"https://user:{HF_SECRET}@/x.safetensors"},
        "has no valid host name",
    ),
]


def _lora_file_cases(tmp: Path) -> list[tuple[str, dict[str, Any], str]]:
    """LoRA files this predictor refuses for this model, sent as data: URIs."""
    return [
        ("lora-loha", {"lora_weights": data_uri(loha_file(tmp / "loha.safetensors").read_bytes())}, "LoHa"),
        ("lora-sd15", {"lora_weights": data_uri(sd15_like_lora(tmp / "sd15.safetensors").read_bytes())}, "for SD 1.5"),
    ]


def assert_readable_failure(body: dict[str, Any], expected: str) -> None:
    error = body.get("error") or ""
    assert body["status"] == "failed", body
    assert expected in error, error
    if error.startswith("Prediction failed"):  # coglet's prefix (twice), then the class that escaped
        raised = re.match(r"(?:Prediction failed: )+(\w+): ", error)
        assert raised and raised.group(1) in OWN_ERRORS, error
    assert_clean(error)
    assert_clean(body.get("logs") or "")


def assert_clean(text: str) -> None:
    assert "/tmp" not in text and "/work" not in text and "site-packages" not in text, text
    assert HF_SECRET not in text and CIVITAI_SECRET not in text, text
    assert "Traceback" not in text, text


def assert_ready(server: CogServer) -> None:
    """READY again: coglet reports BUSY for a moment after a prediction returns."""
    deadline = time.monotonic() + 10
    while (status := server.get("/health-check")["status"]) == "BUSY" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == "READY"


@pytest.mark.parametrize(("name", "extra"), SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_schema_refuses_with_422(cog_server: CogServer, name: str, extra: dict[str, Any]) -> None:
    status, body = cog_server.predict({**BASE, **extra})
    assert status == 422, body
    fields = {loc for d in body["detail"] for loc in d["loc"]}
    assert fields & set(extra), body
    assert_clean(str(body))
    assert_ready(cog_server)


@pytest.mark.parametrize(("name", "extra", "expected"), FAILED_CASES, ids=[c[0] for c in FAILED_CASES])
def test_fails_readably(cog_server: CogServer, name: str, extra: dict[str, Any], expected: str) -> None:
    status, body = cog_server.predict({**BASE, **extra})
    assert status == 200, body
    assert_readable_failure(body, expected)
    assert_ready(cog_server)


def test_lora_files_that_do_not_fit_fail_readably(cog_server: CogServer, tmp_path: Path) -> None:
    for _, extra, expected in _lora_file_cases(tmp_path):
        _, body = cog_server.predict({**BASE, **extra})
        assert_readable_failure(body, expected)
        assert_ready(cog_server)


def _sizes(body: dict[str, Any]) -> list[tuple[int, int]]:
    assert body["status"] == "succeeded", body.get("error")
    return [Image.open(io.BytesIO(decode_data_uri(uri)[1])).size for uri in body["output"]]


@pytest.mark.parametrize("size", [(4000, 1), (1, 4000)])
def test_extreme_image_proportions_give_a_bounded_size(cog_server: CogServer, size: tuple[int, int]) -> None:
    _, body = cog_server.predict({**BASE, "megapixels": "1", "image": png(size)})
    # 1440x608 at SDXL scale, the tiny model's 1/8: the widest ratio the aspect table holds.
    expected = (184, 80) if size[0] > size[1] else (80, 184)
    assert _sizes(body) == [expected]


def output_seeds(body: dict[str, Any], tmp_path: Path) -> list[int]:
    assert body["status"] == "succeeded", body.get("error")
    seeds = []
    for i, uri in enumerate(body["output"]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(decode_data_uri(uri)[1])
        seeds.append(int(re.search(r"Seed: (\d+)", read_parameters(path)).group(1)))
    return seeds


def test_largest_seed_wraps_for_the_next_output(cog_server: CogServer, tmp_path: Path) -> None:
    top = 2**64 - 1
    _, body = cog_server.predict({**BASE, "seed": top, "num_outputs": 2})
    assert output_seeds(body, tmp_path) == [top, 0]


@pytest.mark.parametrize("seed", [2**64, 10**30, -(10**30)])
def test_any_json_seed_generates(cog_server: CogServer, tmp_path: Path, seed: int) -> None:
    """Flux declares no seed range: past torch's, a seed is reduced modulo 2^64 (it crashed in manual_seed)."""
    _, body = cog_server.predict({**BASE, "seed": seed})
    [used] = output_seeds(body, tmp_path)
    if seed < 0:
        assert "(random; pass seed=" in body["logs"]
    else:  # coglet passes integers past 2^64 as floats
        assert used == int(float(seed)) % 2**64
        assert f"seed: {used} (" in body["logs"] and "modulo 2^64)" in body["logs"]
    assert_ready(cog_server)
