"""Hugging Face: from a repo reference to an immutable key (repo, commit, file), and the bytes.

The hub's API (huggingface_hub's `model_info`, with the caller's token) pins the commit and
states each file's size, so a file over LORA_MAX_FILE_BYTES (a pasted base checkpoint) is refused
before any byte moves. A LoRA's bytes then come from the hub's `resolve` URL through the same
`Downloader` as every other host: pget or one stream, the size cap, bounded retries logged with
the deploy's backoff (huggingface_hub's own downloads retry 5xx with fixed sleeps of 1-8 s, 23 s
in all, and end in an error that reads "entry not found"). A 5xx says the hub failed and to try
again later; a 401/403/404 keeps its own message.

The bake's base weights (`download_hf_file`) still go through `hf_hub_download`, each with a
fresh hub cache: on a 401, a 5xx or a connection error huggingface_hub quietly returns a copy it
cached earlier. Our own cache (`cache.py`) decides who is served what.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import quote

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
from huggingface_hub.hf_api import ModelInfo

from weightstore.config import deployment_hf_token, hf_endpoint
from weightstore.errors import WeightsError
from weightstore.refs import LoraRef, Resolved
from weightstore.transfer import Downloader, HttpStatusError, Transient, retrying, server_failed

# huggingface_hub's HTTP client logs every request URL at INFO: noise in a user's prediction logs.
logging.getLogger("httpx2").setLevel(logging.WARNING)

SERVICE = "Hugging Face"


def hf_token(token: str | None) -> str | None:
    """The caller's token, else the deployment's HF_TOKEN, else none."""
    return token or deployment_hf_token()


def resolve_hf(ref: LoraRef, token: str | None, downloader: Downloader) -> Resolved:
    """Ask the hub which commit the reference means, which file it names and how large it is."""
    assert ref.repo_id is not None
    token = hf_token(token)
    repo_id = ref.repo_id
    info = _model_info(ref, token, downloader)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    filename = ref.filename or choose_hf_file(repo_id, list(sizes))
    if sizes and filename not in sizes:
        raise WeightsError(
            f"{filename} in Hugging Face repo {repo_id}@{ref.revision} was not found: check the file name"
        )
    name = f"{filename} in Hugging Face repo {repo_id}"
    size = sizes.get(filename)
    if size is not None:
        downloader.check_size(size, name)
    commit = info.sha or ref.revision
    url = f"{hf_endpoint()}/{repo_id}/resolve/{quote(commit, safe='')}/{quote(filename)}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def fetch(dest: Path) -> None:
        try:
            downloader.download(url, dest, headers, name, SERVICE)
        except HttpStatusError as exc:
            if exc.status in (401, 403) and info.gated:
                raise _gated(f"Hugging Face repo {repo_id}") from None
            raise

    return Resolved(f"hf:{repo_id}@{commit}:{filename}", fetch, size=size, file_name=Path(filename).name)


def _model_info(ref: LoraRef, token: str | None, downloader: Downloader) -> ModelInfo:
    """The repo's commit and files (with sizes); a hub failure or no answer is retried."""
    assert ref.repo_id is not None
    where = f"Hugging Face repo {ref.repo_id}"

    def once() -> ModelInfo:
        try:
            return HfApi(endpoint=hf_endpoint()).model_info(
                ref.repo_id, revision=ref.revision, token=token or False, files_metadata=True
            )
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status is not None and status >= 500:
                raise Transient(server_failed(SERVICE, status)) from None
            raise hf_error(exc, ref.repo_id or "", ref.filename, ref.revision) from None
        except httpx2.TransportError:
            raise Transient(f"{SERVICE} could not be reached") from None
        except Exception as exc:
            raise hf_error(exc, ref.repo_id or "", ref.filename, ref.revision) from None

    return retrying(where, once, downloader.limits, action="look up")


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
    if isinstance(exc, LocalEntryNotFoundError):  # huggingface_hub's "cannot locate": the real cause is below it
        cause = exc.__cause__
        if isinstance(cause, HfHubHTTPError | httpx2.TransportError) and cause is not exc:
            return hf_error(cause, repo_id, filename, revision)
        return WeightsError(f"Hugging Face could not be reached for {where}: try again in a few minutes")
    if isinstance(exc, GatedRepoError):
        return _gated(where)
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
            return WeightsError(f"{server_failed(SERVICE, status)}, for {where}: try again in a few minutes")
        if status in (401, 403):
            return WeightsError(f"{where} refused access (HTTP {status}): pass an hf_api_token that can read it")
        return WeightsError(f"Hugging Face answered HTTP {status} for {where}@{revision}")
    if isinstance(exc, httpx2.TransportError):
        return WeightsError(f"Hugging Face could not be reached for {where}: try again in a few minutes")
    if isinstance(exc, WeightsError):
        return exc
    return WeightsError(f"Hugging Face download of {where} failed ({type(exc).__name__}): try again in a few minutes")


def choose_hf_file(repo_id: str, files: list[str]) -> str:
    """The rule for a repo named without a file: its only .safetensors at the top level, else the
    diffusers default name `pytorch_lora_weights.safetensors`, else a Replicate trainer's
    `trained_model.tar` uploaded as it came; otherwise ask, listing them."""
    candidates = sorted(f for f in files if f.endswith(".safetensors"))
    top = [f for f in candidates if "/" not in f]
    if len(top) == 1:
        return top[0]
    if "pytorch_lora_weights.safetensors" in candidates:
        return "pytorch_lora_weights.safetensors"
    if not candidates and "trained_model.tar" in files:
        return "trained_model.tar"
    if not candidates:
        raise WeightsError(f"Hugging Face repo {repo_id} has no .safetensors file (nor a trained_model.tar)")
    listed = ", ".join(candidates[:20])
    raise WeightsError(
        f"Hugging Face repo {repo_id} has several .safetensors files ({listed}): name one, "
        f"e.g. {repo_id}/{candidates[0]} or huggingface.co/{repo_id}/blob/main/{candidates[0]}"
    )


def _gated(where: str) -> WeightsError:
    return WeightsError(f"{where} is gated: accept its terms on the hub, then pass an hf_api_token of that account")
