"""Is a fused attention operator faster than our explicit attention in ONNX Runtime? One decoder-step block, measured.

    python -m bench.fused_attention [--repeats 300] [--out out/fused_attention.md]

The same self-attention step (a new token's query against the cache plus its own key/value, padded keys masked),
built three ways as one-block ONNX graphs and run on the CPU execution provider with one intra-op thread:
the explicit MatMul / Where / Softmax / MatMul the exported graphs use, the standard opset-23 `Attention`
operator, and ONNX Runtime's `com.microsoft.MultiHeadAttention` contrib operator. Shapes of the `dates` model
(4 heads of 32) and of the paper's base shape (8 heads of 64), batch 1 and 16, past 8 and 128. All three must
agree (max |diff| is printed); the fast graphs would switch only where the fused one is clearly faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .report import publish

SHAPES = [("dates", 4, 32), ("base", 8, 64)]  # (model, heads, head_dim)
BATCHES = (1, 16)
PASTS = (8, 128)


def _graphs(nh: int, hs: int):
    """The three variants as ModelProtos: inputs q, k, v (B, nh, 1, hs), past_k/v (B, nh, P, hs), mask (B, P+1)."""
    from onnx import TensorProto, helper

    f, b = TensorProto.FLOAT, TensorProto.BOOL
    cache = ["B", nh, "P", hs]
    step = ["B", nh, 1, hs]
    inputs = [helper.make_tensor_value_info(n, f, step) for n in ("q", "k", "v")] + \
             [helper.make_tensor_value_info(n, f, cache) for n in ("past_k", "past_v")] + \
             [helper.make_tensor_value_info("mask", b, ["B", "T"])]
    outputs = [helper.make_tensor_value_info("y", f, None), helper.make_tensor_value_info("present_k", f, None),
               helper.make_tensor_value_info("present_v", f, None)]
    scale = helper.make_tensor("scale", f, [], [1.0 / np.sqrt(hs)])
    lowest = helper.make_tensor("lowest", f, [], [float(np.finfo(np.float32).min)])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])

    explicit = helper.make_graph([
        helper.make_node("Concat", ["past_k", "k"], ["present_k"], axis=2),
        helper.make_node("Concat", ["past_v", "v"], ["present_v"], axis=2),
        helper.make_node("Transpose", ["present_k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),  # (B, nh, 1, T)
        helper.make_node("Mul", ["qk", "scale"], ["scores"]),
        helper.make_node("Unsqueeze", ["mask", "axes"], ["mask4"]),  # (B, 1, 1, T)
        helper.make_node("Where", ["mask4", "scores", "lowest"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "present_v"], ["y"]),  # (B, nh, 1, hs)
    ], "explicit", inputs, outputs, [scale, lowest, axes])

    standard = helper.make_graph([
        helper.make_node("Unsqueeze", ["mask", "axes"], ["mask4"]),  # (B, 1, 1, T): no broadcast over T_q on CPU
        helper.make_node("Attention", ["q", "k", "v", "mask4", "past_k", "past_v"], ["y", "present_k", "present_v"],
                         scale=float(1.0 / np.sqrt(hs))),
    ], "standard", inputs, outputs, [axes])

    shape3 = helper.make_tensor("shape3", TensorProto.INT64, [3], [0, 1, nh * hs])
    contrib = helper.make_graph([
        *[helper.make_node("Transpose", [n], [f"{n}t"], perm=[0, 2, 1, 3]) for n in ("q", "k", "v")],
        *[helper.make_node("Reshape", [f"{n}t", "shape3"], [f"{n}3"]) for n in ("q", "k", "v")],  # (B, 1, C)
        helper.make_node("Cast", ["mask"], ["mask_i32"], to=TensorProto.INT32),  # key padding mask (B, T)
        helper.make_node("MultiHeadAttention", ["q3", "k3", "v3", "", "mask_i32", "", "past_k", "past_v"],
                         ["y3", "present_k", "present_v"], domain="com.microsoft", num_heads=nh),
        helper.make_node("Reshape", ["y3", "shape4"], ["yt"]),
        helper.make_node("Transpose", ["yt"], ["y"], perm=[0, 2, 1, 3]),  # back to (B, nh, 1, hs)
    ], "contrib", inputs, outputs, [shape3, helper.make_tensor("shape4", TensorProto.INT64, [4], [0, 1, nh, hs])])

    opsets = {"explicit": [helper.make_opsetid("", 20)], "standard": [helper.make_opsetid("", 23)],
              "contrib": [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]}
    graphs = {"explicit": explicit, "standard": standard, "contrib": contrib}
    return {k: helper.make_model(g, opset_imports=opsets[k], ir_version=10) for k, g in graphs.items()}


def _session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(rng, B: int, nh: int, hs: int, P: int) -> dict[str, np.ndarray]:
    def randn(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    mask = np.ones((B, P + 1), bool)
    mask[::2, : P // 2] = False  # every other row left-padded: half its cache is padding
    return {"q": randn(B, nh, 1, hs), "k": randn(B, nh, 1, hs), "v": randn(B, nh, 1, hs),
            "past_k": randn(B, nh, P, hs), "past_v": randn(B, nh, P, hs), "mask": mask}


def measure(repeats: int) -> list[dict]:
    from tqdm import tqdm

    rng = np.random.default_rng(0)
    rows = []
    cases = [(m, nh, hs, B, P) for m, nh, hs in SHAPES for B in BATCHES for P in PASTS]
    for model, nh, hs, B, P in tqdm(cases, desc="shapes", file=sys.stderr):
        sessions = {k: _session(g) for k, g in _graphs(nh, hs).items()}
        feeds = _feeds(rng, B, nh, hs, P)
        outs = {k: s.run(None, feeds) for k, s in sessions.items()}
        diff = max(float(np.abs(outs[k][0] - outs["explicit"][0]).max()) for k in outs)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(repeats):  # interleaved, so noise hits all three alike
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds)
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        rows.append({"model": model, "heads": nh, "head_dim": hs, "batch": B, "past": P, "max_abs_diff": diff,
                     **{f"{k}_us": v for k, v in med.items()}})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shape (heads x dim) | batch | past | explicit us | opset-23 Attention us | vs explicit | "
             "com.microsoft MHA us | vs explicit | max abs diff |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e = r["explicit_us"]
        lines.append(f"| {r['model']} ({r['heads']} x {r['head_dim']}) | {r['batch']} | {r['past']} | {e:.1f} | "
                     f"{r['standard_us']:.1f} | {r['standard_us'] / e:.2f}x | {r['contrib_us']:.1f} | "
                     f"{r['contrib_us'] / e:.2f}x | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("out/fused_attention.md"))
    args = p.parse_args(argv)
    publish(markdown(measure(args.repeats)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
