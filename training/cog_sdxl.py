"""The input names of Replicate's SDXL trainer (`stability-ai/sdxl`, replicate/cog-sdxl train.py)
on a TrainingRequest: each one becomes the setting it means here, is refused by name where it
cannot be honoured, or is logged where cog-sdxl itself ignores it or it changes nothing here.

coglet drops inputs a schema does not declare (with a warning on the server only), so train.py
declares every one as optional: None is "not sent", told apart from a sent value. The Flux inputs
have defaults that Cog fills in, so a Flux name at its default counts as not sent; the same
setting sent under both names with two values is refused. docs/training.md, "Coming from
Replicate's SDXL trainer", is the user-facing table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any

from engine.config import DEFAULT_MODEL
from engine.errors import InputError
from training.config import TRAIN_ARCHIVE_FILETYPES
from training.data import archive_kind
from training.request import TrainingRequest

log = logging.getLogger(__name__)

# cog-sdxl's name -> the TrainingRequest field (Flux's name) that means the same.
ALIASES = {
    "max_train_steps": "steps",
    "train_batch_size": "batch_size",
    "token_string": "trigger_word",
    "caption_prefix": "autocaption_prefix",
    "lora_lr": "learning_rate",
}
# Settings Flux's trainer has no name for: TrainingRequest keeps cog-sdxl's.
SETTINGS = ("ti_lr", "lr_scheduler", "lr_warmup_steps")
# What cog-sdxl reads that changes nothing here, and why (logged when sent).
UNUSED = {
    "num_train_epochs": "the length is steps (max_train_steps), which takes precedence in cog-sdxl too",
    "verbose": "the log is the same either way",
    "checkpointing_steps": "no intermediate checkpoints are written (cog-sdxl's never reached its output tar either); "
    "the tar holds the final LoRA",
    "crop_based_on_salience": "images are cropped at the centre of a bucket of their own proportions, never to a "
    "square; without masks cog-sdxl's salience crop was centred as well",
    "clipseg_temperature": "it shapes CLIPSeg masks, which are not made here",
}


@dataclass(frozen=True)
class CogSdxlInputs:
    """cog-sdxl's inputs this schema has no Flux name for, as sent (None: not sent).

    input_images, seed, resolution and lora_rank have the same names (and meaning) in both.
    """

    train_batch_size: int | None = None
    num_train_epochs: int | None = None
    max_train_steps: int | None = None
    is_lora: bool | None = None
    unet_learning_rate: float | None = None
    ti_lr: float | None = None
    lora_lr: float | None = None
    lr_scheduler: str | None = None
    lr_warmup_steps: int | None = None
    token_string: str | None = None
    caption_prefix: str | None = None
    mask_target_prompts: str | None = None
    crop_based_on_salience: bool | None = None
    use_face_detection_instead: bool | None = None
    clipseg_temperature: float | None = None
    verbose: bool | None = None
    checkpointing_steps: int | None = None
    input_images_filetype: str | None = None

    def sent(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def apply(request: TrainingRequest, inputs: CogSdxlInputs) -> TrainingRequest:
    """The request with cog-sdxl's names applied; refuses (InputError) before any work what cannot be honoured."""
    sent = inputs.sent()
    if not sent:
        return request
    _refuse(inputs)
    defaults = {f.name: f.default for f in fields(TrainingRequest)}
    changes: dict[str, Any] = {}
    for name, target in ALIASES.items():
        if name not in sent:
            continue
        value, current = sent[name], getattr(request, target)
        if current != defaults[target] and current != value:
            raise InputError(
                f"{target} ({current!r}) and {name} ({value!r}) are both set and differ: they are one setting "
                f"({name} is the name Replicate's SDXL trainer gives {target}); send one of them"
            )
        changes[target] = value
    if sent.get("lora_lr") == 0:
        raise InputError("lora_lr must be above 0 (the LoRA's learning rate; 1e-4 is usual for SDXL)")
    changes.update({name: sent[name] for name in SETTINGS if name in sent})
    _check_filetype(request, inputs.input_images_filetype)
    mapped = [f"{name} -> {ALIASES[name]}" for name in ALIASES if name in sent]
    if mapped:
        log.info("Replicate's SDXL trainer's names: %s", ", ".join(mapped))
    if "unet_learning_rate" in sent:
        log.info(
            "unet_learning_rate is not used: it is cog-sdxl's rate for full fine-tuning (is_lora false); "
            "the LoRA learns at lora_lr / learning_rate (%g)",
            changes.get("learning_rate", request.learning_rate),
        )
    for name, why in UNUSED.items():
        if name in sent:
            log.info("%s is not used: %s", name, why)
    if request.model == DEFAULT_MODEL:
        log.info(
            "model: %s (the default here); Replicate's SDXL trainer trained SDXL base 1.0, which is model: sdxl",
            DEFAULT_MODEL,
        )
    return replace(request, **changes)


def _refuse(inputs: CogSdxlInputs) -> None:
    """What this trainer cannot do, refused by name: training something else would hand back
    another model than the one asked for."""
    if inputs.is_lora is False:
        raise InputError(
            "is_lora false asks for full fine-tuning, which this trainer does not do: it trains a LoRA "
            "(with pivotal tuning). Leave is_lora out, or send true"
        )
    if inputs.mask_target_prompts and inputs.mask_target_prompts.strip():
        raise InputError(
            f"mask_target_prompts {inputs.mask_target_prompts!r}: this trainer makes no CLIPSeg masks and weighs "
            "every pixel alike; leave mask_target_prompts out to train on the whole image"
        )
    if inputs.use_face_detection_instead:
        raise InputError(
            "use_face_detection_instead true: this trainer makes no face masks and weighs every pixel alike; "
            "leave it out (or false) to train on the whole image"
        )


def _check_filetype(request: TrainingRequest, filetype: str | None) -> None:
    """input_images_filetype zip or tar must be what the archive is (infer: its bytes say which)."""
    if filetype is not None and filetype not in TRAIN_ARCHIVE_FILETYPES:
        raise InputError(
            f"input_images_filetype {filetype!r} is not known: use one of {', '.join(TRAIN_ARCHIVE_FILETYPES)}"
        )
    if filetype in (None, "infer") or request.input_images is None:
        return
    kind = archive_kind(request.input_images)
    if kind is not None and kind != filetype:
        raise InputError(
            f"input_images_filetype is {filetype!r} but input_images is a {kind} archive: send "
            f"input_images_filetype {kind!r} or 'infer' (or leave it out)"
        )
