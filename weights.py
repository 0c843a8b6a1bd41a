"""The weights story: where a string points (resolve), how bytes arrive (download), what is kept.

What is here today: the baked-weights root, and Hugging Face file downloads through
huggingface_hub with a per-request token (no global login), honouring HF_ENDPOINT, with
errors that say what to do and never show the token. LoRA resolution for every source, the
other downloaders and the LRU cache come with the LoRA work (see README, "Not done yet").
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from engine.config import weights_root

__all__ = ["WeightsError", "download_hf_file", "hf_endpoint", "weights_root"]

DEFAULT_HF_ENDPOINT = "https://huggingface.co"


class WeightsError(RuntimeError):
    """Weights that could not be had; the message says what to do and holds no secret."""


def hf_endpoint() -> str:
    """Read at call time, so tests and deployments can point it elsewhere."""
    return os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT


def download_hf_file(
    repo_id: str, filename: str, dest_dir: Path, revision: str = "main", token: str | None = None
) -> Path:
    """Fetch one file of a model repo into dest_dir.

    Each call gets a fresh hub cache: huggingface_hub answers a 401 or a 5xx with a copy it
    cached earlier, which would hand one caller's private file to another without a token.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    where = f"{filename} in {repo_id}@{revision}"
    try:
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".hub-") as cache:
            path = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                token=token or os.environ.get("HF_TOKEN") or False,
                cache_dir=cache,
                endpoint=hf_endpoint(),
            )
            target = dest_dir / Path(filename).name
            os.replace(Path(path).resolve(), target)
            return target
    except GatedRepoError as exc:
        raise WeightsError(
            f"Hugging Face repo {repo_id} is gated: accept its terms on the hub, then pass hf_api_token"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise WeightsError(
            f"Hugging Face repo {repo_id} was not found, or it is private: check the name, "
            "or pass an hf_api_token that can read it"
        ) from exc
    except RevisionNotFoundError as exc:
        raise WeightsError(f"revision {revision!r} does not exist in Hugging Face repo {repo_id}") from exc
    except EntryNotFoundError as exc:
        raise WeightsError(f"{where} was not found: check the file name") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no response"
        raise WeightsError(f"Hugging Face answered {status} for {where}") from exc
