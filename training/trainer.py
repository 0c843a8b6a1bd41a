"""LoRA training on a baked SDXL-family model, with pivotal tuning, written as a trained tar.

What it does, and why:
- LoRA on the UNet's attention projections (peft), the base weights frozen.
- Pivotal tuning (cog-sdxl's method): the trigger word becomes new tokens `<s0><s1>` in both
  tokenizers, and only those embedding rows learn (their gradient is masked to those rows, and
  Adam without weight decay leaves rows with zero gradient exactly as they were).
- Latents are encoded once per image and bucket (the VAE's mean and spread), then sampled each
  step; images are cropped to the bucket of nearest proportions, never squashed.
- Loss: noise-prediction MSE weighted by min-SNR-gamma (gamma 5), which keeps the many easy
  low-noise timesteps from dominating; a linear learning-rate warm-up, then constant.
- On CUDA: fp16 base weights, fp32 trainable weights, autocast with a gradient scaler, and
  gradient checkpointing in the UNet. On CPU everything is fp32.
- A fixed probe (the same images, noise and timesteps) is scored before and after training, so
  the log says whether the loss fell independently of the noise of single steps.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from engine.config import (
    CUSTOM_MODEL_ID,
    MODEL_IDS,
    REFERENCE_RESOLUTION,
    TRAIN_EMBEDDING_LEARNING_RATE,
    TRAIN_LOG_SECONDS,
    TRAIN_LORA_TARGETS,
    TRAIN_MIN_SNR_GAMMA,
    TRAIN_PIVOTAL_TOKENS,
    TRAIN_TRIGGER_MAX_TOKENS,
    TRAIN_WARMUP_FRACTION,
    TRAIN_WARMUP_MAX_STEPS,
)
from engine.devices import current
from engine.errors import InputError, WeightsMissingError
from engine.logs import quiet_library_noise
from engine.request import reduced_seed
from training.captioner import autocaption
from training.data import ArchiveLimits, TrainingImage, caption_all, read_archive, trigger_pattern
from training.request import TrainingRequest, buckets, nearest_bucket

log = logging.getLogger(__name__)

TAR_NAME = "trained_model.tar"
PROBE_ITEMS = 4
CAPTIONS_LOGGED = 5


@dataclass(frozen=True)
class TrainingResult:
    tar: Path
    probe_loss_before: float
    probe_loss_after: float
    steps_per_second: float


@dataclass(frozen=True)
class Item:
    """One image at one bucket: its cached latent distribution and SDXL's size conditioning."""

    mean: torch.Tensor
    std: torch.Tensor
    caption: int  # index into the captions
    time_ids: tuple[int, int, int, int, int, int]  # original h, w, crop top, left, target h, w


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
    pieces = tokenizer.tokenize(trigger)
    if len(pieces) > TRAIN_TRIGGER_MAX_TOKENS:
        raise InputError(
            f"trigger_word {trigger!r} is split by the tokenizer into {len(pieces)} pieces "
            f"({' '.join(p.removesuffix('</w>') for p in pieces)}): use a short rare word such as TOK, "
            "or turn train_text_encoder on"
        )


class _Pivotal:
    """New tokens in both text encoders; only their embedding rows learn."""

    def __init__(self, pipe: StableDiffusionXLPipeline, generator: torch.Generator, cuda: bool) -> None:
        self.tokens = [f"<s{i}>" for i in range(TRAIN_PIVOTAL_TOKENS)]
        self.embeddings: list[torch.nn.Embedding] = []
        self.ids: list[list[int]] = []
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            tokenizer.add_tokens(self.tokens)
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows are set below
            embedding = encoder.get_input_embeddings()
            if cuda:
                embedding.to(torch.float32)  # the rows that learn stay fp32; autocast handles the rest
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            with torch.no_grad():
                # Random rows at the vocabulary's own scale, as textual inversion starts.
                std = embedding.weight[: ids[0]].float().std()
                rows = torch.randn(len(ids), embedding.weight.shape[1], generator=generator) * std
                embedding.weight[ids] = rows.to(embedding.weight)
            mask = torch.zeros(embedding.weight.shape[0], 1, device=embedding.weight.device)
            mask[ids] = 1
            embedding.weight.requires_grad_(True)
            embedding.weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype))
            self.embeddings.append(embedding)
            self.ids.append(ids)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [e.weight for e in self.embeddings]

    def rows(self) -> dict[str, torch.Tensor]:
        """embeddings.pti as Replicate's SDXL trainer writes it."""
        return {
            f"text_encoders_{i}": e.weight[ids].detach().float().cpu().contiguous()
            for i, (e, ids) in enumerate(zip(self.embeddings, self.ids, strict=True))
        }


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


def _size_multiple(pipe: StableDiffusionXLPipeline) -> int:
    """Pixel sides must give latents the UNet can halve at every level."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def _cache_latents(
    pipe: StableDiffusionXLPipeline, images: list[TrainingImage], resolutions: list[int]
) -> dict[tuple[int, int], list[Item]]:
    """Each image once per resolution, at the bucket of nearest proportions, cropped to fill it."""
    native = pipe.default_sample_size * pipe.vae_scale_factor
    multiple = _size_multiple(pipe)
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
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
                groups.setdefault((width, height), []).append(
                    Item(dist.mean[0].float().cpu(), dist.std[0].float().cpu(), index, (h, w, top, left, height, width))
                )
    if upcast:
        vae.to(torch.float16)
    sizes = ", ".join(f"{w}x{h} ({len(v)})" for (w, h), v in sorted(groups.items()))
    log.info("cached %d latents in %d buckets: %s", sum(map(len, groups.values())), len(groups), sizes)
    return groups


def _snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction): Hang et al., min-SNR."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
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

    def __init__(self, pipe: StableDiffusionXLPipeline, pivotal: _Pivotal | None, captions: list[str]) -> None:
        self.pipe = pipe
        self.pivotal = pivotal
        self.captions = captions
        self.device = pipe.unet.device
        self.cuda = self.device.type == "cuda"
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def conditioning(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings; without pivotal tuning nothing in them learns, so each is made once."""
        if self.pivotal is not None:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cuda):
                return _encode_prompts(self.pipe, captions)
        for caption in set(captions) - self.cached.keys():
            with torch.no_grad():
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
        mean = torch.stack([i.mean for i in items])
        std = torch.stack([i.std for i in items])
        latents = ((mean + std * sample) * self.pipe.vae.config.scaling_factor).to(self.device)
        noise = noise.to(self.device)
        t = t.to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        embeds, pooled = self.conditioning(captions)
        time_ids = torch.tensor([i.time_ids for i in items], device=self.device, dtype=embeds.dtype)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cuda):
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
            torch.randn(item.mean.shape, generator=generator)[None],
            torch.randn(item.mean.shape, generator=generator)[None],
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


def train(
    request: TrainingRequest,
    weights: Path,
    out_dir: Path,
    limits: ArchiveLimits | None = None,
) -> TrainingResult:
    """Check everything, train, and write out_dir/trained_model.tar; any bad input fails first."""
    request.validate()
    folder = _model_folder(weights, request.model)
    # Reference-scale sides: enough for every bucket on a real model, more than enough on the tiny one.
    images = read_archive(request.input_images, limits, short_side=max(request.resolutions()))
    if not request.train_text_encoder:  # with pivotal tuning the word becomes new tokens instead
        _check_trigger(CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True), request.trigger_word)
    quiet_library_noise()
    settings = current()  # the engine's device choice (engine/devices.py)
    device, dtype = settings.device, settings.train_dtype
    uncaptioned = [i.image for i in images if i.caption is None]
    automatic = autocaption(weights, uncaptioned, device) if request.autocaption and uncaptioned else None
    pipe = StableDiffusionXLPipeline.from_pretrained(
        folder, dtype=dtype, device_map=str(device), local_files_only=True, use_safetensors=True
    )
    captions = caption_all(
        images, request.trigger_word, request.autocaption_prefix, request.autocaption_suffix, automatic
    )
    for item, caption in list(zip(images, captions, strict=True))[:CAPTIONS_LOGGED]:
        log.info("caption of %s: %s", item.name, caption)
    if len(images) > CAPTIONS_LOGGED:
        log.info("(and %d more captions)", len(images) - CAPTIONS_LOGGED)
    seed = secrets.randbelow(2**32) if request.seed is None or request.seed < 0 else reduced_seed(request.seed)
    log.info("seed: %d", seed)
    generator = torch.Generator("cpu").manual_seed(seed)

    cuda = settings.mixed_precision  # fp32 LoRA weights, fp16 autocast and a grad scaler: CUDA only
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    pivotal = _Pivotal(pipe, generator, cuda) if request.train_text_encoder else None
    if pivotal is not None:
        pattern = trigger_pattern(request.trigger_word)
        captions = [pattern.sub(pivotal.text, c) for c in captions]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft draws the LoRA's initial weights from the global generator
        pipe.unet.add_adapter(
            LoraConfig(
                r=request.lora_rank,
                lora_alpha=request.lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(TRAIN_LORA_TARGETS),
            )
        )
    lora_params = [p for p in pipe.unet.parameters() if p.requires_grad]
    if cuda:
        for p in lora_params:
            p.data = p.data.float()
        pipe.unet.enable_gradient_checkpointing()
    groups = _cache_latents(pipe, images, request.resolutions())
    run = _Run(pipe, pivotal, captions)
    probe = _probe(run, groups, torch.Generator("cpu").manual_seed(seed + 1))
    before = probe()
    log.info(
        "training %s: %d images, %d steps, batch %d, rank %d, lr %g, pivotal tuning %s, probe loss %.4f",
        request.model,
        len(images),
        request.steps,
        request.batch_size,
        request.lora_rank,
        request.learning_rate,
        "on" if pivotal else "off",
        before,
    )
    elapsed = _fit(run, groups, request, lora_params, generator)
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
        "seed": seed,
        "images": len(images),
        "probe_loss_before": round(before, 6),
        "probe_loss_after": round(after, 6),
        "seconds": round(elapsed, 1),
    }
    tar = _write_tar(pipe, pivotal, request.trigger_word, record, out_dir)
    return TrainingResult(tar, before, after, request.steps / elapsed)


def _fit(
    run: _Run,
    groups: dict[tuple[int, int], list[Item]],
    request: TrainingRequest,
    lora_params: list[torch.nn.Parameter],
    generator: torch.Generator,
) -> float:
    """The training steps, with progress in the log at most every TRAIN_LOG_SECONDS; returns seconds."""
    param_groups = [{"params": lora_params, "lr": request.learning_rate, "weight_decay": 1e-4}]
    trainable = list(lora_params)
    if run.pivotal is not None:
        embeddings = run.pivotal.parameters()
        param_groups.append({"params": embeddings, "lr": TRAIN_EMBEDDING_LEARNING_RATE, "weight_decay": 0.0})
        trainable += embeddings
    optimizer = torch.optim.AdamW(param_groups)
    warmup = max(1, min(TRAIN_WARMUP_MAX_STEPS, int(request.steps * TRAIN_WARMUP_FRACTION)))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.cuda)
    shapes = list(groups)
    weights_by_shape = torch.tensor([len(groups[s]) for s in shapes], dtype=torch.float)
    timesteps = run.scheduler.config.num_train_timesteps
    start = last_log = time.perf_counter()
    recent: list[float] = []
    for step in range(1, request.steps + 1):
        group = groups[shapes[int(torch.multinomial(weights_by_shape, 1, generator=generator))]]
        items = [group[i] for i in torch.randint(len(group), (request.batch_size,), generator=generator).tolist()]
        drop = (torch.rand(len(items), generator=generator) < request.caption_dropout_rate).tolist()
        captions = ["" if d else run.captions[i.caption] for i, d in zip(items, drop, strict=True)]
        sample = torch.randn((len(items), *items[0].mean.shape), generator=generator)
        noise = torch.randn((len(items), *items[0].mean.shape), generator=generator)
        t = torch.randint(timesteps, (len(items),), generator=generator)
        per_sample = run.losses(items, captions, noise, sample, t)
        loss = (per_sample * _snr_weights(run.scheduler, t.to(per_sample.device))).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(optimizer)
        scaler.update()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss.item())
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


def _write_tar(
    pipe: StableDiffusionXLPipeline, pivotal: _Pivotal | None, trigger: str, record: dict, out_dir: Path
) -> Path:
    """trained_model.tar in the layout `lora_weights` reads (weightstore/resolve.py)."""
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    out_dir.mkdir(parents=True, exist_ok=True)
    tar_path = out_dir / TAR_NAME
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        folder = Path(tmp)
        StableDiffusionXLPipeline.save_lora_weights(
            folder, unet_lora_layers={k: v.detach().to("cpu", torch.float16) for k, v in state.items()}
        )
        members = {"lora.safetensors": folder / "pytorch_lora_weights.safetensors"}
        if pivotal is not None:
            save_file(pivotal.rows(), folder / "embeddings.pti")
            (folder / "special_params.json").write_text(json.dumps({trigger: pivotal.text}))
            members["embeddings.pti"] = folder / "embeddings.pti"
            members["special_params.json"] = folder / "special_params.json"
        (folder / "training_params.json").write_text(json.dumps(record, indent=2))
        members["training_params.json"] = folder / "training_params.json"
        # Plain ustar: short names need no pax headers, and every tar reader takes it.
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, path in members.items():
                tar.add(path, arcname=name)
    log.info("wrote %s (%.1f MB)", TAR_NAME, tar_path.stat().st_size / 1e6)
    return tar_path
