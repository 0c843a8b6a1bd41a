"""LoRAs fused into a base model's weights: exact restores, warm switches, no module ever replaced.

A request's LoRAs are merged into the weights they touch (W = W0 + sum of scale * up @ down, one
matrix product accumulated in fp32 and rounded once), so a LoRA request runs the plain modules at
base speed. Before a weight is first written, an exact copy of W0 is kept in CPU memory (pinned on
CUDA); when the set or a scale changes, weights are copied back from it, never restored by
subtracting, so a request without LoRAs after any sequence of LoRA requests is bit-identical to a
fresh process. Weights are written in place (`param.data`), so a torch.compile graph stays valid
across switches.

Files are parsed through diffusers' own conversions (kohya/SGM names, text encoders, alphas and
metadata) into per-weight factors, without injecting PEFT layers. The last few parsed LoRAs stay
in memory within LORA_WARM_MAX_BYTES, so switching back and forth or changing a scale reads no
file. A parse that fails touches no weight; a merge that fails or is cancelled (Cog's cancel is a
BaseException) copies every written weight back, and no trained token is left behind.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import _create_lora_config
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file

from engine.config import LORA_WARM_MAX_BYTES
from engine.errors import InputError, LoraLoadError
from engine.request import LocalLora

log = logging.getLogger(__name__)

# Key fragments of LyCORIS formats diffusers cannot load.
_UNSUPPORTED = {"hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", ".oft_": "OFT", "glora_": "GLoRA"}
# The pipeline's modules a LoRA file can hold weights for, named as its keys' prefixes.
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# Text-encoder modules diffusers reads ranks for (_load_lora_into_text_encoder).
_TEXT_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


def check_format(path: Path, name: str) -> None:
    """Refuse formats diffusers cannot load, naming them, before touching the model."""
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise InputError(f"LoRA {name} is not a readable .safetensors file: {exc}") from exc
    for fragment, fmt in _UNSUPPORTED.items():
        if any(fragment in k for k in keys):
            raise InputError(f"LoRA {name} is in {fmt} format, which this predictor cannot load: use a plain LoRA")
    if not any("lora" in k for k in keys):
        raise InputError(f"LoRA {name} holds no LoRA weights (keys like 'lora_up'/'lora_A'): is it a full checkpoint?")


def adapter_name(key: str) -> str:
    """Trained tokens are named after the LoRA, so two LoRAs' tokens never collide."""
    return "lora_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """An exact copy in CPU memory, pinned on CUDA machines so copies to the GPU run at full speed."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    out.copy_(tensor)
    return out


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A factor as read from the file, pinned on CUDA machines; without CUDA, no copy at all."""
    return tensor.pin_memory() if torch.cuda.is_available() else tensor.contiguous()


@dataclass(frozen=True)
class Layer:
    """One weight's low-rank update, W += scaling * up @ down, with the factors as the file stores them."""

    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    scaling: float  # alpha / rank (alpha / sqrt(rank) for rsLoRA)


@dataclass(frozen=True)
class ParsedLora:
    """A LoRA file read once: its updates by (component, module), and pivotal embeddings if any."""

    layers: dict[tuple[str, str], Layer]
    embeddings: dict[str, torch.Tensor] | None
    nbytes: int


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
    if component == "unet":
        if "lora_A" not in next(iter(part)):
            part = convert_unet_state_dict_to_peft(part)
        rank = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k and v.ndim > 1}
    else:
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        if not hasattr(model, "text_model"):  # flattened CLIP in recent transformers
            part = {k.removeprefix("text_model."): v for k, v in part.items()}
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

    def __init__(self, pipe: StableDiffusionXLPipeline, model_id: str) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.active: tuple[tuple[str, float], ...] = ()  # (cache key, scale) merged into the weights now
        self.warm: OrderedDict[str, ParsedLora] = OrderedDict()  # cache key -> parsed, most recent last
        self.warm_max_bytes = int(os.environ.get("LORA_WARM_MAX_BYTES") or LORA_WARM_MAX_BYTES)
        self.originals: dict[tuple[str, str], torch.Tensor] = {}  # exact copies of base weights, kept
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
        except (ValueError, KeyError, RuntimeError) as exc:
            raise self._load_error(lora.name, exc) from exc
        self.warm[lora.key] = parsed
        log.info("loaded LoRA %s in %.2fs (%d weights)", lora.name, time.perf_counter() - start, len(parsed.layers))
        return parsed

    def _parse(self, lora: LocalLora) -> ParsedLora:
        """Read one LoRA file (and its pivotal embeddings) into per-weight factors."""
        state_dict, alphas, metadata = self.pipe.lora_state_dict(
            str(lora.path), unet_config=self.pipe.unet.config, return_lora_metadata=True
        )
        if not all("lora" in k for k in state_dict):
            raise ValueError("Invalid LoRA checkpoint: some keys hold no 'lora'")
        layers: dict[tuple[str, str], Layer] = {}
        for component in _COMPONENTS:
            part, config = _component_state(self.pipe, component, state_dict, alphas, metadata)
            if config is not None:
                layers |= _layers(self.pipe, component, part, config, lora.name)
        if not layers:
            raise ValueError("it holds no weights for the UNet or the text encoders")
        embeddings = None
        if lora.embeddings is not None:
            embeddings = load_file(str(lora.embeddings))
        tensors = [t for layer in layers.values() for t in (layer.down, layer.up)] + [*(embeddings or {}).values()]
        return ParsedLora(layers, embeddings, sum(t.nbytes for t in tensors))

    def _fuse(self, loras: list[LocalLora], parsed: list[ParsedLora]) -> None:
        """Copy back the weights the new set leaves alone, write the ones it touches; on any
        failure or cancel, copy every written weight back so the model is the base again."""
        start = time.perf_counter()
        updates: dict[tuple[str, str], list[tuple[Layer, float]]] = {}
        for lora, p in zip(loras, parsed, strict=True):
            for key, layer in p.layers.items():
                updates.setdefault(key, []).append((layer, lora.scale))
        self.active = ()
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
        self.active = tuple((lora.key, lora.scale) for lora in loras)
        done_what = f"fused {len(updates)} weights" if loras else "restored the base weights"
        log.info("%s on %s in %.2fs", done_what, self.model_id, time.perf_counter() - start)

    def _weight(self, key: tuple[str, str]) -> torch.nn.Parameter:
        """The parameter itself, looked up once: moving a model swaps its `.data`, not the object."""
        if key not in self.params:
            component, module = key
            self.params[key] = getattr(self.pipe, component).get_submodule(module).weight
        return self.params[key]

    def _write(self, key: tuple[str, str], terms: list[tuple[Layer, float]]) -> None:
        """W = W0 + sum of scale * scaling * up @ down, as one matrix product that `addmm` accumulates
        in fp32 and rounds once into the weight's dtype, with no temporary of the weight's size (in
        bf16 it equals rounding the exact sum once). One LoRA's factors go in as they are, its scale
        as addmm's alpha; several are stacked along the rank, each up scaled in fp32 first. A
        weight that holds W0 now is its own W0 (bit for bit), so no saved copy moves to the device."""
        param = self._weight(key)
        if key not in self.originals:
            self.originals[key] = _host_copy(param.detach())
        target = param.data.view(param.shape[0], -1)
        original = target  # a weight not merged now holds W0 bit for bit: nothing to copy to the device
        if key in self.merged:
            original = self.originals[key].to(param.device, non_blocking=True).view_as(target)
        self.merged.add(key)  # before writing: a cancel half-way still gets this weight restored
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

    def _restore(self, key: tuple[str, str]) -> None:
        self._weight(key).data.copy_(self.originals[key])
        self.merged.discard(key)

    def _evict(self, keep: set[str]) -> None:
        """Drop the least recently used parsed LoRAs, never an active one, until within budget."""
        total = sum(p.nbytes for p in self.warm.values())
        for key in [k for k in self.warm if k not in keep]:
            if total <= self.warm_max_bytes:
                break
            total -= self.warm.pop(key).nbytes

    def _load_error(self, name: str, exc: Exception) -> Exception:
        """A LoRA that does not fit this model is the user's to fix; anything else is what it is."""
        if isinstance(exc, torch.OutOfMemoryError):
            return LoraLoadError(f"out of memory while loading LoRA {name}: try one LoRA, or a smaller one")
        detail = str(exc).strip().splitlines()
        if isinstance(exc, ValueError) or "size mismatch" in str(exc):
            return InputError(
                f"LoRA {name} does not fit {self.model_id} (an SDXL-family model): it was probably made "
                f"for another base model such as SD 1.5 or Flux. Loader said: {' '.join(detail)[:300]}"
            )
        return LoraLoadError(f"LoRA {name} could not be loaded: {type(exc).__name__}: {' '.join(detail)[:300]}")

    def rewrite(self, prompt: str) -> str:
        """Swap pivotal trigger words (TOK, <s0><s1>) for the active LoRA's own tokens."""
        for text, tokens in self.triggers:
            if text.isalnum():
                prompt = re.sub(rf"\b{re.escape(text)}\b", tokens, prompt)
            else:
                prompt = prompt.replace(text, tokens)
        return prompt

    def _load_tokens(self, lora: LocalLora, embeddings: dict[str, torch.Tensor]) -> None:
        """Pivotal-tuning embeddings, under tokens unique to this LoRA; a failure half-way removes them."""
        if "text_encoders_0" not in embeddings or "text_encoders_1" not in embeddings:
            raise InputError(f"LoRA {lora.name} has embeddings without text_encoders_0 / text_encoders_1: not SDXL's")
        name = adapter_name(lora.key)
        tokens = [f"<{name}_{i}>" for i in range(embeddings["text_encoders_0"].shape[0])]
        self.tokens[name] = tokens  # recorded first, so a failure half-way is undone below
        done = False
        try:
            for key, (encoder, tokenizer) in zip(("text_encoders_0", "text_encoders_1"), self._encoders(), strict=True):
                try:
                    self.pipe.load_textual_inversion(
                        embeddings[key], token=tokens, text_encoder=encoder, tokenizer=tokenizer
                    )
                except ValueError as exc:
                    raise InputError(f"LoRA {lora.name} has embeddings that do not fit {self.model_id}: {exc}") from exc
            done = True
        finally:
            if not done:
                self._unload_tokens(name)

    def _encoders(self) -> tuple[tuple[torch.nn.Module, object], ...]:
        return (
            (self.pipe.text_encoder, self.pipe.tokenizer),
            (self.pipe.text_encoder_2, self.pipe.tokenizer_2),
        )

    def _unload_tokens(self, name: str) -> None:
        """Remove this LoRA's trained tokens from every tokenizer that holds them."""
        tokens = self.tokens.pop(name, None)
        if not tokens:
            return
        for encoder, tokenizer in self._encoders():
            present = [t for t in tokens if t in tokenizer.get_vocab()]
            if present:
                self.pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)
