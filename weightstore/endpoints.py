"""The hosts LoRAs and weights come from. Deploy-time overrides (and the tests' loopback
emulators) set HF_ENDPOINT, CIVITAI_ENDPOINT and REPLICATE_ENDPOINT."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from engine import config


def _endpoint(name: str, default: str) -> str:
    return (os.environ.get(name) or default).rstrip("/")


def hf_endpoint() -> str:
    return _endpoint("HF_ENDPOINT", config.DEFAULT_HF_ENDPOINT)


def civitai_endpoint() -> str:
    return _endpoint("CIVITAI_ENDPOINT", config.DEFAULT_CIVITAI_ENDPOINT)


def replicate_endpoint() -> str:
    return _endpoint("REPLICATE_ENDPOINT", config.DEFAULT_REPLICATE_ENDPOINT)


def host_of(url: str) -> str:
    return urlsplit(url).netloc.rsplit("@", 1)[-1].lower()
