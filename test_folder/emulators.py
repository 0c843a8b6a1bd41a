"""Loopback emulators of the hosts LoRAs come from: Hugging Face, CivitAI, a plain file host
and Replicate's delivery. Real HTTP servers on 127.0.0.1 that count every request, so tests
can prove what went over the wire (a cache hit makes none).

The Hugging Face side speaks the protocol facts in DESIGN.md §8: X-Repo-Commit and ETag on
resolve, X-Error-Code to pick the client's exception, 401 + RepoNotFound for an anonymous
request to a private repo, model_info at /api/models/<repo>[/revision/<rev>] (file sizes with
`blobs=true`), no Xet headers.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    declared_length: int | None = None  # announce more than is sent: a truncated body


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body: bytes = b""  # a POST's body


class Loopback:
    """A threaded HTTP server on a free loopback port; `route` decides every answer."""

    def __init__(self, route: Callable[[Request], Reply]) -> None:
        self.hits: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self.faults: dict[str, list[Reply]] = {}  # "GET /path" -> replies to give first, in order
        self.ranges = "honoured"  # or "ignored": advertise Range support, then answer 200 in full
        self.range_requests: list[str] = []
        self.delay = 0.0  # seconds before each answer: a slow server
        self.holds: dict[str, threading.Event] = {}  # "GET /path" -> answered only once the event is set
        self.rate = 0  # bytes per second per connection when set: a throttled link
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def do_POST(self) -> None:
                self._answer(send_body=True)

            def _answer(self, send_body: bool) -> None:
                parts = urlsplit(self.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                body = self.rfile.read(int(headers.get("content-length") or 0)) if self.command == "POST" else b""
                req = Request(self.command, unquote(parts.path), parse_qs(parts.query), headers, body)
                server.hits[f"{self.command} {req.path}"] += 1
                server.auth.append(self.headers.get("Authorization"))
                queued = server.faults.get(f"{self.command} {req.path}")
                reply = queued.pop(0) if queued else route(req)
                hold = server.holds.get(f"{self.command} {req.path}")
                if hold is not None:
                    hold.wait(timeout=60)
                time.sleep(server.delay)
                wanted = req.headers.get("range")
                if reply.status == 200 and reply.declared_length is None and "Location" not in reply.headers:
                    reply.headers.setdefault("Accept-Ranges", "bytes")
                    if wanted and server.ranges == "honoured":
                        server.range_requests.append(wanted)
                        start, end = (int(x) for x in wanted.removeprefix("bytes=").split("-"))
                        total = len(reply.body)
                        reply = Reply(
                            206, reply.body[start : end + 1], {"Content-Range": f"bytes {start}-{end}/{total}"}
                        )
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                length = reply.declared_length if reply.declared_length is not None else len(reply.body)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if send_body and server.rate:
                    for i in range(0, len(reply.body), 1 << 16):
                        self.wfile.write(reply.body[i : i + (1 << 16)])
                        time.sleep((1 << 16) / server.rate)
                elif send_body:
                    self.wfile.write(reply.body)
                if reply.declared_length is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def total(self) -> int:
        return sum(self.hits.values())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class HfRepo:
    files: dict[str, bytes]
    token: str | None = None  # set: private, readable with this token only
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False  # set: files need an accepted-terms token (the `token`); metadata is public


def _hub_write(req: Request, repos: dict[str, HfRepo], write_token: str | None) -> Reply:
    """The upload side (huggingface_hub's create_repo + upload_folder): every file goes inline in the
    commit (preupload answers "regular"), so no LFS or Xet transfer is needed. Writes need
    `Bearer <write_token>`, else 401 as the hub answers a read-only or wrong token."""
    if write_token is None or req.headers.get("authorization") != f"Bearer {write_token}":
        return _json({"error": "Invalid username or password."}, 401)
    parts = req.path.strip("/").split("/")
    if parts == ["api", "validate-yaml"]:
        return _json({})
    if parts == ["api", "repos", "create"]:
        payload = json.loads(req.body)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in repos:
            return _json({"error": "You already created this model repo", "url": f"/{repo_id}"}, 409)
        repos[repo_id] = HfRepo({}, commit="0" * 40)
        return _json({"url": f"http://{req.headers['host']}/{repo_id}", "name": repo_id})
    repo_id = "/".join(parts[2:4])
    if parts[:2] != ["api", "models"] or repo_id not in repos:
        return _json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
    repo = repos[repo_id]
    if parts[4:5] == ["preupload"]:
        files = json.loads(req.body)["files"]
        return _json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
    if parts[4:5] == ["commit"]:
        for line in req.body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                return _json({"error": f"not emulated: {item['key']}"}, 400)
        repo.commit = hashlib.sha1(repr(sorted(repo.files.items())).encode()).hexdigest()
        return _json({"commitUrl": f"/{repo_id}/commit/{repo.commit}", "commitOid": repo.commit})
    return Reply(404)


def hugging_face(repos: dict[str, HfRepo], write_token: str | None = None) -> Loopback:
    """Reads as the hub answers them; with write_token, uploads too (repos gains what is created)."""

    def route(req: Request) -> Reply:
        if req.method == "POST":
            return _hub_write(req, repos, write_token)
        parts = req.path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo_id = "/".join(parts[2:4] if api else parts[:2])
        repo = repos.get(repo_id)
        auth = req.headers.get("authorization")
        if repo is not None and repo.gated and not api and auth != f"Bearer {repo.token}":
            return _json({"error": "Access to this repo is restricted"}, 403, {"X-Error-Code": "GatedRepo"})
        if repo is None or (repo.token and not repo.gated and auth != f"Bearer {repo.token}"):
            return _json({"error": "Repository not found"}, 401, {"X-Error-Code": "RepoNotFound"})
        if api:
            rev = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
            if rev not in ("main", repo.commit):
                return _json({"error": "Invalid rev id"}, 404, {"X-Error-Code": "RevisionNotFound"})
            # Sizes only when asked for (`files_metadata=True` sends blobs=true), as the hub does.
            sized = req.query.get("blobs") == ["true"]
            siblings = [{"rfilename": n, **({"size": len(data)} if sized else {})} for n, data in repo.files.items()]
            gated = "auto" if repo.gated else False
            return _json(
                {"id": repo_id, "sha": repo.commit, "siblings": siblings, "private": bool(repo.token), "gated": gated}
            )
        if len(parts) < 5 or parts[2] != "resolve":
            return Reply(404)
        rev, filename = parts[3], "/".join(parts[4:])
        if rev not in ("main", repo.commit):
            return _json({}, 404, {"X-Error-Code": "RevisionNotFound"})
        if filename not in repo.files:
            return _json({}, 404, {"X-Error-Code": "EntryNotFound"})
        data = repo.files[filename]
        etag = '"' + hashlib.sha256(data).hexdigest() + '"'
        return Reply(200, data, {"X-Repo-Commit": repo.commit, "ETag": etag})

    return Loopback(route)


def point_hub_client_at(hub: Loopback, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub talks to this emulator, without telemetry and without a machine token."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)


def point_clients_at(hub: Loopback, civitai: Loopback, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hugging Face and CivitAI clients talk to these emulators, with no machine tokens."""
    point_hub_client_at(hub, monkeypatch)
    monkeypatch.setenv("CIVITAI_ENDPOINT", civitai.url)
    monkeypatch.delenv("CIVITAI_API_TOKEN", raising=False)


@dataclass
class CivitaiVersion:
    id: int
    base_model: str
    data: bytes
    token: str | None = None  # set: the download needs this token
    login_redirect: bool = False  # refuse by redirecting to a login page, as CivitAI sometimes does
    trained_words: tuple[str, ...] = ()  # the version's trigger words (trainedWords)
    variants: tuple[bytes, ...] = ()  # more Model files of the version (fp16, pruned ...), not primary


def civitai_hashes(data: bytes) -> dict[str, str]:
    """The hashes CivitAI lists for a file: SHA256, AutoV2 (its first 10 hex digits) and AutoV3
    (A1111's LoRA hash: the sha256 of the bytes after the safetensors header, first 12)."""
    whole = hashlib.sha256(data).hexdigest().upper()
    header = int.from_bytes(data[:8], "little")
    after = hashlib.sha256(data[8 + header :]).hexdigest().upper()
    return {"SHA256": whole, "AutoV2": whole[:10], "AutoV3": after[:12]}


def civitai(models: dict[int, list[CivitaiVersion]]) -> Loopback:
    """/api/v1/models, /api/v1/model-versions (by id and by-hash), /api/download/models -> 307 to
    signed storage."""
    by_version = {v.id: (mid, v) for mid, versions in models.items() for v in versions}
    by_hash = {
        h.lower(): vid
        for vid, (_, v) in by_version.items()
        for data in (v.data, *v.variants)
        for h in civitai_hashes(data).values()
    }
    holder: dict[str, Loopback] = {}

    def version_json(v: CivitaiVersion) -> dict:
        base = holder["server"].url
        return {
            "id": v.id,
            "baseModel": v.base_model,
            "trainedWords": list(v.trained_words),
            "files": [
                {"name": f"training-{v.id}.zip", "type": "Training Data", "primary": False, "metadata": {}},
                {
                    "name": f"lora-{v.id}.safetensors",
                    "type": "Model",
                    "primary": True,
                    "metadata": {"format": "SafeTensor"},
                    "sizeKB": len(v.data) / 1024,
                    "hashes": civitai_hashes(v.data),
                    "downloadUrl": f"{base}/api/download/models/{v.id}",
                },
                *(
                    {
                        "id": v.id * 10 + i,
                        "name": f"lora-{v.id}-{i}.safetensors",
                        "type": "Model",
                        "primary": False,
                        "metadata": {"format": "SafeTensor"},
                        "sizeKB": len(data) / 1024,
                        "hashes": civitai_hashes(data),
                        "downloadUrl": f"{base}/api/download/models/{v.id}?variant={i}",
                    }
                    for i, data in enumerate(v.variants, 1)
                ),
            ],
        }

    def route(req: Request) -> Reply:
        parts = req.path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "models"] and len(parts) == 4 and int(parts[3]) in models:
            return _json({"id": int(parts[3]), "modelVersions": [version_json(v) for v in models[int(parts[3])]]})
        if parts[:4] == ["api", "v1", "model-versions", "by-hash"] and len(parts) == 5:
            if parts[4].lower() not in by_hash:
                return _json({"error": f"Model not found for hash {parts[4]}"}, 404)
            mid, v = by_version[by_hash[parts[4].lower()]]
            return _json({**version_json(v), "modelId": mid})
        if parts[:3] == ["api", "v1", "model-versions"] and len(parts) == 4 and int(parts[3]) in by_version:
            mid, v = by_version[int(parts[3])]
            return _json({**version_json(v), "modelId": mid})
        if parts[:3] == ["api", "download", "models"] and len(parts) == 4 and int(parts[3]) in by_version:
            _, v = by_version[int(parts[3])]
            if v.token and req.headers.get("authorization") != f"Bearer {v.token}":
                if v.login_redirect:
                    return Reply(307, headers={"Location": f"{holder['server'].url}/login?returnUrl=/x"})
                return _json({"error": "Unauthorized"}, 401)
            stored = f"{v.id}-{req.query['variant'][0]}" if "variant" in req.query else str(v.id)
            return Reply(307, headers={"Location": f"{holder['server'].url}/storage/{stored}.safetensors?X-Sig=abc"})
        if parts[:1] == ["storage"]:
            vid, _, variant = parts[1].split(".")[0].partition("-")
            v = by_version[int(vid)][1]
            data = v.variants[int(variant) - 1] if variant else v.data
            return Reply(200, data, {"Content-Disposition": f'attachment; filename="lora-{vid}.safetensors"'})
        if parts[:1] == ["login"]:
            return Reply(200, b"<!DOCTYPE html><html>log in</html>", {"Content-Type": "text/html"})
        return _json({"error": "Not found"}, 404)

    holder["server"] = Loopback(route)
    return holder["server"]


def trained_tar(lora: bytes, embeddings: bytes | None = None) -> bytes:
    """Replicate's SDXL trainer output: lora.safetensors (+ embeddings.pti, special_params.json)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        members = {"lora.safetensors": lora}
        if embeddings is not None:
            members["embeddings.pti"] = embeddings
            members["special_params.json"] = b'{"TOK": "<s0><s1>"}'
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def file_host(files: dict[str, bytes], query_secrets: dict[str, tuple[str, str]] | None = None) -> Loopback:
    """Plain files at /<name>, Replicate's `/<owner>/<model>/_weights` redirecting to a tar.
    A file in query_secrets ({name: (query key, value)}) is served only with that query value,
    as private hosts and presigned storage URLs do; otherwise 403."""
    holder: dict[str, Loopback] = {}

    def route(req: Request) -> Reply:
        path = req.path.strip("/")
        if path in (query_secrets or {}):
            key, value = (query_secrets or {})[path]
            if req.query.get(key) != [value]:
                return Reply(403, b"<Error><Code>AccessDenied</Code></Error>", {"Content-Type": "application/xml"})
        if path.endswith("/_weights"):
            target = path.removesuffix("/_weights").replace("/", "-") + "/trained_model.tar"
            if target in files:
                return Reply(307, headers={"Location": f"{holder['server'].url}/{target}"})
        if path in files:
            kind = "text/html" if files[path].lstrip().startswith(b"<") else "application/octet-stream"
            return Reply(200, files[path], {"Content-Type": kind})
        return Reply(404, b"not found")

    holder["server"] = Loopback(route)
    return holder["server"]
