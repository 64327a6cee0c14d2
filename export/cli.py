"""`attnserve export` and `attnserve inspect`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from model_repository import RepositoryError, open_version


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnserve export",
                                description="Export a checkpoint to a validated version in a model repository.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--repo", type=Path, default=Path("models"))
    p.add_argument("--name", default="default")
    p.add_argument("--version", type=int, help="default: the next integer")
    p.add_argument("--opset", type=int, default=20)
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="int8: dynamic quantization with fused int8 GEMMs (fastest on CPU); int4: weight-only "
                        "4-bit blocks (smallest)")
    p.add_argument("--max-quality-drop", "--max-int8-drop", type=float, default=0.005,
                   help="task models: refuse a quantized version whose held-out exact match is more than this "
                        "below fp32's (default 0.005)")
    p.add_argument("--min-token-agreement", type=float, default=0.80,
                   help="models without targets: refuse below this share of output tokens equal to fp32's")
    p.add_argument("--min-chrf", type=float, default=90.0,
                   help="models without targets: refuse below this chrF of the outputs against fp32's (0-100)")
    p.add_argument("--validate-on", choices=["cpu", "cuda"], default="cpu",
                   help="execution provider the parity, greedy and quantization checks run on (default cpu; cuda "
                        "needs onnxruntime-gpu and a GPU, and runs without TF32)")
    p.add_argument("--greedy-inputs", type=int, default=128, help="held-out inputs for the greedy check (>= 64)")
    p.add_argument("--if-changed", action="store_true",
                   help="do nothing if the latest version was exported from this same checkpoint")
    p.add_argument("--alignment-data", type=Path, metavar="FILE.tsv",
                   help="parallel sentences (source<TAB>target) for choosing the alignment heads of a model whose "
                        "task has no gold (an imported Marian): those that agree best with a lexical baseline "
                        "(default: the corpus the checkpoint was trained on, if any)")
    p.add_argument("--attention-tolerance", type=float, default=1e-5,
                   help="max abs difference allowed on attention probabilities (never above 1e-4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.attention_tolerance > 1e-4:
        p.error("--attention-tolerance may not exceed 1e-4")
    if args.greedy_inputs < 64:
        p.error("--greedy-inputs must be at least 64")
    if args.alignment_data is not None and not args.alignment_data.is_file():
        p.error(f"--alignment-data {args.alignment_data}: no such file")

    from model_src.checkpoint import CheckpointError
    from model_src.tasks import CorpusError

    from .pipeline import ExportConfig, export_checkpoint, up_to_date
    from .quality import QualityGate
    from .validate import Tolerances, ValidationError

    cfg = ExportConfig(checkpoint=args.checkpoint, repo=args.repo, name=args.name, version=args.version,
                       opset=args.opset, quantize=args.quantize,
                       validate_on=args.validate_on,
                       quality=QualityGate(args.max_quality_drop, args.min_token_agreement, args.min_chrf),
                       greedy_inputs=args.greedy_inputs, tolerances=Tolerances(attention=args.attention_tolerance),
                       alignment_data=args.alignment_data)
    try:
        if args.if_changed and (current := up_to_date(args.repo, args.name, args.checkpoint, args.quantize)):
            print(f"{current} was exported from this checkpoint already; nothing to do (--if-changed)")
            return 0
        final = export_checkpoint(cfg, progress=lambda msg: print(msg, flush=True))
    except (CheckpointError, CorpusError, RepositoryError, ValidationError) as e:
        print(f"attnserve export: error: {e}\nnothing was published", file=sys.stderr)
        return 1
    report = open_version(final, verify_checksums=False).validation
    d = report["parity"]["max_abs_diff"]
    print(f"parity: logits {d['logits']:.2e}, attention {d['attention']:.2e}, row sums {d['row_sum']:.2e}; "
          f"greedy identical on {report['greedy']['identical']}/{report['greedy']['inputs']} held-out inputs")
    if "quantization" in report:
        q = report["quantization"]
        scheme = q["scheme"]
        if "exact_match_fp32" in q:
            print(f"{scheme}: exact match {q[f'exact_match_{scheme}']:.4f} vs fp32 {q['exact_match_fp32']:.4f}")
        print(f"{scheme}: outputs identical to fp32 on {q['outputs_identical_to_fp32']:.1%} of inputs, token "
              f"agreement {q['token_agreement']:.1%}, chrF {q['chrf_vs_fp32']:.1f}")
    w = report["weights"]
    print(f"weights: one file of {w['bytes'] / 2**20:.1f} MiB for {w['bytes_referenced'] / 2**20:.1f} MiB of "
          "tensors in the graphs")
    return 0


def format_blocks(manifest: dict) -> str:
    rows = [("graph", "block", "layer", "kind", "heads", "head_dim", "probabilities")]
    for b in manifest["attention_blocks"]:
        rows.append((b["graph"], b["block"], str(b["layer"]), b["kind"], str(b["heads"]), str(b["head_dim"]),
                     f"yes ({b['probabilities_output']})" if b["probabilities_output"] else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def inspect_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnserve inspect",
                                description="List the attention blocks found in an exported version's graphs.")
    p.add_argument("version_dir", type=Path, help="models/NAME/VERSION")
    args = p.parse_args(argv)
    try:
        manifest = open_version(args.version_dir, verify_checksums=False)
    except RepositoryError as e:
        print(f"attnserve inspect: error: {e}", file=sys.stderr)
        return 2
    import onnx

    from .blocks import expected_blocks, find_blocks

    cfg, shape = manifest.model_config, manifest.model
    found, problems = [], []
    for name, graph in manifest.graphs.items():
        blocks = find_blocks(onnx.load(str(manifest.file(graph.file))), name, shape.head_dim)
        want = expected_blocks(cfg, name)
        if len(blocks) != want:
            problems.append(f"{name}: {len(blocks)} attention blocks in the graph, config implies {want}")
        problems += [f"{name}: {b.block} has {b.heads} heads, config says {shape.n_heads}"
                     for b in blocks if b.heads != shape.n_heads]
        found += [b.to_dict() for b in blocks]
    print(f"{manifest.name} v{manifest.version} ({manifest.precision}, opset {manifest.opset}): "
          f"{len(found)} attention blocks")
    print(format_blocks({"attention_blocks": found}))
    for problem in problems:
        print(f"MISMATCH: {problem}", file=sys.stderr)
    return 1 if problems else 0
