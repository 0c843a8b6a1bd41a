"""A ComfyUI image's settings, read from the graph it carries.

ComfyUI saves no A1111 `parameters` text: its PNGs hold the graph that made them, the API-format
`prompt` chunk (`{"<node id>": {"class_type": ..., "inputs": {...}}}`, a link to another node's
output written `[node id, output index]`). A stock txt2img or img2img graph (one KSampler or
KSamplerAdvanced, its text-encode nodes, EmptyLatentImage or VAEEncode, the checkpoint loader,
LoraLoader / LoraLoaderModelOnly, CLIPSetLastLayer) is written here as the A1111-style text those
settings make, so it goes through `engine.infotext` exactly as pasted text does. Any other graph
(several sampler nodes, a custom sampler, a node in a link this reading does not know) is refused
by node, saying what to send instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import PurePosixPath
from typing import Any

from engine.errors import InputError
from engine.metadata import number, quote

log = logging.getLogger(__name__)

SAMPLERS = ("KSampler", "KSamplerAdvanced")
TEXT_ENCODERS = ("CLIPTextEncode", "CLIPTextEncodeSDXL")
CHECKPOINT_LOADERS = ("CheckpointLoaderSimple", "CheckpointLoader")
MODEL_LORAS = ("LoraLoader", "LoraLoaderModelOnly")
INSTEAD = (
    "write the image's settings as generation_data text instead (the prompt, a 'Negative prompt: ...' line, "
    "then 'Steps: 30, Sampler: dpmpp_2m, Schedule type: karras, CFG scale: 7, Seed: 5, Size: 1024x1024')"
)

Graph = dict[str, Any]


def read_comfy_prompt(chunk: str, input_name: str) -> str:
    """The A1111-style text of a ComfyUI `prompt` chunk (its JSON text), or a refusal."""
    try:
        graph = json.loads(chunk)
    except ValueError:
        graph = None
    if not isinstance(graph, dict):
        raise InputError(f"{input_name}'s ComfyUI graph (its 'prompt' text) is not readable JSON: {INSTEAD}")
    return infotext_from_comfy_prompt(graph)


def infotext_from_comfy_prompt(graph: Graph) -> str:
    """The A1111-style generation data of a stock ComfyUI txt2img / img2img API-format graph."""
    nodes = {str(key): node for key, node in graph.items() if isinstance(node, dict) and "class_type" in node}
    samplers = sorted((key for key, node in nodes.items() if _is_sampler(node)), key=_order)
    if not samplers:
        raise InputError(f"the ComfyUI graph has no KSampler node, so no settings to read: {INSTEAD}")
    if len(samplers) > 1:
        named = ", ".join(_name(nodes, key) for key in samplers)
        raise InputError(
            f"the ComfyUI graph samples more than once ({named}: a hires-fix, refiner or detailer graph), which "
            f"one set of settings cannot hold: {INSTEAD}"
        )
    key = samplers[0]
    sampler = nodes[key]
    if sampler["class_type"] not in SAMPLERS:
        raise InputError(
            f"the ComfyUI graph samples with {_name(nodes, key)}, a sampler node other than KSampler or "
            f"KSamplerAdvanced, whose settings are not read: {INSTEAD}"
        )
    return _Reader(nodes).read(key)


def _is_sampler(node: dict[str, Any]) -> bool:
    """A node that samples a latent: the stock samplers, SamplerCustom*, and custom nodes that take
    a `latent_image` as they do."""
    inputs = node.get("inputs")
    return node["class_type"] in SAMPLERS or (isinstance(inputs, dict) and "latent_image" in inputs)


def _order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 62, key)


def _name(nodes: dict[str, Any], key: str) -> str:
    node = nodes.get(key)
    return f"node {key} ({node['class_type']})" if node else f"node {key} (missing from the graph)"


class _Reader:
    """Follows one sampler's links back through the graph, naming each node it read."""

    def __init__(self, nodes: dict[str, Any]) -> None:
        self.nodes = nodes
        self.read_nodes: list[str] = []
        self.notes: list[str] = []

    def read(self, key: str) -> str:
        sampler = self.node(key)
        advanced = sampler["class_type"] == "KSamplerAdvanced"
        steps = self.value(key, "steps", int)
        if advanced:
            self.check_whole_run(key, steps)
        fields: list[tuple[str, object]] = [
            ("Steps", steps),
            ("Sampler", self.value(key, "sampler_name", str)),
            ("Schedule type", self.value(key, "scheduler", str)),
            ("CFG scale", number(self.value(key, "cfg", float))),
            ("Seed", self.value(key, "noise_seed" if advanced else "seed", int)),
        ]
        fields += self.latent(key, 1.0 if advanced else self.value(key, "denoise", float))
        loras, checkpoint = self.model_chain(key)
        if checkpoint is not None:
            fields.append(("Model", checkpoint))
        prompt, skip = self.conditioning(key, "positive")
        negative, _ = self.conditioning(key, "negative")
        if skip is not None:
            fields.append(("Clip skip", skip))
        log.info("generation_data_image: ComfyUI graph read from %s", ", ".join(dict.fromkeys(self.read_nodes)))
        if self.notes:
            log.info("generation_data_image: ComfyUI graph: not reproduced here: %s", "; ".join(self.notes))
        tags = "".join(f"<lora:{name}:{number(strength)}>" for name, strength in loras)
        lines = [f"{prompt}{', ' if prompt and tags else ''}{tags}"]
        if negative:
            lines.append(f"Negative prompt: {negative}")
        lines.append(", ".join(f"{field}: {quote(value)}" for field, value in fields))
        return "\n".join(lines)

    def node(self, key: str) -> dict[str, Any]:
        self.read_nodes.append(_name(self.nodes, key))
        return self.nodes[key]

    def inputs(self, key: str) -> dict[str, Any]:
        inputs = self.nodes[key].get("inputs")
        return inputs if isinstance(inputs, dict) else {}

    def link(self, key: str, name: str) -> tuple[str, int]:
        """The node (and its output) that `name` of node `key` comes from."""
        value = self.inputs(key).get(name)
        if not _is_link(value) or str(value[0]) not in self.nodes:
            raise InputError(f"{_name(self.nodes, key)} of the ComfyUI graph has no linked '{name}' input: {INSTEAD}")
        return str(value[0]), int(value[1])

    def value(self, key: str, name: str, kind: type) -> Any:
        """A setting of node `key`: its literal value, or that of the plain value node it links to."""
        value = self.inputs(key).get(name)
        if _is_link(value) and str(value[0]) in self.nodes:
            source = str(value[0])
            literals = [v for v in self.inputs(source).values() if not _is_link(v)]
            links = [v for v in self.inputs(source).values() if _is_link(v)]
            if links or len(literals) != 1 or not _fits(literals[0], kind):
                raise InputError(
                    f"the '{name}' of {_name(self.nodes, key)} comes from {_name(self.nodes, source)}, which is not a "
                    f"plain {kind.__name__} value node, so its value is not known from the graph: {INSTEAD}"
                )
            self.node(source)
            value = literals[0]
        if not _fits(value, kind):
            raise InputError(
                f"{_name(self.nodes, key)} of the ComfyUI graph has no {kind.__name__} '{name}': {INSTEAD}"
            )
        return kind(value)

    def check_whole_run(self, key: str, steps: int) -> None:
        """A KSamplerAdvanced that adds the noise and runs every step is a KSampler."""
        start, end = self.value(key, "start_at_step", int), self.value(key, "end_at_step", int)
        if self.value(key, "add_noise", str) != "enable" or start > 0 or end < steps:
            raise InputError(
                f"{_name(self.nodes, key)} of the ComfyUI graph runs part of a sampling (add_noise "
                f"{self.inputs(key).get('add_noise')}, steps {start} to {min(end, steps)} of {steps}), which "
                f"this model does not: {INSTEAD}"
            )

    def latent(self, key: str, denoise: float) -> list[tuple[str, object]]:
        """Size from an EmptyLatentImage (txt2img); Denoising strength for a VAEEncode (img2img)."""
        source, _ = self.link(key, "latent_image")
        kind = self.node(source)["class_type"]
        if kind == "EmptyLatentImage":
            if denoise != 1:
                self.notes.append(f"denoise {number(denoise)} on an empty latent")
            batch = self.inputs(source).get("batch_size", 1)
            if batch != 1:
                self.notes.append(f"batch_size {batch} (one image is made from the seed)")
            return [("Size", f"{self.value(source, 'width', int)}x{self.value(source, 'height', int)}")]
        if kind == "VAEEncode":
            return [("Denoising strength", number(denoise))]
        raise InputError(
            f"the latent of the ComfyUI graph's sampler comes from {_name(self.nodes, source)}, not an "
            f"EmptyLatentImage or VAEEncode node, which this reading does not follow: {INSTEAD}"
        )

    def model_chain(self, key: str) -> tuple[list[tuple[str, float]], str | None]:
        """The LoRAs between the sampler and the checkpoint (nearest the checkpoint first), and the
        checkpoint's name as A1111 writes it (the file's name without folder or extension)."""
        loras: list[tuple[str, float]] = []
        source, _ = self.link(key, "model")
        while self.nodes[source]["class_type"] in MODEL_LORAS and len(loras) < len(self.nodes):
            self.node(source)
            strength = self.value(source, "strength_model", float)
            loras.append((_file_stem(self.value(source, "lora_name", str)), strength))
            if self.inputs(source).get("strength_clip", strength) != strength:
                self.notes.append(
                    f"strength_clip {self.inputs(source)['strength_clip']} of {_name(self.nodes, source)}"
                )
            source, _ = self.link(source, "model")
        if self.node(source)["class_type"] not in CHECKPOINT_LOADERS:
            raise InputError(
                f"the model of the ComfyUI graph's sampler comes from {_name(self.nodes, source)}, not a checkpoint "
                f"loader or LoraLoader, which this reading does not follow: {INSTEAD}"
            )
        return loras[::-1], _file_stem(self.value(source, "ckpt_name", str))

    def conditioning(self, key: str, name: str) -> tuple[str, int | None]:
        """The text of the sampler's `positive` or `negative` text-encode node, and A1111's Clip
        skip of its CLIPSetLastLayer (ComfyUI's -2 is A1111's 2)."""
        source, _ = self.link(key, name)
        kind = self.node(source)["class_type"]
        if kind not in TEXT_ENCODERS:
            raise InputError(
                f"the {name} conditioning of the ComfyUI graph's sampler comes from {_name(self.nodes, source)}, not "
                f"a CLIPTextEncode node, which this reading does not follow: {INSTEAD}"
            )
        if kind == "CLIPTextEncode":
            text = self.value(source, "text", str)
        else:
            text, text_l = self.value(source, "text_g", str), self.value(source, "text_l", str)
            if text_l and text_l != text:
                text = text or text_l
                self.notes.append(f"text_l of {_name(self.nodes, source)} (one prompt feeds both encoders here)")
        return text, self.clip_skip(source)

    def clip_skip(self, key: str) -> int | None:
        source, _ = self.link(key, "clip")
        for _ in self.nodes:  # LoraLoaders in the CLIP's chain (a cycle ends at the graph's size)
            if self.nodes[source]["class_type"] != "LoraLoader":
                break
            source, _ = self.link(source, "clip")
        if self.nodes[source]["class_type"] == "CLIPSetLastLayer":
            self.node(source)
            layer = self.value(source, "stop_at_clip_layer", int)
            if layer == -1:
                # ComfyUI's -1 is SDXL's last layer; A1111's Clip skip 1 (SDXL's penultimate) is used.
                self.notes.append(f"stop_at_clip_layer -1 of {_name(self.nodes, source)} (the penultimate is used)")
            return -layer
        if self.nodes[source]["class_type"] not in CHECKPOINT_LOADERS:
            raise InputError(
                f"the CLIP of {_name(self.nodes, key)} comes from {_name(self.nodes, source)}, not a checkpoint "
                f"loader, LoraLoader or CLIPSetLastLayer, which this reading does not follow: {INSTEAD}"
            )
        return None


def _is_link(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _fits(value: object, kind: type) -> bool:
    if kind is str:
        return isinstance(value, str)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value))


def _file_stem(name: str) -> str:
    """A file's name as A1111 calls it: no folder, no extension, no character that ends a tag."""
    stem = PurePosixPath(name.replace("\\", "/")).name
    for ext in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        stem = stem.removesuffix(ext)
    return stem.translate(str.maketrans("", "", ":<>"))
