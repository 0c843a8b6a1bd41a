"""Output sizes: Flux's aspect table, megapixels and custom sizes, scaled to a model's native resolution."""

from __future__ import annotations

import math

from engine.config import (
    ASPECT_RATIOS,
    CUSTOM_ASPECT,
    CUSTOM_SIZE_MAX,
    CUSTOM_SIZE_MIN,
    IMAGE_ASPECT_MAX,
    IMAGE_ASPECT_MIN,
    MEGAPIXELS,
    PIPELINE_SIZE_MULTIPLE,
    REFERENCE_RESOLUTION,
    SIZE_MULTIPLE,
)
from engine.errors import InputError


def _snap(value: float, multiple: int) -> int:
    return max(multiple, int(value / multiple + 0.5) * multiple)  # half rounds up, as users expect


def reference_size(
    aspect_ratio: str,
    megapixels: str,
    width: int | None = None,
    height: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The size at SDXL's 1024 px scale, rounded to 16 as Flux does.

    An input image sets the proportions (Flux ignores aspect_ratio then), within bounds; "custom"
    takes width and height as given; otherwise the aspect table, scaled by megapixels.
    """
    if megapixels not in MEGAPIXELS:
        raise InputError(f"megapixels must be one of {', '.join(MEGAPIXELS)}, got {megapixels!r}")
    area = MEGAPIXELS[megapixels] * REFERENCE_RESOLUTION**2
    if image_size is not None:
        return _size_from_image(image_size, area)
    if aspect_ratio == CUSTOM_ASPECT:
        if width is None or height is None:
            raise InputError('aspect_ratio "custom" needs both width and height')
        for name, value in (("width", width), ("height", height)):
            if not CUSTOM_SIZE_MIN <= value <= CUSTOM_SIZE_MAX:
                raise InputError(f"{name} must be between {CUSTOM_SIZE_MIN} and {CUSTOM_SIZE_MAX}, got {value}")
        return _snap(width, SIZE_MULTIPLE), _snap(height, SIZE_MULTIPLE)
    if aspect_ratio not in ASPECT_RATIOS:
        choices = ", ".join([*ASPECT_RATIOS, CUSTOM_ASPECT])
        raise InputError(f"aspect_ratio must be one of {choices}, got {aspect_ratio!r}")
    w, h = ASPECT_RATIOS[aspect_ratio]
    factor = math.sqrt(MEGAPIXELS[megapixels])
    return _snap(w * factor, SIZE_MULTIPLE), _snap(h * factor, SIZE_MULTIPLE)


def _size_from_image(image_size: tuple[int, int], area: float) -> tuple[int, int]:
    """The image's proportions at the requested area, bounded as Flux bounds them.

    The ratio is clamped to the aspect table's range, then the size is scaled so both sides lie
    within the custom-size bounds: the cost of a request never depends on an image's shape.
    """
    iw, ih = image_size
    ratio = min(max(iw / ih, IMAGE_ASPECT_MIN), IMAGE_ASPECT_MAX)
    w = math.sqrt(area * ratio)
    h = w / ratio
    fit = min(1.0, CUSTOM_SIZE_MAX / max(w, h))
    fit = max(fit, CUSTOM_SIZE_MIN / min(w, h))  # the clamped ratio leaves room for both bounds
    return _snap(w * fit, SIZE_MULTIPLE), _snap(h * fit, SIZE_MULTIPLE)


def scale_to_model(size: tuple[int, int], native_resolution: int) -> tuple[int, int]:
    """Scale a reference size to a model whose native resolution is not 1024 (the tiny model: 128)."""
    scale = native_resolution / REFERENCE_RESOLUTION
    return tuple(_snap(v * scale, PIPELINE_SIZE_MULTIPLE) for v in size)  # type: ignore[return-value]
