"""The one place for defaults: model ids, the aspect table, schedulers, limits and deploy-time settings."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Base models, each a diffusers folder under the weights root. The first is the default.
MODEL_IDS: tuple[str, ...] = ("illustrious-xl", "sdxl")
# Baked only on request (scripts/bake.py with CUSTOM_CHECKPOINT_URL), loaded when present.
CUSTOM_MODEL_ID = "custom"
DEFAULT_MODEL = "illustrious-xl"
SAFETY_CHECKER_DIR = "safety-checker"

# Flux's aspect table at 1 megapixel, width x height. Sizes scale with a model's native
# resolution (1024 px for SDXL), so the table is exact on real weights.
REFERENCE_RESOLUTION = 1024
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
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
CUSTOM_ASPECT = "custom"
MEGAPIXELS: dict[str, float] = {"1": 1.0, "0.5": 0.5, "0.25": 0.25}
CUSTOM_SIZE_MIN = 256
CUSTOM_SIZE_MAX = 1440
# Flux rounds sizes to 16 at reference scale; diffusers' SDXL pipelines need multiples of 8.
SIZE_MULTIPLE = 16
PIPELINE_SIZE_MULTIPLE = 8

DEFAULT_SCHEDULER = "Euler a"  # the choices live in engine/schedulers.py

# Flux's `guidance` is distilled guidance (about 3); SDXL needs classifier-free guidance
# around 5-7. CFG = guidance x this factor unless `cfg_scale` is given.
FLUX_GUIDANCE_TO_CFG = 2.0

# Base models on the GPU: "resident" keeps all there, "swap" keeps the idle ones in CPU RAM and
# moves the requested one in, "auto" picks resident when GPU memory holds them all with headroom.
# Deploy-time override: MODEL_RESIDENCY.
MODEL_RESIDENCY = "auto"
RESIDENCY_HEADROOM_BYTES = 8 * 2**30

# go_fast: classifier-free guidance stops after this fraction of the steps (see engine/steps.py).
GO_FAST_CFG_CUTOFF = 0.6

MAX_OUTPUTS = 4
MAX_STEPS = 50
MAX_CLIP_SKIP = 4
OUTPUT_FORMATS: tuple[str, ...] = ("webp", "jpg", "png")


def weights_root() -> Path:
    """Where baked weights live: $WEIGHTS_DIR, else ./weights in the repo."""
    return Path(os.environ.get("WEIGHTS_DIR") or REPO_ROOT / "weights")


# LoRA cache and downloads. Each is overridable by the environment variable of the same name,
# read in weightstore/. LORA_DOWNLOADER (auto, pget, python) picks how bytes move; auto takes pget
# when it is on PATH.
LORA_CACHE_DIR = "/tmp/lora-cache"
LORA_CACHE_MAX_BYTES = 20 * 2**30
LORA_CACHE_MIN_FREE_BYTES = 2 * 2**30
LORA_MAX_FILE_BYTES = 2 * 2**30
# Parsed LoRAs (their factors, pinned CPU memory on CUDA) kept per base model so a switch back or a
# scale change reads no file; the least recently used go first, the active ones never. Read by
# engine/loras.py; overridable by LORA_WARM_MAX_BYTES. A rank-32 SDXL LoRA takes about 0.1-0.2 GB.
LORA_WARM_MAX_BYTES = 4 * 2**30
# Read timeout of one HTTP request, and the bound on one whole pget run, in seconds.
LORA_DOWNLOAD_TIMEOUT = 60
LORA_DOWNLOAD_TOTAL_TIMEOUT = 1800
# Tries for a download or an API call on connection errors, timeouts, truncation and 5xx.
DOWNLOAD_RETRIES = 5
DOWNLOAD_BACKOFF_SECONDS = 0.5  # the first wait between tries; it doubles each time
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
