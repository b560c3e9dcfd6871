"""The README and the pages under docs/: links resolve, the README stays a front door."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

README_MAX_LINES = 250

TECHNIQUE_PAGES = [
    "models.md",
    "lowbit.md",
    "flash-attention.md",
    "rl.md",
    "test-time-compute.md",
    "scaling.md",
    "moe.md",
    "surprise.md",
    "spiking.md",
    "benchmarks.md",
    "architecture.md",
]

_FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target); the target ends at whitespace or ')'
_INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks, with inline code spans removed."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(_CODE_SPAN.sub("", line))
    return out


def _links(path: Path) -> list[str]:
    targets = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        targets += _INLINE_LINK.findall(line)
        m = _REF_DEF.match(line)
        if m:
            targets.append(m.group(1))
    return targets


def _is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").strip().lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "-_ " or cat[0] in "LN" or cat == "Mn":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in _heading_lines(path):
        base = github_anchor(line)
        n = seen.get(base, 0)
        result.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return result


def _heading_lines(path: Path) -> list[str]:
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            out.append(m.group(2))
    return out


def _doc_files() -> list[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


def test_anchor_rule():
    assert github_anchor("What was not measured / limits") == "what-was-not-measured--limits"
    assert github_anchor("Presets (`keenlm.presets`)") == "presets-keenlmpresets"
    assert github_anchor("decode (issue: real models in and out)") == "decode-issue-real-models-in-and-out"
    assert github_anchor("Scaling laws: sweeps, fits, predictions") == "scaling-laws-sweeps-fits-predictions"


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in _links(doc):
        if not _is_relative(target):
            continue
        path_part, _, fragment = target.partition("#")
        dest = doc if not path_part else (doc.parent / unquote(path_part)).resolve()
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        if fragment and dest.suffix == ".md" and dest.is_file():
            if unquote(fragment) not in anchors(dest):
                broken.append(f"{target}: no heading with anchor #{fragment} in {dest.name}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES})"
    assert "make demo" in text
    assert "make test" in text


@pytest.mark.parametrize("page", TECHNIQUE_PAGES)
def test_page_exists_and_is_linked_from_readme(page: str):
    assert (DOCS / page).is_file(), f"docs/{page} is missing"
    linked = {
        (README.parent / t.partition("#")[0]).resolve()
        for t in _links(README)
        if _is_relative(t) and t.partition("#")[0]
    }
    assert (DOCS / page).resolve() in linked, f"README.md does not link docs/{page}"


@pytest.mark.parametrize("page", [p for p in TECHNIQUE_PAGES if p != "architecture.md"])
def test_technique_page_sections(page: str):
    headings = {github_anchor(h) for h in _heading_lines(DOCS / page)}
    for section in ("How to use it", "How it works", "What was measured here",
                    "What was not measured / limits"):
        assert github_anchor(section) in headings, f"docs/{page} lacks the section {section!r}"
