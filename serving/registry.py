"""The loaded models: the latest version of each model in the repository, swapped in atomically.

A new version is loaded and warmed up in a worker thread while the old one keeps serving; only then does the
name point to it. Requests already running finish on the version they started with (they hold its scheduler),
and the old scheduler is closed once it is idle. A version that fails to load is logged and skipped; the old
one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequest, NotFound
from .runner import ModelRunner, RunnerConfig
from .scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    runner: ModelRunner
    scheduler: Scheduler


def versions_on_disk(repo: Path, name: str) -> list[int]:
    d = Path(repo) / name
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "manifest.json").is_file())


def _signature(path: Path) -> tuple:
    """Names, sizes and modification times of a version's files: changes when a copy into it progresses."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()))
    except OSError:
        return ()


class ModelRegistry:
    def __init__(self, repo: Path, runner_cfg: RunnerConfig, executor: ThreadPoolExecutor,
                 only: tuple[str, ...] = (), max_batch: int = 32,
                 on_change: Callable[[], None] | None = None) -> None:
        self.repo = Path(repo)
        self.runner_cfg = runner_cfg
        self.executor = executor
        self.only = only
        self.max_batch = max_batch
        self.models: dict[str, Loaded] = {}
        self.failed: dict[tuple[str, int], tuple] = {}  # versions that did not load: (files' signature, why)
        self._draining: set[Scheduler] = set()
        self._lock = asyncio.Lock()
        self._on_change = on_change

    def model_names_on_disk(self) -> list[str]:
        if not self.repo.is_dir():
            return []
        names = sorted(p.name for p in self.repo.iterdir() if p.is_dir() and not p.name.startswith("."))
        return [n for n in names if (not self.only or n in self.only) and versions_on_disk(self.repo, n)]

    async def refresh(self) -> list[str]:
        """Load any model or newer version found on disk; returns what changed, e.g. ['dates v2']."""
        async with self._lock:
            changed = []
            loop = asyncio.get_running_loop()
            for name in self.model_names_on_disk():
                current = self.models.get(name)
                floor = current.runner.version if current else 0
                # newest first; a version that fails to load falls back to the next older one not yet served
                for version in reversed([v for v in versions_on_disk(self.repo, name) if v > floor]):
                    path = self.repo / name / str(version)
                    if self.failed.get((name, version), (None,))[0] == _signature(path):
                        continue  # failed before and unchanged since: retried once its files change (a slow copy)
                    try:
                        runner = await loop.run_in_executor(self.executor, self._load, path)
                    except Exception as e:  # ModelLoadError or anything else: the old version keeps serving
                        self.failed[(name, version)] = (_signature(path), str(e))
                        log.error("could not load %s v%d, keeping %s: %s", name, version,
                                  f"v{current.runner.version}" if current else "nothing", e)
                        continue
                    scheduler = Scheduler(runner, self.max_batch)
                    scheduler.start()
                    self.models[name] = Loaded(runner, scheduler)
                    changed.append(f"{name} v{version}")
                    if current:
                        self._draining.add(current.scheduler)
                    log.info("serving %s v%d", name, version)
                    break
            await self._close_idle()
            if changed and self._on_change:
                self._on_change()
            return changed

    def _load(self, path: Path) -> ModelRunner:
        runner = ModelRunner(path, self.runner_cfg)
        runner.warm_up()
        return runner

    async def _close_idle(self) -> None:
        for sched in list(self._draining):
            if sched.load == 0:
                self._draining.discard(sched)
                await sched.close()

    def get(self, name: str, version: int = 0) -> Loaded:
        if not name:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            if not self.models:
                raise NotFound("no model is loaded yet")
            raise InvalidRequest(f"several models are loaded ({', '.join(sorted(self.models))}); name one")
        loaded = self.models.get(name)
        if loaded is None:
            raise NotFound(f"model {name!r} is not loaded; loaded models: {', '.join(sorted(self.models)) or 'none'}")
        if version and version != loaded.runner.version:
            raise NotFound(f"version {version} of {name!r} is not being served; the server runs the latest "
                           f"version, v{loaded.runner.version}")
        return loaded

    async def close(self) -> None:
        for loaded in self.models.values():
            await loaded.scheduler.close()
        for sched in self._draining:
            await sched.close()
