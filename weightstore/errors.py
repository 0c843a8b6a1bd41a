"""The one error type the weights story lets escape, and what a full disk means."""

import errno


class WeightsError(RuntimeError):
    """Weights that could not be had. The message says what to do and holds no secret: coglet
    shows the class name and the message to the user as they are."""


def is_disk_full(exc: BaseException) -> bool:
    """An OSError that means the disk (or the user's quota) has no room left."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(what: str) -> WeightsError:
    """What a full disk means for the user: not their input; the operator frees space."""
    return WeightsError(
        f"the server's disk is full, so {what} could not be stored: try again later "
        "(the operator can free disk space, or lower LORA_CACHE_MAX_BYTES)"
    )
