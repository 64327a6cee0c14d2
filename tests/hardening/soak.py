"""The soak: concurrent streams with cancellations and deadlines, and what the server looks like after."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc

from .common import S
from .process import ProcessStats, ServerProcess, in_flight, process_stats, requests_total, thread_names


# ---------------------------------------------------------------------------------------------- concurrent streams
@dataclass(frozen=True)
class Intent:
    """What one stream means to do: run to its finish, be cancelled after `cancel_after` tokens, or outlive its
    `timeout` (a short deadline)."""

    kind: str  # short | long | cancel | deadline
    request: pb.GenerateRequest
    timeout: float
    cancel_after: int = 0


@dataclass
class Tally:
    """What the clients intended and what they saw."""

    intended: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # completed | cancelled | deadline (| deadline mid-stream)
    errors: list[str] = field(default_factory=list)  # unintended
    versions: list[tuple[float, int]] = field(default_factory=list)  # (start, Finish.model.version)
    tokens: int = 0


async def _stream(stub: pb_grpc.AttnServeServiceStub, intent: Intent, tally: Tally) -> None:
    tally.intended[intent.kind] += 1
    started, n, finish = time.monotonic(), 0, None
    call = stub.Generate(intent.request, timeout=intent.timeout)
    try:
        async for msg in call:
            if msg.HasField("token"):
                n += 1
            if msg.HasField("finish"):
                finish = msg.finish
            if intent.cancel_after and n >= intent.cancel_after:
                break
    except grpc.aio.AioRpcError as e:
        if intent.kind == "deadline" and e.code() == S.DEADLINE_EXCEEDED:
            tally.outcomes["deadline"] += 1
            tally.outcomes["deadline mid-stream"] += n > 0  # the server surely ran (and counts) these
        else:
            tally.errors.append(f"{intent.kind}: {e.code().name}: {e.details()}")
        return
    finally:
        tally.tokens += n
    if finish is None and call.cancel():  # cancel() is False when the call had ended already
        tally.outcomes["cancelled"] += 1
    elif finish is None:
        tally.errors.append(f"{intent.kind}: the stream ended after {n} tokens without a finish message")
    else:
        tally.outcomes["completed"] += 1
        tally.versions.append((started, finish.model.version))


async def drive(address: str, streams: int, plan: Callable[[random.Random], Intent], stop: Callable[[], bool],
                seed: int = 0, tally: Tally | None = None) -> Tally:
    """`streams` clients, each opening one stream after another as `plan` says, until `stop()`."""
    tally = tally or Tally()

    async def client(i: int) -> None:
        rng = random.Random(f"{seed}:stream:{i}")
        while not stop():
            await _stream(stub, plan(rng), tally)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeServiceStub(channel)
        await asyncio.gather(*(client(i) for i in range(streams)))
    return tally


def generate_request(model: str, text: str, max_new_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=pb.ModelRef(name=model), source=pb.Source(text=text),
                              options=pb.DecodingOptions(max_new_tokens=max_new_tokens))


SHORT_TEXTS = ("abc", "hello", "qwertyui", "mnop", "klmno", "xy", "zebra", "stream")


def soak_plan(sources: list[str], long_tokens: int = 250, short_model: str = "tiny",
              long_model: str = "noisy") -> Callable[[random.Random], Intent]:
    """The soak's mix: short streams, long ones, cancellations after 1-20 tokens, deadlines of 20-300 ms.
    `sources` are texts the long model is known to answer with `long_tokens` tokens (no early <eos>), so
    a cancellation never races the stream's own end."""

    def plan(rng: random.Random) -> Intent:
        kind = rng.choices(("short", "long", "cancel", "deadline"), weights=(4, 2, 2, 2))[0]
        if kind == "short":
            return Intent(kind, generate_request(short_model, rng.choice(SHORT_TEXTS), rng.randrange(4, 25)), 60.0)
        request = generate_request(long_model, rng.choice(sources), long_tokens)
        if kind == "deadline":
            return Intent(kind, request, rng.uniform(0.02, 0.3))
        return Intent(kind, request, 120.0, rng.randrange(1, 21) if kind == "cancel" else 0)

    return plan


def long_texts(address: str, model: str = "noisy", tokens: int = 250, want: int = 6) -> list[str]:
    """Sources `model` answers greedily with exactly `tokens` tokens (it never says <eos> for them)."""
    found = []
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.AttnServeServiceStub(ch)
        for i in range(10 * len(SHORT_TEXTS)):
            text = SHORT_TEXTS[i % len(SHORT_TEXTS)] + "abcdefghij"[: i // len(SHORT_TEXTS)]
            r = stub.Predict(pb.PredictRequest(model=pb.ModelRef(name=model), source=pb.Source(text=text),
                                               options=pb.DecodingOptions(max_new_tokens=tokens)), timeout=60)
            if r.finish_reason == pb.FINISH_REASON_LENGTH and len(r.tokens) == tokens:
                found.append(text)
            if len(found) == want:
                return found
    raise RuntimeError(f"{model} ends every probe early; no source for long streams")


@dataclass
class SoakReport:
    seconds: float
    streams: int
    tally: Tally
    rss: list[tuple[float, int]]  # (seconds since start, VmRSS) every second
    before: ProcessStats | None = None  # idle, after the warm-up
    after: ProcessStats | None = None  # idle again, after the run
    metric_deltas: dict[str, float] = field(default_factory=dict)  # Generate code -> requests_total delta
    in_flight_after: dict[str, float] = field(default_factory=dict)
    threads_before: Counter = field(default_factory=Counter)  # by name, idle before and after
    threads_after: Counter = field(default_factory=Counter)

    def rss_growth(self, skip: float = 0.2) -> float:
        """How much RSS grew over the run after its first `skip` (0.2: the last 80%), as a fraction of where it
        stood: the Theil-Sen line through the samples (the median slope of all pairs), from its start to its
        end. Robust, not the last sample over the first: single samples dip and spike by several percent as 64
        streams' buffers come and go, while a leak moves the whole line."""
        window = [(t, rss) for t, rss in self.rss if t >= skip * self.seconds]
        if len(window) < 3:
            return 0.0
        slope = statistics.median((r1 - r0) / (t1 - t0) for i, (t0, r0) in enumerate(window)
                                  for t1, r1 in window[i + 1:])
        intercept = statistics.median(r - slope * t for t, r in window)
        start, end = window[0][0], window[-1][0]
        return slope * (end - start) / (intercept + slope * start)

    def metric_checks(self) -> dict[str, bool]:
        """The server's per-code counts against what the clients saw. A stream that expired before the server's
        handler started is counted nowhere; under load a short deadline can be read as a cancellation; and a
        client's cancel can cross the server's last message on the wire: the server finished (OK), the client,
        not having read the end yet, cancelled. Each of the two races stays a sliver (2% allowed)."""
        t, d = self.tally, self.metric_deltas
        cancelled, expired, started = t.outcomes["cancelled"], t.outcomes["deadline"], t.outcomes["deadline mid-stream"]
        late = d.get("OK", 0) - t.outcomes["completed"]  # cancels that reached a stream the server had finished
        ended = d.get("CANCELLED", 0) + d.get("DEADLINE_EXCEEDED", 0)
        return {"only OK, CANCELLED, DEADLINE_EXCEEDED counted": set(d) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"},
                "every completed stream counted OK (and at most 2% of cancellations, sent after the server's end)":
                0 <= late <= 0.02 * cancelled,
                "every other cancellation counted CANCELLED (and at most 2% of expiries, misread under load)":
                cancelled - late <= d.get("CANCELLED", 0) <= cancelled - late + 0.02 * expired,
                "every ended stream counted once": started <= d.get("DEADLINE_EXCEEDED", 0)
                and ended <= cancelled - late + expired}

    def problems(self) -> list[str]:
        """What a user would call wrong with this run (the metric counts as in `metric_checks`)."""
        t = self.tally
        checks = {"unintended errors": not t.errors,
                  "RSS growth over the last 80% under 5%": self.rss_growth() < 0.05,
                  "nothing in flight at the end": not any(self.in_flight_after.values()),
                  "threads and fds back to idle": (self.before.threads, self.before.fds)
                  == (self.after.threads, self.after.fds),
                  **self.metric_checks()}
        return [name for name, ok in checks.items() if not ok]

    def lines(self) -> list[str]:
        t, d = self.tally, self.metric_deltas
        miscounted = d.get("CANCELLED", 0) - t.outcomes["cancelled"]
        uncounted = t.outcomes["cancelled"] + t.outcomes["deadline"] - d.get("CANCELLED", 0) \
            - d.get("DEADLINE_EXCEEDED", 0)
        mib = [rss / 2**20 for _, rss in self.rss]
        out = [f"soak: {self.streams} streams for {self.seconds:.0f} s, {t.tokens} tokens",
               f"  intended: {dict(t.intended)}; outcomes: {dict(t.outcomes)}",
               f"  server-side Generate codes (metric deltas): {self.metric_deltas}",
               f"  RSS MiB: first {mib[0]:.1f}, at 20% {mib[int(len(mib) * 0.2)]:.1f}, max {max(mib):.1f}, "
               f"last {mib[-1]:.1f}; growth over the last 80%: {self.rss_growth():+.2%}" if mib else "  no RSS",
               f"  RSS MiB every 10% of the run, then the last: "
               f"{[round(mib[len(mib) * i // 10], 1) for i in range(10)] + [round(mib[-1], 1)]}" if mib else "",
               f"  idle before: {self.before}", f"  idle after:  {self.after}",
               *([f"  threads by name, before: {dict(self.threads_before)}, after: {dict(self.threads_after)}"]
                 if self.threads_before != self.threads_after else []),
               f"  in flight after: {self.in_flight_after}",
               f"  deadline expiries counted CANCELLED: {miscounted:.0f}; streams counted nowhere "
               f"(expired before a handler started): {uncounted:.0f}",
               f"  unintended errors: {len(t.errors)}", *(f"    {e}" for e in t.errors[:30]),
               f"  problems: {self.problems() or 'none'}"]
        return out


async def _sample_rss(pid: int, out: list[tuple[float, int]], stop: Callable[[], bool]) -> None:
    t0 = time.monotonic()
    while not stop():
        out.append((time.monotonic() - t0, process_stats(pid).rss_bytes))
        await asyncio.sleep(1.0)


# grpc's thread pool starts threads under load and ends each after 20 s idle; a settle waits that long for them.
THREAD_IDLE_LIMIT_S = 20.0


def settle(server: ServerProcess, idle: ProcessStats | None = None,
           timeout: float = THREAD_IDLE_LIMIT_S + 10) -> tuple[dict, ProcessStats]:
    """Wait until nothing is in flight and threads and fds are back to `idle` (or `timeout`); then the metrics
    and the stats."""
    deadline = time.monotonic() + timeout
    while True:
        metrics, stats = server.metrics(), server.stats()
        quiet = not any(in_flight(metrics).values())
        if quiet and (idle is None or (stats.threads, stats.fds) == (idle.threads, idle.fds)):
            return metrics, stats
        if time.monotonic() > deadline:
            return metrics, stats
        time.sleep(0.2)


def run_soak(server: ServerProcess, seconds: float, streams: int = 64, seed: int = 0,
             warm_up_seconds: float = 5.0) -> SoakReport:
    """`streams` clients for `seconds` (after a warm-up of the same mix), RSS sampled every second, the metrics
    and the process's threads and fds read when it is idle before and after."""
    texts = long_texts(server.address, want=4)
    plan = soak_plan(texts)
    until = time.monotonic() + warm_up_seconds  # the warm-up: the same mix, so pools and arenas exist
    asyncio.run(drive(server.address, streams, plan, lambda: time.monotonic() > until, seed=seed + 1))
    metrics0, idle = settle(server, server.started)  # idle: as started, or what the warm-up left for good
    names0 = thread_names(server.pid)
    rss: list[tuple[float, int]] = []
    end = time.monotonic() + seconds

    async def run() -> Tally:
        sampler = asyncio.create_task(_sample_rss(server.pid, rss, lambda: time.monotonic() > end))
        tally = await drive(server.address, streams, plan, lambda: time.monotonic() > end, seed=seed)
        await sampler
        return tally

    tally = asyncio.run(run())
    metrics1, after = settle(server, idle)
    codes = {labels[0][1] for (name, labels), _ in metrics1.items() if name == "attnserve_requests_total"}
    deltas = {c: requests_total(metrics1, "Generate", c) - requests_total(metrics0, "Generate", c) for c in codes}
    return SoakReport(seconds, streams, tally, rss, idle, after, {c: d for c, d in deltas.items() if d},
                      in_flight(metrics1), names0, thread_names(server.pid))


