"""The per-step hook every pipeline call gets (progress in the logs, go_fast's guidance cutoff), and
go_fast's schedule by noise level.

go_fast decides by the noise level sigma of each step, not by a fraction of the steps: a fraction
lands at different noise levels per scheduler (60% of 28 steps is sigma 0.99 with Euler, 0.57 with
Karras sigmas), while sigma is the same scale for all of them. Classifier-free guidance stops
below GO_FAST_GUIDANCE_MIN_SIGMA, where it matters least (Kynkaanniemi et al. 2024), and without
it each such step runs the UNet on half the batch: diffusers' documented dynamic-CFG technique,
done through `callback_on_step_end`. The deep-feature reuse (`engine.deepcache`) starts below
GO_FAST_DEEP_CACHE_MAX_SIGMA. Evidence and numbers: docs/go-fast.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.config import (
    GO_FAST_DEEP_CACHE_INTERVAL,
    GO_FAST_DEEP_CACHE_MAX_SIGMA,
    GO_FAST_DEEP_CACHE_MIN_STEPS,
)

log = logging.getLogger(__name__)

# SDXL pipelines concatenate [negative, positive] along the batch for these tensors.
_GUIDED_INPUTS = ("prompt_embeds", "add_text_embeds", "add_time_ids", "mask", "masked_image_latents")


def noise_levels(pipe: Any) -> list[float]:
    """Sigma of each step of the pipeline call in progress (its timesteps are set by then).

    Read from the model's noise schedule at each step's timestep, sqrt((1 - alpha_bar) / alpha_bar),
    interpolated for fractional timesteps as the Euler schedulers do: the same for every scheduler,
    DDIM's included (which keeps no sigmas). An image-to-image call runs the last `num_timesteps`.
    """
    scheduler = pipe.scheduler
    timesteps = scheduler.timesteps[len(scheduler.timesteps) - pipe.num_timesteps :]
    alphas = scheduler.alphas_cumprod.double().numpy()
    table = np.sqrt((1 - alphas) / alphas)
    return np.interp(timesteps.double().cpu().numpy(), np.arange(len(table)), table).tolist()


def first_unguided_step(sigmas: Sequence[float], min_sigma: float) -> int | None:
    """The first step below `min_sigma`; never the first step, so guidance always shapes the image."""
    return next((step for step, sigma in enumerate(sigmas) if step and sigma < min_sigma), None)


def whole_steps(
    sigmas: Sequence[float],
    max_sigma: float = GO_FAST_DEEP_CACHE_MAX_SIGMA,
    interval: int = GO_FAST_DEEP_CACHE_INTERVAL,
    min_steps: int = GO_FAST_DEEP_CACHE_MIN_STEPS,
) -> list[bool]:
    """Which steps run the whole UNet under go_fast: every step at or above `max_sigma`, then one in
    `interval` counted from the first below it, and the last step; all of them in a short run."""
    count = len(sigmas)
    if count < min_steps:
        return [True] * count
    first = next((step for step, sigma in enumerate(sigmas) if step and sigma < max_sigma), count)
    return [step < first or step == count - 1 or (step - first) % interval == 0 for step in range(count)]


class StepCallback:
    """Logs `step i/n`; with a cutoff sigma, drops the unconditional half before the first step below it."""

    def __init__(self, cutoff_sigma: float | None) -> None:
        self.cutoff_sigma = cutoff_sigma

    def tensor_inputs(self, pipe: Any) -> list[str]:
        """What the pipeline must hand the callback so the batch can be halved."""
        if self.cutoff_sigma is None:
            return ["latents"]
        return [name for name in pipe._callback_tensor_inputs if name == "latents" or name in _GUIDED_INPUTS]

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        total = pipe.num_timesteps
        log.info("step %d/%d", step + 1, total)
        if self.cutoff_sigma is None or not pipe.do_classifier_free_guidance:
            return kwargs
        if step + 1 == first_unguided_step(noise_levels(pipe), self.cutoff_sigma):
            for name in _GUIDED_INPUTS:
                if kwargs.get(name) is not None:
                    kwargs[name] = kwargs[name].chunk(2)[-1]
            pipe._guidance_scale = 0.0  # the pipelines read this to decide whether to guide
            log.info(
                "go_fast: guidance off below sigma %g, for the remaining %d step(s)",
                self.cutoff_sigma,
                total - step - 1,
            )
        return kwargs
