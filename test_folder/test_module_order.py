"""Library state does not carry from one test module to the next (conftest.py resets it through
test_folder/process_state.py): two modules that share it pass in either order in one pytest
process, and the reset itself puts back what a module may change."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyparsing
import pytest
import torch

from engine import metadata
from engine.warm import PROCESS_WARM
from test_folder.conftest import REPO_ROOT
from test_folder.process_state import capture, restore

# The warm LoRA cache (a LoRA file read once, then warm), Compel's parser (packrat) and its cached
# empty prompt, on the session's engine: each module's share of the process-wide state, kept short.
PAIR = (
    ("test_folder/test_loras.py", "warm_switches_read_no_file"),
    ("test_folder/test_prompts.py", "compel_parse_time_is_bounded or weights_do_not_depend_on_an_earlier_clip_skip"),
)
SELECTED = 3  # tests the two selections name: a renamed test must not leave an empty run passing


@pytest.mark.parametrize("order", [PAIR, PAIR[::-1]], ids=["loras-then-prompts", "prompts-then-loras"])
def test_two_modules_pass_in_either_order(
    order: tuple[tuple[str, str], ...], weights_dir: Path, tmp_path: Path
) -> None:
    selection = " or ".join(f"({words})" for _, words in order)
    result = subprocess.run(
        [
            sys.executable,
            *("-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "run")),
            *(path for path, _ in order),
            *("-k", selection),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "TEST_TINY_WEIGHTS": str(weights_dir)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{SELECTED} passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), torch.rand(1).item()


def test_the_reset_puts_back_what_a_module_may_change() -> None:
    start = capture()
    expected = _draws()
    torch._dynamo.config.recompile_limit = start.dynamo_config["recompile_limit"] + 56
    PROCESS_WARM.entries[("a model", "a key")] = np.zeros(1)
    metadata.embedding_hash(Path(__file__), "a key")
    torch.set_num_threads(start.threads + 1)
    restore(start)
    assert torch._dynamo.config.recompile_limit == start.dynamo_config["recompile_limit"]
    assert not PROCESS_WARM.entries and metadata.embedding_hash.cache_info().currsize == 0
    assert torch.get_num_threads() == start.threads
    assert _draws() == expected, "the generators are back where they were"
    assert pyparsing.ParserElement._packratEnabled, "engine/prompts.py's packrat stays on"
    restore(start)
