"""Peer benchmark: the `dates` ONNX model served by TorchServe, under the closed-loop streaming load of attnserve's
bench (same figures, same definitions).

    /work/tsvenv/bin/python bench/peers/torchserve/run.py --levels 1,4,16,64 --duration 8 --workers 1

Builds the model archive (model_store/dates.mar) when it is missing or its handler or settings changed, starts
TorchServe in the foreground of a child process, waits for the model's workers, checks one translation, then runs
each level in a load process of its own: C grpc.aio clients, each sending StreamPredictions one after another
for a warm-up second and then the measured window. TorchServe's CPU (frontend, launcher and Python workers: the
whole process tree, from /proc) is sampled at the window's edges; its RSS at the end of each level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))  # the figures are attnserve's bench's own: same records, same summary, same /proc

from server import (  # noqa: E402
    CHECK_EXPECTED,
    CHECK_TEXT,
    RUN,
    STREAMS_PER_CHANNEL,
    Server,
    alive,
    build_archive,
    check_translation,
    load_stubs,
    request_of,
    tree_cpu,
    tree_rss_mib,
)

from bench.load import Record, _emit, summarise  # noqa: E402
from bench.server_stats import tree  # noqa: E402


# ---------------------------------------------------------------------------------------------- inputs
def default_texts(n: int = 1000) -> list[str]:
    """The held-out inputs of the `dates` task, the ones `attnserve bench` sends by default."""
    from model_src.tasks import dates_task

    return [src for src, _ in dates_task(0).test[:n]]


# ---------------------------------------------------------------------------------------------- the load process
async def _one_request(stub, request, timeout: float, records: list[Record]) -> None:
    import grpc

    rec = Record(start=time.perf_counter())
    records.append(rec)
    call = stub.StreamPredictions(request, timeout=timeout)
    try:
        async for msg in call:
            if msg.prediction.startswith(b'{"token"'):
                rec.token_times.append(time.perf_counter())
    except grpc.aio.AioRpcError as e:
        rec.code = e.code().name
    finally:
        rec.end = time.perf_counter()
        if not call.done():  # cancelled at the end of the drain
            call.cancel()
            rec.code = rec.code or "CANCELLED_BY_BENCH"


async def load_level(port: int, concurrency: int, duration: float, warmup: float, max_new_tokens: int,
                     texts: list[str], timeout: float, drain: float) -> dict:
    import grpc

    pb, pb_grpc = load_stubs()
    requests = [request_of(pb, t, max_new_tokens) for t in texts]
    n_channels = -(-concurrency // STREAMS_PER_CHANNEL)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(n_channels)]
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), timeout)
        stubs = [pb_grpc.InferenceAPIsServiceStub(ch) for ch in channels]
        records: list[Record] = []
        t0 = time.perf_counter()
        t_start, t_end = t0 + warmup, t0 + warmup + duration

        async def user(i: int) -> None:
            k = i
            while time.perf_counter() < t_end:
                await _one_request(stubs[i // STREAMS_PER_CHANNEL], requests[k % len(requests)], timeout, records)
                k += concurrency

        users = [asyncio.create_task(user(i)) for i in range(concurrency)]
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        _emit("window_start")
        t_start = time.perf_counter()
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        t_end = time.perf_counter()
        _emit("window_end")
        _done, pending = await asyncio.wait(users, timeout=drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*users, return_exceptions=True)
    finally:
        for ch in channels:
            await ch.close()
    return {**summarise(records, t_start, t_end, concurrency), "channels": n_channels}


def load_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run.py _load")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--texts-file", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--drain", type=float, default=30.0)
    a = p.parse_args(argv)
    texts = json.loads(a.texts_file.read_text(encoding="utf-8"))
    result = asyncio.run(load_level(a.port, a.concurrency, a.duration, a.warmup, a.max_new_tokens, texts, a.timeout,
                                    a.drain))
    _emit("result", **result)
    return 0


def run_level(args: argparse.Namespace, server: Server, concurrency: int, texts_file: Path) -> dict:
    """One level in a load process of its own; TorchServe's CPU sampled when it says the window opens and closes."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_load", "--port", str(args.grpc_port),
           "--concurrency", str(concurrency), "--duration", str(args.duration), "--warmup", str(args.warmup),
           "--max-new-tokens", str(args.max_new_tokens), "--texts-file", str(texts_file)]
    result, cpu0, cpu1 = None, {}, {}
    err_path = RUN / "load.stderr"
    with open(err_path, "w+") as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True) as proc:
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event["event"] == "window_start":
                cpu0 = tree_cpu(server.pid)
            elif event["event"] == "window_end":
                cpu1 = tree_cpu(server.pid)
            elif event["event"] == "result":
                result = {k: v for k, v in event.items() if k != "event"}
        proc.wait()
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"the load process failed (exit {proc.returncode}): {err_path.read_text()[-2000:]}")
    cpu_s = sum(t - cpu0.get(pid, 0.0) for pid, t in cpu1.items())
    result.update(server_cpu_s=cpu_s, server_cpu_util=cpu_s / result["duration_s"],
                  server_cpu_ms_per_token=cpu_s * 1e3 / result["tokens"] if result["tokens"] else None,
                  server_rss_mib=tree_rss_mib(server.pid), server_processes=len(tree(server.pid)))
    return result


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_level(r: dict) -> None:
    print(f"C={r['concurrency']:<3} tok/s {r['tokens_per_s']:8.1f}  req/s {r['requests_per_s']:7.1f}  "
          f"TTFT p50/p99 {_fmt(r['ttft_ms']['p50'])}/{_fmt(r['ttft_ms']['p99'])} ms  "
          f"ITL p50/p99 {_fmt(r['itl_ms']['p50'])}/{_fmt(r['itl_ms']['p99'])} ms  "
          f"CPU {_fmt(r['server_cpu_ms_per_token'], '.2f')} ms/token ({r['server_cpu_util']:.2f} cores)  "
          f"RSS {r['server_rss_mib']:.0f} MiB  errors {r['errors'] or 0}", flush=True)


def versions() -> dict:
    out = {}
    for dist in ("torchserve", "torch-model-archiver", "torch", "onnxruntime", "numpy", "grpcio", "protobuf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    java = subprocess.run(["java", "-version"], capture_output=True, text=True)
    out["java"] = (java.stderr.splitlines() or [""])[0]
    out["python"] = sys.version.split()[0]
    return out


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,4,16,64", help="concurrent streams per level, comma-separated")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each level's window")
    p.add_argument("--workers", type=int, default=1, help="TorchServe workers (min = max)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batch-delay-ms", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--texts-file", type=Path, help="a JSON list of source texts, cycled (default: the `dates` "
                   "task's held-out inputs, as `attnserve bench` sends)")
    p.add_argument("--grpc-port", type=int, default=7070, help="gRPC inference port; management is the next one")
    p.add_argument("--http-port", type=int, default=8380, help="HTTP inference port; management, metrics follow")
    p.add_argument("--default-logging", action="store_true",
                   help="TorchServe's own log4j2 settings (INFO lines per streamed message) instead of log4j2.xml")
    p.add_argument("--out", type=Path, help="JSON results (default: run/results-w<workers>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    out = args.out or RUN / f"results-w{args.workers}.json"
    RUN.mkdir(parents=True, exist_ok=True)
    texts_file = args.texts_file
    if texts_file is None:
        texts_file = RUN / "texts.json"
        texts_file.write_text(json.dumps(default_texts(), ensure_ascii=False), encoding="utf-8")
    build_archive(args)
    load_stubs()
    report = {"peer": "torchserve", "versions": versions(), "settings": {
        "workers": args.workers, "batch_size": args.batch_size, "max_batch_delay_ms": args.max_batch_delay_ms,
        "max_new_tokens": args.max_new_tokens, "duration_s": args.duration, "warmup_s": args.warmup,
        "texts_file": str(texts_file), "streams_per_channel": STREAMS_PER_CHANNEL,
        "logging": "torchserve default" if args.default_logging else "log4j2.xml (warnings)"}, "levels": []}
    server = Server(args)
    status = 0
    try:
        started = time.monotonic()
        server.start()
        described = server.wait_ready()
        report["model"] = {k: described.get(k) for k in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers",
                                                          "responseTimeout")}
        print(f"TorchServe {report['versions']['torchserve']} ready in {time.monotonic() - started:.1f} s: "
              f"{json.dumps(report['model'])}", flush=True)
        report["check"] = check = check_translation(args)
        print(f"check: {CHECK_TEXT!r} -> {check['streamed']!r} in {check['messages']} messages: "
              f"{'ok' if check['ok'] else 'WRONG, expected ' + repr(CHECK_EXPECTED)}", flush=True)
        if not check["ok"]:
            status = 1
        else:
            for c in levels:
                result = run_level(args, server, c, texts_file)
                report["levels"].append(result)
                print_level(result)
    finally:
        killed = server.stop()
        report["stopped"] = {"killed_pids": killed, "left": [i[0] for i in server.pids if alive(i)]}
        print(f"TorchServe stopped; processes left: {len(report['stopped']['left'])}"
              + (f" (had to kill {killed})" if killed else ""), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {out}", flush=True)
    return status


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        sys.exit(load_main(sys.argv[2:]))
    sys.exit(main())
