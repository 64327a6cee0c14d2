"""In-process anchors for the server's figures: the model's own cost in PyTorch, in plain ONNX Runtime, and on paper.

Every comparison times its variants interleaved (A, B, A, B, ...) on the same inputs, so machine noise hits both
alike, and reports medians. ONNX Runtime sessions use serving's own session options with one intra-op thread (as
the server does); PyTorch gets one thread. The PyTorch anchors and the fp32-vs-int8 loop need torch (and onnx, for
export's reference loop) and a checkpoint; without them they are skipped with the reason, and the ONNX-only
anchors (decoder step cost, attention outputs, the FLOP limit) still run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from model_repository import read_manifest
from model_repository.graph_io import base_name

# ---------------------------------------------------------------- sessions and feeds


def load_sessions(version_dir: Path, graphs: tuple[str, ...] = ("encoder", "decoder", "decoder_attn")) -> dict:
    """CPU sessions for a version's graphs, with the options serving uses, one intra-op thread."""
    import onnxruntime as ort

    from serving.engine.runner import RunnerConfig, session_options

    manifest = read_manifest(version_dir)
    so = session_options(RunnerConfig(providers=("cpu",), intra_op_threads=1))
    return {g: ort.InferenceSession(str(Path(version_dir) / manifest["graphs"][g]["file"]), so,
                                    providers=["CPUExecutionProvider"]) for g in graphs}


def decoder_feeds(session, cfg: dict, batch: int, past: int, src_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random but well-formed feeds for one decoder step, built from the inputs the graph declares."""
    rng = np.random.default_rng(seed)
    nh, hs = cfg["n_heads"], cfg["d_model"] // cfg["n_heads"]
    B, P, S = batch, past, src_len
    known = {
        "input_ids": lambda: rng.integers(4, cfg["tgt_vocab_size"], size=(B,), dtype=np.int64),
        "positions": lambda: np.full((B,), P, dtype=np.int64),
        "self_mask": lambda: np.ones((B, P + 1), dtype=bool),
        "past_k": lambda: rng.standard_normal((B, nh, P, hs), dtype=np.float32),  # one layer's (B, nh, P, hs)
        "past_v": lambda: rng.standard_normal((B, nh, P, hs), dtype=np.float32),
        "cross_k": lambda: rng.standard_normal((B, nh, S, hs), dtype=np.float32),  # one layer's (B, nh, S, hs)
        "cross_v": lambda: rng.standard_normal((B, nh, S, hs), dtype=np.float32),
        "src_mask": lambda: np.ones((B, S), dtype=bool),
    }
    declared = [i.name for i in session.get_inputs()]
    bases = {name: base_name(name)[0] for name in declared}  # past_k.3 -> past_k
    unknown = set(bases.values()) - set(known)
    if unknown:
        raise ValueError(f"the decoder declares inputs this bench cannot feed: {sorted(unknown)}")
    return {name: known[bases[name]]() for name in declared}


def interleaved_medians(variants: dict[str, Callable[[], object]], budget_s: float = 0.5, min_rounds: int = 5,
                        max_rounds: int = 500) -> dict[str, float]:
    """Median seconds of each variant, timed round-robin until the budget is spent (after one warm-up round)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    t_end = time.perf_counter() + budget_s
    for rounds in range(max_rounds):
        if rounds >= min_rounds and time.perf_counter() > t_end:
            break
        for label, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def graph_cost_per_token(sessions: dict, cfg: dict, batch: int, past: int, src_len: int,
                         budget_s: float = 0.5) -> float:
    """Seconds of one decoder step (the fast graph) at this batch and past length, divided by the batch."""
    feeds = decoder_feeds(sessions["decoder"], cfg, batch, past, src_len)
    step = interleaved_medians({"step": lambda: sessions["decoder"].run(None, feeds)}, budget_s)["step"]
    return step / batch


# ---------------------------------------------------------------- arithmetic


def parameter_count(cfg: dict) -> int:
    """Parameters of Seq2SeqTransformer for this config (model_src.model), counted from the config alone."""
    d, f = cfg["d_model"], cfg["d_ff"]
    attn, ffn, norm = 4 * (d * d + d), d * f + f + f * d + d, 2 * d
    encoder_layer, decoder_layer = attn + ffn + 2 * norm, 2 * attn + ffn + 3 * norm
    embed = cfg["src_vocab_size"] * d + (0 if cfg.get("share_embeddings") else cfg["tgt_vocab_size"] * d)
    final_norms = 2 * norm if cfg.get("pre_norm", True) else 0
    head = (0 if cfg.get("tie_output_embeddings") else d * cfg["tgt_vocab_size"]) + cfg["tgt_vocab_size"]
    layers = cfg["n_encoder_layers"] * encoder_layer + cfg["n_decoder_layers"] * decoder_layer
    return embed + layers + final_norms + head


def decoder_params_per_token(cfg: dict) -> int:
    """Decoder parameters one generated token multiplies through: self-attention's four projections, cross
    attention's query and output projections (its keys/values come from the encoder, once per request), the
    feed-forward, the norms and the output layer. The embedding row is a lookup, not a multiply: left out."""
    d, f, V = cfg["d_model"], cfg["d_ff"], cfg["tgt_vocab_size"]
    per_layer = 6 * (d * d + d) + d * f + f + f * d + d + 3 * 2 * d
    return cfg["n_decoder_layers"] * per_layer + (2 * d if cfg.get("pre_norm", True) else 0) + d * V + V


def decoder_flops_per_token(cfg: dict, past: float, src_len: float) -> float:
    """2 x parameters touched, plus attention: scores and weighted sum over past+1 own keys and src_len sources."""
    attention = cfg["n_decoder_layers"] * 4 * cfg["d_model"] * ((past + 1) + src_len)
    return 2 * decoder_params_per_token(cfg) + attention


_MATMUL = """
import time, numpy as np
n = 512
rng = np.random.default_rng(0)
a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
for _ in range(5):
    a @ b
times = []
for _ in range(40):
    t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
times.sort()
print(2 * n ** 3 / times[len(times) // 2])
"""


def matmul_flops_per_s() -> float:
    """float32 FLOP/s of a 512x512 numpy matmul on one thread (a child process, so the BLAS thread count holds)."""
    one = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", _MATMUL], env={**os.environ, **one}, capture_output=True, text=True,
                         check=True, timeout=120)
    return float(out.stdout.strip().splitlines()[-1])


def physical_limit(cfg: dict, past: float, src_len: float, levels: list[dict]) -> dict:
    """FLOPs per generated token against this machine's one-thread matmul rate: the ideal tokens/s on one core."""
    flops = decoder_flops_per_token(cfg, past, src_len)
    rate = matmul_flops_per_s()
    ideal = rate / flops
    one = next((lv for lv in levels if lv["concurrency"] == 1), None)
    best = max(levels, key=lambda lv: lv["tokens_per_s"], default=None)
    return {"flops_per_token": flops, "decoder_params_per_token": decoder_params_per_token(cfg),
            "past": past, "src_len": src_len, "matmul_gflops_one_thread": rate / 1e9,
            "ideal_tokens_per_s_one_core": ideal,
            "fraction_1_stream": one["tokens_per_s"] / ideal if one else None,
            "best_level": best["concurrency"] if best else None,
            "fraction_best": best["tokens_per_s"] / ideal if best else None}


# ---------------------------------------------------------------- comparisons


def _comparison(name: str, medians_s: dict[str, float], note: str = "") -> dict:
    (la, a), (lb, b) = medians_s.items()
    return {"name": name, "variants": [{"label": la, "median_ms": a * 1e3}, {"label": lb, "median_ms": b * 1e3}],
            "ratio": b / a, "note": note}


def ort_anchors(sessions: dict, cfg: dict, src_len: int, budget_s: float = 0.5) -> list[dict]:
    """Decoder step cost against past length, and the price of the attention outputs."""
    def step(graph: str, feeds: dict) -> Callable[[], object]:
        return lambda: sessions[graph].run(None, feeds)

    out = []
    for batch in (1, 16):
        feeds = {p: decoder_feeds(sessions["decoder"], cfg, batch, p, src_len) for p in (8, 128)}
        m = interleaved_medians({f"past {p}": step("decoder", feeds[p]) for p in (8, 128)}, budget_s)
        out.append(_comparison(f"ORT decoder step, past 8 vs 128, batch {batch}", m))
    for batch in (1, 16):
        feeds = decoder_feeds(sessions["decoder"], cfg, batch, 16, src_len)
        m = interleaved_medians({g: step(g, feeds) for g in ("decoder", "decoder_attn")}, budget_s)
        out.append(_comparison(f"ORT decoder step without vs with attention outputs, batch {batch}, past 16", m))
    for batch in (1, 16):
        feeds = decoder_feeds(sessions["decoder"], cfg, batch, 16, src_len)
        m = interleaved_medians({"run() on numpy": step("decoder", feeds),
                                 "IO binding, OrtValues": _bound_step(sessions["decoder"], feeds)}, budget_s)
        out.append(_comparison(f"ORT decoder step, numpy in and out vs IO binding, batch {batch}, past 16", m,
                               "inputs bound once as OrtValues, outputs left to ORT (as a cache kept in OrtValues "
                               "from step to step would be)"))
    return out


def _bound_step(session, feeds: dict) -> Callable[[], object]:
    """A decoder step through IO binding: inputs bound once as OrtValues, outputs allocated by ONNX Runtime and
    kept as OrtValues (no numpy on either side), as an engine keeping its caches in OrtValues would run it."""
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
    for o in session.get_outputs():
        binding.bind_output(o.name, "cpu")

    def run() -> object:
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    return run


def torch_anchors(checkpoint: Path, sessions: dict, cfg: dict, int8_dir: Path | None, max_new_tokens: int,
                  n_inputs: int = 32, progress: Callable[[str], None] = print) -> list[dict]:
    """PyTorch eager vs the plain ORT loop, KV cache vs recompute, fp32 vs int8; needs torch and onnx."""
    import torch

    from export.validate import ort_greedy
    from model_src.checkpoint import load_model
    from model_src.decoding import generate
    from model_src.tasks import task_of_checkpoint

    torch.set_num_threads(1)  # the one core ORT gets
    model, tok, config = load_model(checkpoint)
    task = task_of_checkpoint(config)
    texts = [s for s, _ in task.test[:n_inputs]] if task is not None else ["3rd of March 2021"] * n_inputs
    sources = [tok.encode(t) for t in texts]
    same = {k: v for k, v in model.config.to_dict().items() if k != "dropout"} == \
        {k: v for k, v in cfg.items() if k in model.config.to_dict() and k != "dropout"}
    note = "" if same else "the checkpoint's config differs from the exported version's: not the same model"

    def over_inputs(variants: dict[str, Callable[[list[int]], object]], inputs: list[list[int]]) -> dict:
        for fn in variants.values():
            fn(inputs[0])
        times: dict[str, list[float]] = {k: [] for k in variants}
        for src in inputs:
            for label, fn in variants.items():
                t = time.perf_counter()
                fn(src)
                times[label].append(time.perf_counter() - t)
        return {k: statistics.median(v) for k, v in times.items()}

    out = []
    progress(f"anchors: PyTorch eager vs ORT plain loop on {len(sources)} held-out inputs")
    out.append(_comparison(
        f"greedy, one request, up to {max_new_tokens} new tokens", over_inputs({
            "PyTorch eager (KV cache)": lambda s: generate(model, [s], max_new_tokens=max_new_tokens),
            "ORT plain greedy loop": lambda s: ort_greedy(sessions, cfg, [s], max_new_tokens)}, sources), note))

    steps = min(64, model.config.max_len - 1)

    @torch.no_grad()
    def fixed_steps(src: list[int], cached: bool) -> None:
        """`steps` greedy tokens whatever they are (no stop at <eos>), with the cache or recomputing the prefix."""
        from model_src.decoding import pad_batch

        src_ids, src_mask = pad_batch([src], model.config.pad_id)
        enc = model.encode(src_ids, src_mask)
        token = torch.tensor([model.config.bos_id])
        if cached:
            past_k, past_v = model.empty_cache(1)
            for step in range(steps):
                o = model.decode_step(token, torch.tensor([step]), torch.ones(1, step + 1, dtype=torch.bool),
                                      past_k, past_v, enc.cross_k, enc.cross_v, src_mask)
                past_k, past_v, token = o.present_k, o.present_v, o.logits.argmax(-1)
            return
        tgt = token[None]  # (1, T)
        for _ in range(steps):
            logits, _, _ = model.decode(tgt, torch.ones_like(tgt, dtype=torch.bool), enc, src_mask)
            tgt = torch.cat([tgt, logits[:, -1].argmax(-1, keepdim=True)], dim=1)

    progress(f"anchors: KV cache vs recompute at {steps} new tokens")
    out.append(_comparison(f"PyTorch greedy, {steps} new tokens", over_inputs({
        "KV cache (decode_step)": lambda s: fixed_steps(s, True),
        "recompute the prefix each step (decode)": lambda s: fixed_steps(s, False)}, sources[:5])))
    if int8_dir is not None:
        progress(f"anchors: fp32 vs int8 plain ORT loop ({int8_dir})")
        q_sessions = load_sessions(int8_dir, ("encoder", "decoder"))
        out.append(_comparison(f"ORT plain greedy loop, up to {max_new_tokens} new tokens", over_inputs({
            "fp32": lambda s: ort_greedy(sessions, cfg, [s], max_new_tokens),
            "int8": lambda s: ort_greedy(q_sessions, cfg, [s], max_new_tokens)}, sources)))
    return out


def run_anchors(version_dir: Path, checkpoint: Path | None, int8_dir: Path | None, max_new_tokens: int,
                src_len: int, progress: Callable[[str], None] = print) -> dict:
    """Every anchor that can run here; `skipped` says which could not, and why."""
    cfg = read_manifest(version_dir)["model_config"]
    sessions = load_sessions(version_dir)
    progress("anchors: ORT decoder steps (past 8 vs 128, attention outputs)")
    result = {"comparisons": ort_anchors(sessions, cfg, max(1, src_len)), "skipped": []}
    why = None
    if checkpoint is None:
        why = "no --checkpoint"
    else:
        try:
            import onnx  # noqa: F401  (export's reference loop imports it)
            import torch  # noqa: F401
        except ImportError as e:
            why = f"{e.name} is not installed (the 'export' extra)"
    if why:
        result["skipped"].append(f"PyTorch eager vs ORT, KV cache vs recompute, fp32 vs int8: {why}")
        progress(f"anchors skipped: {result['skipped'][-1]}")
    else:
        result["comparisons"] += torch_anchors(checkpoint, sessions, cfg, int8_dir, max_new_tokens,
                                               progress=progress)
    return result

