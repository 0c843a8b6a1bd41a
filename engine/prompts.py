"""Prompts longer than 77 tokens and weighted prompts, in A1111's syntax or Compel's.

Plain SDXL pipelines cut a prompt at 77 tokens. Here a prompt that is long, weighted or has
BREAK is encoded by the rules of the syntax it is written in: an A1111 prompt as A1111 encodes it
(`engine.emphasis`: 75-token chunks with its comma back-off, hidden states times the token
weights with the mean restored, per encoder), a Compel prompt by Compel's embeddings providers
(weights interpolated from the empty prompt's embedding). A prompt that means one short
unweighted text still goes to the pipeline as text, so its image is bit-identical to what it
always was.

A prompt never fails on syntax; it is read once, by one of two readers:

- Compel, only when the prompt carries an explicit Compel marker and nothing that only A1111
  writes. Markers: an operator call (`.and(`, `.add(`, `.blend(`, `.attend(`, `.swap(`); a sign run
  or a number right after a closing `)` or `"` and ending there (`(red cat)1.3`, `(cat)++`); or
  `++`/`--` ending a word of two or more characters (`lighthouse++`). A1111-only forms (`[`, `]`,
  `(x:1.3)`) win over markers. So `C++ programmer`, `A+ student`, `(red)-haired`,
  `(masterpiece)1girl` and `(cat:1.2)5 dogs` are A1111, and `Notepad++ icon` is Compel. When
  Compel's parser rejects a prompt it is read as A1111 instead.
- A1111's `parse_prompt_attention` rules, into (text, weight) pieces handed to the encoder as
  they are: `(x)` = weight 1.1, `[x]` = 1/1.1, `(x:1.3)`, nesting multiplies, `\\(` `\\)` `\\[`
  `\\]` `\\\\` are literal. Leniently, as A1111: an unclosed bracket closes at the end, a stray
  closer is text, and a colon not followed by a number before `)` is text (`(cat:heavy)` =
  "cat:heavy" at 1.1). Where A1111 would drop a lone backslash, crash on a weight such as
  `1.2.3` or take an infinite one, that is text here. An A1111 prompt without brackets is not
  parsed at all: it reaches the encoder exactly as written.

`BREAK` starts a new 77-token chunk in both. When a prompt is not plain text, one log line says
how it was read. Cost is bounded by `MAX_PROMPT_TOKENS`, checked on the text as written before
any work is done for the request.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyparsing
import torch
from compel import Compel, ReturnedEmbeddingsType
from compel.prompt_parser import Conjunction, PromptParser
from diffusers import StableDiffusionXLPipeline
from transformers import PreTrainedTokenizerBase

from engine.config import MAX_PROMPT_TOKENS
from engine.emphasis import CHUNK, Chunk, encode_chunk, make_chunks, shares_vocabulary
from engine.errors import InputError

log = logging.getLogger(__name__)

# Compel's pyparsing grammar backtracks exponentially on some short prompts (`( ( ( ( ( ( ( ( ( ( ( ( ab++`
# ran for minutes); memoizing parse results (packrat) makes that milliseconds and changes no result.
# The switch is process-wide in pyparsing; nothing else here parses with it.
pyparsing.ParserElement.enable_packrat(None)

_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_BRACKET = re.compile(r"[()\[\]]")
# One A1111 token: an escape, a weight closing a '(' , a bracket, a run of text, a lone ':' or '\'.
_A1111_TOKEN = re.compile(r"\\[()\[\]\\]|:\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[()\[\]]|[^\\()\[\]:]+|[\\:]")
_COMPEL_MARKERS = (
    re.compile(r"[\w)\"]\.(?:and|add|blend|attend|swap)\("),
    re.compile(r"[)\"](?:\++|-+|\d*\.?\d+)(?=[\s,;)]|$)"),
    re.compile(r"(?<![\w+-])(?=\w*[^\W\d_])\w{2,}(?:\+{2,}|-{2,})(?=[\s,;)]|$)"),
)
_A1111_ONLY = re.compile(r"[\[\]]|:\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*\)")
# What Compel's parser raises on prompts it cannot read; deep nesting exhausts its recursion.
_COMPEL_ERRORS = (ValueError, PromptParser.ParsingException, pyparsing.ParseBaseException, RecursionError)
ATTENTION = 1.1
_LOGGED_WEIGHTS = 8  # weighted pieces named in the log line; the rest are counted
_LOGGED_NOTES = 3  # notes on lenient reading in the log line; the rest are counted


class Piece(NamedTuple):
    """Text the encoder sees with one weight, as A1111's parser would produce it."""

    text: str
    weight: float


class CompelSegment(NamedTuple):
    """Compel's own parse of a BREAK segment, with the text its pooled embedding is taken from."""

    text: str
    conjunction: Conjunction


Segment = list[Piece] | CompelSegment  # one BREAK-separated part of a prompt


def is_compel_syntax(text: str) -> bool:
    """The conservative guess of the module docstring: explicit Compel markers, no A1111-only form."""
    return any(marker.search(text) for marker in _COMPEL_MARKERS) and not _A1111_ONLY.search(text)


def parse_a1111(text: str) -> tuple[list[list[Piece]], list[str]]:
    """BREAK-separated lists of (text, weight) pieces by A1111's rules, and notes on what was lenient."""
    if not _BRACKET.search(text):
        return [[Piece(part, 1.0)] if part else [] for part in _BREAK.split(text)], []
    pieces: list[list[Any] | None] = []  # [text, weight]; None where BREAK starts a new segment
    opened: dict[str, list[tuple[int, int]]] = {"(": [], "[": []}  # (character, first piece index)
    notes: list[str] = []
    colon = -1  # character of the last literal ':', to say why a '(...:...)' is not a weight

    def add(part: str) -> None:
        for i, chunk in enumerate(_BREAK.split(part)):
            if i:
                pieces.append(None)
            if chunk:
                pieces.append([chunk, 1.0])

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece is not None:
                piece[1] *= factor

    def close(bracket: str, at: int, factor: float) -> None:
        nonlocal colon
        if not opened[bracket]:
            notes.append(f"stray {text[at]!r} at character {at + 1} kept as text")
            add(text[at])
            return
        start_at, start = opened[bracket].pop()
        if start_at < colon:
            notes.append(f"{text[colon:at][:40]!r} at character {colon + 1} is no weight, kept as text")
            colon = -1
        scale(start, factor)

    for m in _A1111_TOKEN.finditer(text):
        token, weight = m.group(0), m.group("weight")
        if weight is not None:
            closer = m.end() - 1
            if opened["("] and math.isfinite(float(weight)):
                scale(opened["("].pop()[1], float(weight))
                continue
            add(text[m.start() : closer])
            if opened["("]:
                colon = m.start()
            close("(", closer, ATTENTION)
        elif token in opened:
            opened[token].append((m.start(), len(pieces)))
        elif token == ")":
            close("(", m.start(), ATTENTION)
        elif token == "]":
            close("[", m.start(), 1 / ATTENTION)
        elif len(token) == 2 and token[0] == "\\":
            pieces.append([token[1], 1.0])
        else:
            if token == ":":
                colon = m.start()
            add(token)
    for bracket, factor in (("(", ATTENTION), ("[", 1 / ATTENTION)):
        for at, start in opened[bracket]:
            notes.append(f"unclosed {bracket!r} at character {at + 1} closed at the end")
            scale(start, factor)

    segments: list[list[Piece]] = [[]]
    for piece in pieces:
        if piece is None:
            segments.append([])
        elif segments[-1] and segments[-1][-1].weight == piece[1]:  # exact, as A1111 merges
            segments[-1][-1] = Piece(segments[-1][-1].text + piece[0], piece[1])
        else:
            segments[-1].append(Piece(piece[0], piece[1]))
    return segments, notes


@dataclass(frozen=True)
class Reading:
    """How a prompt was read: its BREAK segments, which syntax, and what was lenient."""

    segments: tuple[Segment, ...]
    syntax: str  # "Compel" or "A1111"
    notes: tuple[str, ...] = ()

    @property
    def text(self) -> str | None:
        """The one unweighted text this prompt means, if it means one: the pipeline can take that as is."""
        if self.syntax != "A1111" or len(self.segments) != 1:
            return None
        [pieces] = self.segments
        if not pieces:
            return ""
        return pieces[0].text if len(pieces) == 1 and pieces[0].weight == 1.0 else None

    def describe(self) -> str:
        """One line for the log: the syntax, the weights, the segments and the notes."""
        parts = []
        if self.syntax == "Compel":
            parts.append("Compel syntax")
        else:
            pieces = [p for s in self.segments if isinstance(s, list) for p in s]
            weighted = [p for p in pieces if p.weight != 1.0 and p.text.strip()]
            named = ", ".join(f"{p.text.strip()[:40]!r} {round(p.weight, 3)}" for p in weighted[:_LOGGED_WEIGHTS])
            more = f" and {len(weighted) - _LOGGED_WEIGHTS} more" if len(weighted) > _LOGGED_WEIGHTS else ""
            parts.append(f"A1111 weights: {named}{more}" if weighted else "plain text")
        if len(self.segments) > 1:
            parts.append(f"{len(self.segments)} BREAK segments")
        notes = list(self.notes[:_LOGGED_NOTES])
        if len(self.notes) > _LOGGED_NOTES:
            notes.append(f"{len(self.notes) - _LOGGED_NOTES} more like these")
        return "; ".join(parts + notes)


def read_prompt(text: str) -> Reading:
    """Read a prompt once, by the rule of the module docstring; never raises on syntax."""
    notes: list[str] = []
    if is_compel_syntax(text):
        try:
            segments = tuple(CompelSegment(s, Compel.parse_prompt_string(s)) for s in _BREAK.split(text))
            return Reading(segments, "Compel")
        except _COMPEL_ERRORS as e:
            notes.append(f"Compel's parser rejected it ({str(e)[:120]}), read as A1111")
    segments, lenient = parse_a1111(text)
    return Reading(tuple(segments), "A1111", tuple(notes + lenient))


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """CLIP tokens of the text as written, without the begin and end markers; no encoding."""
    return len(tokenizer(text).input_ids) - 2


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
        self._shared: dict[tuple[int, int], bool] = {}  # one BPE for both encoders, by vocabulary sizes

    def compels(self) -> tuple[Compel, Compel]:
        """A new Compel for each text encoder, for one call of `kwargs` or `encode`.

        Compel caches the empty prompt's embedding it weights against on first use, on the device
        and with the layers and weights in use then. Text-encoder weights change between requests
        (LoRAs, pivotal tokens, embeddings) and so do clip_skip and the device: a pair kept longer
        would weight a prompt differently depending on the requests before it.
        """
        kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        return (
            Compel(
                tokenizer=self.pipe.tokenizer, text_encoder=self.pipe.text_encoder,
                returned_embeddings_type=kind, truncate_long_prompts=False,
            ),
            Compel(
                tokenizer=self.pipe.tokenizer_2, text_encoder=self.pipe.text_encoder_2,
                returned_embeddings_type=kind, truncate_long_prompts=False, requires_pooled=True,
            ),
        )  # fmt: skip

    def check_length(self, text: str, field: str) -> None:
        """Refuse a prompt past MAX_PROMPT_TOKENS, by a tokenizer count before any work is done for it."""
        count = count_tokens(self.pipe.tokenizer, text)
        if count > MAX_PROMPT_TOKENS:
            raise InputError(f"{field} is {count} CLIP tokens as written; the most is {MAX_PROMPT_TOKENS}: shorten it")

    def kwargs(self, prompt: str, negative: str, clip_skip: int) -> dict[str, Any]:
        readings = []
        for field, text in (("prompt", prompt), ("negative prompt", negative)):
            reading = read_prompt(text)
            if reading.text != text or reading.notes:
                log.info("%s read as %s", field, reading.describe())
            readings.append(reading)
        positive_text, negative_text = (self._short_text(r) for r in readings)
        if positive_text is not None and negative_text is not None:
            return {"prompt": positive_text, "negative_prompt": negative_text or None}
        compels = self.compels() if any(r.syntax == "Compel" for r in readings) else None
        positive, pooled = self._encode(readings[0], clip_skip, compels)
        negative_embeds, negative_pooled = self._encode(readings[1], clip_skip, compels)
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

    def encode(self, text: str, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and pooled embedding of a prompt, however long or weighted."""
        reading = read_prompt(text)
        return self._encode(reading, clip_skip, self.compels() if reading.syntax == "Compel" else None)

    def _short_text(self, reading: Reading) -> str | None:
        """The text to give the pipeline, when its own encoding is exact for this reading."""
        text = reading.text
        if text is None or count_tokens(self.pipe.tokenizer, text) > CHUNK:
            return None
        return text

    @torch.no_grad()
    def _encode(
        self, reading: Reading, clip_skip: int, compels: tuple[Compel, Compel] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if compels is None or reading.syntax != "Compel":
            return self._encode_a1111(reading, clip_skip)
        return self._encode_compel(reading, clip_skip, compels)

    def _encode_a1111(self, reading: Reading, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A1111's chunks and emphasis (`engine.emphasis`); pooled from the second encoder's first chunk."""
        pipe = self.pipe
        segments = [segment for segment in reading.segments if isinstance(segment, list)]
        texts = [piece.text for segment in segments for piece in segment]
        per_encoder = []
        for tokenizer in (pipe.tokenizer, pipe.tokenizer if self._shares_vocabulary() else pipe.tokenizer_2):
            ids = iter(tokenizer(texts, add_special_tokens=False).input_ids if texts else [])
            comma = tokenizer.convert_tokens_to_ids(",</w>")
            weighted = [[(next(ids), piece.weight) for piece in segment] for segment in segments]
            per_encoder.append(make_chunks(weighted, comma if comma != tokenizer.unk_token_id else None))
        # Only tokenizers with different vocabularies chunk differently; A1111 pads a shorter list
        # of chunks with empty ones.
        count = max(len(chunks) for chunks in per_encoder)
        per_encoder = [chunks + [Chunk() for _ in range(count - len(chunks))] for chunks in per_encoder]
        halves, pooled = [], None
        pairs = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
        for chunks, (encoder, tokenizer) in zip(per_encoder, pairs, strict=True):
            encoded = [encode_chunk(encoder, tokenizer, chunk, clip_skip) for chunk in chunks]
            halves.append(torch.cat([hidden for hidden, _ in encoded], dim=1))
            pooled = encoded[0][1]
        assert pooled is not None, "the second text encoder has a projection"
        return torch.cat(halves, dim=-1), pooled

    def _shares_vocabulary(self) -> bool:
        """Whether the first tokenizer's ids serve both encoders (`engine.emphasis`); checked again
        when tokens are added, which adds them to both tokenizers in the same order."""
        key = (len(self.pipe.tokenizer), len(self.pipe.tokenizer_2))
        if key not in self._shared:
            self._shared[key] = shares_vocabulary(self.pipe.tokenizer, self.pipe.tokenizer_2)
        return self._shared[key]

    def _encode_compel(
        self, reading: Reading, clip_skip: int, compels: tuple[Compel, Compel]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every BREAK segment in its own chunks, concatenated; pooled from the first segment."""
        segments = [segment for segment in reading.segments if isinstance(segment, CompelSegment)]
        embeds = [self._embed_segment(segment, clip_skip, compels) for segment in segments]
        # From the full model, whatever clip_skip says, of Compel's text as Compel pools it.
        provider = compels[1].conditioning_provider
        return torch.cat(embeds, dim=1), provider.get_pooled_embeddings([segments[0].text], device=provider.device)

    def _embed_segment(self, segment: CompelSegment, clip_skip: int, compels: tuple[Compel, Compel]) -> torch.Tensor:
        """Both encoders' embeddings of one segment, side by side."""
        halves, empties = [], []
        encoders = (self.pipe.text_encoder, self.pipe.text_encoder_2)
        for compel, encoder in zip(compels, encoders, strict=True):
            with _skip_layers(encoder, clip_skip):
                halves.append(compel.build_conditioning_tensor_for_conjunction(segment.conjunction)[0])
                empties.append(compel.conditioning_provider.empty_z)
        # The second tokenizer pads with "!", so it never merges "!" into a longer token as the first
        # does ("!." is one token there, two here): the two can make different numbers of chunks.
        length = max(half.shape[1] for half in halves)
        padded = [
            torch.cat([half, empty.to(half).repeat(1, (length - half.shape[1]) // empty.shape[1], 1)], dim=1)
            for half, empty in zip(halves, empties, strict=True)
        ]
        return torch.cat(padded, dim=-1)

    def _pad(self, embeds: torch.Tensor, length: int, clip_skip: int, zero: bool = False) -> torch.Tensor:
        """Repeat the empty prompt's embeddings to `length` tokens, as A1111's `pad_cond_uncond` does."""
        if embeds.shape[1] == length:
            return embeds
        if zero:
            return torch.zeros(embeds.shape[0], length, embeds.shape[2], dtype=embeds.dtype, device=embeds.device)
        empty, _ = self.encode("", clip_skip)
        repeats = (length - embeds.shape[1]) // empty.shape[1]
        return torch.cat([embeds, empty.repeat(1, repeats, 1)], dim=1)
