"""The model runner on the tiny exported model, and the graph feeds it builds: padded batches equal rows alone."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest

from model_repository import DECODER_INPUTS, GRAPH_NAMES, MANIFEST, open_version, sha256_file
from serving.engine.feeds import Row, decoder_feeds, encoder_feeds
from serving.engine.runner import ModelLoadError, ModelRunner, RunnerConfig

CPU = RunnerConfig(providers=("cpu",))
TEXTS = ("ab", "hello", "qwertyu")  # three source lengths: 2, 5, 7


@pytest.fixture(scope="module")
def runner(tiny_repo) -> ModelRunner:
    return ModelRunner(tiny_repo / "tiny" / "1", CPU)


@pytest.fixture(scope="module")
def sources(runner) -> list[list[int]]:
    return [runner.tokenizer.encode(t) for t in TEXTS]


def _alone(runner: ModelRunner, source: list[int]) -> Row:
    enc = runner.run_encoder([source], attention=False)
    return Row.start(enc["cross_k"], enc["cross_v"], runner.bos_id)


def _step(runner: ModelRunner, rows: list[Row], attention: bool = False) -> tuple[dict[str, np.ndarray], int]:
    feeds, P = decoder_feeds(rows, runner.decoder_inputs(attention))
    return runner.run_decoder(feeds, attention), P


def _advance(row: Row, out: dict[str, np.ndarray], i: int, P: int) -> None:
    """Row i of a step becomes `row`'s cache; it feeds its greedy token next."""
    offset = P - row.past
    row.past_k = out["present_k"][:, i:i + 1, :, offset:]  # (L, 1, nh, past + 1, hs)
    row.past_v = out["present_v"][:, i:i + 1, :, offset:]
    row.next_token = int(np.argmax(out["logits"][i]))


def test_runner_loads_on_cpu_with_the_manifests_graph_names(runner, tiny_repo):
    manifest = open_version(tiny_repo / "tiny" / "1")
    assert runner.providers == ("CPUExecutionProvider",)
    assert (runner.name, runner.version) == ("tiny", 1)
    assert (runner.bos_id, runner.eos_id) == (manifest.model.bos_id, manifest.model.eos_id)
    assert set(runner.inputs) == set(runner.outputs) == set(GRAPH_NAMES)
    for graph in GRAPH_NAMES:
        assert runner.inputs[graph] == manifest.graphs[graph].input_names()
        assert runner.outputs[graph] == manifest.graphs[graph].output_names()
    assert runner.decoder_inputs(False) == runner.inputs["decoder"]
    assert runner.decoder_inputs(True) == runner.inputs["decoder_attn"]


def test_encoder_feeds_right_pad_and_build_only_the_names_given():
    feeds = encoder_feeds([[5, 6], [7, 8, 9], [4]], ("src_ids", "src_mask"))
    np.testing.assert_array_equal(feeds["src_ids"], [[5, 6, 0], [7, 8, 9], [4, 0, 0]])
    np.testing.assert_array_equal(feeds["src_mask"], [[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert feeds["src_ids"].dtype == np.int64 and feeds["src_mask"].dtype == bool
    assert list(encoder_feeds([[5]], ("src_mask",))) == ["src_mask"]


@pytest.mark.parametrize("attention", [False, True])
def test_a_padded_encoder_batch_equals_each_source_alone(runner, sources, attention):
    batch = runner.run_encoder(sources, attention)
    S = max(len(s) for s in sources)
    assert batch["cross_k"].shape[1] == 3 and batch["cross_k"].shape[3] == S  # (L, B, nh, S, hs)
    for i, src in enumerate(sources):
        alone = runner.run_encoder([src], attention)
        n = len(src)
        for name in ("cross_k", "cross_v"):
            np.testing.assert_allclose(batch[name][:, i, :, :n], alone[name][:, 0], atol=1e-5)
        if attention:
            np.testing.assert_allclose(batch["enc_self_attn"][:, i, :, :n, :n], alone["enc_self_attn"][:, 0],
                                       atol=1e-5)
            assert np.all(batch["enc_self_attn"][:, i, :, :n, n:] < 1e-6)  # no weight on padding


def _synthetic_row(L: int, src_len: int, past: int, value: float, token: int) -> Row:
    cross = np.full((L, 1, 1, src_len, 2), value, np.float32)  # (L, 1, nh=1, S, hs=2)
    cache = np.arange(L * past * 2, dtype=np.float32).reshape(L, 1, 1, past, 2) + value  # (L, 1, 1, P, 2)
    return Row(cross, -cross, cache, -cache, token)


def test_decoder_feeds_left_pad_caches_and_right_pad_sources():
    rows = [_synthetic_row(2, 2, 0, 1.0, 11), _synthetic_row(2, 4, 2, 2.0, 12), _synthetic_row(2, 3, 3, 3.0, 13)]
    feeds, P = decoder_feeds(rows, DECODER_INPUTS)
    assert P == 3
    assert set(feeds) == set(DECODER_INPUTS)
    np.testing.assert_array_equal(feeds["input_ids"], [11, 12, 13])
    np.testing.assert_array_equal(feeds["positions"], [0, 2, 3])
    np.testing.assert_array_equal(feeds["self_mask"], [[0, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(feeds["src_mask"], [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    assert feeds["past_k"].shape == (2, 3, 1, 3, 2) and feeds["cross_k"].shape == (2, 3, 1, 4, 2)
    for i, r in enumerate(rows):
        pad = P - r.past
        np.testing.assert_array_equal(feeds["past_k"][:, i, :, pad:], r.past_k[:, 0])
        np.testing.assert_array_equal(feeds["past_v"][:, i, :, pad:], r.past_v[:, 0])
        assert not feeds["past_k"][:, i, :, :pad].any()
        np.testing.assert_array_equal(feeds["cross_k"][:, i, :, :r.src_len], r.cross_k[:, 0])
        np.testing.assert_array_equal(feeds["cross_v"][:, i, :, :r.src_len], r.cross_v[:, 0])
        assert not feeds["cross_k"][:, i, :, r.src_len:].any()
    assert feeds["input_ids"].dtype == feeds["positions"].dtype == np.int64
    assert feeds["self_mask"].dtype == feeds["src_mask"].dtype == bool


def test_decoder_feeds_build_only_the_names_given():
    rows = [_synthetic_row(1, 2, 1, 1.0, 5), _synthetic_row(1, 3, 0, 2.0, 6)]
    feeds, P = decoder_feeds(rows, ("input_ids", "src_mask"))
    assert list(feeds) == ["input_ids", "src_mask"] and P == 1
    single, P = decoder_feeds(rows[:1], ("positions", "self_mask"))
    assert list(single) == ["positions", "self_mask"] and P == 1


def test_one_row_goes_in_as_it_is():
    row = _synthetic_row(2, 3, 2, 1.0, 7)
    feeds, P = decoder_feeds([row], DECODER_INPUTS)
    assert P == 2
    assert feeds["past_k"] is row.past_k and feeds["cross_v"] is row.cross_v  # no copy
    np.testing.assert_array_equal(feeds["positions"], [2])
    np.testing.assert_array_equal(feeds["self_mask"], [[1, 1, 1]])
    np.testing.assert_array_equal(feeds["src_mask"], [[1, 1, 1]])
    np.testing.assert_array_equal(feeds["input_ids"], [7])


@pytest.mark.parametrize("attention", [False, True])
def test_a_decoder_step_for_three_rows_equals_each_row_alone(runner, sources, attention):
    rows = [_alone(runner, s) for s in sources]
    for row, steps in zip(rows, (0, 2, 4), strict=True):  # different past lengths, decoded alone
        for _ in range(steps):
            out, P = _step(runner, [row])
            _advance(row, out, 0, P)
    assert [r.past for r in rows] == [0, 2, 4]
    alone = [_step(runner, [r], attention)[0] for r in rows]
    batch, P = _step(runner, rows, attention)
    for i, (row, ref) in enumerate(zip(rows, alone, strict=True)):
        np.testing.assert_allclose(batch["logits"][i], ref["logits"][0], atol=1e-4)
        pad = P - row.past
        np.testing.assert_allclose(batch["present_k"][:, i, :, pad:], ref["present_k"][:, 0], atol=1e-4)
        if attention:
            np.testing.assert_allclose(batch["cross_attn"][:, i, :, :, :row.src_len], ref["cross_attn"][:, 0],
                                       atol=1e-5)
            np.testing.assert_allclose(batch["dec_self_attn"][:, i, :, :, pad:], ref["dec_self_attn"][:, 0],
                                       atol=1e-5)


@pytest.mark.parametrize(("graph", "cfg"), [("decoder_attn", CPU),
                                             ("decoder", RunnerConfig(providers=("cpu",), fast_graphs=True))])
def test_a_graph_with_an_input_the_server_cannot_feed_is_refused(tiny_repo, tmp_path, graph, cfg):
    folder = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_repo / "tiny" / "1", folder)
    proto = onnx.load(folder / f"{graph}.onnx")
    proto.graph.input.append(onnx.helper.make_tensor_value_info("mystery", onnx.TensorProto.FLOAT, [1]))
    onnx.save(proto, folder / f"{graph}.onnx")
    with pytest.raises(ModelLoadError, match="checksum"):  # the repository's own rule comes first
        ModelRunner(folder, cfg)

    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][f"{graph}.onnx"] = sha256_file(folder / f"{graph}.onnx")
    manifest["graphs"][graph]["inputs"].append({"name": "mystery", "dtype": "float32", "shape": [1]})
    (folder / MANIFEST).write_text(json.dumps(manifest))
    open_version(folder)  # the repository now finds nothing wrong: only the runner's check can refuse it
    with pytest.raises(ModelLoadError, match=rf"{graph}\.onnx: inputs \['mystery'\] are not ones this server can feed"):
        ModelRunner(folder, cfg)


def test_calls_are_counted_per_graph(tiny_repo, sources):
    runner = ModelRunner(tiny_repo / "tiny" / "1", CPU)
    assert runner.calls == Counter()
    runner.run_encoder(sources, attention=False)
    runner.run_encoder(sources[:1], attention=False)
    enc = runner.run_encoder(sources[:1], attention=True)
    row = Row.start(enc["cross_k"], enc["cross_v"], runner.bos_id)
    runner.run_decoder(decoder_feeds([row], runner.decoder_inputs(False))[0], attention=False)
    assert runner.calls == Counter({"encoder": 2, "encoder_attn": 1, "decoder": 1})
    runner.warm_up()
    assert runner.calls == Counter({"encoder": 3, "encoder_attn": 2, "decoder": 2, "decoder_attn": 1})


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_incremental_detokenizing_equals_decoding_the_whole_output(kind):
    from model_src.tokenizer import BPETokenizer, CharTokenizer
    from serving.engine.tokenizer import ServingTokenizer

    texts = ["the cat sat on the mat", "a dog, a log; 3 mars 2021", "über straße"] * 20
    made = CharTokenizer.from_texts(texts) if kind == "char" else BPETokenizer.from_texts(texts, vocab_size=120)
    tok = ServingTokenizer(made.to_dict())
    for text in texts[:3]:
        ids = [1, *tok.encode(text), 2, 3]  # specials (bos, eos, unk) add no text
        built = ""
        for n in range(1, len(ids) + 1):
            built = tok.extend(built, ids[:n])
            assert built == tok.decode(ids[:n])


def test_a_session_that_did_not_get_cuda_is_refused_by_name_when_a_gpu_is_required(tmp_path):
    from serving.engine.runner import check_providers

    asked = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ModelLoadError, match=r"--require-gpu: the decoder_attn session .*d\.onnx.* runs on "
                                             r"\['CPUExecutionProvider'\]"):
        check_providers("decoder_attn", tmp_path / "d.onnx", ["CPUExecutionProvider"], asked, require_gpu=True)
    check_providers("decoder_attn", tmp_path / "d.onnx", asked, asked, require_gpu=True)  # got what it asked for
    check_providers("decoder_attn", tmp_path / "d.onnx", ["CPUExecutionProvider"], ["CPUExecutionProvider"],
                    require_gpu=False)
