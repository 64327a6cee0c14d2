"""Training data as batches: built-in tasks from memory, user corpora streamed from disk, sharded per rank,
batched by example count or by token count with length bucketing.

A TSV corpus is never read whole: each pass reads it line by line, a line's split (train / validation / test)
is a stable hash of its source (model_src.tasks, so the held-out split never moves), and rank r of w takes every
w-th training line. Batches by token count come from pools of lines sorted by length (few pad tokens), cut where
the padded size `examples x longest` would pass `batch_tokens`, then shuffled, so a batch's cost is steady.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .decoding import pad_batch
from .model import ModelConfig
from .tasks import CorpusError, Pair, _split_of

Encoded = tuple[list[int], list[int]]  # source ids, target ids (without <bos> / <eos>)
POOL_BATCHES = 50  # token batches are cut from pools of about this many batches' worth of lines


def encode_pairs(tok, pairs: Iterable[Pair]) -> list[Encoded]:
    return [(tok.encode(s), _target(tok, t)) for s, t in pairs]


def _target(tok, text: str) -> list[int]:
    """Target-side ids: Marian cuts targets with its target model and appends no </s> (the batch does)."""
    return tok.encode_target(text) if hasattr(tok, "encode_target") else tok.encode(text)


def make_batch(examples: list[Encoded], cfg: ModelConfig):
    """(src_ids, src_mask, decoder input, its mask, labels) for teacher forcing; labels use pad_id as ignore."""
    src_ids, src_mask = pad_batch([s for s, _ in examples], cfg.pad_id)
    tgt_in, tgt_mask = pad_batch([[cfg.bos_id, *t] for _, t in examples], cfg.pad_id)
    labels, _ = pad_batch([[*t, cfg.eos_id] for _, t in examples], cfg.pad_id)
    return src_ids, src_mask, tgt_in, tgt_mask, labels


def padded_tokens(batch: list[Encoded]) -> int:
    """What a batch costs: its rows times its longest side (source or target + 1)."""
    return len(batch) * max(max(len(s), len(t) + 1) for s, t in batch)


def token_batches(examples: Iterable[Encoded], batch_tokens: int, rng: random.Random) -> Iterator[list[Encoded]]:
    """Length-bucketed batches of at most `batch_tokens` padded tokens (a longer single example goes alone)."""
    pool: list[Encoded] = []
    budget = batch_tokens * POOL_BATCHES

    def flush() -> list[list[Encoded]]:
        pool.sort(key=lambda e: (max(len(e[0]), len(e[1]) + 1), len(e[0])))
        batches, current = [], []
        for ex in pool:
            if current and padded_tokens([*current, ex]) > batch_tokens:
                batches.append(current)
                current = []
            current.append(ex)
        if current:
            batches.append(current)
        rng.shuffle(batches)
        pool.clear()
        return batches

    size = 0
    for ex in examples:
        pool.append(ex)
        size += max(len(ex[0]), len(ex[1]) + 1)
        if size >= budget:
            yield from flush()
            size = 0
    if pool:
        yield from flush()


@dataclass(frozen=True)
class Corpus:
    """A TSV corpus on disk, read one line at a time."""

    path: Path
    seed: int = 0

    def lines(self) -> Iterator[tuple[int, Pair]]:
        path = Path(self.path)
        if not path.is_file():
            raise CorpusError(f"{path}: no such file")
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\n").rstrip("\r")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 2:
                    raise CorpusError(f"{path}:{lineno}: expected 'source<TAB>target', found {len(parts)} "
                                      "tab-separated field(s)")
                if not parts[0].strip() or not parts[1].strip():
                    raise CorpusError(f"{path}:{lineno}: empty {'source' if not parts[0].strip() else 'target'}")
                yield lineno, (parts[0], parts[1])

    def split(self, name: str, limit: int | None = None) -> list[Pair]:
        """The first `limit` pairs of a held-out split (the split is fixed by the hash; the cap keeps it small)."""
        out = []
        for _, pair in self.lines():
            if _split_of(pair[0], self.seed) == name:
                out.append(pair)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def train_pairs(self, rank: int = 0, world: int = 1) -> Iterator[Pair]:
        """This rank's share of the training lines: every world-th one, starting at rank."""
        i = 0
        for _, pair in self.lines():
            if _split_of(pair[0], self.seed) == "train":
                if i % world == rank:
                    yield pair
                i += 1


class Batches:
    """An endless stream of training batches for one rank: from a task's pairs in memory or a corpus on disk."""

    def __init__(self, tok, cfg: ModelConfig, *, examples: list[Encoded] | None = None, corpus: Corpus | None = None,
                 batch_size: int = 128, batch_tokens: int = 0, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        """`examples`: a task's encoded training pairs (this rank takes every world-th); else `corpus` streams."""
        self.tok, self.cfg, self.corpus = tok, cfg, corpus
        self.batch_size, self.batch_tokens, self.rank, self.world = batch_size, batch_tokens, rank, world
        self.rng = random.Random(seed * 1000 + rank)
        self._shard = examples[rank::world] if examples is not None else None
        self._stream: Iterator[list[Encoded]] | None = None
        self.epoch = 0

    def _epoch(self) -> Iterator[list[Encoded]]:
        if self._shard is not None:
            examples: Iterable[Encoded] = self.rng.sample(self._shard, len(self._shard))
        else:
            examples = ((self.tok.encode(s), _target(self.tok, t)) for s, t in
                        self.corpus.train_pairs(self.rank, self.world))
        if self.batch_tokens:
            yield from token_batches(examples, self.batch_tokens, self.rng)
            return
        batch: list[Encoded] = []
        for ex in examples:
            batch.append(ex)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self) -> Iterator[list[Encoded]]:
        return self

    def __next__(self) -> list[Encoded]:
        for _ in range(2):
            if self._stream is None:
                self._stream = self._epoch()
            batch = next(self._stream, None)
            if batch is not None:
                return batch
            self._stream, self.epoch = None, self.epoch + 1
        raise CorpusError(f"rank {self.rank} of {self.world} has no training example (the corpus is too small "
                          "for this many processes)")

    def tensors(self, batch: list[Encoded], device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(x.to(device, non_blocking=True) for x in make_batch(batch, self.cfg))
