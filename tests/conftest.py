"""Shared fixtures: a tiny seeded model, trained briefly and exported once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where onnxruntime offers CUDA; elsewhere they are deselected, and say so."""
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if "gpu" not in item.keywords]
        print(f"\n{len(gpu)} gpu test(s) deselected: no CUDA execution provider here")


TINY = {"d_model": 32, "n_heads": 4, "n_encoder_layers": 2, "n_decoder_layers": 2, "d_ff": 64, "dropout": 0.0}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained for a few hundred steps on `reverse` (lengths 1-8), so greedy outputs are not noise."""
    from model_src.tasks import _string_task
    from model_src.train import TrainConfig, train

    task = _string_task("reverse", lambda s: s[::-1], seed=0, n_train=3000, n_eval=80, max_len=8)
    out = tmp_path_factory.mktemp("ckpt") / "reverse"
    cfg = TrainConfig(steps=150, batch_size=64, warmup=50, eval_every=150, eval_examples=32, seed=0,
                      lr_factor=2.0, max_new_tokens=12)
    train(task, out, dict(TINY), cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_repo(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported once, as models/tiny/1."""
    from export.pipeline import ExportConfig, export_checkpoint

    repo = tmp_path_factory.mktemp("models")
    export_checkpoint(ExportConfig(checkpoint=tiny_checkpoint, repo=repo, name="tiny", max_new_tokens=12,
                                   greedy_inputs=64), progress=lambda _: None)
    return repo


@pytest.fixture(scope="session")
def noisy_checkpoint(tmp_path_factory) -> Path:
    """An untrained post-norm model: it rarely emits <eos>, so its generations run to max_new_tokens (long
    streams); exporting it also runs the export's parity checks on the paper's post-norm layout."""
    import torch

    from model_src.checkpoint import save_model
    from model_src.model import ModelConfig, Seq2SeqTransformer
    from model_src.tasks import reverse_task
    from model_src.tokenizer import CharTokenizer

    tok = CharTokenizer.from_texts(reverse_task(0, n_train=200, n_eval=20).texts())
    torch.manual_seed(1)
    model = Seq2SeqTransformer(ModelConfig(src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size,
                                           pre_norm=False, **TINY))
    out = tmp_path_factory.mktemp("noisy") / "ckpt"
    save_model(out, model.eval(), tok, {"task": "reverse", "training": {"seed": 0}})
    return out


@pytest.fixture(scope="session")
def serving_repo(tiny_repo, noisy_checkpoint, tmp_path_factory) -> Path:
    """models/tiny/1 (trained) and models/noisy/1 (untrained)."""
    import shutil

    from export.pipeline import ExportConfig, export_checkpoint

    repo = tmp_path_factory.mktemp("serving") / "models"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    export_checkpoint(ExportConfig(checkpoint=noisy_checkpoint, repo=repo, name="noisy", max_new_tokens=8,
                                   greedy_inputs=64, parity_inputs=16), progress=lambda _: None)
    return repo
