"""Continuous batching: one engine thread per model owns its sessions and steps every active sequence together.

Each request gets a `Sequence` with its own asyncio.Queue of events. The engine thread admits new sequences
(encoder pass), drops cancelled or expired ones, runs one decoder step per group (the fast graph, or the attention
graph for sequences that asked for attention), and hands each step's tokens to the event loop in one
`call_soon_threadsafe`, so the engine never waits for the loop between steps. Sequences of different lengths
share a batch: each cache is left-padded to the longest and the padding is masked out. If a step fails, the
sequences in it get the error and the engine goes on; if the engine itself dies, every open stream fails at once
instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from .errors import Unavailable
from .requests import AttentionSlice, FinishEvent, GenerationRequest, TokenEvent, select
from .runner import ModelRunner
from .sampling import choose

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    req: GenerationRequest
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.monotonic)
    started: float = 0.0
    first_token: float = 0.0
    cross_k: np.ndarray | None = None  # (L, 1, nh, S, hs)
    cross_v: np.ndarray | None = None
    past_k: np.ndarray | None = None  # (L, 1, nh, P, hs)
    past_v: np.ndarray | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    rng: np.random.Generator | None = None
    cancelled: bool = False  # set from the event loop, read by the engine at its next step
    finished: bool = False

    @property
    def attention(self) -> bool:
        return self.req.attention is not None and self.req.attention.wants_decoder


class Scheduler:
    def __init__(self, runner: ModelRunner, max_batch: int = 32) -> None:
        self.runner = runner
        self.max_batch = max_batch
        self.pending: list[Sequence] = []  # submitted, not yet encoded
        self.active: list[Sequence] = []  # encoded, being decoded
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.steps = 0  # decoder steps run, for tests and metrics

    @property
    def load(self) -> int:
        return len(self.pending) + len(self.active)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._engine, name=f"engine-{self.runner.name}", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def submit(self, req: GenerationRequest) -> Sequence:
        if self._closed:
            raise Unavailable(f"model {self.runner.name} v{self.runner.version} is shutting down; retry")
        seq = Sequence(req)
        if req.params.seed is not None:
            seq.rng = np.random.default_rng(req.params.seed)
        elif not req.params.greedy:
            seq.rng = np.random.default_rng()
        with self._cv:
            self.pending.append(seq)
            self._cv.notify()
        return seq

    async def stream(self, seq: Sequence) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Events of `seq` until it finishes; closing the iterator early cancels the sequence."""
        try:
            while True:
                event = await seq.queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, FinishEvent):
                    return
        finally:
            seq.cancelled = True

    # ------------------------------------------------------------------ the engine thread
    def _deliver(self, batch: list[tuple[Sequence, list]]) -> None:
        """On the event loop: put each sequence's events into its queue."""
        for seq, events in batch:
            for ev in events:
                seq.queue.put_nowait(ev)

    def _send(self, batch: list[tuple[Sequence, list]]) -> None:
        if batch:
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
                self._loop.call_soon_threadsafe(self._deliver, batch)

    def _engine(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and not self.pending and not self.active:
                        self._cv.wait()
                    if self._closed:
                        break
                    room = self.max_batch - len(self.active)
                    new, self.pending = self.pending[:room], self.pending[room:]
                self._iteration(new)
        except Exception as e:
            log.exception("the engine of %s died", self.runner.name)
            reason = e
        else:
            reason = "shutdown"
        err = Unavailable(f"the engine of {self.runner.name} v{self.runner.version} stopped ({reason}); retry")
        with self._cv:
            orphans, self.pending, self.active = self.pending + self.active, [], []
        self._send([(s, [err]) for s in orphans])

    def _iteration(self, new: list[Sequence]) -> None:
        now = time.monotonic()
        for seq in self.active + new:
            if seq.req.deadline is not None and now > seq.req.deadline:
                seq.cancelled = True
        self.active = [s for s in self.active if not s.cancelled]  # frees their caches
        new = [s for s in new if not s.cancelled]
        if new:
            try:
                self._admit(new)
                self.active += new
            except Exception as e:  # a bad source must not take the engine down
                log.exception("encoder pass failed")
                self._send([(s, [e]) for s in new])
        for flag in (False, True):
            group = [s for s in self.active if s.attention == flag]
            if not group:
                continue
            try:
                batch = self._step(group)
            except Exception as e:
                log.exception("decoder step failed")
                batch = [(s, [e]) for s in group]
                for s in group:
                    s.finished = True
            self._send(batch)
        self.active = [s for s in self.active if not s.finished]

    # ------------------------------------------------------------------ model work, on the engine thread
    def _admit(self, seqs: list[Sequence]) -> None:
        r = self.runner
        for seq in seqs:
            seq.started = time.monotonic()
            out = r.encode(seq.req.src, attention=False)
            seq.cross_k, seq.cross_v = out["cross_k"], out["cross_v"]
            seq.past_k = seq.past_v = r.empty_cache()

    def _feeds(self, group: list[Sequence]) -> tuple[dict[str, np.ndarray], int]:
        """Decoder inputs for `group` and the padded past length P."""
        r = self.runner
        n = len(group)
        if n == 1:  # nothing to pad: hand the sequence's own arrays over without copying
            s = group[0]
            P = s.past_k.shape[3]
            return {"input_ids": np.array([s.tokens[-1] if s.tokens else r.bos_id], np.int64),
                    "positions": np.array([P], np.int64), "self_mask": np.ones((1, P + 1), bool),
                    "past_k": s.past_k, "past_v": s.past_v, "cross_k": s.cross_k, "cross_v": s.cross_v,
                    "src_mask": np.ones((1, s.cross_k.shape[3]), bool)}, P
        S = max(s.cross_k.shape[3] for s in group)
        P = max(s.past_k.shape[3] for s in group)
        L, nh, hs = r.n_layers, r.n_heads, r.head_dim
        cross_k = np.zeros((L, n, nh, S, hs), np.float32)  # (L, B, nh, S, hs), right-padded sources
        cross_v = np.zeros_like(cross_k)
        src_mask = np.zeros((n, S), bool)
        past_k = np.zeros((L, n, nh, P, hs), np.float32)  # (L, B, nh, P, hs), left-padded caches
        past_v = np.zeros_like(past_k)
        self_mask = np.zeros((n, P + 1), bool)
        positions = np.zeros(n, np.int64)
        tokens = np.zeros(n, np.int64)
        for i, s in enumerate(group):
            src_len, past = s.cross_k.shape[3], s.past_k.shape[3]
            cross_k[:, i, :, :src_len], cross_v[:, i, :, :src_len] = s.cross_k[:, 0], s.cross_v[:, 0]
            src_mask[i, :src_len] = True
            past_k[:, i, :, P - past:], past_v[:, i, :, P - past:] = s.past_k[:, 0], s.past_v[:, 0]
            self_mask[i, P - past:] = True
            positions[i] = past
            tokens[i] = s.tokens[-1] if s.tokens else r.bos_id
        return {"input_ids": tokens, "positions": positions, "self_mask": self_mask, "past_k": past_k,
                "past_v": past_v, "cross_k": cross_k, "cross_v": cross_v, "src_mask": src_mask}, P

    def _step(self, group: list[Sequence]) -> list[tuple[Sequence, list]]:
        feeds, P = self._feeds(group)
        out = self.runner.step(feeds, attention=group[0].attention)
        self.steps += 1
        now = time.monotonic()
        results = []
        for i, s in enumerate(group):
            past = s.past_k.shape[3]
            s.past_k = out["present_k"][:, i:i + 1, :, P - past:]  # (L, 1, nh, past+1, hs)
            s.past_v = out["present_v"][:, i:i + 1, :, P - past:]
            results.append((s, self._advance(s, out, i, P - past, now)))
        return results

    def _advance(self, s: Sequence, out: dict, i: int, offset: int, now: float) -> list:
        r = self.runner
        p = s.req.params
        token, logprob = choose(out["logits"][i], p, s.rng)
        if not s.first_token:
            s.first_token = now
        if token == r.eos_id:
            return [self._finish(s, "eos", now)]
        attention = self._attention(s, out, i, offset) if s.attention else []
        before = s.text
        s.tokens.append(token)
        s.text = r.tokenizer.decode(s.tokens)
        for stop in p.stop:
            cut = s.text.find(stop)
            if cut >= 0:
                s.text = s.text[:cut]
                events = []
                if len(s.text) > len(before):
                    events.append(TokenEvent(token, s.text[len(before):], logprob, len(s.tokens) - 1, attention))
                return [*events, self._finish(s, "stop", now)]
        events = [TokenEvent(token, s.text[len(before):], logprob, len(s.tokens) - 1, attention)]
        if len(s.tokens) >= p.max_new_tokens or len(s.tokens) + 1 >= r.max_len:
            events.append(self._finish(s, "length", now))
        return events

    def _attention(self, s: Sequence, out: dict, i: int, offset: int) -> list[AttentionSlice]:
        spec = s.req.attention
        slices = []
        if "cross" in spec.kinds:
            src_len = s.cross_k.shape[3]
            slices += select(out["cross_attn"][:, i, :, :, :src_len], "cross", spec, self.runner.n_layers)
        if "decoder_self" in spec.kinds:
            slices += select(out["dec_self_attn"][:, i, :, :, offset:], "decoder_self", spec, self.runner.n_layers)
        return slices

    def _finish(self, s: Sequence, reason: str, now: float) -> FinishEvent:
        s.finished = True
        return FinishEvent(reason, len(s.req.src), len(s.tokens), s.text,
                           queue_ms=(s.started - s.created) * 1e3,
                           time_to_first_token_ms=(s.first_token - s.created) * 1e3,
                           total_ms=(now - s.created) * 1e3)
