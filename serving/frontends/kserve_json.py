"""The Open Inference Protocol's REST bodies and Triton's generate extension <-> domain types, in one place.

Infer: the tensor contract of `kserve_tensors` (TEXT or SOURCE_IDS in; TEXT, TOKEN_IDS, LOGPROBS, attention and
Encode outputs out) as JSON tensors, `data` flat in row-major order (nested lists are accepted too).
Generate: `{"text_input": "...", "parameters": {...}}` in (TEXT is accepted as the input's other name), one JSON
object out (`text_output`, the token ids, the finish reason) or, streamed, one per token; with an `attention`
parameter each token carries its attention, the same numbers as the gRPC stream; with `alignment: true` each
token carries the links complete at it and the last object (or the one answer) every link, `word_alignment` and,
with `markup: true` (`text_input` holding inline tags), `markup_output`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..domain import (
    ATTENTION_KINDS,
    AttentionSlice,
    Encoding,
    FinishEvent,
    ModelRef,
    Prediction,
    Served,
    Source,
    TokenEvent,
)
from ..errors import InvalidRequest
from . import kserve_tensors as t

ATTENTION_CHOICES = ATTENTION_KINDS  # the same names and meanings as attnserve.v1's kinds
GENERATE_PARAMS = {"max_new_tokens", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "beam_size",
                   "attention", "attention_layers", "attention_heads", "mean_over_heads", "alignment", "markup"}


def _object(body: Any, what: str) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequest(f"the {what} body must be a JSON object, got {type(body).__name__}")
    return body


def _flattened(data: Any) -> list:
    """A tensor's `data`, flat or nested lists of any shape, in row-major order (iteratively: no depth limit)."""
    if not isinstance(data, list):
        return [] if data is None else [data]
    out: list = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _json_sources(tensor: dict, model: str) -> list[Source]:
    name, datatype = tensor.get("name"), tensor.get("datatype")
    if not isinstance(name, str) or name not in t.INPUTS:
        raise InvalidRequest(f"unexpected inference input '{name}' for model '{model}'; it takes TEXT (BYTES) or "
                             "SOURCE_IDS (INT64)")
    if datatype != t.INPUTS[name][0]:
        raise InvalidRequest(f"inference input '{name}' data-type is '{datatype}', but model '{model}' expects "
                             f"'{t.INPUTS[name][0]}'")
    shape, data = tensor.get("shape"), tensor.get("data")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidRequest(f"input '{name}': 'shape' must be a list of non-negative integers, got {shape!r}")
    flat = _flattened(data)
    if len(flat) != t.element_count(shape, name, model):
        raise InvalidRequest(f"input '{name}': {len(flat)} values do not fill shape {shape}")
    if name == "TEXT":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidRequest(f"input 'TEXT' for model '{model}' must have shape [N] or [N, 1], got {shape}")
        if not all(isinstance(x, str) for x in flat):
            raise InvalidRequest("input 'TEXT' holds a value that is not a string")
        return [Source(text=x) for x in flat]
    if len(shape) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and -2**63 <= x < 2**63
                                  for x in flat):
        raise InvalidRequest(f"input 'SOURCE_IDS' for model '{model}' must be INT64 integers of shape [N, S], got "
                             f"shape {shape}")
    if 0 in shape:
        raise InvalidRequest(f"input 'SOURCE_IDS' for model '{model}' has shape {shape}: no rows, or rows of no token")
    ids = np.asarray(flat, np.int64).reshape(tuple(shape))  # (N, S)
    return [Source(ids=tuple(int(x) for x in row if x >= 0)) for row in ids]


def infer_from_json(body: Any, model: str, version: str) -> tuple[t.InferCall, str]:
    """A REST infer request as the engine API needs it, and its id."""
    body = _object(body, "infer request")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidRequest(f"expected 'inputs' to hold 1 tensor (TEXT or SOURCE_IDS) for model '{model}'")
    sources = _json_sources(inputs[0], model)
    if not sources:
        raise InvalidRequest(f"input '{inputs[0].get('name')}' for model '{model}' holds no element")
    params = _object(body.get("parameters") or {}, "'parameters'")
    outputs = body.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise InvalidRequest("'outputs' must be a list of objects with a 'name'")
    call = t.infer_call(model, version, sources, params, tuple(o["name"] for o in outputs), stop_lists=True)
    request_id = body.get("id", "")
    return call, request_id if isinstance(request_id, str) else str(request_id)


def response_to_json(model: ModelRef, request_id: str, values: dict, parameters: dict | None = None) -> dict:
    outputs = []
    for name, value in values.items():
        datatype = t.OUTPUTS[name][0]
        if datatype == "BYTES":
            outputs.append({"name": name, "datatype": datatype, "shape": [len(value), 1], "data": list(value)})
        else:
            arr = np.asarray(value)
            outputs.append({"name": name, "datatype": datatype, "shape": list(arr.shape),
                            "data": arr.reshape(-1).tolist()})
    out = {"model_name": model.name, "model_version": str(model.version), "outputs": outputs}
    if request_id:
        out["id"] = request_id
    if parameters:
        out["parameters"] = parameters
    return out


# ---------------------------------------------------------------------------------------------- generate
def generate_from_json(body: Any, model: str, version: str, stream: bool) -> t.InferCall:
    """A generate request as one row of an infer call (TEXT out, plus the attention outputs it asks for)."""
    body = _object(body, "generate request")
    unknown = set(body) - {"text_input", "TEXT", "parameters", "id"}
    if unknown:
        raise InvalidRequest(f"unexpected field(s) {sorted(unknown)} in the generate request for model '{model}'; "
                             "it takes 'text_input' and 'parameters'")
    text = body.get("text_input", body.get("TEXT"))
    if not isinstance(text, str):
        raise InvalidRequest(f"'text_input' must be a string (the source text) for model '{model}', got "
                             f"{type(text).__name__}")
    params = dict(_object(body.get("parameters") or {}, "'parameters'"))
    unknown = set(params) - GENERATE_PARAMS
    if unknown:
        raise InvalidRequest(f"unknown parameter(s) {sorted(unknown)}; known: {', '.join(sorted(GENERATE_PARAMS))}")
    if "max_tokens" in params:  # Triton's LLM backends call it so
        params["max_new_tokens"] = params.pop("max_tokens")
    kind = params.pop("attention", "none")
    if not isinstance(kind, str) or kind not in ATTENTION_CHOICES:
        raise InvalidRequest(f"parameter 'attention' must be one of {', '.join(ATTENTION_CHOICES)}, got {kind!r}")
    beam = params.pop("beam_size", 0)
    if stream and isinstance(beam, int) and beam > 1:
        raise InvalidRequest("beam search sends its best hypothesis at the end: use generate, not generate_stream")
    outputs = tuple(name for name, k in t.ATTENTION_OUTPUTS.items() if k in ATTENTION_CHOICES[kind])
    return t.infer_call(model, version, [Source(text=text)], {**params, "beam_size": beam}, ("TEXT", *outputs),
                        stop_lists=True)


def attention_json(slices: list[AttentionSlice]) -> list[dict]:
    """Each slice as {kind, layer, heads, mean, shape [h, Tq, Tk], weights (flat, row-major)}."""
    return [{"kind": s.kind, "layer": s.layer, "heads": list(s.heads), "mean": s.mean, "shape": list(s.weights.shape),
             "weights": np.round(s.weights.astype(np.float64), 7).reshape(-1).tolist()} for s in slices]


def _aligned(out: dict, served: Served, alignment, word_alignment=None, markup: str | None = None) -> dict:
    """The alignment fields, when the request asked: links as [source_start, source_end, target_start,
    target_end] lists (characters of the source text and of the output text)."""
    view = served.view
    if view is not None and view.show:
        out["alignment"] = [list(x) for x in alignment or ()]
        if word_alignment is not None:
            out["word_alignment"] = [list(x) for x in word_alignment]
    if view is not None and view.markup is not None and markup is not None:
        out["markup_output"] = markup
    return out


def token_json(ev: TokenEvent, served: Served) -> dict:
    out = {"model_name": served.model.name, "model_version": str(served.model.version), "text_output": ev.text,
           "token_id": ev.id, "token_index": ev.index, "logprob": ev.logprob}
    if ev.index == 0:
        out["source_tokens"] = list(served.source_tokens)
    if ev.attention:
        out["attention"] = attention_json(ev.attention)
    return _aligned(out, served, ev.alignment)


def finish_json(ev: FinishEvent, served: Served) -> dict:
    """The last object of a stream: no new text, the whole text and why it ended (and, when asked, every link of
    the output, its word links and the markup)."""
    out = {"model_name": served.model.name, "model_version": str(served.model.version), "text_output": "",
           "final_text": ev.text, "finish_reason": ev.reason, "prompt_tokens": ev.prompt_tokens,
           "generated_tokens": ev.generated_tokens, "time_to_first_token_ms": round(ev.time_to_first_token_ms, 3),
           "total_ms": round(ev.total_ms, 3), "source_tokens": list(served.source_tokens)}
    return _aligned(out, served, ev.alignment, ev.word_alignment, ev.markup)


def prediction_json(p: Prediction) -> dict:
    """The generate answer: the whole text, its tokens, why it ended and, when asked, whole attention matrices,
    the alignment and the markup."""
    out = {"model_name": p.served.model.name, "model_version": str(p.served.model.version), "text_output": p.text,
           "token_ids": [k.id for k in p.tokens], "logprobs": [k.logprob for k in p.tokens],
           "finish_reason": p.reason, "score": p.score, "source_tokens": list(p.served.source_tokens)}
    if p.attention:
        out["attention"] = attention_json(p.attention)
    return _aligned(out, p.served, p.alignment, p.word_alignment, p.markup)


def encoding_json(encoding: Encoding) -> dict:
    served = encoding.served
    return {"model_name": served.model.name, "model_version": str(served.model.version),
            "tokens": list(served.source_tokens), "token_ids": list(served.source_ids),
            "embeddings": np.asarray(encoding.embeddings, np.float64).round(6).tolist(),  # (S, d)
            "hidden_states": np.asarray(encoding.hidden_states, np.float64).round(6).tolist()}  # (L, S, d)
