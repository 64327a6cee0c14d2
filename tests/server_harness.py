"""An in-process server on a free port, driven from synchronous tests through its own event-loop thread."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from serving.client.connection import Connection
from serving.domain import Limits
from serving.frontends.security import SecurityConfig
from serving.frontends.server import App, ServerConfig, create_server


class ServerThread:
    def __init__(self, cfg: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.app: App = self.call(create_server(cfg))
        self.address = f"127.0.0.1:{self.app.port}"

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0.5) -> None:
        try:
            self.call(self.app.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


SERVER_FIELDS = {f.name for f in fields(ServerConfig)}


def start(repo, models=(), poll_seconds=0.0, drain_seconds=0.0, metrics_port=None, engine_processes=False,
          **settings) -> ServerThread:
    """A server of its own for tests that change its repository, limits (Limits fields) or ServerConfig fields.
    Engines run as threads here unless asked (tests reach into the runner to inject faults); the product's
    default, an engine process per model, has tests of its own (test_engine_process.py)."""
    server = {k: v for k, v in settings.items() if k in SERVER_FIELDS}
    limits = Limits(**{k: v for k, v in settings.items() if k not in SERVER_FIELDS})
    return ServerThread(ServerConfig(repo=repo, address="127.0.0.1:0", metrics_port=metrics_port, models=tuple(models),
                                     poll_seconds=poll_seconds, drain_seconds=drain_seconds, limits=limits,
                                     engine_processes=engine_processes, **server))


def copy_version(model_dir: Path, version: int, change: Callable[[dict], None] = lambda m: None,
                 folder: Path | None = None) -> Path:
    """MODEL/1 copied as MODEL/<version> (or into `folder`), its manifest saying so; `change` edits the manifest
    further (manifest.json is not in its own `files`, so the copy stays valid)."""
    folder = folder or model_dir / str(version)
    shutil.copytree(model_dir / "1", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = version
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


ADMIN_TOKEN = "admin-token-for-tests-0123456789"


def admin_access(folder: Path) -> tuple[SecurityConfig, Connection]:
    """A server setting that allows management calls and a client connection holding its admin token."""
    path = Path(folder) / "admin.tokens"
    path.write_text(f"# admin tokens\n{ADMIN_TOKEN}\n")
    return SecurityConfig(admin_token_file=path), Connection(token_file=path)


def slow_down(server: ServerThread, model: str, seconds: float = 0.02) -> None:
    """Fault injection: every decoder step of `model` takes `seconds` longer, so its streams stay open."""
    runner = server.app.registry.get(model).runner
    step = runner.run_decoder

    def slow(feeds, attention, extras=None):
        time.sleep(seconds)
        return step(feeds, attention, extras)

    runner.run_decoder = slow
