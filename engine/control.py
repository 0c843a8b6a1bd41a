"""ControlNet: one baked union ControlNet shared by every base model, and the control maps it reads.

A union ControlNet (xinsir's promax) covers pose, depth, scribble, canny/lineart, normal, segment
and tile in one model, selected per request by its `control_mode` index, so one 2.5 GB file
replaces six or more single-type ControlNets. Maps are made here from a plain photo where that
needs no extra detector: canny edges (OpenCV), depth (a small baked Depth Anything V2 through
transformers) and tile (the image itself); every other type takes a ready map.

Both artifacts are optional at load: without them a request that uses them is refused, saying the
image was built without them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from diffusers import ControlNetUnionModel, StableDiffusionXLControlNetUnionInpaintPipeline
from PIL import Image, ImageOps
from transformers import DepthAnythingForDepthEstimation, DPTImageProcessorPil

from engine.config import (
    CANNY_HIGH_THRESHOLD,
    CANNY_LOW_THRESHOLD,
    CONTROL_MODES,
    CONTROL_PREPROCESSORS,
    CONTROLNET_DIR,
    DEPTH_ESTIMATOR_DIR,
)
from engine.deepcache import DeepFeatureCache
from engine.errors import InputError
from engine.request import GenerationRequest

log = logging.getLogger(__name__)

NOT_BAKED = (
    "this image was built without {what}: control_image cannot be used here "
    "(see docs/guidance-and-conditioning.md, 'ControlNet')"
)


class Control:
    """The baked union ControlNet and, when baked, the depth estimator, on one device."""

    def __init__(
        self,
        controlnet: ControlNetUnionModel | None,
        depth: tuple[DepthAnythingForDepthEstimation, DPTImageProcessorPil] | None = None,
    ) -> None:
        self.controlnet = controlnet
        self.depth = depth

    @classmethod
    def load(cls, root: Path, device: torch.device, dtype: torch.dtype) -> Control:
        """Whatever of the two folders is baked; one log line for each that is not."""
        start = time.perf_counter()
        controlnet = depth = None
        if (root / CONTROLNET_DIR).is_dir():
            controlnet = ControlNetUnionModel.from_pretrained(
                root / CONTROLNET_DIR, dtype=dtype, device_map=str(device), local_files_only=True
            )
        else:
            log.info("ControlNet not baked (no %s folder): requests with control_image are refused", CONTROLNET_DIR)
        if (root / DEPTH_ESTIMATOR_DIR).is_dir():
            folder = root / DEPTH_ESTIMATOR_DIR
            model = DepthAnythingForDepthEstimation.from_pretrained(
                folder, dtype=dtype, device_map=str(device), local_files_only=True
            )
            processor = DPTImageProcessorPil.from_pretrained(folder, local_files_only=True)
            depth = (model.eval(), processor)
        else:
            log.info("depth estimator not baked (no %s folder): depth maps must be sent ready", DEPTH_ESTIMATOR_DIR)
        if controlnet is not None:
            log.info(
                "loaded ControlNet (%d control modes)%s in %.1fs",
                controlnet.config.num_control_type,
                " and depth estimator" if depth else "",
                time.perf_counter() - start,
            )
        return cls(controlnet, depth)

    def check(self, req: GenerationRequest) -> None:
        """Refuse what this image cannot do, before any work (request.validate checked the rest)."""
        if req.control_image is None:
            return
        if self.controlnet is None:
            raise InputError(NOT_BAKED.format(what="a ControlNet"))
        mode = CONTROL_MODES[req.control_type]
        if mode >= self.controlnet.config.num_control_type:
            raise InputError(
                f"control_type {req.control_type} is not supported by the baked ControlNet "
                f"(it has {self.controlnet.config.num_control_type} control modes): choose another control_type"
            )
        if req.control_preprocess and req.control_type == "depth" and self.depth is None:
            raise InputError(
                "this image was built without the depth estimator: send a ready depth map with control_preprocess false"
            )

    def control_map(self, req: GenerationRequest, width: int, height: int) -> Image.Image:
        """The map the ControlNet reads, at the output's size: cropped to its proportions, then resized
        (A1111's "crop and resize"), and preprocessed when asked."""
        assert req.control_image is not None
        image = ImageOps.fit(req.control_image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
        if not req.control_preprocess or req.control_type == "tile":
            return image
        if req.control_type == "canny":
            edges = cv2.Canny(np.asarray(image.convert("L")), CANNY_LOW_THRESHOLD, CANNY_HIGH_THRESHOLD)
            return Image.fromarray(edges).convert("RGB")
        return self._depth_map(image)

    @torch.inference_mode()
    def _depth_map(self, image: Image.Image) -> Image.Image:
        """Relative inverse depth (near is bright), scaled to 0-255, as depth ControlNets are trained on."""
        assert self.depth is not None
        model, processor = self.depth
        inputs = processor(images=image, return_tensors="pt").to(model.device, model.dtype)
        outputs = model(**inputs)
        depth = processor.post_process_depth_estimation(outputs, target_sizes=[(image.height, image.width)])
        depth = depth[0]["predicted_depth"].float()
        low, high = depth.min(), depth.max()
        scaled = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
        return Image.fromarray((scaled * 255).round().to(torch.uint8).cpu().numpy()).convert("RGB")


def preprocessor_name(req: GenerationRequest) -> str:
    """A1111's "Module": the preprocessor that made the map ("none" when it was sent ready)."""
    return CONTROL_PREPROCESSORS[req.control_type] if req.control_preprocess else "none"


def unit_text(req: GenerationRequest) -> str:
    """A1111's ControlNet unit text for the image metadata: preprocessor, model, type, weight, range."""
    return (
        f"Module: {preprocessor_name(req)}, Model: {CONTROLNET_DIR}, Control type: {req.control_type}, "
        f"Weight: {req.control_strength:g}, Guidance Start: {req.control_start:g}, Guidance End: {req.control_end:g}"
    )


def pipeline_kwargs(req: GenerationRequest, control_map: Image.Image) -> dict[str, Any]:
    """What the union pipelines take for one map of one type."""
    return {
        "control_image": [control_map],
        "control_mode": [CONTROL_MODES[req.control_type]],
        "controlnet_conditioning_scale": float(req.control_strength),
        "control_guidance_start": float(req.control_start),
        "control_guidance_end": float(req.control_end),
    }


def keeps_cfg_cutoff(pipe: Any) -> bool:
    """Whether go_fast's guidance cutoff can halve this pipeline's batch.

    diffusers' union inpaint pipeline takes back only the latents, prompt embeddings and control
    image from the step callback, not the pooled embeddings, time ids or mask it also offers, so a
    halved batch would be mixed with a full one. It keeps guidance on every step instead.
    """
    return not isinstance(pipe, StableDiffusionXLControlNetUnionInpaintPipeline)


class _FirstBlockDone(Exception):
    """Raised by a hook to end the ControlNet's forward once its first down block has run."""

    def __init__(self, res_samples: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.res_samples = res_samples


def shallow_residuals(controlnet: ControlNetUnionModel, count: int, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """The first `count` residuals of the ControlNet, computed by its own forward stopped after the
    first down block: exactly what the whole forward returns first, without its deep half.

    go_fast's cached steps add only these to the UNet's shallow path (the UNet's `conv_in` and
    first-down-block skips); the deeper residuals and the mid-block one would be thrown away.
    """
    first = controlnet.down_blocks[0]
    seen: list[torch.Tensor] = []

    def before(module: torch.nn.Module, args: tuple, block_kwargs: dict[str, Any]) -> None:
        seen.append(block_kwargs["hidden_states"] if "hidden_states" in block_kwargs else args[0])

    def after(module: torch.nn.Module, args: tuple, block_kwargs: dict[str, Any], output: Any) -> None:
        raise _FirstBlockDone(output[1])

    handles = [
        first.register_forward_pre_hook(before, with_kwargs=True),
        first.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        type(controlnet).forward(controlnet, **kwargs)  # the class's own, not a wrapper installed around it
    except _FirstBlockDone as done:
        samples = (seen[0], *done.res_samples)[:count]
    else:
        raise RuntimeError("the ControlNet's first down block did not run")
    finally:
        for handle in handles:
            handle.remove()
    # The whole forward's tail for these residuals: its zero convolutions, then one type's scale.
    scale = kwargs["conditioning_scale"]
    scale = scale[0] if isinstance(scale, list) else scale
    blocks = controlnet.controlnet_down_blocks[: len(samples)]
    return tuple(block(sample) * scale for sample, block in zip(samples, blocks, strict=True))


@contextlib.contextmanager
def guided(controlnet: ControlNetUnionModel, deep: DeepFeatureCache | None, residuals: int) -> Iterator[None]:
    """The ControlNet's calls for one pipeline call: its conditioning follows the latents' batch,
    and on go_fast's cached steps (`deep`) only its first `residuals` residuals are computed.

    The union pipelines stack the control image and its mode row once per guidance half and never
    halve them when the guidance cutoff halves the rest. Both halves are copies, so keeping the
    last rows for a halved batch is exactly what an unguided call would have built.
    """
    full = controlnet.forward

    def forward(sample: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        rows = sample.shape[0]
        kwargs["controlnet_cond"] = [cond[-rows:] for cond in kwargs["controlnet_cond"]]
        kwargs["control_type"] = kwargs["control_type"][-rows:]
        if deep is not None and not deep.is_full(deep.calls) and len(kwargs["control_type_idx"]) == 1:
            first = shallow_residuals(controlnet, residuals, sample=sample, timestep=timestep, **kwargs)
            return first, None  # the UNet's shallow path reads nothing else
        return full(sample, timestep, **kwargs)

    controlnet.forward = forward
    try:
        yield
    finally:
        del controlnet.forward  # the class's own forward again
