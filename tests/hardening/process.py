"""`attnserve serve` as a subprocess: its /proc figures, its log, its /metrics; what its models accept."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.server_stats import tree
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc

from .common import ROOT


# ---------------------------------------------------------------------------------------------- the server process
@dataclass(frozen=True)
class ProcessStats:
    rss_bytes: int  # VmRSS
    threads: int  # entries of /proc/<pid>/task
    fds: int  # entries of /proc/<pid>/fd


def thread_names(pid: int) -> Counter:
    """The process's threads by name (/proc/<pid>/task/*/comm): grpc, ONNX Runtime and Python name theirs."""
    names = Counter()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names[Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()] += 1
    return names


def process_stats(pid: int) -> ProcessStats:
    """Summed over the server's process and its engine processes (bench.server_stats.tree)."""
    rss = threads = fds = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            status = Path(f"/proc/{p}/status").read_text()
            rss += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024
            threads += len(os.listdir(f"/proc/{p}/task"))
            fds += len(os.listdir(f"/proc/{p}/fd"))
    return ProcessStats(rss, threads, fds)


_LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) ")  # serving.cli's log format


class ServerProcess:
    """`attnserve serve` on a free gRPC and metrics port (both bound as port 0, read back from its log); its
    stdout and stderr are kept as `log`."""

    def __init__(self, repo: Path, *flags: str, env: dict[str, str] | None = None,
                 start_timeout: float = 120.0) -> None:
        exe = Path(sys.executable).parent / "attnserve"
        cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "attnserve.cli"]
        cmd = [*cli, "serve", "--repo", str(repo), "--address", "127.0.0.1:0", "--metrics-port", "0",
               "--providers", "cpu", "--poll-seconds", "0", "--drain-seconds", "0", "--grace-seconds", "2", *flags]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.pid = self.proc.pid
        self.log: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(start_timeout):
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-40:]))
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {self.proc.returncode}:\n" + "".join(self.log[-40:]))
        self.started = self.stats()  # serving, no call made yet

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            found = re.search(r"\(port (\d+)\), metrics on (\d+), HTTP on (\w+)", line)
            if found:
                self.port, self.metrics_port = int(found.group(1)), int(found.group(2))
                self.http_port = int(found.group(3)) if found.group(3).isdigit() else None
                self.address = f"127.0.0.1:{self.port}"
                self._ready.set()
        self._ready.set()  # exited before it listened

    def stats(self) -> ProcessStats:
        return process_stats(self.pid)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics: (name, sorted label pairs) -> value."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def error_records(self) -> list[str]:
        """The ERROR and CRITICAL records of its log, each with its traceback."""
        records: list[list[str]] = []
        for line in self.log:
            head = _LOG_RECORD.match(line)
            if head or not records:
                records.append([head.group(1) if head else "", line])
            else:
                records[-1][1] += line
        return [text.rstrip() for level, text in records if level in ("ERROR", "CRITICAL")]

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed after 30 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


def requests_total(metrics: dict, method: str, code: str) -> float:
    return metrics.get(("attnserve_requests_total", (("code", code), ("method", method))), 0.0)


def in_flight(metrics: dict) -> dict[str, float]:
    return {dict(labels)["method"]: v for (name, labels), v in metrics.items()
            if name == "attnserve_in_flight_requests"}


# ---------------------------------------------------------------------------------------------- what the models accept
@dataclass(frozen=True)
class ModelFacts:
    """What a served model accepts, from GetModelInfo: the fuzzer's notion of a good and a bad value."""

    version: int
    src_vocab: int
    n_layers: tuple[int, int]  # encoder, decoder
    n_heads: int
    max_source_tokens: int
    max_new_tokens: int
    max_message_bytes: int


def model_facts(channel: grpc.Channel) -> dict[str, ModelFacts]:
    stub = pb_grpc.AttnServeServiceStub(channel)
    facts = {}
    for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models:
        info = stub.GetModelInfo(pb.GetModelInfoRequest(model=pb.ModelRef(name=m.name)), timeout=10)
        layers = {kind: len({b.layer for b in info.attention_blocks if b.kind == kind})
                  for kind in ("encoder_self", "decoder_self")}
        lim = info.limits
        facts[m.name] = ModelFacts(info.version, json.loads(info.config_json)["src_vocab_size"],
                                   (layers["encoder_self"], layers["decoder_self"]), info.attention_blocks[0].heads,
                                   lim.max_source_tokens, lim.max_new_tokens, lim.max_message_bytes)
    return facts


