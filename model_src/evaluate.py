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
    p.add_argument("--alignment", action="store_true",
                   help="measure alignments against the task's gold instead: choose the heads on the validation "
                        "split, then report links aligned, precision, recall, AER and markup on each test set; "
                        "for a corpus without gold (--data, or the one it was trained on), agreement with a "
                        "lexical baseline")
    p.add_argument("--pairs", type=int, default=1000, help="pairs per split for --alignment (default 1000)")
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
    names = [args.split] if args.split else ["test", *task.extra_tests]
    if args.alignment:
        data = args.data or (Path(config["data"]) if config.get("data") else None)
        return _alignment(model, tok, task, {n: splits[n] for n in names}, args.pairs, data)
    for name in names:
        pairs = encode_pairs(tok, splits[name])
        start = time.monotonic()
        corpus = config.get("data") is not None or args.data is not None  # BLEU and chrF for user corpora
        m = evaluate(model, pairs, tok=tok, references=[t for _, t in splits[name]] if corpus else None)
        quality = f", BLEU {m['bleu']:.2f}, chrF {m['chrf']:.2f}" if "bleu" in m else ""
        print(f"{task.name} {name} split ({len(pairs)} held-out pairs): exact match {m['exact_match']:.4f}, "
              f"token accuracy {m['token_accuracy']:.4f}{quality}, loss {m['loss']:.3f} "
              f"[{model.num_parameters():,} parameters, {time.monotonic() - start:.1f} s]")
    return 0


def _alignment(model, tok, task, splits: dict, n: int, data: Path | None) -> int:
    from .alignment_eval import has_gold, measure

    if not has_gold(task):
        if data is None:
            print(f"attnserve evaluate: error: task {task.name!r} has no gold alignment (dates, reverse and copy "
                  "do), and no parallel corpus for the lexical baseline: pass --data FILE.tsv", file=sys.stderr)
            return 2
        return _lexical(model, tok, task, splits, n, data)
    start = time.monotonic()
    method, measured = measure(model, tok, task, splits, n, n)
    best = measured["chosen_on"]
    print(f"{task.name}: alignment method chosen on {min(n, len(task.validation))} validation pairs among "
          f"{measured['candidates_tried']} tried: {method.describe()} (validation: "
          f"{best['links_aligned_rate']:.2%} of gold links aligned)")
    for name in splits:
        s, m = measured[name], measured[name]["markup"]
        print(f"{task.name} {name} ({s['pairs']} held-out pairs): gold links aligned {s['links_aligned_rate']:.2%} "
              f"({s['links_aligned']}/{s['gold_links']}), precision {s['precision']:.4f}, recall {s['recall']:.4f}, "
              f"AER {s['aer']:.4f}; markup: well-formed {m['well_formed_rate']:.2%}, tags on their field "
              f"{m['tags_right_rate']:.2%} ({m['tags_right']}/{m['tags']})")
    print(f"[{time.monotonic() - start:.1f} s]")
    return 0


def _lexical(model, tok, task, splits: dict, n: int, data: Path) -> int:
    """No gold: choose the heads by agreement with a lexical baseline (Dice over the corpus, competitive linking)
    on the validation pairs' outputs, as export does, and report it and the default method on each split. `task`
    is the corpus's (`--data`, or the one the checkpoint was trained on)."""
    from .alignment_eval import corpus_lexicon, measure_lexical

    start = time.monotonic()
    try:
        lexicon = corpus_lexicon(data)
    except CorpusError as e:
        print(f"attnserve evaluate: error: {e}", file=sys.stderr)
        return 2
    method, measured = measure_lexical(model, tok, lexicon, task.validation[:n], {k: v[:n] for k, v in splits.items()})
    print(f"{task.name}: no gold alignment; word links compared with a lexical baseline ({measured['baseline']}) on "
          f"the model's own outputs. Chosen on {min(n, len(task.validation))} validation pairs among "
          f"{measured['candidates_tried']} tried: {method.describe()}")
    for name in splits:
        for label, a in (("chosen", measured[name]), ("default", measured[name]["default_method"])):
            print(f"{task.name} {name} ({a['pairs']} held-out pairs), the {label} method: agreement "
                  f"{a['agreement']:.4f}, precision {a['precision']:.4f}, recall {a['recall']:.4f} "
                  f"({a['in_both']:,} of {a['word_links']:,} word links; the baseline made {a['baseline_links']:,})")
    print(f"[{time.monotonic() - start:.1f} s]")
    return 0
