"""`cog train` on the tiny model: a LoRA learned from a patterned image set, loaded back through
`lora_weights` (over HTTP and as a local file) and through the Cog runtime in train mode; every
bad input refused with its message before any training step."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load as load_file_bytes
from safetensors.torch import load_file

from engine.errors import InputError
from engine.generator import Engine
from engine.request import GenerationRequest, LoraSpec
from scripts.cog_schema import SCHEMA_PATH
from test_folder.conftest import REPO_ROOT, CogServer, decode_data_uri
from test_folder.emulators import HfRepo, file_host, hugging_face, point_hub_client_at
from training import cog_sdxl, tagger, trainer
from training.cog_sdxl import CogSdxlInputs
from training.config import TRAIN_EMBEDDING_NORM_PULL
from training.data import ArchiveLimits, TrainingImage, caption_all, read_archive
from training.optimizers import build_optimizer, refuse_where_it_cannot_run
from training.request import OPTIMIZERS, TrainingRequest
from training.trainer import TrainingResult, train
from weightstore.cache import LoraStore
from weightstore.transfer import Downloader

STEPS = 40
# replicate/flux-fine-tuner train.py (commit 3dd14e3), in its order.
FLUX_TRAINER_INPUTS = [
    "input_images",
    "trigger_word",
    "autocaption",
    "autocaption_prefix",
    "autocaption_suffix",
    "steps",
    "learning_rate",
    "batch_size",
    "resolution",
    "lora_rank",
    "caption_dropout_rate",
    "optimizer",
    "cache_latents_to_disk",
    "layers_to_optimize_regex",
    "gradient_checkpointing",
    "hf_repo_id",
    "hf_token",
    "wandb_api_key",
    "wandb_project",
    "wandb_run",
    "wandb_entity",
    "wandb_sample_interval",
    "wandb_sample_prompts",
    "wandb_save_interval",
    "skip_training_and_use_pretrained_hf_lora_url",
]

# replicate/cog-sdxl train.py (Replicate's SDXL trainer, `stability-ai/sdxl`; commit c79cb3c), in its order.
COG_SDXL_TRAINER_INPUTS = [
    "input_images",
    "seed",
    "resolution",
    "train_batch_size",
    "num_train_epochs",
    "max_train_steps",
    "is_lora",
    "unet_learning_rate",
    "ti_lr",
    "lora_lr",
    "lora_rank",
    "lr_scheduler",
    "lr_warmup_steps",
    "token_string",
    "caption_prefix",
    "mask_target_prompts",
    "crop_based_on_salience",
    "use_face_detection_instead",
    "clipseg_temperature",
    "verbose",
    "checkpointing_steps",
    "input_images_filetype",
]
# Its names that Flux's trainer (and our seed) lack: declared after those, in its order.
COG_SDXL_ONLY = [name for name in COG_SDXL_TRAINER_INPUTS if name not in (*FLUX_TRAINER_INPUTS, "seed")]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """This 2-core machine is shared: OpenMP threads of several busy processes spin against each
    other and make a training step 30x slower. One thread per process keeps the module fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def grid(width: int, height: int, shift: int = 0) -> Image.Image:
    """A strong, distinctive pattern: a red and blue grid on black."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, shift::8] = (255, 0, 0)
    pixels[shift::8, :] = (0, 0, 255)
    return Image.fromarray(pixels)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def dataset(count: int = 4) -> dict[str, bytes]:
    """Patterned images of different proportions and formats; one brings its own caption."""
    sizes = [(96, 96), (128, 80), (80, 128), (112, 96), (96, 112), (64, 64)]
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]
    files = {}
    for i in range(count):
        ext, fmt = formats[i % len(formats)]
        files[f"set/img{i}.{ext}"] = encoded(grid(*sizes[i % len(sizes)], shift=i % 4), fmt)
    files["set/img0.txt"] = b"a grid drawing of TOK"
    return files


@pytest.fixture(scope="module")
def trained(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainingResult:
    root = tmp_path_factory.mktemp("train")
    request = TrainingRequest(
        make_zip(root / "photos.zip", dataset()),
        steps=STEPS,
        learning_rate=1e-3,
        batch_size=2,
        resolution="512",
        seed=7,
        autocaption=False,
    )
    return train(request, weights_dir, root / "out")


def test_loss_falls_and_the_tar_has_replicates_layout(trained: TrainingResult) -> None:
    assert trained.probe_loss_after < trained.probe_loss_before * 0.98, trained
    with tarfile.open(trained.tar) as tar:
        names = sorted(tar.getnames())
        read = {name: tar.extractfile(name).read() for name in names}  # type: ignore[union-attr]
    captions = [f"captions/set/img{i}.txt" for i in range(4)]
    assert names == [
        *captions,
        "embeddings.pti",
        "embeddings/TOK.safetensors",
        "lora.safetensors",
        "lora_kohya.safetensors",
        "special_params.json",
        "training_params.json",
    ]
    assert read["captions/set/img0.txt"] == b"a grid drawing of TOK\n", "the captions used, trigger as written"
    assert read["captions/set/img1.txt"] == b"TOK\n"
    assert json.loads(read["special_params.json"]) == {"TOK": "<s0><s1>"}
    params = json.loads(read["training_params.json"])
    assert params["steps"] == STEPS and params["images"] == 4 and params["trigger_word"] == "TOK"
    assert "input_images" not in params, "no server path in the tar"


def test_the_trained_tar_loads_through_lora_weights(engine: Engine, trained: TrainingResult, tmp_path: Path) -> None:
    host = file_host({"me/trained_model.tar": trained.tar.read_bytes()})
    with_store = Engine(engine.models, engine.safety, LoraStore(tmp_path / "cache", Downloader("python")), engine.swap)

    def image(prompt: str, lora: str | None = None) -> np.ndarray:
        loras = (LoraSpec(lora, 1.0),) if lora else ()
        request = GenerationRequest(prompt=prompt, num_inference_steps=4, seed=3, loras=loras)
        return np.asarray(with_store.generate(request)[0].image, dtype=np.int16)

    url = f"{host.url}/me/trained_model.tar"
    try:
        plain, tok = image("a photo of a dog"), image("a photo of TOK")
        lora_plain, lora_tok = image("a photo of a dog", url), image("a photo of TOK", url)
    finally:
        host.close()
    assert np.abs(lora_plain - plain).max() > 5, "the LoRA changes the image"
    assert np.abs(lora_tok - tok).mean() > np.abs(lora_plain - plain).mean(), "the trigger word changes it more"

    local = tmp_path / "lora.safetensors"
    with tarfile.open(trained.tar) as tar:
        local.write_bytes(tar.extractfile("lora.safetensors").read())  # type: ignore[union-attr]
    assert all(k.startswith("unet.") for k in load_file(local)), "diffusers' key layout"
    assert np.abs(image("a photo of a dog", str(local)) - plain).max() > 5, "the file alone works as a local path"
    assert np.array_equal(image("a photo of TOK"), tok), "without the LoRA the image is exactly as before"


def test_without_pivotal_tuning_the_tar_holds_the_lora_alone(engine: Engine, weights_dir: Path, tmp_path: Path) -> None:
    def add(tar: tarfile.TarFile) -> None:
        for name, data in dataset().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    request = TrainingRequest(
        _tar(tmp_path / "photos.tar", add),
        steps=4,
        learning_rate=1e-3,
        resolution="256,512",
        train_text_encoder=False,
        autocaption=False,
    )
    result = train(request, weights_dir, tmp_path / "out")
    with tarfile.open(result.tar) as tar:
        captions = [f"captions/set/img{i}.txt" for i in range(4)]
        assert sorted(tar.getnames()) == [
            *captions,
            "lora.safetensors",
            "lora_kohya.safetensors",
            "training_params.json",
        ]
        for name in ("lora.safetensors", "lora_kohya.safetensors"):
            (tmp_path / name).write_bytes(tar.extractfile(name).read())  # type: ignore[union-attr]
    kohya = load_file(tmp_path / "lora_kohya.safetensors")
    assert all(
        k.startswith("lora_unet_") and k.endswith(("lora_down.weight", "lora_up.weight", "alpha")) for k in kohya
    )
    assert any("_input_blocks_" in k for k in kohya) and any("_output_blocks_" in k for k in kohya), "SGM block names"
    with_store = Engine(engine.models, engine.safety, LoraStore(tmp_path / "cache", Downloader("python")), engine.swap)
    request = GenerationRequest(prompt="a photo of TOK", num_inference_steps=2, seed=1)
    lora = (LoraSpec(str(tmp_path / "lora.safetensors"), 1.0),)
    kohya_lora = (LoraSpec(str(tmp_path / "lora_kohya.safetensors"), 1.0),)
    plain, tuned, again, by_kohya = (
        np.asarray(with_store.generate(r)[0].image, dtype=np.int16)
        for r in (request, replace(request, loras=lora), request, replace(request, loras=kohya_lora))
    )
    assert not np.array_equal(tuned, plain), "the LoRA changes the image"
    assert np.array_equal(again, plain), "and nothing of it stays"
    # The engine reads a kohya file through diffusers' kohya conversion: the same LoRA, the same image.
    assert np.array_equal(by_kohya, tuned), "the kohya layout holds the same LoRA"


def test_captions_txt_wins_and_every_caption_names_the_trigger() -> None:
    blank = Image.new("RGB", (8, 8))
    images = [TrainingImage("a.png", blank, "a red car"), TrainingImage("b.png", blank, None)]
    assert caption_all(images, "TOK", "", "", None) == ["TOK, a red car", "TOK"]
    assert caption_all(images, "TOK", "photo of", "at night", ["a cat"]) == [
        "TOK, a red car",
        "TOK, photo of a cat at night",
    ]
    named = [TrainingImage("c.png", blank, "TOK riding a bike")]
    assert caption_all(named, "TOK", "", "", None) == ["TOK riding a bike"]


@dataclass
class TrainHub:
    """The loopback hub the train server uploads to and downloads from, and its wandb folder."""

    repos: dict[str, HfRepo]
    url: str
    wandb_dir: Path


@pytest.fixture(scope="module")
def train_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainHub]:
    repos: dict[str, HfRepo] = {}
    hub = hugging_face(repos, write_token=WRITE_TOKEN)
    try:
        yield TrainHub(repos, hub.url, tmp_path_factory.mktemp("server-wandb"))
    finally:
        hub.close()


@pytest.fixture(scope="module")
def train_server(
    weights_dir: Path, tmp_path_factory: pytest.TempPathFactory, train_hub: TrainHub
) -> Iterator[CogServer]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # one thread in its worker too (see one_thread)
        mp.setenv("HF_ENDPOINT", train_hub.url)
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.delenv("HF_TOKEN", raising=False)
        mp.setenv("WANDB_MODE", "offline")  # wandb writes the run where it would upload it
        mp.setenv("WANDB_DIR", str(train_hub.wandb_dir))
        server = CogServer(weights_dir, tmp_path_factory.mktemp("train-server") / "server.log", train=True)
    with server:
        yield server


def flux_trainer_json(hub: TrainHub) -> dict:
    """Every input of Replicate's Flux trainer, as its form sends them (values changed from its
    defaults where a test needs a small run, an upload target or an offline W&B run)."""
    return {
        "input_images": zip_data_uri(dataset()),
        "trigger_word": "",
        "autocaption": True,
        "autocaption_prefix": "a photo of",
        "autocaption_suffix": "in a grid style",
        "steps": 3,
        "learning_rate": 4e-4,
        "batch_size": 1,
        "resolution": "512,768",
        "lora_rank": 16,
        "caption_dropout_rate": 0.05,
        "optimizer": "adamw8bit",
        "cache_latents_to_disk": True,
        "layers_to_optimize_regex": "attn2",
        "gradient_checkpointing": True,
        "hf_repo_id": "alice/flux-json",
        "hf_token": WRITE_TOKEN,
        "wandb_api_key": "0123456789abcdef0123456789abcdef01234567",
        "wandb_project": "flux_train_replicate",
        "wandb_run": "bar",
        "wandb_entity": "alice",
        "wandb_sample_interval": 2,
        "wandb_sample_prompts": "a photo of a grid",
        "wandb_save_interval": 100,
    }


def test_flux_trainer_json_every_input_honoured_through_cog(train_server: CogServer, train_hub: TrainHub) -> None:
    inputs = flux_trainer_json(train_hub)
    assert [*inputs, "skip_training_and_use_pretrained_hf_lora_url"] == FLUX_TRAINER_INPUTS
    status, body = train_server.predict(inputs, path="/trainings")
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    logs = body["logs"]
    for line in (
        "autocaption (WD tagger): 3 caption(s)",  # img0 brings its .txt; Illustrious gets tags
        "optimizer: adamw8bit asked for, 8-bit optimizers need a CUDA GPU: running adamw (32-bit) instead",
        "layers_to_optimize_regex: LoRA on 32 of 88 attention layers",
        "gradient checkpointing: on (asked for)",
        "latents on disk in",
        "wandb: logging to project flux_train_replicate, run bar",
        "step 3/3, loss",
        "uploaded to",
    ):
        assert line in logs, line
    assert "HTTP Request" not in logs and "it/s]" not in logs, "no library request lines or progress bars"
    assert WRITE_TOKEN not in logs and inputs["wandb_api_key"] not in logs
    output = body["output"]
    assert output["hf_repo_url"] == f"{train_hub.url}/alice/flux-json" and output.get("hf_upload_error") is None
    _, data = decode_data_uri(output["weights"])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = set(tar.getnames())
        caption = tar.extractfile("captions/set/img1.txt").read().decode()  # type: ignore[union-attr]
        kohya = load_file_bytes(tar.extractfile("lora_kohya.safetensors").read())  # type: ignore[union-attr]
    assert {"lora.safetensors", "lora_kohya.safetensors", "training_params.json"} <= names
    assert "embeddings.pti" not in names, "trigger_word '' trains no tokens"
    assert caption.startswith("a photo of ") and caption.endswith(" in a grid style\n"), caption
    assert all("attn2" in k for k in kohya), "only the layers the regex named"
    assert "alice/flux-json" in train_hub.repos and "README.md" in train_hub.repos["alice/flux-json"].files
    assert list(train_hub.wandb_dir.glob("wandb/offline-run-*/files/media/images/samples/*.png"))


def test_flux_trainer_json_with_the_skip_url_packages_that_lora(
    train_server: CogServer, train_hub: TrainHub, trained: TrainingResult
) -> None:
    with tarfile.open(trained.tar) as tar:
        lora = tar.extractfile("lora.safetensors").read()  # type: ignore[union-attr]
    train_hub.repos["fofr/grid"] = HfRepo({"lora.safetensors": lora})
    url = f"{train_hub.url}/fofr/grid/resolve/main/lora.safetensors"
    inputs = {**flux_trainer_json(train_hub), "skip_training_and_use_pretrained_hf_lora_url": url}
    assert list(inputs) == FLUX_TRAINER_INPUTS
    status, body = train_server.predict(inputs, path="/trainings")
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    assert "no training" in body["logs"] and "step 1/" not in body["logs"]
    _, data = decode_data_uri(body["output"]["weights"])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.extractfile("lora.safetensors").read() == lora  # type: ignore[union-attr]


def cog_sdxl_trainer_json() -> dict:
    """Every input of Replicate's SDXL trainer, as its clients send them: values changed from its
    defaults where they are honoured (a 3-step run at 256), the masks off (refused when on)."""
    return {
        "input_images": zip_data_uri(dataset()),
        "seed": 7,
        "resolution": "256",  # its integer form (768) gets coglet's 422 on this string input
        "train_batch_size": 2,
        "num_train_epochs": 3000,
        "max_train_steps": 3,
        "is_lora": True,
        "unet_learning_rate": 4e-6,
        "ti_lr": 2e-3,
        "lora_lr": 1e-3,
        "lora_rank": 8,
        "lr_scheduler": "linear",
        "lr_warmup_steps": 1,
        "token_string": "zwx",
        "caption_prefix": "a photo of zwx",
        "mask_target_prompts": "",  # no prompt: no mask, as in cog-sdxl
        "crop_based_on_salience": False,
        "use_face_detection_instead": False,
        "clipseg_temperature": 0.5,
        "verbose": False,
        "checkpointing_steps": 200,
        "input_images_filetype": "zip",
    }


def test_cog_sdxl_trainer_json_every_input_honoured_through_cog(train_server: CogServer) -> None:
    """coglet drops undeclared inputs: before they were declared, this trained 1000 steps at batch 1
    with the trigger TOK."""
    inputs = cog_sdxl_trainer_json()
    assert list(inputs) == COG_SDXL_TRAINER_INPUTS
    status, body = train_server.predict(inputs, path="/trainings")
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    logs = body["logs"]
    for line in (
        "Replicate's SDXL trainer's names: max_train_steps -> steps, train_batch_size -> batch_size, "
        "token_string -> trigger_word, caption_prefix -> autocaption_prefix, lora_lr -> learning_rate",
        "seed: 7",
        "4 images, 3 steps, batch 2, rank 8, lr 0.001, pivotal tuning on",
        "the trigger's tokens learn for the first 2 steps at lr 0.002",
        "learning rate: linear schedule, 1 warm-up step(s) from 0, then down to 0 at step 3",
        "unet_learning_rate is not used: it is cog-sdxl's rate for full fine-tuning",
        "num_train_epochs is not used",
        "verbose is not used",
        "checkpointing_steps is not used",
        "crop_based_on_salience is not used",
        "clipseg_temperature is not used",
        "model: illustrious-xl (the default here)",
        "trained 3 steps",
    ):
        assert line in logs, line
    # The linear schedule seen: the full rate after the warm-up step, 0 after the last.
    assert re.search(r"step 1/3, loss [\d.]+, lr 0\.001, ", logs) and re.search(r"step 3/3, loss [\d.]+, lr 0, ", logs)
    _, data = decode_data_uri(body["output"]["weights"])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        read = {name: tar.extractfile(name).read() for name in tar.getnames()}  # type: ignore[union-attr]
    assert json.loads(read["special_params.json"]) == {"zwx": "<s0><s1>"}
    assert "embeddings/zwx.safetensors" in read
    assert read["captions/set/img0.txt"] == b"zwx, a grid drawing of TOK\n", "a .txt caption gets the trigger in front"
    assert read["captions/set/img1.txt"].startswith(b"a photo of zwx "), "caption_prefix before the automatic caption"
    params = json.loads(read["training_params.json"])
    expected = {"steps": 3, "batch_size": 2, "lora_rank": 8, "learning_rate": 1e-3, "ti_lr": 2e-3, "seed": 7}
    expected |= {"trigger_word": "zwx", "autocaption_prefix": "a photo of zwx", "resolution": "256"}
    expected |= {"lr_scheduler": "linear", "lr_warmup_steps": 1}
    assert {k: params[k] for k in expected} == expected
    lora = load_file_bytes(read["lora.safetensors"])
    assert {v.shape[0] for k, v in lora.items() if ".down." in k} == {8}, "lora_rank 8"


def test_cog_sdxl_refusals_and_conflicts_through_cog(train_server: CogServer) -> None:
    """What cannot be honoured fails by name before any step; both spellings of one setting with two
    values fail; its integer resolution gets coglet's 422."""
    base = {"input_images": zip_data_uri(dataset()), "resolution": "256", "autocaption": False}
    for change, message in (
        ({"steps": 2, "max_train_steps": 1800}, "steps (2) and max_train_steps (1800) are both set and differ"),
        ({"steps": 2, "is_lora": False}, "is_lora false asks for full fine-tuning"),
        ({"steps": 2, "mask_target_prompts": "a photo of a dog"}, "this trainer makes no CLIPSeg masks"),
        ({"steps": 2, "use_face_detection_instead": True}, "this trainer makes no face masks"),
    ):
        status, body = train_server.predict({**base, **change}, path="/trainings")
        assert status == 200 and body["status"] == "failed", (change, body.get("logs"))
        assert "InputError: " in body["error"] and message in body["error"], body["error"]
        assert "step 1/" not in body["logs"] and "input_images:" not in body["logs"], "refused before the archive"
    status, body = train_server.predict({**base, "train_batch_size": 9}, path="/trainings")
    assert status == 422, body
    status, body = train_server.predict({**base, "resolution": 768}, path="/trainings")
    assert status == 422 and body["detail"][0]["loc"][-1] == "resolution", body
    assert '768 is not of type "string"' in body["detail"][0]["msg"], body


@pytest.mark.parametrize(
    ("sent", "flux", "message"),
    [
        ({"max_train_steps": 1800}, {"steps": 500}, r"steps \(500\) and max_train_steps \(1800\) are both set"),
        ({"train_batch_size": 4}, {"batch_size": 2}, r"batch_size \(2\) and train_batch_size \(4\)"),
        ({"token_string": "zwx"}, {"trigger_word": "abc"}, r"trigger_word \('abc'\) and token_string \('zwx'\)"),
        ({"caption_prefix": "a photo of"}, {"autocaption_prefix": "a drawing of"}, "and caption_prefix"),
        ({"lora_lr": 1e-4}, {"learning_rate": 4e-4}, r"learning_rate \(0.0004\) and lora_lr \(0.0001\)"),
        ({"is_lora": False}, {}, "is_lora false asks for full fine-tuning, which this trainer does not do"),
        ({"mask_target_prompts": "a dog"}, {}, "mask_target_prompts 'a dog': this trainer makes no CLIPSeg masks"),
        ({"use_face_detection_instead": True}, {}, "use_face_detection_instead true: this trainer makes no face"),
        ({"input_images_filetype": "tar"}, {}, "input_images_filetype is 'tar' but input_images is a zip archive"),
        ({"input_images_filetype": "rar"}, {}, "input_images_filetype 'rar' is not known: use one of zip, tar"),
        ({"lora_lr": 0.0}, {}, "lora_lr must be above 0"),
        ({"ti_lr": 0.0}, {}, "ti_lr must be above 0"),
        ({"lr_scheduler": "cosine"}, {}, "lr_scheduler 'cosine' is not known: use one of constant, linear"),
        ({"lr_warmup_steps": 6001}, {}, "lr_warmup_steps must be between 0 and 6000"),
    ],
)
def test_cog_sdxl_names_are_refused_by_name_before_any_step(
    sent: dict, flux: dict, message: str, weights_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = replace(_small(tmp_path), **flux)
    with pytest.raises(InputError, match=message):
        train(cog_sdxl.apply(request, CogSdxlInputs(**sent)), weights_dir, tmp_path / "out")
    assert "step 1/" not in caplog.text
    assert not (tmp_path / "out").exists()


def test_cog_sdxl_names_map_onto_flux_settings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Flux name at its default counts as not sent (Cog fills defaults in); the same value under
    both names is one setting; an empty mask prompt is no mask, as in cog-sdxl; nothing sent, nothing
    changed or logged."""
    caplog.set_level(logging.INFO)
    plain = _small(tmp_path)
    assert cog_sdxl.apply(plain, CogSdxlInputs()) is plain and not caplog.text
    at_defaults = replace(plain, steps=1000, batch_size=1, trigger_word="TOK")
    sent = CogSdxlInputs(max_train_steps=1800, train_batch_size=4, token_string="zwx", lora_lr=3e-4, is_lora=True)
    mapped = cog_sdxl.apply(at_defaults, sent)
    assert (mapped.steps, mapped.batch_size, mapped.trigger, mapped.learning_rate) == (1800, 4, "zwx", 3e-4)
    same = cog_sdxl.apply(replace(plain, steps=1800), CogSdxlInputs(max_train_steps=1800, mask_target_prompts=" "))
    assert same.steps == 1800
    (tmp_path / "a.png").write_bytes(encoded(grid(64, 64)))
    tar = _tar(tmp_path / "set.tar", lambda t: t.add(tmp_path / "a.png", "set/a.png"))
    assert cog_sdxl.apply(replace(plain, input_images=tar), CogSdxlInputs(input_images_filetype="tar"))
    settings = cog_sdxl.apply(plain, CogSdxlInputs(ti_lr=1e-3, lr_scheduler="constant", lr_warmup_steps=0))
    assert (settings.ti_lr, settings.lr_scheduler, settings.lr_warmup_steps) == (1e-3, "constant", 0)


@pytest.mark.parametrize(
    ("scheduler", "warmup", "rates"),
    [
        (None, None, [1.0, 1.0, 1.0, 1.0, 1.0]),  # unasked: 10% of 5 steps rounds to a 1-step warm-up that learns
        ("constant", 2, [0.0, 0.5, 1.0, 1.0, 1.0]),  # kept, where diffusers' plain "constant" has none
        ("constant", 0, [1.0] * 5),
        ("linear", 1, [0.0, 1.0, 0.75, 0.5, 0.25]),
        (None, 4, [0.0, 0.25, 0.5, 0.75, 1.0]),  # a warm-up alone: constant after it
    ],
)
def test_lr_scheduler_and_warmup_give_the_schedule(scheduler: str | None, warmup: int | None, rates: list) -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    request = TrainingRequest(steps=5, lr_scheduler=scheduler, lr_warmup_steps=warmup)
    schedule = trainer._lr_schedule(optimizer, request)
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx(rates)


def zip_data_uri(files: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return "data:application/zip;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def cog_trained(train_server: CogServer) -> dict:
    """One training through the Cog runtime, as `cog train -i input_images=@photos.zip` sends it."""
    inputs = {"input_images": zip_data_uri(dataset()), "steps": 3, "resolution": "256", "seed": 1}
    status, body = train_server.predict(inputs, path="/trainings")
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    return body


def test_cog_train_returns_the_tar(cog_trained: dict) -> None:
    _, data = decode_data_uri(cog_trained["output"]["weights"])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert {"lora.safetensors", "embeddings.pti", "special_params.json"} <= set(tar.getnames())
    logs = cog_trained["logs"]
    assert "step 3/3, loss" in logs and "it/s" in logs
    assert "autocaption (WD tagger): 3 caption(s)" in logs, "img0 brings its own caption; the tagger writes the rest"


def test_cog_predict_uses_the_tar_with_its_trigger_word(cog_trained: dict, cog_server: CogServer) -> None:
    _, data = decode_data_uri(cog_trained["output"]["weights"])
    host = file_host({"me/trained_model.tar": data})
    request = {"prompt": "a photo of TOK", "num_inference_steps": 2, "seed": 5, "output_format": "png"}
    try:
        _, base = cog_server.predict(request)
        _, tuned = cog_server.predict({**request, "lora_weights": f"{host.url}/me/trained_model.tar"})
    finally:
        host.close()
    assert tuned["status"] == "succeeded", tuned.get("error")
    assert "LoRAs active" in tuned["logs"]
    assert decode_data_uri(base["output"][0])[1] != decode_data_uri(tuned["output"][0])[1]


def test_the_training_schema_has_the_flux_trainers_inputs_in_its_order() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    props = schema["components"]["schemas"]["TrainingInput"]["properties"]
    assert list(props) == [*FLUX_TRAINER_INPUTS, "model", "train_text_encoder", "seed", *COG_SDXL_ONLY]
    assert all(props[name]["default"] is None and props[name]["nullable"] for name in COG_SDXL_ONLY)
    assert "required" not in schema["components"]["schemas"]["TrainingInput"], "input_images is optional, as Flux's"
    assert (props["steps"]["minimum"], props["steps"]["maximum"], props["trigger_word"]["default"]) == (1, 6000, "TOK")
    assert props["hf_token"]["format"] == props["wandb_api_key"]["format"] == "password"
    assert "/trainings" in schema["paths"] and "/predictions" in schema["paths"]


def test_predict_never_loads_the_captioner() -> None:
    code = "import sys, predict; sys.exit('training' in sys.modules or 'transformers.models.blip' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=False).returncode == 0


def test_cog_train_refuses_bad_inputs(train_server: CogServer) -> None:
    status, body = train_server.predict({"input_images": zip_data_uri(dataset()), "steps": 0}, path="/trainings")
    assert status == 422, body
    status, body = train_server.predict({"input_images": zip_data_uri({"notes.md": b"x"})}, path="/trainings")
    assert status == 200 and body["status"] == "failed"
    assert "InputError: input_images holds no images" in body["error"]


def test_cog_train_never_reads_a_server_path(train_server: CogServer, tmp_path: Path) -> None:
    """input_images as a server path (an archive that exists, one that does not, a system file) gets
    one refusal before any file is opened, as predict's image inputs do (issue 24)."""
    archive = tmp_path / "set.zip"
    archive.write_bytes(base64.b64decode(zip_data_uri(dataset()).split(",", 1)[1]))
    errors = set()
    for path in (str(archive), str(tmp_path / "missing.zip"), "/etc/passwd"):
        status, body = train_server.predict({"input_images": path, "steps": 1}, path="/trainings")
        assert status == 200 and body["status"] == "failed", body
        errors.add(body["error"].replace(path, "PATH"))
    assert len(errors) == 1, errors
    assert "input_images is a path on the server" in errors.pop()


def _tar(path: Path, add: Callable[[tarfile.TarFile], None]) -> Path:
    with tarfile.open(path, "w") as tar:
        add(tar)
    return path


def _symlink(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("set/link.png")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    tar.addfile(info)


BAD_ARCHIVES = {
    "no images": ({"notes.md": b"hello"}, "input_images holds no images"),
    "corrupt": ({**dataset(), "set/broken.jpg": b"\xff\xd8\xff not a jpeg"}, "set/broken.jpg could not be read"),
    "gif": ({**dataset(), "set/anim.gif": encoded(grid(8, 8), "GIF")}, "set/anim.gif is a GIF file"),
    "dotdot": ({**dataset(), "../evil.png": encoded(grid(8, 8))}, "'../evil.png' points outside the archive"),
    "absolute": ({**dataset(), "/tmp/evil.png": encoded(grid(8, 8))}, "'/tmp/evil.png' has an absolute path"),
    "too few": (dataset(2), "holds 2 image(s): training needs at least 4"),
    "same name": ({**dataset(), "set/img1.png": encoded(grid(8, 8))}, "set/img1.png and set/img1.jpg share a name"),
    "too many files": ({**dataset(), **{f"x/{i}.md": b"" for i in range(20)}}, "holds more than 16 files"),
    "zip bomb": ({**dataset(), "set/zeros.txt": bytes(1 << 20)}, "unpacks to more than 0.5 MiB"),
}


@pytest.mark.parametrize("case", list(BAD_ARCHIVES))
def test_bad_archives_are_refused_by_name(case: str, tmp_path: Path) -> None:
    files, message = BAD_ARCHIVES[case]
    (tmp_path / "work").mkdir()
    archive = make_zip(tmp_path / "work" / "in.zip", files)
    limits = ArchiveLimits(max_entries=16, max_bytes=2**19)
    with pytest.raises(InputError, match="input_images") as err:
        read_archive(archive, limits)
    assert message in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["in.zip", "work"], "nothing was extracted"


def test_images_are_read_upright_and_reduced_to_the_largest_resolution(tmp_path: Path) -> None:
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to view
    grid(900, 600).save(rotated, "JPEG", exif=exif)
    files = {**dataset(), "set/phone.jpg": rotated.getvalue(), "set/small.png": encoded(grid(40, 30))}
    images = {i.name: i.image for i in read_archive(make_zip(tmp_path / "in.zip", files), short_side=300)}
    assert images["set/phone.jpg"].size == (300, 450), "upright, shorter side reduced to 300"
    assert images["set/small.png"].size == (40, 30), "never enlarged"


def test_a_tar_bomb_stops_at_its_declared_sizes(tmp_path: Path) -> None:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("zeros.md")  # not an image: skipped, but its bytes are still read through
        info.size = 1 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))

    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        add(tar)
    with pytest.raises(InputError, match=r"unpacks to more than 0\.5 MiB"):
        read_archive(bomb, ArchiveLimits(max_bytes=2**19))


def test_tar_links_and_non_archives_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"'set/link\.png' is a link or special file"):
        read_archive(_tar(tmp_path / "links.tar", _symlink))
    (tmp_path / "photo.png").write_bytes(encoded(grid(8, 8)))
    with pytest.raises(InputError, match=r"must be a \.zip or \.tar archive"):
        read_archive(tmp_path / "photo.png")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trigger_word": "two\nlines"}, "trigger_word must be one line"),
        ({"trigger_word": "<s0>"}, "holds <s0>-style tokens"),
        ({"trigger_word": "a zqxjvkwpfhgb", "train_text_encoder": False}, "'zqxjvkwpfhgb' is split by the tokenizer"),
        ({"input_images": None}, "input_images is required"),
        ({"optimizer": "sgd"}, "optimizer 'sgd' is not known: use one of prodigy"),
        ({"layers_to_optimize_regex": "(7|12"}, "layers_to_optimize_regex '\\(7\\|12' is not a valid regular"),
        (
            {"layers_to_optimize_regex": "transformer.single_transformer_blocks.(7|12|16|20).proj_out"},
            "matches none of this UNet's 88 attention layers \\(SDXL's, not Flux's",
        ),
        ({"hf_repo_id": "alice/lora"}, "hf_repo_id is set but hf_token is not"),
        ({"hf_repo_id": "not a repo", "hf_token": "hf_x"}, "is not a Hugging Face repository id"),
        ({"steps": 0}, "steps must be between 1 and 6000"),
        ({"steps": 6001}, "steps must be between 1 and 6000"),
        ({"lora_rank": 0}, "lora_rank must be between 1 and 128"),
        ({"lora_rank": 129}, "lora_rank must be between 1 and 128"),
        ({"learning_rate": 0.0}, "learning_rate must be above 0"),
        ({"resolution": "1024,big"}, "resolution must be comma-separated sizes"),
        ({"resolution": "64"}, "resolution must be comma-separated sizes"),
        ({"model": "custom"}, "no custom checkpoint is baked"),
    ],
)
def test_bad_settings_fail_before_any_step(
    change: dict, message: str, weights_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    archive = make_zip(tmp_path / "in.zip", dataset())
    request = TrainingRequest(archive, steps=2, resolution="256", autocaption=False)
    request = TrainingRequest(**{**request.__dict__, **change})
    with pytest.raises(InputError, match=message):
        train(request, weights_dir, tmp_path / "out")
    assert "step 1/" not in caplog.text
    assert not (tmp_path / "out").exists()


WRITE_TOKEN = "hf_write_0123456789abcdef"


def _small(tmp_path: Path, **change: object) -> TrainingRequest:
    """A two-step training on the tiny model, for what happens around the steps."""
    archive = make_zip(tmp_path / "in.zip", dataset())
    return replace(TrainingRequest(archive, steps=2, resolution="256", autocaption=False, seed=1), **change)


def test_the_result_is_uploaded_to_hf_repo_id_with_a_model_card(
    weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    repos: dict[str, HfRepo] = {}
    hub = hugging_face(repos, write_token=WRITE_TOKEN)
    point_hub_client_at(hub, monkeypatch)
    try:
        result = train(
            _small(tmp_path, hf_repo_id="alice/grid-lora", hf_token=WRITE_TOKEN), weights_dir, tmp_path / "out"
        )
    finally:
        hub.close()
    assert result.hf_upload_error is None and result.hf_repo_url == f"{hub.url}/alice/grid-lora"
    files = repos["alice/grid-lora"].files
    with tarfile.open(result.tar) as tar:
        assert files["lora.safetensors"] == tar.extractfile("lora.safetensors").read()  # type: ignore[union-attr]
        assert files["embeddings/TOK.safetensors"] == tar.extractfile("embeddings/TOK.safetensors").read()  # type: ignore[union-attr]
    assert not any(name.startswith("captions/") for name in files), "captions stay private, as Flux's trainer"
    card = files["README.md"].decode()
    assert 'instance_prompt: "TOK"' in card and "base_model: OnomaAIResearch/Illustrious-xl-early-release-v0" in card
    assert "Write `TOK` in your prompt" in card and "`lora_kohya.safetensors`" in card
    assert WRITE_TOKEN not in caplog.text and "uploaded to" in caplog.text


def test_a_failed_upload_is_reported_and_the_tar_still_returned(
    weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hub = hugging_face({}, write_token=WRITE_TOKEN)
    point_hub_client_at(hub, monkeypatch)
    wrong = "hf_readonly_0123456789abcdef"
    try:
        result = train(_small(tmp_path, hf_repo_id="alice/grid-lora", hf_token=wrong), weights_dir, tmp_path / "out")
    finally:
        hub.close()
    assert result.hf_repo_url is None and result.tar.is_file()
    assert result.hf_upload_error is not None
    assert "upload to Hugging Face repository alice/grid-lora failed" in result.hf_upload_error
    assert "Check that hf_token has write access" in result.hf_upload_error
    assert result.hf_upload_error in caplog.text and "the trained tar is returned all the same" in caplog.text
    assert wrong not in caplog.text and wrong not in result.hf_upload_error
    # A hub that cannot be reached (a network error, not an HTTP answer) is reported the same way.
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # closed above
    again = train(_small(tmp_path, hf_repo_id="alice/grid-lora", hf_token=wrong), weights_dir, tmp_path / "out2")
    assert again.tar.is_file() and again.hf_upload_error is not None
    assert "upload to Hugging Face repository alice/grid-lora failed: ConnectError" in again.hf_upload_error


def test_skip_training_packages_a_hub_lora_as_the_output(
    trained: TrainingResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with tarfile.open(trained.tar) as tar:
        lora = tar.extractfile("lora.safetensors").read()  # type: ignore[union-attr]
    hub = hugging_face({"fofr/sdxl-grid": HfRepo({"lora.safetensors": lora}, token="hf_read_0123456789")})
    point_hub_client_at(hub, monkeypatch)
    url = f"{hub.url}/fofr/sdxl-grid/resolve/main/lora.safetensors"
    try:
        request = TrainingRequest(skip_training_and_use_pretrained_hf_lora_url=url, hf_token="hf_read_0123456789")
        result = train(request, Path("/nonexistent-weights"), tmp_path / "out")
        with pytest.raises(InputError, match="repository fofr/sdxl-grid was not found \\(or is private: pass hf_token"):
            train(replace(request, hf_token=None), Path("/nonexistent-weights"), tmp_path / "out2")
        missing = url.replace("lora.safetensors", "other.safetensors")
        with pytest.raises(InputError, match=r"other\.safetensors at revision main is not in fofr/sdxl-grid"):
            train(replace(request, skip_training_and_use_pretrained_hf_lora_url=missing), Path("/x"), tmp_path / "o3")
    finally:
        hub.close()
    with tarfile.open(result.tar) as tar:
        assert sorted(tar.getnames()) == ["lora.safetensors", "training_params.json"]
        assert tar.extractfile("lora.safetensors").read() == lora  # type: ignore[union-attr]
    assert "no training" in caplog.text and "step 1/" not in caplog.text
    with pytest.raises(InputError, match=r"must be a Hugging Face file URL ending in \.safetensors"):
        train(
            replace(request, skip_training_and_use_pretrained_hf_lora_url="https://example.com/x.bin"),
            Path("/x"),
            tmp_path,
        )


def test_wandb_logs_loss_samples_and_weights(
    weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wandb's offline mode writes the run where an online one would upload it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    key = "0123456789abcdef0123456789abcdef01234567"
    request = _small(
        tmp_path,
        wandb_api_key=key,
        wandb_project="grids",
        wandb_run="first",
        wandb_sample_prompts="a photo of TOK\n\na grid",
        wandb_sample_interval=2,
        wandb_save_interval=1,
    )
    train(request, weights_dir, tmp_path / "out")
    (run,) = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")
    records = b""
    for _ in range(100):  # wandb's service process writes the records file a moment after finish() returns
        records = next(run.glob("run-*.wandb")).read_bytes()
        if b"loss" in records:
            break
        time.sleep(0.1)
    assert b"loss" in records and b"grids" in records
    assert len(list((run / "files" / "media" / "images").rglob("*.png"))) == 2, "two prompts sampled at step 2"
    assert {p.name for p in (run / "files").glob("*.safetensors")} == {"lora-step1.safetensors", "lora.safetensors"}
    for path in (tmp_path / "wandb-dir").rglob("*"):
        assert not path.is_file() or key.encode() not in path.read_bytes(), f"the key is written in {path}"


@pytest.fixture(scope="module")
def tiny_pipe(weights_dir: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(weights_dir / "illustrious-xl", local_files_only=True)


def _encoded(pipe: StableDiffusionXLPipeline, text: str) -> torch.Tensor:
    return trainer._encode_prompts(pipe, [text])[0]


def test_pivotal_tuning_trains_the_new_rows_only(weights_dir: Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(weights_dir / "illustrious-xl", local_files_only=True)
    pipe.text_encoder.requires_grad_(False)
    pipe.text_encoder_2.requires_grad_(False)
    before = _encoded(pipe, "a photo of a dog")
    pivotal = trainer._Pivotal(pipe, torch.Generator().manual_seed(0))
    assert [tuple(p.shape) for p in pivotal.parameters()] == [(2, 32), (2, 64)], "two rows per encoder, no matrix"
    assert torch.equal(_encoded(pipe, "a photo of a dog"), before), "text without the tokens encodes as before"
    _encoded(pipe, f"a photo of {pivotal.text}").sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pivotal.parameters())
    assert not any(p.requires_grad for p in (*pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters()))

    with torch.no_grad():
        for rows in pivotal.rows:
            rows.mul_(10)
    ratios = [r.norm(dim=1) / n for r, n in zip(pivotal.rows, pivotal.norms, strict=True)]
    pivotal.pull_back()
    for rows, norm, ratio in zip(pivotal.rows, pivotal.norms, ratios, strict=True):
        torch.testing.assert_close(rows.norm(dim=1) / norm, ratio ** (1 - TRAIN_EMBEDDING_NORM_PULL))
    pivotal.stop()
    assert not pivotal.learning and all(not p.requires_grad and p.grad is None for p in pivotal.parameters())


def test_token_training_stops_at_its_fraction(
    weights_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    train(_small(tmp_path, steps=4), weights_dir, tmp_path / "out")
    assert "the trigger's tokens learn for the first 2 steps" in caplog.text


def test_the_trigger_stays_within_the_first_77_tokens(tiny_pipe: StableDiffusionXLPipeline) -> None:
    long = "a " * 80 + "photo of TOK"
    short = "a photo of TOK " + "a " * 80
    assert trainer._trigger_up_front(tiny_pipe.tokenizer, [long, short], "TOK") == [f"TOK, {long}", short]
    assert trainer._trigger_up_front(tiny_pipe.tokenizer, [long], "") == [long], "no trigger, nothing moved"


def test_trigger_placeholder_and_any_letter_case() -> None:
    blank = Image.new("RGB", (8, 8))
    images = [
        TrainingImage("a.png", blank, "[trigger] on a beach"),
        TrainingImage("b.png", blank, "a tok drawing"),
        TrainingImage("c.png", blank, "My Dog runs, [TRIGGER]"),
    ]
    assert caption_all(images, "TOK", "", "", None) == ["TOK on a beach", "a tok drawing", "My Dog runs, TOK"]
    assert caption_all(images[2:], "my dog", "", "", None) == ["My Dog runs, my dog"]
    assert caption_all(images, "", "", "", None) == ["on a beach", "a tok drawing", "My Dog runs,"]
    assert caption_all([TrainingImage("d.png", blank, None)], "", "", "", None) == [""], "no trigger: no caption"


def test_each_epoch_uses_every_latent_once() -> None:
    def item(k: int) -> trainer.Item:
        return trainer.Item(k, (0, 0, 0, 0, 0, 0), (4, 8, 8))

    groups = {(64, 64): [item(k) for k in range(5)], (96, 48): [item(k) for k in range(5, 8)]}
    batches = trainer._batches(groups, 2, torch.Generator().manual_seed(0))
    for _ in range(3):  # three epochs of ceil(5/2) + ceil(3/2) batches
        epoch = [next(batches) for _ in range(5)]
        assert sorted(i.caption for b in epoch for i in b) == list(range(8))
        assert all(len({i.caption < 5 for i in b}) == 1 for b in epoch), "a batch comes from one bucket"


def test_the_min_snr_weight_is_finite_at_zero_terminal_snr() -> None:
    t = torch.tensor([0, 500, 999])
    for prediction, last in (("epsilon", 1.0), ("v_prediction", 0.0)):
        scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction)
        assert scheduler.alphas_cumprod[999] == 0, "the last timestep is pure noise"
        weights = trainer._snr_weights(scheduler, t)
        assert torch.isfinite(weights).all() and abs(weights[-1].item() - last) < 1e-6
        assert (weights >= 0).all() and (weights <= 1).all()


def test_eight_bit_optimizers_are_refused_by_name_on_apple_silicon() -> None:
    """Issue 25: on MPS an 8-bit name fails before any work, naming what to send; on CUDA and on
    this CPU every name passes (the CPU runs the 32-bit one and says so)."""
    for name in ("adamw8bit", "adam8bit", "lion8bit"):
        with pytest.raises(InputError, match=rf"optimizer {name} needs bitsandbytes on a CUDA GPU.*MPS"):
            refuse_where_it_cannot_run(name, "mps")
    for name in OPTIMIZERS:
        refuse_where_it_cannot_run(name, "cuda")
        refuse_where_it_cannot_run(name, "cpu")
        if not name.endswith("8bit"):
            refuse_where_it_cannot_run(name, "mps")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_name_lowers_a_loss(name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16))
    target = torch.randn(16)
    optimizer = build_optimizer(name, [{"params": [weight], "lr": 1e-2, "weight_decay": 0.0}], eight_bit_here=False)
    first = None
    for _ in range(60):
        loss = ((weight - target) ** 2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < first * 0.9, (name, first, loss.item())
    if name.endswith("8bit"):
        assert "8-bit optimizers need a CUDA GPU: running" in caplog.text
    else:
        assert f"optimizer: {name}" in caplog.text


def test_the_kohya_lora_and_a1111_embedding_give_the_tars_image(
    engine: Engine, trained: TrainingResult, tmp_path: Path
) -> None:
    """What A1111 / Forge / ComfyUI users load (kohya LoRA + embedding named after the trigger), here
    through `lora_weights` and `embeddings`, gives the image the trained tar gives."""
    with tarfile.open(trained.tar) as tar:
        for name in ("lora_kohya.safetensors", "embeddings/TOK.safetensors", "embeddings.pti"):
            (tmp_path / Path(name).name).write_bytes(tar.extractfile(name).read())  # type: ignore[union-attr]
    embedding, rows = load_file(tmp_path / "TOK.safetensors"), load_file(tmp_path / "embeddings.pti")
    assert torch.equal(embedding["clip_l"], rows["text_encoders_0"])
    assert torch.equal(embedding["clip_g"], rows["text_encoders_1"])
    host = file_host({"me/trained_model.tar": trained.tar.read_bytes()})
    with_store = Engine(engine.models, engine.safety, LoraStore(tmp_path / "cache", Downloader("python")), engine.swap)
    request = GenerationRequest(prompt="a photo of TOK", num_inference_steps=4, seed=3)
    try:
        from_tar = with_store.generate(replace(request, loras=(LoraSpec(f"{host.url}/me/trained_model.tar", 1.0),)))
    finally:
        host.close()
    elsewhere = with_store.generate(
        replace(
            request,
            loras=(LoraSpec(str(tmp_path / "lora_kohya.safetensors"), 1.0),),
            embeddings=(str(tmp_path / "TOK.safetensors"),),
        )
    )
    plain = with_store.generate(request)
    a, b, c = (np.asarray(r[0].image, dtype=np.int16) for r in (from_tar, elsewhere, plain))
    assert np.abs(a - c).max() > 5
    assert np.array_equal(a, b), "the same LoRA and tokens, in other tools' layouts"


def test_autocaption_writes_tags_for_illustrious_and_sentences_for_sdxl(
    weights_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    files = {**dataset(), "set/red.png": encoded(Image.new("RGB", (64, 64), (255, 0, 0)))}
    archive = make_zip(tmp_path / "red.zip", files)  # _small writes its own in.zip
    no_tagger = tmp_path / "no-tagger"
    no_tagger.mkdir()
    for name in ("illustrious-xl", "captioner"):
        (no_tagger / name).symlink_to(weights_dir / name)
    captions = {}
    for key, model, root in (("tags", "illustrious-xl", weights_dir), ("sdxl", "sdxl", weights_dir)):
        request = replace(_small(tmp_path), input_images=archive, autocaption=True, model=model, steps=1)
        result = train(replace(request, autocaption_prefix="a photo of"), root, tmp_path / key)
        with tarfile.open(result.tar) as tar:
            captions[key] = tar.extractfile("captions/set/red.txt").read().decode()  # type: ignore[union-attr]
    assert captions["tags"] == "TOK, a photo of kagamine rin, red theme, ^_^\n", "character, then general by confidence"
    assert "red theme" not in captions["sdxl"] and captions["sdxl"].startswith("TOK, a photo of ")
    assert "autocaption (WD tagger): 4 caption(s)" in caplog.text and "autocaption: 4 caption(s)" in caplog.text
    train(replace(_small(tmp_path), input_images=archive, autocaption=True, steps=1), no_tagger, tmp_path / "x")
    assert "no WD tagger is baked (weights/tagger): illustrious-xl gets natural-language captions" in caplog.text


def test_the_tagger_reads_images_as_its_authors_feed_it(weights_dir: Path) -> None:
    """White behind transparency and around a non-square image; BGR; rating tags left out."""
    images = [Image.new("RGBA", (20, 20), (0, 0, 0, 0)), Image.new("RGB", (40, 8), (0, 0, 255))]
    see_through, wide_blue = tagger.tag_captions(weights_dir, images)
    assert see_through == "kagamine rin, white background, ^_^"
    tags = wide_blue.split(", ")
    assert "blue theme" in tags and "red theme" not in tags, "blue read as blue: BGR as the model expects"
    assert "white background" in tags, "padded with white to a square, not stretched"
    assert "general" not in see_through.split(", "), "the rating tag is not a caption tag"
