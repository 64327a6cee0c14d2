"""Validation of exported graphs against PyTorch; export publishes nothing that fails here.

Checks: `onnx.checker` (full), ONNX Runtime vs PyTorch on held-out batches with padding (encoder outputs,
every decoder step's logits / present keys and values / attention, past length 0 to the longest target),
attention rows summing to 1, greedy decoding token-identical on >= 64 held-out inputs. Quantized graphs have a
gate of their own (`quality.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from model_repository import flat_feeds, grouped
from model_src.decoding import generate, pad_batch, suppress
from model_src.model import Seq2SeqTransformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerances:
    logits: float = 1e-4
    hidden: float = 1e-4  # cross keys/values, present keys/values, embeddings, hidden states
    attention: float = 1e-5
    row_sum: float = 1e-5


class ValidationError(RuntimeError):
    """The exported graphs do not match the PyTorch model; the message says which check and by how much."""


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session(path: Path, threads: int = 1, provider: str = "cpu") -> ort.InferenceSession:
    """The session options serving uses too: full graph optimisation, one intra-op thread; on `provider` (cpu or
    cuda), refused if ONNX Runtime falls back to another. CUDA runs without TF32, so fp32 parity means fp32."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    name = PROVIDERS[provider]
    providers = [(name, {"use_tf32": "0"}), "CPUExecutionProvider"] if provider == "cuda" else [name]
    made = ort.InferenceSession(str(path), so, providers=providers)
    if made.get_providers()[0] != name:
        raise ValidationError(f"validation asked for {name} for {path.name} and ONNX Runtime gave "
                              f"{made.get_providers()}; install onnxruntime-gpu on a machine with CUDA, or validate "
                              "with --validate-on cpu")
    return made


def check_graphs(paths: dict[str, Path]) -> None:
    for name, path in paths.items():
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ValidationError(f"onnx.checker rejected {name}: {e}") from e


def run(session: ort.InferenceSession, feeds: dict, outputs: list[str] | None = None) -> dict:
    """One run of a graph by the contract's names: per-layer caches go in as stacked arrays or sequences of
    layers (`model_repository.flat_feeds`) and come out as tuples of layers (`grouped`)."""
    names = outputs or [o.name for o in session.get_outputs()]
    flat = flat_feeds([i.name for i in session.get_inputs()], feeds)
    return grouped(names, session.run(names, flat))


def _maxdiff(a: np.ndarray | tuple, b: torch.Tensor | list) -> float:
    if isinstance(a, tuple):  # per-layer outputs against the reference's per-layer tensors
        return max((_maxdiff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    b = b.detach().numpy()
    if a.shape != b.shape:
        raise ValidationError(f"shape mismatch: ONNX {a.shape} vs PyTorch {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def _row_sum_error(probs: np.ndarray, query_ok: np.ndarray | None = None) -> float:
    sums = probs.sum(-1)
    if query_ok is not None:
        sums = sums[..., query_ok]
    return float(np.abs(sums - 1.0).max()) if sums.size else 0.0


@torch.no_grad()
def parity(model: Seq2SeqTransformer, sessions: dict[str, ort.InferenceSession], sources: list[list[int]],
           batch_size: int = 16, max_steps: int = 48) -> dict:
    """Largest ORT-vs-PyTorch differences over held-out batches, decoding each batch's PyTorch greedy path."""
    cfg = model.config
    worst: dict[str, float] = {}

    def note(key: str, value: float) -> None:
        worst[key] = max(worst.get(key, 0.0), value)

    longest_past = 0
    for i in range(0, len(sources), batch_size):
        chunk = sources[i:i + batch_size]
        src_ids, src_mask = pad_batch(chunk, cfg.pad_id)
        feeds = {"src_ids": src_ids.numpy(), "src_mask": src_mask.numpy()}
        ck, cv, enc_attn, emb, hidden = sessions["encoder_attn"].run(None, feeds)
        fast_ck, _ = sessions["encoder"].run(None, feeds)
        ref, ref_hidden = model.encode(src_ids, src_mask, return_hidden=True)
        note("cross_kv", max(_maxdiff(ck, ref.cross_k), _maxdiff(cv, ref.cross_v)))
        note("fast_vs_attn_graph", float(np.abs(fast_ck - ck).max()))
        note("hidden", max(_maxdiff(emb, model.embed_source(src_ids)), _maxdiff(hidden, torch.stack(ref_hidden))))
        note("attention", _maxdiff(enc_attn, ref.self_attn))
        note("row_sum", _row_sum_error(enc_attn))
        B = src_ids.size(0)
        past_k, past_v = model.empty_cache(B)
        np_pk, np_pv = past_k.numpy(), past_v.numpy()
        token = torch.full((B,), cfg.bos_id)
        for step in range(max_steps):
            position = torch.full((B,), step)
            self_mask = torch.ones(B, step + 1, dtype=torch.bool)
            o = model.decode_step(token, position, self_mask, past_k, past_v, ref.cross_k, ref.cross_v, src_mask,
                                  stacked=False)
            dfeeds = {"input_ids": token.numpy(), "positions": position.numpy(), "self_mask": self_mask.numpy(),
                      "past_k": np_pk, "past_v": np_pv, "cross_k": ck, "cross_v": cv,
                      "src_mask": src_mask.numpy()}
            d = run(sessions["decoder_attn"], dfeeds)
            fast_logits = run(sessions["decoder"], dfeeds, ["logits"])["logits"]
            note("logits", _maxdiff(d["logits"], o.logits))
            note("fast_vs_attn_graph", float(np.abs(fast_logits - d["logits"]).max()))
            note("present_kv", max(_maxdiff(d["present_k"], o.present_k), _maxdiff(d["present_v"], o.present_v)))
            note("attention", max(_maxdiff(d["dec_self_attn"], o.self_attn), _maxdiff(d["cross_attn"], o.cross_attn)))
            note("row_sum", max(_row_sum_error(d["dec_self_attn"]), _row_sum_error(d["cross_attn"])))
            past_k, past_v, np_pk, np_pv = o.present_k, o.present_v, d["present_k"], d["present_v"]
            longest_past = max(longest_past, step)
            token = suppress(o.logits, cfg.suppress_ids).argmax(-1)
            if (token == cfg.eos_id).all():
                break
    return {"max_abs_diff": worst, "inputs": len(sources), "batch_size": batch_size,
            "longest_past_checked": longest_past}


def ort_greedy(sessions: dict[str, ort.InferenceSession], cfg: dict, sources: list[list[int]],
               max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding on the fast graphs with the KV cache, batched, in numpy."""
    L, nh, hs = cfg["n_decoder_layers"], cfg["n_heads"], cfg["d_model"] // cfg["n_heads"]
    B, S = len(sources), max(len(s) for s in sources)
    src_ids = np.full((B, S), cfg["pad_id"], dtype=np.int64)
    src_mask = np.zeros((B, S), dtype=bool)
    for i, s in enumerate(sources):
        src_ids[i, : len(s)], src_mask[i, : len(s)] = s, True
    ck, cv = sessions["encoder"].run(None, {"src_ids": src_ids, "src_mask": src_mask})
    pk = pv = np.zeros((L, B, nh, 0, hs), dtype=np.float32)  # (L, B, nh, P, hs)
    token = np.full((B,), cfg["bos_id"], dtype=np.int64)
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        d = run(sessions["decoder"], {
            "input_ids": token, "positions": np.full((B,), step, dtype=np.int64),
            "self_mask": np.ones((B, step + 1), dtype=bool), "past_k": pk, "past_v": pv, "cross_k": ck,
            "cross_v": cv, "src_mask": src_mask}, ["logits", *(f"present_{kv}.{i}" for kv in "kv" for i in range(L))])
        logits, pk, pv = d["logits"], d["present_k"], d["present_v"]
        if cfg.get("suppress_ids"):
            logits[:, cfg["suppress_ids"]] = -np.inf  # never generated, as model_src.decoding does
        token = logits.argmax(-1).astype(np.int64)
        for i in np.flatnonzero(~done & (token != cfg["eos_id"])):
            out[i].append(int(token[i]))
        done |= token == cfg["eos_id"]
        if done.all():
            break
    return out


def greedy_agreement(model: Seq2SeqTransformer, sessions, sources: list[list[int]], max_new_tokens: int,
                     batch_size: int = 32) -> dict:
    """Token-for-token comparison of PyTorch and ORT greedy outputs."""
    mismatches = []
    for i in range(0, len(sources), batch_size):
        chunk = sources[i:i + batch_size]
        ref = generate(model, chunk, max_new_tokens=max_new_tokens)
        got = ort_greedy(sessions, model.config.to_dict(), chunk, max_new_tokens)
        mismatches += [i + j for j, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b]
    return {"inputs": len(sources), "identical": len(sources) - len(mismatches), "mismatched_inputs": mismatches[:10]}


def enforce(report: dict, tol: Tolerances) -> None:
    """Raise ValidationError naming every check that failed."""
    d = report["parity"]["max_abs_diff"]
    limits = {"logits": tol.logits, "cross_kv": tol.hidden, "present_kv": tol.hidden, "hidden": tol.hidden,
              "fast_vs_attn_graph": tol.logits, "attention": tol.attention, "row_sum": tol.row_sum}
    failed = [f"{k} max abs diff {d[k]:.3g} > {v:.0e}" for k, v in limits.items() if d.get(k, 0.0) > v]
    g = report["greedy"]
    if g["identical"] != g["inputs"]:
        failed.append(f"greedy decoding differs from PyTorch on {g['inputs'] - g['identical']} of {g['inputs']} "
                      f"inputs (e.g. #{g['mismatched_inputs'][:3]})")
    if failed:
        raise ValidationError("validation failed: " + "; ".join(failed))
