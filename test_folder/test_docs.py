"""The README and docs/ stay usable: links resolve, every input is named, the README stays short.

Fast: reads Markdown and the committed schema only (no model, no server).
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def without_code(text: str) -> str:
    """Markdown text without fenced blocks or inline code, where a bracket is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of a page whose file, or whose #anchor in that file, does not exist."""
    broken = []
    for target in LINK.findall(without_code(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are not files here
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target} (no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked})")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.relative_to(ROOT)})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_slug_follows_githubs_rules() -> None:
    assert slug("Training a LoRA (`cog train`)") == "training-a-lora-cog-train"
    assert slug("Embeddings (the `embeddings` input)") == "embeddings-the-embeddings-input"
    assert slug("What the offline tests prove, and what they cannot") == (
        "what-the-offline-tests-prove-and-what-they-cannot"
    )
    assert slug("Guidance: Flux numbers on SDXL") == "guidance-flux-numbers-on-sdxl"
    assert slug("go_fast, step-by-step") == "go_fast-step-by-step"


def test_every_input_is_in_the_readme_inputs_table() -> None:
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    inputs = schema["components"]["schemas"]["Input"]["properties"]
    table_rows = [line for line in README.read_text().splitlines() if line.startswith("|")]
    named = {name for row in table_rows for name in re.findall(r"`([a-z0-9_]+)`", row)}
    assert sorted(set(inputs) - named) == []


def test_the_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
