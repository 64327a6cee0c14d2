"""Engines in processes of their own (the server's default): same answers as in-process engines, a killed
engine process fails only its requests and comes back, swaps end the old process, nothing is left behind."""

import asyncio
import os
import signal
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import AttnServeClient
from serving.engine.process import EngineProcess

from .server_harness import copy_version, start

TEXTS = ["abc", "hello", "qwertyui", "zz", "mnop", "abcdefgh"]


def _pid(server, model: str) -> int:
    engine = server.app.registry.get(model).engine
    assert isinstance(engine, EngineProcess)
    return engine.child.process.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie not yet reaped counts as gone
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _attention(response) -> dict:
    return {(a.kind, a.layer): np.asarray(a.weights) for a in response.attention}


def test_engine_processes_answer_exactly_as_engine_threads(serving_repo):
    threads, processes = start(serving_repo), start(serving_repo, engine_processes=True)
    try:
        with AttnServeClient(threads.address) as a, AttnServeClient(processes.address) as b:
            for text in TEXTS:
                for kw in ({}, {"beam_size": 3}, {"temperature": 0.8, "seed": 7}):
                    x = a.predict(text, model="noisy", attention="all", max_new_tokens=20, **kw)
                    y = b.predict(text, model="noisy", attention="all", max_new_tokens=20, **kw)
                    assert [t.id for t in x.tokens] == [t.id for t in y.tokens] and x.text == y.text
                    assert x.score == pytest.approx(y.score, abs=1e-5)
                    ax, ay = _attention(x), _attention(y)
                    assert ax.keys() == ay.keys() and len(ax) == 6
                    for key in ax:
                        np.testing.assert_allclose(ax[key], ay[key], atol=1e-6)
                sx = [m for m in a.generate(text, model="tiny", attention="cross", max_new_tokens=12)]
                sy = [m for m in b.generate(text, model="tiny", attention="cross", max_new_tokens=12)]
                assert [m.token.id for m in sx] == [m.token.id for m in sy]
                assert [m.finish.reason for m in sx] == [m.finish.reason for m in sy]
                for mx, my in zip(sx, sy, strict=True):
                    for tx, ty in zip(mx.attention, my.attention, strict=True):
                        np.testing.assert_allclose(tx.weights, ty.weights, atol=1e-6)
                ex, ey = a.encode(text, model="tiny"), b.encode(text, model="tiny")
                np.testing.assert_allclose(ex.static_embeddings.values, ey.static_embeddings.values, atol=1e-6)
    finally:
        threads.stop()
        processes.stop()


def test_a_killed_engine_process_fails_only_its_requests_and_comes_back(serving_repo):
    s = start(serving_repo, engine_processes=True, restart_seconds=0.3, max_new_tokens=250)
    ch = grpc.insecure_channel(s.address)
    health = health_pb2_grpc.HealthStub(ch)

    def status(service):
        return health.Check(health_pb2.HealthCheckRequest(service=service)).status

    try:
        with AttnServeClient(s.address) as c:
            victim, bystander = _pid(s, "noisy"), _pid(s, "tiny")
            stream = c.generate("abcdefgh", model="noisy", max_new_tokens=250, attention="all")
            assert next(stream).HasField("token")
            os.kill(victim, signal.SIGKILL)  # as the kernel's OOM killer or a fault in native code would
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                list(stream)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "engine failed" in e.value.details()
            assert "exited (code -9)" in e.value.details()
            assert time.monotonic() - t0 < 5
            assert c.predict("abc", model="tiny").text  # the other model's process never noticed
            assert _alive(bystander)
            deadline = time.monotonic() + 15
            while status("model/noisy") != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
                time.sleep(0.05)
            assert status("") == health_pb2.HealthCheckResponse.SERVING
            assert c.predict("abc", model="noisy").text
            assert s.app.registry.get("noisy").restarts == 1 and _pid(s, "noisy") != victim
            assert not _alive(victim)
    finally:
        ch.close()
        s.stop()


def test_a_swap_ends_the_old_engine_process_and_stop_leaves_none(tiny_repo, tmp_path):
    import shutil

    repo = tmp_path / "models"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    s = start(repo, engine_processes=True)
    try:
        with AttnServeClient(s.address) as c:
            old = _pid(s, "tiny")
            stream = c.generate("hello", model="tiny", max_new_tokens=30)
            assert next(stream).HasField("token")
            copy_version(repo / "tiny", 2)
            (bad := copy_version(repo / "tiny", 3)).joinpath("decoder.onnx").write_bytes(b"not a graph")
            assert [d.manifest.version for d in s.call(s.app.api.reload())] == [2]  # v3 fails its checksum, v2 serves
            assert "checksum" in s.app.registry.failed[("tiny", 3)][1] and bad.exists()
            rest = list(stream)  # the stream that started on v1 ends on v1
            assert rest[-1].HasField("finish")
            new = _pid(s, "tiny")
            assert new != old
            deadline = time.monotonic() + 10
            while _alive(old) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(old)
            assert c.predict("hello", model="tiny").model.version == 2
    finally:
        s.stop()
    assert not _alive(new)


def test_engine_processes_with_two_workers_answer_concurrent_streams_as_one_worker_does(serving_repo):
    from concurrent.futures import ThreadPoolExecutor

    one, two = start(serving_repo), start(serving_repo, engine_processes=True, engine_workers=2)
    try:
        with AttnServeClient(one.address) as a, AttnServeClient(two.address) as b:
            expected = {t: a.predict(t, model="noisy", attention="cross", max_new_tokens=20) for t in TEXTS}
            beams = {t: a.predict(t, model="noisy", beam_size=3, max_new_tokens=20) for t in TEXTS}

            def stream(text):
                return [m for m in b.generate(text, model="noisy", attention="cross", max_new_tokens=20)]

            with ThreadPoolExecutor(12) as pool:  # 12 streams at once: both workers hold some
                streamed = list(pool.map(stream, TEXTS * 2))
                beamed = list(pool.map(lambda t: b.predict(t, model="noisy", beam_size=3, max_new_tokens=20), TEXTS))
            for text, messages in zip(TEXTS * 2, streamed, strict=True):
                ref = expected[text]
                assert [m.token.id for m in messages if m.HasField("token")] == [t.id for t in ref.tokens]
                assert messages[-1].finish.text == ref.text
            for text, got in zip(TEXTS, beamed, strict=True):
                assert [t.id for t in got.tokens] == [t.id for t in beams[text].tokens]
        stats = two.app.registry.get("noisy").engine
        assert stats.steps > 0
    finally:
        one.stop()
        two.stop()


@pytest.fixture
def one_process(serving_repo):
    """A server with engine processes, its `tiny` engine and that engine's process id; stopped afterwards."""
    s = start(serving_repo, engine_processes=True)
    try:
        yield s, s.app.registry.get("tiny").engine, _pid(s, "tiny")
    finally:
        s.stop()


def test_a_job_spec_the_engine_process_cannot_rebuild_fails_that_job_alone(one_process):
    from serving.domain import DecodeParams
    from serving.engine.engine import Engine
    from serving.engine.jobs import SequenceJob
    from serving.errors import InternalError

    s, engine, pid = one_process
    runner = s.app.registry.get("tiny").runner

    async def submit_bad():
        job = SequenceJob([5, 6, 7], runner.manifest.model, runner.tokenizer, params=DecodeParams(max_new_tokens=5))
        job.spec = lambda: {"source": [5, 6, 7], "no_such_field": 1}  # what a mismatched child cannot take
        engine.submit(job)
        return [ev async for ev in Engine.events(job)]

    with pytest.raises(InternalError, match="error id [0-9a-f]{12}"):
        s.call(submit_bad())
    assert _alive(pid) and _pid(s, "tiny") == pid  # the same engine process, still serving
    with AttnServeClient(s.address) as c:
        assert len(c.predict("abc", model="tiny", max_new_tokens=5).tokens) > 0


def test_an_engine_process_that_does_not_get_ready_in_time_fails_the_load_and_is_stopped(tiny_repo):
    import multiprocessing as mp

    from serving.engine.engine import EngineConfig
    from serving.engine.process import ProcessModel
    from serving.engine.runner import ModelLoadError, RunnerConfig

    before = {p.pid for p in mp.active_children()}
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"did not load the version within 0.2 s \(--engine-start-seconds\)"):
        ProcessModel.load(tiny_repo / "tiny" / "1", RunnerConfig(providers=("cpu",)), EngineConfig(start_seconds=0.2))
    assert time.monotonic() - t0 < 10  # a spawned interpreter alone takes longer than 0.2 s to import its runtime
    assert {p.pid for p in mp.active_children()} <= before  # the late process was stopped, not left behind
    model = ProcessModel.load(tiny_repo / "tiny" / "1", RunnerConfig(providers=("cpu",)), EngineConfig())
    model.discard()


def test_a_stalled_engine_process_never_blocks_the_event_loop(one_process):
    """With the engine process stopped (SIGSTOP) its pipe fills; sending to it must not block the server's loop."""
    from serving.engine.messages import Cancel

    s, engine, pid = one_process
    os.kill(pid, signal.SIGSTOP)
    try:
        async def flood():
            t0 = time.monotonic()
            for i in range(20_000):  # ~0.5 MB of messages: far more than a pipe holds
                engine._send(Cancel(10**9 + i))
            return time.monotonic() - t0

        assert s.call(flood(), timeout=30) < 5.0
        assert s.call(asyncio.sleep(0, result="loop free"), timeout=5) == "loop free"
    finally:
        os.kill(pid, signal.SIGCONT)
    with AttnServeClient(s.address) as c:  # resumed, it reads the backlog and serves again
        assert len(c.predict("abc", model="tiny", max_new_tokens=5, timeout=60).tokens) > 0
