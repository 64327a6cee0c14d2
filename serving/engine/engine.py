"""The engine of one model version: the only code that runs its sessions, stepping every request together.

Requests arrive as jobs in a bounded admission queue. One thread loops: it admits waiting jobs while their rows
fit the batch, drops cancelled or expired ones, runs one encoder pass per graph for all new arrivals (padded),
then one decoder step per graph (fast, or with attention) for every row of every active job, and hands each
iteration's events to the event loop in one `call_soon_threadsafe`. A job whose output goes bad fails alone;
if a batched run raises, its jobs are retried one by one so only the culprit fails. If the thread itself dies,
every job fails at once with UNAVAILABLE, `submit` refuses new work, and `on_death` tells the registry.
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
from ..errors import DeadlineExceeded, LimitExceeded, ServingError, Unavailable
from .feeds import SourceBatch, decoder_feeds
from .jobs import Job, StepOutput
from .runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # decoder rows stepped together (a beam search takes beam_size of them)
    max_queue: int = 128  # jobs waiting for room in the batch; past it, RESOURCE_EXHAUSTED at once


class EngineClosed(Unavailable):
    """The engine was retired (its version swapped out or unloaded) before the job reached it; a caller may
    retry on whatever the registry serves now."""


class Engine:
    def __init__(self, runner: ModelRunner, cfg: EngineConfig = EngineConfig(),
                 on_death: Callable[[Engine, BaseException], None] | None = None) -> None:
        self.runner, self.cfg, self.on_death = runner, cfg, on_death
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []  # taken from the queue: being encoded or decoded
        self._events: dict[Job, list] = {}  # this iteration's events, sent at its end (or when the engine dies)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retired = False  # no new jobs; the thread ends once the ones it has are finished
        self.dead: BaseException | None = None
        self._sources = {False: SourceBatch(), True: SourceBatch()}  # per decoder graph
        self.steps = 0  # decoder steps run, for tests and metrics
        self.encoder_passes = 0

    @property
    def label(self) -> str:
        return f"{self.runner.name} v{self.runner.version}"

    @property
    def load(self) -> int:
        with self._cv:
            return len(self.waiting) + len(self.active)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self.dead is None and not self._retired

    @property
    def stopped(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def start(self) -> None:
        """Start the engine thread; events are handed to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._start_thread()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"engine-{self.runner.name}", daemon=True)
        self._thread.start()

    def retire(self) -> None:
        """Take no new jobs; finish the ones already here, then stop the thread."""
        with self._cv:
            self._retired = True
            self._cv.notify()

    async def close(self, timeout: float = 30.0) -> None:
        """Retire and wait (at most `timeout`) for the thread to finish what it holds."""
        self.retire()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    def submit(self, job: Job) -> Job:
        """Queue `job` or refuse at once: UNAVAILABLE if the engine is not running, RESOURCE_EXHAUSTED if full."""
        with self._cv:
            if self.dead is not None:
                raise Unavailable(f"model {self.label} is restarting after an engine failure; retry in a moment")
            if self._retired or self._thread is None:
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

    def _main(self) -> None:
        reason: BaseException | None = None
        try:
            while True:
                with self._cv:
                    while not self._retired and not self.waiting and not self.active:
                        self._cv.wait()
                    if self._retired and not self.waiting and not self.active:
                        break
                    new = self._take()
                    self.active += new  # counted in `load` from now on
                self._iteration(new)
        except BaseException as e:  # anything escaping the per-job handling kills the engine: fail all, loudly
            log.exception("the engine of %s died", self.label)
            reason = e
        with self._cv:
            self.dead = reason
            orphans = [j for j in list(self.waiting) + self.active if not j.done]
            self.waiting.clear()
            self.active = []
        if reason is not None:  # what the step had already produced still reaches its callers, then the errors
            err = Unavailable(f"model {self.label} stopped before this request finished: its engine failed "
                              f"({type(reason).__name__}); retry")
            for job in orphans:
                self._events.setdefault(job, []).append(err)
            self._send(list(self._events.items()))
            self._events = {}
            self._report_death(reason)

    def _take(self) -> list[Job]:
        """Waiting jobs that fit the batch now, in arrival order (called with the lock held). Jobs that were
        cancelled or expired while waiting leave the queue here, so they never hold a place in it."""
        now = time.monotonic()
        gone = [j for j in self.waiting if j.cancelled or j.expired(now)] if self.waiting else []
        if gone:
            self.waiting = deque(j for j in self.waiting if j not in gone)
            self._send([(j, [DeadlineExceeded("the deadline passed while the request waited for the model")])
                        for j in gone if not j.cancelled])
        room = self.cfg.max_batch - sum(job.width for job in self.active)
        new = []
        while self.waiting and (self.waiting[0].width <= room or (not self.active and not new)):
            job = self.waiting.popleft()
            room -= job.width
            new.append(job)
        return new

    def _iteration(self, new: list[Job]) -> None:
        now = time.monotonic()
        expired = [j for j in self.active if not j.cancelled and j.expired(now)]
        if expired:
            self._send([(j, [DeadlineExceeded("the deadline passed before the request finished")]) for j in expired])
            for j in expired:
                j.cancelled = True
        events = self._events = {}
        new = [j for j in new if not j.cancelled]
        if new:
            self._encode(new, events)
        groups: tuple[list[Job], list[Job]] = ([], [])  # without, with attention
        for j in self.active:
            if j.rows and not j.cancelled:
                groups[j.decoder_attention].append(j)
        for attention, group in enumerate(groups):
            if group:
                self._decode(group, bool(attention), events)
        with self._cv:
            self.active = [j for j in self.active if not j.done and not j.cancelled]  # frees their caches
        self._send(list(events.items()))
        self._events = {}

    def _fail(self, job: Job, error: Exception, events: dict[Job, list]) -> None:
        if isinstance(error, ServingError):
            log.warning("a request to %s failed: %s", self.label, error)
        else:
            log.error("a request to %s failed: %r", self.label, error)
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

    def _encode(self, jobs: list[Job], events: dict[Job, list]) -> None:
        def run(group: list[Job]) -> None:
            out = self.runner.run_encoder([j.source for j in group], attention)
            self.encoder_passes += 1
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

    def _decode(self, jobs: list[Job], attention: bool, events: dict[Job, list]) -> None:
        names = self.runner.decoder_inputs(attention)

        def run(group: list[Job]) -> None:
            feeds, P = decoder_feeds([row for job in group for row in job.rows], names, self._sources[attention])
            step = StepOutput(self.runner.run_decoder(feeds, attention), P, 0.0)
            self.steps += 1
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
