"""Is a downloaded file the LoRA it claims to be? Checked before it enters the cache."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from weightstore.errors import WeightsError


def _looks_like_a_page(head: bytes) -> bool:
    start = head.lstrip()[:15].lower()
    return start.startswith((b"<!doctype", b"<html", b"<?xml", b"{", b"["))


# What a LoRA sent as an archive starts with. A tar compressed by any of the first four could
# unpack to far more than the download cap allowed, so only the plain tar is read.
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_ARCHIVES = ((b"PK\x03\x04", "zip"), (b"7z\xbc\xaf\x27\x1c", "7-Zip"), (b"Rar!\x1a\x07", "RAR"))


def archive_refusal(path: Path, name: str) -> str | None:
    """The refusal of a compressed file or an archive, by its first bytes; None for anything else."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind in _COMPRESSED:
        if head.startswith(magic):
            return (
                f"{name} is {kind}-compressed: send the plain trained_model.tar as Replicate's trainers write it "
                "(uncompressed), or the .safetensors file itself"
            )
    for magic, kind in _ARCHIVES:
        if head.startswith(magic):
            return (
                f"{name} is a {kind} archive (a PyTorch .ckpt/.pt file is a zip too): send the .safetensors "
                "file itself, unpacked"
            )
    return None


def validate_safetensors(path: Path, name: str) -> None:
    """The header must parse and the data it describes must all be there.

    Only a file that fails to parse is sniffed for an HTML or JSON page or an archive: the first
    bytes of a valid safetensors file are its header length, which can read as `{`, `[` or 1f 8b.
    """
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception:
        if refusal := archive_refusal(path, name):
            raise WeightsError(refusal) from None
        with open(path, "rb") as f:
            head = f.read(64)
        if _looks_like_a_page(head):
            raise WeightsError(
                f"{name} answered with an HTML or JSON page instead of a file: check the URL or token"
            ) from None
        raise WeightsError(
            f"{name} is not a valid .safetensors file (truncated, or another format such as .ckpt/.pt): "
            "use a .safetensors LoRA"
        ) from None
