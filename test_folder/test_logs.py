"""A prediction's logs are what a Replicate user reads: the engine's lines, no library noise."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from test_folder.conftest import CogServer, image_data_uri

BASE = {"prompt": "a cat", "num_inference_steps": 2, "megapixels": "0.25", "seed": 7, "output_format": "png"}
# Library messages seen in predictions before: PEFT's multi-adapter warning, transformers' report of
# the other adapters' weights as missing, diffusers' VAE cast warning and its issue-tracker links.
NOISE = (
    "peft_config",
    "LOAD REPORT",
    "should be kept in float32",
    "Casting directly",
    "github.com",
    "open an issue",
    "Warning",
    "warnings.warn",
)


def lora_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def run(server: CogServer, **inputs: Any) -> str:
    status, body = server.predict({**BASE, **inputs})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    return body["logs"]


def noisy_lines(logs: str) -> list[str]:
    return [line for line in logs.splitlines() if any(n in line for n in NOISE)]


def test_lora_switches_img2img_and_inpaint_log_only_the_engine(
    cog_server: CogServer, lora_files: dict[str, bytes]
) -> None:
    unet_only, kohya, with_te, kohya_te = (lora_uri(lora_files[k]) for k in ("a", "b", "te", "kohya_te"))
    image = image_data_uri(Image.new("RGB", (96, 64), (200, 40, 40)))
    mask = image_data_uri(Image.new("L", (96, 64), 255))
    steps = [
        {"lora_weights": unet_only},  # no text-encoder weights
        {"lora_weights": unet_only, "extra_lora": kohya},  # a second UNet adapter
        {"lora_weights": with_te},
        {"lora_weights": with_te, "extra_lora": kohya_te},  # a second text-encoder adapter
        {"lora_weights": kohya_te, "image": image},
        {"image": image, "mask": mask},
    ]
    noisy = []
    for inputs in steps:
        logs = run(cog_server, **inputs)
        noisy += noisy_lines(logs)
        assert "seed: 7" in logs and "generated 1 image(s)" in logs
        assert "no deep features reused (under 25 steps" in logs  # go_fast over 1 or 2 steps
        if "lora_weights" in inputs:
            assert "LoRAs active on illustrious-xl" in logs
    assert not noisy, "\n".join(noisy)


def test_setup_log_has_no_library_noise(cog_server: CogServer) -> None:
    """Importing diffusers' pipelines makes transformers warn that three image processors fall back
    to PIL (the image has no torchvision on purpose); the server's log, setup included, shows none."""
    log = Path(cog_server.log.name).read_text()
    assert "loaded illustrious-xl" in log, "the log holds setup's lines"
    assert "requires torchvision" not in log
    assert "should be kept in float32" not in log, "diffusers' empty fp32 warning, whatever the UNet's class"


def test_only_the_torchvision_fallback_message_is_dropped() -> None:
    logger = logging.getLogger("transformers.utils.import_utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.warning("`XImageProcessor` requires torchvision (not installed); falling back to `XImageProcessorPil`")
        logger.warning("Could not import module 'X'")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Could not import module 'X'"]
