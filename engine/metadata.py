"""Generation parameters as the A1111 `parameters` text that image viewers, A1111 and CivitAI read.

Written the way A1111 writes it, so its own infotext parser and CivitAI read every field right:
values holding a comma, colon or newline are JSON-quoted (A1111's `quote`), the sampler and
`Schedule type` carry A1111's names, `Clip skip` counts A1111's way (2 is SDXL's standard
penultimate layer, which is clip_skip 0 here), and `Lora hashes` / `Model hash` carry A1111's
hashes so CivitAI links the resources. engine/infotext.py reads this text back.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from engine.schedulers import a1111_sampler

# A1111 counts CLIP layers from the last one (1); SDXL's standard is the penultimate layer,
# "Clip skip 2" in A1111 and CivitAI, which is clip_skip 0 here.
A1111_CLIP_SKIP_OFFSET = 2
# The checkpoint file a single-file bake records in <model>/.baked (scripts/bake.py).
BAKED_CHECKPOINT = "checkpoint.safetensors"
# How a file found by its hash on CivitAI is named; `#NAME` after it is the name generation data gave.
BY_HASH = "civitai.com/api/v1/model-versions/by-hash/"


@dataclass(frozen=True)
class GenerationParameters:
    """What made one image, enough to reproduce it. Holds no tokens."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str  # this project's scheduler name (engine/schedulers.py); written with A1111's names
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str
    clip_skip: int = 0  # this project's convention: layers skipped beyond the penultimate one
    model_hash: str | None = None  # A1111's: the first 10 hex digits of the checkpoint file's sha256
    denoising_strength: float | None = None
    cfg_cutoff: float | str | None = None
    deep_cache: str | None = None  # go_fast's feature reuse, e.g. "from 0.3, every 3 steps full"
    # (name as the user gave it, scale, A1111's hash of the file); names never hold a token.
    loras: tuple[tuple[str, float, str | None], ...] = ()
    # Textual-inversion embeddings used: (the word a prompt calls it by, what the user passed,
    # A1111's hash of the file).
    embeddings: tuple[tuple[str, str, str | None], ...] = ()
    control: str | None = None  # A1111's "ControlNet 0" value, when a ControlNet guided the image
    ip_adapter: tuple[str, float, int] | None = None  # (adapter, scale, reference images) when one was used
    # The built-in upscaler, in A1111's postprocessing keys; width and height stay the generated size,
    # so the parameters reproduce the generation and say what was done to it after.
    upscale_by: int | None = None
    upscaler: str | None = None

    def fields(self) -> list[tuple[str, object]]:
        """The last line's (key, value) pairs in A1111's order, values not yet quoted."""
        sampler, schedule = a1111_sampler(self.sampler)
        fields: list[tuple[str, object]] = [("Steps", self.steps), ("Sampler", sampler)]
        if schedule != "Automatic":  # A1111 writes the schedule only when it is not the sampler's own
            fields.append(("Schedule type", schedule))
        fields += [
            ("CFG scale", number(self.cfg_scale)),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
        ]
        if self.model_hash:
            fields.append(("Model hash", self.model_hash))
        fields += [("Model", self.model), ("Clip skip", self.clip_skip + A1111_CLIP_SKIP_OFFSET)]
        if self.denoising_strength is not None:
            fields.append(("Denoising strength", number(self.denoising_strength)))
        if self.cfg_cutoff is not None:
            cutoff = self.cfg_cutoff
            fields.append(("CFG cutoff", number(cutoff) if isinstance(cutoff, float) else cutoff))
        if self.deep_cache is not None:
            fields.append(("Deep cache", self.deep_cache))
        if self.loras:
            fields.append(("Lora", ", ".join(f"{name}: {number(scale)}" for name, scale, _ in self.loras)))
            hashes = [(a1111_name(name), digest) for name, _, digest in self.loras if digest]
            if hashes:
                fields.append(("Lora hashes", ", ".join(f"{name}: {digest}" for name, digest in hashes)))
        if self.embeddings:
            # This project's own field: the strings sent, as JSON (one may hold a comma); A1111's after.
            fields.append(("Embeddings", json.dumps([source for _, source, _ in self.embeddings])))
            hashed = [(a1111_name(word), digest) for word, _, digest in self.embeddings if digest]
            if hashed:
                fields.append(("TI hashes", ", ".join(f"{word}: {digest}" for word, digest in hashed)))
        if self.control is not None:
            fields.append(("ControlNet 0", self.control))
        if self.ip_adapter is not None:
            name, scale, count = self.ip_adapter
            fields.append(("IP-Adapter", f"{name}: {number(scale)}, {count} image{'s' if count > 1 else ''}"))
        if self.upscale_by is not None:
            fields.append(("Postprocess upscale by", self.upscale_by))
            fields.append(("Postprocess upscaler", self.upscaler))
        return fields

    def to_a1111(self) -> str:
        """`prompt\\nNegative prompt: ...\\nSteps: .., Sampler: .., ...` in A1111's order and quoting."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{key}: {quote(value)}" for key, value in self.fields()))
        return "\n".join(lines)


def quote(value: object) -> str:
    """A1111's rule: a value with a comma, colon or newline is written as a JSON string."""
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def number(value: float) -> str:
    """Short when that is exact (6, 5.5, 0.8), else every digit, so the text reproduces the value."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def a1111_name(name: str) -> str:
    """A LoRA's or embedding's name as A1111 writes it in `Lora hashes` / `TI hashes`: without the
    commas and colons that would split the field. A CivitAI by-hash reference made from a `<lora:NAME>` tag is named
    by its tag (after the `#`), as A1111 names it."""
    if name.startswith(BY_HASH) and "#" in name:
        name = name.partition("#")[2]
    return name.translate(str.maketrans("", "", ":,"))


@functools.lru_cache(maxsize=64)
def lora_hash(path: Path, key: str) -> str:
    """A1111's LoRA hash (CivitAI's AutoV3): the sha256 of a safetensors file's bytes after its
    header, first 12 hex digits. `key` names the bytes (the LoRA store's immutable key), so a
    file is read once per process."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=64)
def embedding_hash(path: Path, key: str) -> str:
    """A1111's hash of a textual-inversion embedding (`TI hashes`): the first 12 hex digits of the
    whole file's sha256, whose first 10 are CivitAI's AutoV2. `key` names the bytes, as for LoRAs."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def checkpoint_hash(folder: Path) -> str | None:
    """A1111's `Model hash` (CivitAI's AutoV2) of a model baked from one checkpoint file: the first
    10 hex digits of that file's sha256, as the bake recorded it. None for a model baked from
    diffusers folders (no one file to name) or built without a bake record."""
    record = folder / ".baked"
    if not record.is_file():
        return None
    digest = json.loads(record.read_text()).get("files", {}).get(BAKED_CHECKPOINT)
    return digest[:10] if isinstance(digest, str) and digest else None
