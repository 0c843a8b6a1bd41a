"""The weights story's settings: the LoRA cache, download bounds, hosts and the deployment's tokens.

Each deploy-time setting is a default here and an environment variable of the same name (listed
in docs/deploy.md, "Environment variables"), read only in this module and only when it is needed,
never at import: a store or downloader built later sees the environment of that moment (tests
point the hosts at loopback emulators and set a zero backoff that way).
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.config import WARM_MAX_BYTES
from weightstore.errors import WeightsError

# The LoRA cache (weightstore/cache.py): its folder, its size bound, and the free disk space its
# eviction keeps.
LORA_CACHE_DIR = "/tmp/lora-cache"
LORA_CACHE_MAX_BYTES = 20 * 2**30
LORA_CACHE_MIN_FREE_BYTES = 2 * 2**30
LORA_MAX_FILE_BYTES = 2 * 2**30
# How bytes move (weightstore/transfer.py): auto takes pget when it is on PATH, else python.
LORA_DOWNLOADER = "auto"
# Read timeout of one HTTP request, and the bound on one whole pget run, in seconds.
LORA_DOWNLOAD_TIMEOUT = 60
LORA_DOWNLOAD_TOTAL_TIMEOUT = 1800
# Tries for a download or an API call on connection errors, timeouts, truncation and 5xx.
DOWNLOAD_RETRIES = 5
# The first wait between tries; it doubles each time. Overridable by LORA_RETRY_BACKOFF_SECONDS.
DOWNLOAD_BACKOFF_SECONDS = 0.5
# The bake downloads base weights (single files of 7 GB) with these bounds instead.
BAKE_MAX_FILE_BYTES = 64 * 2**30
BAKE_DOWNLOAD_TOTAL_TIMEOUT = 4 * 3600
# How long "owner/repo" (HF main) or a CivitAI model page keeps pointing at what it resolved to.
LORA_ALIAS_TTL_SECONDS = 24 * 3600
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_CIVITAI_ENDPOINT = "https://civitai.com"
DEFAULT_REPLICATE_ENDPOINT = "https://replicate.com"
# CivitAI base models this predictor can apply LoRAs for.
SDXL_FAMILY_BASES = (
    "SDXL 1.0",
    "SDXL 0.9",
    "SDXL Lightning",
    "SDXL Turbo",
    "SDXL Hyper",
    "Illustrious",
    "Pony",
    "NoobAI",
)


def env_number(name: str, default: float) -> float:
    """A deploy-time number from the environment variable of that name, else the default."""
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        raise WeightsError(f"{name}={value!r} is not a number") from None


def lora_cache_dir() -> Path:
    return Path(os.environ.get("LORA_CACHE_DIR") or LORA_CACHE_DIR)


def lora_cache_max_bytes() -> int:
    return int(env_number("LORA_CACHE_MAX_BYTES", LORA_CACHE_MAX_BYTES))


def lora_cache_min_free_bytes() -> int:
    return int(env_number("LORA_CACHE_MIN_FREE_BYTES", LORA_CACHE_MIN_FREE_BYTES))


def lora_alias_ttl_seconds() -> float:
    return env_number("LORA_ALIAS_TTL_SECONDS", LORA_ALIAS_TTL_SECONDS)


def lora_max_file_bytes() -> int:
    return int(env_number("LORA_MAX_FILE_BYTES", LORA_MAX_FILE_BYTES))


def lora_download_timeout() -> float:
    return env_number("LORA_DOWNLOAD_TIMEOUT", LORA_DOWNLOAD_TIMEOUT)


def lora_download_total_timeout() -> float:
    return env_number("LORA_DOWNLOAD_TOTAL_TIMEOUT", LORA_DOWNLOAD_TOTAL_TIMEOUT)


def retry_backoff_seconds() -> float:
    return env_number("LORA_RETRY_BACKOFF_SECONDS", DOWNLOAD_BACKOFF_SECONDS)


def lora_downloader() -> str:
    return os.environ.get("LORA_DOWNLOADER") or LORA_DOWNLOADER


def lora_warm_max_bytes() -> int:
    """The engine's budget of parsed LoRAs (engine.config.WARM_MAX_BYTES), which deployments set
    with the other LoRA settings: predict.py hands it to `Engine.load`."""
    return int(env_number("LORA_WARM_MAX_BYTES", WARM_MAX_BYTES))


def _endpoint(name: str, default: str) -> str:
    return (os.environ.get(name) or default).rstrip("/")


def hf_endpoint() -> str:
    return _endpoint("HF_ENDPOINT", DEFAULT_HF_ENDPOINT)


def civitai_endpoint() -> str:
    return _endpoint("CIVITAI_ENDPOINT", DEFAULT_CIVITAI_ENDPOINT)


def replicate_endpoint() -> str:
    return _endpoint("REPLICATE_ENDPOINT", DEFAULT_REPLICATE_ENDPOINT)


def deployment_hf_token() -> str | None:
    """The deployment's HF_TOKEN, used when a request passes no token of its own."""
    return os.environ.get("HF_TOKEN") or None


def deployment_civitai_token() -> str | None:
    """The deployment's CIVITAI_API_TOKEN, used when a request passes no token of its own."""
    return os.environ.get("CIVITAI_API_TOKEN") or None
