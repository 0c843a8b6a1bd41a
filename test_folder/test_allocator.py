"""The worker's memory settings (engine/allocator.py), each applied from inside the process as setup
does in coglet's worker, and each left alone when the environment already sets it: glibc's arenas
capped, its mmap threshold fixed, oneDNN's and ideep's CPU kernel caches bounded. Each case runs in
a fresh interpreter: glibc and oneDNN fix these once per process. What is counted comes from the
libraries themselves: glibc's malloc_stats and mallinfo2, oneDNN's verbose lines."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
X86_LINUX = sys.platform.startswith("linux") and platform.machine() == "x86_64"

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


# glibc's counters (struct mallinfo2): hblks = chunks mapped on their own, uordblks = bytes in use.
MALLINFO = """
import ctypes, sys
class Info(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = Info
"""

# A 24 MiB buffer freed, then asked for again: glibc's dynamic threshold rises past it on the first
# free, so the second one lands in the heap (and stays there when freed) unless the threshold is fixed.
MMAP_SCRIPT = (
    MALLINFO
    + """
from engine.allocator import fix_mmap_threshold
if sys.argv[1] == "fix":
    print("set by this call:", fix_mmap_threshold(), file=sys.stderr)
libc.free(ctypes.c_void_p(libc.malloc(24 << 20)))
before = libc.mallinfo2().hblks
again = libc.malloc(24 << 20)
print("mapped on its own:", libc.mallinfo2().hblks - before)
"""
)

# 70 convolution shapes, then the first again: oneDNN's cache still has it (a hit) unless bounded
# below 70 entries. Its verbose mode says which; each convolution is large enough for torch to use oneDNN.
KERNEL_SCRIPT = """
import sys, torch
from engine.allocator import bound_kernel_caches
if sys.argv[1] == "bound":
    bound_kernel_caches()
conv = torch.nn.Conv2d(64, 64, 3, padding=1)
with torch.no_grad():
    for rows in [*range(32, 102), 32]:
        conv(torch.zeros(1, 64, rows, 16))
"""

# ideep's cache (LRU_CACHE_CAPACITY) holds what torch keeps per convolution shape; memory in use
# after 200 shapes, oneDNN's own cache off in both runs so only ideep's differs.
IDEEP_SCRIPT = (
    MALLINFO
    + """
import torch
from engine.allocator import bound_kernel_caches
if sys.argv[1] == "bound":
    bound_kernel_caches()
conv = torch.nn.Conv2d(32, 32, 3, padding=1)
with torch.no_grad():
    conv(torch.zeros(1, 32, 32, 32))
    before = libc.mallinfo2().uordblks
    for shape in range(200):
        conv(torch.zeros(1 + shape % 2, 32, 32 + shape % 20, 32 + shape // 20))
print("grew:", libc.mallinfo2().uordblks - before)
"""
)


def run_fresh(script: str, mode: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ONEDNN_", "LRU_CACHE"))}
    return subprocess.run(
        [sys.executable, "-c", script, mode], cwd=REPO_ROOT, env=clean | env, capture_output=True, text=True, check=True
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_fixed_mmap_threshold_gives_large_buffers_back_when_freed() -> None:
    assert "mapped on its own: 0" in run_fresh(MMAP_SCRIPT, "plain").stdout
    fixed = run_fresh(MMAP_SCRIPT, "fix")
    assert "mapped on its own: 1" in fixed.stdout and "set by this call: True" in fixed.stderr
    given = run_fresh(MMAP_SCRIPT, "fix", MALLOC_MMAP_THRESHOLD_=str(32 << 20))
    assert "mapped on its own: 0" in given.stdout and "set by this call: False" in given.stderr


@pytest.mark.skipif(not X86_LINUX, reason="oneDNN's x86 kernels, as in the image")
def test_onednn_forgets_a_kernel_past_the_bound() -> None:
    def last_conv(mode: str, **env: str) -> str:
        run = run_fresh(KERNEL_SCRIPT, mode, ONEDNN_VERBOSE="all", **env)
        creations = [line for line in run.stdout.splitlines() if ",convolution," in line and "create:cache_" in line]
        assert len(creations) == 71, run.stdout[-2000:]
        return creations[-1].split(",")[3]

    assert last_conv("plain") == "create:cache_hit"
    assert last_conv("bound") == "create:cache_miss"
    assert last_conv("bound", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024") == "create:cache_hit"


@pytest.mark.skipif(not X86_LINUX, reason="oneDNN's x86 kernels and glibc, as in the image")
def test_ideep_holds_less_after_many_shapes_when_bounded() -> None:
    def grew(mode: str) -> int:
        out = run_fresh(IDEEP_SCRIPT, mode, ONEDNN_PRIMITIVE_CACHE_CAPACITY="0").stdout
        return int(out.split("grew:")[1])

    plain, bound = grew("plain"), grew("bound")
    assert bound < plain / 2, (plain, bound)


def test_the_image_the_makefile_and_setup_set_the_same_values() -> None:
    """cog.yaml's ENV lines, the Makefile's exports and what setup sets in their absence agree, so
    a server runs with the same memory settings however it was started."""
    from engine.allocator import IDEEP_CACHE_ENTRIES, MALLOC_ARENAS, MMAP_THRESHOLD, ONEDNN_CACHE_ENTRIES

    wanted = {
        "MALLOC_ARENA_MAX": MALLOC_ARENAS,
        "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD,
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": ONEDNN_CACHE_ENTRIES,
        "LRU_CACHE_CAPACITY": IDEEP_CACHE_ENTRIES,
    }
    image = yaml.safe_load((REPO_ROOT / "cog.yaml").read_text())["environment"]
    makefile = (REPO_ROOT / "Makefile").read_text().splitlines()
    for name, value in wanted.items():
        assert f"{name}={value}" in image, name
        assert f"{name} ?= {value}" in makefile, name
