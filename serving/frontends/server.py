"""The gRPC server: `create_server()` builds and starts it (tests bind port 0), `serve()` runs it until SIGTERM.

Health follows the registry, whoever changed it (the poller, ReloadModels, an engine dying or coming back):
`""` and `attnserve.v1.AttnServeService` are SERVING while every loaded model is healthy and at least one is loaded;
`model/NAME` tells about one model; `liveness` is SERVING from start until shutdown begins, whatever the models
do (for liveness probes: a server waiting for its first model is alive, not broken).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc

from ..api.service import InferenceAPI
from ..domain import Limits
from ..engine.engine import EngineConfig
from ..engine.registry import ModelRegistry, RegistryConfig
from ..engine.runner import RunnerConfig, check_runtime_install, resolve_providers
from ..metrics import Metrics
from . import kserve_v2
from .attnserve_v1 import AttnServeServicer
from .http_server import HttpFrontend
from .security import Authorizer, SecurityConfig, server_credentials
from .status import StatusInterceptor, quiet_client_departures

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["AttnServeService"].full_name  # attnserve.v1.AttnServeService
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LIVENESS_SERVICE = "liveness"
MODEL_HEALTH_PREFIX = "model/"  # per-model health names: model/dates ('/' never occurs in a model name)


@dataclass(frozen=True)
class ServerConfig:
    repo: Path = Path("models")
    address: str = "127.0.0.1:50051"
    models: tuple[str, ...] = ()  # empty: every model in the repository
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    limits: Limits = field(default_factory=Limits)
    metrics_port: int | None = 9100  # None: no metrics endpoint; 0: a free port
    metrics_address: str = "127.0.0.1"  # loopback by default; the container images pass 0.0.0.0
    health_port: int | None = None  # a plaintext port serving grpc.health.v1 only (probes that cannot speak TLS)
    http_port: int | None = None  # REST (Open Inference Protocol, Triton's generate) and the explorer; None: off
    security: SecurityConfig = field(default_factory=SecurityConfig)
    poll_seconds: float = 2.0  # repository scan interval for new versions; 0 disables
    grace_seconds: float = 10.0  # how long streams in flight may run on after SIGTERM
    drain_seconds: float = 1.0  # after SIGTERM, health says NOT_SERVING this long before the listener closes
    max_batch: int = 32
    worker_threads: int = 2  # model loading and long tokenizations run here, never on the event loop
    restart_seconds: float = 1.0  # delay before a dead engine is restarted (doubles per recent death, max 30 s)
    engine_processes: bool = True  # each model's engine in a process of its own; False: threads of this one
    engine_workers: int = 1  # decode batches each model steps at once (threads over one set of sessions)
    engine_start_seconds: float = 600.0  # an engine process not ready by then fails its version's load


class HealthServicer(health.aio.HealthServicer):
    """grpcio's health servicer, plus `List` where the installed health proto declares it (newer releases do,
    and their servicer answers it UNIMPLEMENTED): every service name this server reports, with its status."""

    async def List(self, request, context):
        statuses = {name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()}
        return health_pb2.HealthListResponse(statuses=statuses)


class App:
    """Everything a running server owns."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.limits = cfg.limits
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(cfg.worker_threads, thread_name_prefix="worker")
        self.health = HealthServicer()
        self.registry = ModelRegistry(RegistryConfig(cfg.repo, cfg.models, cfg.restart_seconds,
                                                     cfg.engine_processes), cfg.runner,
                                      EngineConfig(cfg.max_batch, cfg.limits.max_queue_per_model, cfg.engine_workers,
                                                   cfg.engine_start_seconds),
                                      self.executor)
        self.api = InferenceAPI(self.registry, cfg.limits, self.executor, self.metrics)
        self.registry.add_listener(self._models_changed)
        self.shutting_down = False
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self.http: HttpFrontend | None = None
        self.http_port: int | None = None
        self._watcher: asyncio.Task | None = None
        self._health_names: set[str] = set()
        self._health_tasks: set[asyncio.Task] = set()

    def _models_changed(self) -> None:
        self.metrics.models_changed(self.registry.models)
        task = asyncio.get_running_loop().create_task(self.sync_health())
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    def serving(self) -> bool:
        """Ready for traffic: at least one model loaded, every loaded model's engine running, not stopping."""
        models = self.registry.models
        return not self.shutting_down and bool(models) and all(s.healthy for s in models.values())

    async def sync_health(self) -> None:
        """Every health name from the registry's state now."""
        models = self.registry.models
        up = health_pb2.HealthCheckResponse.SERVING
        down = health_pb2.HealthCheckResponse.NOT_SERVING
        serving = self.serving()
        for service in ("", SERVICE):
            await self.health.set(service, up if serving else down)
        await self.health.set(LIVENESS_SERVICE, down if self.shutting_down else up)
        names = {MODEL_HEALTH_PREFIX + n for n in models}
        for name, served in models.items():
            ok = served.healthy and not self.shutting_down
            await self.health.set(MODEL_HEALTH_PREFIX + name, up if ok else down)
        for gone in self._health_names - names:
            await self.health.set(gone, down)
        self._health_names |= names

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls (UNAVAILABLE), let streams in flight finish within `grace`."""
        if self.shutting_down:
            return
        self.shutting_down = True
        await self.sync_health()
        if self._watcher:
            self._watcher.cancel()
        # Health checks still answer (NOT_SERVING) and new calls get UNAVAILABLE while balancers take us out.
        await asyncio.sleep(self.cfg.drain_seconds)
        stopping = [self.server.stop(self.cfg.grace_seconds if grace is None else grace)] if self.server else []
        if self.http is not None:
            stopping.append(self.http.stop())
        await asyncio.gather(*stopping)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.registry.close()
        self.metrics.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def create_server(cfg: ServerConfig) -> App:
    """Build, load the models and start serving; returns the App (its `port` is the bound port)."""
    check_runtime_install()
    resolve_providers(cfg.runner)  # --require-gpu fails here, before binding anything
    credentials = server_credentials(cfg.security)  # so do unreadable certificates and token files
    authorizer = Authorizer(cfg.security)
    app = App(cfg)
    limits = cfg.limits
    options = [("grpc.max_send_message_length", limits.max_message_bytes),
               ("grpc.max_receive_message_length", limits.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    quiet_client_departures()
    interceptor = StatusInterceptor((SERVICE, kserve_v2.SERVICE), app.metrics, lambda: app.shutting_down, authorizer)
    server = grpc.aio.server(options=options, interceptors=[interceptor])
    pb_grpc.add_AttnServeServiceServicer_to_server(AttnServeServicer(app.api), server)
    kserve_v2.add_to_server(kserve_v2.KServeServicer(app.api, app.serving, cfg.max_batch, app.metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
    if cfg.security.reflection:
        _reflection(server)
    if credentials is None:
        app.port = server.add_insecure_port(cfg.address)
    else:
        app.port = server.add_secure_port(cfg.address, credentials)
    if app.port == 0:
        raise OSError(f"cannot bind {cfg.address}")
    app.server = server
    if cfg.health_port is not None:
        app.health_server, app.health_port = _health_only(app, cfg.address.rsplit(":", 1)[0], cfg.health_port)
    await app.sync_health()  # NOT_SERVING until a model is loaded
    await server.start()
    if app.health_server is not None:
        await app.health_server.start()
    if cfg.metrics_port is not None:
        app.metrics_port = app.metrics.start(cfg.metrics_port, cfg.metrics_address)
    if cfg.http_port is not None:
        app.http = HttpFrontend(app.api, app.metrics, app.serving, lambda: app.shutting_down, authorizer,
                                limits.max_message_bytes, cfg.max_batch)
        app.http_port = await app.http.start(cfg.address.rsplit(":", 1)[0].strip("[]"), cfg.http_port, cfg.security,
                                             cfg.grace_seconds)
    await app.registry.refresh()
    await app.sync_health()
    if not app.registry.models:
        log.warning("no model found in %s yet; health stays NOT_SERVING until one appears", cfg.repo)
    if cfg.poll_seconds > 0:
        app._watcher = asyncio.get_running_loop().create_task(_watch(app))
    return app


def _health_only(app: App, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """grpc.health.v1 alone, in plaintext, for probes that cannot speak TLS (the kubelet's gRPC probes): the same
    statuses as the main port, nothing else (any other service answers UNIMPLEMENTED)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the health port {host}:{port}")
    return server, bound


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _reflection(server: grpc.aio.Server) -> None:
    """Server reflection, v1alpha and v1. grpcio-reflection implements v1alpha only; v1's messages are the same on
    the wire (same fields and numbers, another package), so the same servicer answers under v1's name too."""
    from grpc_reflection.v1alpha import reflection_pb2
    from grpc_reflection.v1alpha._async import ReflectionServicer

    names = (SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = ReflectionServicer(names)
    for service in (reflection.SERVICE_NAME, REFLECTION_V1):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo":
                                                                                      handler}),))


async def _watch(app: App) -> None:
    while True:
        await asyncio.sleep(app.cfg.poll_seconds)
        try:
            await app.registry.refresh()
        except Exception:  # a half-written repository must not stop the watcher
            log.exception("model repository scan failed")


async def serve(cfg: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT; exit code 0 on a clean stop."""
    app = await create_server(cfg)
    models = ", ".join(f"{n} v{m.runner.version} on {m.runner.providers[0]}" for n, m in app.registry.models.items())
    log.info("attnserve listening on %s (port %d), metrics on %s, HTTP on %s; models: %s", cfg.address, app.port,
             app.metrics_port, app.http_port, models or "none yet")
    print(f"attnserve: serving {models or 'no model yet'} on {cfg.address.rsplit(':', 1)[0]}:{app.port}",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, grace %.1fs for streams in flight", cfg.grace_seconds)
    await app.stop()
    return 0
