"""Training at scale, on CPU: autocast precision, two gloo processes on a streamed corpus with token batches and
gradient accumulation, a corpus larger than a memory budget, resume across process counts, fine-tuning, BLEU."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model_src.checkpoint import load_model
from model_src.data import Batches, Corpus, encode_pairs, padded_tokens
from model_src.scoring import evaluate
from model_src.tasks import _string_task, tsv_task
from model_src.train import TrainConfig, train

from .conftest import ROOT, TINY

WORDS = ["cat", "dog", "house", "tree", "car", "sun", "moon", "river", "stone", "bird", "green", "small"]


def _corpus(path: Path, lines: int, seed: int = 0, swap=True, longest: int = 6) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(lines):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, longest))]
            f.write(f"{' '.join(words)}\t{' '.join(reversed(words) if swap else words)}\n")
    return path


def _torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           "-m", "model_src.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


SMALL = ["--d-model", "32", "--d-ff", "64", "--n-encoder-layers", "1", "--n-decoder-layers", "1", "--quiet",
         "--eval-examples", "16"]


def test_bf16_autocast_trains_on_cpu_and_checkpoints_stay_fp32(tmp_path):
    task = _string_task("copy", lambda s: s, seed=0, n_train=400, n_eval=16, max_len=6)
    cfg = TrainConfig(steps=30, batch_size=32, warmup=10, eval_every=15, eval_examples=8, max_new_tokens=8,
                      device="cpu", precision="bf16", lr_factor=2.0)
    result = train(task, tmp_path / "bf16", dict(TINY), cfg, progress=False)
    assert result["precision"] == "bf16" and result["device"] == "cpu"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118 (no __iter__)
    model, _, _ = load_model(tmp_path / "bf16")
    assert next(model.parameters()).device.type == "cpu"
    # It learned: below the loss of a uniform guess over the vocabulary (30 steps leave it near 2.9-3.1 against
    # ln(30) = 3.4; the run-to-run spread of bf16 on CPU makes a comparison of two evaluations a coin toss).
    uniform = math.log(model.config.tgt_vocab_size)
    assert result["history"][-1]["val_loss"] < uniform - 0.2, (result["history"], uniform)
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        train(task, tmp_path / "fp16", dict(TINY), TrainConfig(steps=1, device="cpu", precision="fp16"),
              progress=False)
    if torch.cuda.is_available():  # there it trains, on the device asked for
        on_cuda = train(task, tmp_path / "cuda", dict(TINY), TrainConfig(steps=1, device="cuda"), progress=False)
        assert on_cuda["device"].startswith("cuda") and (tmp_path / "cuda" / "model.safetensors").exists()
    else:  # here it says why it cannot, naming the way out
        with pytest.raises(ValueError, match=r"no CUDA device .*use --device auto or cpu"):
            train(task, tmp_path / "cuda", dict(TINY), TrainConfig(steps=1, device="cuda"), progress=False)


def test_a_corpus_streams_with_a_fixed_held_out_split_and_disjoint_rank_shards(tmp_path):
    corpus = Corpus(_corpus(tmp_path / "c.tsv", 3000), seed=0)
    validation, test = corpus.split("validation"), corpus.split("test")
    assert validation == Corpus(corpus.path, seed=0).split("validation")  # the same on every read
    shards = [list(corpus.train_pairs(rank, 3)) for rank in range(3)]
    train_all = list(corpus.train_pairs())
    assert sorted(p for s in shards for p in s) == sorted(train_all)
    assert abs(len(shards[0]) - len(shards[2])) <= 1
    held_sources = {s for s, _ in validation + test}
    assert not held_sources & {s for s, _ in train_all}  # a source never crosses splits
    task = tsv_task(corpus.path, 0, limit=40)
    assert task.validation == validation[:40] and task.train == []


def test_token_batches_bucket_by_length_and_keep_under_the_budget():
    from model_src.tokenizer import CharTokenizer

    rng = random.Random(0)
    pairs = [("x" * rng.randint(1, 60), "y" * rng.randint(1, 60)) for _ in range(2000)]
    tok = CharTokenizer("xy")
    from model_src.model import ModelConfig

    cfg = ModelConfig(src_vocab_size=6, tgt_vocab_size=6)
    batches = Batches(tok, cfg, examples=encode_pairs(tok, pairs), batch_tokens=512)
    seen, waste = 0, 0
    for _ in range(40):
        batch = next(batches)
        assert padded_tokens(batch) <= 512 or len(batch) == 1
        real = sum(len(s) + len(t) + 1 for s, t in batch)
        waste += 2 * padded_tokens(batch) - real
        seen += real
    assert waste / (seen + waste) < 0.35  # sorted pools: little padding (random batches waste about half)


def test_a_corpus_larger_than_the_memory_budget_is_streamed(tmp_path):
    path = _corpus(tmp_path / "big.tsv", 100_000, seed=1, longest=12)
    size = path.stat().st_size
    budget = 2 * 1024 * 1024  # what the data pipeline may hold (Python allocations, traced)
    assert size > 3 * budget
    from model_src.model import ModelConfig
    from model_src.tokenizer import CharTokenizer

    tok = CharTokenizer(set("".join(WORDS) + " "))
    cfg = ModelConfig(src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size)
    batches = Batches(tok, cfg, corpus=Corpus(path), batch_tokens=1024)
    tracemalloc.start()
    examples = 0
    while batches.epoch == 0:
        examples += len(next(batches))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert examples > 75_000  # the whole training split went through (80% of the lines, give or take)
    assert peak < budget, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB corpus"


@pytest.mark.slow
def test_two_gloo_processes_train_a_streamed_corpus_and_resume_as_one(tmp_path):
    data = _corpus(tmp_path / "pairs.tsv", 4000)
    out = tmp_path / "ck"
    r = _torchrun(2, "--data", str(data), "--out", str(out), "--steps", "6", "--eval-every", "3",
                  "--batch-tokens", "400", "--grad-accum", "2", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6 and metrics["tokens_per_second"] > 0
    assert {"test_bleu", "test_chrf", "test_exact_match"} <= set(metrics)
    assert all("val_bleu" in h and h["tokens_per_second"] > 0 for h in metrics["history"])
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 6
    # resume the 2-process run with 1 process, then go back to 2: the step count and history carry on
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, "-m", "attnserve.cli", "train", "--data", str(data), "--out", str(out),
                          "--resume", "--steps", "9", "--eval-every", "3", "--batch-tokens", "400", *SMALL],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and [h["step"] for h in metrics["history"]] == [3, 6, 9]
    again = _torchrun(2, "--data", str(data), "--out", str(out), "--resume", "--steps", "12", "--eval-every", "3",
                      "--batch-tokens", "400", *SMALL)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and [h["step"] for h in metrics["history"]] == [3, 6, 9, 12]
    ev = subprocess.run([sys.executable, "-m", "attnserve.cli", "evaluate", str(out)], capture_output=True,
                        text=True, timeout=300, env=env, cwd=ROOT)
    assert ev.returncode == 0 and "BLEU" in ev.stdout and "chrF" in ev.stdout, ev.stderr[-2000:]


def test_fine_tuning_lowers_the_loss_of_a_checkpoint_on_a_new_corpus(tiny_checkpoint, tmp_path):
    """The tiny model learned to reverse strings; a corpus that copies them is new to it."""
    model, tok, _ = load_model(tiny_checkpoint)
    alphabet = [c for c in tok.vocab[4:] if c.isalpha()]
    rng = random.Random(3)
    data = tmp_path / "copy.tsv"
    with data.open("w") as f:
        for _ in range(1500):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8)))
            f.write(f"{s}\t{s}\n")
    held = tsv_task(data, 0)
    pairs = encode_pairs(tok, held.validation)
    before = evaluate(model, pairs, 12)["loss"]
    cfg = TrainConfig(steps=100, batch_size=32, lr=3e-3, warmup=5, eval_every=50, eval_examples=16,
                      max_new_tokens=12, device="cpu")
    result = train(None, tmp_path / "ft", {}, cfg, data_path=data, init_from=tiny_checkpoint, progress=False)
    tuned, tuned_tok, config = load_model(tmp_path / "ft")
    after = evaluate(tuned, pairs, 12)["loss"]
    assert after < 0.7 * before, (before, after)
    assert tuned_tok.to_dict() == tok.to_dict() and config["init_from"] == str(tiny_checkpoint.resolve())
    assert tuned.config == model.config and "test_bleu" in result


@pytest.mark.slow
def test_an_imported_marian_checkpoint_fine_tunes(tmp_path):
    from bench.marian_model import build_marian
    from model_src.marian import import_marian

    folder = build_marian(tmp_path / "hf")
    import_marian(folder, tmp_path / "imported")
    model, tok, _ = load_model(tmp_path / "imported")
    data = tmp_path / "en-fr.tsv"
    pairs = [("the cat", "le chat"), ("a dog", "un chien"), ("the green tree", "le arbre vert"),
             ("the house", "le maison"), ("a small bird", "un petit oiseau"), ("the river", "le rivière")]
    data.write_text("".join(f"{s}\t{t}\n" for s, t in pairs * 40), encoding="utf-8")
    encoded = encode_pairs(tok, pairs)
    assert all(t and t[-1] != model.config.eos_id for _, t in encoded)  # targets: target pieces, no </s>
    before = evaluate(model, encoded, 8)["loss"]
    cfg = TrainConfig(steps=30, batch_size=16, lr=2e-3, warmup=3, eval_every=30, eval_examples=6,
                      max_new_tokens=8, device="cpu")
    train(None, tmp_path / "tuned", {}, cfg, data_path=data, init_from=tmp_path / "imported", progress=False)
    tuned, _, _ = load_model(tmp_path / "tuned")
    assert evaluate(tuned, encoded, 8)["loss"] < 0.5 * before
