"""glibc's malloc arenas, capped so a long-lived worker's memory stays flat.

glibc gives each thread that allocates its own arena (up to 8 per core), and memory freed in one
arena is reused only by allocations that land in the same one. coglet runs predictions on threads
of its own, so the images, tensors and buffers of one request are freed into arenas the next
request may not use: the worker's resident memory crept up by about 0.1 MiB per tiny prediction
over a 1,000-prediction soak, with no object leaked (docs/reliability.md has the numbers).
`MALLOC_ARENA_MAX` fixes it, but only when set before the process starts, and coglet starts the
worker itself; `mallopt(M_ARENA_MAX)` sets the same cap from inside the worker. glibc fixes its
arena limit when a process first needs more than 8 arenas, so this runs before the engine loads
anything and before any prediction thread exists.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's <malloc.h>
MALLOC_ARENAS = 2  # the main arena and one for every other thread


def cap_malloc_arenas(count: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's arenas at `count`, unless MALLOC_ARENA_MAX already set them; True when this call
    set the cap. Elsewhere than glibc (macOS, musl) there is no such call, and nothing is done."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return False
    if not mallopt(M_ARENA_MAX, count):
        log.warning("glibc refused mallopt(M_ARENA_MAX, %d): memory may creep over many predictions", count)
        return False
    return True
