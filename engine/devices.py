"""The device everything runs on, and the numerics that are known to work on it.

One pure function, `choose(available, override)`, makes the whole decision from what the machine
offers and the `TORCH_DEVICE` setting, so every case is tested on any machine (no MPS machine is
needed to test the MPS choice). CUDA is preferred, then Apple Silicon's MPS, then the CPU. Every
model the engine loads (base models, safety checker, ControlNet, depth estimator, IP-Adapter
encoder, upscaler) and training (the captioner, the LoRA) follow the one choice.

Per device:
- CUDA: fp16 weights (the baked VAE is the fp16-fix one: no upcast), `torch.compile` on `auto`,
  pinned host copies for fast copies to the GPU, mixed-precision training, 8-bit optimizers.
- MPS: fp16 weights and the same fp16-fix VAE; no `torch.compile` (its MPS backend is not one
  this project relies on: UNET_COMPILE=on is ignored there with a warning), no pinned memory
  (unified memory, and pinning is a CUDA feature), training in fp32 (no grad scaler), no 8-bit
  optimizers (bitsandbytes has no MPS kernels).
- CPU: fp32, compile only when asked for (`UNET_COMPILE=on`), no 8-bit optimizers.
Attention is PyTorch's scaled_dot_product_attention (diffusers' default processors) everywhere,
and seeds always draw their noise from CPU generators, so a seed gives the same noise on any device.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from importlib.metadata import version

import torch

from engine.config import torch_device

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


@dataclass(frozen=True)
class Available:
    """What the machine offers (read once by `detect`; built by hand in tests)."""

    cuda: bool
    mps: bool

    @classmethod
    def detect(cls) -> Available:
        return cls(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())


@dataclass(frozen=True)
class DeviceSettings:
    """The chosen device and how everything is run on it."""

    device: torch.device
    dtype: torch.dtype  # weights and activations of every model the engine loads
    compile_auto: bool  # UNET_COMPILE=auto compiles the UNets here
    compile_allowed: bool  # UNET_COMPILE=on is honoured here
    pin_memory: bool  # host copies of weights in page-locked memory
    attention: str  # the attention kernel the models run through
    mixed_precision: bool  # training: fp32 LoRA weights, fp16 autocast, a grad scaler
    train_dtype: torch.dtype  # training: the frozen base weights
    eight_bit_optimizers: bool  # bitsandbytes' 8-bit optimizers run here (CUDA only)


_SETTINGS = {
    "cuda": DeviceSettings(
        device=torch.device("cuda"),
        dtype=torch.float16,
        compile_auto=True,
        compile_allowed=True,
        pin_memory=True,
        attention="sdpa",
        mixed_precision=True,
        train_dtype=torch.float16,
        eight_bit_optimizers=True,
    ),
    "mps": DeviceSettings(
        device=torch.device("mps"),
        dtype=torch.float16,
        compile_auto=False,
        compile_allowed=False,
        pin_memory=False,
        attention="sdpa",
        mixed_precision=False,
        train_dtype=torch.float32,
        eight_bit_optimizers=False,
    ),
    "cpu": DeviceSettings(
        device=torch.device("cpu"),
        dtype=torch.float32,
        compile_auto=False,
        compile_allowed=True,
        pin_memory=False,
        attention="sdpa",
        mixed_precision=False,
        train_dtype=torch.float32,
        eight_bit_optimizers=False,
    ),
}


def choose(available: Available, override: str | None) -> DeviceSettings:
    """CUDA, else MPS, else the CPU; `override` (auto, cuda, mps, cpu) names one instead, and must
    name one the machine has."""
    wanted = (override or "auto").strip().lower()
    if wanted not in DEVICE_CHOICES:
        raise ValueError(f"TORCH_DEVICE must be one of {', '.join(DEVICE_CHOICES)}, got {override!r}")
    if wanted == "auto":
        wanted = "cuda" if available.cuda else "mps" if available.mps else "cpu"
    elif wanted != "cpu" and not getattr(available, wanted):
        raise ValueError(
            f"TORCH_DEVICE is {wanted}, but this machine's PyTorch has no {wanted.upper()} device: "
            "unset TORCH_DEVICE (or set auto) to use what it has"
        )
    return _SETTINGS[wanted]


def current() -> DeviceSettings:
    """The choice for this process: what it has, and $TORCH_DEVICE (default config.TORCH_DEVICE)."""
    return choose(Available.detect(), torch_device())


def settings_for(device: torch.device) -> DeviceSettings:
    """The settings of a device already chosen (an index, as in cuda:1, keeps its own device)."""
    base = _SETTINGS[device.type]
    return base if device == base.device else DeviceSettings(**{**base.__dict__, "device": device})


def default_device() -> torch.device:
    return current().device


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA and MPS (with the fp16-fix VAE), fp32 on the CPU."""
    return settings_for(device).dtype


def device_name(device: torch.device) -> str:
    """What a person calls the device: the GPU's name on CUDA, the chip family elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple Silicon GPU ({platform.machine()})"
    return platform.processor() or platform.machine()


def setup_line(settings: DeviceSettings, compiled: bool, baked: list[str]) -> str:
    """The one setup log line that says what this process runs on."""
    device = settings.device
    fallback = ""
    if device.type == "mps":
        fallback = f", PYTORCH_ENABLE_MPS_FALLBACK={os.environ.get('PYTORCH_ENABLE_MPS_FALLBACK', 'unset')}"
    return (
        f"running on {device} ({device_name(device)}), {str(settings.dtype).removeprefix('torch.')}, "
        f"attention {settings.attention}, torch {torch.__version__}, diffusers {version('diffusers')}, "
        f"transformers {version('transformers')}, compile {'on' if compiled else 'off'}{fallback}; "
        f"optional models baked: {', '.join(baked) if baked else 'none'}"
    )
