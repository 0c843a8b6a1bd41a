"""Engine-level generation on the tiny model: seeds, modes, safety, models and clear errors.

Runnable directly: python test_folder/test_local_generation.py
"""

from __future__ import annotations

import copy
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # when run directly
from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance
from PIL import Image

from engine.config import GO_FAST_GUIDANCE_MIN_SIGMA
from engine.deepcache import DeepFeatureCache
from engine.errors import AllImagesFlaggedError, InputError, WeightsMissingError
from engine.generator import Engine
from engine.request import GenerationRequest, LoraSpec, cfg_from_flux, loras_from_flux
from engine.schedulers import make_scheduler
from engine.steps import first_unguided_step, noise_levels, whole_steps
from test_folder.conftest import changed_share

BASE = GenerationRequest(prompt="a lighthouse at dusk", num_inference_steps=2, seed=7)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def one(engine: Engine, req: GenerationRequest) -> Image.Image:
    [result] = engine.generate(req)
    return result.image


def test_same_seed_same_image(engine: Engine) -> None:
    assert max_diff(one(engine, BASE), one(engine, BASE)) == 0


def test_different_seed_different_image(engine: Engine) -> None:
    assert max_diff(one(engine, BASE), one(engine, replace(BASE, seed=8))) > 10


def test_seed_zero_is_a_seed(engine: Engine) -> None:
    a = one(engine, replace(BASE, seed=0))
    assert max_diff(a, one(engine, replace(BASE, seed=0))) == 0


def test_unset_seed_is_random_and_reported(engine: Engine) -> None:
    a, b = (engine.generate(replace(BASE, seed=None))[0] for _ in range(2))
    assert a.parameters.seed != b.parameters.seed
    again = one(engine, replace(BASE, seed=a.parameters.seed))
    assert max_diff(a.image, again) == 0


def test_output_i_uses_seed_plus_i(engine: Engine) -> None:
    results = engine.generate(replace(BASE, num_outputs=3))
    assert [r.parameters.seed for r in results] == [7, 8, 9]
    alone = one(engine, replace(BASE, seed=9))
    # Same noise; batching may change the last bit of a few float ops.
    assert max_diff(results[2].image, alone) <= 2
    assert max_diff(results[0].image, results[2].image) > 10


def test_models_differ(engine: Engine) -> None:
    assert max_diff(one(engine, BASE), one(engine, replace(BASE, model="sdxl"))) > 10


def test_switching_models_back_gives_the_same_image(engine: Engine) -> None:
    first = one(engine, BASE)
    one(engine, replace(BASE, model="sdxl"))
    assert max_diff(first, one(engine, BASE)) == 0


@pytest.mark.parametrize("scheduler", ["Euler", "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "DDIM", "UniPC"])
def test_schedulers_run_and_differ(engine: Engine, scheduler: str) -> None:
    base = one(engine, replace(BASE, num_inference_steps=3))
    other = one(engine, replace(BASE, num_inference_steps=3, scheduler=scheduler))
    assert other.size == base.size
    assert changed_share(base, other) > 0.9


def test_clip_skip_changes_the_image(engine: Engine) -> None:
    assert changed_share(one(engine, BASE), one(engine, replace(BASE, clip_skip=2))) > 0.9


def test_clip_skip_too_deep_is_refused(engine: Engine) -> None:
    with pytest.raises(InputError, match="clip_skip"):
        engine.generate(replace(BASE, clip_skip=50))


def unet_batches(engine: Engine, req: GenerationRequest) -> list[int]:
    """The batch size of every UNet call one request makes, read by a forward hook."""
    seen: list[int] = []
    unet = engine.models[req.model].txt2img.unet
    handle = unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        engine.generate(req)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("extra", [{}, {"image": Image.new("RGB", (128, 128), "red")}])
def test_go_fast_stops_guidance_below_a_noise_level(engine: Engine, extra: dict) -> None:
    """10 Euler a steps: sigma 0.35 at step 8, 0.04 at step 9, the one step below 0.28."""
    req = replace(BASE, num_inference_steps=10, num_outputs=2, prompt_strength=1.0, **extra)
    assert unet_batches(engine, replace(req, go_fast=False)) == [4] * 10
    assert unet_batches(engine, replace(req, go_fast=True)) == [4] * 9 + [2]


def guided_sigmas(engine: Engine, req: GenerationRequest) -> tuple[list[float], list[float]]:
    """Sigmas of the UNet calls one request makes with and without guidance, read by a forward hook
    from each call's timestep and the model's noise schedule."""
    guided: list[float] = []
    unguided: list[float] = []
    pipe = engine.models[req.model].txt2img

    def record(module: torch.nn.Module, args: tuple) -> None:
        alpha = float(pipe.scheduler.alphas_cumprod[round(float(args[1]))])
        (guided if args[0].shape[0] == 2 else unguided).append(((1 - alpha) / alpha) ** 0.5)

    handle = pipe.unet.register_forward_pre_hook(record)
    try:
        engine.generate(req)
    finally:
        handle.remove()
    return guided, unguided


def test_the_guidance_cutoff_falls_at_the_same_sigma_for_every_scheduler(engine: Engine) -> None:
    """By step fraction, 60% of the steps was sigma 0.99 with Euler and 0.57 with Karras sigmas; by
    sigma, both guide every step above the cutoff and none below, at different step counts."""
    req = replace(BASE, num_inference_steps=10)
    cut = {}
    for scheduler in ("Euler a", "DPM++ 2M Karras"):
        guided, unguided = guided_sigmas(engine, replace(req, scheduler=scheduler))
        assert unguided and min(guided) >= GO_FAST_GUIDANCE_MIN_SIGMA > max(unguided), (guided, unguided)
        cut[scheduler] = len(guided)
    assert cut == {"Euler a": 9, "DPM++ 2M Karras": 7}


def test_go_fast_inpaint_halves_the_mask_too(engine: Engine) -> None:
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 128))
    req = replace(
        BASE, image=Image.new("RGB", (128, 128), "red"), mask=mask, prompt_strength=1.0, num_inference_steps=5
    )
    assert unet_batches(engine, req) == [2] * 4 + [1]


def test_go_fast_changes_the_image_and_off_is_exact(engine: Engine) -> None:
    req = replace(BASE, num_inference_steps=6)
    slow = one(engine, replace(req, go_fast=False))
    assert max_diff(slow, one(engine, replace(req, go_fast=True))) > 0
    assert max_diff(slow, one(engine, replace(req, go_fast=False))) == 0


def deep_path_calls(engine: Engine, req: GenerationRequest) -> tuple[int, int]:
    """(UNet calls, calls that ran its deep path) of one request, read by forward hooks."""
    unet = engine.models[req.model].txt2img.unet
    counts = [0, 0]
    hooks = [
        unet.register_forward_pre_hook(lambda *_: counts.__setitem__(0, counts[0] + 1)),
        unet.mid_block.register_forward_pre_hook(lambda *_: counts.__setitem__(1, counts[1] + 1)),
    ]
    try:
        engine.generate(req)
    finally:
        for hook in hooks:
            hook.remove()
    return counts[0], counts[1]


def scheduler_sigmas(engine: Engine, name: str, steps: int, strength: float = 1.0) -> list[float]:
    """go_fast's sigmas for a scheduler on SDXL's noise schedule, as a pipeline call at `strength` sets them."""
    scheduler = make_scheduler(name, engine.models["sdxl"].scheduler_config)
    scheduler.set_timesteps(steps)
    return noise_levels(SimpleNamespace(scheduler=scheduler, num_timesteps=int(steps * strength)))


def test_go_fast_plans_by_sigma(engine: Engine) -> None:
    """28 steps: whole while sigma >= 3, then one in 3, and the last step whole even where one in 3
    would reuse (step 27); the same sigmas at any strength; under 25 steps every step whole."""
    euler, karras = scheduler_sigmas(engine, "Euler a", 28), scheduler_sigmas(engine, "DPM++ 2M Karras", 28)
    marks = ["".join("W" if whole else "." for whole in whole_steps(sigmas)) for sigmas in (euler, karras)]
    assert marks == ["WWWWWWWWW..W..W..W..W..W..WW", "WWWWWWWWWWW..W..W..W..W..W.W"]
    assert scheduler_sigmas(engine, "Euler a", 28, strength=0.5) == euler[14:]
    assert whole_steps(euler[:24]) == [True] * 24
    assert first_unguided_step(euler, GO_FAST_GUIDANCE_MIN_SIGMA) == 25
    assert first_unguided_step(karras, GO_FAST_GUIDANCE_MIN_SIGMA) == 20


def test_go_fast_reuses_deep_features_below_a_noise_level(engine: Engine) -> None:
    """25 Euler a steps: 0-8 whole (sigma 3.0 and above), then one step in 3 from step 9, and the
    last step whole: 15 of 25. Without guidance the same. Under 25 steps nothing is reused."""
    req = replace(BASE, num_inference_steps=25, megapixels="0.25", cfg_scale=1.0)
    assert deep_path_calls(engine, replace(req, go_fast=True)) == (25, 15)
    assert deep_path_calls(engine, replace(req, num_inference_steps=4, go_fast=True)) == (4, 4)
    assert deep_path_calls(engine, replace(req, num_inference_steps=4, go_fast=False)) == (4, 4)


def unet_inputs(unet: torch.nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A batch-2 UNet call's inputs for the tiny model: latents, text embeddings, SDXL's added conditions."""
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(2, pooled, generator=generator),
        "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2),
    }
    return sample, text, added


def test_the_shallow_path_is_the_unets_own_computation(engine: Engine) -> None:
    """Fed the deep features of the same step, the shallow path gives the full UNet's output."""
    unet = engine.models["illustrious-xl"].txt2img.unet
    generator = torch.Generator().manual_seed(0)
    sample, text, added = unet_inputs(unet, generator)
    cache = DeepFeatureCache(unet, lambda: [True, True, False])
    downsampled: list[int] = []  # the first down block's downsampler feeds only the deep part
    hook = unet.down_blocks[0].downsamplers[0].register_forward_pre_hook(lambda *_: downsampled.append(1))
    with torch.no_grad(), cache.installed():
        full = unet(sample, 500, text, added_cond_kwargs=added, return_dict=False)[0]
        cache.calls = 2  # step 2 reuses
        shallow = unet(sample, 500, text, added_cond_kwargs=added, return_dict=False)[0]
    hook.remove()
    assert cache.full_calls == 1 and len(downsampled) == 1
    assert torch.equal(full, shallow)
    assert unet.forward.__func__ is type(unet).forward, "the plain forward is back"


def test_img2img_uses_the_image_and_its_proportions(engine: Engine) -> None:
    red = Image.new("RGB", (300, 150), (200, 30, 30))
    blue = Image.new("RGB", (300, 150), (30, 30, 200))
    req = replace(BASE, image=red, prompt_strength=0.5, num_inference_steps=4)
    out = one(engine, req)
    assert abs(out.width / out.height - 2) < 0.1
    assert max_diff(out, one(engine, req)) == 0
    assert max_diff(out, one(engine, replace(req, image=blue))) > 10
    assert changed_share(out, one(engine, replace(req, prompt_strength=0.9))) > 0.9


def test_inpaint_repaints_only_the_mask(engine: Engine) -> None:
    source = Image.new("RGB", (128, 128), (20, 160, 40))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 128))
    req = replace(BASE, image=source, mask=mask, prompt_strength=1.0, num_inference_steps=4)
    a, b = pixels(one(engine, req)), pixels(one(engine, replace(req, seed=99)))
    # The seed changes the masked (left) half; the right half comes from the source image.
    left = np.abs(a[:, :48] - b[:, :48]).mean()
    right = np.abs(a[:, 96:] - b[:, 96:]).mean()
    assert left > 5 * right, (left, right)


def test_metadata_holds_what_made_the_image(engine: Engine) -> None:
    [r] = engine.generate(replace(BASE, negative_prompt="blurry", cfg_scale=5.5, scheduler="DDIM"))
    text = r.parameters.to_a1111()
    assert text.splitlines()[0] == BASE.prompt
    assert "Negative prompt: blurry" in text
    for part in ("Steps: 2", "Sampler: DDIM", "CFG scale: 5.5", "Seed: 7", "Size: 128x128", "Model: illustrious-xl"):
        assert part in text


def _force_flags(engine: Engine, flag: list[bool], images: list[Image.Image]) -> None:
    """Set the concept thresholds so exactly the images marked in `flag` score above them."""
    checker = engine.safety
    with torch.no_grad():
        pix = checker.processor(images, return_tensors="pt").pixel_values
        embeds = checker.model.visual_projection(checker.model.vision_model(pix)[1])
        top = cosine_distance(embeds, checker.model.concept_embeds).max(dim=1).values
    flagged_min = min(float(t) for t, f in zip(top, flag, strict=True) if f)
    clean_max = max((float(t) for t, f in zip(top, flag, strict=True) if not f), default=-1.0)
    assert clean_max < flagged_min, "images too alike to separate"
    with torch.no_grad():
        checker.model.concept_embeds_weights.fill_((clean_max + flagged_min) / 2)


@pytest.fixture
def restore_safety(engine: Engine):
    weights = engine.safety.model.concept_embeds_weights.clone()
    yield
    with torch.no_grad():
        engine.safety.model.concept_embeds_weights.copy_(weights)


def test_safety_checker_drops_flagged_images_one_by_one(engine: Engine, restore_safety: None) -> None:
    req = replace(BASE, num_outputs=2)
    images = [r.image for r in engine.generate(req)]
    top = [True, False]
    try:
        _force_flags(engine, top, images)
    except AssertionError:
        top = [False, True]
        _force_flags(engine, top, images)
    kept = engine.generate(req)
    assert len(kept) == 1
    assert max_diff(kept[0].image, images[top.index(False)]) == 0


def test_all_flagged_fails_clearly_unless_disabled(engine: Engine, restore_safety: None) -> None:
    with torch.no_grad():
        engine.safety.model.concept_embeds_weights.fill_(-1.0)
    with pytest.raises(AllImagesFlaggedError, match="flagged as NSFW"):
        engine.generate(BASE)
    assert len(engine.generate(replace(BASE, safety_checker=False))) == 1


def test_every_pipeline_keeps_the_requested_dtype(weights_dir: Path) -> None:
    half = Engine.load(weights_dir, device=torch.device("cpu"), dtype=torch.bfloat16)
    for model in half.models.values():
        for pipe in model.pipelines:
            for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
                assert getattr(pipe, name).dtype == torch.bfloat16, (model.model_id, name)
                assert getattr(pipe, name) is getattr(model.txt2img, name), "modules must be shared, not copied"
    assert half.safety.model.dtype == torch.bfloat16


def test_missing_weights_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissingError, match="make weights"):
        Engine.load(tmp_path)


def test_mask_without_image(engine: Engine) -> None:
    with pytest.raises(InputError, match="mask needs an image"):
        engine.generate(replace(BASE, mask=Image.new("L", (64, 64))))


def test_empty_prompt(engine: Engine) -> None:
    with pytest.raises(InputError, match="prompt is empty"):
        engine.generate(replace(BASE, prompt="   "))


def test_flux_lora_rules() -> None:
    assert loras_from_flux("a/b", 0.5, "a/b", 0.7) == (LoraSpec("a/b", 0.5),)
    assert loras_from_flux(None, 0.5, "c/d", 0.7) == (LoraSpec("c/d", 0.7),)
    assert loras_from_flux("a/b", 0.5, "c/d", 0.7) == (LoraSpec("a/b", 0.5), LoraSpec("c/d", 0.7))
    assert loras_from_flux("", 1, "  ", 1) == ()


def test_flux_guidance_maps_to_cfg() -> None:
    assert cfg_from_flux(3, None) == 6
    assert cfg_from_flux(3.5, None) == 7
    assert cfg_from_flux(3, 4.5) == 4.5


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_swap_residency_moves_models_and_changes_no_pixel(
    engine: Engine, weights_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a GPU the idle model waits in CPU RAM; here both devices are the CPU, so the moves are
    real calls that change nothing, and the images must match the resident engine's exactly."""
    swapping = Engine.load(weights_dir, residency="swap")
    sdxl = replace(BASE, model="sdxl")
    with caplog.at_level("INFO"):
        images = [one(swapping, r) for r in (BASE, sdxl, BASE)]
    assert "moved sdxl to cpu" in caplog.text and "moved illustrious-xl to CPU RAM" in caplog.text
    assert max_diff(images[0], one(engine, BASE)) == 0
    assert max_diff(images[1], one(engine, sdxl)) == 0
    assert max_diff(images[0], images[2]) == 0


def test_unknown_residency_is_refused(weights_dir: Path) -> None:
    with pytest.raises(ValueError, match="MODEL_RESIDENCY must be"):
        Engine.load(weights_dir, residency="sometimes")


def test_setup_needs_no_network(weights_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine.load with every outgoing connection refused, as in an image without network."""
    import socket

    def refuse(self: socket.socket, address: object) -> None:
        raise OSError(f"network disabled in this test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert set(Engine.load(weights_dir).models) == {"illustrious-xl", "sdxl"}


def test_identical_vaes_are_shared_and_change_no_pixel(engine: Engine, weights_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "weights"
    shutil.copytree(weights_dir, root)
    shutil.rmtree(root / "illustrious-xl" / "vae")
    shutil.copytree(root / "sdxl" / "vae", root / "illustrious-xl" / "vae")
    shared = Engine.load(root)
    vae = shared.models["sdxl"].txt2img.vae
    assert all(p.vae is vae for p in shared.models["illustrious-xl"].pipelines)
    assert engine.models["illustrious-xl"].txt2img.vae is not engine.models["sdxl"].txt2img.vae
    unshared = Engine.load(root, residency="resident")
    unshared.models["illustrious-xl"].use_vae(copy.deepcopy(vae))
    assert max_diff(one(shared, BASE), one(unshared, BASE)) == 0
