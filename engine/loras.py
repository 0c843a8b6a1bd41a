"""LoRA adapters on a base model: load once per file, weight per request, delete when unused.

Adapters are never fused: the base weights stay untouched, so a request without LoRAs after
any sequence of LoRA requests is bit-identical to a fresh process. Adapters the current
request does not use are deleted, so memory stays flat across many switches; a scale-only
change just re-weights the loaded adapters. A load that fails or is cancelled (Cog's cancel is
a BaseException) leaves no half-made adapter and no trained token behind.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from engine.errors import InputError, LoraLoadError
from engine.request import LocalLora

log = logging.getLogger(__name__)

# Key fragments of LyCORIS formats diffusers cannot load.
_UNSUPPORTED = {"hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", ".oft_": "OFT", "glora_": "GLoRA"}


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
        done = False
        try:
            try:
                self.pipe.load_lora_weights(str(lora.path), adapter_name=name)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise self._load_error(lora, exc) from exc
            if lora.embeddings is not None:
                self._load_tokens(lora, name)
            done = True
        finally:
            if not done:
                self._forget(name)
        self.loaded[lora.key] = name
        log.info("loaded LoRA %s in %.2fs", lora.name, time.perf_counter() - start)

    def _load_error(self, lora: LocalLora, exc: Exception) -> Exception:
        """A LoRA that does not fit this model is the user's to fix; anything else is what it is."""
        if isinstance(exc, torch.OutOfMemoryError):
            return LoraLoadError(f"out of memory while loading LoRA {lora.name}: try one LoRA, or a smaller one")
        detail = str(exc).strip().splitlines()
        if isinstance(exc, ValueError) or "size mismatch" in str(exc):
            return InputError(
                f"LoRA {lora.name} does not fit {self.model_id} (an SDXL-family model): it was probably made "
                f"for another base model such as SD 1.5 or Flux. Loader said: {' '.join(detail)[:300]}"
            )
        return LoraLoadError(f"LoRA {lora.name} could not be loaded: {type(exc).__name__}: {' '.join(detail)[:300]}")

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
        if "text_encoders_0" not in embeddings or "text_encoders_1" not in embeddings:
            raise InputError(f"LoRA {lora.name} has embeddings without text_encoders_0 / text_encoders_1: not SDXL's")
        tokens = [f"<{name}_{i}>" for i in range(embeddings["text_encoders_0"].shape[0])]
        self.tokens[name] = tokens  # recorded first, so a failure half-way is undone by _forget
        for key, (encoder, tokenizer) in zip(("text_encoders_0", "text_encoders_1"), self._encoders(), strict=True):
            try:
                self.pipe.load_textual_inversion(
                    embeddings[key], token=tokens, text_encoder=encoder, tokenizer=tokenizer
                )
            except ValueError as exc:
                raise InputError(f"LoRA {lora.name} has embeddings that do not fit {self.model_id}: {exc}") from exc

    def _encoders(self) -> tuple[tuple[torch.nn.Module, object], ...]:
        return (
            (self.pipe.text_encoder, self.pipe.tokenizer),
            (self.pipe.text_encoder_2, self.pipe.tokenizer_2),
        )

    def _unload_tokens(self, name: str) -> None:
        """Remove this adapter's trained tokens from every tokenizer that holds them."""
        tokens = self.tokens.pop(name, None)
        if not tokens:
            return
        for encoder, tokenizer in self._encoders():
            present = [t for t in tokens if t in tokenizer.get_vocab()]
            if present:
                self.pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)

    def _forget(self, name: str) -> None:
        """A failed or cancelled load can leave a half-made adapter and some tokens behind: remove them."""
        if any(name in names for names in self.pipe.get_list_adapters().values()):
            self.pipe.delete_adapters([name])
        self._unload_tokens(name)
