"""An engine in a process of its own, seen from the server: the same calls as `Engine`, over a pipe.

Why: the event loop's per-message gRPC work and the engine's Python both need the interpreter lock, so in one
process they take turns and the server stays near one core however many it has. With the engine in its own
process (`host.py` is the other side) the model work and the network run side by side; the pipe carries one
message per request in and one per engine iteration out (all of that iteration's events), not one per token.
A crash of the engine process (a fault in native code, the kernel's OOM killer) fails only the requests it
held, with UNAVAILABLE, and the registry starts a new one; the server itself keeps running.

`ProcessModel` is what the registry serves: the version's manifest and tokenizer (the API validates and
tokenizes here, in the server) and a way to start engine processes for it; `EngineProcess` is one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from model_repository import Manifest, RepositoryError, open_version
from model_repository.tokenizer import load_tokenizer

from ..domain import FinishEvent
from ..errors import LimitExceeded, Unavailable
from . import host
from .engine import EngineClosed, EngineConfig
from .jobs import EncodeJob, Job
from .messages import Cancel, Dead, Events, Failed, FromEngine, Ready, Retire, Submit, ToEngine, kind_of
from .runner import ModelLoadError, RunnerConfig
from .tokenizer import ServingTokenizer

log = logging.getLogger(__name__)
CONTEXT = mp.get_context("spawn")  # never fork a process that runs gRPC's threads


@dataclass
class Child:
    process: mp.process.BaseProcess
    conn: Connection
    providers: tuple[str, ...]


def _spawn(path: Path, runner_cfg: RunnerConfig, engine_cfg: EngineConfig) -> Child:
    """Start an engine process and wait (blocking) until it has loaded and warmed up the version."""
    ours, theirs = CONTEXT.Pipe(duplex=True)
    process = CONTEXT.Process(target=host.main, name=f"attnserve-engine-{path.parent.name}-{path.name}",
                              args=(theirs, str(path), runner_cfg, engine_cfg, logging.getLogger().level),
                              daemon=True)
    process.start()
    theirs.close()
    deadline = time.monotonic() + engine_cfg.start_seconds
    try:
        while not ours.poll(0.2):
            if not process.is_alive():
                raise ModelLoadError(f"{path}: the engine process exited (code {process.exitcode}) while loading")
            if time.monotonic() > deadline:
                process.kill()
                process.join(5)
                ours.close()
                raise ModelLoadError(f"{path}: the engine process did not load the version within "
                                     f"{engine_cfg.start_seconds:g} s (--engine-start-seconds); it was stopped")
        message = ours.recv()
    except (EOFError, OSError) as e:
        process.join(5)
        raise ModelLoadError(f"{path}: the engine process exited (code {process.exitcode}) while loading") from e
    if not isinstance(message, Ready):
        process.join(5)
        ours.close()
        raise ModelLoadError(message.message if isinstance(message, Failed) else f"{path}: the engine process "
                             f"answered {type(message).__name__} while loading")
    return Child(process, ours, tuple(message.providers))


@dataclass(eq=False)
class ProcessModel:
    """One model version served by engine processes: what the API needs of it here, and its processes' maker."""

    dir: Path
    manifest: Manifest
    tokenizer: ServingTokenizer
    runner_cfg: RunnerConfig
    engine_cfg: EngineConfig
    providers: tuple[str, ...] = ()
    calls: Counter[str] = field(default_factory=Counter)  # session runs per graph, as its engine last said
    _ready: Child | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path, runner_cfg: RunnerConfig, engine_cfg: EngineConfig) -> ProcessModel:
        """Blocking: read the manifest and tokenizer here, then start the first engine process (which checks
        the files' checksums and loads the sessions); raises ModelLoadError as an in-process load would."""
        try:
            manifest = open_version(Path(path), verify_checksums=False)
        except RepositoryError as e:
            raise ModelLoadError(str(e)) from e
        model = cls(Path(path), manifest, load_tokenizer(manifest.file(manifest.tokenizer)), runner_cfg,
                     engine_cfg)
        model.spawn()
        return model

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def shape(self):
        return self.manifest.model

    def spawn(self) -> None:
        """Blocking: start an engine process, kept until `engine` takes it."""
        self._ready = _spawn(self.dir, self.runner_cfg, self.engine_cfg)
        self.providers = self._ready.providers

    def engine(self, on_death: Callable[[EngineProcess, BaseException], None] | None) -> EngineProcess:
        if self._ready is None:
            raise RuntimeError("no engine process is ready: call spawn() first (it blocks)")
        child, self._ready = self._ready, None
        return EngineProcess(self, child, self.engine_cfg, on_death)

    def discard(self) -> None:
        """Stop a started process nobody took (the version was superseded while it loaded)."""
        if self._ready is not None:
            self._ready.conn.close()
            self._ready.process.join(5)
            self._ready = None


class EngineProcess:
    def __init__(self, model: ProcessModel, child: Child, cfg: EngineConfig,
                 on_death: Callable[[EngineProcess, BaseException], None] | None) -> None:
        self.runner, self.child, self.cfg, self.on_death = model, child, cfg, on_death
        self._jobs: dict[int, Job] = {}  # sent and not finished
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retired = False
        self._ended = False  # the pipe closed: the process is gone or going
        self.dead: BaseException | None = None
        self.steps = self.encoder_passes = 0  # as of the last message
        self._waiting = self._load = 0  # jobs waiting in the engine, and all it holds, as of its last message ...
        self._sent = 0  # ... and jobs sent since
        # Messages to the engine go through a writer thread: a pipe whose reader stalls (a hung process) fills,
        # and a blocking send on the event loop would stall every call of the server.
        self._outbox: queue.SimpleQueue[ToEngine | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name=f"attnserve-pipe-{self.label}", daemon=True)
        self._broken = False  # a send failed: the process is gone

    @property
    def label(self) -> str:
        return f"{self.runner.name} v{self.runner.version}"

    @property
    def load(self) -> int:
        """Jobs the engine holds (waiting or active), as of its last message, plus those sent since."""
        return self._load + self._sent

    @property
    def alive(self) -> bool:
        return self._loop is not None and self.dead is None and not self._retired and not self._ended

    @property
    def stopped(self) -> bool:
        return self._ended

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.child.conn.fileno(), self._readable)
        self._writer.start()

    def _send(self, message: ToEngine) -> None:
        """Never blocks: the message is queued for the writer thread."""
        if self._broken or self._ended:
            raise Unavailable(f"model {self.label} is restarting after an engine failure; retry in a moment")
        self._outbox.put(message)

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self.child.conn.send(message)
            except (OSError, ValueError):  # the process is gone; the reader sees the pipe close and says so
                self._broken = True
                return

    def submit(self, job: Job) -> Job:
        if self.dead is not None or (self._ended and not self._retired):
            raise Unavailable(f"model {self.label} is restarting after an engine failure; retry in a moment")
        if self._retired or self._loop is None:
            raise EngineClosed(f"model {self.label} is being unloaded; retry")
        waiting = self._waiting + self._sent
        if waiting >= self.cfg.max_queue:
            raise LimitExceeded(f"model {self.label} already has {waiting} requests waiting, the limit is "
                                f"{self.cfg.max_queue} (max_queue_per_model); retry later")
        job_id = next(self._ids)
        self._send(Submit(job_id, kind_of(job), job.spec()))
        job.on_cancel = lambda _job: self._cancel(job_id)
        self._jobs[job_id] = job
        self._sent += 1
        return job

    def _cancel(self, job_id: int) -> None:
        if self._jobs.pop(job_id, None) is not None and not self._ended:
            with contextlib.suppress(Unavailable):  # the process is gone; so is the job
                self._send(Cancel(job_id))

    def retire(self) -> None:
        if not self._retired:
            self._retired = True
            if not self._ended:
                with contextlib.suppress(Unavailable):
                    self._send(Retire())

    async def close(self, timeout: float = 30.0) -> None:
        """Retire and wait (at most `timeout`) for the process to finish what it holds; then make sure it ends."""
        self.retire()
        end = asyncio.get_running_loop().time() + timeout
        while not self._ended and asyncio.get_running_loop().time() < end:
            await asyncio.sleep(0.01)
        if not self._ended:
            self._end()
        await asyncio.get_running_loop().run_in_executor(None, self._reap)

    def _reap(self) -> None:
        process = self.child.process
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)

    # ------------------------------------------------------------------ on the event loop
    def _readable(self) -> None:
        try:
            while self.child.conn.poll():
                self._handle(self.child.conn.recv())
        except (EOFError, OSError):
            self._end()

    def _handle(self, message: FromEngine) -> None:
        if isinstance(message, Events):
            stats = message.stats
            self.steps, self.encoder_passes, self._waiting = stats.steps, stats.encoder_passes, stats.waiting
            self._load, self._sent = stats.load, 0
            self.runner.calls = Counter(stats.calls)
            for job_id, events in message.batch:
                job = self._jobs.get(job_id)
                if job is None:
                    continue  # cancelled here meanwhile
                for event in events:
                    job.queue.put_nowait(event)
                if isinstance(job, EncodeJob) or isinstance(events[-1], FinishEvent | BaseException):
                    del self._jobs[job_id]
        elif isinstance(message, Dead):
            self.dead = RuntimeError(message.message)

    def _end(self) -> None:
        """The pipe closed. After a retire with nothing left, that is the normal end; otherwise a failure."""
        if self._ended:
            return
        self._ended = True
        self._outbox.put(None)  # the writer stops
        self._loop.remove_reader(self.child.conn.fileno())
        self.child.conn.close()
        if self._retired and self.dead is None and not self._jobs:
            return
        self.child.process.join(0.1)
        if self.dead is None:
            self.dead = RuntimeError(f"the engine process exited (code {self.child.process.exitcode})")
        log.error("the engine process of %s ended: %s", self.label, self.dead)
        error = Unavailable(f"model {self.label} stopped before this request finished: its engine failed "
                            f"({self.dead}); retry")
        for job in self._jobs.values():
            job.queue.put_nowait(error)
        self._jobs.clear()
        if self.on_death is not None and not self._retired:
            self.on_death(self, self.dead)
