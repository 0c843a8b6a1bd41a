"""Long and weighted prompts: reading A1111 and Compel syntax, the embeddings, the images and the cap."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import MAX_PROMPT_TOKENS
from engine.errors import InputError
from engine.generator import Engine
from engine.prompts import (
    CompelSegment,
    Piece,
    PromptEncoder,
    count_tokens,
    is_compel_syntax,
    parse_a1111,
    read_prompt,
)
from engine.request import GenerationRequest, LocalLora, LoraSpec
from engine.schedulers import make_scheduler
from test_folder.a1111_reference import a1111_encode
from test_folder.conftest import CogServer
from test_folder.test_local_generation import unet_batches
from test_folder.test_server import FLUX_JSON

BASE = GenerationRequest(prompt="a lighthouse at dusk", num_inference_steps=2, seed=5)
TAGS = ["masterpiece", "best quality", "1girl", "solo", "long hair", "blue eyes", "school uniform", "cherry blossoms"]
LONG = ", ".join(TAGS * 6)  # about 130 tokens: two chunks
DOWN = 1 / 1.1
# Flux prompts are plain text; each failed with a syntax error before A1111's lenient rules.
LENIENT = [
    'a sign saying "OPEN :)"',
    "a smiley :-( on a wall",
    "portrait of a man [wearing a hat",
    "a cat (tabby, 3 years old",
    "photo (bokeh:",
]

# A1111's last doctest example of parse_prompt_attention: one '(' is never closed.
HOUSE = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."
HOUSE_PIECES = [
    ("a ", 1.0),
    ("house", 1.5730000000000004),
    (" ", 1.1),
    ("on", 1.0),
    (" a ", 1.1),
    ("hill", 0.55),
    (", sun, ", 1.1),
    ("sky", 1.4641000000000006),
    (".", 1.1),
]


# A1111's doctest examples of parse_prompt_attention, with its fragments and weights.
@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (HOUSE, HOUSE_PIECES),
    ],
)
def test_a1111_doctest_examples(text: str, pieces: list[tuple[str, float]]) -> None:
    segments, _ = parse_a1111(text)
    assert segments == [pieces]


@pytest.mark.parametrize(
    ("text", "pieces", "note"),
    [
        # The last doctest with its missing closing bracket: the '.' is no longer inside it.
        (HOUSE.replace(")))", "))))"), [*HOUSE_PIECES[:-1], (".", 1.0)], None),
        ('a sign saying "OPEN :)"', [('a sign saying "OPEN :)"', 1.0)], "stray ')' at character 22 kept as text"),
        ("a smiley :-( on a wall", [("a smiley :-", 1.0), (" on a wall", 1.1)], "unclosed '(' at character 12"),
        ("portrait of a man [wearing a hat", [("portrait of a man ", 1.0), ("wearing a hat", DOWN)], "unclosed '['"),
        ("a cat (tabby, 3 years old", [("a cat ", 1.0), ("tabby, 3 years old", 1.1)], "closed at the end"),
        ("photo (bokeh:", [("photo ", 1.0), ("bokeh:", 1.1)], "unclosed '(' at character 7 closed at the end"),
        ("(cat:heavy)", [("cat:heavy", 1.1)], "':heavy' at character 5 is no weight, kept as text"),
        ("(cat:1.2.3)", [("cat:1.2.3", 1.1)], "':1.2.3' at character 5 is no weight"),
        ("(cat:" + "9" * 400 + ")", [("cat:" + "9" * 400, 1.1)], "is no weight"),
        ("a cat) :1.3) dog", [("a cat) :1.3) dog", 1.0)], "stray ')' at character 6"),
        ("[cat)", [("cat)", DOWN)], "stray ')' at character 5"),
        # A weighted group glued to the word before it keeps its weight.
        ("photo of a cat(fluffy:1.3)", [("photo of a cat", 1.0), ("fluffy", 1.3)], None),
        ("a( b) c", [("a", 1.0), (" b", 1.1), (" c", 1.0)], None),
        # A digit right after a group is text, not part of a weight.
        ("[blurry]3d render", [("blurry", DOWN), ("3d render", 1.0)], None),
        ("(cat:1.2)5 dogs", [("cat", 1.2), ("5 dogs", 1.0)], None),
        ("(masterpiece)1girl", [("masterpiece", 1.1), ("1girl", 1.0)], None),
        ("(red)-haired", [("red", 1.1), ("-haired", 1.0)], None),
        # Extreme and negative weights, exactly.
        ("(cat:100000)", [("cat", 100000.0)], None),
        ("(cat:-1)", [("cat", -1.0)], None),
        ("( cat : 0.5 )", [(" cat ", 0.5)], None),
        ("((cat:2))", [("cat", 2.2)], None),
        # Quotes are text, paired or not.
        ('a sign reading "OPEN"', [('a sign reading "OPEN"', 1.0)], None),
        ('(a "sign:1.2) here', [('a "sign', 1.2), (" here", 1.0)], None),
        # Escapes; a lone backslash is text (A1111 would drop it).
        (r"a \\ b \(c\) (d)", [(r"a \ b (c) ", 1.0), ("d", 1.1)], None),
        (r"C:\new (d)", [(r"C:\new ", 1.0), ("d", 1.1)], None),
    ],
)
def test_a1111_pieces(text: str, pieces: list[tuple[str, float]], note: str | None) -> None:
    segments, notes = parse_a1111(text)
    assert segments == [pieces]
    assert all(isinstance(p, Piece) for p in segments[0])
    if note is None:
        assert notes == []
    else:
        assert any(note in n for n in notes), notes


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("a BREAK b", [[("a", 1.0)], [("b", 1.0)]]),
        ("(a BREAK b) c", [[("a", 1.1)], [("b", 1.1), (" c", 1.0)]]),
        ("BREAK a", [[], [("a", 1.0)]]),
        ("a BREAKFAST", [[("a BREAKFAST", 1.0)]]),
    ],
)
def test_break_separates_segments(text: str, segments: list[list[tuple[str, float]]]) -> None:
    assert parse_a1111(text)[0] == segments


@pytest.mark.parametrize(
    ("text", "compel"),
    [
        ("a cat++", True),
        ("a cat--, dog", True),
        ("(red cat)1.3", True),
        ("(red cat)++ on a mat", True),
        ('("a cat", "a dog").and()', True),
        ('("a cat", "a dog").blend(0.5, 0.5)', True),
        ("a cat.swap(dog)", True),
        ("(cat).attend(1.2)", True),
        ("a (cat:1.3)", False),
        ("well-lit room, 1.5 meters", False),
        ("C++ programmer", False),
        ("A+ student", False),
        ("(red)-haired", False),
        ("(masterpiece)1girl", False),
        ("(cat:1.2)5 dogs", False),
        ("a cat++ [blurry]", False),  # an A1111-only form wins
        ('a sign reading "OPEN"', False),
    ],
)
def test_which_syntax(text: str, compel: bool) -> None:
    assert is_compel_syntax(text) is compel
    assert read_prompt(text).syntax == ("Compel" if compel else "A1111")


@pytest.mark.parametrize("text", ["a cat.attend(1.2) on a mat", "a cat.swap(dog) on a mat", "(a cat)1.2 on a mat"])
def test_compel_operators_leave_no_stray_numbers(text: str) -> None:
    [segment] = read_prompt(text).segments
    assert isinstance(segment, CompelSegment)
    [prompt] = segment.conjunction.prompts
    texts = " ".join(getattr(child, "text", "") for child in prompt.children)
    assert "1.2" not in texts and "1.1" not in texts and "attend" not in texts and "swap" not in texts


def test_compel_parse_time_is_bounded() -> None:
    """Compel's grammar once took minutes on this; memoized, it takes milliseconds."""
    start = time.perf_counter()
    assert read_prompt("( " * 12 + "ab++").syntax == "Compel"
    assert read_prompt("ab++ " + "(a)1.1 " * 60).syntax == "Compel"
    deep = read_prompt("(" * 200 + "ab++")  # deeper than Compel's recursive parser goes
    assert deep.syntax == "A1111" and "Compel's parser rejected it" in deep.notes[0]
    assert time.perf_counter() - start < 5


def test_what_compel_rejects_is_read_as_a1111() -> None:
    reading = read_prompt('("a", "b").blend(0.5)')  # two prompts, one weight
    assert reading.syntax == "A1111" and "Compel's parser rejected it" in reading.notes[0]


def a1111_parsed(text: str) -> list[list]:
    """What A1111's parse_prompt_attention returns for a prompt: [text, weight], ["BREAK", -1] between segments."""
    segments, _ = parse_a1111(text)
    parsed: list[list] = []
    for i, segment in enumerate(segments):
        parsed += [["BREAK", -1]] if i else []
        parsed += [[piece.text, piece.weight] for piece in segment]
    return parsed


# Weights above and below 1, nesting, long prompts with A1111's comma back-off, BREAK, "!".
A1111_CASES = [
    "a (lighthouse:1.3) at dusk",
    "a [lighthouse] at dusk, (fog:0.6)",
    "((a (lighthouse:1.2)) at [[dusk]]) (cat:0)",
    "(masterpiece:1.2), [lowres], " + LONG + ", (red umbrella:1.4)",
    "(cat " * 100 + ")",  # no comma: a hard cut at 75 tokens
    ", ".join(f"(tag{i}:{1 + i / 100})" for i in range(70)),
    "a (lighthouse:1.3) BREAK at dusk, [fog]",
    "BREAK (a cat:1.2)",
    "(a cat:1.2) BREAK",
    "(wow!. :1.1)" * 30,
]


@pytest.mark.parametrize("text", A1111_CASES)
def test_a1111_prompts_are_encoded_as_a1111_encodes_them(engine: Engine, text: str) -> None:
    pipe = engine.models[BASE.model].txt2img
    embeds, pooled = engine.models[BASE.model].prompts.encode(text, 0)
    reference, reference_pooled = a1111_encode(pipe, a1111_parsed(text))
    assert embeds.shape == reference.shape and torch.equal(embeds, reference)
    assert torch.equal(pooled, reference_pooled)


def test_a1111_emphasis_with_clip_skip(engine: Engine) -> None:
    pipe = engine.models[BASE.model].txt2img
    text = "(masterpiece:1.2), [lowres], " + LONG
    embeds, pooled = engine.models[BASE.model].prompts.encode(text, 2)
    reference, reference_pooled = a1111_encode(pipe, a1111_parsed(text), clip_skip=2)
    assert torch.equal(embeds, reference) and torch.equal(pooled, reference_pooled)
    assert not torch.equal(embeds, engine.models[BASE.model].prompts.encode(text, 0)[0])


def test_a1111_weights_scale_hidden_states_by_one_constant_per_encoder(engine: Engine) -> None:
    """The issue's bar: weighted = unweighted hidden states x token weights x one constant per encoder."""
    prompts = engine.models[BASE.model].prompts
    plain, plain_pooled = prompts.encode("a lighthouse at dusk, fog", 0)
    weighted, pooled = prompts.encode("a (lighthouse:1.3) at [dusk], fog", 0)
    assert torch.equal(pooled, plain_pooled), "the pooled embedding is the unweighted one"
    tokenizer = engine.models[BASE.model].txt2img.tokenizer
    ids = tokenizer("a lighthouse at dusk, fog").input_ids
    weights = torch.ones(77)
    weights[ids.index(tokenizer.convert_tokens_to_ids("lighthouse</w>"))] = 1.3
    weights[ids.index(tokenizer.convert_tokens_to_ids("dusk</w>"))] = 1 / 1.1
    for half in (slice(0, 32), slice(32, 96)):  # CLIP-L's width, then CLIP-G's, in the tiny model
        scaled = plain[..., half] * weights[None, :, None]
        ratio = weighted[..., half] / scaled
        constant = ratio[0, 0, 0]
        assert constant != 1 and torch.allclose(ratio, constant.expand_as(ratio), rtol=1e-5)
        assert torch.allclose(weighted[..., half].mean(), plain[..., half].mean(), rtol=1e-5)


def test_compel_syntax_keeps_compels_math(engine: Engine) -> None:
    """A Compel prompt gives what Compel itself builds from it, on both encoders, pooled included."""
    prompts = engine.models[BASE.model].prompts
    text = "a (lighthouse)1.3 at dusk, fog--"
    embeds, pooled = prompts.encode(text, 0)
    first, second = prompts.compels()
    own_second, own_pooled = second.build_conditioning_tensor(text)
    assert torch.equal(embeds, torch.cat([first.build_conditioning_tensor(text), own_second], dim=-1))
    assert torch.equal(pooled, own_pooled)
    assert not torch.equal(embeds, prompts.encode("a (lighthouse:1.3) at dusk, [[fog]]", 0)[0])


def test_plain_prompt_of_any_length_reaches_the_encoder_as_written(engine: Engine) -> None:
    prompts = engine.models[BASE.model].prompts
    text = 'a "C++ programmer" and an A+ student, ' + LONG
    assert read_prompt(text).segments == ([(text, 1.0)],)
    embeds, pooled = prompts.encode(text, 0)
    reference, reference_pooled = a1111_encode(engine.models[BASE.model].txt2img, [[text, 1.0]])
    assert torch.equal(embeds, reference) and embeds.shape[1] == 154
    assert torch.equal(pooled, reference_pooled)
    short = 'a sign saying "OPEN" for the C++ programmer'
    assert prompts.kwargs(short, "", 0) == {"prompt": short, "negative_prompt": None}


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


def test_weights_do_not_depend_on_an_earlier_clip_skip(engine: Engine) -> None:
    """Compel caches the empty prompt it weights against; a clip_skip request must not leave it skipped."""
    pipe = engine.models[BASE.model].txt2img
    fresh, after_skip = PromptEncoder(pipe), PromptEncoder(pipe)
    after_skip.encode("a cat++", 2)
    assert torch.equal(fresh.encode("a cat++", 0)[0], after_skip.encode("a cat++", 0)[0])


def test_encoders_that_chunk_differently_line_up(engine: Engine) -> None:
    """The second tokenizer never merges "!" (its pad token): "wow!." is 2 tokens for one, 3 for the
    other. Compel tokenizes with each, and pads the shorter side; A1111 uses one BPE for both."""
    prompts = engine.models[BASE.model].prompts
    text = "wow!. " * 30
    first, second = (compel.conditioning_provider.get_token_ids([text])[0] for compel in prompts.compels())
    assert len(first) <= 77 < len(second)
    compel_embeds, _ = prompts.encode(f"({text})1.1", 0)
    assert compel_embeds.shape == (1, 154, 32 + 64)
    embeds, _ = prompts.encode(f"({text}:1.1)", 0)
    assert embeds.shape == (1, 77, 32 + 64)
    assert not np.array_equal(pixels(engine, replace(BASE, prompt=text)), pixels(engine, BASE))


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
    assert unet_batches(engine, req) == [2] * 4 + [1]


def test_metadata_keeps_the_prompt_as_written(engine: Engine) -> None:
    prompt = "(masterpiece:1.2), a [blurry] lighthouse BREAK dusk"
    [result] = engine.generate(replace(BASE, prompt=prompt))
    assert result.parameters.prompt == prompt


@pytest.mark.parametrize("prompt", [*LENIENT, "(cat:100000)", "(cat:-1)", "[ ] (cat:0)", "(" * 300 + "cat"])
def test_no_prompt_fails_on_syntax(engine: Engine, prompt: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="engine.prompts"):
        [result] = engine.generate(replace(BASE, prompt=prompt))
    assert result.image.size == (128, 128) and result.parameters.prompt == prompt
    [line] = [r.getMessage() for r in caplog.records if r.name == "engine.prompts"]
    assert line.startswith("prompt read as ") and len(line) < 600


def test_stray_closer_keeps_the_pipelines_own_encoding(engine: Engine) -> None:
    """A prompt that reads as exactly its text still goes to the pipeline as text: the same image."""
    prompts = engine.models[BASE.model].prompts
    text = 'a sign saying "OPEN :)"'
    assert prompts.kwargs(text, "", 0) == {"prompt": text, "negative_prompt": None}
    assert prompts.kwargs(r"a \(cat\)", "", 0) == {"prompt": "a (cat)", "negative_prompt": None}


def test_glued_group_is_weighted_like_a_spaced_one(engine: Engine) -> None:
    """The tokenizer sees each piece apart, as in A1111: glued or spaced, the same embeddings."""
    prompts = engine.models[BASE.model].prompts
    glued, glued_pooled = prompts.encode("photo of a cat(fluffy:1.3)", 0)
    spaced, spaced_pooled = prompts.encode("photo of a cat (fluffy:1.3)", 0)
    unweighted, unweighted_pooled = prompts.encode("photo of a cat fluffy", 0)
    assert torch.equal(glued, spaced) and not torch.equal(glued, unweighted)
    assert torch.equal(glued_pooled, spaced_pooled) and torch.equal(glued_pooled, unweighted_pooled)


def test_extreme_weights_reach_the_encoder(engine: Engine) -> None:
    prompts = engine.models[BASE.model].prompts
    plain, _ = prompts.encode("a cat", 0)
    encoded = {w: prompts.encode(f"a (cat:{w})", 0)[0] for w in ("100000", "-1", "2")}
    assert all(torch.isfinite(e).all() and not torch.equal(e, plain) for e in encoded.values())
    # The mean is restored, so a huge weight leaves the weighted token nearly all of the embedding.
    share = {w: (e[0].norm(dim=-1)[2] / e[0].norm(dim=-1).sum()).item() for w, e in encoded.items()}
    assert share["100000"] > 0.99 > 0.1 > share["2"], share


def test_prompt_past_the_cap_is_refused_before_any_download(engine: Engine) -> None:
    tokenizer = engine.models[BASE.model].txt2img.tokenizer
    at_cap = " ".join(["cat"] * MAX_PROMPT_TOKENS)
    assert count_tokens(tokenizer, at_cap) == MAX_PROMPT_TOKENS
    engine.models[BASE.model].prompts.check_length(at_cap, "prompt")
    unreachable = (LoraSpec("http://127.0.0.1:9/never.safetensors", 1.0),)
    message = rf"prompt is {MAX_PROMPT_TOKENS + 1} CLIP tokens as written; the most is {MAX_PROMPT_TOKENS}"
    with pytest.raises(InputError, match=message):
        engine.generate(replace(BASE, prompt=at_cap + " cat", loras=unreachable))
    with pytest.raises(InputError, match=r"negative_prompt is \d+ CLIP tokens"):
        engine.generate(replace(BASE, negative_prompt="(blurry:1.2), " * 100, loras=unreachable))
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"prompt is 1\d{4} CLIP tokens"):
        engine.generate(replace(BASE, prompt=("a cat " * 9000)[:50_000], loras=unreachable))  # took 39 s
    assert time.perf_counter() - start < 2


def test_prompts_through_cog(cog_server: CogServer) -> None:
    status, body = cog_server.predict({**FLUX_JSON, "prompt": "(masterpiece:1.3), [lowres], " + LONG})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    status, body = cog_server.predict({**FLUX_JSON, "prompt": 'a sign saying "OPEN :)"'})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    assert "prompt read as plain text; stray ')' at character 22 kept as text" in body["logs"]
    status, body = cog_server.predict({**FLUX_JSON, "prompt": "photo (bokeh:"})
    assert body["status"] == "succeeded", body.get("error")
    status, body = cog_server.predict({**FLUX_JSON, "prompt": "a cat " * 5000})
    assert body["status"] == "failed" and f"the most is {MAX_PROMPT_TOKENS}" in body["error"]


def test_compel_weights_do_not_depend_on_an_earlier_text_encoder_lora(
    weights_dir: Path, lora_files: dict[str, bytes], tmp_path: Path
) -> None:
    """Compel weights against the empty prompt's embedding, which it caches on first use: made while a
    LoRA with text-encoder weights was fused, it would shift every later weighted prompt."""
    req = replace(BASE, prompt="a lighthouse++ at dusk, (fog)0.8", go_fast=False)
    expected = pixels(Engine.load(weights_dir), req)
    engine = Engine.load(weights_dir)  # a fresh one, whose first weighted prompt comes with the LoRA
    model = engine.models[req.model]
    (tmp_path / "te.safetensors").write_bytes(lora_files["te"])
    model.lora_set.apply([LocalLora("te", tmp_path / "te.safetensors", 1.0, "te")])
    with_lora = model.prompts.kwargs(req.prompt, "", 0)  # what the TE-LoRA request gives its pipeline
    model.lora_set.apply([])
    assert not torch.equal(with_lora["prompt_embeds"], model.prompts.kwargs(req.prompt, "", 0)["prompt_embeds"])
    assert np.array_equal(pixels(engine, req), expected)
