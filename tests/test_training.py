"""Training: loss goes down, checkpoints rebuild the model alone, resume continues, DDP runs, CLI errors are clear."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_src.checkpoint import CheckpointError, load_model
from model_src.tasks import _string_task
from model_src.train import TrainConfig, train

from .conftest import ROOT, TINY


def _attnserve(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "attnserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_training_lowers_the_loss_and_writes_a_checkpoint(tiny_checkpoint):
    metrics = json.loads((tiny_checkpoint / "metrics.json").read_text())
    assert metrics["history"][-1]["val_loss"] < 2.5  # untrained: ln(30 tokens) ~ 3.4
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in tiny_checkpoint.iterdir()}
    assert not list(tiny_checkpoint.glob("*.pt")) and not list(tiny_checkpoint.glob("*.pkl"))


def test_checkpoint_round_trip_gives_identical_outputs(tiny_checkpoint):
    a, tok, _ = load_model(tiny_checkpoint)
    b, _, _ = load_model(tiny_checkpoint)
    src = torch.tensor([tok.encode("abcd")])
    m = torch.ones_like(src, dtype=torch.bool)
    tgt = torch.tensor([[1, 5, 6]])
    torch.testing.assert_close(a(src, m, tgt, torch.ones_like(tgt, dtype=torch.bool)),
                               b(src, m, tgt, torch.ones_like(tgt, dtype=torch.bool)), rtol=0, atol=0)


def test_mismatched_or_corrupt_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["d_ff"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        load_model(bad)
    shutil.copy(tiny_checkpoint / "config.json", bad / "config.json")
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt weights"):
        load_model(bad)


def test_resume_continues_from_the_saved_step(tmp_path):
    task = _string_task("reverse", lambda s: s[::-1], seed=0, n_train=500, n_eval=20, max_len=6)
    cfg = TrainConfig(steps=10, batch_size=16, warmup=5, eval_every=5, eval_examples=8, max_new_tokens=8)
    train(task, tmp_path / "r", dict(TINY), cfg, progress=False)
    first = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert first["steps"] == 10
    more = TrainConfig(**{**cfg.__dict__, "steps": 15})
    result = train(task, tmp_path / "r", dict(TINY), more, resume=True, progress=False)
    assert result["steps"] == 15
    assert [h["step"] for h in result["history"]] == [5, 10, 15]


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "model_src.train", "--task", "copy", "--out", str(out), "--steps", "6", "--eval-every", "3",
           "--eval-examples", "8", "--batch-size", "8", "--d-model", "32", "--d-ff", "64", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    load_model(out)


@pytest.mark.parametrize("args,needle", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--d-model", "30", "--n-heads", "4"], "divisible"),
])
def test_train_cli_errors(tmp_path, args, needle):
    r = _attnserve("train", "--out", str(tmp_path / "x"), *args, "--steps", "1")
    assert r.returncode == 2
    assert needle in r.stderr


def test_train_cli_malformed_tsv(tmp_path):
    data = Path(tmp_path / "c.tsv")
    data.write_text("ok\tfine\nbroken line\n", encoding="utf-8")
    r = _attnserve("train", "--data", str(data), "--out", str(tmp_path / "x"), "--steps", "1")
    assert r.returncode == 2
    assert "c.tsv:2" in r.stderr


def test_user_corpus_trains_with_bpe_and_evaluates_from_its_checkpoint(tmp_path):
    data = tmp_path / "pairs.tsv"
    words = ["cat", "dog", "house", "tree", "car", "sun"]
    data.write_text("".join(f"{a} {b}\t{b} {a}\n" for a in words for b in words), encoding="utf-8")
    out = tmp_path / "ck"
    r = _attnserve("train", "--data", str(data), "--out", str(out), "--steps", "4", "--eval-every", "2",
                   "--eval-examples", "4", "--d-model", "32", "--d-ff", "64", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["tokenizer_kind"] == "bpe" and config["data"] == str(data.resolve())
    ev = _attnserve("evaluate", str(out))  # finds the corpus again from config.json
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "held-out pairs): exact match" in ev.stdout


def test_shared_embeddings_survive_the_checkpoint(tmp_path):
    task = _string_task("copy", lambda s: s, seed=0, n_train=200, n_eval=8, max_len=6)
    cfg = TrainConfig(steps=4, batch_size=8, warmup=2, eval_every=2, eval_examples=4, max_new_tokens=8)
    train(task, tmp_path / "s", {**TINY, "share_embeddings": True}, cfg, progress=False)
    model, _tok, _ = load_model(tmp_path / "s")
    assert model.tgt_embed is model.src_embed
    from safetensors.torch import load_file

    assert "tgt_embed.weight" not in load_file(str(tmp_path / "s" / "model.safetensors"))
