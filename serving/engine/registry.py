"""The served models: the newest loadable version of each model in the repository, each with its engine.

A new version is loaded and warmed up in a worker thread while the old one keeps serving; only then does the
name point to it. Requests already running finish on the version they started with: the old engine is retired
(it takes nothing new, finishes what it holds, then its thread ends). A version that fails to load is logged and
skipped, the old one keeps serving; a version removed from disk gives way to the newest remaining one (or the
model is unloaded).

Engines run as threads of this process or, with `engine_processes`, each in a process of its own (process.py).

Supervision: when an engine dies, its model reports unhealthy at once and a fresh engine is started on the same
sessions after a short, growing delay; listeners (health, metrics) hear of every change, whoever caused it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from model_repository import list_models, list_versions, version_dir

from ..errors import InvalidRequest, NotFound
from .engine import EngineConfig
from .interface import (
    ServedVersion,
    ServingEngine,
    discard_prepared,
    load_version,
    prepare_restart,
    start_engine,
)
from .runner import RunnerConfig

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str  # the model's folder in the repository (the manifest's name must match it)
    runner: ServedVersion
    engine: ServingEngine
    restarts: int = 0
    deaths: list[float] = field(default_factory=list)  # monotonic times of recent engine deaths

    @property
    def healthy(self) -> bool:
        return self.engine.alive


def _signature(path: Path) -> tuple:
    """Names, sizes and modification times of a version's files: changes when a copy into it progresses."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()))
    except OSError:
        return ()


@dataclass(frozen=True)
class RegistryConfig:
    repo: Path = Path("models")
    only: tuple[str, ...] = ()  # empty: every model in the repository
    restart_seconds: float = 1.0  # delay before a dead engine is restarted; doubles per recent death, up to 30 s
    engine_processes: bool = False  # each version's engine in a process of its own (see process.py)


class ModelRegistry:
    def __init__(self, cfg: RegistryConfig, runner_cfg: RunnerConfig, engine_cfg: EngineConfig,
                 executor: ThreadPoolExecutor) -> None:
        self.cfg, self.repo = cfg, Path(cfg.repo)
        self.runner_cfg, self.engine_cfg, self.executor = runner_cfg, engine_cfg, executor
        self.models: dict[str, ServedModel] = {}
        self.failed: dict[tuple[str, int], tuple] = {}  # versions that did not load: (files' signature, why)
        self._warned: set[Path] = set()  # odd repository entries already logged: each is logged once
        self._retired: list[ServingEngine] = []  # engines finishing their last requests; joined on close
        self._listeners: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Called on the event loop after every load, swap, unload, engine death and restart."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def versions_on_disk(self, name: str) -> list[int]:
        return list_versions(self.repo, name, self._warned)

    def _names(self) -> list[str]:
        return [n for n in list_models(self.repo, self._warned) if not self.cfg.only or n in self.cfg.only]

    async def refresh(self) -> list[str]:
        """Load any model or newer version found on disk, retire removed ones; returns what changed.

        Shielded: a caller that gives up (a cancelled ReloadModels) does not stop a load half-way, so the
        next refresh never loads the same version twice."""
        return await asyncio.shield(self._refresh())

    async def _refresh(self) -> list[str]:
        async with self._lock:
            changed: list[str] = []
            try:
                names = self._names()
                for name in names:
                    current = self.models.get(name)
                    on_disk = self.versions_on_disk(name)
                    kept = current is not None and current.runner.version in on_disk
                    floor = current.runner.version if kept else 0
                    # newest first; a version that fails to load falls back to the next older one not yet served
                    loaded = None
                    for version in reversed([v for v in on_disk if v > floor]):
                        loaded = await self._try_load(name, version, current)
                        if loaded:
                            break
                    if loaded:
                        changed.append(f"{name} v{loaded.runner.version}")
                    elif current is not None and not kept:
                        changed.append(self._unload(name, "its version is gone from disk"))
                for name in [n for n in self.models if n not in names]:
                    changed.append(self._unload(name, "it is gone from the repository"))
                self._retired = [e for e in self._retired if not e.stopped]
            finally:
                if changed:  # even when a later step failed: what did change is announced
                    self._changed()
            return changed

    async def _try_load(self, name: str, version: int, current: ServedModel | None) -> ServedModel | None:
        path = version_dir(self.repo, name, version)
        if self.failed.get((name, version), (None,))[0] == _signature(path):
            return None  # failed before and unchanged since: retried once its files change (a slow copy)
        try:
            runner = await asyncio.get_running_loop().run_in_executor(self.executor, self._load, path)
        except Exception as e:  # ModelLoadError or anything else: the old version keeps serving
            self.failed[(name, version)] = (_signature(path), str(e))
            log.error("could not load %s v%d, keeping %s: %s", name, version,
                      f"v{current.runner.version}" if current else "nothing", e)
            return None
        served = ServedModel(name, runner, self._engine(runner))
        self.models[name] = served
        if current:
            self._retire(current.engine)
        log.info("serving %s v%d", name, version)
        return served

    def _unload(self, name: str, why: str) -> str:
        served = self.models.pop(name)
        self._retire(served.engine)
        log.warning("unloading %s v%d: %s (requests in flight finish first)", name, served.runner.version, why)
        return f"{name} v{served.runner.version} unloaded"

    def _load(self, path: Path) -> ServedVersion:
        return load_version(path, self.runner_cfg, self.engine_cfg, self.cfg.engine_processes)

    def _retire(self, engine: ServingEngine) -> None:
        engine.retire()
        self._retired.append(engine)

    def _engine(self, runner: ServedVersion) -> ServingEngine:
        return start_engine(runner, self.engine_cfg, self._engine_died)

    def _engine_died(self, engine: ServingEngine, reason: BaseException) -> None:
        """On the event loop: mark the model unhealthy now, restart its engine after a delay."""
        served = next((s for s in self.models.values() if s.engine is engine), None)
        if served is None:
            return  # a retired version: nothing to restart
        now = time.monotonic()
        served.deaths = [t for t in served.deaths if now - t < 60] + [now]
        delay = min(self.cfg.restart_seconds * 2 ** (len(served.deaths) - 1), 30.0)
        log.error("engine of %s v%d died (%r); restarting in %.1f s", served.runner.name, served.runner.version,
                  reason, delay)
        self._changed()
        task = asyncio.get_running_loop().create_task(self._restart(served, engine, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, served: ServedModel, dead: ServingEngine, delay: float) -> None:
        await asyncio.sleep(delay)
        if served.engine is not dead or self.models.get(served.name) is not served:
            return  # swapped or unloaded meanwhile
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, prepare_restart, served.runner)
        except Exception as e:  # its files changed or vanished meanwhile: count it as another death
            log.error("could not restart the engine of %s v%d: %s", served.name, served.runner.version, e)
            self._engine_died(dead, e)
            return
        if served.engine is not dead or self.models.get(served.name) is not served:
            discard_prepared(served.runner)
            return
        served.engine = self._engine(served.runner)
        served.restarts += 1
        log.info("engine of %s v%d restarted", served.runner.name, served.runner.version)
        self._changed()

    def get(self, name: str, version: int = 0) -> ServedModel:
        if not name:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            if not self.models:
                raise NotFound("no model is loaded yet")
            raise InvalidRequest(f"several models are loaded ({', '.join(sorted(self.models))}); name one")
        served = self.models.get(name)
        if served is None:
            raise NotFound(f"model {name!r} is not loaded; loaded models: {', '.join(sorted(self.models)) or 'none'}")
        if version and version != served.runner.version:
            raise NotFound(f"version {version} of {name!r} is not being served; the server runs the latest "
                           f"version, v{served.runner.version}")
        return served

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for engine in [s.engine for s in self.models.values()] + self._retired:
            await engine.close()
