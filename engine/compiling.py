"""torch.compile for the UNets: regional compilation, warmed up at setup so no request pays for it.

Only the UNet's repeated transformer blocks are compiled (diffusers' `compile_repeated_blocks`),
and the ControlNet's, which are of the same class: they hold most of the work, and one graph
serves every block of the same shape, so compile time stays short. Shapes are warmed up at
setup: a go_fast run changes the batch mid-run (the guidance cutoff halves it) and two sizes
change the token count, after which torch marks those dimensions dynamic and no later size, batch
or LoRA switch compiles again (LoRAs are written into the weights in place;
`test_compiled_unet_never_recompiles_after_setup` counts the graphs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from engine.config import COMPILE_RECOMPILE_LIMIT, COMPILE_WARMUP_ASPECTS, COMPILE_WARMUP_STEPS
from engine.devices import settings_for
from engine.request import GenerationRequest

log = logging.getLogger(__name__)

COMPILE_SETTINGS = ("auto", "on", "off")


def compile_wanted(setting: str, device: torch.device) -> bool:
    """`auto` compiles on CUDA, where it pays; on a CPU the compile time outweighs the gain, and on
    MPS torch.compile is not used at all (engine/devices.py), even when asked for."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"UNET_COMPILE must be one of {', '.join(COMPILE_SETTINGS)}, got {setting!r}")
    settings = settings_for(device)
    if setting == "on" and not settings.compile_allowed:
        log.warning("UNET_COMPILE=on is ignored on %s: the UNets run uncompiled there", device.type)
    return settings.compile_allowed and (setting == "on" or (setting == "auto" and settings.compile_auto))


def _blocks(model: torch.nn.Module, names: Sequence[str]) -> list[torch.nn.Module]:
    return [block for block in model.modules() if block.__class__.__name__ in names]


def compile_blocks(
    unets: Sequence[UNet2DConditionModel], backend: str | Callable[..., Any], controlnet: torch.nn.Module | None
) -> None:
    """Mark each UNet's repeated blocks, and the ControlNet's blocks of the same class, for
    compilation; the graphs are built on first use. (diffusers' ControlNetUnionModel declares no
    repeated blocks, but its transformer blocks are the UNet's, and share their graphs.)

    Every block shares one forward, and torch keeps at most `recompile_limit` graphs for it before
    running it eager for good: batch 1 and batch 2 (the guidance cutoff), with and without a
    reference image, and one or several references are separate graphs (ten on the tiny model,
    past torch's default limit of 8), so the limit is raised to leave room.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    for unet in unets:
        unet.compile_repeated_blocks(backend=backend, fullgraph=True)
    if controlnet is not None:
        for block in _blocks(controlnet, unets[0]._repeated_blocks):
            block.compile(backend=backend, fullgraph=True)


def uncompile_blocks(unets: Sequence[UNet2DConditionModel], controlnet: torch.nn.Module | None) -> None:
    """Back to eager blocks (`nn.Module.compile` keeps the compiled call beside the module)."""
    for model in (*unets, *([controlnet] if controlnet is not None else [])):
        for block in _blocks(model, unets[0]._repeated_blocks):
            block._compiled_call_impl = None


def warm_up(
    generate: Callable[[GenerationRequest], Any], model_ids: Iterable[str], reference: Image.Image | None
) -> float:
    """Run the shapes requests will bring, once per model; returns the seconds it took.

    go_fast on with COMPILE_WARMUP_STEPS steps has full UNet passes both before and after the
    guidance cutoff (batch 2 and batch 1), and the two aspect ratios give two token counts. With a
    `reference` (the IP-Adapter is baked), each runs once more with it, and once with two copies:
    its attention processors are other code, compiled here rather than in a user's first request,
    and the number of reference images is a dimension of their inputs.
    """
    start = time.perf_counter()
    for model_id in model_ids:
        for aspect in COMPILE_WARMUP_ASPECTS:
            request = GenerationRequest(
                prompt="warm-up",
                model=model_id,
                aspect_ratio=aspect,
                num_inference_steps=COMPILE_WARMUP_STEPS,
                seed=0,
                go_fast=True,
                safety_checker=False,
            )
            generate(request)
            if reference is not None:
                generate(replace(request, ip_adapter_images=(reference,)))
        if reference is not None:  # torch specialises a dimension of 1: two references are another graph
            generate(replace(request, ip_adapter_images=(reference, reference)))
    return time.perf_counter() - start
