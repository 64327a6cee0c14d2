"""The load generator: closed-loop streaming Generate clients at one concurrency, run in a process of its own.

    python -m bench.load --address 127.0.0.1:50051 --model dates --concurrency 16 --duration 10 \
        --warmup 1 --max-new-tokens 32 --texts-file texts.json

C coroutines (grpc.aio) each send one streaming Generate after another, cycling through the texts, for the warm-up
and then the measured window. It prints JSON lines on stdout: {"event": "window_start"} and {"event":
"window_end"} the moment the window opens and closes (so the parent can sample the server's CPU at exactly those
moments), then {"event": "result", ...} with the level's figures. Requests still running when the window closes
are let finish (up to --drain seconds) so that their latencies count; their tokens after the close do not.

Per request it records the send time, every token message's arrival, and the status code of an error. Time to
first token is send -> first message carrying a token; inter-token latency is the gap between consecutive token
messages of one stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STREAMS_PER_CHANNEL = 32  # each channel is its own TCP connection (local subchannel pool), as separate users' are


@dataclass
class Record:
    start: float
    token_times: list[float] = field(default_factory=list)
    end: float | None = None
    code: str | None = None  # None: finished normally
    prompt_tokens: int = 0


def _client_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def _one_request(stub, pb, model: str, text: str, max_new_tokens: int, timeout: float,
                       records: list[Record]) -> None:
    import grpc

    rec = Record(start=time.perf_counter())
    records.append(rec)  # registered before the first byte, so tokens of an unfinished stream still count
    request = pb.GenerateRequest(model=pb.ModelRef(name=model), source=pb.Source(text=text),
                                 options=pb.DecodingOptions(max_new_tokens=max_new_tokens))
    call = stub.Generate(request, timeout=timeout)
    try:
        async for msg in call:
            if msg.HasField("token"):
                rec.token_times.append(time.perf_counter())
            if msg.HasField("finish"):
                rec.prompt_tokens = msg.finish.prompt_tokens
    except grpc.aio.AioRpcError as e:
        rec.code = e.code().name
    finally:
        rec.end = time.perf_counter()
        if not call.done():  # our own cancellation at the end of the drain
            call.cancel()
            rec.code = rec.code or "CANCELLED_BY_BENCH"


def _percentiles(values_s: list[float]) -> dict:
    if not values_s:
        return {"n": 0, "p50": None, "p99": None, "mean": None}
    ms = np.asarray(values_s) * 1e3
    return {"n": len(ms), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean())}


def summarise(records: list[Record], t_start: float, t_end: float, concurrency: int) -> dict:
    """The level's figures over the window [t_start, t_end] (perf_counter seconds)."""
    duration = t_end - t_start
    tokens = sum(t_start <= t <= t_end for r in records for t in r.token_times)
    finished_in_window = [r for r in records if r.code is None and r.end is not None and t_start <= r.end <= t_end]
    started = [r for r in records if r.start >= t_start and r.code is None and r.end is not None]
    gaps = [b - a for r in started for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    errors = Counter(r.code for r in records if r.code is not None and r.code != "CANCELLED_BY_BENCH"
                     and r.end is not None and r.end >= t_start)
    return {
        "concurrency": concurrency, "duration_s": duration, "tokens": tokens, "tokens_per_s": tokens / duration,
        "requests": len(finished_in_window), "requests_per_s": len(finished_in_window) / duration,
        "ttft_ms": _percentiles([r.token_times[0] - r.start for r in started if r.token_times]),
        "itl_ms": _percentiles(gaps),
        "mean_output_tokens": float(np.mean([len(r.token_times) for r in started])) if started else 0.0,
        "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in started])) if started else 0.0,
        "errors": dict(errors),
        "unfinished_at_drain": sum(r.code == "CANCELLED_BY_BENCH" for r in records),
    }


async def run(address: str, model: str, concurrency: int, duration: float, warmup: float, max_new_tokens: int,
              texts: list[str], timeout: float = 60.0, drain: float = 30.0) -> dict:
    import grpc

    from protos.attnserve.v1 import attnserve_pb2 as pb
    from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc

    n_channels = -(-concurrency // STREAMS_PER_CHANNEL)
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(n_channels)]
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), timeout)
        stubs = [pb_grpc.AttnServeServiceStub(ch) for ch in channels]
        records: list[Record] = []
        t0 = time.perf_counter()
        t_start, t_end = t0 + warmup, t0 + warmup + duration

        async def user(i: int) -> None:
            k = i
            while time.perf_counter() < t_end:
                await _one_request(stubs[i % n_channels], pb, model, texts[k % len(texts)], max_new_tokens,
                                   timeout, records)
                k += concurrency

        users = [asyncio.create_task(user(i)) for i in range(concurrency)]
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        _emit("window_start")
        cpu0, t_start = _client_cpu(), time.perf_counter()
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        t_end, cpu1 = time.perf_counter(), _client_cpu()
        _emit("window_end")
        _done, pending = await asyncio.wait(users, timeout=drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*users, return_exceptions=True)
    finally:
        for ch in channels:
            await ch.close()
    return {**summarise(records, t_start, t_end, concurrency), "client_cpu_s": cpu1 - cpu0, "channels": n_channels}


def run_level(address: str, model: str, concurrency: int, duration: float, warmup: float, max_new_tokens: int,
              texts_file: Path, on_window_start: Callable[[], None] = lambda: None,
              on_window_end: Callable[[], None] = lambda: None) -> dict:
    """Run one level in a child process (`python -m bench.load`), calling back at the window's edges."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "bench.load", "--address", address, "--model", model,
           "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup),
           "--max-new-tokens", str(max_new_tokens), "--texts-file", str(texts_file)]
    result = None
    # stderr to a file, not a pipe: a chatty child must never block on a pipe nobody reads until it exits
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                                                env=env) as proc:
        for line in proc.stdout:
            if not line.startswith("{"):  # only our JSON lines; anything else a library printed is not ours
                continue
            event = json.loads(line)
            if event["event"] == "window_start":
                on_window_start()
            elif event["event"] == "window_end":
                on_window_end()
            elif event["event"] == "result":
                result = {k: v for k, v in event.items() if k != "event"}
        proc.wait()
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"the load generator failed (exit {proc.returncode}): {stderr.strip()[-2000:]}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True)
    p.add_argument("--model", default="")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the window opens")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--texts-file", type=Path, required=True, help="a JSON list of source texts, cycled")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of each request, seconds")
    p.add_argument("--drain", type=float, default=30.0, help="seconds requests may run on after the window")
    args = p.parse_args(argv)
    texts = json.loads(args.texts_file.read_text(encoding="utf-8"))
    if not texts or args.concurrency < 1:
        p.error("need at least one text and a concurrency >= 1")
    result = asyncio.run(run(args.address, args.model, args.concurrency, args.duration, args.warmup,
                             args.max_new_tokens, texts, args.timeout, args.drain))
    _emit("result", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
