"""Run predict.py's Predictor in-process, like `cog predict -i key=value`, without Docker.

Inputs left out take their schema defaults (calling predict() directly would pass cog's
FieldInfo objects instead). `-i image=@photo.png` passes a file as coglet hands an upload to
predict() (a cog Path); without `@` the value stays the string it is, as coglet leaves a
server path, which predict refuses. A list input takes one `-i` per item
(`-i ip_adapter_image=@a.png -i ip_adapter_image=@b.png`). Whoever runs this owns the machine:
LOCAL_FILES_DIR defaults to the current folder, so `-i lora_weights=./mine.safetensors` is read.
Outputs are copied into the output folder and their paths printed.

Usage: python scripts/run_predictor.py -i prompt="a cat" [-i seed=1 ...] [-o outputs]
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cog import Path as CogPath
from cog import Secret
from cog.input import FieldInfo

from engine.config import LOCAL_FILES_ENV
from predict import Predictor


def _coerce(values: list[str], annotation: Any) -> Any:
    """The -i values given for one input, as its annotation wants them."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    target = args[0] if args else annotation
    if typing.get_origin(target) is list:  # a list input: each -i of that name is one item
        [item] = typing.get_args(target)
        return [_coerce([value], item) for value in values]
    if len(values) != 1:
        raise SystemExit(f"one value expected, got {len(values)}: {', '.join(values)}")
    [raw] = values
    if target is bool:
        if raw.lower() not in ("true", "false"):
            raise SystemExit(f"expected true or false, got {raw!r}")
        return raw.lower() == "true"
    if target in (int, float):
        return target(raw)
    if target is CogPath:
        return CogPath(raw.removeprefix("@")) if raw.startswith("@") else raw
    if target is Secret:
        return Secret(raw)
    return raw


def predict_with_defaults(predictor: Predictor, inputs: dict[str, list[str]]) -> list[Path]:
    """Call predict() with every input filled: given values, else the Input() default."""
    signature = inspect.signature(Predictor.predict, eval_str=True)
    unknown = set(inputs) - set(signature.parameters)
    if unknown:
        raise SystemExit(f"unknown input(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, param in signature.parameters.items():
        if name == "self":
            continue
        if name in inputs:
            value = inputs[name]
            kwargs[name] = _coerce(value, param.annotation)
        elif isinstance(param.default, FieldInfo):
            kwargs[name] = param.default.default
    return predictor.predict(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", dest="inputs", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-o", dest="out", type=Path, default=Path("outputs"), help="folder for the outputs")
    args = parser.parse_args()
    os.environ.setdefault(LOCAL_FILES_ENV, os.getcwd())
    inputs: dict[str, list[str]] = {}
    for item in args.inputs:
        name, value = item.split("=", 1)
        inputs.setdefault(name, []).append(value)
    predictor = Predictor()
    predictor.setup()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in predict_with_defaults(predictor, inputs):
        target = args.out / Path(path).name
        shutil.copyfile(path, target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
