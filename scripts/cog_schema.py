"""Write .cog/openapi_schema.json from predict.py's and train.py's signatures, by the Cog CLI's rules.

The Go `cog` CLI writes this file at build time; the Python package cannot. Without it the
coglet server validates nothing (no 422s) and /openapi.json answers 503. This script
reads the signature with cog's own inspector and lays it out the way the CLI does
(choices as enum components behind allOf, Optional[T] nullable with a null default,
a None default on a non-Optional input meaning "required"). As the CLI does when cog.yaml has
both `predict` and `train`, the training schema (TrainingInput, TrainingOutput, /trainings) is
merged into the prediction one, whose components win a name clash (both declare `model`).

Usage: python scripts/cog_schema.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / ".cog" / "openapi_schema.json"
PREDICTOR_REF = ("predict", "Predictor")
TRAINER_REF = ("train", "train")

_RESPONSE_200 = {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}
_RESPONSE_422 = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}


def _title(name: str) -> str:
    return " ".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _input_schema(inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from cog._adt import PrimitiveType, Repetition

    properties: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    required: list[str] = []
    for name, field in inputs.items():
        ftype = field.type
        prop: dict[str, Any] = {"x-order": field.order}
        if field.choices is not None:
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": list(field.choices),
                "type": ftype.primitive.json_type()["type"],
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = _title(name)
            prop.update(ftype.json_type())
        nullable = ftype.repetition in (Repetition.OPTIONAL, Repetition.OPTIONAL_REPEATED) or (
            ftype.primitive is PrimitiveType.SECRET and field.default is None
        )
        has_default = field.default is not None or nullable
        if not has_default and ftype.repetition in (Repetition.REQUIRED, Repetition.REPEATED):
            required.append(name)
        if has_default:
            prop["default"] = ftype.json_encode(field.default) if field.default is not None else None
        if nullable:
            prop["nullable"] = True
        for key, value in (
            ("description", field.description),
            ("minimum", field.ge),
            ("maximum", field.le),
            ("minLength", field.min_length),
            ("maxLength", field.max_length),
            ("pattern", field.regex),
        ):
            if value is not None:
                prop[key] = value
        if field.deprecated:
            prop["deprecated"] = True
        properties[name] = prop
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def _mode_schema(ref: tuple[str, str], train: bool) -> dict[str, Any]:
    """The OpenAPI 3.0.2 document the CLI generates for one mode."""
    import cog
    from cog._inspector import create_predictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # BasePredictor is a documented choice
        info = create_predictor(*ref)
    input_schema, enums = _input_schema(info.inputs)
    names = (
        ("TrainingInput", "TrainingOutput", "TrainingRequest", "TrainingResponse")
        if train
        else ("Input", "Output", "PredictionRequest", "PredictionResponse")
    )
    input_key, output_key, request_key, response_key = names
    input_schema["title"] = input_key
    ref_ = "#/components/schemas/"
    string = {"type": "string"}
    schemas: dict[str, Any] = {
        input_key: input_schema,
        output_key: info.output.json_type(),
        **enums,
        request_key: {
            "title": request_key,
            "type": "object",
            "properties": {"id": {"title": "Id", **string}, "input": {"$ref": ref_ + input_key}},
        },
        response_key: {
            "title": response_key,
            "type": "object",
            "properties": {
                "input": {"$ref": ref_ + input_key},
                "output": {"$ref": ref_ + output_key},
                "id": {"title": "Id", **string},
                "version": {"title": "Version", **string},
                "created_at": {"title": "Created At", **string, "format": "date-time"},
                "started_at": {"title": "Started At", **string, "format": "date-time"},
                "completed_at": {"title": "Completed At", **string, "format": "date-time"},
                "status": {"title": "Status", **string},
                "error": {"title": "Error", **string},
                "logs": {"title": "Logs", **string},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {"detail": {"title": "Detail", "type": "array", "items": {"$ref": ref_ + "ValidationError"}}},
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [string, {"type": "integer"}]},
                },
                "msg": {"title": "Message", **string},
                "type": {"title": "Error Type", **string},
            },
        },
    }
    kind, resource = ("trainings", "training") if train else ("predictions", "prediction")
    main_op = {
        "summary": "Train" if train else "Predict",
        "description": "Run a single training on the model" if train else "Run a single prediction on the model",
        "operationId": f"{'train' if train else 'predict'}_{kind}_post",
        "requestBody": {"content": {"application/json": {"schema": {"$ref": ref_ + request_key}}}},
        "responses": {
            "200": {
                "description": "Successful Response",
                "content": {"application/json": {"schema": {"$ref": ref_ + response_key}}},
            },
            "422": _RESPONSE_422,
        },
    }
    cancel_op = {
        "summary": "Cancel",
        "operationId": f"cancel_{kind}__{resource}_id__cancel_post",
        "parameters": [
            {
                "required": True,
                "schema": {"title": _title(f"{resource}_id"), **string},
                "name": f"{resource}_id",
                "in": "path",
            }
        ],
        "responses": {"200": _RESPONSE_200, "422": _RESPONSE_422},
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": cog.__version__},
        "paths": {
            "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": _RESPONSE_200}}},
            "/health-check": {
                "get": {
                    "summary": "Healthcheck",
                    "operationId": "healthcheck_health_check_get",
                    "responses": {"200": _RESPONSE_200},
                }
            },
            f"/{kind}": {"post": main_op},
            f"/{kind}/{{{resource}_id}}/cancel": {"post": cancel_op},
        },
        "components": {"schemas": schemas},
    }


def build_schema() -> dict[str, Any]:
    """The whole document the CLI would bake into the image: predict's, with train's merged in."""
    sys.path.insert(0, str(REPO_ROOT))
    schema = _mode_schema(PREDICTOR_REF, train=False)
    training = _mode_schema(TRAINER_REF, train=True)
    for key in ("paths",):
        for name, value in training[key].items():
            schema[key].setdefault(name, value)
    for name, value in training["components"]["schemas"].items():
        schema["components"]["schemas"].setdefault(name, value)
    return schema


def render() -> str:
    return json.dumps(build_schema(), indent=2) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed schema is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text() != text:
            sys.exit(f"{SCHEMA_PATH.relative_to(REPO_ROOT)} is stale: run `make schema`")
        print(f"{SCHEMA_PATH.relative_to(REPO_ROOT)} is up to date")
        return
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
