"""LoRA adapters on a base model: load once per file, weight per request, delete when unused.

Adapters are never fused: the base weights stay untouched, so a request without LoRAs after
any sequence of LoRA requests is bit-identical to a fresh process. Adapters the current
request does not use are deleted, so memory stays flat across many switches; a scale-only
change just re-weights the loaded adapters.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

from engine.errors import InputError

log = logging.getLogger(__name__)

# Key fragments of LyCORIS formats diffusers cannot load.
_UNSUPPORTED = {"hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", ".oft_": "OFT", "glora_": "GLoRA"}


@dataclass(frozen=True)
class LocalLora:
    """A LoRA file on disk, the stable identity it was cached under, and its scale."""

    key: str
    path: Path
    scale: float
    name: str  # what the user passed, for messages (never holds a token)


def check_format(path: Path, name: str) -> None:
    """Refuse formats diffusers cannot load, naming them, before touching the model."""
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise InputError(f"LoRA {name} is not a readable .safetensors file: {exc}") from exc
    for fragment, fmt in _UNSUPPORTED.items():
        if any(fragment in k for k in keys):
            raise InputError(f"LoRA {name} is in {fmt} format, which this predictor cannot load: use a plain LoRA")
    if not any("lora" in k for k in keys):
        raise InputError(f"LoRA {name} holds no LoRA weights (keys like 'lora_up'/'lora_A'): is it a full checkpoint?")


def adapter_name(key: str) -> str:
    """PEFT adapter names must be identifiers: derive one from the cache key."""
    return "lora_" + hashlib.sha256(key.encode()).hexdigest()[:16]


class LoraSet:
    """The adapters loaded into one base model's shared modules."""

    def __init__(self, pipe: StableDiffusionXLPipeline, model_id: str) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.loaded: dict[str, str] = {}  # cache key -> adapter name

    def apply(self, loras: list[LocalLora]) -> None:
        """Make exactly these adapters active at these scales."""
        wanted = {lora.key for lora in loras}
        stale = [name for key, name in self.loaded.items() if key not in wanted]
        if stale:
            self.pipe.delete_adapters(stale)
            self.loaded = {k: n for k, n in self.loaded.items() if k in wanted}
        for lora in loras:
            if lora.key not in self.loaded:
                self._load(lora)
        if loras:
            names = [self.loaded[lora.key] for lora in loras]
            self.pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
            log.info("LoRAs active on %s: %s", self.model_id, ", ".join(f"{x.name} @ {x.scale:g}" for x in loras))

    def _load(self, lora: LocalLora) -> None:
        check_format(lora.path, lora.name)
        name = adapter_name(lora.key)
        start = time.perf_counter()
        try:
            self.pipe.load_lora_weights(str(lora.path), adapter_name=name)
        except Exception as exc:  # any loader failure is this LoRA not fitting: say so, keep the cause
            self._forget(name)
            raise InputError(
                f"LoRA {lora.name} does not fit {self.model_id} (an SDXL-family model): it was probably made "
                f"for another base model such as SD 1.5 or Flux. Loader said: {str(exc)[:300]}"
            ) from exc
        self.loaded[lora.key] = name
        log.info("loaded LoRA %s in %.2fs", lora.name, time.perf_counter() - start)

    def _forget(self, name: str) -> None:
        """A failed load can leave a half-made adapter behind: remove it."""
        if any(name in names for names in self.pipe.get_list_adapters().values()):
            self.pipe.delete_adapters([name])
