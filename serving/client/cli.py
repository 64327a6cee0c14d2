"""`attnserve generate | predict | models`: the command-line client."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
import numpy as np

from .client import AttnServeClient
from .connection import add_arguments, explain, from_arguments


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the source text")
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--model", default="")
    p.add_argument("--version", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--attention", choices=["none", "cross", "self", "all"], default="none")
    p.add_argument("--layers", type=int, nargs="*", default=[])
    p.add_argument("--heads", type=int, nargs="*", default=[])
    p.add_argument("--mean", action="store_true", help="average attention over heads")
    p.add_argument("--plot", type=Path, help="write an attention heatmap PNG here")
    p.add_argument("--alignment", action="store_true", help="print which source span each output span comes from")
    p.add_argument("--markup", action="store_true", help="the text holds inline tags: print the output with them")
    p.add_argument("--timeout", type=float, default=60.0)
    add_arguments(p)


def _options(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed, "stop": args.stop}


def _weights(t) -> np.ndarray:
    return np.asarray(t.weights, dtype=np.float32).reshape(-1, t.query_length, t.key_length)  # (h, Tq, Tk)


def _panels(tensors_by_step: list[list], kind: str) -> list[tuple[str, np.ndarray]]:
    """Per (layer, head) panels (rows: steps) from per-step AttentionTensors of one kind."""
    panels: dict[tuple, list[np.ndarray]] = {}
    for step in tensors_by_step:
        for t in step:
            if t.kind != kind:
                continue
            w = _weights(t)
            for j in range(w.shape[0]):
                head = "mean" if t.mean_over_heads else f"head {t.head_indices[j]}"
                panels.setdefault((t.layer, head), []).append(w[j])
    out = []
    for (layer, head), rows in panels.items():
        width = max(r.shape[-1] for r in rows)
        m = np.zeros((sum(r.shape[0] for r in rows), width), np.float32)
        i = 0
        for r in rows:
            m[i:i + r.shape[0], : r.shape[1]] = r
            i += r.shape[0]
        out.append((f"{kind} layer {layer}, {head}", m))
    return out


def _plot(path: Path, steps: list[list], src_tokens: list[str], out_tokens: list[str], attention: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("--plot needs matplotlib: pip install 'attnserve[plot]'", file=sys.stderr)
        return
    from .plot import heatmap

    kind = "cross" if attention in ("cross", "all") else "decoder_self"
    cols = src_tokens if kind == "cross" else ["<bos>", *out_tokens[:-1]]
    panels = _panels(steps, kind)
    if panels:
        heatmap(path, panels, out_tokens, cols, title=f"{kind} attention",
                xlabel="input tokens" if kind == "cross" else "output tokens so far (decoder input)")
        print(f"heatmap written to {path}", file=sys.stderr)


def _fail(e: grpc.RpcError) -> int:
    hint = explain(e)
    print(f"error: {e.code().name}: {e.details()}" + (f"\n  {hint}" if hint else ""), file=sys.stderr)
    return 1


def _client(args: argparse.Namespace) -> AttnServeClient:
    return AttnServeClient(args.server, connection=from_arguments(args))


def generate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnserve generate", description="Stream a generation, token by token.")
    _common(p)
    args = p.parse_args(argv)
    attention = "cross" if args.plot and args.attention == "none" else args.attention
    steps, out_tokens, src_tokens = [], [], []
    with _client(args) as client:
        try:
            for msg in client.generate(args.text, args.model, args.version, attention, args.layers, args.heads,
                                       args.mean, timeout=args.timeout, alignment=args.alignment,
                                       markup=args.markup, **_options(args)):
                src_tokens = src_tokens or list(msg.source_tokens)
                if msg.HasField("token"):
                    out_tokens.append(msg.token.text)
                    steps.append(list(msg.attention))
                    if attention == "none":
                        print(msg.token.text, end="", flush=True)
                    else:
                        print(_describe(msg, src_tokens), flush=True)
                if msg.HasField("finish"):
                    f = msg.finish
                    reason = type(f).DESCRIPTOR.fields_by_name["reason"].enum_type.values_by_number[f.reason].name
                    print(("\n" if attention == "none" else "") +
                          f"[{f.model.name} v{f.model.version}] {f.text!r}: {f.generated_tokens} tokens, "
                          f"{reason.removeprefix('FINISH_REASON_').lower()}, first token "
                          f"{f.timings.time_to_first_token_ms:.1f} ms, total {f.timings.total_ms:.1f} ms",
                          file=sys.stderr)
                    _print_alignment(args, f.text, f.alignment, f.word_alignment, f.markup)
        except grpc.RpcError as e:
            return _fail(e)
    if args.plot:
        _plot(args.plot, steps, src_tokens, out_tokens, attention)
    return 0


def _describe(msg, src_tokens: list[str]) -> str:
    """One line per token: its text, log-prob, and the source token each layer's cross-attention favours."""
    parts = [f"{msg.token.index:3d} {msg.token.text!r:6} logprob {msg.token.logprob:7.3f}"]
    for t in msg.attention:
        if t.kind == "cross":
            row = _weights(t).mean(axis=0)[0]  # mean over the heads sent
            j = int(row.argmax())
            label = src_tokens[j] if j < len(src_tokens) else str(j)
            parts.append(f"layer {t.layer} -> {label!r} @{j} ({row[j]:.2f})")
    return "  ".join(parts)


def _print_alignment(args, output: str, links, words, markup: str) -> None:
    if args.markup:
        print(f"markup: {markup}")
    if args.alignment:
        for name, group in (("links", links), ("words", words)):
            shown = [f"{output[x.target_start:x.target_end]!r} <- {args.text[x.source_start:x.source_end]!r}"
                     for x in group]
            print(f"{name}: {', '.join(shown)}")


def predict_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnserve predict", description="One unary prediction.")
    _common(p)
    p.add_argument("--beam-size", type=int, default=0)
    args = p.parse_args(argv)
    with _client(args) as client:
        try:
            r = client.predict(args.text, args.model, args.version, args.beam_size, args.attention, args.layers,
                               args.heads, args.mean, timeout=args.timeout, alignment=args.alignment,
                               markup=args.markup, **_options(args))
        except grpc.RpcError as e:
            return _fail(e)
    print(r.text)
    _print_alignment(args, r.text, r.alignment, r.word_alignment, r.markup)
    for t in r.attention:
        print(f"  attention {t.kind} layer {t.layer}: {len(t.head_indices) if not t.mean_over_heads else 1} x "
              f"{t.query_length} x {t.key_length}", file=sys.stderr)
    if args.plot:
        kind = "cross" if args.attention in ("cross", "all", "none") else "decoder_self"
        tensors = [t for t in r.attention if t.kind == kind]
        steps = [[_row(t, i) for t in tensors] for i in range(len(r.tokens))]
        _plot(args.plot, steps, list(r.source_tokens), [t.text for t in r.tokens],
              "cross" if kind == "cross" else "self")
    return 0


def _row(t, i):
    """Row i of a full AttentionTensor, as a one-query AttentionTensor."""
    from protos.attnserve.v1 import attnserve_pb2 as pb

    w = _weights(t)[:, i:i + 1]  # (h, 1, Tk)
    return pb.AttentionTensor(kind=t.kind, layer=t.layer, head_indices=t.head_indices,
                              mean_over_heads=t.mean_over_heads, query_length=1, key_length=t.key_length,
                              weights=w.ravel().tolist())


def models_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnserve models", description="List the models a server holds.")
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--info", action="store_true", help="also print each model's providers and attention blocks")
    add_arguments(p)
    args = p.parse_args(argv)
    with _client(args) as client:
        try:
            models = client.list_models().models
            for m in models:
                print(f"{m.name}\tv{m.version}\t{m.precision}\ttask={m.task}\ton disk: {list(m.versions_on_disk)}")
                if args.info:
                    info = client.model_info(m.name)
                    print(f"  providers: {', '.join(info.execution_providers)}; "
                          f"{len(info.attention_blocks)} attention blocks")
        except grpc.RpcError as e:
            return _fail(e)
    return 0
