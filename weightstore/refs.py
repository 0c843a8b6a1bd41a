"""What a pasted LoRA string points to (`LoraRef`, read without any network request), and what
it was pinned to (`Resolved`: an immutable key and the way to fetch its bytes).

Forms: Hugging Face (`huggingface.co/owner/repo[/blob|resolve/<rev>/<file>]`, `owner/repo/x.safetensors`,
`hf://owner/repo`), CivitAI (model page, `?modelVersionId=`, download URL, AIR URN,
`api/v1/model-versions/by-hash/<hash>`), Replicate
(`owner/model[/<version>]`, a `.tar` URL), any http(s) URL, a `data:` URI, and a local
`.safetensors` or `.tar` path (a trained_model.tar is known by its bytes, from any source:
`resolve.unpack_if_trained_tar`). A string that looks like a local path is always read as one,
so it is never sent to the network as a repo or a model name; it is read only inside
LOCAL_FILES_DIR (`engine.server_files`, the rule every input follows), and refused the same way
otherwise, without a look at the file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from engine.server_files import server_file
from weightstore.config import civitai_endpoint, hf_endpoint, replicate_endpoint
from weightstore.errors import WeightsError
from weightstore.redact import display_url, split_credentials

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_AIR = re.compile(r"^urn:air:[^:]+:[^:]+:civitai:(\d+)@(\d+)$")
# A file hash CivitAI's by-hash API takes: AutoV2 (10 hex), AutoV3 (12), CRC32 (8), SHA256 (64) ...
_CIVITAI_HASH = re.compile(r"^[0-9a-f]{8,64}$")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_LOCAL_PREFIXES = ("/", "./", "../", "~")
_FILE_SUFFIXES = (".safetensors", ".tar")  # a LoRA file, or a trained_model.tar holding one
_UNSUPPORTED_SCHEMES = {
    "ftp": "serve the file over https instead",
    "s3": "pass a presigned https URL of the object instead",
    "gs": "pass a signed https URL of the object instead",
}


@dataclass(frozen=True)
class LoraRef:
    """Where a user's string points. `display` and `ident` never hold a credential."""

    # hf | civitai-model | civitai-version | civitai-hash | url | replicate-tar | replicate-model | data | local
    kind: str
    display: str  # for logs and messages
    ident: str  # a stable name for the cache's aliases
    repo_id: str | None = None
    filename: str | None = None
    revision: str = "main"
    model_id: int | None = None
    version_id: int | None = None
    file_hash: str | None = None  # civitai-hash: the file's hash as CivitAI's by-hash API takes it
    url: str | None = field(default=None, repr=False)  # as given: may carry credentials
    path: Path | None = None

    @property
    def mutable(self) -> bool:
        """Whether the same string may point to other bytes later (a branch, a model's latest version)."""
        if self.kind == "hf":
            return not _COMMIT.match(self.revision)
        return self.kind == "civitai-model" or (self.kind == "replicate-model" and self.revision == "latest")


# Writes the LoRA into the given path; returns the pivotal-tuning trigger map when there is one.
Fetcher = Callable[[Path], "dict[str, str] | None"]


@dataclass(frozen=True)
class Resolved:
    """A reference pinned to the bytes it means: `key` names them for good (a commit, a version id,
    a URL without its credentials), `fetch` writes them, `trained_words` are the host's trigger words,
    `size` the byte count the host states before the download (None: known only once it runs)."""

    key: str
    fetch: Fetcher = field(repr=False)
    trained_words: tuple[str, ...] = ()
    size: int | None = None
    file_name: str = ""  # the host's name for the file (an embedding is called by it), "" when none


def parse_lora(source: str) -> LoraRef:
    """Read every LoRA form users paste. Bare `owner/model` means a Replicate model, as in Flux."""
    s = source.strip()
    if not s:
        raise WeightsError("the LoRA string is empty")
    if s.startswith("data:"):
        return LoraRef("data", "data: URI", f"data:{hashlib.sha256(s.encode()).hexdigest()}", url=s)
    if air := _AIR.match(s):
        return _civitai_version(int(air[2]), int(air[1]), s)
    if s.startswith("hf://"):
        return _hf_ref(s.removeprefix("hf://").strip("/").split("/"), s)
    scheme = _SCHEME.match(s)
    if scheme:
        name = scheme[1].lower()
        if name == "file":  # a server file like any local path: the same rule, the same refusal
            return _local_ref(unquote(urlsplit(s).path))
        if name in _UNSUPPORTED_SCHEMES:
            raise WeightsError(f"{name}:// LoRA locations are not read: {_UNSUPPORTED_SCHEMES[name]}")
        if name not in ("http", "https"):
            raise WeightsError(f"unsupported LoRA URL scheme {name}://: use an https URL")
        return _url_ref(s)
    if s.startswith(_LOCAL_PREFIXES):
        return _local_ref(s)
    first = s.split("/", 1)[0]
    if "." in first and "/" in s:
        return _url_ref("https://" + s)  # a host without a scheme
    return _bare_ref(s)


def _local_ref(s: str) -> LoraRef:
    path = server_file(s, "the LoRA", "a URL or a data: URI of the file", error=WeightsError)
    if path.is_dir():
        raise WeightsError(f"the LoRA path {s} is a directory: name the .safetensors file inside it")
    if path.suffix not in _FILE_SUFFIXES:
        raise WeightsError(
            f"the LoRA path {s} is not a .safetensors file: only .safetensors files (and a trained_model.tar) are read"
        )
    if not path.is_file():
        raise WeightsError(
            f"local LoRA file {s} not found: check the path (it is read on the machine running the model)"
        )
    return LoraRef("local", path.name, f"local:{path}", path=path)


def _host_of(url: str) -> str:
    """A URL's host name in lower case, without the user:password@ it may carry."""
    return urlsplit(url).netloc.rsplit("@", 1)[-1].lower()


def _url_ref(url: str) -> LoraRef:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1].lower()
    path = unquote(parts.path).strip("/")
    segments = [p for p in path.split("/") if p]
    if not host or any(c in host for c in " \\"):
        raise WeightsError(f"the LoRA URL {display_url(url)} has no valid host name")
    is_hf = host in ("huggingface.co", _host_of(hf_endpoint())) or host.endswith(".huggingface.co")
    if is_hf and len(segments) >= 2 and segments[0] not in ("api", "datasets", "spaces"):
        return _hf_ref(segments, display_url(url))
    if host in ("civitai.com", _host_of(civitai_endpoint())) or host.endswith(".civitai.com"):
        ref = _civitai_ref(url, segments)
        if ref is None:
            raise WeightsError(
                f"unrecognised CivitAI URL {display_url(url)}: use civitai.com/models/<id>, "
                "civitai.com/models/<id>?modelVersionId=<version> or civitai.com/api/download/models/<version>"
            )
        return ref
    if host.endswith("replicate.com") and len(segments) >= 2 and not path.endswith(".tar"):
        version = segments[3] if len(segments) >= 4 and segments[2] == "versions" else None
        return _replicate_model_ref(segments[0], segments[1], version)
    public, _ = split_credentials(url)
    kind = "replicate-tar" if path.endswith(".tar") else "url"
    return LoraRef(kind, display_url(url), f"url:{public}", url=url)


def _hf_ref(parts: list[str], display: str) -> LoraRef:
    repo_id = "/".join(parts[:2])
    rest = parts[2:]
    revision, filename = "main", "/".join(rest) or None
    if rest[:1] in (["blob"], ["resolve"], ["tree"]) and len(rest) >= 2:
        revision, filename = rest[1], "/".join(rest[2:]) or None
    return LoraRef(
        "hf",
        display,
        f"hf:{repo_id}@{revision}:{filename or ''}",
        repo_id=repo_id,
        filename=filename,
        revision=revision,
    )


def _bare_ref(s: str) -> LoraRef:
    parts = [p for p in s.split("/") if p]
    if len(parts) >= 3 and parts[-1].endswith(_FILE_SUFFIXES):
        return _hf_ref(parts, s)
    if len(parts) == 2 and not parts[1].endswith(_FILE_SUFFIXES):
        return _replicate_model_ref(parts[0], parts[1], None)
    if len(parts) == 3 and _HEX64.match(parts[2]):
        return _replicate_model_ref(parts[0], parts[1], parts[2])
    if s.endswith(_FILE_SUFFIXES):
        return _local_ref(s)
    raise WeightsError(
        f"cannot tell where LoRA {s!r} lives: use a Hugging Face URL (huggingface.co/owner/repo or "
        "owner/repo/file.safetensors), a CivitAI URL, a Replicate model (owner/model), an https URL "
        "or a local path such as ./x.safetensors"
    )


def _replicate_model_ref(owner: str, model: str, version: str | None) -> LoraRef:
    base = f"{replicate_endpoint()}/{owner}/{model}"
    url = f"{base}/versions/{version}/_weights" if version else f"{base}/_weights"
    display = f"{owner}/{model}" + (f"/{version}" if version else "")
    return LoraRef("replicate-model", display, f"replicate:{display}", url=url, revision=version or "latest")


def _civitai_version(version_id: int, model_id: int | None, display: str) -> LoraRef:
    return LoraRef("civitai-version", display, f"civitai:{version_id}", model_id=model_id, version_id=version_id)


def _civitai_ref(url: str, segments: list[str]) -> LoraRef | None:
    """A CivitAI page, download or by-hash URL, or None when the path is none of its LoRA forms.
    Each is shown as a CivitAI URL that names the same file again (output metadata records it)."""
    query = parse_qs(urlsplit(url).query)
    if segments[:3] == ["api", "download", "models"] and len(segments) >= 4 and segments[3].isdigit():
        return _civitai_version(int(segments[3]), None, f"civitai.com/api/download/models/{segments[3]}")
    if segments[:4] == ["api", "v1", "model-versions", "by-hash"] and len(segments) == 5:
        digest = segments[4].lower()
        if not _CIVITAI_HASH.match(digest):
            return None
        # A fragment names the LoRA (generation data's <lora:NAME> tag) in messages and metadata.
        tag = unquote(urlsplit(url).fragment)
        display = f"civitai.com/api/v1/model-versions/by-hash/{digest}" + (f"#{tag}" if tag else "")
        return LoraRef("civitai-hash", display, f"civitai-hash:{digest}", file_hash=digest)
    if segments[:1] == ["models"] and len(segments) >= 2 and segments[1].isdigit():
        version = query.get("modelVersionId", [""])[0]
        if version.isdigit():
            return _civitai_version(int(version), int(segments[1]), f"civitai.com/api/download/models/{version}")
        mid = int(segments[1])
        return LoraRef("civitai-model", f"civitai.com/models/{mid}", f"civitai-model:{mid}", model_id=mid)
    return None
