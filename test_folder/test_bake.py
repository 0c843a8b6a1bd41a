"""The bake, end to end offline: tiny artifacts in the real layout, served by a loopback hub."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

from engine.config import REPO_ROOT
from engine.errors import InputError
from engine.generator import Engine
from engine.request import GenerationRequest
from engine.safety import SafetyChecker
from scripts.bake import (
    MANIFEST,
    bake,
    check_manifest,
    describe,
    index_added_tokens,
    prepare_tokenizer,
    to_safetensors,
)
from test_folder.emulators import HfRepo, Loopback, Reply, file_host, hugging_face
from test_folder.single_file import to_original
from weights import WeightsError

REPOS = {"sdxl": "acme/sdxl-base", "illustrious-xl": "acme/illustrious", "safety-checker": "acme/checker"}


def _legacy_tokenizer(folder: Path) -> dict[str, bytes]:
    """A tiny CLIP tokenizer folder the way SDXL's repo publishes its two: vocab.json, merges.txt
    and the older tokenizer_config.json / special_tokens_map.json format (AddedToken dicts with
    `normalized: true`), no tokenizer.json."""
    model = json.loads((folder / "tokenizer.json").read_bytes())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    pad = json.loads((folder / "tokenizer_config.json").read_text())["pad_token"]

    def added(content: str) -> dict:
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    special = {
        "bos_token": added("<|startoftext|>"),
        "eos_token": added("<|endoftext|>"),
        "unk_token": added("<|endoftext|>"),
        "pad_token": pad,
    }
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "tokenizer_class": "CLIPTokenizer",
        **special,
    }
    return {
        "vocab.json": json.dumps(model["vocab"]).encode(),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode(),
        "tokenizer_config.json": json.dumps(config, indent=2).encode(),
        "special_tokens_map.json": json.dumps(special, indent=2).encode(),
    }


def _published(folder: Path) -> dict[str, bytes]:
    """A tiny model folder's files as the hub serves them, tokenizers in SDXL's published layout."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if path.parent.name.startswith("tokenizer"):
            if path.name == "tokenizer.json":
                files |= {str(rel.parent / k): v for k, v in _legacy_tokenizer(path.parent).items()}
        else:
            files[str(rel)] = path.read_bytes()
    return files


def _manifest(weights_dir: Path, sizes: bool = True) -> dict:
    """The shape of bake/manifest.json, listing the tiny folders' files, sizes and sha256s."""
    models = {}
    for model_id, repo in REPOS.items():
        files = []
        for rel, data in _published(weights_dir / model_id).items():
            spec: dict = {"path": rel}
            if sizes and rel.endswith(".safetensors"):
                spec.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
            files.append(spec)
        models[model_id] = {"sources": [{"hf": repo, "revision": "main", "files": files}]}
    return {"models": models}


def _bake_one(server: Loopback, model_id: str, entry: dict, tmp_path: Path) -> Path:
    """Bake one manifest entry from the emulated hub `server` (closed afterwards); the baked folder."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": {model_id: entry}}))
    root = tmp_path / "weights"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_ENDPOINT", server.url)
            assert bake(root, manifest) == [model_id]
    finally:
        server.close()
    return root / model_id


@pytest.fixture
def hub(weights_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Loopback]:
    repos = {repo: HfRepo(_published(weights_dir / mid)) for mid, repo in REPOS.items()}
    server = hugging_face(repos)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.close()


def test_bake_end_to_end_then_idempotent(
    hub: Loopback, weights_dir: Path, tmp_path: Path, engine: Engine, capfd: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(_manifest(weights_dir)))
    root = tmp_path / "weights"
    assert sorted(bake(root, manifest)) == sorted(REPOS)
    baked = Engine.load(root)
    req = GenerationRequest(prompt="a lighthouse", num_inference_steps=2, seed=1)
    ours = np.asarray(baked.generate(req)[0].image)
    assert np.array_equal(ours, np.asarray(engine.generate(req)[0].image)), "baked weights are the source bytes"
    record = json.loads((root / "sdxl" / ".baked").read_text())
    assert record["files"]["unet/diffusion_pytorch_model.safetensors"]
    # "files" holds the bytes as fetched (what a pin must state), "written" what the bake changed.
    config = "tokenizer/tokenizer_config.json"
    assert record["files"][config] == hashlib.sha256(_published(weights_dir / "sdxl")[config]).hexdigest()
    assert record["written"][config] == hashlib.sha256((root / "sdxl" / config).read_bytes()).hexdigest()
    # The tokenizers came as vocab.json + merges.txt; the bake wrote the tokenizer.json setup reads.
    for name in ("tokenizer", "tokenizer_2"):
        written = root / "sdxl" / name / "tokenizer.json"
        assert record["written"][f"{name}/tokenizer.json"] == hashlib.sha256(written.read_bytes()).hexdigest()
        assert type(getattr(baked.models["sdxl"].txt2img, name)) is PreTrainedTokenizerFast
        assert "__type" not in (root / "sdxl" / name / "special_tokens_map.json").read_text()
        assert "added_tokens_decoder" in json.loads((root / "sdxl" / name / "tokenizer_config.json").read_text())
    out, err = capfd.readouterr()
    assert "Ignored unknown kwarg" not in out + err, "the tokenizers library's line for each __type key"
    served = hub.total()
    assert bake(root, manifest) == []
    assert hub.total() == served, "a second bake downloads nothing"
    assert not (root / ".staging" / "sdxl").exists()


def test_bake_resumes_after_a_failure(hub: Loopback, weights_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(_manifest(weights_dir)))
    root = tmp_path / "weights"
    unet = "/acme/sdxl-base/resolve/main/unet/diffusion_pytorch_model.safetensors"
    hub.faults[f"GET {unet}"] = [Reply(500)] * 5
    with pytest.raises(WeightsError, match="after 5 tries"):
        bake(root, manifest, only=["sdxl"])
    assert not (root / "sdxl").exists(), "nothing is installed half-baked"
    assert not list((root / ".staging").rglob("*.part"))
    before = {k: v for k, v in hub.hits.items() if k.startswith("GET") and k != f"GET {unet}"}
    assert before, "some files were complete before the failure"
    bake(root, manifest, only=["sdxl"])
    assert all(hub.hits[k] == v for k, v in before.items()), "complete files are not fetched again"
    assert hub.hits[f"GET {unet}"] == 6
    assert (root / "sdxl" / "model_index.json").is_file()


class _Stopped(Exception):
    """Stands for a bake killed at a chosen point."""


def test_a_bake_stopped_after_its_changes_leaves_the_staged_files_as_fetched(
    hub: Loopback, weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every change is made in a copy of hard links, so the staged files a resumed bake checks stay
    byte for byte as fetched even when the bake stops after changing its copy; the resumed bake
    then downloads nothing."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(_manifest(weights_dir)))
    root = tmp_path / "weights"

    def stop(folder: Path) -> bool:  # the bake's last change, after it rewrote the tokenizer configs
        raise _Stopped

    with monkeypatch.context() as mp:
        mp.setattr("scripts.bake.index_added_tokens", stop)
        with pytest.raises(_Stopped):
            bake(root, manifest, only=["sdxl"])
    build = root / ".staging" / "sdxl.build"
    config = "tokenizer/tokenizer_config.json"
    assert (build / "tokenizer" / "tokenizer.json").is_file(), "the copy was changed before the stop"
    published = _published(weights_dir / "sdxl")
    assert (build / config).read_bytes() != published[config]
    staged = root / ".staging" / "sdxl"
    assert {str(p.relative_to(staged)): p.read_bytes() for p in staged.rglob("*") if p.is_file()} == published
    assert not (root / "sdxl").exists(), "nothing is installed half-baked"
    served = hub.total()
    assert bake(root, manifest, only=["sdxl"]) == ["sdxl"]
    assert hub.total() == served, "the resumed bake fetched nothing again"
    assert "added_tokens_decoder" in json.loads((root / "sdxl" / config).read_text())


PROMPTS = [
    "a photo of a cat, (masterpiece:1.2), café naïve 東京 😀",
    "",
    "TOK <s0><s1> <|startoftext|>x<|endoftext|>",
    "Hello,World!!  \n\t tabs " * 30,
    "a" * 400,
]


def test_the_written_tokenizer_json_encodes_as_clip_tokenizer(weights_dir: Path, tmp_path: Path) -> None:
    """What setup reads (the tokenizers backend on the written tokenizer.json) gives the ids
    transformers' CLIPTokenizer gives from the published vocab.json + merges.txt, with two pivotal
    tokens added as the LoRA loader adds them."""
    for name in ("tokenizer", "tokenizer_2"):
        folder = tmp_path / name
        folder.mkdir()
        for rel, data in _legacy_tokenizer(weights_dir / "sdxl" / name).items():
            (folder / rel).write_bytes(data)
        published = CLIPTokenizer.from_pretrained(folder)
        prepare_tokenizer(folder)
        fast = PreTrainedTokenizerFast.from_pretrained(folder)
        for tok in (published, fast):
            tok.add_tokens(["<lora_0>", "<lora_1>"])
        for text in [*PROMPTS, "a <lora_0><lora_1> dog"]:
            for kwargs in ({}, {"padding": "max_length", "truncation": True, "max_length": 77}):
                assert fast(text, **kwargs).input_ids == published(text, **kwargs).input_ids, (name, text)
        assert (fast.pad_token, fast.model_max_length) == (published.pad_token, published.model_max_length)


@pytest.mark.parametrize("layout", ["published vocab.json + merges.txt", "transformers 5 save_pretrained"])
def test_indexing_the_added_tokens_loads_the_same_tokenizer(weights_dir: Path, tmp_path: Path, layout: str) -> None:
    """`added_tokens_decoder` in the config changes how a load finds the special tokens (no parse of
    tokenizer.json in Python), not what it finds."""
    for name in ("tokenizer", "tokenizer_2"):
        folder = tmp_path / name
        folder.mkdir()
        if layout.startswith("published"):
            for rel, data in _legacy_tokenizer(weights_dir / "sdxl" / name).items():
                (folder / rel).write_bytes(data)
            prepare_tokenizer(folder)
        else:
            saved = json.loads((weights_dir / "sdxl" / name / "tokenizer_config.json").read_text())
            saved.pop("added_tokens_decoder", None)
            shutil.copy(weights_dir / "sdxl" / name / "tokenizer.json", folder)
            (folder / "tokenizer_config.json").write_text(json.dumps(saved))
        before = PreTrainedTokenizerFast.from_pretrained(folder)
        assert index_added_tokens(folder)
        assert not index_added_tokens(folder), "a config already indexed is left as it is"
        after = PreTrainedTokenizerFast.from_pretrained(folder)
        assert json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
        for tok in (before, after):
            tok.add_tokens(["<lora_0>", "<lora_1>"])
        decoder = {i: t.__getstate__() for i, t in after.added_tokens_decoder.items()}
        assert decoder == {i: t.__getstate__() for i, t in before.added_tokens_decoder.items()}
        specials = ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length", "all_special_ids")
        assert [getattr(after, k) for k in specials] == [getattr(before, k) for k in specials]
        for text in [*PROMPTS, "a <lora_0><lora_1> dog"]:
            for kwargs in ({}, {"padding": "max_length", "truncation": True, "max_length": 77}):
                assert after(text, **kwargs).input_ids == before(text, **kwargs).input_ids, (name, text)


def test_weights_baked_without_tokenizer_json_still_load(engine: Engine, weights_dir: Path, tmp_path: Path) -> None:
    """A folder baked before the bake wrote tokenizer.json loads through diffusers' own class,
    to the same image."""
    root = tmp_path / "weights"
    shutil.copytree(weights_dir, root, ignore=shutil.ignore_patterns("tokenizer.json"))
    for model_id in ("sdxl", "illustrious-xl"):
        for name in ("tokenizer", "tokenizer_2"):
            for rel, content in _legacy_tokenizer(weights_dir / model_id / name).items():
                (root / model_id / name / rel).write_bytes(content)
    older = Engine.load(root)
    assert type(older.models["sdxl"].txt2img.tokenizer) is CLIPTokenizer
    req = GenerationRequest(prompt="a lighthouse at dusk, (storm:1.3)", num_inference_steps=2, seed=3)
    assert np.array_equal(np.asarray(older.generate(req)[0].image), np.asarray(engine.generate(req)[0].image))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sha256", "0" * 64, r"sha256 \w+ where the manifest says 0000"),
        ("size", 7, r"\d+ bytes where the manifest says 7"),
    ],
)
def test_bake_refuses_a_file_that_differs_from_the_manifest(
    hub: Loopback, weights_dir: Path, tmp_path: Path, field: str, value: object, message: str
) -> None:
    spec = _manifest(weights_dir)
    for f in spec["models"]["safety-checker"]["sources"][0]["files"]:
        if field in f:
            f[field] = value
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(spec))
    with pytest.raises(WeightsError, match=message):
        bake(tmp_path / "weights", manifest, only=["safety-checker"])
    assert not (tmp_path / "weights" / "safety-checker").exists()
    assert not list((tmp_path / "weights").rglob("*.safetensors*")), "nothing unverified is kept, even staged"


def test_a_staged_file_that_no_longer_matches_is_fetched_again(
    hub: Loopback, weights_dir: Path, tmp_path: Path
) -> None:
    """A file staged by an earlier bake is trusted only while it matches the manifest's pins."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(_manifest(weights_dir)))
    root = tmp_path / "weights"
    unet = "unet/diffusion_pytorch_model.safetensors"
    stale = root / ".staging" / "sdxl" / unet
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older pin's bytes")
    assert bake(root, manifest, only=["sdxl"]) == ["sdxl"]
    assert hub.hits[f"GET /acme/sdxl-base/resolve/main/{unet}"] == 1
    assert (root / "sdxl" / unet).read_bytes() == (weights_dir / "sdxl" / unet).read_bytes()


def test_dry_run_checks_the_real_manifest_without_network_or_torch(tmp_path: Path) -> None:
    """The dry run is a build-host check: it must work where torch/diffusers are not importable."""
    for heavy in ("torch", "diffusers"):
        (tmp_path / heavy).mkdir()
        (tmp_path / heavy / "__init__.py").write_text(f"raise ImportError('the dry run imported {heavy}')\n")
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "bake.py"), "--dry-run"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(tmp_path)},
        cwd=REPO_ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    manifest = json.loads(MANIFEST.read_text())
    for model_id, entry in manifest["models"].items():
        files = [f for s in entry["sources"] for f in s["files"]]
        assert f"{model_id}: " in out.stdout and f" of {len(files)} files pinned" in out.stdout
    sdxl = "stabilityai/stable-diffusion-xl-base-1.0@462165984030d82259a11f4367a4eed129e94a7b"
    assert (
        f"{sdxl}/unet/diffusion_pytorch_model.fp16.safetensors -> unet/diffusion_pytorch_model.safetensors "
        "[pinned, 5135149760 bytes]"
    ) in out.stdout
    assert (
        "pytorch_model.bin -> model.safetensors (converted from pytorch_model.bin at bake time) "
        "(stored in float16) [pinned" in out.stdout
    )
    assert "problem" not in out.stdout


def test_dry_run_says_what_is_pinned_and_why_not() -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    pins = {"size": 3, "sha256": "a" * 64}
    manifest = {
        "models": {
            "m": {
                "sources": [
                    {
                        "hf": "acme/m",
                        "revision": commit,
                        "files": [{"path": "w.safetensors", **pins}, {"path": "c.json"}],
                    },
                    {"hf": "acme/n", "files": [{"path": "x.safetensors", **pins}]},
                    {"url": "https://host/x.safetensors?token=secret", "files": [{"path": "u.safetensors", **pins}]},
                ]
            }
        }
    }
    lines = describe(manifest, None)
    assert lines == [
        f"m: acme/m@{commit}/w.safetensors -> w.safetensors [pinned, 3 bytes]",
        f"m: acme/m@{commit}/c.json -> c.json [not pinned: sha256 unknown, size unknown]",
        "m: acme/n@main/x.safetensors -> x.safetensors [not pinned: revision 'main' is not a commit]",
        "m: https://host/x.safetensors -> u.safetensors [pinned, 3 bytes]",
        "m: 2 of 4 files pinned",
    ]
    assert describe(manifest, ["other"]) == []


def test_manifest_typos_are_problems_before_any_download() -> None:
    files = [
        {"path": "a.safetensors", "sha256": "83E012A8", "size": "5.14 GB"},
        {"path": "b.bin", "safetensors": "b.bin"},
        {"path": "c.safetensors", "dtype": "fp16"},
        {"path": "d.json", "dtype": "float16"},
    ]
    problems = check_manifest({"models": {"m": {"sources": [{"hf": "acme/m", "files": files}]}}})
    assert problems == [
        "m: a.safetensors: sha256 is not 64 lowercase hex digits",
        "m: a.safetensors: size is not a byte count",
        "m: b.bin converts to b.bin, not a .safetensors name",
        "m: c.safetensors: 'dtype' is one of float16, for a .safetensors file",
        "m: d.json: 'dtype' is one of float16, for a .safetensors file",
    ]


def test_an_fp32_encoder_is_stored_in_fp16_and_its_fetched_bytes_stay_pinnable(
    weights_dir: Path, tmp_path: Path
) -> None:
    """The IP-Adapter's image encoder is fp32 on the hub and loads in fp16 on a GPU: the bake stores
    it in fp16 (half the bytes, no cast at setup). `.baked` keeps the sha256 of the bytes as
    fetched under "files" (what a pin in the manifest must state) and the stored one under
    "written"; the adapter, without "dtype", is installed as fetched."""
    source = weights_dir / "ip-adapter"
    served = {
        "models/image_encoder/config.json": (source / "image_encoder" / "config.json").read_bytes(),
        "models/image_encoder/model.safetensors": (source / "image_encoder" / "model.safetensors").read_bytes(),
        "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors": (
            source / "ip-adapter-plus_sdxl_vit-h.safetensors"
        ).read_bytes(),
    }
    server = hugging_face({"acme/ip": HfRepo(served)})
    files = [
        {
            "path": "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
            "target": "ip-adapter-plus_sdxl_vit-h.safetensors",
        },
        {"path": "models/image_encoder/config.json", "target": "image_encoder/config.json"},
        {
            "path": "models/image_encoder/model.safetensors",
            "target": "image_encoder/model.safetensors",
            "dtype": "float16",
        },
    ]
    baked = _bake_one(server, "ip-adapter", {"sources": [{"hf": "acme/ip", "files": files}]}, tmp_path)
    encoder = "image_encoder/model.safetensors"
    fetched = load_file(source / encoder)
    stored = load_file(baked / encoder)
    assert all(v.dtype == torch.float32 for v in fetched.values())
    assert stored.keys() == fetched.keys() and all(torch.equal(stored[k], fetched[k].half()) for k in fetched)
    record = json.loads((baked / ".baked").read_text())
    assert record["files"][encoder] == hashlib.sha256(served[f"models/{encoder}"]).hexdigest()
    assert record["written"][encoder] == hashlib.sha256((baked / encoder).read_bytes()).hexdigest()
    adapter = "ip-adapter-plus_sdxl_vit-h.safetensors"
    assert (baked / adapter).read_bytes() == served[f"sdxl_models/{adapter}"]


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_a_pickled_checker_is_converted_to_safetensors_once(
    weights_dir: Path, tmp_path: Path, dtype: str | None
) -> None:
    """The checker's hub branch holds only pytorch_model.bin: the bake verifies it, converts it, and
    installs only model.safetensors, which the engine's loader reads; with `"dtype": "float16"`
    (as the real manifest says: fp32 on the hub, fp16 on a GPU) its floating tensors are stored in fp16."""
    source = weights_dir / "safety-checker"
    state = load_file(source / "model.safetensors")
    pickled = tmp_path / "pytorch_model.bin"
    torch.save(state, pickled)
    blob = pickled.read_bytes()
    files = {name: (source / name).read_bytes() for name in ("config.json", "preprocessor_config.json")}
    repo = HfRepo({**files, "pytorch_model.bin": blob})
    server = hugging_face({"acme/checker": repo})
    pins = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    checker_files = [
        {"path": "config.json"},
        {
            "path": "pytorch_model.bin",
            "safetensors": "model.safetensors",
            **pins,
            **({"dtype": dtype} if dtype else {}),
        },
        {"path": "preprocessor_config.json"},
    ]
    entry = {"sources": [{"hf": "acme/checker", "revision": repo.commit, "files": checker_files}]}
    baked = _bake_one(server, "safety-checker", entry, tmp_path)
    assert sorted(p.name for p in baked.iterdir()) == [
        ".baked",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    converted = load_file(baked / "model.safetensors")
    expected = {k: v.half() if dtype and v.is_floating_point() else v for k, v in state.items()}
    assert any(v.dtype == torch.float32 for v in state.values()), "the source is fp32, as on the hub"
    assert converted.keys() == state.keys()
    assert all(converted[k].dtype == expected[k].dtype and torch.equal(converted[k], expected[k]) for k in state)
    record = json.loads((baked / ".baked").read_text())
    assert record["files"]["pytorch_model.bin"] == pins["sha256"]
    stored = hashlib.sha256((baked / "model.safetensors").read_bytes()).hexdigest()
    assert record["written"]["model.safetensors"] == stored
    checker = SafetyChecker(baked, torch.device("cpu"), torch.float32)
    assert checker.flags([Image.new("RGB", (64, 64), "white")]) == [False]


class _Payload:
    """Pickles as a call to Path.touch: loading it with plain pickle would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_pickle_that_carries_code_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    src = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, src)
    with pytest.raises(WeightsError, match="holds more than tensors"):
        to_safetensors(src, tmp_path / "model.safetensors", "acme/checker@main/pytorch_model.bin")
    assert not marker.exists()
    assert not list(tmp_path.glob("model.safetensors*"))


def test_tensors_that_share_storage_convert(tmp_path: Path) -> None:
    """torch.save keeps views of one storage; safetensors refuses those, so each is copied."""
    base = torch.arange(6, dtype=torch.float32)
    src = tmp_path / "shared.bin"
    torch.save({"all": base, "head": base[:3], "strided": base[::2]}, src)
    to_safetensors(src, tmp_path / "shared.safetensors", "shared.bin")
    out = load_file(tmp_path / "shared.safetensors")
    assert out["head"].tolist() == [0, 1, 2] and out["strided"].tolist() == [0, 2, 4] and out["all"].shape == (6,)


def test_single_file_checkpoint_is_converted_once_at_bake_time(weights_dir: Path, tmp_path: Path) -> None:
    """Illustrious ships as one SGM-layout file: the bake converts it with a config folder."""
    source = StableDiffusionXLPipeline.from_pretrained(weights_dir / "illustrious-xl")
    checkpoint = save(to_original(source))
    config = tmp_path / "config"
    shutil.copytree(weights_dir / "illustrious-xl", config, ignore=shutil.ignore_patterns("*.safetensors"))
    vae = {p.name: p.read_bytes() for p in (weights_dir / "sdxl" / "vae").iterdir()}
    server = hugging_face(
        {"acme/illustrious-single": HfRepo({"Illustrious.safetensors": checkpoint}), "acme/vae-fix": HfRepo(vae)}
    )
    upcast_off = {"force_upcast": False}
    entry = {
        "sources": [
            {
                "hf": "acme/illustrious-single",
                "files": [{"path": "Illustrious.safetensors", "target": "checkpoint.safetensors"}],
            },
            {
                "hf": "acme/vae-fix",
                "files": [
                    {"path": name, "target": f"vae/{name}", **({"set": upcast_off} if ".json" in name else {})}
                    for name in vae
                ],
            },
        ],
        "single_file": {"checkpoint": "checkpoint.safetensors", "config": str(config)},
    }
    folder = _bake_one(server, "illustrious-xl", entry, tmp_path)
    baked = StableDiffusionXLPipeline.from_pretrained(folder)
    assert not (folder / "checkpoint.safetensors").exists(), "only the converted folder is kept"
    for name in ("unet", "text_encoder", "text_encoder_2"):
        want = {k: v.half() for k, v in getattr(source, name).state_dict().items()}
        got = getattr(baked, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k].half()) for k in want), name
    stored = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}, "baked as fp16, as real runs load it"
    sdxl_vae = StableDiffusionXLPipeline.from_pretrained(weights_dir / "sdxl").vae.state_dict()
    assert all(torch.equal(v.half(), baked.vae.state_dict()[k]) for k, v in sdxl_vae.items()), "the VAE override"
    assert json.loads((weights_dir / "sdxl" / "vae" / "config.json").read_text())["force_upcast"]
    assert baked.vae.config.force_upcast is False, "the fp16-fix VAE decodes in fp16, no upcast"


def test_custom_checkpoint_by_url(
    weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: Engine
) -> None:
    """CUSTOM_CHECKPOINT_URL bakes a single-file checkpoint as model 'custom', selectable per request."""
    req = GenerationRequest(prompt="a lighthouse", num_inference_steps=2, seed=1, model="custom")
    with pytest.raises(InputError, match="no custom checkpoint is baked"):
        engine.generate(req)
    source = StableDiffusionXLPipeline.from_pretrained(weights_dir / "sdxl")
    host = file_host({"my-checkpoint.safetensors": save(to_original(source))})
    monkeypatch.setenv("CUSTOM_CHECKPOINT_URL", host.url + "/my-checkpoint.safetensors?token=secret123")
    config = tmp_path / "config"
    shutil.copytree(weights_dir / "sdxl", config, ignore=shutil.ignore_patterns("*.safetensors"))
    monkeypatch.setenv("CUSTOM_CHECKPOINT_CONFIG", str(config))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": {}}))
    root = tmp_path / "weights"
    try:
        assert bake(root, manifest) == ["custom"]
    finally:
        host.close()
    assert "secret123" not in (root / "custom" / ".baked").read_text()
    for model_id in ("illustrious-xl", "sdxl", "safety-checker"):
        shutil.copytree(weights_dir / model_id, root / model_id)
    [result] = Engine.load(root).generate(req)
    assert result.image.size == (128, 128) and result.parameters.model == "custom"
