"""The Stable Diffusion safety checker, run on each output so flagged images can be dropped one by one."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPImageProcessorPil

log = logging.getLogger(__name__)


class SafetyChecker:
    """The baked checker and its feature extractor on the generation device."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        # Straight onto the device: no CPU copy first (cold start reads each byte once).
        self.model = StableDiffusionSafetyChecker.from_pretrained(folder, dtype=dtype, device_map=str(device)).eval()
        # The PIL backend: the default one needs torchvision, which the image does not install.
        self.processor = CLIPImageProcessorPil.from_pretrained(folder)
        self.device = device
        self.dtype = dtype

    @torch.no_grad()
    def flags(self, images: list[Image.Image]) -> list[bool]:
        """True for each image the checker flags as NSFW."""
        pixels = self.processor(images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in images]
        _, flagged = self.model(clip_input=pixels, images=arrays)
        return [bool(f) for f in flagged]
