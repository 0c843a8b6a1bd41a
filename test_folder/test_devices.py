"""The device choice (engine/devices.py): one function of what the machine has and TORCH_DEVICE.

No machine here has MPS or CUDA: the choice is tested as the pure function it is, for every case,
and the CPU engine is checked to run as it did (fp32, SDPA, the same bytes with the override).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from engine.compiling import compile_wanted
from engine.devices import Available, DeviceSettings, choose, current, settings_for, setup_line
from engine.generator import Engine
from engine.request import GenerationRequest

NONE = Available(cuda=False, mps=False)
MAC = Available(cuda=False, mps=True)
GPU = Available(cuda=True, mps=False)
BOTH = Available(cuda=True, mps=True)


@pytest.mark.parametrize(
    ("available", "override", "chosen"),
    [
        (BOTH, None, "cuda"),
        (GPU, "auto", "cuda"),
        (MAC, None, "mps"),
        (MAC, "", "mps"),
        (NONE, None, "cpu"),
        (BOTH, "mps", "mps"),
        (BOTH, "cpu", "cpu"),
        (MAC, " CPU ", "cpu"),
        (GPU, "Cuda", "cuda"),
        (NONE, "cpu", "cpu"),
    ],
)
def test_cuda_then_mps_then_cpu_unless_overridden(available: Available, override: str | None, chosen: str) -> None:
    assert choose(available, override).device == torch.device(chosen)


@pytest.mark.parametrize(("available", "override"), [(NONE, "mps"), (GPU, "mps"), (MAC, "cuda"), (NONE, "cuda")])
def test_an_override_naming_a_missing_device_is_refused(available: Available, override: str) -> None:
    with pytest.raises(ValueError, match=f"TORCH_DEVICE is {override}, but .* no {override.upper()} device"):
        choose(available, override)


def test_an_unknown_override_is_refused() -> None:
    with pytest.raises(ValueError, match="TORCH_DEVICE must be one of auto, cuda, mps, cpu, got 'gpu'"):
        choose(BOTH, "gpu")


def test_each_device_gets_its_numerics() -> None:
    cuda, mps, cpu = (choose(BOTH, name) for name in ("cuda", "mps", "cpu"))
    assert (cuda.dtype, mps.dtype, cpu.dtype) == (torch.float16, torch.float16, torch.float32)
    assert cuda.compile_auto and not mps.compile_auto and not cpu.compile_auto
    assert not mps.compile_allowed and cpu.compile_allowed and cuda.compile_allowed
    assert cuda.pin_memory and not mps.pin_memory and not cpu.pin_memory
    assert {s.attention for s in (cuda, mps, cpu)} == {"sdpa"}
    # Training: mixed precision with a grad scaler on CUDA only; MPS trains in fp32, without 8-bit optimizers.
    assert cuda.mixed_precision and not mps.mixed_precision and not cpu.mixed_precision
    assert (cuda.train_dtype, mps.train_dtype, cpu.train_dtype) == (torch.float16, torch.float32, torch.float32)
    assert cuda.eight_bit_optimizers and not mps.eight_bit_optimizers and not cpu.eight_bit_optimizers


def test_settings_of_a_chosen_device_keep_its_index() -> None:
    assert settings_for(torch.device("mps")) is choose(MAC, None)
    indexed = settings_for(torch.device("cuda", 1))
    assert indexed.device == torch.device("cuda", 1) and indexed.dtype == torch.float16 and indexed.pin_memory


def test_compile_follows_the_device(caplog: pytest.LogCaptureFixture) -> None:
    assert compile_wanted("auto", torch.device("cuda")) and not compile_wanted("auto", torch.device("mps"))
    with caplog.at_level(logging.WARNING):
        assert not compile_wanted("on", torch.device("mps"))
    assert "UNET_COMPILE=on is ignored on mps" in caplog.text
    assert compile_wanted("on", torch.device("cpu")) and not compile_wanted("auto", torch.device("cpu"))


def test_this_machine_and_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here has CUDA or MPS: auto is the CPU, and naming a GPU fails at setup, saying what to do."""
    monkeypatch.delenv("TORCH_DEVICE", raising=False)
    assert Available.detect() == NONE and current().device == torch.device("cpu")
    monkeypatch.setenv("TORCH_DEVICE", "mps")
    with pytest.raises(ValueError, match="unset TORCH_DEVICE"):
        current()


def test_the_setup_line_says_what_the_process_runs_on() -> None:
    settings: DeviceSettings = choose(MAC, None)
    line = setup_line(settings, compiled=False, baked=["upscaler", "ip-adapter"])
    assert line.startswith("running on mps (Apple Silicon GPU")
    for part in ("float16", "attention sdpa", f"torch {torch.__version__}", "diffusers 0.", "transformers "):
        assert part in line
    assert "compile off" in line and "optional models baked: upscaler, ip-adapter" in line
    assert "PYTORCH_ENABLE_MPS_FALLBACK=" in line
    assert "compile on" in setup_line(choose(NONE, None), compiled=True, baked=[])
    assert "baked: none" in setup_line(choose(NONE, None), compiled=False, baked=[])


def test_the_cpu_engine_logs_its_device_and_runs_sdpa_in_fp32(
    engine: Engine, weights_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """TORCH_DEVICE=cpu gives the engine chosen by auto here, byte for byte; every model follows it."""
    monkeypatch.setenv("TORCH_DEVICE", "cpu")
    with caplog.at_level(logging.INFO):
        forced = Engine.load(weights_dir, compile="off")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("running on "))
    assert line.startswith("running on cpu (") and ", float32, attention sdpa," in line and "compile off" in line
    assert line.endswith("optional models baked: upscaler, ip-adapter, controlnet-union, depth-estimator")
    model = forced.models["sdxl"]
    modules = [model.txt2img.unet, model.txt2img.vae, forced.safety.model, forced.upscaler.model]
    modules += [forced.control.controlnet, forced.control.depth[0], model.txt2img.image_encoder]
    for module in modules:
        assert {p.device.type for p in module.parameters()} == {"cpu"}
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert all(isinstance(p, AttnProcessor2_0) for p in model.txt2img.unet.attn_processors.values())
    req = GenerationRequest(prompt="a lighthouse at dusk", num_inference_steps=2, seed=7, safety_checker=False)
    np.testing.assert_array_equal(np.asarray(forced.generate(req)[0].image), np.asarray(engine.generate(req)[0].image))
