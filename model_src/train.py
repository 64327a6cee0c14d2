"""Training: AdamW, the paper's warmup schedule, label smoothing, clipping, validation, best checkpoint, resume, DDP.

Run as `attnserve train ...` or, for several processes, `torchrun --nproc-per-node 2 -m model_src.train ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import load_resume_state, save_model, save_resume_state, write_metrics
from .decoding import generate, pad_batch
from .model import ModelConfig, Seq2SeqTransformer
from .tasks import CorpusError, Pair, TaskData, load_task, tsv_task
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 128  # per process
    lr_factor: float = 0.5  # scales the paper's schedule: factor * d_model^-0.5 * min(step^-0.5, step*warmup^-1.5)
    warmup: int = 400
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 250
    eval_examples: int = 500  # validation exact match is computed on this many held-out pairs
    max_minutes: float = 0.0  # stop early after this much wall time (0: no limit)
    seed: int = 0
    max_new_tokens: int = 48


def lr_at(step: int, cfg: TrainConfig, d_model: int) -> float:
    step = max(step, 1)
    return cfg.lr_factor * d_model ** -0.5 * min(step ** -0.5, step * cfg.warmup ** -1.5)


def encode_pairs(tok: Tokenizer, pairs: list[Pair]) -> list[tuple[list[int], list[int]]]:
    return [(tok.encode(s), tok.encode(t)) for s, t in pairs]


def make_batch(examples, cfg: ModelConfig):
    """(src_ids, src_mask, decoder input, its mask, labels) for teacher forcing; labels use pad_id as ignore."""
    src_ids, src_mask = pad_batch([s for s, _ in examples], cfg.pad_id)
    tgt_in, tgt_mask = pad_batch([[cfg.bos_id, *t] for _, t in examples], cfg.pad_id)
    labels, _ = pad_batch([[*t, cfg.eos_id] for _, t in examples], cfg.pad_id)
    return src_ids, src_mask, tgt_in, tgt_mask, labels


@torch.no_grad()
def evaluate(model: Seq2SeqTransformer, data, cfg: TrainConfig, exact_examples: int | None = None) -> dict:
    """Teacher-forced loss and token accuracy on `data`, and greedy exact match on its first pairs."""
    model.eval()
    mcfg = model.config
    total_loss, total_tokens, correct = 0.0, 0, 0
    for i in range(0, len(data), 256):
        src, smask, tin, tmask, labels = make_batch(data[i:i + 256], mcfg)
        logits = model(src, smask, tin, tmask)
        keep = labels != mcfg.pad_id
        total_loss += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        correct += (logits.argmax(-1)[keep] == labels[keep]).sum().item()
        total_tokens += keep.sum().item()
    subset = data[: exact_examples or len(data)]
    exact = 0
    for i in range(0, len(subset), 256):
        chunk = subset[i:i + 256]
        outs = generate(model, [s for s, _ in chunk], max_new_tokens=cfg.max_new_tokens)
        exact += sum(o == t for o, (_, t) in zip(outs, chunk, strict=True))
    model.train()
    return {"loss": total_loss / total_tokens, "token_accuracy": correct / total_tokens,
            "exact_match": exact / len(subset)}


def build_tokenizer(task: TaskData, kind: str) -> Tokenizer:
    if kind == "bpe":
        return BPETokenizer.from_texts(task.texts())
    return CharTokenizer.from_texts(task.texts())


def _init_distributed() -> tuple[int, int]:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(task: TaskData, out: Path, model_cfg: dict, cfg: TrainConfig, tokenizer_kind: str = "char",
          resume: bool = False, progress: bool = True, data_path: Path | None = None) -> dict:
    """Train on `task`, writing the checkpoint directory `out`; returns the final metrics."""
    rank, world = _init_distributed()
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer(task, tokenizer_kind)
    train_data = encode_pairs(tok, task.train)
    val_data = encode_pairs(tok, task.validation)
    test_data = encode_pairs(tok, task.test)
    longest = max(max(len(s), len(t) + 1) for s, t in train_data + val_data + test_data)
    config = ModelConfig(src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size,
                         **{"max_len": max(256, longest), **model_cfg})
    model = Seq2SeqTransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_at(1, cfg, config.d_model), betas=(0.9, 0.98),
                                  eps=1e-9, weight_decay=cfg.weight_decay)
    step, best, history, elapsed_before = 0, -math.inf, [], 0.0
    out = Path(out)
    if resume:
        state = load_resume_state(out, model, optimizer)
        step, best, history, elapsed_before = state["step"], state["best"], state["history"], state["elapsed"]
        log.info("resumed %s at step %d", out, step)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    extra = {"task": task.name, "tokenizer_kind": tokenizer_kind, "training": {**asdict(cfg), "world_size": world}}
    if data_path is not None:  # lets evaluate and export find the held-out split of a user corpus again
        extra["data"] = str(Path(data_path).resolve())
    rng = random.Random(cfg.seed * 1000 + rank + step)  # each rank draws its own batches
    start = time.monotonic()
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {task.name}", unit="step", file=sys.stderr)
    model.train()
    stop = False
    while step < cfg.steps and not stop:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, config.d_model)
        examples = rng.sample(train_data, min(cfg.batch_size, len(train_data)))  # a tiny corpus: all of it
        src, smask, tin, tmask, labels = make_batch(examples, config)
        logits = ddp_model(src, smask, tin, tmask)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=config.pad_id,
                               label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        optimizer.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        elapsed = elapsed_before + time.monotonic() - start
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if cfg.max_minutes and elapsed > cfg.max_minutes * 60:
                stop = True
            if world > 1:  # every rank stops together, on rank 0's clock
                flag = torch.tensor([float(stop)])
                dist.broadcast(flag, 0)
                stop = bool(flag.item())
            if rank == 0:
                metrics = evaluate(model, val_data, cfg, cfg.eval_examples)
                history.append({"step": step, "train_loss": loss.item(), "elapsed_s": round(elapsed, 1),
                                **{f"val_{k}": v for k, v in metrics.items()}})
                log.info("step %d %s", step, json.dumps(history[-1]))
                if bar is not None:
                    bar.write(f"step {step}: val loss {metrics['loss']:.3f}  token acc "
                              f"{metrics['token_accuracy']:.4f}  exact {metrics['exact_match']:.4f}")
                score = metrics["exact_match"] - 1e-6 * metrics["loss"]  # ties go to the lower loss
                if score > best:
                    best = score
                    save_model(out, model, tok, extra)
                save_resume_state(out, model, optimizer, {"step": step, "best": best, "history": history,
                                                          "elapsed": elapsed})
            if world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    result: dict = {}
    if rank == 0:
        from .checkpoint import load_model

        best_model, _, _ = load_model(out)
        test = evaluate(best_model, test_data, cfg)
        extra = {f"{name}_{k}": v for name, pairs in task.extra_tests.items()
                 for k, v in evaluate(best_model, encode_pairs(tok, pairs), cfg).items()}
        result = {"task": task.name, "parameters": model.num_parameters(), "steps": step, "world_size": world,
                  "train_minutes": round((elapsed_before + time.monotonic() - start) / 60, 2),
                  "best_val_exact_match": round(best, 4), "history": history,
                  **{f"test_{k}": v for k, v in test.items()}, **extra}
        write_metrics(out, result)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="attnserve train", description="Train the seq2seq Transformer.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default="dates", help="built-in task: dates (default), reverse, copy")
    src.add_argument("--data", type=Path, help="user corpus: source<TAB>target per line")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--tokenizer", choices=["char", "bpe"], help="default: char for tasks, bpe for --data")
    d = TrainConfig()
    for name in ("steps", "batch_size", "warmup", "eval_every", "eval_examples", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("lr_factor", "max_minutes", "label_smoothing"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    m = ModelConfig(src_vocab_size=8, tgt_vocab_size=8)
    for name in ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(m, name))
    p.add_argument("--dropout", type=float, default=m.dropout)
    p.add_argument("--post-norm", action="store_true", help="the paper's post-norm layers instead of pre-norm")
    p.add_argument("--share-embeddings", action="store_true",
                   help="one embedding table for source and target (they share the tokenizer)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        task = tsv_task(args.data, args.seed) if args.data else load_task(args.task, args.seed)
        cfg = TrainConfig(**{k: getattr(args, k) for k in ("steps", "batch_size", "warmup", "eval_every",
                                                             "eval_examples", "seed", "lr_factor",
                                                             "max_minutes", "label_smoothing")})
        cfg = replace(cfg, eval_every=min(cfg.eval_every, cfg.steps))
        model_cfg = {k: getattr(args, k) for k in ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers",
                                                  "d_ff", "dropout")}
        model_cfg["pre_norm"] = not args.post_norm
        model_cfg["share_embeddings"] = args.share_embeddings
        ModelConfig(src_vocab_size=8, tgt_vocab_size=8, **model_cfg)  # refuse a bad config before any work
        kind = args.tokenizer or ("bpe" if args.data else "char")
        result = train(task, args.out, model_cfg, cfg, kind, resume=args.resume, progress=not args.quiet,
                       data_path=args.data)
    except (ValueError, CorpusError, FileNotFoundError) as e:
        print(f"attnserve train: error: {e}", file=sys.stderr)
        return 2
    if result:
        extra = "".join(f", {name} exact match {result[f'{name}_exact_match']:.4f}" for name in task.extra_tests)
        print(f"{result['task']}: test exact match {result['test_exact_match']:.4f}, token accuracy "
              f"{result['test_token_accuracy']:.4f}{extra}, {result['parameters']:,} parameters, "
              f"{result['steps']} steps in {result['train_minutes']:.1f} min -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
