"""What the libraries may print into a prediction's logs, which are what a Replicate user reads.

Each rule below drops one message that is wrong or expected for this engine, never a class of
messages; everything else the libraries log still reaches the user.
"""

from __future__ import annotations

import logging
import warnings

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

# PEFT warns whenever a model already holds an adapter; the engine keeps several on purpose
# (one per LoRA of a request, see engine/loras.py).
_PEFT_SECOND_ADAPTER = r"Already found a `peft_config` attribute in the model"
# diffusers warns, with a link to its issue tracker, when a LoRA has no text-encoder weights:
# most LoRAs train only the UNet. The UNet's variant of the message still shows.
_NO_TEXT_ENCODER_KEYS = ("No LoRA keys associated to CLIPTextModel",)
_TRANSFORMERS_PEFT_LOGGER = "transformers.integrations.peft"
_DIFFUSERS_LORA_LOGGER = "diffusers.loaders.lora_base"


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of the prefixes."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class _DropOtherAdaptersReport(logging.Filter):
    """transformers' adapter load report lists the other loaded adapters' weights as MISSING.

    Loading a second LoRA into a text encoder reports every weight of the first one as "newly
    initialized" (it counts any key containing "lora" as the new adapter's). A report that holds
    only MISSING rows is that mistake; one with unexpected or mismatched keys still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line for line in message.splitlines() if line.count("|") >= 2 and "Status" not in line]
        return not rows or not all("MISSING" in row for row in rows)


_FILTERS = {
    _DIFFUSERS_LORA_LOGGER: _DropMessages(_NO_TEXT_ENCODER_KEYS),
    _TRANSFORMERS_PEFT_LOGGER: _DropOtherAdaptersReport(),
}


def quiet_library_noise() -> None:
    """Install the rules (idempotent); the engine logs its own progress, one line a step."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=_PEFT_SECOND_ADAPTER, category=UserWarning)
    for name, log_filter in _FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)  # addFilter skips a filter already there
