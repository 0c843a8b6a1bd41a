"""Hugging Face: from a repo reference to an immutable key (repo, commit, file), and the bytes
through huggingface_hub itself.

Every download gets a fresh hub cache: on a 401, a 5xx or a connection error huggingface_hub
quietly returns a copy it cached earlier, which would hand one caller's private file to another
caller without a token. Our own cache (`cache.py`) decides who is served what.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from weightstore.endpoints import hf_endpoint
from weightstore.errors import WeightsError
from weightstore.refs import LoraRef, Resolved

# huggingface_hub's HTTP client logs every request URL at INFO: noise in a user's prediction logs.
logging.getLogger("httpx2").setLevel(logging.WARNING)


def hf_token(token: str | None) -> str | None:
    """The caller's token, else the deployment's HF_TOKEN, else none."""
    return token or os.environ.get("HF_TOKEN") or None


def resolve_hf(ref: LoraRef, token: str | None) -> Resolved:
    """Ask the hub which commit the reference means and which file it names, with the caller's token."""
    assert ref.repo_id is not None
    token = hf_token(token)
    try:
        info = HfApi(endpoint=hf_endpoint()).model_info(ref.repo_id, revision=ref.revision, token=token or False)
    except Exception as exc:
        raise hf_error(exc, ref.repo_id, ref.filename, ref.revision) from None
    files = [s.rfilename for s in info.siblings or []]
    filename = ref.filename or choose_hf_file(ref.repo_id, files)
    if files and filename not in files:
        raise WeightsError(
            f"{filename} in Hugging Face repo {ref.repo_id}@{ref.revision} was not found: check the file name"
        )
    commit = info.sha or ref.revision
    repo_id = ref.repo_id

    def fetch(dest: Path) -> None:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=dest.name + "-") as tmp:
            os.replace(download_hf_file(repo_id, filename, Path(tmp), revision=commit, token=token), dest)

    return Resolved(f"hf:{repo_id}@{commit}:{filename}", fetch)


def download_hf_file(
    repo_id: str, filename: str, dest_dir: Path, revision: str = "main", token: str | None = None
) -> Path:
    """One file of a model repo into dest_dir (named as in the repo), through huggingface_hub."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".hub-") as cache:
        try:
            path = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                token=hf_token(token) or False,
                cache_dir=cache,
                endpoint=hf_endpoint(),
            )
        except Exception as exc:
            raise hf_error(exc, repo_id, filename, revision) from None
        target = dest_dir / Path(filename).name
        os.replace(Path(path).resolve(), target)
        return target


def hf_error(exc: Exception, repo_id: str, filename: str | None, revision: str) -> WeightsError:
    """What a hub failure means for the user; no library message (it may hold a URL) is passed on."""
    where = f"Hugging Face repo {repo_id}"
    if isinstance(exc, GatedRepoError):
        return WeightsError(f"{where} is gated: accept its terms on the hub, then pass an hf_api_token of that account")
    if isinstance(exc, RepositoryNotFoundError):
        return WeightsError(
            f"{where} was not found, or it is private: check the name, or pass an hf_api_token that can read it"
        )
    if isinstance(exc, RevisionNotFoundError):
        return WeightsError(f"revision {revision!r} does not exist in {where}")
    if isinstance(exc, EntryNotFoundError):
        return WeightsError(f"{filename} in {repo_id}@{revision} was not found on Hugging Face: check the file name")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status is not None and status >= 500:
            return WeightsError(f"Hugging Face failed (HTTP {status}) for {where}: try again in a few minutes")
        if status in (401, 403):
            return WeightsError(f"{where} refused access (HTTP {status}): pass an hf_api_token that can read it")
        return WeightsError(f"Hugging Face answered HTTP {status} for {where}@{revision}")
    if isinstance(exc, LocalEntryNotFoundError | httpx2.TransportError):
        return WeightsError(f"Hugging Face could not be reached for {where}: try again in a few minutes")
    if isinstance(exc, WeightsError):
        return exc
    return WeightsError(f"Hugging Face download of {where} failed ({type(exc).__name__}): try again in a few minutes")


def choose_hf_file(repo_id: str, files: list[str]) -> str:
    """The rule for a repo named without a file: its only .safetensors at the top level, else the
    diffusers default name `pytorch_lora_weights.safetensors`; otherwise ask, listing them."""
    candidates = sorted(f for f in files if f.endswith(".safetensors"))
    top = [f for f in candidates if "/" not in f]
    if len(top) == 1:
        return top[0]
    if "pytorch_lora_weights.safetensors" in candidates:
        return "pytorch_lora_weights.safetensors"
    if not candidates:
        raise WeightsError(f"Hugging Face repo {repo_id} has no .safetensors file")
    listed = ", ".join(candidates[:20])
    raise WeightsError(
        f"Hugging Face repo {repo_id} has several .safetensors files ({listed}): name one, "
        f"e.g. {repo_id}/{candidates[0]} or huggingface.co/{repo_id}/blob/main/{candidates[0]}"
    )
