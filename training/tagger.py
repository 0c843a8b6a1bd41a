"""Autocaption in Danbooru tags for models prompted in tags (Illustrious-XL), with a WD tagger.

SmilingWolf's wd-vit-tagger-v3 (ONNX, baked into weights/tagger with its selected_tags.csv) runs
on onnxruntime's CPU provider, so it never competes with training for GPU memory. The image is
flattened onto white, padded to a white square, resized to the model's input size, and given as
BGR 0-255 floats in NHWC, as the model's authors feed it. Character tags above
TAGGER_CHARACTER_THRESHOLD come first, then general tags above TAGGER_GENERAL_THRESHOLD by
confidence; rating tags are left out. Underscores become spaces, as Illustrious prompts write them,
except in emoticon tags such as `^_^`, where they are part of the tag.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.config import TAGGER_CHARACTER_THRESHOLD, TAGGER_DIR, TAGGER_GENERAL_THRESHOLD

log = logging.getLogger(__name__)

_GENERAL, _CHARACTER = 0, 4  # selected_tags.csv categories; 9 = rating
_MODEL, _TAGS = "model.onnx", "selected_tags.csv"


@dataclass(frozen=True)
class _Tag:
    name: str
    category: int


# Emoticon tags of the v3 taggers' vocabulary, whose `_` is part of the face (the list the
# taggers' demo Space keeps).
_KAOMOJI = frozenset(
    [
        "0_0",
        "(o)_(o)",
        "+_+",
        "+_-",
        "._.",
        "<o>_<o>",
        "<|>_<|>",
        "=_=",
        ">_<",
        "3_3",
        "6_9",
        ">_o",
        "@_@",
        "^_^",
        "o_o",
        "u_u",
        "x_x",
        "|_|",
        "||_||",
    ]
)


def _written(name: str) -> str:
    """Danbooru's `long_hair` as prompts write it. Brackets stay as they are: training reads a
    caption as plain text, which is what an escaped `\\(` in a prompt turns into."""
    return name if name in _KAOMOJI else name.replace("_", " ")


def is_baked(weights: Path) -> bool:
    return (weights / TAGGER_DIR / _MODEL).is_file() and (weights / TAGGER_DIR / _TAGS).is_file()


def _square(image: Image.Image, side: int) -> np.ndarray:
    rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    edge = max(flat.size)
    padded = Image.new("RGB", (edge, edge), (255, 255, 255))
    padded.paste(flat.convert("RGB"), ((edge - flat.width) // 2, (edge - flat.height) // 2))
    resized = padded.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32)[:, :, ::-1]  # BGR


def tag_captions(weights: Path, images: list[Image.Image]) -> list[str]:
    """One comma-separated tag caption per image."""
    import onnxruntime

    folder = weights / TAGGER_DIR
    start = time.perf_counter()
    with open(folder / _TAGS, newline="", encoding="utf-8") as f:
        tags = [_Tag(row["name"], int(row["category"])) for row in csv.DictReader(f)]
    session = onnxruntime.InferenceSession(str(folder / _MODEL), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    side = int(feed.shape[1])
    captions = []
    for image in images:
        (probs,) = session.run(None, {feed.name: _square(image, side)[None]})[0]
        found = [(p, t) for p, t in zip(probs.tolist(), tags, strict=True) if t.category in (_GENERAL, _CHARACTER)]
        chosen = [
            (p, t)
            for p, t in found
            if p >= (TAGGER_CHARACTER_THRESHOLD if t.category == _CHARACTER else TAGGER_GENERAL_THRESHOLD)
        ]
        chosen.sort(key=lambda pt: (pt[1].category != _CHARACTER, -pt[0]))
        captions.append(", ".join(_written(t.name) for _, t in chosen))
    log.info("autocaption (WD tagger): %d caption(s) in %.1fs", len(captions), time.perf_counter() - start)
    return captions
