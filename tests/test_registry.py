"""The model registry on a real repository: loads, swaps, falls back, unloads, and restarts a dead engine."""

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.api.validation import model_limits, resolve_params
from serving.domain import DecodeOptions, FinishEvent, Limits, TokenEvent
from serving.engine.engine import Engine, EngineConfig
from serving.engine.jobs import SequenceJob
from serving.engine.registry import ModelRegistry, RegistryConfig, ServedModel
from serving.engine.runner import RunnerConfig
from serving.errors import NotFound, Unavailable

from .server_harness import copy_version


@pytest.fixture
def repo(tiny_repo, tmp_path):
    """A private copy of the exported tiny model, as REPO/tiny/1, free to change."""
    shutil.copytree(tiny_repo / "tiny", tmp_path / "models" / "tiny")
    return tmp_path / "models"


def _run(repo, body: Callable[[ModelRegistry], Awaitable[None]]) -> None:
    """Run `body` on a fresh event loop with a registry of `repo`, closed afterwards."""
    async def main() -> None:
        with ThreadPoolExecutor(max_workers=2) as executor:
            registry = ModelRegistry(RegistryConfig(repo, restart_seconds=0.1), RunnerConfig(providers=("cpu",)),
                                     EngineConfig(), executor)
            try:
                await asyncio.wait_for(body(registry), timeout=30)
            finally:
                await registry.close()

    asyncio.run(main())


def _copy_version(repo, version: int, change: Callable[[dict], None] = lambda m: None):
    return copy_version(repo / "tiny", version, change)


def _job(served: ServedModel, text: str = "hello") -> SequenceJob:
    """A greedy request, built as serving.api.service builds one."""
    r = served.runner
    params = resolve_params(DecodeOptions(max_new_tokens=12), model_limits(Limits(), r.shape.max_len))
    return SequenceJob(source=r.tokenizer.encode(text), shape=r.shape, tokenizer=r.tokenizer, attention=None,
                       deadline=None, params=params)


async def _complete(engine: Engine, job: SequenceJob) -> list:
    engine.submit(job)
    return [ev async for ev in Engine.events(job)]


def _finished(events: list) -> FinishEvent:
    """The finish of a whole stream: tokens, then a FinishEvent whose text they add up to."""
    *tokens, finish = events
    assert all(isinstance(ev, TokenEvent) for ev in tokens) and isinstance(finish, FinishEvent)
    assert finish.text == "".join(ev.text for ev in tokens) and finish.generated_tokens == len(tokens)
    return finish


async def _until(condition: Callable[[], bool], seconds: float) -> float:
    """Wait for `condition`, polling; returns the seconds it took, fails past `seconds`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, "the condition did not come true in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_refresh_loads_version_1_and_then_finds_nothing_new(repo):
    async def body(registry: ModelRegistry) -> None:
        assert await registry.refresh() == ["tiny v1"]
        served = registry.get("tiny")
        assert served.runner.version == 1 and served.healthy
        assert registry.get("") is served and registry.get("tiny", 1) is served
        with pytest.raises(NotFound, match="version 2"):
            registry.get("tiny", 2)
        with pytest.raises(NotFound, match="'other'"):
            registry.get("other")
        assert await registry.refresh() == []
        assert registry.get("tiny") is served
        _finished(await _complete(served.engine, _job(served)))

    _run(repo, body)


def test_odd_folders_are_ignored(repo):
    model = repo / "tiny"
    for name in ("²", "99999999999999999999", "abc"):
        shutil.copytree(model / "1", model / name)  # a manifest inside: tempting, but not a version
    (model / "3").write_text("a file, not a folder")

    async def body(registry: ModelRegistry) -> None:
        assert await registry.refresh() == ["tiny v1"]
        assert registry.versions_on_disk("tiny") == [1]
        assert registry.get("tiny").runner.version == 1
        assert await registry.refresh() == []
        assert registry.failed == {}

    _run(repo, body)


def test_a_new_version_swaps_in_and_the_old_engine_drains(repo):
    async def body(registry: ModelRegistry) -> None:
        await registry.refresh()
        old = registry.get("tiny")
        _copy_version(repo, 2)
        job = _job(old)
        with old.engine._cv:  # the old engine cannot take the job before the swap: it is busy during it
            old.engine.submit(job)
            assert await registry.refresh() == ["tiny v2"]
            new = registry.get("tiny")
            assert new.runner.version == 2 and new.healthy and new.engine is not old.engine
            assert not old.engine.alive and not old.engine.stopped  # retired, still finishing its request
        on_v1 = _finished([ev async for ev in Engine.events(job)])  # the request finished on v1
        await _until(lambda: old.engine.stopped, 5)
        assert old.engine.stopped  # its thread ended once it was idle, no refresh needed
        with pytest.raises(Unavailable, match="unloaded"):
            old.engine.submit(_job(old))
        assert _finished(await _complete(new.engine, _job(new))).text == on_v1.text  # the same weights

    _run(repo, body)


def test_removing_the_new_version_serves_the_old_one_again(repo):
    async def body(registry: ModelRegistry) -> None:
        v2 = _copy_version(repo, 2)
        assert await registry.refresh() == ["tiny v2"]
        v2_engine = registry.get("tiny").engine
        shutil.rmtree(v2)
        assert await registry.refresh() == ["tiny v1"]
        served = registry.get("tiny")
        assert served.runner.version == 1 and served.healthy
        assert not v2_engine.alive
        _finished(await _complete(served.engine, _job(served)))

    _run(repo, body)


def test_removing_the_model_unloads_it(repo):
    async def body(registry: ModelRegistry) -> None:
        await registry.refresh()
        engine = registry.get("tiny").engine
        shutil.rmtree(repo / "tiny")
        assert await registry.refresh() == ["tiny v1 unloaded"]
        with pytest.raises(NotFound):
            registry.get("tiny")
        with pytest.raises(NotFound, match="no model is loaded"):
            registry.get("")
        assert registry.models == {} and not engine.alive

    _run(repo, body)


def test_a_version_pointing_outside_its_folder_is_not_loaded(repo):
    (repo / "x.onnx").write_bytes((repo / "tiny" / "1" / "decoder.onnx").read_bytes())  # where it points

    def escape(manifest: dict) -> None:
        manifest["graphs"]["decoder"]["file"] = "../../x.onnx"

    async def body(registry: ModelRegistry) -> None:
        await registry.refresh()
        served = registry.get("tiny")
        _copy_version(repo, 2, escape)
        assert await registry.refresh() == []
        why = registry.failed[("tiny", 2)][1]
        assert "containment" in why and "../../x.onnx" in why
        assert registry.get("tiny") is served and served.healthy
        _finished(await _complete(served.engine, _job(served)))
        assert await registry.refresh() == []  # unchanged on disk: not tried again, still v1

    _run(repo, body)


def test_a_fresh_registry_falls_back_past_a_version_it_cannot_load(repo):
    def escape(manifest: dict) -> None:
        manifest["tokenizer"] = "../../tokenizer.json"

    _copy_version(repo, 2, escape)

    async def body(registry: ModelRegistry) -> None:
        assert await registry.refresh() == ["tiny v1"]
        assert "containment" in registry.failed[("tiny", 2)][1]

    _run(repo, body)


def test_listeners_hear_every_change(repo):
    async def body(registry: ModelRegistry) -> None:
        calls = []
        registry.add_listener(lambda: calls.append(sorted((n, s.runner.version) for n, s in registry.models.items())))
        await registry.refresh()
        await registry.refresh()  # nothing changed: nobody is told
        assert calls == [[("tiny", 1)]]
        v2 = _copy_version(repo, 2)
        await registry.refresh()
        shutil.rmtree(v2)
        await registry.refresh()
        shutil.rmtree(repo / "tiny")
        await registry.refresh()
        assert calls == [[("tiny", 1)], [("tiny", 2)], [("tiny", 1)], []]

    _run(repo, body)


def test_a_dead_engine_fails_its_requests_and_is_restarted(repo, monkeypatch):
    async def body(registry: ModelRegistry) -> None:
        await registry.refresh()
        changes = []
        registry.add_listener(lambda: changes.append(registry.get("tiny").healthy))
        served = registry.get("tiny")
        dead = served.engine

        def broken_take(worker):
            raise RuntimeError("injected fault in the engine thread")

        monkeypatch.setattr(dead, "_take", broken_take)
        start = time.monotonic()
        with pytest.raises(Unavailable, match=r"engine failed \(RuntimeError\)"):
            await _complete(dead, _job(served))
        assert time.monotonic() - start < 1.0
        assert not served.healthy and served.engine is dead  # unhealthy at once, the restart still to come
        with pytest.raises(Unavailable, match="restarting"):
            dead.submit(_job(served))

        await _until(lambda: served.restarts == 1 and served.healthy, seconds=2.0)
        assert served.engine is not dead and not dead.alive
        _finished(await _complete(served.engine, _job(served)))
        assert changes == [False, True]  # told of the death, then of the restart

    _run(repo, body)
