"""Graph inputs, built in one place: encoder batches and decoder steps (per-layer caches, by the contract's names).

A decoder `Row` is one hypothesis being decoded: its source's cross keys/values, its own self-attention cache and
the token it feeds next. Rows of different lengths share a step: sources are right-padded, caches left-padded,
and the padding is masked out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Layers = Sequence[np.ndarray]  # one array per decoder layer: a stacked (L, ...) array or a tuple of L arrays


class Row:
    """One hypothesis being decoded. Its cross keys/values are (L, 1, nh, S, hs); its cache is per layer
    (1, nh, P, hs). After a step the cache lives in that step's outputs (`home`, row `home_index`): the views are
    only made when a step needs this row apart from its home (a new row joined, or a beam forked)."""

    __slots__ = ("_past", "_pk", "_pv", "cross_k", "cross_v", "home", "home_index", "next_token")

    def __init__(self, cross_k: np.ndarray, cross_v: np.ndarray, past_k: Layers, past_v: Layers,
                 next_token: int) -> None:
        self.cross_k, self.cross_v, self.next_token = cross_k, cross_v, next_token
        self._pk, self._pv = past_k, past_v
        self._past = past_k[0].shape[2]
        self.home: dict | None = None  # the step outputs its cache lives in (present_k/v), if any
        self.home_index = -1  # its row there

    @classmethod
    def start(cls, cross_k: np.ndarray, cross_v: np.ndarray, bos_id: int) -> Row:
        L, _, nh, _, hs = cross_k.shape
        empty = np.zeros((L, 1, nh, 0, hs), cross_k.dtype)  # (L, 1, nh, 0, hs): nothing decoded yet
        # contiguous once per request, so a row decoding alone is fed without a copy at every step
        return cls(np.ascontiguousarray(cross_k), np.ascontiguousarray(cross_v), empty, empty, bos_id)

    def advance(self, out: dict, i: int, token: int) -> None:
        """Row i of a step's outputs holds this row's cache now (one token longer); feed `token` next."""
        self._past += 1
        self._pk = self._pv = None
        self.home, self.home_index, self.next_token = out, i, token

    def fork(self) -> Row:
        """A row with this one's source and cache (a beam's survivor), advanced on its own."""
        row = Row.__new__(Row)
        for name in Row.__slots__:
            setattr(row, name, getattr(self, name))
        return row

    def _views(self, name: str) -> tuple[np.ndarray, ...]:
        layers = host_layers(self.home, name)  # L x (B, nh, W, hs), this row's cache right-aligned
        width, i = layers[0].shape[2], self.home_index
        return tuple(a[i:i + 1, :, width - self._past:] for a in layers)  # L x (1, nh, past, hs): views

    @property
    def past_k(self) -> Layers:
        if self._pk is None:
            self._pk = self._views("present_k")
        return self._pk

    @property
    def past_v(self) -> Layers:
        if self._pv is None:
            self._pv = self._views("present_v")
        return self._pv

    @property
    def past(self) -> int:
        return self._past

    @property
    def src_len(self) -> int:
        return self.cross_k.shape[3]


def host_layers(home: dict, name: str) -> tuple[np.ndarray, ...]:
    """A step's per-layer output as numpy. A runner with IO binding leaves the caches in OrtValues where the
    model runs: they come to the host once per step however many rows need them (no copy on CPU, where an
    OrtValue's numpy() shares its memory)."""
    layers = home[name]
    if all(isinstance(a, np.ndarray) for a in layers):
        return layers
    key = f"{name}:host"
    if key not in home:
        home[key] = tuple(a if isinstance(a, np.ndarray) else a.numpy() for a in layers)
    return home[key]


def _batch_of(layer) -> int:
    return layer.shape[0] if isinstance(layer, np.ndarray) else layer.shape()[0]  # an OrtValue's shape()


def _width_of(layer) -> int:
    return layer.shape[2] if isinstance(layer, np.ndarray) else layer.shape()[2]


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


def _single(row: Row) -> dict:
    """One row needs no padding: its own arrays go in as they are, no copy."""
    P = row.past
    return {"input_ids": np.array([row.next_token], np.int64), "positions": np.array([P], np.int64),
            "self_mask": np.ones((1, P + 1), bool), "past_k": row.past_k, "past_v": row.past_v,
            "cross_k": row.cross_k, "cross_v": row.cross_v, "src_mask": np.ones((1, row.src_len), bool)}


def _stacked(rows: Sequence[Row], attr: str, length: Callable[[Row], int], width: int,
             left: bool) -> tuple[np.ndarray, ...]:
    """Rows' per-layer (1, nh, T_i, hs) arrays as L arrays (B, nh, width, hs), padded on the left or the right.
    Rows that all have the full width are concatenated as they are (beam groups, equal lengths)."""
    per_row = [getattr(r, attr) for r in rows]
    L, full = len(per_row[0]), all(length(r) == width for r in rows)
    out = []
    for layer in range(L):
        arrays = [a[layer] for a in per_row]  # B x (1, nh, T_i, hs)
        if full:
            out.append(np.concatenate(arrays, axis=0))
            continue
        _, nh, _, hs = arrays[0].shape
        batch = np.zeros((len(rows), nh, width, hs), np.float32)  # (B, nh, T, hs)
        for i, (r, a) in enumerate(zip(rows, arrays, strict=True)):
            n = length(r)
            if left:
                batch[i, :, width - n:] = a[0]
            else:
                batch[i, :, :n] = a[0]
        out.append(batch)
    return tuple(out)


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
    return {"cross_k": _stacked(rows, "cross_k", _src_len, S, left=False),
            "cross_v": _stacked(rows, "cross_v", _src_len, S, left=False), "src_mask": src_mask}


def _past(row: Row) -> int:
    return row.past


def _src_len(row: Row) -> int:
    return row.src_len


def _past_from_home(rows: Sequence[Row], P: int) -> tuple[Layers, Layers] | None:
    """The batch's caches taken straight from the last step's outputs, when every row lives there: the present
    arrays as they are (the same rows in the same order: no copy at all), or trimmed of leading padding and
    gathered by row (rows left or beams were reordered: one copy). None when a row lives elsewhere (a new one)."""
    home = rows[0].home
    if home is None or any(r.home is not home for r in rows):
        return None
    pk, pv = home["present_k"], home["present_v"]  # L x (B', nh, P' + 1, hs), every row's cache right-aligned
    width = _width_of(pk[0])
    index = [r.home_index for r in rows]
    cut = width - P if width > P else 0  # columns that are padding for every remaining row
    same_rows = index == list(range(_batch_of(pk[0])))
    if cut == 0 and same_rows:
        return pk, pv  # numpy arrays or OrtValues, as the last step left them
    pk, pv = host_layers(home, "present_k"), host_layers(home, "present_v")
    if same_rows:
        return tuple(a[:, :, cut:] for a in pk), tuple(a[:, :, cut:] for a in pv)  # L x (B, nh, P, hs)
    return tuple(a[index, :, cut:] for a in pk), tuple(a[index, :, cut:] for a in pv)  # L x (B, nh, P, hs)


def _padded(rows: Sequence[Row], sources: SourceBatch | None) -> dict[str, np.ndarray]:
    pasts = np.array([r.past for r in rows], np.int64)  # (B,)
    P = int(pasts.max())
    self_mask = np.arange(P + 1) >= (P - pasts)[:, None]  # (B, P + 1): left-padded cache, then the new token
    cached = _past_from_home(rows, P)
    past_k, past_v = cached if cached is not None else (_stacked(rows, "past_k", _past, P, left=True),
                                                       _stacked(rows, "past_v", _past, P, left=True))
    return {"input_ids": np.array([r.next_token for r in rows], np.int64), "positions": pasts,
            "self_mask": self_mask, "past_k": past_k, "past_v": past_v,
            **(sources.feeds(rows) if sources is not None else _source_feeds(rows))}


def decoder_feeds(rows: Sequence[Row], sources: SourceBatch | None = None) -> tuple[dict, int]:
    """The decoder step's inputs for `rows` by the contract's names, caches as L per-layer arrays (the runner
    feeds the layers the graph declares), and the padded past length P. `sources` keeps the source part of the
    feeds from one step to the next (the engine has one per graph).

    Row i's cache sits at offset P - rows[i].past in the step's `present_k/v` and self-attention keys.
    """
    built = _single(rows[0]) if len(rows) == 1 else _padded(rows, sources)
    return built, max(r.past for r in rows)
