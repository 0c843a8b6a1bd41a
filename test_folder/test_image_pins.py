"""cog.yaml builds the image the tests ran: the same cog, coglet and torch, and a pget that was checked."""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.metadata
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from build_context import cog_env, pinned  # noqa: E402

COG_YAML = yaml.safe_load((REPO_ROOT / "cog.yaml").read_text())
PGET_RELEASE = "https://github.com/replicate/pget/releases/download/v0.11.0"


def _requirement_names(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {line.split("==")[0].strip().lower() for line in lines if line}


def test_the_image_gets_the_cog_sdk_and_coglet_the_tests_run() -> None:
    tested_cog, tested_coglet = importlib.metadata.version("cog"), importlib.metadata.version("coglet")
    assert COG_YAML["build"]["sdk_version"] == tested_cog == pinned("cog")
    assert pinned("coglet") == tested_coglet
    assert cog_env() == {"COGLET_WHEEL": f"pypi:{tested_coglet}"}
    # cog strips cog and coglet from python_requirements and installs its own: they must not be there.
    assert not {"cog", "coglet"} & _requirement_names(REPO_ROOT / COG_YAML["build"]["python_requirements"])


def test_the_image_installs_the_torch_the_tests_run_built_for_its_cuda() -> None:
    tested = importlib.metadata.version("torch").split("+")[0]  # the CPU build here
    assert f"torch=={tested}" in (REPO_ROOT / "requirements.txt").read_text().splitlines()
    assert (tested, COG_YAML["build"]["cuda"]) == ("2.13.0", "13.0"), "re-check the pair: cog.yaml's comment"


def test_cog_yaml_uses_the_current_keys() -> None:
    assert COG_YAML["run"] == "predict.py:Predictor" and COG_YAML["train"] == "train.py:train"
    assert "predict" not in COG_YAML
    assert all("\n" not in command for command in COG_YAML["build"]["run"])  # cog refuses multi-line items


@pytest.fixture
def release(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loopback stand-in for the pget release: this machine's asset and checksums.txt."""
    folder = tmp_path / "release"
    folder.mkdir()
    asset = f"pget_{os.uname().sysname}_{os.uname().machine}"
    (folder / asset).write_bytes(b"#!/bin/sh\necho pget 0.11.0\n")
    other = folder / "pget_Darwin_arm64"
    other.write_bytes(b"another platform")
    sums = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in (other, folder / asset)]
    (folder / "checksums.txt").write_text("\n".join(sums) + "\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder / asset, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _pget_step(base_url: str, target: Path) -> str:
    (step,) = [command for command in COG_YAML["build"]["run"] if "pget" in command]
    assert PGET_RELEASE in step and "/usr/local/bin/pget" in step
    return step.replace(PGET_RELEASE, base_url).replace("/usr/local/bin/pget", str(target))


def test_the_pget_step_installs_the_asset_for_this_machine_after_its_checksum(
    release: tuple[Path, str], tmp_path: Path
) -> None:
    asset, url = release
    target = tmp_path / "bin" / "pget"
    target.parent.mkdir()
    subprocess.run(["sh", "-c", _pget_step(url, target)], check=True, capture_output=True, cwd=tmp_path)
    assert target.read_bytes() == asset.read_bytes() and os.access(target, os.X_OK)


def test_the_pget_step_refuses_an_asset_that_does_not_match_checksums_txt(
    release: tuple[Path, str], tmp_path: Path
) -> None:
    asset, url = release
    asset.write_bytes(b"#!/bin/sh\necho tampered\n")
    target = tmp_path / "bin" / "pget"
    target.parent.mkdir()
    result = subprocess.run(["sh", "-c", _pget_step(url, target)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr
    assert not target.exists()
