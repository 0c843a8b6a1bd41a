"""The committed OpenAPI schema is current, and every Flux dev-lora input keeps Flux's contract."""

import json
from typing import Optional

import pytest
from cog import Path as CogPath

from scripts.cog_schema import SCHEMA_PATH, render
from scripts.run_predictor import _coerce

# name: (type, default, minimum, maximum) as flux-dev-lora declares them.
FLUX_INPUTS = {
    "prompt": ("string", None, None, None),
    "aspect_ratio": ("string", "1:1", None, None),
    "image": ("string", None, None, None),
    "prompt_strength": ("number", 0.8, 0, 1),
    "num_outputs": ("integer", 1, 1, 4),
    "num_inference_steps": ("integer", 28, 1, 50),
    "guidance": ("number", 3, 0, 10),
    "seed": ("integer", None, None, None),
    "output_format": ("string", "webp", None, None),
    "output_quality": ("integer", 80, 0, 100),
    "disable_safety_checker": ("boolean", False, None, None),
    "go_fast": ("boolean", True, None, None),
    "lora_weights": ("string", None, None, None),
    "lora_scale": ("number", 1.0, -1, 3),
    "extra_lora": ("string", None, None, None),
    "extra_lora_scale": ("number", 1.0, -1, 3),
    "megapixels": ("string", "1", None, None),
    "hf_api_token": ("string", None, None, None),
    "civitai_api_token": ("string", None, None, None),
}


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def test_committed_schema_is_not_stale() -> None:
    assert SCHEMA_PATH.read_text() == render(), "run `make schema`"


def test_flux_inputs_come_first_in_flux_order(schema: dict) -> None:
    props = schema["components"]["schemas"]["Input"]["properties"]
    ordered = sorted(props, key=lambda name: props[name]["x-order"])
    assert ordered[: len(FLUX_INPUTS)] == list(FLUX_INPUTS)


@pytest.mark.parametrize("name", list(FLUX_INPUTS))
def test_flux_input_contract(schema: dict, name: str) -> None:
    schemas = schema["components"]["schemas"]
    prop = schemas["Input"]["properties"][name]
    kind, default, minimum, maximum = FLUX_INPUTS[name]
    declared = schemas[name]["type"] if "allOf" in prop else prop["type"]
    assert declared == kind
    assert prop.get("default") == default
    assert prop.get("minimum") == minimum and prop.get("maximum") == maximum


def test_only_prompt_is_required(schema: dict) -> None:
    assert schema["components"]["schemas"]["Input"]["required"] == ["prompt"]


def test_choices(schema: dict) -> None:
    schemas = schema["components"]["schemas"]
    assert schemas["aspect_ratio"]["enum"] == [
        "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom",
    ]  # fmt: skip
    assert schemas["output_format"]["enum"] == ["webp", "jpg", "png"]
    assert {"1", "0.25", "0.5"} <= set(schemas["megapixels"]["enum"])
    assert schemas["model"]["enum"] == ["illustrious-xl", "sdxl", "custom"]
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "DDIM", "UniPC"} <= set(
        schemas["scheduler"]["enum"]
    )


def test_tokens_are_secrets(schema: dict) -> None:
    props = schema["components"]["schemas"]["Input"]["properties"]
    for name in ("hf_api_token", "civitai_api_token"):
        assert props[name]["x-cog-secret"] is True and props[name]["format"] == "password"


def test_the_local_runner_reads_list_inputs_one_flag_per_item() -> None:
    """`scripts/run_predictor.py` (the stand-in for `cog predict`) turns repeated `-i` flags of a
    list input into the list, and refuses two values for a single one."""
    assert _coerce(["@a.png", "@b.png"], Optional[list[CogPath]]) == [CogPath("a.png"), CogPath("b.png")]
    assert _coerce(["@a.png"], Optional[list[CogPath]]) == [CogPath("a.png")]
    assert _coerce(["3"], int) == 3 and _coerce(["true"], bool) is True
    with pytest.raises(SystemExit, match="one value expected, got 2"):
        _coerce(["1", "2"], int)
