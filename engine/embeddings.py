"""Textual-inversion embeddings and pivotal tokens: vectors put into both SDXL text encoders under
tokens of their own, and the words people write for them swapped for those tokens.

Two users share this: a LoRA's pivotal tokens (Replicate's trainer, engine/loras.py), kept while
the LoRA is active, and the `embeddings` input, held for one request only. An SDXL embedding file
holds `clip_l` (n x 768, the first encoder) and `clip_g` (n x 1280, the second); it is called in a
prompt by its file name (as A1111 does), by `embedding:NAME` (as ComfyUI does), or by the trigger
word its host lists (CivitAI's trainedWords). Vectors go in as new rows of each encoder's token
table; a request's come out by putting back the tokenizers and tables it started with, a LoRA's
through diffusers' `unload_textual_inversion`, so both are the base's again, bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from engine.config import MAX_PROMPT_TOKENS
from engine.errors import InputError
from engine.metadata import BY_HASH, embedding_hash
from engine.prompts import count_tokens
from engine.request import LocalLora

log = logging.getLogger(__name__)

# One CLIP window: an embedding longer than a whole chunk of the prompt is refused.
MAX_VECTORS = 75
# Key pairs an SDXL embedding file may hold, (first encoder, second encoder): A1111/kohya's names,
# and Replicate's trainer's embeddings.pti.
_SDXL_KEYS = (("clip_l", "clip_g"), ("text_encoders_0", "text_encoders_1"))
_EXTENSIONS = (".safetensors", ".pt", ".bin")


def encoders(pipe: StableDiffusionXLPipeline) -> tuple[tuple[torch.nn.Module, object], ...]:
    """SDXL's two text encoders, each with its tokenizer."""
    return ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))


def widths(pipe: StableDiffusionXLPipeline) -> tuple[int, int]:
    """How wide a token vector is in each encoder (768 and 1280 at SDXL size)."""
    return tuple(encoder.get_input_embeddings().embedding_dim for encoder, _ in encoders(pipe))  # type: ignore[return-value]


def misfit(pipe: StableDiffusionXLPipeline, vectors: Sequence[torch.Tensor]) -> str | None:
    """What keeps these per-encoder vectors out of this model, or None when they fit."""
    wanted = widths(pipe)
    got = tuple(v.shape[-1] for v in vectors)
    if got != wanted:
        return f"its vectors are {got[0]} and {got[1]} wide; this model's encoders take {wanted[0]} and {wanted[1]}"
    if vectors[0].shape[0] != vectors[1].shape[0]:
        return f"it holds {vectors[0].shape[0]} vectors for one encoder and {vectors[1].shape[0]} for the other"
    return None


def add_tokens(pipe: StableDiffusionXLPipeline, tokens: list[str], vectors: Sequence[torch.Tensor]) -> None:
    """Both encoders learn these tokens with these vectors (checked by `misfit` first); a failure or
    a cancel half-way takes out whatever went in. Done here rather than by diffusers'
    `load_textual_inversion`, which reads the whole vocabulary three times per token (0.1 s each
    with CLIP's) and fills the new rows from the old ones' covariance only to overwrite them."""
    done = False
    try:
        _append(pipe, tokens, vectors)
        done = True
    finally:
        if not done:
            remove_tokens(pipe, tokens)


def _append(pipe: StableDiffusionXLPipeline, tokens: list[str], vectors: Sequence[torch.Tensor]) -> None:
    """The tokens at the end of each tokenizer, their vectors as new rows of its encoder's table."""
    for rows, (encoder, tokenizer) in zip(vectors, encoders(pipe), strict=True):
        if clash := set(tokens) & set(tokenizer.get_added_vocab()):
            raise RuntimeError(f"tokens {sorted(clash)} are in the tokenizer already")
        tokenizer.add_tokens(tokens)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = encoder.get_input_embeddings().weight
        table.data[tokenizer.convert_tokens_to_ids(tokens)] = rows.to(table.device, table.dtype)


def remove_tokens(pipe: StableDiffusionXLPipeline, tokens: list[str]) -> None:
    """Take these tokens out of every tokenizer (and its encoder's table) that holds them, by
    diffusers' `unload_textual_inversion`."""
    for encoder, tokenizer in encoders(pipe):
        added = tokenizer.get_added_vocab()
        present = [t for t in tokens if t in added]
        if present:
            pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)


def token_names(owner: str, count: int) -> list[str]:
    """`count` tokens no vocabulary holds, named after their owner so two owners never collide."""
    return [f"<{owner}_{i}>" for i in range(count)]


def word_pattern(word: str) -> str:
    """A regex for the word standing alone: not inside a longer word, whatever its edge characters."""
    return rf"(?<!\w){re.escape(word)}(?!\w)"


def swap_words(text: str, pairs: Sequence[tuple[str, str]]) -> str:
    """Each (word, replacement) in any case, as CLIP's tokenizer lowercases and training matched
    the trigger in any case: a word of letters and digits where it stands alone (TOK, tok), anything
    else wherever it appears (<s0><s1>)."""
    for word, replacement in pairs:
        pattern = rf"\b{re.escape(word)}\b" if word.isalnum() else re.escape(word)
        text = re.sub(pattern, replacement.replace("\\", "\\\\"), text, flags=re.IGNORECASE)
    return text


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion file read and checked against a model: its vectors per encoder, the
    names a prompt may call it by, and the tokens it goes in under."""

    name: str  # the file name without its extension, as A1111 calls it
    source: str  # what the user passed, for messages
    vectors: tuple[torch.Tensor, torch.Tensor]
    triggers: tuple[str, ...]  # the host's trigger words
    tokens: tuple[str, ...]
    digest: str = ""  # A1111's hash of the file (`TI hashes` in the output's metadata)

    def pattern(self) -> re.Pattern[str]:
        """Every way a prompt may call it: embedding:NAME[.ext] (ComfyUI), NAME (A1111), a trigger word;
        case does not matter (CLIP's tokenizer lowercases). Longest first, so none eats another."""
        extensions = "|".join(re.escape(e) for e in _EXTENSIONS)
        forms = [rf"(?<![\w:])embedding:{re.escape(self.name)}(?:{extensions})?(?!\w)"]
        forms += [word_pattern(word) for word in sorted({self.name, *self.triggers}, key=len, reverse=True)]
        return re.compile("|".join(forms), re.IGNORECASE)


def read_embedding(lora: LocalLora, pipe: StableDiffusionXLPipeline, model_id: str) -> Embedding:
    """The file's vectors, refused by what it is when they cannot go into this model."""
    name = _name(lora)
    tensors = _read(lora.path, lora.name)
    found = next((pair for pair in _SDXL_KEYS if all(k in tensors for k in pair)), None)
    if found is None:
        raise InputError(f"embedding {lora.name} {_what_instead(tensors)}")
    vectors = (_rows(tensors[found[0]]), _rows(tensors[found[1]]))
    if problem := misfit(pipe, vectors):
        raise InputError(f"embedding {lora.name} does not fit {model_id}: {problem}")
    if not 1 <= vectors[0].shape[0] <= MAX_VECTORS:
        raise InputError(
            f"embedding {lora.name} holds {vectors[0].shape[0]} vectors per encoder: between 1 and {MAX_VECTORS} "
            "(one CLIP window) are used here"
        )
    owner = "emb_" + hashlib.sha256(lora.key.encode()).hexdigest()[:16]
    tokens = tuple(token_names(owner, vectors[0].shape[0]))
    return Embedding(name, lora.name, vectors, lora.trained_words, tokens, embedding_hash(lora.path, lora.key))


def _name(lora: LocalLora) -> str:
    """The file's name without its extension: what A1111 and ComfyUI call an embedding by. One that
    generation data found by its hash (`...by-hash/<hash>#NAME`) is called by the text's NAME."""
    if lora.name.startswith(BY_HASH) and "#" in lora.name:
        return lora.name.partition("#")[2]
    stem = Path(lora.file_name).name
    for extension in _EXTENSIONS:
        stem = stem.removesuffix(extension)
    if not stem.strip():
        raise InputError(
            f"embedding {lora.name} comes without a file name to call it by: for a data: URI, add one as "
            "data:application/octet-stream;name=NAME.safetensors;base64,..."
        )
    return stem


def _read(path: Path, source: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - a safe_open handle is no dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"embedding {source} is not a readable .safetensors file: {exc}") from exc


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """(n, width) in fp32; a single vector may be stored without its row axis."""
    return (tensor.unsqueeze(0) if tensor.ndim == 1 else tensor.flatten(0, -2)).float()


def _what_instead(tensors: dict[str, torch.Tensor]) -> str:
    """Why a file without SDXL's key pair is not an SDXL embedding, told from its keys and shapes."""
    keys = list(tensors)
    if any("lora" in k or "hada_" in k or "lokr_" in k for k in keys):
        return "is a LoRA, not an embedding: pass it as lora_weights or extra_lora"
    single = tensors.get("emb_params", tensors.get("clip_l"))
    if single is not None:
        width = single.shape[-1]
        made_for = {768: "SD 1.5", 1024: "SD 2.x"}.get(width, "another model")
        return (
            f"is an embedding for {made_for} ({width}-wide vectors for one text encoder, key "
            f"{'emb_params' if 'emb_params' in tensors else 'clip_l'}): SDXL needs clip_l and clip_g, "
            "so pick the embedding's SDXL version"
        )
    if len(keys) > 50:
        return "is a full checkpoint or another model, not an embedding: an SDXL embedding holds clip_l and clip_g"
    return f"holds no SDXL embedding (keys clip_l and clip_g); its keys are: {', '.join(keys[:5]) or 'none'}"


@contextlib.contextmanager
def used(
    pipe: StableDiffusionXLPipeline, embeddings: Sequence[Embedding], prompt: str, negative: str
) -> Iterator[tuple[str, str]]:
    """The prompts with each embedding's names swapped for its tokens, while those tokens exist;
    on the way out (a failure and a cancel too) the tokenizers and encoders are the base's again.
    Says which names each prompt holds; an embedding neither prompt calls is a warning, not loaded."""
    texts = {"prompt": prompt, "negative_prompt": negative}
    wanted: list[Embedding] = []
    for embedding in embeddings:
        pattern = embedding.pattern()
        found = {field: sorted({m[0] for m in pattern.finditer(text)}) for field, text in texts.items()}
        if not any(found.values()):
            calls = ", ".join(sorted({embedding.name, f"embedding:{embedding.name}", *embedding.triggers}))
            log.warning(
                "embedding %s is in neither prompt nor negative_prompt, so it does nothing: write %s where it "
                "should act",
                embedding.name,
                calls,
            )
            continue
        log.info(
            "embedding %s (%d vectors): %s",
            embedding.name,
            len(embedding.tokens),
            "; ".join(f"{field} has {', '.join(words)}" for field, words in found.items() if words),
        )
        wanted.append(embedding)
    if not wanted:
        yield prompt, negative
        return
    # The tokens go into copies of the tokenizers' backends and into longer token tables (transformers
    # swaps a table's weight data in place, the module stays); the backends and data in use now are
    # kept and put back on the way out, by assignments a cancel cannot cut short. Taking the tokens
    # out instead rebuilds each tokenizer through JSON: 1-2 s a tokenizer on a slow CPU, against
    # 0.5 s for the copy.
    saved = [(t.backend_tokenizer, e.get_input_embeddings(), e.config.vocab_size) for e, t in encoders(pipe)]
    rows = [table.weight.data for _, table, _ in saved]
    try:
        for backend, (_, tokenizer) in zip(saved, encoders(pipe), strict=True):
            tokenizer._tokenizer = Tokenizer.from_str(backend[0].to_str())
        for embedding in wanted:
            _append(pipe, list(embedding.tokens), embedding.vectors)
            for field, text in texts.items():
                texts[field] = embedding.pattern().sub(lambda _, e=embedding: "".join(e.tokens), text)
        for field, text in texts.items():
            if (count := count_tokens(pipe.tokenizer, text)) > MAX_PROMPT_TOKENS:
                raise InputError(
                    f"{field} is {count} CLIP tokens once its embeddings are in (each use counts every vector); "
                    f"the most is {MAX_PROMPT_TOKENS}: use them fewer times"
                )
        yield texts["prompt"], texts["negative_prompt"]
    finally:
        for (backend, table, size), data, (encoder, tokenizer) in zip(saved, rows, encoders(pipe), strict=True):
            tokenizer._tokenizer = backend  # the attribute diffusers' unload sets too
            table.weight.data, table.num_embeddings = data, data.shape[0]
            encoder.set_input_embeddings(table)
            encoder.config.vocab_size = size
