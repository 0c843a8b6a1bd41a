"""Bake the base weights listed in bake/manifest.json into $WEIGHTS_DIR (default ./weights).

Run it before `cog build` on the build host (see README, "Weights"), so the multi-GB files sit
in their own layer of the image and `setup()` never touches a network.

- `--dry-run` lists every file with its source and whether it is pinned (a commit revision, a
  stated size and sha256), checks the manifest, and fetches and imports nothing heavy (torch
  and diffusers are imported only where a real bake converts a file).
- Downloads go through weights.download: pget when it is on PATH, else one Python stream.
- Each file is verified against the manifest's size and sha256 when they are stated (the size
  first, so a wrong file is refused without reading it); the sha256 of everything fetched is
  recorded in weights/<id>/.baked either way ("files"), and of what the bake changed or wrote
  ("written"), so the fetched values can be copied into the manifest as pins.
- Idempotent: a model whose .baked matches its manifest entry is skipped, with no request.
- Resumable: files are staged in weights/.staging/<id>/ and each appears only once complete,
  so a killed bake continues where it stopped; a staged file that no longer matches the
  manifest is fetched again; a model folder is installed by one rename.
- A JSON file with `"set": {...}` gets those keys written after the download (the fp16-fix VAE's
  config says `force_upcast: false`, so fp16 runs decode without a float32 copy of the VAE).
- A pickled torch file with `"safetensors": NAME` is converted once, tensors only, to NAME;
  only the converted file is installed.
- A file (or a pickle's converted NAME) with `"dtype": "float16"` has its floating tensors stored
  in fp16, the dtype setup loads them in on a GPU: half the bytes to read and no cast at each start
  (the safety checker and the IP-Adapter's image encoder are fp32 on the hub).
- CLIP tokenizers published as vocab.json + merges.txt (SDXL's) get a tokenizer.json written
  beside them, which setup reads in Rust instead of rebuilding the vocabulary in Python, and their
  configs lose the `"__type"` keys the tokenizers library prints a line about at every start.
  Every tokenizer config then lists its added tokens (`added_tokens_decoder`), so a load does not
  parse the whole tokenizer.json in Python to find them.
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
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import CUSTOM_MODEL_ID, REPO_ROOT, weights_root
from weights import WeightsError, display_url, download, hf_endpoint

MANIFEST = REPO_ROOT / "bake" / "manifest.json"
COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")
STORED_DTYPES = ("float16",)  # what "dtype" may ask for: the dtype setup loads weights in on a GPU
log = logging.getLogger("bake")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def entry_digest(entry: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def source_name(source: dict[str, Any], path: str) -> str:
    """How a file is shown in logs, errors and the dry run: repo@revision/path, or the URL without
    its query (which may carry a token or a signature)."""
    if "url" in source:
        return display_url(source["url"])
    return f"{source['hf']}@{source.get('revision', 'main')}/{path}"


def pin_gaps(source: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """What keeps a file from being pinned: a hub revision that is not a commit (a branch moves),
    an unstated sha256 or size. An empty list means the bake gets exactly the bytes recorded."""
    gaps = []
    revision = source.get("revision", "main")
    if "hf" in source and not COMMIT.fullmatch(revision):
        gaps.append(f"revision {revision!r} is not a commit")
    if not spec.get("sha256"):
        gaps.append("sha256 unknown")
    if spec.get("size") is None:
        gaps.append("size unknown")
    return gaps


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


def describe(manifest: dict[str, Any], only: list[str] | None) -> list[str]:
    """The dry run's report: one line per file (source, target, pinned or why not), one per model."""
    lines = []
    for model_id, entry in manifest["models"].items():
        if only and model_id not in only:
            continue
        pinned = total = 0
        for source in entry["sources"]:
            for f in source["files"]:
                gaps = pin_gaps(source, f)
                target = f.get("target") or f["path"]
                if f.get("safetensors"):
                    target = f"{f['safetensors']} (converted from {target} at bake time)"
                if f.get("set"):
                    target = f"{target} (with {json.dumps(f['set'])})"
                if f.get("dtype"):
                    target = f"{target} (stored in {f['dtype']})"
                status = f"not pinned: {', '.join(gaps)}" if gaps else f"pinned, {f['size']} bytes"
                lines.append(f"{model_id}: {source_name(source, f['path'])} -> {target} [{status}]")
                pinned, total = pinned + (not gaps), total + 1
        lines.append(f"{model_id}: {pinned} of {total} files pinned")
    return lines


def check_manifest(manifest: dict[str, Any]) -> list[str]:
    """Problems a bake would hit before any download: missing config folders, bad entries."""
    problems = []
    for model_id, entry in manifest["models"].items():
        if not entry.get("sources"):
            problems.append(f"{model_id}: no sources")
        for f in (f for s in entry.get("sources", []) for f in s["files"]):
            if f.get("sha256") and not SHA256.fullmatch(f["sha256"]):
                problems.append(f"{model_id}: {f['path']}: sha256 is not 64 lowercase hex digits")
            if f.get("size") is not None and (not isinstance(f["size"], int) or f["size"] < 0):
                problems.append(f"{model_id}: {f['path']}: size is not a byte count")
            if f.get("set") is not None and not (isinstance(f["set"], dict) and f["path"].endswith(".json")):
                problems.append(f"{model_id}: {f['path']}: 'set' is for keys of a .json file")
            if f.get("safetensors") and not f["safetensors"].endswith(".safetensors"):
                problems.append(f"{model_id}: {f['path']} converts to {f['safetensors']}, not a .safetensors name")
            if f.get("dtype") is not None:
                stored = f.get("safetensors") or f.get("target") or f["path"]
                if f["dtype"] not in STORED_DTYPES or not stored.endswith(".safetensors"):
                    allowed = ", ".join(STORED_DTYPES)
                    problems.append(f"{model_id}: {f['path']}: 'dtype' is one of {allowed}, for a .safetensors file")
        single = entry.get("single_file")
        if single:
            config = REPO_ROOT / single["config"]
            if not (config / "model_index.json").is_file():
                problems.append(f"{model_id}: config folder {single['config']} has no model_index.json")
            targets = {f.get("target") or f["path"] for s in entry["sources"] for f in s["files"]}
            if single["checkpoint"] not in targets:
                problems.append(f"{model_id}: checkpoint {single['checkpoint']} is not among its files")
    return problems


def check_file(path: Path, spec: dict[str, Any], name: str) -> tuple[str, str | None]:
    """(sha256, None) when the file is what the manifest states, else (sha256 or "", the problem).
    The size is compared first, so a wrong file is refused without reading it."""
    size = path.stat().st_size
    if spec.get("size") is not None and size != spec["size"]:
        return "", f"{name}: {size} bytes where the manifest says {spec['size']}"
    digest = sha256_of(path)
    if spec.get("sha256") and digest != spec["sha256"]:
        return digest, f"{name}: sha256 {digest} where the manifest says {spec['sha256']}"
    return digest, None


def _fetch(source: dict[str, Any], spec: dict[str, Any], target: Path, name: str) -> str:
    """Download into target (via .part), verify what the manifest states, return the sha256."""
    if "url" in source:
        url = source["url"]
    else:
        url = f"{hf_endpoint()}/{source['hf']}/resolve/{source.get('revision', 'main')}/{spec['path']}"
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    service, token = (
        ("CivitAI", os.environ.get("CIVITAI_API_TOKEN"))
        if "civitai" in url
        else ("Hugging Face", os.environ.get("HF_TOKEN"))
    )
    try:
        download(url, part, {"Authorization": f"Bearer {token}"} if token else {}, name, service)
        digest, problem = check_file(part, spec, name)
        if problem:
            raise WeightsError(problem)
        os.replace(part, target)
        return digest
    finally:
        part.unlink(missing_ok=True)


def to_safetensors(src: Path, dest: Path, name: str) -> None:
    """A pickled torch state dict rewritten as safetensors. weights_only=True unpickles tensors and
    plain containers only, so a file that carries code is refused instead of run."""
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(f"{name} holds more than tensors, refusing to unpickle it: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{name} is not a state dict of tensors")
    part = dest.with_name(dest.name + ".part")
    # A contiguous copy of each: safetensors refuses tensors that share storage, which torch.save keeps.
    tensors = {k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    save_file(tensors, str(part), metadata={"format": "pt"})
    os.replace(part, dest)


def to_dtype(path: Path, dtype_name: str) -> None:
    """A safetensors file with its floating tensors stored in `dtype_name` (other tensors, such as
    position ids, as they are), its metadata kept; a file already in that dtype is left alone."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    dtype = getattr(torch, dtype_name)
    tensors = load_file(str(path))
    if all(t.dtype == dtype for t in tensors.values() if t.is_floating_point()):
        return
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    part = path.with_name(path.name + ".part")
    save_file({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}, str(part), metadata)
    os.replace(part, path)


def prepare_tokenizer(folder: Path) -> list[str]:
    """A CLIP tokenizer published as vocab.json + merges.txt (SDXL's two) made quick and quiet to
    load: the `"__type": "AddedToken"` keys of its JSON configs dropped (transformers ignores them
    and the tokenizers library prints "Ignored unknown kwarg option __type" for each, at every
    start), then the tokenizer.json written that setup reads in Rust, as transformers'
    CLIPTokenizer builds it. Returns the names of the files it wrote."""
    from transformers import CLIPTokenizer

    written = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            cleaned = {k: _without_type(v) for k, v in config.items()}
            if cleaned != config:
                _write_json(path, cleaned)
                written.append(name)
    part = folder / "tokenizer.json.part"
    CLIPTokenizer.from_pretrained(folder, local_files_only=True).backend_tokenizer.save(str(part))
    os.replace(part, folder / "tokenizer.json")
    return [*written, "tokenizer.json"]


_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def index_added_tokens(folder: Path) -> bool:
    """Write a fast tokenizer's added tokens into its tokenizer_config.json as
    `added_tokens_decoder` (with the special tokens they stand for), the form transformers has saved
    since 4.34 and transformers 5 no longer writes: without that key, every load parses the whole
    tokenizer.json in Python (3.6 MB for CLIP, about 0.06 s; four tokenizers per setup) only to find
    those tokens. The values are the loaded tokenizer's own, so a load reads the same tokenizer.
    True when it wrote the config; a folder without tokenizer.json, or already indexed, is left."""
    from transformers import PreTrainedTokenizerFast

    path = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not path.is_file():
        return False
    config = json.loads(path.read_text())
    if "added_tokens_decoder" in config:
        return False
    loaded = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    special = {k: str(getattr(loaded, k)) for k in _SPECIAL_TOKENS if getattr(loaded, k) is not None}
    added = {str(i): token.__getstate__() for i, token in sorted(loaded.added_tokens_decoder.items())}
    _write_json(path, {**config, **special, "added_tokens_decoder": added})
    return True


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace a JSON file whole: a killed bake never leaves half a config."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(data, indent=2))
    os.replace(part, path)


def _without_type(value: Any) -> Any:
    return {k: v for k, v in value.items() if k != "__type"} if isinstance(value, dict) else value


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
            key = str(target.relative_to(staging))
            name = source_name(source, f["path"])
            if target.is_file():  # complete: files only appear here by rename, once verified
                record[key], problem = check_file(target, f, name)
                if problem is None:
                    continue
                log.info("%s: staged file no longer matches the manifest (%s); fetching again", model_id, problem)
                target.unlink()
            log.info("%s: fetching %s", model_id, name)
            record[key] = _fetch(source, f, target, name)
    # Everything the bake changes or adds happens in a copy made of hard links: a changed file is
    # written anew and replaces its link, so the staged files stay as fetched (a resumed bake
    # checks them against the manifest) and `record` holds the fetched bytes' sha256s to pin.
    built = root / ".staging" / f"{model_id}.build"
    shutil.rmtree(built, ignore_errors=True)
    shutil.copytree(staging, built, copy_function=os.link)
    written: dict[str, str] = {}
    for f in (f for source in entry["sources"] for f in source["files"] if f.get("set")):
        target = built / (f.get("target") or f["path"])
        config = json.loads(target.read_text())
        if any(config.get(k) != v for k, v in f["set"].items()):
            log.info("%s: setting %s in %s", model_id, json.dumps(f["set"]), target.name)
            _write_json(target, {**config, **f["set"]})
            written[str(target.relative_to(built))] = sha256_of(target)
    for folder in sorted(built.glob("tokenizer*/")):
        # Not when the source ships its own tokenizer.json (it is among the fetched files then).
        if (folder / "vocab.json").is_file() and f"{folder.name}/tokenizer.json" not in record:
            log.info("%s: preparing %s (tokenizer.json for setup)", model_id, folder.name)
            for name in prepare_tokenizer(folder):
                written[f"{folder.name}/{name}"] = sha256_of(folder / name)
    for source in entry["sources"]:
        for f in (f for f in source["files"] if f.get("safetensors")):
            pickled = built / (f.get("target") or f["path"])
            log.info("%s: converting %s to %s", model_id, f["path"], f["safetensors"])
            to_safetensors(pickled, built / f["safetensors"], source_name(source, f["path"]))
            pickled.unlink()  # only the safetensors copy is installed
            written[f["safetensors"]] = sha256_of(built / f["safetensors"])
    for f in (f for source in entry["sources"] for f in source["files"] if f.get("dtype")):
        stored = f.get("safetensors") or f.get("target") or f["path"]
        log.info("%s: storing %s in %s", model_id, stored, f["dtype"])
        to_dtype(built / stored, f["dtype"])
        written[stored] = sha256_of(built / stored)
    if entry.get("single_file"):
        converted = _convert(built, entry["single_file"], root / ".staging" / f"{model_id}.converted")
        shutil.rmtree(built)
        built = converted
    for folder in sorted(built.glob("tokenizer*/")):
        if index_added_tokens(folder):
            written[f"{folder.name}/tokenizer_config.json"] = sha256_of(folder / "tokenizer_config.json")
    (built / ".baked").write_text(json.dumps({"manifest": digest, "files": record, "written": written}, indent=1))
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
        dtype=torch.float16,
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
    parser.add_argument("--dry-run", action="store_true", help="say what would be fetched and what is pinned")
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--only", nargs="*", help="model ids to bake (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = with_custom_checkpoint(json.loads(args.manifest.read_text()))
    if args.dry_run:
        print("\n".join(describe(manifest, args.only)))
        problems = check_manifest(manifest)
        for problem in problems:
            print(f"problem: {problem}")
        sys.exit(1 if problems else 0)
    baked = bake(weights_root(), args.manifest, args.only)
    print(f"baked: {', '.join(baked) or 'nothing (all up to date)'}")


if __name__ == "__main__":
    main()
