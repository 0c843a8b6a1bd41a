"""ControlNet on the tiny union ControlNet: through the Cog server (inputs, outputs, refusals) and in
the engine where Cog adds nothing (module sharing, what the ControlNet reads, go_fast's shallow path)."""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engine import control as control_module
from engine.config import CONTROLNET_DIR, DEPTH_ESTIMATOR_DIR
from engine.control import Control
from engine.deepcache import DeepFeatureCache
from engine.errors import InputError
from engine.generator import Engine
from engine.request import GenerationRequest
from test_folder.conftest import CogServer, changed_share, decode_data_uri, image_data_uri
from test_folder.test_local_generation import unet_inputs
from test_folder.test_logs import noisy_lines

BASE = {"prompt": "a lighthouse on a cliff", "seed": 7, "num_inference_steps": 4, "output_format": "png"}


def photo() -> Image.Image:
    """A photo-like scene: a gradient sky, a dark disc and a bright block give edges and depth."""
    ramp = np.linspace(40, 220, 256, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.tile(ramp[:, None], (1, 256))] * 3, axis=-1))
    draw = ImageDraw.Draw(image)
    draw.ellipse((30, 90, 150, 210), fill=(20, 30, 90))
    draw.rectangle((150, 30, 230, 120), fill=(240, 200, 60))
    draw.line((0, 240, 255, 180), fill=(250, 250, 250), width=5)
    return image


PHOTO = image_data_uri(photo())


@pytest.fixture
def server(cog_server: CogServer) -> CogServer:
    """The session's Cog server: this module needs no setting of its own."""
    return cog_server


def run(server: CogServer, **inputs: Any) -> list[tuple[bytes, Image.Image]]:
    status, body = server.predict({**BASE, **inputs})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    files = [decode_data_uri(uri)[1] for uri in body["output"]]
    return [(data, Image.open(io.BytesIO(data))) for data in files]


def refusal(server: CogServer, **inputs: Any) -> str:
    status, body = server.predict({**BASE, **inputs})
    assert status == 200 and body["status"] == "failed", body
    assert "InputError" in body["error"], body["error"]
    return body["error"]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def differ(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def controlled(**fields: Any) -> GenerationRequest:
    """An engine request guided by a canny map of `photo()`, without the checker; fields override."""
    return replace(
        GenerationRequest(
            prompt=BASE["prompt"], seed=1, safety_checker=False, control_image=photo(), control_type="canny"
        ),
        **fields,
    )


# Through the Cog server.


def test_canny_changes_the_image_and_returns_the_map_it_used(server: CogServer) -> None:
    [(plain_bytes, plain)] = run(server)
    (image_bytes, image), (_, control_map) = run(
        server, control_image=PHOTO, control_type="canny", return_control_map=True
    )
    assert differ(image, plain) > 1
    assert control_map.format == "PNG" and control_map.size == image.size == (128, 128)
    values = np.unique(np.asarray(control_map))
    assert set(values.tolist()) == {0, 255}, values  # canny edges: black and white only
    expected = cv2.Canny(np.asarray(photo().resize((128, 128), Image.Resampling.LANCZOS).convert("L")), 100, 200)
    assert np.array_equal(np.asarray(control_map.convert("L")), expected)
    assert 'ControlNet 0: "Module: canny' in image.text["parameters"]
    assert "ControlNet" not in plain.text["parameters"]
    # Without return_control_map only the image comes back, and it is the same image.
    [(again, _)] = run(server, control_image=PHOTO, control_type="canny")
    assert again == image_bytes != plain_bytes


def test_strength_zero_is_exactly_no_control(server: CogServer) -> None:
    [(plain, _)] = run(server)
    (zero, image), (_, control_map) = run(
        server, control_image=PHOTO, control_type="canny", control_strength=0, return_control_map=True
    )
    assert zero == plain
    assert "ControlNet" not in image.text["parameters"]
    assert control_map.size == image.size  # the map is still what would have guided it


def test_depth_is_estimated_from_the_photo(server: CogServer) -> None:
    [(_, canny)] = run(server, control_image=PHOTO, control_type="canny")
    (_, image), (_, depth) = run(server, control_image=PHOTO, control_type="depth", return_control_map=True)
    assert depth.size == image.size
    channels = pixels(depth)
    assert np.array_equal(channels[..., 0], channels[..., 1]) and channels.min() == 0 and channels.max() == 255
    assert differ(image, canny) > 1


def test_types_without_a_preprocessor_need_a_ready_map(server: CogServer) -> None:
    message = refusal(server, control_image=PHOTO, control_type="pose")
    assert "control_type pose has no preprocessor" in message and "control_preprocess false" in message
    skeleton = Image.new("RGB", (128, 128))
    ImageDraw.Draw(skeleton).line((64, 20, 64, 90, 40, 120), fill=(255, 0, 85), width=4)
    (_, image), (_, used) = run(
        server,
        control_image=image_data_uri(skeleton),
        control_type="pose",
        control_preprocess=False,
        return_control_map=True,
    )
    assert np.array_equal(pixels(used), pixels(skeleton))  # a ready map is used as sent
    assert "Module: none, Model: controlnet-union, Control type: pose" in image.text["parameters"]


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"control_start": 0.6, "control_end": 0.4}, "control_end (0.4) must be greater than control_start (0.6)"),
        ({"control_type": "none"}, "control_image needs a control_type"),
        (
            {"control_image": "data:image/png;base64," + base64.b64encode(b"not an image").decode()},
            "control_image could not be read",
        ),
    ],
)
def test_bad_combinations_are_refused_with_a_message(server: CogServer, inputs: dict, expected: str) -> None:
    message = refusal(server, **{"control_image": PHOTO, "control_type": "canny", **inputs})
    assert expected in message, message


def test_control_inputs_without_an_image_are_refused(server: CogServer) -> None:
    assert "control_type canny needs a control_image" in refusal(server, control_type="canny")
    assert "return_control_map needs a control_image" in refusal(server, return_control_map=True)


@pytest.mark.parametrize(
    "inputs", [{"control_type": "openpose"}, {"control_strength": 2.5}, {"control_end": 1.5}, {"control_start": -0.1}]
)
def test_out_of_schema_values_get_422(server: CogServer, inputs: dict) -> None:
    status, body = server.predict({**BASE, "control_image": PHOTO, "control_type": "canny", **inputs})
    assert status == 422, body
    assert next(iter(inputs)) in str(body)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_control_in_img2img_and_inpaint(server: CogServer, mode: str) -> None:
    source = Image.new("RGB", (128, 128), (30, 140, 60))
    inputs: dict[str, Any] = {"image": image_data_uri(source), "prompt_strength": 1.0}
    if mode == "inpaint":
        mask = Image.new("L", (128, 128), 0)
        mask.paste(255, (0, 0, 64, 128))
        inputs["mask"] = image_data_uri(mask)
    [(_, plain)] = run(server, **inputs)
    (_, image), (_, control_map) = run(
        server, **inputs, control_image=PHOTO, control_type="canny", return_control_map=True
    )
    assert image.size == control_map.size == plain.size
    assert differ(image, plain) > 1
    if mode == "inpaint":  # the unmasked half still comes from the source
        assert np.abs(pixels(image)[:, 96:] - pixels(plain)[:, 96:]).mean() < differ(image, plain)


def test_both_models_with_a_lora_and_go_fast_off(server: CogServer, lora_files: dict[str, bytes]) -> None:
    control = {"control_image": PHOTO, "control_type": "canny"}
    [(_, illustrious)] = run(server, **control)
    [(_, sdxl)] = run(server, **control, model="sdxl")
    assert differ(illustrious, sdxl) > 1
    lora = "data:application/octet-stream;base64," + base64.b64encode(lora_files["a"]).decode()
    [(_, with_lora)] = run(server, **control, lora_weights=lora)
    assert changed_share(with_lora, illustrious) > 0.9 and 'Lora: "' in with_lora.text["parameters"]
    [(_, slow)] = run(server, **control, go_fast=False)
    assert differ(slow, illustrious) > 0 and "Deep cache" not in slow.text["parameters"]
    [(_, again)] = run(server, **control)
    assert differ(again, illustrious) == 0  # nothing left behind by the LoRA


def test_logs_say_what_the_controlnet_did_without_library_noise(server: CogServer) -> None:
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 128))
    for inputs in (
        {"control_type": "depth"},
        {"control_type": "canny", "image": PHOTO, "mask": image_data_uri(mask), "control_strength": 0},
        {"control_type": "canny", "image": PHOTO, "mask": image_data_uri(mask)},
    ):
        status, body = server.predict({**BASE, "control_image": PHOTO, **inputs})
        assert status == 200 and body["status"] == "succeeded", body.get("error")
        logs = body["logs"]
        assert f"control map: {inputs['control_type']} from a 256x256 image" in logs
        assert ("strength 0, not run" in logs) == ("control_strength" in inputs)
        assert noisy_lines(logs) == [], noisy_lines(logs)
    assert "guidance stays on every step (inpaint with a control image)" in logs
    assert "ControlNet: Module: canny" in logs and "steps (go_fast)" in logs


# In the engine.


def test_control_pipelines_share_every_module(engine: Engine) -> None:
    controlnets = set()
    for model in engine.models.values():
        for pipe in (model.control_txt2img, model.control_img2img, model.control_inpaint):
            for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
                assert getattr(pipe, name) is getattr(model.txt2img, name), name
            controlnets.add(id(pipe.controlnet))
    assert controlnets == {id(engine.control.controlnet)}  # one ControlNet for every model


def test_the_controlnet_reads_the_returned_map(engine: Engine) -> None:
    seen: list[torch.Tensor] = []
    hook = engine.control.controlnet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["controlnet_cond"][0]), with_kwargs=True
    )
    try:
        req = controlled(num_inference_steps=2, return_control_map=True)
        [result] = engine.generate(req)
    finally:
        hook.remove()
    assert result.control_map is not None
    expected = torch.from_numpy(np.array(result.control_map)).permute(2, 0, 1).float() / 255
    assert len(seen) == 2 and all(torch.equal(cond[-1], expected) for cond in seen)


def test_an_image_without_a_controlnet_says_so_and_plain_requests_are_unchanged(
    engine: Engine, weights_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for folder in weights_dir.iterdir():
        if folder.name not in (CONTROLNET_DIR, DEPTH_ESTIMATOR_DIR):
            (tmp_path / folder.name).symlink_to(folder)
    with caplog.at_level(logging.INFO):
        bare = Engine.load(tmp_path)
    assert "ControlNet not baked" in caplog.text and "depth estimator not baked" in caplog.text
    plain = GenerationRequest(prompt=BASE["prompt"], seed=3, num_inference_steps=3, safety_checker=False)
    assert np.array_equal(pixels(bare.generate(plain)[0].image), pixels(engine.generate(plain)[0].image))
    with pytest.raises(InputError, match="built without a ControlNet"):
        bare.generate(replace(plain, control_image=photo(), control_type="canny"))


def test_depth_without_the_estimator_needs_a_ready_map(engine: Engine) -> None:
    control = Control(engine.control.controlnet)
    req = GenerationRequest(prompt="x", control_image=photo(), control_type="depth")
    with pytest.raises(InputError, match="built without the depth estimator"):
        control.check(req)
    control.check(replace(req, control_preprocess=False))


def batch_of(calls: list[int]) -> Any:
    """A forward pre-hook that records the batch size of each call."""

    def hook(_: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        calls.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[0])

    return hook


def hooks(engine: Engine, model_id: str) -> tuple[list[int], list[int], list[int], list[Any]]:
    """Batch sizes seen by the UNet's deepest block, the ControlNet, and the ControlNet's deepest block."""
    unet = engine.models[model_id].txt2img.unet
    controlnet = engine.control.controlnet
    deep: list[int] = []
    control: list[int] = []
    control_deep: list[int] = []
    handles = [
        unet.down_blocks[-1].register_forward_pre_hook(batch_of(deep), with_kwargs=True),
        controlnet.register_forward_pre_hook(batch_of(control), with_kwargs=True),
        controlnet.down_blocks[-1].register_forward_pre_hook(batch_of(control_deep), with_kwargs=True),
    ]
    return deep, control, control_deep, handles


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_go_fast_with_control(engine: Engine, mode: str) -> None:
    """The deep path of the UNet and of the ControlNet runs in 15 of 25 steps as without control; the
    ControlNet is called every step (its shallow part only on cached steps), at half batch after the
    guidance cutoff (sigma 0.28: the last 2 of 25 Euler a steps), or at full batch in inpaint, where
    the cutoff is off."""
    req = controlled(num_inference_steps=25, megapixels="0.25")
    if mode != "txt2img":
        req = replace(req, image=photo(), prompt_strength=1.0)
    if mode == "inpaint":
        req = replace(req, mask=Image.new("L", (128, 128), 255))
    deep, control, control_deep, handles = hooks(engine, "illustrious-xl")
    try:
        [result] = engine.generate(req)
    finally:
        for handle in handles:
            handle.remove()
    assert len(deep) == 15 and len(control) == 25 and control_deep == deep
    if mode != "inpaint":
        assert control == [2] * 23 + [1] * 2 and "CFG cutoff: 0.28" in result.parameters.to_a1111()
    else:
        assert control == [2] * 25 and "CFG cutoff" not in result.parameters.to_a1111()


def test_the_shallow_path_adds_the_controlnet_residuals_exactly(engine: Engine) -> None:
    """Fed the same step's deep features and the ControlNet's residuals, the shallow path gives the
    full UNet's output bit for bit, and the residuals change it."""
    unet = engine.models["illustrious-xl"].txt2img.unet
    controlnet = engine.control.controlnet
    generator = torch.Generator().manual_seed(0)
    sample, text, added = unet_inputs(unet, generator)
    control_type = torch.zeros(2, controlnet.config.num_control_type)
    control_type[:, 3] = 1
    with torch.no_grad():
        down, mid = controlnet(
            sample,
            500,
            encoder_hidden_states=text,
            controlnet_cond=[torch.rand(2, 3, 128, 128, generator=generator)],
            control_type=control_type,
            control_type_idx=[3],
            conditioning_scale=[0.8],
            added_cond_kwargs=added,
            return_dict=False,
        )
    residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    cache = DeepFeatureCache(unet, lambda: [True, True, False])
    with torch.no_grad(), cache.installed():
        full = unet(sample, 500, text, added_cond_kwargs=added, return_dict=False, **residuals)[0]
        cache.calls = 2  # step 2 reuses the deep features of the full call
        shallow = unet(sample, 500, text, added_cond_kwargs=added, return_dict=False, **residuals)[0]
        cache.calls = 2
        without = unet(sample, 500, text, added_cond_kwargs=added, return_dict=False)[0]
    assert cache.full_calls == 1
    assert torch.equal(full, shallow)
    assert not torch.equal(shallow, without)
    assert unet.forward.__func__ is type(unet).forward


def test_the_controlnet_skips_its_deep_half_exactly_on_cached_steps(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The residuals of the ControlNet's stopped forward are its whole forward's first ones, bit for
    bit, so skipping its deep half on cached steps leaves the go_fast image unchanged."""
    controlnet = engine.control.controlnet
    generator = torch.Generator().manual_seed(1)
    kwargs = {
        "sample": torch.randn(2, 4, 16, 16, generator=generator),
        "timestep": 400,
        "encoder_hidden_states": torch.randn(2, 77, controlnet.config.cross_attention_dim, generator=generator),
        "controlnet_cond": [torch.rand(2, 3, 128, 128, generator=generator)],
        "control_type": torch.eye(controlnet.config.num_control_type)[[1, 1]],
        "control_type_idx": [1],
        "conditioning_scale": [0.7],
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 32, generator=generator),
            "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2),
        },
        "return_dict": False,
    }
    with torch.no_grad():
        down, _ = controlnet(**kwargs)
        first = control_module.shallow_residuals(controlnet, 2, **kwargs)
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, down[:2], strict=True))

    req = controlled(seed=2, num_inference_steps=25, megapixels="0.25", control_type="depth")  # 10 cached steps
    skipped = engine.generate(req)[0].image

    def whole_forward(net: torch.nn.Module, count: int, **kw: Any) -> tuple[torch.Tensor, ...]:
        return tuple(type(net).forward(net, **kw)[0][:count])

    monkeypatch.setattr(control_module, "shallow_residuals", whole_forward)
    assert np.array_equal(pixels(engine.generate(req)[0].image), pixels(skipped))
