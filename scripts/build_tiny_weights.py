"""Build tiny, deterministic SDXL-shaped weights offline, in the layout real baked weights use.

With --full-size the same code builds real-size SDXL shapes with random fp16 weights, for
benchmarks on a GPU host (never for images anyone should look at).

The result is `weights/<model-id>/` (a diffusers folder that
`StableDiffusionXLPipeline.from_pretrained` loads) for every model id, plus
`weights/safety-checker/`, `weights/captioner/` (a BLIP captioner for `cog train`'s
autocaption, random weights: its captions are gibberish, the code path is the real one),
`weights/tagger/` (a stand-in for the WD tagger: an ONNX graph of the same input and output
whose few tags follow the image's mean colour, see build_tagger), `weights/upscaler/` (Swin2SR
x4 in the real-world model's configuration, see build_upscaler) and
`weights/ip-adapter/` (an IP-Adapter Plus file in the original key layout with its CLIP image
encoder, sized for the UNet's cross-attention). The
tokenizers use the real CLIP BPE vocabulary shipped inside the open-clip-torch wheel, so prompts tokenize exactly as on
the real models. Each model gets its own seed so switching models is visible.

Usage: python scripts/build_tiny_weights.py [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetUnionModel,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors.torch import save_file
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTImageProcessorPil,
    Swin2SRConfig,
    Swin2SRForImageSuperResolution,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import (
    CONTROL_MODES,
    CONTROLNET_DIR,
    DEPTH_ESTIMATOR_DIR,
    IP_ADAPTER_DIR,
    IP_ADAPTER_ENCODER_DIR,
    IP_ADAPTER_WEIGHT_NAME,
    MODEL_IDS,
    SAFETY_CHECKER_DIR,
    UPSCALER_DIR,
    weights_root,
)
from scripts.bake import index_added_tokens
from training.config import CAPTIONER_DIR, TAGGER_DIR

MODEL_SEEDS = {"illustrious-xl": 1, "sdxl": 2}
CLIP_VOCAB_SIZE = 49408


@dataclass(frozen=True)
class Shape:
    """Sizes of every component; TINY for tests, FULL for real-size benchmarks with random weights."""

    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_transformer_layers: tuple[int, ...]
    unet_head_dims: tuple[int, ...]
    unet_norm_groups: int
    addition_time_dim: int
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_groups: int
    # (width, layers, heads, mlp width, projection, activation) for each text encoder. The two
    # widths must differ: single-file loaders tell the encoders apart that way.
    text_encoder: tuple[int, int, int, int, int, str]
    text_encoder_2: tuple[int, int, int, int, int, str]
    # (width, layers, heads, mlp width, image size, patch, projection) of the checker's ViT.
    checker_vision: tuple[int, int, int, int, int, int, int]
    # (width, blocks per stage, heads per stage) of the upscaler's Swin body.
    upscaler: tuple[int, tuple[int, ...], tuple[int, ...]]
    # The IP-Adapter's image encoder, the same fields; then the Plus resampler's (width, queries):
    # its heads are width / 64, as diffusers reads them back.
    ip_vision: tuple[int, int, int, int, int, int, int]
    ip_resampler: tuple[int, int]


TINY = Shape(
    unet_channels=(32, 64),
    unet_layers_per_block=1,
    unet_transformer_layers=(1, 2),
    unet_head_dims=(2, 4),
    unet_norm_groups=8,
    addition_time_dim=8,
    vae_channels=(8, 16, 16, 16),  # four blocks: the VAE scales by 8 like SDXL's
    vae_layers_per_block=1,
    vae_norm_groups=8,
    text_encoder=(32, 6, 4, 64, 32, "gelu"),
    text_encoder_2=(64, 6, 4, 128, 32, "gelu"),
    checker_vision=(16, 1, 2, 32, 32, 8, 16),
    upscaler=(16, (2, 2), (2, 2)),
    ip_vision=(32, 2, 2, 64, 32, 8, 16),
    ip_resampler=(64, 4),
)
FULL = Shape(
    unet_channels=(320, 640, 1280),
    unet_layers_per_block=2,
    unet_transformer_layers=(1, 2, 10),
    unet_head_dims=(5, 10, 20),
    unet_norm_groups=32,
    addition_time_dim=256,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_norm_groups=32,
    text_encoder=(768, 12, 12, 3072, 768, "quick_gelu"),
    text_encoder_2=(1280, 32, 20, 5120, 1280, "gelu"),
    checker_vision=(1024, 24, 16, 4096, 224, 14, 768),
    upscaler=(180, (6,) * 6, (6,) * 6),  # caidas/swin2SR-realworld-sr-x4-64-bsrgan-psnr
    ip_vision=(1280, 32, 16, 5120, 224, 14, 1024),  # OpenCLIP ViT-H/14, h94/IP-Adapter models/image_encoder
    ip_resampler=(1280, 16),
)
# The UNet's latent size: native resolution / 8, i.e. 128 px for TINY and 1024 px for FULL.
SAMPLE_SIZE = {TINY: 16, FULL: 128}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's vocab.json and merges from open_clip's BPE file (49,408 tokens)."""
    spec = importlib.util.find_spec("open_clip")  # located, not imported: it needs torchvision
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open-clip-torch is not installed: it ships the CLIP vocabulary (make install-dev)")
    gz = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(gz.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def _tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def _text_config(spec: tuple[int, int, int, int, int, str]) -> CLIPTextConfig:
    width, layers, heads, mlp, projection, act = spec
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=mlp,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def build_unet(shape: Shape = TINY) -> UNet2DConditionModel:
    """An SDXL-shaped UNet with random weights (the caller seeds torch)."""
    levels = len(shape.unet_channels)
    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE[shape],
        in_channels=4,
        out_channels=4,
        block_out_channels=shape.unet_channels,
        layers_per_block=shape.unet_layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        attention_head_dim=shape.unet_head_dims,
        transformer_layers_per_block=shape.unet_transformer_layers,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=shape.addition_time_dim,
        projection_class_embeddings_input_dim=6 * shape.addition_time_dim + shape.text_encoder_2[4],
        cross_attention_dim=shape.text_encoder[0] + shape.text_encoder_2[0],
        norm_num_groups=shape.unet_norm_groups,
    )


def build_model(seed: int, shape: Shape = TINY) -> StableDiffusionXLPipeline:
    """A complete SDXL pipeline with random weights: UNet, two CLIP encoders, an x8 VAE."""
    torch.manual_seed(seed)
    unet = build_unet(shape)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=shape.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(shape.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(shape.vae_channels),
        latent_channels=4,
        layers_per_block=shape.vae_layers_per_block,
        norm_num_groups=shape.vae_norm_groups,
        sample_size=SAMPLE_SIZE[shape] * 8,
        scaling_factor=0.13025,
        force_upcast=shape is TINY,  # FULL stands for the fp16-fix VAE that real fp16 runs use
    )
    text_encoder = CLIPTextModel(_text_config(shape.text_encoder))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(shape.text_encoder_2))
    vocab, merges = clip_vocab()
    with torch.device("cpu"):  # its tables are numpy-backed, whatever device the modules are built on
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer(vocab, merges, "<|endoftext|>"),
        tokenizer_2=_tokenizer(vocab, merges, "!"),
        unet=unet,
        scheduler=scheduler,
    )


def _vision_config(spec: tuple[int, ...], **extra: Any) -> CLIPVisionConfig:
    """A CLIP vision tower from a Shape's (width, layers, heads, mlp, image size, patch, projection)."""
    width, layers, heads, mlp, image_size, patch, _ = spec
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        image_size=image_size,
        patch_size=patch,
        **extra,
    )


def build_safety_checker(shape: Shape = TINY) -> tuple[StableDiffusionSafetyChecker, CLIPImageProcessor]:
    """A checker whose concept thresholds (1.0) can never be exceeded by a cosine."""
    torch.manual_seed(0)
    image_size, projection = shape.checker_vision[4], shape.checker_vision[6]
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1},
        vision_config=_vision_config(shape.checker_vision).to_dict(),
        projection_dim=projection,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    crop = {"height": image_size, "width": image_size}
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
    return checker, processor


# BLIP's special tokens ([DEC] starts a caption) and a few words for the random decoder to pick.
CAPTION_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
CAPTION_WORDS = "a an the photo drawing painting of with on in at and red blue cat dog man woman car house tree sky"


def build_captioner() -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """A tiny BLIP captioner, the architecture bake/manifest.json bakes for real."""
    torch.manual_seed(0)
    vocab = {word: i for i, word in enumerate([*CAPTION_SPECIALS, *CAPTION_WORDS.split()])}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=64)
    width = 32
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "encoder_hidden_size": width,
            "bos_token_id": vocab["[DEC]"],
            "sep_token_id": vocab["[SEP]"],
            "pad_token_id": vocab["[PAD]"],
        },
        vision_config={
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=width,
    )
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    return BlipForConditionalGeneration(config), processor


# The tiny upscaler's Swin body adds its random output at this fraction of its scale (see build_upscaler).
UPSCALER_BODY_SCALE = 0.1


def build_upscaler(shape: Shape = TINY) -> Swin2SRForImageSuperResolution:
    """Swin2SR x4 in the configuration of the real-world model bake/manifest.json bakes
    (nearest+conv head, window 8, 64 px training patches), with the body's size from `shape`.

    Random weights, except that the head is set to carry the input through as a nearest-neighbour
    x4 (each sign on its own channel, so the leaky ReLUs pass it) and the body's random output is
    added at UPSCALER_BODY_SCALE. Like a trained upscaler, the result then resembles its input, so
    a test can catch swapped channels, flips or misplaced tiles; and the body still makes every
    output pixel depend on its neighbourhood through the shifted windows, so tiling is tested for real.
    """
    torch.manual_seed(0)
    width, depths, heads = shape.upscaler
    config = Swin2SRConfig(
        embed_dim=width,
        depths=list(depths),
        num_heads=list(heads),
        upscale=4,
        upsampler="nearest+conv",
        image_size=64,
        window_size=8,
        img_range=1.0,
    )
    model = Swin2SRForImageSuperResolution(config).eval()
    rgb = torch.eye(3)
    signed = torch.cat([rgb, -rgb])  # channels 0-2 carry +x, 3-5 carry -x
    head = model.upsample

    def centre(conv: torch.nn.Conv2d, matrix: torch.Tensor) -> None:
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[: matrix.shape[0], : matrix.shape[1], 1, 1] = matrix

    with torch.no_grad():
        first = model.swin2sr.first_convolution  # channels 0-2 keep the input; the rest stay random
        first.weight[:3] = 0
        first.weight[:3, :, 1, 1] = rgb
        first.bias[:3] = 0
        model.swin2sr.conv_after_body.weight.mul_(UPSCALER_BODY_SCALE)
        model.swin2sr.conv_after_body.bias.mul_(UPSCALER_BODY_SCALE)
        centre(head.conv_before_upsample, signed)
        for conv in (head.conv_up1, head.conv_up2, head.conv_hr):
            centre(conv, torch.eye(6))
        centre(head.final_convolution, torch.cat([rgb, -rgb], dim=1))
    return model


def _original_resampler_name(name: str) -> str:
    """diffusers' name of a Plus resampler weight -> the name the original IP-Adapter file uses
    (the inverse of diffusers' `_convert_ip_adapter_image_proj_to_diffusers`)."""
    for ours, theirs in (
        (".ln0.", ".0.norm1."),
        (".ln1.", ".0.norm2."),
        (".attn.to_q.", ".0.to_q."),
        (".attn.to_out.0.", ".0.to_out."),
        (".ff.0.", ".1.0."),
        (".ff.1.net.0.proj.", ".1.1."),
        (".ff.1.net.2.", ".1.3."),
    ):
        name = name.replace(ours, theirs)
    return name


def build_ip_adapter(shape: Shape = TINY) -> tuple[CLIPVisionModelWithProjection, dict[str, torch.Tensor]]:
    """A CLIP image encoder and an IP-Adapter Plus state dict for build_unet(shape), in the original
    file's layout: `image_proj.*` (the resampler) and `ip_adapter.<n>.to_k_ip/to_v_ip.weight` for
    each cross-attention, numbered 1, 3, 5 ... in the UNet's processor order, as diffusers reads them."""
    torch.manual_seed(3)
    width, projection = shape.ip_vision[0], shape.ip_vision[6]
    encoder = CLIPVisionModelWithProjection(
        _vision_config(shape.ip_vision, projection_dim=projection, hidden_act="gelu")
    )
    with torch.device("meta"):  # only its processor names and config are read
        unet = build_unet(shape)
    hidden, queries = shape.ip_resampler
    resampler = IPAdapterPlusImageProjection(
        embed_dims=width,
        output_dims=unet.config.cross_attention_dim,
        hidden_dims=hidden,
        heads=hidden // 64,
        num_queries=queries,
    )
    state: dict[str, torch.Tensor] = {}
    for name, value in resampler.state_dict().items():
        if ".attn.to_v." in name:
            continue  # stored with to_k as one to_kv matrix
        if ".attn.to_k." in name:
            value = torch.cat([value, resampler.state_dict()[name.replace(".to_k.", ".to_v.")]])
            name = name.replace(".attn.to_k.", ".0.to_kv.")
        state[f"image_proj.{_original_resampler_name(name)}"] = value
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block, index = name.split(".")[:2]
        channels = unet.config.block_out_channels
        if block == "mid_block":
            hidden_size = channels[-1]
        else:
            hidden_size = (channels[::-1] if block == "up_blocks" else channels)[int(index)]
        processor = IPAdapterAttnProcessor2_0(hidden_size, unet.config.cross_attention_dim, num_tokens=(queries,))
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = processor.to_k_ip[0].weight.detach().clone()
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = processor.to_v_ip[0].weight.detach().clone()
        key_id += 2
    return encoder, {k: v.contiguous() for k, v in state.items()}


def build_controlnet(shape: Shape = TINY) -> ControlNetUnionModel:
    """A union ControlNet shaped for the UNet, with promax's eight control modes.

    Trained ControlNets start from zero convolutions that training moves; left at zero the tiny
    one would change nothing, so every layer gets random weights (fixed seed).
    """
    torch.manual_seed(3)
    width = shape.unet_channels[0]
    with torch.device("meta"):  # only the UNet's config is read
        unet = build_unet(shape)
    config = ControlNetUnionModel.from_unet(unet, load_weights_from_unet=False).config
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # "_use_default_values" would win
    config.update(
        num_control_type=max(CONTROL_MODES.values()) + 2,  # + promax's repaint mode
        num_trans_channel=width,  # the transformer mixes features of the conditioning embedding's width
        num_trans_head=min(8, width // 4),
        num_proj_channel=width,
        conditioning_embedding_out_channels=(16, 32, 96, 256) if shape is FULL else (8, 8, 16, 16),
    )
    controlnet = ControlNetUnionModel.from_config(config)
    with torch.no_grad():
        for param in controlnet.parameters():
            if param.abs().sum() == 0:
                param.normal_(0, 0.05)
    return controlnet


def build_depth_estimator() -> tuple[DepthAnythingForDepthEstimation, DPTImageProcessorPil]:
    """A tiny Depth Anything V2 (DINOv2 backbone + DPT head), the architecture the manifest bakes."""
    torch.manual_seed(4)
    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=56,
        patch_size=14,
        out_indices=[1, 2, 3, 4],
        apply_layernorm=True,
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        patch_size=14,
        neck_hidden_sizes=[8, 16, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )
    processor = DPTImageProcessorPil(
        size={"height": 56, "width": 56},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        do_pad=False,
    )
    return DepthAnythingForDepthEstimation(config), processor


def _save_atomically(target: Path, save: Callable[[Path], None]) -> None:
    """Write into a temporary sibling folder, then rename, so a kill leaves nothing half-built."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_pipeline(pipe: StableDiffusionXLPipeline, folder: Path) -> None:
    """The pipeline's folder with its tokenizer configs indexed as the bake leaves them."""
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        index_added_tokens(folder / name)


def _pretrained(*parts: Any) -> Callable[[Path], None]:
    """Writes each part (a model, its processor) into one folder with its own `save_pretrained`."""

    def save(folder: Path) -> None:
        for part in parts:
            part.save_pretrained(folder)

    return save


def _as_baked(model: torch.nn.Module, shape: Shape) -> torch.nn.Module:
    """Full-size stand-ins are stored in fp16, as the real baked weights are."""
    return model.to(torch.float16) if shape is FULL else model


# The tiny tagger's tags: (name, selected_tags.csv category, weights on the mean B, G, R, bias).
# Its output is sigmoid(weights . mean colour + bias), so each tag's confidence is known for a
# given image: a rating tag that must be left out, colour tags, an emoticon whose `_` stays, and a
# character tag above and one below the character threshold.
TINY_TAGS = (
    ("general", 9, (0.0, 0.0, 0.0), 5.0),
    ("red_theme", 0, (-0.05, -0.05, 0.1), -2.0),
    ("blue_theme", 0, (0.1, -0.05, -0.05), -2.0),
    ("white_background", 0, (0.05 / 3, 0.05 / 3, 0.05 / 3), -8.0),
    ("^_^", 0, (0.0, 0.0, 0.0), 1.0),
    ("hatsune_miku", 4, (0.0, 0.0, 0.0), 1.0),
    ("kagamine_rin", 4, (0.0, 0.0, 0.0), 3.0),
)
TINY_TAGGER_SIDE = 32


def build_tagger(folder: Path) -> None:
    """model.onnx (NHWC BGR 0-255 in, one sigmoid confidence per tag out, as wd-vit-tagger-v3) and
    its selected_tags.csv."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.array([t[2] for t in TINY_TAGS], dtype=np.float32).T  # 3 x tags
    bias = np.array([t[3] for t in TINY_TAGS], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
        helper.make_node("Add", ["logits", "bias"], ["scores"]),
        helper.make_node("Sigmoid", ["scores"], ["output"]),
    ]
    side = TINY_TAGGER_SIDE
    graph = helper.make_graph(
        nodes,
        "tiny-wd-tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", side, side, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(TINY_TAGS)])],
        [
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    rows = ["tag_id,name,category,count"] + [f"{i},{t[0]},{t[1]},1" for i, t in enumerate(TINY_TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")


def _ip_adapter_folder(shape: Shape) -> Callable[[Path], None]:
    """The adapter file beside its image encoder's folder, the layout load_ip_adapter reads."""
    encoder, adapter = build_ip_adapter(shape)
    if shape is FULL:
        adapter = {k: v.half() for k, v in adapter.items()}
    encoder = _as_baked(encoder, shape)

    def save(folder: Path) -> None:
        encoder.save_pretrained(folder / IP_ADAPTER_ENCODER_DIR)
        save_file(adapter, folder / IP_ADAPTER_WEIGHT_NAME)

    return save


def build_all(root: Path, force: bool = False, shape: Shape = TINY) -> list[Path]:
    """Build every missing model folder (all of them with force); return what was written."""
    written = []
    for model_id in MODEL_IDS:
        target = root / model_id
        if target.exists() and not force:
            continue
        # Random init of 3.5B parameters is slow on a CPU: build on the GPU when there is one.
        with torch.device("cuda" if shape is FULL and torch.cuda.is_available() else "cpu"):
            pipe = build_model(MODEL_SEEDS[model_id], shape)
        if shape is FULL:
            pipe.to(torch.float16)  # what real baked weights hold
        _save_atomically(target, lambda d, p=pipe: _save_pipeline(p, d))
        del pipe
        written.append(target)
    # Each folder's builder runs only when the folder is missing; it returns what writes the folder.
    folders: dict[str, Callable[[], Callable[[Path], None]]] = {
        SAFETY_CHECKER_DIR: lambda: _pretrained(*build_safety_checker(shape)),
        CAPTIONER_DIR: lambda: _pretrained(*build_captioner()),
        UPSCALER_DIR: lambda: _pretrained(build_upscaler(shape)),  # fp32 like the real checkpoint; the engine casts it
        IP_ADAPTER_DIR: lambda: _ip_adapter_folder(shape),
        CONTROLNET_DIR: lambda: _pretrained(_as_baked(build_controlnet(shape), shape)),
        DEPTH_ESTIMATOR_DIR: lambda: _pretrained(*build_depth_estimator()),
        TAGGER_DIR: lambda: build_tagger,
    }
    for name, make in folders.items():
        target = root / name
        if force or not target.exists():
            _save_atomically(target, make())
            written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="weights root (default: $WEIGHTS_DIR or ./weights)")
    parser.add_argument("--force", action="store_true", help="rebuild folders that already exist")
    parser.add_argument(
        "--full-size", action="store_true", help="real SDXL shapes, random fp16 weights (~7 GB a model), for benchmarks"
    )
    args = parser.parse_args()
    root = args.out or weights_root()
    written = build_all(root, force=args.force, shape=FULL if args.full_size else TINY)
    for path in written:
        print(f"built {path}")
    if not written:
        print(f"tiny weights already present in {root}")


if __name__ == "__main__":
    main()
