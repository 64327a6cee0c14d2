"""docker-compose.yml: valid against the compose spec, and each service's command and healthcheck run for real as
local processes (no Docker engine here), with only the volume path and the host port mapped."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _local(argv: list[str], repo: Path, port: int | None = None) -> list[str]:
    """The container's command with the model volume and port mapped to this machine."""
    out = []
    for arg in argv:
        arg = arg.replace("/models", str(repo))
        if port is not None:
            arg = arg.replace(":50051", f":{port}").replace("0.0.0.0", "127.0.0.1")
        out.append(arg)
    return out


def _env(service: dict, repo: Path) -> dict:
    env = {k: str(v).replace("/models", str(repo)) for k, v in (service.get("environment") or {}).items()}
    env["ATTNSERVE_METRICS_PORT"] = str(_free_port())
    return {**os.environ, **env, "PYTHONPATH": str(ROOT)}


def test_compose_file_is_valid_against_the_compose_spec():
    exe = shutil.which("check-jsonschema", path=str(BIN)) or shutil.which("check-jsonschema")
    assert exe, "check-jsonschema is part of the 'dev' extra"
    r = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_export_then_server_then_healthcheck_as_compose_runs_them(tmp_path):
    services = _services()
    repo = tmp_path / "models"
    attnserve = str(BIN / "attnserve") if (BIN / "attnserve").exists() else None
    cli = [attnserve] if attnserve else [sys.executable, "-m", "attnserve.cli"]

    export = services["export"]
    r = subprocess.run(cli + _local(export["command"], repo), capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env=_env(export, repo))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (repo / "dates" / "1" / "manifest.json").is_file()
    again = subprocess.run(cli + _local(export["command"], repo), capture_output=True, text=True, timeout=600,
                           cwd=ROOT, env=_env(export, repo))
    assert again.returncode == 0 and "nothing to do" in again.stdout  # a restart of the job is a no-op
    assert not (repo / "dates" / "2").exists()

    server = services["server"]
    port = _free_port()
    proc = subprocess.Popen(cli + _local(server["command"], repo, port), cwd=ROOT, env=_env(server, repo),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        check = _local(server["healthcheck"]["test"][1:], repo, port)
        check[0] = sys.executable if check[0] == "python" else check[0]
        healthy = False
        for _ in range(120):
            if subprocess.run(check, capture_output=True, cwd=ROOT, env=_env(server, repo)).returncode == 0:
                healthy = True
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        assert healthy
        grpcurl = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")
        if grpcurl:  # the dev extra ships it; the check is skipped only where it is absent
            listed = subprocess.run([grpcurl, "-plaintext", f"127.0.0.1:{port}", "list"], capture_output=True,
                                    text=True, timeout=30)
            assert "attnserve.v1.AttnServeService" in listed.stdout and "grpc.health.v1.Health" in listed.stdout
            described = subprocess.run([grpcurl, "-plaintext", f"127.0.0.1:{port}", "describe",
                                        "attnserve.v1.AttnServeService"], capture_output=True, text=True, timeout=30)
            assert "rpc Generate" in described.stdout
            out = subprocess.run([grpcurl, "-plaintext", "-d", '{"source": {"text": "3 March 2021"}}',
                                  f"127.0.0.1:{port}", "attnserve.v1.AttnServeService/Predict"], capture_output=True,
                                 text=True, timeout=30)
            assert '"text": "2021-03-03"' in out.stdout, out.stdout + out.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_gpu_service_fails_fast_without_cuda(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the service would start")
    svc = _services()["server-gpu"]
    repo = tmp_path / "models"
    repo.mkdir()
    r = subprocess.run([sys.executable, "-m", "attnserve.cli", *_local(svc["command"], repo, _free_port())],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=_env(svc, repo))
    assert r.returncode == 1
    assert "--require-gpu" in r.stderr and "CUDAExecutionProvider is not available" in r.stderr


def test_the_secure_service_serves_tls_and_tokens_from_its_compose_secrets(tiny_repo, tmp_path):
    """`docker compose --profile secure up`: the service's command, environment and healthcheck, with each compose
    secret's file standing where the container would see it (/run/secrets/<name> -> a local file)."""
    from .test_security import _ca, _leaf, _write

    compose = yaml.safe_load(COMPOSE.read_text())
    svc = compose["services"]["server-secure"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    ca = _ca("compose test CA")
    made = {"tls_ca": _write(secrets, "ca", ca)[0]}
    made["tls_cert"], made["tls_key"] = _write(secrets, "server", _leaf(ca, "localhost", server=True))
    (secrets / "auth").write_text("inference-token-compose-0123456789\n")
    (secrets / "admin").write_text("admin-token-compose-0123456789ab\n")
    made["auth_tokens"], made["admin_tokens"] = secrets / "auth", secrets / "admin"
    assert set(svc["secrets"]) == set(made) == set(compose["secrets"])
    port = _free_port()
    env = _env(svc, tiny_repo)
    for key, value in list(env.items()):
        if value.startswith("/run/secrets/"):
            env[key] = str(made[value.removeprefix("/run/secrets/")])
    proc = subprocess.Popen([sys.executable, "-m", "attnserve.cli", *_local(svc["command"], tiny_repo, port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        check = _local(svc["healthcheck"]["test"][1:], tiny_repo, port)
        check[0] = sys.executable if check[0] == "python" else check[0]
        for _ in range(120):
            if subprocess.run(check, capture_output=True, cwd=ROOT, env=env).returncode == 0:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            raise AssertionError("the secure service never became healthy over TLS")
        client = [sys.executable, "-m", "attnserve.cli", "predict", "abc", "--server", f"localhost:{port}",
                  "--tls-ca", str(made["tls_ca"])]
        denied = subprocess.run(client, capture_output=True, text=True, cwd=ROOT, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        token = tmp_path / "token"
        token.write_text("inference-token-compose-0123456789\n")
        ok = subprocess.run([*client, "--token-file", str(token)], capture_output=True, text=True, cwd=ROOT,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert ok.returncode == 0, ok.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _frames():
    import importlib.util

    spec = importlib.util.spec_from_file_location("frames", ROOT / "deploy" / "compose" / "grpc_health_frames.py")
    frames = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frames)
    return frames


def test_the_load_balancers_grpc_health_check_is_the_request_its_comment_describes():
    """haproxy.cfg sends raw HTTP/2 bytes: exactly what grpc_health_frames.py builds."""
    frames, cfg = _frames(), (ROOT / "deploy" / "compose" / "haproxy.cfg").read_text()
    assert f"tcp-check send-binary {frames.request().hex()}\n" in cfg
    assert f"tcp-check expect binary {frames.SERVING.hex()}\n" in cfg


def _answer(port: int, request: bytes, wanted: bytes, seconds: float = 3.0) -> bytes:
    """What a server sends back to the raw bytes (until `wanted` shows up or `seconds` pass)."""
    got, deadline = b"", time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as s:
        s.sendall(request)
        while wanted not in got and time.monotonic() < deadline:
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                break
            if not chunk:
                break
            got += chunk
    return got


def test_the_raw_health_check_gets_serving_from_a_ready_server_only(serving_repo, tmp_path):
    from .server_harness import start

    frames = _frames()
    ready, empty = start(serving_repo, ["tiny"]), start(tmp_path)  # the second has no model: NOT_SERVING
    try:
        assert frames.SERVING in _answer(ready.app.port, frames.request(), frames.SERVING)
        assert frames.SERVING not in _answer(empty.app.port, frames.request(), frames.SERVING)
    finally:
        ready.stop()
        empty.stop()
