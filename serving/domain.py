"""Domain types of the engine API: requests as callers state them, the events and results they get back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from model_repository.alignment import AlignmentMethod, Link

if TYPE_CHECKING:
    from model_repository import Manifest

@dataclass(frozen=True)
class Limits:
    max_source_tokens: int = 256
    max_new_tokens: int = 128
    default_new_tokens: int = 32
    max_concurrent_streams: int = 64  # Generate streams open at once, server-wide
    max_concurrent_requests: int = 256  # every model call (Generate, Predict, Encode) in flight, server-wide
    max_queue_per_model: int = 128  # requests admitted but waiting for a place in their model's batch
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC's own default, both ways
    max_beam_size: int = 8
    max_stop_strings: int = 8


@dataclass(frozen=True)
class ModelRef:
    name: str = ""  # empty: the only loaded model
    version: int = 0  # 0: the version being served


@dataclass(frozen=True)
class Source:
    """Text (tokenized by the server with the model's tokenizer) or token ids; exactly one is set."""

    text: str | None = None
    ids: tuple[int, ...] | None = None


# The attention a request may ask for, by name: the one vocabulary of every protocol (attnserve.v1's
# ATTENTION_KIND_* and HTTP's `attention` parameter map to these). A stream (Generate, generate_stream,
# ModelStreamInfer) carries per-token attention: the encoder's self-attention, which belongs to no token, is
# left out of streams whatever the name; Predict, generate and ModelInfer return it.
ATTENTION_KINDS: dict[str, frozenset[str]] = {
    "none": frozenset(), "cross": frozenset({"cross"}), "decoder_self": frozenset({"decoder_self"}),
    "encoder_self": frozenset({"encoder_self"}), "self": frozenset({"decoder_self", "encoder_self"}),
    "all": frozenset({"cross", "decoder_self", "encoder_self"}),
}


@dataclass(frozen=True)
class AttentionSpec:
    kinds: frozenset[str]  # subset of model_repository.BLOCK_KINDS: encoder_self, decoder_self, cross
    layers: tuple[int, ...] = ()  # empty: all
    heads: tuple[int, ...] = ()  # empty: all
    mean: bool = False

    @property
    def wants_decoder(self) -> bool:
        return bool(self.kinds & {"decoder_self", "cross"})

    @property
    def wants_encoder(self) -> bool:
        return "encoder_self" in self.kinds


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding options as the caller sent them; None means "not given" (the server's default applies)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class DecodeParams:
    """Decoding options resolved against the server's defaults and validated."""

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
class GenerateRequest:
    model: ModelRef
    source: Source
    options: DecodeOptions = DecodeOptions()
    attention: AttentionSpec | None = None  # Generate streams decoder-side attention only
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    alignment: bool = False  # links from each output token to the source span it comes from (needs source.text)
    markup: bool = False  # source.text holds inline tags: translate without them, put them into the output


@dataclass(frozen=True)
class PredictRequest(GenerateRequest):
    beam_size: int = 0  # 0 or 1: greedy or sampling as `options` say; > 1: beam search


@dataclass(frozen=True)
class EncodeRequest:
    model: ModelRef
    source: Source
    deadline: float | None = None


@dataclass(slots=True)
class AttentionSlice:
    kind: str
    layer: int
    heads: tuple[int, ...]
    mean: bool
    weights: np.ndarray  # (heads or 1, Tq, Tk)


@dataclass(frozen=True)
class AlignRequest:
    """What a job needs to align its output: the model's method and where each source token lies in the text."""

    method: AlignmentMethod
    spans: tuple[tuple[int, int], ...]  # per source token: [start, end) characters of the source text
    source: str  # the source text the model reads


@dataclass(slots=True)
class TokenEvent:
    id: int
    text: str
    logprob: float
    index: int
    attention: list[AttentionSlice] = field(default_factory=list)
    alignment: list[Link] = field(default_factory=list)  # the links complete at this token (shift 1: the last's)


@dataclass(slots=True)
class FinishEvent:
    reason: str  # eos | length | stop
    prompt_tokens: int
    generated_tokens: int
    text: str
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    score: float | None = None  # beam search: the length-normalised log-probability of the best hypothesis
    new_links: list[Link] = field(default_factory=list)  # links complete only now (the last token's)
    alignment: list[Link] | None = None  # every link of the output, when asked
    word_alignment: list[Link] | None = None  # the same joined to whole words (filled in by the engine API)
    markup: str | None = None  # the output with the source's tags placed (filled in by the engine API)


@dataclass
class EncoderEvent:
    """What an encoder pass gives a request that asked for more than the decoder's inputs."""

    attention: list[AttentionSlice]  # encoder self-attention, (heads or 1, S, S) per layer
    embeddings: np.ndarray | None = None  # (S, d_model): the static, scaled token embeddings
    hidden_states: np.ndarray | None = None  # (L, S, d_model): the vectors after each encoder layer


@dataclass(frozen=True)
class Served:
    """Which version answered, and the source as it was tokenized (for labelling attention)."""

    model: ModelRef
    source_ids: tuple[int, ...]
    source_tokens: tuple[str, ...]
    view: Any = None  # serving.api.alignment.AlignmentView of a request that asked for alignment or markup


@dataclass
class Prediction:
    served: Served
    tokens: list[TokenEvent]
    text: str
    reason: str  # eos | length | stop
    score: float  # beam: length-normalised log-prob; otherwise the summed log-prob
    attention: list[AttentionSlice]  # full (heads, T_q, T_k) matrices
    alignment: list[Link] | None = None
    word_alignment: list[Link] | None = None
    markup: str | None = None


@dataclass
class Encoding:
    served: Served
    embeddings: np.ndarray  # (S, d_model)
    hidden_states: np.ndarray  # (L, S, d_model)


@dataclass(frozen=True)
class ModelDescription:
    """A served model version as the API describes it: its manifest, where it runs, what is on disk."""

    manifest: Manifest
    providers: tuple[str, ...]
    versions_on_disk: tuple[int, ...]
    healthy: bool
    limits: Limits  # as they apply to this model (source and output lengths capped by its max_len)
