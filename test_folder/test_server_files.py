"""No input reads a file of the server (issue 24 #1, and the local LoRA path rule of issue 19).

coglet 0.23 stores a caller's URL or data: URI in a temporary file and passes predict() a cog
Path; any other string reaches predict() as sent. Through the real Cog server, every image input
refuses a server path before opening it, with one message whatever the path names (an image, a
missing file, a folder, a file that is not an image); LoRA paths follow the same rule
(`engine/server_files.py`), read only inside LOCAL_FILES_DIR.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from cog import Path as CogPath
from PIL import Image

from engine.errors import InputError
from engine.server_files import server_file
from scripts.run_predictor import _coerce
from test_folder.conftest import CogServer, decode_data_uri, image_data_uri
from weights import Credentials, Downloader, LoraStore, WeightsError, parse_lora

BASE = {"prompt": "a lighthouse", "seed": 3, "num_inference_steps": 2, "output_format": "png"}
REFUSED = "is a path on the server, and requests do not read the server's files"


def picture() -> Image.Image:
    """An image whose pixels a leak would show exactly: a gradient with a bright square."""
    ramp = np.linspace(0, 255, 128, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (128, 1)), np.tile(ramp[:, None], (1, 128)), np.full((128, 128), 90, np.uint8)])
    pixels = pixels.transpose(1, 2, 0).copy()
    pixels[40:80, 40:80] = 250
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def server_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths of this machine, which the Cog server shares: every kind a caller could probe."""
    root = tmp_path_factory.mktemp("server-files")
    picture().save(root / "secret.png")
    (root / "notes.txt").write_text("not an image")
    return {
        "an image": str(root / "secret.png"),
        "a missing file": str(root / "missing.png"),
        "a folder": str(root),
        "not an image": str(root / "notes.txt"),
        "a system file": "/etc/passwd",
        "a relative path": "secret.png",
        "a file URL": f"file://{root / 'secret.png'}",
    }


def refusal(server: CogServer, inputs: dict[str, Any]) -> str:
    status, body = server.predict({**BASE, **inputs})
    assert status == 200 and body["status"] == "failed", body
    assert not body.get("output"), "nothing comes back"
    return body["error"]


@pytest.mark.parametrize("name", ["image", "mask", "control_image", "ip_adapter_image", "generation_data_image"])
def test_a_server_path_gets_one_answer_whatever_it_names(
    cog_server: CogServer, server_paths: dict[str, str], name: str
) -> None:
    def inputs(path: str) -> dict[str, Any]:
        if name == "mask":
            return {"image": image_data_uri(picture()), "mask": path}
        if name == "control_image":
            return {"control_image": path, "control_type": "canny"}
        return {name: [path] if name == "ip_adapter_image" else path}

    answers = {kind: refusal(cog_server, inputs(path)) for kind, path in server_paths.items()}
    assert len(set(answers.values())) == 1, answers
    (answer,) = set(answers.values())
    assert f"InputError: {name} {REFUSED}: send the image as an https URL or a data: URI" in answer
    assert "/tmp" not in answer and "secret" not in answer


def test_the_control_map_request_from_the_issue_returns_no_server_image(
    cog_server: CogServer, server_paths: dict[str, str]
) -> None:
    """Issue 24's request: a ready map that is returned as it is would hand the file back."""
    leak = {"control_type": "depth", "control_preprocess": False, "return_control_map": True}
    assert REFUSED in refusal(cog_server, {**leak, "control_image": server_paths["an image"]})
    # The same picture uploaded as a data: URI is read (coglet passes it as a cog Path), and its
    # map comes back: the refusal above is about where the file is, not about what it holds.
    status, body = cog_server.predict({**BASE, **leak, "control_image": image_data_uri(picture())})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    _, data = decode_data_uri(body["output"][-1])
    returned = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    sent = np.asarray(picture().resize(returned.shape[1::-1]), dtype=np.int16)
    assert np.abs(returned - sent).mean() < 8, "the uploaded map is what comes back"


def test_a_lora_path_gets_one_answer_through_the_server(
    cog_server: CogServer, server_paths: dict[str, str], lora_files: dict[str, bytes], tmp_path: Path
) -> None:
    existing = tmp_path / "mine.safetensors"
    existing.write_bytes(lora_files["a"])
    paths = [str(existing), str(tmp_path / "missing.safetensors"), str(tmp_path), "/etc/passwd", "./x.safetensors"]
    answers = {refusal(cog_server, {"lora_weights": path}) for path in paths}
    assert len(answers) == 1, answers
    assert f"WeightsError: the LoRA {REFUSED}" in answers.pop()
    sent = "data:application/octet-stream;base64," + base64.b64encode(lora_files["a"]).decode()
    status, body = cog_server.predict({**BASE, "lora_weights": sent})
    assert status == 200 and body["status"] == "succeeded", body.get("error")


# ---------------------------------------------------------------------------------------------
# The rule itself, with a folder opened (LOCAL_FILES_DIR)


@pytest.fixture
def opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "opened"
    folder.mkdir()
    monkeypatch.setenv("LOCAL_FILES_DIR", str(folder))
    return folder


def test_paths_inside_the_opened_folder_are_read_and_nothing_outside(opened: Path, tmp_path: Path) -> None:
    (opened / "in.png").touch()
    (tmp_path / "out.png").touch()
    (opened / "link.png").symlink_to(tmp_path / "out.png")
    assert server_file(str(opened / "in.png"), "image", "x") == opened / "in.png"
    assert server_file("in.png", "image", "x") == opened / "in.png", "a relative path is read from the folder"
    for path in (str(tmp_path / "out.png"), "../out.png", "link.png", "/etc/passwd", "~/x.png", "in\0.png"):
        with pytest.raises(InputError, match=f"image {REFUSED}"):
            server_file(path, "image", "x")


def test_with_no_folder_opened_every_path_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LOCAL_FILES_DIR", raising=False)
    (tmp_path / "x.png").touch()
    for path in (str(tmp_path / "x.png"), str(tmp_path), "x.png", ""):
        with pytest.raises(InputError, match=f"image {REFUSED}"):
            server_file(path, "image", "x")


def test_a_lora_in_the_opened_folder_loads_and_its_faults_are_named(
    opened: Path, tmp_path: Path, lora_files: dict[str, bytes]
) -> None:
    (opened / "mine.safetensors").write_bytes(lora_files["a"])
    store = LoraStore(tmp_path / "cache", Downloader("python"))
    for source in (str(opened / "mine.safetensors"), "./mine.safetensors", "mine.safetensors"):
        assert store.fetch(source, 1.0, Credentials()).path == opened / "mine.safetensors"
    # Inside the folder the operator opened, a missing file or a folder may be named as such.
    with pytest.raises(WeightsError, match=r"local LoRA file \./gone\.safetensors not found"):
        parse_lora("./gone.safetensors")
    with pytest.raises(WeightsError, match="is a directory"):
        parse_lora(str(opened))
    (tmp_path / "outside.safetensors").write_bytes(lora_files["a"])
    with pytest.raises(WeightsError, match=f"the LoRA {REFUSED}"):
        parse_lora(str(tmp_path / "outside.safetensors"))


def test_the_local_runner_passes_files_as_coglet_does() -> None:
    """`-i image=@x.png` is an upload (a cog Path, as coglet makes of a URL); a bare string stays a
    string, as coglet leaves it, and predict() refuses it like any server path."""
    assert _coerce(["@a.png"], Optional[CogPath]) == CogPath("a.png")
    assert type(_coerce(["a.png"], Optional[CogPath])) is str
