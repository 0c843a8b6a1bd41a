"""The `embeddings` input: textual-inversion files from every host, called by name in the prompts,
in the engine and through the real Cog server, against loopback emulators."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from engine.errors import InputError
from engine.generator import Engine
from engine.request import GenerationRequest, LoraSpec
from test_folder.conftest import CogServer, changed_share, decode_data_uri
from test_folder.emulators import (
    CivitaiVersion,
    HfRepo,
    Loopback,
    civitai,
    file_host,
    hugging_face,
    point_clients_at,
    trained_tar,
)
from test_folder.test_server import FLUX_JSON
from weights import Downloader, LoraStore, WeightsError

BASE = GenerationRequest(prompt="a lighthouse at dusk", negative_prompt="blurry, negxl", num_inference_steps=2, seed=3)


def widths(weights: Path) -> tuple[int, int]:
    """The tiny model's token widths (768 and 1280 at SDXL size), read from its configs."""
    return tuple(
        json.loads((weights / "illustrious-xl" / part / "config.json").read_text())["hidden_size"]
        for part in ("text_encoder", "text_encoder_2")
    )  # type: ignore[return-value]


def sdxl_embedding(weights: Path, seed: int, count: int = 3) -> bytes:
    """An SDXL textual inversion as A1111 and kohya write it: clip_l and clip_g, one row per vector."""
    generator = torch.Generator().manual_seed(seed)
    first, second = widths(weights)
    return save(
        {
            "clip_l": torch.randn(count, first, generator=generator),
            "clip_g": torch.randn(count, second, generator=generator),
        }
    )


def misfits(weights: Path) -> dict[str, bytes]:
    """Files an SDXL model cannot use as embeddings, each named for what it is."""
    first, _ = widths(weights)
    return {
        "sd15.safetensors": save({"emb_params": torch.randn(4, 768)}),
        "clip-l-only.safetensors": save({"clip_l": torch.randn(4, 768)}),
        "narrow.safetensors": save({"clip_l": torch.randn(2, first), "clip_g": torch.randn(2, 7)}),
        "a-lora.safetensors": save({"lora_unet_x.lora_up.weight": torch.zeros(4, 2)}),
    }


@pytest.fixture(scope="module")
def embedding_files(weights_dir: Path) -> dict[str, bytes]:
    return {
        "negxl.safetensors": sdxl_embedding(weights_dir, 1),
        "other.safetensors": sdxl_embedding(weights_dir, 2),
        "long.safetensors": sdxl_embedding(weights_dir, 3, count=75),
        "too-long.safetensors": sdxl_embedding(weights_dir, 4, count=76),
        **misfits(weights_dir),
    }


@pytest.fixture
def hosts(embedding_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Loopback]]:
    hf = hugging_face({"acme/negs": HfRepo({"negxl.safetensors": embedding_files["negxl.safetensors"]})})
    civ = civitai(
        {
            600: [
                CivitaiVersion(
                    6001, "Illustrious", embedding_files["negxl.safetensors"], trained_words=("bad_hands_xl",)
                )
            ]
        }
    )
    files = file_host({f"emb/{name}": data for name, data in embedding_files.items()})
    point_clients_at(hf, civ, monkeypatch)
    yield {"hf": hf, "civitai": civ, "files": files}
    for server in (hf, civ, files):
        server.close()


@pytest.fixture
def engine(engine: Engine, tmp_path: Path) -> Engine:
    """The session's models with a fresh store of this test's own."""
    return Engine(engine.models, engine.safety, LoraStore(tmp_path / "cache", Downloader("python")), engine.swap)


def pixels(engine: Engine, req: GenerationRequest) -> np.ndarray:
    return np.asarray(engine.generate(req)[0].image, dtype=np.int16)


def url(hosts: dict[str, Loopback], name: str) -> str:
    return f"{hosts['files'].url}/emb/{name}.safetensors"


def text_state(engine: Engine) -> list[object]:
    """Everything an embedding touches: both tokenizers' sizes and both token-embedding tables."""
    pipe = engine.models["illustrious-xl"].txt2img
    return [
        *(len(t) for t in (pipe.tokenizer, pipe.tokenizer_2)),
        *(e.get_input_embeddings().weight.detach().clone() for e in (pipe.text_encoder, pipe.text_encoder_2)),
    ]


def same_state(a: list[object], b: list[object]) -> bool:
    return a[:2] == b[:2] and all(torch.equal(x, y) for x, y in zip(a[2:], b[2:], strict=True))  # type: ignore[arg-type]


def test_a_negative_embedding_changes_the_image_and_leaves_nothing_behind(
    engine: Engine, hosts: dict, caplog: pytest.LogCaptureFixture
) -> None:
    before = text_state(engine)
    baseline = pixels(engine, BASE)
    with caplog.at_level(logging.INFO):
        used = pixels(engine, replace(BASE, embeddings=(url(hosts, "negxl"),)))
    assert np.abs(used - baseline).max() > 5, "the embedding's vectors replace the word negxl"
    assert "embedding negxl (3 vectors): negative_prompt has negxl" in caplog.text
    other = pixels(engine, replace(BASE, embeddings=(url(hosts, "other"),), negative_prompt="blurry, other"))
    assert np.abs(other - used).max() > 5, "another file's vectors give another image"
    assert same_state(text_state(engine), before), "no token and no vector is left behind"
    assert np.array_equal(pixels(engine, BASE), baseline)


def test_every_way_to_call_it_is_the_same_tokens(engine: Engine, hosts: dict) -> None:
    """A1111's file name (any case), ComfyUI's embedding:NAME with or without the extension, and
    inside an A1111 weight; CivitAI's trigger word for the version that lists it."""
    source = (url(hosts, "negxl"),)
    by_name = pixels(engine, replace(BASE, embeddings=source))
    for negative in ("blurry, embedding:negxl", "blurry, embedding:negxl.safetensors", "blurry, NegXL"):
        assert np.array_equal(pixels(engine, replace(BASE, embeddings=source, negative_prompt=negative)), by_name)
    page = hosts["civitai"].url + "/models/600"
    trigger = replace(BASE, embeddings=(page,), negative_prompt="blurry, bad_hands_xl")
    assert np.array_equal(pixels(engine, trigger), by_name), "the same vectors under CivitAI's trigger word"
    weighted = replace(BASE, embeddings=source, negative_prompt="blurry, (negxl:1.3)")
    assert changed_share(pixels(engine, weighted), by_name) > 0.9, "A1111 weights apply to its vectors"


@pytest.mark.parametrize("form", ["hf", "hf-url", "civitai-version", "air", "data"])
def test_every_form_lora_weights_takes(engine: Engine, hosts: dict, embedding_files: dict, form: str) -> None:
    expected = pixels(engine, replace(BASE, embeddings=(url(hosts, "negxl"),)))
    data = base64.b64encode(embedding_files["negxl.safetensors"]).decode()
    source, name = {
        "hf": ("acme/negs/negxl.safetensors", "negxl"),
        "hf-url": ("https://huggingface.co/acme/negs/blob/main/negxl.safetensors", "negxl"),
        "civitai-version": (hosts["civitai"].url + "/models/600?modelVersionId=6001", "lora-6001"),
        "air": ("urn:air:sdxl:embedding:civitai:600@6001", "embedding:lora-6001"),
        "data": (f"data:application/octet-stream;name=negxl.safetensors;base64,{data}", "negxl"),
    }[form]
    req = replace(BASE, embeddings=(source,), negative_prompt=f"blurry, {name}")
    assert np.array_equal(pixels(engine, req), expected)


def test_a_data_uri_without_a_name_is_refused(engine: Engine, embedding_files: dict) -> None:
    data = base64.b64encode(embedding_files["negxl.safetensors"]).decode()
    with pytest.raises(InputError, match=r"without a file name to call it by.*name=NAME"):
        engine.generate(replace(BASE, embeddings=(f"data:application/octet-stream;base64,{data}",)))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("sd15", "embedding .*/emb/sd15.safetensors is an embedding for SD 1.5 .*emb_params.*clip_l and clip_g"),
        ("clip-l-only", "embedding .*/emb/clip-l-only.safetensors is an embedding for SD 1.5 .*key clip_l"),
        ("narrow", "embedding .*/emb/narrow.safetensors does not fit illustrious-xl: its vectors are 32 and 7 wide"),
        ("a-lora", "embedding .*/emb/a-lora.safetensors is a LoRA, not an embedding: pass it as lora_weights"),
    ],
)
def test_wrong_files_are_refused_by_name_before_any_token_goes_in(
    engine: Engine, hosts: dict, name: str, message: str
) -> None:
    before = text_state(engine)
    with pytest.raises(InputError, match=message):
        engine.generate(replace(BASE, embeddings=(url(hosts, name),)))
    assert same_state(text_state(engine), before)


def test_the_token_cap_counts_every_vector(engine: Engine, hosts: dict) -> None:
    """A name is a few tokens as written and all of its vectors once in: the cap counts the latter."""
    before = text_state(engine)
    with pytest.raises(InputError, match=r"negative_prompt is 531 CLIP tokens once its embeddings are in \(each use"):
        engine.generate(replace(BASE, embeddings=(url(hosts, "long"),), negative_prompt=", ".join(["long"] * 7)))
    assert same_state(text_state(engine), before)
    with pytest.raises(InputError, match=r"too-long\.safetensors holds 76 vectors per encoder: between 1 and 75"):
        engine.generate(replace(BASE, embeddings=(url(hosts, "too-long"),)))


def test_an_unused_embedding_is_a_warning_and_never_loaded(
    engine: Engine, hosts: dict, caplog: pytest.LogCaptureFixture
) -> None:
    baseline = pixels(engine, BASE)
    with caplog.at_level(logging.INFO):
        out = pixels(engine, replace(BASE, embeddings=(url(hosts, "other"),)))
    assert np.array_equal(out, baseline)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING and "embedding other" in r.message]
    assert warning and "write embedding:other, other where it should act" in warning[0].message


def test_bad_lists_are_refused(engine: Engine, hosts: dict) -> None:
    with pytest.raises(InputError, match="at most 4"):
        engine.generate(replace(BASE, embeddings=(url(hosts, "negxl"),) * 5))
    with pytest.raises(InputError, match="empty string"):
        engine.generate(replace(BASE, embeddings=(" ",)))
    with pytest.raises(InputError, match="both called 'negxl'"):
        engine.generate(replace(BASE, embeddings=(url(hosts, "negxl"), "acme/negs/negxl.safetensors")))
    with pytest.raises(WeightsError):
        engine.generate(replace(BASE, embeddings=("just-a-word",)))


class Cancelled(BaseException):
    """What a Cog cancel raises in the predictor."""


def test_a_cancel_during_the_pipeline_takes_the_tokens_out(engine: Engine, hosts: dict) -> None:
    before = text_state(engine)
    baseline = pixels(engine, BASE)
    unet = engine.models["illustrious-xl"].txt2img.unet

    def cancel(*_: object) -> None:
        raise Cancelled

    hook = unet.register_forward_pre_hook(cancel)
    try:
        with pytest.raises(Cancelled):
            engine.generate(replace(BASE, embeddings=(url(hosts, "negxl"),)))
    finally:
        hook.remove()
    assert same_state(text_state(engine), before)
    assert np.array_equal(pixels(engine, BASE), baseline)


def test_beside_a_pivotal_lora_only_the_embedding_leaves(engine: Engine, hosts: dict, lora_files: dict) -> None:
    """A LoRA's pivotal tokens stay while it is active; the request's embedding tokens, added after
    them, leave without moving them: the LoRA's next image is the one it made before."""
    files = file_host({"trained_model.tar": trained_tar(lora_files["b"], embeddings=lora_files["pti"])})
    try:
        lora = (LoraSpec(files.url + "/trained_model.tar", 1.0),)
        tok = replace(BASE, prompt="a photo of TOK at dusk", loras=lora)
        alone = pixels(engine, tok)
        pipe = engine.models["illustrious-xl"].txt2img
        with_lora = len(pipe.tokenizer)
        both = pixels(engine, replace(tok, embeddings=(url(hosts, "negxl"),)))
        assert changed_share(both, alone) > 0.9
        assert len(pipe.tokenizer) == with_lora, "the LoRA's tokens stay, the embedding's are gone"
        assert np.array_equal(pixels(engine, tok), alone)
    finally:
        files.close()
        engine.generate(BASE)


# ---------------------------------------------------------------------------------------------
# Through the real Cog server.


@pytest.fixture(scope="module")
def emb_server(
    weights_dir: Path, embedding_files: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[CogServer, Loopback]]:
    files = file_host({f"emb/{name}": data for name, data in embedding_files.items()})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_CACHE_DIR", str(tmp_path_factory.mktemp("emb-server-cache")))
        server = CogServer(weights_dir, tmp_path_factory.mktemp("emb-server") / "server.log")
    try:
        with server:
            yield server, files
    finally:
        files.close()


def png(server: CogServer, **inputs: object) -> tuple[np.ndarray, dict]:
    status, body = server.predict({**FLUX_JSON, "output_format": "png", **inputs})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    _, data = decode_data_uri(body["output"][0])
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16), body


def test_through_cog_a_negative_embedding_changes_the_image_and_leaves_nothing_behind(
    emb_server: tuple[CogServer, Loopback],
) -> None:
    server, files = emb_server
    negative = {"negative_prompt": "blurry, negxl", "seed": 5}
    plain, _ = png(server, **negative)
    used, body = png(server, **negative, embeddings=[f"{files.url}/emb/negxl.safetensors"])
    assert np.abs(used - plain).max() > 5
    assert "embedding negxl (3 vectors): negative_prompt has negxl" in body["logs"]
    after, _ = png(server, **negative)
    assert np.array_equal(after, plain), "the next request runs on the base encoders, byte for byte"


def test_through_cog_wrong_files_are_refused_by_name(emb_server: tuple[CogServer, Loopback]) -> None:
    server, files = emb_server
    source = f"{files.url}/emb/clip-l-only.safetensors"
    status, body = server.predict({**FLUX_JSON, "negative_prompt": "clip-l-only", "embeddings": [source]})
    assert status == 200 and body["status"] == "failed"
    assert f"embedding {source} is an embedding for SD 1.5" in body["error"]
    status, _ = server.predict({**FLUX_JSON, "embeddings": source})
    assert status == 422, "a bare string is not a list"
