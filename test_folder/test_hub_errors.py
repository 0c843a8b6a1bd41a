"""Hugging Face LoRAs against the loopback hub: a hub failure is called one, retries are bounded
and logged (conftest sets a zero backoff: no real sleep), 401/403/404 keep their own messages, and
a file over LORA_MAX_FILE_BYTES is refused from the hub's metadata before any byte moves (CivitAI's
API states sizes too)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_folder.emulators import CivitaiVersion, HfRepo, Loopback, Reply, civitai, hugging_face, point_hub_client_at
from weights import Credentials, Downloader, LoraStore, WeightsError
from weightstore import config

TOKEN = "hf_hub_errors_secret_3141"
COMMIT = HfRepo({}).commit
INFO = "GET /api/models/acme/style/revision/main"
FILE = f"GET /acme/style/resolve/{COMMIT}/style.safetensors"
TRIES = config.DOWNLOAD_RETRIES


@pytest.fixture
def hub(lora_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[Loopback]:
    hf = hugging_face(
        {
            "acme/style": HfRepo({"style.safetensors": lora_files["a"]}),
            "acme/gated": HfRepo({"g.safetensors": lora_files["b"]}, token=TOKEN, gated=True),
            "acme/private": HfRepo({"p.safetensors": lora_files["b"]}, token=TOKEN),
        }
    )
    point_hub_client_at(hf, monkeypatch)
    yield hf
    hf.close()


@pytest.fixture
def store(tmp_path: Path) -> LoraStore:
    return LoraStore(tmp_path / "cache", Downloader("python"))


@pytest.mark.parametrize("where", [INFO, FILE], ids=["metadata", "file"])
def test_a_hub_failure_says_the_hub_failed_after_bounded_logged_retries(
    store: LoraStore, hub: Loopback, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    hub.faults[where] = [Reply(503) for _ in range(TRIES)]
    hub.faults[where.replace("GET", "HEAD", 1)] = [Reply(503) for _ in range(10)]  # the hub is down
    caplog.set_level(logging.INFO)
    with pytest.raises(WeightsError) as err:
        store.fetch("hf://acme/style", 1.0, Credentials())
    message = str(err.value)
    assert f"after {TRIES} tries: Hugging Face failed (HTTP 503), a fault on its side" in message, message
    assert "Try again in a few minutes" in message
    assert "not found" not in message and "check the file name" not in message
    assert hub.hits[where] == TRIES, "bounded: every try asked once, no more"
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == TRIES - 1 and f"(try {TRIES} of {TRIES})" in retries[-1], retries
    assert not list(store.files.iterdir()), "nothing half written"


@pytest.mark.parametrize("where", [INFO, FILE], ids=["metadata", "file"])
def test_one_hub_failure_is_retried_and_the_file_arrives(
    store: LoraStore, hub: Loopback, lora_files: dict[str, bytes], caplog: pytest.LogCaptureFixture, where: str
) -> None:
    hub.faults[where] = [Reply(502)]
    caplog.set_level(logging.INFO)
    assert store.fetch("hf://acme/style", 1.0, Credentials()).path.read_bytes() == lora_files["a"]
    assert hub.hits[where] == 2
    assert "Hugging Face failed (HTTP 502)" in caplog.text and "(try 2 of" in caplog.text


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "needs a Hugging Face token: pass hf_api_token (got HTTP 401)"),
        (403, "needs a Hugging Face token: pass hf_api_token (got HTTP 403)"),
        (404, "was not found (HTTP 404): check the URL or id"),
    ],
)
def test_a_refusal_of_the_file_keeps_its_own_message_and_is_not_retried(
    store: LoraStore, hub: Loopback, status: int, message: str
) -> None:
    hub.faults[FILE] = [Reply(status)]
    with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        store.fetch("hf://acme/style", 1.0, Credentials())
    assert hub.hits[FILE] == 1


def test_private_and_gated_repos_name_the_token(store: LoraStore, hub: Loopback) -> None:
    with pytest.raises(WeightsError, match=r"was not found, or it is private: .* pass an hf_api_token"):
        store.fetch("hf://acme/private", 1.0, Credentials())
    with pytest.raises(WeightsError, match="is gated: accept its terms on the hub") as err:
        store.fetch("hf://acme/gated", 1.0, Credentials(hf="hf_wrong_token_2718"))
    assert "hf_wrong_token_2718" not in str(err.value)
    assert store.fetch("hf://acme/private", 1.0, Credentials(hf=TOKEN)).path.exists()
    assert f"Bearer {TOKEN}" in hub.auth


def test_a_file_over_the_size_cap_is_refused_from_the_hubs_metadata(
    hub: Loopback, tmp_path: Path, lora_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pasted base checkpoint is refused before its download, not fetched, cached and then refused."""
    size = len(lora_files["a"])
    monkeypatch.setenv("LORA_MAX_FILE_BYTES", str(size - 1))
    store = LoraStore(tmp_path / "cache", Downloader("python"))
    with pytest.raises(WeightsError, match=f"is {size} bytes, over the {size - 1}-byte limit"):
        store.fetch("hf://acme/style", 1.0, Credentials())
    assert hub.hits[FILE] == 0, "not a byte of the file was asked for"
    assert not list(store.files.iterdir())


def test_a_civitai_file_over_the_size_cap_is_refused_from_the_apis_size(
    tmp_path: Path, lora_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    size = len(lora_files["a"])
    civ = civitai({10: [CivitaiVersion(1010, "SDXL 1.0", lora_files["a"])]})
    monkeypatch.setenv("CIVITAI_ENDPOINT", civ.url)
    monkeypatch.setenv("LORA_MAX_FILE_BYTES", str(size - 1))
    store = LoraStore(tmp_path / "cache", Downloader("python"))
    try:
        with pytest.raises(WeightsError, match=f"civitai version 1010 is {size} bytes, over the {size - 1}-byte limit"):
            store.fetch("https://civitai.com/models/10?modelVersionId=1010", 1.0, Credentials())
        assert civ.hits["GET /api/download/models/1010"] == 0, "the download was never asked for"
    finally:
        civ.close()
