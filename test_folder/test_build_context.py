"""The `cog build` context (scripts/build_context.py): tracked files plus baked weights, nothing else.

No cog CLI or Docker here: the script is run up to the point where it would call
`cog build --separate-weights`, and the folder it made is checked by the rules that command
applies (pkg/weightslegacy at replicate/cog 6110c912).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from build_context import (  # noqa: E402
    SIZE_THRESHOLD,
    _ignored,
    assemble,
    check,
    dockerignore_patterns,
    find_weights,
    local_imports,
    pinned,
    tracked_files,
)

BIG = SIZE_THRESHOLD + 1  # files are sparse: no disk is written
COG_ARGS = ["build", "--separate-weights", "-t", "r8.im/me/model"]


def _sparse(path: Path, size: int = BIG) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)


@pytest.fixture
def baked(tmp_path: Path) -> Path:
    """A weights folder as a bake leaves it, with a bake in progress beside it."""
    weights = tmp_path / "weights"
    _sparse(weights / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors")
    (weights / "sdxl" / "model_index.json").write_text("{}")
    (weights / "sdxl" / ".baked").write_text("{}")
    _sparse(weights / ".staging" / "illustrious-xl" / "unet" / "diffusion_pytorch_model.safetensors")
    return weights


def test_the_context_holds_the_tracked_files_and_the_baked_weights_only(tmp_path: Path, baked: Path) -> None:
    context = assemble(tmp_path / "context", baked)
    assert check(context) == []
    files = {str(p.relative_to(context)) for p in context.rglob("*") if p.is_file()}
    outside_weights = {f for f in files if not f.startswith("weights/")}
    assert outside_weights == set(tracked_files(REPO_ROOT))
    assert {f for f in files if f.startswith("weights/")} == {
        "weights/sdxl/unet/diffusion_pytorch_model.safetensors",
        "weights/sdxl/model_index.json",
        "weights/sdxl/.baked",
    }
    assert not any(part in {".venv", ".staging", "__pycache__", ".git"} for f in files for part in f.split("/"))
    assert find_weights([(f, (context / f).stat().st_size) for f in files]) == (["weights/sdxl/unet"], [])
    found, missing = local_imports(context)
    assert {"predict", "train", "engine.generator", "weights", "utils"} <= found and not missing


def test_check_names_each_thing_that_would_break_the_build(tmp_path: Path, baked: Path) -> None:
    context = assemble(tmp_path / "context", baked)
    _sparse(context / ".venv" / "lib" / "libtorch_cuda.so")
    (context / "outputs").mkdir()
    (context / "outputs" / "out-0.webp").write_bytes(b"RIFF")
    (context / "engine" / "config.py").unlink()
    with (context / "predict.py").open("a") as f:
        f.write("from engine.not_committed import helper\n")
    problems = "\n".join(check(context))
    assert ".venv/lib/libtorch_cuda.so is 10.0 MiB, outside weights/" in problems
    assert "--separate-weights would take .venv/lib as weights" in problems
    assert "outputs/out-0.webp is in the context but .dockerignore excludes it" in problems
    assert "module engine.config is imported by predict.py/train.py but not in the context" in problems
    assert "module engine.not_committed is imported by predict.py/train.py but not in the context" in problems


def test_cog_rewriting_files_in_the_context_leaves_the_working_tree_alone(tmp_path: Path, baked: Path) -> None:
    """cog build writes .cog/openapi_schema.json in place: the context holds copies, weights are hard links."""
    schema = REPO_ROOT / ".cog" / "openapi_schema.json"
    before = schema.read_bytes()
    context = assemble(tmp_path / "context", baked)
    (context / ".cog" / "openapi_schema.json").write_text("{}")
    assert schema.read_bytes() == before
    weight = Path("sdxl") / "unet" / "diffusion_pytorch_model.safetensors"
    assert (context / "weights" / weight).stat().st_ino == (baked / weight).stat().st_ino  # no second copy


def test_find_weights_follows_cogs_rules() -> None:
    big = [("weights/sdxl/unet/a.safetensors", BIG), ("weights/sdxl/unet/b.safetensors", BIG)]
    assert find_weights([*big, ("predict.py", 1)]) == (["weights/sdxl/unet"], [])
    assert find_weights([("weights/sdxl/unet/a.png", BIG), ("train.py", BIG)]) == ([], [])  # images and code
    assert find_weights([("model.bin", BIG)]) == ([], ["model.bin"])
    # A plain prefix test: weights.py drops a `weights` folder from the weights layer.
    assert find_weights([("weights/a.safetensors", BIG), ("weights.py", 1)]) == ([], [])
    assert find_weights([("weights/a.safetensors", BIG), ("weights/sub/b.bin", BIG)]) == (["weights"], [])


def test_dockerignore_keeps_what_cog_would_take_as_weights_out_of_a_working_tree_build() -> None:
    patterns = dockerignore_patterns(REPO_ROOT)
    for path in (".venv/lib/libtorch.so", "weights/.staging/sdxl/unet/x.safetensors", "engine/__pycache__/a.pyc"):
        assert _ignored(path, patterns), path
    for path in ("weights/sdxl/unet/diffusion_pytorch_model.safetensors", "predict.py", ".cog/openapi_schema.json"):
        assert not _ignored(path, patterns), path


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "cog").exists())
    env = {**os.environ, "PATH": path}  # no cog CLI on this PATH
    script = str(REPO_ROOT / "scripts" / "build_context.py")
    return subprocess.run(
        [sys.executable, script, "--no-bake", *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )


def test_without_a_cog_cli_it_stops_after_assembling_and_prints_the_command(tmp_path: Path, baked: Path) -> None:
    out = tmp_path / "context"
    result = _run("--weights", str(baked), "--out", str(out), "--tag", "r8.im/me/model", tmp_path=tmp_path)
    assert result.returncode == 1, result.stderr  # the fake weights lack most bake records
    assert "no bake record for illustrious-xl" in result.stderr and not out.exists()
    result = _run(
        "--weights", str(baked), "--out", str(out), "--tag", "r8.im/me/model", "--allow-unbaked", tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr
    coglet = pinned("coglet")
    assert f"cd {out} && COGLET_WHEEL=pypi:{coglet} cog build --separate-weights -t r8.im/me/model" in result.stdout
    assert (out / "weights" / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def _stand_in_cog(tmp_path: Path, version: str) -> tuple[dict[str, str], Path]:
    """A `cog` on PATH that answers --version and records how it was called (cwd, COGLET_WHEEL, args)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "cog-calls.log"
    bin_dir.mkdir()
    cog = bin_dir / "cog"
    cog.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "cog version {version} (built 2026-10-01)"; exit 0; fi\n'
        f'printf "%s\\n" "$PWD" "$COGLET_WHEEL" "$@" > {log}\n'
    )
    cog.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, log


def test_with_a_cog_cli_it_builds_in_the_context_with_the_tested_coglet(tmp_path: Path, baked: Path) -> None:
    env, log = _stand_in_cog(tmp_path, "0.23.1")
    out = tmp_path / "context"
    script = str(REPO_ROOT / "scripts" / "build_context.py")
    args = ["--no-bake", "--allow-unbaked", "--weights", str(baked), "--out", str(out), "--tag", "r8.im/me/model"]
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    cwd, coglet, *argv = log.read_text().splitlines()
    assert (Path(cwd), coglet, argv) == (out, f"pypi:{pinned('coglet')}", COG_ARGS)
    assert "cog push r8.im/me/model --separate-weights" in result.stdout


def test_an_older_cog_cli_is_refused_before_it_builds(tmp_path: Path, baked: Path) -> None:
    env, log = _stand_in_cog(tmp_path, "0.22.0")
    script = str(REPO_ROOT / "scripts" / "build_context.py")
    args = ["--no-bake", "--allow-unbaked", "--weights", str(baked), "--out", str(tmp_path / "context")]
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "cog CLI 0.22.0 is too old: this build needs 0.23.1 or newer" in result.stderr
    assert not log.exists()


def test_it_never_assembles_inside_the_working_tree_or_over_a_foreign_folder(tmp_path: Path, baked: Path) -> None:
    inside = _run("--weights", str(baked), "--out", str(REPO_ROOT / "context"), "--allow-unbaked", tmp_path=tmp_path)
    assert inside.returncode == 1 and "inside the working tree" in inside.stderr
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    result = _run("--weights", str(baked), "--out", str(foreign), "--allow-unbaked", tmp_path=tmp_path)
    assert result.returncode == 1 and "not an earlier build context" in result.stderr
    assert (foreign / "keep.txt").read_text() == "mine"
