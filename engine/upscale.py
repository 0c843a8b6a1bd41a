"""The built-in upscaler: Swin2SR x4 (transformers) on each kept output, in overlapping tiles.

Tiles bound the model's memory whatever the image size: each runs alone on the device and only its
result comes back, to be blended on the CPU with a linear ramp across every overlap, so no seam
shows. Tiles start on the window grid the whole image would use (Swin's attention windows), so a
tile sees the same windows as the untiled run and differs from it only near its inner edges, where
the ramp gives it little weight. An image that fits one tile is the untiled result, exactly.

spandrel (the usual loader of Real-ESRGAN-class models) is not used: see docs/guidance-and-conditioning.md, "Upscale".
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Swin2SRForImageSuperResolution

from engine.config import (
    UPSCALE_FACTORS,
    UPSCALE_MAX_PIXELS,
    UPSCALE_TILE,
    UPSCALE_TILE_OVERLAP,
    UPSCALER_DIR,
    UPSCALER_NAME,
)
from engine.errors import InputError
from engine.logs import flush_logs

log = logging.getLogger(__name__)


def tile_spans(length: int, tile: int, overlap: int, grid: int) -> list[tuple[int, int]]:
    """(start, end) of the tiles covering one side: as few as fit `tile`, evenly spread, each start
    on the `grid`, neighbours overlapping by more than `overlap`. The last tile ends at the image's
    edge and may be up to grid - 1 longer than the others (`tile` must be a multiple of `grid`)."""
    if length <= tile:
        return [(0, length)]
    slack = overlap + grid  # snapping starts down to the grid costs up to grid - 1 of the overlap
    count = math.ceil((length - slack) / (tile - slack))
    size = min(tile, math.ceil(math.ceil((length + (count - 1) * slack) / count) / grid) * grid)
    starts = [i * (length - size) // (count - 1) // grid * grid for i in range(count)]
    return [(start, start + size) for start in starts[:-1]] + [(starts[-1], length)]


def _feather(spans: list[tuple[int, int]], index: int, scale: int) -> torch.Tensor:
    """One tile's blending weights along one side of the upscaled image: 1 inside, rising across
    the overlap with the previous tile and falling across the one with the next, so that two
    neighbours' weights sum to 1 there."""
    start, end = spans[index]
    weights = torch.ones((end - start) * scale)
    if index > 0:
        n = (spans[index - 1][1] - start) * scale
        weights[:n] *= (torch.arange(n) + 0.5) / n
    if index < len(spans) - 1:
        n = (end - spans[index + 1][0]) * scale
        weights[-n:] *= (n - 0.5 - torch.arange(n)) / n
    return weights


def check_upscale(upscaler: Upscaler | None, upscale: str, size: tuple[int, int]) -> None:
    """Refuse, before any work, an upscale this image cannot do: the upscaler was not baked, or the
    result would pass UPSCALE_MAX_PIXELS (`size` is Flux's size for the request); name what fits."""
    factor = UPSCALE_FACTORS[upscale]
    if factor == 1:
        return
    if upscaler is None:
        raise InputError(
            f"this image was built without the upscaler (weights/{UPSCALER_DIR} was not baked): "
            "set upscale to none, or bake it with scripts/bake.py (see README, 'Weights')"
        )
    width, height = size
    if width * height * factor**2 <= UPSCALE_MAX_PIXELS:
        return
    fits = [
        name for name, f in UPSCALE_FACTORS.items() if 1 < f < factor and width * height * f**2 <= UPSCALE_MAX_PIXELS
    ]
    raise InputError(
        f"upscale {upscale} of a {width}x{height} image would make {width * factor}x{height * factor} "
        f"({width * height * factor**2 / 1e6:.1f} megapixels), over the limit of {UPSCALE_MAX_PIXELS / 1e6:.1f}: "
        f"use upscale {fits[-1] if fits else 'none'} for this size, or a smaller size (megapixels, width, height)"
    )


class Upscaler:
    """The baked Swin2SR model on the engine's device (fp16 on CUDA, fp32 on CPU), loaded once."""

    def __init__(
        self,
        folder: Path,
        device: torch.device,
        dtype: torch.dtype,
        tile: int = UPSCALE_TILE,
        overlap: int = UPSCALE_TILE_OVERLAP,
    ) -> None:
        start = time.perf_counter()
        self.model = Swin2SRForImageSuperResolution.from_pretrained(
            folder, dtype=dtype, device_map=str(device), local_files_only=True, use_safetensors=True
        ).eval()  # straight onto the device, as the other models: no CPU copy first
        self.device = device
        self.dtype = dtype
        self.scale: int = self.model.config.upscale
        self.grid: int = self.model.config.window_size
        self.tile = max(self.grid, tile // self.grid * self.grid)
        self.overlap = overlap
        log.info("loaded the upscaler (%s) from %s in %.2fs", UPSCALER_NAME, folder, time.perf_counter() - start)

    @classmethod
    def load_if_baked(cls, root: Path, device: torch.device, dtype: torch.dtype) -> Upscaler | None:
        """The upscaler is optional: an image baked without it serves every request that does not ask for it."""
        folder = root / UPSCALER_DIR
        if not folder.is_dir():
            log.info("upscaler not baked (%s is missing): requests with upscale will be refused", folder)
            return None
        return cls(folder, device, dtype)

    def upscale_all(self, images: list[Image.Image], factor: int) -> list[Image.Image]:
        """Each image `factor` times larger, saying so before each image and after each of its tiles.

        A long upscale must not go silent: coglet sends a prediction's new log lines with its next
        update once its throttle interval has passed, so the lines written just before a silent
        upscale (the "generated" line) reached the user only when it ended. Lines written so far
        are flushed first, then each progress line is an update."""
        flush_logs()
        results = []
        for i, image in enumerate(images, 1):
            tiles = self.tile_count(image)
            log.info(
                "upscaling image %d of %d: %dx%d -> %dx%d (%d tile%s)",
                i,
                len(images),
                image.width,
                image.height,
                image.width * factor,
                image.height * factor,
                tiles,
                "" if tiles == 1 else "s",
            )
            results.append(self.upscale(image, factor, f"image {i} of {len(images)}"))
        return results

    def tile_count(self, image: Image.Image) -> int:
        spans = (tile_spans(side, self.tile, self.overlap, self.grid) for side in (image.height, image.width))
        return math.prod(len(s) for s in spans)

    def upscale(self, image: Image.Image, factor: int, label: str = "image") -> Image.Image:
        """The image `factor` times larger: the model's own scale, or its result reduced with Lanczos.
        With several tiles, a line after each names `label` (which image of a request)."""
        if factor < 2 or self.scale % factor:
            raise ValueError(f"the x{self.scale} upscaler cannot make {factor}x")
        result = self._run(image, label)
        if factor == self.scale:
            return result
        return result.resize((image.width * factor, image.height * factor), Image.Resampling.LANCZOS)

    @torch.inference_mode()
    def _run(self, image: Image.Image, label: str) -> Image.Image:
        """The model's x`scale` result, tile by tile; accumulated on the CPU so device memory holds one tile."""
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        _, height, width = pixels.shape
        s = self.scale
        rows = tile_spans(height, self.tile, self.overlap, self.grid)
        cols = tile_spans(width, self.tile, self.overlap, self.grid)
        total = torch.zeros(3, height * s, width * s)
        weight = torch.zeros(1, height * s, width * s)
        start, count = time.perf_counter(), len(rows) * len(cols)
        for i, (top, bottom) in enumerate(rows):
            for j, (left, right) in enumerate(cols):
                tile = pixels[None, :, top:bottom, left:right].to(self.device).float().div(255).to(self.dtype)
                out = self.model(pixel_values=tile).reconstruction[0].float().clamp(0, 1).cpu()
                w = _feather(rows, i, s)[:, None] * _feather(cols, j, s)[None, :]
                total[:, top * s : bottom * s, left * s : right * s] += out * w
                weight[:, top * s : bottom * s, left * s : right * s] += w
                if count > 1:
                    done = i * len(cols) + j + 1
                    log.info("upscaled tile %d of %d of %s (%.2fs)", done, count, label, time.perf_counter() - start)
        rgb = total.div_(weight).mul_(255).round_().to(torch.uint8)
        return Image.fromarray(rgb.permute(1, 2, 0).numpy())
