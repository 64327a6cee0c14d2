"""Server lifecycle: health on load and shutdown, new versions swapped in, broken versions kept out."""

import asyncio
import shutil
import time

import grpc
import pytest

from serving.client import AttnServeClient

from .server_harness import admin_access, copy_version, start


def test_health_flips_on_load_and_on_shutdown(tiny_repo, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = tmp_path / "models"
    repo.mkdir()
    security, admin = admin_access(tmp_path)
    s = start(repo, drain_seconds=1.0, security=security)
    ch = grpc.insecure_channel(s.address)
    health = health_pb2_grpc.HealthStub(ch)

    def status(service="attnserve.v1.AttnServeService"):
        return health.Check(health_pb2.HealthCheckRequest(service=service)).status

    try:
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert status("liveness") == health_pb2.HealthCheckResponse.SERVING  # alive, waiting for a model
        shutil.copytree(tiny_repo / "tiny", repo / "tiny")
        with AttnServeClient(s.address, connection=admin) as c:
            assert [m.name for m in c.reload().models] == ["tiny"]
            assert status() == health_pb2.HealthCheckResponse.SERVING
            stream = c.generate("hello", max_new_tokens=30)
            first = next(stream)
            fut = asyncio.run_coroutine_threadsafe(s.app.stop(grace=5), s.loop)
            time.sleep(0.3)
            assert status() == status("liveness") == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                c.predict("abc")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(stream)  # the stream in flight still finishes
            assert first.HasField("token") and rest[-1].HasField("finish")
            fut.result(10)
    finally:
        ch.close()
        s.stop()


def test_new_version_is_picked_up_while_a_stream_runs(tiny_repo, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    s = start(repo, poll_seconds=0.2)
    try:
        with AttnServeClient(s.address) as c:
            stream = c.generate("hello", max_new_tokens=30)
            first = next(stream)
            staging = copy_version(repo / "tiny", 2, folder=repo / "tiny" / ".staging-2")
            staging.rename(repo / "tiny" / "2")
            rest = list(stream)
            assert first.token.index == 0 and rest[-1].finish.model.version == 1
            deadline = time.monotonic() + 10
            while c.list_models().models[0].version != 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert c.list_models().models[0].version == 2
            assert c.predict("hello").model.version == 2
    finally:
        s.stop()


def test_a_broken_new_version_leaves_the_old_one_serving(tiny_repo, tmp_path):
    from serving.engine.runner import ModelLoadError, ModelRunner, RunnerConfig

    repo = tmp_path / "models"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    security, admin = admin_access(tmp_path)
    s = start(repo, security=security)
    try:
        v2 = repo / "tiny" / "2"
        shutil.copytree(repo / "tiny" / "1", v2)
        with pytest.raises(ModelLoadError, match="manifest says version 1 but the folder is 2"):
            ModelRunner(v2, RunnerConfig(providers=("cpu",)))
        shutil.rmtree(v2)
        copy_version(repo / "tiny", 2)  # the same files, its manifest saying version 2
        (v2 / "decoder.onnx").write_bytes(b"truncated")
        with AttnServeClient(s.address, connection=admin) as c:
            assert [(m.name, m.version) for m in c.reload().models] == [("tiny", 1)]
            assert c.predict("abc").model.version == 1
            assert "sha256" in s.app.registry.failed[("tiny", 2)][1]
            shutil.copy(repo / "tiny" / "1" / "decoder.onnx", v2 / "decoder.onnx")  # the slow copy completes
            assert [(m.name, m.version) for m in c.reload().models] == [("tiny", 2)]
    finally:
        s.stop()


def test_a_fresh_server_falls_back_to_the_newest_loadable_version(tiny_repo, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    v2 = copy_version(repo / "tiny", 2)
    (v2 / "encoder.onnx").write_bytes(b"")
    s = start(repo)
    try:
        with AttnServeClient(s.address) as c:
            assert c.predict("abc").model.version == 1
    finally:
        s.stop()
