"""A test-only encoder that follows A1111's own code path for SDXL, to hold `engine.emphasis` against.

Written from AUTOMATIC1111/stable-diffusion-webui (`modules/sd_hijack_clip.py`:
`FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line` / `process_tokens` / `forward`;
`modules/sd_emphasis.py`: `EmphasisOriginal`; `modules/sd_hijack_open_clip.py`: the second
encoder pads with id 0 after its first end marker), in its shape: a position loop over each
piece's tokens, a `next_chunk` that pads to 75 and adds the markers, and the emphasis applied to
each chunk's output. Input is what A1111's `parse_prompt_attention` returns: `[text, weight]`
pairs with `["BREAK", -1]` between segments. Both encoders are fed the first tokenizer's ids:
A1111 tokenizes the second encoder's text with open_clip's tokenizer, whose BPE is CLIP-L's.
The SDXL conditioner concatenates the two encoders' outputs along the channel axis.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

CHUNK_LENGTH = 75
COMMA_PADDING_BACKTRACK = 20


class _Chunk:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.weights: list[float] = []


class ReferenceEncoder:
    """One SDXL text encoder wrapped the way A1111 wraps it."""

    def __init__(self, pipe: StableDiffusionXLPipeline, second: bool, layer: int) -> None:
        self.tokenizer = pipe.tokenizer
        self.model = pipe.text_encoder_2 if second else pipe.text_encoder
        vocab = self.tokenizer.get_vocab()
        self.comma = vocab[",</w>"]
        self.begin = vocab["<|startoftext|>"]
        self.end = vocab["<|endoftext|>"]
        self.pad = 0 if second else self.end
        self.layer = layer

    def chunks(self, parsed: list[list]) -> list[_Chunk]:
        """A1111's tokenize_line: each piece tokenized alone, then a loop over token positions."""
        per_piece = self.tokenizer([text for text, _ in parsed], add_special_tokens=False)["input_ids"]
        done: list[_Chunk] = []
        open_chunk = _Chunk()
        comma_index = -1

        def finish() -> None:  # pad to 75 with the end marker, add both markers
            nonlocal open_chunk, comma_index
            missing = CHUNK_LENGTH - len(open_chunk.ids)
            open_chunk.ids = [self.begin, *open_chunk.ids, *[self.end] * max(missing, 0), self.end]
            open_chunk.weights = [1.0, *open_chunk.weights, *[1.0] * max(missing, 0), 1.0]
            done.append(open_chunk)
            open_chunk, comma_index = _Chunk(), -1

        for ids, (text, weight) in zip(per_piece, parsed, strict=True):
            if weight == -1 and text == "BREAK":
                finish()
                continue
            i = 0
            while i < len(ids):
                if ids[i] == self.comma:
                    comma_index = len(open_chunk.ids)
                elif (
                    len(open_chunk.ids) == CHUNK_LENGTH
                    and comma_index != -1
                    and CHUNK_LENGTH - comma_index <= COMMA_PADDING_BACKTRACK
                ):
                    keep = comma_index + 1
                    tail_ids, tail_weights = open_chunk.ids[keep:], open_chunk.weights[keep:]
                    open_chunk.ids, open_chunk.weights = open_chunk.ids[:keep], open_chunk.weights[:keep]
                    finish()
                    open_chunk.ids, open_chunk.weights = tail_ids, tail_weights
                if len(open_chunk.ids) == CHUNK_LENGTH:
                    finish()
                open_chunk.ids.append(ids[i])
                open_chunk.weights.append(weight)
                i += 1
        if open_chunk.ids or not done:
            finish()
        return done

    def encode(self, chunk: _Chunk) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A1111's process_tokens with the "Original" emphasis."""
        ids = torch.tensor([chunk.ids])
        if self.pad != self.end:  # everything after the first end marker becomes the pad id
            ids[0, chunk.ids.index(self.end) + 1 :] = self.pad
        out = self.model(input_ids=ids, output_hidden_states=True)
        z = out.hidden_states[self.layer]
        before = z.mean()
        z = z * torch.tensor(chunk.weights)[None, :, None]
        z = z * (before / z.mean())
        return z, getattr(out, "text_embeds", None)

    def forward(self, parsed: list[list]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoded = [self.encode(chunk) for chunk in self.chunks(parsed)]
        return torch.cat([z for z, _ in encoded], dim=1), encoded[0][1]


@torch.no_grad()
def a1111_encode(
    pipe: StableDiffusionXLPipeline, parsed: list[list], clip_skip: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's cross-attention context and pooled vector for one parsed prompt, as A1111 makes them."""
    layer = -(clip_skip + 2)
    first, _ = ReferenceEncoder(pipe, second=False, layer=layer).forward(parsed)
    second, pooled = ReferenceEncoder(pipe, second=True, layer=layer).forward(parsed)
    assert pooled is not None
    return torch.cat([first, second], dim=2), pooled
