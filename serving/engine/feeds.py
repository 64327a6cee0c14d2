"""Graph inputs, built in one place from the names a graph declares: encoder batches and decoder steps.

A decoder `Row` is one hypothesis being decoded: its source's cross keys/values, its own self-attention cache and
the token it feeds next. Rows of different lengths share a step: sources are right-padded, caches left-padded,
and the padding is masked out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(eq=False, slots=True)
class Row:
    cross_k: np.ndarray  # (L, 1, nh, S, hs), shared by every row of one request
    cross_v: np.ndarray
    past_k: np.ndarray  # (L, 1, nh, P, hs)
    past_v: np.ndarray
    next_token: int
    home: dict[str, np.ndarray] | None = None  # the step outputs its cache lives in (present_k/v), if any
    home_index: int = -1  # its row there

    @classmethod
    def start(cls, cross_k: np.ndarray, cross_v: np.ndarray, bos_id: int) -> Row:
        L, _, nh, _, hs = cross_k.shape
        empty = np.zeros((L, 1, nh, 0, hs), cross_k.dtype)  # (L, 1, nh, 0, hs): nothing decoded yet
        return cls(cross_k, cross_v, empty, empty, bos_id)

    def advance(self, out: dict[str, np.ndarray], i: int, P: int, token: int) -> None:
        """Row i of a step with padded past length P becomes this row's cache (views, no copy); feed `token`."""
        offset = P - self.past
        self.past_k = out["present_k"][:, i:i + 1, :, offset:]  # (L, 1, nh, past+1, hs)
        self.past_v = out["present_v"][:, i:i + 1, :, offset:]
        self.home, self.home_index, self.next_token = out, i, token

    @property
    def past(self) -> int:
        return self.past_k.shape[3]

    @property
    def src_len(self) -> int:
        return self.cross_k.shape[3]


def encoder_feeds(sources: Sequence[Sequence[int]], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Right-padded source ids (B, S) and their mask, for the inputs `names` the graph declares."""
    S = max(len(s) for s in sources)
    ids = np.zeros((len(sources), S), np.int64)  # (B, S); 0 is <pad>, masked anyway
    mask = np.zeros((len(sources), S), bool)
    for i, s in enumerate(sources):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    built = {"src_ids": ids, "src_mask": mask}
    return {name: built[name] for name in names}


def _single(row: Row) -> dict[str, np.ndarray]:
    """One row needs no padding: its own arrays go in as they are, no copy."""
    P = row.past
    return {"input_ids": np.array([row.next_token], np.int64), "positions": np.array([P], np.int64),
            "self_mask": np.ones((1, P + 1), bool), "past_k": row.past_k, "past_v": row.past_v,
            "cross_k": row.cross_k, "cross_v": row.cross_v, "src_mask": np.ones((1, row.src_len), bool)}


def _stacked(rows: Sequence[Row], attr: str, length: Callable[[Row], int], width: int, left: bool) -> np.ndarray:
    """Rows' (L, 1, nh, T_i, hs) arrays as one (L, B, nh, width, hs) batch, padded on the left or the right.
    Rows that all have the full width are concatenated in one call (beam groups, equal lengths)."""
    arrays = [getattr(r, attr) for r in rows]
    if all(length(r) == width for r in rows):
        return np.concatenate(arrays, axis=1)
    L, _, nh, _, hs = arrays[0].shape
    out = np.zeros((L, len(rows), nh, width, hs), np.float32)  # (L, B, nh, T, hs)
    for i, (r, a) in enumerate(zip(rows, arrays, strict=True)):
        n = length(r)
        if left:
            out[:, i, :, width - n:] = a[:, 0]
        else:
            out[:, i, :, :n] = a[:, 0]
    return out


class SourceBatch:
    """The padded cross keys/values and source mask of the last multi-row step, reused while its rows' sources are
    the same objects in the same order (most steps of continuous batching, every step of a beam group): a
    request's source never changes while it decodes, so neither does this part of the feeds."""

    def __init__(self) -> None:
        self._sources: tuple[np.ndarray, ...] = ()
        self._feeds: dict[str, np.ndarray] = {}

    def feeds(self, rows: Sequence[Row]) -> dict[str, np.ndarray]:
        sources = tuple(r.cross_k for r in rows)
        if len(sources) != len(self._sources) or any(a is not b for a, b in zip(sources, self._sources, strict=True)):
            self._sources, self._feeds = sources, _source_feeds(rows)
        return self._feeds


def _source_feeds(rows: Sequence[Row]) -> dict[str, np.ndarray]:
    S = max(r.src_len for r in rows)
    src_mask = np.zeros((len(rows), S), bool)  # (B, S): right-padded sources
    for i, r in enumerate(rows):
        src_mask[i, : r.src_len] = True
    return {"cross_k": _stacked(rows, "cross_k", Row.src_len.fget, S, left=False),
            "cross_v": _stacked(rows, "cross_v", Row.src_len.fget, S, left=False), "src_mask": src_mask}


def _past_from_home(rows: Sequence[Row], P: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The batch's caches taken straight from the last step's outputs, when every row lives there: the present
    arrays as they are (the same rows in the same order: no copy at all), or trimmed of leading padding and
    gathered by row (rows left or beams were reordered: one copy). None when a row lives elsewhere (a new one)."""
    home = rows[0].home
    if home is None or any(r.home is not home for r in rows):
        return None
    pk, pv = home["present_k"], home["present_v"]  # (L, B', nh, P' + 1, hs), every row's cache right-aligned
    width = pk.shape[3]
    if width > P:  # columns that are padding for every remaining row
        pk, pv = pk[:, :, :, width - P:], pv[:, :, :, width - P:]  # (L, B', nh, P, hs)
    index = [r.home_index for r in rows]
    if index != list(range(pk.shape[1])):
        pk, pv = pk[:, index], pv[:, index]  # (L, B, nh, P, hs)
    return pk, pv


def _padded(rows: Sequence[Row], sources: SourceBatch | None) -> dict[str, np.ndarray]:
    pasts = np.array([r.past for r in rows], np.int64)  # (B,)
    P = int(pasts.max())
    self_mask = np.arange(P + 1) >= (P - pasts)[:, None]  # (B, P + 1): left-padded cache, then the new token
    cached = _past_from_home(rows, P)
    past_k, past_v = cached if cached is not None else (_stacked(rows, "past_k", Row.past.fget, P, left=True),
                                                       _stacked(rows, "past_v", Row.past.fget, P, left=True))
    return {"input_ids": np.array([r.next_token for r in rows], np.int64), "positions": pasts,
            "self_mask": self_mask, "past_k": past_k, "past_v": past_v,
            **(sources.feeds(rows) if sources is not None else _source_feeds(rows))}


def decoder_feeds(rows: Sequence[Row], names: Sequence[str],
                  sources: SourceBatch | None = None) -> tuple[dict[str, np.ndarray], int]:
    """The decoder step's inputs for `rows` (only those the graph declares) and the padded past length P.
    `sources` keeps the source part of the feeds from one step to the next (the engine has one per graph).

    Row i's cache sits at offset P - rows[i].past in the step's `present_k/v` and self-attention keys.
    """
    built = _single(rows[0]) if len(rows) == 1 else _padded(rows, sources)
    return {name: built[name] for name in names}, max(r.past for r in rows)
