"""One training job as the trainer needs it, checked before anything is read or loaded."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.config import DEFAULT_MODEL
from engine.errors import InputError
from training.config import (
    TRAIN_BUCKET_MAX_ASPECT,
    TRAIN_BUCKET_MULTIPLE,
    TRAIN_DEFAULT_LEARNING_RATE,
    TRAIN_DEFAULT_RANK,
    TRAIN_DEFAULT_RESOLUTION,
    TRAIN_DEFAULT_STEPS,
    TRAIN_EMBEDDING_LEARNING_RATE,
    TRAIN_LR_SCHEDULERS,
    TRAIN_MAX_BATCH_SIZE,
    TRAIN_MAX_LEARNING_RATE,
    TRAIN_MAX_RANK,
    TRAIN_MAX_STEPS,
    TRAIN_RESOLUTION_MAX,
    TRAIN_RESOLUTION_MIN,
    TRAIN_TRIGGER_MAX_CHARS,
)

# Flux's optimizer names (ai-toolkit's), in the order its description lists them.
OPTIMIZERS = ("prodigy", "adam8bit", "adamw8bit", "lion8bit", "adam", "adamw", "lion", "adagrad", "adafactor")
# What a trigger may not hold: pivotal tuning writes its own tokens as <s0><s1>.
_PIVOT_TOKEN = re.compile(r"<s\d+>")
# A Hugging Face repository id: `name` (the token's own namespace) or `owner/name`.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SECRET_FIELDS = ("hf_token", "wandb_api_key")


@dataclass(frozen=True)
class TrainingRequest:
    """Everything one training needs, independent of how it arrived (Cog, a test, a script).

    Field names are the Flux trainer's (replicate/flux-fine-tuner), plus model, train_text_encoder
    and seed, and three settings only Replicate's SDXL trainer (cog-sdxl) names: ti_lr,
    lr_scheduler, lr_warmup_steps (training/cog_sdxl.py maps its other names onto Flux's).
    Secrets never appear in repr() or in record().
    """

    input_images: Path | None = None
    trigger_word: str = "TOK"
    autocaption: bool = True
    autocaption_prefix: str = ""
    autocaption_suffix: str = ""
    steps: int = TRAIN_DEFAULT_STEPS
    learning_rate: float = TRAIN_DEFAULT_LEARNING_RATE
    batch_size: int = 1
    resolution: str = TRAIN_DEFAULT_RESOLUTION
    lora_rank: int = TRAIN_DEFAULT_RANK
    caption_dropout_rate: float = 0.05
    optimizer: str = "adamw8bit"
    cache_latents_to_disk: bool = False
    layers_to_optimize_regex: str | None = None
    gradient_checkpointing: bool = False
    hf_repo_id: str | None = None
    hf_token: str | None = field(default=None, repr=False)
    wandb_api_key: str | None = field(default=None, repr=False)
    wandb_project: str = "flux_train_replicate"
    wandb_run: str | None = None
    wandb_entity: str | None = None
    wandb_sample_interval: int = 100
    wandb_sample_prompts: str | None = None
    wandb_save_interval: int = 100
    skip_training_and_use_pretrained_hf_lora_url: str | None = None
    model: str = DEFAULT_MODEL
    train_text_encoder: bool = True
    seed: int | None = None
    ti_lr: float = TRAIN_EMBEDDING_LEARNING_RATE  # the pivotal tokens' learning rate
    lr_scheduler: str | None = None  # None (and no lr_warmup_steps): the default warm-up, then constant
    lr_warmup_steps: int | None = None  # None: TRAIN_WARMUP_FRACTION of the steps, at most TRAIN_WARMUP_MAX_STEPS

    @property
    def trigger(self) -> str:
        """The trigger word as used: surrounding spaces dropped; "" means no trigger word."""
        return self.trigger_word.strip()

    @property
    def optimizer_name(self) -> str:
        return self.optimizer.strip().lower()

    def sample_prompts(self) -> list[str]:
        """wandb_sample_prompts, one prompt a line, blank lines dropped."""
        return [p.strip() for p in (self.wandb_sample_prompts or "").splitlines() if p.strip()]

    def validate(self) -> None:
        """Refuse what the schema cannot say (or what a caller outside Cog sent), naming the fix."""
        if self.skip_training_and_use_pretrained_hf_lora_url is None and self.input_images is None:
            raise InputError(
                "input_images is required: send a .zip of the training images, or set "
                "skip_training_and_use_pretrained_hf_lora_url to package an existing LoRA"
            )
        if "\n" in self.trigger or len(self.trigger) > TRAIN_TRIGGER_MAX_CHARS:
            raise InputError(
                f"trigger_word must be one line of at most {TRAIN_TRIGGER_MAX_CHARS} characters, such as TOK "
                "(or empty for no trigger word)"
            )
        if _PIVOT_TOKEN.search(self.trigger):
            raise InputError(
                f"trigger_word {self.trigger!r} holds <s0>-style tokens, which pivotal tuning writes itself: "
                "use a plain word such as TOK"
            )
        if not 1 <= self.steps <= TRAIN_MAX_STEPS:
            raise InputError(f"steps must be between 1 and {TRAIN_MAX_STEPS}, got {self.steps}")
        if not 1 <= self.lora_rank <= TRAIN_MAX_RANK:
            raise InputError(f"lora_rank must be between 1 and {TRAIN_MAX_RANK}, got {self.lora_rank}")
        if not 0 < self.learning_rate <= TRAIN_MAX_LEARNING_RATE:
            raise InputError(f"learning_rate must be above 0 and at most {TRAIN_MAX_LEARNING_RATE:g}")
        if not 0 < self.ti_lr <= TRAIN_MAX_LEARNING_RATE:
            raise InputError(f"ti_lr must be above 0 and at most {TRAIN_MAX_LEARNING_RATE:g}, got {self.ti_lr:g}")
        if self.lr_scheduler is not None and self.lr_scheduler not in TRAIN_LR_SCHEDULERS:
            raise InputError(
                f"lr_scheduler {self.lr_scheduler!r} is not known: use one of {', '.join(TRAIN_LR_SCHEDULERS)}"
            )
        if self.lr_warmup_steps is not None and not 0 <= self.lr_warmup_steps <= TRAIN_MAX_STEPS:
            raise InputError(f"lr_warmup_steps must be between 0 and {TRAIN_MAX_STEPS}, got {self.lr_warmup_steps}")
        if not 1 <= self.batch_size <= TRAIN_MAX_BATCH_SIZE:
            raise InputError(f"batch_size must be between 1 and {TRAIN_MAX_BATCH_SIZE}, got {self.batch_size}")
        if not 0 <= self.caption_dropout_rate <= 1:
            raise InputError(f"caption_dropout_rate must be between 0 and 1, got {self.caption_dropout_rate}")
        if self.optimizer_name not in OPTIMIZERS:
            raise InputError(f"optimizer {self.optimizer!r} is not known: use one of {', '.join(OPTIMIZERS)}")
        if self.layers_to_optimize_regex:
            try:
                re.compile(self.layers_to_optimize_regex)
            except re.error as exc:
                raise InputError(
                    f"layers_to_optimize_regex {self.layers_to_optimize_regex!r} is not a valid regular "
                    f"expression: {exc}"
                ) from None
        if self.hf_repo_id is not None and not _REPO_ID.match(self.hf_repo_id):
            raise InputError(
                f"hf_repo_id {self.hf_repo_id!r} is not a Hugging Face repository id: write owner/name, "
                "e.g. alice/my-sdxl-lora"
            )
        if self.hf_repo_id and not self.hf_token:
            raise InputError(
                "hf_repo_id is set but hf_token is not: pass a Hugging Face token with write access "
                "(huggingface.co/settings/tokens) to upload, or leave hf_repo_id out"
            )
        if self.wandb_api_key and (self.wandb_sample_interval < 1 or self.wandb_save_interval < 1):
            raise InputError("wandb_sample_interval and wandb_save_interval must be at least 1")
        self.resolutions()

    def resolutions(self) -> list[int]:
        """The comma-separated training resolutions (each the side of a square of the same area)."""
        values = []
        for part in self.resolution.split(","):
            part = part.strip()
            if not part.isdigit() or not TRAIN_RESOLUTION_MIN <= int(part) <= TRAIN_RESOLUTION_MAX:
                raise InputError(
                    f"resolution must be comma-separated sizes between {TRAIN_RESOLUTION_MIN} and "
                    f"{TRAIN_RESOLUTION_MAX}, such as '768,1024'; got {self.resolution!r}"
                )
            values.append(int(part))
        return sorted(set(values))

    def record(self) -> dict[str, Any]:
        """The inputs as written into the trained tar: no server path, no secret (only whether one was set)."""
        values = {k: v for k, v in asdict(self).items() if k != "input_images"}
        for name in SECRET_FIELDS:
            values[name] = "(set)" if values[name] else None
        return values


def buckets(resolution: int) -> list[tuple[int, int]]:
    """Sizes of about resolution^2 pixels, sides a multiple of 64, from 1:2 to 2:1 (reference scale)."""
    step = TRAIN_BUCKET_MULTIPLE
    sizes = set()
    for width in range(step, 2 * resolution + 1, step):
        height = round(resolution * resolution / width / step) * step
        if height and 1 / TRAIN_BUCKET_MAX_ASPECT <= width / height <= TRAIN_BUCKET_MAX_ASPECT:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], choices: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose proportions are closest to the image's: it is then cropped, never squashed."""
    aspect = math.log(size[0] / size[1])
    return min(choices, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))
