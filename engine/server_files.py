"""Which files of this server a request may name by path: one rule for every input.

Whoever can reach the model sends requests (on Replicate, every caller of a shared instance),
so a path in a request names a file of the server, never one of the caller. A request may name
one only inside the folder the operator opens with LOCAL_FILES_DIR; unset (as in the image),
none. Everything else a request reads is the caller's own: the file the runtime stored from the
caller's URL or data: URI (image inputs, decided by the Cog adapter), or a LoRA the weights
store downloads.

A refusal is decided before the file is opened, without looking at it when no folder is open,
and reads the same whatever the path (a file, a missing one, a directory, not an image), so no
request learns what the server holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from engine.config import LOCAL_FILES_ENV, local_files_dir
from engine.errors import InputError


def server_file(path: str, what: str, send_instead: str, error: Callable[[str], Exception] = InputError) -> Path:
    """The file a request named by path, when it lies inside LOCAL_FILES_DIR (a relative path is
    read from there; links are followed before the check, so one that leads out is refused).
    Anything else raises `error` with the one refusal for `what`."""
    folder = local_files_dir()
    if folder is not None:
        try:
            target = (folder / os.path.expanduser(path)).resolve()  # an absolute path replaces the folder
        except (ValueError, OSError, RuntimeError):  # a NUL byte, a link loop: refused like the rest
            target = None
        if target is not None and target.is_relative_to(folder):
            return target
    raise error(
        f"{what} is a path on the server, and requests do not read the server's files: send {send_instead} "
        f"(the operator can open one folder for paths with {LOCAL_FILES_ENV})"
    )
