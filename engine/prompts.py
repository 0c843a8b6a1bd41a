"""Prompts longer than 77 tokens and weighted prompts, in A1111's syntax or Compel's.

Plain SDXL pipelines cut a prompt at 77 tokens. Here a prompt that is long, weighted or has
BREAK is encoded with Compel (chunks of 75 tokens, both text encoders, pooled embedding from
the second), and a plain short prompt still goes to the pipeline as text, so its image is
bit-identical to what it always was.

Syntax: a prompt with Compel's own markers (`word++`, `word--`, `(words)1.3`, `.and(`,
`.blend(`) is read as Compel; anything else as A1111 and converted: `(x)` = weight 1.1, `[x]` = 1/1.1,
`(x:1.3)`, nesting multiplies, `\\(` `\\)` `\\[` `\\]` are literal. `BREAK` starts a new
77-token chunk in both. Unbalanced brackets and malformed weights are errors naming the position.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from compel import Compel, ReturnedEmbeddingsType
from diffusers import StableDiffusionXLPipeline

from engine.errors import InputError

_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_COMPEL = re.compile(r"\w(\+\+?|--?)(?=[\s,.;:)]|$)|\)[+-]?\d*\.?\d+|\)[+-]+|\.(and|blend)\(")
_A1111 = re.compile(r"[()\[\]]")
_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\[|:([^()\[\]]*?)\)|\)|]|[^\\()\[\]:]+|:|\\")
_CHUNK = 75  # tokens per chunk between the begin and end markers
ATTENTION = 1.1


def is_compel_syntax(text: str) -> bool:
    return bool(_COMPEL.search(text))


def a1111_to_compel(text: str) -> str:
    """Flatten A1111 emphasis into Compel fragments `(text)weight`; literal brackets escaped."""
    parts: list[list[Any]] = []  # [text, weight]
    opened: list[tuple[str, int, int]] = []  # (bracket, character position, first part index)

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            parts.append([tok[1], 1.0])
        elif tok in ("(", "["):
            opened.append((tok, m.start(), len(parts)))
        elif weight is not None:
            if not opened or opened[-1][0] != "(":
                raise InputError(f"prompt: ':{weight})' at character {m.start()} closes no '('")
            try:
                factor = float(weight)
            except ValueError:
                raise InputError(f"prompt: malformed weight {weight.strip()!r} at character {m.start() + 1}") from None
            scale(opened.pop()[2], factor)
        elif tok in (")", "]"):
            want = "(" if tok == ")" else "["
            if not opened or opened[-1][0] != want:
                raise InputError(
                    f"prompt: unbalanced {tok!r} at character {m.start()} (write \\{tok} for a literal one)"
                )
            scale(opened.pop()[2], ATTENTION if tok == ")" else 1 / ATTENTION)
        else:
            parts.append([tok, 1.0])
    if opened:
        bracket, pos, _ = opened[-1]
        raise InputError(f"prompt: {bracket!r} at character {pos} is never closed")

    merged: list[list[Any]] = []
    for piece, weight in parts:
        if merged and abs(merged[-1][1] - weight) < 1e-9:
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    out = []
    for piece, weight in merged:
        escaped = re.sub(r"([()\\])", r"\\\1", piece)
        if abs(weight - 1.0) < 1e-9 or not piece.strip():
            out.append(escaped)
        else:
            out.append(
                f"({escaped.strip()}){weight:.4g} " if piece.endswith(" ") else f"({escaped.strip()}){weight:.4g}"
            )
    return "".join(out)


def check_syntax(text: str) -> None:
    """Raise the InputError a malformed prompt would raise, before any work is done for it."""
    for segment in _BREAK.split(text):
        to_compel(segment)


def to_compel(text: str) -> str:
    return text if is_compel_syntax(text) else a1111_to_compel(text)


@contextlib.contextmanager
def _skip_layers(encoder: torch.nn.Module, count: int) -> Iterator[None]:
    """Drop the last `count` layers so the penultimate hidden state is the one clip_skip asks for."""
    stack = getattr(encoder, "text_model", encoder).encoder  # CLIPTextModel has no text_model wrapper
    layers = stack.layers
    if count:
        stack.layers = layers[: len(layers) - count]
    try:
        yield
    finally:
        stack.layers = layers


class PromptEncoder:
    """Turns (prompt, negative, clip_skip) into the keyword arguments of an SDXL pipeline call."""

    def __init__(self, pipe: StableDiffusionXLPipeline) -> None:
        self.pipe = pipe
        for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
            # transformers warns once that long token lists "will result in indexing errors": not
            # here, where long prompts are chunked on purpose. Mark that warning as already given.
            tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        self.compel_1 = Compel(
            tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, returned_embeddings_type=kind,
            truncate_long_prompts=False,
        )  # fmt: skip
        self.compel_2 = Compel(
            tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2, returned_embeddings_type=kind,
            truncate_long_prompts=False, requires_pooled=True,
        )  # fmt: skip

    def is_plain(self, text: str) -> bool:
        """Short, unweighted, no BREAK: the pipeline's own encoding is exact for it."""
        if _A1111.search(text) or is_compel_syntax(text) or _BREAK.search(text):
            return False
        ids = self.pipe.tokenizer(text, truncation=True, max_length=_CHUNK + 3).input_ids
        return len(ids) <= _CHUNK + 2

    def kwargs(self, prompt: str, negative: str, clip_skip: int) -> dict[str, Any]:
        if self.is_plain(prompt) and self.is_plain(negative):
            return {"prompt": prompt, "negative_prompt": negative or None}
        positive, pooled = self.encode(prompt, clip_skip)
        negative_embeds, negative_pooled = self.encode(negative, clip_skip)
        zero_negative = not negative and self.pipe.config.force_zeros_for_empty_prompt
        if zero_negative:
            # As the pipeline does: SDXL zeroes the unconditional embeddings of an empty negative prompt.
            negative_embeds, negative_pooled = torch.zeros_like(negative_embeds), torch.zeros_like(negative_pooled)
        length = max(positive.shape[1], negative_embeds.shape[1])
        return {
            "prompt_embeds": self._pad(positive, length, clip_skip),
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": self._pad(negative_embeds, length, clip_skip, zero=zero_negative),
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    @torch.no_grad()
    def encode(self, text: str, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every BREAK segment in its own chunks, concatenated; pooled from the first segment."""
        segments = [to_compel(s) for s in _BREAK.split(text)] or [""]
        embeds, pooled = [], None
        for segment in segments:
            with _skip_layers(self.pipe.text_encoder, clip_skip):
                left = self.compel_1(segment)
            right, segment_pooled = self.compel_2(segment)
            if clip_skip:
                with _skip_layers(self.pipe.text_encoder_2, clip_skip):
                    right, _ = self.compel_2(segment)  # the pooled embedding stays the full model's
            # Both tokenizers share CLIP's vocabulary, so they always make the same number of chunks.
            embeds.append(torch.cat([left, right], dim=-1))
            pooled = segment_pooled if pooled is None else pooled
        return torch.cat(embeds, dim=1), pooled

    def _pad(self, embeds: torch.Tensor, length: int, clip_skip: int, zero: bool = False) -> torch.Tensor:
        if embeds.shape[1] == length:
            return embeds
        if zero:
            return torch.zeros(embeds.shape[0], length, embeds.shape[2], dtype=embeds.dtype, device=embeds.device)
        empty, _ = self.encode("", clip_skip)
        repeats = (length - embeds.shape[1]) // empty.shape[1]
        return torch.cat([embeds, empty.repeat(1, repeats, 1)], dim=1)
