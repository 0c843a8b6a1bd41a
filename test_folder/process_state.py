"""Process-wide state that the engine and its libraries keep between calls, put back at the start of
every test module (conftest.py), so a module sees the same process whatever ran before it in the
same pytest run. Order-dependent results hide in this state:

- torch._dynamo: its compiled code and counters (`torch._dynamo.reset()`), and its config, which
  `engine/compiling.py` changes for the whole process (`recompile_limit`, never lowered again);
- the engine's warm LoRA cache (`engine/warm.py`: one per process, shared by every engine) and
  its budget, which `Engine.load(warm_max_bytes=)` sets for the whole process;
- engine/metadata.py's hash caches (`functools.lru_cache`, keyed by path and cache key);
- pyparsing's packrat memo, switched on process-wide by engine/prompts.py for Compel's grammar;
- the global random generators (Python's, numpy's, torch's): lora_factory and the trainer seed
  torch's, and peft draws a new LoRA's weights from it;
- torch's thread count (test_train.py runs its module on one thread).

Compel keeps no cache of its own beyond one instance (its empty prompt's embedding): PromptEncoder
builds a new pair per call. Cog servers run in their own processes and start fresh.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyparsing
import torch
import torch._dynamo

from engine import metadata
from engine.warm import PROCESS_WARM


@dataclass(frozen=True)
class Snapshot:
    """What `restore` puts back."""

    dynamo_config: dict[str, Any]
    python_rng: object
    numpy_rng: dict[str, Any]
    torch_rng: torch.Tensor
    threads: int
    warm_max_bytes: int


def capture() -> Snapshot:
    """The process's state now (the session takes it once, before the first module)."""
    return Snapshot(
        dynamo_config=torch._dynamo.config.get_config_copy(),
        python_rng=random.getstate(),
        numpy_rng=np.random.get_state(legacy=False),
        torch_rng=torch.random.get_rng_state(),
        threads=torch.get_num_threads(),
        warm_max_bytes=PROCESS_WARM.max_bytes,
    )


def restore(snapshot: Snapshot) -> None:
    """Empty the caches and put the settings and generators back as they were in `snapshot`.
    Only the dynamo settings that changed are set (setting a deprecated one warns)."""
    torch._dynamo.reset()
    now = torch._dynamo.config.get_config_copy()
    for key, value in snapshot.dynamo_config.items():
        if now.get(key) != value:
            setattr(torch._dynamo.config, key, value)
    PROCESS_WARM.entries.clear()
    PROCESS_WARM.max_bytes = snapshot.warm_max_bytes
    metadata.lora_hash.cache_clear()
    metadata.embedding_hash.cache_clear()
    pyparsing.ParserElement.reset_cache()
    random.setstate(snapshot.python_rng)
    np.random.set_state(snapshot.numpy_rng)
    torch.random.set_rng_state(snapshot.torch_rng)
    torch.set_num_threads(snapshot.threads)
