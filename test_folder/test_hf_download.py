"""Hugging Face downloads through huggingface_hub, against a loopback hub emulator.

Runnable directly: python test_folder/test_hf_download.py
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # when run directly

from test_folder.emulators import HfRepo, Loopback, hugging_face, point_hub_client_at
from weights import WeightsError, download_hf_file

TOKEN = "hf_testtoken_do_not_leak_123"
PUBLIC = b"public lora bytes" * 100
PRIVATE = b"private lora bytes" * 100


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Loopback]:
    emulator = hugging_face(
        {
            "acme/public-lora": HfRepo(files={"lora.safetensors": PUBLIC, "sub/dir/x.safetensors": PUBLIC[:10]}),
            "acme/private-lora": HfRepo(files={"lora.safetensors": PRIVATE}, token=TOKEN),
        }
    )
    point_hub_client_at(emulator, monkeypatch)
    yield emulator
    emulator.close()


def test_public_file(hub: Loopback, tmp_path: Path) -> None:
    path = download_hf_file("acme/public-lora", "lora.safetensors", tmp_path)
    assert path == tmp_path / "lora.safetensors" and path.read_bytes() == PUBLIC
    file = "/acme/public-lora/resolve/main/lora.safetensors"
    assert hub.hits == {f"HEAD {file}": 1, f"GET {file}": 1}, "one look at the file, one download"
    assert list(tmp_path.iterdir()) == [path], "nothing but the file is left behind"


def test_file_in_a_subfolder(hub: Loopback, tmp_path: Path) -> None:
    assert download_hf_file("acme/public-lora", "sub/dir/x.safetensors", tmp_path).read_bytes() == PUBLIC[:10]


def test_private_repo_needs_the_token(hub: Loopback, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"private: .* pass an hf_api_token") as err:
        download_hf_file("acme/private-lora", "lora.safetensors", tmp_path / "anon")
    assert not (tmp_path / "anon" / "lora.safetensors").exists()
    path = download_hf_file("acme/private-lora", "lora.safetensors", tmp_path / "ok", token=TOKEN)
    assert path.read_bytes() == PRIVATE
    assert f"Bearer {TOKEN}" in hub.auth
    assert TOKEN not in str(err.value)


def test_token_from_environment(hub: Loopback, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert download_hf_file("acme/private-lora", "lora.safetensors", tmp_path).read_bytes() == PRIVATE


def test_a_cached_private_file_is_not_served_without_the_token(hub: Loopback, tmp_path: Path) -> None:
    download_hf_file("acme/private-lora", "lora.safetensors", tmp_path / "first", token=TOKEN)
    with pytest.raises(WeightsError, match="hf_api_token"):
        download_hf_file("acme/private-lora", "lora.safetensors", tmp_path / "second")


def test_wrong_token_is_refused_without_echoing_it(hub: Loopback, tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        download_hf_file("acme/private-lora", "lora.safetensors", tmp_path, token="hf_wrong_secret_456")
    assert "hf_wrong_secret_456" not in str(err.value)


def test_missing_file_and_revision(hub: Loopback, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"nope\.safetensors in acme/public-lora@main was not found"):
        download_hf_file("acme/public-lora", "nope.safetensors", tmp_path)
    with pytest.raises(WeightsError, match="revision 'v9' does not exist"):
        download_hf_file("acme/public-lora", "lora.safetensors", tmp_path, revision="v9")


def test_unknown_repo(hub: Loopback, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="acme/nothing was not found"):
        download_hf_file("acme/nothing", "lora.safetensors", tmp_path)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
