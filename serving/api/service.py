"""The engine API: what every protocol front end calls. Domain requests in, events and results out.

It resolves the model, admits or refuses at once (server-wide caps here, the per-model queue in the engine),
tokenizes (off the event loop for long texts), validates against the model and the limits, hands a job to the
model's engine and turns its events into results. It knows no wire protocol: a front end maps its fields to
these types and the errors of `errors.py` to its status codes, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor

import numpy as np

from ..domain import (
    AttentionSlice,
    EncodeRequest,
    EncoderEvent,
    Encoding,
    FinishEvent,
    GenerateRequest,
    Limits,
    ModelDescription,
    ModelRef,
    Prediction,
    PredictRequest,
    Served,
    Source,
    TokenEvent,
)
from ..engine.engine import Engine, EngineClosed
from ..engine.jobs import BeamJob, EncodeJob, Job, SequenceJob
from ..engine.registry import ModelRegistry, ServedModel
from ..errors import InvalidRequest, LimitExceeded, Unavailable
from ..metrics import Metrics
from .alignment import AlignmentView, method_of
from .validation import check_attention, check_beam, check_source, model_limits, resolve_params

INLINE_TOKENIZE_CHARS = 1024  # longer texts are tokenized in a worker thread (4 MB blocked the loop for 137 ms)


def assemble(steps: list[list[AttentionSlice]]) -> list[AttentionSlice]:
    """Stack per-step rows (h, 1, k_t) into one (h, T, K) matrix per block; shorter rows are zero-padded."""
    if not steps or not steps[0]:
        return []
    T = len(steps)
    out = []
    for j, first in enumerate(steps[0]):
        K = max(step[j].weights.shape[2] for step in steps)
        m = np.zeros((first.weights.shape[0], T, K), np.float32)  # (h, T, K)
        for t, step in enumerate(steps):
            w = step[j].weights[:, 0]  # (h, k_t)
            m[:, t, : w.shape[1]] = w
        out.append(AttentionSlice(first.kind, first.layer, first.heads, first.mean, m))
    return out


def _payload_bytes(prediction: Prediction) -> int:
    """A floor on the size of a Prediction on any wire: 4 bytes per float, the texts, a little per token."""
    p = prediction
    return (sum(a.weights.size * 4 + 32 for a in p.attention) + sum(len(t.text) + 24 for t in p.tokens)
            + len(p.text.encode()) + sum(len(s) + 2 for s in p.served.source_tokens) + 64)


class InferenceAPI:
    def __init__(self, registry: ModelRegistry, limits: Limits, executor: Executor,
                 metrics: Metrics | None = None) -> None:
        self.registry, self.limits, self.executor, self.metrics = registry, limits, executor, metrics
        self.in_flight = 0  # model calls admitted and not yet finished
        self.streams = 0  # of which Generate streams

    # ------------------------------------------------------------------ admission and inputs
    @contextlib.contextmanager
    def _admit(self, stream: bool) -> Iterator[None]:
        lim = self.limits
        if self.in_flight >= lim.max_concurrent_requests:
            raise LimitExceeded(f"{self.in_flight} requests already in flight, the limit is "
                                f"{lim.max_concurrent_requests} (max_concurrent_requests); retry later")
        if stream and self.streams >= lim.max_concurrent_streams:
            raise LimitExceeded(f"{self.streams} streams already active, the limit is {lim.max_concurrent_streams} "
                                "(max_concurrent_streams); retry later")
        self.in_flight += 1
        self.streams += stream
        try:
            yield
        finally:
            self.in_flight -= 1
            self.streams -= stream

    def _target(self, ref: ModelRef) -> ServedModel:
        served = self.registry.get(ref.name, ref.version)
        if not served.healthy:
            raise Unavailable(f"model {served.runner.name} v{served.runner.version} is restarting after an engine "
                              "failure; retry in a moment")
        return served

    async def _source(self, served: ServedModel, source: Source, limits: Limits) -> list[int]:
        tok = served.runner.tokenizer
        if source.text is not None:
            if not source.text.strip():
                raise InvalidRequest("source.text is empty or only whitespace")
            if len(source.text) > INLINE_TOKENIZE_CHARS:
                ids = await asyncio.get_running_loop().run_in_executor(self.executor, tok.encode, source.text)
            else:
                ids = tok.encode(source.text)
            if source.ids is not None:
                raise InvalidRequest("the request has both source.text and source.ids; send one")
        elif source.ids is not None:
            ids = list(source.ids)
        else:
            raise InvalidRequest("the request has no source: set source.text or source.ids")
        check_source(ids, served.runner.shape.src_vocab_size, limits)
        return ids

    def _served(self, served: ServedModel, src: list[int], view: AlignmentView | None = None) -> Served:
        r = served.runner
        return Served(ModelRef(r.name, r.version), tuple(src), tuple(r.tokenizer.token_strings(src)), view)

    async def _job(self, served: ServedModel, req: GenerateRequest, beam_size: int = 0,
                   encoder_attention: bool = False) -> tuple[Job, Served]:
        r = served.runner
        limits = model_limits(self.limits, r.shape.max_len)
        view, source = AlignmentView.of(req.source, req.alignment, req.markup)
        src = await self._source(served, source, limits)
        align = view.request(method_of(r.manifest), r.tokenizer) if view is not None else None
        params = resolve_params(req.options, limits)
        spec = req.attention
        if spec is not None and not encoder_attention and spec.wants_encoder:
            spec = dataclasses.replace(spec, kinds=spec.kinds - {"encoder_self"})
        if spec is not None and not spec.kinds:
            spec = None
        if spec is not None:
            check_attention(spec, r.shape.n_encoder_layers if spec.wants_encoder else 0, r.shape.n_decoder_layers,
                            r.shape.n_heads)
        common = {"source": src, "shape": r.shape, "tokenizer": r.tokenizer, "attention": spec,
                  "deadline": req.deadline, "params": params, "align": align}
        job = BeamJob(**common, beam_size=beam_size) if beam_size > 1 else SequenceJob(**common)
        return job, self._served(served, src, view)

    async def _submitted(self, ref: ModelRef,
                         build: Callable[[ServedModel], Awaitable[tuple[Job, Served]]]) -> tuple[Job, Served]:
        """Build a job for the model `ref` names and queue it in that model's engine. If a swap retired the
        engine meanwhile (a long text was being tokenized), build it again for the version served now."""
        for attempt in range(2):
            served = self._target(ref)
            job, header = await build(served)
            try:
                served.engine.submit(job)
                return job, header
            except EngineClosed:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ the calls
    async def generate(self, req: GenerateRequest) -> AsyncIterator[Served | TokenEvent | FinishEvent]:
        """A stream: first `Served` (the version and the source tokens), then one event per token, then the finish.
        Errors before the first token (validation, admission) are raised by the first `__anext__`."""
        with self._admit(stream=True):
            job, header = await self._submitted(req.model, lambda served: self._job(served, req))
            try:
                yield header
                m, last = self.metrics, job.created
                async with contextlib.aclosing(Engine.events(job)) as events:
                    async for ev in events:
                        if m is not None and isinstance(ev, TokenEvent):
                            now = time.monotonic()
                            (m.itl if ev.index else m.ttft).observe(now - last)  # the first token: since arrival
                            m.tokens.labels(header.model.name).inc()
                            last = now
                        if header.view is not None and isinstance(ev, TokenEvent):
                            header.view.token(ev)
                        elif header.view is not None and isinstance(ev, FinishEvent):
                            header.view.finish(ev)
                        yield ev
            finally:
                job.cancel()  # a no-op once finished; otherwise the engine drops it at its next step

    async def predict(self, req: PredictRequest) -> Prediction:
        async def build(served: ServedModel) -> tuple[Job, Served]:
            check_beam(req.beam_size, model_limits(self.limits, served.runner.shape.max_len))
            return await self._job(served, req, req.beam_size, encoder_attention=True)

        with self._admit(stream=False):
            job, header = await self._submitted(req.model, build)
            tokens: list[TokenEvent] = []
            encoder: list[AttentionSlice] = []
            finish = None
            async with contextlib.aclosing(Engine.events(job)) as events:
                async for ev in events:
                    if isinstance(ev, TokenEvent):
                        tokens.append(ev)
                    elif isinstance(ev, EncoderEvent):
                        encoder = ev.attention
                    else:
                        finish = ev
        if header.view is not None:
            header.view.finish(finish)
        attention = encoder + (assemble([t.attention for t in tokens]) if job.decoder_attention else [])
        score = finish.score if finish.score is not None else float(sum(t.logprob for t in tokens))
        prediction = Prediction(header, tokens, finish.text, finish.reason, score, attention, finish.alignment,
                                finish.word_alignment, finish.markup)
        size = _payload_bytes(prediction)
        if size > self.limits.max_message_bytes:
            raise LimitExceeded(f"the response would be over {size} bytes, more than max_message_bytes "
                                f"({self.limits.max_message_bytes}); select fewer attention layers or heads, "
                                "use mean_over_heads, or stream with Generate")
        if self.metrics is not None:
            self.metrics.tokens.labels(header.model.name).inc(len(tokens))
        return prediction

    async def encode(self, req: EncodeRequest) -> Encoding:
        async def build(served: ServedModel) -> tuple[Job, Served]:
            r = served.runner
            src = await self._source(served, req.source, model_limits(self.limits, r.shape.max_len))
            return EncodeJob(src, r.shape, r.tokenizer, deadline=req.deadline), self._served(served, src)

        with self._admit(stream=False):
            job, header = await self._submitted(req.model, build)
            async with contextlib.aclosing(Engine.events(job)) as events:
                ev: EncoderEvent = await anext(events)
        size = (ev.embeddings.size + ev.hidden_states.size) * 4
        if size > self.limits.max_message_bytes:
            raise LimitExceeded(f"the response would be over {size} bytes, more than max_message_bytes "
                                f"({self.limits.max_message_bytes}); send a shorter source")
        return Encoding(header, ev.embeddings, ev.hidden_states)

    # ------------------------------------------------------------------ models (admitted like every call)
    def describe(self, ref: ModelRef) -> ModelDescription:
        with self._admit(stream=False):
            return self._description(self.registry.get(ref.name, ref.version))

    def _description(self, served: ServedModel) -> ModelDescription:
        r = served.runner
        return ModelDescription(r.manifest, r.providers, tuple(self.registry.versions_on_disk(served.name)),
                                served.healthy, model_limits(self.limits, r.shape.max_len))

    def list_models(self) -> list[ModelDescription]:
        with self._admit(stream=False):
            return [self._description(s) for _, s in sorted(self.registry.models.items())]

    async def reload(self) -> list[ModelDescription]:
        with self._admit(stream=False):
            await self.registry.refresh()
        return self.list_models()
