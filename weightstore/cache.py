"""What is kept: LoRA files on disk, LRU-evicted, shared safely by threads and processes.

- A JSON index maps immutable keys to files (`files/<sha256 of key>.safetensors`) and the
  strings users paste to keys (aliases; a mutable one, such as a branch, expires after a TTL).
  A repeated request is answered from the index with no network request at all.
- Locks: the index lock is held only while the index is read or written, never during a
  download, so a cache hit is never blocked; each key has its own download lock, so a file is
  downloaded once however many threads or processes ask, and two different files at the same time.
  A key's lock file exists only while its download runs: the holder removes it before letting go,
  and whoever then wakes on the removed file takes the lock again on a fresh one. So `locks/` does
  not grow with every LoRA ever asked for (failed downloads included); files left by a killed
  process are removed at start.
- Access: an entry fetched with a credential (a hub token, a URL's token or signature) is
  served only to a caller presenting the same credential, compared by a salted HMAC. Another
  caller downloads it again with their own; a success without any credential makes it public.
- Nothing half-written is visible: bytes go to `.part-<keyhash>-*` under the key's lock and are
  renamed into place; parts left by a killed process are removed at start. A corrupt index is
  set aside and the files it described are removed, so none is orphaned outside the byte bound.
- Room is made before a download (as cog-flux does): least-recently-used entries are evicted
  until the size the host states (or nothing, when it states none) fits the byte bound and the
  disk floor; once the file is on disk, the bound is checked again with its real size, and the
  floor with the disk as it is (the new file is already counted in its free space).
- Recency lives in each file's mtime, set on every hit: one inode update, seen by every process,
  instead of rewriting index.json under its lock on every hit. The index is written only when
  what it says changes (an entry, an alias, an eviction).
- A full disk, while streaming or writing the index, is a `WeightsError` saying so.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from engine.request import Credentials, LocalLora
from weightstore import config
from weightstore.errors import WeightsError, disk_full, is_disk_full
from weightstore.refs import LoraRef, Resolved, parse_lora
from weightstore.resolve import credential_for, embeddings_of, is_tar, local_key, resolve, unpack_if_trained_tar
from weightstore.transfer import Downloader
from weightstore.validate import validate_safetensors

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
INDEX_VERSION = 2
MAX_AUTH_TAGS = 8  # credentials remembered per entry; older ones download again


class LoraStore:
    """`fetch(source, scale, credentials)` -> a local LoRA file, from the cache when possible."""

    def __init__(self, root: Path | None = None, downloader: Downloader | None = None) -> None:
        self.root = Path(root or config.lora_cache_dir())
        self.files = self.root / "files"
        self.locks = self.root / "locks"
        self.files.mkdir(parents=True, exist_ok=True)
        self.locks.mkdir(exist_ok=True)
        self.downloader = downloader or Downloader.from_env()
        self.max_bytes = config.lora_cache_max_bytes()
        self.min_free = config.lora_cache_min_free_bytes()
        self.alias_ttl = config.lora_alias_ttl_seconds()
        with self._index() as index:
            salt = self.root / "salt"
            if not salt.exists():
                salt.write_bytes(os.urandom(16))
            self._salt = salt.read_bytes()
            self._sweep(index)
        self._sweep_locks()

    # -- public -----------------------------------------------------------------------------

    def fetch(self, source: str, scale: float, credentials: Credentials) -> LocalLora:
        """A local file for this LoRA: from the index when possible, else resolved and downloaded."""
        return self.fetch_all([(source, scale)], credentials)[0]

    def fetch_all(self, specs: Sequence[tuple[str, float]], credentials: Credentials) -> list[LocalLora]:
        """Local files for several LoRAs (source, scale). Every string is read before any request;
        files not cached download at the same time, and none of this request's evicts another."""
        refs = [parse_lora(source) for source, _ in specs]
        found = _each(lambda ref: self._find(ref, credentials), refs)
        keep = {item.key if isinstance(item, LocalLora) else item[1].key for item in found}
        loras = _each(
            lambda pair: pair[1] if isinstance(pair[1], LocalLora) else self._download(*pair[1], keep),
            list(zip(refs, found, strict=True)),
        )
        return [replace(lora, scale=scale) for lora, (_, scale) in zip(loras, specs, strict=True)]

    def _find(self, ref: LoraRef, credentials: Credentials) -> LocalLora | tuple[LoraRef, Resolved, str | None]:
        """The cached file when this caller may have it, else what to download."""
        if ref.kind == "local":
            assert ref.path is not None
            if not is_tar(ref.path):  # a tar (known by its bytes) is unpacked into the cache, below
                return LocalLora(local_key(ref.path), ref.path, 1.0, ref.display, file_name=ref.path.name)
        start = time.perf_counter()
        tag = self._tag(credential_for(ref, credentials))
        with self._index() as index:
            hit = self._by_alias(index, ref, tag)
        if hit is None:
            resolved = resolve(ref, credentials, self.downloader)
            hit = self._by_key(resolved.key, ref, tag)
            if hit is None:
                return ref, resolved, tag
        log.info("LoRA cache hit: %s (%d bytes, %.3fs)", ref.display, hit[1]["size"], time.perf_counter() - start)
        return self._local(*hit, ref.display)

    # -- lookups ----------------------------------------------------------------------------

    def _by_alias(self, index: dict, ref: LoraRef, tag: str | None) -> tuple[str, dict] | None:
        link = index["aliases"].get(ref.ident)  # a local tar's path names no fixed bytes: its key does
        if ref.kind == "local" or not link or (ref.mutable and time.time() - link["at"] >= self.alias_ttl):
            return None
        return self._serve(index, link["key"], tag)

    def _by_key(self, key: str, ref: LoraRef, tag: str | None) -> tuple[str, dict] | None:
        with self._index() as index:
            hit = self._serve(index, key, tag)
            if hit is not None:
                index["aliases"][ref.ident] = {"key": key, "at": time.time()}
            return hit

    def _serve(self, index: dict, key: str, tag: str | None) -> tuple[str, dict] | None:
        """The entry when its file is there and this caller may have it; marks it used."""
        entry = index["entries"].get(key)
        path = self.files / _file_name(key)
        if entry is None or not path.exists():
            return None
        if entry["auth"] is not None and tag not in entry["auth"]:
            return None
        _mark_used(path)
        return key, entry

    # -- downloading ------------------------------------------------------------------------

    def _download(self, ref: LoraRef, resolved: Resolved, tag: str | None, keep: set[str]) -> LocalLora:
        key = resolved.key
        start = time.perf_counter()
        with self._key_lock(key, ref.display):
            hit = self._by_key(key, ref, tag)  # another thread or process may have just finished it
            if hit is not None:
                log.info(
                    "LoRA cache hit: %s (%d bytes, %.3fs with the wait)",
                    ref.display,
                    hit[1]["size"],
                    time.perf_counter() - start,
                )
                return self._local(*hit, ref.display)
            with self._index() as index:  # room first, for the size the host states (if any)
                fits = self._make_room(index, key, resolved.size or 0, keep, on_disk=False)
            if not fits:
                raise self._no_room(ref.display)
            fd, name = tempfile.mkstemp(dir=self.files, prefix=_part_prefix(key))
            os.close(fd)
            part = Path(name)
            try:
                try:
                    trigger = (
                        resolved.fetch(part)
                        or unpack_if_trained_tar(part, ref.display, self.downloader.limits.max_bytes)
                        or {}
                    )
                except OSError as exc:
                    if is_disk_full(exc):
                        raise disk_full(ref.display) from None
                    raise
                validate_safetensors(part, ref.display)
                size = part.stat().st_size + (embeddings_of(part).stat().st_size if trigger else 0)
                entry = self._commit(ref, resolved, tag, keep, part, size, trigger)
            finally:
                part.unlink(missing_ok=True)
                embeddings_of(part).unlink(missing_ok=True)
        log.info("LoRA cache miss: %s downloaded, %d bytes in %.2fs", ref.display, size, time.perf_counter() - start)
        return self._local(key, entry, ref.display)

    def _commit(
        self, ref: LoraRef, resolved: Resolved, tag: str | None, keep: set[str], part: Path, size: int, trigger: dict
    ) -> dict:
        """Put a downloaded file into place and into the index, under the index lock; a failed
        index write takes the file out again, so no file sits there that no entry describes."""
        key = resolved.key
        path = self.files / _file_name(key)
        known = False
        try:
            with self._index() as index:
                fits = self._make_room(index, key, size, keep, on_disk=True)  # evictions are written either way
                if fits:
                    old = index["entries"].get(key)
                    known = old is not None
                    entry = {
                        "size": size,
                        "auth": _grant(old["auth"] if old else [], tag),
                        "name": ref.display,
                        "trigger": trigger,
                        "words": list(resolved.trained_words),
                        "file": resolved.file_name,
                    }
                    index["entries"][key] = entry
                    index["aliases"][ref.ident] = {"key": key, "at": time.time()}
                    if trigger:
                        os.replace(embeddings_of(part), embeddings_of(path))
                    os.replace(part, path)
                    _mark_used(path)
        except WeightsError:
            if not known:
                path.unlink(missing_ok=True)
                embeddings_of(path).unlink(missing_ok=True)
            raise
        if not fits:
            raise self._no_room(ref.display)
        return entry

    def _no_room(self, name: str) -> WeightsError:
        return WeightsError(
            f"not enough disk space for {name}: the server keeps {self.min_free} bytes free and no other "
            "LoRA is left to evict. Try again later (the operator can free disk space)"
        )

    def _make_room(self, index: dict, key: str, incoming: int, keep: set[str], on_disk: bool) -> bool:
        """Evict least-recently-used entries (never one of this request's) until `incoming` more
        bytes for `key` fit the byte bound and the disk keeps its floor. A file already on disk is
        in the free space the disk reports: counting it again would evict for nothing. False when
        the floor cannot be kept even so; one request's own files may overrun the byte bound."""
        entries = index["entries"]
        reserve = 0 if on_disk else incoming

        def floor_kept() -> bool:
            return shutil.disk_usage(self.files).free - reserve >= self.min_free

        def within_bound() -> bool:
            return sum(e["size"] for k, e in entries.items() if k != key) + incoming <= self.max_bytes

        for other in sorted(entries, key=self._last_used):
            if within_bound() and floor_kept():
                return True
            if other not in keep and other != key:
                self._evict(index, other)
        return floor_kept()

    def _last_used(self, key: str) -> int:
        """When the entry's file was last served (its mtime); a missing file sorts first."""
        try:
            return (self.files / _file_name(key)).stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def _evict(self, index: dict, key: str) -> None:
        path = self.files / _file_name(key)
        path.unlink(missing_ok=True)
        embeddings_of(path).unlink(missing_ok=True)
        del index["entries"][key]
        index["aliases"] = {a: v for a, v in index["aliases"].items() if v["key"] != key}
        log.info("LoRA cache evicted %s", _file_name(key))

    def _sweep(self, index: dict) -> None:
        """Remove what no entry describes: parts of downloads that died, files of a lost index."""
        known = {_file_name(key) for key in index["entries"]}
        for item in self.files.iterdir():
            if item.name.startswith(".part-"):
                keyhash = item.name.removeprefix(".part-").split("-", 1)[0]
                if self._lock_is_free(keyhash):
                    _remove(item)
            elif item.name.removesuffix(".pti") not in known:
                _remove(item)
                log.info("LoRA cache removed %s, which no index entry describes", item.name)

    # -- locks and index --------------------------------------------------------------------

    @contextlib.contextmanager
    def _index(self) -> Iterator[dict]:
        """The index, read under the index lock (hold it for index work only) and written back
        when the work changed it. A full disk leaves the old index whole and says so."""
        with open(self.root / "lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                index, text = self._read_index()
                yield index
                if json.dumps(index) != text:
                    self._write_index(index)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_index(self, index: dict) -> None:
        tmp = self.root / f".index.{os.getpid()}.{id(index)}"
        try:
            tmp.write_text(json.dumps(index))
            os.replace(tmp, self.root / "index.json")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full("the LoRA cache's index") from None
            raise

    def _read_index(self) -> tuple[dict, str | None]:
        """The index and the text it was read from (None when it was not there or unreadable)."""
        path = self.root / "index.json"
        try:
            text = path.read_text()
            index = json.loads(text)
            if index.get("version") == INDEX_VERSION:
                return index, text
            reason = f"version {index.get('version')}"
        except FileNotFoundError:
            return _empty_index(), None
        except (ValueError, AttributeError) as exc:
            reason = type(exc).__name__
        os.replace(path, self.root / f"index.unreadable.{int(time.time())}.json")
        log.warning("LoRA cache index was unreadable (%s): set aside; files it described are removed", reason)
        index = _empty_index()
        self._sweep(index)
        return index, None

    @contextlib.contextmanager
    def _key_lock(self, key: str, name: str) -> Iterator[None]:
        """The key's download lock, held until the block ends; its file is removed on the way out.
        When another thread or process holds it (downloading the same file), the wait is logged."""
        path = self.locks / f"{_key_hash(key)}.lock"
        fd = _take(path, blocking=False)
        if fd is None:
            log.info("LoRA %s: another download of the same file is running; waiting for it", name)
            fd = _take(path, blocking=True)
        assert fd is not None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # before letting go: a waiter then sees it was removed
            os.close(fd)

    def _lock_is_free(self, keyhash: str) -> bool:
        """No download of this key is running now (one that runs holds its lock file)."""
        fd = _take(self.locks / f"{keyhash}.lock", blocking=False, create=False)
        if fd is None:
            return False
        if fd >= 0:
            os.close(fd)
        return True

    def _sweep_locks(self) -> None:
        """Remove the lock files nobody holds: left by a killed process, or by an older version."""
        for item in self.locks.glob("*.lock"):
            if not item.is_file():
                continue
            fd = _take(item, blocking=False, create=False)
            if fd is not None and fd >= 0:
                item.unlink(missing_ok=True)
                os.close(fd)

    def _tag(self, credential: str | None) -> str | None:
        return hmac.new(self._salt, credential.encode(), hashlib.sha256).hexdigest() if credential else None

    def _local(self, key: str, entry: dict, name: str) -> LocalLora:
        path = self.files / _file_name(key)
        embeddings = embeddings_of(path)
        return LocalLora(
            key,
            path,
            1.0,
            name,
            embeddings=embeddings if entry["trigger"] else None,
            trigger=tuple(entry["trigger"].items()),
            trained_words=tuple(entry["words"]),
            file_name=entry.get("file", ""),
        )


def _each(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """fn over items, at the same time when there are several. On an error or a cancel the caller
    does not wait: downloads still running finish (or fail) in the background, under their locks."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    pool = ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="lora-fetch")
    try:
        return [future.result() for future in [pool.submit(fn, item) for item in items]]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _mark_used(path: Path) -> None:
    """Recency for the LRU order: the file's mtime, to the nanosecond (file times set by the
    kernel are coarser, so two hits in a row could tie)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _empty_index() -> dict[str, Any]:
    return {"version": INDEX_VERSION, "entries": {}, "aliases": {}}


def _grant(tags: list[str] | None, tag: str | None) -> list[str] | None:
    """Who may be served an entry after a successful download with this credential (None: anyone)."""
    if tag is None:
        return None
    return [*(t for t in tags or [] if t != tag), tag][-MAX_AUTH_TAGS:]


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _file_name(key: str) -> str:
    return _key_hash(key) + ".safetensors"


def _part_prefix(key: str) -> str:
    return f".part-{_key_hash(key)}-"


def _take(path: Path, blocking: bool, create: bool = True) -> int | None:
    """An exclusive flock on the file now at `path`: its descriptor, or None when another holds it
    (without `blocking`), or -1 when there is no file (without `create`). A lock won on a file its
    holder has just removed guards nothing, so it is dropped and taken again on what is there now."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        except FileNotFoundError:
            if create:
                raise
            return -1
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)


def _remove(item: Path) -> None:
    if item.is_dir():
        shutil.rmtree(item, ignore_errors=True)
    else:
        item.unlink(missing_ok=True)
