"""The engine of one model version: the only code that runs its sessions, stepping every request together.

Requests arrive as jobs in a bounded admission queue. Each of `workers` threads loops over a batch of its own:
it admits waiting jobs while their rows fit (and while it holds no more than its share of all the work), drops
cancelled or expired ones, runs one encoder pass per graph for all its new arrivals (padded), then one decoder step
per set of outputs (fast; with attention; with only the cross-attention that alignment reads) for every row of
every job it holds, and hands each iteration's events to the event loop in one `call_soon_threadsafe`. The
workers share the runner's sessions, so several batches run at once over one copy of the weights (ONNX Runtime
runs a session on the calling thread when it has one intra-op thread).
A job whose output goes bad fails alone; if a batched run raises, its jobs are retried one by one so only the
culprit fails. If a worker itself dies, every job of the engine fails at once with UNAVAILABLE, `submit` refuses
new work, and `on_death` tells the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..domain import FinishEvent
from ..errors import DeadlineExceeded, LimitExceeded, ServingError, Unavailable, logged
from .feeds import SourceBatch, decoder_feeds
from .jobs import Job, StepOutput
from .runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # decoder rows stepped together (a beam search takes beam_size of them)
    max_queue: int = 128  # jobs waiting for room in the batch; past it, RESOURCE_EXHAUSTED at once
    workers: int = 1  # batches stepped at once, each by its own thread over the same sessions (max_batch each)
    start_seconds: float = 600.0  # an engine process that has not loaded its version by then fails the load


class _Worker:
    """One engine thread's own state: the jobs it holds, its iteration's events, its source feeds per graph."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.active: list[Job] = []  # taken from the queue: being encoded or decoded
        self.events: dict[Job, list] = {}  # this iteration's events, sent at its end (or when the engine dies)
        self.sources = {False: SourceBatch(), True: SourceBatch()}  # per decoder graph
        self.thread: threading.Thread | None = None
        self.steps = 0
        self.encoder_passes = 0

    @property
    def width(self) -> int:
        return sum(job.width for job in self.active)


class EngineClosed(Unavailable):
    """The engine was retired (its version swapped out or unloaded) before the job reached it; a caller may
    retry on whatever the registry serves now."""


class Engine:
    def __init__(self, runner: ModelRunner, cfg: EngineConfig = EngineConfig(),
                 on_death: Callable[[Engine, BaseException], None] | None = None) -> None:
        self.runner, self.cfg, self.on_death = runner, cfg, on_death
        if cfg.workers < 1:
            raise ValueError(f"an engine needs at least one worker, got {cfg.workers}")
        self.waiting: deque[Job] = deque()
        self._workers = [_Worker(i) for i in range(cfg.workers)]
        self._cv = threading.Condition()
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retired = False  # no new jobs; the threads end once the jobs they hold are finished
        self.dead: BaseException | None = None

    @property
    def active(self) -> list[Job]:
        """Every job a worker holds (a snapshot)."""
        return [job for w in self._workers for job in w.active]

    @property
    def steps(self) -> int:
        """Decoder steps run, for tests and metrics."""
        return sum(w.steps for w in self._workers)

    @property
    def encoder_passes(self) -> int:
        return sum(w.encoder_passes for w in self._workers)

    @property
    def label(self) -> str:
        return f"{self.runner.name} v{self.runner.version}"

    @property
    def load(self) -> int:
        with self._cv:
            return len(self.waiting) + len(self.active)

    @property
    def alive(self) -> bool:
        return self._started and self.dead is None and not self._retired

    @property
    def stopped(self) -> bool:
        return self._started and not any(w.thread.is_alive() for w in self._workers)

    def start(self) -> None:
        """Start the engine's threads; events are handed to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._start_threads()

    def _start_threads(self) -> None:
        for w in self._workers:
            w.thread = threading.Thread(target=self._main, args=(w,), name=f"engine-{self.runner.name}-{w.index}",
                                        daemon=True)
        self._started = True
        for w in self._workers:
            w.thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for every worker thread to end (at most `timeout` in all)."""
        end = None if timeout is None else time.monotonic() + timeout
        for w in self._workers:
            if w.thread is not None:
                w.thread.join(None if end is None else max(0.0, end - time.monotonic()))

    def retire(self) -> None:
        """Take no new jobs; finish the ones already here, then stop the threads."""
        with self._cv:
            self._retired = True
            self._cv.notify_all()

    async def close(self, timeout: float = 30.0) -> None:
        """Retire and wait (at most `timeout`) for the threads to finish what they hold."""
        self.retire()
        if self._started:
            await asyncio.get_running_loop().run_in_executor(None, self.join, timeout)

    def submit(self, job: Job) -> Job:
        """Queue `job` or refuse at once: UNAVAILABLE if the engine is not running, RESOURCE_EXHAUSTED if full."""
        with self._cv:
            if self.dead is not None:
                raise Unavailable(f"model {self.label} is restarting after an engine failure; retry in a moment")
            if self._retired or not self._started:
                raise EngineClosed(f"model {self.label} is being unloaded; retry")
            if len(self.waiting) >= self.cfg.max_queue:
                raise LimitExceeded(f"model {self.label} already has {len(self.waiting)} requests waiting, the limit "
                                    f"is {self.cfg.max_queue} (max_queue_per_model); retry later")
            self.waiting.append(job)
            self._cv.notify()
        return job

    @staticmethod
    async def events(job: Job) -> AsyncIterator:
        """The job's events until its FinishEvent; closing the iterator early cancels the job."""
        try:
            while True:
                event = await job.queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, FinishEvent):
                    return
        finally:
            job.cancel()

    # ------------------------------------------------------------------ the engine thread
    def _deliver(self, batch: list[tuple[Job, list]]) -> None:
        """On the event loop: put each job's events into its queue."""
        for job, events in batch:
            for ev in events:
                job.queue.put_nowait(ev)

    def _send(self, batch: list[tuple[Job, list]]) -> None:
        batch = [(job, events) for job, events in batch if events]
        if batch:
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
                self._loop.call_soon_threadsafe(self._deliver, batch)

    def _report_death(self, reason: BaseException) -> None:
        if self.on_death is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.on_death, self, reason)

    def _main(self, worker: _Worker) -> None:
        reason: BaseException | None = None
        try:
            while True:
                with self._cv:
                    while not self._retired and not self.waiting and not worker.active and self.dead is None:
                        self._cv.wait()
                    if self.dead is not None or (self._retired and not self.waiting and not worker.active):
                        break
                    new = self._take(worker)
                    worker.active += new  # counted in `load` from now on
                    if self.waiting and new:
                        self._cv.notify()  # work is left: an idle worker may take its share
                self._iteration(worker, new)
        except BaseException as e:  # anything escaping the per-job handling kills the engine: fail all, loudly
            log.exception("the engine of %s died", self.label)
            reason = e
        if reason is None:
            return
        with self._cv:
            if self.dead is not None:  # another worker died first and failed every job: one death, reported once
                return
            self.dead = reason
            orphans = [j for j in list(self.waiting) + self.active if not j.done]
            self.waiting.clear()
            for w in self._workers:
                w.active = []
            self._cv.notify_all()  # the other workers stop at their next iteration
        # what the step had already produced still reaches its callers, then the errors
        err = Unavailable(f"model {self.label} stopped before this request finished: its engine failed "
                          f"({type(reason).__name__}); retry")
        for job in orphans:
            worker.events.setdefault(job, []).append(err)
        self._send(list(worker.events.items()))
        worker.events = {}
        self._report_death(reason)

    def _take(self, worker: _Worker) -> list[Job]:
        """Waiting jobs that fit this worker's batch now, in arrival order (called with the lock held): while its
        rows stay within max_batch and within its share of all rows held or waiting, so that the workers split
        the load. Jobs that were cancelled or expired while waiting leave the queue here, so they never hold a
        place in it."""
        now = time.monotonic()
        gone = [j for j in self.waiting if j.cancelled or j.expired(now)] if self.waiting else []
        if gone:
            self.waiting = deque(j for j in self.waiting if j not in gone)
            self._send([(j, [DeadlineExceeded("the deadline passed while the request waited for the model")])
                        for j in gone if not j.cancelled])
        total = sum(w.width for w in self._workers) + sum(job.width for job in self.waiting)
        share = -(-total // len(self._workers))  # ceil
        room = min(self.cfg.max_batch, share) - worker.width
        new = []
        while self.waiting and (self.waiting[0].width <= room or (not worker.active and not new)):
            job = self.waiting.popleft()
            room -= job.width
            new.append(job)
        return new

    def _iteration(self, worker: _Worker, new: list[Job]) -> None:
        now = time.monotonic()
        expired = [j for j in worker.active if not j.cancelled and j.expired(now)]
        if expired:
            self._send([(j, [DeadlineExceeded("the deadline passed before the request finished")]) for j in expired])
            for j in expired:
                j.cancelled = True
        events = worker.events = {}
        new = [j for j in new if not j.cancelled]
        if new:
            self._encode(worker, new, events)
        groups: dict[tuple[str, ...], list[Job]] = {}  # by the decoder outputs they need beyond the fast ones
        for j in worker.active:
            if j.rows and not j.cancelled:
                groups.setdefault(j.decoder_extras, []).append(j)
        for extras, group in sorted(groups.items()):
            self._decode(worker, group, extras, events)
        with self._cv:
            if self.dead is not None:  # another worker died and failed every job already
                return
            worker.active = [j for j in worker.active if not j.done and not j.cancelled]  # frees their caches
        self._send(list(events.items()))
        worker.events = {}

    def _fail(self, job: Job, error: Exception, events: dict[Job, list]) -> None:
        if isinstance(error, ServingError):
            log.warning("a request to %s failed: %s", self.label, error)
        error = logged(error, f"a request to {self.label}")  # unexpected: its traceback logged once, with an id
        job.done, job.rows = True, []
        events.setdefault(job, []).append(error)

    def _isolated(self, jobs: list[Job], run: Callable[[list[Job]], None], events: dict[Job, list]) -> None:
        """Run `jobs` together; if the run raises, run them one by one so only the culprit fails."""
        try:
            run(jobs)
        except Exception as e:
            if len(jobs) == 1:
                self._fail(jobs[0], e, events)
                return
            log.warning("a batched run in %s failed (%r); retrying its %d requests one by one", self.label, e,
                        len(jobs))
            for job in jobs:
                self._isolated([job], run, events)

    def _encode(self, worker: _Worker, jobs: list[Job], events: dict[Job, list]) -> None:
        def run(group: list[Job]) -> None:
            out = self.runner.run_encoder([j.source for j in group], attention)
            worker.encoder_passes += 1
            now = time.monotonic()
            for i, job in enumerate(group):
                try:
                    events.setdefault(job, []).extend(job.encoded(out, i, now))
                except Exception as e:
                    self._fail(job, e, events)

        for attention in (False, True):
            group = [j for j in jobs if j.encoder_attention == attention]
            if group:
                self._isolated(group, run, events)

    def _decode(self, worker: _Worker, jobs: list[Job], extras: tuple[str, ...], events: dict[Job, list]) -> None:
        def run(group: list[Job]) -> None:
            feeds, P = decoder_feeds([row for job in group for row in job.rows], worker.sources[bool(extras)])
            step = StepOutput(self.runner.run_decoder(feeds, bool(extras), extras), P, 0.0)
            worker.steps += 1
            step.now = time.monotonic()
            first = 0
            for job in group:
                width = len(job.rows)
                try:
                    events.setdefault(job, []).extend(job.stepped(step, first))
                except Exception as e:
                    self._fail(job, e, events)
                first += width

        self._isolated(jobs, run, events)
