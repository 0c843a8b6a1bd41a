"""Flux JSON with lora_weights and extra_lora through the real Cog server, hosts emulated."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_folder.conftest import CogServer, decode_data_uri
from test_folder.emulators import CivitaiVersion, HfRepo, civitai, file_host, hugging_face, trained_tar
from test_folder.test_server import FLUX_JSON

HF_TOKEN = "hf_server_secret_42"


@pytest.fixture(scope="module")
def lora_server(
    weights_dir: Path, lora_files: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[CogServer, dict]]:
    hf = hugging_face(
        {
            "acme/style": HfRepo({"style.safetensors": lora_files["a"]}),
            "acme/private": HfRepo({"p.safetensors": lora_files["te"]}, token=HF_TOKEN),
        }
    )
    civ = civitai({100: [CivitaiVersion(1001, "Illustrious", lora_files["b"])]})
    files = file_host(
        {
            "a.safetensors": lora_files["a"],
            "acme-trained/trained_model.tar": trained_tar(lora_files["b"]),
            "acme-pivotal/trained_model.tar": trained_tar(lora_files["b"], embeddings=lora_files["pti"]),
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hf.url)
        mp.setenv("CIVITAI_ENDPOINT", civ.url)
        mp.setenv("REPLICATE_ENDPOINT", files.url)
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.setenv("LORA_CACHE_DIR", str(tmp_path_factory.mktemp("server-lora-cache")))
        server = CogServer(weights_dir, tmp_path_factory.mktemp("lora-server") / "server.log")
    try:
        assert server.wait_ready()["status"] == "READY"
        yield server, {"hf": hf, "civitai": civ, "files": files}
    finally:
        server.stop()
        for host in (hf, civ, files):
            host.close()


def png(server: CogServer, **inputs: object) -> tuple[np.ndarray, dict]:
    status, body = server.predict({**FLUX_JSON, "output_format": "png", **inputs})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    _, data = decode_data_uri(body["output"][0])
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16), body


def test_two_loras_from_hf_and_civitai(lora_server: tuple[CogServer, dict]) -> None:
    server, hosts = lora_server
    hf_url = hosts["hf"].url + "/acme/style/blob/main/style.safetensors"
    civ_url = hosts["civitai"].url + "/models/100"
    base, _ = png(server)
    one, body = png(server, lora_weights=hf_url)
    both, _ = png(server, lora_weights=hf_url, extra_lora=civ_url, extra_lora_scale=0.8)
    rescaled, _ = png(server, lora_weights=hf_url, extra_lora=civ_url, extra_lora_scale=0.2)
    assert np.abs(one - base).max() > 10
    assert np.abs(both - one).max() > 5
    assert np.abs(both - rescaled).max() > 0
    again, _ = png(server)
    assert np.array_equal(again, base), "without LoRAs the image is exactly the baseline again"
    assert "LoRA cache miss" in body["logs"]


def test_extra_lora_alone_acts_as_main(lora_server: tuple[CogServer, dict]) -> None:
    server, hosts = lora_server
    civ_url = hosts["civitai"].url + "/models/100"
    as_main, _ = png(server, lora_weights=civ_url)
    as_extra, body = png(server, extra_lora=civ_url)
    assert np.array_equal(as_main, as_extra)
    assert "LoRA cache hit" in body["logs"]


def test_private_lora_needs_token_and_it_never_shows(lora_server: tuple[CogServer, dict]) -> None:
    server, _ = lora_server
    _, body = server.predict({**FLUX_JSON, "lora_weights": "hf://acme/private"})
    assert body["status"] == "failed" and "pass an hf_api_token" in body["error"]
    _, body = png(server, lora_weights="hf://acme/private", hf_api_token=HF_TOKEN)
    assert HF_TOKEN not in body["logs"] and HF_TOKEN not in str(body.get("input", ""))
    _, data = decode_data_uri(body["output"][0])
    assert HF_TOKEN.encode() not in data


@pytest.mark.parametrize(
    "form",
    [
        "{hf}/acme/style",
        "{hf}/acme/style/resolve/main/style.safetensors?download=true",
        "acme/style/style.safetensors",
        "hf://acme/style",
        "{civitai}/models/100/slug",
        "{civitai}/models/100?modelVersionId=1001",
        "{civitai}/api/download/models/1001?type=Model&format=SafeTensor",
        "urn:air:sdxl:lora:civitai:100@1001",
        "{files}/a.safetensors",
        "{files}/acme-trained/trained_model.tar",
        "acme/trained",
        "acme/pivotal",
    ],
)
def test_every_form_through_cog(lora_server: tuple[CogServer, dict], form: str) -> None:
    server, hosts = lora_server
    source = form.format(**{name: host.url for name, host in hosts.items()})
    base, _ = png(server, prompt="a photo of TOK", num_inference_steps=1)
    out, _ = png(server, prompt="a photo of TOK", num_inference_steps=1, lora_weights=source)
    assert np.abs(out - base).max() > 10
