"""The engine process: one model version's sessions and engine in a process of their own (the child's side).

The server's process keeps the network (gRPC, its event loop, protobuf) and this process keeps the model work
(ONNX Runtime, the engine's Python), so neither waits for the other's interpreter lock: on a 2-core machine the
two run side by side instead of taking turns. They talk over one pipe (`multiprocessing` connection), in the
typed messages of `messages.py`.

The process ends when its engine has finished after a retire, when it died, or when the server's end of the pipe
closes (the server exited or gave up on it). It ignores SIGINT: the server decides when it stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import weakref
from multiprocessing.connection import Connection
from pathlib import Path

from ..errors import ServingError, logged
from .engine import Engine, EngineConfig
from .jobs import Job
from .messages import Cancel, Dead, Events, Failed, FromEngine, Ready, Retire, Stats, Submit
from .runner import ModelRunner, RunnerConfig

log = logging.getLogger(__name__)


def _portable(event):
    """Events cross the pipe pickled: an exception of a foreign type (onnxruntime's) goes as a RuntimeError."""
    if isinstance(event, BaseException) and not isinstance(event, ServingError):
        return RuntimeError(f"{type(event).__name__}: {event}")
    return event


class HostedEngine(Engine):
    """The engine thread as usual; its events and its death go down the pipe instead of to an event loop."""

    def __init__(self, runner: ModelRunner, cfg: EngineConfig, conn: Connection) -> None:
        super().__init__(runner, cfg)
        self.conn, self._lock, self._last_load = conn, threading.Lock(), 0
        self.ids: weakref.WeakKeyDictionary[Job, int] = weakref.WeakKeyDictionary()  # the server's id of each job

    def start(self) -> None:
        self._start_threads()

    def send(self, message: FromEngine) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):  # the server is gone: nobody to tell
            self.conn.send(message)

    def _send(self, batch: list) -> None:
        batch = [(self.ids[job], [_portable(e) for e in events]) for job, events in batch
                 if events and job in self.ids]
        load = len(self.waiting) + len(self.active)
        if batch or load != self._last_load:  # the server also hears when a cancelled job has left
            self._last_load = load
            self.send(Events(batch, self.stats()))

    def stats(self) -> Stats:
        return Stats(self.steps, self.encoder_passes, len(self.waiting), len(self.waiting) + len(self.active),
                     dict(self.runner.calls))

    def _report_death(self, reason: BaseException) -> None:
        self.send(Dead(f"{type(reason).__name__}: {reason}"))


MMAP_THRESHOLD = 0  # bytes (ATTNSERVE_MMAP_THRESHOLD); 0: glibc's own, dynamic threshold


def _return_large_buffers() -> None:
    """glibc raises its mmap threshold each time a large mapped block is freed, so the caches of a long batch are
    later carved from the heap and RSS keeps the high-water mark the batch shapes reached. A fixed threshold keeps
    larger arrays mapped: freed, they leave. Measured (2 cores): 256 KiB took the `noisy` test model's engine from
    ~200 to ~135 MiB under a 64-stream soak, but cost `dates` 7-15% of its tokens/s at 16 streams (its batched
    cross keys/values are mapped and unmapped as the batch changes), so it is off unless asked. glibc only."""
    threshold = int(os.environ.get("ATTNSERVE_MMAP_THRESHOLD", MMAP_THRESHOLD))
    if threshold > 0:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD; also ends the dynamic threshold


def main(conn: Connection, path: str, runner_cfg: RunnerConfig, engine_cfg: EngineConfig, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _return_large_buffers()
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s [engine {os.getpid()}]: "
                        "%(message)s")
    try:
        runner = ModelRunner(Path(path), runner_cfg)
        runner.warm_up()
    except Exception as e:  # ModelLoadError or anything else: the server logs it and keeps what it serves
        conn.send(Failed(str(e) if isinstance(e, ServingError) else f"{type(e).__name__}: {e}"))
        return
    engine = HostedEngine(runner, engine_cfg, conn)
    engine.send(Ready(runner.providers))
    engine.start()
    threading.Thread(target=_end_with, args=(engine, conn), daemon=True).start()
    by_id: weakref.WeakValueDictionary[int, Job] = weakref.WeakValueDictionary()  # the jobs the engine still holds
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the server closed its end: stop with it
        if isinstance(message, Submit):
            try:
                job = message.rebuild(runner.shape, runner.tokenizer)
            except Exception as e:  # a spec this engine cannot rebuild fails its own job, never the engine
                error = logged(e, f"job {message.job_id} of {engine.label}")
                engine.send(Events([(message.job_id, [error])], engine.stats()))
                continue
            by_id[message.job_id] = job
            engine.ids[job] = message.job_id
            try:
                engine.submit(job)
            except ServingError as e:
                engine.send(Events([(message.job_id, [e])], engine.stats()))
        elif isinstance(message, Cancel):
            job = by_id.pop(message.job_id, None)
            if job is not None:
                job.cancelled = True  # the engine drops it at its next iteration
        elif isinstance(message, Retire):
            engine.retire()
    os._exit(0)  # no interpreter teardown racing the engine thread


def _end_with(engine: HostedEngine, conn: Connection) -> None:
    """When the engine's threads end (retired and drained, or dead), the process ends too."""
    engine.join()
    with contextlib.suppress(OSError):
        conn.close()
    os._exit(0)
