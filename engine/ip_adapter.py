"""IP-Adapter: "look like this reference image", through diffusers' own `load_ip_adapter`.

Loading an IP-Adapter replaces every cross-attention processor of the UNet and gives it an image
projection (`encoder_hid_proj`); from then on the UNet requires image embeddings on every call.
So the adapter is loaded once at setup and then taken out again: both processor sets and the
projection are kept, and a request with a reference image installs the IP set for its pipeline
call only. Every other request runs the UNet exactly as an engine without the adapter does (the
plain processors are the UNet's own objects, put back). Setting processors is a dictionary walk
over the attention modules, no weight moves.

Every base model is SDXL-shaped and the adapter file is one, so the models share one set of adapter
modules and one image encoder: loaded once (0.8 GB in fp16 for the adapter, 1.2 GB for ViT-H),
installed into whichever UNet runs the request.

The guidance cutoff (engine/steps.py) halves the batch mid-run through the pipeline's callback,
which cannot reach the image embeddings; a forward pre-hook keeps their conditional half then.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from engine.config import IP_ADAPTER_ENCODER_DIR, IP_ADAPTER_WEIGHT_NAME
from engine.request import GenerationRequest

log = logging.getLogger(__name__)

IP_ADAPTER_NAME = IP_ADAPTER_WEIGHT_NAME.removesuffix(".safetensors")


class IpAdapter:
    """The adapter loaded into one base model's UNet, installed only around a pipeline call."""

    def __init__(self, pipe: StableDiffusionXLPipeline, folder: Path, shared: IpAdapter | None = None) -> None:
        self.pipe = pipe
        self.unet = pipe.unet
        self.plain = self.unet.attn_processors
        if shared is not None:  # one image encoder for every model: load_ip_adapter keeps a registered one
            pipe.register_modules(image_encoder=shared.image_encoder, feature_extractor=shared.feature_extractor)
            if shared.layout == self.layout:  # the same UNet shape: the same adapter modules fit it
                self.processors, self.projection, self.modules = shared.processors, shared.projection, shared.modules
                self.values = shared.values
                self.image_encoder, self.feature_extractor = shared.image_encoder, shared.feature_extractor
                self.shares = True
                return
        self.shares = False
        # diffusers' own load, unchanged: it lists the UNet's processors (a walk of every module) about
        # 146 times at SDXL size, 0.4-1 s of setup on a CPU, once per process (the models share it).
        pipe.load_ip_adapter(
            str(folder),
            subfolder="",
            weight_name=IP_ADAPTER_WEIGHT_NAME,
            image_encoder_folder=IP_ADAPTER_ENCODER_DIR,
            local_files_only=True,
        )
        self.image_encoder = pipe.image_encoder
        self.feature_extractor = pipe.feature_extractor
        self.projection = self.unet.encoder_hid_proj
        # The Plus projection holds attention modules of its own: keep only the UNet's processors,
        # and set them while no projection is in place (as load_ip_adapter does).
        self.processors = {
            name: processor
            for name, processor in self.unet.attn_processors.items()
            if not name.startswith("encoder_hid_proj.")
        }
        self.values = _scaled_values(self.processors.values())
        # What moves with the model (BaseModel.move) while it is not installed in the UNet.
        self.modules = torch.nn.ModuleList(
            [self.projection, *(p for p in self.processors.values() if isinstance(p, torch.nn.Module))]
        )
        self._uninstall()

    @property
    def layout(self) -> tuple[Any, ...]:
        """What decides the shapes of the adapter's weights in this UNet."""
        config = self.unet.config
        return tuple(self.plain), tuple(config.block_out_channels), config.cross_attention_dim

    def _uninstall(self) -> None:
        self.unet.encoder_hid_proj = None
        # diffusers sets and clears this attribute the same way (load_ip_adapter, unload_ip_adapter).
        self.unet.config.encoder_hid_dim_type = None
        self.unet.set_attn_processor(dict(self.plain))  # it pops from the dict it is given

    @contextlib.contextmanager
    def installed(self, scale: float) -> Iterator[None]:
        """The IP processors and projection in the UNet, at this scale, for one pipeline call."""
        self.unet.set_attn_processor(dict(self.processors))
        self.unet.encoder_hid_proj = self.projection
        self.unet.config.encoder_hid_dim_type = "ip_image_proj"
        for values in self.values:  # the processors' own scale stays 1 (see _ScaledValues)
            values.scale.fill_(scale)
        hook = self.unet.register_forward_pre_hook(_conditional_half_after_cutoff, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
            self._uninstall()

    @contextlib.contextmanager
    def used(self, pipe: StableDiffusionXLPipeline, req: GenerationRequest) -> Iterator[dict[str, Any]]:
        """Installed for one pipeline call of `req`; yields the pipeline's arguments for its references."""
        with self.installed(req.ip_adapter_scale):
            guided = req.cfg_scale > 1 and pipe.unet.config.time_cond_proj_dim is None  # the pipelines' rule
            start = time.perf_counter()
            embeds = self.embeds(pipe, req.ip_adapter_images, guided)
            log.info(
                "IP-Adapter: %d reference image(s) at scale %g, encoded in %.2fs",
                len(req.ip_adapter_images),
                req.ip_adapter_scale,
                time.perf_counter() - start,
            )
            yield {"ip_adapter_image_embeds": embeds}

    def embeds(self, pipe: StableDiffusionXLPipeline, images: Sequence[Image.Image], guided: bool) -> list[Any]:
        """The reference images through the image encoder once, in the form the pipelines take as
        `ip_adapter_image_embeds` (negative half first when guided). Only while installed."""
        with torch.no_grad():
            return pipe.prepare_ip_adapter_image_embeds(
                [[image.convert("RGB") for image in images]], None, pipe._execution_device, 1, guided
            )


class _ScaledValues(torch.nn.Linear):
    """An adapter's value projection (its own weight, same state-dict keys) times the request's
    scale, which it holds as a tensor.

    diffusers' IP processors multiply their attention output by `processor.scale`, a Python float
    that torch.compile specialises on: every new ip_adapter_scale was a new graph of every compiled
    block, and past the recompile limit a failed request. Attention is linear in its values, so
    scaling them gives the same output, and a buffer is an input of the compiled graphs, read
    afresh at each call. The processors' own scale stays 1."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the loaded parameters, not copies
        weight = linear.weight
        self.register_buffer("scale", torch.ones((), dtype=weight.dtype, device=weight.device), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens) * self.scale


def _scaled_values(processors: Iterable[Any]) -> list[_ScaledValues]:
    """Each IP processor's value projections wrapped in a _ScaledValues, once, at load."""
    wrapped = []
    for processor in processors:
        if isinstance(getattr(processor, "to_v_ip", None), torch.nn.ModuleList):
            processor.to_v_ip = torch.nn.ModuleList(_ScaledValues(linear) for linear in processor.to_v_ip)
            wrapped.extend(processor.to_v_ip)
    return wrapped


def _conditional_half_after_cutoff(
    unet: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """After the guidance cutoff the latents are half the batch the image embeddings were made
    for ([negative, positive]): keep the positive half, as the cutoff does for the prompt."""
    added = kwargs.get("added_cond_kwargs") or {}
    embeds = added.get("image_embeds")
    sample = args[0] if args else kwargs["sample"]
    if embeds is None or embeds[0].shape[0] == sample.shape[0]:
        return None
    kwargs["added_cond_kwargs"] = {**added, "image_embeds": [e.chunk(2)[-1] for e in embeds]}
    return args, kwargs
