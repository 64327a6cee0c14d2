from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttentionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTENTION_KIND_UNSPECIFIED: _ClassVar[AttentionKind]
    ATTENTION_KIND_CROSS: _ClassVar[AttentionKind]
    ATTENTION_KIND_SELF: _ClassVar[AttentionKind]
    ATTENTION_KIND_ALL: _ClassVar[AttentionKind]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
ATTENTION_KIND_UNSPECIFIED: AttentionKind
ATTENTION_KIND_CROSS: AttentionKind
ATTENTION_KIND_SELF: AttentionKind
ATTENTION_KIND_ALL: AttentionKind
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("text", "ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    ids: TokenIds
    def __init__(self, text: _Optional[str] = ..., ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class DecodingOptions(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class AttentionRequest(_message.Message):
    __slots__ = ("kind", "layers", "heads", "mean_over_heads")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    MEAN_OVER_HEADS_FIELD_NUMBER: _ClassVar[int]
    kind: AttentionKind
    layers: _containers.RepeatedScalarFieldContainer[int]
    heads: _containers.RepeatedScalarFieldContainer[int]
    mean_over_heads: bool
    def __init__(self, kind: _Optional[_Union[AttentionKind, str]] = ..., layers: _Optional[_Iterable[int]] = ..., heads: _Optional[_Iterable[int]] = ..., mean_over_heads: bool = ...) -> None: ...

class AttentionTensor(_message.Message):
    __slots__ = ("kind", "layer", "head_indices", "mean_over_heads", "query_length", "key_length", "weights")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_INDICES_FIELD_NUMBER: _ClassVar[int]
    MEAN_OVER_HEADS_FIELD_NUMBER: _ClassVar[int]
    QUERY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    KEY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    layer: int
    head_indices: _containers.RepeatedScalarFieldContainer[int]
    mean_over_heads: bool
    query_length: int
    key_length: int
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, kind: _Optional[str] = ..., layer: _Optional[int] = ..., head_indices: _Optional[_Iterable[int]] = ..., mean_over_heads: bool = ..., query_length: _Optional[int] = ..., key_length: _Optional[int] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class AlignmentLink(_message.Message):
    __slots__ = ("source_start", "source_end", "target_start", "target_end")
    SOURCE_START_FIELD_NUMBER: _ClassVar[int]
    SOURCE_END_FIELD_NUMBER: _ClassVar[int]
    TARGET_START_FIELD_NUMBER: _ClassVar[int]
    TARGET_END_FIELD_NUMBER: _ClassVar[int]
    source_start: int
    source_end: int
    target_start: int
    target_end: int
    def __init__(self, source_start: _Optional[int] = ..., source_end: _Optional[int] = ..., target_start: _Optional[int] = ..., target_end: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "source", "options", "attention", "alignment", "markup")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    MARKUP_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    source: Source
    options: DecodingOptions
    attention: AttentionRequest
    alignment: bool
    markup: bool
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., source: _Optional[_Union[Source, _Mapping]] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., attention: _Optional[_Union[AttentionRequest, _Mapping]] = ..., alignment: bool = ..., markup: bool = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "logprob", "index")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    index: int
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., index: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "time_to_first_token_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class Finish(_message.Message):
    __slots__ = ("reason", "prompt_tokens", "generated_tokens", "text", "timings", "model", "source_tokens", "alignment", "word_alignment", "markup")
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    WORD_ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    MARKUP_FIELD_NUMBER: _ClassVar[int]
    reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    text: str
    timings: Timings
    model: ModelRef
    source_tokens: _containers.RepeatedScalarFieldContainer[str]
    alignment: _containers.RepeatedCompositeFieldContainer[AlignmentLink]
    word_alignment: _containers.RepeatedCompositeFieldContainer[AlignmentLink]
    markup: str
    def __init__(self, reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., text: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., source_tokens: _Optional[_Iterable[str]] = ..., alignment: _Optional[_Iterable[_Union[AlignmentLink, _Mapping]]] = ..., word_alignment: _Optional[_Iterable[_Union[AlignmentLink, _Mapping]]] = ..., markup: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "attention", "finish", "source_tokens", "alignment")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    token: Token
    attention: _containers.RepeatedCompositeFieldContainer[AttentionTensor]
    finish: Finish
    source_tokens: _containers.RepeatedScalarFieldContainer[str]
    alignment: _containers.RepeatedCompositeFieldContainer[AlignmentLink]
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ..., attention: _Optional[_Iterable[_Union[AttentionTensor, _Mapping]]] = ..., finish: _Optional[_Union[Finish, _Mapping]] = ..., source_tokens: _Optional[_Iterable[str]] = ..., alignment: _Optional[_Iterable[_Union[AlignmentLink, _Mapping]]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "source", "options", "beam_size", "attention", "alignment", "markup")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    MARKUP_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    source: Source
    options: DecodingOptions
    beam_size: int
    attention: AttentionRequest
    alignment: bool
    markup: bool
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., source: _Optional[_Union[Source, _Mapping]] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., beam_size: _Optional[int] = ..., attention: _Optional[_Union[AttentionRequest, _Mapping]] = ..., alignment: bool = ..., markup: bool = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("text", "tokens", "finish_reason", "attention", "source_tokens", "model", "score", "alignment", "word_alignment", "markup")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    WORD_ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    MARKUP_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    finish_reason: FinishReason
    attention: _containers.RepeatedCompositeFieldContainer[AttentionTensor]
    source_tokens: _containers.RepeatedScalarFieldContainer[str]
    model: ModelRef
    score: float
    alignment: _containers.RepeatedCompositeFieldContainer[AlignmentLink]
    word_alignment: _containers.RepeatedCompositeFieldContainer[AlignmentLink]
    markup: str
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., attention: _Optional[_Iterable[_Union[AttentionTensor, _Mapping]]] = ..., source_tokens: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., score: _Optional[float] = ..., alignment: _Optional[_Iterable[_Union[AlignmentLink, _Mapping]]] = ..., word_alignment: _Optional[_Iterable[_Union[AlignmentLink, _Mapping]]] = ..., markup: _Optional[str] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "source")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    source: Source
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., source: _Optional[_Union[Source, _Mapping]] = ...) -> None: ...

class Matrix(_message.Message):
    __slots__ = ("rows", "cols", "values")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("tokens", "token_ids", "static_embeddings", "layer_outputs", "model")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STATIC_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    LAYER_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    static_embeddings: Matrix
    layer_outputs: _containers.RepeatedCompositeFieldContainer[Matrix]
    model: ModelRef
    def __init__(self, tokens: _Optional[_Iterable[str]] = ..., token_ids: _Optional[_Iterable[int]] = ..., static_embeddings: _Optional[_Union[Matrix, _Mapping]] = ..., layer_outputs: _Optional[_Iterable[_Union[Matrix, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "version", "versions_on_disk", "task", "precision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_ON_DISK_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions_on_disk: _containers.RepeatedScalarFieldContainer[int]
    task: str
    precision: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions_on_disk: _Optional[_Iterable[int]] = ..., task: _Optional[str] = ..., precision: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class ReloadModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class AttentionBlock(_message.Message):
    __slots__ = ("graph", "block", "layer", "kind", "heads", "head_dim", "probabilities_exported")
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_EXPORTED_FIELD_NUMBER: _ClassVar[int]
    graph: str
    block: str
    layer: int
    kind: str
    heads: int
    head_dim: int
    probabilities_exported: bool
    def __init__(self, graph: _Optional[str] = ..., block: _Optional[str] = ..., layer: _Optional[int] = ..., kind: _Optional[str] = ..., heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., probabilities_exported: bool = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_source_tokens", "max_new_tokens", "max_concurrent_streams", "max_message_bytes")
    MAX_SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_source_tokens: int
    max_new_tokens: int
    max_concurrent_streams: int
    max_message_bytes: int
    def __init__(self, max_source_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_concurrent_streams: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("name", "version", "versions_on_disk", "config_json", "execution_providers", "attention_blocks", "precision", "opset", "task", "vocab_size", "limits", "validation_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_ON_DISK_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions_on_disk: _containers.RepeatedScalarFieldContainer[int]
    config_json: str
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    attention_blocks: _containers.RepeatedCompositeFieldContainer[AttentionBlock]
    precision: str
    opset: int
    task: str
    vocab_size: int
    limits: Limits
    validation_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions_on_disk: _Optional[_Iterable[int]] = ..., config_json: _Optional[str] = ..., execution_providers: _Optional[_Iterable[str]] = ..., attention_blocks: _Optional[_Iterable[_Union[AttentionBlock, _Mapping]]] = ..., precision: _Optional[str] = ..., opset: _Optional[int] = ..., task: _Optional[str] = ..., vocab_size: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., validation_json: _Optional[str] = ...) -> None: ...

class ReloadModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
