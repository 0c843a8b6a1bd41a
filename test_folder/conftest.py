"""Shared fixtures: tiny weights built once per session, the engine, and the real Cog server."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import StableDiffusionXLPipeline
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engine.generator import Engine  # noqa: E402
from scripts.build_tiny_weights import build_all  # noqa: E402
from test_folder.lora_factory import (  # noqa: E402
    diffusers_lora,
    kohya_lora,
    loha_file,
    pivotal_embeddings,
    sd15_like_lora,
)
from test_folder.process_state import capture, restore  # noqa: E402

# The process as the session found it, before any module ran (test_folder/process_state.py).
_SESSION_START = capture()


@pytest.fixture(scope="module", autouse=True)
def fresh_process_state() -> None:
    """Every module starts from the session's first state: library caches empty, dynamo's config
    and the random generators as they were, whatever modules ran before it in this process."""
    restore(_SESSION_START)


@pytest.fixture(scope="session", autouse=True)
def lora_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every engine and server of the session caches LoRAs here, never in the machine's cache,
    retries downloads without waiting, and moves bytes with the Python downloader unless a test
    names another (the image has pget; this machine does not). Engines in this process may read
    LoRA paths under the session's temp folder (LOCAL_FILES_DIR); Cog servers start without it,
    as the image does."""
    root = tmp_path_factory.mktemp("lora-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_CACHE_DIR", str(root))
        mp.setenv("LORA_RETRY_BACKOFF_SECONDS", "0")
        mp.setenv("LORA_DOWNLOADER", "python")
        mp.setenv("LOCAL_FILES_DIR", str(tmp_path_factory.getbasetemp()))
        yield root


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny weights, so tests never depend on or touch ./weights. A pytest
    started by a test (test_module_order.py) reads its parent's copy, named in TEST_TINY_WEIGHTS."""
    if handed := os.environ.get("TEST_TINY_WEIGHTS"):
        return Path(handed)
    root = tmp_path_factory.mktemp("weights")
    build_all(root)
    return root


@pytest.fixture(scope="session")
def engine(weights_dir: Path) -> Engine:
    return Engine.load(weights_dir)


@pytest.fixture(scope="session")
def lora_files(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """LoRA files shaped for the tiny model, in every format the tests serve."""
    pipe = StableDiffusionXLPipeline.from_pretrained(weights_dir / "illustrious-xl")
    root = tmp_path_factory.mktemp("loras")
    made = {
        "a": diffusers_lora(pipe, root / "a", seed=11),
        "b": kohya_lora(pipe, root / "b.safetensors", seed=22),
        "te": diffusers_lora(pipe, root / "te", seed=33, text=True),
        "kohya_te": kohya_lora(pipe, root / "kte.safetensors", seed=44, text=True),
        "loha": loha_file(root / "loha.safetensors"),
        "sd15": sd15_like_lora(root / "sd15.safetensors"),
    }
    files = {name: path.read_bytes() for name, path in made.items()}
    files["pti"] = pivotal_embeddings(pipe, seed=55)
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CogServer:
    """`python -m cog.server.http` on a loopback port, as `make serve` (or `make serve-train`) runs it."""

    def __init__(self, weights: Path, log_path: Path, train: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            PORT=str(self.port),
            WEIGHTS_DIR=str(weights),
            COG_PREDICT_TYPE_STUB="predict.py:Predictor",
            COG_TRAIN_TYPE_STUB="train.py:train",
            # coglet starts its worker with `python` from PATH: the venv's must come first.
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        env.pop("LOCAL_FILES_DIR", None)  # no server path is readable, as in the image
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *(["--x-mode", "train"] if train else [])],
            cwd=REPO_ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cog server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                health = self.get("/health-check")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
                continue
            if health["status"] in ("READY", "SETUP_FAILED"):
                return health
            time.sleep(0.5)
        raise TimeoutError(f"cog server not ready after {timeout}s; see {self.log.name}")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def predict(
        self, inputs: dict[str, Any], timeout: float = 300, path: str = "/predictions"
    ) -> tuple[int, dict[str, Any]]:
        """POST /predictions (or /trainings); retries briefly on coglet's spurious 409 'At capacity'."""
        body = json.dumps({"input": inputs}).encode()
        for _ in range(50):
            req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as err:
                if err.code == 409:
                    time.sleep(0.2)
                    continue
                return err.code, json.loads(err.read() or b"{}")
        raise RuntimeError("server stayed at capacity")

    def __enter__(self) -> CogServer:
        """Ready to take predictions (stopped again if setup fails)."""
        try:
            health = self.wait_ready()
            assert health["status"] == "READY", health
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def cog_server(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    with CogServer(weights_dir, tmp_path_factory.mktemp("server") / "server.log") as server:
        yield server


def decode_data_uri(uri: str) -> tuple[str, bytes]:
    header, payload = uri.split(",", 1)
    return header.removeprefix("data:").split(";")[0], base64.b64decode(payload)


def changed_share(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """The share of pixels that differ in any channel: a change to how the whole image is denoised
    changes nearly all of them, where a stray rounding would change a few."""
    difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return float((difference.max(axis=-1) > 0).mean())


def image_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
