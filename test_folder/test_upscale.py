"""The upscale input: through the Cog server on the tiny Swin2SR stand-in, and its tiling in the engine.

The stand-in's head carries its input through as a nearest-neighbour x4 and its random Swin body
adds a perturbation (scripts/build_tiny_weights.build_upscaler), so an upscaled image resembles
its source, and the body makes each output pixel depend on its neighbourhood, as a trained model's does.
"""

from __future__ import annotations

import io
import json
import logging
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.config import UPSCALE_FACTORS, UPSCALER_DIR, UPSCALER_NAME
from engine.errors import InputError
from engine.generator import Engine
from engine.request import GenerationRequest
from engine.upscale import Upscaler, check_upscale, tile_spans
from scripts.bake import MANIFEST, bake
from test_folder.conftest import CogServer, decode_data_uri
from test_folder.emulators import HfRepo, hugging_face, point_hub_client_at

# 256x256 at Flux's scale is 32x32 on the tiny model (native 128 px instead of 1024).
BASE = {
    "prompt": "a lighthouse on a cliff",
    "aspect_ratio": "custom",
    "width": 256,
    "height": 256,
    "num_outputs": 2,
    "num_inference_steps": 2,
    "seed": 7,
    "output_format": "png",
}


@pytest.fixture
def server(cog_server: CogServer) -> CogServer:
    """The session's Cog server: this module needs no setting of its own."""
    return cog_server


def _predict(server: CogServer, **inputs: Any) -> tuple[list[bytes], dict[str, Any]]:
    status, body = server.predict({**BASE, **inputs})
    assert status == 200 and body["status"] == "succeeded", body
    return [decode_data_uri(uri)[1] for uri in body["output"]], body


def _image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_2x_and_4x_enlarge_each_output_and_none_is_the_plain_request(server: CogServer) -> None:
    plain, _ = _predict(server)
    none, _ = _predict(server, upscale="none")
    assert none == plain, "upscale none is the plain request, byte for byte"
    twice, _ = _predict(server, upscale="2x")
    four, body = _predict(server, upscale="4x")
    assert len(twice) == len(four) == 2
    other, _ = _predict(server, seed=99)
    for source, two_x, four_x, unrelated in zip(plain, twice, four, other, strict=True):
        source, two_x, four_x = _image(source), _image(two_x), _image(four_x)
        assert source.size == (32, 32) and two_x.size == (64, 64) and four_x.size == (128, 128)
        # 2x is the 4x result reduced by half with Lanczos, exactly.
        halved = four_x.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
        assert np.array_equal(_pixels(two_x), _pixels(halved))
        # Brought back to the source's size, the upscaled image is the source again, loosely: far
        # closer than another seed's image is (orientation, channel order and colours survive).
        for big in (two_x, four_x):
            back = _pixels(big.convert("RGB").resize(source.size, Image.Resampling.BOX))
            near = np.abs(back - _pixels(source)).mean()
            far = np.abs(_pixels(_image(unrelated)) - _pixels(source)).mean()
            assert near < 10 and near * 3 < far, (near, far)
        parameters = four_x.info["parameters"]
        assert f"Postprocess upscale by: 4, Postprocess upscaler: {UPSCALER_NAME}" in parameters
        assert "Size: 32x32" in parameters, "Size stays the generated size"
        assert "Postprocess upscale by: 2" in two_x.info["parameters"]
        assert "Postprocess" not in source.info["parameters"]
    assert f"upscaled 2 image(s) 4x with {UPSCALER_NAME}, 32x32 -> 128x128" in body["logs"]


def test_an_upscale_past_the_cap_is_refused_before_any_step(server: CogServer) -> None:
    status, body = server.predict({**BASE, "width": 1440, "height": 1440, "upscale": "4x"})
    assert status == 200 and body["status"] == "failed", body
    assert "InputError" in body["error"]
    assert "5760x5760 (33.2 megapixels), over the limit of 16.8: use upscale 2x for this size" in body["error"]
    assert "step 1/" not in body["logs"]


def test_an_unknown_upscale_is_a_422(server: CogServer) -> None:
    status, body = server.predict({**BASE, "upscale": "8x"})
    assert status == 422 and "upscale" in str(body)


@pytest.fixture(scope="module")
def upscaler(engine: Engine) -> Upscaler:
    assert engine.upscaler is not None, "build_all bakes the tiny upscaler"
    return engine.upscaler


def _untiled(upscaler: Upscaler, image: Image.Image) -> np.ndarray:
    """The model on the whole image at once, rounded to 8 bits."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        out = upscaler.model(pixel_values=pixels).reconstruction[0].clamp(0, 1)
    return (out * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().astype(np.int16)


def _smooth_image(width: int, height: int) -> Image.Image:
    """Random colours, smoothly interpolated: detail at every scale, like a generated image."""
    cells = np.random.default_rng(0).integers(0, 256, (height // 10, width // 10, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)


def test_an_image_within_one_tile_is_the_untiled_result_exactly(upscaler: Upscaler) -> None:
    image = _smooth_image(96, 80)
    assert np.array_equal(_pixels(upscaler.upscale(image, 4)), _untiled(upscaler, image))


def test_tiles_blend_without_seams(weights_dir: Path, upscaler: Upscaler) -> None:
    """A 160x120 image in 48 px tiles (4 x 5 of them) against the untiled run. The tiles start on the
    Swin window grid, so they differ from it only through the context their inner edges lack, which
    the blend weighs down: at most 2 levels of 255 anywhere (rounding to 8 bits alone is 1). Pasting
    window-aligned tiles without overlap would show seams of 5 levels and more; the test measures that too."""
    image = _smooth_image(160, 120)
    tiled = Upscaler(weights_dir / UPSCALER_DIR, torch.device("cpu"), torch.float32, tile=48, overlap=16)
    assert len(tile_spans(120, tiled.tile, tiled.overlap, tiled.grid)) > 2
    reference = _untiled(upscaler, image)
    diff = np.abs(_pixels(tiled.upscale(image, 4)) - reference)
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    pasted = np.zeros_like(reference)
    for top in range(0, 120, 40):
        for left in range(0, 160, 40):
            tile = image.crop((left, top, left + 40, top + 40))
            pasted[top * 4 : (top + 40) * 4, left * 4 : (left + 40) * 4] = _untiled(upscaler, tile)
    assert np.abs(pasted - reference).max() >= 5, "without the blend the seams show"


@pytest.mark.parametrize("length", [8, 40, 48, 49, 100, 120, 513, 640, 1024, 1440, 1536, 6000])
def test_tiles_cover_the_side_on_the_window_grid_and_overlap(length: int) -> None:
    tile, overlap, grid = (48, 16, 8) if length < 200 else (512, 32, 8)
    spans = tile_spans(length, tile, overlap, grid)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(start % grid == 0 for start, _ in spans)
    assert all(end - start <= tile for start, end in spans[:-1]) and spans[-1][1] - spans[-1][0] < tile + grid
    assert all(end - start > overlap for (_, end), (start, _) in pairwise(spans))


def test_the_cap_names_the_largest_upscale_that_fits(upscaler: Upscaler) -> None:
    check_upscale(upscaler, "4x", (1536, 640))  # Flux's 21:9, 6144x2560
    check_upscale(upscaler, "4x", (1024, 1024))  # exactly the cap
    check_upscale(upscaler, "2x", (1440, 1440))  # the largest custom size
    with pytest.raises(InputError, match="use upscale 2x for this size"):
        check_upscale(upscaler, "4x", (1040, 1024))
    check_upscale(None, "none", (1440, 1440))
    with pytest.raises(InputError, match="built without the upscaler"):
        check_upscale(None, "2x", (256, 256))


def test_the_safety_checker_sees_the_generated_images_then_they_are_upscaled(engine: Engine) -> None:
    seen: list[tuple[int, int]] = []

    class RecordingChecker:
        def __init__(self) -> None:
            self.device = engine.safety.device

        def flags(self, images: list[Image.Image]) -> list[bool]:
            seen.extend(im.size for im in images)
            return engine.safety.flags(images)

    recording = Engine(engine.models, RecordingChecker(), upscaler=engine.upscaler)  # type: ignore[arg-type]
    req = GenerationRequest(prompt="a lighthouse", num_inference_steps=2, seed=3, megapixels="0.25", upscale="4x")
    [result] = recording.generate(req)
    assert seen == [(64, 64)] and result.image.size == (256, 256)
    assert (result.parameters.width, result.parameters.upscale_by) == (64, UPSCALE_FACTORS["4x"])


def test_without_the_upscaler_folder_upscale_is_refused_before_any_step(
    engine: Engine, weights_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "weights"
    root.mkdir()
    for folder in weights_dir.iterdir():
        if folder.name != UPSCALER_DIR:
            (root / folder.name).symlink_to(folder)
    with caplog.at_level(logging.INFO, logger="engine.upscale"):
        assert Upscaler.load_if_baked(root, torch.device("cpu"), torch.float32) is None
    assert "upscaler not baked" in caplog.text
    unbaked = Engine(engine.models, engine.safety)
    unet = engine.models["illustrious-xl"].txt2img.unet
    calls: list[int] = []
    hook = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(InputError, match="this image was built without the upscaler"):
            unbaked.generate(GenerationRequest(prompt="a lighthouse", num_inference_steps=2, upscale="2x"))
        assert not calls, "refused before any denoising step"
        assert unbaked.generate(GenerationRequest(prompt="a lighthouse", num_inference_steps=2, seed=1))
    finally:
        hook.remove()


def test_the_manifest_entry_bakes_a_folder_the_upscaler_loads(
    weights_dir: Path, upscaler: Upscaler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bake/manifest.json's own entry, against a loopback hub holding the tiny stand-in in the real
    repo's layout (config.json and a pickled pytorch_model.bin at the pinned commit): the bake
    converts the pickle, and the folder it installs gives the engine's upscaler, pixel for pixel."""
    entry = json.loads(MANIFEST.read_text())["models"][UPSCALER_DIR]
    [source] = entry["sources"]
    torch.save(load_file(weights_dir / UPSCALER_DIR / "model.safetensors"), tmp_path / "pytorch_model.bin")
    files = {"config.json": (weights_dir / UPSCALER_DIR / "config.json").read_bytes()}
    files["pytorch_model.bin"] = (tmp_path / "pytorch_model.bin").read_bytes()
    hub = hugging_face({source["hf"]: HfRepo(files, commit=source["revision"])})
    point_hub_client_at(hub, monkeypatch)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": {UPSCALER_DIR: entry}}))
    try:
        assert bake(tmp_path / "weights", manifest) == [UPSCALER_DIR]
    finally:
        hub.close()
    baked = tmp_path / "weights" / UPSCALER_DIR
    assert sorted(p.name for p in baked.iterdir()) == [".baked", "config.json", "model.safetensors"]
    image = _smooth_image(40, 32)
    loaded = Upscaler.load_if_baked(tmp_path / "weights", torch.device("cpu"), torch.float32)
    assert loaded is not None
    assert np.array_equal(_pixels(loaded.upscale(image, 4)), _pixels(upscaler.upscale(image, 4)))


def test_the_upscale_says_how_far_it_is_after_the_generated_line(
    engine: Engine, weights_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A line before each image and after each of its tiles, all after the "generated" line: a long
    upscale keeps a prediction's logs (and so coglet's updates) moving instead of holding them back."""
    tiled = Upscaler(weights_dir / UPSCALER_DIR, torch.device("cpu"), torch.float32, tile=48, overlap=16)
    tiling = Engine(engine.models, engine.safety, upscaler=tiled)
    req = GenerationRequest(
        prompt="a lighthouse", num_inference_steps=2, seed=3, num_outputs=2, megapixels="0.25", upscale="4x"
    )
    with caplog.at_level(logging.INFO):
        results = tiling.generate(req)
    lines = [r.getMessage() for r in caplog.records]
    first = next(i for i, line in enumerate(lines) if line.startswith("generated 2 image(s)"))
    progress = [line for line in lines[first + 1 :] if line.startswith("upscal")]
    (w, h), tiles = results[0].image.size, tiled.tile_count(Image.new("RGB", (64, 64)))
    assert (w, h) == (256, 256) and tiles == 4
    expected = []
    for i in (1, 2):
        expected.append(f"upscaling image {i} of 2: 64x64 -> 256x256 (4 tiles)")
        expected += [f"upscaled tile {t} of 4 of image {i} of 2" for t in range(1, 5)]
    assert [line.split(" (")[0] if "tile " in line else line for line in progress[:-1]] == expected
    assert progress[-1].startswith("upscaled 2 image(s) 4x with")
