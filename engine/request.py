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
    DEFAULT_MODEL,
    DEFAULT_SCHEDULER,
    FLUX_GUIDANCE_TO_CFG,
    IP_ADAPTER_DEFAULT_SCALE,
    IP_ADAPTER_MAX_IMAGES,
    IP_ADAPTER_MAX_SCALE,
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
    upscale: str = "none"  # a key of UPSCALE_FACTORS, applied to each output after the safety checker
    ip_adapter_images: tuple[Image.Image, ...] = ()  # reference images; their tokens are concatenated
    ip_adapter_scale: float = IP_ADAPTER_DEFAULT_SCALE

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
        if len(self.ip_adapter_images) > IP_ADAPTER_MAX_IMAGES:
            raise InputError(
                f"ip_adapter_image holds {len(self.ip_adapter_images)} images: send at most {IP_ADAPTER_MAX_IMAGES}"
            )
        if not 0 <= self.ip_adapter_scale <= IP_ADAPTER_MAX_SCALE:
            raise InputError(
                f"ip_adapter_scale must be between 0 and {IP_ADAPTER_MAX_SCALE:g}, got {self.ip_adapter_scale}"
            )
        if isinstance(self.seed, float) and not (math.isfinite(self.seed) and self.seed.is_integer()):
            raise InputError(f"seed must be a whole number, got {self.seed}")
        if self.upscale not in UPSCALE_FACTORS:
            raise InputError(f"upscale must be one of {', '.join(UPSCALE_FACTORS)}, got {self.upscale!r}")


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
