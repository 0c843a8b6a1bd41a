"""The engine's settings: model ids, the aspect table, limits, and the deploy-time overrides it reads.

Each override is read from the environment only here, and only when it is needed (tests change
them between calls). The LoRA store's settings live in weightstore/config.py and training's in
training/config.py; docs/deploy.md lists every environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Base models, each a diffusers folder under the weights root. The first is the default.
MODEL_IDS: tuple[str, ...] = ("illustrious-xl", "sdxl")
# The checkpoint files people generate with whose UNet and text encoders a baked model holds (its
# VAE is the fp16-fix one, which decodes the same latents to nearly the same pixels), so generation data
# made with them (A1111's `Model` and `Model hash`, ComfyUI's ckpt_name) picks that model: file
# names without the extension, any case, and A1111 model hashes (CivitAI's AutoV2: the first 10
# hex digits of the file's sha256). SDXL base is baked from its diffusers folders, which name no
# hash of their own; a model baked from one checkpoint file also answers to that file's hash.
CHECKPOINT_NAMES: dict[str, tuple[str, ...]] = {
    "sdxl": ("sd_xl_base_1.0", "sd_xl_base_1.0_0.9vae"),
    "illustrious-xl": ("Illustrious-XL-v0.1",),
}
CHECKPOINT_HASHES: dict[str, tuple[str, ...]] = {"sdxl": ("31e35c80fc", "e6bb9ea85b")}
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
# An input image sets the output's proportions, clamped to the table's range (9:21 to 21:9, about
# 1:2.4 to 2.4:1), with both sides kept within the custom-size bounds: a 4000x1 image cannot ask
# for an unbounded size.
IMAGE_ASPECT_MIN = min(w / h for w, h in ASPECT_RATIOS.values())
IMAGE_ASPECT_MAX = max(w / h for w, h in ASPECT_RATIOS.values())
# Input images (image, mask) are reduced while being read to fit this side, twice the largest
# output side, so the final resize keeps full quality; an upload's cost is bounded by it and by
# the pixel cap (a 12000x12000 photo is read, a 20000x20000 one is refused).
INPUT_IMAGE_MAX_SIDE = 2 * CUSTOM_SIZE_MAX
INPUT_IMAGE_MAX_PIXELS = 150_000_000
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

# go_fast, by noise level (sigma) so that every scheduler behaves alike (engine/steps.py, the
# evidence in docs/go-fast.md). Classifier-free guidance stops below this sigma: the low end of
# the SDXL guidance interval (0.28, 5.42] of Kynkaanniemi et al. 2024.
GO_FAST_GUIDANCE_MIN_SIGMA = 0.28
# Below this sigma only one step in GO_FAST_DEEP_CACHE_INTERVAL (DeepCache's published default)
# runs the whole UNet; the others reuse its deep features (engine/deepcache.py). 3.0 keeps the
# first 8 of 28 Euler steps whole. Never the last step, and never in runs under
# GO_FAST_DEEP_CACHE_MIN_STEPS: 25 is the fewest steps feature reuse was measured at on SDXL (T-GATE).
GO_FAST_DEEP_CACHE_MAX_SIGMA = 3.0
GO_FAST_DEEP_CACHE_INTERVAL = 3
GO_FAST_DEEP_CACHE_MIN_STEPS = 25

# The device (engine/devices.py): "auto" picks CUDA, else Apple Silicon's MPS, else the CPU;
# "cuda", "mps" or "cpu" force one. Deploy-time override: TORCH_DEVICE.
TORCH_DEVICE = "auto"

# torch.compile of each UNet's repeated transformer blocks (engine/compiling.py): "auto" compiles
# on CUDA only, "on" / "off" force it. Deploy-time override: UNET_COMPILE. Setup then runs one
# go_fast warm-up per model at each of these aspect ratios (batch 2 and 1, two token counts), after
# which no size, batch or LoRA switch compiles again.
UNET_COMPILE = "auto"
COMPILE_WARMUP_ASPECTS: tuple[str, ...] = ("1:1", "16:9")
COMPILE_WARMUP_STEPS = 10
# Graphs torch may keep for the blocks' shared forward before it gives up and runs it eager
# (torch's default is 8; the warm-up makes 10 on the tiny model, see engine/compiling.py).
COMPILE_RECOMPILE_LIMIT = 32

# IP-Adapter (engine/ip_adapter.py): "look like this reference image". The SDXL Plus adapter with
# the ViT-H image encoder, baked into <weights root>/IP_ADAPTER_DIR; optional: without that folder
# the feature is off and a request using it is refused. Loaded into every base model at setup,
# installed in the UNet only for the requests that pass a reference image.
IP_ADAPTER_DIR = "ip-adapter"
IP_ADAPTER_WEIGHT_NAME = "ip-adapter-plus_sdxl_vit-h.safetensors"
IP_ADAPTER_ENCODER_DIR = "image_encoder"  # inside IP_ADAPTER_DIR, CLIPVisionModelWithProjection
IP_ADAPTER_DEFAULT_SCALE = 0.6  # the usual starting point: the prompt still shapes the image
IP_ADAPTER_MAX_SCALE = 1.5
# Reference images in one request: their tokens are concatenated (16 per image for Plus), so each
# adds to every cross-attention's keys; a few are enough to blend a style or a subject.
IP_ADAPTER_MAX_IMAGES = 4

# ControlNet (engine/control.py). One union ControlNet (xinsir's "promax": one model, eight
# control modes) serves both base models; a small depth estimator makes depth maps from photos.
# Each is optional at load: a missing folder turns the feature off with a clear refusal.
CONTROLNET_DIR = "controlnet-union"
DEPTH_ESTIMATOR_DIR = "depth-estimator"
# control_type -> the union model's control_mode index, in xinsir's order (0-5 in both releases,
# 6 = tile only in promax; 7 = repaint is promax's inpainting mode, not offered as a map type).
CONTROL_MODES: dict[str, int] = {
    "pose": 0,
    "depth": 1,
    "scribble": 2,
    "canny": 3,
    "lineart": 3,
    "normal": 4,
    "segment": 5,
    "tile": 6,
}
CONTROL_TYPES: tuple[str, ...] = ("none", *CONTROL_MODES)
# Types the predictor can make from a plain photo; the others need a ready map (control_preprocess=false).
CONTROL_PREPROCESSORS: dict[str, str] = {"canny": "canny", "depth": "depth_anything_v2", "tile": "none"}
CONTROL_DEFAULT_STRENGTH = 0.8
CONTROL_MAX_STRENGTH = 2.0
# OpenCV Canny hysteresis thresholds (A1111's and ComfyUI's defaults).
CANNY_LOW_THRESHOLD = 100
CANNY_HIGH_THRESHOLD = 200

MAX_OUTPUTS = 4
# torch takes seeds up to 2^64-1 (every ComfyUI and A1111 seed). Flux declares no range, so larger
# seeds are reduced modulo 2^64 rather than refused; output i uses seed + i, wrapping the same way.
SEED_MAX = 2**64 - 1

# Prompt and negative prompt: at most this many CLIP tokens as written (weight syntax included),
# counted by the tokenizer before any LoRA download or encoding. A1111 users rarely pass 225
# tokens of text and weight syntax can double that as written, so 512 is generous; it bounds
# encoding to a few 75-token chunks (a 50,000-character prompt took 39 s on the tiny model).
MAX_PROMPT_TOKENS = 512
MAX_EMBEDDINGS = 4  # textual-inversion files per request (the `embeddings` input, engine/embeddings.py)
MAX_STEPS = 50
MAX_CLIP_SKIP = 4
MAX_CFG_SCALE = 20.0  # cfg_scale's bound (its `le` in predict.py), which generation data must meet too
# LoRAs one generation_data text may bring (engine/infotext.py). The fused LoRAs allow any number;
# this bounds the downloads of one request.
GENERATION_DATA_MAX_LORAS = 4
OUTPUT_FORMATS: tuple[str, ...] = ("webp", "jpg", "png")

# Parsed LoRAs (their factors, pinned CPU memory on CUDA) kept so a switch back or a scale change
# reads no file, one budget for every model of the process; the least recently used go first, the
# request's own never (engine/warm.py). A rank-32 SDXL LoRA takes about 0.1-0.2 GB. Engine.load
# takes another budget from its caller (predict.py passes the deployment's, docs/deploy.md).
WARM_MAX_BYTES = 4 * 2**30

# Upscaler (engine/upscale.py): Swin2SR real-world x4 (transformers), baked into weights/<UPSCALER_DIR>,
# run on each kept output after the safety checker. "2x" is the x4 result reduced by half with
# Lanczos (A1111 does the same with its x4 upscalers), so one model serves both choices.
UPSCALER_DIR = "upscaler"
UPSCALER_NAME = "Swin2SR realworld x4"  # what the output metadata names
UPSCALE_FACTORS: dict[str, int] = {"none": 1, "2x": 2, "4x": 4}
# Tiles, in input pixels: the model runs on tiles of at most this side, overlapping by at least this
# much and blended across the overlap, so its memory is bounded whatever the image size. The side
# is rounded down to the model's window (8): tiles start on the window grid the whole image uses.
UPSCALE_TILE = 576
UPSCALE_TILE_OVERLAP = 32
# The largest upscaled image, in pixels, at Flux's sizes (SDXL's generated sizes): 4x of every
# 1-megapixel size of the aspect table (4x of 1024x1024 is exactly 4096x4096) and 2x of every size.
UPSCALE_MAX_PIXELS = 4096 * 4096

# The folders setup reads beside the base models (the optional ones when baked): what residency
# "auto" counts with the models, and with them what the setup benchmarks' raw read covers.
# Training's captioner is not among them.
SETUP_SIDE_DIRS = (SAFETY_CHECKER_DIR, UPSCALER_DIR, IP_ADAPTER_DIR, CONTROLNET_DIR, DEPTH_ESTIMATOR_DIR)
SETUP_DIRS = (*MODEL_IDS, *SETUP_SIDE_DIRS)


# Deploy-time overrides, read when asked for: the environment variable of each setting's name
# (docs/deploy.md). Requests name files by path only inside LOCAL_FILES_DIR, unset by default.
LOCAL_FILES_ENV = "LOCAL_FILES_DIR"


def weights_root() -> Path:
    """Where baked weights live: $WEIGHTS_DIR, else ./weights in the repo."""
    return Path(os.environ.get("WEIGHTS_DIR") or REPO_ROOT / "weights")


def torch_device() -> str:
    return os.environ.get("TORCH_DEVICE") or TORCH_DEVICE


def model_residency() -> str:
    return os.environ.get("MODEL_RESIDENCY") or MODEL_RESIDENCY


def unet_compile() -> str:
    return os.environ.get("UNET_COMPILE") or UNET_COMPILE


def local_files_dir() -> Path | None:
    """The one folder whose files requests may name by path (engine/server_files.py), or None (the default)."""
    value = os.environ.get(LOCAL_FILES_ENV)
    return Path(value).expanduser().resolve() if value else None
