"""LoRAs fused into a base model's weights: exact restores, warm switches, no module ever replaced.

A request's LoRAs are merged into the weights they touch (W = W0 + sum of scale * up @ down, one
matrix product of the factors in the weight's dtype, accumulated in fp32 and rounded once into the
weight), so a LoRA request runs the plain modules at base speed. Before a weight is first
written, an exact copy of W0 is kept in CPU memory for as long as the weight is merged; when the
set or a scale changes, weights are copied back from it, never restored by subtracting, so a
request without LoRAs after any sequence of LoRA requests is bit-identical to a fresh process.
Weights are written in place (`param.data`), so a torch.compile graph stays valid across switches.

Files are parsed through diffusers' own conversions (kohya/SGM names, text encoders, alphas and
metadata) into per-weight factors, without injecting PEFT layers. The last few parsed LoRAs of
every model stay in memory within one byte budget for the process (engine/warm.py), so
switching back and forth or changing a scale reads no file. A parse that fails touches no weight;
a merge that fails or is cancelled (Cog's cancel is a BaseException) copies every written weight
back, and no trained token is left behind; a cancel during that restore leaves the set claiming
nothing, so the next request restores the rest.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import _create_lora_config
from diffusers.utils.state_dict_utils import StateDictType
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from engine import adapters
from engine.adapters import Adapter, FormatError, LoRA
from engine.embeddings import add_tokens, misfit, remove_tokens, swap_words, token_names
from engine.errors import InputError, LoraLoadError
from engine.request import LocalLora
from engine.warm import PROCESS_WARM, ModelWarm, WarmCache

log = logging.getLogger(__name__)

# The pipeline's modules a LoRA file can hold weights for, named as its keys' prefixes.
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# Text-encoder modules diffusers reads ranks for (_load_lora_into_text_encoder).
_TEXT_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


def check_format(path: Path, name: str) -> None:
    """Refuse, before touching the model, every file this predictor cannot apply, named for what
    it is (a refused LyCORIS type, another model's LoRA, a checkpoint, an embedding, a VAE...)
    from its keys and shapes alone: the header is read, no tensor."""
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 - a safe_open handle is no dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"LoRA {name} is not a readable .safetensors file: {exc}") from exc
    if refused := adapters.refusal(list(shapes)):
        raise InputError(
            f"LoRA {name} is a LyCORIS {refused} file, a type this predictor does not apply: use a LoRA, "
            "LoCon, LoHa, LoKr, DoRA, OFT / BOFT, GLoRA or full-difference file (docs/loras.md)"
        )
    if what := adapters.identify(shapes):
        raise InputError(
            f"LoRA {name} is {what}. The models here are SDXL-family: use an SDXL, Pony or Illustrious LoRA."
        )
    if not any(adapters.is_adapter_key(key) for key in shapes):
        shown = ", ".join(list(shapes)[:3]) or "none"
        raise InputError(
            f"LoRA {name} holds no LoRA weights (no lora_up / lora_A / hada_ / lokr_ / oft_blocks / diff keys; "
            f"its first keys are: {shown}): check that the link points at the LoRA file"
        )


def adapter_name(key: str) -> str:
    """Trained tokens are named after the LoRA, so two LoRAs' tokens never collide."""
    return "lora_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """An exact copy in CPU memory, not pinned: page-locked memory is taken from the whole machine
    and these copies can add up to the UNet's size, while a restore is rare and short."""
    return tensor.to("cpu", copy=True)


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A factor as read from the file, pinned on CUDA machines; without CUDA, no copy at all."""
    return tensor.pin_memory() if torch.cuda.is_available() else tensor.contiguous()


@dataclass(frozen=True)
class Layer:
    """One weight's low-rank update, W += scaling * up @ down, with the factors as the file stores them."""

    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    scaling: float  # alpha / rank (alpha / sqrt(rank) for rsLoRA)


# A weight's update: plain LoRA factors (fused by one matrix product) or any adapter's recipe.
Update = Layer | Adapter


@dataclass(frozen=True)
class ParsedLora:
    """A LoRA file read once: its updates by (component, module or module.bias), and pivotal
    embeddings if any."""

    layers: dict[tuple[str, str], Update]
    embeddings: dict[str, torch.Tensor] | None
    nbytes: int


def _peft_names(model: torch.nn.Module, component: str, part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's LoRA keys renamed by diffusers' own conversions to PEFT names (module
    paths of the model, then .lora_A / .lora_B), as diffusers does before injecting them."""
    if component == "unet":
        return part if "lora_A" in next(iter(part)) else convert_unet_state_dict_to_peft(part)
    # kohya's text-encoder names convert to diffusers' old attention names (to_q_lora) for q/k/v/out
    # and lora_linear_layer for the MLP: diffusers infers that layout only when an out_proj is among
    # them, so a file without one would stay unconverted. Named here, it converts either way.
    old = StateDictType.DIFFUSERS_OLD if any("_lora." in k for k in part) else None
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part, original_type=old))
    if not hasattr(model, "text_model"):  # flattened CLIP in recent transformers
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    return part


def _attn_processor_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replicate's cog-sdxl trainer saves the UNet's attention processors' own state dict
    (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight`, see
    its dataset_and_utils.py::unet_attn_processors_state_dict): UNet keys without the `unet.`
    prefix, which diffusers' UNet conversion reads once the prefix is there."""
    if not any(".processor." in k and not k.startswith(_COMPONENTS) for k in state_dict):
        return state_dict
    return {k if k.startswith(_COMPONENTS) else f"unet.{k}": v for k, v in state_dict.items()}


def _tensors(update: Update) -> list[torch.Tensor]:
    return [update.down, update.up] if isinstance(update, Layer) else update.tensors()


def _warm_form(adapter: Adapter) -> Update:
    """What the warm cache keeps of one adapter: a plain LoRA (a LoCon's Tucker middle already
    folded into its down) as the factors the fast path multiplies; any other as its own small
    factors, pinned like them. Never a dense ΔW, unless the file stores one (`diff`)."""
    if isinstance(adapter, LoRA) and adapter.dora_scale is None:
        return Layer(_pinned(adapter.down), _pinned(adapter.up), adapter.scaling)
    pinned = {f.name: _pinned(v) for f in fields(adapter) if isinstance(v := getattr(adapter, f.name), torch.Tensor)}
    return replace(adapter, **pinned)


# What loading a file can raise when its keys or shapes are not what a loader expects (diffusers'
# conversions index and unpack them); each reaches the user as the project's own error type.
_LOADER_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError, SafetensorError, RuntimeError, OSError)


def _component_state(
    pipe: StableDiffusionXLPipeline,
    component: str,
    state_dict: dict[str, torch.Tensor],
    alphas: dict[str, float] | None,
    metadata: dict | None,
) -> tuple[dict[str, torch.Tensor], LoraConfig | None]:
    """One component's weights in PEFT names and the LoraConfig diffusers would inject them with,
    prepared the way `load_lora_adapter` (UNet) and `_load_lora_into_text_encoder` do."""
    prefix = component + "."
    part = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if not part:
        return {}, None
    if metadata is not None:
        metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    if alphas:
        alphas = {k.removeprefix(prefix): v for k, v in alphas.items() if k.startswith(prefix)}
    model = getattr(pipe, component)
    part = _peft_names(model, component, part)
    if component == "unet":
        rank = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k and v.ndim > 1}
    else:
        rank = {
            f"{name}.lora_B.weight": part[f"{name}.lora_B.weight"].shape[1]
            for name, _ in model.named_modules()
            if name.endswith(_TEXT_TARGETS) and f"{name}.lora_B.weight" in part
        }
    if not rank:
        raise ValueError(f"the {component} weights hold no lora_B matrix this model has a module for")
    config = _create_lora_config(part, alphas, metadata, rank, is_unet=component == "unet")
    return part, config


def _layers(
    pipe: StableDiffusionXLPipeline, component: str, part: dict[str, torch.Tensor], config: LoraConfig, name: str
) -> dict[tuple[str, str], Layer]:
    """Per-module factors with PEFT's own scaling, each checked against the weight it updates."""
    if config.use_dora or config.lora_bias:
        raise InputError(f"LoRA {name} uses {'DoRA' if config.use_dora else 'LoRA bias'} weights: use a plain LoRA")
    model = getattr(pipe, component)
    modules = {key.rsplit(".lora_", 1)[0] for key in part}
    layers: dict[tuple[str, str], Layer] = {}
    missing = []
    for module_name in sorted(modules):
        down, up = part.get(f"{module_name}.lora_A.weight"), part.get(f"{module_name}.lora_B.weight")
        if down is None or up is None:
            raise ValueError(f"{component}.{module_name} has only one of lora_A / lora_B")
        try:
            weight = model.get_submodule(module_name).weight
        except AttributeError:
            missing.append(module_name)
            continue
        shape = (up.shape[0], *down.shape[1:])
        if up.shape[1] != down.shape[0] or any(k != 1 for k in up.shape[2:]) or tuple(weight.shape) != shape:
            raise ValueError(
                f"size mismatch for {component}.{module_name}: the LoRA makes {list(shape)}, "
                f"the model's weight is {list(weight.shape)}"
            )
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module_name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module_name), config.lora_alpha)
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        layers[(component, module_name)] = Layer(_pinned(down), _pinned(up), scaling)
    if missing and not layers:
        raise ValueError(f"none of its {component} modules exist in this model (e.g. {missing[0]})")
    if missing:
        log.warning("LoRA %s: %d %s modules not in this model were skipped", name, len(missing), component)
    return layers


class LoraSet:
    """The LoRAs fused into one base model's shared modules, and the parsed ones kept warm."""

    def __init__(self, pipe: StableDiffusionXLPipeline, model_id: str, warm: WarmCache | None = None) -> None:
        self.pipe = pipe
        self.model_id = model_id
        # (cache key, scale) merged into the weights now; None while that is not known (a merge or a
        # restore cut short), so the next apply merges again whatever it is asked for.
        self.active: tuple[tuple[str, float], ...] | None = ()
        # cache key -> parsed, most recent last, in the one budget of the process (engine/warm.py)
        self.warm: ModelWarm[ParsedLora] = (warm or PROCESS_WARM).view(model_id)
        self.originals: dict[tuple[str, str], torch.Tensor] = {}  # exact W0 of each merged weight, on the CPU
        self.merged: set[tuple[str, str]] = set()  # weights that differ from their originals now
        self.params: dict[tuple[str, str], torch.nn.Parameter] = {}
        self.tokens: dict[str, list[str]] = {}  # adapter name -> its pivotal tokens in the tokenizers
        self.triggers: list[tuple[str, str]] = []  # (what the user writes, the tokens it stands for)

    def apply(self, loras: list[LocalLora]) -> None:
        """Make exactly these LoRAs active at these scales: parse what is not warm, then re-merge."""
        parsed = [self._parsed(lora) for lora in loras]  # reads files; touches no weight
        names = {adapter_name(lora.key) for lora in loras}
        for stale in [n for n in self.tokens if n not in names]:
            self._unload_tokens(stale)
        for lora, p in zip(loras, parsed, strict=True):
            if p.embeddings is not None and adapter_name(lora.key) not in self.tokens:
                self._load_tokens(lora, p.embeddings)
        wanted = tuple((lora.key, lora.scale) for lora in loras)
        if wanted != self.active:
            self._fuse(loras, parsed)
        self.triggers = [
            (text, "".join(self.tokens[adapter_name(lora.key)]))
            for lora in loras
            if adapter_name(lora.key) in self.tokens
            for word, original in lora.trigger
            for text in (word, original)
        ]
        self._evict({lora.key for lora in loras})
        if loras:
            log.info("LoRAs active on %s: %s", self.model_id, ", ".join(f"{x.name} @ {x.scale:g}" for x in loras))

    def _parsed(self, lora: LocalLora) -> ParsedLora:
        """The warm copy when there is one, else the file read and checked against this model."""
        if lora.key in self.warm:
            self.warm.move_to_end(lora.key)
            return self.warm[lora.key]
        check_format(lora.path, lora.name)
        start = time.perf_counter()
        try:
            parsed = self._parse(lora)
        except InputError:
            raise  # already says what to change
        except FormatError as exc:
            raise InputError(f"LoRA {lora.name} is damaged or in a layout this predictor does not know: {exc}") from exc
        except _LOADER_ERRORS as exc:
            raise self._load_error(lora.name, exc, reading=True) from exc
        self.warm[lora.key] = parsed
        log.info("loaded LoRA %s in %.2fs (%d weights)", lora.name, time.perf_counter() - start, len(parsed.layers))
        return parsed

    def _parse(self, lora: LocalLora) -> ParsedLora:
        """Read one LoRA file (and its pivotal embeddings) into per-weight updates: a kohya /
        LyCORIS file module by module through engine/adapters (each module's own alpha / rank:
        diffusers' kohya alphas miss attention modules whose alpha is not the file's most common
        one), any other layout through diffusers' LoRA loader."""
        with safe_open(str(lora.path), "pt") as f:
            keys = list(f.keys())
        if adapters.is_kohya(keys):
            layers = self._adapter_layers(load_file(str(lora.path)), lora.name)
        else:
            layers = self._lora_layers(lora)
        if not layers:
            raise ValueError("it holds no weights for the UNet or the text encoders")
        embeddings = None
        if lora.embeddings is not None:
            embeddings = load_file(str(lora.embeddings))
        tensors = [t for update in layers.values() for t in _tensors(update)] + [*(embeddings or {}).values()]
        return ParsedLora(layers, embeddings, sum(t.nbytes for t in tensors))

    def _lora_layers(self, lora: LocalLora) -> dict[tuple[str, str], Update]:
        """A plain LoRA in any naming diffusers reads (diffusers/PEFT, kohya, cog-sdxl's processors)."""
        state_dict, alphas, metadata = self.pipe.lora_state_dict(
            str(lora.path), unet_config=self.pipe.unet.config, return_lora_metadata=True
        )
        state_dict = _attn_processor_keys(state_dict)
        if not all("lora" in k for k in state_dict):
            raise ValueError("Invalid LoRA checkpoint: some keys hold no 'lora'")
        layers: dict[tuple[str, str], Update] = {}
        for component in _COMPONENTS:
            part, config = _component_state(self.pipe, component, state_dict, alphas, metadata)
            if config is not None:
                layers |= _layers(self.pipe, component, part, config, lora.name)
        return layers

    def _adapter_layers(self, state: dict[str, torch.Tensor], name: str) -> dict[tuple[str, str], Update]:
        """A kohya / LyCORIS file, module by module: each adapter read by its own type, checked
        against the parameter it updates; plain LoRA modules become factors for the fast path."""
        modules = adapters.read_modules(state)
        targets = self._module_names(list(modules))
        layers: dict[tuple[str, str], Update] = {}
        missing = []
        for module, parts in modules.items():
            if module not in targets:
                missing.append(module)
                continue
            component, path = targets[module]
            model = getattr(self.pipe, component)
            for param_name, adapter in parts.items():
                try:
                    param = model.get_parameter(f"{path}.{param_name}")
                except AttributeError:
                    missing.append(module)
                    continue
                try:
                    adapter.check(tuple(param.shape))
                except FormatError as exc:
                    raise ValueError(f"size mismatch for {component}.{path}: {exc}") from None
                key = (component, path if param_name == "weight" else f"{path}.{param_name}")
                layers[key] = _warm_form(adapter)
        if missing and not layers:
            raise ValueError(f"none of its modules exist in this model (e.g. {missing[0]})")
        if missing:
            log.warning("LoRA %s: %d modules not in this model were skipped", name, len(missing))
        kinds = {
            f"{u.kind}{' with DoRA' if u.dora_scale is not None else ''}" if isinstance(u, Adapter) else "LoRA"
            for u in layers.values()
        }
        log.info("LoRA %s holds %s weights", name, ", ".join(sorted(kinds)))
        return layers

    def _module_names(self, modules: list[str]) -> dict[str, tuple[str, str]]:
        """kohya module names -> (component, module path), by diffusers' own conversions (SGM
        blocks, kohya's underscores, text encoders): each name goes through them as a tagged
        stand-in LoRA (1x1 factors holding its index), whatever its adapter type."""
        tagged = {}
        for index, module in enumerate(modules):
            tag = torch.full((1, 1), float(index))
            tagged[f"{module}.lora_down.weight"] = tag
            tagged[f"{module}.lora_up.weight"] = tag
        state, _ = self.pipe.lora_state_dict(tagged, unet_config=self.pipe.unet.config)
        names: dict[str, tuple[str, str]] = {}
        for component in _COMPONENTS:
            prefix = component + "."
            part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if not part:
                continue
            for key, tag in _peft_names(getattr(self.pipe, component), component, part).items():
                if ".lora_A." in key:
                    names[modules[int(tag.item())]] = (component, key.split(".lora_A.")[0])
        return names

    def _fuse(self, loras: list[LocalLora], parsed: list[ParsedLora]) -> None:
        """Copy back the weights the new set leaves alone, write the ones it touches; on any
        failure or cancel, copy every written weight back so the model is the base again."""
        start = time.perf_counter()
        updates: dict[tuple[str, str], list[tuple[Layer, float]]] = {}
        for lora, p in zip(loras, parsed, strict=True):
            for key, layer in p.layers.items():
                updates.setdefault(key, []).append((layer, lora.scale))
        self.active = None  # until this ends: a cancel anywhere below must not leave a claim behind
        done = False
        try:
            with torch.no_grad():
                for key in self.merged - updates.keys():
                    self._restore(key)
                for key, terms in updates.items():
                    self._write(key, terms)
            done = True
        except RuntimeError as exc:
            raise self._load_error(", ".join(lora.name for lora in loras), exc) from exc
        finally:
            if not done:
                with torch.no_grad():
                    for key in list(self.merged):
                        self._restore(key)
                self.active = ()  # only once every weight is back (a cancel in the loop skips this)
        self.active = tuple((lora.key, lora.scale) for lora in loras)
        done_what = f"fused {len(updates)} weights" if loras else "restored the base weights"
        log.info("%s on %s in %.2fs", done_what, self.model_id, time.perf_counter() - start)

    def _weight(self, key: tuple[str, str]) -> torch.nn.Parameter:
        """The parameter itself, looked up once: moving a model swaps its `.data`, not the object."""
        if key not in self.params:
            component, module = key
            model = getattr(self.pipe, component)
            # a bias (LyCORIS diff_b) is keyed by its own name; a weight by its module's
            bias = module.endswith(".bias")
            self.params[key] = model.get_parameter(module) if bias else model.get_submodule(module).weight
        return self.params[key]

    def _write(self, key: tuple[str, str], terms: list[tuple[Update, float]]) -> None:
        """W = W0 + sum of scale * scaling * up @ down, as one `addmm` into the weight, with no
        temporary of the weight's size. The factors are rounded into the weight's dtype first: one
        LoRA's as the file stores them, its scale as addmm's alpha; several stacked along the rank,
        each up times its scale in fp32 before that rounding. addmm then accumulates the product and
        W0 in fp32 and rounds once (on the CPU in bf16 and fp16 the result equals the exact sum of W0
        and the rounded factors' product, rounded once; on CUDA the reduction is cuBLAS's). A
        weight that holds W0 now is its own W0 (bit for bit), so no saved copy moves to the device."""
        param = self._weight(key)
        if key not in self.originals:
            self.originals[key] = _host_copy(param.detach())
        target = param.data.view(param.shape[0], -1)
        original = target  # a weight not merged now holds W0 bit for bit: nothing to copy to the device
        if key in self.merged:
            original = self.originals[key].to(param.device, non_blocking=True).view_as(target)
        self.merged.add(key)  # before writing: a cancel half-way still gets this weight restored
        if not all(isinstance(layer, Layer) for layer, _ in terms):
            self._write_adapters(param, original, target, terms)
            return
        device, dtype = param.device, param.dtype
        if len(terms) == 1:
            layer, scale = terms[0]
            alpha = scale * layer.scaling
            up = layer.up.to(device, dtype, non_blocking=True).flatten(1)
            down = layer.down.to(device, dtype, non_blocking=True).flatten(1)
        else:
            alpha = 1.0
            up = torch.cat(
                [
                    layer.up.to(device, torch.float32, non_blocking=True).flatten(1) * (scale * layer.scaling)
                    for layer, scale in terms
                ],
                dim=1,
            ).to(dtype)
            down = torch.cat([layer.down.to(device, dtype, non_blocking=True).flatten(1) for layer, _ in terms])
        torch.addmm(original, up, down, alpha=alpha, out=target)

    @staticmethod
    def _write_adapters(
        param: torch.nn.Parameter, original: torch.Tensor, target: torch.Tensor, terms: list[tuple[Update, float]]
    ) -> None:
        """The general path (LoHa, LoKr, full differences, DoRA): W is built in fp32 from W0, term
        after term in the request's order (a DoRA term normalises what the terms before it made,
        as ComfyUI chains patches), each ΔW made from its factors on the device, and the result
        written into the weight once, rounded once into its dtype."""
        weight = original.to(torch.float32).view(param.shape)
        for update, scale in terms:
            if isinstance(update, Layer):
                up = update.up.to(param.device, torch.float32, non_blocking=True).flatten(1)
                down = update.down.to(param.device, torch.float32, non_blocking=True).flatten(1)
                weight = weight + (up @ down).view(param.shape) * (scale * update.scaling)
            else:
                weight = update.merge(weight, scale)
        target.copy_(weight.view_as(target))

    def _restore(self, key: tuple[str, str]) -> None:
        """Copy W0 back and let its copy go: a weight that holds W0 needs none until written again,
        so host memory holds copies of the weights merged now, never of every weight ever touched."""
        self._weight(key).data.copy_(self.originals[key])
        self.merged.discard(key)
        del self.originals[key]

    def _evict(self, keep: set[str]) -> None:
        """Drop the least recently used parsed LoRAs of any model, never one of this request, until
        the process is within its one budget."""
        self.warm.evict(keep)

    def _load_error(self, name: str, exc: Exception, reading: bool = False) -> Exception:
        """A LoRA that does not fit this model, or a file the loaders cannot read (any of their
        errors while reading it: an IndexError, a TypeError, safetensors' own...), is the user's to
        fix; memory, the disk or the device failing is what it is."""
        if isinstance(exc, torch.OutOfMemoryError):
            return LoraLoadError(f"out of memory while loading LoRA {name}: try one LoRA, or a smaller one")
        detail = " ".join(str(exc).strip().splitlines())[:300]
        if isinstance(exc, ValueError) or "size mismatch" in str(exc):
            return InputError(
                f"LoRA {name} does not fit {self.model_id} (an SDXL-family model): its weights' names or "
                f"shapes are not this model's. Check it was trained for SDXL, Pony or Illustrious. Loader: {detail}"
            )
        if (reading and not isinstance(exc, OSError)) or isinstance(exc, SafetensorError):
            return InputError(
                f"LoRA {name} could not be read: its keys or shapes are not a LoRA layout this predictor "
                f"knows ({type(exc).__name__}: {detail}). Check that the link points at an SDXL LoRA file"
            )
        return LoraLoadError(f"LoRA {name} could not be loaded: {type(exc).__name__}: {detail}")

    def rewrite(self, prompt: str) -> str:
        """Swap pivotal trigger words (TOK, <s0><s1>) for the active LoRA's own tokens."""
        return swap_words(prompt, self.triggers)

    def _load_tokens(self, lora: LocalLora, embeddings: dict[str, torch.Tensor]) -> None:
        """Pivotal-tuning embeddings, under tokens unique to this LoRA, checked before any goes in;
        a failure or a cancel half-way removes them (engine/embeddings.py)."""
        if "text_encoders_0" not in embeddings or "text_encoders_1" not in embeddings:
            raise InputError(f"LoRA {lora.name} has embeddings without text_encoders_0 / text_encoders_1: not SDXL's")
        vectors = (embeddings["text_encoders_0"], embeddings["text_encoders_1"])
        if problem := misfit(self.pipe, vectors):
            raise InputError(f"LoRA {lora.name} has embeddings that do not fit {self.model_id}: {problem}")
        name = adapter_name(lora.key)
        self.tokens[name] = token_names(name, vectors[0].shape[0])  # recorded first: a cancel finds them
        try:
            add_tokens(self.pipe, self.tokens[name], vectors)
        except BaseException:
            del self.tokens[name]  # add_tokens took out what went in
            raise

    def _unload_tokens(self, name: str) -> None:
        """Remove this LoRA's trained tokens from every tokenizer that holds them."""
        remove_tokens(self.pipe, self.tokens.pop(name, []))
