"""Streaming over HTTP (SSE, generate_stream) against gRPC (Generate) on one server, side by side.

    python -m bench.http_vs_grpc --repo models --model dates [--levels 1,8 --seconds 8 --rounds 2]

Starts `attnserve serve` with both ports, then for each level runs C closed-loop clients for --seconds on one
protocol, then the other, alternating for --rounds rounds (the machine is shared: medians of the rounds are
quoted). Clients: grpc.aio streams, and aiohttp POSTs reading the event stream; the same texts and token
budget. Prints a Markdown table of tokens/s and time to first token per protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from .cli import _start_server, _stop_server
from .compare_servers import _free_port

TEXTS = ["July 4, 1976", "le 14 juillet 1789", "12 de octubre de 1492", "1. Januar 2999", "03/03/21",
         "mardi 3 mars 2021", "3rd of March 2021", "Dec 25 1999"]


async def _grpc(address: str, model: str, clients: int, seconds: float, max_tokens: int) -> tuple[int, list]:
    import grpc

    from protos.attnserve.v1 import attnserve_pb2 as pb
    from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc

    tokens, ttft = 0, []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeServiceStub(channel)
        end = time.perf_counter() + seconds

        async def user(i: int) -> None:
            nonlocal tokens
            k = i
            while time.perf_counter() < end:
                t0, first = time.perf_counter(), True
                req = pb.GenerateRequest(model=pb.ModelRef(name=model), source=pb.Source(text=TEXTS[k % len(TEXTS)]),
                                         options=pb.DecodingOptions(max_new_tokens=max_tokens))
                async for msg in stub.Generate(req):
                    if msg.HasField("token"):
                        tokens += 1
                        if first:
                            ttft.append(time.perf_counter() - t0)
                            first = False
                k += clients

        await asyncio.gather(*(user(i) for i in range(clients)))
    return tokens, ttft


async def _http(port: int, model: str, clients: int, seconds: float, max_tokens: int) -> tuple[int, list]:
    import aiohttp

    tokens, ttft = 0, []
    url = f"http://127.0.0.1:{port}/v2/models/{model}/generate_stream"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        end = time.perf_counter() + seconds

        async def user(i: int) -> None:
            nonlocal tokens
            k = i
            while time.perf_counter() < end:
                t0, first = time.perf_counter(), True
                body = {"text_input": TEXTS[k % len(TEXTS)], "parameters": {"max_tokens": max_tokens}}
                async with session.post(url, json=body) as resp:
                    async for line in resp.content:
                        if line.startswith(b"data: ") and b'"token_id"' in line:
                            tokens += 1
                            if first:
                                ttft.append(time.perf_counter() - t0)
                                first = False
                k += clients

        await asyncio.gather(*(user(i) for i in range(clients)))
    return tokens, ttft


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.http_vs_grpc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=Path("models"))
    p.add_argument("--model", default="dates")
    p.add_argument("--levels", default="1,8")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--log", type=Path, default=Path("out/http-vs-grpc-server.log"), help="the server's log")
    args = p.parse_args(argv)
    http_port = _free_port()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    server, address = _start_server(args.repo, args.model, args.log, ["--http-port", str(http_port)])
    try:
        rows = []
        for level in (int(x) for x in args.levels.split(",")):
            results: dict[str, list] = {"gRPC": [], "HTTP/SSE": []}
            for _ in range(args.rounds):
                for name, run in (("gRPC", lambda c: _grpc(address, args.model, c, args.seconds,
                                                            args.max_new_tokens)),
                                  ("HTTP/SSE", lambda c: _http(http_port, args.model, c, args.seconds,
                                                               args.max_new_tokens))):
                    tokens, ttft = asyncio.run(run(level))
                    results[name].append((tokens / args.seconds, statistics.median(ttft) * 1e3 if ttft else 0.0))
                    print(f"{name} x{level}: {tokens / args.seconds:,.0f} tokens/s", file=sys.stderr, flush=True)
            med = {n: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
                   for n, v in results.items()}
            rows.append((level, med))
        print("| streams | gRPC tokens/s | HTTP/SSE tokens/s | HTTP / gRPC | gRPC TTFT p50 ms | HTTP TTFT p50 ms |")
        print("|---:|---:|---:|---:|---:|---:|")
        for level, med in rows:
            g, h = med["gRPC"], med["HTTP/SSE"]
            print(f"| {level} | {g[0]:,.0f} | {h[0]:,.0f} | {h[0] / g[0]:.2f}x | {g[1]:.1f} | {h[1]:.1f} |")
        print(json.dumps({str(level): med for level, med in rows}), file=sys.stderr)
    finally:
        _stop_server(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
