"""Each host's way from a `LoraRef` to a `Resolved` (an immutable key and a fetch function).

Hugging Face and CivitAI ask their APIs (with the caller's token); a plain URL, a Replicate tar or
model and a `data:` URI are pinned without any request. Replicate's trained_model.tar holds
lora.safetensors and, for pivotal tuning, embeddings.pti and special_params.json (the trigger map).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from engine.request import Credentials
from weightstore.civitai import civitai_token, resolve_civitai
from weightstore.errors import WeightsError
from weightstore.huggingface import hf_token, resolve_hf
from weightstore.redact import split_credentials
from weightstore.refs import LoraRef, Resolved
from weightstore.transfer import Downloader
from weightstore.validate import archive_refusal, validate_safetensors


def credential_for(ref: LoraRef, credentials: Credentials) -> str | None:
    """What proves this caller's access to this reference: a hub token or the URL's own credentials."""
    if ref.kind == "hf":
        return hf_token(credentials.hf)
    if ref.kind.startswith("civitai"):
        return civitai_token(credentials.civitai)
    if ref.kind in ("url", "replicate-tar") and ref.url:
        return split_credentials(ref.url)[1] or None
    return None


def local_key(path: Path) -> str:
    """A local file's cache identity: its path and its state, as the bytes at a path can change."""
    stat = path.stat()
    return f"local:{path}:{stat.st_mtime_ns}:{stat.st_size}"


def resolve(ref: LoraRef, credentials: Credentials, downloader: Downloader) -> Resolved:
    if ref.kind == "hf":
        return resolve_hf(ref, credentials.hf, downloader)
    if ref.kind.startswith("civitai"):
        return resolve_civitai(ref, credentials.civitai, downloader)
    if ref.kind == "local":  # a local tar: unpacked into the cache, named by the file's state
        assert ref.path is not None
        path, size = ref.path, ref.path.stat().st_size
        downloader.check_size(size, ref.display)

        def copy(dest: Path) -> None:
            shutil.copyfile(path, dest)

        return Resolved(local_key(path), copy, size=size, file_name=path.name)
    assert ref.url is not None
    url = ref.url
    if ref.kind == "data":
        data = _decode_data_uri(url)

        def write(dest: Path) -> None:
            dest.write_bytes(data)

        downloader.check_size(len(data), ref.display)
        return Resolved(
            f"data:{hashlib.sha256(data).hexdigest()}", write, size=len(data), file_name=_data_uri_name(url)
        )
    if ref.kind in ("replicate-tar", "replicate-model"):
        key = ref.ident if ref.kind == "replicate-model" else f"url:{split_credentials(url)[0]}"
        return Resolved(key, lambda dest: fetch_trained_tar(downloader, url, dest, ref.display))
    return Resolved(
        f"url:{split_credentials(url)[0]}",
        lambda dest: downloader.download(url, dest, {}, ref.display, "the host"),
        file_name=unquote(PurePosixPath(urlsplit(url).path).name),
    )


def _data_uri_name(uri: str) -> str:
    """The file name a data: URI carries as a `name=` parameter (data:...;name=x.safetensors;base64,...)."""
    header = uri.partition(",")[0]
    found = re.search(r";name=([^;,]+)", header)
    return unquote(found[1]) if found else ""


def _decode_data_uri(uri: str) -> bytes:
    payload = uri.partition(",")[2]
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise WeightsError(
            "the LoRA data: URI is not valid base64: send data:application/octet-stream;base64,<the file>"
        ) from None


MAX_PARAMS_BYTES = 1 << 20  # special_params.json maps a few trigger words to tokens


def embeddings_of(path: Path) -> Path:
    """Where the pivotal-tuning embeddings of a LoRA file live: beside it."""
    return path.with_name(path.name + ".pti")


def fetch_trained_tar(downloader: Downloader, url: str, dest: Path, name: str) -> dict[str, str] | None:
    """Replicate's trained_model.tar from a URL that names one (a .tar path, a Replicate model):
    downloaded beside dest, then unpacked into it by `unpack_trained_tar`."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=dest.name + "-") as tmp:
        archive = Path(tmp) / "weights.tar"
        downloader.download(url, archive, {}, name, "Replicate")
        return unpack_trained_tar(archive, dest, name, downloader.limits.max_bytes)


def is_tar(path: Path) -> bool:
    """Whether a file is a tar by its first block, whatever its name or URL: the POSIX/GNU magic
    `ustar` at offset 257, in a header whose checksum holds."""
    with open(path, "rb") as f:
        head = f.read(tarfile.BLOCKSIZE)
    if len(head) < tarfile.BLOCKSIZE or head[257:262] != b"ustar":
        return False
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def unpack_if_trained_tar(path: Path, name: str, cap: int) -> dict[str, str] | None:
    """A fetched file that is a tar by its bytes (a trained_model.tar from Hugging Face, a download
    URL without .tar, a data: URI, a local file) is unpacked in place, as `fetch_trained_tar` does.
    Returns the trigger map (None: no embeddings, or not a tar)."""
    if not is_tar(path):
        return None
    archive = path.with_name(path.name + ".tar")
    os.replace(path, archive)
    try:
        return unpack_trained_tar(archive, path, name, cap)
    finally:
        archive.unlink(missing_ok=True)


def unpack_trained_tar(archive: Path, dest: Path, name: str, cap: int) -> dict[str, str] | None:
    """A trained_model.tar (Replicate's trainers, this model's `cog train`): lora.safetensors into
    dest, embeddings.pti beside it, and the trigger map of special_params.json returned (None when
    the tar has no embeddings).

    Only a plain tar is read, as Replicate's trainers write it: a compressed one could unpack to
    far more than the download cap allowed. The members used are sized from their headers before
    a byte is written (a GNU sparse member states more than the archive holds), each within
    `cap` (LORA_MAX_FILE_BYTES) and all of them together too."""
    if refusal := archive_refusal(archive, name):
        raise WeightsError(refusal)
    try:
        with tarfile.open(archive, "r:") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if "lora.safetensors" not in members:
                raise WeightsError(f"{name} holds no lora.safetensors (found: {', '.join(members) or 'nothing'})")
            used = [m for n, m in members.items() if n in ("lora.safetensors", "embeddings.pti", "special_params.json")]
            for member in used:
                if member.size > cap:
                    raise WeightsError(
                        f"{name}: {member.name} unpacks to {member.size} bytes, over the {cap}-byte limit"
                    )
            params = members.get("special_params.json")
            if params is not None and params.size > MAX_PARAMS_BYTES:
                raise WeightsError(f"{name}: its special_params.json is {params.size} bytes, not a trigger map")
            if sum(m.size for m in used) > cap:
                raise WeightsError(f"{name} unpacks to more than the {cap}-byte limit")
            _extract(tar, members["lora.safetensors"], dest)
            if "embeddings.pti" not in members:
                return None
            _extract(tar, members["embeddings.pti"], embeddings_of(dest))
            source = tar.extractfile(params) if params else None
            trigger = json.load(source) if source else {}
    except (tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(
            f"{name} is not a readable trained-model tar (a plain, uncompressed .tar, as Replicate's trainers "
            "write): check the URL"
        ) from None
    validate_safetensors(embeddings_of(dest), f"{name} (embeddings.pti)")
    if not trigger or not isinstance(trigger, dict):
        raise WeightsError(f"{name} has embeddings.pti but no special_params.json naming its trigger tokens")
    return {str(word): str(tokens) for word, tokens in trigger.items()}


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise WeightsError(f"{member.name} in the tar is not a regular file")
    with source, open(dest, "wb") as out:
        shutil.copyfileobj(source, out)
