"""What the libraries may print into a prediction's logs, which are what a Replicate user reads.

The engine logs its own progress, one line a step, so the libraries' progress bars are off.
Noise is removed at its cause: LoRAs are fused without injecting PEFT adapters (engine/loras.py),
so PEFT's and transformers' adapter warnings never arise; the VAE is loaded in the dtype it keeps
(engine/models.py). Everything the libraries log still reaches the user.
"""

from __future__ import annotations

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging


def quiet_library_noise() -> None:
    """Turn off the libraries' progress bars (idempotent)."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
