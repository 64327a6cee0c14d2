"""Continuous batching: one background loop owns a model's sessions and steps every active sequence together.

Each request gets a `Sequence` with its own asyncio.Queue of events. The loop admits new sequences (encoder pass),
drops cancelled or expired ones, runs one decoder step per group (the fast graph, or the attention graph for
sequences that asked for attention), and pushes each sequence's token into its queue. Sequences of different
lengths share a batch: each cache is left-padded to the longest and the padding is masked out. ONNX Runtime runs
in a worker thread, never on the event loop. If a step fails, the sequences in it get the error and the loop
goes on; if the loop itself dies, every open stream fails at once instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
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
    cancelled: bool = False
    finished: bool = False

    @property
    def attention(self) -> bool:
        return self.req.attention is not None and self.req.attention.wants_decoder


class Scheduler:
    def __init__(self, runner: ModelRunner, executor: ThreadPoolExecutor, max_batch: int = 32) -> None:
        self.runner = runner
        self.executor = executor
        self.max_batch = max_batch
        self.pending: list[Sequence] = []
        self.active: list[Sequence] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.steps = 0  # decoder steps run, for tests and metrics

    @property
    def load(self) -> int:
        return len(self.pending) + len(self.active)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"scheduler-{self.runner.name}")
        self._task.add_done_callback(self._on_loop_exit)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, req: GenerationRequest) -> Sequence:
        if self._closed:
            raise Unavailable(f"model {self.runner.name} v{self.runner.version} is shutting down; retry")
        seq = Sequence(req)
        if req.params.seed is not None:
            seq.rng = np.random.default_rng(req.params.seed)
        elif not req.params.greedy:
            seq.rng = np.random.default_rng()
        self.pending.append(seq)
        self._wake.set()
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
            self._wake.set()

    # ------------------------------------------------------------------ the loop
    def _on_loop_exit(self, task: asyncio.Task) -> None:
        exc = None if task.cancelled() else task.exception()
        err = Unavailable(f"the scheduler of {self.runner.name} stopped ({exc or 'shutdown'}); retry")
        for seq in self.pending + self.active:
            seq.queue.put_nowait(err)
        self.pending.clear()
        self.active.clear()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self.pending and not self.active:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            for seq in self.active + self.pending:
                if seq.req.deadline is not None and now > seq.req.deadline:
                    seq.cancelled = True
            self.pending = [s for s in self.pending if not s.cancelled]
            self.active = [s for s in self.active if not s.cancelled]  # frees their caches
            room = self.max_batch - len(self.active)
            if room > 0 and self.pending:
                new, self.pending = self.pending[:room], self.pending[room:]
                try:
                    await loop.run_in_executor(self.executor, self._admit, new)
                    self.active += new
                except Exception as e:  # a bad source must not take the loop down
                    log.exception("encoder pass failed")
                    for seq in new:
                        seq.queue.put_nowait(e)
            for flag in (False, True):
                group = [s for s in self.active if s.attention == flag and not s.cancelled]
                if not group:
                    continue
                try:
                    events = await loop.run_in_executor(self.executor, self._step, group)
                except Exception as e:
                    log.exception("decoder step failed")
                    events = [(s, [e]) for s in group]
                    for s in group:
                        s.finished = True
                for seq, evs in events:
                    for ev in evs:
                        seq.queue.put_nowait(ev)
            self.active = [s for s in self.active if not s.finished]
            await asyncio.sleep(0)  # let handlers read their queues between steps

    # ------------------------------------------------------------------ worker-thread work
    def _admit(self, seqs: list[Sequence]) -> None:
        r = self.runner
        for seq in seqs:
            seq.started = time.monotonic()
            out = r.encode(seq.req.src, attention=False)
            seq.cross_k, seq.cross_v = out["cross_k"], out["cross_v"]
            seq.past_k = seq.past_v = r.empty_cache()

    def _step(self, group: list[Sequence]) -> list[tuple[Sequence, list]]:
        r = self.runner
        n = len(group)
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
        out = r.step({"input_ids": tokens, "positions": positions, "self_mask": self_mask, "past_k": past_k,
                      "past_v": past_v, "cross_k": cross_k, "cross_v": cross_v, "src_mask": src_mask},
                     attention=group[0].attention)
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
