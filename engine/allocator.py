"""The worker's memory settings, applied at setup so a long-lived worker's memory stays flat.

Three things made a long mixed soak's resident memory creep with no Python object leaked
(docs/reliability.md, "Memory over a long run", has the numbers):

- glibc's arenas. Each thread that allocates gets an arena of its own (up to 8 per core), and
  memory freed in one is reused only by allocations that land in the same one; coglet runs
  predictions on threads of its own. Capped at 2.
- glibc's dynamic mmap threshold. A large buffer is mmap'ed and unmapped when freed, but each such
  free raises the threshold (up to 32 MiB) and the trim threshold with it (up to 64 MiB), after
  which freed buffers of a request stay in the heap: single samples tens of MiB high. Fixed at
  1 MiB, which also stops the rise.
- Two CPU kernel caches of this torch build, filled by every new tensor shape the mix brings:
  oneDNN's primitive cache and ideep's (torch's oneDNN wrapper) cache, 1,024 entries each by
  default, the latter per thread. Bounded at 64 entries (oneDNN's) and 16 a thread (ideep's).
  On a GPU they barely fill.

Each is set from inside the process (before the engine loads anything, so before any CPU kernel
runs), because the runtime starts the worker itself; a value already in the environment wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MALLOC_ARENAS = 2  # the main arena and one for every other thread
MMAP_THRESHOLD = 1 << 20  # bytes: larger allocations get pages of their own, returned when freed
ONEDNN_CACHE_ENTRIES = 64  # one cache for the process
# One cache per thread, and coglet runs predictions on any of the threads of its (tokio) pool, so
# the whole is threads x entries; 16 kept each new thread's fill to a few MiB in the soak at no
# measured CPU cost. Never 0: LRU_CACHE_CAPACITY=0 crashes torch's first convolution.
IDEEP_CACHE_ENTRIES = 16
ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
IDEEP_CACHE = "LRU_CACHE_CAPACITY"


def settle_process_memory() -> None:
    """All three settings; called first thing at setup."""
    cap_malloc_arenas()
    fix_mmap_threshold()
    bound_kernel_caches()


def _mallopt(param: int, value: int) -> bool | None:
    """glibc's mallopt; None where there is none (macOS, musl), else whether glibc took the value."""
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    return None if mallopt is None else bool(mallopt(param, value))


def cap_malloc_arenas(count: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's arenas at `count`, unless MALLOC_ARENA_MAX already set them; True when this call
    set the cap. glibc fixes its arena limit when a process first needs more than 8 arenas, so this
    runs before any prediction thread exists; MALLOC_ARENA_MAX (cog.yaml) is still the first choice."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    done = _mallopt(M_ARENA_MAX, count)
    if done is False:
        log.warning("glibc refused mallopt(M_ARENA_MAX, %d): memory may creep over many predictions", count)
    return bool(done)


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `size` bytes, unless MALLOC_MMAP_THRESHOLD_ already set it; True
    when this call set it. Unlike the arena cap it takes effect at once, for every later allocation."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    done = _mallopt(M_MMAP_THRESHOLD, size)
    if done is False:
        log.warning("glibc refused mallopt(M_MMAP_THRESHOLD, %d): memory may rise and fall by tens of MiB", size)
    return bool(done)


def bound_kernel_caches() -> list[str]:
    """Bound oneDNN's and ideep's kernel caches, each unless the environment already sets it; the
    names this call set. Both libraries read their variable when the first CPU kernel runs, so this
    must come before that (importing torch runs none)."""
    done = (_default(ONEDNN_CACHE, ONEDNN_CACHE_ENTRIES), _default(IDEEP_CACHE, IDEEP_CACHE_ENTRIES))
    return [name for name in done if name]


def _default(name: str, entries: int) -> str | None:
    """Set `name` to `entries` unless the environment has it; the name when this call set it."""
    if os.environ.get(name):
        return None
    os.environ[name] = str(entries)
    return name
