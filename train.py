"""Cog adapter for `cog train`: the Flux LoRA trainer's inputs, then SDXL's, then the names of
Replicate's SDXL trainer (cog-sdxl) that Flux's lack, into training/.

The output is trained_model.tar in the layout `lora_weights` reads (Replicate's SDXL trainer
layout), so a Flux user's round trip works unchanged: train, then pass the tar's URL to predict.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import Optional

from cog import BaseModel, Input, Path, Secret

from engine.config import weights_root
from engine.server_files import server_file
from training import cog_sdxl
from training.cog_sdxl import CogSdxlInputs
from training.request import TrainingRequest
from training.trainer import train as run_training

# One folder for the tar: Cog has sent the previous training's file when the next one starts, so
# it is cleared each time and disk use stays flat on a long-running server.
OUTPUT_DIR = Path(tempfile.gettempdir()) / "cog-training-output"


class TrainingOutput(BaseModel):
    weights: Path
    hf_repo_url: Optional[str] = None  # set when the upload to hf_repo_id succeeded
    hf_upload_error: Optional[str] = None  # why the upload failed; the tar is returned all the same


def _archive(value: Optional[Path | str]) -> Optional[Path]:
    """input_images, read only when the caller sent it: coglet passes a URL or data: URI as a cog
    Path to its own temporary file, any other string as sent, i.e. a path on this server, which
    `engine/server_files.py` refuses before it is opened (the rule predict.py's image inputs follow)."""
    if value is None or isinstance(value, Path):
        return value
    return Path(server_file(str(value), "input_images", "the archive as an https URL or a data: URI"))


def _secret(value: Optional[Secret]) -> Optional[str]:
    return value.get_secret_value() if value is not None else None


def train(
    input_images: Optional[Path] = Input(
        default=None,
        description="A .zip or .tar of at least 4 .jpg, .jpeg, .png or .webp images (10-20 work well). A .txt file with an image's name is its caption. Required unless skip_training_and_use_pretrained_hf_lora_url is set",
    ),
    trigger_word: str = Input(
        default="TOK",
        description="The word or phrase that stands for the subject or style (e.g. TOK, CYBRPNK); write it in your prompts. Matched in captions in any letter case; [trigger] in a caption is replaced by it. Empty: no trigger word",
    ),
    autocaption: bool = Input(
        default=True,
        description="Caption images that have no .txt file: Danbooru tags (WD tagger) for illustrious-xl, a sentence (BLIP) for sdxl",
    ),
    autocaption_prefix: Optional[str] = Input(
        default=None, description="Text put before every automatic caption, e.g. 'a photo of TOK,'"
    ),
    autocaption_suffix: Optional[str] = Input(
        default=None, description="Text put after every automatic caption, e.g. 'in the style of TOK'"
    ),
    steps: int = Input(default=1000, ge=1, le=6000, description="Training steps"),
    learning_rate: float = Input(
        default=1e-4,
        ge=0,
        le=1,
        description="LoRA learning rate (SDXL LoRAs usually train at 1e-4; Flux's 4e-4 is tuned for Flux). prodigy sets its own step size and ignores it, so a prodigy form's 1 is accepted",
    ),
    batch_size: int = Input(default=1, ge=1, le=8, description="Images per step"),
    resolution: str = Input(
        default="512,768,1024",
        description="Comma-separated training resolutions, e.g. '768,1024': every image trains at each. Images keep their proportions (bucketed, never squashed)",
    ),
    lora_rank: int = Input(default=16, ge=1, le=128, description="LoRA rank: higher holds more detail"),
    caption_dropout_rate: float = Input(
        default=0.05, ge=0, le=1, description="Share of steps trained with an empty caption"
    ),
    optimizer: str = Input(
        default="adamw8bit",
        description="Optimizer: prodigy, adam8bit, adamw8bit, lion8bit, adam, adamw, lion, adagrad, adafactor. 8-bit ones run on CUDA GPUs; elsewhere the 32-bit one of the same name runs (logged)",
    ),
    cache_latents_to_disk: bool = Input(
        default=False, description="Keep the encoded images on disk instead of in memory (for many images)"
    ),
    layers_to_optimize_regex: Optional[str] = Input(
        default=None,
        description=r"Regular expression over this SDXL UNet's attention layer names (e.g. 'attn2\.to_(k|v)$'); the LoRA trains only the layers it matches. Unset: every attention projection",
    ),
    gradient_checkpointing: bool = Input(
        default=False,
        description="Save GPU memory at the cost of speed; turned on by itself on GPUs with under 40 GB",
    ),
    hf_repo_id: Optional[str] = Input(
        default=None,
        description="Hugging Face repository to upload the result to, e.g. alice/my-lora (created public if missing). Needs hf_token",
    ),
    hf_token: Optional[Secret] = Input(
        default=None,
        description="Hugging Face token with write access, for hf_repo_id (also read access for a private skip_training_and_use_pretrained_hf_lora_url)",
    ),
    wandb_api_key: Optional[Secret] = Input(
        default=None, description="Weights & Biases API key: log loss, sample images and weights to W&B"
    ),
    wandb_project: str = Input(
        default="flux_train_replicate", description="Weights & Biases project (only with wandb_api_key)"
    ),
    wandb_run: Optional[str] = Input(default=None, description="Weights & Biases run name (only with wandb_api_key)"),
    wandb_entity: Optional[str] = Input(default=None, description="Weights & Biases entity (only with wandb_api_key)"),
    wandb_sample_interval: int = Input(
        default=100, ge=1, description="Steps between sample images logged to W&B (only with wandb_api_key)"
    ),
    wandb_sample_prompts: Optional[str] = Input(
        default=None, description="Prompts for the W&B sample images, one per line (only with wandb_api_key)"
    ),
    wandb_save_interval: int = Input(
        default=100, ge=1, description="Steps between LoRA files saved to W&B (only with wandb_api_key)"
    ),
    skip_training_and_use_pretrained_hf_lora_url: Optional[str] = Input(
        default=None,
        description="Skip training: package this SDXL LoRA from Hugging Face as the output, e.g. https://huggingface.co/owner/repo/resolve/main/lora.safetensors",
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
    # Replicate's SDXL trainer's names (replicate/cog-sdxl): training/cog_sdxl.py, docs/training.md.
    train_batch_size: Optional[int] = Input(
        default=None, ge=1, le=8, description="Replicate's SDXL trainer's name for batch_size"
    ),
    num_train_epochs: Optional[int] = Input(
        default=None,
        description="Replicate's SDXL trainer's epoch count: not used (steps sets the length, as max_train_steps did there); logged",
    ),
    max_train_steps: Optional[int] = Input(
        default=None, ge=1, le=6000, description="Replicate's SDXL trainer's name for steps"
    ),
    is_lora: Optional[bool] = Input(
        default=None,
        description="Replicate's SDXL trainer's switch: true (a LoRA) is what this trainer does; false (full fine-tuning) is refused",
    ),
    unet_learning_rate: Optional[float] = Input(
        default=None,
        ge=0,
        le=1,
        description="Replicate's SDXL trainer's rate for full fine-tuning: not used with a LoRA (nor was it there); logged",
    ),
    ti_lr: Optional[float] = Input(
        default=None,
        ge=0,
        le=1,
        description="Learning rate of the trigger's pivotal-tuning tokens (default 0.0003), as in Replicate's SDXL trainer",
    ),
    lora_lr: Optional[float] = Input(
        default=None, ge=0, le=1, description="Replicate's SDXL trainer's name for learning_rate"
    ),
    lr_scheduler: Optional[str] = Input(
        default=None,
        choices=["constant", "linear"],
        description="Learning-rate schedule after the warm-up: constant, or linear down to 0 at the last step. Unset: constant after a warm-up of 10% of the steps (at most 100)",
    ),
    lr_warmup_steps: Optional[int] = Input(
        default=None,
        ge=0,
        le=6000,
        description="Steps over which the learning rate rises linearly from 0 (kept with lr_scheduler constant)",
    ),
    token_string: Optional[str] = Input(default=None, description="Replicate's SDXL trainer's name for trigger_word"),
    caption_prefix: Optional[str] = Input(
        default=None, description="Replicate's SDXL trainer's name for autocaption_prefix"
    ),
    mask_target_prompts: Optional[str] = Input(
        default=None,
        description="Replicate's SDXL trainer's CLIPSeg loss masks: not made here, so a prompt is refused",
    ),
    crop_based_on_salience: Optional[bool] = Input(
        default=None,
        description="Replicate's SDXL trainer's square crop: images are centre-cropped in buckets of their own proportions here; logged",
    ),
    use_face_detection_instead: Optional[bool] = Input(
        default=None,
        description="Replicate's SDXL trainer's face masks: not made here, so true is refused",
    ),
    clipseg_temperature: Optional[float] = Input(
        default=None, description="Replicate's SDXL trainer's CLIPSeg mask blur: not used (no masks); logged"
    ),
    verbose: Optional[bool] = Input(
        default=None, description="Replicate's SDXL trainer's log switch: the log is the same either way; logged"
    ),
    checkpointing_steps: Optional[int] = Input(
        default=None,
        description="Replicate's SDXL trainer's checkpoint interval: no intermediate checkpoints (its never reached the output either); logged",
    ),
    input_images_filetype: Optional[str] = Input(
        default=None,
        choices=["zip", "tar", "infer"],
        description="zip or tar: input_images must be that kind of archive (refused otherwise); infer: read from the file",
    ),
) -> TrainingOutput:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    request = TrainingRequest(
        input_images=_archive(input_images),
        trigger_word=trigger_word,
        autocaption=autocaption,
        autocaption_prefix=autocaption_prefix or "",
        autocaption_suffix=autocaption_suffix or "",
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        resolution=resolution,
        lora_rank=lora_rank,
        caption_dropout_rate=caption_dropout_rate,
        optimizer=optimizer,
        cache_latents_to_disk=cache_latents_to_disk,
        layers_to_optimize_regex=layers_to_optimize_regex or None,
        gradient_checkpointing=gradient_checkpointing,
        hf_repo_id=hf_repo_id or None,
        hf_token=_secret(hf_token),
        wandb_api_key=_secret(wandb_api_key),
        wandb_project=wandb_project,
        wandb_run=wandb_run,
        wandb_entity=wandb_entity,
        wandb_sample_interval=wandb_sample_interval,
        wandb_sample_prompts=wandb_sample_prompts,
        wandb_save_interval=wandb_save_interval,
        skip_training_and_use_pretrained_hf_lora_url=skip_training_and_use_pretrained_hf_lora_url or None,
        model=model,
        train_text_encoder=train_text_encoder,
        seed=seed,
    )
    request = cog_sdxl.apply(
        request,
        CogSdxlInputs(
            train_batch_size=train_batch_size,
            num_train_epochs=num_train_epochs,
            max_train_steps=max_train_steps,
            is_lora=is_lora,
            unet_learning_rate=unet_learning_rate,
            ti_lr=ti_lr,
            lora_lr=lora_lr,
            lr_scheduler=lr_scheduler,
            lr_warmup_steps=lr_warmup_steps,
            token_string=token_string,
            caption_prefix=caption_prefix,
            mask_target_prompts=mask_target_prompts,
            crop_based_on_salience=crop_based_on_salience,
            use_face_detection_instead=use_face_detection_instead,
            clipseg_temperature=clipseg_temperature,
            verbose=verbose,
            checkpointing_steps=checkpointing_steps,
            input_images_filetype=input_images_filetype,
        ),
    )
    shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
    result = run_training(request, weights_root(), OUTPUT_DIR)
    return TrainingOutput(
        weights=Path(result.tar), hf_repo_url=result.hf_repo_url, hf_upload_error=result.hf_upload_error
    )
