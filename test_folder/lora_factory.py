"""LoRA files made for the tiny test model, in the formats found in the wild.

peft's default initialisation makes B = 0, a LoRA that changes nothing; these use
init_lora_weights=False so every LoRA visibly changes the image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save, save_file

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _peft_state(module: torch.nn.Module, targets: list[str], seed: int, rank: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    module.add_adapter(config, adapter_name="make")
    state = get_peft_model_state_dict(module, adapter_name="make")
    # diffusers models name it delete_adapters, transformers models delete_adapter.
    (module.delete_adapters if hasattr(module, "delete_adapters") else module.delete_adapter)("make")
    recurse_remove_peft_layers(module)  # deleting leaves empty wrappers in the forward path: the plain modules again
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def diffusers_lora(pipe: StableDiffusionXLPipeline, path: Path, seed: int, text: bool = False, rank: int = 4) -> Path:
    """The diffusers/PEFT layout `save_lora_weights` writes (unet.… and text_encoder.… keys)."""
    unet = convert_state_dict_to_diffusers(_peft_state(pipe.unet, UNET_TARGETS, seed, rank))
    kwargs = {}
    if text:
        kwargs["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            _peft_state(pipe.text_encoder, TEXT_TARGETS, seed + 1, rank)
        )
        kwargs["text_encoder_2_lora_layers"] = convert_state_dict_to_diffusers(
            _peft_state(pipe.text_encoder_2, TEXT_TARGETS, seed + 2, rank)
        )
    path.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(path, unet_lora_layers=unet, safe_serialization=True, **kwargs)
    return path / "pytorch_lora_weights.safetensors"


def kohya_lora(pipe: StableDiffusionXLPipeline, path: Path, seed: int, text: bool = False, rank: int = 4) -> Path:
    """kohya-ss layout: lora_unet_/lora_te1_/lora_te2_ prefixes, lora_down/lora_up and .alpha."""
    tensors: dict[str, torch.Tensor] = {}
    parts = [("lora_unet", pipe.unet, UNET_TARGETS, seed)]
    if text:
        parts += [
            ("lora_te1", pipe.text_encoder, TEXT_TARGETS, seed + 1),
            ("lora_te2", pipe.text_encoder_2, TEXT_TARGETS, seed + 2),
        ]
    for prefix, module, targets, s in parts:
        for key, value in _peft_state(module, targets, s, rank).items():
            module_path, kind = key.rsplit(".lora_", 1)
            name = f"{prefix}_{module_path.replace('.', '_')}"
            suffix = "lora_down.weight" if kind.startswith("A") else "lora_up.weight"
            tensors[f"{name}.{suffix}"] = value
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)
    return path


def loha_file(path: Path) -> Path:
    """A LyCORIS LoHa file: diffusers cannot load these; the predictor must say so."""
    save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)}, path)
    return path


def sd15_like_lora(path: Path) -> Path:
    """A LoRA whose shapes fit another base model (SD 1.5's 768/320 widths), not this one."""
    save_file(
        {
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(4, 768),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(320, 4),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0),
        },
        path,
    )
    return path


def pivotal_embeddings(pipe: StableDiffusionXLPipeline, seed: int, count: int = 2) -> bytes:
    """embeddings.pti as Replicate's SDXL trainer writes it: one row per token for each encoder."""
    torch.manual_seed(seed)
    tensors = {
        "text_encoders_0": torch.randn(count, pipe.text_encoder.config.hidden_size),
        "text_encoders_1": torch.randn(count, pipe.text_encoder_2.config.hidden_size),
    }
    return save(tensors)
