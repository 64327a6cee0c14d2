"""Validation of domain requests against the model and the server's limits; every refusal names its field."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

from model_repository import BLOCK_KINDS

from ..domain import AttentionSpec, DecodeOptions, DecodeParams, Limits
from ..errors import InvalidRequest

# Temperatures outside this range are refused rather than silently clamped: below it, logits / temperature
# overflows to inf (1e-45 is a denormal float32) and sampling is greedy decoding in disguise; above it the
# distribution is uniform noise.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1


@functools.lru_cache(maxsize=256)
def model_limits(limits: Limits, max_len: int) -> Limits:
    """The limits as they apply to one model: lengths capped by what its positions allow."""
    return replace(limits, max_source_tokens=min(limits.max_source_tokens, max_len),
                   max_new_tokens=min(limits.max_new_tokens, max_len - 1))


def check_source(src: list[int], vocab_size: int, limits: Limits) -> None:
    if not src:
        raise InvalidRequest("the source is empty: send non-empty text or at least one token id")
    if len(src) > limits.max_source_tokens:
        raise InvalidRequest(f"the source has {len(src)} tokens, over the limit of {limits.max_source_tokens} "
                             "(max_source_tokens)")
    bad = [i for i in src if not 0 <= i < vocab_size]
    if bad:
        raise InvalidRequest(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")


def resolve_params(options: DecodeOptions, limits: Limits) -> DecodeParams:
    """Defaults filled in from `limits`, every field checked; `limits` already capped for the model."""
    o = options
    p = DecodeParams(max_new_tokens=limits.default_new_tokens if o.max_new_tokens is None else o.max_new_tokens,
                     temperature=0.0 if o.temperature is None else float(o.temperature),
                     top_k=0 if o.top_k is None else o.top_k, top_p=1.0 if o.top_p is None else float(o.top_p),
                     seed=o.seed, stop=tuple(o.stop))
    if p.max_new_tokens <= 0:
        raise InvalidRequest(f"max_new_tokens must be at least 1, got {p.max_new_tokens}")
    if p.max_new_tokens > limits.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens {p.max_new_tokens} is over the limit of {limits.max_new_tokens} "
                             "(max_new_tokens)")
    t = p.temperature
    if not math.isfinite(t) or t < 0:
        raise InvalidRequest(f"temperature must be >= 0 (0 is greedy), got {t}")
    if t != 0.0 and not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
        raise InvalidRequest(f"temperature must be 0 (greedy) or within [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                             f"got {t:g}")
    if p.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0 (0 disables it), got {p.top_k}")
    if not math.isfinite(p.top_p) or not 0.0 < p.top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}")
    if p.seed is not None and not 0 <= p.seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be in [0, 2**63 - 1], got {p.seed}")
    if len(p.stop) > limits.max_stop_strings:
        raise InvalidRequest(f"{len(p.stop)} stop strings, over the limit of {limits.max_stop_strings}")
    if any(not s for s in p.stop):
        raise InvalidRequest("stop strings must not be empty")
    return p


def check_attention(spec: AttentionSpec | None, n_enc: int, n_dec: int, n_heads: int) -> None:
    if spec is None:
        return
    unknown = spec.kinds - set(BLOCK_KINDS)
    if unknown:
        raise InvalidRequest(f"unknown attention kind(s) {sorted(unknown)}; use {', '.join(BLOCK_KINDS)}")
    for layer in spec.layers:
        limit = max(n_enc, n_dec) if spec.wants_encoder else n_dec
        if not 0 <= layer < limit:
            raise InvalidRequest(f"attention layer {layer} does not exist: the model has layers 0..{limit - 1}")
    for head in spec.heads:
        if not 0 <= head < n_heads:
            raise InvalidRequest(f"attention head {head} does not exist: the model has heads 0..{n_heads - 1}")
    if len(set(spec.layers)) != len(spec.layers) or len(set(spec.heads)) != len(spec.heads):
        raise InvalidRequest("attention layers and heads must not repeat")


def check_beam(beam_size: int, limits: Limits) -> None:
    if not 0 <= beam_size <= limits.max_beam_size:
        raise InvalidRequest(f"beam_size must be 0..{limits.max_beam_size} (0 or 1: no beam search), got {beam_size}")
