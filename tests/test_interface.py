"""The declared engine interface: both kinds of served model and engine follow it, and the registry drives either
through it alone."""

import asyncio

from serving.domain import DecodeParams, FinishEvent, TokenEvent
from serving.engine import interface
from serving.engine.engine import Engine, EngineConfig
from serving.engine.jobs import SequenceJob
from serving.engine.process import EngineProcess, ProcessModel
from serving.engine.runner import ModelRunner, RunnerConfig

CPU = RunnerConfig(providers=("cpu",))


def _answer(model, engine) -> list[int]:
    async def main():
        engine.start()
        job = engine.submit(SequenceJob(model.tokenizer.encode("hello"), model.shape, model.tokenizer,
                                        params=DecodeParams(max_new_tokens=8)))
        events = [ev async for ev in Engine.events(job)]
        await engine.close()
        return events

    events = asyncio.run(main())
    assert isinstance(events[-1], FinishEvent)
    return [e.id for e in events if isinstance(e, TokenEvent)]


def test_both_kinds_follow_the_protocols_and_answer_alike(tiny_repo):
    path = tiny_repo / "tiny" / "1"
    here = interface.load_version(path, CPU, EngineConfig(), processes=False)
    apart = interface.load_version(path, CPU, EngineConfig(), processes=True)
    assert isinstance(here, ModelRunner) and isinstance(apart, ProcessModel)
    engines = []
    for model in (here, apart):
        assert isinstance(model, interface.ServedVersion)
        assert (model.name, model.version, model.shape.eos_id) == ("tiny", 1, here.shape.eos_id)
        engine = Engine(model, EngineConfig()) if model is here else model.engine(None)
        assert isinstance(engine, interface.ServingEngine)
        engines.append(engine)
    assert isinstance(engines[1], EngineProcess)
    assert _answer(here, engines[0]) == _answer(apart, engines[1])
    interface.prepare_restart(apart)  # a process model readies a new process for its next engine ...
    interface.discard_prepared(apart)  # ... which it stops when that engine is not wanted
    interface.prepare_restart(here)  # an in-process model needs nothing
    assert apart._ready is None


def test_pipe_messages_are_typed_and_a_job_crosses_as_its_kind_and_spec(tiny_repo):
    import pickle

    import pytest

    from serving.engine.jobs import BeamJob, EncodeJob
    from serving.engine.messages import Events, JobKind, Stats, Submit, kind_of

    runner = ModelRunner(tiny_repo / "tiny" / "1", CPU)
    params = DecodeParams(max_new_tokens=5)
    jobs = [SequenceJob([5, 6], runner.shape, runner.tokenizer, params=params),
            BeamJob([5, 6], runner.shape, runner.tokenizer, params=params, beam_size=3),
            EncodeJob([5, 6], runner.shape, runner.tokenizer)]
    assert [kind_of(j) for j in jobs] == [JobKind.SEQUENCE, JobKind.BEAM, JobKind.ENCODE]
    for job in jobs:
        message = pickle.loads(pickle.dumps(Submit(7, kind_of(job), job.spec())))  # as it crosses the pipe
        again = message.rebuild(runner.shape, runner.tokenizer)
        assert type(again) is type(job) and again.spec() == job.spec()
    with pytest.raises(TypeError, match="not a job an engine process runs"):
        kind_of(object())
    with pytest.raises(TypeError):  # a spec with a field no job has: the engine process fails that job alone
        Submit(1, JobKind.SEQUENCE, {"source": [5], "bogus": 1}).rebuild(runner.shape, runner.tokenizer)
    events = pickle.loads(pickle.dumps(Events([(3, [])], Stats(steps=2, calls={"decoder": 4}))))
    assert events.stats.calls == {"decoder": 4} and events.batch == [(3, [])]
