"""The weights story below the engine: credentials in URLs, clear errors for every LoRA string,
a cache that never blocks, and both downloaders, against loopback hosts.

Every test names its downloader: `python` is what this machine has; `pget` is exercised through
a stand-in script on PATH (the real binary cannot be installed here), to prove what wraps it.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, load_file

from test_folder.emulators import HfRepo, Loopback, file_host, hugging_face, point_hub_client_at
from weights import Credentials, Downloader, LoraStore, WeightsError, parse_lora

URL_TOKEN = "url-query-secret-5150"
SIGNATURE = "presigned-signature-8d3f"
HF_TOKEN = "hf_weights_secret_7781"
SERVER_PATH = "the LoRA is a path on the server, and requests do not read the server's files"


def python_downloader() -> Downloader:
    """The downloader of a machine without pget (this one). conftest sets the backoff to 0."""
    return Downloader("python")


@pytest.fixture
def files(lora_files: dict[str, bytes]) -> Iterator[Loopback]:
    host = file_host(
        {
            "a.safetensors": lora_files["a"],
            "b.safetensors": lora_files["b"],
            "private.safetensors": lora_files["a"],
            "bucket/signed.safetensors": lora_files["b"],
            "brace.safetensors": unpadded(lora_files["a"], b"{"),
            "bracket.safetensors": unpadded(lora_files["b"], b"["),
            "gzip-magic.safetensors": unpadded(lora_files["a"], b"\x1f\x8b"),
            "json.safetensors": b'{"error": "not found"}',
        },
        query_secrets={
            "private.safetensors": ("token", URL_TOKEN),
            "bucket/signed.safetensors": ("X-Amz-Signature", SIGNATURE),
        },
    )
    yield host
    host.close()


@pytest.fixture
def store(tmp_path: Path) -> LoraStore:
    return LoraStore(tmp_path / "cache", python_downloader())


def unpadded(data: bytes, first: bytes) -> bytes:
    """The same safetensors file with its JSON header padded to a length whose low bytes are `first`,
    as a writer that does not align its header to 8 bytes may produce."""
    size = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + size].rstrip()
    length = len(header) + (int.from_bytes(first, "little") - len(header)) % 256 ** len(first)
    return length.to_bytes(8, "little") + header.ljust(length) + data[8 + size :]


def everything_in(root: Path) -> str:
    """Every file name and every readable text under root, to grep for secrets."""
    parts = []
    for path in root.rglob("*"):
        parts.append(path.name)
        if path.is_file() and path.suffix in (".json", ".lock", "") and path.stat().st_size < 10**6:
            parts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("name", "first", "source"),
    [
        ("brace.safetensors", b"{", "a"),
        ("bracket.safetensors", b"[", "b"),
        ("gzip-magic.safetensors", b"\x1f\x8b", "a"),
    ],
)
def test_a_valid_file_starting_with_a_brace_is_accepted(
    store: LoraStore, files: Loopback, lora_files: dict[str, bytes], name: str, first: bytes, source: str
) -> None:
    lora = store.fetch(f"{files.url}/{name}", 1.0, Credentials())
    assert lora.path.read_bytes()[: len(first)] == first
    read, expected = load_file(lora.path), load(lora_files[source])
    assert read.keys() == expected.keys(), "every tensor of the file it pads"
    assert all(np.array_equal(read[key], expected[key]) for key in expected)


def test_a_json_page_is_still_refused(store: LoraStore, files: Loopback) -> None:
    with pytest.raises(WeightsError, match="HTML or JSON page instead of a file"):
        store.fetch(f"{files.url}/json.safetensors", 1.0, Credentials())


# ---------------------------------------------------------------------------------------------
# Credentials inside URLs


@pytest.mark.parametrize(
    ("path", "key", "secret"),
    [("private.safetensors", "token", URL_TOKEN), ("bucket/signed.safetensors", "X-Amz-Signature", SIGNATURE)],
    ids=["query-token", "presigned-signature"],  # test ids are written to pytest's cache: no secrets
)
def test_a_cached_private_url_is_never_served_without_its_credential(
    store: LoraStore, files: Loopback, caplog: pytest.LogCaptureFixture, path: str, key: str, secret: str
) -> None:
    base = f"{files.url}/{path}"
    good = f"{base}?X-Amz-Credential=AKIA-cred-1&{key}={secret}&v=1"
    caplog.set_level(logging.DEBUG)
    first = store.fetch(good, 1.0, Credentials())
    assert files.hits[f"GET /{path}"] == 1
    errors = []
    for other in (f"{base}?{key}=wrong-value&v=1", f"{base}?v=1", base):
        with pytest.raises(WeightsError, match="HTTP 403") as err:
            store.fetch(other, 1.0, Credentials())
        errors.append(str(err.value))
    assert files.hits[f"GET /{path}"] == 4, "each caller without the credential asked the host, none got the file"
    assert all("refused access (HTTP 403): the URL needs a valid credential" in e for e in errors), errors
    assert store.fetch(good, 1.0, Credentials()).path == first.path
    assert files.hits[f"GET /{path}"] == 4, "the caller with the credential is served from the cache"
    shown = "\n".join([*errors, caplog.text, everything_in(store.root), repr(first)])
    for leaked in (secret, "wrong-value", "AKIA-cred-1"):
        assert leaked not in shown


def test_user_and_password_in_the_host_part_are_a_credential() -> None:
    ref = parse_lora("https://alice:pa55word@files.example/x.safetensors")
    assert "pa55word" not in ref.display + ref.ident + repr(ref)


def test_errors_from_the_http_stack_never_echo_the_query(store: LoraStore, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    caplog.set_level(logging.DEBUG)
    with pytest.raises(WeightsError, match="after 5 tries: the host could not be reached") as err:
        store.fetch(f"http://127.0.0.1:{port}/x.safetensors?token=hf_dead_host_secret", 1.0, Credentials())
    assert "hf_dead_host_secret" not in str(err.value) + caplog.text
    assert "?token" not in str(err.value) + caplog.text
    assert "ConnectionError" not in str(err.value) and "urllib3" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Clear errors for every LoRA string


@pytest.mark.parametrize(
    ("source", "message"),
    [
        # With no LOCAL_FILES_DIR (the image's default), a server path gets one answer, whatever it names.
        ("/nonexistent/dir/y.safetensors", SERVER_PATH),
        ("./missing-a.safetensors", SERVER_PATH),
        ("../missing-b.safetensors", SERVER_PATH),
        ("~/missing-c.safetensors", SERVER_PATH),
        ("/etc/passwd", SERVER_PATH),
        ("/tmp", SERVER_PATH),
        ("loras/x.safetensors", SERVER_PATH),
        ("file:///tmp/x.safetensors", SERVER_PATH),
        ("ftp://host/x.safetensors", "ftp:// LoRA locations are not read: serve the file over https"),
        ("s3://bucket/x.safetensors", "s3:// LoRA locations are not read: pass a presigned https URL"),
        ("gs://bucket/x.safetensors", "gs:// LoRA locations are not read: pass a signed https URL"),
        ("gopher://host/x", "unsupported LoRA URL scheme gopher://"),
        ("just-a-word", "cannot tell where LoRA 'just-a-word' lives"),
    ],
)
def test_lora_strings_that_cannot_be_read_say_why_without_any_request(
    source: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOCAL_FILES_DIR", raising=False)
    with pytest.raises(WeightsError) as err:
        parse_lora(source)
    assert message in str(err.value)


def test_a_local_safetensors_path_is_read_as_a_file(store: LoraStore, tmp_path: Path, lora_files: dict) -> None:
    path = tmp_path / "mine.safetensors"
    path.write_bytes(lora_files["a"])
    assert store.fetch(str(path), 1.0, Credentials()).path == path


@pytest.fixture
def hub(lora_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[Loopback]:
    hf = hugging_face(
        {
            "acme/style": HfRepo({"style.safetensors": lora_files["a"]}),
            "acme/gated": HfRepo({"g.safetensors": lora_files["b"]}, token=HF_TOKEN, gated=True),
        }
    )
    point_hub_client_at(hf, monkeypatch)
    yield hf
    hf.close()


def test_unreachable_hub_says_so(store: LoraStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(WeightsError, match="acme/style after 5 tries: Hugging Face could not be reached"):
        store.fetch("hf://acme/style", 1.0, Credentials())


def test_gated_repo_names_the_token(store: LoraStore, hub: Loopback) -> None:
    with pytest.raises(WeightsError, match="is gated: accept its terms on the hub, then pass an hf_api_token"):
        store.fetch("hf://acme/gated", 1.0, Credentials())
    lora = store.fetch("hf://acme/gated", 1.0, Credentials(hf=HF_TOKEN))
    assert lora.path.exists()
    with pytest.raises(WeightsError, match="is gated"):
        store.fetch("hf://acme/gated", 1.0, Credentials())


# ---------------------------------------------------------------------------------------------
# The cache never blocks, and keeps nothing it cannot account for


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_a_cache_hit_is_not_blocked_by_another_download(store: LoraStore, files: Loopback) -> None:
    store.fetch(f"{files.url}/a.safetensors", 1.0, Credentials())
    files.holds["GET /b.safetensors"] = release = threading.Event()
    other = LoraStore(store.root, python_downloader())  # another process's view of the same cache
    slow = threading.Thread(target=other.fetch, args=(f"{files.url}/b.safetensors", 1.0, Credentials()))
    slow.start()
    try:
        wait_for(lambda: files.hits["GET /b.safetensors"] == 1, "the download of b to start")
        hit = threading.Thread(target=store.fetch, args=(f"{files.url}/a.safetensors", 1.0, Credentials()))
        hit.start()
        hit.join(timeout=20)
        assert not hit.is_alive(), "the hit waited for another file's download"
        assert slow.is_alive(), "b was still downloading while a was served"
    finally:
        release.set()
        slow.join(timeout=30)


def test_two_loras_of_one_request_download_at_the_same_time(store: LoraStore, files: Loopback) -> None:
    gates = {name: threading.Event() for name in ("a", "b")}
    for name, gate in gates.items():
        files.holds[f"GET /{name}.safetensors"] = gate
    results: list = []
    specs = [(f"{files.url}/a.safetensors", 1.0), (f"{files.url}/b.safetensors", 0.5)]
    worker = threading.Thread(target=lambda: results.extend(store.fetch_all(specs, Credentials())))
    worker.start()
    try:
        wait_for(lambda: files.hits["GET /a.safetensors"] == files.hits["GET /b.safetensors"] == 1, "both downloads")
    finally:
        for gate in gates.values():
            gate.set()
        worker.join(timeout=30)
    assert [lora.scale for lora in results] == [1.0, 0.5]
    assert all(lora.path.exists() for lora in results)


def _key_lock(root: Path, keyhash: str) -> int:
    fd = os.open(root / "locks" / f"{keyhash}.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_parts_left_by_a_killed_download_are_removed_at_start(store: LoraStore) -> None:
    dead = store.files / f".part-{'d' * 64}-x1"
    dead.write_bytes(b"half a file")
    (store.files / f".part-{'d' * 64}-x1-hubdir").mkdir()
    (store.locks / f"{'d' * 64}.lock").touch()  # the killed process's lock file, which nobody holds
    live = store.files / f".part-{'e' * 64}-x2"
    live.write_bytes(b"still being written")
    fd = _key_lock(store.root, "e" * 64)  # another process is downloading that one
    try:
        LoraStore(store.root, python_downloader())
    finally:
        os.close(fd)
    assert not dead.exists() and not (store.files / f".part-{'d' * 64}-x1-hubdir").exists()
    assert live.exists()
    assert [p.name for p in store.locks.iterdir()] == [f"{'e' * 64}.lock"], "only the held lock file is left"


def _lock_waiters(path: Path) -> int:
    """Processes or threads blocked in flock on this file now, from the kernel's lock table."""
    inode = f":{path.stat().st_ino} "
    with open("/proc/locks") as table:
        return sum(1 for line in table if " -> FLOCK " in line and inode in line)


def test_a_lock_file_lasts_only_while_its_download_runs(store: LoraStore, files: Loopback) -> None:
    url = f"{files.url}/a.safetensors"
    files.holds["GET /a.safetensors"] = release = threading.Event()
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(store.fetch(url, 1.0, Credentials()))) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: files.hits["GET /a.safetensors"] == 1, "the download to start")
        (lock,) = store.locks.iterdir()
        wait_for(lambda: _lock_waiters(lock) == 2, "the other two to wait on the download's lock file")
    finally:
        release.set()
        for thread in threads:
            thread.join(timeout=30)
    # The two woke on a removed file, took the lock again on a new one and found the file cached.
    assert len(results) == 3 and len({lora.path for lora in results}) == 1
    assert files.hits["GET /a.safetensors"] == 1
    assert list(store.locks.iterdir()) == []
    with pytest.raises(WeightsError, match="404"):
        store.fetch(f"{files.url}/missing.safetensors", 1.0, Credentials())
    assert list(store.locks.iterdir()) == [], "a failed download leaves no lock file either"


def test_a_corrupt_index_leaves_no_orphan(store: LoraStore, files: Loopback) -> None:
    url = f"{files.url}/a.safetensors"
    store.fetch(url, 1.0, Credentials())
    (store.root / "index.json").write_text("{ not json")
    restarted = LoraStore(store.root, python_downloader())
    assert [p for p in store.files.iterdir()] == [], "files no index describes are removed"
    assert list(store.root.glob("index.unreadable.*.json")), "the unreadable index is kept aside for a look"
    lora = restarted.fetch(url, 1.0, Credentials())
    assert files.hits["GET /a.safetensors"] == 2
    assert [p.name for p in store.files.iterdir()] == [lora.path.name]
    assert json.loads((store.root / "index.json").read_text())["entries"]


# ---------------------------------------------------------------------------------------------
# pget: what wraps it (a stand-in script plays the binary, which cannot be installed here)

PGET_STAND_IN = """#!{python}
import shutil, sys, urllib.request
url, dest = [a for a in sys.argv[1:] if not a.startswith("-")]
try:
    with urllib.request.urlopen(url) as resp, open(dest, "wb") as out:
        shutil.copyfileobj(resp, out)
except Exception as exc:
    print(f"Error: failed to download {{url}}: {{exc}}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.fixture
def pget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "pget"
    script.write_text(PGET_STAND_IN.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


def test_pget_moves_the_bytes_when_installed(pget: Path, tmp_path: Path, files: Loopback, lora_files: dict) -> None:
    store = LoraStore(tmp_path / "pget-cache", Downloader("pget"))
    lora = store.fetch(f"{files.url}/a.safetensors", 1.0, Credentials())
    assert hashlib.sha256(lora.path.read_bytes()).digest() == hashlib.sha256(lora_files["a"]).digest()
    assert files.hits["GET /a.safetensors"] == 1


def test_a_pget_failure_is_scrubbed_and_falls_back(
    pget: Path, tmp_path: Path, files: Loopback, caplog: pytest.LogCaptureFixture
) -> None:
    store = LoraStore(tmp_path / "pget-cache", Downloader("pget"))
    caplog.set_level(logging.INFO)
    with pytest.raises(WeightsError, match=r"not found \(HTTP 404\)") as err:
        store.fetch(f"{files.url}/missing.safetensors?token={URL_TOKEN}", 1.0, Credentials())
    assert "pget could not fetch" in caplog.text, "pget ran first"
    assert files.hits["GET /missing.safetensors"] == 2, "then one Python stream"
    assert URL_TOKEN not in caplog.text + str(err.value)


def test_pget_downloads_obey_the_size_cap(
    pget: Path, tmp_path: Path, files: Loopback, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORA_MAX_FILE_BYTES", "1000")
    store = LoraStore(tmp_path / "pget-cache", Downloader("pget"))
    with pytest.raises(WeightsError, match="over the 1000-byte limit"):
        store.fetch(f"{files.url}/a.safetensors", 1.0, Credentials())
    assert list(store.files.iterdir()) == []


def test_a_download_never_evicts_a_file_of_the_same_request(
    store: LoraStore, files: Loopback, lora_files: dict
) -> None:
    store.max_bytes = len(lora_files["a"]) + len(lora_files["b"]) - 1  # room for one of the two
    store.fetch(f"{files.url}/a.safetensors", 1.0, Credentials())
    loras = store.fetch_all([(f"{files.url}/a.safetensors", 1.0), (f"{files.url}/b.safetensors", 1.0)], Credentials())
    assert all(lora.path.exists() for lora in loras), "the cache runs over its bound for one request, not under it"


def test_two_data_uris_are_two_files(store: LoraStore, lora_files: dict) -> None:
    uris = [f"data:application/octet-stream;base64,{base64.b64encode(lora_files[n]).decode()}" for n in ("a", "b")]
    first, second = (store.fetch(uri, 1.0, Credentials()) for uri in uris)
    assert first.path.read_bytes() == lora_files["a"] and second.path.read_bytes() == lora_files["b"]
