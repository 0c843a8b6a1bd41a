"""torch.compile of the UNets (engine/compiling.py) on the tiny model.

The graphs are counted by a backend that records each one and runs it as traced, so the test
sees what dynamo compiles without paying for inductor's code generation on 2 CPU cores; dynamo's
tracing, guards and recompilation decisions are the same whatever the backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.compiling import compile_wanted
from engine.config import CONTROL_MAX_STRENGTH, IP_ADAPTER_MAX_SCALE
from engine.generator import Engine
from engine.request import Credentials, GenerationRequest, LocalLora, LoraSpec

BASE = GenerationRequest(prompt="a lighthouse at dusk", num_inference_steps=4, seed=5, safety_checker=False)


class LocalFiles:
    """A LoRA source over files already on disk: the engine's contract without a network."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def fetch_all(self, specs: Sequence[tuple[str, float]], credentials: Credentials) -> list[LocalLora]:
        return [LocalLora(source, self.files[source], scale, source) for source, scale in specs]


@pytest.fixture(scope="module")
def lora_paths(lora_files: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compile-loras")
    for name in ("a", "b"):
        (root / f"{name}.safetensors").write_bytes(lora_files[name])
    return {name: root / f"{name}.safetensors" for name in ("a", "b")}


@pytest.fixture(scope="module")
def graphs() -> list[torch.fx.GraphModule]:
    return []


@pytest.fixture(scope="module")
def compiled(weights_dir: Path, lora_paths: dict[str, Path], graphs: list) -> Iterator[Engine]:
    def counting(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., object]:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    engine = Engine.load(weights_dir, lora_source=LocalFiles(lora_paths), compile="off")
    engine.compile(counting)
    yield engine
    torch._dynamo.reset()


def pixels(engine: Engine, req: GenerationRequest) -> np.ndarray:
    return np.asarray(engine.generate(req)[0].image)


def test_compile_setting() -> None:
    assert not compile_wanted("auto", torch.device("cpu"))
    assert compile_wanted("auto", torch.device("cuda"))
    assert compile_wanted("on", torch.device("cpu")) and not compile_wanted("off", torch.device("cuda"))
    with pytest.raises(ValueError, match="UNET_COMPILE"):
        compile_wanted("yes", torch.device("cpu"))


def test_compiled_unet_never_recompiles_after_setup(
    compiled: Engine, graphs: list, weights_dir: Path, lora_paths: dict[str, Path]
) -> None:
    """After the setup warm-up, other sizes, batches, modes, go_fast off, LoRA switches, one to
    three reference images and a control image run the graphs already built (dynamo is told to fail
    on any recompile) and give the eager images."""
    assert graphs, "the warm-up compiled the blocks"
    unet = compiled.models["sdxl"].txt2img.unet
    blocks = [
        m
        for net in (unet, compiled.control.controlnet)
        for m in net.modules()
        if m.__class__.__name__ in unet._repeated_blocks
    ]
    assert len(blocks) > 4 and all(b._compiled_call_impl is not None for b in blocks), "the warm-up fell back to eager"
    warmed = len(graphs)
    eager = Engine.load(weights_dir, lora_source=LocalFiles(lora_paths), compile="off")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    requests = [
        BASE,
        replace(BASE, aspect_ratio="3:2", go_fast=False),
        replace(BASE, aspect_ratio="9:21", num_outputs=2),
        replace(BASE, megapixels="0.25", model="sdxl"),
        replace(BASE, image=photo, prompt_strength=0.7),
        replace(BASE, loras=(LoraSpec("a", 1.0),)),
        replace(BASE, loras=(LoraSpec("b", 0.7),)),
        replace(BASE, loras=(LoraSpec("a", 0.4), LoraSpec("b", 1.0))),
        replace(BASE, aspect_ratio="3:2", ip_adapter_images=(photo,)),
        replace(BASE, aspect_ratio="9:21", ip_adapter_images=(photo,) * 3, go_fast=False),
        replace(BASE, aspect_ratio="4:3", control_image=photo, control_type="canny"),
        BASE,
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):
        results = [pixels(compiled, r) for r in requests]
    assert len(graphs) == warmed, "no request compiled anything after setup"
    # At the limit torch stops compiling and runs the blocks eager for good, without an error.
    assert len(graphs) < torch._dynamo.config.recompile_limit, "torch gave up: some blocks ran eager"
    for req, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result, pixels(eager, req))
    assert np.array_equal(results[0], results[-1]), "back to the base weights after LoRAs"
    assert not np.array_equal(results[0], results[5])


def test_no_reference_scale_or_control_strength_compiles_after_setup(compiled: Engine, graphs: list) -> None:
    """40 requests, each with its own ip_adapter_scale and control_strength, run the graphs the
    warm-up built: a scale the compiled blocks read as a Python constant would be a new graph per
    value, and past the recompile limit a failed request."""
    warmed = len(graphs)
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    fast = replace(BASE, num_inference_steps=2, megapixels="0.25")
    scales = np.linspace(0.05, IP_ADAPTER_MAX_SCALE, 40).round(3).tolist()
    strengths = np.linspace(0.05, CONTROL_MAX_STRENGTH, 40).round(3).tolist()[::-1]
    requests = [
        replace(
            fast,
            ip_adapter_images=(photo,),
            ip_adapter_scale=scale,
            control_image=photo,
            control_type="canny",
            control_strength=strength,
            go_fast=i % 2 == 0,
        )
        for i, (scale, strength) in enumerate(zip(scales, strengths, strict=True))
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = [pixels(compiled, r) for r in requests]
    assert len(graphs) == warmed, "a new scale or strength compiled a graph"
    assert not np.array_equal(outputs[0], outputs[2]), "the scales reach the images"


def test_a_compiler_failure_leaves_the_model_running_uncompiled(
    weights_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., object]:
        raise RuntimeError("no compiler for this GPU")

    torch._dynamo.reset()
    engine = Engine.load(weights_dir, compile="off")
    before = pixels(engine, BASE)
    with caplog.at_level(logging.WARNING):
        engine.compile(failing)
    torch._dynamo.reset()
    assert "torch.compile failed while warming up" in caplog.text and "no compiler for this GPU" in caplog.text
    unet = engine.models["sdxl"].txt2img.unet
    nets = (unet, engine.control.controlnet)
    blocks = [m for net in nets for m in net.modules() if m.__class__.__name__ in unet._repeated_blocks]
    assert blocks and all(b._compiled_call_impl is None for b in blocks)
    np.testing.assert_array_equal(pixels(engine, BASE), before)
