"""The engine: load every baked model once, then turn a GenerationRequest into checked images."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.allocator import settle_process_memory
from engine.compiling import compile_blocks, compile_wanted, uncompile_blocks, warm_up
from engine.config import (
    CUSTOM_MODEL_ID,
    DEFAULT_MODEL,
    GO_FAST_DEEP_CACHE_INTERVAL,
    GO_FAST_DEEP_CACHE_MAX_SIGMA,
    GO_FAST_DEEP_CACHE_MIN_STEPS,
    GO_FAST_GUIDANCE_MIN_SIGMA,
    IP_ADAPTER_DIR,
    MODEL_IDS,
    RESIDENCY_HEADROOM_BYTES,
    SAFETY_CHECKER_DIR,
    SETUP_SIDE_DIRS,
    UPSCALE_FACTORS,
    UPSCALER_NAME,
    model_residency,
    unet_compile,
)
from engine.control import Control, guided, keeps_cfg_cutoff, pipeline_kwargs, preprocessor_name, unit_text
from engine.deepcache import DeepFeatureCache
from engine.devices import current, settings_for, setup_line
from engine.embeddings import Embedding, read_embedding, used
from engine.errors import AllImagesFlaggedError, InputError, WeightsMissingError
from engine.ip_adapter import IP_ADAPTER_NAME, IpAdapter
from engine.logs import quiet_library_noise
from engine.metadata import GenerationParameters, lora_hash
from engine.models import BaseModel
from engine.request import GenerationRequest, LocalLora, LoraSource, output_seeds, reduced_seed
from engine.safety import SafetyChecker
from engine.schedulers import make_scheduler
from engine.sizes import reference_size, scale_to_model
from engine.steps import StepCallback, noise_levels, whole_steps
from engine.upscale import Upscaler, check_upscale
from engine.warm import PROCESS_WARM

log = logging.getLogger(__name__)

SEED_RANGE = 2**32
DEEP_CACHE_LABEL = (
    f"below sigma {GO_FAST_DEEP_CACHE_MAX_SIGMA:g}, every {GO_FAST_DEEP_CACHE_INTERVAL} steps and the last full, "
    f"at {GO_FAST_DEEP_CACHE_MIN_STEPS}+ steps"
)


@dataclass(frozen=True)
class GeneratedImage:
    """One output and what made it (its metadata)."""

    image: Image.Image
    parameters: GenerationParameters
    control_map: Image.Image | None = None  # the map that guided it, when return_control_map asked


@dataclass(frozen=True)
class _Prepared:
    """A request once checked and its files fetched: the model (moved in, its LoRAs applied), the
    output size, the control map, the LoRAs and embeddings, one seed per output."""

    model: BaseModel
    width: int
    height: int
    control_map: Image.Image | None
    controlled: bool  # the ControlNet guides the images (a map at strength > 0)
    loras: list[LocalLora]
    embeddings: list[Embedding]
    seeds: list[int]


@dataclass(frozen=True)
class _Outcome:
    """What the pipeline call made, and what of it the images' metadata records."""

    images: list[Image.Image]
    cfg_cutoff: float | None  # go_fast's guidance cutoff, when it applied
    ip_adapter: bool  # the reference images guided the images (scale > 0)
    control: str | None  # the ControlNet unit's text, when it guided them


def _log_guidance(req: GenerationRequest, prepared: _Prepared, deep: DeepFeatureCache, control: str | None) -> None:
    """After the pipeline call: whether the ControlNet ran, and how often go_fast ran the whole UNet."""
    if prepared.controlled:
        cached = f"; whole in {deep.full_calls} of {deep.calls} steps (go_fast)" if req.go_fast else ""
        log.info("ControlNet: %s%s", control, cached)
    elif prepared.control_map is not None:
        log.info("ControlNet: strength 0, not run (the plain pipeline made the image)")
    if req.go_fast:
        log.info(
            "go_fast: the whole UNet ran in %d of %d steps, %s",
            deep.full_calls,
            deep.calls,
            "the others reused its deep features"
            if deep.full_calls < deep.calls
            else f"no deep features reused (under {GO_FAST_DEEP_CACHE_MIN_STEPS} steps, or none below sigma "
            f"{GO_FAST_DEEP_CACHE_MAX_SIGMA:g})",
        )


def _parameters(
    req: GenerationRequest, prepared: _Prepared, outcome: _Outcome, seed: int, image: Image.Image
) -> GenerationParameters:
    """What one output was made with, as its metadata (engine/metadata.py) writes it."""
    return GenerationParameters(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        steps=req.num_inference_steps,
        sampler=req.scheduler,
        cfg_scale=req.cfg_scale,
        seed=seed,
        width=image.width,
        height=image.height,
        model=req.model,
        model_hash=prepared.model.model_hash,
        clip_skip=req.clip_skip,
        denoising_strength=req.prompt_strength if req.image is not None else None,
        cfg_cutoff=outcome.cfg_cutoff,
        deep_cache=DEEP_CACHE_LABEL if req.go_fast else None,
        loras=tuple((lora.name, lora.scale, lora_hash(lora.path, lora.key)) for lora in prepared.loras),
        embeddings=tuple((e.name, e.source, e.digest) for e in prepared.embeddings),
        ip_adapter=(IP_ADAPTER_NAME, req.ip_adapter_scale, len(req.ip_adapter_images)) if outcome.ip_adapter else None,
        control=outcome.control,
    )


def _swap(residency: str, root: Path, model_ids: list[str], device: torch.device) -> bool:
    """Whether idle models must wait in CPU RAM; "auto" compares weights on disk with GPU memory:
    every model, and the safety checker and optional artifacts baked beside them (on the GPU too)."""
    if residency not in ("auto", "resident", "swap"):
        raise ValueError(f"MODEL_RESIDENCY must be auto, resident or swap, got {residency!r}")
    if residency != "auto":
        return residency == "swap"
    if device.type != "cuda":
        return False
    weights = sum(p.stat().st_size for m in (*model_ids, *SETUP_SIDE_DIRS) for p in (root / m).rglob("*.safetensors"))
    return weights + RESIDENCY_HEADROOM_BYTES > torch.cuda.get_device_properties(device).total_memory


def _share_identical_vaes(models: list[BaseModel]) -> None:
    """Models baked with the same VAE (the fp16-fix one) use one module, not two copies. Compared
    as loaded, config and tensors, on the device: no second read of the files."""
    kept: list[BaseModel] = []
    for model in models:
        same = next((k for k in kept if k.device == model.device and _same_vae(k, model)), None)
        if same is None:
            kept.append(model)
            continue
        model.use_vae(same.txt2img.vae)
        log.info("%s shares the VAE of %s (identical weights)", model.model_id, same.model_id)


def _same_vae(a: BaseModel, b: BaseModel) -> bool:
    config_a, config_b = ({k: v for k, v in m.txt2img.vae.config.items() if not k.startswith("_")} for m in (a, b))
    tensors_a, tensors_b = a.txt2img.vae.state_dict(), b.txt2img.vae.state_dict()
    return (
        config_a == config_b
        and tensors_a.keys() == tensors_b.keys()
        and all(
            t.dtype == tensors_b[k].dtype and t.shape == tensors_b[k].shape and torch.equal(t, tensors_b[k])
            for k, t in tensors_a.items()
        )
    )


def _load_ip_adapters(root: Path, models: list[BaseModel]) -> None:
    """The baked IP-Adapter into every model, loaded once and shared; without its folder, say so."""
    if not (root / IP_ADAPTER_DIR).is_dir():
        log.info("IP-Adapter not baked (no %s folder in the weights): ip_adapter_image is refused", IP_ADAPTER_DIR)
        return
    shared: IpAdapter | None = None
    for model in models:
        shared = model.load_ip_adapter(root / IP_ADAPTER_DIR, shared)


def _log_trigger_words(lora: LocalLora, prompt: str) -> None:
    """Flux users forget trigger words more than anything else: say which the host lists and
    which of them the prompt holds."""
    if not lora.trained_words:
        return
    lowered = prompt.lower()
    found = [w for w in lora.trained_words if w.lower() in lowered]
    log.info(
        "LoRA %s lists trigger words: %s; the prompt contains %s",
        lora.name,
        ", ".join(lora.trained_words),
        ", ".join(found) if found else "none of them",
    )


class Engine:
    """Every baked model and the safety checker, with the ControlNet, IP-Adapter and upscaler when
    they are baked, on one device. LoRA files come from the `lora_source` its caller hands in
    (predict.py builds the store of weights.py); without one, a request naming a LoRA is refused."""

    def __init__(
        self,
        models: dict[str, BaseModel],
        safety: SafetyChecker,
        lora_source: LoraSource | None = None,
        swap: bool = False,
        upscaler: Upscaler | None = None,
        control: Control | None = None,
    ) -> None:
        self.models = models
        self.safety = safety
        self.lora_source = lora_source
        self.swap = swap  # idle models wait in CPU RAM; the requested one is moved in
        self.upscaler = upscaler  # None when not baked: requests with upscale are refused
        self.control = control or Control(None)  # without one, control images are refused
        if self.control.controlnet is not None:
            for model in models.values():
                model.attach_controlnet(self.control.controlnet)

    @classmethod
    def load(
        cls,
        root: Path,
        lora_source: LoraSource | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        residency: str | None = None,
        compile: str | None = None,
        warm_max_bytes: int | None = None,
    ) -> Engine:
        """Load from the weights root only; fail fast, naming the fix, when something is missing.
        `compile` (auto, on, off; default $UNET_COMPILE) compiles the UNets and warms them up;
        `warm_max_bytes` sets the process's budget of parsed LoRAs (default config.WARM_MAX_BYTES)."""
        start = time.perf_counter()
        settle_process_memory()  # before anything is loaded or run: glibc and oneDNN read their limits early
        if warm_max_bytes is not None:
            PROCESS_WARM.max_bytes = warm_max_bytes
        quiet_library_noise()
        settings = settings_for(device) if device is not None else current()
        device = settings.device
        dtype = dtype or settings.dtype
        missing = [name for name in (*MODEL_IDS, SAFETY_CHECKER_DIR) if not (root / name).is_dir()]
        if missing:
            raise WeightsMissingError(
                f"weights missing in {root}: {', '.join(missing)}. Build the tiny offline weights with "
                "`make weights`, or bake the real ones into the image (see README, 'Weights')."
            )
        present = [*MODEL_IDS, *([CUSTOM_MODEL_ID] if (root / CUSTOM_MODEL_ID).is_dir() else [])]
        swap = _swap(residency or model_residency(), root, present, device)
        cpu = torch.device("cpu")
        models = {
            model_id: BaseModel(model_id, root / model_id, device if not swap or i == 0 else cpu, dtype)
            for i, model_id in enumerate(sorted(present, key=lambda m: m != DEFAULT_MODEL))
        }
        _share_identical_vaes(list(models.values()))
        _load_ip_adapters(root, list(models.values()))
        log.info("models %s", "swapped in on demand from CPU RAM" if swap else f"all resident on {device}")
        checker_start = time.perf_counter()
        safety = SafetyChecker(root / SAFETY_CHECKER_DIR, device, dtype)
        log.info("loaded the safety checker in %.1fs", time.perf_counter() - checker_start)
        upscaler = Upscaler.load_if_baked(root, device, dtype)
        engine = cls(models, safety, lora_source, swap, upscaler=upscaler, control=Control.load(root, device, dtype))
        wanted = compile_wanted(compile or unet_compile(), device)
        compiled = wanted and engine.compile("inductor")
        baked = [name for name in (*SETUP_SIDE_DIRS, CUSTOM_MODEL_ID) if name != SAFETY_CHECKER_DIR]
        log.info("%s", setup_line(settings, compiled, [name for name in baked if (root / name).is_dir()]))
        log.info("setup done in %.1fs", time.perf_counter() - start)
        return engine

    def compile(self, backend: str | Callable[..., Any]) -> bool:
        """Compile every UNet's repeated blocks (and the ControlNet's) and warm them up, so no
        request compiles; False when the compiler failed and the blocks run eager.

        A compiler failure must not take the model down: the UNets go back to eager with a
        warning that names the error (the images are the same, only slower).
        """
        unets = [model.txt2img.unet for model in self.models.values()]
        compile_blocks(unets, backend, self.control.controlnet)
        try:
            baked_ip = any(model.ip_adapter is not None for model in self.models.values())
            reference = Image.new("RGB", (64, 64), "gray") if baked_ip else None
            seconds = warm_up(self.generate, list(self.models), reference)
        except Exception as e:  # any compiler fault: run eager, and say why
            uncompile_blocks(unets, self.control.controlnet)
            torch._dynamo.reset()
            log.warning(
                "torch.compile failed while warming up (%s: %s); the UNets run uncompiled. "
                "Set UNET_COMPILE=off to skip the attempt.",
                type(e).__name__,
                e,
            )
            return False
        log.info("UNets compiled and warmed up in %.1fs (%s)", seconds, ", ".join(self.models))
        return True

    def generate(self, req: GenerationRequest) -> list[GeneratedImage]:
        """Run one request: prepare it (checks, files, model, LoRAs, seeds), run its pipeline call, and
        finish the images (metadata, the safety checker dropping flagged ones, the upscaler)."""
        prepared = self._prepare(req)
        outcome = self._run(req, prepared)
        return self._finish(req, prepared, outcome)

    def _prepare(self, req: GenerationRequest) -> _Prepared:
        """Everything that can be refused, checked before a model moves or a LoRA is downloaded; then
        the files fetched, the model moved in (swap mode) with the request's LoRAs, and the seeds."""
        model = self._checked_model(req)
        ref = reference_size(
            req.aspect_ratio,
            req.megapixels,
            req.width,
            req.height,
            image_size=req.image.size if req.image is not None else None,
        )
        width, height = scale_to_model(ref, model.native_resolution)
        check_upscale(self.upscaler, req.upscale, ref)
        self.control.check(req)
        control_map = self._control_map(req, width, height)
        loras = self._fetch_loras(req)
        embeddings = self._fetch_embeddings(req, model)
        if self.swap:
            self._move_in(model)
        model.lora_set.apply(loras)
        seeds = self._seeds(req)
        controlled = control_map is not None and req.control_strength > 0  # strength 0 is the plain pipeline
        return _Prepared(model, width, height, control_map, controlled, loras, embeddings, seeds)

    def _run(self, req: GenerationRequest, prepared: _Prepared) -> _Outcome:
        """The pipeline call, with what this request puts in for that call only: the reference
        images, go_fast's deep-feature cache, the ControlNet's hook, the embeddings."""
        model = prepared.model
        pipe, extra, cfg_cutoff = self._pipeline(req, prepared)
        on_step = StepCallback(cfg_cutoff)
        deep = DeepFeatureCache(pipe.unet, lambda: whole_steps(noise_levels(pipe)))
        # Scale 0 is no IP-Adapter at all: the plain UNet, not the IP processors adding nothing.
        reference = model.ip_adapter if req.ip_adapter_images and req.ip_adapter_scale > 0 else None
        with contextlib.ExitStack() as stack:
            if reference is not None:
                extra.update(stack.enter_context(reference.used(pipe, req)))
            if req.go_fast:
                stack.enter_context(deep.installed())
            if prepared.controlled:
                last_skips = len(pipe.unet.up_blocks[-1].resnets)
                stack.enter_context(guided(pipe.controlnet, deep if req.go_fast else None, last_skips))
            prompt, negative = stack.enter_context(
                used(
                    pipe,
                    prepared.embeddings,
                    model.lora_set.rewrite(req.prompt),
                    model.lora_set.rewrite(req.negative_prompt),
                )
            )
            start = time.perf_counter()
            images = pipe(
                **model.prompts.kwargs(prompt, negative, req.clip_skip),
                num_inference_steps=req.num_inference_steps,
                guidance_scale=req.cfg_scale,
                num_images_per_prompt=req.num_outputs,
                generator=[torch.Generator("cpu").manual_seed(s) for s in prepared.seeds],
                clip_skip=req.clip_skip or None,
                callback_on_step_end=on_step,
                callback_on_step_end_tensor_inputs=on_step.tensor_inputs(pipe),
                **extra,
            ).images
            log.info("generated %d image(s) in %.2fs", len(images), time.perf_counter() - start)
        control = unit_text(req) if prepared.controlled else None
        _log_guidance(req, prepared, deep, control)
        return _Outcome(images, cfg_cutoff, reference is not None, control)

    def _pipeline(self, req: GenerationRequest, prepared: _Prepared) -> tuple[Any, dict[str, Any], float | None]:
        """The mode's pipeline with the request's scheduler, its arguments, and go_fast's guidance
        cutoff (None when guidance stays on every step); logs what is about to run."""
        model = prepared.model
        control_map = prepared.control_map if prepared.controlled else None
        pipe, extra = self._pipeline_for(model, req, prepared.width, prepared.height, control_map)
        pipe.scheduler = make_scheduler(req.scheduler, model.scheduler_config)
        cfg_cutoff = GO_FAST_GUIDANCE_MIN_SIGMA if req.go_fast and keeps_cfg_cutoff(pipe) else None
        if req.go_fast and cfg_cutoff is None:
            log.info("go_fast: guidance stays on every step (inpaint with a control image); deep features are reused")
        mode = "inpaint" if req.mask is not None else "img2img" if req.image is not None else "txt2img"
        log.info(
            "%s: %s, %dx%d, %d output(s), %d steps, %s, cfg %g, go_fast %s",
            mode,
            req.model,
            prepared.width,
            prepared.height,
            req.num_outputs,
            req.num_inference_steps,
            req.scheduler,
            req.cfg_scale,
            req.go_fast,
        )
        return pipe, extra, cfg_cutoff

    def _finish(self, req: GenerationRequest, prepared: _Prepared, outcome: _Outcome) -> list[GeneratedImage]:
        """Each image with the parameters that made it; those the safety checker flags dropped (when
        the request keeps it on), and the kept ones upscaled when the request asks."""
        results = [
            GeneratedImage(
                image,
                _parameters(req, prepared, outcome, seed, image),
                prepared.control_map if req.return_control_map else None,
            )
            for seed, image in zip(prepared.seeds, outcome.images, strict=True)
        ]
        kept = self._drop_flagged(results) if req.safety_checker else results
        return self._upscaled(kept, req.upscale)

    def _checked_model(self, req: GenerationRequest) -> BaseModel:
        """The request's model, once the request and what it asks of that model are checked."""
        req.validate()
        if req.model == CUSTOM_MODEL_ID and req.model not in self.models:
            raise InputError(
                "no custom checkpoint is baked into this image: bake one with CUSTOM_CHECKPOINT_URL "
                "(see README, 'Weights'), or choose illustrious-xl or sdxl"
            )
        if req.model not in self.models:
            raise InputError(f"model must be one of {', '.join(self.models)}, got {req.model!r}")
        model = self.models[req.model]
        if req.ip_adapter_images and model.ip_adapter is None:
            raise InputError(
                "this image was built without the IP-Adapter, so ip_adapter_image cannot be used: "
                "leave it out, or bake the IP-Adapter into the image (see README, 'Weights')"
            )
        model.check_clip_skip(req.clip_skip)
        model.prompts.check_length(req.prompt, "prompt")
        model.prompts.check_length(req.negative_prompt, "negative_prompt")
        return model

    @staticmethod
    def _seeds(req: GenerationRequest) -> list[int]:
        """One seed per output: the request's (reduced modulo 2^64) or a random one, logged either way."""
        if req.seed is None or req.seed < 0:
            seed = secrets.randbelow(SEED_RANGE)
            log.info("seed: %d (random; pass seed=%d to reproduce)", seed, seed)
        else:
            seed = reduced_seed(req.seed)
            log.info("seed: %d%s", seed, "" if seed == req.seed else f" ({req.seed} modulo 2^64)")
        return output_seeds(seed, req.num_outputs)

    def _move_in(self, model: BaseModel) -> None:
        """Swap mode: the requested model onto the device, whichever held it back to CPU RAM."""
        device = self.safety.device
        if model.device == device and all(m.device != device for m in self.models.values() if m is not model):
            return
        for other in self.models.values():
            if other is not model and other.device == device:
                log.info("moved %s to CPU RAM in %.2fs", other.model_id, other.move(torch.device("cpu")))
        log.info("moved %s to %s in %.2fs", model.model_id, device, model.move(device))

    def _fetch_embeddings(self, req: GenerationRequest, model: BaseModel) -> list[Embedding]:
        """The request's embedding files, fetched like LoRAs and read and checked against the model
        before it moves; they go into its encoders only for the pipeline call (engine/embeddings.py)."""
        if not req.embeddings:
            return []
        if self.lora_source is None:
            raise InputError("this engine was started without a LoRA store: embeddings cannot be used here")
        files = {f.key: f for f in self.lora_source.fetch_all([(s, 1.0) for s in req.embeddings], req.credentials)}
        embeddings = [read_embedding(f, model.txt2img, model.model_id) for f in files.values()]
        called: dict[str, Embedding] = {}
        for embedding in embeddings:
            for word in {embedding.name.lower(), *(w.lower() for w in embedding.triggers)}:
                other = called.setdefault(word, embedding)
                if other is not embedding:
                    raise InputError(
                        f"embeddings {other.source} and {embedding.source} are both called {word!r}: "
                        "send one of them, or a copy renamed"
                    )
        return embeddings

    def _fetch_loras(self, req: GenerationRequest) -> list[LocalLora]:
        """Local files for the request's LoRAs; two names for one file are merged once, at the sum of their scales."""
        if not req.loras:
            return []
        if self.lora_source is None:
            raise InputError("this engine was started without a LoRA store: LoRAs cannot be used here")
        fetched: dict[str, LocalLora] = {}
        for lora in self.lora_source.fetch_all([(spec.source, spec.scale) for spec in req.loras], req.credentials):
            if lora.key in fetched:
                same = fetched[lora.key]
                lora = replace(same, scale=same.scale + lora.scale)
                log.info("%s and %s are the same file: applied once at scale %g", same.name, lora.name, lora.scale)
            fetched[lora.key] = lora
            _log_trigger_words(lora, req.prompt)
        return list(fetched.values())

    def _control_map(self, req: GenerationRequest, width: int, height: int) -> Image.Image | None:
        """The request's control map at the output's size (None without a control image), with its time."""
        if req.control_image is None:
            return None
        start = time.perf_counter()
        control_map = self.control.control_map(req, width, height)
        log.info(
            "control map: %s from a %dx%d image (%s) in %.2fs",
            req.control_type,
            *req.control_image.size,
            f"preprocessor {preprocessor_name(req)}" if req.control_preprocess else "sent ready",
            time.perf_counter() - start,
        )
        return control_map

    @staticmethod
    def _pipeline_for(
        model: BaseModel, req: GenerationRequest, width: int, height: int, control_map: Image.Image | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """The pipeline for the request's mode and the arguments only that mode takes; the ControlNet
        pipelines only when a control map guides the image."""
        control = pipeline_kwargs(req, control_map) if control_map is not None else {}
        if req.image is None:
            pipe = model.txt2img if control_map is None else model.control_txt2img
            return pipe, {"width": width, "height": height, **control}
        image = req.image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        if req.mask is None:
            pipe = model.img2img if control_map is None else model.control_img2img
            return pipe, {"image": image, "strength": req.prompt_strength, **control}
        mask = req.mask.convert("L").resize((width, height), Image.Resampling.LANCZOS)
        return model.inpaint if control_map is None else model.control_inpaint, {
            "image": image,
            "mask_image": mask,
            "strength": req.prompt_strength,
            "width": width,
            "height": height,
            **control,
        }

    def _upscaled(self, results: list[GeneratedImage], upscale: str) -> list[GeneratedImage]:
        """Each kept output through the upscaler; its metadata says so and keeps the generated size."""
        factor = UPSCALE_FACTORS[upscale]
        if factor == 1:
            return results
        upscaler = self.upscaler
        assert upscaler is not None, "check_upscale refuses an upscale without an upscaler, before any work"
        start = time.perf_counter()
        images = upscaler.upscale_all([r.image for r in results], factor)
        upscaled = [
            replace(r, image=image, parameters=replace(r.parameters, upscale_by=factor, upscaler=UPSCALER_NAME))
            for r, image in zip(results, images, strict=True)
        ]
        (w, h), (uw, uh) = results[0].image.size, upscaled[0].image.size
        log.info(
            "upscaled %d image(s) %s with %s, %dx%d -> %dx%d, in %.2fs",
            len(upscaled),
            upscale,
            UPSCALER_NAME,
            w,
            h,
            uw,
            uh,
            time.perf_counter() - start,
        )
        return upscaled

    def _drop_flagged(self, results: list[GeneratedImage]) -> list[GeneratedImage]:
        """The outputs the safety checker passes, each flagged one logged by its seed; none kept is an error."""
        flags = self.safety.flags([r.image for r in results])
        kept = [r for r, flagged in zip(results, flags, strict=True) if not flagged]
        for r, flagged in zip(results, flags, strict=True):
            if flagged:
                log.warning("output with seed %d was flagged by the safety checker and dropped", r.parameters.seed)
        if not kept:
            raise AllImagesFlaggedError(
                f"all {len(results)} image(s) were flagged as NSFW by the safety checker. "
                "Try a different prompt or seed, or set disable_safety_checker."
            )
        return kept
