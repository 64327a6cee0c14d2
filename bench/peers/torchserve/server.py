"""TorchServe for the peer benchmark: the model archive, the gRPC stubs from its jar, the server as a child
process (its whole process tree measured from /proc), and one translation checked."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))  # the figures are attnserve's bench's own: same records, same summary, same /proc

from bench.server_stats import tree  # noqa: E402

MODEL_DIR = ROOT / "models" / "dates" / "1"
MODEL_FILES = ("encoder.onnx", "decoder.onnx", "tokenizer.json", "manifest.json")
STORE, RUN, LOGS, STUBS = HERE / "model_store", HERE / "run", HERE / "logs", HERE / "stubs"
MODEL = "dates"
STREAMS_PER_CHANNEL = 32  # each channel its own TCP connection (local subchannel pool), as separate users' are
CHECK_TEXT, CHECK_EXPECTED = "July 4, 1976", "1976-07-04"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------- archive
def model_config(args: argparse.Namespace) -> str:
    return (f"minWorkers: {args.workers}\nmaxWorkers: {args.workers}\nbatchSize: {args.batch_size}\n"
            f"maxBatchDelay: {args.max_batch_delay_ms}\nresponseTimeout: 120\ndeviceType: cpu\n")


def build_archive(args: argparse.Namespace) -> Path:
    """model_store/dates.mar, rebuilt when the handler or the model settings it packs differ from the wanted."""
    RUN.mkdir(parents=True, exist_ok=True)
    STORE.mkdir(parents=True, exist_ok=True)
    config = RUN / "model-config.yaml"
    config.write_text(model_config(args))
    mar = STORE / f"{MODEL}.mar"
    wanted = {"handler.py": (HERE / "handler.py").read_bytes(), "model-config.yaml": config.read_bytes()}
    if mar.exists():
        with zipfile.ZipFile(mar) as z:
            names = set(z.namelist())
            if all(n in names and z.read(n) == b for n, b in wanted.items()):
                return mar
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    subprocess.run([str(archiver), "--model-name", MODEL, "--version", "1", "--handler", str(HERE / "handler.py"),
                    "--extra-files", ",".join(str(MODEL_DIR / f) for f in MODEL_FILES),
                    "--config-file", str(config), "--export-path", str(STORE), "--force"], check=True)
    print(f"built {mar.relative_to(ROOT)} ({model_config(args).strip().replace(chr(10), ', ')})", flush=True)
    return mar


# ---------------------------------------------------------------------------------------------- gRPC stubs
def load_stubs():
    """inference_pb2 / _grpc, generated from the protos inside TorchServe's frontend jar."""
    import ts

    if not (STUBS / "inference_pb2_grpc.py").exists():
        import grpc_tools
        from grpc_tools import protoc

        jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
        protos = STUBS / "proto"
        with zipfile.ZipFile(jar) as z:
            for name in ("proto/inference.proto", "google/rpc/status.proto"):
                target = protos / name.removeprefix("proto/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
        include = Path(grpc_tools.__file__).parent / "_proto"
        for proto, grpc_out in (("google/rpc/status.proto", False), ("inference.proto", True)):
            cmd = ["protoc", f"-I{protos}", f"-I{include}", f"--python_out={STUBS}", str(protos / proto)]
            if grpc_out:
                cmd.insert(-1, f"--grpc_python_out={STUBS}")
            if protoc.main(cmd) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
    if str(STUBS) not in sys.path:
        sys.path.insert(0, str(STUBS))
    import inference_pb2
    import inference_pb2_grpc

    return inference_pb2, inference_pb2_grpc


def request_of(pb, text: str, max_new_tokens: int):
    body = json.dumps({"text": text, "max_new_tokens": max_new_tokens}).encode()
    return pb.PredictionsRequest(model_name=MODEL, input={"data": body})


# ---------------------------------------------------------------------------------------------- the server
def tree_cpu(root: int) -> dict[int, float]:
    """utime + stime (seconds) of every process of the tree."""
    out = {}
    for pid in tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)
    return out


def tree_rss_mib(root: int) -> float:
    total = 0
    for pid in tree(root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total / 2**20


def identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time) of a running process, None once it is gone (or a zombie): a reused pid is another one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (pid, int(fields[19]))


def alive(ident: tuple[int, int]) -> bool:
    return identity(ident[0]) == ident


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bin = Path(sys.executable).parent
        self.env = {**os.environ, "TMPDIR": str(RUN / "tmp"), "TEMP": str(RUN / "tmp"), "LOG_LOCATION": str(LOGS),
                    "METRICS_LOCATION": str(LOGS)}  # its pid file, sockets and unpacked archive stay in run/
        self.proc: subprocess.Popen | None = None
        self.pids: set[tuple[int, int]] = set()  # identities of the tree's processes

    @property
    def pid(self) -> int:
        return self.proc.pid

    def write_config(self) -> Path:
        a = self.args
        overrides = {"inference_address": f"http://127.0.0.1:{a.http_port}",
                     "management_address": f"http://127.0.0.1:{a.http_port + 1}",
                     "metrics_address": f"http://127.0.0.1:{a.http_port + 2}",
                     "grpc_inference_port": str(a.grpc_port), "grpc_management_port": str(a.grpc_port + 1)}
        lines = []
        for line in (HERE / "config.properties").read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            lines.append(f"{key}={overrides.pop(key)}" if key in overrides else line)
        lines += [f"{k}={v}" for k, v in overrides.items()]
        path = RUN / "config.properties"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> None:
        a = self.args
        busy = [p for p in (a.grpc_port, a.grpc_port + 1, a.http_port, a.http_port + 1, a.http_port + 2)
                if not port_free(p)]
        if busy:
            raise SystemExit(f"ports {busy} are in use: pick others with --grpc-port / --http-port")
        (RUN / "tmp").mkdir(parents=True, exist_ok=True)
        LOGS.mkdir(parents=True, exist_ok=True)
        for old in LOGS.glob("*.log*"):  # one run's logs at a time
            old.unlink()
        config = self.write_config()
        console = open(LOGS / "console.log", "wb")  # noqa: SIM115 -- the child holds it for its whole life
        self.proc = subprocess.Popen(
            [str(self.bin / "torchserve"), "--start", "--foreground", "--ncs", "--model-store", str(STORE),
             "--ts-config", str(config), "--models", f"{MODEL}={MODEL}.mar",
             *([] if a.default_logging else ["--log-config", str(HERE / "log4j2.xml")])],
            cwd=RUN, env=self.env, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        console.close()

    def tree(self) -> set[tuple[int, int]]:
        return {i for i in map(identity, tree(self.pid)) if i is not None}

    def describe(self) -> dict | None:
        url = f"http://127.0.0.1:{self.args.http_port + 1}/models/{MODEL}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return json.loads(r.read())[0]
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def wait_ready(self, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited ({self.proc.returncode}); see {LOGS / 'console.log'}")
            d = self.describe()
            if d and sum(w.get("status") == "READY" for w in d.get("workers", [])) >= self.args.workers:
                self.pids = self.tree()
                return d
            time.sleep(0.5)
        raise RuntimeError(f"the model's workers were not ready after {timeout:.0f} s; see {LOGS}")

    def stop(self) -> list[int]:
        """torchserve --stop, then wait for the whole tree to go; returns pids that had to be killed."""
        if self.proc is None:
            return []
        self.pids |= self.tree()
        subprocess.run([str(self.bin / "torchserve"), "--stop"], cwd=RUN, env=self.env, capture_output=True,
                       timeout=90)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        killed = []
        for sig in (None, signal.SIGTERM, signal.SIGKILL):  # a grace period, then only the tree this script started
            deadline = time.monotonic() + (20.0 if sig is None else 5.0)
            for ident in [i for i in self.pids if alive(i)] if sig is not None else []:
                try:
                    os.kill(ident[0], sig)
                    killed.append(ident[0])
                except ProcessLookupError:
                    pass
            while any(alive(i) for i in self.pids) and time.monotonic() < deadline:
                time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        return sorted(set(killed))


def check_translation(args: argparse.Namespace) -> dict:
    import grpc

    pb, pb_grpc = load_stubs()
    with grpc.insecure_channel(f"127.0.0.1:{args.grpc_port}") as channel:
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        messages = [json.loads(m.prediction) for m in stub.StreamPredictions(request_of(pb, CHECK_TEXT, 32),
                                                                              timeout=30)]
    streamed = "".join(m["token"] for m in messages if "token" in m)
    final = messages[-1] if messages else {}
    ok = streamed == CHECK_EXPECTED and final.get("text") == CHECK_EXPECTED
    return {"text": CHECK_TEXT, "streamed": streamed, "final": final, "messages": len(messages), "ok": ok}


