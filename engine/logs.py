"""What the libraries may print into a prediction's logs, which are what a Replicate user reads.

The engine logs its own progress, one line a step, so the libraries' progress bars are off.
Noise is removed at its cause: LoRAs are fused without injecting PEFT adapters (engine/loras.py),
so PEFT's and transformers' adapter warnings never arise; the VAE is loaded in the dtype it keeps
(engine/models.py). Everything the libraries log still reaches the user, but for one exact
message whose cause is inside diffusers (below).
"""

from __future__ import annotations

import logging

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

# diffusers' ModelMixin.to warns on every dtype argument, even when no module must stay in fp32
# (the list it prints is empty); load_ip_adapter calls unet.to(dtype=unet.dtype) once per model.
_EMPTY_FP32_WARNING = "There are modules in UNet2DConditionModel that should be kept in float32: []."


class _EmptyFp32ListFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_EMPTY_FP32_WARNING)


def quiet_library_noise() -> None:
    """Turn off the libraries' progress bars and the one message above (idempotent)."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    modeling = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _EmptyFp32ListFilter) for f in modeling.filters):
        modeling.addFilter(_EmptyFp32ListFilter())
