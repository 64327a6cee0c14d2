"""Inline markup carried across a translation: tags out of the source, tags into the output by the alignment.

`parse` takes a source with inline tags (`<b>..</b>`, `<a href="..">..</a>`, self-closing `<x/>` placeholders),
checks that they nest, and gives the plain text the model reads plus each tag with the plain-text span it wraps.
`place` puts every tag into the plain output: a pair around the output characters linked to its source span, a
placeholder where the output of the source that follows it begins. The output is well-formed by construction:
a pair's span is set by the output tokens with letters or digits linked into its source span (when that has
some) and sheds the spaces and punctuation at its edges that its source span does not have there; the tags keep
their source nesting (a child's output span is clipped into its parent's), siblings are ordered by
where they land in the output and never overlap (a later one starts where an earlier one ends). A pair whose
source span no output links to, and a placeholder with nothing to anchor to, go to the fallback position: the
end of their parent's output span (the end of the output for top-level tags), a pair there wrapping nothing.
Every tag appears exactly once. Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:_.-]*)((?:\s+[^<>]*?)?)\s*(/?)>")


class MarkupError(ValueError):
    """Source markup that cannot be carried across; the message names the tag and its character offset."""


@dataclass
class Tag:
    name: str
    open: str  # the opening tag as the source wrote it
    close: str | None  # None: a self-closing placeholder
    start: int  # the plain-text span it wraps: [start, end); a placeholder's start == end
    end: int = -1
    children: list[Tag] = field(default_factory=list)
    placed: bool = True  # False: it went to the fallback position

    @property
    def pair(self) -> bool:
        return self.close is not None


@dataclass
class Markup:
    plain: str  # the source without its tags: what the model reads
    tags: list[Tag]  # top-level tags, in source order, each with its children
    offsets: list[int]  # plain-text character i is character offsets[i] of the marked-up source; then its length

    def all_tags(self) -> list[Tag]:
        out, stack = [], list(reversed(self.tags))
        while stack:
            tag = stack.pop()
            out.append(tag)
            stack += reversed(tag.children)
        return out


def parse(text: str) -> Markup:
    """Split marked-up source text into plain text and nested tags; MarkupError if the tags do not nest."""
    plain: list[str] = []
    offsets: list[int] = []
    root = Tag("", "", "", 0)
    stack = [root]
    at = 0
    for m in TAG.finditer(text):
        for i in range(at, m.start()):
            plain.append(text[i])
            offsets.append(i)
        at = m.end()
        closing, name, self_closing = m.group(1) == "/", m.group(2), m.group(4) == "/"
        here = len(plain)
        if closing:
            if len(stack) == 1:
                raise MarkupError(f"closing tag {m.group(0)!r} at character {m.start()} has no opening tag")
            if stack[-1].name != name:
                raise MarkupError(f"closing tag {m.group(0)!r} at character {m.start()} does not match the open "
                                  f"{stack[-1].open!r}; tags must nest")
            tag = stack.pop()
            tag.end, tag.close = here, m.group(0)
        elif self_closing:
            stack[-1].children.append(Tag(name, m.group(0), None, here, here))
        else:
            tag = Tag(name, m.group(0), "", here)
            stack[-1].children.append(tag)
            stack.append(tag)
    if len(stack) > 1:
        raise MarkupError(f"tag {stack[-1].open!r} is never closed; close it with </{stack[-1].name}>")
    for i in range(at, len(text)):
        plain.append(text[i])
        offsets.append(i)
    offsets.append(len(text))
    return Markup("".join(plain), root.children, offsets)


def _trimmed(text: str, start: int, end: int, keep_start: bool, keep_end: bool) -> tuple[int, int]:
    """[start, end) without the spaces and punctuation at its edges (unless `keep_*`)."""
    while not keep_start and start < end and not text[start].isalnum():
        start += 1
    while not keep_end and end > start and not text[end - 1].isalnum():
        end -= 1
    return start, end


def _target_span(tag: Tag, links: Sequence[tuple[int, int, int, int]], source: str,
                 output: str) -> tuple[int, int] | None:
    """The output characters linked to a pair's source span, or a placeholder's anchor (as an empty span).
    Separators the output adds (spaces, punctuation: the `-` of a date) link wherever their attention went, so
    around a source span with letters or digits only output tokens with letters or digits count, and the span
    sheds separators at its edges unless its source span has them there too."""
    if tag.pair:
        hit = [(ts, te) for ss, se, ts, te in links if ss < tag.end and tag.start < se]
        inner = source[tag.start:tag.end]
        if any(c.isalnum() for c in inner):  # separators do not decide where a pair of words and numbers goes
            hit = [t for t in hit if any(c.isalnum() for c in output[t[0]:t[1]])] or hit
        if not hit:
            return None
        start, end = _trimmed(output, min(t[0] for t in hit), max(t[1] for t in hit),
                              bool(inner) and not inner[0].isalnum(), bool(inner) and not inner[-1].isalnum())
        return (start, end) if end > start else (min(t[0] for t in hit), max(t[1] for t in hit))
    after = [(ss, ts) for ss, _se, ts, _te in links if ss >= tag.start]
    if after:
        return (min(after)[1],) * 2
    before = [(se, te) for _ss, se, _ts, te in links if se <= tag.start]
    return (max(before)[1],) * 2 if before else None


def _render(output: str, start: int, end: int, tags: list[Tag], links, source: str) -> str:
    """output[start:end] with `tags` (and their children) placed inside it."""
    spans = []
    for tag in tags:
        span = _target_span(tag, links, source, output)
        tag.placed = span is not None
        s, e = span if span is not None else (end, end)
        s, e = min(max(s, start), end), min(max(e, start), end)  # inside the parent's span
        spans.append([s, max(s, e), tag])
    spans.sort(key=lambda x: (x[0], x[1]))
    out, at = [], start
    for s, e, tag in spans:
        s = max(s, at)  # siblings never overlap: a later one starts where the earlier one ends
        e = max(e, s)
        out.append(output[at:s])
        if tag.pair:
            out.append(tag.open + _render(output, s, e, tag.children, links, source) + tag.close)
        else:
            out.append(tag.open)
        at = e
    out.append(output[at:end])
    return "".join(out)


def place(markup: Markup, output: str, links: Sequence[tuple[int, int, int, int]]) -> str:
    """The plain `output` with every tag of `markup` placed by `links` (source offsets into `markup.plain`,
    target offsets into `output`). Each tag's `placed` says whether it found its span or fell back."""
    return _render(output, 0, len(output), markup.tags, links, markup.plain)
