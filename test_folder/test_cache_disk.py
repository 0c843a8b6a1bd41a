"""The LoRA cache and the disk (issue 19 #5, issue 24 #5): room is made before a download, the
disk floor counts a new file once, a full disk is said so, index.json is written only when it
changes while the LRU order still holds across processes, trained-model tars cannot unpack past
the cap, and a request waiting on another process's download of the same file says so.

The disk tests run the store in a child process on a small tmpfs of its own (a private mount
namespace, `unshare -rm`), where free space is exact and nothing else writes; they are skipped
where the machine allows no user namespace.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import json
import logging
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from test_folder.emulators import HfRepo, Loopback, file_host, hugging_face, point_hub_client_at, trained_tar
from test_folder.test_weights import wait_for
from weights import Credentials, Downloader, LoraStore, WeightsError

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMIT = HfRepo({}).commit


@pytest.fixture
def files(lora_files: dict[str, bytes]) -> Iterator[Loopback]:
    host = file_host(
        {
            "a.safetensors": lora_files["a"],
            "b.safetensors": lora_files["b"],
            "c.safetensors": lora_files["te"],
            "plain/trained_model.tar": trained_tar(lora_files["a"]),
            "gzip/trained_model.tar": gzip.compress(trained_tar(lora_files["a"])),
            "gzip/download": gzip.compress(trained_tar(lora_files["a"])),
            "sparse/trained_model.tar": sparse_tar("lora.safetensors", 50_000_000),
            "sparse/download": sparse_tar("lora.safetensors", 50_000_000),
        }
    )
    yield host
    host.close()


@pytest.fixture
def store(tmp_path: Path) -> LoraStore:
    return LoraStore(tmp_path / "cache", Downloader("python"))


def sparse_tar(name: str, real_size: int) -> bytes:
    """A plain 2 KiB tar whose one member is a GNU sparse file stating `real_size` bytes: tarfile
    unpacks it to that many (zeros), far more than the archive that was downloaded."""
    stored = b"x" * 512
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = len(stored)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % 0  # the sparse map's one extent: offset 0 ...
    header[398:410] = b"%011o\0" % len(stored)  # ... of the stored bytes
    header[483:495] = b"%011o\0" % real_size  # the size it unpacks to
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + stored + b"\0" * 1024


# ---------------------------------------------------------------------------------------------
# The index and the LRU order


def test_a_hit_does_not_rewrite_the_index(store: LoraStore, files: Loopback) -> None:
    url = f"{files.url}/a.safetensors"
    store.fetch(url, 1.0, Credentials())
    before = (store.root / "index.json").stat()
    for _ in range(3):
        store.fetch(url, 1.0, Credentials())
    after = (store.root / "index.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "index.json was rewritten"
    assert files.hits["GET /a.safetensors"] == 1


def test_the_least_recently_used_file_goes_first_whichever_process_used_it(
    store: LoraStore, files: Loopback, lora_files: dict[str, bytes]
) -> None:
    sizes = {name: len(lora_files[key]) for name, key in (("a", "a"), ("b", "b"), ("c", "te"))}
    store.max_bytes = sum(sizes.values()) - 1  # c fits only once one of a and b is gone
    for name in ("a", "b"):
        store.fetch(f"{files.url}/{name}.safetensors", 1.0, Credentials())
    other = LoraStore(store.root, Downloader("python"))  # another process's view of the cache
    other.fetch(f"{files.url}/a.safetensors", 1.0, Credentials())  # a hit: a is now the newer
    store.fetch(f"{files.url}/c.safetensors", 1.0, Credentials())
    entries = json.loads((store.root / "index.json").read_text())["entries"]
    assert sorted(e["name"].rsplit("/", 1)[-1] for e in entries.values()) == ["a.safetensors", "c.safetensors"]
    assert len(list(store.files.iterdir())) == 2


def test_room_is_made_before_the_download(
    tmp_path: Path, lora_files: dict[str, bytes], files: Loopback, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub states the size: the least recently used file is evicted before a byte arrives."""
    hub = hugging_face({"acme/style": HfRepo({"style.safetensors": lora_files["b"]})})
    point_hub_client_at(hub, monkeypatch)
    store = LoraStore(tmp_path / "cache", Downloader("python"))
    store.max_bytes = len(lora_files["a"]) + len(lora_files["b"]) - 1
    old = store.fetch(f"{files.url}/a.safetensors", 1.0, Credentials())
    hub.holds[f"GET /acme/style/resolve/{COMMIT}/style.safetensors"] = release = threading.Event()
    worker = threading.Thread(target=store.fetch, args=("hf://acme/style", 1.0, Credentials()))
    worker.start()
    try:
        wait_for(lambda: hub.hits[f"GET /acme/style/resolve/{COMMIT}/style.safetensors"] == 1, "the download")
        assert not old.path.exists(), "the old file was still there while the new one downloaded"
    finally:
        release.set()
        worker.join(timeout=30)
        hub.close()


def test_a_wait_on_another_processs_download_is_logged_then_the_hit(
    store: LoraStore, files: Loopback, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"{files.url}/a.safetensors"
    files.holds["GET /a.safetensors"] = release = threading.Event()
    caplog.set_level(logging.INFO)
    other = LoraStore(store.root, Downloader("python"))  # another process's view of the cache
    first = threading.Thread(target=store.fetch, args=(url, 1.0, Credentials()))
    second = threading.Thread(target=other.fetch, args=(url, 1.0, Credentials()))
    first.start()
    try:
        wait_for(lambda: files.hits["GET /a.safetensors"] == 1, "the first download")
        second.start()
        wait_for(lambda: "waiting for it" in caplog.text, "the wait to be logged")
    finally:
        release.set()
        first.join(timeout=30)
        if second.is_alive():
            second.join(timeout=30)
    lines = [r.getMessage() for r in caplog.records if r.name == "weightstore.cache"]
    waited = next(i for i, line in enumerate(lines) if "another download of the same file is running" in line)
    assert any("LoRA cache hit" in line and "with the wait" in line for line in lines[waited + 1 :]), lines
    assert files.hits["GET /a.safetensors"] == 1


# ---------------------------------------------------------------------------------------------
# Trained-model tars


def test_a_plain_trained_tar_loads(store: LoraStore, files: Loopback, lora_files: dict[str, bytes]) -> None:
    assert store.fetch(f"{files.url}/plain/trained_model.tar", 1.0, Credentials()).path.read_bytes() == lora_files["a"]


@pytest.mark.parametrize("form", ["{files}/gzip/trained_model.tar", "{files}/gzip/download", "data:"])
def test_a_compressed_tar_is_not_unpacked(store: LoraStore, files: Loopback, lora_files: dict, form: str) -> None:
    """A .tar.gz, whatever its URL or source, is refused saying to send the plain tar."""
    if form == "data:":
        form += "application/gzip;base64," + base64.b64encode(gzip.compress(trained_tar(lora_files["a"]))).decode()
    with pytest.raises(WeightsError, match=r"is gzip-compressed: send the plain trained_model\.tar as Replicate"):
        store.fetch(form.format(files=files.url), 1.0, Credentials())
    assert not list(store.files.iterdir())


def _zipped(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("style.safetensors", data)
    return buf.getvalue()


def _torch_file(data: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("pack", "message"),
    [
        (lambda lora: bz2.compress(trained_tar(lora)), r"is bzip2-compressed: send the plain trained_model\.tar"),
        (lambda lora: lzma.compress(trained_tar(lora)), r"is xz-compressed: send the plain trained_model\.tar"),
        (_zipped, r"is a zip archive \(a PyTorch \.ckpt/\.pt file is a zip too\): send the \.safetensors"),
        (_torch_file, r"is a zip archive \(a PyTorch \.ckpt/\.pt file is a zip too\)"),
    ],
    ids=["tar.bz2", "tar.xz", "zip", "torch.save"],
)
def test_an_archive_or_pickle_is_refused_by_what_it_is(
    store: LoraStore, lora_files: dict, pack: Any, message: str
) -> None:
    """Made by Python's own bz2, lzma, zipfile and torch.save, as people pack what they send:
    each is named for what it is, not called a broken .safetensors, and nothing is kept."""
    data = "data:application/octet-stream;base64," + base64.b64encode(pack(lora_files["a"])).decode()
    with pytest.raises(WeightsError, match=message):
        store.fetch(data, 1.0, Credentials())
    assert not list(store.files.iterdir())


@pytest.mark.parametrize("path", ["sparse/trained_model.tar", "sparse/download"])
def test_a_member_is_sized_before_it_is_unpacked(
    tmp_path: Path, files: Loopback, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """2 KiB on the wire, 50 MB unpacked: refused from its header, nothing written, whether the
    URL says .tar or the bytes alone do."""
    monkeypatch.setenv("LORA_MAX_FILE_BYTES", str(10_000_000))
    store = LoraStore(tmp_path / "cache", Downloader("python"))
    with pytest.raises(WeightsError, match=r"lora\.safetensors unpacks to 50000000 bytes, over the 10000000-byte"):
        store.fetch(f"{files.url}/{path}", 1.0, Credentials())
    assert not list(store.files.iterdir())


# ---------------------------------------------------------------------------------------------
# A small disk of the test's own

CHILD = """
import json, shutil, sys
from pathlib import Path
from weights import Credentials, Downloader, LoraStore, WeightsError

disk = Path(sys.argv[1])
out = {}

def fetch(store, source):
    try:
        store.fetch(source, 1.0, Credentials())
        return "ok"
    except WeightsError as exc:
        return f"WeightsError: {exc}"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"

def free():
    return shutil.disk_usage(disk).free

def left(store):
    return sorted(p.name for p in store.files.iterdir())
"""


def on_a_small_disk(tmp_path: Path, kib: int, body: str) -> dict[str, Any]:
    """Run `body` (after CHILD) in a child process whose `disk` is a fresh tmpfs of `kib` KiB; its `out`."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespace here to mount a small tmpfs in")
    disk = tmp_path / "disk"
    disk.mkdir()
    code = CHILD + body + "\nprint(json.dumps(out))\n"
    mount = 'mount -t tmpfs -o size="$0"k tmpfs "$1" && exec "$2" -c "$3" "$1"'
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount, str(kib), str(disk), sys.executable, code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_disk_floor_counts_a_downloaded_file_once(tmp_path: Path, files: Loopback, lora_files: dict) -> None:
    size = len(lora_files["b"])
    out = on_a_small_disk(
        tmp_path,
        2048,
        f"""
store = LoraStore(disk / "cache", Downloader("python"))
store.min_free = free() - {size} - {size} // 2  # room for the file and half as much again
out["fits"] = fetch(store, "{files.url}/b.safetensors")
out["kept"] = free() >= store.min_free
other = LoraStore(disk / "other", Downloader("python"))
other.min_free = free() - {size} // 2  # room for half of it only
out["floor"] = fetch(other, "{files.url}/b.safetensors")
out["left"] = left(other)
""",
    )
    assert out["fits"] == "ok" and out["kept"], out
    assert out["floor"].startswith("WeightsError: not enough disk space for "), out
    assert out["left"] == [], "a refused file is not left behind"


def test_a_full_disk_while_streaming_says_so(tmp_path: Path, files: Loopback, lora_files: dict) -> None:
    assert len(lora_files["b"]) > 128 * 1024, "the file must not fit the small disk"
    out = on_a_small_disk(
        tmp_path,
        128,
        f"""
store = LoraStore(disk / "cache", Downloader("python"))
store.min_free = 0
out["result"] = fetch(store, "{files.url}/b.safetensors")
out["left"] = left(store)
""",
    )
    assert out["result"].startswith("WeightsError: the server's disk is full, so "), out
    assert "b.safetensors could not be stored: try again later" in out["result"], out
    assert out["left"] == [], "no part is left behind"


def test_a_full_disk_while_writing_the_index_says_so_and_keeps_the_old_index(tmp_path: Path, lora_files: dict) -> None:
    payload = base64.b64encode(lora_files["loha"]).decode()
    first, second = (f"data:{mime};base64,{payload}" for mime in ("application/octet-stream", "text/plain"))
    out = on_a_small_disk(
        tmp_path,
        512,
        f"""
store = LoraStore(disk / "cache", Downloader("python"))
store.min_free = 0
out["first"] = fetch(store, "{first}")
with open(disk / "filler", "wb", buffering=0) as filler:  # fill the disk to the last byte
    try:
        while True:
            filler.write(b"x" * 4096)
    except OSError:
        pass
out["second"] = fetch(store, "{second}")  # the same bytes under another string: a new alias
index = json.loads((disk / "cache" / "index.json").read_text())
out["entries"] = len(index["entries"])
out["stray"] = sorted(p.name for p in (disk / "cache").iterdir() if p.name.startswith(".index"))
""",
    )
    assert out["first"] == "ok", out
    assert out["second"] == (
        "WeightsError: the server's disk is full, so the LoRA cache's index could not be stored: try again later "
        "(the operator can free disk space, or lower LORA_CACHE_MAX_BYTES)"
    ), out
    assert out["entries"] == 1 and out["stray"] == [], "the old index is whole, no temporary file is left"
