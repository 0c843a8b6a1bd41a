"""LoRA training on a baked SDXL-family model, with pivotal tuning, written as a trained tar.

What it does, and why:
- LoRA on the UNet's attention projections (peft), or on the attention layers that
  `layers_to_optimize_regex` names; the base weights frozen.
- Pivotal tuning (cog-sdxl's method): the trigger word becomes new tokens `<s0><s1>` in both
  tokenizers. Only their rows learn: they are a parameter of their own, put in place of the
  vocabulary lookup by a hook (the vocabulary matrices get no gradient and no optimizer state).
  After each step the rows are pulled back toward the vocabulary's norm, and they stop learning
  after TRAIN_EMBEDDING_TRAIN_FRACTION of the steps (the safeguards of diffusers' advanced SDXL
  script and cog-sdxl), so a trigger cannot overpower every other word.
- Latents are encoded once per image and bucket (the VAE's mean and spread; in memory, or on
  disk with cache_latents_to_disk), then sampled each step; images are cropped to the bucket of
  nearest proportions, never squashed. Each epoch uses every cached latent once (no replacement).
- Loss: noise-prediction MSE weighted by min-SNR-gamma (gamma 5; an SNR of 0, a zero-terminal
  timestep, weighs 1 instead of dividing by zero); a linear learning-rate warm-up, then constant,
  or the schedule lr_scheduler / lr_warmup_steps ask for (diffusers' get_scheduler, as cog-sdxl).
- On CUDA: bf16 base weights and autocast where the GPU has bf16 (no grad scaler), else fp16 with
  a grad scaler; fp32 trainable weights. Gradient checkpointing only when asked or when the GPU is
  small (TRAIN_CHECKPOINTING_BELOW_GIB). On CPU everything is fp32.
- A fixed probe (the same images, noise and timesteps) is scored before and after training, so
  the log says whether the loss fell independently of the noise of single steps.
- The tar holds the LoRA in diffusers' layout (what `lora_weights` reads) and kohya's, the
  trigger's embedding in Replicate's and A1111's layouts, and the captions used.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from engine.config import CUSTOM_MODEL_ID, MODEL_IDS, REFERENCE_RESOLUTION
from engine.devices import DeviceSettings, current
from engine.errors import InputError, WeightsMissingError
from engine.logs import quiet_library_noise
from engine.request import reduced_seed
from training import export, hub, tagger
from training.captioner import autocaption
from training.config import (
    TAGGER_DIR,
    TAGGER_MODELS,
    TRAIN_CHECKPOINTING_BELOW_GIB,
    TRAIN_EMBEDDING_NORM_PULL,
    TRAIN_EMBEDDING_TRAIN_FRACTION,
    TRAIN_LOG_SECONDS,
    TRAIN_LORA_TARGETS,
    TRAIN_MIN_SNR_GAMMA,
    TRAIN_PIVOTAL_TOKENS,
    TRAIN_SAMPLE_GUIDANCE,
    TRAIN_SAMPLE_STEPS,
    TRAIN_TRIGGER_MAX_TOKENS,
    TRAIN_WARMUP_FRACTION,
    TRAIN_WARMUP_MAX_STEPS,
)
from training.data import ArchiveLimits, TrainingImage, caption_all, read_archive, trigger_pattern
from training.optimizers import build_optimizer, refuse_where_it_cannot_run
from training.request import TrainingRequest, buckets, nearest_bucket
from training.tracking import WandbRun

log = logging.getLogger(__name__)

TAR_NAME = "trained_model.tar"
PROBE_ITEMS = 4
CAPTIONS_LOGGED = 5
KOHYA_NAME = "lora_kohya.safetensors"


@dataclass(frozen=True)
class TrainingResult:
    tar: Path
    probe_loss_before: float
    probe_loss_after: float
    steps_per_second: float
    hf_repo_url: str | None = None  # set when the upload to hf_repo_id succeeded
    hf_upload_error: str | None = None  # why the upload failed (the tar is returned all the same)


@dataclass(frozen=True)
class Item:
    """One image at one bucket: its cached latent distribution and SDXL's size conditioning."""

    caption: int  # index into the captions
    time_ids: tuple[int, int, int, int, int, int]  # original h, w, crop top, left, target h, w
    shape: tuple[int, ...]  # of the latent
    mean: torch.Tensor | None = None  # in memory ...
    std: torch.Tensor | None = None
    file: Path | None = None  # ... or on disk (cache_latents_to_disk)

    def distribution(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.file is None:
            return self.mean, self.std  # type: ignore[return-value]
        tensors = load_file(self.file)
        return tensors["mean"], tensors["std"]


@dataclass(frozen=True)
class Precision:
    """How the frozen weights are held and the forward runs (see the module docstring)."""

    weights: torch.dtype
    autocast: torch.dtype | None  # None: no autocast (fp32)
    scaler: bool


def _precision(settings: DeviceSettings) -> Precision:
    if not settings.mixed_precision:
        return Precision(settings.train_dtype, None, False)
    if settings.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return Precision(torch.bfloat16, torch.bfloat16, False)
    return Precision(settings.train_dtype, torch.float16, True)


def _model_folder(weights: Path, model: str) -> Path:
    folder = weights / model
    if folder.is_dir():
        return folder
    if model == CUSTOM_MODEL_ID:
        raise InputError(
            "no custom checkpoint is baked into this image: bake one with CUSTOM_CHECKPOINT_URL "
            "(see README, 'Weights'), or choose illustrious-xl or sdxl"
        )
    if model not in MODEL_IDS:
        raise InputError(f"model must be one of {', '.join((*MODEL_IDS, CUSTOM_MODEL_ID))}, got {model!r}")
    raise WeightsMissingError(f"weights missing in {weights}: {model}. Run `make weights` or bake the real ones")


def _check_trigger(tokenizer: CLIPTokenizer, trigger: str) -> None:
    """A trigger word that stays text is learned through its pieces: many pieces learn poorly."""
    for word in trigger.split():
        pieces = tokenizer.tokenize(word)
        if len(pieces) > TRAIN_TRIGGER_MAX_TOKENS:
            raise InputError(
                f"trigger_word {trigger!r}: {word!r} is split by the tokenizer into {len(pieces)} pieces "
                f"({' '.join(p.removesuffix('</w>') for p in pieces)}): use a short rare word such as TOK, "
                "or turn train_text_encoder on"
            )


def _lora_targets(folder: Path, regex: str | None) -> list[str]:
    """peft's target modules: the attention projections, or the attention layers the regex finds.

    Read from the UNet's config on the meta device (no weights), so a regex that matches nothing
    fails before any captioning or loading.
    """
    if not regex:
        return list(TRAIN_LORA_TARGETS)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    # Linear layers inside the attention blocks: what a LoRA holds in every tool's layout.
    candidates = [
        name for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear) and ".attentions." in name
    ]
    pattern = re.compile(regex)
    chosen = [name for name in candidates if pattern.search(name)]
    if not chosen:
        examples = ", ".join(candidates[i] for i in (0, 1, len(candidates) // 2, -1))
        raise InputError(
            f"layers_to_optimize_regex {regex!r} matches none of this UNet's {len(candidates)} attention layers "
            f"(SDXL's, not Flux's: names like {examples}). Example: 'attn2\\.to_(k|v)$' for the cross-attention "
            "keys and values, or leave it out for every attention projection"
        )
    log.info("layers_to_optimize_regex: LoRA on %d of %d attention layers", len(chosen), len(candidates))
    return chosen


def _checkpointing(request: TrainingRequest, device: torch.device) -> bool:
    """Gradient checkpointing saves memory at about a third more time per step: only when asked or needed."""
    if request.gradient_checkpointing:
        log.info("gradient checkpointing: on (asked for)")
        return True
    if device.type == "cuda":
        gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        if gib < TRAIN_CHECKPOINTING_BELOW_GIB:
            log.info("gradient checkpointing: on, the GPU has %.0f GiB (below %d)", gib, TRAIN_CHECKPOINTING_BELOW_GIB)
            return True
    return False


class _Pivotal:
    """New tokens in both text encoders; only their rows learn, as a parameter of their own."""

    def __init__(self, pipe: StableDiffusionXLPipeline, generator: torch.Generator) -> None:
        self.tokens = [f"<s{i}>" for i in range(TRAIN_PIVOTAL_TOKENS)]
        self.rows: list[torch.nn.Parameter] = []
        self.norms: list[float] = []
        self.learning = True
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            tokenizer.add_tokens(self.tokens)
            # The matrix grows so the new ids can be looked up at all; its new rows are never read.
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            embedding = encoder.get_input_embeddings()
            first = tokenizer.convert_tokens_to_ids(self.tokens[0])
            assert tokenizer.convert_tokens_to_ids(self.tokens) == list(range(first, first + len(self.tokens)))
            vocab = embedding.weight[:first].detach().float()
            # Random rows at the vocabulary's own scale, as textual inversion starts; fp32 always.
            start = torch.randn(len(self.tokens), vocab.shape[1], generator=generator) * vocab.std().cpu()
            rows = torch.nn.Parameter(start.to(embedding.weight.device))
            embedding.register_forward_hook(self._hook(rows, first))
            self.rows.append(rows)
            self.norms.append(vocab.norm(dim=1).mean().item())

    @staticmethod
    def _hook(rows: torch.nn.Parameter, first: int) -> Callable:
        count = rows.shape[0]

        def put_rows(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            ids = args[0]
            new = (ids >= first) & (ids < first + count)
            picked = rows[(ids - first).clamp(0, count - 1)].to(output.dtype)
            return torch.where(new.unsqueeze(-1), picked, output)

        return put_rows

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.rows)

    def pull_back(self) -> None:
        """Each row's norm moves TRAIN_EMBEDDING_NORM_PULL of the way (log scale) to the vocabulary's mean."""
        with torch.no_grad():
            for rows, norm in zip(self.rows, self.norms, strict=True):
                rows.mul_((norm / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)) ** TRAIN_EMBEDDING_NORM_PULL)

    def stop(self) -> None:
        """The rows keep their values from here on (the optimizers skip parameters without a gradient)."""
        self.learning = False
        for rows in self.rows:
            rows.requires_grad_(False)
            rows.grad = None

    def state(self) -> dict[str, torch.Tensor]:
        """embeddings.pti as Replicate's SDXL trainer writes it."""
        return {f"text_encoders_{i}": r.detach().float().cpu().contiguous() for i, r in enumerate(self.rows)}


def _encode_prompts(pipe: StableDiffusionXLPipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: both encoders' penultimate layers side by side, and the pooled second."""
    hidden = []
    pooled = None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


def _trigger_up_front(tokenizer: CLIPTokenizer, captions: list[str], trigger: str) -> list[str]:
    """A caption is read to 77 tokens: one whose first trigger ends later gets the trigger in front."""
    if not trigger:
        return captions
    room = tokenizer.model_max_length - 2  # start and end tokens
    pattern = trigger_pattern(trigger)
    out = []
    for caption in captions:
        match = pattern.search(caption)
        if match and len(tokenizer.tokenize(caption[: match.end()])) > room:
            caption = f"{trigger}, {caption}"
        out.append(caption)
    moved = sum(a != b for a, b in zip(captions, out, strict=True))
    if moved:
        log.info("trigger word moved to the front of %d caption(s) whose trigger was past the 77-token limit", moved)
    return out


def _size_multiple(pipe: StableDiffusionXLPipeline) -> int:
    """Pixel sides must give latents the UNet can halve at every level."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def _cache_latents(
    pipe: StableDiffusionXLPipeline, images: list[TrainingImage], resolutions: list[int], disk: Path | None
) -> dict[tuple[int, int], list[Item]]:
    """Each image once per resolution, at the bucket of nearest proportions, cropped to fill it."""
    native = pipe.default_sample_size * pipe.vae_scale_factor
    multiple = _size_multiple(pipe)
    vae = pipe.vae
    upcast = vae.dtype != torch.float32 and vae.config.force_upcast  # the baked fp16-fix VAE needs none
    if upcast:
        vae.to(torch.float32)
    groups: dict[tuple[int, int], list[Item]] = {}
    with torch.no_grad():
        for index, item in enumerate(images):
            chosen = set()
            for resolution in resolutions:
                ref = nearest_bucket(item.image.size, buckets(resolution))
                chosen.add(
                    tuple(max(multiple, round(v * native / REFERENCE_RESOLUTION / multiple) * multiple) for v in ref)
                )
            for width, height in sorted(chosen):
                w, h = item.image.size
                scale = max(width / w, height / h)
                resized = item.image.resize(
                    (max(width, math.ceil(w * scale)), max(height, math.ceil(h * scale))), Image.Resampling.LANCZOS
                )
                left, top = (resized.width - width) // 2, (resized.height - height) // 2
                crop = resized.crop((left, top, left + width, top + height))
                pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
                dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
                mean, std = dist.mean[0].float().cpu().contiguous(), dist.std[0].float().cpu().contiguous()
                size = (h, w, top, left, height, width)
                if disk is None:
                    cached = Item(index, size, tuple(mean.shape), mean=mean, std=std)
                else:
                    file = disk / f"{index}-{width}x{height}.safetensors"
                    save_file({"mean": mean, "std": std}, file)
                    cached = Item(index, size, tuple(mean.shape), file=file)
                groups.setdefault((width, height), []).append(cached)
    if upcast:
        vae.to(pipe.unet.dtype)
    sizes = ", ".join(f"{w}x{h} ({len(v)})" for (w, h), v in sorted(groups.items()))
    where = f" on disk in {disk}" if disk is not None else ""
    log.info("cached %d latents%s in %d buckets: %s", sum(map(len, groups.values())), where, len(groups), sizes)
    return groups


def _snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction): Hang et al., min-SNR.

    The SNR is clamped above zero, so a zero-terminal-SNR timestep weighs 1 (epsilon) instead of 0/0.
    """
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = (alphas / (1 - alphas)).clamp(min=torch.finfo(torch.float32).tiny)
    clipped = torch.clamp(snr, max=TRAIN_MIN_SNR_GAMMA)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class _Run:
    """The frozen model, what learns, and the loss of a batch."""

    def __init__(
        self, pipe: StableDiffusionXLPipeline, pivotal: _Pivotal | None, captions: list[str], precision: Precision
    ) -> None:
        self.pipe = pipe
        self.pivotal = pivotal
        self.captions = captions
        self.precision = precision
        self.device = pipe.unet.device
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def autocast(self) -> torch.autocast:
        amp = self.precision.autocast
        return torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def conditioning(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings; while no token learns nothing in them does, so each is made once."""
        if self.pivotal is not None and self.pivotal.learning:
            with self.autocast():
                return _encode_prompts(self.pipe, captions)
        for caption in set(captions) - self.cached.keys():
            with torch.no_grad(), self.autocast():
                embeds, pooled = _encode_prompts(self.pipe, [caption])
            self.cached[caption] = (embeds[0], pooled[0])
        return (
            torch.stack([self.cached[c][0] for c in captions]),
            torch.stack([self.cached[c][1] for c in captions]),
        )

    def losses(
        self, items: list[Item], captions: list[str], noise: torch.Tensor, sample: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The per-sample noise-prediction MSE of this batch."""
        unet = self.pipe.unet
        dists = [i.distribution() for i in items]
        mean = torch.stack([d[0] for d in dists])
        std = torch.stack([d[1] for d in dists])
        latents = ((mean + std * sample) * self.pipe.vae.config.scaling_factor).to(self.device)
        noise = noise.to(self.device)
        t = t.to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        embeds, pooled = self.conditioning(captions)
        time_ids = torch.tensor([i.time_ids for i in items], device=self.device, dtype=embeds.dtype)
        with self.autocast():
            pred = unet(
                noisy.to(unet.dtype),
                t,
                encoder_hidden_states=embeds.to(unet.dtype),
                added_cond_kwargs={"text_embeds": pooled.to(unet.dtype), "time_ids": time_ids.to(unet.dtype)},
            ).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def _probe(run: _Run, groups: dict[tuple[int, int], list[Item]], generator: torch.Generator) -> Callable[[], float]:
    """A fixed score: the same items, noise and timesteps each time it is called."""
    items = [group[0] for group in groups.values()]
    items = (items + [i for g in groups.values() for i in g[1:]])[:PROBE_ITEMS]
    count = run.scheduler.config.num_train_timesteps
    fixed = [
        (
            item,
            torch.randn(item.shape, generator=generator)[None],
            torch.randn(item.shape, generator=generator)[None],
            torch.tensor([int((k + 0.5) / len(items) * count)]),
        )
        for k, item in enumerate(items)
    ]

    def score() -> float:
        with torch.no_grad():
            values = [
                run.losses([item], [run.captions[item.caption]], noise, sample, t).item()
                for item, noise, sample, t in fixed
            ]
        return sum(values) / len(values)

    return score


def _batches(
    groups: dict[tuple[int, int], list[Item]], batch_size: int, generator: torch.Generator
) -> Iterator[list[Item]]:
    """Epoch after epoch: each uses every cached latent once, in batches from one bucket, in random order."""
    while True:
        batches = []
        for items in groups.values():
            order = torch.randperm(len(items), generator=generator).tolist()
            batches += [[items[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
        for index in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[index]


def train(
    request: TrainingRequest,
    weights: Path,
    out_dir: Path,
    limits: ArchiveLimits | None = None,
) -> TrainingResult:
    """Check everything, train, and write out_dir/trained_model.tar; any bad input fails first."""
    request.validate()
    if request.skip_training_and_use_pretrained_hf_lora_url is not None:
        return _package_pretrained(request, out_dir)
    folder = _model_folder(weights, request.model)
    settings = current()  # the engine's device choice (engine/devices.py)
    refuse_where_it_cannot_run(request.optimizer_name, settings.device.type)
    trigger = request.trigger
    targets = _lora_targets(folder, request.layers_to_optimize_regex)
    # Reference-scale sides: enough for every bucket on a real model, more than enough on the tiny one.
    images = read_archive(request.input_images, limits, short_side=max(request.resolutions()))  # type: ignore[arg-type]
    pivotal_on = request.train_text_encoder and bool(trigger)
    if request.train_text_encoder and not trigger:
        log.info("train_text_encoder: no trigger word, so there are no new tokens to learn: the LoRA alone trains")
    if not pivotal_on and request.ti_lr != TrainingRequest.ti_lr:
        log.info("ti_lr is not used: without pivotal tuning there are no new tokens to learn")
    if not pivotal_on and trigger:  # with pivotal tuning the word becomes new tokens instead
        _check_trigger(CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True), trigger)
    if request.wandb_api_key is None and (request.wandb_run or request.wandb_entity or request.wandb_sample_prompts):
        log.info("wandb_run, wandb_entity and wandb_sample_prompts are used only with wandb_api_key: not logging")
    quiet_library_noise()
    precision = _precision(settings)
    tracker = (
        WandbRun(
            request.wandb_api_key, request.wandb_project, request.wandb_entity, request.wandb_run, request.record()
        )
        if request.wandb_api_key
        else None
    )
    try:
        return _train(request, weights, folder, out_dir, images, targets, pivotal_on, settings, precision, tracker)
    finally:
        if tracker is not None:
            tracker.finish()


def _train(
    request: TrainingRequest,
    weights: Path,
    folder: Path,
    out_dir: Path,
    images: list[TrainingImage],
    targets: list[str],
    pivotal_on: bool,
    settings: DeviceSettings,
    precision: Precision,
    tracker: WandbRun | None,
) -> TrainingResult:
    device = settings.device
    trigger = request.trigger
    automatic = _autocaptions(request, weights, [i.image for i in images if i.caption is None], device)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        folder, dtype=precision.weights, device_map=str(device), local_files_only=True, use_safetensors=True
    )
    written = caption_all(images, trigger, request.autocaption_prefix, request.autocaption_suffix, automatic)
    written = _trigger_up_front(pipe.tokenizer, written, trigger)
    for item, caption in list(zip(images, written, strict=True))[:CAPTIONS_LOGGED]:
        log.info("caption of %s: %s", item.name, caption)
    if len(images) > CAPTIONS_LOGGED:
        log.info("(and %d more captions)", len(images) - CAPTIONS_LOGGED)
    seed = secrets.randbelow(2**32) if request.seed is None or request.seed < 0 else reduced_seed(request.seed)
    log.info("seed: %d", seed)
    generator = torch.Generator("cpu").manual_seed(seed)

    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    pivotal = _Pivotal(pipe, generator) if pivotal_on else None
    captions = [trigger_pattern(trigger).sub(pivotal.text, c) for c in written] if pivotal else written
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft draws the LoRA's initial weights from the global generator
        pipe.unet.add_adapter(
            LoraConfig(
                r=request.lora_rank, lora_alpha=request.lora_rank, init_lora_weights="gaussian", target_modules=targets
            )
        )
    lora_params = [p for p in pipe.unet.parameters() if p.requires_grad]
    for p in lora_params:
        p.data = p.data.float()
    if _checkpointing(request, device):
        pipe.unet.enable_gradient_checkpointing()
    with tempfile.TemporaryDirectory(prefix="latents-") as disk:
        groups = _cache_latents(
            pipe, images, request.resolutions(), Path(disk) if request.cache_latents_to_disk else None
        )
        run = _Run(pipe, pivotal, captions, precision)
        probe = _probe(run, groups, torch.Generator("cpu").manual_seed(seed + 1))
        before = probe()
        log.info(
            "training %s: %d images, %d steps, batch %d, rank %d, lr %g, pivotal tuning %s, %s, probe loss %.4f",
            request.model,
            len(images),
            request.steps,
            request.batch_size,
            request.lora_rank,
            request.learning_rate,
            "on" if pivotal else "off",
            str(precision.autocast or precision.weights).removeprefix("torch."),
            before,
        )
        elapsed = _fit(run, groups, request, lora_params, generator, settings, tracker)
        after = probe()
    log.info(
        "trained %d steps in %s (%.2f it/s); probe loss %.4f -> %.4f",
        request.steps,
        _format_seconds(elapsed),
        request.steps / elapsed,
        before,
        after,
    )
    record = {
        **request.record(),
        "trigger_word": trigger,
        "seed": seed,
        "images": len(images),
        "pivotal_tuning": pivotal is not None,
        "probe_loss_before": round(before, 6),
        "probe_loss_after": round(after, 6),
        "seconds": round(elapsed, 1),
    }
    if pivotal is not None:
        record["embedding_file"] = f"{export.file_stem(trigger)}.safetensors"
    with tempfile.TemporaryDirectory(dir=_made(out_dir)) as tmp:
        stage = Path(tmp)
        _stage_lora(pipe, pivotal, trigger, record, stage)
        _stage_captions(images, written, stage)
        if tracker is not None:
            tracker.save(stage / "lora.safetensors")
        tar = _write_tar(stage, out_dir)
        url, error = _upload(request, stage, trigger, record)
    return TrainingResult(tar, before, after, request.steps / elapsed, url, error)


def _autocaptions(
    request: TrainingRequest, weights: Path, images: list[Image.Image], device: torch.device
) -> list[str] | None:
    """Captions for the images without a .txt: Danbooru tags for a model prompted in tags
    (TAGGER_MODELS), natural language (BLIP) for the others. None when autocaption is off."""
    if not request.autocaption or not images:
        return None
    if request.model in TAGGER_MODELS:
        if tagger.is_baked(weights):
            return tagger.tag_captions(weights, images)
        log.info(
            "autocaption: no WD tagger is baked (weights/%s): %s gets natural-language captions instead of tags",
            TAGGER_DIR,
            request.model,
        )
    return autocaption(weights, images, device)


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _fit(
    run: _Run,
    groups: dict[tuple[int, int], list[Item]],
    request: TrainingRequest,
    lora_params: list[torch.nn.Parameter],
    generator: torch.Generator,
    settings: DeviceSettings,
    tracker: WandbRun | None,
) -> float:
    """The training steps, with progress in the log at most every TRAIN_LOG_SECONDS; returns seconds."""
    param_groups = [{"params": lora_params, "lr": request.learning_rate, "weight_decay": 1e-4}]
    trainable = list(lora_params)
    stop_tokens_after = request.steps
    if run.pivotal is not None:
        embeddings = run.pivotal.parameters()
        param_groups.append({"params": embeddings, "lr": request.ti_lr, "weight_decay": 0.0})
        trainable += embeddings
        stop_tokens_after = max(1, round(request.steps * TRAIN_EMBEDDING_TRAIN_FRACTION))
        log.info(
            "pivotal tuning: the trigger's tokens learn for the first %d steps at lr %g",
            stop_tokens_after,
            request.ti_lr,
        )
    optimizer = build_optimizer(request.optimizer_name, param_groups, settings.eight_bit_optimizers)
    lr_schedule = _lr_schedule(optimizer, request)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision.scaler)
    prompts = request.sample_prompts() if tracker is not None else []
    timesteps = run.scheduler.config.num_train_timesteps
    batches = _batches(groups, request.batch_size, generator)
    start = last_log = time.perf_counter()
    recent: list[float] = []
    for step in range(1, request.steps + 1):
        items = next(batches)
        drop = (torch.rand(len(items), generator=generator) < request.caption_dropout_rate).tolist()
        captions = ["" if d else run.captions[i.caption] for i, d in zip(items, drop, strict=True)]
        sample = torch.randn((len(items), *items[0].shape), generator=generator)
        noise = torch.randn((len(items), *items[0].shape), generator=generator)
        t = torch.randint(timesteps, (len(items),), generator=generator)
        per_sample = run.losses(items, captions, noise, sample, t)
        loss = (per_sample * _snr_weights(run.scheduler, t.to(per_sample.device))).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in trainable if p.requires_grad], 1.0)
        scaler.step(optimizer)
        scaler.update()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if run.pivotal is not None and run.pivotal.learning:
            run.pivotal.pull_back()
            if step == stop_tokens_after:
                run.pivotal.stop()
        recent.append(loss.item())
        if tracker is not None:
            tracker.log({"loss": recent[-1], "lr": lr_schedule.get_last_lr()[0]}, step)
            if prompts and step % request.wandb_sample_interval == 0:
                tracker.samples(_samples(run, prompts, request.trigger), step)
            if step % request.wandb_save_interval == 0 and step < request.steps:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / f"lora-step{step}.safetensors"
                    save_file(_lora_state(run.pipe), path)
                    tracker.save(path)
        now = time.perf_counter()
        if step in (1, request.steps) or now - last_log >= TRAIN_LOG_SECONDS:
            rate = step / (now - start)
            log.info(
                "step %d/%d, loss %.4f, lr %.2g, %.2f it/s, %s left",
                step,
                request.steps,
                sum(recent) / len(recent),
                lr_schedule.get_last_lr()[0],
                rate,
                _format_seconds((request.steps - step) / rate),
            )
            recent.clear()
            last_log = now
    return time.perf_counter() - start


def _lr_schedule(optimizer: torch.optim.Optimizer, request: TrainingRequest) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate step by step (a factor on every group's rate).

    Unasked: a linear warm-up over TRAIN_WARMUP_FRACTION of the steps (at most
    TRAIN_WARMUP_MAX_STEPS; the first step already learns), then constant. lr_scheduler /
    lr_warmup_steps (Replicate's SDXL trainer's inputs): diffusers' get_scheduler, as that trainer
    runs it, except that "constant" keeps the warm-up asked for (diffusers' plain "constant" has none).
    """
    default_warmup = max(1, min(TRAIN_WARMUP_MAX_STEPS, int(request.steps * TRAIN_WARMUP_FRACTION)))
    if request.lr_scheduler is None and request.lr_warmup_steps is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / default_warmup))
    name = request.lr_scheduler or "constant"
    warmup = default_warmup if request.lr_warmup_steps is None else request.lr_warmup_steps
    after = "" if name == "constant" else f", then down to 0 at step {request.steps}"
    log.info("learning rate: %s schedule, %d warm-up step(s) from 0%s", name, warmup, after)
    return get_scheduler(
        "constant_with_warmup" if name == "constant" else name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=request.steps,
    )


def _samples(run: _Run, prompts: list[str], trigger: str) -> list[tuple[str, Image.Image]]:
    """wandb sample images at the model's native size, the trigger written as the learned tokens."""
    pipe = run.pipe
    pipe.set_progress_bar_config(disable=True)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    out = []
    for k, prompt in enumerate(prompts):
        text = trigger_pattern(trigger).sub(run.pivotal.text, prompt) if run.pivotal and trigger else prompt
        with torch.no_grad(), run.autocast():
            image = pipe(
                text,
                width=size,
                height=size,
                num_inference_steps=TRAIN_SAMPLE_STEPS,
                guidance_scale=TRAIN_SAMPLE_GUIDANCE,
                generator=torch.Generator("cpu").manual_seed(42 + k),
            ).images[0]
        out.append((prompt, image))
    return out


def _lora_state(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """The LoRA in diffusers' layout (`unet.` keys), fp16, as save_lora_weights writes it."""
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    return {f"unet.{k}": v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}


def _stage_lora(
    pipe: StableDiffusionXLPipeline, pivotal: _Pivotal | None, trigger: str, record: dict, folder: Path
) -> None:
    """The files `lora_weights` reads (weightstore/resolve.py), and the same in other tools' layouts."""
    save_file(_lora_state(pipe), folder / "lora.safetensors", metadata={"format": "pt"})
    peft_state = {
        k: v.detach().to("cpu", torch.float16).contiguous() for k, v in get_peft_model_state_dict(pipe.unet).items()
    }
    kohya = export.kohya_state_dict(peft_state, record["lora_rank"], pipe.unet.config.layers_per_block)
    rank = str(record["lora_rank"])
    kohya_metadata = {"ss_network_module": "networks.lora", "ss_network_dim": rank, "ss_network_alpha": rank}
    save_file(kohya, folder / KOHYA_NAME, metadata={**kohya_metadata, "ss_base_model_version": "sdxl_base_v1-0"})
    if pivotal is not None:
        rows = pivotal.state()
        save_file(rows, folder / "embeddings.pti")
        (folder / "special_params.json").write_text(json.dumps({trigger: pivotal.text}))
        (folder / "embeddings").mkdir()
        save_file(export.a1111_embedding(rows), folder / "embeddings" / record["embedding_file"])
    (folder / "training_params.json").write_text(json.dumps(record, indent=2))


def _stage_captions(images: list[TrainingImage], captions: list[str], folder: Path) -> None:
    """captions/<image name>.txt: each caption as trained (the trigger as written), as Flux's tar has them."""
    for item, caption in zip(images, captions, strict=True):
        path = folder / "captions" / Path(item.name).with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(caption + "\n")


def _write_tar(folder: Path, out_dir: Path) -> Path:
    """trained_model.tar from the staged files, names relative to the folder, in name order."""
    tar_path = out_dir / TAR_NAME
    # Plain ustar: short names need no pax headers, and every tar reader takes it.
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            tar.add(path, arcname=path.relative_to(folder).as_posix())
    log.info("wrote %s (%.1f MB)", TAR_NAME, tar_path.stat().st_size / 1e6)
    return tar_path


def _upload(request: TrainingRequest, folder: Path, trigger: str, record: dict) -> tuple[str | None, str | None]:
    """Upload to hf_repo_id when set (not the captions, as Flux's trainer). Returns (url, error)."""
    if not request.hf_repo_id:
        if request.hf_token:
            log.info("hf_token is set without hf_repo_id: nothing is uploaded")
        return None, None
    assert request.hf_token is not None  # request.validate refused a repo without a token
    shutil.rmtree(folder / "captions", ignore_errors=True)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    (folder / "README.md").write_text(hub.model_card(request.hf_repo_id, trigger, request.model, record, files))
    log.info("uploading to Hugging Face: %s", request.hf_repo_id)
    try:
        url = hub.upload(folder, request.hf_repo_id, request.hf_token)
    except InputError as exc:
        log.error("%s; the trained tar is returned all the same", exc)
        return None, str(exc)
    log.info("uploaded to %s", url)
    return url, None


def _package_pretrained(request: TrainingRequest, out_dir: Path) -> TrainingResult:
    """skip_training_and_use_pretrained_hf_lora_url: that LoRA as this trainer's output, untrained."""
    url = request.skip_training_and_use_pretrained_hf_lora_url
    assert url is not None
    log.info(
        "skip_training_and_use_pretrained_hf_lora_url is set: no training; input_images and the training "
        "settings are not used"
    )
    with tempfile.TemporaryDirectory(dir=_made(out_dir)) as tmp:
        work, stage = Path(tmp) / "download", Path(tmp) / "stage"
        stage.mkdir()
        repo_id, path = hub.fetch_pretrained(url, request.hf_token, work)
        shutil.copyfile(path, stage / "lora.safetensors")
        record = {"source": url.split("?")[0], "source_repo": repo_id, "model": request.model}
        (stage / "training_params.json").write_text(json.dumps(record, indent=2))
        tar = _write_tar(stage, out_dir)
        url_out, error = _upload(request, stage, request.trigger, record)
    return TrainingResult(tar, math.nan, math.nan, 0.0, url_out, error)
