"""Requests inside an engine: what each asks of the encoder, which decoder rows it holds, what it makes of a step.

A job never runs a session itself; the engine runs one encoder pass for many jobs and one decoder step for many
rows, then hands each job its slice. `SequenceJob` is one greedy or sampled sequence (one row), `BeamJob` a beam
search (a group of rows, reordered every step), `EncodeJob` an encoder pass only. Each job turns its slice into
events (tokens, the finish, encoder outputs) for its own queue.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from model_repository import ModelShape
from model_repository.alignment import Aligner, AlignmentMethod

from ..domain import (
    AlignRequest,
    AttentionSlice,
    AttentionSpec,
    DecodeParams,
    EncoderEvent,
    FinishEvent,
    TokenEvent,
)
from .feeds import Row
from .sampling import check_rows, choose, log_softmax, suppressed
from .tokenizer import Detokenizer, ServingTokenizer


def select(probs: np.ndarray, kind: str, spec: AttentionSpec, n_layers: int) -> list[AttentionSlice]:
    """Slice (L, nh, Tq, Tk) probabilities by the request's layers and heads, averaging heads if asked."""
    layers = spec.layers or tuple(range(n_layers))
    heads = spec.heads or tuple(range(probs.shape[1]))
    out = []
    for layer in layers:
        if layer >= n_layers:
            continue  # a layer index valid for the other stack only
        w = probs[layer][list(heads)]  # (h, Tq, Tk)
        if spec.mean:
            w = w.mean(axis=0, keepdims=True)  # (1, Tq, Tk)
        out.append(AttentionSlice(kind, layer, heads, spec.mean, np.ascontiguousarray(w, dtype=np.float32)))
    return out


@dataclass(slots=True)
class StepOutput:
    """One decoder run as its jobs see it: outputs for the whole batch and the padded past length P."""

    out: dict  # logits (B, V), present_k/v L x (B, nh, P+1, hs), attention (L, B, nh, 1, T_k)
    P: int
    now: float
    aligned: dict = field(default_factory=dict)  # id(alignment method) -> its (B, T_k) attention, once per step

    def mass(self, method: AlignmentMethod) -> np.ndarray:
        """The chosen heads' cross-attention of every row of this step, (B, T_k): one einsum for the batch (the
        jobs of a version share one method object: `AlignmentMethod` is interned)."""
        m = self.aligned.get(id(method))
        if m is None:
            m = self.aligned[id(method)] = method.masses(self.out["cross_attn"])
        return m


@dataclass(eq=False)
class Job:
    source: list[int]
    shape: ModelShape
    tokenizer: ServingTokenizer
    attention: AttentionSpec | None = None
    deadline: float | None = None  # time.monotonic()
    align: AlignRequest | None = None  # links to the source, when asked
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.monotonic)
    started: float = 0.0  # its encoder pass ran
    rows: list[Row] = field(default_factory=list)  # decoder rows it holds now
    cancelled: bool = False  # set from the event loop, read by the engine at its next iteration
    done: bool = False
    on_cancel: Callable[[Job], None] | None = None  # an engine in another process is told this way

    SPEC = ("source", "attention", "deadline", "created", "align")  # what another process needs to rebuild the job

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel(self)

    def spec(self) -> dict:
        """The request as plain, picklable data (no queue, tokenizer or state): `type(job)(**spec, shape=...,
        tokenizer=...)` rebuilds it where the model runs."""
        return {name: getattr(self, name) for name in self.SPEC}

    @property
    def width(self) -> int:
        """Decoder rows it will hold at most: what it takes of the engine's batch."""
        return 1

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    @functools.cached_property
    def encoder_attention(self) -> bool:
        return self.attention is not None and self.attention.wants_encoder

    @functools.cached_property
    def decoder_attention(self) -> bool:  # read for every job at every step: computed once
        return self.attention is not None and self.attention.wants_decoder

    @functools.cached_property
    def decoder_extras(self) -> tuple[str, ...]:
        """The decoder outputs it needs beyond logits and caches: jobs that need the same ones step together."""
        kinds = self.attention.kinds if self.attention is not None else frozenset()
        return (*(("dec_self_attn",) if "decoder_self" in kinds else ()),
                *(("cross_attn",) if "cross" in kinds or self.align is not None else ()))

    def encoded(self, enc: dict[str, np.ndarray], i: int, now: float) -> list:
        """Take row i of an encoder pass; returns the events it gives (encoder attention, when asked)."""
        self.started = now
        S = len(self.source)
        self.rows = [Row.start(enc["cross_k"][:, i:i + 1, :, :S],  # (L, 1, nh, S, hs): row i, unpadded
                               enc["cross_v"][:, i:i + 1, :, :S], self.shape.bos_id)]
        if not self.encoder_attention:
            return []
        attn = enc["enc_self_attn"][:, i, :, :S, :S]  # (L, nh, S, S)
        return [EncoderEvent(select(attn, "encoder_self", self.attention, self.shape.n_encoder_layers))]

    def stepped(self, step: StepOutput, first: int) -> list:
        """Take rows first..first+len(self.rows) of a decoder step; returns the events it gives."""
        raise NotImplementedError

    def _step_attention(self, step: StepOutput, i: int, row: Row) -> list[AttentionSlice]:
        spec, n = self.attention, self.shape.n_decoder_layers
        slices = []
        if "cross" in spec.kinds:
            slices += select(step.out["cross_attn"][:, i, :, :, : row.src_len], "cross", spec, n)
        if "decoder_self" in spec.kinds:
            slices += select(step.out["dec_self_attn"][:, i, :, :, step.P - row.past:], "decoder_self", spec, n)
        return slices

    def _finish(self, reason: str, generated: int, text: str, now: float, first_token: float,
                score: float | None = None) -> FinishEvent:
        self.done = True
        return FinishEvent(reason, len(self.source), generated, text, queue_ms=(self.started - self.created) * 1e3,
                           time_to_first_token_ms=(first_token - self.created) * 1e3,
                           total_ms=(now - self.created) * 1e3, score=score)


@dataclass(eq=False)
class SequenceJob(Job):
    """One greedy or sampled sequence; its events stream token by token."""

    params: DecodeParams = field(default=None)
    tokens: list[int] = field(default_factory=list)
    SPEC = (*Job.SPEC, "params")
    text: str = ""
    first_token: float = 0.0
    rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        if not self.params.greedy:
            self.rng = np.random.default_rng(self.params.seed)
        self.detokenizer = Detokenizer(self.tokenizer)  # text a token at a time, not the whole output each step

    @functools.cached_property
    def aligner(self) -> Aligner | None:
        """Built at the first step, where the job runs (a server's copy of a job an engine process runs never
        steps)."""
        return Aligner(self.align.method, list(self.align.spans), self.align.source) if self.align is not None else None

    def _aligned_finish(self, reason: str, now: float) -> FinishEvent:
        finish = self._finish(reason, len(self.tokens), self.text, now, self.first_token)
        if self.aligner is not None:
            finish.new_links = self.aligner.finish(len(self.text))
            finish.alignment = self.aligner.links(len(self.text))
        return finish

    def stepped(self, step: StepOutput, first: int) -> list:
        row, p, aligner = self.rows[0], self.params, self.aligner
        token, logprob = choose(step.out["logits"][first], p, self.rng, len(self.tokens),  # logits (V,)
                                self.shape.suppress_ids)
        self.first_token = self.first_token or step.now
        if aligner is not None:
            aligner.step(step.mass(self.align.method)[first])
        if token == self.shape.eos_id:
            self.text = self.detokenizer.finish()
            return [self._aligned_finish("eos", step.now)]
        attention = self._step_attention(step, first, row) if self.decoder_attention else []
        row.advance(step.out, first, token)
        before = self.text
        self.tokens.append(token)
        self.detokenizer.add(token)
        self.text = self.detokenizer.text
        index = len(self.tokens) - 1
        for stop in p.stop:
            cut = self.text.find(stop)
            if cut >= 0:
                self.text = self.text[:cut]
                if aligner is not None:
                    aligner.token(len(before), len(self.detokenizer.text), self.detokenizer.text[len(before):])
                events = [TokenEvent(token, self.text[len(before):], logprob, index, attention)] \
                    if len(self.text) > len(before) else []
                return [*events, self._aligned_finish("stop", step.now)]
        last = len(self.tokens) >= p.max_new_tokens or len(self.tokens) + 1 >= self.shape.max_len
        if last:
            self.text = self.detokenizer.finish()  # the last token's event carries what a window held back
        event = TokenEvent(token, self.text[len(before):], logprob, index, attention)
        if aligner is not None:
            aligner.token(len(before), len(self.text), event.text)
            event.alignment = aligner.ready()
        return [event, self._aligned_finish("length", step.now)] if last else [event]


@dataclass
class Hypothesis:
    tokens: list[int]
    logprobs: list[float]
    score: float  # summed log-prob
    attention: list[list[AttentionSlice]]  # per step, when asked
    text: str = ""
    masses: list[np.ndarray] = field(default_factory=list)  # per step: its attention over the source, to align


@dataclass(eq=False)
class BeamJob(Job):
    """Beam search as a group of rows: 2 x beam candidates per step, a hypothesis ends at <eos> (among the first
    beam candidates), a stop string or the length limit, score = summed log-prob / length ** length_penalty (the
    algorithm of model_src.decoding.beam_search, which is transformers' with early_stopping=True).
    The best hypothesis is sent whole at the end: its tokens, then the finish with its score."""

    params: DecodeParams = field(default=None)
    beam_size: int = 2
    length_penalty: float = 1.0
    SPEC = (*Job.SPEC, "params", "beam_size", "length_penalty")
    hypotheses: list[Hypothesis] = field(default_factory=list)
    finished: list[tuple[Hypothesis, float, str]] = field(default_factory=list)  # (hyp, normalised score, reason)
    steps: int = 0
    first_token: float = 0.0

    @property
    def width(self) -> int:
        return self.beam_size

    def encoded(self, enc: dict[str, np.ndarray], i: int, now: float) -> list:
        events = super().encoded(enc, i, now)
        self.hypotheses = [Hypothesis([], [], 0.0, [])]
        return events

    def _normalised(self, score: float, length: int) -> float:
        return score / max(length, 1) ** self.length_penalty

    def stepped(self, step: StepOutput, first: int) -> list:
        n, k = len(self.rows), self.beam_size
        logits = step.out["logits"][first:first + n]  # (n, V)
        self.first_token = self.first_token or step.now
        logp = log_softmax(logits)  # (n, V)
        check_rows(logp, logits, self.steps)
        logp = suppressed(logp, self.shape.suppress_ids)
        scores = np.array([h.score for h in self.hypotheses])[:, None] + logp  # (n, V)
        V = logp.shape[1]
        attention = [self._step_attention(step, first + b, self.rows[b]) for b in range(n)] \
            if self.decoder_attention else None
        masses = [step.mass(self.align.method)[first + b, : self.rows[b].src_len] for b in range(n)] \
            if self.align is not None else None  # (S,) each
        last = self.steps + 1 >= self.params.max_new_tokens
        survivors: list[Hypothesis] = []
        rows: list[Row] = []
        for rank, f in enumerate(np.argsort(-scores.ravel(), kind="stable")[: 2 * k]):
            b, tok = divmod(int(f), V)
            ends = tok == self.shape.eos_id or last
            if (ends and rank >= k) or (not ends and len(survivors) == k):
                continue  # only the first k candidates may finish; only k go on
            parent = self.hypotheses[b]
            hyp = Hypothesis([*parent.tokens, tok], [*parent.logprobs, float(logp[b, tok])], float(scores[b, tok]),
                             [*parent.attention, attention[b]] if attention else parent.attention,
                             masses=[*parent.masses, masses[b]] if masses else parent.masses)
            if tok == self.shape.eos_id:  # keeps the </s> step's alignment: the last token's, shifted
                ended = Hypothesis(hyp.tokens[:-1], hyp.logprobs[:-1], hyp.score,
                                   hyp.attention[:-1] if attention else hyp.attention, masses=hyp.masses)
                self.finished.append((ended, self._normalised(hyp.score, len(hyp.tokens)), "eos"))
                continue
            cut = -1
            if self.params.stop:  # the text is only needed to look for stop strings; the winner's comes last
                hyp.text = self.tokenizer.decode(hyp.tokens)
                cut = min((c for c in (hyp.text.find(s) for s in self.params.stop) if c >= 0), default=-1)
            if cut >= 0:
                hyp.text = hyp.text[:cut]
                self.finished.append((hyp, self._normalised(hyp.score, len(hyp.tokens)), "stop"))
            elif last:
                self.finished.append((hyp, self._normalised(hyp.score, len(hyp.tokens)), "length"))
            else:
                row = self.rows[b].fork()
                row.advance(step.out, first + b, tok)
                survivors.append(hyp)
                rows.append(row)
        self.steps += 1
        if len(self.finished) >= k or not survivors or last:  # each way, a first-k candidate has finished
            self.rows = []
            return self._result(step.now)
        self.hypotheses, self.rows = survivors, rows
        return []

    def _result(self, now: float) -> list:
        best, score, reason = max(self.finished, key=lambda f: f[1])
        if reason != "stop":
            best.text = self.tokenizer.decode(best.tokens)
        events, before, detokenizer = [], "", Detokenizer(self.tokenizer)
        aligner = None
        if self.align is not None:
            aligner = Aligner(self.align.method, list(self.align.spans), self.align.source)
            aligner.masses = best.masses
        for i, (tok, lp) in enumerate(zip(best.tokens, best.logprobs, strict=True)):
            detokenizer.add(tok)
            last = i == len(best.tokens) - 1
            # each token's text, clipped to the final text so the pieces add up to it when a stop string cut it
            text = (best.text if last else detokenizer.text)[: len(best.text)]
            events.append(TokenEvent(tok, text[len(before):], lp, i, best.attention[i] if best.attention else []))
            if aligner is not None:
                aligner.token(len(before), len(text), text[len(before):])
                events[-1].alignment = aligner.ready()
            before = text
        finish = self._finish(reason, len(best.tokens), best.text, now, self.first_token, score)
        if aligner is not None:
            finish.new_links = aligner.finish(len(best.text))
            finish.alignment = aligner.links(len(best.text))
        return [*events, finish]


@dataclass(eq=False)
class EncodeJob(Job):
    """An encoder pass only: static embeddings and each layer's contextual vectors."""

    @property
    def width(self) -> int:
        return 0

    @property
    def encoder_attention(self) -> bool:
        return True  # the extras come from the attention graph

    def encoded(self, enc: dict[str, np.ndarray], i: int, now: float) -> list:
        self.started, self.done = now, True
        S = len(self.source)
        return [EncoderEvent([], embeddings=enc["embeddings"][i, :S],  # (S, d_model)
                             hidden_states=enc["hidden_states"][:, i, :S])]  # (L, S, d_model)
