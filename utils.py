"""Image files at the predictor's edge: reading input images, writing outputs with their
generation parameters embedded (and reading them back, from an output or from an A1111 / Forge /
CivitAI / ComfyUI image sent as generation_data_image), and the folders outputs are written to.
Nothing else belongs here.

PNG carries A1111's `parameters` text chunk; JPEG and WebP carry the same text in EXIF
UserComment, where A1111, ComfyUI loaders and CivitAI look for it.
"""

from __future__ import annotations

import codecs
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from engine.comfy_graph import read_comfy_prompt
from engine.config import INPUT_IMAGE_MAX_PIXELS, INPUT_IMAGE_MAX_SIDE
from engine.errors import InputError

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\x00"
# EXIF UserComment's 8-byte character codes (Exif 2.3, table 9) and the codec of each; A1111 writes
# UNICODE through piexif, which means UTF-16 big-endian (some other tools write little-endian).
COMMENT_CODES = {UNICODE_PREFIX: "utf-16", b"ASCII\x00\x00\x00": "utf-8", b"JIS\x00\x00\x00\x00\x00": "shift_jis"}
COMFYUI_CHUNKS = ("prompt", "workflow")
PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
# What PIL raises on files that are not images or are damaged (decoders differ in what they raise).
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)


def load_image(path: Path, input_name: str) -> Image.Image:
    """Read an input image at a bounded size, upright, or say what to send instead.

    Large images are reduced while decoding (JPEG draft) or right after it, in place, so a huge
    upload never stays in memory at full size; only its proportions matter for the output.
    Messages never show the server's temporary path.
    """
    with warnings.catch_warnings():
        # PIL's warnings about a damaged file's metadata, or about size (the cap users are told is
        # INPUT_IMAGE_MAX_PIXELS), are not for the user: the image is read, or refused below.
        warnings.simplefilter("ignore")
        return _read_bounded(path, input_name)


def _open_bounded(path: Path, input_name: str) -> Image.Image:
    """The opened (not decoded) input image, refused past INPUT_IMAGE_MAX_PIXELS from its header."""
    too_big = f"at most {INPUT_IMAGE_MAX_PIXELS / 1e6:.0f} megapixels are read: downscale it and send it again"
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{input_name} is too large: {too_big}") from exc
    except _UNREADABLE as exc:
        raise _unreadable(input_name) from exc
    if image.width * image.height > INPUT_IMAGE_MAX_PIXELS:
        image.close()
        raise InputError(f"{input_name} is {image.width}x{image.height}, too large: {too_big}")
    return image


def _read_bounded(path: Path, input_name: str) -> Image.Image:
    with _open_bounded(path, input_name) as image:
        try:
            image.thumbnail((INPUT_IMAGE_MAX_SIDE, INPUT_IMAGE_MAX_SIDE))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # phone photos: proportions as the user sees them
        except _UNREADABLE as exc:
            raise _unreadable(input_name) from exc
    return image


def _unreadable(input_name: str) -> InputError:
    return InputError(
        f"{input_name} could not be read as an image: it is not a PNG, JPEG, WebP or other common image "
        "file, or it is damaged. Send a PNG, JPEG or WebP file"
    )


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
        return _embedded(image)[0]


def read_generation_data(path: Path, input_name: str) -> str:
    """The generation data an input image carries as A1111 / Forge write it (CivitAI's downloads
    and this model's outputs keep it), read under the input-image limits; for a ComfyUI image
    without that text, the A1111-style text of its `prompt` graph (engine/comfy_graph.py); else a
    refusal that says what was looked for."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's warnings about a damaged file's metadata: refused below
        with _open_bounded(path, input_name) as image:
            try:
                text, comfyui = _embedded(image)
            except _UNREADABLE as exc:
                raise _unreadable(input_name) from exc
    if text and text.strip():
        return text
    if comfyui.get("prompt") is not None:
        return read_comfy_prompt(str(comfyui["prompt"]), input_name)
    if comfyui:
        raise InputError(
            f"{input_name} carries a ComfyUI workflow but neither its 'prompt' graph nor an A1111-style "
            "'parameters' text: paste the image's parameters text as generation_data instead"
        )
    raise InputError(
        f"{input_name} carries no generation data: no PNG 'parameters' text, no EXIF UserComment; "
        "paste the text as generation_data instead"
    )


def _embedded(image: Image.Image) -> tuple[str | None, dict[str, object]]:
    """The image's `parameters` text (PNG text chunk, else EXIF UserComment) and its ComfyUI
    chunks (`prompt`, `workflow`), if any."""
    chunks = dict(image.info)
    if "parameters" not in chunks and image.format == "PNG":
        chunks.update(image.text)  # chunks after the pixel data: read with them, within the pixel cap
    comfyui = {key: chunks[key] for key in COMFYUI_CHUNKS if key in chunks}
    if "parameters" in chunks:
        return str(chunks["parameters"]), comfyui
    return _user_comment(image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)), comfyui


def _user_comment(value: object) -> str | None:
    """EXIF UserComment as text: an 8-byte character code, then the text (A1111's `parse` of it
    falls back to UTF-8 for a code it does not know)."""
    if isinstance(value, str):  # a comment stored with the ASCII type, which PIL decodes
        return value.strip("\x00")
    if not isinstance(value, bytes):
        return None
    codec = COMMENT_CODES.get(value[:8])
    if codec is None:
        return value.decode("utf-8", errors="ignore").strip("\x00")
    body = value[8:]
    if codec == "utf-16" and body[:2] not in (codecs.BOM_UTF16_BE, codecs.BOM_UTF16_LE):
        body = body[: len(body) // 2 * 2]
        # ASCII characters have a zero high byte: first in big-endian (A1111's), second in little-endian.
        codec = "utf-16-le" if body[1::2].count(0) > body[0::2].count(0) else "utf-16-be"
    return body.decode(codec, errors="replace").strip("\x00")


class OutputFolders:
    """A new folder for each prediction's files, so writing one prediction's outputs never touches
    a file the runtime may still be sending. coglet runs one prediction at a time and sends a
    prediction's files before it takes the next, so only folders older than the previous
    prediction's are removed: disk use stays flat without trusting the upload of the last one."""

    def __init__(self, keep: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="outputs-"))
        self.keep = keep  # this prediction's folder and the previous one
        self.count = 0

    def new(self) -> Path:
        """This prediction's empty folder; the folders before the last `keep - 1` are removed."""
        self.count += 1
        folder = self.root / f"{self.count:09d}"
        folder.mkdir()
        for old in sorted(self.root.iterdir())[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return folder
