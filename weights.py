"""The weights story: where a string points (resolve), how bytes arrive (download), what is kept.

- resolve: `parse_lora` reads every form users paste (Hugging Face, CivitAI, Replicate, plain
  URLs, data: URIs, local files) without touching the network; `LoraStore.fetch` then pins it
  to an immutable identity (an HF commit + file, a CivitAI version id, a URL).
- download: pget when it is on PATH, else (or when it fails) a Python downloader with
  retries on connection errors and 5xx, never on 4xx; always into a temporary file that is
  validated (a parsable safetensors header, the announced size, not an HTML page) and then
  renamed, so nothing half-written is ever visible.
- keep: an LRU cache on disk with a JSON index that survives restarts, bounded by bytes and by
  a free-disk floor, under a file lock so processes and threads never fetch a file twice.
  A repeated request is answered from the index with no network request at all.

Tokens are passed per call, never stored, logged, or used in a file name; an entry fetched
with a token is only served again to a caller holding the same token (compared by a salted
hash), because the cache must not leak a private file to a caller without access.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

import requests
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import safe_open

from engine import config
from engine.config import weights_root
from engine.loras import LocalLora
from engine.request import Tokens

__all__ = ["LoraRef", "LoraStore", "Tokens", "WeightsError", "download_hf_file", "parse_lora", "weights_root"]

log = logging.getLogger(__name__)

_TOKEN_QUERY_KEYS = {"token", "access_token", "api_key", "apikey", "key", "sig", "signature"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_AIR = re.compile(r"^urn:air:[^:]+:[^:]+:civitai:(\d+)@(\d+)$")
RETRIES = 5
T = TypeVar("T")
# Writes a LoRA into the given path; returns the pivotal trigger map when there is one.
Fetcher = Callable[[Path], "dict[str, str] | None"]


class WeightsError(RuntimeError):
    """Weights that could not be had; the message says what to do and holds no secret."""


@dataclass(frozen=True)
class LoraRef:
    """Where a user's string points, read without any network request."""

    kind: str  # hf | civitai-model | civitai-version | url | replicate-tar | replicate-model | data | local
    display: str  # safe to log: tokens stripped
    repo_id: str | None = None
    filename: str | None = None
    revision: str = "main"
    model_id: int | None = None
    version_id: int | None = None
    url: str | None = None
    path: Path | None = None


def _env(name: str, default: str | int) -> str:
    return os.environ.get(name) or str(default)


def hf_endpoint() -> str:
    return _env("HF_ENDPOINT", config.DEFAULT_HF_ENDPOINT).rstrip("/")


def civitai_endpoint() -> str:
    return _env("CIVITAI_ENDPOINT", config.DEFAULT_CIVITAI_ENDPOINT).rstrip("/")


def replicate_endpoint() -> str:
    return _env("REPLICATE_ENDPOINT", config.DEFAULT_REPLICATE_ENDPOINT).rstrip("/")


def redact_url(url: str) -> str:
    """The URL without credential-like query parameters, for logs, errors and cache keys."""
    parts = urlsplit(url)
    query = [(k, v) for k, vs in parse_qs(parts.query).items() for v in vs if k.lower() not in _TOKEN_QUERY_KEYS]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def _host(url: str) -> str:
    return urlsplit(url).netloc.lower()


def parse_lora(source: str) -> LoraRef:
    """Read every LoRA form users paste. Bare `owner/model` means a Replicate model, as in Flux."""
    s = source.strip()
    if s.startswith("data:"):
        return LoraRef("data", "data: URI", url=s)
    if air := _AIR.match(s):
        return LoraRef("civitai-version", s, model_id=int(air[1]), version_id=int(air[2]))
    if s.startswith("hf://"):
        return _hf_ref(s.removeprefix("hf://").strip("/").split("/"), s)
    if not re.match(r"^[a-z]+://", s):
        if s.endswith(".safetensors") and Path(s).expanduser().is_file():  # never any other local file
            path = Path(s).expanduser().resolve()
            return LoraRef("local", path.name, path=path)
        if "." in s.split("/", 1)[0]:
            s = "https://" + s  # a host without a scheme
        else:
            return _bare_ref(s)
    url = s
    host, path = _host(url), unquote(urlsplit(url).path).strip("/")
    parts = [p for p in path.split("/") if p]
    is_hf = host.endswith("huggingface.co") or host == _host(hf_endpoint())
    if is_hf and len(parts) >= 2 and parts[0] not in ("api", "datasets", "spaces"):
        return _hf_ref(parts, redact_url(url))
    if host.endswith("civitai.com") or host == _host(civitai_endpoint()):
        return _civitai_ref(url, parts)
    if host.endswith("replicate.com") and len(parts) >= 2 and not path.endswith(".tar"):
        version = parts[3] if len(parts) >= 4 and parts[2] == "versions" else None
        return _replicate_model_ref(parts[0], parts[1], version)
    if path.endswith(".tar"):
        return LoraRef("replicate-tar", redact_url(url), url=url)
    return LoraRef("url", redact_url(url), url=url)


def _hf_ref(parts: list[str], display: str) -> LoraRef:
    repo_id = "/".join(parts[:2])
    rest = parts[2:]
    if rest[:1] in (["blob"], ["resolve"], ["tree"]) and len(rest) >= 2:
        filename = "/".join(rest[2:]) or None
        return LoraRef("hf", display, repo_id=repo_id, filename=filename, revision=rest[1])
    return LoraRef("hf", display, repo_id=repo_id, filename="/".join(rest) or None)


def _bare_ref(s: str) -> LoraRef:
    parts = [p for p in s.split("/") if p]
    if len(parts) >= 3 and parts[-1].endswith(".safetensors"):
        return _hf_ref(parts, s)
    if len(parts) == 2:
        return _replicate_model_ref(parts[0], parts[1], None)
    if len(parts) == 3 and _HEX64.match(parts[2]):
        return _replicate_model_ref(parts[0], parts[1], parts[2])
    raise WeightsError(
        f"cannot tell where LoRA {s!r} lives: use a Hugging Face URL (huggingface.co/owner/repo or "
        "owner/repo/file.safetensors), a CivitAI URL, a Replicate model (owner/model) or a plain https URL"
    )


def _replicate_model_ref(owner: str, model: str, version: str | None) -> LoraRef:
    base = f"{replicate_endpoint()}/{owner}/{model}"
    url = f"{base}/versions/{version}/_weights" if version else f"{base}/_weights"
    display = f"{owner}/{model}" + (f"/{version}" if version else "")
    return LoraRef("replicate-model", display, url=url, revision=version or "latest")


def _civitai_ref(url: str, parts: list[str]) -> LoraRef:
    query = parse_qs(urlsplit(url).query)
    if parts[:3] == ["api", "download", "models"] and len(parts) >= 4 and parts[3].isdigit():
        return LoraRef("civitai-version", f"civitai version {parts[3]}", version_id=int(parts[3]))
    if parts[:1] == ["models"] and len(parts) >= 2 and parts[1].isdigit():
        if "modelVersionId" in query and query["modelVersionId"][0].isdigit():
            vid = int(query["modelVersionId"][0])
            return LoraRef("civitai-version", f"civitai version {vid}", model_id=int(parts[1]), version_id=vid)
        return LoraRef("civitai-model", f"civitai model {parts[1]}", model_id=int(parts[1]))
    raise WeightsError(
        f"unrecognised CivitAI URL {redact_url(url)}: use civitai.com/models/<id>, "
        "civitai.com/models/<id>?modelVersionId=<version> or civitai.com/api/download/models/<version>"
    )


# ---------------------------------------------------------------------------------------------
# Downloading


def _looks_like_html(head: bytes) -> bool:
    start = head.lstrip()[:15].lower()
    return start.startswith((b"<!doctype", b"<html", b"{", b"["))


def validate_safetensors(path: Path, name: str) -> None:
    """The header must parse and the data it describes must all be there."""
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_html(head):
        raise WeightsError(f"{name} answered with an HTML or JSON page instead of a file: check the URL or token")
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as exc:
        raise WeightsError(f"{name} is not a valid .safetensors file (truncated or another format): {exc}") from exc


def _http_error(status: int, name: str, service: str) -> WeightsError:
    if status in (401, 403):
        hint = {"CivitAI": "pass civitai_api_token", "Hugging Face": "pass hf_api_token"}.get(service, "")
        return WeightsError(f"{name} needs a {service} token{': ' + hint if hint else ''} (got HTTP {status})")
    if status == 404:
        return WeightsError(f"{name} was not found (HTTP 404): check the URL or id")
    return WeightsError(f"{name}: HTTP {status} from {service}")


_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class _NoRanges(Exception):
    """The server ignored a Range request: download in one stream instead."""


def _with_retries(name: str, attempt_once: Callable[[], T]) -> T:
    """Retry connection errors, timeouts, truncation and 5xx with backoff; a 4xx raises at once."""
    for attempt in range(RETRIES):
        try:
            return attempt_once()
        except _TRANSIENT as exc:
            if attempt == RETRIES - 1:
                raise WeightsError(f"could not download {name} after {RETRIES} tries: {exc}") from exc
            delay = 0.2 * 2**attempt
            log.info("download of %s failed (%s); retrying in %.1fs", name, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _check(resp: requests.Response, name: str, service: str) -> None:
    if "/login" in urlsplit(resp.url).path:
        raise _http_error(401, name, service)
    if resp.status_code >= 500:
        raise requests.ConnectionError(f"HTTP {resp.status_code}")
    if resp.status_code >= 400:
        raise _http_error(resp.status_code, name, service)
    if "text/html" in resp.headers.get("Content-Type", ""):
        raise WeightsError(f"{name} answered with an HTML page instead of a file: check the URL or token")


def _copy(resp: requests.Response, fd: int, offset: int, expected: int, max_bytes: int, name: str) -> None:
    """Write the body at offset; a body shorter than announced is a (retryable) truncation."""
    received = 0
    for chunk in resp.iter_content(1 << 20):
        if offset + received + len(chunk) > max_bytes:
            raise WeightsError(f"{name} is over the {max_bytes}-byte limit")
        os.pwrite(fd, chunk, offset + received)
        received += len(chunk)
    if expected and received != expected:
        raise requests.ConnectionError(f"truncated: {received} of {expected} bytes")


def _python_download(url: str, dest: Path, headers: dict[str, str], name: str, service: str) -> None:
    """Parallel Range requests when the server takes them and the file is large, else one stream."""
    max_bytes = int(_env("LORA_MAX_FILE_BYTES", config.LORA_MAX_FILE_BYTES))
    timeout = (10, float(_env("LORA_DOWNLOAD_TIMEOUT", config.LORA_DOWNLOAD_TIMEOUT)))
    connections = int(_env("LORA_DOWNLOAD_CONNECTIONS", config.LORA_DOWNLOAD_CONNECTIONS))
    min_parallel = int(_env("LORA_PARALLEL_MIN_BYTES", config.LORA_PARALLEL_MIN_BYTES))

    def probe() -> requests.Response:
        resp = requests.head(url, headers=headers, allow_redirects=True, timeout=timeout)
        _check(resp, name, service)
        return resp

    head = _with_retries(name, probe) if connections > 1 else None
    size = int(head.headers.get("Content-Length") or 0) if head is not None else 0
    if size > max_bytes:
        raise WeightsError(f"{name} is {size} bytes, over the {max_bytes}-byte limit")
    with open(dest, "wb") as out:
        fd = out.fileno()
        if head is not None and head.headers.get("Accept-Ranges") == "bytes" and size >= min_parallel:
            # Credentials stay with the host they were meant for, as a redirect would drop them.
            final = head.url
            part_headers = headers if _host(final) == _host(url) else {}
            try:
                _parallel(final, part_headers, fd, size, connections, timeout, max_bytes, name, service)
                return
            except _NoRanges:
                log.info("%s ignores Range requests; downloading in one stream", name)
                os.ftruncate(fd, 0)

        def stream() -> None:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
                _check(resp, name, service)
                expected = int(resp.headers.get("Content-Length") or 0)
                if expected > max_bytes:
                    raise WeightsError(f"{name} is {expected} bytes, over the {max_bytes}-byte limit")
                _copy(resp, fd, 0, expected, max_bytes, name)

        _with_retries(name, stream)


def _parallel(
    url: str,
    headers: dict[str, str],
    fd: int,
    size: int,
    connections: int,
    timeout: tuple[float, float],
    max_bytes: int,
    name: str,
    service: str,
) -> None:
    step = -(-size // connections)
    spans = [(start, min(start + step, size) - 1) for start in range(0, size, step)]

    def fetch(span: tuple[int, int]) -> None:
        def once() -> None:
            ranged = {**headers, "Range": f"bytes={span[0]}-{span[1]}"}
            with requests.get(url, headers=ranged, stream=True, timeout=timeout) as resp:
                _check(resp, name, service)
                if resp.status_code != 206:
                    raise _NoRanges
                _copy(resp, fd, span[0], span[1] - span[0] + 1, max_bytes, name)

        _with_retries(name, once)

    with ThreadPoolExecutor(max_workers=len(spans)) as pool:
        for future in [pool.submit(fetch, span) for span in spans]:
            future.result()


def download(url: str, dest: Path, headers: dict[str, str], name: str, service: str) -> None:
    """pget when available and no credentials are needed, else (or on its failure) Python."""
    pget = shutil.which("pget")
    if pget and not headers:
        result = subprocess.run([pget, "-f", url, str(dest)], capture_output=True, text=True)
        if result.returncode == 0:
            return
        log.info("pget could not fetch %s (exit %d); using the Python downloader", name, result.returncode)
    _python_download(url, dest, headers, name, service)


def download_hf_file(
    repo_id: str, filename: str, dest_dir: Path, revision: str = "main", token: str | None = None
) -> Path:
    """Fetch one file of a model repo into dest_dir, through huggingface_hub.

    Each call gets a fresh hub cache: huggingface_hub answers a 401 or a 5xx with a copy it
    cached earlier, which would hand one caller's private file to another without a token.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".hub-") as cache:
            path = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                token=_hf_token(token),
                cache_dir=cache,
                endpoint=hf_endpoint(),
            )
            target = dest_dir / Path(filename).name
            os.replace(Path(path).resolve(), target)
            return target
    except HfHubHTTPError as exc:
        raise _hf_error(exc, repo_id, filename, revision) from exc


def _hf_token(token: str | None) -> str | bool:
    return token or os.environ.get("HF_TOKEN") or False


def _hf_error(exc: HfHubHTTPError, repo_id: str, filename: str | None, revision: str) -> WeightsError:
    if isinstance(exc, GatedRepoError):
        return WeightsError(
            f"Hugging Face repo {repo_id} is gated: accept its terms on the hub, then pass hf_api_token"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return WeightsError(
            f"Hugging Face repo {repo_id} was not found, or it is private: check the name, "
            "or pass an hf_api_token that can read it"
        )
    if isinstance(exc, RevisionNotFoundError):
        return WeightsError(f"revision {revision!r} does not exist in Hugging Face repo {repo_id}")
    if isinstance(exc, EntryNotFoundError):
        return WeightsError(f"{filename} in {repo_id}@{revision} was not found: check the file name")
    status = exc.response.status_code if exc.response is not None else "no response"
    return WeightsError(f"Hugging Face answered {status} for {repo_id}@{revision}")


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


# ---------------------------------------------------------------------------------------------
# The cache


class LoraStore:
    """LoRA files on disk, LRU-evicted, shared safely by threads and processes."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or _env("LORA_CACHE_DIR", config.LORA_CACHE_DIR))
        self.files = self.root / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(_env("LORA_CACHE_MAX_BYTES", config.LORA_CACHE_MAX_BYTES))
        self.min_free = int(_env("LORA_CACHE_MIN_FREE_BYTES", config.LORA_CACHE_MIN_FREE_BYTES))
        self.alias_ttl = float(_env("LORA_ALIAS_TTL_SECONDS", config.LORA_ALIAS_TTL_SECONDS))
        self._thread_lock = threading.Lock()
        salt_file = self.root / "salt"
        if not salt_file.exists():
            with self._locked():
                if not salt_file.exists():
                    salt_file.write_bytes(os.urandom(16))
        self._salt = salt_file.read_bytes()

    # -- index ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One holder at a time, across threads (a mutex) and processes (flock)."""
        with self._thread_lock, open(self.root / "lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read_index(self) -> dict:
        try:
            return json.loads((self.root / "index.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"entries": {}, "aliases": {}}

    def _write_index(self, index: dict) -> None:
        tmp = self.root / f".index.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(json.dumps(index))
        os.replace(tmp, self.root / "index.json")

    def _auth_tag(self, token: str | None) -> str | None:
        return hmac.new(self._salt, token.encode(), hashlib.sha256).hexdigest() if token else None

    @staticmethod
    def _file_name(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest() + ".safetensors"

    # -- public -----------------------------------------------------------------------------

    def fetch(self, source: str, scale: float, tokens: Tokens, in_use: set[str] | None = None) -> LocalLora:
        """A local file for this LoRA: from the index when possible, else resolved and downloaded."""
        ref = parse_lora(source)
        if ref.kind == "local":
            assert ref.path is not None
            stat = ref.path.stat()
            return LocalLora(f"local:{ref.path}:{stat.st_mtime_ns}:{stat.st_size}", ref.path, scale, ref.display)
        start = time.perf_counter()
        alias = f"{ref.kind}:{ref.display}:{ref.revision}" if ref.kind != "data" else None
        token = self._token_for(ref, tokens)
        hit = self._lookup_alias(alias, token)
        if hit:
            key, entry = hit
            log.info("LoRA cache hit: %s (%d bytes, %.3fs)", ref.display, entry["size"], time.perf_counter() - start)
            return self._local(key, entry, scale, ref.display)
        key, fetcher = self._resolve(ref, tokens)
        with self._locked():
            index = self._read_index()
            entry = index["entries"].get(key)
            path = self.files / self._file_name(key)
            # Resolution just proved this caller's access (HF and CivitAI were asked with its token).
            if entry and path.exists():
                entry["last_used"] = time.time()
                if alias:
                    index["aliases"][alias] = {"key": key, "at": time.time()}
                self._write_index(index)
                log.info("LoRA cache hit: %s (%d bytes)", ref.display, entry["size"])
                return self._local(key, entry, scale, ref.display)
            tmp = Path(tempfile.mkstemp(dir=self.files, prefix=".part-")[1])
            tmp_embeddings = _embeddings_of(tmp)
            try:
                trigger = fetcher(tmp) or {}
                validate_safetensors(tmp, ref.display)
                size = tmp.stat().st_size + (tmp_embeddings.stat().st_size if tmp_embeddings.exists() else 0)
                self._make_room(index, size, (in_use or set()) | {key})
                if tmp_embeddings.exists():
                    os.replace(tmp_embeddings, _embeddings_of(path))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
                tmp_embeddings.unlink(missing_ok=True)
            entry = {
                "size": size,
                "last_used": time.time(),
                "auth": self._auth_tag(token),
                "name": ref.display,
                "trigger": trigger,
            }
            index["entries"][key] = entry
            if alias:
                index["aliases"][alias] = {"key": key, "at": time.time()}
            self._write_index(index)
        log.info("LoRA cache miss: %s downloaded, %d bytes in %.2fs", ref.display, size, time.perf_counter() - start)
        return self._local(key, entry, scale, ref.display)

    def _local(self, key: str, entry: dict, scale: float, name: str) -> LocalLora:
        path = self.files / self._file_name(key)
        embeddings = _embeddings_of(path)
        return LocalLora(
            key,
            path,
            scale,
            name,
            embeddings=embeddings if embeddings.exists() else None,
            trigger=tuple((entry.get("trigger") or {}).items()),
        )

    def _token_for(self, ref: LoraRef, tokens: Tokens) -> str | None:
        if ref.kind == "hf":
            return tokens.hf or os.environ.get("HF_TOKEN")
        if ref.kind.startswith("civitai"):
            return tokens.civitai or os.environ.get("CIVITAI_API_TOKEN")
        return None

    def _lookup_alias(self, alias: str | None, token: str | None) -> tuple[str, dict] | None:
        if alias is None:
            return None
        with self._locked():
            index = self._read_index()
            link = index["aliases"].get(alias)
            if not link:
                return None
            entry = index["entries"].get(link["key"])
            path = self.files / self._file_name(link["key"])
            fresh = not alias.startswith(("hf:", "civitai-model:", "replicate-model:")) or (
                time.time() - link["at"] < self.alias_ttl
            )
            if not (entry and path.exists() and fresh and entry.get("auth") in (None, self._auth_tag(token))):
                return None
            entry["last_used"] = time.time()
            self._write_index(index)
            return link["key"], entry

    def _make_room(self, index: dict, incoming: int, keep: set[str]) -> None:
        """Evict least-recently-used entries until the new file fits both bounds."""
        entries = index["entries"]
        for key in sorted(entries, key=lambda k: entries[k]["last_used"]):
            total = sum(e["size"] for e in entries.values()) + incoming
            free = shutil.disk_usage(self.files).free - incoming
            if total <= self.max_bytes and free >= self.min_free:
                return
            if key in keep:
                continue
            path = self.files / self._file_name(key)
            path.unlink(missing_ok=True)
            _embeddings_of(path).unlink(missing_ok=True)
            del entries[key]
            index["aliases"] = {a: v for a, v in index["aliases"].items() if v["key"] != key}
            log.info("LoRA cache evicted %s", key.split(":", 1)[0])
        if shutil.disk_usage(self.files).free - incoming < self.min_free:
            raise WeightsError(f"not enough disk space for a {incoming}-byte LoRA, even after emptying the cache")

    # -- resolution -------------------------------------------------------------------------

    def _resolve(self, ref: LoraRef, tokens: Tokens) -> tuple[str, Fetcher]:
        """The immutable cache key, and a function that writes the bytes into a given path."""
        if ref.kind == "data":
            assert ref.url is not None
            payload = ref.url.split(",", 1)[1] if "," in ref.url else ""
            try:
                data = base64.b64decode(payload, validate=True)
            except ValueError as exc:
                raise WeightsError("the LoRA data: URI is not valid base64") from exc

            def write(dest: Path) -> None:
                dest.write_bytes(data)

            return f"data:{hashlib.sha256(data).hexdigest()}", write
        if ref.kind == "hf":
            return self._resolve_hf(ref, tokens)
        if ref.kind.startswith("civitai"):
            return self._resolve_civitai(ref, tokens)
        assert ref.url is not None
        url = ref.url
        # The full URL's hash keeps two signed URLs apart without storing their credentials.
        key = f"url:{redact_url(url)}#{hashlib.sha256(url.encode()).hexdigest()[:16]}"
        if ref.kind == "replicate-tar":
            return key, lambda dest: self._fetch_tar(url, dest, ref.display)
        if ref.kind == "replicate-model":
            return f"replicate:{ref.display}", lambda dest: self._fetch_tar(url, dest, ref.display)
        return key, lambda dest: download(url, dest, {}, ref.display, "the host")

    def _resolve_hf(self, ref: LoraRef, tokens: Tokens) -> tuple[str, Fetcher]:
        assert ref.repo_id is not None
        token = _hf_token(tokens.hf)
        try:
            info = HfApi(endpoint=hf_endpoint()).model_info(ref.repo_id, revision=ref.revision, token=token)
        except HfHubHTTPError as exc:
            raise _hf_error(exc, ref.repo_id, ref.filename, ref.revision) from exc
        files = [s.rfilename for s in info.siblings or []]
        filename = ref.filename or choose_hf_file(ref.repo_id, files)
        if files and filename not in files:
            raise WeightsError(f"{filename} in {ref.repo_id}@{ref.revision} was not found: check the file name")
        commit = info.sha or ref.revision

        def fetch(dest: Path) -> None:
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".hf-") as tmp:
                got = download_hf_file(ref.repo_id, filename, Path(tmp), revision=commit, token=tokens.hf)
                os.replace(got, dest)

        return f"hf:{ref.repo_id}@{commit}:{filename}", fetch

    def _civitai_get(self, path: str, tokens: Tokens, name: str) -> dict:
        headers = self._civitai_headers(tokens)
        for attempt in range(RETRIES):
            try:
                resp = requests.get(civitai_endpoint() + path, headers=headers, timeout=(10, 30))
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == RETRIES - 1:
                    raise WeightsError(f"CivitAI could not be reached for {name}: {exc}") from exc
                time.sleep(0.2 * 2**attempt)
                continue
            if resp.status_code >= 500 and attempt < RETRIES - 1:
                time.sleep(0.2 * 2**attempt)
                continue
            if resp.status_code >= 400:
                raise _http_error(resp.status_code, name, "CivitAI")
            return resp.json()
        raise WeightsError(f"CivitAI kept failing for {name}")

    @staticmethod
    def _civitai_headers(tokens: Tokens) -> dict[str, str]:
        token = tokens.civitai or os.environ.get("CIVITAI_API_TOKEN")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _resolve_civitai(self, ref: LoraRef, tokens: Tokens) -> tuple[str, Fetcher]:
        if ref.kind == "civitai-model":
            model = self._civitai_get(f"/api/v1/models/{ref.model_id}", tokens, ref.display)
            versions = model.get("modelVersions") or []
            sdxl = [v for v in versions if v.get("baseModel") in config.SDXL_FAMILY_BASES]
            if not sdxl:
                bases = sorted({str(v.get("baseModel")) for v in versions}) or ["none listed"]
                raise WeightsError(
                    f"{ref.display} is a LoRA for {', '.join(bases)}, not for SDXL / Illustrious: "
                    "it cannot be applied to this model"
                )
            version = sdxl[0]  # CivitAI lists versions newest first
        else:
            version = self._civitai_get(f"/api/v1/model-versions/{ref.version_id}", tokens, ref.display)
            if version.get("baseModel") not in config.SDXL_FAMILY_BASES:
                raise WeightsError(
                    f"{ref.display} is a LoRA for {version.get('baseModel')}, not for SDXL / Illustrious: "
                    "it cannot be applied to this model"
                )
        files = [f for f in version.get("files") or [] if f.get("type", "Model") == "Model"]
        files.sort(key=lambda f: (not f.get("primary"), (f.get("metadata") or {}).get("format") != "SafeTensor"))
        if not files or (files[0].get("metadata") or {}).get("format") not in (None, "SafeTensor"):
            raise WeightsError(f"{ref.display} has no .safetensors model file on CivitAI")
        vid = version["id"]
        url = files[0].get("downloadUrl") or f"{civitai_endpoint()}/api/download/models/{vid}"
        headers = self._civitai_headers(tokens)
        name = f"civitai version {vid}"
        return f"civitai:{vid}", lambda dest: download(url, dest, headers, name, "CivitAI")

    def _fetch_tar(self, url: str, dest: Path, name: str) -> dict[str, str] | None:
        """Replicate's trained_model.tar: lora.safetensors, and for pivotal tuning its token
        embeddings (beside dest) and the trigger map of special_params.json, which is returned."""
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".tar-") as tmp:
            archive = Path(tmp) / "weights.tar"
            download(url, archive, {}, name, "Replicate")
            try:
                with tarfile.open(archive) as tar:
                    members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                    if "lora.safetensors" not in members:
                        raise WeightsError(f"{name} holds no lora.safetensors (found: {', '.join(members)})")
                    _extract(tar, members["lora.safetensors"], dest)
                    if "embeddings.pti" not in members:
                        return None
                    _extract(tar, members["embeddings.pti"], _embeddings_of(dest))
                    params = members.get("special_params.json")
                    source = tar.extractfile(params) if params else None
                    trigger = json.load(source) if source else {}
            except (tarfile.TarError, json.JSONDecodeError) as exc:
                raise WeightsError(f"{name} is not a readable trained-model tar: {exc}") from exc
        validate_safetensors(_embeddings_of(dest), f"{name} (embeddings.pti)")
        if not trigger:
            raise WeightsError(f"{name} has embeddings.pti but no special_params.json naming its trigger tokens")
        return {str(word): str(tokens) for word, tokens in trigger.items()}


def _embeddings_of(path: Path) -> Path:
    """Where the pivotal-tuning embeddings of a cached LoRA file live."""
    return path.with_name(path.name + ".pti")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise WeightsError(f"{member.name} in the tar is not a regular file")
    with source, open(dest, "wb") as out:
        shutil.copyfileobj(source, out)
