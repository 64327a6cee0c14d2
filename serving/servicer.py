"""The attnserve.v1 servicer: wire types in, a domain call, wire types out; nothing else.

`rpc` wraps every handler: it refuses calls while shutting down, maps exceptions to status codes (via
errors.status_of, the only mapping), and records the request metrics.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time

import grpc

from protos import attnserve_v1_pb2 as pb
from protos import attnserve_v1_pb2_grpc as pb_grpc

from . import convert
from .errors import LimitExceeded, Unavailable, status_of
from .predict import predict
from .registry import versions_on_disk
from .requests import TokenEvent, check_beam, check_stream_budget

log = logging.getLogger(__name__)


def rpc(method: str):
    def wrap(fn):
        def before(self, context) -> None:
            if self.app.shutting_down:
                raise Unavailable("the server is shutting down; retry on another replica")

        async def fail(self, context, exc: BaseException) -> None:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method, exc_info=exc)
            self.app.metrics.requests.labels(method, code.name).inc()
            await context.abort(code, message)

        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def stream_handler(self, request, context):
                m, start = self.app.metrics, time.perf_counter()
                m.in_flight.labels(method).inc()
                code = "OK"
                try:
                    before(self, context)
                    async for item in fn(self, request, context):
                        yield item
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except Exception as e:
                    code = None
                    await fail(self, context, e)
                finally:
                    m.in_flight.labels(method).dec()
                    m.duration.labels(method).observe(time.perf_counter() - start)
                    if code:
                        m.requests.labels(method, code).inc()
            return stream_handler

        @functools.wraps(fn)
        async def unary_handler(self, request, context):
            m, start = self.app.metrics, time.perf_counter()
            m.in_flight.labels(method).inc()
            try:
                before(self, context)
                result = await fn(self, request, context)
            except asyncio.CancelledError:
                m.requests.labels(method, "CANCELLED").inc()
                raise
            except Exception as e:
                await fail(self, context, e)
            else:
                m.requests.labels(method, "OK").inc()
                return result
            finally:
                m.in_flight.labels(method).dec()
                m.duration.labels(method).observe(time.perf_counter() - start)
        return unary_handler
    return wrap


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class AttnServeServicer(pb_grpc.AttnServeServicer):
    def __init__(self, app) -> None:
        self.app = app
        self.active_streams = 0

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.app.executor, fn, *args)

    @rpc("Generate")
    async def Generate(self, request: pb.GenerateRequest, context):
        loaded = self.app.registry.get(request.model.name, request.model.version)
        runner = loaded.runner
        req = convert.generation_from_pb(request, runner, self.app.limits, _deadline(context))
        check_stream_budget(self.active_streams, self.app.limits)
        self.active_streams += 1
        m = self.app.metrics
        try:
            seq = loaded.scheduler.submit(req)
            last = seq.created
            async for ev in loaded.scheduler.stream(seq):
                now = time.monotonic()
                if isinstance(ev, TokenEvent):
                    (m.itl if ev.index else m.ttft).observe(now - last)  # the first token: since arrival
                    m.tokens.labels(runner.name).inc()
                    last = now
                    yield convert.token_event_to_pb(ev, runner, req.src)
                else:
                    yield convert.finish_to_pb(ev, runner, req.src)
        finally:
            self.active_streams -= 1

    @rpc("Predict")
    async def Predict(self, request: pb.PredictRequest, context):
        loaded = self.app.registry.get(request.model.name, request.model.version)
        runner = loaded.runner
        req = convert.generation_from_pb(request, runner, self.app.limits, _deadline(context), encoder_attention=True)
        check_beam(request.beam_size, self.app.limits)
        p = await predict(loaded.scheduler, req, request.beam_size, self._run)
        response = convert.predict_to_pb(runner, req.src, p.tokens, p.text, p.reason, p.attention, p.score)
        size = response.ByteSize()
        if size > self.app.limits.max_message_bytes:
            raise LimitExceeded(f"the response would be {size} bytes, over max_message_bytes "
                                 f"({self.app.limits.max_message_bytes}); select fewer attention layers or heads, "
                                 "use mean_over_heads, or stream with Generate")
        self.app.metrics.tokens.labels(runner.name).inc(len(p.tokens))
        return response

    @rpc("Encode")
    async def Encode(self, request: pb.EncodeRequest, context):
        runner = self.app.registry.get(request.model.name, request.model.version).runner
        src = convert.source_from_pb(request.source, runner, self.app.limits)
        out = await self._run(runner.encode, src, True)
        return convert.encode_to_pb(runner, src, out)

    @rpc("ListModels")
    async def ListModels(self, request, context):
        return self._list()

    def _list(self) -> pb.ListModelsResponse:
        reg = self.app.registry
        return pb.ListModelsResponse(models=[convert.summary_to_pb(loaded.runner, versions_on_disk(reg.repo, name))
                                             for name, loaded in sorted(reg.models.items())])

    @rpc("GetModelInfo")
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context):
        reg = self.app.registry
        runner = reg.get(request.model.name, request.model.version).runner
        return convert.info_to_pb(runner, versions_on_disk(reg.repo, runner.name), self.app.limits)

    @rpc("ReloadModels")
    async def ReloadModels(self, request, context):
        await self.app.registry.refresh()
        return self._list()
