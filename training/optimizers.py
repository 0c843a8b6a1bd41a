"""The Flux trainer's optimizer names mapped onto maintained implementations.

ai-toolkit (which Flux's trainer runs) takes these names; here each one runs:
- adamw / adam / adagrad: torch's own.
- adafactor: transformers' Adafactor at the given learning rate (no relative step, as ai-toolkit).
- prodigy: prodigyopt's Prodigy, which estimates its own step size: its learning rate is the
  multiplier 1.0 (ai-toolkit does the same for rates below 0.1), so `learning_rate` is logged as
  unused rather than passed through.
- lion: lion-pytorch's Lion.
- adamw8bit / adam8bit / lion8bit: bitsandbytes' 8-bit versions where they can run (CUDA with
  bitsandbytes installed); elsewhere the 32-bit optimizer of the same name runs and the log says so.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from engine.errors import InputError

log = logging.getLogger(__name__)

# 8-bit names -> (bitsandbytes class, the 32-bit name run where 8-bit cannot)
_EIGHT_BIT = {"adamw8bit": ("AdamW8bit", "adamw"), "adam8bit": ("Adam8bit", "adam"), "lion8bit": ("Lion8bit", "lion")}
PRODIGY_LEARNING_RATE = 1.0


def _thirty_two_bit(name: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "adam":
        return torch.optim.Adam(groups)
    if name == "adagrad":
        return torch.optim.Adagrad(groups)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (ours), not Adafactor's relative step schedule.
        return Adafactor(groups, lr=groups[0]["lr"], relative_step=False, scale_parameter=False, warmup_init=False)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy([{**g, "lr": PRODIGY_LEARNING_RATE} for g in groups], lr=PRODIGY_LEARNING_RATE)
    raise ValueError(f"unknown optimizer {name}")  # request.validate refused it before


def refuse_where_it_cannot_run(name: str, device_type: str) -> None:
    """On Apple Silicon an 8-bit name is refused before any work: bitsandbytes has no MPS kernels,
    and a Mac user picks the optimizer themselves. Elsewhere without CUDA (a CPU test run) the
    32-bit optimizer of the same name runs, and build_optimizer logs that."""
    if device_type == "mps" and name in _EIGHT_BIT:
        fallback = _EIGHT_BIT[name][1]
        raise InputError(
            f"optimizer {name} needs bitsandbytes on a CUDA GPU, which Apple Silicon (MPS) lacks: "
            f"send optimizer {fallback!r} (its 32-bit version) or another of Flux's names"
        )


def build_optimizer(name: str, groups: list[dict[str, Any]], eight_bit_here: bool) -> torch.optim.Optimizer:
    """The optimizer called `name` over these parameter groups; what ran is logged by name."""
    if name in _EIGHT_BIT:
        bnb_class, fallback = _EIGHT_BIT[name]
        if eight_bit_here and importlib.util.find_spec("bitsandbytes") is not None:
            import bitsandbytes

            log.info("optimizer: %s (bitsandbytes.optim.%s)", name, bnb_class)
            return getattr(bitsandbytes.optim, bnb_class)(groups)
        reason = "bitsandbytes is not installed" if eight_bit_here else "8-bit optimizers need a CUDA GPU"
        log.info("optimizer: %s asked for, %s: running %s (32-bit) instead", name, reason, fallback)
        return _thirty_two_bit(fallback, groups)
    if name == "prodigy":
        log.info(
            "optimizer: prodigy (prodigyopt) finds its own step size: learning_rate is not used (multiplier %g)",
            PRODIGY_LEARNING_RATE,
        )
    else:
        log.info("optimizer: %s", name)
    return _thirty_two_bit(name, groups)
