"""Protobuf <-> domain types, in one place: `*_from_pb` reads requests, `*_to_pb` writes responses."""

from __future__ import annotations

import json

import numpy as np

from protos import attnserve_v1_pb2 as pb

from .errors import InvalidRequest
from .requests import (
    AttentionSlice,
    AttentionSpec,
    DecodeParams,
    FinishEvent,
    GenerationRequest,
    Limits,
    TokenEvent,
    check_attention,
    check_params,
    check_source,
)
from .runner import ModelRunner

_KINDS = {
    pb.ATTENTION_NONE: frozenset(),
    pb.ATTENTION_CROSS: frozenset({"cross"}),
    pb.ATTENTION_SELF: frozenset({"decoder_self", "encoder_self"}),
    pb.ATTENTION_ALL: frozenset({"cross", "decoder_self", "encoder_self"}),
}
_FINISH = {"eos": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}


def source_from_pb(source: pb.Source, runner: ModelRunner, limits: Limits) -> list[int]:
    which = source.WhichOneof("input")
    if which == "text":
        if not source.text.strip():
            raise InvalidRequest("source.text is empty or only whitespace")
        ids = runner.tokenizer.encode(source.text)
    elif which == "ids":
        ids = list(source.ids.ids)
    else:
        raise InvalidRequest("the request has no source: set source.text or source.ids")
    check_source(ids, runner.vocab_size, limits, runner.max_len)
    return ids


def params_from_pb(o: pb.DecodingOptions, limits: Limits, runner: ModelRunner) -> DecodeParams:
    p = DecodeParams(
        max_new_tokens=o.max_new_tokens if o.HasField("max_new_tokens") else limits.default_new_tokens,
        temperature=o.temperature if o.HasField("temperature") else 0.0,
        top_k=o.top_k if o.HasField("top_k") else 0,
        top_p=o.top_p if o.HasField("top_p") else 1.0,
        seed=o.seed if o.HasField("seed") else None,
        stop=tuple(o.stop))
    check_params(p, limits, runner.max_len)
    return p


def attention_from_pb(a: pb.AttentionRequest, runner: ModelRunner, encoder_too: bool) -> AttentionSpec | None:
    if a.kind not in _KINDS:
        raise InvalidRequest(f"unknown attention kind {a.kind}")
    kinds = _KINDS[a.kind] if encoder_too else _KINDS[a.kind] - {"encoder_self"}
    if not kinds:
        if a.layers or a.heads or a.mean_over_heads:
            raise InvalidRequest("attention layers/heads given but attention.kind is ATTENTION_NONE")
        return None
    spec = AttentionSpec(kinds, tuple(a.layers), tuple(a.heads), a.mean_over_heads)
    check_attention(spec, runner.n_enc_layers if "encoder_self" in kinds else 0, runner.n_layers, runner.n_heads)
    return spec


def generation_from_pb(req, runner: ModelRunner, limits: Limits, deadline: float | None,
                       encoder_attention: bool = False) -> GenerationRequest:
    return GenerationRequest(src=source_from_pb(req.source, runner, limits),
                             params=params_from_pb(req.options, limits, runner),
                             attention=attention_from_pb(req.attention, runner, encoder_attention),
                             deadline=deadline)


def model_ref_to_pb(runner: ModelRunner) -> pb.ModelRef:
    return pb.ModelRef(name=runner.name, version=runner.version)


def attention_to_pb(s: AttentionSlice) -> pb.AttentionTensor:
    _h, q, k = s.weights.shape  # (heads or 1, Tq, Tk)
    return pb.AttentionTensor(kind=s.kind, layer=s.layer, head_indices=list(s.heads), mean_over_heads=s.mean,
                              query_length=q, key_length=k, weights=s.weights.ravel().tolist())


def token_to_pb(ev: TokenEvent) -> pb.Token:
    return pb.Token(id=ev.id, text=ev.text, logprob=ev.logprob, index=ev.index)


def token_event_to_pb(ev: TokenEvent, runner: ModelRunner, src: list[int]) -> pb.GenerateResponse:
    return pb.GenerateResponse(token=token_to_pb(ev), attention=[attention_to_pb(s) for s in ev.attention],
                               source_tokens=runner.tokenizer.token_strings(src) if ev.index == 0 else [])


def finish_to_pb(ev: FinishEvent, runner: ModelRunner, src: list[int]) -> pb.GenerateResponse:
    return pb.GenerateResponse(finish=pb.Finish(
        reason=_FINISH[ev.reason], prompt_tokens=ev.prompt_tokens, generated_tokens=ev.generated_tokens,
        text=ev.text, model=model_ref_to_pb(runner), source_tokens=runner.tokenizer.token_strings(src),
        timings=pb.Timings(queue_ms=ev.queue_ms, time_to_first_token_ms=ev.time_to_first_token_ms,
                           total_ms=ev.total_ms)))


def predict_to_pb(runner: ModelRunner, src: list[int], tokens: list[TokenEvent], text: str, reason: str,
                  attention: list[AttentionSlice], score: float) -> pb.PredictResponse:
    return pb.PredictResponse(text=text, tokens=[token_to_pb(t) for t in tokens], finish_reason=_FINISH[reason],
                              attention=[attention_to_pb(s) for s in attention],
                              source_tokens=runner.tokenizer.token_strings(src), model=model_ref_to_pb(runner),
                              score=score)


def matrix_to_pb(m: np.ndarray) -> pb.Matrix:
    rows, cols = m.shape
    return pb.Matrix(rows=rows, cols=cols, values=m.astype(np.float32).ravel().tolist())


def encode_to_pb(runner: ModelRunner, src: list[int], out: dict[str, np.ndarray]) -> pb.EncodeResponse:
    return pb.EncodeResponse(tokens=runner.tokenizer.token_strings(src), token_ids=src,
                             static_embeddings=matrix_to_pb(out["embeddings"][0]),
                             layer_outputs=[matrix_to_pb(h[0]) for h in out["hidden_states"]],
                             model=model_ref_to_pb(runner))


def summary_to_pb(runner: ModelRunner, on_disk: list[int]) -> pb.ModelSummary:
    m = runner.manifest
    return pb.ModelSummary(name=runner.name, version=runner.version, versions_on_disk=on_disk,
                           task=m.get("task") or "", precision=m.get("precision", "fp32"))


def info_to_pb(runner: ModelRunner, on_disk: list[int], limits: Limits) -> pb.ModelInfo:
    m = runner.manifest
    blocks = [pb.AttentionBlock(graph=b["graph"], block=b["block"], layer=b["layer"], kind=b["kind"],
                                heads=b["heads"], head_dim=b["head_dim"],
                                probabilities_exported=bool(b["probabilities_output"]))
              for b in m["attention_blocks"]]
    return pb.ModelInfo(
        name=runner.name, version=runner.version, versions_on_disk=on_disk, config_json=json.dumps(runner.config),
        execution_providers=runner.providers, attention_blocks=blocks, precision=m.get("precision", "fp32"),
        opset=m.get("opset", 0), task=m.get("task") or "", vocab_size=runner.vocab_size,
        limits=pb.Limits(max_source_tokens=min(limits.max_source_tokens, runner.max_len),
                         max_new_tokens=min(limits.max_new_tokens, runner.max_len - 1),
                         max_concurrent_streams=limits.max_concurrent_streams,
                         max_message_bytes=limits.max_message_bytes),
        validation_json=json.dumps(m.get("validation", {})))
