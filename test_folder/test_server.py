"""End to end through the real Cog HTTP runtime: Flux JSON in, images out."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from scripts.cog_schema import SCHEMA_PATH
from test_folder.conftest import CogServer, decode_data_uri, image_data_uri
from test_folder.test_sizes import FLUX_TABLE
from utils import read_parameters

# What a Flux dev-lora user sends today, unchanged (fewer steps to keep the suite fast).
FLUX_JSON = {
    "prompt": "a photo of TOK, a cat wearing a small hat",
    "aspect_ratio": "1:1",
    "num_outputs": 1,
    "num_inference_steps": 2,
    "guidance": 3.5,
    "seed": 1234,
    "output_format": "webp",
    "output_quality": 90,
    "disable_safety_checker": False,
    "go_fast": True,
    "lora_scale": 1,
    "extra_lora_scale": 1,
    "megapixels": "1",
    "prompt_strength": 0.8,
}


def images_of(body: dict) -> list[Image.Image]:
    assert body["status"] == "succeeded", body.get("error")
    out = []
    for uri in body["output"]:
        _, data = decode_data_uri(uri)
        out.append(Image.open(io.BytesIO(data)))
    return out


def test_flux_json_unchanged(cog_server: CogServer) -> None:
    status, body = cog_server.predict(FLUX_JSON)
    assert status == 200
    [image] = images_of(body)
    assert image.format == "WEBP" and image.size == (128, 128)
    assert "seed: 1234" in body["logs"] and "step 2/2" in body["logs"]


def test_openapi_is_served_and_matches_the_file(cog_server: CogServer) -> None:
    served = cog_server.get("/openapi.json")
    assert (
        served["components"]["schemas"]["Input"]
        == json.loads(SCHEMA_PATH.read_text())["components"]["schemas"]["Input"]
    )


@pytest.mark.parametrize("ratio", sorted(FLUX_TABLE))
def test_every_aspect_ratio_has_flux_proportions(cog_server: CogServer, ratio: str) -> None:
    _, body = cog_server.predict({**FLUX_JSON, "aspect_ratio": ratio, "num_inference_steps": 1})
    [image] = images_of(body)
    w, h = FLUX_TABLE[ratio]
    assert image.size == (w // 8, h // 8)  # the tiny model's native 128 px is 1024 / 8


def test_megapixels_quarter(cog_server: CogServer) -> None:
    _, body = cog_server.predict({**FLUX_JSON, "megapixels": "0.25"})
    assert images_of(body)[0].size == (64, 64)


def test_custom_size(cog_server: CogServer) -> None:
    _, body = cog_server.predict({**FLUX_JSON, "aspect_ratio": "custom", "width": 512, "height": 1024})
    assert images_of(body)[0].size == (64, 128)


def embedded_parameters(uri: str) -> str:
    """The parameters embedded in one output, read back from the bytes the server sent."""
    mime, data = decode_data_uri(uri)
    with tempfile.NamedTemporaryFile(suffix="." + mime.split("/")[1]) as f:
        f.write(data)
        f.flush()
        return read_parameters(Path(f.name))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_num_outputs(cog_server: CogServer, n: int) -> None:
    _, body = cog_server.predict({**FLUX_JSON, "num_outputs": n, "num_inference_steps": 1})
    assert len(images_of(body)) == n
    seeds = [int(re.search(r"Seed: (\d+)", embedded_parameters(uri)).group(1)) for uri in body["output"]]
    assert seeds == [1234 + i for i in range(n)]


@pytest.mark.parametrize(("fmt", "pil"), [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_output_formats_carry_parameters(cog_server: CogServer, fmt: str, pil: str) -> None:
    _, body = cog_server.predict({**FLUX_JSON, "output_format": fmt, "negative_prompt": "blurry"})
    assert images_of(body)[0].format == pil
    params = embedded_parameters(body["output"][0])
    assert params.splitlines()[0] == FLUX_JSON["prompt"]
    assert "Negative prompt: blurry" in params
    assert "Seed: 1234" in params and "CFG scale: 7" in params and "Sampler: Euler a" in params


def test_output_quality_changes_jpeg_size(cog_server: CogServer) -> None:
    sizes = []
    for q in (10, 95):
        _, body = cog_server.predict({**FLUX_JSON, "output_format": "jpg", "output_quality": q})
        sizes.append(len(decode_data_uri(body["output"][0])[1]))
    assert sizes[0] < sizes[1]


def test_same_seed_same_image_different_seed_different(cog_server: CogServer) -> None:
    req = {**FLUX_JSON, "output_format": "png"}
    a = np.asarray(images_of(cog_server.predict(req)[1])[0], dtype=np.int16)
    b = np.asarray(images_of(cog_server.predict(req)[1])[0], dtype=np.int16)
    c = np.asarray(images_of(cog_server.predict({**req, "seed": 4321})[1])[0], dtype=np.int16)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 10


def test_model_choice_and_alias(cog_server: CogServer) -> None:
    req = {**FLUX_JSON, "output_format": "png"}
    by_model = images_of(cog_server.predict({**req, "model": "sdxl"})[1])[0]
    by_alias = images_of(cog_server.predict({**req, "use_standard_sdxl": True})[1])[0]
    default = images_of(cog_server.predict(req)[1])[0]
    assert np.array_equal(np.asarray(by_model), np.asarray(by_alias))
    assert not np.array_equal(np.asarray(by_model), np.asarray(default))


def test_img2img_and_inpaint_from_data_uris(cog_server: CogServer) -> None:
    source = Image.new("RGB", (200, 100), (200, 40, 40))
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (0, 0, 100, 100))
    _, body = cog_server.predict({**FLUX_JSON, "image": image_data_uri(source)})
    img2img = images_of(body)[0]
    assert abs(img2img.width / img2img.height - 2) < 0.1
    assert "img2img" in body["logs"]
    _, body = cog_server.predict({**FLUX_JSON, "image": image_data_uri(source), "mask": image_data_uri(mask)})
    assert images_of(body)[0].size == img2img.size
    assert "inpaint" in body["logs"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("aspect_ratio", "7:3"),
        ("num_outputs", 5),
        ("num_outputs", 0),
        ("num_inference_steps", 51),
        ("guidance", 11),
        ("guidance", "high"),
        ("output_format", "gif"),
        ("output_quality", 101),
        ("lora_scale", 3.5),
        ("megapixels", "4"),
        ("prompt_strength", 1.5),
        ("scheduler", "Heun"),
        ("model", "flux-dev"),
        ("width", 100),
        ("seed", "abc"),
        ("go_fast", "sometimes"),
    ],
)
def test_bad_values_get_422(cog_server: CogServer, field: str, value: object) -> None:
    status, body = cog_server.predict({**FLUX_JSON, field: value})
    assert status == 422, body
    assert any(field in d["loc"] for d in body["detail"]), body


def test_missing_prompt_gets_422(cog_server: CogServer) -> None:
    status, _ = cog_server.predict({k: v for k, v in FLUX_JSON.items() if k != "prompt"})
    assert status == 422


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"mask": image_data_uri(Image.new("L", (64, 64)))}, "mask needs an image"),
        ({"image": "data:image/png;base64," + "bm90IGFuIGltYWdl"}, "image could not be read as an image"),
    ],
)
def test_clear_failures(cog_server: CogServer, extra: dict, message: str) -> None:
    status, body = cog_server.predict({**FLUX_JSON, **extra})
    assert status == 200
    assert body["status"] == "failed"
    assert message in body["error"]


def test_unset_seed_is_random_and_logged(cog_server: CogServer) -> None:
    req = {k: v for k, v in FLUX_JSON.items() if k != "seed"}
    seeds = []
    for _ in range(2):
        _, body = cog_server.predict(req)
        seeds.append(int(re.search(r"seed: (\d+) \(random; pass seed=\1 to reproduce\)", body["logs"]).group(1)))
    assert seeds[0] != seeds[1]


@pytest.fixture(scope="module")
def flagging_server(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server whose safety checker flags everything: thresholds below any cosine."""
    root = tmp_path_factory.mktemp("flagging-weights")
    for entry in weights_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    (root / "safety-checker").unlink()
    shutil.copytree(weights_dir / "safety-checker", root / "safety-checker")
    path = root / "safety-checker" / "model.safetensors"
    tensors = load_file(path)
    tensors["concept_embeds_weights"] = torch.full_like(tensors["concept_embeds_weights"], -1.0)
    save_file(tensors, path, metadata={"format": "pt"})
    with CogServer(root, tmp_path_factory.mktemp("flagging-server") / "server.log") as server:
        yield server


def test_safety_checker_failure_and_opt_out_through_cog(flagging_server: CogServer) -> None:
    _, body = flagging_server.predict({**FLUX_JSON, "num_outputs": 2})
    assert body["status"] == "failed"
    assert "all 2 image(s) were flagged as NSFW" in body["error"]
    _, body = flagging_server.predict({**FLUX_JSON, "num_outputs": 2, "disable_safety_checker": True})
    assert len(images_of(body)) == 2


def test_controlnet_ip_adapter_upscale_and_a_lora_in_one_request(
    cog_server: CogServer, lora_files: dict[str, bytes]
) -> None:
    """Everything beyond the Flux schema at once, with go_fast: a control map (returned), a reference
    image, a LoRA and the upscaler. Each leaves its mark on the output and none hides another:
    leaving any one out changes the image."""
    rng = np.random.default_rng(7)
    photo = Image.fromarray(np.kron(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8)))
    reference = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    lora = "data:application/octet-stream;base64," + base64.b64encode(lora_files["a"]).decode()
    everything = {
        **FLUX_JSON,
        "output_format": "png",
        "control_image": image_data_uri(photo),
        "control_type": "canny",
        "return_control_map": True,
        "ip_adapter_image": [image_data_uri(reference)],
        "ip_adapter_scale": 0.8,
        "lora_weights": lora,
        "upscale": "2x",
        "num_inference_steps": 6,  # under go_fast's 25 steps for reuse (test_controlnet/test_ip_adapter run 25)
    }
    status, body = cog_server.predict(everything)
    assert status == 200, body
    image, control_map = images_of(body)
    assert image.size == (256, 256), "the 128 px tiny image, upscaled 2x"
    assert control_map.size == (128, 128) and set(np.unique(np.asarray(control_map))) <= {0, 255}
    parameters = image.text["parameters"]
    for mark in ('ControlNet 0: "Module: canny', "IP-Adapter:", 'Lora: "', "Postprocess upscale by: 2", "Deep cache"):
        assert mark in parameters, mark
    logs = ("ControlNet: ", "IP-Adapter: 1 reference image(s)", "upscaled 1 image(s) 2x", "go_fast: the whole UNet")
    for line in logs:
        assert line in body["logs"], line
    whole, steps = map(int, re.search(r"the whole UNet ran in (\d+) of (\d+) steps", body["logs"]).groups())
    assert (whole, steps) == (6, 6)
    full = np.asarray(image, dtype=np.int16)
    for left_out in (("control_image", "control_type"), ("ip_adapter_image",), ("lora_weights",)):
        inputs = {k: v for k, v in everything.items() if k not in (*left_out, "return_control_map")}
        _, other = cog_server.predict(inputs)
        [without] = images_of(other)
        assert np.abs(np.asarray(without, dtype=np.int16) - full).mean() > 0.5, f"without {left_out[0]}: no change"
