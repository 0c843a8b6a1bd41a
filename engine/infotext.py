"""Generation data: the `parameters` text A1111, Forge and CivitAI show under an image, read back
into a request (the `generation_data` input).

The text is the prompt, a `Negative prompt:` line, then one line of `Key: value` pairs, a value
JSON-quoted when it holds a comma or colon (A1111's `infotext_utils.parse_generation_parameters`
reads it the same way; CivitAI's `Civitai resources` and Forge's `Hashes` JSON values are read
whole). `<lora:NAME:weight>` tags leave the prompt as A1111 removes them and name LoRAs, found
through the text's own `Lora` field (this project's outputs), `Civitai resources` (exact CivitAI
version ids), or `Lora hashes` / `Hashes` (CivitAI's by-hash API), in that order; embeddings the
same way through `Embeddings`, `TI hashes` or `Civitai resources`.

Cog fills every input's default before predict runs, so the text replaces only inputs still at
their default; one sent with another value wins. Every field not used is logged in one line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import quote

from engine.config import (
    CHECKPOINT_HASHES,
    CHECKPOINT_NAMES,
    CUSTOM_ASPECT,
    GENERATION_DATA_MAX_LORAS,
    MAX_CFG_SCALE,
    MAX_STEPS,
    REFERENCE_RESOLUTION,
    UPSCALE_FACTORS,
)
from engine.errors import InputError
from engine.metadata import A1111_CLIP_SKIP_OFFSET, BY_HASH, a1111_name
from engine.request import GenerationRequest, LoraSpec
from engine.schedulers import from_a1111

log = logging.getLogger(__name__)

# This project's go_fast keys: a text without them was made without go_fast (or by A1111).
GO_FAST_KEYS = ("CFG cutoff", "Deep cache")

_KEY = re.compile(r"\s*(\w[\w \-/]+):\s*")
_PLAIN_VALUE = re.compile(r"[^,]*")
_AFTER_VALUE = re.compile(r"\s*(?:,|$)")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
# A1111's extra-network tags: <lora:NAME:0.8>, <lyco:NAME>, <hypernet:NAME:1> ...
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_TAGS = ("lora", "lyco")
# This project's `Lora` field: "name: scale, name: scale" (a name may hold colons and commas).
_OWN_LORA = re.compile(r"(.+?): ([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)(?:, |$)")


@dataclass(frozen=True)
class LoraTag:
    """A `<lora:NAME:weight>` tag as the prompt held it."""

    name: str
    weight: float

    def __str__(self) -> str:
        return f"<lora:{self.name}:{self.weight:g}>"


@dataclass(frozen=True)
class Infotext:
    """One generation-data text, read: the prompts without extra-network tags, and every field."""

    prompt: str
    negative_prompt: str
    fields: dict[str, Any]  # key -> the value's text, or the JSON value for JSON values
    loras: tuple[LoraTag, ...] = ()
    other_tags: tuple[str, ...] = ()  # extra-network tags of other kinds (hypernet ...), removed too


class ModelFacts(Protocol):
    """What the text is matched against for each baked model."""

    native_resolution: int
    model_hash: str | None


def parse_infotext(text: str) -> Infotext:
    """Read generation data as A1111 reads it: the last line is the fields when it holds at least
    three; lines from `Negative prompt:` on are the negative prompt."""
    *lines, last = text.strip().replace("\r\n", "\n").split("\n")
    fields = _fields(last)
    if len(fields) < 3:
        lines.append(last)
        fields = {}
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    positive = "\n".join(prompt)
    loras: list[LoraTag] = []
    others: list[str] = []
    for kind, args in _EXTRA_NETWORK.findall(positive):
        if kind.lower() in _LORA_TAGS:
            loras.append(_lora_tag(args))
        else:
            others.append(f"<{kind}:{args}>")
    return Infotext(_EXTRA_NETWORK.sub("", positive), "\n".join(negative), fields, tuple(loras), tuple(others))


def _lora_tag(args: str) -> LoraTag:
    parts = args.split(":")
    name = parts[0].strip()
    if len(parts) < 2 or not parts[1].strip():
        return LoraTag(name, 1.0)
    try:
        return LoraTag(name, float(parts[1]))
    except ValueError:
        raise InputError(
            f"<lora:{args}> in generation_data has no readable weight: write it as <lora:NAME:0.8>"
        ) from None


def _fields(line: str) -> dict[str, Any]:
    """The `Key: value, ...` pairs of a line; JSON values (quoted strings, lists, objects) are read
    whole, others end at the next comma."""
    fields: dict[str, Any] = {}
    pos = 0
    decoder = json.JSONDecoder()
    while pos < len(line):
        key = _KEY.match(line, pos)
        if key is None:
            break
        pos = key.end()
        value: Any = None
        if line[pos : pos + 1] in ('"', "[", "{"):
            try:
                value, end = decoder.raw_decode(line, pos)
            except ValueError:
                value = None
            else:
                after = _AFTER_VALUE.match(line, end)
                if after is None:
                    value = None
                else:
                    pos = after.end()
        if value is None:
            plain = _PLAIN_VALUE.match(line, pos)
            assert plain is not None  # [^,]* matches everywhere
            value = plain.group(0).strip()
            pos = plain.end() + 1
        fields[key.group(1).strip()] = value
    return fields


def _pairs(value: Any) -> dict[str, str]:
    """`"name: hash, name: hash"` (A1111 removes colons and commas from the names)."""
    pairs = {}
    for item in str(value or "").split(","):
        name, sep, digest = item.partition(":")
        if sep and name.strip() and digest.strip():
            pairs[name.strip()] = digest.strip()
    return pairs


class _Reading:
    """Applies one text to one request, keeping count of the fields it used."""

    def __init__(self, info: Infotext, defaulted: frozenset[str]) -> None:
        self.info = info
        self.fields = info.fields
        self.defaulted = defaulted
        self.used: set[str] = set()
        self.notes: list[str] = []  # why a present field was not used, for the log line

    def wanted(self, key: str, *inputs: str) -> Any:
        """The field's value when the text has it and every input it would set is at its default."""
        if key not in self.fields:
            return None
        if not all(name in self.defaulted for name in inputs):
            self.notes.append(f"{key} (the {inputs[0]} input was sent)")
            self.used.add(key)
            return None
        self.used.add(key)
        return self.fields[key]

    def number(self, key: str, value: Any, kind: type = float) -> Any:
        try:
            return kind(str(value).strip())
        except ValueError:
            raise InputError(
                f"generation_data has {key}: {value}, which is not a number: correct or remove it"
            ) from None

    def unused(self) -> list[str]:
        left = [key for key in self.fields if key not in self.used]
        return [*self.notes, *left, *(f"tag {tag}" for tag in self.info.other_tags)]


def one_generation_data(pasted: str | None, from_image: str | None) -> str | None:
    """The request's generation data: the pasted text (generation_data) or the text read from
    generation_data_image. Both only when they are the same text (line endings and the blank
    around it aside); anything else is refused, as neither can be said to win."""
    if from_image is None:
        return pasted
    if pasted and _plain(pasted) != _plain(from_image):
        raise InputError(
            "generation_data and generation_data_image were both sent and hold different generation data: "
            "send one of them (the image's own parameters come from generation_data_image alone)"
        )
    return from_image


def _plain(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def apply_generation_data(
    request: GenerationRequest, text: str, defaulted: frozenset[str], models: Mapping[str, ModelFacts]
) -> GenerationRequest:
    """The request with what the text holds in place of every input left at its default.

    `defaulted` names the Cog inputs that arrived at their declared default (predict.py). The
    prompt is the text's unless a non-blank prompt was sent. Text from A1111, Forge or CivitAI
    means A1111's sampling, so go_fast is turned off unless the text holds this project's go_fast
    fields. LoRAs of the text come before those of lora_weights / extra_lora.
    """
    info = parse_infotext(text)
    if not info.fields and not info.prompt.strip():
        raise InputError(
            "generation_data holds neither a prompt nor a 'Steps: ..., Sampler: ...' line: paste the whole "
            "generation data A1111, Forge or CivitAI shows for the image"
        )
    reading = _Reading(info, defaulted)
    changes: dict[str, Any] = {}
    if not request.prompt.strip():
        changes["prompt"] = info.prompt
    elif info.prompt.strip():
        reading.notes.append("the prompt (the prompt input was sent)")
    if info.negative_prompt and "negative_prompt" in defaulted:
        changes["negative_prompt"] = info.negative_prompt
    elif info.negative_prompt:
        reading.notes.append("Negative prompt (the negative_prompt input was sent)")

    model = _model(reading, request, models)
    if model != request.model:
        changes["model"] = model
    if (steps := reading.wanted("Steps", "num_inference_steps")) is not None:
        changes["num_inference_steps"] = reading.number("Steps", steps, int)
        if not 1 <= changes["num_inference_steps"] <= MAX_STEPS:
            raise InputError(
                f"generation_data asks for {steps} steps; this model runs 1 to {MAX_STEPS}: "
                "send num_inference_steps to choose another count"
            )
    _sampler(reading, changes)
    if (cfg := reading.wanted("CFG scale", "cfg_scale", "guidance")) is not None:
        changes["cfg_scale"] = reading.number("CFG scale", cfg)
        if not 0 <= changes["cfg_scale"] <= MAX_CFG_SCALE:
            raise InputError(
                f"generation_data has CFG scale {cfg}; cfg_scale takes 0 to {MAX_CFG_SCALE:g}: send cfg_scale"
            )
    if (seed := reading.wanted("Seed", "seed")) is not None:
        changes["seed"] = reading.number("Seed", seed, int)
    _size(reading, changes, models[model].native_resolution if model in models else REFERENCE_RESOLUTION)
    if (skip := reading.wanted("Clip skip", "clip_skip")) is not None:
        # A1111 counts from the last layer (1) and treats 1 and 2 alike on SDXL (the penultimate).
        changes["clip_skip"] = max(reading.number("Clip skip", skip, int) - A1111_CLIP_SKIP_OFFSET, 0)
    _denoising(reading, request, changes)
    if "go_fast" in defaulted:
        reading.used.update(key for key in GO_FAST_KEYS if key in info.fields)
        changes["go_fast"] = any(key in info.fields for key in GO_FAST_KEYS)
    _upscale(reading, changes)
    loras = _loras(reading, sent=bool(request.loras))
    if loras:
        changes["loras"] = (*loras, *request.loras)
    embeddings = _embeddings(reading)
    if embeddings:
        changes["embeddings"] = (*embeddings, *request.embeddings)
    unused = reading.unused()
    if unused:
        log.info("generation_data: not used: %s", "; ".join(unused))
    return replace(request, **changes)


def _model(reading: _Reading, request: GenerationRequest, models: Mapping[str, ModelFacts]) -> str:
    """A baked model the text names (this project's model id), or whose checkpoint it names: by
    hash when the text gives one (its baked file's, or a public file with its weights,
    CHECKPOINT_HASHES), else by that file's name (CHECKPOINT_NAMES). A hash outranks a name, as a
    renamed file keeps its hash; another checkpoint's name and hash are left unused."""
    name = str(reading.fields.get("Model", "")).strip()
    forge = reading.fields.get("Hashes")
    digest = str(reading.fields.get("Model hash") or (forge.get("model") if isinstance(forge, dict) else "") or "")
    digest = digest.strip().lower()
    by_hash = [
        m
        for m, facts in models.items()
        if digest and ((facts.model_hash or "").lower() == digest or digest in CHECKPOINT_HASHES.get(m, ()))
    ]
    by_name = [m for m in models if name.lower() in (n.lower() for n in CHECKPOINT_NAMES.get(m, ()))]
    found = name if name in models else (by_hash or ([] if digest else by_name) or [None])[0]
    if found is None:
        return request.model
    if not {"model", "use_standard_sdxl"} <= reading.defaulted:
        reading.notes.append("Model (the model input was sent)")
        reading.used.update(k for k in ("Model", "Model hash") if k in reading.fields)
        return request.model
    reading.used.update(k for k in ("Model", "Model hash") if k in reading.fields)
    if found != name and "Model hash" not in reading.fields:
        reading.used.add("Hashes")  # Forge's hash of the model named it
    return found


def _sampler(reading: _Reading, changes: dict[str, Any]) -> None:
    sampler = reading.wanted("Sampler", "scheduler")
    if sampler is None:
        return
    schedule = reading.fields.get("Schedule type")
    if schedule is not None:
        reading.used.add("Schedule type")
    ours = from_a1111(str(sampler), str(schedule) if schedule is not None else None)
    if ours is None:
        reading.notes.append(
            f"Sampler {sampler}{f' with schedule {schedule}' if schedule else ''} (no such scheduler here; "
            "the scheduler input's stands)"
        )
        return
    changes["scheduler"] = ours


def _size(reading: _Reading, changes: dict[str, Any], native: int) -> None:
    """`Size` is the image's size in pixels: a custom width and height at the model's own scale
    (the inputs' sizes are at SDXL's 1024 px; the same on real weights)."""
    size = reading.wanted("Size", "aspect_ratio", "width", "height")
    if size is None:
        return
    match = _SIZE.match(str(size).strip())
    if match is None:
        raise InputError(f"generation_data has Size: {size}; write it as WIDTHxHEIGHT, e.g. 832x1216")
    scale = REFERENCE_RESOLUTION / native
    changes.update(aspect_ratio=CUSTOM_ASPECT, width=round(int(match[1]) * scale), height=round(int(match[2]) * scale))


def _denoising(reading: _Reading, request: GenerationRequest, changes: dict[str, Any]) -> None:
    if "Denoising strength" not in reading.fields:
        return
    if request.image is None:
        reading.notes.append("Denoising strength (no image was sent)")
        reading.used.add("Denoising strength")
        return
    if (strength := reading.wanted("Denoising strength", "prompt_strength")) is not None:
        changes["prompt_strength"] = reading.number("Denoising strength", strength)
        if not 0 <= changes["prompt_strength"] <= 1:
            raise InputError(f"generation_data has Denoising strength {strength}; it must be between 0 and 1")


def _upscale(reading: _Reading, changes: dict[str, Any]) -> None:
    """This project's own upscale fields (A1111's postprocessing keys)."""
    factor = reading.wanted("Postprocess upscale by", "upscale")
    if factor is None:
        return
    choice = f"{str(factor).strip()}x"
    if choice not in UPSCALE_FACTORS:
        reading.used.discard("Postprocess upscale by")
        return
    changes["upscale"] = choice
    reading.used.add("Postprocess upscaler")


def _loras(reading: _Reading, sent: bool) -> tuple[LoraSpec, ...]:
    """The text's LoRAs: this project's `Lora` field, else CivitAI's exact version ids, else each
    `<lora:>` tag's hash looked up on CivitAI. A tag with none of them is refused by name, unless
    the request sent LoRAs of its own (`sent`): they stand for it then, and the tag is listed as
    not used (a ComfyUI image names its LoRAs by file name only, and cannot be edited)."""
    fields, tags = reading.fields, reading.info.loras
    if "Lora" in fields:
        specs = tuple(LoraSpec(name, float(scale)) for name, scale in _OWN_LORA.findall(str(fields["Lora"])))
        reading.used.update(k for k in ("Lora", "Lora hashes", "Hashes") if k in fields)
        for spec in specs:
            if spec.source.startswith("data:"):  # the output names it, but cannot hold its bytes
                raise InputError(
                    "generation_data names a LoRA that was sent as a data: URI, which the text cannot carry: "
                    "send it again as lora_weights and remove it from the text's Lora field"
                )
    elif versions := _civitai_resources(fields.get("Civitai resources")):
        specs = tuple(LoraSpec(f"civitai.com/api/download/models/{vid}", weight) for vid, weight in versions)
        reading.used.update(k for k in ("Civitai resources", "Lora hashes") if k in fields)
        if len(tags) != len(specs):
            reading.notes.append(
                f"{len(tags)} <lora:> tag(s) for {len(specs)} LoRA(s) in Civitai resources: the resources' were applied"
            )
    else:
        found = [(tag, _by_hash(reading, tag)) for tag in tags]
        for tag, spec in found:
            if spec is None and not sent:
                raise InputError(
                    f"generation_data's tag {tag} names a LoRA without a hash or CivitAI id in the text (no "
                    f"'Lora hashes' entry for {tag.name!r}): add it, or send the LoRA as lora_weights, which "
                    "then stands for the tags without one"
                )
        reading.notes.extend(f"tag {tag} (no hash; the LoRAs sent stand for it)" for tag, spec in found if spec is None)
        specs = tuple(spec for _, spec in found if spec is not None)
    if len(specs) > GENERATION_DATA_MAX_LORAS:
        raise InputError(
            f"generation_data names {len(specs)} LoRAs; at most {GENERATION_DATA_MAX_LORAS} are applied from one text: "
            "remove the <lora:> tags of those to leave out"
        )
    return specs


def _civitai_resources(
    resources: Any, kinds: tuple[str, ...] = ("lora", "lycoris", "locon")
) -> list[tuple[int, float]]:
    """(version id, weight) of each resource of these kinds in `Civitai resources`."""
    if not isinstance(resources, list):
        return []
    found = []
    for item in resources:
        if not isinstance(item, dict) or str(item.get("type", "")).lower() not in kinds:
            continue
        vid = item.get("modelVersionId")
        if isinstance(vid, int) or (isinstance(vid, str) and vid.isdigit()):
            weight = item.get("weight", 1.0)
            found.append((int(vid), float(weight) if isinstance(weight, (int, float)) else 1.0))
    return found


def _embeddings(reading: _Reading) -> tuple[str, ...]:
    """The text's embeddings: this project's `Embeddings` field (the strings sent), else `TI hashes`
    (A1111) / Forge's `Hashes` looked up on CivitAI and called by the text's names, else the
    `embed` entries of `Civitai resources`."""
    fields = reading.fields
    if "Embeddings" in fields:
        value = fields["Embeddings"]
        try:
            sources = value if isinstance(value, list) else json.loads(str(value))
        except ValueError:
            raise InputError("generation_data's Embeddings field is not the JSON list this model writes") from None
        reading.used.update(k for k in ("Embeddings", "TI hashes") if k in fields)
        if any(str(source).startswith("data:") for source in sources):
            raise InputError(
                "generation_data names an embedding that was sent as a data: URI, which the text cannot carry: "
                "send it again in embeddings and remove it from the text's Embeddings field"
            )
        return tuple(str(source) for source in sources)
    forge = fields.get("Hashes")
    named = {
        str(key)[len("embed:") :]: value
        for key, value in (forge.items() if isinstance(forge, dict) else ())
        if str(key).lower().startswith("embed:")
    }
    named.update(_pairs(fields.get("TI hashes")))
    found = []
    for name, digest in named.items():
        digest = str(digest).lower()
        if not re.fullmatch(r"[0-9a-f]{10,64}", digest):
            reading.notes.append(f"TI hashes entry {name} (not a hash)")
            continue
        # A1111's embedding hash is the file's sha256 from its start: its first 10 digits are AutoV2.
        found.append(f"{BY_HASH}{digest[:10]}#{quote(name)}")
        log.info("generation_data: embedding %s is the CivitAI file with hash %s", name, digest[:10])
    if found:
        reading.used.update(k for k in ("TI hashes", "Hashes") if k in fields)
        return tuple(found)
    versions = _civitai_resources(fields.get("Civitai resources"), ("embed", "textualinversion"))
    if versions:
        reading.used.add("Civitai resources")
    return tuple(f"civitai.com/api/download/models/{vid}" for vid, _ in versions)


def _by_hash(reading: _Reading, tag: LoraTag) -> LoraSpec | None:
    """A tag's LoRA through its hash in `Lora hashes` (A1111) or `Hashes` (Forge); None without one."""
    forge = reading.fields.get("Hashes")
    named = {
        str(key).lower().removeprefix("lora:"): value
        for key, value in (forge.items() if isinstance(forge, dict) else ())
        if str(key).lower().startswith("lora:")
    }
    # A1111's own hash (AutoV3) first; names as A1111 writes them (no colons or commas), any case.
    named.update({name.lower(): digest for name, digest in _pairs(reading.fields.get("Lora hashes")).items()})
    digest = named.get(a1111_name(tag.name).lower())
    if not digest or not re.fullmatch(r"[0-9a-fA-F]{8,64}", str(digest)):
        return None
    reading.used.update(k for k in ("Lora hashes", "Hashes") if k in reading.fields)
    digest = str(digest).lower()
    log.info("generation_data: %s is the CivitAI file with hash %s", tag, digest)
    return LoraSpec(f"{BY_HASH}{digest}#{quote(tag.name)}", tag.weight)
