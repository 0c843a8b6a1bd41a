"""Image files at the predictor's edge: reading input images, and writing outputs with their
generation parameters embedded (and reading them back). Nothing else belongs here.

PNG carries A1111's `parameters` text chunk; JPEG and WebP carry the same text in EXIF
UserComment, where A1111, ComfyUI loaders and CivitAI look for it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from engine.errors import InputError

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\x00"
PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def load_image(path: Path, input_name: str) -> Image.Image:
    """Open an input image fully, or say which input could not be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{input_name} could not be read as an image ({Path(path).name}): {exc}") from exc


def save_image(image: Image.Image, parameters: str, output_format: str, quality: int, path: Path) -> Path:
    """Encode the image with its parameters embedded; quality is ignored for PNG."""
    pil_format = PIL_FORMATS[output_format]
    if pil_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        image.save(path, pil_format, pnginfo=info)
        return path
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_PREFIX + parameters.encode("utf-16-be")
    image.convert("RGB").save(path, pil_format, quality=quality, exif=exif.tobytes())
    return path


def read_parameters(path: Path) -> str | None:
    """The embedded generation parameters of a file written by save_image, if any."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(UNICODE_PREFIX):
        return comment[len(UNICODE_PREFIX) :].decode("utf-16-be")
    return comment
