"""The Open Inference Protocol's tensors <-> domain types, in one place: the tensor contract of attnserve's models.

Inputs (one of): TEXT, BYTES [N] or [N, 1], UTF-8 source texts; SOURCE_IDS, INT64 [N, S], token ids (-1 pads).
Outputs: TEXT BYTES [N, 1]; TOKEN_IDS INT64 [N, T] and LOGPROBS FP32 [N, T] (-1 and 0 pad shorter answers);
ALIGNMENT INT64 [N, links, 4] (source_start, source_end, target_start, target_end per link, in characters of the
source text and of TEXT; -1 pads); MARKUP BYTES [N, 1] (TEXT with the source's inline tags placed);
CROSS_ATTENTION, DECODER_SELF_ATTENTION, ENCODER_SELF_ATTENTION FP32 [N, layers, heads, T_q, T_k] (the numbers
Predict returns; zero-padded across the batch); EMBEDDINGS FP32 [N, S, d_model] and HIDDEN_STATES FP32
[N, layers, S, d_model] (the Encode results). Without requested outputs: TEXT, TOKEN_IDS, LOGPROBS. Request
parameters: max_new_tokens, temperature, top_k, top_p, seed, stop, beam_size, attention_layers,
attention_heads (comma-separated indices), mean_over_heads (a boolean), alignment and markup (booleans: add
ALIGNMENT / MARKUP to the default outputs; markup reads TEXT as marked up), timeout (microseconds, as Triton's). Wire
protobuf is converted here and nowhere else.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass

import numpy as np

from model_repository import parse_version
from protos.attnserve.kserve.v2 import kserve_pb2 as pb

from ..domain import AttentionSlice, AttentionSpec, DecodeOptions, ModelRef, Source
from ..errors import InvalidRequest

INPUTS = {"TEXT": ("BYTES", [-1, 1]), "SOURCE_IDS": ("INT64", [-1, -1])}
OUTPUTS = {"TEXT": ("BYTES", [-1, 1]), "TOKEN_IDS": ("INT64", [-1, -1]), "LOGPROBS": ("FP32", [-1, -1]),
           "CROSS_ATTENTION": ("FP32", [-1, -1, -1, -1, -1]),
           "DECODER_SELF_ATTENTION": ("FP32", [-1, -1, -1, -1, -1]),
           "ENCODER_SELF_ATTENTION": ("FP32", [-1, -1, -1, -1, -1]),
           "EMBEDDINGS": ("FP32", [-1, -1, -1]), "HIDDEN_STATES": ("FP32", [-1, -1, -1, -1]),
           "ALIGNMENT": ("INT64", [-1, -1, 4]), "MARKUP": ("BYTES", [-1, 1])}
DEFAULT_OUTPUTS = ("TEXT", "TOKEN_IDS", "LOGPROBS")
ATTENTION_OUTPUTS = {"CROSS_ATTENTION": "cross", "DECODER_SELF_ATTENTION": "decoder_self",
                     "ENCODER_SELF_ATTENTION": "encoder_self"}
ENCODE_OUTPUTS = ("EMBEDDINGS", "HIDDEN_STATES")
_INT = {"max_new_tokens", "top_k", "seed", "beam_size"}
_FLOAT = {"temperature", "top_p"}
_KNOWN = _INT | _FLOAT | {"stop", "attention_layers", "attention_heads", "mean_over_heads", "alignment", "markup",
                          "triton_enable_empty_final_response", "sequence_id", "sequence_start", "sequence_end",
                          "priority", "timeout"}


@dataclass(frozen=True)
class InferCall:
    """A ModelInferRequest as the engine API needs it: one Source per batch row, shared options."""

    model: ModelRef
    sources: list[Source]
    options: DecodeOptions
    beam_size: int
    attention: AttentionSpec | None
    outputs: tuple[str, ...]
    empty_final: bool  # streaming: a last, empty response flagged final
    timeout_s: float | None = None  # Triton's `timeout` parameter (microseconds on the wire)
    alignment: bool = False  # the ALIGNMENT output is asked for (or the `alignment` parameter is true)
    markup: bool = False  # the TEXT input holds inline tags: MARKUP gives the output with them placed

    def deadline(self, grpc_deadline: float | None) -> float | None:
        """The earlier of the call's own deadline (gRPC's, as time.monotonic()) and the `timeout` parameter's."""
        if self.timeout_s is None:
            return grpc_deadline
        own = time.monotonic() + self.timeout_s
        return own if grpc_deadline is None else min(own, grpc_deadline)


def version_of(text: str, model: str) -> int:
    """A request's version string: empty for the latest, else the repository's own rule (ASCII digits, 1 and up)."""
    if not text:
        return 0
    version = parse_version(text)
    if version is None:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise InvalidRequest(f"model version {shown!r} of '{model}' is not a version number (ASCII digits, 1 to "
                             f"{2**63 - 1}); leave it empty for the latest")
    return version


def element_count(shape, name: str, model: str) -> int:
    """The number of elements a tensor's shape holds, refusing negative sizes (the protocol's -1 means "any" in
    metadata only, never in a request)."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise InvalidRequest(f"input '{name}' for model '{model}' has shape {dims}: every size must be 0 or more")
    return math.prod(dims)  # Python integers: no int64 overflow for absurd shapes


def flag(params: dict, name: str, default: bool = False) -> bool:
    """A boolean parameter: bool_param (or a JSON boolean), or the strings true / false as some clients send."""
    value = params.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidRequest(f"parameter '{name}' must be a boolean (bool_param, or \"true\" / \"false\"), got "
                         f"{value!r}")


def _param(p: pb.InferParameter):
    return getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None


def _indices(value, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(value).split(",") if x.strip())
    except ValueError:
        raise InvalidRequest(f"parameter '{name}' must list indices separated by commas, got {value!r}") from None


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """BYTES raw contents: each element as a 4-byte little-endian length, then its bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidRequest(f"input '{name}': raw BYTES contents end inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise InvalidRequest(f"input '{name}': raw BYTES element of {n} bytes runs past the contents")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def _texts(t, raw: bytes | None, model: str) -> list[Source]:
    elements = _bytes_elements(raw, t.name) if raw is not None else list(t.contents.bytes_contents)
    count = element_count(t.shape, t.name, model) if len(t.shape) else 0
    if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1) or count != len(elements):
        raise InvalidRequest(f"input 'TEXT' for model '{model}' must have shape [N] or [N, 1] and hold N elements; "
                             f"got shape {list(t.shape)} with {len(elements)} elements")
    try:
        return [Source(text=e.decode("utf-8")) for e in elements]
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"input 'TEXT' for model '{model}' holds bytes that are not UTF-8 ({e.reason})") from None


def _ids(t, raw: bytes | None, model: str) -> list[Source]:
    if len(t.shape) != 2:
        raise InvalidRequest(f"input 'SOURCE_IDS' for model '{model}' must have shape [N, S], got {list(t.shape)}")
    count = element_count(t.shape, t.name, model)
    if 0 in t.shape:
        raise InvalidRequest(f"input 'SOURCE_IDS' for model '{model}' has shape {list(t.shape)}: no rows, or rows of "
                             "no token")
    if raw is not None:
        if len(raw) != 8 * count:
            raise InvalidRequest(f"input 'SOURCE_IDS': {len(raw)} raw bytes do not fill INT64 {list(t.shape)}")
        ids = np.frombuffer(raw, "<i8").reshape(tuple(t.shape))  # (N, S)
    else:
        if len(t.contents.int64_contents) != count:
            raise InvalidRequest(f"input 'SOURCE_IDS': {len(t.contents.int64_contents)} values do not fill "
                                 f"{list(t.shape)}")
        ids = np.asarray(t.contents.int64_contents, np.int64).reshape(tuple(t.shape))  # (N, S)
    return [Source(ids=tuple(int(x) for x in row if x >= 0)) for row in ids]


def infer_from_pb(req: pb.ModelInferRequest) -> InferCall:
    model = req.model_name
    if not model:
        raise InvalidRequest("model_name is empty; name the model (ModelMetadata lists its tensors)")
    if len(req.inputs) != 1:
        raise InvalidRequest(f"expected 1 input (TEXT or SOURCE_IDS) but got {len(req.inputs)} inputs for model "
                             f"'{model}'")
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise InvalidRequest(f"{len(req.raw_input_contents)} raw_input_contents for {len(req.inputs)} inputs")
    t = req.inputs[0]
    raw = req.raw_input_contents[0] if req.raw_input_contents else None
    if t.name not in INPUTS:
        raise InvalidRequest(f"unexpected inference input '{t.name}' for model '{model}'; it takes TEXT (BYTES) "
                             "or SOURCE_IDS (INT64)")
    if t.datatype != INPUTS[t.name][0]:
        raise InvalidRequest(f"inference input '{t.name}' data-type is '{t.datatype}', but model '{model}' "
                             f"expects '{INPUTS[t.name][0]}'")
    sources = _texts(t, raw, model) if t.name == "TEXT" else _ids(t, raw, model)
    if not sources:
        raise InvalidRequest(f"input '{t.name}' for model '{model}' holds no element")
    params = {k: _param(v) for k, v in req.parameters.items()}
    return infer_call(model, req.model_version, sources, params, tuple(o.name for o in req.outputs))


def infer_call(model: str, version: str, sources: list[Source], params: dict, outputs: tuple[str, ...],
               stop_lists: bool = False) -> InferCall:
    """The request's parameters and requested outputs checked against the contract (gRPC and REST alike).
    `stop_lists`: JSON can carry a list of stop strings where protobuf parameters carry one string."""
    unknown = set(params) - _KNOWN
    if unknown:
        raise InvalidRequest(f"unknown request parameter(s) {sorted(unknown)} for model '{model}'; known: "
                             f"{', '.join(sorted(_KNOWN - {'sequence_id', 'sequence_start', 'sequence_end'}))}")
    for name in _INT & set(params):
        if isinstance(params[name], bool) or not isinstance(params[name], int):
            raise InvalidRequest(f"parameter '{name}' must be an integer (int64_param), got {params[name]!r}")
    for name in _FLOAT & set(params):
        if isinstance(params[name], bool) or not isinstance(params[name], int | float):
            raise InvalidRequest(f"parameter '{name}' must be a number (double_param), got {params[name]!r}")
    alignment, markup = flag(params, "alignment"), flag(params, "markup")
    outputs = outputs or (*DEFAULT_OUTPUTS, *(("ALIGNMENT",) if alignment else ()), *(("MARKUP",) if markup else ()))
    for name in outputs:
        if name not in OUTPUTS:
            raise InvalidRequest(f"unexpected inference output '{name}' for model '{model}'; it has "
                                 f"{', '.join(OUTPUTS)}")
    kinds = frozenset(ATTENTION_OUTPUTS[o] for o in outputs if o in ATTENTION_OUTPUTS)
    attention = AttentionSpec(kinds, _indices(params.get("attention_layers", ""), "attention_layers"),
                              _indices(params.get("attention_heads", ""), "attention_heads"),
                              flag(params, "mean_over_heads")) if kinds else None
    stop = params.get("stop")
    if stop_lists and isinstance(stop, list):
        if not all(isinstance(x, str) for x in stop):
            raise InvalidRequest(f"parameter 'stop' must be a string or a list of strings, got {stop!r}")
        stops = tuple(x for x in stop if x)
    elif stop is None or isinstance(stop, str):
        stops = (stop,) if stop else ()
    else:
        raise InvalidRequest(f"parameter 'stop' must be a string{' or a list of strings' if stop_lists else ''}, "
                             f"got {stop!r}")
    options = DecodeOptions(max_new_tokens=params.get("max_new_tokens"), temperature=params.get("temperature"),
                            top_k=params.get("top_k"), top_p=params.get("top_p"), seed=params.get("seed"),
                            stop=stops)
    timeout = params.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0):
        raise InvalidRequest(f"parameter 'timeout' must be an integer of microseconds (0: none), got {timeout!r}")
    return InferCall(ModelRef(model, version_of(version, model)), sources, options,
                     int(params.get("beam_size", 0)), attention, outputs,
                     flag(params, "triton_enable_empty_final_response"), timeout / 1e6 if timeout else None,
                     alignment or "ALIGNMENT" in outputs, markup or "MARKUP" in outputs)


# ---------------------------------------------------------------------------------------------- outputs
def _bytes_raw(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def padded(rows: list[np.ndarray], fill, dtype) -> np.ndarray:
    """Arrays of one rank but different sizes stacked into one (N, *max sizes) array, `fill` where missing."""
    shape = tuple(max(r.shape[d] for r in rows) for d in range(rows[0].ndim)) if rows[0].ndim else ()
    out = np.full((len(rows), *shape), fill, dtype)
    for i, r in enumerate(rows):
        out[(i, *(slice(0, n) for n in r.shape))] = r
    return out


def link_rows(links) -> np.ndarray:
    """Alignment links as an INT64 (links, 4) array: source_start, source_end, target_start, target_end."""
    return np.array(links or [], np.int64).reshape(-1, 4)  # (links, 4)


def stacked_attention(slices: list[AttentionSlice], kind: str) -> np.ndarray:
    """One kind's (h, Tq, Tk) matrices per layer as (layers, h, Tq, Tk), the layers in the order Predict gives."""
    mats = [s.weights for s in slices if s.kind == kind]
    return np.stack(mats) if mats else np.zeros((0, 0, 0, 0), np.float32)  # (L, h, Tq, Tk)


def response_to_pb(model: ModelRef, request_id: str, outputs: dict[str, np.ndarray | list[str]],
                   parameters: dict | None = None) -> pb.ModelInferResponse:
    """Every output raw, in the order given: BYTES as length-prefixed UTF-8, numbers little-endian."""
    resp = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request_id)
    for name, value in outputs.items():
        datatype = OUTPUTS[name][0]
        if datatype == "BYTES":
            resp.outputs.add(name=name, datatype=datatype, shape=[len(value), 1])
            resp.raw_output_contents.append(_bytes_raw([v.encode("utf-8") for v in value]))
        else:
            arr = np.ascontiguousarray(value, "<f4" if datatype == "FP32" else "<i8")
            resp.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
            resp.raw_output_contents.append(arr.tobytes())
    for key, value in (parameters or {}).items():
        set_param(resp.parameters[key], value)
    return resp


def set_param(p: pb.InferParameter, value) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    else:
        p.string_param = str(value)
