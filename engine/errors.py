"""Errors the engine raises for the caller to show as they are."""


class InputError(ValueError):
    """A request the engine cannot serve as given; the message says what to change."""


class WeightsMissingError(RuntimeError):
    """Baked weights are absent; the message names the command that provides them."""


class AllImagesFlaggedError(RuntimeError):
    """Every generated image was flagged by the safety checker."""


class LoraLoadError(RuntimeError):
    """A LoRA that fits could not be loaded all the same (out of memory, a library failure)."""
