"""LoRA-family files read into per-module recipes for ΔW, and every other file named for what it is.

One module a type (base, lora, loha, lokr, full, oft, glora), in the spirit of ComfyUI's comfy/weight_adapter/.
`read_modules` groups a kohya / LyCORIS file's keys by module and reads each with the type its keys
name (a file may mix types); `refusal` names the LyCORIS types this predictor does not apply and
`identify` says, from keys and shapes only, what a file that is no SDXL LoRA is instead.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.adapters.base import Adapter, FormatError
from engine.adapters.full import Full
from engine.adapters.glora import GLoRA
from engine.adapters.loha import LoHa
from engine.adapters.lokr import LoKr
from engine.adapters.lora import LoRA
from engine.adapters.oft import BOFT, OFT

__all__ = [
    "BOFT",
    "KOHYA_PREFIXES",
    "OFT",
    "Adapter",
    "FormatError",
    "Full",
    "GLoRA",
    "LoHa",
    "LoKr",
    "LoRA",
    "identify",
    "is_adapter_key",
    "is_kohya",
    "read_modules",
    "refusal",
]

TYPES: tuple[type[Adapter], ...] = (LoRA, LoHa, LoKr, Full, OFT, BOFT, GLoRA)
# sd-scripts' networks/oft.py names its (UNet-only) modules so; read as lora_unet_ names.
KOHYA_OFT_PREFIX = "oft_unet_"
# kohya-ss / LyCORIS module names: the model part, then the module path with "_" for ".".
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", KOHYA_OFT_PREFIX)
# Types that change a layer's computation, not its weight by a ΔW, so a fused merge cannot apply
# them, or a layout no reference here defines; each is named by the keys LyCORIS
# (lycoris/modules/*.py weight_list) and kohya save.
REFUSED = {
    "on_input": "(IA)^3",
    # LyCORIS 2.0's OFT layout; LyCORIS 4 (the reference the tests hold OFT to) writes oft_blocks
    "oft_diag": "OFT in the old oft_diag layout",
    "lambda_layer": "T-LoRA",
    "q_layer.weight": "T-LoRA",
    "p_layer.weight": "T-LoRA",
}


def module_of(key: str) -> tuple[str, str]:
    """kohya names hold no dots, so the module is everything before the first one."""
    module, _, suffix = key.partition(".")
    return module, suffix


def is_adapter_key(key: str) -> bool:
    """A key of some LoRA-family type: any LoRA naming, or a LyCORIS suffix (known or refused)."""
    suffix = module_of(key)[1]
    return "lora" in key or suffix in REFUSED or any(suffix in t.suffixes for t in TYPES if t is not LoRA)


def refusal(keys: list[str]) -> str | None:
    """The name of a LyCORIS type this predictor refuses, if any module of the file is one."""
    for key in keys:
        _, suffix = module_of(key)
        if suffix in REFUSED:
            return REFUSED[suffix]
        if suffix == "weight" and key.startswith(KOHYA_PREFIXES):
            return "(IA)^3"  # its per-channel vector is the module's only other key
    return None


def is_kohya(keys: list[str]) -> bool:
    """A kohya-ss / LyCORIS file: every key names a module the kohya way (diffusers' own test)."""
    return bool(keys) and all(k.startswith(KOHYA_PREFIXES) for k in keys)


def read_module(tensors: dict[str, torch.Tensor]) -> dict[str, Adapter]:
    """One module's adapters by the parameter they update ("weight", and "bias" for diff_b)."""
    unknown = sorted(set(tensors) - {s for t in TYPES for s in t.suffixes} - {"scalar"})
    if unknown:
        raise FormatError(f"it holds keys of no known LoRA type ({', '.join(unknown[:3])})")
    kinds = [t for t in TYPES if t.claims(tensors)]
    if not kinds:
        raise FormatError(f"a module holds no factors, only {', '.join(sorted(tensors))}")
    if len(kinds) > 1:
        raise FormatError(f"a module's keys name {' and '.join(t.kind for t in kinds)} at once")
    kind = kinds[0]
    out: dict[str, Adapter] = {}
    if kind is Full:
        if "diff" in tensors or "w_norm" in tensors:
            out["weight"] = Full.read(tensors)
        if (bias := Full.bias(tensors)) is not None:
            out["bias"] = bias
        return out
    return {"weight": kind.read(tensors)}


def read_modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, Adapter]]:
    """Every module of a kohya / LyCORIS file: {module name: {parameter: adapter}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, suffix = module_of(key)
        grouped.setdefault(module, {})[suffix] = tensor
    modules = {}
    for module, tensors in grouped.items():
        try:
            parts = read_module(tensors)
            if module.startswith(KOHYA_OFT_PREFIX):
                parts = {param: _kohya_oft(adapter) for param, adapter in parts.items()}
        except FormatError as exc:
            raise FormatError(f"{module}: {exc}") from None
        modules[_module_name(module)] = parts
    return modules


def _module_name(module: str) -> str:
    """An sd-scripts OFT module is named like a kohya LoRA's, under its own prefix."""
    if module.startswith(KOHYA_OFT_PREFIX):
        return "lora_unet_" + module.removeprefix(KOHYA_OFT_PREFIX)
    return module


def _kohya_oft(adapter: Adapter) -> OFT:
    """sd-scripts' networks/oft.py saves only oft_blocks (k, b, b) and alpha under oft_unet_."""
    if not isinstance(adapter, OFT) or adapter.rescale is not None:
        raise FormatError(f"sd-scripts' OFT names ({KOHYA_OFT_PREFIX}) hold a {adapter.kind} module, not its OFT")
    return replace(adapter, kohya=True)


def _width(shapes: dict[str, tuple[int, ...]], *fragments: str) -> int | None:
    """The input width of the first 2-D factor whose key holds every fragment (a LoRA's down)."""
    for key, shape in shapes.items():
        if all(f in key for f in fragments) and len(shape) == 2:
            return shape[1]
    return None


def identify(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What a file is when it is no SDXL-family LoRA, read from its keys and shapes; None when it
    may be one. Each answer rests on a key layout or a width only that kind of file has."""
    keys = list(shapes)
    has = lambda *fragments: any(any(f in k for f in fragments) for k in keys)  # noqa: E731
    if set(keys) & {"clip_l", "clip_g"}:
        return "an SDXL textual-inversion embedding (clip_l / clip_g), not a LoRA: pass it in the embeddings input"
    if has("emb_params", "string_to_param"):
        return (
            "a textual-inversion embedding for SD 1.5 / 2.x (emb_params: one text encoder, where SDXL's "
            "hold clip_l and clip_g), not a LoRA"
        )
    if set(keys) <= {"text_encoders_0", "text_encoders_1"}:
        return "the pivotal-tuning embeddings (embeddings.pti) of a trained tar, not a LoRA: pass the whole tar"
    if has("double_blocks", "single_blocks", "single_transformer_blocks"):
        return "a LoRA for Flux (double_blocks / single_blocks keys)"
    if has("joint_blocks", "context_block"):
        return "a LoRA for SD 3 (joint_blocks keys)"
    if any(k.startswith("transformer.") for k in keys):
        return "a LoRA for a diffusion transformer such as Flux or SD 3 (transformer.* keys, no UNet)"
    if any(is_adapter_key(k) for k in keys):
        cross = next(
            (w for f in ("down", "lora_A", "hada_w1_b") if (w := _width(shapes, "attn2", "to_k", f))),
            None,
        )
        if cross == 768 or (has("lora_te_") and not has("lora_te2_", "text_encoder_2")):
            return "a LoRA for SD 1.5 (768-wide cross-attention, one text encoder)"
        if cross == 1024:
            return "a LoRA for SD 2.x (1024-wide cross-attention)"
        return None
    if has("model.diffusion_model.", "conditioner.embedders.") or has("down_blocks.0.resnets.0.conv1.weight"):
        return "a full checkpoint (a whole base model), not a LoRA"
    if has("controlnet_cond_embedding", "control_model.", "input_hint_block"):
        return "a ControlNet, not a LoRA"
    if has("image_proj.", "ip_adapter"):
        return "an IP-Adapter, not a LoRA"
    if has("first_stage_model.") or (has("encoder.conv_in", "decoder.conv_in") and has("quant_conv")):
        return "a VAE, not a LoRA"
    return None
