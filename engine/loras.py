"""LoRA adapters on a base model: load once per file, weight per request, delete when unused.

Adapters are never fused: the base weights stay untouched, so a request without LoRAs after
any sequence of LoRA requests is bit-identical to a fresh process. Adapters the current
request does not use are deleted, so memory stays flat across many switches; a scale-only
change just re-weights the loaded adapters.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

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
    embeddings: Path | None = None  # pivotal tuning: safetensors with text_encoders_0 / text_encoders_1
    trigger: tuple[tuple[str, str], ...] = ()  # e.g. (("TOK", "<s0><s1>"),) from special_params.json


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
        self.tokens: dict[str, list[str]] = {}  # adapter name -> its pivotal tokens in the tokenizers
        self.triggers: list[tuple[str, str]] = []  # (what the user writes, the tokens it stands for)

    def apply(self, loras: list[LocalLora]) -> None:
        """Make exactly these adapters active at these scales."""
        wanted = {lora.key for lora in loras}
        stale = [name for key, name in self.loaded.items() if key not in wanted]
        if stale:
            self.pipe.delete_adapters(stale)
            for name in stale:
                self._unload_tokens(name)
            self.loaded = {k: n for k, n in self.loaded.items() if k in wanted}
        for lora in loras:
            if lora.key not in self.loaded:
                self._load(lora)
        self.triggers = [
            (text, "".join(self.tokens[self.loaded[lora.key]]))
            for lora in loras
            if self.loaded[lora.key] in self.tokens
            for word, original in lora.trigger
            for text in (word, original)
        ]
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
        if lora.embeddings is not None:
            self._load_tokens(lora, name)
        log.info("loaded LoRA %s in %.2fs", lora.name, time.perf_counter() - start)

    def rewrite(self, prompt: str) -> str:
        """Swap pivotal trigger words (TOK, <s0><s1>) for the active LoRA's own tokens."""
        for text, tokens in self.triggers:
            if text.isalnum():
                prompt = re.sub(rf"\b{re.escape(text)}\b", tokens, prompt)
            else:
                prompt = prompt.replace(text, tokens)
        return prompt

    def _load_tokens(self, lora: LocalLora, name: str) -> None:
        """Pivotal-tuning embeddings, under tokens unique to this adapter so two never collide."""
        embeddings = load_file(str(lora.embeddings))
        pairs = (
            ("text_encoders_0", self.pipe.text_encoder, self.pipe.tokenizer),
            ("text_encoders_1", self.pipe.text_encoder_2, self.pipe.tokenizer_2),
        )
        count = embeddings["text_encoders_0"].shape[0]
        tokens = [f"<{name}_{i}>" for i in range(count)]
        try:
            for key, encoder, tokenizer in pairs:
                self.pipe.load_textual_inversion(
                    embeddings[key], token=tokens, text_encoder=encoder, tokenizer=tokenizer
                )
        except (KeyError, ValueError) as exc:
            self.pipe.delete_adapters([name])
            del self.loaded[lora.key]
            raise InputError(f"LoRA {lora.name} has embeddings that do not fit {self.model_id}: {exc}") from exc
        self.tokens[name] = tokens

    def _unload_tokens(self, name: str) -> None:
        tokens = self.tokens.pop(name, None)
        if tokens:
            for encoder, tokenizer in (
                (self.pipe.text_encoder, self.pipe.tokenizer),
                (self.pipe.text_encoder_2, self.pipe.tokenizer_2),
            ):
                self.pipe.unload_textual_inversion(tokens, tokenizer=tokenizer, text_encoder=encoder)

    def _forget(self, name: str) -> None:
        """A failed load can leave a half-made adapter behind: remove it."""
        if any(name in names for names in self.pipe.get_list_adapters().values()):
            self.pipe.delete_adapters([name])
