"""Is a downloaded file the LoRA it claims to be? Checked before it enters the cache."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from weightstore.errors import WeightsError


def _looks_like_a_page(head: bytes) -> bool:
    start = head.lstrip()[:15].lower()
    return start.startswith((b"<!doctype", b"<html", b"<?xml", b"{", b"["))


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def compressed(name: str) -> str:
    """The refusal of a gzip file (a .tar.gz): only the plain tar Replicate's trainers write is read."""
    return (
        f"{name} is gzip-compressed: send the plain trained_model.tar as Replicate's trainers write it "
        "(uncompressed), or the .safetensors file itself"
    )


def validate_safetensors(path: Path, name: str) -> None:
    """The header must parse and the data it describes must all be there.

    Only a file that fails to parse is sniffed for an HTML or JSON page or a gzip file: the first
    bytes of a valid safetensors file are its header length, which can read as `{`, `[` or 1f 8b.
    """
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception:
        with open(path, "rb") as f:
            head = f.read(64)
        if head.startswith(b"\x1f\x8b"):
            raise WeightsError(compressed(name)) from None
        if _looks_like_a_page(head):
            raise WeightsError(
                f"{name} answered with an HTML or JSON page instead of a file: check the URL or token"
            ) from None
        raise WeightsError(
            f"{name} is not a valid .safetensors file (truncated, or another format such as .ckpt/.pt): "
            "use a .safetensors LoRA"
        ) from None
