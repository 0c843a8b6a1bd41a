"""The per-step hook every pipeline call gets: progress in the logs, and go_fast's guidance cutoff.

go_fast stops classifier-free guidance after a fraction of the steps (GO_FAST_CFG_CUTOFF):
the late steps refine detail, where guidance matters least, and without it each such step
runs the UNet on half the batch. This is diffusers' documented dynamic-CFG technique,
done through `callback_on_step_end`.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# SDXL pipelines concatenate [negative, positive] along the batch for these tensors.
_GUIDED_INPUTS = ("prompt_embeds", "add_text_embeds", "add_time_ids", "mask", "masked_image_latents")


class StepCallback:
    """Logs `step i/n`; with a cutoff, drops the unconditional half once that step is reached."""

    def __init__(self, cfg_cutoff: float | None) -> None:
        self.cfg_cutoff = cfg_cutoff

    def tensor_inputs(self, pipe: Any) -> list[str]:
        """What the pipeline must hand the callback so the batch can be halved."""
        if self.cfg_cutoff is None:
            return ["latents"]
        return [name for name in pipe._callback_tensor_inputs if name == "latents" or name in _GUIDED_INPUTS]

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        total = pipe.num_timesteps
        log.info("step %d/%d", step + 1, total)
        if self.cfg_cutoff is not None and pipe.do_classifier_free_guidance and step + 1 == self.cutoff_step(total):
            for name in _GUIDED_INPUTS:
                if kwargs.get(name) is not None:
                    kwargs[name] = kwargs[name].chunk(2)[-1]
            pipe._guidance_scale = 0.0  # the pipelines read this to decide whether to guide
            log.info("go_fast: guidance off for the remaining %d step(s)", total - step - 1)
        return kwargs

    def cutoff_step(self, total: int) -> int:
        """Index of the first unguided step; never the first step, so guidance always shapes the image."""
        return max(1, round(total * self.cfg_cutoff))
