"""Quantized exports (int8, int4) and their quality gate, and the one weights file every graph of a version shares."""

import json

import numpy as np
import onnx
import pytest

from export.pipeline import ExportConfig, export_checkpoint
from export.quality import QualityGate, compare, token_agreement
from export.validate import ValidationError, ort_greedy, session
from model_repository import GRAPH_NAMES
from serving.engine.runner import ModelRunner, RunnerConfig


def _export(checkpoint, repo, name, quantize, gate):
    cfg = ExportConfig(checkpoint=checkpoint, repo=repo, name=name, quantize=quantize, max_new_tokens=12,
                       greedy_inputs=64, quality=gate)
    return export_checkpoint(cfg, progress=lambda _: None)


def _constant_matmuls(proto: onnx.ModelProto) -> list[str]:
    """fp32 MatMuls whose weight is a stored constant, or a Transpose of one (the tied output projection)."""
    inits = {t.name for t in proto.graph.initializer}
    transposed = {n.output[0] for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and (inits | transposed) & set(n.input)]


@pytest.fixture(scope="module")
def int8_version(tiny_checkpoint, tmp_path_factory):
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("q8"), "q8", "int8", QualityGate(max_drop=1.0))


def test_token_agreement_counts_positions_over_the_longer_output():
    assert token_agreement([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert token_agreement([[1, 2, 3, 4]], [[1, 9, 3]]) == 0.5  # 2 of 4 positions
    assert token_agreement([[], [5]], [[], [6]]) == 0.5  # two empty outputs agree
    assert token_agreement([[1, 2]], [[1, 2, 7, 7]]) == 0.5


def test_int8_quantizes_every_matmul_with_a_constant_weight_including_the_output_projection(int8_version):
    m = json.loads((int8_version / "manifest.json").read_text())
    q = m["validation"]["quantization"]
    assert m["precision"] == "int8" and q["scheme"] == "int8" and q["judged_by"] == "exact match"
    assert 0.0 <= q["exact_match_int8"] <= 1.0 and q["gate"]["max_drop"] == 1.0
    for graph in ("encoder", "decoder", "decoder_attn"):
        proto = onnx.load(str(int8_version / f"{graph}.onnx"))
        assert _constant_matmuls(proto) == [], graph
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in proto.graph.node}
    runner = ModelRunner(int8_version, RunnerConfig(providers=("cpu",)))
    enc = runner.run_encoder([[4, 5, 6]], attention=False)
    assert enc["cross_k"].dtype == np.float32


def test_a_gate_that_refuses_publishes_nothing(tiny_checkpoint, tmp_path):
    # fp32 exact match minus int8's is >= 0 > -0.5 whatever the model: this threshold always refuses
    with pytest.raises(ValidationError, match="exact match .* below fp32 .* not published"):
        _export(tiny_checkpoint, tmp_path, "refused", "int8", QualityGate(max_drop=-0.5))
    assert [p.name for p in (tmp_path / "refused").iterdir()] == []


def test_int4_uses_weight_only_blocks_for_matmuls_and_tables(tiny_checkpoint, tmp_path):
    final = _export(tiny_checkpoint, tmp_path, "q4", "int4", QualityGate(max_drop=1.0))
    ops = {n.op_type for n in onnx.load(str(final / "decoder.onnx")).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    assert json.loads((final / "manifest.json").read_text())["precision"] == "int4"
    assert _constant_matmuls(onnx.load(str(final / "decoder.onnx"))) == []


@pytest.mark.parametrize(("gate", "passes"), [(QualityGate(min_token_agreement=0.0, min_chrf=0.0), True),
                                               (QualityGate(min_token_agreement=1.01, min_chrf=0.0), False),
                                               (QualityGate(min_token_agreement=0.0, min_chrf=100.1), False)])
def test_without_targets_the_gate_judges_agreement_with_fp32(tiny_repo, int8_version, gate, passes):
    fp32 = {g: session(tiny_repo / "tiny" / "1" / f"{g}.onnx") for g in GRAPH_NAMES}
    int8 = {g: session(int8_version / f"{g}.onnx") for g in GRAPH_NAMES}
    cfg = json.loads((int8_version / "manifest.json").read_text())["model_config"]
    rng = np.random.default_rng(0)
    held = [([int(i) for i in rng.integers(4, cfg["src_vocab_size"], n)], []) for n in rng.integers(1, 9, 40)]
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    if passes:
        result = compare(fp32, int8, cfg, held, decode, 12, "int8", gate)
        assert result["judged_by"] == "agreement with fp32" and "exact_match_fp32" not in result
        ref, got = ort_greedy(fp32, cfg, [s for s, _ in held], 12), ort_greedy(int8, cfg, [s for s, _ in held], 12)
        assert result["token_agreement"] == token_agreement(ref, got)
    else:
        with pytest.raises(ValidationError, match="too far from fp32 .* not published"):
            compare(fp32, int8, cfg, held, decode, 12, "int8", gate)


def test_every_graph_references_one_weights_file_holding_each_tensor_once(tiny_repo, tiny_checkpoint):
    version = tiny_repo / "tiny" / "1"
    m = json.loads((version / "manifest.json").read_text())
    assert "weights.bin" in m["files"]
    weights = (version / "weights.bin").stat().st_size
    assert weights == m["validation"]["weights"]["bytes"]
    assert m["validation"]["weights"]["bytes_referenced"] > 2 * weights  # four graphs, one copy
    assert weights <= 1.1 * (tiny_checkpoint / "model.safetensors").stat().st_size
    for graph in GRAPH_NAMES:
        proto = onnx.load(str(version / f"{graph}.onnx"), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external and all({e.key: e.value for e in t.external_data}["location"] == "weights.bin"
                                for t in external)
        assert all(int({e.key: e.value for e in t.external_data}["offset"]) % 4096 == 0 for t in external)


def test_the_attention_graphs_serve_requests_without_attention_unless_fast_graphs_are_asked_for(tiny_repo):
    version = tiny_repo / "tiny" / "1"
    two = ModelRunner(version, RunnerConfig(providers=("cpu",)))
    four = ModelRunner(version, RunnerConfig(providers=("cpu",), fast_graphs=True))
    assert (two.session_count, four.session_count) == (2, 4)
    assert two.sessions["decoder"].session is two.sessions["decoder_attn"].session
    sources = [[4, 5, 6, 7], [8, 9]]
    for attention in (False, True):
        a, b = two.run_encoder(sources, attention), four.run_encoder(sources, attention)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-5)
    assert set(two.run_encoder(sources, False)) == {"cross_k", "cross_v"}
