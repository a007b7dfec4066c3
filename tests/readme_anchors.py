"""The README's headings and the anchors GitHub gives them.

GitHub names a heading's anchor with github-slugger: the heading's rendered
text, lower-cased, with every character removed that is not a letter, a mark,
a number, connector punctuation (``_``), ``-`` or a space, then each space
turned into ``-``; a repeated anchor gets ``-1``, ``-2``, ... A few lines of
our own rather than a Markdown library: the README uses ATX headings (``#``)
and fenced code blocks only, and the rendering that matters here is
dropping the inline markup (code spans, links, emphasis) around the text.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
#: The repository page the README is shown on; problem ``type`` URLs point into it.
REPOSITORY_URL = "https://github.com/m2m-middleware/m2m-middleware"

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_EMPHASIS = re.compile(r"(\*{1,3})(\S.*?)\1")
_HTML_TAG = re.compile(r"<[^>]+>")
#: A section documenting one error code: ``### Error `invalid_token` ``.
_ERROR_HEADING = re.compile(r"Error `([a-z_]+)`")


@dataclass(frozen=True)
class Heading:
    level: int
    source: str  # as written, with its Markdown
    text: str  # as rendered
    anchor: str
    body: str  # the lines up to the next heading of this level or higher


def rendered(source: str) -> str:
    text = _CODE_SPAN.sub(lambda m: m[2].strip(), source)
    text = _LINK.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\2", text)
    return _HTML_TAG.sub("", text)


def slug(text: str) -> str:
    """github-slugger's slug of one heading's rendered text (before de-duplication)."""
    kept = (
        c
        for c in text.lower()
        if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc"
    )
    return "".join(kept).replace(" ", "-")


def headings(markdown: str) -> list[Heading]:
    """Every ATX heading outside fenced code blocks, with GitHub's anchor for it."""
    lines = markdown.splitlines()
    found: list[tuple[int, int, str]] = []  # line number, level, source
    fence = None
    for number, line in enumerate(lines):
        opened = _FENCE.match(line)
        if fence is not None:
            if opened and opened[1][0] == fence[0] and len(opened[1]) >= len(fence):
                fence = None
            continue
        if opened:
            fence = opened[1]
            continue
        match = _ATX.match(line)
        if match:
            found.append((number, len(match[1]), match[2]))
    seen: dict[str, int] = {}
    result = []
    for index, (number, level, source) in enumerate(found):
        text = rendered(source)
        anchor = base = slug(text)
        if base in seen:
            seen[base] += 1
            anchor = f"{base}-{seen[base]}"
        else:
            seen[base] = 0
        end = next((n for n, lvl, _ in found[index + 1 :] if lvl <= level), len(lines))
        result.append(Heading(level, source, text, anchor, "\n".join(lines[number + 1 : end])))
    return result


@cache
def readme_headings() -> tuple[Heading, ...]:
    return tuple(headings(README.read_text(encoding="utf-8")))


def readme_anchors() -> frozenset[str]:
    return frozenset(h.anchor for h in readme_headings())


def error_sections() -> dict[str, Heading]:
    """Error code -> the README heading that documents it, from the "Errors" section."""
    sections: dict[str, Heading] = {}
    inside = False
    for heading in readme_headings():
        if heading.level <= 2:
            inside = heading.text == "Errors"
            continue
        match = _ERROR_HEADING.fullmatch(heading.source.strip())
        if inside and match:
            sections[match[1]] = heading
    return sections
