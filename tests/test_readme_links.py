"""The README stays a front page and its links hold: README.md is at most 250 lines, and every
relative link of README.md and docs/*.md (images included) names a file of the repository and, with
`#anchor`, a heading of that file (GitHub's anchor rules) or an explicit HTML anchor in it."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 250

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target), the target up to whitespace or ')' (an optional "title" after it)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HTML_TARGET = re.compile(r"""<(?:a|img|source)\b[^>]*\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
_HTML_ANCHOR = re.compile(r"""<[a-z][^>]*\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str, keep_code: bool = False) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked unless `keep_code`."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line if keep_code else _CODE_SPAN.sub("", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text (markup dropped), lower case, every character
    that is not a letter, digit, '_', '-' or space dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "")
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis markers (not intra-word '_')
    out = []
    for char in text.strip().lower():
        if char == " ":
            out.append("-")
        elif char in "-_" or unicodedata.category(char)[0] in "LN" or unicodedata.category(char) == "Mn":
            out.append(char)
    return "".join(out)


def anchors(path: Path) -> set[str]:
    """Every anchor a link into `path` may name: heading slugs (repeats get -1, -2, ...) and HTML ids."""
    found, seen = set(), {}
    for _, line in _prose_lines(path.read_text(), keep_code=True):
        heading = _HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(_HTML_ANCHOR.findall(_CODE_SPAN.sub("", line)))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every relative link in `path`: markdown links and images, reference
    definitions and HTML href/src, outside code."""
    out = []
    for number, line in _prose_lines(path.read_text()):
        targets = _LINK.findall(line) + _HTML_TARGET.findall(line)
        reference = _REFERENCE.match(line)
        if reference:
            targets.append(reference.group(1))
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
                continue  # http:, https:, mailto:, ...: not a file of this repository
            out.append((number, target))
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?")[0])
        destination = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}:{number}: {target}"
        if not destination.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and destination.suffix == ".md" and destination.is_file() \
                and unquote(anchor).lower() not in anchors(destination):
            problems.append(f"{where} (no heading #{anchor} in {destination.name})")
        elif file_part and not destination.is_relative_to(REPO):
            problems.append(f"{where} (outside the repository)")
    return problems


def test_readme_is_at_most_250_lines():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move details into docs/ (at most {MAX_README_LINES})"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path: Path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_slugs_follow_github(tmp_path):
    assert slug("Toy reproduction of Tables 1-2 (results)") == "toy-reproduction-of-tables-1-2-results"
    assert slug("Reproducing Tables 1–2") == "reproducing-tables-12"
    assert slug("`ccp-eval`: one metric, one model, one setting") == "ccp-eval-one-metric-one-model-one-setting"
    assert slug("GCFG: guidance terms are data") == "gcfg-guidance-terms-are-data"
    assert slug("With SDXL (and SD 2.x)") == "with-sdxl-and-sd-2x"
    assert slug("During training: `SampleMetrics`") == "during-training-samplemetrics"
    assert slug("**Bold** and _emphasis_ in a heading") == "bold-and-emphasis-in-a-heading"
    assert slug("The preference study (Table 1's \"Pref.\" column)") == "the-preference-study-table-1s-pref-column"
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\n## Use\n\n```bash\n# not a heading\n```\n\n## Use\n\n[a](#use-1) [b](#missing) "
                   "[c](other.md) [d](https://example.com/x.md) `[e](nowhere.md)`\n")
    assert anchors(doc) >= {"title", "use", "use-1"} and "not-a-heading" not in anchors(doc)
    assert [t for _, t in links(doc)] == ["#use-1", "#missing", "other.md"]
