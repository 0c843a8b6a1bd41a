"""CivitAI: from a model page, version id, AIR URN or file hash to one version's .safetensors file.

A model page id is not a version id: the public API (`/api/v1/models/<id>`) lists the versions,
newest first, and the newest one made for an SDXL-family base is taken. A version made for
another base model (SD 1.5, Flux ...) is refused before any download.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import requests

from weightstore import config
from weightstore.errors import WeightsError
from weightstore.refs import LoraRef, Resolved
from weightstore.transfer import Downloader, check_response, retrying


def civitai_token(token: str | None) -> str | None:
    """The caller's token, else the deployment's CIVITAI_API_TOKEN, else none."""
    return token or config.deployment_civitai_token()


def resolve_civitai(ref: LoraRef, token: str | None, downloader: Downloader) -> Resolved:
    token = civitai_token(token)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if ref.kind == "civitai-model":
        model = _get(f"/api/v1/models/{ref.model_id}", headers, ref.display, downloader)
        versions = model.get("modelVersions") or []
        sdxl = [v for v in versions if v.get("baseModel") in config.SDXL_FAMILY_BASES]
        if not sdxl:
            bases = sorted({str(v.get("baseModel")) for v in versions}) or ["none listed"]
            raise _wrong_base(ref.display, ", ".join(bases))
        version = sdxl[0]  # CivitAI lists versions newest first
    else:
        # A hash names one file's bytes; CivitAI answers with the version that holds it.
        path, missing = str(ref.version_id), None
        if ref.kind == "civitai-hash":
            tag = ref.display.partition("#")[2]
            path = f"by-hash/{ref.file_hash}"
            missing = (
                f"CivitAI has no file with hash {ref.file_hash}"
                + (f" (the LoRA <lora:{tag}>)" if tag else "")
                + ": it was removed or never published there; send the LoRA file as lora_weights instead"
            )
        version = _get(f"/api/v1/model-versions/{path}", headers, ref.display, downloader, missing)
        if version.get("baseModel") not in config.SDXL_FAMILY_BASES:
            raise _wrong_base(ref.display, str(version.get("baseModel")))
    files = [f for f in version.get("files") or [] if f.get("type", "Model") == "Model"]
    files.sort(key=lambda f: (not f.get("primary"), (f.get("metadata") or {}).get("format") != "SafeTensor"))
    vid = version["id"]
    key = f"civitai:{vid}"
    if ref.kind == "civitai-hash":
        # A version may hold several model files (fp16, pruned ...): the one with this hash, which
        # is not always the primary one, keyed apart from it.
        hashed = [
            f for f in files if ref.file_hash.lower() in {str(h).lower() for h in (f.get("hashes") or {}).values()}
        ]
        if hashed and hashed[0] is not files[0]:
            files = hashed
            key = f"civitai:{vid}:{hashed[0].get('id') or hashed[0].get('name')}"
    if not files or (files[0].get("metadata") or {}).get("format") not in (None, "SafeTensor"):
        raise WeightsError(f"{ref.display} has no .safetensors model file on CivitAI: pick a SafeTensor version")
    url = files[0].get("downloadUrl") or f"{config.civitai_endpoint()}/api/download/models/{vid}"
    name = f"civitai version {vid}"
    words = tuple(str(w).strip() for w in version.get("trainedWords") or [] if str(w).strip())
    size_kb = files[0].get(
        "sizeKB"
    )  # the API states the size in KiB (a float): room is made, or the file refused, first
    size = math.ceil(size_kb * 1024) if isinstance(size_kb, int | float) and size_kb > 0 else None
    if size is not None:
        downloader.check_size(size, name)

    def fetch(dest: Path) -> None:
        downloader.download(url, dest, headers, name, "CivitAI")

    return Resolved(key, fetch, trained_words=words, file_name=str(files[0].get("name") or ""), size=size)


def _wrong_base(display: str, bases: str) -> WeightsError:
    return WeightsError(
        f"{display} is a LoRA for {bases}, not for SDXL / Illustrious: it cannot be applied to this model"
    )


def _get(path: str, headers: dict[str, str], name: str, downloader: Downloader, missing: str | None = None) -> Any:
    """The API's JSON answer; `missing` is the message for a 404, when there is a better one."""

    def once() -> Any:
        resp = requests.get(config.civitai_endpoint() + path, headers=headers, timeout=(10, 30))
        if resp.status_code == 404 and missing:
            raise WeightsError(missing)
        check_response(resp, name, "CivitAI")
        try:
            return resp.json()
        except ValueError:
            raise WeightsError(f"CivitAI answered something other than JSON for {name}: try again later") from None

    return retrying(name, once, downloader.limits, action="look up")
