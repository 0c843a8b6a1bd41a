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
from safetensors.torch import load_file, save

from engine.config import REPO_ROOT
from engine.errors import InputError
from engine.generator import Engine
from engine.request import GenerationRequest
from scripts.bake import MANIFEST, bake
from test_folder.emulators import HfRepo, Loopback, Reply, file_host, hugging_face
from test_folder.single_file import to_original
from weights import WeightsError

REPOS = {"sdxl": "acme/sdxl-base", "illustrious-xl": "acme/illustrious", "safety-checker": "acme/checker"}


def _manifest(weights_dir: Path, sizes: bool = True) -> dict:
    """The shape of bake/manifest.json, listing the tiny folders' files, sizes and sha256s."""
    models = {}
    for model_id, repo in REPOS.items():
        files = []
        for path in sorted(p for p in (weights_dir / model_id).rglob("*") if p.is_file()):
            rel = str(path.relative_to(weights_dir / model_id))
            spec: dict = {"path": rel}
            if sizes and rel.endswith(".safetensors"):
                spec.update(size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
            files.append(spec)
        models[model_id] = {"sources": [{"hf": repo, "revision": "main", "files": files}]}
    return {"models": models}


@pytest.fixture
def hub(weights_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Loopback]:
    repos = {
        repo: HfRepo(
            {
                str(p.relative_to(weights_dir / mid)): p.read_bytes()
                for p in (weights_dir / mid).rglob("*")
                if p.is_file()
            }
        )
        for mid, repo in REPOS.items()
    }
    server = hugging_face(repos)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.close()


def test_bake_end_to_end_then_idempotent(hub: Loopback, weights_dir: Path, tmp_path: Path, engine: Engine) -> None:
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


def test_bake_refuses_a_wrong_checksum(hub: Loopback, weights_dir: Path, tmp_path: Path) -> None:
    spec = _manifest(weights_dir)
    for f in spec["models"]["safety-checker"]["sources"][0]["files"]:
        if "sha256" in f:
            f["sha256"] = "0" * 64
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(spec))
    with pytest.raises(WeightsError, match=r"sha256 .* where the manifest says 0000"):
        bake(tmp_path / "weights", manifest, only=["safety-checker"])
    assert not (tmp_path / "weights" / "safety-checker").exists()


def test_dry_run_checks_the_real_manifest_without_network() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "bake.py"), "--dry-run"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HF_ENDPOINT": "http://127.0.0.1:9"},
        cwd=REPO_ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    manifest = json.loads(MANIFEST.read_text())
    for model_id in manifest["models"]:
        assert f"{model_id}: http://127.0.0.1:9/" in out.stdout
    assert "unet/diffusion_pytorch_model.fp16.safetensors -> unet/diffusion_pytorch_model.safetensors" in out.stdout
    assert "problem" not in out.stdout


def test_single_file_checkpoint_is_converted_once_at_bake_time(
    weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Illustrious ships as one SGM-layout file: the bake converts it with a config folder."""
    source = StableDiffusionXLPipeline.from_pretrained(weights_dir / "illustrious-xl")
    checkpoint = save(to_original(source))
    config = tmp_path / "config"
    shutil.copytree(weights_dir / "illustrious-xl", config, ignore=shutil.ignore_patterns("*.safetensors"))
    vae = {p.name: p.read_bytes() for p in (weights_dir / "sdxl" / "vae").iterdir()}
    server = hugging_face(
        {"acme/illustrious-single": HfRepo({"Illustrious.safetensors": checkpoint}), "acme/vae-fix": HfRepo(vae)}
    )
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    manifest = tmp_path / "manifest.json"
    entry = {
        "sources": [
            {
                "hf": "acme/illustrious-single",
                "files": [{"path": "Illustrious.safetensors", "target": "checkpoint.safetensors"}],
            },
            {"hf": "acme/vae-fix", "files": [{"path": name, "target": f"vae/{name}"} for name in vae]},
        ],
        "single_file": {"checkpoint": "checkpoint.safetensors", "config": str(config)},
    }
    manifest.write_text(json.dumps({"models": {"illustrious-xl": entry}}))
    root = tmp_path / "weights"
    try:
        assert bake(root, manifest) == ["illustrious-xl"]
    finally:
        server.close()
    baked = StableDiffusionXLPipeline.from_pretrained(root / "illustrious-xl")
    assert not (root / "illustrious-xl" / "checkpoint.safetensors").exists(), "only the converted folder is kept"
    for name in ("unet", "text_encoder", "text_encoder_2"):
        want = {k: v.half() for k, v in getattr(source, name).state_dict().items()}
        got = getattr(baked, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k].half()) for k in want), name
    stored = load_file(root / "illustrious-xl" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}, "baked as fp16, as real runs load it"
    sdxl_vae = StableDiffusionXLPipeline.from_pretrained(weights_dir / "sdxl").vae.state_dict()
    assert all(torch.equal(v.half(), baked.vae.state_dict()[k]) for k, v in sdxl_vae.items()), "the VAE override"


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
