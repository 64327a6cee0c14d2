"""The HTTP front end: the Open Inference Protocol's REST endpoints, Triton's generate extension (one JSON answer,
or Server-Sent Events) and the attention explorer page, on aiohttp, in the gRPC server's own event loop.

Field mapping only: bodies are converted in `kserve_json.py`, model work goes through the engine API, errors
become the HTTP status a Triton user expects (400 bad input, 404 unknown model, 429 over a limit, 503 shutting
down or restarting, 401/403 tokens) with a JSON `{"error": ...}` body. The port has the gRPC port's TLS and
tokens; health and the page are open, everything else needs the token (as on the gRPC port).
aiohttp cancels a handler whose client disconnects, which closes its stream and frees the sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from ..api.service import InferenceAPI
from ..domain import (
    EncodeRequest,
    FinishEvent,
    GenerateRequest,
    ModelRef,
    PredictRequest,
    Served,
    Source,
    TokenEvent,
)
from ..errors import InvalidRequest, LimitExceeded, ServingError, Unavailable, describe
from ..metrics import Metrics
from . import kserve_json as j
from . import kserve_tensors as t
from .oip import PLATFORM, infer, server_version
from .security import Authorizer, SecurityConfig

log = logging.getLogger(__name__)
EXPLORER = Path(__file__).parent / "explorer"
OPEN = frozenset({"live", "ready", "page", "static"})  # no token needed (probes, the page itself)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


class HttpFrontend:
    def __init__(self, api: InferenceAPI, metrics: Metrics, ready: Callable[[], bool],
                 stopping: Callable[[], bool], authorizer: Authorizer, max_body_bytes: int, max_batch: int) -> None:
        self.api, self.metrics, self.ready, self.stopping, self.authorizer = api, metrics, ready, stopping, authorizer
        self.max_batch, self.max_body_bytes = max_batch, max_body_bytes
        self.app = web.Application(middlewares=[self._around], client_max_size=max_body_bytes)
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        add = self.app.router.add_route
        add("GET", "/", self.page, name="page")
        self.app.router.add_static("/explorer/", EXPLORER, name="static")
        add("GET", "/v2/health/live", self.live, name="live")
        add("GET", "/v2/health/ready", self.server_ready, name="ready")
        add("GET", "/v2", self.server_metadata, name="server_metadata")
        add("POST", "/v2/repository/index", self.repository_index, name="repository_index")
        for base, suffix in ((model, ""), (versioned, "_versioned")):
            add("GET", base, self.model_metadata, name="model_metadata" + suffix)
            add("GET", base + "/ready", self.model_ready, name="model_ready" + suffix)
            add("POST", base + "/infer", self.infer, name="infer" + suffix)
            add("POST", base + "/generate", self.generate, name="generate" + suffix)
            add("POST", base + "/generate_stream", self.generate_stream, name="generate_stream" + suffix)
        add("POST", "/attnserve/v1/models/{model}/encode", self.encode, name="encode")
        self.runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int, security: SecurityConfig, shutdown_seconds: float) -> int:
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                    shutdown_timeout=shutdown_seconds)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=_ssl_context(security), reuse_port=False)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the bound port (0 asks for a free one)
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # ------------------------------------------------------------------ around every request
    @web.middleware
    async def _around(self, request: web.Request, handler) -> web.StreamResponse:
        route = request.match_info.route.name or "unmatched"
        start, code = time.perf_counter(), "OK"
        method = f"HTTP {route.removesuffix('_versioned')}"
        in_flight = self.metrics.in_flight.labels(method)
        in_flight.inc()
        try:
            if self.stopping() and route not in ("live", "ready"):
                raise Unavailable("the server is shutting down; retry on another replica")
            if route not in OPEN:
                self.authorizer.check(method, [("authorization", request.headers.get("Authorization", ""))]
                                      if "Authorization" in request.headers else [])
            return await handler(request)
        except web.HTTPException as e:  # routing (404, 405) and body size (413): JSON like every other error
            code = "NOT_FOUND" if e.status == 404 else "INVALID_ARGUMENT"
            return error_response(e.status, f"{e.reason}: {request.method} {request.path}"
                                  + (" (see /v2 and the README for the endpoints)" if e.status in (404, 405) else ""))
        except asyncio.CancelledError:
            code = "CANCELLED"  # the client disconnected: aiohttp cancelled the handler
            raise
        except Exception as e:
            code, status, message = describe(e, method)
            headers = {"WWW-Authenticate": "Bearer"} if code == "UNAUTHENTICATED" else {}
            return error_response(status, message, **headers)
        finally:
            in_flight.dec()
            self.metrics.duration.labels(method).observe(time.perf_counter() - start)
            # a stream that failed after its status line was sent says how it ended in request["ended"]
            self.metrics.requests.labels(method, request.get("ended", code)).inc()

    # ------------------------------------------------------------------ page, health, metadata
    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(EXPLORER / "index.html")

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def server_ready(self, request: web.Request) -> web.Response:
        ready = self.ready()
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "attnserve", "version": server_version(),
                                  "extensions": ["model_repository", "parameters", "generate"]})

    async def repository_index(self, request: web.Request) -> web.Response:
        return web.json_response([{"name": d.manifest.name, "version": str(d.manifest.version),
                                   "state": "READY" if d.healthy else "UNAVAILABLE",
                                   "task": d.manifest.task or "",
                                   "layers": {"encoder": d.manifest.model.n_encoder_layers,
                                              "decoder": d.manifest.model.n_decoder_layers},
                                   "heads": d.manifest.model.n_heads} for d in self.api.list_models()])

    @staticmethod
    def _ref(request: web.Request) -> ModelRef:
        name = request.match_info["model"]
        return ModelRef(name, t.version_of(request.match_info.get("version", ""), name))

    async def model_metadata(self, request: web.Request) -> web.Response:
        d = self.api.describe(self._ref(request))
        spec = lambda items: [{"name": n, "datatype": dt, "shape": s} for n, (dt, s) in items]  # noqa: E731
        return web.json_response({"name": d.manifest.name, "versions": [str(d.manifest.version)],
                                  "platform": PLATFORM, "inputs": spec(t.INPUTS.items()),
                                  "outputs": spec(t.OUTPUTS.items())})

    async def model_ready(self, request: web.Request) -> web.Response:
        ref = self._ref(request)  # a version that is no number is a bad request, not an unready model
        try:
            served = self.api.registry.get(ref.name, ref.version)
        except ServingError:
            return web.json_response({"ready": False}, status=400)
        return web.json_response({"ready": served.healthy}, status=200 if served.healthy else 400)

    # ------------------------------------------------------------------ model calls
    @staticmethod
    async def _body(request: web.Request):
        try:
            return await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequest(f"the body is not valid JSON ({e})") from None
        except RecursionError:
            raise InvalidRequest("the body nests JSON arrays or objects too deeply to read") from None

    async def infer(self, request: web.Request) -> web.Response:
        ref = self._ref(request)
        call, request_id = j.infer_from_json(await self._body(request), ref.name, request.match_info.get("version",
                                                                                                             ""))
        served, values = await infer(self.api, call, call.deadline(None), self.max_batch)
        return self._answer(j.response_to_json(served, request_id, values))

    def _answer(self, data) -> web.Response:
        """A JSON answer within --max-message-bytes, as gRPC's answers are (its core refuses larger ones)."""
        text = json.dumps(data)
        if len(text) > self.max_body_bytes:
            raise LimitExceeded(f"the answer would be {len(text):,} bytes, over the {self.max_body_bytes:,} of "
                                "--max-message-bytes; ask for fewer rows or outputs, or fewer attention layers/heads")
        return web.Response(text=text, content_type="application/json")

    async def _generate_call(self, request: web.Request, stream: bool) -> t.InferCall:
        return j.generate_from_json(await self._body(request), request.match_info["model"],
                                    request.match_info.get("version", ""), stream)

    async def generate(self, request: web.Request) -> web.Response:
        c = await self._generate_call(request, stream=False)
        prediction = await self.api.predict(PredictRequest(c.model, c.sources[0], c.options, c.attention, None,
                                                           c.alignment, c.markup, beam_size=c.beam_size))
        return self._answer(j.prediction_json(prediction))

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        c = await self._generate_call(request, stream=True)
        served: Served | None = None
        response: web.StreamResponse | None = None
        async with contextlib.aclosing(self.api.generate(GenerateRequest(c.model, c.sources[0], c.options,
                                                                         c.attention, None, c.alignment,
                                                                         c.markup))) as events:
            try:
                async for ev in events:  # errors before the first event are plain JSON errors (the middleware's)
                    if isinstance(ev, Served):
                        served = ev
                        response = web.StreamResponse(headers=SSE_HEADERS)
                        await response.prepare(request)
                        continue
                    data = j.token_json(ev, served) if isinstance(ev, TokenEvent) else j.finish_json(ev, served)
                    await response.write(f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode())
                    if isinstance(ev, FinishEvent):
                        break
            except (ConnectionResetError, asyncio.CancelledError):
                raise asyncio.CancelledError() from None  # the client left; closing the stream frees the sequence
            except Exception as e:
                if response is None:
                    raise
                code, _, message = describe(e, "HTTP generate_stream")  # the status line is sent: an error event
                request["ended"] = code
                await response.write(f"event: error\ndata: {json.dumps({'error': message, 'code': code})}\n\n"
                                     .encode())
        await response.write_eof()
        return response

    async def encode(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        text = body.get("text_input") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise InvalidRequest("the encode body must be {\"text_input\": \"<source text>\"}")
        encoding = await self.api.encode(EncodeRequest(ModelRef(request.match_info["model"]), Source(text=text)))
        return self._answer(j.encoding_json(encoding))


def _ssl_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """The gRPC port's TLS (and mutual TLS) for the HTTP port, from the same files (already checked at start)."""
    if security.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(security.tls_cert), str(security.tls_key))
    if security.tls_client_ca is not None:
        ctx.load_verify_locations(str(security.tls_client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
