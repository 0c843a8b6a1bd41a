"""The training archive: read safely, every image checked and captioned before any training step.

Nothing is extracted: entries are read into memory one by one and only their bytes are used, so
an entry with `..`, an absolute path or a link cannot write anywhere (and is refused, named). The
number of entries and the bytes read are bounded while reading, whatever sizes a zip declares (a
zip bomb stops at the bound); a tar's declared sizes, which its reader must skip through, count
against the same bound.
"""

from __future__ import annotations

import io
import logging
import math
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

from engine.config import INPUT_IMAGE_MAX_PIXELS
from engine.errors import InputError
from training.config import (
    TRAIN_IMAGE_EXTENSIONS,
    TRAIN_MAX_ARCHIVE_BYTES,
    TRAIN_MAX_ARCHIVE_ENTRIES,
    TRAIN_MAX_IMAGES,
    TRAIN_MIN_IMAGES,
    TRAIN_RESOLUTION_MAX,
)

log = logging.getLogger(__name__)

# Formats people zip by mistake: refused by name rather than skipped, so nothing is silently lost.
_OTHER_IMAGE_EXTENSIONS = (".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".svg")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on one archive; the defaults live in engine/config.py."""

    max_entries: int = TRAIN_MAX_ARCHIVE_ENTRIES
    max_bytes: int = TRAIN_MAX_ARCHIVE_BYTES
    min_images: int = TRAIN_MIN_IMAGES
    max_images: int = TRAIN_MAX_IMAGES


@dataclass
class TrainingImage:
    """One image of the archive, decoded and upright, with its caption (None until one is found)."""

    name: str  # the archive's name, for messages and logs
    image: Image.Image
    caption: str | None


def _safe_name(name: str) -> str:
    """The entry's name as a relative POSIX path; refuse what could point outside the work folder."""
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        raise InputError(
            f"input_images: archive entry {name!r} has an absolute path: re-create the archive from the "
            "folder of images (e.g. `cd photos && zip -r ../photos.zip .`)"
        )
    if ".." in PurePosixPath(normalized).parts:
        raise InputError(
            f"input_images: archive entry {name!r} points outside the archive (`..`): re-create the "
            "archive from the folder of images"
        )
    return normalized


def _too_large(limit: int, name: str) -> InputError:
    return InputError(
        f"input_images unpacks to more than {limit / 2**20:g} MiB (stopped at {name!r}): send fewer or smaller images"
    )


def _entries(path: Path, max_bytes: int) -> Iterator[tuple[str, Callable[[], IO[bytes]]]]:
    """(name, opener) for every regular file of a zip or tar; links and devices are refused."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = _safe_name(info.filename)
                if not info.is_dir():
                    yield name, lambda info=info: archive.open(info)
        return
    try:
        archive = tarfile.open(path)  # noqa: SIM115 - closed by the `with` below
    except (tarfile.TarError, OSError):
        raise InputError(
            "input_images must be a .zip or .tar archive of .jpg, .jpeg, .png or .webp images "
            "(optionally with same-named .txt captions)"
        ) from None
    declared = 0
    with archive:
        for member in archive:
            name = _safe_name(member.name)
            # Even a skipped member is decompressed to reach the next one (.tar.gz): count it.
            declared += member.size
            if declared > max_bytes:
                raise _too_large(max_bytes, name)
            if member.isdir():
                continue
            if not member.isfile():
                raise InputError(
                    f"input_images: archive entry {name!r} is a link or special file: "
                    "archive the image files themselves"
                )
            yield name, lambda member=member: archive.extractfile(member)  # type: ignore[return-value]


def archive_kind(path: Path) -> str | None:
    """The archive's kind by its bytes ("zip" or "tar"), as `_entries` reads it (a zip first); None for neither."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        with tarfile.open(path):
            return "tar"
    except (tarfile.TarError, OSError):
        return None


def _read_bounded(opener: Callable[[], IO[bytes]], name: str, budget: int, limit: int) -> bytes:
    """The entry's bytes, stopping as soon as the archive's total would pass its bound."""
    chunks = []
    size = 0
    try:
        with opener() as source:
            while chunk := source.read(min(_CHUNK, budget - size + 1)):
                size += len(chunk)
                if size > budget:
                    raise _too_large(limit, name)
                chunks.append(chunk)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(
            f"input_images: archive entry {name!r} could not be read ({exc}): re-create the archive"
        ) from None
    return b"".join(chunks)


def _decode(data: bytes, name: str, short_side: int) -> Image.Image:
    """A checked RGB image, refused by name when it is damaged or larger than inputs may be.

    It is reduced to `short_side` on its shorter side right away (JPEGs while decoding): no
    bucket needs more, and a thousand full-size photos would not fit in memory.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > INPUT_IMAGE_MAX_PIXELS:
                raise InputError(
                    f"input_images: {name} is {width}x{height}, over {INPUT_IMAGE_MAX_PIXELS // 1_000_000} "
                    "megapixels: send a smaller image"
                )
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            scale = short_side / min(width, height)
            if scale < 1:
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
            # Phone photos store rotation in EXIF: train on what their owner sees.
            upright = ImageOps.exif_transpose(image).convert("RGB")
        scale = short_side / min(upright.size)
        if scale < 1:
            size = (max(1, round(upright.width * scale)), max(1, round(upright.height * scale)))
            upright = upright.resize(size, Image.Resampling.LANCZOS)
        return upright
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InputError(
            f"input_images: {name} could not be read as an image (damaged or not what its name says): "
            "replace it with a working .jpg, .png or .webp file, or remove it"
        ) from None


def read_archive(
    path: Path, limits: ArchiveLimits | None = None, short_side: int = TRAIN_RESOLUTION_MAX
) -> list[TrainingImage]:
    """Every image of the archive (at most `short_side` on its shorter side) with its .txt caption
    when it has one, in name order."""
    limits = limits or ArchiveLimits()
    images: dict[str, TrainingImage] = {}
    captions: dict[str, str] = {}
    used = 0
    count = 0
    for name, opener in _entries(path, limits.max_bytes):
        count += 1
        if count > limits.max_entries:
            raise InputError(f"input_images holds more than {limits.max_entries} files: send at most that many")
        parts = PurePosixPath(name).parts
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue  # macOS resource forks (._x.jpg) and hidden files are not images
        suffix = PurePosixPath(name).suffix.lower()
        stem = name[: len(name) - len(suffix)]
        if suffix in _OTHER_IMAGE_EXTENSIONS:
            raise InputError(
                f"input_images: {name} is a {suffix[1:].upper()} file, which is not read: convert it to "
                ".jpg, .png or .webp, or remove it"
            )
        if suffix not in (*TRAIN_IMAGE_EXTENSIONS, ".txt"):
            log.info("input_images: skipped %s (not an image or a .txt caption)", name)
            continue
        data = _read_bounded(opener, name, limits.max_bytes - used, limits.max_bytes)
        used += len(data)
        if suffix == ".txt":
            captions[stem] = data.decode("utf-8", errors="replace").strip()
            continue
        if len(images) >= limits.max_images:
            raise InputError(f"input_images holds more than {limits.max_images} images: send at most that many")
        if stem in images:
            raise InputError(
                f"input_images: {name} and {images[stem].name} share a name: rename one, so each caption "
                "belongs to one image"
            )
        images[stem] = TrainingImage(name, _decode(data, name, short_side), None)
    if not images:
        raise InputError(
            "input_images holds no images: send a .zip or .tar of .jpg, .jpeg, .png or .webp files "
            "(optionally with same-named .txt captions)"
        )
    if len(images) < limits.min_images:
        raise InputError(
            f"input_images holds {len(images)} image(s): training needs at least {limits.min_images} "
            "(10-20 varied images of the subject or style work well)"
        )
    for stem, item in images.items():
        item.caption = captions.get(stem) or None
    log.info(
        "input_images: %d images, %d with a .txt caption",
        len(images),
        sum(i.caption is not None for i in images.values()),
    )
    return [images[stem] for stem in sorted(images)]


def trigger_pattern(trigger: str) -> re.Pattern[str]:
    """Where a caption names the trigger word: in any letter case, as a whole word when it is one."""
    return re.compile(rf"\b{re.escape(trigger)}\b" if trigger.isalnum() else re.escape(trigger), re.IGNORECASE)


_PLACEHOLDER = re.compile(r"\[trigger\]", re.IGNORECASE)


def with_trigger(caption: str, trigger: str) -> str:
    """`[trigger]` written as the trigger word (ai-toolkit's placeholder); a caption that does not
    name the trigger gets it in front. No trigger word: placeholders are dropped, nothing added."""
    caption = " ".join(_PLACEHOLDER.sub(trigger, caption).split())
    if not trigger or trigger_pattern(trigger).search(caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def caption_all(
    images: list[TrainingImage], trigger: str, prefix: str, suffix: str, automatic: list[str] | None
) -> list[str]:
    """A .txt caption wins; else the automatic one (with prefix and suffix); else the trigger word.

    `automatic` holds one caption per image without a .txt, in order (None: autocaption is off).
    """
    pending = iter(automatic or [])
    captions = []
    for item in images:
        if item.caption is not None:
            text = item.caption
        elif automatic is not None:
            text = " ".join(part for part in (prefix.strip(), next(pending).strip(), suffix.strip()) if part)
        else:
            text = ""
        captions.append(with_trigger(text, trigger))
    return captions
