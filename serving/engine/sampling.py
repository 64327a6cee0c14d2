"""Choosing the next token from logits in numpy: greedy, or temperature / top-k / top-p sampling with a seed.

Everything is computed in float64 and checked: logits with a NaN or +inf (or all -inf) in a row, or a
distribution that comes out empty, raise ModelFailure for that one request instead of sampling garbage. One rule
for greedy, sampled and beam decoding: a -inf for some tokens (ruled out) is fine.
"""

from __future__ import annotations

import math

import numpy as np

from ..domain import DecodeParams
from ..errors import ModelFailure


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)  # bad logits give NaN rows here, refused by the callers
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token] without the whole distribution: one pass of exp in the logits' own precision,
    summed in float64 (a third of log_softmax's cost at a 58k vocabulary, which greedy decoding paid per row and
    step). NaN when a logit is NaN or +inf, or all are -inf."""
    top = float(logits.max())
    if not math.isfinite(top):
        return math.nan
    return float(logits[token]) - top - math.log(float(np.exp(logits - top).sum(dtype=np.float64)))


def check_rows(logp: np.ndarray, logits: np.ndarray, step: int) -> None:
    """Log-probabilities (n, V) of n rows: one NaN or +inf logit in a row makes its whole row NaN, so the row
    maxima tell; a partial -inf (a token ruled out) is allowed, as in `choose`."""
    if not np.isfinite(logp.max(axis=-1)).all():
        _refuse(logits, step)


def _refuse(logits: np.ndarray, step: int) -> None:
    bad = "NaN" if np.isnan(logits).any() else "infinite"
    raise ModelFailure(f"the model produced {bad} logits for this request at output step {step}; it was "
                       "stopped there (other requests are unaffected). The model or this input is broken.")


def filtered_probs(logits: np.ndarray, p: DecodeParams) -> np.ndarray:
    """The distribution to sample from (V,): temperature, then top-k, then the smallest top-p nucleus."""
    logp = log_softmax(logits.astype(np.float64) / p.temperature)
    if p.top_k and p.top_k < logp.size:
        kth = np.partition(logp, -p.top_k)[-p.top_k]
        logp = np.where(logp < kth, -np.inf, logp)
        logp = logp - np.logaddexp.reduce(logp)  # renormalised: top-p measures the mass top-k left
    if p.top_p < 1.0:
        order = np.argsort(-logp, kind="stable")
        probs = np.exp(logp[order])
        before = np.cumsum(probs) - probs  # mass strictly before each token
        drop = order[before >= p.top_p]  # keep the token that crosses top_p
        logp[drop] = -np.inf
    probs = np.exp(logp - logp.max())
    total = probs.sum()
    if not np.isfinite(total) or total <= 0:
        raise ModelFailure(f"no token is left to sample from (temperature {p.temperature:g}, top_k {p.top_k}, "
                           f"top_p {p.top_p:g})")
    return probs / total


def suppressed(scores: np.ndarray, ids: tuple[int, ...]) -> np.ndarray:
    """Logits or log-probabilities (..., V) with the model's never-generated ids at -inf (a copy when any)."""
    if not ids:
        return scores
    scores = scores.copy()
    scores[..., list(ids)] = -np.inf
    return scores


def choose(logits: np.ndarray, p: DecodeParams, rng: np.random.Generator | None, step: int = 0,
           suppress: tuple[int, ...] = ()) -> tuple[int, float]:
    """Next token and its log-probability under the model (before temperature, filtering and suppressed ids).

    One NaN or +inf logit makes every log-probability NaN, so checking the chosen one (or the maximum, before
    sampling) catches bad logits without a pass over the vocabulary."""
    if p.greedy or rng is None:
        token = int(np.argmax(logits))
        if token in suppress:  # rare: look again with the never-generated ids ruled out
            token = int(np.argmax(suppressed(logits, suppress)))
        logprob = token_logprob(logits, token)
        if not math.isfinite(logprob):
            _refuse(logits, step)
        return token, logprob
    logp = log_softmax(logits)
    logits = suppressed(logits, suppress)
    if not math.isfinite(logp.max()):
        _refuse(logits, step)
    token = int(rng.choice(logits.size, p=filtered_probs(logits, p)))
    return token, float(logp[token])
