"""The floor of a Python gRPC stream: what serving one message costs with no model and no engine at all.

    python -m bench.grpc_floor [--duration 5] [--levels 1,16] [--messages 10]

A grpc.aio server (in a process of its own) answers every Generate with `--messages` prebuilt GenerateResponse
messages (a token each, as attnserve's stream sends them); closed-loop grpc.aio clients in this process call it
at each level. Per level: messages per second, and the server's CPU time per message (utime + stime from /proc,
all threads). Whatever attnserve spends per streamed token above this is its own; below it nothing built on
grpcio's Python server can go.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import time

from . import server_stats


def _messages(n: int) -> list:
    from protos.attnserve.v1 import attnserve_pb2 as pb

    return [pb.GenerateResponse(token=pb.Token(id=4 + i, text="7", logprob=-0.01, index=i)) for i in range(n)]


def _serve(port: int, n: int, ready) -> None:
    import grpc

    from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc

    messages = _messages(n)

    class Prebuilt(pb_grpc.AttnServeServiceServicer):
        async def Generate(self, request, context):
            for m in messages:
                yield m

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_AttnServeServiceServicer_to_server(Prebuilt(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


async def _load(address: str, concurrency: int, seconds: float) -> int:
    import grpc

    from protos.attnserve.v1 import attnserve_pb2 as pb
    from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeServiceStub(channel)
        count, stop = 0, time.monotonic() + seconds

        async def client() -> None:
            nonlocal count
            while time.monotonic() < stop:
                async for _ in stub.Generate(pb.GenerateRequest()):
                    count += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--levels", default="1,16")
    p.add_argument("--messages", type=int, default=10, help="messages per call (a `dates` answer is ~10 tokens)")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_serve, args=(port, args.messages, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(60):
            raise SystemExit("the floor server did not start")
        address = f"127.0.0.1:{port}"
        print("| streams | messages/s | server CPU (cores) | server CPU us / message |\n|---:|---:|---:|---:|")
        for level in (int(x) for x in args.levels.split(",")):
            asyncio.run(_load(address, level, 1.0))  # warm-up
            c0, t0 = server_stats.sample(server.pid).cpu_s, time.monotonic()
            n = asyncio.run(_load(address, level, args.duration))
            dt, cpu = time.monotonic() - t0, server_stats.sample(server.pid).cpu_s - c0
            print(f"| {level} | {n / dt:,.0f} | {cpu / dt:.2f} | {1e6 * cpu / n:.1f} |", flush=True)
    finally:
        server.terminate()
        server.join(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
