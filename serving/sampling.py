"""Choosing the next token from logits in numpy: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

import numpy as np

from .requests import DecodeParams


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def filtered_probs(logits: np.ndarray, p: DecodeParams) -> np.ndarray:
    """The distribution to sample from (V,): temperature, then top-k, then the smallest top-p nucleus."""
    logp = log_softmax(logits / p.temperature)
    if p.top_k and p.top_k < logp.size:
        kth = np.partition(logp, -p.top_k)[-p.top_k]
        logp = np.where(logp < kth, -np.inf, logp)
    if p.top_p < 1.0:
        order = np.argsort(-logp, kind="stable")
        probs = np.exp(logp[order])
        before = np.cumsum(probs) - probs  # mass strictly before each token
        drop = order[before >= p.top_p]  # keep the token that crosses top_p
        logp[drop] = -np.inf
    probs = np.exp(logp - logp.max())
    return probs / probs.sum()


def choose(logits: np.ndarray, p: DecodeParams, rng: np.random.Generator | None) -> tuple[int, float]:
    """Next token and its log-probability under the model (before temperature and filtering)."""
    logp = log_softmax(logits)
    if p.greedy or rng is None:
        token = int(np.argmax(logits))
    else:
        token = int(rng.choice(logits.size, p=filtered_probs(logits, p)))
    return token, float(logp[token])
