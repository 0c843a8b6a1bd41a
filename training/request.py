"""One training job as the trainer needs it, checked before anything is read or loaded."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.config import (
    DEFAULT_MODEL,
    TRAIN_BUCKET_MAX_ASPECT,
    TRAIN_BUCKET_MULTIPLE,
    TRAIN_DEFAULT_LEARNING_RATE,
    TRAIN_DEFAULT_RANK,
    TRAIN_DEFAULT_RESOLUTION,
    TRAIN_DEFAULT_STEPS,
    TRAIN_MAX_BATCH_SIZE,
    TRAIN_MAX_LEARNING_RATE,
    TRAIN_MAX_RANK,
    TRAIN_MAX_STEPS,
    TRAIN_RESOLUTION_MAX,
    TRAIN_RESOLUTION_MIN,
)
from engine.errors import InputError

# A trigger word is one word the prompt rewriter can find again (engine/loras.py): letters,
# digits, `_` and `-`, no spaces or brackets.
_TRIGGER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class TrainingRequest:
    """Everything one training needs, independent of how it arrived (Cog, a test, a script)."""

    input_images: Path
    trigger_word: str = "TOK"
    autocaption: bool = True
    autocaption_prefix: str = ""
    autocaption_suffix: str = ""
    steps: int = TRAIN_DEFAULT_STEPS
    lora_rank: int = TRAIN_DEFAULT_RANK
    learning_rate: float = TRAIN_DEFAULT_LEARNING_RATE
    batch_size: int = 1
    resolution: str = TRAIN_DEFAULT_RESOLUTION
    caption_dropout_rate: float = 0.05
    model: str = DEFAULT_MODEL
    train_text_encoder: bool = True
    seed: int | None = None

    def validate(self) -> None:
        """Refuse what the schema cannot say (or what a caller outside Cog sent), naming the fix."""
        if not self.trigger_word.strip():
            raise InputError("trigger_word is empty: pass a short rare word such as TOK")
        if not _TRIGGER.match(self.trigger_word):
            raise InputError(
                f"trigger_word {self.trigger_word!r} must be one word of letters, digits, '_' or '-' "
                "(at most 32 characters, no spaces or brackets), such as TOK"
            )
        if not 1 <= self.steps <= TRAIN_MAX_STEPS:
            raise InputError(f"steps must be between 1 and {TRAIN_MAX_STEPS}, got {self.steps}")
        if not 1 <= self.lora_rank <= TRAIN_MAX_RANK:
            raise InputError(f"lora_rank must be between 1 and {TRAIN_MAX_RANK}, got {self.lora_rank}")
        if not 0 < self.learning_rate <= TRAIN_MAX_LEARNING_RATE:
            raise InputError(f"learning_rate must be above 0 and at most {TRAIN_MAX_LEARNING_RATE:g}")
        if not 1 <= self.batch_size <= TRAIN_MAX_BATCH_SIZE:
            raise InputError(f"batch_size must be between 1 and {TRAIN_MAX_BATCH_SIZE}, got {self.batch_size}")
        if not 0 <= self.caption_dropout_rate <= 1:
            raise InputError(f"caption_dropout_rate must be between 0 and 1, got {self.caption_dropout_rate}")
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
        """The inputs as written into the trained tar (no server path)."""
        return {k: v for k, v in asdict(self).items() if k != "input_images"}


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
