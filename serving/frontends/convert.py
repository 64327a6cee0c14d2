"""attnserve.v1 protobuf <-> domain types, in one place: `*_from_pb` reads requests, `*_to_pb` writes responses.

Field mapping only: defaults, validation and limits are the engine API's.
"""

from __future__ import annotations

import json
import time

import numpy as np

from protos.attnserve.v1 import attnserve_pb2 as pb

from ..domain import (
    ATTENTION_KINDS,
    AttentionSlice,
    AttentionSpec,
    DecodeOptions,
    EncodeRequest,
    Encoding,
    FinishEvent,
    GenerateRequest,
    Link,
    ModelDescription,
    ModelRef,
    Prediction,
    PredictRequest,
    Served,
    Source,
    TokenEvent,
)
from ..errors import InvalidRequest

_KINDS = {pb.ATTENTION_KIND_UNSPECIFIED: ATTENTION_KINDS["none"], pb.ATTENTION_KIND_CROSS: ATTENTION_KINDS["cross"],
          pb.ATTENTION_KIND_SELF: ATTENTION_KINDS["self"], pb.ATTENTION_KIND_ALL: ATTENTION_KINDS["all"]}
_FINISH = {"eos": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}


def deadline_of(time_remaining: float | None) -> float | None:
    """A gRPC context's time remaining as a time.monotonic() deadline."""
    return None if time_remaining is None else time.monotonic() + time_remaining


def model_from_pb(ref: pb.ModelRef) -> ModelRef:
    return ModelRef(ref.name, ref.version)


def source_from_pb(source: pb.Source) -> Source:
    which = source.WhichOneof("input")
    if which == "text":
        return Source(text=source.text)
    if which == "ids":
        return Source(ids=tuple(source.ids.ids))
    return Source()


def options_from_pb(o: pb.DecodingOptions) -> DecodeOptions:
    def get(name: str):
        return getattr(o, name) if o.HasField(name) else None

    return DecodeOptions(max_new_tokens=get("max_new_tokens"), temperature=get("temperature"), top_k=get("top_k"),
                         top_p=get("top_p"), seed=get("seed"), stop=tuple(o.stop))


def attention_from_pb(a: pb.AttentionRequest) -> AttentionSpec | None:
    if a.kind not in _KINDS:
        raise InvalidRequest(f"unknown attention.kind {a.kind}; use one of {sorted(pb.AttentionKind.keys())}")
    if not _KINDS[a.kind]:
        if a.layers or a.heads or a.mean_over_heads:
            raise InvalidRequest("attention layers/heads given but attention.kind is ATTENTION_KIND_UNSPECIFIED")
        return None
    return AttentionSpec(_KINDS[a.kind], tuple(a.layers), tuple(a.heads), a.mean_over_heads)


def generate_from_pb(req: pb.GenerateRequest, deadline: float | None) -> GenerateRequest:
    return GenerateRequest(model_from_pb(req.model), source_from_pb(req.source), options_from_pb(req.options),
                           attention_from_pb(req.attention), deadline, req.alignment, req.markup)


def predict_from_pb(req: pb.PredictRequest, deadline: float | None) -> PredictRequest:
    return PredictRequest(model_from_pb(req.model), source_from_pb(req.source), options_from_pb(req.options),
                          attention_from_pb(req.attention), deadline, req.alignment, req.markup,
                          beam_size=req.beam_size)


def encode_from_pb(req: pb.EncodeRequest, deadline: float | None) -> EncodeRequest:
    return EncodeRequest(model_from_pb(req.model), source_from_pb(req.source), deadline)


def model_ref_to_pb(ref: ModelRef) -> pb.ModelRef:
    return pb.ModelRef(name=ref.name, version=ref.version)


def attention_to_pb(s: AttentionSlice) -> pb.AttentionTensor:
    _h, q, k = s.weights.shape  # (heads or 1, Tq, Tk)
    return pb.AttentionTensor(kind=s.kind, layer=s.layer, head_indices=list(s.heads), mean_over_heads=s.mean,
                              query_length=q, key_length=k, weights=s.weights.ravel().tolist())


def links_to_pb(links: list[Link] | None) -> list[pb.AlignmentLink]:
    return [pb.AlignmentLink(source_start=x[0], source_end=x[1], target_start=x[2], target_end=x[3])
            for x in links or ()]


def token_to_pb(ev: TokenEvent) -> pb.Token:
    return pb.Token(id=ev.id, text=ev.text, logprob=ev.logprob, index=ev.index)


def token_event_to_pb(ev: TokenEvent, served: Served) -> pb.GenerateResponse:
    return pb.GenerateResponse(token=token_to_pb(ev), attention=[attention_to_pb(s) for s in ev.attention],
                               source_tokens=served.source_tokens if ev.index == 0 else (),
                               alignment=links_to_pb(ev.alignment))


def finish_to_pb(ev: FinishEvent, served: Served) -> pb.GenerateResponse:
    return pb.GenerateResponse(finish=pb.Finish(
        reason=_FINISH[ev.reason], prompt_tokens=ev.prompt_tokens, generated_tokens=ev.generated_tokens,
        text=ev.text, model=model_ref_to_pb(served.model), source_tokens=served.source_tokens,
        timings=pb.Timings(queue_ms=ev.queue_ms, time_to_first_token_ms=ev.time_to_first_token_ms,
                           total_ms=ev.total_ms),
        alignment=links_to_pb(ev.alignment), word_alignment=links_to_pb(ev.word_alignment), markup=ev.markup or ""),
        alignment=links_to_pb(ev.new_links))


def predict_to_pb(p: Prediction) -> pb.PredictResponse:
    return pb.PredictResponse(text=p.text, tokens=[token_to_pb(t) for t in p.tokens],
                              finish_reason=_FINISH[p.reason], attention=[attention_to_pb(s) for s in p.attention],
                              source_tokens=p.served.source_tokens, model=model_ref_to_pb(p.served.model),
                              score=p.score, alignment=links_to_pb(p.alignment),
                              word_alignment=links_to_pb(p.word_alignment), markup=p.markup or "")


def matrix_to_pb(m: np.ndarray) -> pb.Matrix:
    rows, cols = m.shape
    return pb.Matrix(rows=rows, cols=cols, values=m.astype(np.float32).ravel().tolist())


def encoding_to_pb(e: Encoding) -> pb.EncodeResponse:
    return pb.EncodeResponse(tokens=e.served.source_tokens, token_ids=e.served.source_ids,
                             static_embeddings=matrix_to_pb(e.embeddings),
                             layer_outputs=[matrix_to_pb(h) for h in e.hidden_states],
                             model=model_ref_to_pb(e.served.model))


def summary_to_pb(d: ModelDescription) -> pb.ModelSummary:
    m = d.manifest
    return pb.ModelSummary(name=m.name, version=m.version, versions_on_disk=d.versions_on_disk, task=m.task or "",
                           precision=m.precision)


def info_to_pb(d: ModelDescription) -> pb.GetModelInfoResponse:
    m, lim = d.manifest, d.limits
    blocks = [pb.AttentionBlock(graph=b.graph, block=b.block, layer=b.layer, kind=b.kind, heads=b.heads,
                                head_dim=b.head_dim, probabilities_exported=bool(b.probabilities_output))
              for b in m.attention_blocks]
    return pb.GetModelInfoResponse(
        name=m.name, version=m.version, versions_on_disk=d.versions_on_disk, config_json=json.dumps(m.model_config),
        execution_providers=d.providers, attention_blocks=blocks, precision=m.precision, opset=m.opset,
        task=m.task or "", vocab_size=m.model.tgt_vocab_size,
        limits=pb.Limits(max_source_tokens=lim.max_source_tokens, max_new_tokens=lim.max_new_tokens,
                         max_concurrent_streams=lim.max_concurrent_streams, max_message_bytes=lim.max_message_bytes),
        validation_json=json.dumps(m.validation))
