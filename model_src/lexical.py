"""A lexical word aligner, the baseline for models whose alignments have no gold (imported Marian, user corpora).

Word co-occurrence over a parallel corpus gives each (source word, target word) a Dice coefficient,
2 c(s, t) / (c(s) + c(t)), counted once per sentence pair; a pair of sentences is then aligned by competitive
linking (Melamed 2000): candidate word pairs from the highest Dice down, ties to the pair whose relative positions
are closer, each word linked at most once, pairs under `min_dice` never. Words are whitespace-separated, compared
lowercased without edge punctuation; links are character offsets of whole words, as `word_links` gives them.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

from model_repository.alignment import Link

_WORD = re.compile(r"\S+")  # as model_repository.alignment.word_links cuts words
_EDGES = string.punctuation + "\u00ab\u00bb\u201c\u201d\u2018\u2019\u00bf\u00a1"


def words(text: str) -> list[tuple[int, int, str]]:
    """(start, end, key) of each whitespace-separated word; the key is lowercased, edge punctuation stripped."""
    return [(m.start(), m.end(), m.group().lower().strip(_EDGES) or m.group()) for m in _WORD.finditer(text)]


class DiceLexicon:
    def __init__(self, pairs: Iterable[tuple[str, str]], min_dice: float = 0.1) -> None:
        self.min_dice = min_dice
        self.source, self.target, self.joint = Counter(), Counter(), Counter()
        self.pairs = 0
        self._aligned: dict[tuple[str, str], list[Link]] = {}
        for src, tgt in pairs:
            s = {k for *_, k in words(src)}
            t = {k for *_, k in words(tgt)}
            self.source.update(s)
            self.target.update(t)
            self.joint.update((a, b) for a in s for b in t)
            self.pairs += 1

    def dice(self, s: str, t: str) -> float:
        both = self.joint.get((s, t), 0)
        return 2 * both / (self.source[s] + self.target[t]) if both else 0.0

    def align(self, source: str, target: str) -> list[Link]:
        """Competitive linking of one sentence pair; the links in target order."""
        if (source, target) not in self._aligned:
            self._aligned[source, target] = self._link(source, target)
        return self._aligned[source, target]

    def _link(self, source: str, target: str) -> list[Link]:
        src, tgt = words(source), words(target)
        candidates = []
        for i, (_, _, s) in enumerate(src):
            for j, (_, _, t) in enumerate(tgt):
                d = self.dice(s, t)
                if d >= self.min_dice:
                    distance = abs(i / max(len(src), 1) - j / max(len(tgt), 1))
                    candidates.append((-d, distance, i, j))
        linked_s, linked_t, links = set(), set(), []
        for _d, _distance, i, j in sorted(candidates):
            if i not in linked_s and j not in linked_t:
                linked_s.add(i)
                linked_t.add(j)
                links.append(Link(src[i][0], src[i][1], tgt[j][0], tgt[j][1]))
        return sorted(links, key=lambda x: (x.target_start, x.source_start))


def agreement(mine: Iterable[Link], reference: Iterable[Link]) -> tuple[int, int, int]:
    """(links in both, links in `mine`, links in `reference`): word links compared as sets."""
    a, b = set(mine), set(reference)
    return len(a & b), len(a), len(b)


def scores(both: int, mine: int, reference: int) -> dict:
    """Precision (of `mine`), recall (of `reference`) and their F1, from the counts `agreement` gives."""
    p, r = both / max(mine, 1), both / max(reference, 1)
    return {"precision": round(p, 5), "recall": round(r, 5), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 5)}


def word_indices(links: Iterable[Link], source: str, target: str) -> set[tuple[int, int]]:
    """Whole-word links (as `word_links` or `DiceLexicon.align` give them) as (source word, target word) indices."""
    s = {w[0]: i for i, w in enumerate(words(source))}
    t = {w[0]: j for j, w in enumerate(words(target))}
    return {(s[x.source_start], t[x.target_start]) for x in links}
