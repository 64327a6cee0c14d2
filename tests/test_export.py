"""Export: parity with PyTorch, both graph variants, intact attention blocks, atomic and validated publishing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from export.pipeline import ExportConfig, export_checkpoint
from export.validate import Tolerances, ValidationError, run, session
from model_repository import RepositoryError, list_versions, prepare
from model_src.checkpoint import load_model
from model_src.decoding import pad_batch

from .conftest import ROOT


@pytest.fixture(scope="module")
def version_dir(tiny_repo):
    return tiny_repo / "tiny" / "1"


@pytest.fixture(scope="module")
def manifest(version_dir):
    return json.loads((version_dir / "manifest.json").read_text())


def test_manifest_records_parity_within_bounds(manifest):
    v = manifest["validation"]
    d = v["parity"]["max_abs_diff"]
    assert d["logits"] <= 1e-4 and d["attention"] <= v["tolerances"]["attention"] <= 1e-4
    assert d["row_sum"] <= 1e-5
    assert v["greedy"]["inputs"] >= 64 and v["greedy"]["identical"] == v["greedy"]["inputs"]
    assert set(manifest["graphs"]) == {"encoder", "encoder_attn", "decoder", "decoder_attn"}
    assert set(manifest["files"]) >= {"encoder.onnx", "decoder_attn.onnx", "tokenizer.json"}
    for key in ("model_config", "special_ids", "opset", "library_versions", "source_checkpoint", "created"):
        assert key in manifest


def test_fast_graphs_carry_no_attention_outputs(manifest):
    outs = {g: [o["name"] for o in m["outputs"]] for g, m in manifest["graphs"].items()}
    assert outs["encoder"] == ["cross_k", "cross_v"]
    L = manifest["model_config"]["n_decoder_layers"]
    layers = [f"present_{kv}.{i}" for kv in "kv" for i in range(L)]  # the caches one tensor per layer
    assert outs["decoder"] == ["logits", *layers]
    assert outs["decoder_attn"] == ["logits", *layers, "dec_self_attn", "cross_attn"]
    assert "enc_self_attn" in outs["encoder_attn"]
    ins = [i["name"] for i in manifest["graphs"]["decoder"]["inputs"]]
    assert [f"past_k.{i}" for i in range(L)] == [n for n in ins if n.startswith("past_k")]
    assert [f"cross_v.{i}" for i in range(L)] == [n for n in ins if n.startswith("cross_v")]


@pytest.fixture(scope="module")
def model_and_sessions(tiny_checkpoint, version_dir):
    model, tok, _ = load_model(tiny_checkpoint)
    return model, tok, {g: session(version_dir / f"{g}.onnx") for g in ("encoder_attn", "decoder_attn", "decoder")}


@pytest.mark.parametrize("past", [0, 1, 60])
def test_decoder_step_matches_pytorch_for_any_past_length(model_and_sessions, past):
    model, tok, s = model_and_sessions
    torch.manual_seed(past)
    cfg = model.config
    src_ids, src_mask = pad_batch([tok.encode("abcdef"), tok.encode("xy")], cfg.pad_id)
    enc = model.encode(src_ids, src_mask)
    L, B, nh, hs = cfg.n_decoder_layers, 2, cfg.n_heads, cfg.head_dim
    pk, pv = torch.randn(L, B, nh, past, hs), torch.randn(L, B, nh, past, hs)
    token, pos = torch.tensor([5, 7]), torch.tensor([past, past])
    self_mask = torch.ones(B, past + 1, dtype=torch.bool)
    if past > 2:
        self_mask[1, :past // 2] = False  # a shorter sequence sharing the batch: its older slots are padding
    ref = model.decode_step(token, pos, self_mask, pk, pv, enc.cross_k, enc.cross_v, src_mask)
    out = run(s["decoder_attn"], {
        "input_ids": token.numpy(), "positions": pos.numpy(), "self_mask": self_mask.numpy(),
        "past_k": pk.numpy(), "past_v": pv.numpy(), "cross_k": enc.cross_k.detach().numpy(),
        "cross_v": enc.cross_v.detach().numpy(), "src_mask": src_mask.numpy()})
    self_attn, cross_attn = out["dec_self_attn"], out["cross_attn"]
    np.testing.assert_allclose(out["logits"], ref.logits.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(np.stack(out["present_k"]), ref.present_k.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(np.stack(out["present_v"]), ref.present_v.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(self_attn.sum(-1), 1.0, atol=1e-5)
    assert cross_attn[:, 1, :, :, 2:].max() == 0.0  # padded source keys get exactly zero
    if past > 2:
        assert self_attn[:, 1, :, :, : past // 2].max() == 0.0


def test_inspect_lists_every_block(version_dir):
    r = subprocess.run([sys.executable, "-m", "attnserve.cli", "inspect", str(version_dir)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[2:]]
    # 2 encoder layers x 2 encoder graphs + 2 decoder layers x (self, cross) x 2 decoder graphs
    assert len(rows) == 12
    assert {(row[0], row[1]) for row in rows} >= {("decoder_attn", "decoder.1.cross_attn"),
                                                  ("encoder", "encoder.0.self_attn")}
    assert all(row[4] == "4" for row in rows)
    assert sum(row[6] == "yes" for row in rows) == 6


def test_failed_validation_publishes_nothing(tiny_checkpoint, tmp_path):
    cfg = ExportConfig(checkpoint=tiny_checkpoint, repo=tmp_path, name="strict", max_new_tokens=4,
                       parity_inputs=16, greedy_inputs=64, tolerances=Tolerances(logits=0.0, attention=0.0))
    with pytest.raises(ValidationError, match="logits max abs diff"):
        export_checkpoint(cfg, progress=lambda _: None)
    assert list((tmp_path / "strict").iterdir()) == []


def test_corrupt_checkpoint_is_refused_and_repo_untouched(tiny_checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"\0" * 100)
    r = subprocess.run([sys.executable, "-m", "attnserve.cli", "export", str(bad), "--repo", str(tmp_path / "m")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 1
    assert "corrupt weights" in r.stderr and "nothing was published" in r.stderr
    assert not (tmp_path / "m").exists()


def test_versions_increment_and_are_immutable(tiny_repo, tmp_path):
    assert list_versions(tiny_repo, "tiny") == [1]
    version, staging = prepare(tiny_repo, "tiny", None)
    assert version == 2
    staging.rmdir()
    with pytest.raises(RepositoryError, match="already exists"):
        prepare(tiny_repo, "tiny", 1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RepositoryError, match="cannot write"):
        prepare(blocker / "repo", "tiny", None)


def test_validation_on_a_provider_onnx_runtime_cannot_give_is_refused(tiny_repo):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA: the refusal needs a CPU-only ONNX Runtime")
    with pytest.raises(ValidationError, match="asked for CUDAExecutionProvider .* gave \\['CPUExecutionProvider'\\]"):
        session(tiny_repo / "tiny" / "1" / "decoder.onnx", provider="cuda")


@pytest.mark.gpu
def test_an_export_validated_on_cuda_publishes(tiny_checkpoint, tmp_path):
    cfg = ExportConfig(checkpoint=tiny_checkpoint, repo=tmp_path, name="cuda", max_new_tokens=12, greedy_inputs=64,
                       validate_on="cuda")
    final = export_checkpoint(cfg, progress=lambda _: None)
    report = json.loads((final / "manifest.json").read_text())["validation"]
    assert report["validated_on"] == "cuda" and report["greedy"]["identical"] == report["greedy"]["inputs"]
