"""generation_data: A1111 / Forge / CivitAI infotext read into a request, and the output metadata
written so that A1111's own parser and CivitAI read it right (issue 21, items 2 and 3).

The unit tests need no model. The server tests run the real Cog server on the tiny weights with
CivitAI's API emulated on loopback (by-hash lookups, version ids, downloads counted).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from engine.errors import InputError
from engine.infotext import apply_generation_data, one_generation_data, parse_infotext
from engine.metadata import GenerationParameters, checkpoint_hash, embedding_hash, lora_hash
from engine.request import GenerationRequest, LoraSpec
from engine.schedulers import SCHEDULERS, from_a1111
from test_folder.conftest import CogServer, changed_share, decode_data_uri, image_data_uri
from test_folder.emulators import CivitaiVersion, civitai, civitai_hashes
from test_folder.test_embeddings import sdxl_embedding
from utils import read_generation_data, read_parameters

# Every Flux input that the tests below leave at its default (predict.py computes this set).
ALL_DEFAULT = frozenset(
    {
        "negative_prompt",
        "num_inference_steps",
        "scheduler",
        "guidance",
        "cfg_scale",
        "seed",
        "aspect_ratio",
        "width",
        "height",
        "clip_skip",
        "prompt_strength",
        "go_fast",
        "model",
        "use_standard_sdxl",
        "upscale",
        "lora_weights",
        "extra_lora",
    }
)
TINY = {
    "illustrious-xl": SimpleNamespace(native_resolution=128, model_hash=None),
    "sdxl": SimpleNamespace(native_resolution=128, model_hash=None),  # baked from diffusers folders, as in the image
}
CIVITAI_TEXT = (
    "masterpiece, 1girl, <lora:inkStyle:0.8> ink wash, <lora:hatDetail_v2:0.5>\n"
    "Negative prompt: lowres, (worst quality:1.2),\n"
    "blurry\n"
    "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 991, Size: 96x128, "
    "Model hash: 0123456789, Model: waiIllustriousSDXL_v140, Clip skip: 2, ADetailer model: face_yolov8n.pt, "
    'Hires upscale: 1.5, Lora hashes: "inkStyle: {ink}, hatDetail_v2: {hat}", Version: v1.10.1'
)


def a1111_reading(text: str) -> dict[str, str]:
    """Reads the last line of an infotext with A1111's rules, written here from A1111's
    `parse_generation_parameters` (modules/infotext_utils.py): a key is a word then words, spaces,
    dashes or slashes up to a colon; a value is a double-quoted string with backslash escapes,
    JSON-decoded, or else everything up to the next comma. Independent of engine/infotext.py."""
    last = text.strip().split("\n")[-1]
    pairs = re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last)
    return {key: json.loads(value) if value[:1] == '"' == value[-1:] else value for key, value in pairs}


def params(**changes: object) -> GenerationParameters:
    base = GenerationParameters(
        prompt="a lighthouse, (dusk:1.2)",
        negative_prompt="blurry, lowres",
        steps=2,
        sampler="Euler a",
        cfg_scale=6.0,
        seed=7,
        width=128,
        height=96,
        model="illustrious-xl",
    )
    return replace(base, **changes)


# -- metadata: what A1111 and CivitAI read ------------------------------------------------------


def test_go_fast_and_lora_values_survive_a1111s_own_parser() -> None:
    """Fails on the old writer: `Deep cache: from 0.3, every 3 steps full` read as "from 0.3"."""
    text = params(
        cfg_cutoff=0.6,
        deep_cache="from 0.3, every 3 steps full",
        loras=(("https://host:8080/a, b.safetensors", 0.8, "0123456789ab"),),
    ).to_a1111()
    read = a1111_reading(text)
    assert read["Deep cache"] == "from 0.3, every 3 steps full"
    assert read["CFG cutoff"] == "0.6"
    assert read["Lora"] == "https://host:8080/a, b.safetensors: 0.8"
    # A1111 drops colons and commas from a LoRA's name so its own split of the field holds.
    assert read["Lora hashes"] == "https//host8080/a b.safetensors: 0123456789ab"
    assert {"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Clip skip"} <= read.keys()


@pytest.mark.parametrize("clip_skip", [0, 1, 3])
def test_clip_skip_is_written_in_a1111s_count_and_reads_back(clip_skip: int) -> None:
    text = params(clip_skip=clip_skip).to_a1111()
    assert a1111_reading(text)["Clip skip"] == str(clip_skip + 2)  # A1111: 2 = SDXL's penultimate layer
    request = apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)
    assert request.clip_skip == clip_skip


@pytest.mark.parametrize("a1111, ours", [("1", 0), ("2", 0), ("3", 1), ("5", 3)])
def test_a1111_clip_skip_reads_as_layers_beyond_the_penultimate(a1111: str, ours: int) -> None:
    text = f"a cat\nSteps: 2, Sampler: Euler a, Clip skip: {a1111}"
    assert apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY).clip_skip == ours


# A1111's sampler and "Schedule type" for each scheduler ("Automatic": the sampler's own default,
# which is Karras for DPM++ 2M and Exponential for DPM++ 2M SDE, so the plain ones say Uniform).
A1111_NAMES = {
    "Euler a": ("Euler a", "Automatic"),
    "Euler": ("Euler", "Automatic"),
    "DPM++ 2M": ("DPM++ 2M", "Uniform"),
    "DPM++ 2M Karras": ("DPM++ 2M", "Karras"),
    "DPM++ 2M SDE": ("DPM++ 2M SDE", "Uniform"),
    "DPM++ 2M SDE Karras": ("DPM++ 2M SDE", "Karras"),
    "DDIM": ("DDIM", "Automatic"),
    "UniPC": ("UniPC", "Automatic"),
}


def test_every_scheduler_has_its_a1111_names() -> None:
    assert set(A1111_NAMES) == set(SCHEDULERS)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_each_scheduler_is_written_with_a1111s_names_and_reads_back(scheduler: str) -> None:
    text = params(sampler=scheduler).to_a1111()
    read = a1111_reading(text)
    assert (read["Sampler"], read.get("Schedule type", "Automatic")) == A1111_NAMES[scheduler]
    assert apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY).scheduler == scheduler


@pytest.mark.parametrize(
    "sampler, schedule, ours",
    [
        ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
        ("DPM++ 2M Karras", None, "DPM++ 2M Karras"),  # the pre-1.9 combined name
        ("DPM++ 2M", None, "DPM++ 2M Karras"),  # A1111 1.9+: Automatic is Karras for DPM++ 2M
        ("DPM++ 2M", "Uniform", "DPM++ 2M"),
        ("DPM++ 2M SDE", "Karras", "DPM++ 2M SDE Karras"),
        ("Euler a", "Automatic", "Euler a"),
        ("euler_ancestral", "normal", "Euler a"),
        ("UniPC", None, "UniPC"),
        ("Euler a", "Karras", None),
        ("DPM++ 2M SDE", None, None),  # Exponential: not offered here
        ("DPM++ SDE", "Karras", None),
    ],
)
def test_a1111_sampler_names(sampler: str, schedule: str | None, ours: str | None) -> None:
    assert from_a1111(sampler, schedule) == ours


def test_lora_hash_is_a1111s_and_civitais_autov3(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    data = len(header).to_bytes(8, "little") + header + bytes(range(8))
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    assert lora_hash(path, "test:x") == hashlib.sha256(bytes(range(8))).hexdigest()[:12]
    assert lora_hash(path, "test:x") == civitai_hashes(data)["AutoV3"].lower()


def test_embeddings_are_written_with_a1111s_ti_hash(tmp_path: Path) -> None:
    path = tmp_path / "negativeXL_D.safetensors"
    path.write_bytes(b"embedding bytes")
    digest = embedding_hash(path, "test:emb")
    assert digest == hashlib.sha256(b"embedding bytes").hexdigest()[:12]
    assert digest[:10] == civitai_hashes(b"embedding bytes")["AutoV2"].lower()
    text = params(embeddings=(("negativeXL_D", "a", digest), ("easy,neg", "b", digest))).to_a1111()
    assert a1111_reading(text)["TI hashes"] == f"negativeXL_D: {digest}, easyneg: {digest}"


def test_model_hash_is_the_baked_checkpoints_autov2(tmp_path: Path) -> None:
    assert checkpoint_hash(tmp_path) is None  # no bake record (the tiny weights)
    digest = hashlib.sha256(b"checkpoint").hexdigest()
    (tmp_path / ".baked").write_text(json.dumps({"files": {"checkpoint.safetensors": digest}}))
    assert checkpoint_hash(tmp_path) == digest[:10]
    text = params(model_hash=digest[:10]).to_a1111()
    assert a1111_reading(text)["Model hash"] == digest[:10]
    (tmp_path / ".baked").write_text(json.dumps({"files": {"unet/diffusion_pytorch_model.safetensors": digest}}))
    assert checkpoint_hash(tmp_path) is None  # baked from diffusers folders: no one file to name


# -- reading generation data --------------------------------------------------------------------


def test_civitai_infotext_is_read_whole() -> None:
    info = parse_infotext(CIVITAI_TEXT.format(ink="aaaaaaaaaaaa", hat="bbbbbbbbbbbb"))
    assert info.prompt == "masterpiece, 1girl,  ink wash, "  # tags removed as A1111 removes them
    assert info.negative_prompt == "lowres, (worst quality:1.2),\nblurry"
    assert [(t.name, t.weight) for t in info.loras] == [("inkStyle", 0.8), ("hatDetail_v2", 0.5)]
    assert info.fields["Lora hashes"] == "inkStyle: aaaaaaaaaaaa, hatDetail_v2: bbbbbbbbbbbb"
    assert info.fields["Size"] == "96x128" and info.fields["Version"] == "v1.10.1"


def test_json_values_are_read_whole() -> None:
    text = (
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, "
        'Hashes: {"model": "0123456789", "lora:x": "abcdef0123"}, '
        'Civitai resources: [{"type":"lora","weight":0.7,"modelVersionId":1001}, {"type":"checkpoint"}], '
        "Civitai metadata: {}"
    )
    fields = parse_infotext(text).fields
    assert fields["Hashes"] == {"model": "0123456789", "lora:x": "abcdef0123"}
    assert fields["Civitai resources"][0]["modelVersionId"] == 1001
    assert fields["Civitai metadata"] == {}


def test_the_text_fills_defaults_and_lists_what_it_did_not_use(caplog: pytest.LogCaptureFixture) -> None:
    text = CIVITAI_TEXT.format(ink="aaaaaaaaaaaa", hat="bbbbbbbbbbbb")
    with caplog.at_level(logging.INFO, logger="engine.infotext"):
        request = apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)
    assert request.prompt == "masterpiece, 1girl,  ink wash, "
    assert request.negative_prompt == "lowres, (worst quality:1.2),\nblurry"
    assert (request.num_inference_steps, request.scheduler, request.cfg_scale, request.seed) == (
        2,
        "DPM++ 2M Karras",
        5.5,
        991,
    )
    # Size is the image's pixels: at the tiny model's 128 px, 96x128 is 768x1024 at SDXL's scale.
    assert (request.aspect_ratio, request.width, request.height) == ("custom", 768, 1024)
    assert request.clip_skip == 0 and request.go_fast is False and request.model == "illustrious-xl"
    assert request.loras == (
        LoraSpec("civitai.com/api/v1/model-versions/by-hash/aaaaaaaaaaaa#inkStyle", 0.8),
        LoraSpec("civitai.com/api/v1/model-versions/by-hash/bbbbbbbbbbbb#hatDetail_v2", 0.5),
    )
    [line] = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    for key in ("Model hash", "Model", "ADetailer model", "Hires upscale", "Version"):
        assert key in line
    for key in ("Steps", "Seed", "Lora hashes", "Clip skip", "Schedule type"):
        assert f"; {key};" not in f"; {line.split(': ', 2)[-1]};"


def test_inputs_sent_with_other_values_win() -> None:
    text = CIVITAI_TEXT.format(ink="aaaaaaaaaaaa", hat="bbbbbbbbbbbb")
    sent = GenerationRequest(prompt="my own prompt", seed=5, num_inference_steps=3, go_fast=False)
    request = apply_generation_data(sent, text, ALL_DEFAULT - {"seed", "num_inference_steps", "go_fast"}, TINY)
    assert (request.prompt, request.seed, request.num_inference_steps) == ("my own prompt", 5, 3)
    assert request.negative_prompt.startswith("lowres") and request.cfg_scale == 5.5


def test_go_fast_stays_on_only_with_this_projects_go_fast_fields() -> None:
    ours = params(cfg_cutoff=0.6, deep_cache="from 0.3, every 3 steps full").to_a1111()
    assert apply_generation_data(GenerationRequest(prompt=""), ours, ALL_DEFAULT, TINY).go_fast is True
    plain = params().to_a1111()
    assert apply_generation_data(GenerationRequest(prompt=""), plain, ALL_DEFAULT, TINY).go_fast is False


def test_denoising_strength_needs_an_image_and_upscale_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    text = params(denoising_strength=0.35, upscale_by=2, upscaler="Swin2SR realworld x4").to_a1111()
    image = Image.new("RGB", (64, 64), "gray")
    with_image = apply_generation_data(GenerationRequest(prompt="", image=image), text, ALL_DEFAULT, TINY)
    assert (with_image.prompt_strength, with_image.upscale) == (0.35, "2x")
    with caplog.at_level(logging.INFO, logger="engine.infotext"):
        without = apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)
    assert without.prompt_strength == GenerationRequest(prompt="").prompt_strength
    assert "Denoising strength (no image was sent)" in caplog.text


def test_a_model_is_chosen_by_its_id_or_its_checkpoint_hash() -> None:
    by_id = apply_generation_data(GenerationRequest(prompt=""), params(model="sdxl").to_a1111(), ALL_DEFAULT, TINY)
    assert by_id.model == "sdxl"
    text = "a cat\nSteps: 2, Sampler: Euler a, Model hash: 31E35C80FC, Model: sd_xl_base_1.0"
    assert apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY).model == "sdxl"
    forge = 'a cat\nSteps: 2, Sampler: Euler a, Model: x, Hashes: {"model": "31e35c80fc"}'
    assert apply_generation_data(GenerationRequest(prompt=""), forge, ALL_DEFAULT, TINY).model == "sdxl"
    other = "a cat\nSteps: 2, Sampler: Euler a, Model hash: 0123456789, Model: another"
    assert apply_generation_data(GenerationRequest(prompt=""), other, ALL_DEFAULT, TINY).model == "illustrious-xl"
    baked = {**TINY, "illustrious-xl": SimpleNamespace(native_resolution=128, model_hash="abcdef0123")}
    own = "a cat\nSteps: 2, Sampler: Euler a, Model hash: ABCDEF0123, Model: renamed"
    assert apply_generation_data(GenerationRequest(model="sdxl", prompt=""), own, ALL_DEFAULT, baked).model == (
        "illustrious-xl"
    ), "a model baked from one checkpoint file answers to that file's hash"


@pytest.mark.parametrize(
    ("fields", "start", "model"),
    [
        ("Model: sd_xl_base_1.0", "illustrious-xl", "sdxl"),  # ComfyUI's ckpt_name, or A1111 without hashes
        ("Model: SD_XL_BASE_1.0_0.9vae", "illustrious-xl", "sdxl"),
        ("Model hash: e6bb9ea85b, Model: anything", "illustrious-xl", "sdxl"),
        ("Model: Illustrious-XL-v0.1", "sdxl", "illustrious-xl"),
        # A renamed file keeps its hash: a name alone does not outrank it.
        ("Model hash: 0123456789, Model: sd_xl_base_1.0", "illustrious-xl", "illustrious-xl"),
    ],
)
def test_public_checkpoints_pick_the_baked_model_with_their_weights(fields: str, start: str, model: str) -> None:
    """SDXL base is baked from diffusers folders, which carry no file hash: its public single file's
    name and A1111 hash still pick it (another model would draw another image). `start` is the
    model input, at its default as far as the text can tell."""
    text = f"a cat\nSteps: 2, Sampler: Euler a, {fields}"
    request = apply_generation_data(GenerationRequest(model=start, prompt=""), text, ALL_DEFAULT, TINY)
    assert request.model == model


def test_civitai_resources_give_exact_versions() -> None:
    text = (
        "a cat <lora:x:0.3>\nSteps: 2, Sampler: Euler a, Seed: 1, "
        'Civitai resources: [{"type":"checkpoint","modelVersionId":1}, '
        '{"type":"lora","weight":0.7,"modelVersionId":1001}]'
    )
    request = apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)
    assert request.loras == (LoraSpec("civitai.com/api/download/models/1001", 0.7),)
    assert request.prompt == "a cat "


def test_a_tags_hash_is_found_as_a1111_and_forge_name_it() -> None:
    text = (
        "a cat <lora:Ink, Style:0.8> <lora:hat:1>\nSteps: 2, Sampler: Euler a, "
        'Lora hashes: "ink style: 0123456789ab", Hashes: {"lora:HAT": "abcdef0123", "lora:ink style": "ffffffffff"}'
    )
    request = apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)
    assert [spec.source.split("/")[-1] for spec in request.loras] == ["0123456789ab#Ink%2C%20Style", "abcdef0123#hat"]


def test_an_unresolvable_tag_is_refused_by_name() -> None:
    text = 'a cat <lora:mystery:0.6>\nSteps: 2, Sampler: Euler a, Lora hashes: "other: 0123456789ab"'
    with pytest.raises(InputError, match=r"<lora:mystery:0.6>.*'Lora hashes' entry for 'mystery'"):
        apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)


def test_loras_sent_stand_for_tags_without_a_hash(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """A tag the text cannot resolve gives way to the LoRAs the request sends (an image's text,
    a ComfyUI graph above all, cannot be edited); a tag with a hash is still applied beside them."""
    sent = (LoraSpec("acme/ink/ink.safetensors", 0.7),)
    text = 'a cat <lora:mystery:0.6> <lora:hat:1>\nSteps: 2, Sampler: Euler a, Lora hashes: "hat: 0123456789ab"'
    with caplog.at_level(logging.INFO, logger="engine.infotext"):
        request = apply_generation_data(GenerationRequest(prompt="", loras=sent), text, ALL_DEFAULT, TINY)
    assert [spec.source.split("/")[-1] for spec in request.loras] == ["0123456789ab#hat", "ink.safetensors"]
    assert "tag <lora:mystery:0.6> (no hash; the LoRAs sent stand for it)" in caplog.text
    graph = comfy_graph(advanced=True, clip_layer=-2, loras=(("inkStyle", 0.8),))
    read = read_generation_data(saved(tmp_path, comfyui_png(graph)), "generation_data_image")
    assert apply_generation_data(GenerationRequest(prompt="", loras=sent), read, ALL_DEFAULT, TINY).loras == sent


def test_a_lora_sent_as_data_uri_is_asked_for_again() -> None:
    text = params(loras=(("data: URI", 0.5, "0123456789ab"),)).to_a1111()
    with pytest.raises(InputError, match=r"sent as a data: URI.*send it again as lora_weights"):
        apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)


def test_embeddings_come_from_ti_hashes_forge_hashes_or_civitai_resources() -> None:
    digest = "fff5d51ab655"  # A1111's TI hash: the file's sha256 from its start, 12 digits
    text = (
        "a cat\nNegative prompt: negativeXL_D, bad hands\n"
        f'Steps: 2, Sampler: Euler a, TI hashes: "negativeXL_D: {digest}", '
        'Hashes: {"embed:badhands": "0123456789", "model": "x"}'
    )
    request = apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)
    assert request.embeddings == (
        "civitai.com/api/v1/model-versions/by-hash/0123456789#badhands",
        "civitai.com/api/v1/model-versions/by-hash/fff5d51ab6#negativeXL_D",  # its AutoV2
    )
    resources = 'a cat\nSteps: 2, Sampler: Euler a, Civitai resources: [{"type":"embed","modelVersionId":7001}]'
    request = apply_generation_data(GenerationRequest(prompt="", embeddings=("mine",)), resources, ALL_DEFAULT, TINY)
    assert request.embeddings == ("civitai.com/api/download/models/7001", "mine")


def test_this_projects_embeddings_field_reads_back_and_a_data_uri_is_asked_for_again() -> None:
    used = (("neg", "civitai.com/api/download/models/7001", "0123456789ab"), ("x", "https://h/x, y.safetensors", None))
    text = params(embeddings=used).to_a1111()
    assert a1111_reading(text)["TI hashes"] == "neg: 0123456789ab"
    request = apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)
    assert request.embeddings == ("civitai.com/api/download/models/7001", "https://h/x, y.safetensors")
    text = params(embeddings=(("n", "data: URI", "0123456789ab"),)).to_a1111()
    with pytest.raises(InputError, match="embedding that was sent as a data: URI"):
        apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)


def test_at_most_four_loras_from_one_text() -> None:
    tags = " ".join(f"<lora:l{i}:1>" for i in range(5))
    hashes = ", ".join(f"l{i}: {i:012x}" for i in range(5))
    text = f'a cat {tags}\nSteps: 2, Sampler: Euler a, Lora hashes: "{hashes}"'
    with pytest.raises(InputError, match="names 5 LoRAs; at most 4"):
        apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)


@pytest.mark.parametrize(
    "text, message",
    [
        ("a cat\nSteps: 200, Sampler: Euler a, Seed: 1", "200 steps"),
        ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 30", "CFG scale 30"),
        ("a cat\nSteps: 20, Sampler: Euler a, Size: 1024", "Size: 1024"),
        ("a cat\nSteps: twenty, Sampler: Euler a, Seed: 1", "Steps: twenty"),
        ("\n\n", "neither a prompt"),
    ],
)
def test_bad_values_are_refused_with_what_to_do(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)


# -- generation_data_image: the text read from the image itself ---------------------------------

A1111_TEXT = (
    "a lighthouse at dusk, (film grain:1.2), 桜\n"
    "Negative prompt: lowres, blurry\n"
    "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 991, Size: 96x128, "
    "Model hash: 0123456789, Model: waiIllustriousSDXL_v140, Clip skip: 2, Version: v1.10.1"
)
# What piexif.helper.UserComment.dump(text, encoding=...) returns (A1111 passes "unicode"), and
# the little-endian UTF-16 some other tools write after the same code.
COMMENTS = {
    "unicode": lambda text: b"UNICODE\x00" + text.encode("utf-16-be"),
    "unicode-le": lambda text: b"UNICODE\x00" + text.encode("utf-16-le"),
    "ascii": lambda text: b"ASCII\x00\x00\x00" + text.encode("ascii"),
}


def piexif_dump(user_comment: bytes) -> bytes:
    """piexif.dump({"Exif": {UserComment: ...}}), as A1111 writes it into a JPEG or WebP: big-endian
    TIFF, IFD0 holding only the Exif IFD's pointer, the Exif IFD only the UserComment (UNDEFINED)."""
    ifd_size = 2 + 12 + 4
    exif_ifd = 8 + ifd_size
    ifd0 = struct.pack(">HHHII", 1, 0x8769, 4, 1, exif_ifd) + b"\0\0\0\0"
    ifd = struct.pack(">HHHII", 1, 0x9286, 7, len(user_comment), exif_ifd + ifd_size) + b"\0\0\0\0"
    return b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 8) + ifd0 + ifd + user_comment


def a1111_image(fmt: str, text: str | None = None, comment: str = "unicode", **png_chunks: str) -> bytes:
    """An image file as A1111 saves one (modules/images.py `save_image_with_geninfo`): PNG with a
    `parameters` text chunk (PngInfo), JPEG and WebP with the EXIF UserComment."""
    buf = io.BytesIO()
    image = Image.new("RGB", (64, 48), (200, 90, 30))
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in ({"parameters": text} if text is not None else {}).items() | png_chunks.items():
            info.add_text(key, value)
        image.save(buf, "PNG", pnginfo=info)
    elif text is None:
        image.save(buf, fmt)
    else:
        image.save(buf, fmt, exif=piexif_dump(COMMENTS[comment](text)))
    return buf.getvalue()


def saved(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "upload"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "fmt, comment",
    [("PNG", ""), ("JPEG", "unicode"), ("WEBP", "unicode"), ("JPEG", "unicode-le"), ("WEBP", "ascii")],
)
def test_an_a1111_image_sets_what_its_pasted_text_sets(tmp_path: Path, fmt: str, comment: str) -> None:
    text = A1111_TEXT.replace(", 桜", "") if comment == "ascii" else A1111_TEXT
    path = saved(tmp_path, a1111_image(fmt, text, comment))
    read = read_generation_data(path, "generation_data_image")
    assert read == text
    request = GenerationRequest(prompt="")
    from_image = apply_generation_data(request, one_generation_data(None, read), ALL_DEFAULT, TINY)
    assert from_image == apply_generation_data(request, text, ALL_DEFAULT, TINY)
    assert (
        from_image.seed == 991
        and from_image.scheduler == "DPM++ 2M Karras"
        and from_image.prompt == text.split("\n")[0]
    )


def test_a_comfyui_png_counts_only_with_a1111_parameters(tmp_path: Path) -> None:
    """Its A1111 text wins over its graph; a workflow without the `prompt` graph is refused."""
    both = saved(tmp_path, comfyui_png(comfy_graph(), parameters=A1111_TEXT))
    assert read_generation_data(both, "generation_data_image") == A1111_TEXT
    workflow_only = saved(tmp_path, a1111_image("PNG", workflow=json.dumps({"nodes": []})))
    with pytest.raises(InputError, match="carries a ComfyUI workflow but neither its 'prompt' graph nor an A1111"):
        read_generation_data(workflow_only, "generation_data_image")


# -- ComfyUI's graph: the API-format `prompt` chunk ComfyUI's SaveImage writes --------------------

COMFY_PROMPT = "a lighthouse at dusk, (film grain:1.2), 桜"
COMFY_NEGATIVE = "lowres, blurry"


def comfy_graph(
    advanced: bool = False, clip_layer: int | None = None, loras: tuple[tuple[str, float], ...] = ()
) -> dict[str, dict]:
    """An API-format graph as ComfyUI's default txt2img workflow makes it (node ids and input names
    as ComfyUI's nodes.py declares them); optionally LoraLoaders after the checkpoint, a
    CLIPSetLastLayer before the text encoders and a KSamplerAdvanced for the KSampler."""
    graph: dict[str, dict] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "SDXL/sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 128, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }
    model, clip = ["4", 0], ["4", 1]
    for index, (name, strength) in enumerate(loras):
        key = str(10 + index)
        graph[key] = {
            "class_type": "LoraLoader",
            "inputs": {
                "lora_name": f"styles/{name}.safetensors",
                "strength_model": strength,
                "strength_clip": strength,
                "model": model,
                "clip": clip,
            },
        }
        model, clip = [key, 0], [key, 1]
    if clip_layer is not None:
        graph["20"] = {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": clip_layer, "clip": clip}}
        clip = ["20", 0]
    graph["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": COMFY_PROMPT, "clip": clip}}
    graph["7"] = {"class_type": "CLIPTextEncode", "inputs": {"text": COMFY_NEGATIVE, "clip": clip}}
    links = {"model": model, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}
    settings = {"steps": 2, "cfg": 5.5, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
    if advanced:
        extra = {"add_noise": "enable", "noise_seed": 991, "start_at_step": 0, "end_at_step": 10000}
        inputs = {**extra, **settings, "return_with_leftover_noise": "disable", **links}
        graph["3"] = {"class_type": "KSamplerAdvanced", "inputs": inputs}
    else:
        graph["3"] = {"class_type": "KSampler", "inputs": {"seed": 991, **settings, "denoise": 1.0, **links}}
    return graph


def comfyui_png(graph: dict | str, **chunks: str) -> bytes:
    """A PNG as ComfyUI's SaveImage writes it: the graph as JSON in a `prompt` text chunk, the UI
    workflow (extra_pnginfo) in a `workflow` one (PngInfo.add_text)."""
    prompt = graph if isinstance(graph, str) else json.dumps(graph)
    return a1111_image("PNG", prompt=prompt, workflow=json.dumps({"nodes": [], "links": []}), **chunks)


# The A1111 text of the same settings: DPM++ 2M with the Karras schedule is ComfyUI's dpmpp_2m + karras.
COMFY_EQUIVALENT = (
    f"{COMFY_PROMPT}\nNegative prompt: {COMFY_NEGATIVE}\n"
    "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 991, Size: 96x128, "
    "Model: sd_xl_base_1.0"
)


@pytest.mark.parametrize(
    "advanced, clip_layer, clip_skip",
    [(False, None, ""), (True, -3, ", Clip skip: 3"), (False, -2, ", Clip skip: 2"), (True, -1, ", Clip skip: 1")],
)
def test_a_comfyui_graph_sets_what_the_same_a1111_text_sets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, advanced: bool, clip_layer: int | None, clip_skip: str
) -> None:
    path = saved(tmp_path, comfyui_png(comfy_graph(advanced, clip_layer)))
    with caplog.at_level(logging.INFO):
        read = read_generation_data(path, "generation_data_image")
    request = GenerationRequest(prompt="")
    from_image = apply_generation_data(request, one_generation_data(None, read), ALL_DEFAULT, TINY)
    assert from_image == apply_generation_data(request, COMFY_EQUIVALENT + clip_skip, ALL_DEFAULT, TINY)
    assert (from_image.prompt, from_image.negative_prompt) == (COMFY_PROMPT, COMFY_NEGATIVE)
    assert (from_image.num_inference_steps, from_image.cfg_scale, from_image.seed) == (2, 5.5, 991)
    assert (from_image.scheduler, from_image.width, from_image.height) == ("DPM++ 2M Karras", 768, 1024)
    assert from_image.clip_skip == (1 if clip_layer == -3 else 0)
    assert from_image.model == "sdxl", "the graph's checkpoint, sd_xl_base_1.0, is the baked SDXL base"
    sampler = "node 3 (KSamplerAdvanced)" if advanced else "node 3 (KSampler)"
    assert f"ComfyUI graph read from {sampler}, node 5 (EmptyLatentImage), " in caplog.text
    assert a1111_reading(read)["Model"] == "sd_xl_base_1.0", "the checkpoint's name, as A1111 writes it"
    assert ("stop_at_clip_layer -1" in caplog.text) is (clip_layer == -1), "ComfyUI's last layer is not run here"


def test_a_comfyui_graphs_loras_are_tags_treated_as_pasted_tags_are(tmp_path: Path) -> None:
    """LoraLoaders become <lora:> tags (checkpoint side first, strength_model): ComfyUI names no
    hash, so each is refused as the same tag in pasted text is, naming the LoRA."""
    loras = (("inkStyle", 0.8), ("hatDetail_v2", 0.5))
    path = saved(tmp_path, comfyui_png(comfy_graph(advanced=True, clip_layer=-2, loras=loras)))
    read = read_generation_data(path, "generation_data_image")
    info = parse_infotext(read)
    assert [(tag.name, tag.weight) for tag in info.loras] == list(loras)
    pasted = COMFY_EQUIVALENT.replace(COMFY_PROMPT, COMFY_PROMPT + ", <lora:inkStyle:0.8><lora:hatDetail_v2:0.5>")
    assert parse_infotext(pasted).prompt == info.prompt
    messages = []
    for text in (read, pasted + ", Clip skip: 2"):
        with pytest.raises(InputError) as caught:
            apply_generation_data(GenerationRequest(prompt=""), text, ALL_DEFAULT, TINY)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "<lora:inkStyle:0.8> names a LoRA without a hash" in messages[0]
    # With their hashes (CivitAI's generator writes them), the same tags resolve as pasted ones do.
    hashes = ', Lora hashes: "inkStyle: 0123456789ab, hatDetail_v2: ba9876543210"'
    from_image = apply_generation_data(GenerationRequest(prompt=""), read + hashes, ALL_DEFAULT, TINY)
    assert from_image == apply_generation_data(GenerationRequest(prompt=""), pasted + hashes, ALL_DEFAULT, TINY)
    assert [lora.scale for lora in from_image.loras] == [0.8, 0.5]


def test_a_comfyui_text_from_a_plain_string_node_is_followed_one_hop(tmp_path: Path) -> None:
    graph = comfy_graph()
    graph["30"] = {"class_type": "PrimitiveString", "inputs": {"value": "a red boat"}}
    graph["6"]["inputs"]["text"] = ["30", 0]
    text = read_generation_data(saved(tmp_path, comfyui_png(graph)), "generation_data_image")
    assert parse_infotext(text).prompt == "a red boat"


def test_a_comfyui_img2img_graph_gives_denoising_strength(tmp_path: Path) -> None:
    graph = comfy_graph()
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    graph["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"]["denoise"] = 0.6
    text = read_generation_data(saved(tmp_path, comfyui_png(graph)), "generation_data_image")
    assert a1111_reading(text)["Denoising strength"] == "0.6" and "Size" not in a1111_reading(text)
    request = GenerationRequest(prompt="", image=Image.new("RGB", (64, 64)))
    assert apply_generation_data(request, text, ALL_DEFAULT, TINY).prompt_strength == 0.6


def _two_samplers(graph: dict) -> None:
    graph["13"] = {"class_type": "KSampler", "inputs": {**graph["3"]["inputs"], "latent_image": ["3", 0]}}


def _custom_sampler(graph: dict) -> None:
    graph["3"]["class_type"] = "KSampler (Efficient)"


def _linked_text(graph: dict) -> None:
    graph["30"] = {"class_type": "StringConcatenate", "inputs": {"string_a": "a", "string_b": "b", "delimiter": ""}}
    graph["6"]["inputs"]["text"] = ["30", 0]


def _no_sampler(graph: dict) -> None:
    del graph["3"]


def _part_of_the_steps(graph: dict) -> None:
    graph["3"]["inputs"]["end_at_step"] = 1


@pytest.mark.parametrize(
    "change, advanced, message",
    [
        (_two_samplers, False, r"samples more than once \(node 3 \(KSampler\), node 13 \(KSampler\): a hires-fix"),
        (_custom_sampler, False, r"samples with node 3 \(KSampler \(Efficient\)\), a sampler node other than"),
        (_linked_text, False, r"'text' of node 6 \(CLIPTextEncode\) comes from node 30 \(StringConcatenate\)"),
        (_no_sampler, False, "has no KSampler node"),
        (_part_of_the_steps, True, r"node 3 \(KSamplerAdvanced\) .* runs part of a sampling .*steps 0 to 1 of 2"),
        (None, False, r"ComfyUI graph \(its 'prompt' text\) is not readable JSON"),
    ],
)
def test_a_comfyui_graph_one_text_cannot_hold_is_refused_by_node(
    tmp_path: Path, change: object, advanced: bool, message: str
) -> None:
    graph: dict | str = comfy_graph(advanced)
    if change is None:
        graph = json.dumps(graph)[:-40]  # cut short
    else:
        change(graph)
    with pytest.raises(InputError, match=message) as caught:
        read_generation_data(saved(tmp_path, comfyui_png(graph)), "generation_data_image")
    assert "write the image's settings as generation_data text instead" in str(caught.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_an_image_without_generation_data_is_refused_saying_what_was_looked_for(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(InputError) as caught:
        read_generation_data(saved(tmp_path, a1111_image(fmt)), "generation_data_image")
    assert str(caught.value) == (
        "generation_data_image carries no generation data: no PNG 'parameters' text, no EXIF UserComment; "
        "paste the text as generation_data instead"
    )
    assert str(tmp_path) not in str(caught.value)


def test_the_image_is_read_under_the_input_image_limits(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")  # 400 megapixels: refused from its header
    with pytest.raises(InputError, match=r"generation_data_image is .*too large"):
        read_generation_data(saved(tmp_path, buf.getvalue()), "generation_data_image")
    with pytest.raises(InputError, match="generation_data_image could not be read as an image"):
        read_generation_data(saved(tmp_path, b"Steps: 2, Sampler: Euler a"), "generation_data_image")


def test_both_generation_data_inputs_must_hold_the_same_text() -> None:
    assert one_generation_data("a cat\nSteps: 2", None) == "a cat\nSteps: 2"
    assert one_generation_data(None, A1111_TEXT) == A1111_TEXT
    assert one_generation_data(A1111_TEXT.replace("\n", "\r\n") + "\n", A1111_TEXT) == A1111_TEXT
    with pytest.raises(InputError, match="generation_data and generation_data_image were both sent and hold different"):
        one_generation_data("a cat\nSteps: 2, Seed: 1", A1111_TEXT)


# -- through the real Cog server, CivitAI emulated ----------------------------------------------


@pytest.fixture(scope="module")
def civitai_server(
    weights_dir: Path, lora_files: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[CogServer, object]]:
    civ = civitai(
        {
            100: [CivitaiVersion(1001, "Illustrious", lora_files["b"])],
            500: [CivitaiVersion(5001, "SDXL 1.0", lora_files["a"])],
            700: [CivitaiVersion(7001, "SDXL 1.0", sdxl_embedding(weights_dir, seed=77))],
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIVITAI_ENDPOINT", civ.url)
        mp.setenv("LORA_CACHE_DIR", str(tmp_path_factory.mktemp("infotext-lora-cache")))
        server = CogServer(weights_dir, tmp_path_factory.mktemp("infotext-server") / "server.log")
    try:
        with server:
            yield server, civ
    finally:
        civ.close()


def run(server: CogServer, **inputs: object) -> tuple[bytes, dict]:
    status, body = server.predict({"output_format": "png", **inputs})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    _, data = decode_data_uri(body["output"][0])
    return data, body


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def test_civitai_infotext_with_lora_tags_runs_through_civitais_api(
    civitai_server: tuple[CogServer, object], lora_files: dict[str, bytes]
) -> None:
    server, civ = civitai_server
    ink = civitai_hashes(lora_files["b"])["AutoV3"]
    hat = civitai_hashes(lora_files["a"])["AutoV2"]  # a Forge-style hash works as well
    text = CIVITAI_TEXT.format(ink=ink, hat=hat)
    data, body = run(server, prompt="", generation_data=text)
    assert civ.hits[f"GET /api/v1/model-versions/by-hash/{ink.lower()}"] == 1
    assert civ.hits[f"GET /api/v1/model-versions/by-hash/{hat.lower()}"] == 1
    assert "generation_data: not used:" in body["logs"] and "ADetailer model" in body["logs"]
    # The same image as the same settings sent input by input, the LoRAs named by their versions.
    explicit, _ = run(
        server,
        prompt="masterpiece, 1girl,  ink wash, ",
        negative_prompt="lowres, (worst quality:1.2),\nblurry",
        num_inference_steps=2,
        scheduler="DPM++ 2M Karras",
        cfg_scale=5.5,
        seed=991,
        aspect_ratio="custom",
        width=768,
        height=1024,
        go_fast=False,
        lora_weights="urn:air:sdxl:lora:civitai:100@1001",
        lora_scale=0.8,
        extra_lora="urn:air:sdxl:lora:civitai:500@5001",
        extra_lora_scale=0.5,
    )
    assert np.array_equal(pixels(data), pixels(explicit))
    without_tags, _ = run(server, prompt="", generation_data=re.sub(r"<lora:[^>]+>", "", text))
    assert changed_share(pixels(data), pixels(without_tags)) > 0.9, "the tags' LoRAs changed the image"
    # The output's own metadata links both files for CivitAI by A1111's hash.
    written = a1111_reading(read_parameters(io.BytesIO(data)))
    for digest in (civitai_hashes(lora_files["b"])["AutoV3"], civitai_hashes(lora_files["a"])["AutoV3"]):
        assert digest.lower() in written["Lora hashes"]
    assert written["Clip skip"] == "2" and written["Sampler"] == "DPM++ 2M" and written["Schedule type"] == "Karras"
    assert written["Lora hashes"].startswith("inkStyle: "), "named by its tag, as A1111 names it"


def test_an_unknown_hash_fails_naming_its_tag(civitai_server: tuple[CogServer, object]) -> None:
    server, _ = civitai_server
    text = 'a cat <lora:gone:1>\nSteps: 2, Sampler: Euler a, Seed: 1, Lora hashes: "gone: 0badc0ffee00"'
    _, body = server.predict({"prompt": "", "generation_data": text})
    assert body["status"] == "failed"
    assert "CivitAI has no file with hash 0badc0ffee00 (the LoRA <lora:gone>)" in body["error"]


# Settings an output of this model is made with, to be reproduced from what it writes.
OWN_SETTINGS = {
    "num_inference_steps": 3,
    "scheduler": "DPM++ 2M Karras",
    "cfg_scale": 5.5,
    "seed": 4242,
    "megapixels": "0.25",
    "clip_skip": 1,
}


@pytest.mark.parametrize("go_fast", [True, False])
def test_an_outputs_own_metadata_reproduces_it_byte_for_byte(
    civitai_server: tuple[CogServer, object], go_fast: bool
) -> None:
    server, civ = civitai_server
    first, _ = run(
        server,
        prompt="a lighthouse, (dusk:1.2), film grain",
        negative_prompt="blurry, text: watermark, embedding:lora-7001",
        **OWN_SETTINGS,
        go_fast=go_fast,
        lora_weights=civ.url + "/models/100?modelVersionId=1001",
        lora_scale=0.7,
        embeddings=["urn:air:sdxl:embedding:civitai:700@7001"],
    )
    text = read_parameters(io.BytesIO(first))
    assert "TI hashes" in text
    assert ("Deep cache" in text) is go_fast
    hits = civ.total()
    again, body = run(server, prompt="", generation_data=text)
    assert again == first
    assert civ.total() == hits, "the LoRA came from the cache: no request"
    assert "not used" not in body["logs"]


def test_a_ti_hash_calls_the_embedding_by_the_texts_name(
    civitai_server: tuple[CogServer, object], weights_dir: Path
) -> None:
    server, civ = civitai_server
    data = sdxl_embedding(weights_dir, seed=77)  # the file the emulated CivitAI serves as version 7001
    digest = hashlib.sha256(data).hexdigest()[:12]  # A1111's TI hash
    text = (
        f'a cat\nNegative prompt: lowres, negWord\nSteps: 2, Sampler: Euler a, Seed: 5, TI hashes: "negWord: {digest}"'
    )
    with_ti, _ = run(server, prompt="", generation_data=text)
    assert civ.hits[f"GET /api/v1/model-versions/by-hash/{digest[:10]}"] == 1
    plain, _ = run(server, prompt="", generation_data=text.replace(f', TI hashes: "negWord: {digest}"', ""))
    assert changed_share(pixels(with_ti), pixels(plain)) > 0.9, "the embedding changed the image"
    explicit, _ = run(
        server,
        prompt="a cat",
        negative_prompt="lowres, embedding:lora-7001",
        num_inference_steps=2,
        seed=5,
        go_fast=False,
        embeddings=["urn:air:sdxl:embedding:civitai:700@7001"],
    )
    assert np.array_equal(pixels(with_ti), pixels(explicit))
    assert a1111_reading(read_parameters(io.BytesIO(with_ti)))["TI hashes"] == f"negWord: {digest}"


@pytest.mark.parametrize("output_format", ["png", "webp", "jpg"])
def test_an_output_sent_back_as_generation_data_image_reproduces_itself(
    civitai_server: tuple[CogServer, object], output_format: str
) -> None:
    server, _ = civitai_server
    settings = {**OWN_SETTINGS, "negative_prompt": "blurry", "output_format": output_format}
    first, _ = run(server, prompt="a lighthouse, (dusk:1.2), 桜", **settings)
    mime = {"jpg": "jpeg"}.get(output_format, output_format)
    uri = f"data:image/{mime};base64," + base64.b64encode(first).decode()
    again, body = run(server, prompt="", generation_data_image=uri, output_format=output_format)
    assert np.array_equal(pixels(again), pixels(first))
    assert again == first
    assert "not used" not in body["logs"]


def test_generation_data_image_refusals_through_the_server(civitai_server: tuple[CogServer, object]) -> None:
    server, _ = civitai_server
    plain = image_data_uri(Image.new("RGB", (64, 48)))
    status, body = server.predict({"prompt": "", "generation_data_image": plain})
    assert status == 200 and body["status"] == "failed" and body.get("output") is None
    assert "InputError" in body["error"] and "generation_data_image carries no generation data" in body["error"]
    a1111 = "data:image/png;base64," + base64.b64encode(a1111_image("PNG", A1111_TEXT)).decode()
    inputs = {"prompt": "", "generation_data_image": a1111, "generation_data": "a cat\nSteps: 2, Seed: 1"}
    status, body = server.predict(inputs)
    assert body["status"] == "failed" and body.get("output") is None
    assert "generation_data and generation_data_image were both sent" in body["error"]
    # The same text in both is one request; the server is ready after the refusals.
    run(server, **{**inputs, "generation_data": A1111_TEXT, "num_inference_steps": 2, "megapixels": "0.25"})


def test_a_comfyui_png_gives_the_image_of_the_same_a1111_text(civitai_server: tuple[CogServer, object]) -> None:
    server, _ = civitai_server
    uri = "data:image/png;base64," + base64.b64encode(comfyui_png(comfy_graph(True, -3))).decode()
    from_graph, body = run(server, prompt="", generation_data_image=uri)
    assert "ComfyUI graph read from node 3 (KSamplerAdvanced)" in body["logs"]
    from_text, _ = run(server, prompt="", generation_data=COMFY_EQUIVALENT + ", Clip skip: 3")
    assert np.array_equal(pixels(from_graph), pixels(from_text))
    assert from_graph == from_text
