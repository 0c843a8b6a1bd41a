"""Hugging Face for training: upload the result (hf_repo_id + hf_token) and fetch a pretrained
LoRA to package without training (skip_training_and_use_pretrained_hf_lora_url).

Both go through huggingface_hub, which honours HF_ENDPOINT (the tests point it at a loopback hub).
A failed upload is reported, never swallowed: the caller logs it and returns it with the tar.
The token never reaches a log, message or file: messages are scrubbed of it before they leave.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors import SafetensorError, safe_open

from engine.errors import InputError
from weightstore.config import hf_endpoint

log = logging.getLogger(__name__)

# The Hub repositories the baked models come from (bake/manifest.json), for the model card.
BASE_MODEL_REPOS = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "illustrious-xl": "OnomaAIResearch/Illustrious-xl-early-release-v0",
}
_LORA_URL = re.compile(r"^/([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+\.safetensors)$")


def _quiet_http() -> None:
    """huggingface_hub's HTTP client (httpx2) logs every request line at INFO: not the user's business."""
    logging.getLogger("httpx2").setLevel(logging.WARNING)


def scrub(text: str, *secrets: str | None) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def model_card(repo_id: str, trigger: str, model: str, record: dict, files: list[str]) -> str:
    """README.md for the Hub: front matter the Hub indexes, then how to use the files uploaded."""
    lines = ["---", "tags:", "- text-to-image", "- stable-diffusion-xl", "- lora", "- diffusers"]
    if model in BASE_MODEL_REPOS:
        lines.append(f"base_model: {BASE_MODEL_REPOS[model]}")
    if trigger:
        lines.append(f"instance_prompt: {json.dumps(trigger)}")
    lines += ["---", "", f"# {repo_id.rsplit('/', 1)[-1]}", ""]
    lines.append(f"An SDXL-family LoRA for `{model}`, made with `cog train` (Replicate's Flux trainer inputs).")
    if trigger:
        lines += ["", "## Trigger word", "", f"Write `{trigger}` in your prompt to use the trained subject or style."]
    lines += ["", "## Files", ""]
    for name in files:
        if name in _FILE_NOTES:
            lines.append(f"- `{name}`: {_FILE_NOTES[name]}")
        elif name.startswith("embeddings/"):
            lines.append(
                f"- `{name}`: the trigger's tokens as an A1111 / Forge / ComfyUI SDXL embedding: load it with "
                "the kohya LoRA and write its name where the trigger goes."
            )
    if "steps" in record:
        lines += ["", "## Training", ""]
        lines += [f"- {label}: {record[key]}" for key, label in _TRAINING_NOTES.items()]
    return "\n".join(lines) + "\n"


_FILE_NOTES = {
    "lora.safetensors": "diffusers layout (`pipe.load_lora_weights(repo, weight_name='lora.safetensors')`).",
    "lora_kohya.safetensors": "kohya layout, for AUTOMATIC1111, Forge and ComfyUI.",
    "embeddings.pti": "the trigger's learned tokens (Replicate's SDXL trainer layout, with special_params.json).",
}
_TRAINING_NOTES = {
    "steps": "Steps",
    "learning_rate": "Learning rate",
    "lora_rank": "LoRA rank",
    "optimizer": "Optimizer",
    "resolution": "Resolutions",
}


def upload(folder: Path, repo_id: str, token: str) -> str:
    """Create the repository if needed (public, as Flux's trainer does) and upload the folder.

    Returns the repository's URL; raises InputError with the Hub's reason (token scrubbed).
    """
    _quiet_http()
    api = HfApi(endpoint=hf_endpoint(), token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True, private=False)
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message="Upload LoRA trained with cog train",
        )
    except Exception as exc:  # any failure (HTTP, network, disk) is reported with the tar, never raised past it
        raise InputError(
            f"upload to Hugging Face repository {repo_id} failed: {type(exc).__name__}: "
            f"{scrub(str(exc), token)[:400]}. "
            "Check that hf_token has write access to it (huggingface.co/settings/tokens)"
        ) from None
    return str(url)


def fetch_pretrained(url: str, token: str | None, dest: Path) -> tuple[str, Path]:
    """Download a LoRA .safetensors named by its Hub URL into dest; returns (repo id, file)."""
    parts = urlsplit(url)
    hosts = {"huggingface.co", urlsplit(hf_endpoint()).netloc}
    match = _LORA_URL.match(unquote(parts.path)) if parts.netloc in hosts else None
    if parts.scheme not in ("http", "https") or match is None:
        raise InputError(
            "skip_training_and_use_pretrained_hf_lora_url must be a Hugging Face file URL ending in "
            ".safetensors, such as https://huggingface.co/owner/repo/resolve/main/lora.safetensors"
        )
    repo_id, revision, filename = match.groups()
    _quiet_http()
    try:
        path = Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                token=token or False,
                cache_dir=dest / "hub",
                endpoint=hf_endpoint(),
            )
        )
    except RepositoryNotFoundError:
        raise InputError(
            f"skip_training_and_use_pretrained_hf_lora_url: repository {repo_id} was not found (or is private: "
            "pass hf_token)"
        ) from None
    except (EntryNotFoundError, RevisionNotFoundError):
        raise InputError(
            f"skip_training_and_use_pretrained_hf_lora_url: {filename} at revision {revision} is not in {repo_id}"
        ) from None
    except Exception as exc:  # HTTP, network (httpx2 errors are no OSError) or disk
        raise InputError(
            f"skip_training_and_use_pretrained_hf_lora_url could not be downloaded ({type(exc).__name__}: "
            f"{scrub(str(exc), token)[:300]}): check the URL, or try again"
        ) from None
    try:
        with safe_open(path, "pt") as f:
            if not list(f.keys()):
                raise InputError(f"skip_training_and_use_pretrained_hf_lora_url: {filename} holds no tensors")
    except SafetensorError:
        raise InputError(
            f"skip_training_and_use_pretrained_hf_lora_url: {filename} is not a readable .safetensors file"
        ) from None
    return repo_id, path
