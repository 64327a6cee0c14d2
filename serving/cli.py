"""`attnserve serve`: flags, each also read from an ATTNSERVE_* environment variable (for compose)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .domain import Limits
from .engine.runner import IO_BINDING, RunnerConfig
from .frontends.security import SecurityConfig
from .frontends.server import ServerConfig, serve

LIMIT_FLAGS = ("max_source_tokens", "max_new_tokens", "default_new_tokens", "max_concurrent_streams",
               "max_concurrent_requests", "max_queue_per_model", "max_message_bytes")


def _env(name: str, default):
    value = os.environ.get(f"ATTNSERVE_{name}")
    return default if value is None else type(default)(value) if not isinstance(default, bool) else \
        value.lower() in ("1", "true", "yes")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d, lim = ServerConfig(), Limits()
    p = argparse.ArgumentParser(prog="attnserve serve", description="Serve a model repository over gRPC.",
                                epilog="Every flag can also come from ATTNSERVE_<FLAG> (e.g. ATTNSERVE_REPO).")
    p.add_argument("--repo", type=Path, default=Path(_env("REPO", str(d.repo))))
    p.add_argument("--model", action="append", default=None,
                   help="serve only this model (repeatable; env ATTNSERVE_MODEL, comma-separated)")
    p.add_argument("--address", default=_env("ADDRESS", d.address))
    p.add_argument("--providers", default=_env("PROVIDERS", "cuda,cpu"),
                   help="execution providers in priority order (default cuda,cpu)")
    p.add_argument("--require-gpu", action="store_true", default=_env("REQUIRE_GPU", False),
                   help="exit with an error instead of falling back to CPU when CUDA is unavailable")
    p.add_argument("--metrics-port", type=int, default=_env("METRICS_PORT", 9100), help="-1 disables metrics")
    p.add_argument("--metrics-address", default=_env("METRICS_ADDRESS", d.metrics_address),
                   help="interface of the metrics endpoint (default loopback; 0.0.0.0 in the container images)")
    p.add_argument("--health-port", type=int, default=_env("HEALTH_PORT", -1),
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (for probes that cannot "
                        "speak TLS, such as the kubelet's gRPC probes); -1 (default): off")
    p.add_argument("--http-port", type=int, default=_env("HTTP_PORT", -1),
                   help="also serve HTTP on this port: the Open Inference Protocol's REST endpoints, Triton's "
                        "generate and generate_stream (SSE), and the attention explorer at / (same TLS and "
                        "tokens as the gRPC port); -1 (default): off")
    sec = p.add_argument_group("security", "TLS, mutual TLS and bearer tokens on the gRPC (and HTTP) port")
    for name, help_text in (("tls_cert", "PEM certificate chain: serve TLS"), ("tls_key", "its PEM private key"),
                            ("tls_client_ca", "mutual TLS: clients must present a certificate signed by this CA"),
                            ("auth_token_file", "inference tokens, one per line; model calls need one"),
                            ("admin_token_file", "admin tokens, one per line; management calls (ReloadModels) "
                                                 "are refused without this file")):
        value = _env(name.upper(), "")
        sec.add_argument(f"--{name.replace('_', '-')}", type=Path, default=Path(value) if value else None,
                         help=help_text)
    sec.add_argument("--reflection", action=argparse.BooleanOptionalAction, default=_env("REFLECTION", True),
                     help="gRPC server reflection (grpcurl list/describe); on by default")
    p.add_argument("--intra-op-threads", "--threads", dest="threads", type=_positive,
                   default=_env("THREADS", RunnerConfig().intra_op_threads),
                   help="ONNX Runtime intra-op threads per session (default 1: each engine worker runs its batch "
                        "on its own thread)")
    p.add_argument("--engine-workers", type=_positive, default=_env("ENGINE_WORKERS", d.engine_workers),
                   help="decode batches each model steps at once, each on its own thread over the same sessions "
                        "and weights (default %(default)s)")
    p.add_argument("--engine-start-seconds", type=float, default=_env("ENGINE_START_SECONDS", d.engine_start_seconds),
                   help="an engine process that has not loaded its version by then is stopped and the load fails "
                        "(the version already served keeps serving)")
    p.add_argument("--fast-graphs", action=argparse.BooleanOptionalAction, default=_env("FAST_GRAPHS", False),
                   help="also load the graphs without attention outputs as sessions of their own (each holds its "
                        "own prepacked weights); off by default: the attention graphs serve every request, "
                        "measured at the same speed")
    p.add_argument("--io-binding", choices=IO_BINDING, default=_env("IO_BINDING", RunnerConfig().io_binding),
                   help="decoder steps through ONNX Runtime IO binding, the caches kept on the device between steps "
                        "(default auto: on when the model runs on CUDA)")
    p.add_argument("--poll-seconds", type=float, default=_env("POLL_SECONDS", d.poll_seconds),
                   help="repository scan interval for new versions; 0 disables")
    p.add_argument("--grace-seconds", type=float, default=_env("GRACE_SECONDS", d.grace_seconds))
    p.add_argument("--drain-seconds", type=float, default=_env("DRAIN_SECONDS", d.drain_seconds))
    p.add_argument("--max-batch", type=int, default=_env("MAX_BATCH", d.max_batch))
    p.add_argument("--restart-seconds", type=float, default=_env("RESTART_SECONDS", d.restart_seconds),
                   help="delay before a failed model engine is restarted (doubles per recent failure, max 30 s)")
    p.add_argument("--engine-processes", action=argparse.BooleanOptionalAction,
                   default=_env("ENGINE_PROCESSES", d.engine_processes),
                   help="run each model's engine in a process of its own, beside the network's (default); "
                        "--no-engine-processes keeps them as threads of the server's process")
    for name in LIMIT_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=_env(name.upper(), getattr(lim, name)))
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    models = args.model or [m for m in os.environ.get("ATTNSERVE_MODEL", "").split(",") if m]
    limits = Limits(**{k: getattr(args, k) for k in LIMIT_FLAGS})
    runner = RunnerConfig(providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
                          require_gpu=args.require_gpu, intra_op_threads=args.threads,
                          fast_graphs=args.fast_graphs, io_binding=args.io_binding)
    security = SecurityConfig(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                              auth_token_file=args.auth_token_file, admin_token_file=args.admin_token_file,
                              reflection=args.reflection)
    return ServerConfig(repo=args.repo, address=args.address, models=tuple(models), runner=runner, limits=limits,
                        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                        metrics_address=args.metrics_address, security=security,
                        health_port=None if args.health_port < 0 else args.health_port,
                        http_port=None if args.http_port < 0 else args.http_port,
                        poll_seconds=args.poll_seconds, grace_seconds=args.grace_seconds,
                        drain_seconds=args.drain_seconds, max_batch=args.max_batch,
                        restart_seconds=args.restart_seconds, engine_processes=args.engine_processes,
                        engine_workers=args.engine_workers, engine_start_seconds=args.engine_start_seconds)


def serve_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .errors import ServingError

    try:
        return asyncio.run(serve(config_from_args(args)))
    except (ServingError, OSError) as e:
        print(f"attnserve serve: error: {e}", file=sys.stderr)
        return 1
