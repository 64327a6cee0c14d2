"""docker-compose.yml on a real Docker engine: images built, the export job, the server through its published port,
metrics, the scale profile's replicas behind HAProxy (per-call balancing, a killed replica, its return), a clean
stop and a second `up` that skips the export. Marked `docker` (deselect with -m "not docker"); CI runs it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from serving.client import AttnServeClient

from .docker_env import DockerUnavailable, base_images, compose_binary, ensure_engine

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(2400)]
ROOT = Path(__file__).resolve().parent.parent
PROJECT = "attnserve-ci"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self) -> None:
        self.compose = compose_binary()
        self.ports = {name: _free_port() for name in ("ATTNSERVE_GRPC_PORT", "ATTNSERVE_METRICS_PORT",
                                                      "ATTNSERVE_HTTP_PORT", "ATTNSERVE_LB_PORT",
                                                      "ATTNSERVE_LB_STATS_PORT")}
        self.env = {**os.environ, **base_images(), **{k: str(v) for k, v in self.ports.items()},
                    "BUILD_NETWORK": "host",  # builds reach the package registries the way this machine does
                    "TORCH_INDEX": os.environ.get("ATTNSERVE_TEST_TORCH_INDEX", "https://pypi.org/simple"),
                    "DOCKER_BUILDKIT": "1", "ATTNSERVE_REPLICAS": "3"}

    def run(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.compose, "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), "--profile", "scale", *args]
        done = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                                 f"{done.stderr[-3000:]}")
        return done

    def containers(self, service: str, all_states: bool = False) -> list[dict]:
        out = self.run("ps", "--format", "json", *(["-a"] if all_states else []), service).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [r for r in rows if r["Service"] == service]

    def ip(self, container: str) -> str:
        return subprocess.run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                               container], capture_output=True, text=True, check=True).stdout.strip()

    def wait_healthy(self, services: tuple[str, ...], seconds: float = 300) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            states = [c.get("Health") for s in services for c in self.containers(s)]
            if states and all(h == "healthy" for h in states):
                return
            time.sleep(2)
        raise AssertionError(f"not healthy in {seconds} s: {self.run('ps', '-a').stdout}\n"
                             f"{self.run('logs', '--tail', '40').stdout[-4000:]}")


def _metric(text: str, name: str, **labels) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _scrape(host: str, port: int) -> str:
    return urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()


def _lb_up(stack: Stack) -> int:
    """Replicas HAProxy has UP, from its stats page (CSV)."""
    port = stack.ports["ATTNSERVE_LB_STATS_PORT"]
    csv = urllib.request.urlopen(f"http://127.0.0.1:{port}/stats;csv", timeout=10).read().decode()
    return sum(1 for line in csv.splitlines() if line.startswith("replicas,replica") and ",UP," in line)


@pytest.fixture(scope="module")
def stack():
    try:
        ensure_engine()
        s = Stack()
    except DockerUnavailable as e:
        pytest.fail(f"the compose tests need a Docker engine: {e} (deselect them with -m 'not docker')")
    s.run("down", "-v", "--remove-orphans", check=False, timeout=300)  # leftovers of an interrupted run
    try:
        s.run("build", timeout=1800)
        s.run("up", "-d", timeout=900)
        s.wait_healthy(("server", "replica"))
        yield s
    finally:
        s.run("down", "-v", "--remove-orphans", check=False, timeout=300)
        subprocess.run(["docker", "image", "prune", "-f"], capture_output=True, timeout=300)  # superseded layers
        # Every source change rebuilds the pip layers (the export image's alone is ~5 GB): keep the build cache to
        # about one build's worth, so that repeated runs do not fill the disk.
        subprocess.run(["docker", "builder", "prune", "-f", "--keep-storage", "12GB"], capture_output=True,
                       timeout=600)


def test_the_server_answers_through_its_published_port_and_exports_metrics(stack):
    exported = stack.containers("export", all_states=True)
    assert exported and all(c["ExitCode"] == 0 for c in exported)
    with AttnServeClient(f"127.0.0.1:{stack.ports['ATTNSERVE_GRPC_PORT']}") as c:
        messages = list(c.generate("July 4, 1976", attention="cross"))
        tokens = [m for m in messages if m.HasField("token")]
        assert "".join(m.token.text for m in tokens) == "1976-07-04" == messages[-1].finish.text
        assert all(m.attention for m in tokens)
        assert c.predict("le 14 juillet 1989", attention="all").text == "1989-07-14"
    http = f"http://127.0.0.1:{stack.ports['ATTNSERVE_HTTP_PORT']}"
    body = json.dumps({"text_input": "July 4, 1976"}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{http}/v2/models/dates/generate", body), timeout=30) as r:
        assert json.loads(r.read())["text_output"] == "1976-07-04"
    with urllib.request.urlopen(f"{http}/", timeout=30) as r:
        assert b"attention explorer" in r.read()  # the page, from the installed package's files
    text = _scrape("127.0.0.1", stack.ports["ATTNSERVE_METRICS_PORT"])
    assert _metric(text, "attnserve_requests_total", method="Generate", code="OK") >= 1
    assert _metric(text, "attnserve_requests_total", method="Predict", code="OK") >= 1


async def _streams(address: str, n: int, seconds: float) -> tuple[Counter, list[float], int]:
    """n closed-loop Generate streams over ONE channel for `seconds`; (codes, error times, calls)."""
    codes, error_times, calls = Counter(), [], 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeServiceStub(channel)
        stop = time.monotonic() + seconds

        async def one(i: int) -> None:
            nonlocal calls
            texts = ["July 4, 1976", "3rd of March 2021", "le 14 juillet 1989", "14 de julio de 1989"]
            while time.monotonic() < stop:
                calls += 1
                req = pb.GenerateRequest(source=pb.Source(text=texts[calls % len(texts)]))
                try:
                    async for _ in stub.Generate(req, timeout=20):
                        pass
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1
                    error_times.append(time.monotonic())

        await asyncio.gather(*(one(i) for i in range(n)))
    return codes, error_times, calls


def test_one_client_channel_is_spread_over_every_replica(stack):
    replicas = stack.containers("replica")
    assert len(replicas) == 3 and _lb_up(stack) == 3
    before = {r["Name"]: _metric(_scrape(stack.ip(r["Name"]), 9100), "attnserve_requests_total", method="Generate")
              for r in replicas}
    codes, _, _ = asyncio.run(_streams(f"127.0.0.1:{stack.ports['ATTNSERVE_LB_PORT']}", 60, 6.0))
    assert set(codes) == {"OK"}, codes
    served = {name: _metric(_scrape(stack.ip(name), 9100), "attnserve_requests_total", method="Generate") - n
              for name, n in before.items()}
    print(f"60 streams over one channel for 6 s: {dict(codes)}; per replica: {sorted(served.values())}")
    assert all(n >= 10 for n in served.values()), served
    assert sum(served.values()) == codes["OK"]  # every call reached exactly one replica


def _not_ok(stack: Stack, container: str) -> float:
    """Generate calls a replica ended other than OK (its own metrics)."""
    text = _scrape(stack.ip(container), 9100)
    return _metric(text, "attnserve_requests_total", method="Generate") - \
        _metric(text, "attnserve_requests_total", method="Generate", code="OK")


def test_a_killed_replica_fails_only_its_streams_and_rejoins(stack):
    replicas = [r["Name"] for r in stack.containers("replica")]
    victim, survivors = replicas[0], replicas[1:]
    address = f"127.0.0.1:{stack.ports['ATTNSERVE_LB_PORT']}"
    survivors_before = {name: _not_ok(stack, name) for name in survivors}

    async def load_and_kill():
        task = asyncio.create_task(_streams(address, 60, 8.0))
        await asyncio.sleep(2.0)
        killed = time.monotonic()
        subprocess.run(["docker", "kill", "-s", "KILL", victim], check=True, capture_output=True, timeout=30)
        codes, error_times, calls = await task
        return killed, codes, error_times, calls

    start = time.monotonic()
    killed, codes, error_times, calls = asyncio.run(load_and_kill())
    assert time.monotonic() - start < 8.0 + 25  # none hangs: every call ended by its own deadline at worst
    failed = sum(n for code, n in codes.items() if code != "OK")
    print(f"replica killed under 60 streams: {dict(codes)} of {calls} calls; failures at "
          f"{sorted(round(t - killed, 3) for t in error_times)} s after the kill")
    state = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", victim],
                           capture_output=True, text=True, check=True).stdout.split()
    assert state == ["exited", "137"]  # it really died, by SIGKILL
    # Only the streams in flight on the killed replica fail, all at the kill: the two others ended every call
    # OK (their own counts), and calls after the kill go to them (HAProxy retries a refused connection, or a
    # stream the replica dropped before answering, elsewhere: some runs see no failure at all). HAProxy 2.6 is
    # not gRPC-aware: it ends a stream whose replica vanished mid-answer without gRPC trailers (UNKNOWN).
    assert failed < 60 and set(codes) - {"OK"} <= {"UNKNOWN", "UNAVAILABLE", "INTERNAL"}, codes
    assert all(killed - 0.1 <= t <= killed + 2.0 for t in error_times), [round(t - killed, 2) for t in error_times]
    assert {name: _not_ok(stack, name) for name in survivors} == survivors_before
    assert codes["OK"] > 0.8 * (calls - 60)
    deadline = time.monotonic() + 20
    while _lb_up(stack) != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _lb_up(stack) == 2  # its health checks failed: out of rotation
    subprocess.run(["docker", "start", victim], check=True, capture_output=True, timeout=60)
    stack.wait_healthy(("replica",))
    deadline = time.monotonic() + 30
    while _lb_up(stack) != 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _lb_up(stack) == 3  # back in rotation, found again through Docker's DNS
    codes, _, _ = asyncio.run(_streams(address, 30, 3.0))
    assert set(codes) == {"OK"}, codes


def test_stop_exits_cleanly_and_a_second_up_skips_the_export(stack):
    stack.run("up", "-d", timeout=600)  # every replica running (whatever the tests before left)
    stack.wait_healthy(("server", "replica"))
    stack.run("stop", timeout=300)
    for service in ("server", "replica", "lb"):
        for c in stack.containers(service, all_states=True):
            assert c["State"] == "exited" and c["ExitCode"] == 0, c  # SIGTERM: drained, exit 0 in the grace period
    stack.run("up", "-d", timeout=600)
    stack.wait_healthy(("server",))
    logs = stack.run("logs", "export").stdout
    assert "nothing to do (--if-changed)" in logs  # the second run found dates/1 current
    with AttnServeClient(f"127.0.0.1:{stack.ports['ATTNSERVE_GRPC_PORT']}") as c:
        assert c.predict("July 4, 1976").text == "1976-07-04"
