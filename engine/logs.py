"""What the libraries may print into a prediction's logs, which are what a Replicate user reads.

The engine logs its own progress, one line a step, so the libraries' progress bars are off.
Noise is removed at its cause: LoRAs are fused without injecting PEFT adapters (engine/loras.py),
so PEFT's and transformers' adapter warnings never arise; the VAE is loaded in the dtype it keeps
(engine/models.py). Everything the libraries log still reaches the user, but for two exact
messages whose cause is inside diffusers (below).
"""

from __future__ import annotations

import logging
import sys

# diffusers' ModelMixin.to warns on every dtype argument, even when no module must stay in fp32
# (the list it prints is empty); load_ip_adapter calls unet.to(dtype=unet.dtype) once per model.
_EMPTY_FP32_WARNING = "There are modules in UNet2DConditionModel that should be kept in float32: []."
# Importing diffusers' pipelines names transformers' CLIP, Siglip and BLIP image processors, whose
# default backend needs torchvision (the image has none: docs/guidance-and-conditioning.md,
# "Upscale"); transformers falls back to the PIL classes, which this project uses anyway, and
# warns once per name at import.
_TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class _DropMessage(logging.Filter):
    """Drops the records whose message contains `fragment`; every other record passes."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def _drop(logger_name: str, fragment: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.fragment == fragment for f in logger.filters):
        logger.addFilter(_DropMessage(fragment))


def quiet_import_noise() -> None:
    """The torchvision fallback message, dropped before diffusers' pipelines are first imported
    (engine/__init__.py calls this; idempotent)."""
    _drop("transformers.utils.import_utils", _TORCHVISION_FALLBACK)


def quiet_library_noise() -> None:
    """Turn off the libraries' progress bars and the ModelMixin.to message above (idempotent)."""
    # Imported here: engine/__init__.py imports this module, and what imports only engine.config
    # (the bake's dry run) must not pull in torch.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    _drop("diffusers.models.modeling_utils", _EMPTY_FP32_WARNING)


def flush_logs() -> None:
    """Write out every line logged or printed so far, before a long stretch of work (the upscale)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
