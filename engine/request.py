"""The typed generation request, the rules that turn Flux-style inputs into it, and the contract
with whatever supplies LoRA files (the store in `weights.py`, handed to the engine by its caller)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from engine.config import (
    CONTROL_DEFAULT_STRENGTH,
    CONTROL_MAX_STRENGTH,
    CONTROL_PREPROCESSORS,
    CONTROL_TYPES,
    DEFAULT_MODEL,
    DEFAULT_SCHEDULER,
    FLUX_GUIDANCE_TO_CFG,
    IP_ADAPTER_DEFAULT_SCALE,
    IP_ADAPTER_MAX_IMAGES,
    IP_ADAPTER_MAX_SCALE,
    MAX_EMBEDDINGS,
    MAX_STEPS,
    SEED_MAX,
    UPSCALE_FACTORS,
)
from engine.errors import InputError


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA as the user named it (URL, repo, URN ...) and the scale to apply it at."""

    source: str
    scale: float


@dataclass(frozen=True)
class Credentials:
    """Per-request tokens for LoRA downloads. repr hides them so they never reach a log."""

    hf: str | None = None
    civitai: str | None = None

    def __repr__(self) -> str:
        return "Credentials(***)"


@dataclass(frozen=True)
class LocalLora:
    """A LoRA file on disk, the stable identity it was cached under, and its scale."""

    key: str
    path: Path
    scale: float
    name: str  # what the user passed, for messages (never holds a credential)
    embeddings: Path | None = None  # pivotal tuning: safetensors with text_encoders_0 / text_encoders_1
    trigger: tuple[tuple[str, str], ...] = ()  # e.g. (("TOK", "<s0><s1>"),) from special_params.json
    trained_words: tuple[str, ...] = ()  # the host's trigger words (CivitAI's trainedWords)
    file_name: str = ""  # the host's name for the file (A1111 calls an embedding by it); "" when none


class LoraSource(Protocol):
    """Turns what a user pasted into local LoRA files (downloading and caching as needed)."""

    def fetch_all(self, specs: Sequence[tuple[str, float]], credentials: Credentials) -> list[LocalLora]:
        """One local file per (source, scale), in order."""


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one prediction needs, independent of how it arrived (Cog, a test, a script)."""

    prompt: str
    negative_prompt: str = ""
    model: str = DEFAULT_MODEL
    aspect_ratio: str = "1:1"
    megapixels: str = "1"
    width: int | None = None
    height: int | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None
    prompt_strength: float = 0.8
    num_outputs: int = 1
    num_inference_steps: int = 28
    cfg_scale: float = 3 * FLUX_GUIDANCE_TO_CFG
    seed: int | None = None
    scheduler: str = DEFAULT_SCHEDULER
    clip_skip: int = 0
    go_fast: bool = True
    safety_checker: bool = True
    loras: tuple[LoraSpec, ...] = ()
    credentials: Credentials = Credentials()
    # ControlNet (engine/control.py): off unless a control image is given.
    control_image: Image.Image | None = None
    control_type: str = "none"
    control_strength: float = CONTROL_DEFAULT_STRENGTH
    control_start: float = 0.0
    control_end: float = 1.0
    control_preprocess: bool = True
    return_control_map: bool = False
    ip_adapter_images: tuple[Image.Image, ...] = ()  # reference images; their tokens are concatenated
    ip_adapter_scale: float = IP_ADAPTER_DEFAULT_SCALE
    # Textual-inversion files in any form a LoRA takes, each called in the prompts by its name.
    embeddings: tuple[str, ...] = ()
    upscale: str = "none"  # a key of UPSCALE_FACTORS, applied to each output after the safety checker

    def validate(self) -> None:
        """Refuse what the schema cannot express, with a message that says what to change."""
        if not self.prompt.strip():
            raise InputError("prompt is empty: describe the image you want")
        if self.mask is not None and self.image is None:
            raise InputError("mask needs an image: pass the image to inpaint together with its mask")
        if self.num_outputs < 1:
            raise InputError("num_outputs must be at least 1")
        if self.image is not None and int(self.num_inference_steps * self.prompt_strength) < 1:
            # diffusers runs int(steps x strength) steps on an input image; none would fail deep inside it.
            least = math.ceil(1 / self.prompt_strength) if self.prompt_strength > 0 else MAX_STEPS + 1
            fix = "raise prompt_strength" if least > MAX_STEPS else f"use at least {least} steps or raise it"
            raise InputError(
                f"with an image, {self.num_inference_steps} step(s) at prompt_strength {self.prompt_strength:g} "
                f"leave no denoising step: {fix}"
            )
        if self.image is not None and self.mask is not None:
            _check_mask_proportions(self.image.size, self.mask.size)
        self._validate_control()
        if len(self.ip_adapter_images) > IP_ADAPTER_MAX_IMAGES:
            raise InputError(
                f"ip_adapter_image holds {len(self.ip_adapter_images)} images: send at most {IP_ADAPTER_MAX_IMAGES}"
            )
        if not 0 <= self.ip_adapter_scale <= IP_ADAPTER_MAX_SCALE:
            raise InputError(
                f"ip_adapter_scale must be between 0 and {IP_ADAPTER_MAX_SCALE:g}, got {self.ip_adapter_scale}"
            )
        if len(self.embeddings) > MAX_EMBEDDINGS:
            raise InputError(f"embeddings holds {len(self.embeddings)} files: send at most {MAX_EMBEDDINGS}")
        if any(not source.strip() for source in self.embeddings):
            raise InputError("embeddings holds an empty string: leave it out, or name the embedding's file")
        if isinstance(self.seed, float) and not (math.isfinite(self.seed) and self.seed.is_integer()):
            raise InputError(f"seed must be a whole number, got {self.seed}")
        if self.upscale not in UPSCALE_FACTORS:
            raise InputError(f"upscale must be one of {', '.join(UPSCALE_FACTORS)}, got {self.upscale!r}")

    def _validate_control(self) -> None:
        """ControlNet inputs that only make sense together, refused before any work."""
        types = ", ".join(t for t in CONTROL_TYPES if t != "none")
        if self.control_type not in CONTROL_TYPES:
            raise InputError(f"control_type must be one of none, {types}; got {self.control_type!r}")
        if self.control_image is None:
            if self.control_type != "none":
                raise InputError(f"control_type {self.control_type} needs a control_image: send the image to follow")
            if self.return_control_map:
                raise InputError("return_control_map needs a control_image: send one, or leave return_control_map off")
            return
        if self.control_type == "none":
            raise InputError(f"control_image needs a control_type saying what to follow: one of {types}")
        if not 0 <= self.control_strength <= CONTROL_MAX_STRENGTH:
            raise InputError(f"control_strength must be between 0 and {CONTROL_MAX_STRENGTH:g}")
        if not 0 <= self.control_start <= 1 or not 0 <= self.control_end <= 1:
            raise InputError("control_start and control_end are fractions of the steps, between 0 and 1")
        if self.control_end <= self.control_start:
            raise InputError(
                f"control_end ({self.control_end:g}) must be greater than control_start ({self.control_start:g}): "
                "the ControlNet guides the steps between them"
            )
        if self.control_preprocess and self.control_type not in CONTROL_PREPROCESSORS:
            made = ", ".join(CONTROL_PREPROCESSORS)
            raise InputError(
                f"control_type {self.control_type} has no preprocessor here (maps are made only for {made}): "
                f"send a ready {self.control_type} map as control_image with control_preprocess false"
            )


def _check_mask_proportions(image: tuple[int, int], mask: tuple[int, int]) -> None:
    """A mask is stretched to the image: different proportions mean it marks the wrong places."""
    (iw, ih), (mw, mh) = image, mask
    if abs(mh * iw / mw - ih) > max(2, 0.01 * ih):
        raise InputError(
            f"mask is {mw}x{mh} but image is {iw}x{ih}: draw the mask over the image at its size or proportions"
        )


def reduced_seed(seed: float) -> int:
    """A seed torch takes: past SEED_MAX, the seed modulo 2^64.

    coglet hands integers past 2^64 over as floats; the same JSON always gives the same seed.
    """
    return int(seed) % (SEED_MAX + 1)


def output_seeds(seed: int, count: int) -> list[int]:
    """Flux's rule, output i uses seed + i, wrapping past SEED_MAX to 0 so no seed overflows."""
    return [(seed + i) % (SEED_MAX + 1) for i in range(count)]


def cfg_from_flux(guidance: float, cfg_scale: float | None) -> float:
    """SDXL's classifier-free guidance: cfg_scale when given, else Flux's guidance x 2 (3 -> 6)."""
    return cfg_scale if cfg_scale is not None else guidance * FLUX_GUIDANCE_TO_CFG


def loras_from_flux(
    lora_weights: str | None, lora_scale: float, extra_lora: str | None, extra_lora_scale: float
) -> tuple[LoraSpec, ...]:
    """Flux's rules: an extra LoRA equal to the main one is ignored; an extra LoRA alone acts as the main one."""
    main = (lora_weights or "").strip()
    extra = (extra_lora or "").strip()
    if not main and extra:
        return (LoraSpec(extra, extra_lora_scale),)
    specs = [LoraSpec(main, lora_scale)] if main else []
    if extra and extra != main:
        specs.append(LoraSpec(extra, extra_lora_scale))
    return tuple(specs)
