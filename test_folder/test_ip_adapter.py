"""IP-Adapter reference images through the real Cog server, and the exactness of the toggle in the
engine: a request without a reference runs the UNet an engine without the adapter runs."""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from engine.config import IP_ADAPTER_DIR, IP_ADAPTER_ENCODER_DIR, IP_ADAPTER_WEIGHT_NAME
from engine.errors import InputError
from engine.generator import Engine
from engine.ip_adapter import IpAdapter
from engine.request import GenerationRequest
from test_folder.conftest import CogServer, changed_share, decode_data_uri, image_data_uri
from test_folder.test_logs import noisy_lines
from test_folder.test_server import FLUX_JSON
from utils import read_parameters

SMALL = {**FLUX_JSON, "megapixels": "0.25", "num_inference_steps": 3, "output_format": "png"}


def noise(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A reference image: random colours, different for each seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


REF_A = image_data_uri(noise(1))
REF_B = image_data_uri(noise(2))


@pytest.fixture
def server(cog_server: CogServer) -> CogServer:
    """The session's Cog server: this module needs no setting of its own."""
    return cog_server


def run(server: CogServer, **inputs: object) -> tuple[bytes, str]:
    """The PNG's bytes and its embedded parameters."""
    status, body = server.predict({**SMALL, **inputs})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    _, data = decode_data_uri(body["output"][0])
    return data, read_parameters(io.BytesIO(data)) or ""


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def test_a_reference_changes_the_image_and_each_reference_differs(server: CogServer) -> None:
    plain, plain_params = run(server)
    a, a_params = run(server, ip_adapter_image=[REF_A])
    b, _ = run(server, ip_adapter_image=[REF_B])
    both, both_params = run(server, ip_adapter_image=[REF_A, REF_B])
    outputs = [pixels(x) for x in (plain, a, b, both)]
    assert all(x.shape == outputs[0].shape == (64, 64, 3) for x in outputs)
    for i in range(4):
        for j in range(i + 1, 4):
            assert changed_share(outputs[i], outputs[j]) > 0.9, (i, j)
    assert "IP-Adapter" not in plain_params
    assert 'IP-Adapter: "ip-adapter-plus_sdxl_vit-h: 0.6, 1 image"' in a_params
    assert 'IP-Adapter: "ip-adapter-plus_sdxl_vit-h: 0.6, 2 images"' in both_params
    again, _ = run(server, ip_adapter_image=[REF_A])
    assert again == a  # same seed, same reference: the same file


def test_one_log_line_and_no_library_noise(server: CogServer) -> None:
    status, body = server.predict({**SMALL, "ip_adapter_image": [REF_A, REF_B], "go_fast": True})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    lines = [line for line in body["logs"].splitlines() if "IP-Adapter" in line]
    assert len(lines) == 1 and lines[0].startswith("IP-Adapter: 2 reference image(s) at scale 0.6, encoded in ")
    assert noisy_lines(body["logs"]) == []


def test_scale_changes_the_image_and_zero_is_no_reference(server: CogServer) -> None:
    plain, _ = run(server)
    zero, params = run(server, ip_adapter_image=[REF_A], ip_adapter_scale=0)
    assert zero == plain  # the same bytes: no IP-Adapter ran, and the metadata says nothing
    assert "IP-Adapter" not in params
    weak, _ = run(server, ip_adapter_image=[REF_A], ip_adapter_scale=0.3)
    strong, strong_params = run(server, ip_adapter_image=[REF_A], ip_adapter_scale=1.5)
    assert changed_share(pixels(weak), pixels(strong)) > 0.9
    assert "ip-adapter-plus_sdxl_vit-h: 1.5, 1 image" in strong_params


def test_a_lone_url_gets_422_naming_the_field(server: CogServer) -> None:
    """The input is a list (one or several references); coglet does not wrap a lone value."""
    status, body = server.predict({**SMALL, "ip_adapter_image": REF_A})
    assert status == 422
    assert "ip_adapter_image" in str(body)


def test_with_a_lora_and_the_baseline_after(server: CogServer, lora_files: dict[str, bytes]) -> None:
    lora = "data:application/octet-stream;base64," + base64.b64encode(lora_files["a"]).decode()
    before, _ = run(server)
    ip, _ = run(server, ip_adapter_image=[REF_A])
    with_lora, _ = run(server, lora_weights=lora)
    both, params = run(server, lora_weights=lora, ip_adapter_image=[REF_A])
    assert "IP-Adapter" in params and "Lora" in params
    for other in (before, ip, with_lora):
        assert changed_share(pixels(both), pixels(other)) > 0.9
    after, _ = run(server)
    assert after == before


def test_img2img_inpaint_and_both_models(server: CogServer) -> None:
    source = image_data_uri(noise(7, (64, 64)))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    for inputs in (
        {"image": source},
        {"image": source, "mask": image_data_uri(mask)},
        {"model": "sdxl"},
        {"model": "sdxl", "image": source},
    ):
        without, _ = run(server, **inputs)
        with_ref, params = run(server, **inputs, ip_adapter_image=[REF_A])
        assert pixels(with_ref).shape == pixels(without).shape
        assert changed_share(pixels(with_ref), pixels(without)) > 0.9, inputs
        assert "IP-Adapter" in params
    illustrious, _ = run(server, ip_adapter_image=[REF_A])
    sdxl, _ = run(server, model="sdxl", ip_adapter_image=[REF_A])
    assert changed_share(pixels(illustrious), pixels(sdxl)) > 0.9


def test_go_fast_on_and_off_unguided_and_two_outputs(server: CogServer) -> None:
    fast, _ = run(server, ip_adapter_image=[REF_A], num_inference_steps=10)
    slow, _ = run(server, ip_adapter_image=[REF_A], num_inference_steps=10, go_fast=False)
    assert np.abs(pixels(fast) - pixels(slow)).max() > 0
    # guidance 0: no negative half to the image embeddings
    unguided, _ = run(server, guidance=0)
    unguided_ref, _ = run(server, guidance=0, ip_adapter_image=[REF_A])
    assert changed_share(pixels(unguided), pixels(unguided_ref)) > 0.9
    status, body = server.predict({**SMALL, "ip_adapter_image": [REF_A], "num_outputs": 2})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    first, second = (pixels(decode_data_uri(uri)[1]) for uri in body["output"])
    assert changed_share(first, second) > 0.9


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"ip_adapter_image": ["data:image/png;base64,bm90IGFuIGltYWdl"]}, "ip_adapter_image could not be read"),
        ({"ip_adapter_image": [REF_A] * 5}, "ip_adapter_image holds 5 images: send at most 4"),
    ],
)
def test_bad_references_fail_clearly(server: CogServer, inputs: dict, message: str) -> None:
    status, body = server.predict({**SMALL, **inputs})
    assert status == 200 and body["status"] == "failed"
    assert message in body["error"]
    assert "Traceback" not in body["error"]


@pytest.mark.parametrize("value", [-0.1, 1.6, "strong"])
def test_scale_out_of_range_gets_422(server: CogServer, value: object) -> None:
    status, _ = server.predict({**SMALL, "ip_adapter_image": [REF_A], "ip_adapter_scale": value})
    assert status == 422


# The toggle, in the engine: bytes of the decoded image, two engines in this process.


def image_hash(engine: Engine, req: GenerationRequest) -> str:
    return hashlib.sha256(engine.generate(req)[0].image.tobytes()).hexdigest()


REQUEST = GenerationRequest(
    prompt="a lighthouse at dusk", num_inference_steps=3, seed=5, megapixels="0.25", safety_checker=False
)


@pytest.fixture(scope="module")
def engine_without_ip(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The same weights, minus the IP-Adapter folder."""
    root = tmp_path_factory.mktemp("weights-without-ip")
    for folder in weights_dir.iterdir():
        if folder.name != "ip-adapter":
            (root / folder.name).symlink_to(folder)
    return Engine.load(root)


def test_no_reference_is_the_engine_without_the_adapter(engine: Engine, engine_without_ip: Engine) -> None:
    for model in ("illustrious-xl", "sdxl"):
        plain = replace(REQUEST, model=model)
        expected = image_hash(engine_without_ip, plain)
        assert image_hash(engine, plain) == expected
        image_hash(engine, replace(plain, ip_adapter_images=(noise(1),)))
        assert image_hash(engine, plain) == expected
    for mode in ({"image": noise(3, (64, 64))}, {"go_fast": False}):
        plain = replace(REQUEST, **mode)
        assert image_hash(engine, plain) == image_hash(engine_without_ip, plain)
    # Between requests nothing of the adapter is in the UNet: no LoRA can name its weights.
    unet = engine.models["illustrious-xl"].txt2img.unet
    assert not [name for name, _ in unet.named_parameters() if "_ip" in name or "encoder_hid_proj" in name]
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None


def test_without_the_folder_a_reference_is_refused(engine_without_ip: Engine) -> None:
    assert all(model.ip_adapter is None for model in engine_without_ip.models.values())
    with pytest.raises(InputError, match="built without the IP-Adapter"):
        engine_without_ip.generate(replace(REQUEST, ip_adapter_images=(noise(1),)))


def test_one_adapter_and_one_image_encoder_for_every_model_and_pipeline(engine: Engine) -> None:
    encoders = {id(pipe.image_encoder) for model in engine.models.values() for pipe in model.pipelines}
    assert len(encoders) == 1 and None not in encoders
    adapters = [model.ip_adapter for model in engine.models.values()]
    assert all(a is not None and a.modules is adapters[0].modules for a in adapters)


def test_the_adapter_holds_what_diffusers_own_load_makes(weights_dir: Path) -> None:
    """IpAdapter keeps the processors and weights of diffusers' own `load_ip_adapter` (its values
    wrapped, same keys), and leaves the UNet of its own class with its plain processors."""
    folder = weights_dir / "sdxl"
    kwargs = {"local_files_only": True, "use_safetensors": True}
    ours = StableDiffusionXLPipeline.from_pretrained(folder, **kwargs)
    theirs = StableDiffusionXLPipeline.from_pretrained(folder, **kwargs)
    adapter = IpAdapter(ours, weights_dir / IP_ADAPTER_DIR)
    theirs.load_ip_adapter(
        str(weights_dir / IP_ADAPTER_DIR),
        subfolder="",
        weight_name=IP_ADAPTER_WEIGHT_NAME,
        image_encoder_folder=IP_ADAPTER_ENCODER_DIR,
        local_files_only=True,
    )
    loaded = {k: v for k, v in theirs.unet.attn_processors.items() if not k.startswith("encoder_hid_proj.")}
    assert {k: type(v) for k, v in adapter.processors.items()} == {k: type(v) for k, v in loaded.items()}
    assert any(isinstance(v, torch.nn.Module) for v in loaded.values())
    for name, processor in loaded.items():
        if isinstance(processor, torch.nn.Module):
            mine = adapter.processors[name].state_dict()
            assert all(torch.equal(mine[k], v) for k, v in processor.state_dict().items()), name
    unet = ours.unet
    assert type(unet) is UNet2DConditionModel
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in adapter.plain.items()}


def test_the_guidance_cutoff_halves_the_image_embeddings(engine: Engine) -> None:
    """go_fast drops the unconditional half mid-run: the IP keys see batch 2, then 1, never a mismatch."""
    adapter = engine.models["illustrious-xl"].ip_adapter
    assert adapter is not None
    processor = next(p for p in adapter.processors.values() if isinstance(p, torch.nn.Module))
    seen: list[int] = []
    hook = processor.to_k_ip[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        req = replace(REQUEST, num_inference_steps=10, ip_adapter_images=(noise(1),))
        engine.generate(req)
    finally:
        hook.remove()
    # 10 steps reuse no deep features; the last one is below sigma 0.28 (batch 1).
    assert seen == [2] * 9 + [1]


def test_cached_steps_skip_the_image_projection(engine: Engine) -> None:
    """SDXL's shallow path attends to no context, so go_fast's cached steps project no reference
    image: the projection runs in the 15 whole steps of 25 (it ran in all 25 before)."""
    adapter = engine.models["illustrious-xl"].ip_adapter
    assert adapter is not None
    calls: list[int] = []
    hook = adapter.projection.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        engine.generate(replace(REQUEST, num_inference_steps=25, ip_adapter_images=(noise(1),)))
    finally:
        hook.remove()
    assert len(calls) == 15


def test_swap_mode_moves_the_shared_adapter_with_the_requested_model(weights_dir: Path) -> None:
    """The adapter waits outside the UNet between requests, so a model move must take it along
    (CPU on both sides here: the path runs, the transfer is not measured)."""
    swapping = Engine.load(weights_dir, residency="swap")
    req = replace(REQUEST, ip_adapter_images=(noise(1),))
    for model in ("sdxl", "illustrious-xl"):
        swapping.generate(replace(req, model=model))
        adapter = swapping.models[model].ip_adapter
        assert adapter is not None
        assert {p.device for p in adapter.modules.parameters()} == {swapping.models[model].device}


def test_the_scale_on_the_values_is_diffusers_scale_on_the_output(engine: Engine) -> None:
    """The engine scales each IP processor's values by a tensor (compiled graphs read it afresh) where
    diffusers multiplies the attention output by a float; attention is linear in its values, so the
    outputs agree to float rounding, at every scale."""
    adapter = engine.models["sdxl"].ip_adapter
    assert adapter is not None and adapter.values
    unet = engine.models["sdxl"].txt2img.unet
    name, processor = next((n, p) for n, p in adapter.processors.items() if n.endswith("attn2.processor"))
    attn = unet.get_submodule(name.removesuffix(".processor"))
    values = processor.to_v_ip[0]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, attn.to_q.in_features, generator=gen)
    text = torch.randn(2, 77, attn.to_k.in_features, generator=gen)
    ip = torch.randn(2, processor.num_tokens[0], values.in_features, generator=gen)
    with torch.no_grad():
        for scale in (0.3, 1.0, 1.5):
            values.scale.fill_(scale)
            ours = processor(attn, hidden, encoder_hidden_states=(text, [ip]))
            values.scale.fill_(1.0)
            processor.scale = [scale]
            theirs = processor(attn, hidden, encoder_hidden_states=(text, [ip]))
            processor.scale = [1.0]
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            assert scale == 1.0 or not torch.equal(ours, processor(attn, hidden, encoder_hidden_states=(text, [ip])))
