"""The documentation says what is true now: a short README, no issue numbers anywhere, and
every relative link in README.md, docs/ and notebooks/README.md leads to a file (and, for a
``#section``, to a heading of that file) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 12_000
# the word followed by a number (with or without "s", a space, a "#"): history belongs in
# git log, not in the tree
ISSUE_NUMBER = re.compile(r"issues? ?#?[0-9]+", re.IGNORECASE)
SCANNED = ["README.md", "docs", "minisq", "tests", "notebooks", "benchmarks", "assignments"]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "notebooks" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _text_files():
    for entry in SCANNED:
        path = ROOT / entry
        for f in [path] if path.is_file() else sorted(path.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                try:
                    yield f, f.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    continue  # binary data


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(md: Path) -> set:
    return {_slug(line.lstrip("#")) for line in md.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; the limit is {README_MAX_BYTES}"


def test_the_issue_number_pattern_finds_what_it_should():
    word = "iss" + "ue"  # spelled in two halves so that this file passes its own test
    for text in (f"before {word} 15 moved", f"{word.title()}s #3", f"{word}#4", f"see {word.upper()} 12"):
        assert ISSUE_NUMBER.search(text), text
    for text in ("an issue with 2 models", "llm-compressor's pull request 1022", "tissue"):
        assert not ISSUE_NUMBER.search(text), text


def test_no_issue_numbers_anywhere():
    hits = [f"{f.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
            for f, text in _text_files() for m in ISSUE_NUMBER.finditer(text)]
    assert hits == [], "history belongs in git log, not in the tree:\n" + "\n".join(hits)


def test_the_docs_exist():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"api.md", "big-models.md", "course.md", "benchmarks.md", "correctness.md", "errors.md",
            "gpu.md", "architecture.md"} <= names


def _broken_links(md: Path) -> list:
    broken = []
    for target in LINK.findall(md.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    return broken


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(md):
    assert _broken_links(md) == []


def test_the_link_checker_catches_a_broken_link(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("# The Title: `a_b`\n[ok](x.md#the-title-a_b) [web](https://example.org/x) "
                  "[gone](missing.md) [bad anchor](x.md#nope)\n")
    assert [b.split(":")[0] for b in _broken_links(md)] == ["missing.md", "x.md#nope"]


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'pip install -e ".[dev]" && python -m pytest -q' in readme
    assert "pip install -e . && python -m minisq.demo" in readme
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        text = ci.read_text(encoding="utf-8")
        assert '-e ".[dev]"' in text and "python3 -m pytest -q" in text
