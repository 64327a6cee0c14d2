"""Training: AdamW, the paper's warmup schedule (or a fine-tuning one), label smoothing, clipping, validation, best
checkpoint, resume; any device and precision; one process or many under torchrun.

    attnserve train --task dates --out checkpoints/dates
    torchrun --nproc-per-node 4 -m model_src.train --data corpus.tsv --batch-tokens 8192 --precision bf16 ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import load_model, load_resume_state, save_model, save_resume_state, write_metrics
from .data import Batches, Corpus, encode_pairs
from .model import ModelConfig, Seq2SeqTransformer
from .runtime import Precision, all_reduce_sum, init_distributed, resolve_device
from .scoring import evaluate
from .tasks import CorpusError, Pair, TaskData, load_task
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer

log = logging.getLogger(__name__)
TOKENIZER_SAMPLE = 200_000  # corpus lines a new BPE tokenizer learns from (the corpus itself may be far larger)
CORPUS_TEST_CAP = 5_000  # held-out test pairs scored at the end of a corpus run (the split itself is fixed)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 128  # examples per process and micro-batch (when batch_tokens is 0)
    batch_tokens: int = 0  # > 0: batches of about this many padded tokens per process, by length buckets
    grad_accum: int = 1  # micro-batches per optimizer step
    lr_factor: float = 0.5  # scales the paper's schedule: factor * d_model^-0.5 * min(step^-0.5, step*warmup^-1.5)
    lr: float = 0.0  # > 0: fine-tuning schedule instead: linear warmup to lr, then linear decay to lr / 10
    warmup: int = 400
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 250
    eval_examples: int = 500  # validation exact match (and BLEU / chrF) is computed on this many held-out pairs
    max_minutes: float = 0.0  # stop early after this much wall time (0: no limit)
    seed: int = 0
    max_new_tokens: int = 48
    device: str = "auto"
    precision: str = "fp32"


def lr_at(step: int, cfg: TrainConfig, d_model: int) -> float:
    step = max(step, 1)
    if cfg.lr > 0:  # fine-tuning: a short warmup, then a linear decay, from a peak far below the paper's
        warm = max(cfg.warmup, 1)
        if step <= warm:
            return cfg.lr * step / warm
        return cfg.lr * max(0.1, 1.0 - 0.9 * (step - warm) / max(cfg.steps - warm, 1))
    return cfg.lr_factor * d_model ** -0.5 * min(step ** -0.5, step * cfg.warmup ** -1.5)


def build_tokenizer(texts, kind: str) -> Tokenizer:
    return BPETokenizer.from_texts(texts) if kind == "bpe" else CharTokenizer.from_texts(texts)


def _corpus_texts(corpus: Corpus):
    for i, (_, (src, tgt)) in enumerate(corpus.lines()):
        if i >= TOKENIZER_SAMPLE:
            return
        yield src
        yield tgt


@dataclass
class _Held:
    """Held-out pairs, encoded, with their reference texts (for BLEU / chrF on user corpora)."""

    pairs: list[Pair]
    encoded: list
    bleu: bool

    def score(self, model, tok, cfg: TrainConfig, limit: int | None = None) -> dict:
        return evaluate(model, self.encoded, cfg.max_new_tokens, limit, tok,
                        [t for _, t in self.pairs] if self.bleu else None)


def _fits(ex, max_len: int) -> bool:
    return len(ex[0]) <= max_len and len(ex[1]) + 1 <= max_len


def train(task: TaskData | None, out: Path, model_cfg: dict, cfg: TrainConfig, tokenizer_kind: str = "char",
          resume: bool = False, progress: bool = True, data_path: Path | None = None,
          init_from: Path | None = None) -> dict:
    """Train on a built-in `task` or the TSV corpus at `data_path` (streamed), writing the checkpoint `out`;
    with `init_from`, start from that checkpoint's weights and tokenizer. Returns the final metrics (rank 0)."""
    device = resolve_device(cfg.device)
    precision = Precision(cfg.precision, device)
    rank, world = init_distributed(device)
    torch.manual_seed(cfg.seed)
    corpus = Corpus(Path(data_path), cfg.seed) if task is None else None
    name = task.name if task is not None else Path(data_path).stem
    if init_from is not None:
        model, tok, _ = load_model(init_from)
    else:
        tok = build_tokenizer(task.texts() if task is not None else _corpus_texts(corpus), tokenizer_kind)
    train_examples = encode_pairs(tok, task.train) if task is not None else None  # encoded once, for every use
    held_pairs = {}
    for split in ("validation", "test"):
        pairs = getattr(task, split) if task is not None else corpus.split(split, CORPUS_TEST_CAP)
        if task is None and not pairs:
            pairs = corpus.split("train", 50)  # a tiny corpus: score on training pairs rather than nothing
        held_pairs[split] = (pairs, encode_pairs(tok, pairs))
    if init_from is None:
        seen = (train_examples or []) + [e for _, encoded in held_pairs.values() for e in encoded]
        longest = max((max(len(s), len(t) + 1) for s, t in seen), default=0) if task is not None else 0
        model = Seq2SeqTransformer(ModelConfig(src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size,
                                               **{"max_len": max(256, longest), **model_cfg}))
    config = model.config
    model.to(device).train()
    held = {}
    for split, (pairs, encoded) in held_pairs.items():
        keep = [i for i, ex in enumerate(encoded) if _fits(ex, config.max_len)]
        held[split] = _Held([pairs[i] for i in keep], [encoded[i] for i in keep], bleu=task is None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_at(1, cfg, config.d_model), betas=(0.9, 0.98),
                                  eps=1e-9, weight_decay=cfg.weight_decay)
    step, best, history, elapsed_before, tokens_before = 0, -math.inf, [], 0.0, 0.0
    out = Path(out)
    if resume:
        state = load_resume_state(out, model, optimizer)
        step, best, history = state["step"], state["best"], state["history"]
        elapsed_before, tokens_before = state["elapsed"], state.get("tokens", 0.0)
        if precision.scaler is not None and state.get("scaler"):
            precision.scaler.load_state_dict(state["scaler"])
        log.info("resumed %s at step %d (saved by %s process(es), now %d)", out, step, state.get("world_size"), world)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    extra = {"task": name if task is not None else None, "tokenizer_kind": getattr(tok, "kind", tokenizer_kind),
             "training": {**asdict(cfg), "world_size": world}}
    if data_path is not None:  # lets evaluate and export find the held-out split of a user corpus again
        extra["data"] = str(Path(data_path).resolve())
    if init_from is not None:
        extra["init_from"] = str(Path(init_from).resolve())
    batches = Batches(tok, config, examples=train_examples, corpus=corpus, batch_size=cfg.batch_size,
                      batch_tokens=cfg.batch_tokens, rank=rank, world=world, seed=cfg.seed * 7919 + step)
    start, tokens_here, skipped = time.monotonic(), 0, 0
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {name}", unit="step", file=sys.stderr)
    stop = False
    while step < cfg.steps and not stop:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, config.d_model)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            batch = [ex for ex in next(batches) if _fits(ex, config.max_len)]
            weight = 1.0 if batch else 0.0  # a batch of only over-long examples still joins DDP's all-reduce
            skipped += 0 if batch else 1
            batch = batch or [([config.eos_id], [])]
            src, smask, tin, tmask, labels = batches.tensors(batch, device)
            tokens_here += int(smask.sum() + tmask.sum()) if weight else 0
            sync = world == 1 or micro == cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else ddp_model.no_sync()), precision.autocast():
                logits = ddp_model(src, smask, tin, tmask)  # (B, T, V)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=config.pad_id,
                                       label_smoothing=cfg.label_smoothing)
            precision.backward(loss * weight / cfg.grad_accum)
        precision.step(optimizer, model.parameters(), cfg.clip_norm)
        elapsed = elapsed_before + time.monotonic() - start
        if bar is not None:
            bar.update(1)
            rate = tokens_here * world / max(time.monotonic() - start, 1e-9)  # rank 0's count x ranks: an estimate
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            tok_s=f"{rate:,.0f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if cfg.max_minutes and elapsed > cfg.max_minutes * 60:
                stop = True
            if world > 1:  # every rank stops together, on rank 0's clock
                flag = torch.tensor([float(stop)], device=device)
                dist.broadcast(flag, 0)
                stop = bool(flag.item())
            if rank == 0:
                metrics = held["validation"].score(model, tok, cfg, cfg.eval_examples)
                history.append({"step": step, "train_loss": loss.item(), "elapsed_s": round(elapsed, 1),
                                "tokens_per_second": round(tokens_here * world / max(time.monotonic() - start,
                                                                                      1e-9)),
                                **{f"val_{k}": v for k, v in metrics.items()}})
                log.info("step %d %s", step, json.dumps(history[-1]))
                if bar is not None:
                    bar.write(f"step {step}: val loss {metrics['loss']:.3f}  token acc "
                              f"{metrics['token_accuracy']:.4f}  exact {metrics['exact_match']:.4f}"
                              + (f"  BLEU {metrics['bleu']:.1f}  chrF {metrics['chrf']:.1f}" if "bleu" in metrics
                                 else ""))
                score = metrics["exact_match"] - 1e-6 * metrics["loss"]  # ties go to the lower loss
                if score > best:
                    best = score
                    save_model(out, model, tok, extra)
                save_resume_state(out, model, optimizer, {
                    "step": step, "best": best, "history": history, "elapsed": elapsed, "world_size": world,
                    "tokens": tokens_before + tokens_here * world,
                    "scaler": precision.scaler.state_dict() if precision.scaler else None})
            if world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    total_tokens = tokens_before + all_reduce_sum(tokens_here, device)
    train_seconds = elapsed_before + time.monotonic() - start
    result: dict = {}
    if rank == 0:
        best_model, _, _ = load_model(out)
        best_model.to(device)
        test = held["test"].score(best_model, tok, cfg)
        extras = {f"{n}_{k}": v for n, pairs in (task.extra_tests.items() if task else ())
                  for k, v in _Held(pairs, encode_pairs(tok, pairs), False).score(best_model, tok, cfg).items()}
        result = {"task": name, "parameters": model.num_parameters(), "steps": step, "world_size": world,
                  "device": str(device), "precision": cfg.precision,
                  "train_minutes": round(train_seconds / 60, 2),
                  "tokens_per_second": round(total_tokens / max(train_seconds, 1e-9)),
                  "best_val_exact_match": round(best, 4), "history": history,
                  **{f"test_{k}": v for k, v in test.items()}, **extras}
        if skipped:
            result["skipped_batches_too_long"] = skipped
        write_metrics(out, result)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="attnserve train", description="Train the seq2seq Transformer.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default="dates", help="built-in task: dates (default), reverse, copy")
    src.add_argument("--data", type=Path, help="user corpus: source<TAB>target per line, streamed from disk")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (any process count)")
    p.add_argument("--init-from", type=Path, help="fine-tune: start from this checkpoint's weights and tokenizer "
                   "(one trained here or imported with import-hf); the model options below are ignored")
    p.add_argument("--tokenizer", choices=["char", "bpe"], help="default: char for tasks, bpe for --data")
    d = TrainConfig()
    for name in ("steps", "batch_size", "batch_tokens", "grad_accum", "warmup", "eval_every", "eval_examples",
                 "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("lr_factor", "lr", "max_minutes", "label_smoothing"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16", "fp16"],
                   help="autocast precision (weights and checkpoints stay fp32; fp16 adds a gradient scaler)")
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
        task = None if args.data else load_task(args.task, args.seed)
        if args.data and not args.data.is_file():
            raise CorpusError(f"{args.data}: no such file")
        fields = ("steps", "batch_size", "batch_tokens", "grad_accum", "warmup", "eval_every", "eval_examples", "seed",
                  "lr_factor", "lr", "max_minutes", "label_smoothing", "device", "precision")
        cfg = TrainConfig(**{k: getattr(args, k) for k in fields})
        if args.init_from is not None and cfg.lr == 0:
            cfg = replace(cfg, lr=1e-4, warmup=min(cfg.warmup, max(cfg.steps // 10, 1)))  # fine-tuning's default
        if cfg.grad_accum < 1 or cfg.batch_tokens < 0:
            raise ValueError("--grad-accum must be >= 1 and --batch-tokens >= 0")
        cfg = replace(cfg, eval_every=min(cfg.eval_every, cfg.steps))
        model_cfg = {k: getattr(args, k) for k in ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers",
                                                  "d_ff", "dropout")}
        model_cfg["pre_norm"] = not args.post_norm
        model_cfg["share_embeddings"] = args.share_embeddings
        ModelConfig(src_vocab_size=8, tgt_vocab_size=8, **model_cfg)  # refuse a bad config before any work
        resolve_device(cfg.device)
        Precision(cfg.precision, resolve_device(cfg.device))
        kind = args.tokenizer or ("bpe" if args.data else "char")
        result = train(task, args.out, model_cfg, cfg, kind, resume=args.resume, progress=not args.quiet,
                       data_path=args.data, init_from=args.init_from)
    except (ValueError, CorpusError, FileNotFoundError) as e:
        print(f"attnserve train: error: {e}", file=sys.stderr)
        return 2
    if result:
        extra = "".join(f", {name} exact match {result[f'{name}_exact_match']:.4f}"
                        for name in (task.extra_tests if task else ()))
        quality = f", BLEU {result['test_bleu']:.1f}, chrF {result['test_chrf']:.1f}" if "test_bleu" in result else ""
        print(f"{result['task']}: test exact match {result['test_exact_match']:.4f}, token accuracy "
              f"{result['test_token_accuracy']:.4f}{quality}{extra}, {result['parameters']:,} parameters, "
              f"{result['steps']} steps in {result['train_minutes']:.1f} min ({result['tokens_per_second']:,} "
              f"tokens/s, {result['device']}, {result['precision']}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
