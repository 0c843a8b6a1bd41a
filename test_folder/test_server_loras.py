"""Flux JSON with lora_weights and extra_lora through the real Cog server, hosts emulated."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_folder.conftest import CogServer, changed_share, decode_data_uri
from test_folder.emulators import CivitaiVersion, HfRepo, civitai, file_host, hugging_face, trained_tar
from test_folder.test_server import FLUX_JSON

HF_TOKEN = "hf_server_secret_42"
SIGNATURE = "server-presigned-signature-31337"


@pytest.fixture(scope="module")
def server_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LoRA cache of the module's server, to look into."""
    return tmp_path_factory.mktemp("server-lora-cache")


@pytest.fixture(scope="module")
def lora_server(
    weights_dir: Path, lora_files: dict[str, bytes], server_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[CogServer, dict]]:
    hf = hugging_face(
        {
            "acme/style": HfRepo({"style.safetensors": lora_files["a"]}),
            "acme/private": HfRepo({"p.safetensors": lora_files["te"]}, token=HF_TOKEN),
        }
    )
    civ = civitai(
        {
            100: [CivitaiVersion(1001, "Illustrious", lora_files["b"])],
            500: [CivitaiVersion(5001, "SDXL 1.0", lora_files["a"], trained_words=("zk_style", "neon glow"))],
        }
    )
    files = file_host(
        {
            "a.safetensors": lora_files["a"],
            "slow.safetensors": lora_files["te"],
            "bucket/signed.safetensors": lora_files["b"],
            "acme-trained/trained_model.tar": trained_tar(lora_files["b"]),
            "acme-pivotal/trained_model.tar": trained_tar(lora_files["b"], embeddings=lora_files["pti"]),
        },
        query_secrets={"bucket/signed.safetensors": ("X-Amz-Signature", SIGNATURE)},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hf.url)
        mp.setenv("CIVITAI_ENDPOINT", civ.url)
        mp.setenv("REPLICATE_ENDPOINT", files.url)
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.setenv("LORA_CACHE_DIR", str(server_cache))
        server = CogServer(weights_dir, tmp_path_factory.mktemp("lora-server") / "server.log")
    try:
        with server:
            yield server, {"hf": hf, "civitai": civ, "files": files}
    finally:
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
    assert changed_share(both, rescaled) > 0.9
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


def test_a_presigned_signature_never_shows(lora_server: tuple[CogServer, dict], server_cache: Path) -> None:
    server, hosts = lora_server
    url = (
        f"{hosts['files'].url}/bucket/signed.safetensors?X-Amz-Credential=AKIA-server-cred&X-Amz-Signature={SIGNATURE}"
    )
    _, body = png(server, lora_weights=url)
    _, refused = server.predict({**FLUX_JSON, "lora_weights": url.replace(SIGNATURE, "forged-sig-1")})
    assert refused["status"] == "failed" and "HTTP 403" in refused["error"]
    _, data = decode_data_uri(body["output"][0])
    server_log = Path(server.log.name).read_text()
    cache = "\n".join(p.name + (p.read_text() if p.suffix == ".json" else "") for p in server_cache.rglob("*"))
    for secret in (SIGNATURE, "AKIA-server-cred", "forged-sig-1"):
        assert secret not in body["logs"] + refused["logs"] + refused["error"] + server_log + cache
        assert secret.encode() not in data, "the image's embedded parameters hold no signature"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/etc/passwd", "the LoRA is a path on the server"),
        ("./nowhere.safetensors", "the LoRA is a path on the server"),
        ("file:///etc/x.safetensors", "the LoRA is a path on the server"),
        ("s3://bucket/x.safetensors", "pass a presigned https URL"),
        ("http://127.0.0.1:9/x.safetensors?token=hf_unreachable_secret", "the host could not be reached"),
        ("https://exa mple.com/x.safetensors", "has no valid host name"),
    ],
    ids=["not-safetensors", "missing-file", "file-scheme", "s3-scheme", "unreachable-with-token", "space-in-host"],
)
def test_lora_string_errors_through_cog_are_the_projects_own(
    lora_server: tuple[CogServer, dict], source: str, message: str
) -> None:
    server, _ = lora_server
    status, body = server.predict({**FLUX_JSON, "num_inference_steps": 1, "lora_weights": source})
    assert status == 200 and body["status"] == "failed"
    assert "WeightsError: " in body["error"] and message in body["error"], body["error"]
    for raw in ("ConnectError", "ConnectionError", "InvalidURL", "InvalidSchema", "LocalEntryNotFoundError", "urllib3"):
        assert raw not in body["error"]
    assert "hf_unreachable_secret" not in body["error"] + body["logs"]
    assert server.wait_ready(timeout=30)["status"] == "READY", "the server is still up and takes the next request"


def test_civitai_trigger_words_are_logged(lora_server: tuple[CogServer, dict]) -> None:
    server, hosts = lora_server
    page = hosts["civitai"].url + "/models/500"
    _, body = png(server, prompt="a cat", lora_weights=page)
    assert "lists trigger words: zk_style, neon glow; the prompt contains none of them" in body["logs"]
    _, body = png(server, prompt="a cat, zk_style", lora_weights=page)
    assert "the prompt contains zk_style" in body["logs"]


def _send(server: CogServer, method: str, path: str, payload: dict | None = None) -> int:
    """One request, retried briefly on coglet's spurious 409 'At capacity'; returns the status."""
    data = json.dumps(payload).encode() if payload is not None else b""
    headers = {"Content-Type": "application/json", "Prefer": "respond-async"}
    for _ in range(100):
        req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            if err.code != 409:
                return err.code
        time.sleep(0.1)
    raise RuntimeError("server stayed at capacity")


def test_a_cancel_during_a_download_leaves_nothing_behind(
    lora_server: tuple[CogServer, dict], server_cache: Path
) -> None:
    server, hosts = lora_server
    url = hosts["files"].url + "/slow.safetensors"
    hosts["files"].holds["GET /slow.safetensors"] = release = threading.Event()
    try:
        assert (
            _send(
                server,
                "PUT",
                "/predictions/cancel-me",
                {"id": "cancel-me", "input": {**FLUX_JSON, "lora_weights": url}},
            )
            == 202
        )
        deadline = time.monotonic() + 60
        while hosts["files"].hits["GET /slow.safetensors"] == 0:
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        assert _send(server, "POST", "/predictions/cancel-me/cancel") == 200
    finally:
        release.set()
    _, body = png(server, lora_weights=url)  # the same LoRA, right after
    assert "LoRA cache miss" in body["logs"], "the cancelled download left no entry behind"
    assert not [p for p in server_cache.rglob(".part-*")], "nor a half-written file"
    assert server.wait_ready(timeout=30)["status"] == "READY", "the server is still up and takes the next request"
