"""The trained LoRA in the layouts other tools read: kohya's (A1111, Forge, ComfyUI, diffusers'
kohya conversion) and the A1111 SDXL embedding (`clip_l` / `clip_g` rows, named after the trigger).

kohya names SDXL LoRA weights after the original (SGM) UNet, whose blocks are numbered through:
down block i's layer j is input_blocks.(1 + i*(L+1) + j), the middle block's attention is
middle_block.1, up block i's layer j is output_blocks.(i*(L+1) + j), with .0 a resnet and .1 an
attention (L = layers_per_block). This is the inverse of diffusers' own reading of those names.
"""

from __future__ import annotations

import re

import torch

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)$")
_MID = re.compile(r"^mid_block\.(attentions|resnets)\.(\d+)\.(.*)$")
_INNER = {"resnets": 0, "attentions": 1}
_MID_INDEX = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}


def sgm_module_name(name: str, layers_per_block: int) -> str:
    """The SGM (original SDXL) name of a diffusers UNet module inside a down, mid or up block."""
    if match := _BLOCK.match(name):
        kind, block, inner, layer, rest = match.groups()
        per = layers_per_block + 1
        if kind == "down_blocks":
            return f"input_blocks.{1 + int(block) * per + int(layer)}.{_INNER[inner]}.{rest}"
        return f"output_blocks.{int(block) * per + int(layer)}.{_INNER[inner]}.{rest}"
    if match := _MID.match(name):
        inner, layer, rest = match.groups()
        return f"middle_block.{_MID_INDEX[(inner, int(layer))]}.{rest}"
    raise ValueError(f"no SGM name for UNet module {name}")


def kohya_state_dict(
    peft_state: dict[str, torch.Tensor], alpha: float, layers_per_block: int
) -> dict[str, torch.Tensor]:
    """peft's `<module>.lora_A.weight` / `.lora_B.weight` as kohya's `lora_unet_<sgm>` down/up/alpha."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        module, _, part = key.rpartition(".lora_")
        name = "lora_unet_" + sgm_module_name(module, layers_per_block).replace(".", "_")
        out[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=value.dtype)
    return out


def a1111_embedding(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """embeddings.pti's rows (text_encoders_0 = CLIP-L, text_encoders_1 = CLIP-G) as A1111's SDXL embedding."""
    return {"clip_l": rows["text_encoders_0"], "clip_g": rows["text_encoders_1"]}


def file_stem(trigger: str) -> str:
    """A file name for the trigger's embedding: A1111 and ComfyUI call an embedding by its file name."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", trigger).strip("_") or "trigger"
    return f"{stem}_embedding" if stem.lower() in ("lora", "embeddings") else stem
