"""Is a downloaded file the LoRA it claims to be? Checked before it enters the cache."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from weightstore.errors import WeightsError


def _looks_like_a_page(head: bytes) -> bool:
    start = head.lstrip()[:15].lower()
    return start.startswith((b"<!doctype", b"<html", b"<?xml", b"{", b"["))


def validate_safetensors(path: Path, name: str) -> None:
    """The header must parse and the data it describes must all be there.

    Only a file that fails to parse is sniffed for an HTML or JSON page: byte 0 of a valid
    safetensors file is the low byte of its header length, which can be `{` or `[`.
    """
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception:
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
