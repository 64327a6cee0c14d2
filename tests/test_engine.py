"""The engine on its own: batched equals solo, arrivals share encoder passes, a failing job or run fails alone."""

import asyncio
import time

import numpy as np
import pytest

from serving.domain import DecodeParams, EncoderEvent, FinishEvent, TokenEvent
from serving.engine.engine import Engine, EngineClosed, EngineConfig
from serving.engine.jobs import BeamJob, EncodeJob, SequenceJob
from serving.engine.runner import ModelRunner, RunnerConfig
from serving.errors import DeadlineExceeded, InternalError, Unavailable

TEXTS = ["a", "hello", "qwertyui", "zz", "mnop", "abcdefg", "xyz", "b"]


@pytest.fixture(scope="module")
def runner(tiny_repo):
    r = ModelRunner(tiny_repo / "tiny" / "1", RunnerConfig(providers=("cpu",)))
    r.warm_up()
    return r


def _seq(runner, text, **params) -> SequenceJob:
    return SequenceJob(runner.tokenizer.encode(text), runner.shape, runner.tokenizer,
                       params=DecodeParams(max_new_tokens=params.pop("max_new_tokens", 20), **params))


async def _events(job) -> list:
    out = []
    try:
        async for ev in Engine.events(job):
            out.append(ev)
            if isinstance(ev, EncoderEvent) and isinstance(job, EncodeJob):
                break
    except Exception as e:  # the job's error, as the API would raise it
        out.append(e)
    return out


def _drive(runner, jobs_of, cfg=EngineConfig()):
    """Start an engine, submit what `jobs_of(engine)` returns all at once, return (events per job, engine)."""
    async def main():
        engine = Engine(runner, cfg)
        engine.start()
        try:
            jobs = jobs_of(engine)
            for job in jobs:
                engine.submit(job)
            return await asyncio.gather(*(_events(j) for j in jobs)), engine
        finally:
            await engine.close()

    return asyncio.run(main())


def _ids(events) -> list[int]:
    return [e.id for e in events if isinstance(e, TokenEvent)]


def test_jobs_stepped_together_get_their_solo_tokens(runner):
    solo = [_ids(_drive(runner, lambda e, t=t: [_seq(runner, t)])[0][0]) for t in TEXTS]
    together, engine = _drive(runner, lambda e: [_seq(runner, t) for t in TEXTS])
    assert [_ids(ev) for ev in together] == solo
    assert all(isinstance(ev[-1], FinishEvent) for ev in together)
    assert engine.steps < sum(len(s) + 1 for s in solo)  # shared decoder steps
    assert engine.encoder_passes == 1  # the arrivals were encoded in one padded pass


def test_beam_groups_share_steps_with_sequences(runner):
    beam = lambda: BeamJob(runner.tokenizer.encode("hello"), runner.shape, runner.tokenizer,  # noqa: E731
                           params=DecodeParams(max_new_tokens=20), beam_size=3)
    (alone,), solo_engine = _drive(runner, lambda e: [beam()])
    mixed, engine = _drive(runner, lambda e: [_seq(runner, "abc"), beam(), _seq(runner, "qwerty")])
    # all three arrived together and shared every decoder step: as many steps as the longest of them alone
    assert engine.steps == max(solo_engine.steps, len(_ids(mixed[0])) + 1, len(_ids(mixed[2])) + 1)
    assert _ids(mixed[1]) == _ids(alone) and mixed[1][-1].score == pytest.approx(alone[-1].score, abs=1e-5)
    assert mixed[1][-1].score is not None


def test_a_job_that_fails_in_its_output_fails_alone(runner):
    class Broken(SequenceJob):
        def stepped(self, step, first):
            if len(self.tokens) == 1:
                raise RuntimeError("output processing broke")
            return super().stepped(step, first)

    solo = [_ids(_drive(runner, lambda e, t=t: [_seq(runner, t)])[0][0]) for t in TEXTS[:4]]
    broken = Broken(runner.tokenizer.encode("hello"), runner.shape, runner.tokenizer,
                    params=DecodeParams(max_new_tokens=20))
    results, _ = _drive(runner, lambda e: [_seq(runner, t) for t in TEXTS[:2]] + [broken] +
                        [_seq(runner, t) for t in TEXTS[2:4]])
    failed = results[2][-1]  # logged once with its traceback; the client gets INTERNAL with the error id
    assert isinstance(failed, InternalError) and "RuntimeError" in str(failed) and "error id" in str(failed)
    assert [_ids(r) for i, r in enumerate(results) if i != 2] == solo


def test_a_batched_run_that_raises_is_retried_one_by_one(runner):
    """Only the request whose own run fails gets the error (here: any run with an 8-token source raises)."""
    run = runner.run_decoder

    def picky(feeds, attention, extras=None):
        if feeds["src_mask"].shape[1] == 8:
            raise ValueError("this source breaks the graph")
        return run(feeds, attention, extras)

    solo = [_ids(_drive(runner, lambda e, t=t: [_seq(runner, t)])[0][0]) for t in ("abc", "hello")]
    runner.run_decoder = picky
    try:
        results, _ = _drive(runner, lambda e: [_seq(runner, "abc"), _seq(runner, "qwertyui"), _seq(runner, "hello")])
    finally:
        del runner.run_decoder
    assert isinstance(results[1][-1], InternalError) and "ValueError" in str(results[1][-1])
    assert [_ids(results[0]), _ids(results[2])] == solo


def test_encode_jobs_are_batched_and_equal_solo(runner):
    def encode(text):
        return EncodeJob(runner.tokenizer.encode(text), runner.shape, runner.tokenizer)

    solo = [_drive(runner, lambda e, t=t: [encode(t)])[0][0][0] for t in TEXTS]
    together, engine = _drive(runner, lambda e: [encode(t) for t in TEXTS])
    assert engine.encoder_passes == 1 and engine.steps == 0
    for ev, ref in zip(together, solo, strict=True):
        np.testing.assert_allclose(ev[0].hidden_states, ref.hidden_states, atol=1e-5)
        np.testing.assert_array_equal(ev[0].embeddings, ref.embeddings)


def test_rows_budget_admits_in_order_and_a_wide_job_alone(runner):
    engine = Engine(runner, EngineConfig(max_batch=4))

    def job(width):
        if width == 1:
            return _seq(runner, "abc")
        return BeamJob([4], runner.shape, runner.tokenizer, params=DecodeParams(max_new_tokens=5), beam_size=width)

    engine.waiting.extend([job(3), job(1), job(1), job(8)])
    worker = engine._workers[0]
    first = engine._take(worker)
    assert [j.width for j in first] == [3, 1]  # 4 rows; the next one waits, order kept
    worker.active = first
    assert engine._take(worker) == []
    worker.active = []
    assert [j.width for j in engine._take(worker)] == [1]  # the 8-wide beam waits behind it
    assert [j.width for j in engine._take(worker)] == [8]  # then runs alone, wider than max_batch


def test_two_workers_each_take_their_share_of_the_waiting_rows(runner):
    engine = Engine(runner, EngineConfig(max_batch=32, workers=2))
    engine.waiting.extend(_seq(runner, "abc") for _ in range(10))
    first, second = engine._workers
    first.active = engine._take(first)
    assert len(first.active) == 5  # half of the 10 rows
    second.active = engine._take(second)
    assert len(second.active) == 5 and not engine.waiting
    engine.waiting.extend(_seq(runner, "abc") for _ in range(4))
    first.active = first.active[:1]  # four of its jobs finished: it takes the new ones
    assert len(engine._take(first)) == 4


def test_expired_jobs_get_deadline_exceeded_and_a_closed_engine_refuses(runner):
    async def main():
        engine = Engine(runner)
        engine.start()
        late = _seq(runner, "hello")
        late.deadline = time.monotonic() - 1
        engine.submit(late)
        events = await _events(late)
        await engine.close()
        with pytest.raises(Unavailable, match="unloaded"):
            engine.submit(_seq(runner, "abc"))
        return events

    events = asyncio.run(main())
    assert len(events) == 1 and isinstance(events[0], DeadlineExceeded)


def test_a_steady_batch_feeds_the_last_outputs_back_without_copying(runner):
    from serving.engine.feeds import Row, decoder_feeds

    enc = runner.run_encoder([runner.tokenizer.encode(t) for t in ("abc", "hello", "qwertyui")], False)
    rows = [Row.start(enc["cross_k"][:, i:i + 1, :, :n], enc["cross_v"][:, i:i + 1, :, :n], runner.bos_id)
            for i, n in enumerate((3, 5, 8))]
    further = np.ones((2, 1, 4, 2, 8), np.float32)  # (L, 1, nh, 2, hs): a row two steps further on
    rows[1] = Row(rows[1].cross_k, rows[1].cross_v, further, further, runner.bos_id)
    feeds, _ = decoder_feeds(rows)
    out = runner.run_decoder(feeds, False)
    for i, row in enumerate(rows):
        row.advance(out, i, 5)
    steady, _ = decoder_feeds(rows)
    assert steady["past_k"] is out["present_k"] and steady["past_v"] is out["present_v"]  # no copy at all

    def generic(rs):  # the same rows without their home: built by padding each cache
        return decoder_feeds([Row(r.cross_k, r.cross_v, r.past_k, r.past_v, r.next_token) for r in rs])[0]

    for subset in ([rows[0], rows[2]], [rows[2], rows[0], rows[1]]):  # the longest left; a reordering
        fed, _ = decoder_feeds(subset)
        ref = generic(subset)
        assert set(fed) == set(ref)
        for name in fed:  # per-layer caches are tuples of layers; the rest single arrays
            got, want = (v if isinstance(v, tuple) else (v,) for v in (fed[name], ref[name]))
            assert len(got) == len(want), name
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=name)


def test_an_engine_dying_mid_step_answers_every_job_it_holds(runner):
    """A fault escaping the per-job handling (here in the decoder step, after an encoder pass) kills the engine:
    what the step had produced still arrives, every unfinished job gets UNAVAILABLE, nothing hangs."""
    class Fault(BaseException):
        pass

    def broken(feeds, attention, extras=None):
        raise Fault("the session is gone")

    async def main():
        engine = Engine(runner)
        engine.start()
        runner.run_decoder = broken
        try:
            jobs = [_seq(runner, "hello"), EncodeJob([4, 5], runner.shape, runner.tokenizer), _seq(runner, "ab")]
            for job in jobs:
                engine.submit(job)
            results = await asyncio.wait_for(asyncio.gather(*(_events(j) for j in jobs)), 10)
            with pytest.raises(Unavailable, match="restarting"):
                engine.submit(_seq(runner, "abc"))
            return results, engine
        finally:
            del runner.run_decoder

    (first, encoded, last), engine = asyncio.run(main())
    assert isinstance(encoded[0], EncoderEvent)  # finished before the fault: delivered
    for events in (first, last):
        assert isinstance(events[-1], Unavailable) and "engine failed (Fault)" in str(events[-1])
    assert isinstance(engine.dead, Fault)


def test_a_retired_engine_finishes_what_it_holds_and_takes_nothing_new(runner):
    async def main():
        engine = Engine(runner)
        engine.start()
        job = engine.submit(_seq(runner, "hello"))
        engine.retire()
        with pytest.raises(EngineClosed):
            engine.submit(_seq(runner, "abc"))
        events = await asyncio.wait_for(_events(job), 10)
        await engine.close()
        return events, engine

    events, engine = asyncio.run(main())
    assert isinstance(events[-1], FinishEvent) and engine.stopped and engine.dead is None


def test_two_workers_split_the_jobs_and_each_job_gets_its_solo_tokens(runner):
    texts = TEXTS * 2
    solo = {t: _ids(_drive(runner, lambda e, t=t: [_seq(runner, t)])[0][0]) for t in TEXTS}
    beam = lambda: BeamJob(runner.tokenizer.encode("hello"), runner.shape, runner.tokenizer,  # noqa: E731
                           params=DecodeParams(max_new_tokens=20), beam_size=3)
    (beam_alone,), _ = _drive(runner, lambda e: [beam()])
    events, engine = _drive(runner, lambda e: [*(_seq(runner, t) for t in texts), beam()],
                            EngineConfig(max_batch=32, workers=2))
    assert [_ids(ev) for ev in events[:-1]] == [solo[t] for t in texts]
    assert _ids(events[-1]) == _ids(beam_alone)
    assert all(w.steps > 0 for w in engine._workers)  # both batches ran
    assert engine.load == 0 and engine.stopped


def test_a_dying_worker_fails_every_job_of_the_engine(runner, monkeypatch):
    async def main():
        engine = Engine(runner, EngineConfig(workers=2))
        engine.start()
        calls = {"n": 0}
        real = engine._iteration

        def dies_later(worker, new):
            calls["n"] += 1
            if calls["n"] > 3:  # no job of 4 or more characters can finish in 3 iterations
                raise SystemError("worker broke")
            real(worker, new)

        monkeypatch.setattr(engine, "_iteration", dies_later)
        jobs = [engine.submit(_seq(runner, t, max_new_tokens=200)) for t in TEXTS]
        results = await asyncio.wait_for(asyncio.gather(*(_events(j) for j in jobs)), 30)
        await engine.close()
        return results, engine

    results, engine = asyncio.run(main())
    assert all(isinstance(r[-1], Unavailable | FinishEvent) for r in results)  # none hangs
    assert all(isinstance(r[-1], Unavailable) for t, r in zip(TEXTS, results, strict=True) if len(t) >= 4)
    assert isinstance(engine.dead, SystemError) and engine.stopped
    with pytest.raises(Unavailable, match="restarting"):
        engine.submit(_seq(runner, "a"))


def test_an_engine_needs_a_worker(runner):
    with pytest.raises(ValueError, match="at least one worker"):
        Engine(runner, EngineConfig(workers=0))


def test_the_serve_flags_for_workers_threads_and_graphs_reach_the_config(capsys):
    from serving.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--engine-workers", "2", "--intra-op-threads", "1",
                                                      "--fast-graphs"]))
    assert cfg.engine_workers == 2 and cfg.runner.intra_op_threads == 1 and cfg.runner.fast_graphs
    default = config_from_args(build_parser().parse_args([]))
    assert default.engine_workers == 1 and not default.runner.fast_graphs
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--engine-workers", "0"])
    assert "must be 1 or more, got 0" in capsys.readouterr().err
