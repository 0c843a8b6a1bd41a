"""Cog adapter for `cog train`: the Flux LoRA trainer's inputs, then SDXL's, into training/.

The output is trained_model.tar in the layout `lora_weights` reads (Replicate's SDXL trainer
layout), so a Flux user's round trip works unchanged: train, then pass the tar's URL to predict.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import Optional

from cog import BaseModel, Input, Path

from engine.config import (
    weights_root,
)
from training.request import TrainingRequest
from training.trainer import train as run_training

# One folder for the tar: Cog has sent the previous training's file when the next one starts, so
# it is cleared each time and disk use stays flat on a long-running server.
OUTPUT_DIR = Path(tempfile.gettempdir()) / "cog-training-output"


class TrainingOutput(BaseModel):
    weights: Path


def train(
    input_images: Path = Input(
        description="A .zip or .tar of at least 4 .jpg, .jpeg, .png or .webp images (10-20 work well). A .txt file with an image's name is its caption"
    ),
    trigger_word: str = Input(
        default="TOK", description="A rare word that stands for the subject or style; write it in your prompts"
    ),
    autocaption: bool = Input(
        default=True, description="Caption images that have no .txt file with the baked captioning model"
    ),
    autocaption_prefix: Optional[str] = Input(
        default=None, description="Text put before every automatic caption, e.g. 'a photo of TOK,'"
    ),
    autocaption_suffix: Optional[str] = Input(
        default=None, description="Text put after every automatic caption, e.g. 'in the style of TOK'"
    ),
    steps: int = Input(default=1000, ge=1, le=6000, description="Training steps"),
    lora_rank: int = Input(default=16, ge=1, le=128, description="LoRA rank: higher holds more detail"),
    learning_rate: float = Input(
        default=1e-4,
        ge=0,
        le=1e-2,
        description="LoRA learning rate (SDXL LoRAs usually train at 1e-4)",
    ),
    batch_size: int = Input(default=1, ge=1, le=8, description="Images per step"),
    resolution: str = Input(
        default="1024",
        description="Comma-separated training resolutions, e.g. '768,1024'. Images keep their proportions (bucketed, never squashed)",
    ),
    caption_dropout_rate: float = Input(
        default=0.05, ge=0, le=1, description="Share of steps trained with an empty caption"
    ),
    model: str = Input(
        default="illustrious-xl",
        choices=["illustrious-xl", "sdxl", "custom"],
        description="Base model to train on; use the same one when predicting",
    ),
    train_text_encoder: bool = Input(
        default=True,
        description="Pivotal tuning: the trigger word becomes new tokens learned in both text encoders",
    ),
    seed: Optional[int] = Input(default=None, description="Random seed; unset or negative means random"),
) -> TrainingOutput:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    request = TrainingRequest(
        input_images=input_images,
        trigger_word=trigger_word,
        autocaption=autocaption,
        autocaption_prefix=autocaption_prefix or "",
        autocaption_suffix=autocaption_suffix or "",
        steps=steps,
        lora_rank=lora_rank,
        learning_rate=learning_rate,
        batch_size=batch_size,
        resolution=resolution,
        caption_dropout_rate=caption_dropout_rate,
        model=model,
        train_text_encoder=train_text_encoder,
        seed=seed,
    )
    shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
    result = run_training(request, weights_root(), OUTPUT_DIR)
    return TrainingOutput(weights=Path(result.tar))
