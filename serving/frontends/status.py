"""Domain errors as gRPC status codes (by the table in `serving.errors`), applied to every RPC of our services by an
interceptor.

The interceptor also refuses calls while the server shuts down, checks bearer tokens (security.py), turns
requests that do not parse (e.g. a string field that is not valid UTF-8) into INVALID_ARGUMENT instead of grpc's
generic error, tells a cancelled call from an expired one, and records the request metrics (method, final code,
duration, in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from ..errors import InvalidRequest, Unavailable, describe
from ..metrics import Metrics
from .security import Authorizer

log = logging.getLogger(__name__)


def status_of(exc: BaseException, where: str = "a call") -> tuple[grpc.StatusCode, str]:
    """Any exception as (code, message) by the one table of `serving.errors`; an unexpected one is INTERNAL with
    an error id, logged there once with its traceback, never shown to the client."""
    code, _, message = describe(exc, where)
    return grpc.StatusCode[code], message


class _Unparsable:
    """Stands in for a request whose bytes did not parse, so the handler can answer INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # protobuf's DecodeError, e.g. invalid UTF-8 in a string field
            return _Unparsable(e)

    return deserialize


DEADLINE_SLACK_S = 0.05  # a call that ends this close to its deadline ended because of it (the client's timer
#                          fires first and cancels; the server's view of the remaining time lags a little) ...
DEADLINE_SLACK_SHARE = 0.011  # ... or this share of its timeout: grpc rounds a timeout up on the wire (to 10 ms
#                               below 10 s, to 100 ms below 100 s, ...), so the server's deadline is up to 1% late
MAX_DETAILS_BYTES = 4096  # status details travel percent-encoded in trailing metadata (16 KiB hard limit): a
#                           message that echoes a huge field must not turn a precise status into RESOURCE_EXHAUSTED


def _ended_code(context: grpc.aio.ServicerContext, timeout: float | None) -> str:
    """Why a call ended early: its deadline (within the slack) or its client's cancellation."""
    remaining = context.time_remaining()
    if remaining is None or timeout is None:
        return "CANCELLED"
    return "DEADLINE_EXCEEDED" if remaining <= max(DEADLINE_SLACK_S, DEADLINE_SLACK_SHARE * timeout) else "CANCELLED"


def _wire_bytes(text: str) -> int:
    """Bytes of `text` as grpc-message sends it: printable ASCII as is, every other UTF-8 byte as %XX."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in text.encode("utf-8"))


def _clip(message: str) -> str:
    if _wire_bytes(message) <= MAX_DETAILS_BYTES:
        return message
    while _wire_bytes(message) > MAX_DETAILS_BYTES - 16:
        message = message[: len(message) * 3 // 4]
    return message + " ... (clipped)"


class _ClientGone(logging.Filter):
    """grpc.aio logs ExecuteBatchError with a traceback when a response is written to a call its client has just
    left (cancelled, or its deadline passed) before the server heard of it: a race every busy streaming server
    meets, not a fault. Such a record is logged at DEBUG instead; the call is counted as the client ended it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ == "ExecuteBatchError" and "Send" in str(exc):
            log.debug("a write met a call its client had already left: %s", record.getMessage())
            return False
        return True


def quiet_client_departures() -> None:
    """Install the filter above on grpc's logger (once)."""
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _ClientGone) for f in grpc_log.filters):
        grpc_log.addFilter(_ClientGone())


class StatusInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, services: tuple[str, ...], metrics: Metrics, stopping: Callable[[], bool],
                 authorizer: Authorizer | None = None) -> None:
        self.services, self.metrics, self.stopping, self.authorizer = services, metrics, stopping, authorizer
        self._wrapped: dict[str, tuple] = {}  # method path -> (grpc's handler, ours)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        wrapped = self._wrapped.get(details.method)
        if wrapped is None or wrapped[0] is not handler:
            wrapped = self._wrapped[details.method] = (handler, self._wrap(handler, details.method))
        return wrapped[1]

    def _wrap(self, handler, path: str):
        """The handler with our behaviour around it (built once per method, not per call)."""
        service, _, method = path.lstrip("/").partition("/")
        if handler is None or service not in self.services:
            return handler  # health, reflection: answered as grpc answers them, even while stopping
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return handler._replace(request_deserializer=deserializer, unary_unary=self._unary(handler.unary_unary,
                                                                                               method))
        if handler.unary_stream:
            return handler._replace(request_deserializer=deserializer,
                                    unary_stream=self._stream(handler.unary_stream, method))
        if handler.stream_stream:  # each request of the stream is the servicer's to answer (or refuse) in it
            return handler._replace(request_deserializer=deserializer,
                                    stream_stream=self._bidi(handler.stream_stream, method))
        return handler

    @contextlib.asynccontextmanager
    async def _call(self, method: str, request, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Around one call: refuse or admit it, map what it raises, record its metrics however it ends."""
        m, start, code = self.metrics, time.perf_counter(), "OK"
        timeout = context.time_remaining()  # as the server got it
        in_flight = m.in_flight.labels(method)
        in_flight.inc()
        try:
            if self.stopping():
                raise Unavailable("the server is shutting down; retry on another replica")
            if self.authorizer is not None:  # before anything of the request is looked at
                self.authorizer.check(method, context.invocation_metadata())
            if isinstance(request, _Unparsable):
                raise InvalidRequest(f"the request does not parse ({request.error}); is every string field valid "
                                     "UTF-8?")
            yield
        except (asyncio.CancelledError, GeneratorExit):
            code = _ended_code(context, timeout)
            raise
        except Exception as e:
            if context.cancelled():  # the caller is gone (cancelled, or its deadline passed): nobody to answer
                code = _ended_code(context, timeout)
                raise asyncio.CancelledError() from e
            status, message = status_of(e, method)
            code = status.name
            try:
                await context.abort(status, _clip(message))
            except grpc.aio.AbortError:
                raise
            except Exception as gone:  # the call ended meanwhile (its client left): there is nobody to tell
                code = _ended_code(context, timeout)
                raise asyncio.CancelledError() from gone
        finally:
            in_flight.dec()
            m.duration.labels(method).observe(time.perf_counter() - start)
            m.requests.labels(method, code).inc()

    def _unary(self, fn, method: str):
        async def behaviour(request, context):
            async with self._call(method, request, context):
                return await fn(request, context)

        return behaviour

    def _bidi(self, fn, method: str):
        async def behaviour(requests, context):
            async with self._call(method, None, context), contextlib.aclosing(fn(requests, context)) as items:
                async for item in items:
                    if context.cancelled():
                        raise asyncio.CancelledError()
                    yield item

        return behaviour

    def _stream(self, fn, method: str):
        async def behaviour(request, context):
            async with self._call(method, request, context), contextlib.aclosing(fn(request, context)) as items:
                async for item in items:
                    if context.cancelled():  # the client left: writing would fail in grpc's core
                        raise asyncio.CancelledError()
                    yield item

        return behaviour
