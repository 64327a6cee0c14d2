"""The model runner on the tiny exported model, and the graph feeds it builds: padded batches equal rows alone."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest

from model_repository import (
    GRAPH_NAMES,
    MANIFEST,
    flat_feeds,
    graph_inputs,
    graph_outputs,
    grouped,
    open_version,
    sha256_file,
)
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


def _step(runner: ModelRunner, rows: list[Row], attention: bool = False) -> tuple[dict, int]:
    feeds, P = decoder_feeds(rows)
    return runner.run_decoder(feeds, attention), P


def _advance(row: Row, out: dict, i: int) -> None:
    """Row i of a step becomes `row`'s cache; it feeds its greedy token next."""
    row.advance(out, i, int(np.argmax(out["logits"][i])))


def test_runner_loads_on_cpu_with_the_manifests_graph_names(runner, tiny_repo):
    manifest = open_version(tiny_repo / "tiny" / "1")
    assert runner.providers == ("CPUExecutionProvider",)
    assert (runner.name, runner.version) == ("tiny", 1)
    assert (runner.bos_id, runner.eos_id) == (manifest.model.bos_id, manifest.model.eos_id)
    assert set(runner.inputs) == set(runner.outputs) == set(GRAPH_NAMES)
    for graph in GRAPH_NAMES:
        assert runner.inputs[graph] == manifest.graphs[graph].input_names()
        assert runner.outputs[graph] == manifest.graphs[graph].output_names()
    L = manifest.model.n_decoder_layers
    for graph in ("decoder", "decoder_attn"):  # the caches one tensor per layer, in and out
        assert runner.inputs[graph] == graph_inputs(graph, L)
        assert {f"past_k.{L - 1}", f"cross_v.{L - 1}"} <= set(runner.inputs[graph])
        assert runner.outputs[graph] == graph_outputs(graph, L)
        assert f"present_v.{L - 1}" in runner.outputs[graph]


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
    feeds, P = decoder_feeds(rows)
    assert P == 3
    assert set(feeds) == {"input_ids", "positions", "self_mask", "past_k", "past_v", "cross_k", "cross_v", "src_mask"}
    np.testing.assert_array_equal(feeds["input_ids"], [11, 12, 13])
    np.testing.assert_array_equal(feeds["positions"], [0, 2, 3])
    np.testing.assert_array_equal(feeds["self_mask"], [[0, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(feeds["src_mask"], [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    assert [a.shape for a in feeds["past_k"]] == [(3, 1, 3, 2)] * 2  # L x (B, nh, P, hs)
    assert [a.shape for a in feeds["cross_k"]] == [(3, 1, 4, 2)] * 2  # L x (B, nh, S, hs)
    for layer in range(2):
        for i, r in enumerate(rows):
            pad = P - r.past
            np.testing.assert_array_equal(feeds["past_k"][layer][i, :, pad:], r.past_k[layer][0])
            np.testing.assert_array_equal(feeds["past_v"][layer][i, :, pad:], r.past_v[layer][0])
            assert not feeds["past_k"][layer][i, :, :pad].any()
            np.testing.assert_array_equal(feeds["cross_k"][layer][i, :, :r.src_len], r.cross_k[layer][0])
            np.testing.assert_array_equal(feeds["cross_v"][layer][i, :, :r.src_len], r.cross_v[layer][0])
            assert not feeds["cross_k"][layer][i, :, r.src_len:].any()
    assert feeds["input_ids"].dtype == feeds["positions"].dtype == np.int64
    assert feeds["self_mask"].dtype == feeds["src_mask"].dtype == bool


def test_flat_feeds_take_the_declared_names_and_layers_and_grouped_gives_them_back():
    rows = [_synthetic_row(2, 2, 1, 1.0, 5), _synthetic_row(2, 3, 0, 2.0, 6)]
    feeds, _ = decoder_feeds(rows)
    flat = flat_feeds(("input_ids", "past_k.1", "cross_v.0"), feeds)
    assert list(flat) == ["input_ids", "past_k.1", "cross_v.0"]  # only what the graph declares
    assert flat["past_k.1"] is feeds["past_k"][1] and flat["cross_v.0"] is feeds["cross_v"][0]
    out = grouped(("logits", "present_k.1", "present_k.0", "cross_attn"), ("l", "k1", "k0", "a"))
    assert out == {"logits": "l", "present_k": ("k0", "k1"), "cross_attn": "a"}  # layers in order
    assert flat_feeds(("hidden.2",), {"hidden.2": 7}) == {"hidden.2": 7}  # not a per-layer name: as it is


def test_one_row_goes_in_as_it_is():
    row = _synthetic_row(2, 3, 2, 1.0, 7)
    feeds, P = decoder_feeds([row])
    assert P == 2
    assert feeds["past_k"] is row.past_k and feeds["cross_v"] is row.cross_v  # no copy
    flat = flat_feeds(graph_inputs("decoder", 2), feeds)
    assert np.shares_memory(flat["past_k.1"], row.past_k) and flat["past_k.1"].flags.c_contiguous
    np.testing.assert_array_equal(feeds["positions"], [2])
    np.testing.assert_array_equal(feeds["self_mask"], [[1, 1, 1]])
    np.testing.assert_array_equal(feeds["src_mask"], [[1, 1, 1]])
    np.testing.assert_array_equal(feeds["input_ids"], [7])


@pytest.mark.parametrize("attention", [False, True])
def test_a_decoder_step_for_three_rows_equals_each_row_alone(runner, sources, attention):
    rows = [_alone(runner, s) for s in sources]
    for row, steps in zip(rows, (0, 2, 4), strict=True):  # different past lengths, decoded alone
        for _ in range(steps):
            out, _ = _step(runner, [row])
            _advance(row, out, 0)
    assert [r.past for r in rows] == [0, 2, 4]
    alone = [_step(runner, [r], attention)[0] for r in rows]
    batch, P = _step(runner, rows, attention)
    for i, (row, ref) in enumerate(zip(rows, alone, strict=True)):
        np.testing.assert_allclose(batch["logits"][i], ref["logits"][0], atol=1e-4)
        pad = P - row.past
        for got, want in zip(batch["present_k"] + batch["present_v"], ref["present_k"] + ref["present_v"],
                             strict=True):  # 2L x (B, nh, P + 1, hs)
            np.testing.assert_allclose(got[i, :, pad:], want[0], atol=1e-4)
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
    runner.run_decoder(decoder_feeds([row])[0], attention=False)
    assert runner.calls == Counter({"encoder": 2, "encoder_attn": 1, "decoder": 1})
    runner.warm_up()
    assert runner.calls == Counter({"encoder": 3, "encoder_attn": 2, "decoder": 2, "decoder_attn": 1})


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_incremental_detokenizing_equals_decoding_the_whole_output_at_a_cost_that_does_not_grow(kind):
    from model_repository.tokenizer import BPETokenizer, CharTokenizer, Detokenizer, tokenizer_from_dict

    texts = ["the cat sat on the mat", "a dog, a log; 3 mars 2021", "über straße ☃ 日本"] * 20
    made = CharTokenizer.from_texts(texts) if kind == "char" else BPETokenizer.from_texts(texts, vocab_size=120)
    tok = tokenizer_from_dict(made.to_dict())  # as serving reads it from the version folder
    real_decode = tok.decode
    for text in texts[:3]:
        ids = [1, *tok.encode(text), 2, 3] * 8  # long, with specials (bos, eos, unk) that add no text
        decoded: list[int] = []  # the ids each decode call was given, while streaming
        tok.decode = lambda part, seen=decoded: seen.append(len(part)) or real_decode(part)
        detok, pieces = Detokenizer(tok), []
        for n, token in enumerate(ids, 1):
            pieces.append(detok.add(token))
            assert real_decode(ids[:n]).startswith(detok.text)  # released text is never taken back
        assert sum(decoded) < 8 * len(ids), (sum(decoded), len(ids))  # linear; decoding it all each step: ~n^2/2
        assert "".join(pieces) == detok.text and detok.finish() == real_decode(ids)
        if kind == "bpe":  # every multi-byte character split over byte-level pieces came out whole
            assert "\ufffd" not in detok.text


def test_a_session_that_did_not_get_cuda_is_refused_by_name_when_a_gpu_is_required(tmp_path):
    from serving.engine.runner import check_providers

    asked = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ModelLoadError, match=r"--require-gpu: the decoder_attn session .*d\.onnx.* runs on "
                                             r"\['CPUExecutionProvider'\]"):
        check_providers("decoder_attn", tmp_path / "d.onnx", ["CPUExecutionProvider"], asked, require_gpu=True)
    check_providers("decoder_attn", tmp_path / "d.onnx", asked, asked, require_gpu=True)  # got what it asked for
    check_providers("decoder_attn", tmp_path / "d.onnx", ["CPUExecutionProvider"], ["CPUExecutionProvider"],
                    require_gpu=False)
