"""The checkpoint directory: safetensors weights, config.json, tokenizer.json, metrics.json; no pickle anywhere.

Layout (what `export` reads):
    model.safetensors   the best weights so far
    config.json         {"model": ModelConfig, "tokenizer": "tokenizer.json", "task": ..., "training": ...}
    tokenizer.json      see model_src.tokenizer
    metrics.json        validation history and the final test figures
    resume/             last weights, optimizer moments and step, for --resume (not needed to rebuild the model)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import ModelConfig, Seq2SeqTransformer
from .tokenizer import Tokenizer, load_tokenizer, save_tokenizer

WEIGHTS, CONFIG, TOKENIZER, METRICS, RESUME = (
    "model.safetensors", "config.json", "tokenizer.json", "metrics.json", "resume")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, corrupt or inconsistent."""


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _tied(config: ModelConfig) -> dict[str, str]:
    """Weights that are another weight (tied by the config): name -> the name stored in its place."""
    tied = {"tgt_embed.weight": "src_embed.weight"} if config.share_embeddings else {}
    if config.tie_output_embeddings:
        tied["lm_head.weight"] = tied.get("tgt_embed.weight", "tgt_embed.weight")
    return tied


def _state_dict(model: Seq2SeqTransformer) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; tied weights are rebuilt from the config on load.
    sd = model.state_dict()
    for name in _tied(model.config):
        sd.pop(name, None)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}  # wherever it trained, saved from CPU


def _untie(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name, stored in _tied(config).items():
        if stored in state:
            state[name] = state[stored]
    return state


def save_model(out: Path, model: Seq2SeqTransformer, tokenizer: Tokenizer, extra_config: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    save_tokenizer(tokenizer, out / TOKENIZER)
    _atomic_write_json(out / CONFIG, {"model": model.config.to_dict(), "tokenizer": TOKENIZER, **extra_config})


def write_metrics(out: Path, metrics: dict) -> None:
    _atomic_write_json(Path(out) / METRICS, metrics)


def read_config(ckpt: Path) -> dict:
    path = Path(ckpt) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: not a checkpoint directory (no {CONFIG})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from e


def load_model(ckpt: Path, weights: Path | None = None) -> tuple[Seq2SeqTransformer, Tokenizer, dict]:
    """Rebuild the model from the directory alone; refuses weights that do not match the config."""
    ckpt = Path(ckpt)
    config = read_config(ckpt)
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / CONFIG}: invalid model config: {e}") from e
    weights = weights or ckpt / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{ckpt}: missing weights file {weights.name}")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"{weights}: corrupt weights file ({e})") from e
    model = Seq2SeqTransformer(model_config)
    state = _untie(model_config, state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {', '.join(names[:4])}{'...' if len(names) > 4 else ''}"
                           for label, names in (("missing", missing), ("unexpected", unexpected),
                                                ("shape differs from config", wrong)) if names)
        raise CheckpointError(f"{weights}: weights do not match {CONFIG} ({detail})")
    model.load_state_dict(state)
    try:
        tokenizer = load_tokenizer(ckpt / config.get("tokenizer", TOKENIZER))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt}: cannot read the tokenizer ({e})") from e
    if tokenizer.vocab_size != model_config.src_vocab_size:
        raise CheckpointError(f"{ckpt}: tokenizer has {tokenizer.vocab_size} tokens but the model config says "
                              f"src_vocab_size={model_config.src_vocab_size}")
    model.eval()
    return model, tokenizer, config


def save_resume_state(out: Path, model: Seq2SeqTransformer, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Last weights, AdamW moments (flattened into safetensors) and the loop state, written atomically."""
    d = Path(out) / RESUME
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in _state_dict(model).items()}
    opt = optimizer.state_dict()
    for pid, pstate in opt["state"].items():
        for name, value in pstate.items():
            tensors[f"optim.{pid}.{name}"] = value.detach().cpu().clone().contiguous().reshape(value.shape)
    tmp = d / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, d / "state.safetensors")
    _atomic_write_json(d / "state.json", {**state, "param_groups": opt["param_groups"]})


def load_resume_state(out: Path, model: Seq2SeqTransformer, optimizer: torch.optim.Optimizer) -> dict:
    d = Path(out) / RESUME
    if not (d / "state.json").is_file():
        raise CheckpointError(f"{out}: nothing to resume (no {RESUME}/state.json)")
    tensors = load_file(str(d / "state.safetensors"))
    meta = json.loads((d / "state.json").read_text())
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(_untie(model.config, model_sd))
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta.pop("param_groups")})
    return meta
