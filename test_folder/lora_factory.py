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
    """A damaged LyCORIS LoHa file: one factor of four; the predictor must say what is missing."""
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


# ---------------------------------------------------------------------------------------------
# LyCORIS files, made by LyCORIS's own modules (lycoris-lora, a test-only dependency) on the tiny
# model's layers, so keys, shapes and alphas are exactly what LyCORIS saves; kohya module names.

# (component, module path): linear layers of both kinds of attention, a feed-forward layer, 3x3
# convolutions of the down, mid and up blocks, a 1x1 shortcut and a layer of each text encoder.
LYCORIS_TARGETS = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"),
    ("unet", "down_blocks.1.attentions.0.proj_in"),
    ("unet", "down_blocks.0.resnets.0.conv1"),
    ("unet", "mid_block.resnets.0.conv2"),
    ("unet", "up_blocks.1.resnets.0.conv1"),
    ("unet", "down_blocks.1.resnets.0.conv_shortcut"),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
    ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1"),
]
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_name(component: str, path: str) -> str:
    return _KOHYA_PREFIX[component] + path.replace(".", "_")


def layer_of(pipe: StableDiffusionXLPipeline, component: str, path: str) -> torch.nn.Module:
    """A target's layer; kohya names keep CLIP's `text_model.`, which recent transformers flatten."""
    model = getattr(pipe, component)
    return model.get_submodule(path if hasattr(model, "text_model") else path.removeprefix("text_model."))


def lycoris_state(
    pipe: StableDiffusionXLPipeline,
    algo: str,
    seed: int,
    *,
    targets: list[tuple[str, str]] = LYCORIS_TARGETS,
    dora: bool = False,
    wd_on_out: bool = True,
    **options: object,
) -> dict[str, torch.Tensor]:
    """One LyCORIS module per target as LyCORIS builds and saves it (`custom_state_dict`), every
    factor drawn at random (LyCORIS starts one factor at zero, or OFT's blocks at the identity
    rotation, a file that changes nothing), OFT's row rescale drawn around 1, and every DoRA
    magnitude moved off the base's norms. algo: locon, loha, lokr, full, diag-oft, boft or glora."""
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule
    from lycoris.modules.full import FullModule
    from lycoris.modules.glora import GLoRAModule
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls = {
        "locon": LoConModule,
        "loha": LohaModule,
        "lokr": LokrModule,
        "full": FullModule,
        "diag-oft": DiagOFTModule,
        "boft": ButterflyOFTModule,
        "glora": GLoRAModule,
    }[algo]
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for component, path in targets:
        layer = layer_of(pipe, component, path)
        name = kohya_name(component, path)
        plain = algo in ("full", "diag-oft", "boft", "glora")  # no DoRA option (LyCORIS ignores it there)
        extra = {} if plain else {"weight_decompose": dora, "wd_on_out": wd_on_out}
        module = cls(name, layer, **extra, **options)
        with torch.no_grad():
            for param_name, param in module.named_parameters():
                drawn = torch.randn(param.shape, generator=generator) * 0.2
                param.copy_(1 + drawn / 2 if param_name == "rescale" else drawn)
            if dora:
                module.dora_scale.mul_(1.5)
        for key, value in module.state_dict().items():
            if not key.startswith("org_"):
                state[f"{name}.{key}"] = value.detach().clone().contiguous()
    return state


def plain_lora_of(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same ΔWs as a plain kohya LoRA of full rank: up = ΔW, down = the identity, alpha = rank."""
    state = {}
    for name, delta in deltas.items():
        flat = delta.flatten(1)
        rank = flat.shape[1]
        down = torch.eye(rank).view(rank, *delta.shape[1:])
        up = flat.view(delta.shape[0], rank, *[1] * (delta.ndim - 2))
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(rank)}
    return state


def cog_sdxl_lora(pipe: StableDiffusionXLPipeline, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """lora.safetensors as replicate/cog-sdxl's trainer writes it (dataset_and_utils.py,
    unet_attn_processors_state_dict): each attention processor's own parameters keyed
    `<processor name>.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight`, no `unet.` prefix, no alpha.
    The factors are `diffusers_lora`'s for the same seed, so the two files are one LoRA."""
    state = {}
    for key, value in _peft_state(pipe.unet, UNET_TARGETS, seed, rank).items():
        module, kind = key.rsplit(".lora_", 1)
        attention, projection = module.removesuffix(".0").rsplit(".", 1)
        side = "down" if kind.startswith("A") else "up"
        state[f"{attention}.processor.{projection}_lora.{side}.weight"] = value
    return state
