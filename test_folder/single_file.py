"""Write an SDXL pipeline as one original-layout (SGM) checkpoint, as Illustrious-XL ships.

Only for tests: it lets the bake's single-file conversion run on the tiny model. Key names
follow the layout of the released SDXL/Illustrious checkpoints: `model.diffusion_model.*`
(UNet), `first_stage_model.*` (VAE), `conditioner.embedders.0.transformer.*` (CLIP-L, Hugging
Face naming) and `conditioner.embedders.1.model.*` (OpenCLIP bigG naming).
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def _put(out: dict[str, torch.Tensor], prefix: str, state: dict[str, torch.Tensor], inner: dict | None = None) -> None:
    for key, value in state.items():
        first, _, rest = key.partition(".")
        name = f"{inner.get(first, first)}.{rest}" if inner else key
        out[f"{prefix}.{name}"] = value.detach().clone()


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def unet_to_original(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd, cfg, out = unet.state_dict(), unet.config, {}
    top = "model.diffusion_model"
    renames = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for src, dst in renames.items():
        _put(out, f"{top}.{dst}", _sub(sd, src))
    levels, per_block = len(cfg.block_out_channels), cfg.layers_per_block
    n = 1
    for i in range(levels):
        for j in range(per_block):
            _put(out, f"{top}.input_blocks.{n}.0", _sub(sd, f"down_blocks.{i}.resnets.{j}"), _RESNET)
            _put(out, f"{top}.input_blocks.{n}.1", _sub(sd, f"down_blocks.{i}.attentions.{j}"))
            n += 1
        if i < levels - 1:
            _put(out, f"{top}.input_blocks.{n}.0.op", _sub(sd, f"down_blocks.{i}.downsamplers.0.conv"))
            n += 1
    _put(out, f"{top}.middle_block.0", _sub(sd, "mid_block.resnets.0"), _RESNET)
    _put(out, f"{top}.middle_block.1", _sub(sd, "mid_block.attentions.0"))
    _put(out, f"{top}.middle_block.2", _sub(sd, "mid_block.resnets.1"), _RESNET)
    n = 0
    for i in range(levels):
        for j in range(per_block + 1):
            attention = _sub(sd, f"up_blocks.{i}.attentions.{j}")
            _put(out, f"{top}.output_blocks.{n}.0", _sub(sd, f"up_blocks.{i}.resnets.{j}"), _RESNET)
            _put(out, f"{top}.output_blocks.{n}.1", attention)
            if j == per_block and i < levels - 1:
                slot = 2 if attention else 1
                _put(out, f"{top}.output_blocks.{n}.{slot}.conv", _sub(sd, f"up_blocks.{i}.upsamplers.0.conv"))
            n += 1
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_original(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd, out = vae.state_dict(), {}
    top = "first_stage_model"
    levels = len(vae.config.block_out_channels)
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            _put(out, f"{top}.{part}.{name}", _sub(sd, f"{part}.{name}"))
        _put(out, f"{top}.{part}.norm_out", _sub(sd, f"{part}.conv_norm_out"))
        _put(
            out, f"{top}.{part}.mid.block_1", _sub(sd, f"{part}.mid_block.resnets.0"), {"conv_shortcut": "nin_shortcut"}
        )
        _put(
            out, f"{top}.{part}.mid.block_2", _sub(sd, f"{part}.mid_block.resnets.1"), {"conv_shortcut": "nin_shortcut"}
        )
        for key, value in _sub(sd, f"{part}.mid_block.attentions.0").items():
            first, _, rest = key.partition(".")
            rest = rest.removeprefix("0.")  # to_out.0.weight
            tensor = value[:, :, None, None] if value.ndim == 2 else value  # linear -> 1x1 conv
            out[f"{top}.{part}.mid.attn_1.{_VAE_ATTENTION[first]}.{rest}"] = tensor.detach().clone()
        blocks = "down_blocks" if part == "encoder" else "up_blocks"
        for i in range(levels):
            index = i if part == "encoder" else levels - 1 - i  # the original counts up-blocks backwards
            stage = "down" if part == "encoder" else "up"
            block = _sub(sd, f"{part}.{blocks}.{i}")
            for j in range(len({k.split(".")[1] for k in block if k.startswith("resnets.")})):
                _put(
                    out,
                    f"{top}.{part}.{stage}.{index}.block.{j}",
                    _sub(block, f"resnets.{j}"),
                    {"conv_shortcut": "nin_shortcut"},
                )
            sampler = "downsamplers" if part == "encoder" else "upsamplers"
            if _sub(block, f"{sampler}.0.conv"):
                name = "downsample" if part == "encoder" else "upsample"
                _put(out, f"{top}.{part}.{stage}.{index}.{name}.conv", _sub(block, f"{sampler}.0.conv"))
    for name in ("quant_conv", "post_quant_conv"):
        _put(out, f"{top}.{name}", _sub(sd, name))
    return out


def clip_l_to_original(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = encoder.state_dict()
    prefix = "conditioner.embedders.0.transformer."
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v.clone() for k, v in state.items()}


def bigg_to_original(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    top = "conditioner.embedders.1.model"
    out = {
        f"{top}.token_embedding.weight": sd["embeddings.token_embedding.weight"],
        f"{top}.positional_embedding": sd["embeddings.position_embedding.weight"],
        f"{top}.ln_final.weight": sd["final_layer_norm.weight"],
        f"{top}.ln_final.bias": sd["final_layer_norm.bias"],
        f"{top}.text_projection": sd["text_projection.weight"].T.contiguous(),
    }
    layers = encoder.config.num_hidden_layers
    for i in range(layers):
        src, dst = f"encoder.layers.{i}", f"{top}.transformer.resblocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{dst}.attn.in_proj_{kind}"] = torch.cat([sd[f"{src}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{dst}.attn.out_proj.{kind}"] = sd[f"{src}.self_attn.out_proj.{kind}"]
            out[f"{dst}.ln_1.{kind}"] = sd[f"{src}.layer_norm1.{kind}"]
            out[f"{dst}.ln_2.{kind}"] = sd[f"{src}.layer_norm2.{kind}"]
            out[f"{dst}.mlp.c_fc.{kind}"] = sd[f"{src}.mlp.fc1.{kind}"]
            out[f"{dst}.mlp.c_proj.{kind}"] = sd[f"{src}.mlp.fc2.{kind}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def to_original(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    return {
        **unet_to_original(pipe.unet),
        **vae_to_original(pipe.vae),
        **clip_l_to_original(pipe.text_encoder),
        **bigg_to_original(pipe.text_encoder_2),
    }
