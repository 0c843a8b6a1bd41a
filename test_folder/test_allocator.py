"""glibc's malloc arenas (engine/allocator.py): capped from inside the process, as setup does in
coglet's worker, unless MALLOC_ARENA_MAX already set them. Each case runs in a fresh interpreter:
glibc fixes its arena limit once per process. Arenas are counted from glibc's own malloc_stats."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Twelve threads allocate at once; glibc gives each new thread an arena of its own while under its limit.
SCRIPT = """
import ctypes, ctypes.util, sys, threading
from engine.allocator import cap_malloc_arenas
if sys.argv[1] == "cap":
    print("capped by this call:", cap_malloc_arenas(), file=sys.stderr)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
start = threading.Barrier(12)
def work():
    start.wait()
    for _ in range(100):
        libc.free(ctypes.c_void_p(libc.malloc(4096)))
threads = [threading.Thread(target=work) for _ in range(12)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc.malloc_stats()
"""


def arenas(mode: str, arena_max: str | None = None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if arena_max is not None:
        env["MALLOC_ARENA_MAX"] = arena_max
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines()), done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_cap_holds_the_arenas_of_many_threads_at_two() -> None:
    uncapped, _ = arenas("plain")
    capped, stderr = arenas("cap")
    assert uncapped > 4, "without a cap, each thread takes an arena of its own"
    assert capped == 2 and "capped by this call: True" in stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_environment_variable_wins() -> None:
    count, stderr = arenas("cap", arena_max="3")
    assert count == 3 and "capped by this call: False" in stderr
