"""`python -m serving.client.healthcheck [ADDRESS] [SERVICE]`: exit 0 if the gRPC health service says SERVING.

The compose healthcheck and the quickstart use it (grpc_health_probe is not shipped in the slim image).
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(address) as channel:
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
    argv = sys.argv[1:] if argv is None else argv
    address = argv[0] if argv else "127.0.0.1:50051"
    service = argv[1] if len(argv) > 1 else ""
    return 0 if check(address, service) else 1


if __name__ == "__main__":
    sys.exit(main())
