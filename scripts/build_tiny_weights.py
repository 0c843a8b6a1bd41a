"""Build tiny, deterministic SDXL-shaped weights offline, in the layout real baked weights use.

The result is `weights/<model-id>/` (a diffusers folder that
`StableDiffusionXLPipeline.from_pretrained` loads) for every model id, plus
`weights/safety-checker/`. The tokenizers use the real CLIP BPE vocabulary
shipped inside the open-clip-torch wheel, so prompts tokenize exactly as on
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
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import MODEL_IDS, SAFETY_CHECKER_DIR, weights_root

MODEL_SEEDS = {"illustrious-xl": 1, "sdxl": 2}
CLIP_VOCAB_SIZE = 49408
# The two encoders must differ in width: single-file loaders tell them apart that way.
TEXT_ENCODER_WIDTH = 32
TEXT_ENCODER_2_WIDTH = 64
POOLED_DIM = 32
ADDITION_TIME_DIM = 8


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


def _text_config(width: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=width * 2,
        num_attention_heads=4,
        num_hidden_layers=6,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def build_model(seed: int) -> StableDiffusionXLPipeline:
    """A complete SDXL pipeline: 2-level UNet, two CLIP encoders, a 4-block (x8) VAE."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,  # x8 VAE: native resolution 128 px (real SDXL: 128 latent, 1024 px)
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_DIM + POOLED_DIM,
        cross_attention_dim=TEXT_ENCODER_WIDTH + TEXT_ENCODER_2_WIDTH,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
    )
    text_encoder = CLIPTextModel(_text_config(TEXT_ENCODER_WIDTH, TEXT_ENCODER_WIDTH))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(TEXT_ENCODER_2_WIDTH, POOLED_DIM))
    vocab, merges = clip_vocab()
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


def build_safety_checker() -> tuple[StableDiffusionSafetyChecker, CLIPImageProcessor]:
    """A tiny checker whose concept thresholds (1.0) can never be exceeded by a cosine."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1},
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def _save_atomically(target: Path, save: callable) -> None:
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


def build_all(root: Path, force: bool = False) -> list[Path]:
    """Build every missing model folder (all of them with force); return what was written."""
    written = []
    for model_id in MODEL_IDS:
        target = root / model_id
        if target.exists() and not force:
            continue
        pipe = build_model(MODEL_SEEDS[model_id])
        _save_atomically(target, lambda d, p=pipe: p.save_pretrained(d, safe_serialization=True))
        written.append(target)
    target = root / SAFETY_CHECKER_DIR
    if force or not target.exists():
        checker, processor = build_safety_checker()

        def save(d: Path) -> None:
            checker.save_pretrained(d, safe_serialization=True)
            processor.save_pretrained(d)

        _save_atomically(target, save)
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="weights root (default: $WEIGHTS_DIR or ./weights)")
    parser.add_argument("--force", action="store_true", help="rebuild folders that already exist")
    args = parser.parse_args()
    root = args.out or weights_root()
    written = build_all(root, force=args.force)
    for path in written:
        print(f"built {path}")
    if not written:
        print(f"tiny weights already present in {root}")


if __name__ == "__main__":
    main()
