"""Parsed LoRAs kept warm: one least-recently-used cache and one byte budget for the whole process.

Every base model's `LoraSet` sees the cache through its own `ModelWarm` view (keyed by the LoRA's
cache key, as a dict), so switching back and forth reads no file; the budget (WARM_MAX_BYTES, or
what `Engine.load` was given) bounds the sum over all models, not each model's share, so a
process with three models never holds three budgets' worth.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import Protocol, TypeVar

from engine.config import WARM_MAX_BYTES


class Sized(Protocol):
    """What the cache needs of a parsed LoRA: how many bytes it holds in memory."""

    nbytes: int


T = TypeVar("T", bound=Sized)


class WarmCache:
    """(model id, LoRA key) -> parsed LoRA, most recently used last, within one byte budget."""

    def __init__(self, max_bytes: int = WARM_MAX_BYTES) -> None:
        self.entries: OrderedDict[tuple[str, str], Sized] = OrderedDict()
        self.max_bytes = max_bytes

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def evict(self, keep: set[tuple[str, str]]) -> None:
        """Drop the least recently used entries of any model, never one in `keep` (the LoRAs of the
        request being served), until the whole cache is within budget."""
        total = self.nbytes
        for key in [k for k in self.entries if k not in keep]:
            if total <= self.max_bytes:
                break
            total -= self.entries.pop(key).nbytes

    def view(self, model_id: str) -> ModelWarm:
        return ModelWarm(self, model_id)


class ModelWarm(MutableMapping[str, T]):
    """One model's entries of the shared cache, as a dict keyed by LoRA cache key."""

    def __init__(self, cache: WarmCache, model_id: str) -> None:
        self.cache = cache
        self.model_id = model_id

    def __getitem__(self, key: str) -> T:
        return self.cache.entries[(self.model_id, key)]  # type: ignore[return-value]

    def __setitem__(self, key: str, value: T) -> None:
        self.cache.entries[(self.model_id, key)] = value
        self.cache.entries.move_to_end((self.model_id, key))

    def __delitem__(self, key: str) -> None:
        del self.cache.entries[(self.model_id, key)]

    def __iter__(self) -> Iterator[str]:
        return iter([key for model_id, key in self.cache.entries if model_id == self.model_id])

    def __len__(self) -> int:
        return sum(1 for model_id, _ in self.cache.entries if model_id == self.model_id)

    def move_to_end(self, key: str) -> None:
        """Mark as the most recently used entry of the whole process."""
        self.cache.entries.move_to_end((self.model_id, key))

    def evict(self, keep: set[str]) -> None:
        """Bring the whole process's cache within budget, keeping these LoRAs of this model."""
        self.cache.evict({(self.model_id, key) for key in keep})


# The one cache every model of this process shares (Engine.load builds each model's LoraSet on it).
PROCESS_WARM = WarmCache()
