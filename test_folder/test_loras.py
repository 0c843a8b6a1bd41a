"""LoRAs from every source, against loopback emulators, applied exactly on the tiny model."""

from __future__ import annotations

import base64
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load, save

from engine.config import REPO_ROOT
from engine.errors import InputError, LoraLoadError
from engine.generator import Engine
from engine.loras import LoraSet
from engine.request import Credentials, GenerationRequest, LocalLora, LoraSpec
from test_folder.conftest import changed_share
from test_folder.emulators import (
    CivitaiVersion,
    HfRepo,
    Loopback,
    Reply,
    civitai,
    civitai_hashes,
    file_host,
    hugging_face,
    point_clients_at,
    trained_tar,
)
from weights import Downloader, LoraStore, WeightsError, parse_lora

HF_TOKEN = "hf_secret_token_abc123"
CIVITAI_TOKEN = "civitai_secret_token_xyz789"
BASE = GenerationRequest(prompt="a lighthouse at dusk", num_inference_steps=2, seed=3)


# ---------------------------------------------------------------------------------------------
# Parsing: every form users paste, without a network request.

PARSE_TABLE = [
    ("huggingface.co/acme/style", "hf", {"repo_id": "acme/style", "filename": None}),
    ("https://huggingface.co/acme/style", "hf", {"repo_id": "acme/style", "filename": None}),
    (
        "https://huggingface.co/acme/style/blob/main/x.safetensors",
        "hf",
        {"repo_id": "acme/style", "filename": "x.safetensors", "revision": "main"},
    ),
    (
        "https://huggingface.co/acme/style/resolve/v2/sub/x.safetensors?download=true",
        "hf",
        {"repo_id": "acme/style", "filename": "sub/x.safetensors", "revision": "v2"},
    ),
    ("acme/style/x.safetensors", "hf", {"repo_id": "acme/style", "filename": "x.safetensors"}),
    ("acme/style/trained_model.tar", "hf", {"repo_id": "acme/style", "filename": "trained_model.tar"}),
    ("hf://acme/style", "hf", {"repo_id": "acme/style", "filename": None}),
    ("civitai.com/models/1234", "civitai-model", {"model_id": 1234}),
    ("https://civitai.com/models/1234/some-slug", "civitai-model", {"model_id": 1234}),
    ("https://civitai.com/models/1234?modelVersionId=99", "civitai-version", {"model_id": 1234, "version_id": 99}),
    ("https://civitai.com/api/download/models/99?type=Model&format=SafeTensor", "civitai-version", {"version_id": 99}),
    ("urn:air:sdxl:lora:civitai:1234@99", "civitai-version", {"model_id": 1234, "version_id": 99}),
    ("https://replicate.delivery/abc/trained_model.tar", "replicate-tar", {}),
    ("acme/my-lora", "replicate-model", {"revision": "latest"}),
    ("acme/my-lora/" + "a" * 64, "replicate-model", {"revision": "a" * 64}),
    ("https://example.com/x.safetensors", "url", {}),
    ("data:application/octet-stream;base64,AAAA", "data", {}),
]


@pytest.mark.parametrize(("source", "kind", "fields"), PARSE_TABLE)
def test_parse(source: str, kind: str, fields: dict) -> None:
    ref = parse_lora(source)
    assert ref.kind == kind
    for name, value in fields.items():
        assert getattr(ref, name) == value, name


def test_credentials_in_urls_never_reach_the_display_name_or_the_identity() -> None:
    ref = parse_lora("https://user:pw@example.com/x.safetensors?token=s3cret&v=1&X-Amz-Signature=abc")
    assert ref.display == "https://example.com/x.safetensors", "shown without any query or user info"
    assert ref.ident == "url:https://example.com/x.safetensors?v=1", "other query keys still tell files apart"
    assert "s3cret" not in repr(ref) and "pw" not in repr(ref)


def test_unparseable() -> None:
    with pytest.raises(WeightsError, match="cannot tell where LoRA"):
        parse_lora("just-a-word")


# ---------------------------------------------------------------------------------------------
# Fixtures: LoRA files for the tiny model, emulated hosts, a fresh cache per test.


def misfit_embeddings(pti: bytes) -> bytes:
    """Pivotal-tuning embeddings whose second set has a width no SDXL text encoder has."""
    embeddings = load(pti)
    embeddings["text_encoders_1"] = torch.zeros(embeddings["text_encoders_1"].shape[0], 7)
    return save(embeddings)


@pytest.fixture
def hosts(lora_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Loopback]]:
    a, b = lora_files["a"], lora_files["b"]
    hf = hugging_face(
        {
            "acme/style": HfRepo({"style.safetensors": a, "README.md": b"# style"}),
            "acme/nested": HfRepo({"sub/dir/x.safetensors": b, "other/y.safetensors": a}),
            "acme/many": HfRepo({"v1.safetensors": a, "v2.safetensors": b}),
            "acme/private": HfRepo({"p.safetensors": b}, token=HF_TOKEN),
            "acme/tars": HfRepo({"trained_model.tar": trained_tar(b)}),
            "acme/pivotal-tar": HfRepo({"trained_model.tar": trained_tar(b, embeddings=lora_files["pti"])}),
        }
    )
    civ = civitai(
        {
            100: [CivitaiVersion(1002, "SD 1.5", lora_files["sd15"]), CivitaiVersion(1001, "SDXL 1.0", a)],
            200: [CivitaiVersion(2001, "Illustrious", b, token=CIVITAI_TOKEN)],
            300: [CivitaiVersion(3001, "Flux.1 D", a)],
            400: [CivitaiVersion(4001, "Pony", a, token=CIVITAI_TOKEN, login_redirect=True)],
            500: [CivitaiVersion(5001, "SDXL 1.0", a, variants=(b,))],
        }
    )
    files = file_host(
        {
            "a.safetensors": a,
            "b.safetensors": b,
            "te.safetensors": lora_files["te"],
            "kohya_te.safetensors": lora_files["kohya_te"],
            "loha.safetensors": lora_files["loha"],
            "sd15.safetensors": lora_files["sd15"],
            "page.safetensors": b"<!DOCTYPE html><html>not a file</html>",
            "acme-trained/trained_model.tar": trained_tar(b),
            "acme-pivotal/trained_model.tar": trained_tar(b, embeddings=lora_files["pti"]),
            "acme-badpivot/trained_model.tar": trained_tar(b, embeddings=misfit_embeddings(lora_files["pti"])),
            "download": trained_tar(b),  # a signed or redirecting download URL: no .tar in its path
        }
    )
    point_clients_at(hf, civ, monkeypatch)
    monkeypatch.setenv("REPLICATE_ENDPOINT", files.url)
    yield {"hf": hf, "civitai": civ, "files": files}
    for server in (hf, civ, files):
        server.close()


def python_downloader() -> Downloader:
    """The downloader of a machine without pget (this one). conftest sets the backoff to 0."""
    return Downloader("python")


@pytest.fixture
def store(tmp_path: Path) -> LoraStore:
    """A fresh, private cache for each test, so hit and miss counts are the test's own."""
    return LoraStore(tmp_path / "cache", python_downloader())


@pytest.fixture
def engine(engine: Engine, store: LoraStore) -> Iterator[Engine]:
    """The session's models, handed this test's store as predict.py hands its own."""
    with_store = Engine(engine.models, engine.safety, store, engine.swap)
    yield with_store
    with_store.generate(BASE)  # leave the shared models without adapters


def pixels(engine: Engine, req: GenerationRequest) -> np.ndarray:
    return np.asarray(engine.generate(req)[0].image, dtype=np.int16)


def with_loras(*specs: tuple[str, float], credentials: Credentials | None = None) -> GenerationRequest:
    return replace(BASE, loras=tuple(LoraSpec(s, w) for s, w in specs), credentials=credentials or Credentials())


@pytest.fixture
def baseline(engine: Engine) -> np.ndarray:
    return pixels(engine, BASE)


def local_reference(engine: Engine, tmp_path: Path, data: bytes, scale: float = 1.0) -> np.ndarray:
    path = tmp_path / "reference.safetensors"
    path.write_bytes(data)
    return pixels(engine, with_loras((str(path), scale)))


# ---------------------------------------------------------------------------------------------
# Applying: pixels change, scale matters, and the baseline comes back exactly.


def test_lora_changes_pixels_scale_matters_and_baseline_returns(
    engine: Engine, store: LoraStore, hosts: dict, baseline: np.ndarray
) -> None:
    url = hosts["files"].url + "/a.safetensors"
    full = pixels(engine, with_loras((url, 1.0)))
    half = pixels(engine, with_loras((url, 0.5)))
    assert np.abs(full - baseline).max() > 10
    assert np.abs(full - half).max() > 5
    assert np.array_equal(pixels(engine, BASE), baseline)


@pytest.mark.parametrize("name", ["b", "te", "kohya_te"])
def test_formats_load_and_change_the_image(
    engine: Engine, store: LoraStore, hosts: dict, baseline: np.ndarray, name: str
) -> None:
    out = pixels(engine, with_loras((f"{hosts['files'].url}/{name}.safetensors", 1.0)))
    assert np.abs(out - baseline).max() > 10
    assert np.array_equal(pixels(engine, BASE), baseline)


def test_two_loras_and_scale_only_change_reloads_nothing(
    engine: Engine, store: LoraStore, hosts: dict, baseline: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = hosts["files"].url + "/a.safetensors", hosts["files"].url + "/b.safetensors"
    only_a = pixels(engine, with_loras((a, 1.0)))
    both = pixels(engine, with_loras((a, 1.0), (b, 1.0)))
    assert np.abs(both - only_a).max() > 5
    served = hosts["files"].total()
    with caplog.at_level(logging.INFO):
        rescaled = pixels(engine, with_loras((a, 1.0), (b, 0.3)))
    assert hosts["files"].total() == served, "a scale-only change must not download"
    assert "loaded LoRA" not in caplog.text, "a scale-only change must not reload"
    assert changed_share(rescaled, both) > 0.9
    assert np.array_equal(pixels(engine, BASE), baseline)


def test_warm_switches_read_no_file(
    engine: Engine, store: LoraStore, hosts: dict, baseline: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A -> B -> A and a scale change parse each file once; evicted (budget 0), A is read again."""
    a, b = hosts["files"].url + "/a.safetensors", hosts["files"].url + "/b.safetensors"
    loras = engine.models["illustrious-xl"].lora_set
    loras.warm.clear()
    reads: list[str] = []
    real = LoraSet._parse
    monkeypatch.setattr(LoraSet, "_parse", lambda self, lora: (reads.append(lora.name), real(self, lora))[1])
    first_a = pixels(engine, with_loras((a, 1.0)))
    first_b = pixels(engine, with_loras((b, 1.0)))
    assert np.array_equal(pixels(engine, with_loras((a, 1.0))), first_a)
    half_a = pixels(engine, with_loras((a, 0.5)))
    assert np.array_equal(pixels(engine, with_loras((b, 1.0))), first_b)
    assert reads == [a, b], "warm switches and a scale change read no file"
    assert np.abs(half_a - first_a).max() > 5
    monkeypatch.setattr(loras.warm.cache, "max_bytes", 0)
    assert np.array_equal(pixels(engine, with_loras((a, 0.5))), half_a)
    assert list(loras.warm) == [loras.active[0][0]], "over budget, only the active LoRA stays parsed"
    assert np.array_equal(pixels(engine, with_loras((b, 1.0))), first_b)
    assert reads == [a, b, b]
    assert np.array_equal(pixels(engine, BASE), baseline)


def test_host_copies_are_of_the_weights_merged_now_and_not_pinned(
    engine: Engine, store: LoraStore, hosts: dict, baseline: np.ndarray
) -> None:
    """W0 is kept on the CPU only while its weight is merged: a switch lets the copies of weights
    it restores go, and back on the base none is left (they were kept for every weight ever touched)."""
    loras = engine.models["illustrious-xl"].lora_set
    a, te = hosts["files"].url + "/a.safetensors", hosts["files"].url + "/te.safetensors"

    def held() -> tuple[set[tuple[str, str]], int]:
        assert not any(t.is_pinned() for t in loras.originals.values()), "no page-locked host memory"
        return set(loras.originals), sum(t.nbytes for t in loras.originals.values())

    def merged_bytes() -> int:
        return sum(loras._weight(key).nbytes for key in loras.merged)

    pixels(engine, with_loras((te, 1.0)))
    with_text = set(loras.merged)
    assert held() == (with_text, merged_bytes()) and with_text
    pixels(engine, with_loras((a, 1.0)))  # A has no text-encoder weights
    assert held() == (set(loras.merged), merged_bytes())
    assert with_text - set(loras.merged), "the switch restored the text encoders' weights ..."
    assert not (with_text - set(loras.merged)) & set(loras.originals), "... and let their copies go"
    assert np.array_equal(pixels(engine, BASE), baseline)
    assert held() == (set(), 0), "on the base, no copy is held"


def test_one_warm_budget_for_the_whole_process(
    engine: Engine, store: LoraStore, hosts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsed LoRAs of every model count against one budget (WARM_MAX_BYTES): a budget that fits one
    parsed LoRA keeps only the one the last request used, whichever model it was for."""
    ill, sdxl = engine.models["illustrious-xl"].lora_set, engine.models["sdxl"].lora_set
    assert ill.warm.cache is sdxl.warm.cache, "one cache for the process"
    ill.warm.cache.entries.clear()
    a = hosts["files"].url + "/a.safetensors"
    pixels(engine, with_loras((a, 1.0)))
    [key] = list(ill.warm)
    monkeypatch.setattr(ill.warm.cache, "max_bytes", ill.warm[key].nbytes)
    pixels(engine, replace(with_loras((a, 1.0)), model="sdxl"))
    assert list(sdxl.warm) == [key] and list(ill.warm) == [], "the other model's parsed copy was evicted"
    assert ill.warm.cache.nbytes <= ill.warm.cache.max_bytes
    pixels(engine, replace(BASE, model="sdxl"))


def test_a_lora_switch_never_recompiles(engine: Engine, lora_files: dict, tmp_path: Path) -> None:
    """Weights change in place, so a compiled block keeps its one graph across base -> A -> B ->
    a scale change -> base, and sees each set of weights (it matches the eager block every time)."""
    pipe = engine.models["illustrious-xl"].txt2img
    loras = engine.models["illustrious-xl"].lora_set
    (tmp_path / "a.safetensors").write_bytes(lora_files["a"])
    (tmp_path / "te.safetensors").write_bytes(lora_files["te"])
    a = LocalLora("compile-a", tmp_path / "a.safetensors", 1.0, "A")
    b = LocalLora("compile-b", tmp_path / "te.safetensors", 1.0, "B")
    block = pipe.unet.down_blocks[1].attentions[0]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, block.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    graphs: list[torch.fx.GraphModule] = []

    def counting(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., object]:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=counting, dynamic=False)
    outputs = []
    with torch.no_grad():
        for state in ([], [a], [b], [replace(b, scale=0.3)], []):
            loras.apply(state)
            # return_dict=False, as the UNet calls its blocks (the output class is a deprecated alias)
            [out] = compiled(hidden, encoder_hidden_states=context, return_dict=False)
            assert torch.equal(out, block(hidden, encoder_hidden_states=context, return_dict=False)[0])
            outputs.append(out)
            if len(outputs) == 1:
                compiled_once = len(graphs)
    torch._dynamo.reset()
    assert compiled_once == 1 and len(graphs) == 1, "one graph for the block, and a LoRA switch must not recompile"
    assert torch.equal(outputs[0], outputs[-1]), "back to the base weights, bit for bit"
    assert all(not torch.equal(outputs[0], out) for out in outputs[1:4])
    assert not torch.equal(outputs[2], outputs[3])


def test_loras_never_leak_into_the_other_model(engine: Engine, store: LoraStore, hosts: dict) -> None:
    sdxl = replace(BASE, model="sdxl")
    sdxl_base = pixels(engine, sdxl)
    pixels(engine, with_loras((hosts["files"].url + "/a.safetensors", 1.0)))
    assert np.array_equal(pixels(engine, sdxl), sdxl_base)
    assert engine.models["sdxl"].lora_set.active == () and not engine.models["sdxl"].lora_set.merged


def test_switching_many_times_replaces_no_module_and_keeps_parameters_flat(
    engine: Engine, store: LoraStore, hosts: dict, baseline: np.ndarray
) -> None:
    """Fused in place: the forward path holds the plain modules and parameters it held before."""
    pipe = engine.models["illustrious-xl"].txt2img
    a, b = hosts["files"].url + "/a.safetensors", hosts["files"].url + "/b.safetensors"
    pixels(engine, BASE)
    modules = {name: id(m) for name, m in pipe.unet.named_modules()}
    params = {name: id(p) for name, p in pipe.unet.named_parameters()}
    for i in range(10):
        engine.generate(replace(with_loras((a if i % 2 else b, 1.0)), num_inference_steps=1))
        assert {name: id(m) for name, m in pipe.unet.named_modules()} == modules
        assert {name: id(p) for name, p in pipe.unet.named_parameters()} == params
    assert len(engine.models["illustrious-xl"].lora_set.active) == 1
    assert all(names == [] for names in pipe.get_list_adapters().values()), "no PEFT adapter is injected"
    assert np.array_equal(pixels(engine, BASE), baseline)


def test_unsupported_formats_are_refused_by_name(engine: Engine, store: LoraStore, hosts: dict) -> None:
    """A LoHa module missing three of its four factors, and a LoRA for SD 1.5 (every format and
    refusal is in test_lora_formats.py)."""
    with pytest.raises(InputError, match=r"damaged .* a LyCORIS LoHa module has no hada_w1_b"):
        engine.generate(with_loras((hosts["files"].url + "/loha.safetensors", 1.0)))
    with pytest.raises(InputError, match=r"is a LoRA for SD 1\.5 .*768-wide"):
        engine.generate(with_loras((hosts["files"].url + "/sd15.safetensors", 1.0)))
    assert engine.models["illustrious-xl"].lora_set.active == ()


# ---------------------------------------------------------------------------------------------
# Hugging Face


@pytest.mark.parametrize(
    "form",
    [
        "huggingface.co/acme/style",
        "{hf}/acme/style/blob/main/style.safetensors",
        "{hf}/acme/style/resolve/main/style.safetensors?download=true",
        "acme/style/style.safetensors",
        "hf://acme/style",
    ],
)
def test_hugging_face_forms(
    engine: Engine, store: LoraStore, hosts: dict, lora_files: dict, tmp_path: Path, form: str
) -> None:
    source = form.format(hf=hosts["hf"].url).replace("huggingface.co", hosts["hf"].url.removeprefix("http://"), 1)
    if source.startswith("127.0.0.1"):
        source = "http://" + source
    expected = local_reference(engine, tmp_path, lora_files["a"])
    assert np.array_equal(pixels(engine, with_loras((source, 1.0))), expected)


def test_hugging_face_subfolder_and_several_files(engine: Engine, store: LoraStore, hosts: dict) -> None:
    engine.generate(with_loras((f"{hosts['hf'].url}/acme/nested/blob/main/sub/dir/x.safetensors", 1.0)))
    with pytest.raises(WeightsError, match=r"several \.safetensors files \(v1\.safetensors, v2\.safetensors\)"):
        engine.generate(with_loras(("hf://acme/many", 1.0)))


def test_hugging_face_private_repo(
    engine: Engine, store: LoraStore, hosts: dict, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(WeightsError, match="pass an hf_api_token") as err:
        engine.generate(with_loras(("hf://acme/private", 1.0)))
    with caplog.at_level(logging.DEBUG):
        engine.generate(with_loras(("hf://acme/private", 1.0), credentials=Credentials(hf=HF_TOKEN)))
    assert HF_TOKEN not in str(err.value) and HF_TOKEN not in caplog.text
    assert not any(HF_TOKEN in p.name for p in store.root.rglob("*"))
    assert HF_TOKEN not in (store.root / "index.json").read_text()
    # Cached now, yet a caller without the token is asked for it, not served the file.
    with pytest.raises(WeightsError, match="pass an hf_api_token"):
        engine.generate(with_loras(("hf://acme/private", 1.0)))


def test_cache_hit_makes_no_request_and_survives_a_restart(engine: Engine, store: LoraStore, hosts: dict) -> None:
    req = with_loras(("hf://acme/style", 1.0))
    first = pixels(engine, req)
    served = hosts["hf"].total()
    assert np.array_equal(pixels(engine, req), first)
    assert hosts["hf"].total() == served
    restarted = Engine(engine.models, engine.safety, LoraStore(store.root, python_downloader()))
    assert np.array_equal(pixels(restarted, req), first)
    assert hosts["hf"].total() == served


# ---------------------------------------------------------------------------------------------
# CivitAI


def test_civitai_model_page_picks_the_newest_sdxl_version(
    engine: Engine, store: LoraStore, hosts: dict, lora_files: dict, tmp_path: Path
) -> None:
    expected = local_reference(engine, tmp_path, lora_files["a"])
    page = hosts["civitai"].url + "/models/100/some-slug"
    assert np.array_equal(pixels(engine, with_loras((page, 1.0))), expected)
    assert "GET /api/download/models/1001" in hosts["civitai"].hits
    assert "GET /api/download/models/100" not in hosts["civitai"].hits, "a page id is not a version id"


@pytest.mark.parametrize(
    "form", ["{c}/models/100?modelVersionId=1001", "{c}/api/download/models/1001", "urn:air:sdxl:lora:civitai:100@1001"]
)
def test_civitai_version_forms(engine: Engine, store: LoraStore, hosts: dict, form: str) -> None:
    engine.generate(with_loras((form.format(c=hosts["civitai"].url), 1.0)))
    served = hosts["civitai"].total()
    engine.generate(with_loras((form.format(c=hosts["civitai"].url), 1.0)))
    assert hosts["civitai"].total() == served, "a version id is immutable: the second request is a pure cache hit"


def test_civitai_by_hash_takes_the_file_with_that_hash(
    engine: Engine, store: LoraStore, hosts: dict, lora_files: dict, tmp_path: Path
) -> None:
    """A version holding two model files: each one's hash gives that file, not the primary one,
    and the two are cached apart."""
    by_hash = hosts["civitai"].url + "/api/v1/model-versions/by-hash/"
    primary = local_reference(engine, tmp_path, lora_files["a"])
    variant = local_reference(engine, tmp_path, lora_files["b"])
    assert not np.array_equal(primary, variant)
    assert np.array_equal(
        pixels(engine, with_loras((by_hash + civitai_hashes(lora_files["a"])["AutoV2"], 1.0))), primary
    )
    assert np.array_equal(
        pixels(engine, with_loras((by_hash + civitai_hashes(lora_files["b"])["SHA256"], 1.0))), variant
    )
    assert hosts["civitai"].hits["GET /api/download/models/5001"] == 2, "one download each, the variant by its own URL"


def test_civitai_other_base_model_is_refused(engine: Engine, store: LoraStore, hosts: dict) -> None:
    with pytest.raises(WeightsError, match=r"LoRA for Flux\.1 D, not for SDXL"):
        engine.generate(with_loras((hosts["civitai"].url + "/models/300", 1.0)))
    with pytest.raises(WeightsError, match=r"LoRA for SD 1\.5"):
        engine.generate(with_loras((hosts["civitai"].url + "/api/download/models/1002", 1.0)))


@pytest.mark.parametrize("model", [200, 400])
def test_civitai_token(engine: Engine, store: LoraStore, hosts: dict, model: int) -> None:
    page = f"{hosts['civitai'].url}/models/{model}"
    with pytest.raises(WeightsError, match="needs a CivitAI token: pass civitai_api_token") as err:
        engine.generate(with_loras((page, 1.0)))
    engine.generate(with_loras((page, 1.0), credentials=Credentials(civitai=CIVITAI_TOKEN)))
    assert CIVITAI_TOKEN not in str(err.value)
    assert not list(store.files.glob(".part-*"))


# ---------------------------------------------------------------------------------------------
# Plain URLs, Replicate, data: URIs and faults


def test_replicate_tar_and_shorthand(
    engine: Engine, store: LoraStore, hosts: dict, lora_files: dict, tmp_path: Path
) -> None:
    expected = local_reference(engine, tmp_path, lora_files["b"])
    tar_url = hosts["files"].url + "/acme-trained/trained_model.tar"
    assert np.array_equal(pixels(engine, with_loras((tar_url, 1.0))), expected)
    assert np.array_equal(pixels(engine, with_loras(("acme/trained", 1.0))), expected)


@pytest.mark.parametrize(
    "form",
    [
        "hf://acme/tars/trained_model.tar",
        "acme/tars/trained_model.tar",
        "hf://acme/tars",
        "{hf}/acme/tars/resolve/main/trained_model.tar?download=true",
        "{files}/download?id=3",
        "data:",
        "local",
    ],
)
def test_a_trained_tar_is_known_by_its_bytes_from_any_source(
    engine: Engine, store: LoraStore, hosts: dict, lora_files: dict, tmp_path: Path, form: str
) -> None:
    """The same trained_model.tar, sent unchanged from Hugging Face, a URL without .tar in its
    path, a data: URI or a local file, gives the image it gives from a .tar URL."""
    tar = trained_tar(lora_files["b"])
    if form == "data:":
        form = "data:application/x-tar;base64," + base64.b64encode(tar).decode()
    elif form == "local":
        form = str(tmp_path / "trained_model.tar")
        Path(form).write_bytes(tar)
    expected = pixels(engine, with_loras((hosts["files"].url + "/acme-trained/trained_model.tar", 1.0)))
    source = form.format(hf=hosts["hf"].url, files=hosts["files"].url)
    assert np.array_equal(pixels(engine, with_loras((source, 1.0))), expected)


def test_a_pivotal_tar_from_hugging_face_keeps_its_trigger_on_a_cache_hit(
    engine: Engine, store: LoraStore, hosts: dict
) -> None:
    """The trigger map of a tar that is a tar only by its bytes is cached with the LoRA: the hit
    (no request at all, in this process or after a restart) still swaps TOK for the tokens."""
    tok = replace(BASE, prompt="a photo of TOK at dusk")
    expected = pixels(engine, replace(tok, loras=(LoraSpec("acme/pivotal", 1.0),)))
    req = replace(tok, loras=(LoraSpec("hf://acme/pivotal-tar/trained_model.tar", 1.0),))
    assert np.array_equal(pixels(engine, req), expected)
    served = hosts["hf"].total()
    assert np.array_equal(pixels(engine, req), expected)
    restarted = Engine(engine.models, engine.safety, LoraStore(store.root, python_downloader()))
    assert np.array_equal(pixels(restarted, req), expected)
    assert hosts["hf"].total() == served, "the cache hits made a request"


def test_pivotal_tuning_tokens(engine: Engine, store: LoraStore, hosts: dict, baseline: np.ndarray) -> None:
    """TOK in the prompt becomes the tar's trained tokens; without TOK only the LoRA acts."""
    tok = replace(BASE, prompt="a photo of TOK at dusk")
    plain = replace(BASE, prompt="a photo of a man at dusk")

    def run(req: GenerationRequest, source: str) -> np.ndarray:
        return pixels(engine, replace(req, loras=(LoraSpec(source, 1.0),)))

    tokenizer = engine.models["illustrious-xl"].txt2img.tokenizer
    vocab = len(tokenizer)
    assert np.array_equal(run(plain, "acme/pivotal"), run(plain, "acme/trained"))
    assert changed_share(run(tok, "acme/pivotal"), run(tok, "acme/trained")) > 0.9
    literal = replace(BASE, prompt="a photo of <s0><s1> at dusk")
    assert np.array_equal(run(literal, "acme/pivotal"), run(tok, "acme/pivotal"))
    lower = replace(BASE, prompt="a photo of tok at dusk")  # CLIP lowercases; training matched any case
    assert np.array_equal(run(lower, "acme/pivotal"), run(tok, "acme/pivotal"))
    [result] = engine.generate(replace(tok, loras=(LoraSpec("acme/pivotal", 1.0),)))
    assert result.parameters.prompt == "a photo of TOK at dusk", "metadata keeps the prompt as written"
    assert np.array_equal(pixels(engine, BASE), baseline)
    assert len(tokenizer) == vocab, "the trained tokens leave the tokenizer with the LoRA"


def test_data_uri(engine: Engine, store: LoraStore, lora_files: dict, tmp_path: Path) -> None:
    expected = local_reference(engine, tmp_path, lora_files["a"])
    uri = "data:application/octet-stream;base64," + base64.b64encode(lora_files["a"]).decode()
    assert np.array_equal(pixels(engine, with_loras((uri, 1.0))), expected)


def test_server_error_then_success_is_retried(engine: Engine, store: LoraStore, hosts: dict) -> None:
    hosts["files"].faults["GET /a.safetensors"] = [Reply(500), Reply(503)]
    engine.generate(with_loras((hosts["files"].url + "/a.safetensors", 1.0)))
    assert hosts["files"].hits["GET /a.safetensors"] == 3


def test_client_errors_are_not_retried(engine: Engine, store: LoraStore, hosts: dict) -> None:
    with pytest.raises(WeightsError, match="not found \\(HTTP 404\\)"):
        engine.generate(with_loras((hosts["files"].url + "/missing.safetensors", 1.0)))
    assert hosts["files"].hits["HEAD /missing.safetensors"] + hosts["files"].hits["GET /missing.safetensors"] == 1
    hosts["files"].faults["GET /a.safetensors"] = [Reply(403)]
    with pytest.raises(WeightsError, match="HTTP 403"):
        engine.generate(with_loras((hosts["files"].url + "/a.safetensors", 1.0)))


def test_truncated_body_is_retried_then_refused(
    engine: Engine, store: LoraStore, hosts: dict, lora_files: dict
) -> None:
    cut = Reply(200, lora_files["a"][:1000], declared_length=len(lora_files["a"]))
    hosts["files"].faults["GET /a.safetensors"] = [cut] * 5
    with pytest.raises(WeightsError, match="after 5 tries"):
        engine.generate(with_loras((hosts["files"].url + "/a.safetensors", 1.0)))
    assert list(store.files.iterdir()) == []


def test_html_instead_of_a_file(engine: Engine, store: LoraStore, hosts: dict) -> None:
    with pytest.raises(WeightsError, match="HTML page instead of a file"):
        engine.generate(with_loras((hosts["files"].url + "/page.safetensors", 1.0)))
    assert list(store.files.iterdir()) == []


def test_oversize_and_disk_full(engine: Engine, store: LoraStore, hosts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_MAX_FILE_BYTES", "1000")
    small = LoraStore(store.root, python_downloader())  # limits are read when a downloader is made
    with pytest.raises(WeightsError, match="over the 1000-byte limit"):
        small.fetch(hosts["files"].url + "/a.safetensors", 1.0, Credentials())
    monkeypatch.delenv("LORA_MAX_FILE_BYTES")
    store.min_free = 10**18  # a disk that is always full
    with pytest.raises(WeightsError, match="not enough disk space"):
        engine.generate(with_loras((hosts["files"].url + "/a.safetensors", 1.0)))
    assert list(store.files.iterdir()) == []


def test_lru_eviction_by_bytes(store: LoraStore, hosts: dict, lora_files: dict) -> None:
    store.max_bytes = len(lora_files["a"]) + len(lora_files["b"]) - 1  # room for one of the two
    a = store.fetch(hosts["files"].url + "/a.safetensors", 1.0, Credentials())
    b = store.fetch(hosts["files"].url + "/b.safetensors", 1.0, Credentials())
    assert not a.path.exists() and b.path.exists()
    served = hosts["files"].total()
    store.fetch(hosts["files"].url + "/b.safetensors", 1.0, Credentials())
    assert hosts["files"].total() == served


def test_concurrent_requests_download_once(store: LoraStore, hosts: dict) -> None:
    url = hosts["files"].url + "/b.safetensors"
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.fetch(url, 1.0, Credentials()))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.path for r in results}) == 1 and len(results) == 4
    assert hosts["files"].hits["GET /b.safetensors"] == 1


def test_slow_server_times_out_clearly(store: LoraStore, hosts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_DOWNLOAD_TIMEOUT", "0.2")
    store = LoraStore(store.root, python_downloader())  # limits are read when a downloader is made
    hosts["files"].delay = 0.5
    with pytest.raises(WeightsError, match=r"could not download .* after 5 tries: the host did not answer in time"):
        store.fetch(hosts["files"].url + "/a.safetensors", 1.0, Credentials())
    assert list(store.files.iterdir()) == []


def test_two_processes_download_once(store: LoraStore, hosts: dict, lora_files: dict) -> None:
    """The file lock holds across processes, not only threads."""
    url = hosts["files"].url + "/a.safetensors"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
        "from weights import Credentials, Downloader, LoraStore; "
        "print(LoraStore(Path(sys.argv[2]), Downloader('python')).fetch(sys.argv[3], 1.0, Credentials()).path)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(REPO_ROOT), str(store.root), url], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == lora_files["a"]
    assert hosts["files"].hits["GET /a.safetensors"] == 1


def test_bad_inputs_are_refused_before_any_download(engine: Engine, store: LoraStore, hosts: dict) -> None:
    url = hosts["files"].url + "/a.safetensors"
    for bad in (replace(with_loras((url, 1.0)), clip_skip=50), replace(with_loras((url, 1.0)), prompt="a cat " * 600)):
        with pytest.raises(InputError):
            engine.generate(bad)
    assert hosts["files"].total() == 0


# ---------------------------------------------------------------------------------------------
# Loading faults: each surfaces as what it is, and leaves nothing half-made behind


def fail_after(monkeypatch: pytest.MonkeyPatch, writes: int, fault: BaseException) -> None:
    """Let the merge write `writes` weights, then raise `fault` (what a GPU or a cancel would)."""
    real = LoraSet._write
    count = iter(range(writes))

    def write(self: LoraSet, *args: object) -> None:
        if next(count, None) is None:
            raise fault
        real(self, *args)

    monkeypatch.setattr(LoraSet, "_write", write)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), "out of memory while loading LoRA"),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "could not be loaded: RuntimeError"),
    ],
)
def test_a_loader_failure_is_reported_as_what_it_is(
    engine: Engine,
    store: LoraStore,
    hosts: dict,
    baseline: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    fault: Exception,
    message: str,
) -> None:
    """Faults a CPU cannot produce (memory, a driver) are injected half-way through the merge."""
    fail_after(monkeypatch, 10, fault)
    with pytest.raises(LoraLoadError, match=message) as err:
        engine.generate(with_loras((hosts["files"].url + "/a.safetensors", 1.0)))
    assert "another base model" not in str(err.value)
    assert not engine.models["illustrious-xl"].lora_set.merged, "every written weight is copied back"
    monkeypatch.undo()
    assert np.array_equal(pixels(engine, BASE), baseline)


class Cancelled(BaseException):
    """What a Cog cancel raises in the predictor (coglet's CancelationException is a BaseException)."""


def test_a_cancel_during_a_lora_load_leaves_nothing_behind(
    engine: Engine, store: LoraStore, hosts: dict, baseline: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel landing half-way through a switch from another LoRA (part of the UNet written)."""
    a, te = hosts["files"].url + "/a.safetensors", hosts["files"].url + "/te.safetensors"
    expected = pixels(engine, with_loras((te, 1.0)))
    pixels(engine, with_loras((a, 1.0)))  # the cancel lands on a switch away from another LoRA
    fail_after(monkeypatch, 30, Cancelled())
    with pytest.raises(Cancelled):
        engine.generate(with_loras((te, 1.0)))
    monkeypatch.undo()
    assert not engine.models["illustrious-xl"].lora_set.merged, "no half-merged weight is left"
    assert np.array_equal(pixels(engine, BASE), baseline)
    assert np.array_equal(pixels(engine, with_loras((te, 1.0))), expected), "the same LoRA applies again"
    assert np.array_equal(pixels(engine, BASE), baseline)


@pytest.mark.parametrize("fault", [Cancelled(), torch.OutOfMemoryError("CUDA out of memory")])
def test_a_cancel_during_the_restore_leaves_the_set_truthful(
    engine: Engine,
    store: LoraStore,
    hosts: dict,
    baseline: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    fault: BaseException,
) -> None:
    """A merge fails half-way (a cancel, or the GPU's memory), and a cancel lands in the middle of
    the restore that undoes it: the set must not claim the base while weights are still merged,
    so the next plain request restores what is left and runs on the base."""
    loras = engine.models["illustrious-xl"].lora_set
    fail_after(monkeypatch, 5, fault)
    real = LoraSet._restore
    calls: list[tuple[str, str]] = []

    def restore(self: LoraSet, key: tuple[str, str]) -> None:
        calls.append(key)
        if len(calls) == 3:
            raise Cancelled  # once, on the third of the five weights to copy back
        real(self, key)

    monkeypatch.setattr(LoraSet, "_restore", restore)
    with pytest.raises(Cancelled):
        engine.generate(with_loras((hosts["files"].url + "/a.safetensors", 1.0)))
    monkeypatch.undo()
    assert len(loras.merged) == 3, "the restore was cut short: three weights are still merged"
    assert loras.active != (), "so the set must not say that no LoRA is active"
    assert np.array_equal(pixels(engine, BASE), baseline), "the next plain request restores them all"
    assert not loras.merged and loras.active == ()


def test_pivotal_tokens_never_leak_when_the_second_encoder_refuses_them(
    engine: Engine, store: LoraStore, hosts: dict, lora_files: dict, baseline: np.ndarray
) -> None:
    pipe = engine.models["illustrious-xl"].txt2img
    sizes = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    with pytest.raises(InputError, match="embeddings that do not fit illustrious-xl"):
        engine.generate(replace(BASE, prompt="a photo of TOK", loras=(LoraSpec("acme/badpivot", 1.0),)))
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == sizes
    assert not engine.models["illustrious-xl"].lora_set.merged
    assert np.array_equal(pixels(engine, BASE), baseline)


def test_checks_run_before_a_swapped_model_moves(
    weights_dir: Path, store: LoraStore, hosts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    swapping = Engine.load(weights_dir, lora_source=store, residency="swap")
    moves: list[str] = []
    real = swapping._move_in
    monkeypatch.setattr(swapping, "_move_in", lambda model: (moves.append(model.model_id), real(model)))
    url = hosts["files"].url + "/a.safetensors"
    for bad in (
        replace(BASE, model="sdxl", clip_skip=50, loras=(LoraSpec(url, 1.0),)),
        replace(BASE, model="sdxl", aspect_ratio="custom", width=None, height=None),
    ):
        with pytest.raises(InputError):
            swapping.generate(bad)
    assert moves == [] and hosts["files"].total() == 0
    swapping.generate(replace(BASE, model="sdxl", num_inference_steps=1))
    assert moves == ["sdxl"]


@pytest.mark.parametrize("count", [1, 2])
def test_fusing_in_bf16_rounds_once_and_restores_exactly(
    weights_dir: Path, lora_files: dict, tmp_path: Path, count: int
) -> None:
    """In a half-precision model each fused weight is the exact W0 plus the product of the
    dtype-rounded factors, accumulated in fp32 and rounded once (within one unit of the last place
    where fp32 accumulation lands on a rounding boundary), and the base comes back bit for bit.
    One LoRA goes in with its scale as addmm's alpha; two are one product of stacked factors, each
    up scaled before rounding."""
    pipe = StableDiffusionXLPipeline.from_pretrained(weights_dir / "illustrious-xl", dtype=torch.bfloat16)
    loras = LoraSet(pipe, "bf16-check")
    (tmp_path / "a.safetensors").write_bytes(lora_files["a"])
    (tmp_path / "b.safetensors").write_bytes(lora_files["b"])
    chosen = [
        LocalLora("bf16-a", tmp_path / "a.safetensors", 0.8, "A"),
        LocalLora("bf16-b", tmp_path / "b.safetensors", 1.3, "B"),
    ][:count]
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    loras.apply(chosen)
    parsed = [loras._parsed(lora) for lora in chosen]
    shared = set.intersection(*(set(p.layers) for p in parsed))
    unet_keys = [key for key in shared if key[0] == "unet"]
    assert unet_keys, "the LoRAs touch some of the same UNet weights"
    ulp_misses = 0
    for component, module in unet_keys:
        weight = pipe.unet.get_submodule(module).weight
        exact = base[f"{module}.weight"].double().flatten(1)
        for lora, p in zip(chosen, parsed, strict=True):
            layer = p.layers[(component, module)]
            scale = lora.scale * layer.scaling
            up = layer.up.float().flatten(1)
            up = up.bfloat16().double() * scale if count == 1 else (up * scale).bfloat16().double()
            exact += up @ layer.down.float().flatten(1).bfloat16().double()
        expected = exact.bfloat16().view_as(weight)
        differ = weight != expected
        ulp_misses += int(differ.sum())
        # Where they differ, by one step of bf16 at most.
        spacing = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        assert bool(((weight.float() - expected.float()).abs() <= spacing)[differ].all())
    assert ulp_misses <= sum(pipe.unet.get_submodule(m).weight.numel() for _, m in unet_keys) // 1000
    loras.apply([])
    assert all(torch.equal(v, base[k]) for k, v in pipe.unet.state_dict().items()), "the base, bit for bit"
