"""Sizes: Flux's exact table at SDXL's native 1024 px, and how it scales."""

import pytest

from engine.config import ASPECT_RATIOS, CUSTOM_SIZE_MAX, CUSTOM_SIZE_MIN, IMAGE_ASPECT_MAX, IMAGE_ASPECT_MIN
from engine.errors import InputError
from engine.sizes import reference_size, scale_to_model

FLUX_TABLE = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}


@pytest.mark.parametrize("ratio", sorted(FLUX_TABLE))
def test_flux_table_exact_at_native_1024(ratio: str) -> None:
    assert scale_to_model(reference_size(ratio, "1"), 1024) == FLUX_TABLE[ratio]


def test_table_has_exactly_flux_ratios() -> None:
    assert set(ASPECT_RATIOS) == set(FLUX_TABLE)


@pytest.mark.parametrize("ratio", sorted(FLUX_TABLE))
def test_quarter_megapixel_halves_each_side(ratio: str) -> None:
    w, h = FLUX_TABLE[ratio]
    assert reference_size(ratio, "0.25") == (w // 2, h // 2)


def test_half_megapixel_is_about_half_the_area() -> None:
    w, h = reference_size("1:1", "0.5")
    assert w == h and w % 16 == 0
    assert abs(w * h / 1024**2 - 0.5) < 0.02


def test_tiny_model_scale_keeps_proportions_and_multiples_of_8() -> None:
    for ratio, (w, h) in FLUX_TABLE.items():
        tw, th = scale_to_model(reference_size(ratio, "1"), 128)
        assert (tw, th) == (w // 8, h // 8), ratio
        assert tw % 8 == 0 and th % 8 == 0


def test_custom_size_rounds_to_16() -> None:
    assert reference_size("custom", "1", width=1000, height=500) == (1008, 496)


def test_custom_needs_width_and_height() -> None:
    with pytest.raises(InputError, match="width and height"):
        reference_size("custom", "1", width=512)


def test_custom_out_of_range() -> None:
    with pytest.raises(InputError, match="between 256 and 1440"):
        reference_size("custom", "1", width=2000, height=512)


def test_image_sets_proportions_at_requested_megapixels() -> None:
    w, h = reference_size("1:1", "1", image_size=(600, 300))
    assert abs(w / h - 2) < 0.05
    assert abs(w * h / 1024**2 - 1) < 0.05


def test_unknown_megapixels() -> None:
    with pytest.raises(InputError, match="megapixels"):
        reference_size("1:1", "3")


@pytest.mark.parametrize("image_size", [(4000, 1), (1, 4000), (10**6, 3), (3000, 1000), (1000, 3000)])
@pytest.mark.parametrize("megapixels", ["1", "0.5", "0.25"])
def test_image_proportions_are_bounded(image_size: tuple[int, int], megapixels: str) -> None:
    w, h = reference_size("1:1", megapixels, image_size=image_size)
    assert CUSTOM_SIZE_MIN <= w <= CUSTOM_SIZE_MAX and CUSTOM_SIZE_MIN <= h <= CUSTOM_SIZE_MAX
    assert IMAGE_ASPECT_MIN - 0.05 <= w / h <= IMAGE_ASPECT_MAX + 0.05


def test_extreme_image_takes_the_widest_table_ratio_within_bounds() -> None:
    assert IMAGE_ASPECT_MAX == 1536 / 640  # 21:9, the widest entry of Flux's table
    assert reference_size("1:1", "1", image_size=(4000, 1)) == (1440, 608)
    assert reference_size("1:1", "1", image_size=(1, 4000)) == (608, 1440)
