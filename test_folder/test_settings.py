"""Settings live next to their readers: the engine's config names no LoRA-store or training
setting, each package reads environment variables in its own config module only, and every
variable the product reads is in docs/deploy.md's table (issue 22)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "weightstore", "training")
TOP_LEVEL = ("predict.py", "train.py", "weights.py", "utils.py", "scripts/bake.py")
# Where each package reads its environment variables.
CONFIG_MODULES = {"engine/config.py", "weightstore/config.py", "training/config.py"}
# Variables a library reads for itself, looked at where the code deals with that library.
LIBRARY_VARIABLES = {
    ("engine/allocator.py", "MALLOC_ARENA_MAX"),  # glibc's: setup caps the arenas only when it is unset
    ("engine/allocator.py", "MALLOC_MMAP_THRESHOLD_"),  # glibc's: setup fixes the threshold only when unset
    ("engine/allocator.py", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"),  # oneDNN's: setup bounds it only when unset
    ("engine/allocator.py", "LRU_CACHE_CAPACITY"),  # ideep's (torch's oneDNN wrapper): the same
    ("engine/devices.py", "PYTORCH_ENABLE_MPS_FALLBACK"),  # torch's: setup's log line shows it on MPS
    ("training/tracking.py", "WANDB_DIR"),  # wandb's: unset, each run writes into a folder of its own
}
# scripts/bake.py runs on the build host and reads its own (the checkpoint to bake, the tokens).
SCRIPT_READERS = {"scripts/bake.py"}
SETTING_NAME = re.compile(r"\b(?:LORA|TRAIN)_[A-Z0-9_]+")


def product_modules(root: Path) -> list[Path]:
    files = [path for package in PACKAGES for path in sorted((root / package).rglob("*.py"))]
    return files + [root / name for name in TOP_LEVEL]


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and getattr(node.value, "id", None) == "os"


def _read_key(node: ast.AST) -> ast.AST | None:
    """The key of `os.environ.get(k)`, `os.environ[k]` or `os.getenv(k)`, else None."""
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "get" and _is_environ(func.value):
            return node.args[0]
        if isinstance(func, ast.Attribute) and func.attr == "getenv" and getattr(func.value, "id", None) == "os":
            return node.args[0]
    if isinstance(node, ast.Subscript) and _is_environ(node.value):
        return node.slice
    return None


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _forwarders(trees: list[ast.Module]) -> dict[str, int]:
    """Functions that read the variable named by one of their parameters (`env_number(name, default)`):
    name -> that parameter's position."""
    found = {}
    for tree in trees:
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef):
                params = [a.arg for a in function.args.args]
                for node in ast.walk(function):
                    key = _read_key(node)
                    if isinstance(key, ast.Name) and key.id in params:
                        found[function.name] = params.index(key.id)
    return found


def env_reads(tree: ast.Module, forwarders: dict[str, int], where: str) -> set[str]:
    """The environment variables a module reads: keys written as literals or module constants, and
    the literals it passes to a forwarder (wherever that function is defined)."""
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    names: set[str] = set()
    unread: list[str] = []
    for node in ast.walk(tree):
        key = _read_key(node)
        if key is None and isinstance(node, ast.Call):
            called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if called in forwarders and len(node.args) > forwarders[called]:
                key = node.args[forwarders[called]]
        if key is None or (isinstance(key, ast.Name) and key.id in _params_around(tree, node)):
            continue
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
        elif isinstance(key, ast.Name) and key.id in constants:
            names.add(constants[key.id])
        else:
            unread.append(ast.unparse(node))
    assert not unread, f"{where}: environment reads this test cannot name: {unread}"
    uses = sum(1 for n in ast.walk(tree) if _is_environ(n) or getattr(n, "attr", None) == "getenv")
    assert uses == sum(1 for n in ast.walk(tree) if _read_key(n) is not None), (
        f"{where}: os.environ is used other than by .get(name) or [name]"
    )
    return names


def _params_around(tree: ast.Module, node: ast.AST) -> set[str]:
    """The parameters of the functions that hold `node` (a forwarder's own read is not a read)."""
    return {
        a.arg
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef) and any(child is node for child in ast.walk(function))
        for a in function.args.args
    }


def scan(root: Path) -> dict[str, set[str]]:
    """Module (relative path) -> the environment variables it reads."""
    trees = {str(path.relative_to(root)): _tree(path) for path in product_modules(root)}
    forwarders = _forwarders(list(trees.values()))
    return {name: env_reads(tree, forwarders, name) for name, tree in trees.items()}


def documented_variables(root: Path) -> set[str]:
    """The variables in the first column of docs/deploy.md's "Environment variables" table."""
    text = (root / "docs" / "deploy.md").read_text()
    assert "\n## Environment variables\n" in text, "docs/deploy.md has no '## Environment variables' section"
    section = text.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for cell in rows for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cell)}


def engine_mentions(root: Path) -> dict[str, list[str]]:
    found = {
        str(path.relative_to(root)): SETTING_NAME.findall(path.read_text()) for path in (root / "engine").rglob("*.py")
    }
    return {path: names for path, names in found.items() if names}


def misplaced_reads(root: Path) -> dict[str, set[str]]:
    """Variables read outside their package's config module (and the known library ones)."""
    misplaced = {}
    for name, reads in scan(root).items():
        if name in CONFIG_MODULES or name in SCRIPT_READERS:
            continue
        reads = {var for var in reads if (name, var) not in LIBRARY_VARIABLES}
        if reads:
            misplaced[name] = reads
    return misplaced


def test_the_engine_names_no_lora_store_or_training_setting() -> None:
    assert engine_mentions(REPO_ROOT) == {}, "LORA_/TRAIN_ settings belong to weightstore/ and training/"


def test_each_package_reads_the_environment_in_its_config_module_only() -> None:
    assert misplaced_reads(REPO_ROOT) == {}
    reads = scan(REPO_ROOT)
    for path, var in LIBRARY_VARIABLES:
        assert var in reads.get(path, set()), f"{path} no longer reads {var}: drop the exception"


def test_every_variable_the_product_reads_is_documented() -> None:
    read = set().union(*scan(REPO_ROOT).values())
    assert {"WEIGHTS_DIR", "LORA_CACHE_MAX_BYTES", "HF_ENDPOINT", "MALLOC_ARENA_MAX"} <= read, "the scan sees reads"
    assert read - documented_variables(REPO_ROOT) == set(), "add them to docs/deploy.md, 'Environment variables'"
