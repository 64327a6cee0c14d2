"""Whole-output decoding for Predict: beam search in numpy, attention replay, and per-step rows into matrices."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from .requests import AttentionSlice, AttentionSpec, FinishEvent, GenerationRequest, TokenEvent, select
from .runner import ModelRunner
from .sampling import log_softmax
from .scheduler import Scheduler


@dataclass
class Prediction:
    tokens: list[TokenEvent]
    text: str
    reason: str  # eos | length | stop
    score: float  # beam: length-normalised log-prob; otherwise the summed log-prob
    attention: list[AttentionSlice]  # full (heads, T_q, T_k) matrices


async def predict(scheduler: Scheduler, req: GenerationRequest, beam_size: int,
                  run: Callable[..., Awaitable]) -> Prediction:
    """The whole output: beam search (run off the event loop by `run`) or the scheduler's greedy/sampled stream,
    with the attention matrices the request asks for."""
    runner, spec = scheduler.runner, req.attention
    attention: list[AttentionSlice] = []
    if beam_size > 1:
        ids, logprobs, score, reason = await run(beam_search, runner, req.src, beam_size, req.params.max_new_tokens)
        texts = [runner.tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
        tokens = [TokenEvent(t, texts[i + 1][len(texts[i]):], lp, i)
                  for i, (t, lp) in enumerate(zip(ids, logprobs, strict=True))]
        text = texts[-1]
        if spec is not None and spec.wants_decoder and ids:
            attention = assemble(await run(replay_attention, runner, req.src, ids, spec))
    else:
        tokens, finish = [], None
        async for ev in scheduler.stream(scheduler.submit(req)):
            if isinstance(ev, FinishEvent):
                finish = ev
            else:
                tokens.append(ev)
        text, reason, score = finish.text, finish.reason, sum(t.logprob for t in tokens)
        if spec is not None and spec.wants_decoder:
            attention = assemble([t.attention for t in tokens])
    if spec is not None and "encoder_self" in spec.kinds:
        attention = await run(encoder_attention, runner, req.src, spec) + attention
    return Prediction(tokens, text, reason, score, attention)


def beam_search(runner: ModelRunner, src: list[int], beam_size: int, max_new_tokens: int,
                length_penalty: float = 1.0) -> tuple[list[int], list[float], float, str]:
    """Best hypothesis: (tokens, per-token log-probs, length-normalised score, finish reason).

    Same algorithm as model_src.decoding.beam_search: 2 x beam candidates per step, a hypothesis ends at <eos>,
    score = summed log-prob / length ** length_penalty.
    """
    enc = runner.encode(src, attention=False)
    S = len(src)
    beams: list[tuple[list[int], list[float], float]] = [([], [], 0.0)]
    pk = pv = runner.empty_cache(1)
    finished: list[tuple[list[int], list[float], float, str]] = []
    for step in range(max_new_tokens):
        n = len(beams)
        feeds = {"input_ids": np.array([b[0][-1] if b[0] else runner.bos_id for b in beams], np.int64),
                 "positions": np.full(n, step, np.int64), "self_mask": np.ones((n, step + 1), bool),
                 "past_k": pk, "past_v": pv, "cross_k": np.repeat(enc["cross_k"], n, axis=1),
                 "cross_v": np.repeat(enc["cross_v"], n, axis=1), "src_mask": np.ones((n, S), bool)}
        out = runner.step(feeds, attention=False)
        logp = log_softmax(out["logits"])  # (n, V)
        scores = np.array([b[2] for b in beams])[:, None] + logp  # (n, V)
        flat = np.argsort(-scores.ravel(), kind="stable")[: 2 * beam_size]
        V = logp.shape[1]
        new_beams, keep = [], []
        for f in flat:
            b, tok = divmod(int(f), V)
            ids, lps = beams[b][0] + [tok], beams[b][1] + [float(logp[b, tok])]
            score = float(scores[b, tok])
            if tok == runner.eos_id:
                finished.append((ids[:-1], lps[:-1], score / max(len(ids), 1) ** length_penalty, "eos"))
            else:
                new_beams.append((ids, lps, score))
                keep.append(b)
            if len(new_beams) == beam_size:
                break
        if len(finished) >= beam_size or not new_beams:
            break
        beams = new_beams
        pk, pv = out["present_k"][:, keep], out["present_v"][:, keep]
    if not finished:
        finished = [(ids, lps, s / max(len(ids), 1) ** length_penalty, "length") for ids, lps, s in beams]
    return max(finished, key=lambda h: h[2])


def replay_attention(runner: ModelRunner, src: list[int], tokens: list[int],
                     spec: AttentionSpec) -> list[list[AttentionSlice]]:
    """Each step's decoder attention for a given output, by feeding it back through the attention graph."""
    enc = runner.encode(src, attention=False)
    pk = pv = runner.empty_cache(1)
    steps = []
    inputs = [runner.bos_id, *tokens[:-1]]
    for t, tok in enumerate(inputs):
        out = runner.step({"input_ids": np.array([tok], np.int64), "positions": np.array([t], np.int64),
                           "self_mask": np.ones((1, t + 1), bool), "past_k": pk, "past_v": pv,
                           "cross_k": enc["cross_k"], "cross_v": enc["cross_v"],
                           "src_mask": np.ones((1, len(src)), bool)}, attention=True)
        pk, pv = out["present_k"], out["present_v"]
        rows = []
        if "cross" in spec.kinds:
            rows += select(out["cross_attn"][:, 0], "cross", spec, runner.n_layers)
        if "decoder_self" in spec.kinds:
            rows += select(out["dec_self_attn"][:, 0], "decoder_self", spec, runner.n_layers)
        steps.append(rows)
    return steps


def assemble(steps: list[list[AttentionSlice]]) -> list[AttentionSlice]:
    """Stack per-step rows (h, 1, k_t) into one (h, T, K) matrix per block; shorter rows are zero-padded."""
    if not steps:
        return []
    T = len(steps)
    out = []
    for j, first in enumerate(steps[0]):
        K = max(step[j].weights.shape[2] for step in steps)
        m = np.zeros((first.weights.shape[0], T, K), np.float32)  # (h, T, K)
        for t, step in enumerate(steps):
            w = step[j].weights[:, 0]  # (h, k_t)
            m[:, t, : w.shape[1]] = w
        out.append(AttentionSlice(first.kind, first.layer, first.heads, first.mean, m))
    return out


def encoder_attention(runner: ModelRunner, src: list[int], spec: AttentionSpec) -> list[AttentionSlice]:
    out = runner.encode(src, attention=True)
    return select(out["enc_self_attn"][:, 0], "encoder_self", spec, runner.n_enc_layers)
