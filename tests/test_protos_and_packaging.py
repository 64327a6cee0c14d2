"""Generated stubs are current; serving runs where torch cannot be imported; the command line dispatches."""

import filecmp
import os
import subprocess
import sys
import textwrap

import pytest

from .conftest import ROOT


def test_generated_code_is_current(tmp_path):
    from protos.generate import generate

    out = tmp_path / "protos"
    generated = generate(out)
    assert generated
    for path in generated:
        name = path.relative_to(out).as_posix()
        committed = ROOT / "protos" / name
        assert committed.exists(), f"{name} is not committed: run python -m protos.generate"
        assert filecmp.cmp(path, committed, shallow=False), f"{name} is stale: run python -m protos.generate"


def test_serving_runs_where_torch_cannot_be_imported(serving_repo):
    script = textwrap.dedent(f"""
        import asyncio, sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "model_src", "export"):
                    raise ImportError(f"{{name}} is blocked in this process")
                return None

        sys.meta_path.insert(0, NoTorch())
        from serving.frontends.server import ServerConfig, create_server
        from serving.client import AttnServeClient
        import serving.cli, serving.client.cli, serving.client.plot

        async def main():
            app = await create_server(ServerConfig(repo={str(serving_repo)!r}, address="127.0.0.1:0",
                                                   metrics_port=None, poll_seconds=0, drain_seconds=0))
            def call():
                with AttnServeClient(f"127.0.0.1:{{app.port}}") as c:
                    return c.predict("abc", model="tiny", attention="cross").text
            text = await asyncio.get_running_loop().run_in_executor(None, call)
            await app.stop(0)
            assert "torch" not in sys.modules
            print("OK", text)

        asyncio.run(main())
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("OK")


def test_cli_lists_commands_and_rejects_unknown_ones():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "attnserve.cli", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "serve" in ok.stdout and "export" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "attnserve.cli", "fly"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown command 'fly'" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("protobuf", ["6.31.1", "7.36.2"])
def test_the_stubs_load_on_the_oldest_and_newest_protobuf_allowed(protobuf, tmp_path):
    """pyproject allows protobuf 6.31.1 up to 7.x (so tritonclient[grpc], which needs < 7, installs beside
    attnserve): the stubs load and round-trip a message on both ends of that range, each installed on its own."""
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          f"protobuf=={protobuf}"], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    code = textwrap.dedent("""
        import google.protobuf, warnings
        warnings.simplefilter("error")  # a gencode/runtime version warning fails the test too
        from protos.attnserve.v1 import attnserve_pb2 as pb
        req = pb.GenerateRequest(source=pb.Source(text="July 4, 1976"), attention=pb.AttentionRequest(layers=[1]))
        assert pb.GenerateRequest.FromString(req.SerializeToString()) == req
        print(google.protobuf.__version__)
    """)
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{ROOT}"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [protobuf]


def test_tritonclient_installs_and_imports_beside_attnserve():
    """The dev environment holds both (pip resolved them together); both import in one process."""
    from importlib import metadata

    import tritonclient.grpc as triton

    import serving.client  # noqa: F401
    from protos.attnserve.v1 import attnserve_pb2  # noqa: F401

    assert tuple(int(x) for x in metadata.version("tritonclient").split(".")[:2]) >= (2, 73)
    assert callable(triton.InferenceServerClient.infer) and callable(triton.InferInput.set_data_from_numpy)


def _buf() -> str:
    """buf from npm (@bufbuild/buf), installed once under build/tools (ignored by git)."""
    import shutil

    found = os.environ.get("BUF") or shutil.which("buf")
    if found:
        return found
    tools = ROOT / "build" / "tools"
    buf = tools / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        npm = shutil.which("npm")
        if npm is None and os.geteuid() == 0 and shutil.which("apt-get"):  # a fresh Debian machine: Node's npm
            subprocess.run(["apt-get", "install", "-y", "-qq", "npm"], capture_output=True, timeout=900,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            npm = shutil.which("npm")
        assert npm, "buf lint needs buf: install Node's npm (it fetches @bufbuild/buf) or set BUF"
        done = subprocess.run([npm, "install", "--silent", "--prefix", str(tools), "@bufbuild/buf"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    return str(buf)


def test_the_wire_contract_passes_buf_lint():
    """attnserve.v1 under buf's STANDARD rules (enum prefixes and _UNSPECIFIED zeros, one response type per RPC,
    the Service suffix, the package's folder); protos/buf.yaml exempts only the Open Inference Protocol's file."""
    done = subprocess.run([_buf(), "lint"], cwd=ROOT / "protos", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    # and the check is real: a lint violation in a copy is found
    bad = (ROOT / "protos" / "attnserve" / "v1" / "attnserve.proto").read_text().replace(
        "ATTENTION_KIND_UNSPECIFIED = 0", "ATTENTION_NONE = 0")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "attnserve" / "v1").mkdir(parents=True)
        (Path(tmp) / "attnserve" / "v1" / "attnserve.proto").write_text(bad)
        (Path(tmp) / "buf.yaml").write_text((ROOT / "protos" / "buf.yaml").read_text())
        done = subprocess.run([_buf(), "lint"], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "ATTENTION_NONE" in done.stdout
