"""Weights & Biases logging for training (the Flux trainer's wandb_* inputs), with the wandb package.

Started before any training step, so a bad key or project fails the training at once, by name.
The key goes to wandb in its settings only: nothing is written to ~/.netrc (`wandb.login` would
store it there for every later training on the same server). wandb's own files go to WANDB_DIR
when it is set (kept: an offline run is synced from there), else to a folder removed after the run.
A logging call that fails during training is logged once and training goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from engine.errors import InputError
from training.hub import scrub

log = logging.getLogger(__name__)


class WandbRun:
    """One wandb run: loss per step, sample images, intermediate LoRA files."""

    def __init__(
        self, api_key: str, project: str, entity: str | None, name: str | None, config: dict[str, Any]
    ) -> None:
        import wandb

        self._wandb = wandb
        self._key = api_key
        self._own_dir = None if os.environ.get("WANDB_DIR") else Path(tempfile.mkdtemp(prefix="wandb-"))
        self._warned = False
        try:
            self.run = wandb.init(
                project=project,
                entity=entity,
                name=name,
                config=config,
                dir=str(self._own_dir) if self._own_dir else None,
                save_code=False,
                settings=wandb.Settings(api_key=api_key, silent=True, console="off", x_disable_machine_info=True),
            )
        except Exception as exc:
            self._cleanup()
            raise InputError(
                f"wandb_api_key: could not start a Weights & Biases run ({type(exc).__name__}: "
                f"{scrub(str(exc), api_key)[:300]}): check the key, wandb_project and wandb_entity"
            ) from None
        log.info("wandb: logging to project %s, run %s", project, self.run.name)

    def _failed(self, what: str, exc: Exception) -> None:
        if not self._warned:
            log.warning(
                "wandb: %s failed (%s: %s); training goes on", what, type(exc).__name__, scrub(str(exc), self._key)
            )
            self._warned = True

    def log(self, values: dict[str, float], step: int) -> None:
        try:
            self.run.log(values, step=step)
        except Exception as exc:
            self._failed("logging", exc)

    def samples(self, images: list[tuple[str, Image.Image]], step: int) -> None:
        try:
            self.run.log({f"samples/{p[:50]}": self._wandb.Image(img, caption=p) for p, img in images}, step=step)
        except Exception as exc:
            self._failed("sample logging", exc)

    def save(self, path: Path) -> None:
        """A copy in the run's own folder: wandb uploads in the background, after `path` may be gone."""
        try:
            kept = Path(self.run.dir) / path.name
            shutil.copyfile(path, kept)
            self.run.save(str(kept), base_path=self.run.dir, policy="now")
        except Exception as exc:
            self._failed("saving weights", exc)

    def finish(self) -> None:
        try:
            self.run.finish()
        except Exception as exc:
            self._failed("finishing the run", exc)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
