"""Autocaption: the baked BLIP model writes a caption for each image that has no .txt file.

Loaded only by training, for the captioning pass, then released before the base model loads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

from engine.devices import default_dtype
from engine.errors import WeightsMissingError
from training.config import CAPTIONER_DIR, TRAIN_CAPTION_MAX_TOKENS

log = logging.getLogger(__name__)


def autocaption(weights: Path, images: list[Image.Image], device: torch.device) -> list[str]:
    """One caption per image, from the captioner baked under weights/captioner."""
    folder = weights / CAPTIONER_DIR
    if not folder.is_dir():
        raise WeightsMissingError(
            f"the captioning model is missing in {weights} ({CAPTIONER_DIR}): bake it (see README, 'Weights'), "
            "or set autocaption to false, or add .txt captions"
        )
    start = time.perf_counter()
    dtype = default_dtype(device)
    processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device)
    model.eval()
    captions = []
    with torch.no_grad():
        for image in images:
            inputs = processor(images=image, return_tensors="pt").to(device, dtype)
            ids = model.generate(**inputs, max_new_tokens=TRAIN_CAPTION_MAX_TOKENS)
            captions.append(processor.decode(ids[0], skip_special_tokens=True).strip())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.info("autocaption: %d caption(s) in %.1fs", len(captions), time.perf_counter() - start)
    return captions
