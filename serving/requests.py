"""Domain types of a request and its events, and their validation against the model and the server's limits."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidRequest, LimitExceeded


@dataclass(frozen=True)
class Limits:
    max_source_tokens: int = 256
    max_new_tokens: int = 128
    default_new_tokens: int = 32
    max_concurrent_streams: int = 64
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC's own default, both ways
    max_beam_size: int = 8
    max_stop_strings: int = 8


@dataclass(frozen=True)
class AttentionSpec:
    kinds: frozenset[str]  # subset of {encoder_self, decoder_self, cross}
    layers: tuple[int, ...] = ()  # empty: all
    heads: tuple[int, ...] = ()  # empty: all
    mean: bool = False

    @property
    def wants_decoder(self) -> bool:
        return bool(self.kinds & {"decoder_self", "cross"})


@dataclass(frozen=True)
class DecodeParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    src: list[int]
    params: DecodeParams
    attention: AttentionSpec | None = None
    deadline: float | None = None  # time.monotonic() after which the sequence is dropped


@dataclass
class AttentionSlice:
    kind: str
    layer: int
    heads: tuple[int, ...]
    mean: bool
    weights: np.ndarray  # (heads or 1, Tq, Tk)


@dataclass
class TokenEvent:
    id: int
    text: str
    logprob: float
    index: int
    attention: list[AttentionSlice] = field(default_factory=list)


@dataclass
class FinishEvent:
    reason: str  # eos | length | stop
    prompt_tokens: int
    generated_tokens: int
    text: str
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float


def check_source(src: list[int], vocab_size: int, limits: Limits, max_len: int) -> None:
    if not src:
        raise InvalidRequest("the source is empty: send non-empty text or at least one token id")
    limit = min(limits.max_source_tokens, max_len)
    if len(src) > limit:
        raise InvalidRequest(f"the source has {len(src)} tokens, over the limit of {limit} (max_source_tokens)")
    bad = [i for i in src if not 0 <= i < vocab_size]
    if bad:
        raise InvalidRequest(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")


def check_params(p: DecodeParams, limits: Limits, max_len: int) -> None:
    limit = min(limits.max_new_tokens, max_len - 1)
    if p.max_new_tokens <= 0:
        raise InvalidRequest(f"max_new_tokens must be at least 1, got {p.max_new_tokens}")
    if p.max_new_tokens > limit:
        raise InvalidRequest(f"max_new_tokens {p.max_new_tokens} is over the limit of {limit} (max_new_tokens)")
    if not np.isfinite(p.temperature) or p.temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0 (0 is greedy), got {p.temperature}")
    if p.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0 (0 disables it), got {p.top_k}")
    if not 0.0 < p.top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}")
    if len(p.stop) > limits.max_stop_strings:
        raise InvalidRequest(f"{len(p.stop)} stop strings, over the limit of {limits.max_stop_strings}")
    if any(not s for s in p.stop):
        raise InvalidRequest("stop strings must not be empty")


def check_attention(spec: AttentionSpec | None, n_enc: int, n_dec: int, n_heads: int) -> None:
    if spec is None:
        return
    for layer in spec.layers:
        limit = max(n_enc, n_dec) if "encoder_self" in spec.kinds else n_dec
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


def check_stream_budget(active: int, limits: Limits) -> None:
    if active >= limits.max_concurrent_streams:
        raise LimitExceeded(f"{active} streams already active, the limit is {limits.max_concurrent_streams} "
                            "(max_concurrent_streams); retry later")


def select(probs: np.ndarray, kind: str, spec: AttentionSpec, n_layers: int) -> list[AttentionSlice]:
    """Slice (L, nh, Tq, Tk) probabilities by the request's layers and heads, averaging heads if asked."""
    layers = spec.layers or tuple(range(n_layers))
    heads = spec.heads or tuple(range(probs.shape[1]))
    out = []
    for layer in layers:
        if layer >= n_layers:
            continue  # a layer index valid for the other stack only
        w = probs[layer][list(heads)]  # (h, Tq, Tk)
        if spec.mean:
            w = w.mean(axis=0, keepdims=True)  # (1, Tq, Tk)
        out.append(AttentionSlice(kind, layer, heads, spec.mean, np.ascontiguousarray(w, dtype=np.float32)))
    return out
