"""A baked base model: one set of modules shared by the txt2img, img2img and inpaint pipelines."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from diffusers import (
    ControlNetUnionModel,
    DiffusionPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from transformers import PreTrainedTokenizerFast

from engine.errors import InputError
from engine.ip_adapter import IpAdapter
from engine.loras import LoraSet
from engine.metadata import checkpoint_hash
from engine.prompts import PromptEncoder

log = logging.getLogger(__name__)


def _tokenizers(folder: Path) -> dict[str, PreTrainedTokenizerFast]:
    """The CLIP tokenizers read from their tokenizer.json in Rust (the bake writes one where the
    model publishes only vocab.json + merges.txt): transformers' CLIPTokenizer rebuilds the
    vocabulary in Python at every load, about 0.2 s each and four per setup. The ids are the same
    (tested); only `decode` keeps CLIP's `</w>` word ends, and nothing here decodes. A folder
    without the file (baked before the bake wrote it) gets diffusers' own class."""
    return {
        name: PreTrainedTokenizerFast.from_pretrained(folder / name)
        for name in ("tokenizer", "tokenizer_2")
        if (folder / name / "tokenizer.json").is_file()
    }


class BaseModel:
    """One SDXL-family model folder loaded onto the device, with its three pipelines."""

    def __init__(self, model_id: str, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        start = time.perf_counter()
        self.model_id = model_id
        self.model_hash = checkpoint_hash(folder)  # A1111's "Model hash" when baked from one checkpoint file
        self.txt2img = StableDiffusionXLPipeline.from_pretrained(
            folder,
            dtype=dtype,
            device_map=str(device),
            local_files_only=True,
            use_safetensors=True,
            **_tokenizers(folder),
        )
        vae = self.txt2img.vae
        if vae.config.force_upcast and vae.dtype == torch.float32:
            # Already float32: the pipelines' per-call "upcast" would cast it to itself and back,
            # warning each time in the user's logs (fp16 runs use the fp16-fix VAE, which needs none).
            vae.register_to_config(force_upcast=False)
        # Built on the same module objects, nothing copied or cast (from_pipe would cast to fp32
        # unless told the dtype, and warns while doing it).
        self.img2img = StableDiffusionXLImg2ImgPipeline(**self.txt2img.components)
        self.inpaint = StableDiffusionXLInpaintPipeline(**self.txt2img.components)
        # ControlNet pipelines, on the same modules, once a ControlNet is attached (attach_controlnet).
        self.control_txt2img: StableDiffusionXLControlNetUnionPipeline | None = None
        self.control_img2img: StableDiffusionXLControlNetUnionImg2ImgPipeline | None = None
        self.control_inpaint: StableDiffusionXLControlNetUnionInpaintPipeline | None = None
        for pipe in self.pipelines:
            pipe.set_progress_bar_config(disable=True)
        self.device = device
        self.ip_adapter: IpAdapter | None = None  # set by load_ip_adapter when the adapter is baked
        self.lora_set = LoraSet(self.txt2img, model_id)  # on the shared modules: all three pipelines see it
        self.prompts = PromptEncoder(self.txt2img)
        self.scheduler_config = dict(self.txt2img.scheduler.config)
        self.native_resolution = self.txt2img.default_sample_size * self.txt2img.vae_scale_factor
        self.max_clip_skip = min(
            enc.config.num_hidden_layers - 1 for enc in (self.txt2img.text_encoder, self.txt2img.text_encoder_2)
        )
        log.info(
            "loaded %s from %s in %.1fs (native %d px, %s, %s)",
            model_id,
            folder,
            time.perf_counter() - start,
            self.native_resolution,
            device,
            dtype,
        )

    @property
    def pipelines(self) -> tuple[DiffusionPipeline, ...]:
        control = (self.control_txt2img, self.control_img2img, self.control_inpaint)
        return (self.txt2img, self.img2img, self.inpaint, *(p for p in control if p is not None))

    def attach_controlnet(self, controlnet: ControlNetUnionModel) -> None:
        """The three ControlNet pipelines on this model's own modules and the shared ControlNet."""
        components = {**self.txt2img.components, "controlnet": controlnet}
        self.control_txt2img = StableDiffusionXLControlNetUnionPipeline(**components)
        self.control_img2img = StableDiffusionXLControlNetUnionImg2ImgPipeline(**components)
        self.control_inpaint = StableDiffusionXLControlNetUnionInpaintPipeline(**components)
        for pipe in (self.control_txt2img, self.control_img2img, self.control_inpaint):
            pipe.set_progress_bar_config(disable=True)

    def load_ip_adapter(self, folder: Path, shared: IpAdapter | None) -> IpAdapter:
        """Load the baked IP-Adapter for the UNet (installed only while a request uses it), or share
        `shared`'s adapter modules and image encoder; img2img and inpaint get the encoder too."""
        start = time.perf_counter()
        self.ip_adapter = IpAdapter(self.txt2img, folder, shared)
        for pipe in (self.img2img, self.inpaint):
            pipe.register_modules(
                image_encoder=self.txt2img.image_encoder, feature_extractor=self.txt2img.feature_extractor
            )
        how = "shares the IP-Adapter loaded for another model" if self.ip_adapter.shares else "loaded the IP-Adapter"
        log.info("%s %s in %.1fs", self.model_id, how, time.perf_counter() - start)
        return self.ip_adapter

    def use_vae(self, vae: torch.nn.Module) -> None:
        """Take another model's identical VAE module, in all three pipelines."""
        for pipe in self.pipelines:
            pipe.register_modules(vae=vae)

    def move(self, device: torch.device) -> float:
        """Move the shared modules (all three pipelines follow); returns the seconds it took."""
        start = time.perf_counter()
        self.txt2img.to(device)
        if self.ip_adapter is not None:  # held outside the UNet between requests
            self.ip_adapter.modules.to(device)
        self.device = device
        return time.perf_counter() - start

    def check_clip_skip(self, clip_skip: int) -> None:
        if clip_skip > self.max_clip_skip:
            raise InputError(f"clip_skip {clip_skip} is too deep for {self.model_id}: at most {self.max_clip_skip}")
