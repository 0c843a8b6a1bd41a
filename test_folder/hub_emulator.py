"""A loopback Hugging Face hub: the endpoints huggingface_hub uses, served from a dict of files.

Speaks the protocol facts in DESIGN.md §8: X-Repo-Commit and ETag on resolve, X-Error-Code
to pick the client's exception, 401 + RepoNotFound for an anonymous request to a private repo,
no Xet headers. It counts every request so tests can prove what went over the wire.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes]
    token: str | None = None  # set: the repo is private and needs this token
    commit: str = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubEmulator:
    repos: dict[str, Repo] = field(default_factory=dict)
    hits: Counter = field(default_factory=Counter)
    auth_headers: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _reply(self, status: int, headers: dict[str, str], payload: bytes, body: bool) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def _serve(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.hits[f"{self.command} {path}"] += 1
                auth = self.headers.get("Authorization")
                hub.auth_headers.append(auth)
                parts = path.strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    self._reply(404, {}, b"not found", body)
                    return
                repo_id, rev, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.token and auth != f"Bearer {repo.token}"):
                    self._reply(401, {"X-Error-Code": "RepoNotFound"}, b'{"error":"Repository not found"}', body)
                    return
                if rev not in ("main", repo.commit):
                    self._reply(404, {"X-Error-Code": "RevisionNotFound"}, b"{}", body)
                    return
                if filename not in repo.files:
                    self._reply(404, {"X-Error-Code": "EntryNotFound"}, b"{}", body)
                    return
                data = repo.files[filename]
                headers = {
                    "X-Repo-Commit": repo.commit,
                    "ETag": '"' + hashlib.sha256(data).hexdigest() + '"',
                    "Content-Type": "application/octet-stream",
                }
                self._reply(200, headers, data, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubEmulator:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requests_for(self, repo_id: str) -> int:
        return sum(n for key, n in self.hits.items() if f"/{repo_id}/" in key)

    def dump(self) -> str:
        return json.dumps(dict(self.hits), indent=1)
