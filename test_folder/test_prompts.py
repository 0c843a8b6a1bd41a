"""Long and weighted prompts: the A1111 -> Compel converter, the embeddings, and the images."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import InputError
from engine.generator import Engine
from engine.prompts import a1111_to_compel, is_compel_syntax
from engine.request import GenerationRequest
from engine.schedulers import make_scheduler
from test_folder.conftest import CogServer
from test_folder.test_local_generation import unet_batches
from test_folder.test_server import FLUX_JSON

BASE = GenerationRequest(prompt="a lighthouse at dusk", num_inference_steps=2, seed=5)
TAGS = ["masterpiece", "best quality", "1girl", "solo", "long hair", "blue eyes", "school uniform", "cherry blossoms"]
LONG = ", ".join(TAGS * 6)  # about 130 tokens: two chunks


@pytest.mark.parametrize(
    ("a1111", "compel"),
    [
        ("a cat", "a cat"),
        ("a (cat)", "a (cat)1.1"),
        ("a [cat]", "a (cat)0.9091"),
        ("a (cat:1.3) on a mat", "a (cat)1.3 on a mat"),
        ("((cat))", "(cat)1.21"),
        ("(a (b:2))", "(a)1.1 (b)2.2"),
        ("(a [b])", "(a)1.1 b"),
        ("[[blurry]]", "(blurry)0.8264"),
        ("(cat:0.5), dog", "(cat)0.5, dog"),
        (r"\(literal\) (cat)", r"\(literal\) (cat)1.1"),
        (r"a \[b\]", "a [b]"),
        ("(cat:1.0)", "cat"),
    ],
)
def test_a1111_to_compel(a1111: str, compel: str) -> None:
    assert a1111_to_compel(a1111) == compel


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a (cat", r"'\(' at character 2 is never closed"),
        ("a cat)", r"unbalanced '\)' at character 5"),
        ("a [cat)", r"unbalanced '\)' at character 6"),
        ("(cat:heavy)", "malformed weight 'heavy' at character 5"),
    ],
)
def test_malformed_prompts_name_the_position(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        a1111_to_compel(text)


@pytest.mark.parametrize(
    ("text", "compel"),
    [
        ("a cat++", True),
        ("a cat--, dog", True),
        ("(red cat)1.3", True),
        ('("a cat", "a dog").and()', True),
        ('("a cat", "a dog").blend(0.5, 0.5)', True),
        ("a (cat:1.3)", False),
        ("well-lit room, 1.5 meters", False),
    ],
)
def test_which_syntax(text: str, compel: bool) -> None:
    assert is_compel_syntax(text) is compel


def pixels(engine: Engine, req: GenerationRequest) -> np.ndarray:
    return np.asarray(engine.generate(req)[0].image, dtype=np.int16)


def test_plain_short_prompt_is_exactly_the_pipelines_own(engine: Engine) -> None:
    """Bit-identical to calling the diffusers pipeline with the text, as before this feature."""
    model = engine.models[BASE.model]
    assert model.prompts.kwargs(BASE.prompt, "", 0) == {"prompt": BASE.prompt, "negative_prompt": None}
    ours = pixels(engine, replace(BASE, go_fast=False))
    pipe = model.txt2img
    pipe.scheduler = make_scheduler(BASE.scheduler, model.scheduler_config)
    direct = pipe(
        prompt=BASE.prompt,
        num_inference_steps=BASE.num_inference_steps,
        guidance_scale=BASE.cfg_scale,
        generator=[torch.Generator("cpu").manual_seed(BASE.seed)],
        width=128,
        height=128,
    ).images[0]
    assert np.array_equal(ours, np.asarray(direct, dtype=np.int16))


def test_weight_one_equals_no_weight(engine: Engine) -> None:
    prompts = engine.models[BASE.model].prompts
    plain, plain_pooled = prompts.encode("a (lighthouse) at dusk".replace("(lighthouse)", "lighthouse"), 0)
    weighted, weighted_pooled = prompts.encode("a (lighthouse:1.0) at dusk", 0)
    assert torch.equal(plain, weighted) and torch.equal(plain_pooled, weighted_pooled)
    assert np.array_equal(pixels(engine, replace(BASE, prompt="a (lighthouse:1.0) at dusk")), pixels(engine, BASE))


def test_weights_change_the_embeddings(engine: Engine) -> None:
    prompts = engine.models[BASE.model].prompts
    plain, _ = prompts.encode("a lighthouse at dusk", 0)
    heavy, _ = prompts.encode("a (lighthouse:1.5) at dusk", 0)
    compel, _ = prompts.encode("a lighthouse++ at dusk", 0)
    assert not torch.equal(plain, heavy) and not torch.equal(plain, compel)


def test_long_prompt_is_encoded_past_77_tokens(engine: Engine) -> None:
    prompts = engine.models[BASE.model].prompts
    tokenizer = engine.models[BASE.model].txt2img.tokenizer
    assert len(tokenizer(LONG, truncation=False).input_ids) > 120
    embeds, pooled = prompts.encode(LONG, 0)
    assert embeds.shape[1] == 154 and embeds.shape[2] == 32 + 64  # two chunks, both encoders
    changed, changed_pooled = prompts.encode(LONG.rsplit(", ", 1)[0] + ", red umbrella", 0)
    assert torch.equal(embeds[:, :77], changed[:, :77])
    assert not torch.equal(embeds[:, 77:], changed[:, 77:])
    assert torch.equal(pooled, changed_pooled), "the pooled embedding comes from the first chunk"
    truncated = replace(BASE, prompt=LONG.rsplit(", ", 1)[0] + ", red umbrella")
    assert not np.array_equal(pixels(engine, replace(BASE, prompt=LONG)), pixels(engine, truncated))


def test_break_starts_a_new_chunk(engine: Engine) -> None:
    prompts = engine.models[BASE.model].prompts
    embeds, _ = prompts.encode("a lighthouse BREAK at dusk", 0)
    assert embeds.shape[1] == 154
    assert not np.array_equal(pixels(engine, replace(BASE, prompt="a lighthouse BREAK at dusk")), pixels(engine, BASE))


def test_positive_and_negative_are_padded_to_the_same_length(engine: Engine) -> None:
    kwargs = engine.models[BASE.model].prompts.kwargs(LONG, "blurry", 0)
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape
    kwargs = engine.models[BASE.model].prompts.kwargs("blurry", LONG, 0)
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_long_weighted_prompt_in_every_mode_with_clip_skip(engine: Engine, mode: str) -> None:
    source = Image.new("RGB", (128, 128), "red")
    mask = Image.new("L", (128, 128), 255)
    extra = {"txt2img": {}, "img2img": {"image": source}, "inpaint": {"image": source, "mask": mask}}[mode]
    req = replace(BASE, prompt="(masterpiece:1.2), " + LONG, negative_prompt="[blurry]", **extra)
    plain = pixels(engine, req)
    assert not np.array_equal(plain, pixels(engine, replace(req, clip_skip=2)))


def test_go_fast_still_halves_the_batch_with_embeddings(engine: Engine) -> None:
    req = replace(BASE, prompt=LONG, num_inference_steps=5)
    assert unet_batches(engine, req) == [2] * 3 + [1] * 2


def test_metadata_keeps_the_prompt_as_written(engine: Engine) -> None:
    prompt = "(masterpiece:1.2), a [blurry] lighthouse BREAK dusk"
    [result] = engine.generate(replace(BASE, prompt=prompt))
    assert result.parameters.prompt == prompt


def test_long_weighted_prompt_through_cog(cog_server: CogServer) -> None:
    status, body = cog_server.predict({**FLUX_JSON, "prompt": "(masterpiece:1.3), [lowres], " + LONG})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    status, body = cog_server.predict({**FLUX_JSON, "prompt": "a (cat:heavy) on a mat"})
    assert body["status"] == "failed" and "malformed weight 'heavy' at character 7" in body["error"]
    status, body = cog_server.predict({**FLUX_JSON, "prompt": "a (cat"})
    assert body["status"] == "failed" and "never closed" in body["error"]
