"""A1111's encoding of a weighted prompt for SDXL: its chunks and its "Original" emphasis.

A1111 (`modules/sd_hijack_clip.py`, `sd_emphasis.py`) tokenizes each weighted piece on its own,
lays the tokens into chunks of 75 (a BREAK closes a chunk; a chunk that fills up moves the text
after its last comma to the next chunk when that comma is within 20 tokens of the end), and
encodes each chunk as `begin + 75 tokens + end`, padded with the end marker (with `!` after the
first end marker for the second encoder). Per chunk and per text encoder, the hidden states are
multiplied by their tokens' weights and the whole tensor is rescaled so its mean is the
unweighted mean. The pooled embedding is the second encoder's, of the first chunk, unweighted.

A1111 tokenizes both encoders' text with one BPE (open_clip's equals CLIP-L's vocabulary);
diffusers' second tokenizer declares its pad `!` a special token, which splits `!` off words. So
the first tokenizer's ids serve both encoders whenever the two vocabularies are the same, as in
every SDXL checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHUNK = 75  # tokens per chunk between the begin and end markers
COMMA_BACK_OFF = 20  # A1111's default `comma_padding_backtrack`


@dataclass
class Chunk:
    """Up to CHUNK token ids of a prompt and one weight per token."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def make_chunks(segments: list[list[tuple[list[int], float]]], comma: int | None) -> list[Chunk]:
    """Weighted token runs, BREAK-separated, laid into chunks by A1111's rules.

    A segment after the first starts a new chunk even when the current one is empty (a leading
    BREAK gives an empty chunk); an empty last chunk is dropped unless it would be the only one.
    """
    chunks: list[Chunk] = []
    current = Chunk()
    comma_at = -1  # tokens in the current chunk before its last comma; -1 when it has none

    def close() -> None:
        nonlocal current, comma_at
        chunks.append(current)
        current, comma_at = Chunk(), -1

    for n, segment in enumerate(segments):
        if n:
            close()
        for ids, weight in segment:
            for token in ids:
                if token == comma:
                    comma_at = len(current.ids)
                elif len(current.ids) == CHUNK and comma_at >= 0 and CHUNK - comma_at <= COMMA_BACK_OFF:
                    cut = comma_at + 1
                    moved = Chunk(current.ids[cut:], current.weights[cut:])
                    del current.ids[cut:], current.weights[cut:]
                    close()
                    current = moved
                if len(current.ids) == CHUNK:
                    close()
                current.ids.append(token)
                current.weights.append(weight)
    if current.ids or not chunks:
        close()
    return chunks


def shares_vocabulary(first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase) -> bool:
    """Whether one BPE serves both encoders: the same ids for every token, `!` being special aside."""
    return first.get_vocab() == second.get_vocab()


def encode_chunk(
    encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chunk: Chunk, clip_skip: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk through one encoder: the weighted hidden states (1, 77, dim) and, for an encoder
    with a projection, its pooled embedding of the unweighted tokens (from the last layer)."""
    pad = CHUNK - len(chunk.ids)
    ids = [tokenizer.bos_token_id, *chunk.ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad
    output = encoder(torch.tensor([ids], device=encoder.device), output_hidden_states=True)
    hidden = output.hidden_states[-(clip_skip + 2)]  # the penultimate layer, as diffusers counts clip_skip
    pooled = getattr(output, "text_embeds", None)
    if any(weight != 1.0 for weight in chunk.weights):  # all ones would change nothing
        weights = torch.tensor([1.0, *chunk.weights, *[1.0] * (pad + 1)], device=hidden.device)
        exact = hidden.float()  # A1111 multiplies by float32 weights, which promotes half precision
        weighted = exact * weights[None, :, None]
        hidden = (weighted * (exact.mean() / weighted.mean())).to(hidden.dtype)
    return hidden, pooled
