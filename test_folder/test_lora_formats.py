"""LoRA-family formats applied exactly, with LyCORIS's own code as the oracle, and every file this
predictor cannot apply refused by what it is.

Files are made by LyCORIS's modules (lycoris-lora) on the tiny model's layers (test_folder/
lora_factory.py); each ΔW is computed by lycoris.functional (torch backend) from the file's own
tensors, written as a plain full-rank LoRA (up = ΔW, down = the identity), and the format's image
must equal that LoRA's image. Engine-level: no Cog server in this module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from lycoris.functional import locon, loha, lokr, weight_decompose
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule
from lycoris.modules.glora import GLoRAModule, _glora_weight
from lycoris.modules.ia3 import IA3Module
from safetensors.torch import save, save_file

from engine.errors import InputError
from engine.generator import Engine
from engine.loras import check_format
from engine.request import GenerationRequest, LoraSpec
from test_folder.conftest import changed_share
from test_folder.emulators import file_host, trained_tar
from test_folder.lora_factory import (
    LYCORIS_TARGETS,
    cog_sdxl_lora,
    diffusers_lora,
    kohya_name,
    layer_of,
    lycoris_state,
    pivotal_embeddings,
    plain_lora_of,
)
from weights import Downloader, LoraStore

MODEL = "illustrious-xl"
BASE = GenerationRequest(prompt="a lighthouse at dusk", num_inference_steps=2, seed=3)
TARGETS = {kohya_name(component, path): (component, path) for component, path in LYCORIS_TARGETS}


@pytest.fixture(scope="module")
def pipe(weights_dir: Path) -> StableDiffusionXLPipeline:
    """A copy of the tiny model for making files (LyCORIS modules wrap its layers)."""
    return StableDiffusionXLPipeline.from_pretrained(weights_dir / MODEL)


@pytest.fixture
def engine(engine: Engine, tmp_path: Path) -> Iterator[Engine]:
    """The session's models with this test's own store; the base again afterwards."""
    with_store = Engine(engine.models, engine.safety, LoraStore(tmp_path / "cache", Downloader("python")), engine.swap)
    yield with_store
    with_store.generate(BASE)


@pytest.fixture
def baseline(engine: Engine) -> np.ndarray:
    return pixels(engine, BASE)


def pixels(engine: Engine, req: GenerationRequest) -> np.ndarray:
    return np.asarray(engine.generate(req)[0].image, dtype=np.int16)


def with_file(path: Path, scale: float = 1.0) -> GenerationRequest:
    return replace(BASE, loras=(LoraSpec(str(path), scale),))


def write(tmp_path: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(state, path)
    return path


def weight(engine: Engine, name: str, param: str = "weight") -> torch.Tensor:
    """The engine's own parameter for a kohya module name, as it is now."""
    component, path = TARGETS[name]
    return getattr(layer_of(engine.models[MODEL].txt2img, component, path), param).detach().clone()


def by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, suffix = key.partition(".")
        modules.setdefault(module, {})[suffix] = value
    return modules


def lycoris_weights(state: dict[str, torch.Tensor], bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each module's merged weight at scale 1 by LyCORIS's functional code: ΔW from the file's
    tensors with alpha / rank, then (with dora_scale) LyCORIS's weight decomposition, its axis
    read from the scale's shape. LoKr's scale is alpha / lora_dim as LyCORIS's LokrModule trains
    it (the rank is w?_b's first axis; functional.lokr.diff_weight would read w2_a's second, the
    wrong axis in the Tucker layout), so kron_weight is called with it."""
    out = {}
    for name, p in by_module(state).items():
        alpha = float(p["alpha"]) if "alpha" in p else None
        if "hada_w1_a" in p:
            rank = p["hada_w1_b"].shape[0]
            args = (p["hada_w1_b"], p["hada_w1_a"], p["hada_w2_b"], p["hada_w2_a"], p.get("hada_t1"), p.get("hada_t2"))
            delta = loha.diff_weight(*args, gamma=alpha / rank, backend="torch")
        elif "lokr_w1" in p or "lokr_w1_a" in p:
            g = {k: p.get(f"lokr_{k}") for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}
            split = g["w1_b"] if g["w1_b"] is not None else g["w2_b"]
            scale = 1.0 if split is None else alpha / split.shape[0]
            delta = lokr.kron_weight(*g.values(), scale=scale, backend="torch")
        elif "lora_down.weight" in p:
            down, up, mid = p["lora_down.weight"], p["lora_up.weight"], p.get("lora_mid.weight")
            delta = locon.diff_weight(down, up, mid, gamma=alpha / down.shape[0], backend="torch")
        else:
            delta = p["diff"]
        base = bases[name]
        merged = base + delta.reshape(base.shape)
        if "dora_scale" in p:
            on_out = p["dora_scale"].shape[0] == base.shape[0] and p["dora_scale"][0].numel() == 1
            merged = weight_decompose(merged, p["dora_scale"], 1, on_out, backend="torch")
        out[name] = merged
    return out


# (LyCORIS algo, its options, whether the image is bit-identical to the plain LoRA's)
FORMATS = {
    "loha": ("loha", {"lora_dim": 4, "alpha": 3}, True),
    "loha-tucker": ("loha", {"lora_dim": 4, "alpha": 2, "use_tucker": True}, True),
    "lokr-split-tucker": (
        "lokr",
        {"lora_dim": 2, "alpha": 1, "use_tucker": True, "decompose_both": True, "factor": 8},
        True,
    ),
    "lokr-full": ("lokr", {"lora_dim": 4, "alpha": 2, "factor": 4}, True),
    "full-diff": ("full", {}, True),
    "locon-lora-mid": ("locon", {"lora_dim": 4, "alpha": 2, "use_tucker": True}, False),
    "dora-locon": ("locon", {"lora_dim": 4, "alpha": 2, "dora": True}, False),
    "dora-loha-input-axis": ("loha", {"lora_dim": 4, "alpha": 2, "dora": True, "wd_on_out": False}, False),
    "dora-lokr": ("lokr", {"lora_dim": 2, "alpha": 1, "factor": 8, "decompose_both": True, "dora": True}, False),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_is_its_lycoris_delta_exactly(
    engine: Engine, pipe: StableDiffusionXLPipeline, tmp_path: Path, baseline: np.ndarray, fmt: str
) -> None:
    """The fused weights are LyCORIS's merged weights, and the image is the image of the same ΔW
    as a plain full-rank LoRA; the base returns byte for byte. Bit-identical where our ΔW is built
    by the same operations as LyCORIS's. Two cases round differently by design, so their weights
    are compared within fp32 rounding and their images within one 8-bit level: a LoCon's lora_mid
    is folded into its down factor (a different association of the same product), and a DoRA
    weight W' reaches the plain LoRA only as W0 + (W' - W0), which rounds in fp32."""
    algo, options, exact = FORMATS[fmt]
    options = dict(options)
    state = lycoris_state(pipe, algo, seed=len(fmt), dora=options.pop("dora", False), **options)
    state = {k: v for k, v in state.items() if not k.endswith(".diff_b")}  # a plain LoRA has no bias
    bases = {name: weight(engine, name) for name in TARGETS}
    expected = lycoris_weights(state, bases)

    image = pixels(engine, with_file(write(tmp_path, fmt, state)))
    for name, merged in expected.items():
        fused = weight(engine, name)
        if exact:
            assert torch.equal(fused, merged), name
        else:
            torch.testing.assert_close(fused, merged, rtol=1e-5, atol=1e-6)
        assert not torch.equal(fused, bases[name]), f"{name} is changed"
    plain = write(tmp_path, f"{fmt}-plain", plain_lora_of({n: expected[n] - bases[n] for n in expected}))
    reference = pixels(engine, with_file(plain))
    assert np.abs(image - baseline).max() > 2, "the format changes the image"
    if exact:
        assert np.array_equal(image, reference)
    else:
        assert np.abs(image - reference).max() <= 1
    assert np.array_equal(pixels(engine, BASE), baseline)
    assert all(torch.equal(weight(engine, n), bases[n]) for n in TARGETS), "every weight is the base's again"


def test_dora_is_not_the_same_file_without_its_magnitudes(
    engine: Engine, pipe: StableDiffusionXLPipeline, tmp_path: Path, baseline: np.ndarray
) -> None:
    """diffusers drops dora_scale with a warning and fuses the rest as a plain LoRA: here the
    magnitudes count, and a scale between blends the base and the DoRA weight (torch.lerp)."""
    state = lycoris_state(pipe, "locon", seed=5, dora=True, lora_dim=4, alpha=2)
    without = {k: v for k, v in state.items() if not k.endswith("dora_scale")}
    bases = {name: weight(engine, name) for name in TARGETS}
    dora = pixels(engine, with_file(write(tmp_path, "dora", state)))
    plain = pixels(engine, with_file(write(tmp_path, "no-dora", without)))
    assert np.abs(dora - plain).max() > 10
    full = lycoris_weights(state, bases)
    pixels(engine, with_file(tmp_path / "dora.safetensors", 0.5))
    for name, merged in full.items():
        assert torch.equal(weight(engine, name), torch.lerp(bases[name], merged, 0.5)), name
    assert np.array_equal(pixels(engine, BASE), baseline)


def test_a_file_may_mix_types_per_module_and_full_files_change_biases(
    engine: Engine, pipe: StableDiffusionXLPipeline, tmp_path: Path, baseline: np.ndarray
) -> None:
    """One file holding LoHa, LoKr, plain LoRA (alpha = rank, through the fast path) and full
    modules is the sum of its parts; a full file's diff_b is added to the bias and taken back."""
    parts = [
        lycoris_state(pipe, "loha", 1, targets=LYCORIS_TARGETS[:3], lora_dim=4, alpha=2),
        lycoris_state(
            pipe, "lokr", 2, targets=LYCORIS_TARGETS[3:6], lora_dim=2, alpha=1, factor=8, decompose_both=True
        ),
        lycoris_state(pipe, "locon", 3, targets=LYCORIS_TARGETS[6:9], lora_dim=4, alpha=4),
        lycoris_state(pipe, "full", 4, targets=LYCORIS_TARGETS[9:]),
    ]
    state = {k: v for part in parts for k, v in part.items()}
    biases = {k.removesuffix(".diff_b"): v for k, v in state.items() if k.endswith(".diff_b")}
    bases = {name: weight(engine, name) for name in TARGETS}
    base_biases = {name: weight(engine, name, "bias") for name in biases}
    image = pixels(engine, with_file(write(tmp_path, "mixed", state)))
    expected = lycoris_weights(state, bases)
    assert all(torch.equal(weight(engine, n), expected[n]) for n in TARGETS)
    assert biases and all(torch.equal(weight(engine, n, "bias"), base_biases[n] + d) for n, d in biases.items())
    without_biases = {k: v for k, v in state.items() if not k.endswith(".diff_b")}
    pixels(engine, with_file(write(tmp_path, "mixed-no-bias", without_biases)))
    plain = write(tmp_path, "mixed-plain", plain_lora_of({n: expected[n] - bases[n] for n in expected}))
    assert np.array_equal(
        pixels(engine, with_file(tmp_path / "mixed-no-bias.safetensors")), pixels(engine, with_file(plain))
    )
    assert np.abs(image - baseline).max() > 10
    assert np.array_equal(pixels(engine, BASE), baseline)
    assert all(torch.equal(weight(engine, n, "bias"), b) for n, b in base_biases.items())


def test_a_lycoris_file_and_a_plain_lora_together(
    engine: Engine, pipe: StableDiffusionXLPipeline, tmp_path: Path, baseline: np.ndarray
) -> None:
    """Two files on the same weights: LoHa and kohya LoRA terms go through the general path
    together, each at its own scale, into one write per weight."""
    loha_state = lycoris_state(pipe, "loha", 6, lora_dim=4, alpha=2)
    lora_state = lycoris_state(pipe, "locon", 7, lora_dim=4, alpha=2)
    bases = {name: weight(engine, name) for name in TARGETS}
    a, b = write(tmp_path, "a", loha_state), write(tmp_path, "b", lora_state)
    both = pixels(engine, replace(BASE, loras=(LoraSpec(str(a), 0.7), LoraSpec(str(b), 1.2))))
    ha, hb = lycoris_weights(loha_state, bases), lycoris_weights(lora_state, bases)
    for name in TARGETS:
        expected = bases[name] + 0.7 * (ha[name] - bases[name]) + 1.2 * (hb[name] - bases[name])
        torch.testing.assert_close(weight(engine, name), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(both - pixels(engine, with_file(a, 0.7))).max() > 5
    assert np.array_equal(pixels(engine, BASE), baseline)


# ---------------------------------------------------------------------------------------------
# OFT, BOFT and GLoRA: updates computed from the base weight at fuse time. The oracle is the
# LyCORIS module itself, rebuilt from the file's tensors (`make_module_from_state_dict`) on a copy
# of the engine's base layer, and its `get_merged_weight`.

# (LyCORIS algo, its options): linear and conv layers, with and without rescale / constraint. A
# constraint of 0.01 per row bounds ‖Q‖ at 0.32-1.28 on these layers, below the drawn blocks' norm.
BASE_AWARE = {
    "diag-oft": ("diag-oft", {"lora_dim": 4}),
    "diag-oft-rescale-constraint": ("diag-oft", {"lora_dim": 8, "rescaled": True, "constraint": 0.01}),
    "boft": ("boft", {"lora_dim": 4}),
    "boft-rescale-constraint": ("boft", {"lora_dim": 2, "rescaled": True, "constraint": 0.01}),
    "glora": ("glora", {"lora_dim": 4, "alpha": 2}),
}


def base_layers(engine: Engine) -> dict[str, torch.nn.Module]:
    """Copies of the engine's target layers as they are now (the base), for LyCORIS to wrap."""
    return {name: copy.deepcopy(layer_of(engine.models[MODEL].txt2img, *target)) for name, target in TARGETS.items()}


def lycoris_merged(
    state: dict[str, torch.Tensor], layers: dict[str, torch.nn.Module], multiplier: float = 1.0
) -> dict[str, torch.Tensor]:
    """Each module's merged weight by the LyCORIS module that reads the file's tensors."""
    out = {}
    with torch.no_grad():
        for name, p in by_module(state).items():
            layer = layers[name]
            if "a1.weight" in p:
                factors = (p["a1.weight"], p["a2.weight"], p["b1.weight"], p["b2.weight"], p.get("bm.weight"))
                module = GLoRAModule.make_module_from_state_dict(name, layer, *factors, p["alpha"])
            else:
                cls = DiagOFTModule if p["oft_blocks"].ndim == 3 else ButterflyOFTModule
                module = cls.make_module_from_state_dict(name, layer, p["oft_blocks"], p.get("rescale"), p["alpha"])
            out[name] = module.get_merged_weight(multiplier, layer.weight.shape, "cpu")[0]
    return out


@pytest.mark.parametrize("fmt", list(BASE_AWARE))
def test_oft_boft_and_glora_are_lycoris_merged_weights(
    engine: Engine, pipe: StableDiffusionXLPipeline, tmp_path: Path, baseline: np.ndarray, fmt: str
) -> None:
    """Each fused weight is LyCORIS's merged weight for its module within fp32 rounding (R by a
    solve where LyCORIS inverts, Rᵀ·W0 where it adds (R - I)ᵀ·W0 to W0); the image changes, is
    the image of the same ΔW as a plain LoRA within one 8-bit level, and the base returns exactly."""
    algo, options = BASE_AWARE[fmt]
    state = lycoris_state(pipe, algo, seed=len(fmt), **options)
    if "constraint" in options:  # the bound acts: every module's ‖Q‖ is above alpha·out
        for p in by_module(state).values():
            q = p["oft_blocks"] - p["oft_blocks"].transpose(-1, -2)
            assert q.norm() > float(p["alpha"]) * p["rescale"].shape[0]
    bases = {name: weight(engine, name) for name in TARGETS}
    expected = lycoris_merged(state, base_layers(engine))

    image = pixels(engine, with_file(write(tmp_path, fmt, state)))
    for name, merged in expected.items():
        fused = weight(engine, name)
        torch.testing.assert_close(fused, merged, rtol=1e-5, atol=1e-6)
        assert not torch.equal(fused, bases[name]), f"{name} is changed"
    plain = write(tmp_path, f"{fmt}-plain", plain_lora_of({n: expected[n] - bases[n] for n in expected}))
    assert np.abs(image - baseline).max() > 2, "the format changes the image"
    assert np.abs(image - pixels(engine, with_file(plain))).max() <= 1
    assert np.array_equal(pixels(engine, BASE), baseline)
    assert all(torch.equal(weight(engine, n), bases[n]) for n in TARGETS), "every weight is the base's again"


def test_a_scale_blends_oft_as_lycoris_does_without_rescale_and_linearly_with_it(
    engine: Engine, pipe: StableDiffusionXLPipeline, tmp_path: Path, baseline: np.ndarray
) -> None:
    """At scale 0.5: diag-OFT without rescale and GLoRA are LyCORIS's multiplier 0.5 (R_s = I +
    s(R - I), resp. W0 + s·ΔW); BOFT and a rescaled OFT are W0 + s·(W' - W0) (LyCORIS scales BOFT
    stage by stage and keeps the rescale whole, so its scale 0 would not be the base)."""
    layers = base_layers(engine)
    bases = {name: weight(engine, name) for name in TARGETS}
    for fmt in ("diag-oft", "glora", "boft-rescale-constraint"):
        algo, options = BASE_AWARE[fmt]
        state = lycoris_state(pipe, algo, seed=len(fmt), **options)
        path = write(tmp_path, fmt, state)
        pixels(engine, with_file(path))
        full = {name: weight(engine, name) for name in TARGETS}
        pixels(engine, with_file(path, 0.5))
        if fmt == "boft-rescale-constraint":
            for name in TARGETS:
                assert torch.equal(weight(engine, name), torch.lerp(bases[name], full[name], 0.5)), name
        else:
            for name, merged in lycoris_merged(state, layers, 0.5).items():
                torch.testing.assert_close(weight(engine, name), merged, rtol=1e-5, atol=1e-6)
        pixels(engine, with_file(path, 0.0))
        assert all(torch.equal(weight(engine, n), bases[n]) for n in TARGETS), f"{fmt} at scale 0 is the base"
    assert np.array_equal(pixels(engine, BASE), baseline)


def test_a_glora_tucker_middle_is_lycoris_glora_weight(engine: Engine, tmp_path: Path, baseline: np.ndarray) -> None:
    """GLoRA's Tucker form (`bm.weight` with 1x1 b2) on a 3x3 convolution: LyCORIS 4.1.3's module
    cannot make it (its use_tucker asks for 1x1 and for larger kernels at once), so the oracle is
    its merge function, `lycoris.modules.glora._glora_weight`, on the file's tensors."""
    name, rank = kohya_name("unet", "mid_block.resnets.0.conv2"), 4
    base = weight(engine, name)
    generator = torch.Generator().manual_seed(12)
    drawn = lambda *shape: torch.randn(*shape, generator=generator) * 0.2  # noqa: E731
    factors = {
        "a1.weight": drawn(64, rank, 1, 1),
        "a2.weight": drawn(rank, 64, 1, 1),
        "b1.weight": drawn(64, rank, 1, 1),
        "b2.weight": drawn(rank, 64, 1, 1),
        "bm.weight": drawn(rank, rank, 3, 3),
    }
    state = {f"{name}.{k}": v for k, v in factors.items()} | {f"{name}.alpha": torch.tensor(2.0)}
    image = pixels(engine, with_file(write(tmp_path, "glora-tucker", state)))
    delta = _glora_weight(base, *(factors[f"{k}.weight"] for k in ("a1", "a2", "b1", "b2", "bm")), 2.0 / rank)
    torch.testing.assert_close(weight(engine, name), base + delta, rtol=1e-5, atol=1e-6)
    assert np.abs(image - baseline).max() > 2
    assert np.array_equal(pixels(engine, BASE), baseline)


def sd_scripts_oft(blocks: torch.Tensor, alpha: float, base: torch.Tensor) -> torch.Tensor:
    """sd-scripts networks/oft.py, OFTInfModule.merge_to at multiplier 1, written from its maths:
    Q = B - Bᵀ held to alpha·out by Q·(min(‖Q‖, alpha·out) + 1e-8) / (‖Q‖ + 1e-8), R by Cayley with
    an inverse, and W'[k, m] = Σ_n R[k, n, m] W[k, n] over groups of b output rows."""
    k, b, _ = blocks.shape
    q = blocks - blocks.transpose(1, 2)
    norm = torch.norm(q.flatten())
    q = q * ((torch.clamp(norm, max=alpha * base.shape[0]) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(b).expand(k, b, b)
    r = (eye + q) @ (eye - q).inverse()
    return torch.einsum("k n m, k n i -> k m i", r, base.reshape(k, b, -1)).reshape(base.shape)


def test_sd_scripts_oft_files_apply_by_their_own_clamp(engine: Engine, tmp_path: Path, baseline: np.ndarray) -> None:
    """sd-scripts' own OFT (networks/oft.py) saves `oft_unet_<module>.oft_blocks` (num_blocks, b, b)
    and `.alpha` for UNet layers only. Same Cayley rotation, orientation and alpha·out bound as
    LyCORIS's diag-OFT, but its clamp always applies: alpha 0 there means no rotation, where
    LyCORIS's alpha 0 means no bound. Checked unconstrained (alpha 1), clamped (alpha 0.005) and
    at alpha 0, against that formula."""
    generator = torch.Generator().manual_seed(11)
    unet = {name: target for name, target in TARGETS.items() if target[0] == "unet"}
    bases = {name: weight(engine, name) for name in unet}
    blocks = {
        name: torch.randn(8, base.shape[0] // 8, base.shape[0] // 8, generator=generator) * 0.2
        for name, base in bases.items()
    }
    sd_name = {name: "oft_unet_" + name.removeprefix("lora_unet_") for name in unet}
    for alpha in (1.0, 0.005, 0.0):
        state = {f"{sd_name[n]}.oft_blocks": b for n, b in blocks.items()}
        state |= {f"{sd_name[n]}.alpha": torch.tensor(alpha) for n in blocks}
        image = pixels(engine, with_file(write(tmp_path, f"sd-scripts-{alpha}", state)))
        for name, base in bases.items():
            torch.testing.assert_close(
                weight(engine, name), sd_scripts_oft(blocks[name], alpha, base), rtol=1e-5, atol=1e-6
            )
        if alpha:
            assert np.abs(image - baseline).max() > 2, alpha
    lycoris_names = {f"{n}.oft_blocks": b for n, b in blocks.items()} | {
        f"{n}.alpha": torch.tensor(0.0) for n in blocks
    }
    pixels(engine, with_file(write(tmp_path, "lycoris-alpha-0", lycoris_names)))
    unbounded = {n: sd_scripts_oft(b, 1e9, bases[n]) for n, b in blocks.items()}
    for name in unet:
        torch.testing.assert_close(weight(engine, name), unbounded[name], rtol=1e-5, atol=1e-6)
    assert np.array_equal(pixels(engine, BASE), baseline)


# ---------------------------------------------------------------------------------------------
# Refusals: by the type's real name, before any weight is touched.


def refused_state(pipe: StableDiffusionXLPipeline, cls: type, **options: object) -> dict[str, torch.Tensor]:
    """A LyCORIS module of a refused type on one attention layer, saved as LyCORIS saves it."""
    component, path = LYCORIS_TARGETS[0]
    name = kohya_name(component, path)
    module = cls(name, layer_of(pipe, component, path), **options)
    return {f"{name}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items() if "org_" not in k}


OFT_NAME = kohya_name(*LYCORIS_TARGETS[0])  # a 64-row attention projection


@pytest.mark.parametrize(
    ("state", "named"),
    [
        ("ia3", r"is a LyCORIS \(IA\)\^3 file, a type this predictor does not apply"),
        (
            {f"{OFT_NAME}.oft_diag": torch.zeros(16, 4, 4), f"{OFT_NAME}.alpha": torch.tensor(0.0)},
            "is a LyCORIS OFT in the old oft_diag layout file, a type this predictor does not apply",
        ),
        ({f"{OFT_NAME}.lambda_layer": torch.zeros(4)}, "is a LyCORIS T-LoRA file"),
    ],
)
def test_lycoris_types_this_predictor_does_not_apply_are_refused_by_name(
    engine: Engine, pipe: StableDiffusionXLPipeline, tmp_path: Path, baseline: np.ndarray, state: object, named: str
) -> None:
    if state == "ia3":
        state = refused_state(pipe, IA3Module)
    path = write(tmp_path, "refused", state)
    loras = engine.models[MODEL].lora_set
    with pytest.raises(InputError, match=named):
        engine.generate(with_file(path))
    assert not loras.merged and loras.active == ()
    assert np.array_equal(pixels(engine, BASE), baseline)


def oft_module(pipe: StableDiffusionXLPipeline, algo: str, target: tuple[str, str], **options: object) -> dict:
    return lycoris_state(pipe, algo, seed=1, targets=[target], **options)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # DoRA beside OFT: LyCORIS's OFT / BOFT / GLoRA modules have no weight_decompose
        (
            lambda pipe: (
                oft_module(pipe, "diag-oft", LYCORIS_TARGETS[0], lora_dim=4)
                | {f"{OFT_NAME}.dora_scale": torch.ones(64, 1)}
            ),
            "damaged .*: a LyCORIS OFT module holds dora_scale: LyCORIS makes no DoRA for OFT / BOFT",
        ),
        (
            lambda pipe: (
                oft_module(pipe, "glora", LYCORIS_TARGETS[0], lora_dim=4)
                | {f"{OFT_NAME}.dora_scale": torch.ones(64, 1)}
            ),
            "damaged .*: a LyCORIS GLoRA module holds dora_scale",
        ),
        # a rescale that is not one number per rotated row
        (
            lambda pipe: (
                oft_module(pipe, "diag-oft", LYCORIS_TARGETS[0], lora_dim=4, rescaled=True)
                | {f"{OFT_NAME}.rescale": torch.ones(63, 1)}
            ),
            rf"damaged .*{OFT_NAME}: rescale \[63, 1\] does not fit oft_blocks",
        ),
        # BOFT blocks that make no butterfly (3 stages need 4 to divide the block count)
        (
            lambda pipe: {f"{OFT_NAME}.oft_blocks": torch.zeros(3, 2, 32, 32), f"{OFT_NAME}.alpha": torch.tensor(0.0)},
            "damaged .*are no butterfly",
        ),
        # blocks made for a 128-row layer under a 64-row layer's name: another model's file
        (
            lambda pipe: {
                k.replace(kohya_name(*LYCORIS_TARGETS[10]), OFT_NAME): v
                for k, v in oft_module(pipe, "boft", LYCORIS_TARGETS[10], lora_dim=4).items()
            },
            r"does not fit .*the LyCORIS BOFT blocks \[\d+, 32, 4, 4\] rotate 128 output rows, "
            r"the model's weight is \[64, 64\]",
        ),
        # GLoRA factors that do not chain
        (
            lambda pipe: {
                f"{OFT_NAME}.a1.weight": torch.ones(64, 4),
                f"{OFT_NAME}.a2.weight": torch.ones(4, 64),
                f"{OFT_NAME}.b1.weight": torch.ones(64, 4),
                f"{OFT_NAME}.b2.weight": torch.ones(3, 64),
            },
            "damaged .*GLoRA factors .* do not make W·a1·a2 \\+ b1·b2",
        ),
        # the older LyCORIS GLoRA arrangement (a1 (rank, in), ..., b2 (out, rank)), which ComfyUI
        # also reads: named, not applied
        (
            lambda pipe: {
                f"{OFT_NAME}.a1.weight": torch.ones(4, 64),
                f"{OFT_NAME}.a2.weight": torch.ones(64, 4),
                f"{OFT_NAME}.b1.weight": torch.ones(4, 64),
                f"{OFT_NAME}.b2.weight": torch.ones(64, 4),
            },
            "GLoRA factors are in an older LyCORIS layout",
        ),
    ],
)
def test_oft_and_glora_modules_that_cannot_apply_say_why(
    engine: Engine, pipe: StableDiffusionXLPipeline, tmp_path: Path, baseline: np.ndarray, make, message: str
) -> None:
    path = write(tmp_path, "bad", make(pipe))
    with pytest.raises(InputError, match=message):
        engine.generate(with_file(path))
    assert not engine.models[MODEL].lora_set.merged
    assert np.array_equal(pixels(engine, BASE), baseline)


def test_the_types_are_read_by_their_real_keys(pipe: StableDiffusionXLPipeline) -> None:
    """The keys the readers and the refusals use are the ones LyCORIS saves (not `glora_`, which no
    file has)."""
    keys = lambda cls, **options: {k.partition(".")[2] for k in refused_state(pipe, cls, **options)}  # noqa: E731
    assert keys(GLoRAModule, lora_dim=4) == {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}
    assert keys(IA3Module) >= {"weight", "on_input"}
    assert keys(DiagOFTModule, lora_dim=4, rescaled=True) == {"oft_blocks", "rescale", "alpha"}
    assert keys(ButterflyOFTModule, lora_dim=4, rescaled=True) == {"oft_blocks", "rescale", "alpha"}


# What other files are, read from keys and shapes alone (each a layout only that kind of file has).
SD15_LORA = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (320, 4),
}
IDENTITIES = [
    (SD15_LORA, "a LoRA for SD 1.5"),
    ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 1024)}, "SD 2.x"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072)}, "a LoRA for Flux"),
    ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072)}, "a LoRA for Flux"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 1536)}, "a diffusion transformer"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "a full checkpoint"),
    ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "a full checkpoint"),
    ({"clip_l": (2, 768), "clip_g": (2, 1280)}, "an SDXL textual-inversion embedding"),
    ({"emb_params": (2, 768)}, "a textual-inversion embedding for SD 1.5 / 2.x"),
    ({"text_encoders_0": (2, 768), "text_encoders_1": (2, 1280)}, r"embeddings\.pti"),
    (
        {
            "encoder.conv_in.weight": (128, 3, 3, 3),
            "decoder.conv_in.weight": (512, 4, 3, 3),
            "quant_conv.weight": (8, 8, 1, 1),
        },
        "a VAE",
    ),
    ({"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3)}, "a ControlNet"),
    ({"some.other.tensor": (3,)}, "holds no LoRA weights .*some.other.tensor"),
    ({"lora_unet_x.hada_w1_a": (4, 4), "lora_unet_y.lokr_w1": (2, 2), "lora_unet_z.lambda_layer": (4,)}, "T-LoRA"),
]


@pytest.mark.parametrize(("shapes", "named"), IDENTITIES)
def test_files_that_are_no_sdxl_lora_are_named_for_what_they_are(
    tmp_path: Path, shapes: dict[str, tuple[int, ...]], named: str
) -> None:
    path = write(tmp_path, "file", {k: torch.zeros(s) for k, s in shapes.items()})
    with pytest.raises(InputError, match=named):
        check_format(path, "the-file")


def test_an_embedding_sent_as_a_lora_is_named_through_the_engine(
    engine: Engine, tmp_path: Path, baseline: np.ndarray
) -> None:
    path = write(tmp_path, "negative", {"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(2, 64)})
    with pytest.raises(InputError, match=r"is an SDXL textual-inversion embedding .*not a LoRA"):
        engine.generate(with_file(path))
    assert np.array_equal(pixels(engine, BASE), baseline)


# ---------------------------------------------------------------------------------------------
# Loader errors: whatever a malformed file makes the loaders raise reaches the user as the
# project's own error, saying what to check.


def kohya_module(down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    name = kohya_name(*LYCORIS_TARGETS[0])
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha}


@pytest.mark.parametrize(
    ("state", "raw", "message"),
    [
        # a diffusers-layout LoRA whose lora_A is a 0-d tensor: diffusers' loader indexes its axes
        (
            {
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.tensor(1.0),
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(64, 4),
            },
            "IndexError",
            "could not be read",
        ),
        # an alpha of two numbers: diffusers' conversion calls .item() on it
        (kohya_module(torch.ones(4, 32), torch.ones(32, 4), torch.ones(2)), "RuntimeError", "could not be read"),
        # a LoHa module whose factors do not multiply
        (
            {
                f"{kohya_name(*LYCORIS_TARGETS[0])}.hada_w{i}_{s}": torch.ones(4, 3 if s == "a" else 5)
                for i in (1, 2)
                for s in "ab"
            },
            "FormatError",
            "damaged .*do not multiply",
        ),
    ],
)
def test_loader_errors_become_the_projects_own(
    engine: Engine, tmp_path: Path, baseline: np.ndarray, state: dict, raw: str, message: str
) -> None:
    path = write(tmp_path, "broken", state)
    with pytest.raises(InputError, match=message) as err:
        engine.generate(with_file(path))
    assert raw in str(err.value) or raw == "FormatError"
    assert not engine.models[MODEL].lora_set.merged
    assert np.array_equal(pixels(engine, BASE), baseline)


def test_a_truncated_file_is_refused_as_unreadable(engine: Engine, tmp_path: Path, lora_files: dict) -> None:
    path = tmp_path / "cut.safetensors"
    path.write_bytes(lora_files["b"][: len(lora_files["b"]) // 2])
    with pytest.raises(InputError, match=r"not a readable \.safetensors file|could not be read"):
        engine.generate(with_file(path))


# ---------------------------------------------------------------------------------------------
# Replicate's SDXL trainer (replicate/cog-sdxl): attention-processor keys, pivotal tokens.


def test_cog_sdxl_tars_load_with_their_tokens_through_every_tar_form(
    engine: Engine,
    pipe: StableDiffusionXLPipeline,
    tmp_path: Path,
    baseline: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tar's lora.safetensors in cog-sdxl's processor layout is the same LoRA as diffusers'
    layout of the same factors (same image), and TOK brings its embeddings.pti tokens."""
    lora = save(cog_sdxl_lora(pipe, seed=8))
    same = diffusers_lora(pipe, tmp_path / "diffusers", seed=8)
    tar = trained_tar(lora, embeddings=pivotal_embeddings(pipe, seed=9))
    version = "c" * 64
    host = file_host({"acme-cogsdxl/trained_model.tar": tar, f"acme-cogsdxl-versions-{version}/trained_model.tar": tar})
    monkeypatch.setenv("REPLICATE_ENDPOINT", host.url)
    try:
        plain, tok = replace(BASE, prompt="a photo of a man at dusk"), replace(BASE, prompt="a photo of TOK at dusk")
        reference = pixels(engine, replace(plain, loras=(LoraSpec(str(same), 1.0),)))
        assert np.abs(reference - pixels(engine, plain)).max() > 10
        forms = [host.url + "/acme-cogsdxl/trained_model.tar", "acme/cogsdxl", f"acme/cogsdxl/{version}"]
        for form in forms:
            spec = (LoraSpec(form, 1.0),)
            assert np.array_equal(pixels(engine, replace(plain, loras=spec)), reference), form
            with_token = pixels(engine, replace(tok, loras=spec))
            literal = pixels(engine, replace(BASE, prompt="a photo of <s0><s1> at dusk", loras=spec))
            assert np.array_equal(with_token, literal), form
        untrained = pixels(engine, replace(tok, loras=(LoraSpec(str(same), 1.0),)))
        assert changed_share(with_token, untrained) > 0.9, "TOK is the tar's tokens, not the word"
    finally:
        host.close()
    assert np.array_equal(pixels(engine, BASE), baseline)
