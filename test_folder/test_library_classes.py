"""The product changes no library class (issue 22): no statement in its code assigns or deletes an
attribute of a class or module of diffusers, transformers, peft or compel, or swaps an object's
class; and after setup and one request of every kind, each of their classes holds the same
attributes as before and each of their modules the same functions and classes.

A patch made once is kept for the life of the process, so the run is recorded in a process of its
own: it imports the library modules that this process's own run of the same requests imported
(diffusers and transformers import most of theirs lazily), records them, and only then imports
the engine, loads it and runs the requests. A patch that is put back before setup returns leaves
nothing to record: the reading of the code is what catches those.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from engine.generator import Engine
from engine.request import Credentials, GenerationRequest, LocalLora, LoraSpec

LIBRARIES = ("diffusers", "transformers", "peft", "compel")
# Caches that Python and transformers themselves add to a class on first use: not a patch.
CACHES = {
    "__slotnames__",  # copyreg, at an instance's first copy or pickle
    "_can_set_experts_implementation_cached_value",  # transformers' PreTrainedModel, at a model's first load
}
REPO_ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("engine", "weightstore", "training", "predict.py", "train.py", "weights.py", "utils.py")


def patches(source: str) -> list[str]:
    """The statements of `source` that assign or delete an attribute of something imported from a
    library or bound to `type(...)`, that call setattr/delattr on one, or that set any `__class__`."""
    tree = ast.parse(source)
    suspects: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            suspects |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in LIBRARIES}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
            suspects |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Assign) and _is_type_call(node.value):
            suspects |= {t.id for t in node.targets if isinstance(t, ast.Name)}

    def library_owned(target: ast.expr) -> bool:
        while isinstance(target, ast.Attribute):
            target = target.value
        return (isinstance(target, ast.Name) and target.id in suspects) or _is_type_call(target)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            targets = [node.args[0]] if node.args and library_owned(node.args[0]) else []
            found += [f"line {node.lineno}: {ast.unparse(node)}" for _ in targets]
            continue
        else:
            continue
        for target in (t for group in targets for t in (group.elts if isinstance(group, ast.Tuple) else [group])):
            if isinstance(target, ast.Attribute) and (target.attr == "__class__" or library_owned(target)):
                found.append(f"line {node.lineno}: {ast.unparse(target)}")
    return found


def _is_type_call(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type"


def test_no_product_code_assigns_a_library_attribute() -> None:
    files = [
        p for name in PRODUCT for p in ((REPO_ROOT / name).rglob("*.py") if "." not in name else [REPO_ROOT / name])
    ]
    assert len(files) > 40
    found = {str(f.relative_to(REPO_ROOT)): patches(f.read_text()) for f in files}
    assert {f: lines for f, lines in found.items() if lines} == {}


def test_the_reading_finds_the_patches_this_project_once_made() -> None:
    """The IP-Adapter load once set diffusers' class property, later swapped the UNet's class."""
    property_patch = (
        "from diffusers import UNet2DConditionModel\n"
        "cls = type(unet)\ncls.attn_processors = property(listing)\ndel cls.attn_processors\n"
    )
    class_swap = "class ListedOnce(cls):\n    pass\nunet.__class__ = ListedOnce\n"
    named = "import diffusers\nfrom diffusers import UNet2DConditionModel as U\nU.x = 1\ndiffusers.utils.f = g\n"
    assert patches(property_patch) == ["line 3: cls.attn_processors", "line 4: cls.attn_processors"]
    assert patches(class_swap) == ["line 3: unet.__class__"]
    assert patches(named) == ["line 3: U.x", "line 4: diffusers.utils.f"]
    assert patches("setattr(type(unet), 'x', 1)\nunet.config.x = None\nprocessor.to_v_ip = v\n") == [
        "line 1: setattr(type(unet), 'x', 1)"
    ]


def _library_modules() -> dict[str, Any]:
    return {name: m for name, m in list(sys.modules.items()) if m is not None and name.split(".")[0] in LIBRARIES}


def _record() -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Each library class's own attributes, and each library module's functions and classes."""
    classes: dict[str, dict[str, Any]] = {}
    functions: dict[str, dict[str, Any]] = {}
    for name, module in _library_modules().items():
        members = dict(vars(module))
        functions[name] = {k: v for k, v in members.items() if callable(v)}
        for value in members.values():
            if isinstance(value, type) and value.__module__ == name:
                classes[f"{name}.{value.__qualname__}"] = dict(vars(value))
    return classes, functions


def _changes(before: tuple[dict, dict], after: tuple[dict, dict]) -> list[str]:
    """What differs between two records, for the names the first one holds."""
    changed = []
    for kind, olds, news in zip(("class", "module"), before, after, strict=True):
        for owner, old in olds.items():
            new = news[owner]
            if kind == "class":
                changed += [f"{kind} {owner}: {key} added" for key in new.keys() - old.keys() - CACHES]
            changed += [f"{kind} {owner}: {key} removed" for key in old.keys() - new.keys()]
            changed += [
                f"{kind} {owner}: {key} replaced" for key in old.keys() & new.keys() if new[key] is not old[key]
            ]
    return sorted(changed)


class OneFile:
    """A LoRA source that hands out one file on disk for every name."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fetch_all(self, specs: Any, credentials: Credentials) -> list[LocalLora]:
        return [LocalLora(source, self.path, scale, source) for source, scale in specs]


def run_requests(engine: Engine) -> None:
    """A request of each kind that reaches into the libraries: A1111 and Compel prompts, a LoRA,
    another scheduler, inpaint with a reference image, ControlNet with the upscaler."""
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    base = GenerationRequest(prompt="a (red:1.2) cat", num_inference_steps=2, seed=1, megapixels="0.25")
    for req in (
        base,
        replace(base, prompt="a red++ cat", scheduler="DPM++ 2M SDE Karras", loras=(LoraSpec("a", 0.8),)),
        replace(base, image=image, mask=Image.new("L", (64, 64), 255), ip_adapter_images=(image,)),
        replace(base, image=image, control_image=image, control_type="canny", upscale="2x"),
    ):
        engine.generate(req)


def probe(weights: str, lora: str, modules: str) -> None:
    """In a process of its own: import the listed library modules, record them, load the engine,
    run the requests, and print what changed as JSON."""
    for name in json.loads(Path(modules).read_text()):
        importlib.import_module(name)
    before = _record()
    run_requests(Engine.load(Path(weights), lora_source=OneFile(Path(lora)), compile="off"))
    print(json.dumps(_changes(before, _record())))


def test_setup_and_requests_change_no_library_class(
    engine: Engine, weights_dir: Path, lora_files: dict[str, bytes], tmp_path: Path
) -> None:
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(lora_files["a"])
    with_lora = Engine(engine.models, engine.safety, OneFile(lora), engine.swap, engine.upscaler, engine.control)
    run_requests(with_lora)  # here first: this process then holds every module the run imports
    modules = tmp_path / "modules.json"
    modules.write_text(json.dumps(sorted(_library_modules())))
    arguments = ", ".join(repr(str(path)) for path in (weights_dir, lora, modules))
    call = f"from test_folder.test_library_classes import probe; probe({arguments})"
    done = subprocess.run([sys.executable, "-c", call], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
