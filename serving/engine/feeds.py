"""Graph inputs, built in one place from the names a graph declares: encoder batches and decoder steps.

A decoder `Row` is one hypothesis being decoded: its source's cross keys/values, its own self-attention cache and
the token it feeds next. Rows of different lengths share a step: sources are right-padded, caches left-padded,
and the padding is masked out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ENCODER_INPUTS = ("src_ids", "src_mask")
DECODER_INPUTS = ("input_ids", "positions", "self_mask", "past_k", "past_v", "cross_k", "cross_v", "src_mask")


@dataclass(eq=False)
class Row:
    cross_k: np.ndarray  # (L, 1, nh, S, hs), shared by every row of one request
    cross_v: np.ndarray
    past_k: np.ndarray  # (L, 1, nh, P, hs)
    past_v: np.ndarray
    next_token: int

    @classmethod
    def start(cls, cross_k: np.ndarray, cross_v: np.ndarray, bos_id: int) -> Row:
        L, _, nh, _, hs = cross_k.shape
        empty = np.zeros((L, 1, nh, 0, hs), cross_k.dtype)  # (L, 1, nh, 0, hs): nothing decoded yet
        return cls(cross_k, cross_v, empty, empty, bos_id)

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


def _single(row: Row) -> dict[str, Callable[[], np.ndarray]]:
    """One row needs no padding: its own arrays go in as they are, no copy."""
    P = row.past
    return {"input_ids": lambda: np.array([row.next_token], np.int64), "positions": lambda: np.array([P], np.int64),
            "self_mask": lambda: np.ones((1, P + 1), bool), "past_k": lambda: row.past_k,
            "past_v": lambda: row.past_v, "cross_k": lambda: row.cross_k, "cross_v": lambda: row.cross_v,
            "src_mask": lambda: np.ones((1, row.src_len), bool)}


def _padded(rows: Sequence[Row]) -> dict[str, Callable[[], np.ndarray]]:
    n = len(rows)
    S = max(r.src_len for r in rows)
    P = max(r.past for r in rows)
    L, _, nh, _, hs = rows[0].cross_k.shape

    def cross(attr: str) -> np.ndarray:
        out = np.zeros((L, n, nh, S, hs), np.float32)  # (L, B, nh, S, hs), right-padded sources
        for i, r in enumerate(rows):
            out[:, i, :, : r.src_len] = getattr(r, attr)[:, 0]
        return out

    def past(attr: str) -> np.ndarray:
        out = np.zeros((L, n, nh, P, hs), np.float32)  # (L, B, nh, P, hs), left-padded caches
        for i, r in enumerate(rows):
            out[:, i, :, P - r.past:] = getattr(r, attr)[:, 0]
        return out

    def self_mask() -> np.ndarray:
        m = np.zeros((n, P + 1), bool)  # (B, P + 1): the cached keys and the new token's own
        for i, r in enumerate(rows):
            m[i, P - r.past:] = True
        return m

    def src_mask() -> np.ndarray:
        m = np.zeros((n, S), bool)  # (B, S)
        for i, r in enumerate(rows):
            m[i, : r.src_len] = True
        return m

    return {"input_ids": lambda: np.array([r.next_token for r in rows], np.int64),
            "positions": lambda: np.array([r.past for r in rows], np.int64), "self_mask": self_mask,
            "past_k": lambda: past("past_k"), "past_v": lambda: past("past_v"),
            "cross_k": lambda: cross("cross_k"), "cross_v": lambda: cross("cross_v"), "src_mask": src_mask}


def decoder_feeds(rows: Sequence[Row], names: Sequence[str]) -> tuple[dict[str, np.ndarray], int]:
    """The decoder step's inputs for `rows` (only those the graph declares) and the padded past length P.

    Row i's cache sits at offset P - rows[i].past in the step's `present_k/v` and self-attention keys.
    """
    builders = _single(rows[0]) if len(rows) == 1 else _padded(rows)
    return {name: builders[name]() for name in names}, max(r.past for r in rows)
