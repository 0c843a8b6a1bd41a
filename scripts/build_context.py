"""Assemble a clean `cog build` context outside the working tree, check it, and build from it.

`cog build --separate-weights` (replicate/cog pkg/weightslegacy at 6110c912) walks the whole
build folder and takes every folder holding a file of 10 MiB or more (not .py, images, .whl...)
as weights, without reading .dockerignore; BuildKit then applies .dockerignore to the COPY of that
folder, and the build fails. In the working tree, .venv/ (made by `make test`) and
weights/.staging/ (a bake in progress) are such folders. So the image is built from a folder
that holds only copies of the tracked files plus the baked weights/ (hard links), checked
first: nothing of 10 MiB or more outside weights/, every module predict.py and train.py import
present, nothing .dockerignore excludes.

Steps: bake (scripts/bake.py, idempotent) unless --no-bake; refuse weights that were not baked
(the tiny test weights) unless --allow-unbaked; assemble into --out; check; then
`COGLET_WHEEL=pypi:<the tested coglet> cog build --separate-weights -t TAG` there (cog strips
cog and coglet from requirements and would otherwise take the newest coglet its SDK allows),
or, without a `cog` CLI on PATH (or with --no-build), print that command and stop.

Usage: python scripts/build_context.py [--out DIR] [--tag IMAGE] [--no-bake] [--no-build]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = "weights"
WEIGHTS_SKIPPED = (".staging",)  # a bake's partial downloads and builds: never in an image
ENTRY_POINTS = ("predict.py", "train.py")
# pkg/weightslegacy/weights.go: sizeThreshold, prefixesToIgnore, suffixesToIgnore, isCodeFile.
SIZE_THRESHOLD = 10 * 1024 * 1024
MIN_COG_CLI = (0, 23, 1)
IGNORED_PREFIXES = (".cog", ".git", "__pycache__")
IGNORED_SUFFIXES = (
    *(".py", ".ipynb", ".whl"),
    *(".jpg", ".jpeg", ".png", ".webp", ".svg", ".gif", ".avif", ".heic"),
    *(".mp4", ".mov", ".avi", ".wmv", ".mkv", ".webm"),
    *(".mp3", ".wav", ".ogg", ".flac", ".aac", ".m4a"),
    ".log",
)


class ContextError(Exception):
    """The context cannot be built or would not build: the message says what to do."""


def tracked_files(repo: Path) -> list[str]:
    """Tracked paths (the index) that exist in the working tree."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], check=True, capture_output=True).stdout
    return sorted(p for p in out.decode().split("\0") if p and (repo / p).is_file())


def unbaked_models(weights: Path) -> list[str]:
    """Model folders without the record scripts/bake.py writes (e.g. the tiny test weights)."""
    manifest = json.loads((REPO_ROOT / "bake" / "manifest.json").read_text())
    return [m for m in manifest["models"] if not (weights / m / ".baked").is_file()]


def _place(source: Path, target: Path, link: bool) -> None:
    """Copy, or hard-link a weights file (nothing writes those; cog build rewrites .cog/ in place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, target)
            return
        except OSError:  # another file system: copy
            pass
    shutil.copy2(source, target)


def assemble(out: Path, weights: Path, repo: Path = REPO_ROOT) -> Path:
    """Fill `out` with the tracked files and weights/ (minus a bake's staging); returns `out`."""
    if out.resolve().is_relative_to(repo.resolve()):
        raise ContextError(f"{out} is inside the working tree: pick a folder outside {repo}")
    if out.exists() and any(out.iterdir()):
        if not (out / "cog.yaml").is_file():
            raise ContextError(f"{out} is not empty and is not an earlier build context: pick an empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for rel in tracked_files(repo):
        if rel.split("/", 1)[0] != WEIGHTS:
            _place(repo / rel, out / rel, link=False)
    for source in sorted(weights.rglob("*")):
        rel = source.relative_to(weights)
        if source.is_file() and rel.parts[0] not in WEIGHTS_SKIPPED and "__pycache__" not in rel.parts:
            _place(source, out / WEIGHTS / rel, link=True)
    return out


def _walk(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(root)).replace(os.sep, "/"), p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    )


def find_weights(files: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
    """pkg/weightslegacy FindWeights: the folders and root files `--separate-weights` puts in the weights layer."""
    code = [p for p, _ in files if p.endswith((".py", ".ipynb"))]
    large = [
        p
        for p, size in files
        if ".git" not in p.split("/")[:-1]
        and not p.endswith((".py", ".ipynb"))
        and size >= SIZE_THRESHOLD
        and not p.startswith(IGNORED_PREFIXES)
        and not p.endswith(IGNORED_SUFFIXES)
    ]
    large.sort(key=lambda p: (len(p.split("/")), p.split("/")))
    dirs: list[str] = []
    root_files: list[str] = []
    for path in large:
        folder = path.rsplit("/", 1)[0] if "/" in path else "."
        if folder == ".":
            root_files.append(path)
        elif not any((folder + "/").startswith(d + "/") for d in dirs):
            dirs.append(folder)
    # filterDirsContainingCode: a plain prefix test, so `weights` would be dropped because of weights.py.
    return [d for d in dirs if not any(c.startswith(d) for c in code)], root_files


def dockerignore_patterns(context: Path) -> list[str]:
    path = context / ".dockerignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    patterns = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if any(p.startswith("!") for p in patterns):
        raise ContextError(".dockerignore exceptions (!pattern) are not checked here: remove them")
    return [p.lstrip("/").rstrip("/") for p in patterns]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern excludes a path that it matches, or that lies under a folder it matches."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(_pattern_regex(p).match(c) for p in patterns for c in candidates)


def local_imports(context: Path, entry_points: tuple[str, ...] = ENTRY_POINTS) -> tuple[set[str], set[str]]:
    """Project modules reachable by imports (also inside functions) from the entry points: (found, missing).

    A module is the project's when its top-level name is a file or package in the working tree.
    `import a.b` and the `a.b` of `from a.b import c` must be modules; `a.b.c` may be a name in it.
    """
    local_roots = {p.stem for p in REPO_ROOT.glob("*.py")} | {
        p.name for p in REPO_ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()
    }
    found: set[str] = set()
    missing: set[str] = set()
    queue = [(Path(e).stem, True) for e in entry_points]
    while queue:
        module, required = queue.pop()
        if module in found or module in missing:
            continue
        path = _module_file(context, module)
        if path is None:
            if required:
                missing.add(module)
            continue
        found.add(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[tuple[str, bool]] = []
            if isinstance(node, ast.Import):
                names = [(alias.name, True) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                names = [(base, True)] + [(f"{base}.{alias.name}", False) for alias in node.names]
            for name, needed in names:
                parts = name.split(".")
                if parts[0] in local_roots:  # importing a.b.c imports a and a.b first
                    queue.extend((".".join(parts[: i + 1]), needed or i < len(parts) - 1) for i in range(len(parts)))
    return found, missing


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def check(context: Path) -> list[str]:
    """What would make `cog build --separate-weights` fail or ship the wrong files; empty when none."""
    problems = []
    files = _walk(context)
    for path, size in files:
        if size >= SIZE_THRESHOLD and path.split("/", 1)[0] != WEIGHTS:
            problems.append(f"{path} is {size / 2**20:.1f} MiB, outside weights/: cog would take its folder as weights")
    dirs, root_files = find_weights(files)
    for found in dirs + root_files:
        if found.split("/", 1)[0] != WEIGHTS:
            problems.append(f"--separate-weights would take {found} as weights")
    separated = [d + "/" for d in dirs]
    for path, size in files:
        in_weights = path.startswith(WEIGHTS + "/") and not path.endswith(IGNORED_SUFFIXES)
        if size >= SIZE_THRESHOLD and in_weights and not path.startswith(tuple(separated)):
            problems.append(f"{path} would not be in the weights layer (its folder holds code or sits at the root)")
    patterns = dockerignore_patterns(context)
    for path, _ in files:
        if _ignored(path, patterns):
            problems.append(f"{path} is in the context but .dockerignore excludes it")
    for entry in ENTRY_POINTS:
        if not (context / entry).is_file():
            problems.append(f"{entry} is missing")
    _, missing = local_imports(context)
    problems.extend(f"module {m} is imported by predict.py/train.py but not in the context" for m in sorted(missing))
    return problems


def pinned(name: str, requirements: Path = REPO_ROOT / "requirements-dev.txt") -> str:
    """The `name==VERSION` pin in a requirements file."""
    for line in requirements.read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.split("==", 1)[1].strip()
    raise ContextError(f"{requirements.name} does not pin {name}")


def cog_env() -> dict[str, str]:
    """cog installs coglet by cog's version range unless told: pin it to what the tests run."""
    return {"COGLET_WHEEL": f"pypi:{pinned('coglet')}"}


def check_cog_cli() -> None:
    """Refuse a cog CLI older than MIN_COG_CLI (docs/deploy.md says why); an unreadable version passes."""
    output = subprocess.run(["cog", "--version"], check=True, capture_output=True, text=True).stdout
    match = re.search(r"version v?(\d+)\.(\d+)\.(\d+)", output)
    if match is None:
        print(f"note: could not read the cog CLI's version from {output.strip()!r}; this build needs 0.23.1 or newer")
        return
    found = tuple(int(part) for part in match.groups())
    if found < MIN_COG_CLI:
        wanted = ".".join(map(str, MIN_COG_CLI))
        raise ContextError(
            f"cog CLI {'.'.join(map(str, found))} is too old: this build needs {wanted} or newer "
            "(CUDA 13 base images, `run:` in cog.yaml); upgrade it (docs/deploy.md)"
        )


def cog_command(tag: str) -> list[str]:
    return ["cog", "build", "--separate-weights", "-t", tag]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / f"{REPO_ROOT.name}-cog-context")
    parser.add_argument("--weights", type=Path, default=None, help="baked weights (default: $WEIGHTS_DIR or ./weights)")
    parser.add_argument("--tag", default=os.environ.get("IMAGE", f"{REPO_ROOT.name}:latest"), help="image name")
    parser.add_argument("--no-bake", action="store_true", help="do not run scripts/bake.py first")
    parser.add_argument("--no-build", action="store_true", help="assemble and check only; print the cog command")
    parser.add_argument("--allow-unbaked", action="store_true", help="accept weights not made by scripts/bake.py")
    args = parser.parse_args()
    weights = args.weights or Path(os.environ.get("WEIGHTS_DIR") or REPO_ROOT / WEIGHTS)
    try:
        env = cog_env()
        if not args.no_bake:
            bake_env = {**os.environ, "WEIGHTS_DIR": str(weights)}
            subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bake.py")], check=True, env=bake_env)
        unbaked = unbaked_models(weights)
        if unbaked and not args.allow_unbaked:
            raise ContextError(
                f"{weights} has no bake record for {', '.join(unbaked)}: run `python scripts/bake.py` "
                "(tiny test weights must never go into an image)"
            )
        changed = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        if changed:
            print(f"note: {len(changed)} tracked files differ from HEAD; the image gets them as they are now")
        context = assemble(args.out, weights)
        problems = check(context)
        if problems:
            raise ContextError("the build context would not build as tested:\n  " + "\n  ".join(problems))
        command = cog_command(args.tag)
        prefix = f"cd {shlex.quote(str(context))} && " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        push = f"{prefix} cog push {shlex.quote(args.tag)} --separate-weights"
        print(f"build context ready: {context}")
        if args.no_build or shutil.which("cog") is None:
            reason = "--no-build" if args.no_build else "no `cog` CLI on PATH"
            print(f"{reason}; build with:\n  {prefix} {shlex.join(command)}\nthen push with:\n  {push}")
            return
        check_cog_cli()
        subprocess.run(command, cwd=context, check=True, env={**os.environ, **env})
    except (ContextError, subprocess.CalledProcessError) as error:
        sys.exit(f"build_context: {error}")
    print(f"built {args.tag}; push with:\n  {push}")


if __name__ == "__main__":
    main()
