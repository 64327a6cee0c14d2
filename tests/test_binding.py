"""Decoder steps through IO binding (the path CUDA takes by default), exercised on CPU: the caches stay in the
OrtValues one step gave to the next, rows joining and leaving still work, and every answer equals run() on numpy."""

import numpy as np
import onnxruntime as ort
import pytest

from serving.domain import DecodeParams
from serving.engine.binding import ResidentSources
from serving.engine.engine import EngineConfig
from serving.engine.feeds import Row, decoder_feeds
from serving.engine.jobs import BeamJob
from serving.engine.runner import ModelRunner, RunnerConfig
from serving.errors import FailedPrecondition

from .test_engine import TEXTS, _drive, _ids, _seq


@pytest.fixture(scope="module")
def runners(tiny_repo) -> dict[str, ModelRunner]:
    return {mode: ModelRunner(tiny_repo / "tiny" / "1", RunnerConfig(providers=("cpu",), io_binding=mode))
            for mode in ("on", "off")}


def test_auto_binds_on_cuda_only_and_a_bad_mode_is_refused(tiny_repo, runners):
    assert runners["on"].bound and not runners["off"].bound
    auto = ModelRunner(tiny_repo / "tiny" / "1", RunnerConfig(providers=("cpu",)))
    assert auto.device == "cpu" and not auto.bound
    with pytest.raises(FailedPrecondition, match="io_binding 'always': use one of auto, on, off"):
        ModelRunner(tiny_repo / "tiny" / "1", RunnerConfig(providers=("cpu",), io_binding="always"))


def _rows(runner, texts):
    enc = runner.run_encoder([runner.tokenizer.encode(t) for t in texts], False)
    return [Row.start(enc["cross_k"][:, i:i + 1, :, :len(runner.tokenizer.encode(t))],
                      enc["cross_v"][:, i:i + 1, :, :len(runner.tokenizer.encode(t))], runner.bos_id)
            for i, t in enumerate(texts)]


def test_bound_steps_keep_the_caches_in_ortvalues_and_equal_numpy_steps(runners):
    """Three rows step together, one leaves, a new one joins: the same logits either way, and while the batch
    stays the same the bound runner feeds the last step's OrtValues back as they are."""
    rows = {mode: _rows(r, ("hello", "abc", "qwertyui")) for mode, r in runners.items()}
    for step in range(6):
        if step == 3:  # the middle row leaves and a new one joins: caches gathered on the host, then padded
            for mode, r in runners.items():
                rows[mode] = [rows[mode][0], rows[mode][2], *_rows(r, ("zz",))]
        out = {}
        for mode, r in runners.items():
            feeds, _ = decoder_feeds(rows[mode])
            if mode == "on" and step in (1, 2, 5):  # steady: no host copy, the same OrtValues
                assert feeds["past_k"] is rows[mode][0].home["present_k"]
            out[mode] = r.run_decoder(feeds, attention=step % 2 == 1)
        assert all(isinstance(v, ort.OrtValue) for v in out["on"]["present_k"] + out["on"]["present_v"])
        assert all(isinstance(v, np.ndarray) for v in out["off"]["present_k"])
        assert isinstance(out["on"]["logits"], np.ndarray)
        np.testing.assert_allclose(out["on"]["logits"], out["off"]["logits"], atol=1e-5)
        if step % 2:
            np.testing.assert_allclose(out["on"]["cross_attn"], out["off"]["cross_attn"], atol=1e-6)
        tokens = out["off"]["logits"].argmax(-1)
        for mode in runners:
            for i, row in enumerate(rows[mode]):
                row.advance(out[mode], i, int(tokens[i]))
    for on, off in zip(rows["on"], rows["off"], strict=True):  # a row's own cache, as views on the host
        for a, b in zip(on.past_k, off.past_k, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_engines_on_a_bound_runner_answer_as_on_numpy(runners):
    def jobs(runner):
        beam = BeamJob(runner.tokenizer.encode("hello"), runner.shape, runner.tokenizer,
                       params=DecodeParams(max_new_tokens=20), beam_size=3)
        return [*(_seq(runner, t) for t in TEXTS), beam]

    answers = {}
    copies, steps = runners["on"].resident.copies, runners["on"].calls["decoder"]
    for mode, runner in runners.items():
        events, _ = _drive(runner, lambda e, r=runner: jobs(r), EngineConfig(max_batch=32, workers=2))
        answers[mode] = [_ids(ev) for ev in events]
        assert all(ev[-1].reason for ev in events)  # every job finished
    assert answers["on"] == answers["off"]
    sent = (runners["on"].resident.copies - copies) // 2  # cross_k and cross_v count one each
    assert 1 <= sent < (runners["on"].calls["decoder"] - steps) / 2  # sources went by batch, not by step


def test_resident_sources_are_sent_once_per_object_and_bounded():
    resident = ResidentSources("cpu", keep=2)
    a, b, c = (np.full((2, 1, 4, 3, 8), v, np.float32) for v in (1, 2, 3))  # (L, 1, nh, S, hs)
    first = resident(a)
    assert resident(a) is first and resident.copies == 1  # the same object: the same device values
    assert len(first) == 2 and first[1].shape() == [1, 4, 3, 8]  # one per layer
    np.testing.assert_array_equal(first[0].numpy(), a[0])
    resident(b)
    resident(c)  # a goes: only two are kept
    assert resident(a) is not first and resident.copies == 4


def test_the_io_binding_flag_reaches_the_config(capsys):
    from serving.cli import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["--io-binding", "on"])).runner.io_binding == "on"
    assert config_from_args(build_parser().parse_args([])).runner.io_binding == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--io-binding", "yes"])
    assert "invalid choice: 'yes'" in capsys.readouterr().err
