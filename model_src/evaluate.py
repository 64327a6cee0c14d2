"""`attnserve evaluate CKPT`: greedy exact match and token accuracy of a checkpoint on its task's test split."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .checkpoint import CheckpointError, load_model
from .data import encode_pairs
from .scoring import evaluate
from .tasks import CorpusError, task_of_checkpoint, tsv_task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnserve evaluate", description=__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", type=Path, help="TSV corpus the checkpoint was trained on (default: its task)")
    p.add_argument("--split", help="validation, test or one of the task's other held-out sets (dates: test_years); "
                   "default: test and every other held-out set")
    args = p.parse_args(argv)
    try:
        model, tok, config = load_model(args.checkpoint)
        seed = config.get("training", {}).get("seed", 0)
        task = tsv_task(args.data, seed) if args.data else task_of_checkpoint(config)
        if task is None:
            raise ValueError(f"cannot rebuild the data of task {config.get('task')!r}: pass --data FILE.tsv")
    except (CheckpointError, CorpusError, ValueError) as e:
        print(f"attnserve evaluate: error: {e}", file=sys.stderr)
        return 2
    splits = {"validation": task.validation, "test": task.test, **task.extra_tests}
    if args.split is not None and args.split not in splits:
        print(f"attnserve evaluate: error: unknown split {args.split!r}; {task.name} has {', '.join(splits)}",
              file=sys.stderr)
        return 2
    for name in [args.split] if args.split else ["test", *task.extra_tests]:
        pairs = encode_pairs(tok, splits[name])
        start = time.monotonic()
        corpus = config.get("data") is not None or args.data is not None  # BLEU and chrF for user corpora
        m = evaluate(model, pairs, tok=tok, references=[t for _, t in splits[name]] if corpus else None)
        quality = f", BLEU {m['bleu']:.2f}, chrF {m['chrf']:.2f}" if "bleu" in m else ""
        print(f"{task.name} {name} split ({len(pairs)} held-out pairs): exact match {m['exact_match']:.4f}, "
              f"token accuracy {m['token_accuracy']:.4f}{quality}, loss {m['loss']:.3f} "
              f"[{model.num_parameters():,} parameters, {time.monotonic() - start:.1f} s]")
    return 0
