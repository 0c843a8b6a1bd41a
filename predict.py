"""Cog adapter: the Flux-compatible schema, turned into one GenerationRequest for the engine.

BasePredictor and predict() are used rather than cog 0.23's BaseRunner and run(): every
Cog CLI and Replicate's hosted runtime accept them, at the cost of a DeprecationWarning.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any, Optional

from cog import BasePredictor, Input, Path, Secret

from engine.config import (
    weights_root,
)
from engine.generator import Engine
from engine.infotext import apply_generation_data, one_generation_data
from engine.request import Credentials, GenerationRequest, cfg_from_flux, loras_from_flux
from engine.server_files import server_file
from utils import OutputFolders, load_image, read_generation_data, save_image
from weights import lora_store, lora_warm_max_bytes

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("predict")


def _image(value: Path | str | None, input_name: str) -> Image.Image | None:
    """An image input, read only when the caller sent it."""
    return None if value is None else load_image(_image_file(value, input_name), input_name)


def _image_file(value: Path | str, input_name: str) -> Path:
    """coglet stores a URL or data: URI in a temporary file and passes that as a cog Path; any
    other string reaches predict() exactly as sent, i.e. a path on this server:
    `engine/server_files.py` refuses it before it is opened."""
    if isinstance(value, Path):
        return value
    return server_file(str(value), input_name, "the image as an https URL or a data: URI")


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load every baked model from the weights root, with the LoRA store and the deployment's
        budget of parsed LoRAs (LORA_WARM_MAX_BYTES); no network is used."""
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
        self.engine = Engine.load(weights_root(), lora_source=lora_store(), warm_max_bytes=lora_warm_max_bytes())
        self.outputs = OutputFolders()

    def predict(
        self,
        prompt: str = Input(description="Prompt for the generated image"),
        aspect_ratio: str = Input(
            default="1:1",
            choices=["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"],
            description="Aspect ratio (Flux's table at 1 megapixel). 'custom' uses width and height. Ignored when an image is given: the output follows the image's proportions.",
        ),
        image: Optional[Path] = Input(
            default=None, description="Input image for img2img, or the image to inpaint when a mask is given"
        ),
        prompt_strength: float = Input(
            default=0.8, ge=0, le=1, description="How much the image changes in img2img/inpaint; 1 repaints fully"
        ),
        num_outputs: int = Input(default=1, ge=1, le=4, description="Number of images; output i uses seed+i"),
        num_inference_steps: int = Input(default=28, ge=1, le=50, description="Denoising steps"),
        guidance: float = Input(
            default=3,
            ge=0,
            le=10,
            description="Flux-style guidance. SDXL's CFG scale is guidance x 2 (3 gives 6), unless cfg_scale is set",
        ),
        seed: Optional[int] = Input(
            default=None,
            description="Random seed; unset or negative means random. 0 is a seed. Seeds past 2^64-1 are reduced modulo 2^64",
        ),
        output_format: str = Input(default="webp", choices=["webp", "jpg", "png"], description="Output image format"),
        output_quality: int = Input(default=80, ge=0, le=100, description="Quality for jpg and webp; not used for png"),
        disable_safety_checker: bool = Input(default=False, description="Skip the safety checker"),
        go_fast: bool = Input(
            default=True,
            description="Faster: from 25 steps, once sigma is below 3, only one step in 3 and the last run the whole UNet (the others reuse its deep features), and classifier-free guidance stops below sigma 0.28 (see docs/go-fast.md)",
        ),
        lora_weights: Optional[str] = Input(
            default=None,
            description="LoRA: Hugging Face (huggingface.co/owner/repo[/blob/main/x.safetensors], owner/repo/x.safetensors), CivitAI (civitai.com/models/<id>, api/download/models/<version>, AIR URN), Replicate (owner/model, .tar URL), any https URL, or a data: URI",
        ),
        lora_scale: float = Input(default=1.0, ge=-1, le=3, description="Scale of lora_weights"),
        extra_lora: Optional[str] = Input(default=None, description="A second LoRA, in any form lora_weights takes"),
        extra_lora_scale: float = Input(default=1.0, ge=-1, le=3, description="Scale of extra_lora"),
        megapixels: str = Input(default="1", choices=["1", "0.5", "0.25"], description="Approximate output size"),
        hf_api_token: Optional[Secret] = Input(default=None, description="Hugging Face token for private LoRAs"),
        civitai_api_token: Optional[Secret] = Input(default=None, description="CivitAI token for LoRAs that need one"),
        negative_prompt: str = Input(default="", description="What the image should not contain"),
        model: str = Input(
            default="illustrious-xl",
            choices=["illustrious-xl", "sdxl", "custom"],
            description="Base model; 'custom' is the checkpoint baked with CUSTOM_CHECKPOINT_URL, if any",
        ),
        use_standard_sdxl: bool = Input(default=False, description="Alias: true selects model 'sdxl'"),
        width: Optional[int] = Input(default=None, ge=256, le=1440, description="Width for aspect_ratio 'custom'"),
        height: Optional[int] = Input(default=None, ge=256, le=1440, description="Height for aspect_ratio 'custom'"),
        scheduler: str = Input(
            default="Euler a",
            choices=[
                "Euler a",
                "Euler",
                "DPM++ 2M",
                "DPM++ 2M Karras",
                "DPM++ 2M SDE",
                "DPM++ 2M SDE Karras",
                "DDIM",
                "UniPC",
            ],
            description="Sampler",
        ),
        cfg_scale: Optional[float] = Input(
            default=None, ge=0, le=20, description="SDXL classifier-free guidance; overrides guidance when set"
        ),
        clip_skip: int = Input(
            default=0,
            ge=0,
            le=4,
            description="CLIP layers to skip beyond SDXL's standard penultimate layer. 'Clip skip 2' on CivitAI SDXL/Illustrious pages is the standard, i.e. 0 here",
        ),
        mask: Optional[Path] = Input(default=None, description="Inpainting mask for image: white is repainted"),
        control_image: Optional[Path] = Input(
            default=None,
            description="ControlNet: an image whose outline, depth, pose ... the output follows (see control_type). It is cropped to the output's proportions",
        ),
        control_type: str = Input(
            default="none",
            choices=["none", "pose", "depth", "scribble", "canny", "lineart", "normal", "segment", "tile"],
            description="What to follow in control_image. Made from a plain photo here: canny, depth, tile; the others need a ready map (control_preprocess false)",
        ),
        control_strength: float = Input(
            default=0.8,
            ge=0,
            le=2,
            description="How strongly the ControlNet guides the image; 0 turns it off",
        ),
        control_start: float = Input(
            default=0, ge=0, le=1, description="Fraction of the steps at which the ControlNet starts guiding"
        ),
        control_end: float = Input(
            default=1, ge=0, le=1, description="Fraction of the steps at which it stops; above control_start"
        ),
        control_preprocess: bool = Input(
            default=True,
            description="Make the control map from control_image (canny edges, depth, tile). False: control_image already is the map (an OpenPose skeleton, a depth or line drawing)",
        ),
        return_control_map: bool = Input(
            default=False, description="Also return the control map that guided the image, as a PNG after the images"
        ),
        ip_adapter_image: Optional[list[Path]] = Input(
            default=None,
            description="Reference image(s) the output should look like (IP-Adapter): subject, style, colours. Up to 4; several are combined. Works with the prompt, LoRAs, image and mask",
        ),
        ip_adapter_scale: float = Input(
            default=0.6,
            ge=0,
            le=1.5,
            description="How strongly ip_adapter_image steers the output; 0 ignores it, about 1 follows it closely and the prompt matters less",
        ),
        upscale: str = Input(
            default="none",
            choices=["none", "2x", "4x"],
            description="Enlarge each image 2x or 4x with a built-in Swin2SR upscaler, after the safety checker (2x is its 4x result reduced). Refused past 16.8 megapixels, e.g. 4x of a size above 1 megapixel",
        ),
        generation_data: Optional[str] = Input(
            default=None,
            description="Generation data (parameters) as A1111, Forge or CivitAI show it: the prompt, a 'Negative prompt: ...' line and the 'Steps: ..., Sampler: ..., CFG scale: ..., Seed: ..., Size: ...' line. It sets every input left at its default; an input sent with another value wins (send an empty prompt to take the text's). <lora:NAME:weight> tags become LoRAs through CivitAI (Civitai resources or Lora hashes), up to 4. go_fast is off unless the text holds this model's go_fast fields. See docs/generation-data.md",
        ),
        generation_data_image: Optional[Path] = Input(
            default=None,
            description="An image whose embedded generation data is used as generation_data is: a PNG with A1111's 'parameters' text, or a JPEG/WebP with it in EXIF UserComment, as A1111 and Forge save them, CivitAI's downloads keep them and this model's outputs write them (send an output back to reproduce it). A ComfyUI PNG without that text is read from its graph (one KSampler, stock nodes; others are refused). Send this or generation_data, not both with different text. See docs/generation-data.md",
        ),
        embeddings: Optional[list[str]] = Input(
            default=None,
            description="Textual-inversion embeddings (SDXL files with clip_l and clip_g), up to 4, each in any form lora_weights takes. Call one in prompt or negative_prompt by its file name without the extension (as A1111 does), as embedding:NAME (as ComfyUI does), or by its CivitAI trigger word; e.g. a negative embedding in negative_prompt. Used for this prediction only. See docs/loras.md",
        ),
    ) -> list[Path]:
        defaulted = _at_default(locals())
        if generation_data_image is not None:
            file = _image_file(generation_data_image, "generation_data_image")
            generation_data = one_generation_data(generation_data, read_generation_data(file, "generation_data_image"))
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            model="sdxl" if use_standard_sdxl else model,
            aspect_ratio=aspect_ratio,
            megapixels=megapixels,
            width=width,
            height=height,
            image=_image(image, "image"),
            mask=_image(mask, "mask"),
            prompt_strength=prompt_strength,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            cfg_scale=cfg_from_flux(guidance, cfg_scale),
            seed=seed,
            scheduler=scheduler,
            clip_skip=clip_skip,
            go_fast=go_fast,
            safety_checker=not disable_safety_checker,
            loras=loras_from_flux(lora_weights, lora_scale, extra_lora, extra_lora_scale),
            credentials=Credentials(
                hf=hf_api_token.get_secret_value() if hf_api_token else None,
                civitai=civitai_api_token.get_secret_value() if civitai_api_token else None,
            ),
            control_image=_image(control_image, "control_image"),
            control_type=control_type,
            control_strength=control_strength,
            control_start=control_start,
            control_end=control_end,
            control_preprocess=control_preprocess,
            return_control_map=return_control_map,
            ip_adapter_images=tuple(_image(path, "ip_adapter_image") for path in ip_adapter_image or ()),
            ip_adapter_scale=ip_adapter_scale,
            upscale=upscale,
            embeddings=tuple(embeddings or ()),
        )
        if generation_data:
            request = apply_generation_data(request, generation_data, defaulted, self.engine.models)
        results = self.engine.generate(request)
        folder = self.outputs.new()
        outputs = [
            Path(
                save_image(
                    r.image,
                    r.parameters.to_a1111(),
                    output_format,
                    output_quality,
                    folder / f"out-{i}.{output_format}",
                )
            )
            for i, r in enumerate(results)
        ]
        if results[0].control_map is not None:  # PNG: lossless, so a canny map stays black and white
            path = folder / "control-map.png"
            results[0].control_map.save(path, "PNG")
            outputs.append(Path(path))
        return outputs


def _at_default(values: dict[str, Any]) -> frozenset[str]:
    """The inputs that arrived at their declared default. Cog fills defaults before predict runs,
    so these are the ones generation_data may set. The declaration is an `Input(...)` field, or
    its plain default where the runtime has put those in its place."""
    declared = inspect.signature(Predictor.predict).parameters
    defaults = {name: getattr(param.default, "default", param.default) for name, param in declared.items()}
    return frozenset(name for name, default in defaults.items() if name in values and values[name] == default)
