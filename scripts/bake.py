"""Bake the base weights listed in bake/manifest.json into $WEIGHTS_DIR (default ./weights).

Run it before `cog build` on the build host (see README, "Weights"), so the multi-GB files sit
in their own layer of the image and `setup()` never touches a network.

- Downloads go through weights.download: pget when it is on PATH, else the Python downloader.
- Each file is verified against the manifest's size and sha256 when they are stated; the
  sha256 of everything fetched is recorded in weights/<id>/.baked either way.
- Idempotent: a model whose .baked matches its manifest entry is skipped, with no request.
- Resumable: files are staged in weights/.staging/<id>/ and each appears only once complete,
  so a killed bake continues where it stopped; a model folder is installed by one rename.
- Single-file checkpoints are converted once, here, with a config folder shipped in the repo
  (`from_single_file` converts at every load, so run time must not pay for it).

Usage: python scripts/bake.py [--dry-run] [--manifest PATH] [--only ID ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import CUSTOM_MODEL_ID, REPO_ROOT, weights_root
from weights import WeightsError, download, hf_endpoint, redact_url

MANIFEST = REPO_ROOT / "bake" / "manifest.json"
log = logging.getLogger("bake")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def entry_digest(entry: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def file_url(source: dict[str, Any], path: str) -> str:
    """A Hugging Face file, or a source given by plain URL (one file)."""
    if "url" in source:
        return source["url"]
    return f"{hf_endpoint()}/{source['hf']}/resolve/{source.get('revision', 'main')}/{path}"


def with_custom_checkpoint(manifest: dict[str, Any]) -> dict[str, Any]:
    """CUSTOM_CHECKPOINT_URL adds model 'custom': an SDXL-family single file (a CivitAI checkpoint,
    say), baked like Illustrious: converted with the SDXL config folder (or CUSTOM_CHECKPOINT_CONFIG)
    and the fp16-fix VAE."""
    url = os.environ.get("CUSTOM_CHECKPOINT_URL")
    if not url:
        return manifest
    vae = next(
        ([s] for entry in manifest["models"].values() for s in entry["sources"]
         if any((f.get("target") or "").startswith("vae/") for f in s["files"])),
        [],
    )  # fmt: skip
    custom = {
        "sources": [{"url": url, "files": [{"path": "checkpoint.safetensors"}]}, *vae],
        # Another config folder for checkpoints that differ from SDXL base (a v-prediction one, say).
        "single_file": {
            "checkpoint": "checkpoint.safetensors",
            "config": os.environ.get("CUSTOM_CHECKPOINT_CONFIG") or "bake/configs/sdxl",
        },
    }
    return {**manifest, "models": {**manifest["models"], CUSTOM_MODEL_ID: custom}}


def plan(manifest: dict[str, Any], only: list[str] | None) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(model id, url, target inside the model folder, file entry) for every file to fetch."""
    rows = []
    for model_id, entry in manifest["models"].items():
        if only and model_id not in only:
            continue
        for source in entry["sources"]:
            for f in source["files"]:
                rows.append((model_id, file_url(source, f["path"]), f.get("target") or f["path"], f))
    return rows


def check_manifest(manifest: dict[str, Any]) -> list[str]:
    """Problems a bake would hit before any download: missing config folders, bad entries."""
    problems = []
    for model_id, entry in manifest["models"].items():
        if not entry.get("sources"):
            problems.append(f"{model_id}: no sources")
        single = entry.get("single_file")
        if single:
            config = REPO_ROOT / single["config"]
            if not (config / "model_index.json").is_file():
                problems.append(f"{model_id}: config folder {single['config']} has no model_index.json")
            targets = {f.get("target") or f["path"] for s in entry["sources"] for f in s["files"]}
            if single["checkpoint"] not in targets:
                problems.append(f"{model_id}: checkpoint {single['checkpoint']} is not among its files")
    return problems


def _fetch(url: str, target: Path, spec: dict[str, Any], name: str) -> str:
    """Download into target (via .part), verify what the manifest states, return the sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    service, token = (
        ("CivitAI", os.environ.get("CIVITAI_API_TOKEN"))
        if "civitai" in url
        else ("Hugging Face", os.environ.get("HF_TOKEN"))
    )
    try:
        download(url, part, {"Authorization": f"Bearer {token}"} if token else {}, name, service)
        size, digest = part.stat().st_size, sha256_of(part)
        if spec.get("size") is not None and size != spec["size"]:
            raise WeightsError(f"{name}: {size} bytes where the manifest says {spec['size']}")
        if spec.get("sha256") and digest != spec["sha256"]:
            raise WeightsError(f"{name}: sha256 {digest} where the manifest says {spec['sha256']}")
        os.replace(part, target)
        return digest
    finally:
        part.unlink(missing_ok=True)


def bake_model(model_id: str, entry: dict[str, Any], root: Path) -> bool:
    """Bake one model folder; False when it is already baked from this very manifest entry."""
    final = root / model_id
    marker = final / ".baked"
    digest = entry_digest(entry)
    if marker.is_file() and json.loads(marker.read_text()).get("manifest") == digest:
        log.info("%s: already baked", model_id)
        return False
    staging = root / ".staging" / model_id
    record: dict[str, str] = {}
    for source in entry["sources"]:
        for f in source["files"]:
            target = staging / (f.get("target") or f["path"])
            name = redact_url(source["url"]) if "url" in source else f"{source['hf']}/{f['path']}"
            if target.is_file():  # complete: files only appear here by rename
                record[str(target.relative_to(staging))] = sha256_of(target)
                continue
            log.info("%s: fetching %s", model_id, name)
            record[str(target.relative_to(staging))] = _fetch(file_url(source, f["path"]), target, f, name)
    built = staging
    if entry.get("single_file"):
        built = _convert(staging, entry["single_file"], root / ".staging" / f"{model_id}.converted")
    (built / ".baked").write_text(json.dumps({"manifest": digest, "files": record}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(built, final)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: baked into %s", model_id, final)
    return True


def _convert(staging: Path, single: dict[str, str], out: Path) -> Path:
    """A single-file SDXL checkpoint to a diffusers folder, fp16, with the staged VAE if any."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(
        str(staging / single["checkpoint"]),
        config=str(REPO_ROOT / single["config"]),
        local_files_only=True,
        torch_dtype=torch.float16,
    )
    if (staging / "vae" / "config.json").is_file():
        pipe.vae = AutoencoderKL.from_pretrained(staging / "vae", dtype=torch.float16)
    shutil.rmtree(out, ignore_errors=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def bake(root: Path, manifest_path: Path = MANIFEST, only: list[str] | None = None) -> list[str]:
    manifest = with_custom_checkpoint(json.loads(manifest_path.read_text()))
    problems = check_manifest(manifest)
    if problems:
        raise WeightsError("manifest problems: " + "; ".join(problems))
    return [
        model_id
        for model_id, entry in manifest["models"].items()
        if (not only or model_id in only) and bake_model(model_id, entry, root)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched; check the manifest")
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--only", nargs="*", help="model ids to bake (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = with_custom_checkpoint(json.loads(args.manifest.read_text()))
    if args.dry_run:
        for model_id, url, target, spec in plan(manifest, args.only):
            stated = f"size={spec.get('size')} sha256={spec.get('sha256') or 'unstated'}"
            print(f"{model_id}: {redact_url(url)} -> {target} ({stated})")
        problems = check_manifest(manifest)
        for problem in problems:
            print(f"problem: {problem}")
        sys.exit(1 if problems else 0)
    baked = bake(weights_root(), args.manifest, args.only)
    print(f"baked: {', '.join(baked) or 'nothing (all up to date)'}")


if __name__ == "__main__":
    main()
