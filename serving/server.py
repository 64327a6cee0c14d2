"""The gRPC server: `create_server()` builds and starts it (tests bind port 0), `serve()` runs it until SIGTERM."""

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

from protos import attnserve_v1_pb2 as pb
from protos import attnserve_v1_pb2_grpc as pb_grpc

from .metrics import Metrics
from .registry import ModelRegistry
from .requests import Limits
from .runner import RunnerConfig, check_runtime_install, resolve_providers
from .servicer import AttnServeServicer

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["AttnServe"].full_name  # attnserve.v1.AttnServe


@dataclass(frozen=True)
class ServerConfig:
    repo: Path = Path("models")
    address: str = "127.0.0.1:50051"
    models: tuple[str, ...] = ()  # empty: every model in the repository
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    limits: Limits = field(default_factory=Limits)
    metrics_port: int | None = 9100  # None: no metrics endpoint; 0: a free port
    metrics_address: str = "0.0.0.0"
    poll_seconds: float = 2.0  # repository scan interval for new versions; 0 disables
    grace_seconds: float = 10.0  # how long streams in flight may run on after SIGTERM
    drain_seconds: float = 1.0  # after SIGTERM, health says NOT_SERVING this long before the listener closes
    max_batch: int = 32
    worker_threads: int = 2  # ONNX Runtime calls run here, never on the event loop


class App:
    """Everything a running server owns; the servicers reach it as `self.app`."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.limits = cfg.limits
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(cfg.worker_threads, thread_name_prefix="ort")
        self.health = health.aio.HealthServicer()
        self.registry = ModelRegistry(cfg.repo, cfg.runner, self.executor, cfg.models, cfg.max_batch,
                                      on_change=self._models_changed)
        self.shutting_down = False
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self._watcher: asyncio.Task | None = None

    def _models_changed(self) -> None:
        self.metrics.models.set(len(self.registry.models))
        self.metrics.model_info.clear()
        for name, loaded in self.registry.models.items():
            for provider in loaded.runner.providers:
                self.metrics.model_info.labels(name, str(loaded.runner.version), provider).set(1)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls (UNAVAILABLE), let streams in flight finish within `grace`."""
        if self.shutting_down:
            return
        self.shutting_down = True
        await self.set_serving(False)
        if self._watcher:
            self._watcher.cancel()
        # Health checks still answer (NOT_SERVING) and new calls get UNAVAILABLE while balancers take us out.
        await asyncio.sleep(self.cfg.drain_seconds)
        if self.server is not None:
            await self.server.stop(self.cfg.grace_seconds if grace is None else grace)
        await self.registry.close()
        self.metrics.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def create_server(cfg: ServerConfig) -> App:
    """Build, load the models and start serving; returns the App (its `port` is the bound port)."""
    check_runtime_install()
    resolve_providers(cfg.runner)  # --require-gpu fails here, before binding anything
    app = App(cfg)
    limits = cfg.limits
    options = [("grpc.max_send_message_length", limits.max_message_bytes),
               ("grpc.max_receive_message_length", limits.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_AttnServeServicer_to_server(AttnServeServicer(app), server)
    health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    app.port = server.add_insecure_port(cfg.address)
    if app.port == 0:
        raise OSError(f"cannot bind {cfg.address}")
    app.server = server
    await app.set_serving(False)  # NOT_SERVING until a model is loaded
    await server.start()
    if cfg.metrics_port is not None:
        app.metrics_port = app.metrics.start(cfg.metrics_port, cfg.metrics_address)
    await app.registry.refresh()
    if app.registry.models:
        await app.set_serving(True)
    else:
        log.warning("no model found in %s yet; health stays NOT_SERVING until one appears", cfg.repo)
    if cfg.poll_seconds > 0:
        app._watcher = asyncio.get_running_loop().create_task(_watch(app))
    return app


async def _watch(app: App) -> None:
    while True:
        await asyncio.sleep(app.cfg.poll_seconds)
        try:
            await app.registry.refresh()
            if app.registry.models and not app.shutting_down:
                await app.set_serving(True)
        except Exception:  # a half-written repository must not stop the watcher
            log.exception("model repository scan failed")


async def serve(cfg: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT; exit code 0 on a clean stop."""
    app = await create_server(cfg)
    models = ", ".join(f"{n} v{m.runner.version} on {m.runner.providers[0]}" for n, m in app.registry.models.items())
    log.info("attnserve listening on %s (port %d), metrics on %s; models: %s", cfg.address, app.port,
             app.metrics_port, models or "none yet")
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
