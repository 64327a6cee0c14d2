"""Prometheus metrics, on their own port and registry (one registry per server, so tests can run several)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("attnserve_requests_total", "RPCs handled, by method and final status code",
                                ["method", "code"], registry=r)
        self.duration = Histogram("attnserve_request_duration_seconds", "RPC duration, first byte in to last out",
                                  ["method"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram("attnserve_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("attnserve_inter_token_latency_seconds", "Time between consecutive streamed tokens",
                             buckets=_LATENCY, registry=r)
        self.tokens = Counter("attnserve_generated_tokens_total", "Tokens generated", ["model"], registry=r)
        self.in_flight = Gauge("attnserve_in_flight_requests", "RPCs being handled now", ["method"], registry=r)
        self.models = Gauge("attnserve_models_loaded", "Model versions being served", registry=r)
        self.model_info = Gauge("attnserve_model_info", "1 per served model version and execution provider",
                                ["model", "version", "provider"], registry=r)
        self.model_ready = Gauge("attnserve_model_ready", "1 while the model's engine runs, 0 while it restarts",
                                 ["model"], registry=r)
        self.engine_restarts = Gauge("attnserve_engine_restarts", "Engine restarts after a failure, per model",
                                     ["model"], registry=r)
        self._server = None

    def models_changed(self, models: Mapping) -> None:
        """Refresh the per-model gauges from the registry's ServedModel map."""
        self.models.set(len(models))
        self.model_info.clear()
        self.model_ready.clear()
        for name, served in models.items():
            for provider in served.runner.providers:
                self.model_info.labels(name, str(served.runner.version), provider).set(1)
            self.model_ready.labels(name).set(1 if served.healthy else 0)
            self.engine_restarts.labels(name).set(served.restarts)

    def start(self, port: int, address: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0 picks a free one); returns the port."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
