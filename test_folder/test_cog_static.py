"""`cog build` reads predict.py and train.py without importing them: that reading must equal the tested schema.

scripts/cog_static_schema.py ports cog's reading rules (replicate/cog pkg/schema/python at commit
6110c912377d4ded0f57165d305821a14a9a4418); the tests and scripts/cog_schema.py read the schema by
importing. The image label holds the static reading, and coglet validates against it on
Replicate, so the two must agree field by field, and the literals must agree with the engine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from cog_static_schema import COG_COMMIT, StaticSchemaError, read_file, read_inputs  # noqa: E402

SCHEMA = json.loads((REPO_ROOT / ".cog" / "openapi_schema.json").read_text())
TARGETS = {"predict": ("predict.py", "Predictor", "Input"), "train": ("train.py", "train", "TrainingInput")}
COMPARED = ("x-order", "default", "nullable", "description", "minimum", "maximum")
COMPARED += ("minLength", "maxLength", "pattern", "deprecated", "x-cog-accept")


def _read(source: str) -> dict:
    return {item.name: item for item in read_inputs(f"from cog import Input\n{source}", "predict")}


# The port, held to cases from cog's own parser tests and the rules the issue names.


def test_the_port_names_the_commit_it_was_read_from() -> None:
    assert COG_COMMIT.startswith("6110c912")


def test_choices_resolve_from_literals_scope_lists_dict_keys_and_plus() -> None:
    inputs = _read(
        'SIZES = {"small": 256, "large": 1024}\nBASE = ["a", "b"]\nPAIR = ("x", "y")\n'
        "def predict(s: str = Input(choices=list(SIZES.keys()) + ['custom']), b: str = Input(choices=BASE + ['c']),"
        " v: int = Input(choices=list(SIZES.values())), t: str = Input(choices=PAIR)) -> str: ...\n"
    )
    assert [c.to_json() for c in inputs["s"].choices] == ["small", "large", "custom"]
    assert [c.to_json() for c in inputs["b"].choices] == ["a", "b", "c"]
    assert [c.to_json() for c in inputs["v"].choices] == [256, 1024]
    assert [c.to_json() for c in inputs["t"].choices] == ["x", "y"]


@pytest.mark.parametrize(
    "choices",
    [
        "[*BASE, 'c']",
        "list(BASE)",
        "IMPORTED",
        "list(TUPLE)",
        "('a', 'b')",
        "[f'{i}' for i in 'ab']",
        "['a',  # a comment is a node of the list\n 'b']",
    ],
)
def test_choices_cog_cannot_read_stop_the_build(choices: str) -> None:
    with pytest.raises(StaticSchemaError, match="choices expression"):
        _read(f"BASE = ['a']\nTUPLE = ('a',)\ndef predict(x: str = Input(choices={choices})) -> str: ...\n")


def test_unreadable_default_is_none_so_a_plain_input_becomes_required() -> None:
    inputs = _read(
        "from engine.config import DEFAULT\nLOCAL = 'b'\n"
        "def predict(a: str = Input(default=DEFAULT), b: str = Input(default=LOCAL), c: float = Input(default=-0.5),"
        " d: int = Input(default=1_000), e: str = Input(default=str(1))) -> str: ...\n"
    )
    assert inputs["a"].default.kind == "none" and inputs["e"].default.kind == "none"
    assert (inputs["b"].default.data, inputs["c"].default.data, inputs["d"].default.data) == ("b", -0.5, 1000)


def test_ranges_must_be_number_literals() -> None:
    inputs = _read(
        "LIMIT = 4\ndef predict(a: int = Input(ge=-1, le=1e2), b: int = Input(ge=0, le=LIMIT),"
        " c: int = Input(le=(4)), d: int = Input(le=1_000)) -> int: ...\n"
    )
    assert (inputs["a"].ge, inputs["a"].le) == (-1, 100)
    assert (inputs["b"].ge, inputs["b"].le) == (0, None)
    assert inputs["c"].le is None and inputs["d"].le is None


def test_descriptions_are_the_raw_text_between_the_quotes() -> None:
    inputs = _read(
        "HELP = 'from scope'\nN = 3\n"
        "def predict(a: str = Input(description='one ' 'two'), b: str = Input(description=f'{N} steps'),"
        " c: str = Input(description=('paren')), d: str = Input(description='it\\'s'),"
        " e: str = Input(description=HELP), f: str = Input(description='''triple'''),"
        " g: str = Input(description=r'a\\.b')) -> str: ...\n"
    )
    assert inputs["a"].description == "one ' 'two"
    assert inputs["b"].description is None and inputs["c"].description is None
    assert inputs["d"].description == "it\\'s"
    assert (inputs["e"].description, inputs["f"].description) == ("from scope", "triple")
    assert inputs["g"].description == "a\\.b"  # a raw string reads as Python reads it


# The project's own files.


def _imported(kind: str) -> tuple[dict, list, dict]:
    component = SCHEMA["components"]["schemas"][TARGETS[kind][2]]
    enums = {}
    for name, prop in component["properties"].items():
        if "allOf" in prop:
            enums[name] = SCHEMA["components"]["schemas"][prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]["enum"]
    return component["properties"], component.get("required", []), enums


@pytest.mark.parametrize("kind", TARGETS)
def test_cog_build_reads_the_schema_the_tests_validate_against(kind: str) -> None:
    """Every input's default, range, choices, description and required-ness, as cog reads them."""
    path, ref, _ = TARGETS[kind]
    try:
        static, static_required = read_file(REPO_ROOT / path, ref, train=kind == "train")
    except StaticSchemaError as error:
        pytest.fail(f"{path}: {error}")
    imported, imported_required, enums = _imported(kind)
    assert list(static) == list(imported), "the inputs differ"
    differences = []
    for name, prop in imported.items():
        for key in COMPARED:
            if static[name].get(key) != prop.get(key):
                differences.append(f"{name}.{key}: cog reads {static[name].get(key)!r}, tested {prop.get(key)!r}")
        if static[name].get("enum") != enums.get(name):
            differences.append(f"{name}.choices: cog reads {static[name].get('enum')!r}, tested {enums.get(name)!r}")
    assert static_required == imported_required, "required inputs differ"
    assert not differences, f"{path}: {len(differences)} fields differ:\n" + "\n".join(differences)


def _static(kind: str) -> dict:
    path, ref, _ = TARGETS[kind]
    return {item.name: item for item in read_inputs((REPO_ROOT / path).read_bytes(), ref, train=kind == "train")}


def test_declared_literals_equal_the_engine_constants() -> None:
    """The engine's tables and limits, and the literals cog reads, are one contract kept by this test."""
    from engine import config as c
    from engine.schedulers import SCHEDULERS
    from training import config as t

    read = {"predict": _static("predict"), "train": _static("train")}
    predict, train = "predict", "train"
    models = [*c.MODEL_IDS, c.CUSTOM_MODEL_ID]
    expected_choices = {
        (predict, "aspect_ratio"): [*c.ASPECT_RATIOS, c.CUSTOM_ASPECT],
        (predict, "output_format"): list(c.OUTPUT_FORMATS),
        (predict, "megapixels"): list(c.MEGAPIXELS),
        (predict, "model"): models,
        (predict, "scheduler"): list(SCHEDULERS),
        (predict, "control_type"): list(c.CONTROL_TYPES),
        (predict, "upscale"): list(c.UPSCALE_FACTORS),
        (train, "model"): models,
        (train, "lr_scheduler"): list(t.TRAIN_LR_SCHEDULERS),
        (train, "input_images_filetype"): list(t.TRAIN_ARCHIVE_FILETYPES),
    }
    for (kind, name), choices in expected_choices.items():
        assert [v.to_json() for v in read[kind][name].choices] == choices, name
    expected_values = {
        (predict, "model", "default"): c.DEFAULT_MODEL,
        (predict, "scheduler", "default"): c.DEFAULT_SCHEDULER,
        (predict, "num_outputs", "le"): c.MAX_OUTPUTS,
        (predict, "num_inference_steps", "le"): c.MAX_STEPS,
        (predict, "width", "ge"): c.CUSTOM_SIZE_MIN,
        (predict, "width", "le"): c.CUSTOM_SIZE_MAX,
        (predict, "height", "ge"): c.CUSTOM_SIZE_MIN,
        (predict, "height", "le"): c.CUSTOM_SIZE_MAX,
        (predict, "clip_skip", "le"): c.MAX_CLIP_SKIP,
        (predict, "control_strength", "default"): c.CONTROL_DEFAULT_STRENGTH,
        (predict, "control_strength", "le"): c.CONTROL_MAX_STRENGTH,
        (predict, "ip_adapter_scale", "default"): c.IP_ADAPTER_DEFAULT_SCALE,
        (predict, "ip_adapter_scale", "le"): c.IP_ADAPTER_MAX_SCALE,
        (train, "model", "default"): c.DEFAULT_MODEL,
        (train, "steps", "default"): t.TRAIN_DEFAULT_STEPS,
        (train, "steps", "le"): t.TRAIN_MAX_STEPS,
        (train, "lora_rank", "default"): t.TRAIN_DEFAULT_RANK,
        (train, "lora_rank", "le"): t.TRAIN_MAX_RANK,
        (train, "learning_rate", "default"): t.TRAIN_DEFAULT_LEARNING_RATE,
        (train, "learning_rate", "le"): t.TRAIN_MAX_LEARNING_RATE,
        (train, "batch_size", "le"): t.TRAIN_MAX_BATCH_SIZE,
        (train, "resolution", "default"): t.TRAIN_DEFAULT_RESOLUTION,
        # Replicate's SDXL trainer's names: the bounds of the setting each one means.
        (train, "max_train_steps", "le"): t.TRAIN_MAX_STEPS,
        (train, "lr_warmup_steps", "le"): t.TRAIN_MAX_STEPS,
        (train, "train_batch_size", "le"): t.TRAIN_MAX_BATCH_SIZE,
        (train, "lora_lr", "le"): t.TRAIN_MAX_LEARNING_RATE,
        (train, "ti_lr", "le"): t.TRAIN_MAX_LEARNING_RATE,
        (train, "unet_learning_rate", "le"): t.TRAIN_MAX_LEARNING_RATE,
    }
    for (kind, name, key), value in expected_values.items():
        declared = getattr(read[kind][name], key)
        assert (declared.to_json() if key == "default" else declared) == value, f"{kind}.{name}.{key}"
    expected_text = {
        (predict, "guidance"): f"guidance x {c.FLUX_GUIDANCE_TO_CFG:g} ",
        (predict, "go_fast"): (
            f"from {c.GO_FAST_DEEP_CACHE_MIN_STEPS} steps, once sigma is below {c.GO_FAST_DEEP_CACHE_MAX_SIGMA:g}, "
            f"only one step in {c.GO_FAST_DEEP_CACHE_INTERVAL} "
        ),
        (predict, "control_type"): f" {', '.join(c.CONTROL_PREPROCESSORS)};",
        (predict, "ip_adapter_image"): f"Up to {c.IP_ADAPTER_MAX_IMAGES};",
        (predict, "embeddings"): f"up to {c.MAX_EMBEDDINGS}, ",
        (predict, "upscale"): f"Refused past {c.UPSCALE_MAX_PIXELS / 1e6:.1f} megapixels",
        (train, "input_images"): f"at least {t.TRAIN_MIN_IMAGES} ",
        (train, "ti_lr"): f"(default {t.TRAIN_EMBEDDING_LEARNING_RATE:g})",
        (train, "lr_scheduler"): (
            f"a warm-up of {t.TRAIN_WARMUP_FRACTION:.0%} of the steps (at most {t.TRAIN_WARMUP_MAX_STEPS})"
        ),
    }
    for (kind, name), text in expected_text.items():
        assert text in (read[kind][name].description or ""), f"{kind}.{name}"
    cutoff = f"guidance stops below sigma {c.GO_FAST_GUIDANCE_MIN_SIGMA:g} "
    assert cutoff in read["predict"]["go_fast"].description
