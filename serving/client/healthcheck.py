"""`python -m serving.client.healthcheck [ADDRESS] [SERVICE] [--tls-ca ...]`: exit 0 if health says SERVING.

The compose healthcheck and the quickstart use it (grpc_health_probe is not shipped in the slim image). Health
needs no token; over TLS it takes the same --tls-* flags (and ATTNSERVE_TLS_* variables) as the other clients.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .connection import Connection, add_arguments, from_arguments


def check(address: str, service: str = "", timeout: float = 2.0, connection: Connection | None = None) -> bool:
    connection = connection or Connection.from_env()
    with connection.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            print(f"{address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return False
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{address}: {name}")
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.client.healthcheck", description=__doc__)
    p.add_argument("address", nargs="?", default="127.0.0.1:50051")
    p.add_argument("service", nargs="?", default="", help="'' (the server), liveness, attnserve.v1.AttnServeService or "
                   "model/NAME")
    add_arguments(p)
    args = p.parse_args(argv)
    return 0 if check(args.address, args.service, connection=from_arguments(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
