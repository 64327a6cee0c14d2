"""Alignments from cross-attention: which source span each output token comes from, in character offsets.

The method (chosen per model at export, recorded in the manifest): average the cross-attention of the chosen
(layer, head) pairs, take the source token with the most of it (`argmax`; tokens that cover no source text, such
as </s>, are never chosen), and read it at the step the method says. A decoder step that *chooses*
token t attends with the query of token t-1 (`shift` 0 reads that step); the next step attends with token t as
its input (`shift` 1 reads that one, "shift-att"); which aligns better depends on the model, so export measures
both. An output token with a letter or digit only links to source tokens with one. A link is
`(source_start, source_end, target_start, target_end)`: the aligned source token's characters in
the source text and the characters the output token added to the output text. Word links join the links'
spans to the whitespace-separated words that hold them. Shared by export (measurement) and serving (per token,
as it streams); needs numpy, nothing else.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

_WORD = re.compile(r"\S+")
_ALNUM = re.compile(r"[^\W_]")  # a letter or a digit, in any script


class Link(NamedTuple):
    source_start: int
    source_end: int
    target_start: int
    target_end: int


@dataclass(frozen=True)
class AlignmentMethod:
    heads: tuple[tuple[int, int], ...]  # (decoder layer, head) pairs whose cross-attention is averaged
    shift: int = 0  # 0: the step that chose the token; 1: the next step, where the token is the decoder's input

    def __post_init__(self) -> None:
        if not self.heads or min(min(h) for h in self.heads) < 0 or self.shift not in (0, 1):
            raise ValueError(f"not an alignment method: heads {self.heads}, shift {self.shift}")
        object.__setattr__(self, "_coef", {})  # (L, nh) -> the (L, nh) weights of each head in the sum

    @classmethod
    def default(cls, n_layers: int, n_heads: int) -> AlignmentMethod:
        """Where no gold was there to choose by: the penultimate layer's heads averaged, shifted, as the
        alignment literature found best for Transformer decoders (Garg et al. 2019; Chen et al. 2020)."""
        return _interned(tuple((max(n_layers - 2, 0), h) for h in range(n_heads)), 1)

    def describe(self) -> str:
        heads = ", ".join(f"{layer}.{head}" for layer, head in self.heads)
        return f"heads (layer.head) {heads} averaged, shift {self.shift}"

    def to_dict(self) -> dict:
        return {"heads": [list(h) for h in self.heads], "shift": self.shift}

    @classmethod
    def from_dict(cls, data: dict) -> AlignmentMethod:
        return _interned(tuple((int(layer), int(head)) for layer, head in data["heads"]), int(data.get("shift", 0)))

    def __reduce__(self):
        """Unpickled (in an engine process) as the one object of its value, so that the jobs of a decoder step
        share its einsum."""
        return _interned, (self.heads, self.shift)

    def masses(self, cross: np.ndarray) -> np.ndarray:
        """The chosen heads' attention of every row of a decoder step, summed (the argmax of a sum is that of the
        mean): `cross` (L, B, nh, 1, T_k) -> (B, T_k). One einsum for the batch: fancy indexing and a mean per
        row cost 4x as much per token."""
        return np.einsum("lh,lbhqs->bs", self._weights(cross.shape[0], cross.shape[2]), cross)  # (B, T_k)

    def _weights(self, n_layers: int, n_heads: int) -> np.ndarray:
        """(L, nh): 1 for the chosen heads, 0 elsewhere; made once per model shape."""
        coef = self._coef.get((n_layers, n_heads))
        if coef is None:
            coef = self._coef[(n_layers, n_heads)] = np.zeros((n_layers, n_heads), np.float32)
            coef[tuple(zip(*self.heads, strict=True))] = 1.0
        return coef


@functools.lru_cache(maxsize=64)
def _interned(heads: tuple[tuple[int, int], ...], shift: int) -> AlignmentMethod:
    return AlignmentMethod(heads, shift)


def source_mask(spans: list[tuple[int, int]], text: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """What may be aligned to, as additive masks (0 where allowed, -inf elsewhere): source tokens that cover some
    source text; and those whose text has a letter or digit (where an output token with a letter or digit aligns).
    None where nothing is allowed."""
    valid, content = np.zeros(len(spans), np.float32), np.zeros(len(spans), np.float32)  # (S,) each
    for i, (start, end) in enumerate(spans):
        if end <= start:
            valid[i] = -np.inf
        if _ALNUM.search(text, start, end) is None:
            content[i] = -np.inf
    return (valid if np.isfinite(valid).any() else None), (content if np.isfinite(content).any() else None)


class Aligner:
    """The links of one output, built as it is decoded: `step()` per decoder step (its row of the step's
    `method.masses`),
    `token()` per output token (the text it released), `ready()` the links complete since the last call,
    `finish()` the rest. With shift 1 a token's link is complete one step after the token; a last token that no
    step followed (a length limit) takes its own step's attention. An output token with a letter or digit links to
    the source token with the most attention among those with a letter or digit: separators (`/`, spaces) draw
    attention without being where content comes from."""

    def __init__(self, method: AlignmentMethod, spans: list[tuple[int, int]], source: str) -> None:
        self.method, self.spans = method, spans
        self.valid, self.content = source_mask(spans, source)
        self.content = self.content if self.content is not None else self.valid
        self.masses: list[np.ndarray] = []  # per decoder step: the averaged attention over the source (S,)
        self.targets: list[tuple[int, int, bool]] = []  # per output token: its characters, and whether alnum
        self.given = 0  # tokens whose links were handed out
        self.all: list[Link] = []  # the links handed out so far

    def step(self, mass: np.ndarray) -> None:
        """One decoder step: this output's row (T_k,) of the step's `method.masses`."""
        self.masses.append(mass[: len(self.spans)])

    def token(self, start: int, end: int, text: str) -> None:
        self.targets.append((start, end, _ALNUM.search(text) is not None))

    def _link(self, k: int, mass: np.ndarray) -> Link | None:
        start, end, alnum = self.targets[k]
        mask = self.content if alnum else self.valid
        if end <= start or mask is None:
            return None
        s0, s1 = self.spans[int((mass + mask).argmax())]
        return Link(s0, s1, start, end)

    def _mass(self, k: int) -> np.ndarray:
        return self.masses[min(k + self.method.shift, len(self.masses) - 1)]

    def _give(self, until: int) -> list[Link]:
        if self.given >= until:
            return []
        if until == self.given + 1:  # the usual case: one token's link per step
            link = self._link(self.given, self._mass(self.given))
            links = [link] if link is not None else []
        else:
            links = [x for x in (self._link(k, self._mass(k)) for k in range(self.given, until)) if x is not None]
        self.given = until
        self.all += links
        return links

    def ready(self) -> list[Link]:
        return self._give(min(len(self.targets), len(self.masses) - self.method.shift))

    def finish(self, text_length: int) -> list[Link]:
        """The links not given yet, the output cut to `text_length` characters (a stop string)."""
        return clip(self._give(len(self.targets)), text_length)

    def links(self, text_length: int) -> list[Link]:
        """Every link of the output (once `finish` has run), the output cut to `text_length` characters."""
        return clip(self.all, text_length)


def clip(links: list[Link], text_length: int) -> list[Link]:
    return [x._replace(target_end=min(x.target_end, text_length)) for x in links if x.target_start < text_length]


def _words(text: str) -> tuple[list[int], list[int]]:
    """The starts and the ends of the whitespace-separated words, in order."""
    spans = [m.span() for m in _WORD.finditer(text)]
    return [a for a, _ in spans], [b for _, b in spans]


def _word_of(words: tuple[list[int], list[int]], start: int, end: int) -> range:
    """The indices of the words that overlap characters [start, end)."""
    starts, ends = words
    return range(bisect.bisect_right(ends, start), bisect.bisect_left(starts, end))


def word_links(links: list[Link], source: str, target: str) -> list[Link]:
    """The links joined to whole words (whitespace-separated) on both sides, each word pair once, in target
    order; links that cover only whitespace give none."""
    src, tgt = _words(source), _words(target)
    pairs = {(t, s) for x in links for t in _word_of(tgt, x.target_start, x.target_end)
             for s in _word_of(src, x.source_start, x.source_end)}
    return [Link(src[0][s], src[1][s], tgt[0][t], tgt[1][t]) for t, s in sorted(pairs)]
