"""The weights story: where a string points (resolve), how bytes arrive (download), what is kept.

This is the entry point; each concern lives in its own module of `weightstore/`:
- `refs.parse_lora` reads every LoRA form users paste without a network request, refuses
  schemes it does not read by name, and reads a local path only inside LOCAL_FILES_DIR
  (`engine.server_files`, the rule image inputs follow too);
- `resolve` (with `huggingface` and `civitai`) pins a reference to an immutable key;
- `transfer.Downloader` moves bytes: pget in the image, one HTTP stream elsewhere;
- `cache.LoraStore` keeps files in an LRU cache that never blocks a hit on another's download;
- `redact` keeps credentials (tokens, signatures, passwords in URLs) out of keys, logs and errors.

`predict.py` builds the store (`lora_store()`) and hands it to the engine, which never imports
this module. `scripts/bake.py` uses `download` and `download_hf_file` for the base weights.
"""

from __future__ import annotations

from pathlib import Path

from engine.request import Credentials
from weightstore import config
from weightstore.cache import LoraStore
from weightstore.config import hf_endpoint, lora_warm_max_bytes
from weightstore.errors import WeightsError
from weightstore.huggingface import download_hf_file
from weightstore.redact import display_url
from weightstore.refs import LoraRef, parse_lora
from weightstore.transfer import Downloader, Limits

__all__ = [
    "Credentials",
    "Downloader",
    "LoraRef",
    "LoraStore",
    "WeightsError",
    "display_url",
    "download",
    "download_hf_file",
    "hf_endpoint",
    "lora_store",
    "lora_warm_max_bytes",
    "parse_lora",
]


def lora_store(root: Path | None = None) -> LoraStore:
    """The LoRA store configured from the environment (LORA_CACHE_DIR, LORA_DOWNLOADER, limits)."""
    return LoraStore(root, Downloader.from_env())


def download(url: str, dest: Path, headers: dict[str, str], name: str, service: str) -> None:
    """One base-weights file from a URL into dest (the bake): a LoRA's size cap does not apply."""
    limits = Limits(max_bytes=config.BAKE_MAX_FILE_BYTES, total_timeout=config.BAKE_DOWNLOAD_TOTAL_TIMEOUT)
    Downloader(limits=limits).download(url, dest, headers, name, service)
