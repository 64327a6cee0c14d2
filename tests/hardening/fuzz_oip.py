"""The fuzz of the Open Inference Protocol surfaces: KServe v2 over gRPC (`inference.GRPCInferenceService`) and the
HTTP front end (its REST endpoints, Triton's generate and generate_stream).

Seeded like `fuzz.py`. A right answer is OK or a precise status for what the client sent: never UNKNOWN, INTERNAL
or a deadline over gRPC (a failed request inside a ModelStreamInfer is judged by its `[CODE]`), never a 5xx over
HTTP, and every HTTP error a JSON object with an `error`.
"""

from __future__ import annotations

import http.client
import json
import random
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from protos.attnserve.kserve.v2 import kserve_pb2 as kpb

from .common import INT64_MAX, INT64_MIN
from .fuzz import BAD_UTF8, _text

KSERVICE = "/inference.GRPCInferenceService/"
GRPC_METHODS = {"ModelInfer": kpb.ModelInferRequest, "ModelReady": kpb.ModelReadyRequest,
                "ModelMetadata": kpb.ModelMetadataRequest, "ModelConfig": kpb.ModelConfigRequest,
                "ModelStreamInfer": kpb.ModelInferRequest, "ServerLive": kpb.ServerLiveRequest,
                "ServerReady": kpb.ServerReadyRequest, "ServerMetadata": kpb.ServerMetadataRequest}
WRONG_GRPC = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DATA_LOSS}
MODELS = ("tiny", "noisy")
VERSIONS = ("", "", "1", "0", "2", "\u00b2", "\u0661", "x1", "-1", "1.0", " 1", "99999999999999999999999", "1" * 400)
DATATYPES = ("BYTES", "INT64", "FP32", "INT32", "BOOL", "UINT8", "FP16", "BF16", "", "bytes", "TEXT", "\u00e9")
DIMS = (-1, 0, 1, 1, 2, 3, 33, 2**31, 2**32, 2**62, INT64_MAX, INT64_MIN)
PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "beam_size", "attention_layers",
          "attention_heads", "mean_over_heads", "timeout", "priority", "sequence_id",
          "triton_enable_empty_final_response", "alignment", "markup", "unknown_knob", "", "\u00e9")
OUTPUT_NAMES = ("TEXT", "TOKEN_IDS", "LOGPROBS", "CROSS_ATTENTION", "DECODER_SELF_ATTENTION", "ENCODER_SELF_ATTENTION",
                "EMBEDDINGS", "HIDDEN_STATES", "ALIGNMENT", "MARKUP", "LOGITS", "", "text")
HTTP_ROUTES = ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/repository/index", "/v2/models/{m}",
               "/v2/models/{m}/ready", "/v2/models/{m}/versions/{v}", "/v2/models/{m}/versions/{v}/ready",
               "/v2/models/{m}/infer", "/v2/models/{m}/versions/{v}/infer", "/v2/models/{m}/generate",
               "/v2/models/{m}/generate_stream", "/v2/models/{m}/encode", "/v2/models/{m}/versions/{v}/generate",
               "/", "/explorer/../../etc/passwd", "/v2/models", "/v3/{m}")
HTTP_METHODS = ("GET", "POST", "POST", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")


@dataclass(frozen=True)
class GrpcCase:
    index: int
    method: str
    body: bytes  # one serialised request (ModelStreamInfer: several, each length-prefixed by 4 bytes)
    kind: str


@dataclass(frozen=True)
class HttpCase:
    index: int
    method: str
    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...]
    kind: str


def _value(rng: random.Random):
    """A parameter value of any type, good for some parameter or not."""
    return rng.choice([lambda: rng.random() < 0.5, lambda: rng.choice(DIMS), lambda: rng.randrange(-3, 300),
                       lambda: rng.choice([0.0, 0.5, 1.0, -1.0, 1e300, float("nan"), float("inf")]),
                       lambda: rng.choice(["true", "false", "maybe", "", "0,1", "1,x", "7"]),
                       lambda: _text(rng, rng.randrange(0, 6))])()


def _set_param(p: kpb.InferParameter, value) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if value < 0:
            p.int64_param = value
        elif value > INT64_MAX:
            p.uint64_param = value % 2**64
        else:
            p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value


class OipFuzzer:
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def _rng(self, surface: str, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{surface}:{index}")

    # -------------------------------------------------------------------------------------- gRPC
    def grpc_cases(self, n: int) -> Iterator[GrpcCase]:
        return (self.grpc_case(i) for i in range(n))

    def grpc_case(self, index: int) -> GrpcCase:
        rng = self._rng("grpc", index)
        roll = rng.random()
        if roll < 0.55:
            return GrpcCase(index, "ModelInfer", self.infer(rng).SerializeToString(), "infer")
        if roll < 0.7:
            stream = b"".join(struct.pack("<I", len(b)) + b for b in
                              (self.infer(rng).SerializeToString() for _ in range(rng.randrange(1, 4))))
            return GrpcCase(index, "ModelStreamInfer", stream, "stream")
        if roll < 0.9:
            method = rng.choice(["ModelReady", "ModelMetadata", "ModelConfig"])
            message = GRPC_METHODS[method](name=rng.choice([*MODELS, "", "nope", _text(rng, 3)]),
                                           version=rng.choice(VERSIONS))
            return GrpcCase(index, method, message.SerializeToString(), "metadata")
        method = rng.choice(list(GRPC_METHODS))
        body = rng.randbytes(rng.randrange(0, 64))
        if method == "ModelStreamInfer":  # one request of random bytes in the stream
            body = struct.pack("<I", len(body)) + body
        return GrpcCase(index, method, body, "random-bytes")

    def infer(self, rng: random.Random) -> kpb.ModelInferRequest:
        req = kpb.ModelInferRequest(model_name=rng.choice([*MODELS, *MODELS, "", "nope"]),
                                    model_version=rng.choice(VERSIONS), id=_text(rng, rng.randrange(0, 4)))
        for _ in range(rng.choice([1, 1, 1, 0, 2])):
            name = rng.choice(["TEXT", "TEXT", "SOURCE_IDS", "IMAGE", ""])
            good = {"TEXT": "BYTES", "SOURCE_IDS": "INT64"}.get(name, "FP32")
            t = req.inputs.add(name=name, datatype=good if rng.random() < 0.7 else rng.choice(DATATYPES))
            rows = rng.choice([1, 1, 2, 3, 33, 0])
            t.shape.extend([rows, 1] if name == "TEXT" and rng.random() < 0.5 else
                           [rows, rng.randrange(1, 6)] if name == "SOURCE_IDS" else [rows])
            if rng.random() < 0.2:
                t.shape[rng.randrange(len(t.shape))] = rng.choice(DIMS)
            count = max(0, min(t.shape[0], 40)) * (t.shape[1] if len(t.shape) > 1 and 0 < t.shape[1] < 10 else 1)
            count += rng.choice([0, 0, 0, 1, -1])
            raw = rng.random() < 0.4
            if name == "TEXT" or t.datatype == "BYTES":
                items = [(rng.choice(BAD_UTF8) if rng.random() < 0.05 else _text(rng, rng.randrange(1, 8)).encode())
                         for _ in range(max(count, 0))]
                if raw:
                    req.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in items)
                                                  + rng.choice([b"", b"", b"\x05\x00"]))
                else:
                    t.contents.bytes_contents.extend(items)
            else:
                ids = [rng.choice([rng.randrange(0, 40), -1, INT64_MAX, INT64_MIN, 10**6])
                       for _ in range(max(count, 0))]
                if raw:
                    req.raw_input_contents.append(struct.pack(f"<{len(ids)}q", *ids) + rng.choice([b"", b"\x01"]))
                else:
                    t.contents.int64_contents.extend(ids)
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            _set_param(req.parameters[rng.choice(PARAMS)], _value(rng))
        for _ in range(rng.choice([0, 0, 1, 2])):
            out = req.outputs.add(name=rng.choice(OUTPUT_NAMES))
            if rng.random() < 0.1:
                _set_param(out.parameters[rng.choice(PARAMS)], _value(rng))
        return req

    # -------------------------------------------------------------------------------------- HTTP
    def http_cases(self, n: int) -> Iterator[HttpCase]:
        return (self.http_case(i) for i in range(n))

    def http_case(self, index: int) -> HttpCase:
        rng = self._rng("http", index)
        route = rng.choice(HTTP_ROUTES) if rng.random() < 0.4 else rng.choice(HTTP_ROUTES[8:13])  # mostly model calls
        model = rng.choice([*MODELS, *MODELS, "nope", "%C2%B2", "%FF", "a%00b", "x" * 300])
        version = rng.choice(["1", "1", "%C2%B2", "0", "x", "99999999999999999999", "%E2%80%AE1"])
        path = route.replace("{m}", model).replace("{v}", version)
        expected = "POST" if route.endswith(("infer", "generate", "generate_stream", "encode")) else "GET"
        method = expected if rng.random() < 0.85 else rng.choice(HTTP_METHODS)
        headers = [("Content-Type", rng.choice(["application/json"] * 4 + ["text/plain", "application/x-www-form-"
                                                                          "urlencoded", "", "application/json; x"]))]
        roll = rng.random()
        if roll < 0.05:  # a generate_stream client that reads a little and vanishes
            body = json.dumps({"text_input": _text(rng, rng.randrange(1, 8)),
                               "parameters": {"max_tokens": 200, "attention": "all"}}).encode()
            return HttpCase(index, "POST", f"/v2/models/{rng.choice(MODELS)}/generate_stream", body,
                            (("Content-Type", "application/json"),), "vanish")
        if roll < 0.55:
            body, kind = json.dumps(self._http_body(rng, route)).encode(), "json"
        elif roll < 0.7:
            body, kind = json.dumps(self._shape(rng, rng.randrange(0, 12))).encode(), "json-any"
        elif roll < 0.8:
            depth = rng.choice([50, 500, 5000, 100_000])
            body, kind = rng.choice([b"[" * depth, b"[" * depth + b"]" * depth, b'{"a":' * depth]), "deep"
        elif roll < 0.88:
            good = json.dumps(self._http_body(rng, route)).encode()
            body, kind = good[:rng.randrange(0, max(len(good), 1))], "truncated"
        elif roll < 0.94:
            body, kind = rng.randbytes(rng.randrange(0, 200)) + rng.choice(BAD_UTF8), "bytes"
        else:
            body, kind = b'{"text_input": "' + b"x" * rng.choice([1 << 20, 3 << 20]) + b'"}', "huge"
        return HttpCase(index, method, path, body, tuple(headers), kind)

    def _shape(self, rng: random.Random, depth: int):
        """JSON of any shape and depth."""
        if depth <= 0:
            return rng.choice([None, True, 0, -1, 2**70, 1.5, "", _text(rng, 3)])
        if rng.random() < 0.5:
            return [self._shape(rng, depth - 1) for _ in range(rng.randrange(0, 3))]
        return {rng.choice(["inputs", "text_input", "parameters", "outputs", "name", "shape", "data", "id",
                            _text(rng, 2)]): self._shape(rng, depth - 1) for _ in range(rng.randrange(0, 3))}

    def _http_body(self, rng: random.Random, route: str):
        params = {rng.choice((*PARAMS, "attention", "max_tokens")): rng.choice(
            [_value(rng), [1, 2], {"a": 1}, None, ["x", 1], rng.choice(["none", "cross", "self", "all", "bogus"])])
            for _ in range(rng.choice([0, 0, 1, 2, 3]))}
        if route.endswith(("generate", "generate_stream", "encode")):
            body = {"text_input": rng.choice([_text(rng, rng.randrange(1, 8)), "", 5, None, ["a"], "x" * 400,
                                              "<b>ab</b> c", "<b>ab", "a</i>", "<x/>", "<a href='u'>b</a>"])}
            if params:
                body["parameters"] = params
            return body
        name = rng.choice(["TEXT", "TEXT", "SOURCE_IDS", ["TEXT"], None, "IMAGE"])
        rows = rng.choice([1, 1, 2, 0, 33, -1, 2**40])
        shape = rng.choice([[rows], [rows, 1], [rows, 3], [], [2**32, 2**32], "3", None])
        data = rng.choice([[_text(rng, 3) for _ in range(max(0, min(rows, 40)))], [[1, 2], [3]], [2**70], [],
                           "abc", None, [[["x"]]], [rng.randrange(0, 40) for _ in range(3)], [True], [1.5]])
        tensor = {"name": name, "datatype": rng.choice(["BYTES", "INT64", "FP32", 5, None]), "shape": shape,
                  "data": data}
        body = {"inputs": rng.choice([[tensor], [tensor, tensor], [], tensor, None])}
        if params:
            body["parameters"] = params
        if rng.random() < 0.3:
            body["outputs"] = [{"name": rng.choice(OUTPUT_NAMES)} for _ in range(rng.randrange(0, 3))]
        return body


# ---------------------------------------------------------------------------------------------- running it
@dataclass
class OipReport:
    tried: Counter = field(default_factory=Counter)  # surface -> cases
    statuses: Counter = field(default_factory=Counter)  # "grpc OK", "http 400", ...
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def lines(self) -> list[str]:
        return [f"open inference protocol fuzz: {dict(self.tried)}",
                f"  answers: {', '.join(f'{k} {v}' for k, v in sorted(self.statuses.items()))}",
                f"  slowest answer: {self.slowest:.2f} s; failures: {len(self.failures)}",
                *(f"    {f}" for f in self.failures[:10])]


def _identity(b: bytes) -> bytes:
    return b


def _split(stream: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(stream):
        (n,) = struct.unpack_from("<I", stream, i)
        out.append(stream[i + 4:i + 4 + n])
        i += 4 + n
    return out


def _own_timeout(body: bytes) -> bool:
    """Whether a ModelInferRequest sets Triton's `timeout` parameter: DEADLINE_EXCEEDED is then its right answer."""
    try:
        return "timeout" in kpb.ModelInferRequest.FromString(body).parameters
    except Exception:  # random bytes
        return False


def run_grpc(address: str, cases, report: OipReport, deadline: float = 10.0) -> OipReport:
    with grpc.insecure_channel(address) as ch:
        for case in cases:
            t0 = time.monotonic()
            path = KSERVICE + case.method
            try:
                if case.method == "ModelStreamInfer":
                    call = ch.stream_stream(path, request_serializer=_identity,
                                            response_deserializer=kpb.ModelStreamInferResponse.FromString)
                    for answer in call(iter(_split(case.body)), timeout=deadline):
                        code = answer.error_message.partition("]")[0].lstrip("[")
                        if code in ("INTERNAL", "UNKNOWN") or (code == "DEADLINE_EXCEEDED"
                                                               and not any(map(_own_timeout, _split(case.body)))):
                            report.failures.append(f"grpc case {case.index} ({case.kind}): in the stream "
                                                   f"{answer.error_message[:160]!r}")
                else:
                    ch.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)(
                        case.body, timeout=deadline)
                status = grpc.StatusCode.OK
            except grpc.RpcError as e:
                status = e.code()
                if status in WRONG_GRPC and not (status == grpc.StatusCode.DEADLINE_EXCEEDED
                                                 and _own_timeout(case.body)):
                    report.failures.append(f"grpc case {case.index} ({case.kind} {case.method}): {status.name} "
                                           f"{(e.details() or '')[:160]!r}")
            report.slowest = max(report.slowest, time.monotonic() - t0)
            report.tried["grpc"] += 1
            report.statuses[f"grpc {status.name}"] += 1
    return report


def run_http(port: int, cases, report: OipReport, deadline: float = 10.0) -> OipReport:
    for case in cases:
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=deadline)
        try:
            conn.request(case.method, case.path, body=case.body, headers=dict(case.headers))
            resp = conn.getresponse()
            raw = resp.read(40) if case.kind == "vanish" else resp.read()  # vanish: close mid-stream
            status, kind = resp.status, resp.getheader("Content-Type", "")
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            if case.kind == "huge":  # the server may answer 413 and close before the body is sent
                status, kind, raw = 413, "application/json", b'{"error": "closed"}'
            else:
                report.failures.append(f"http case {case.index} ({case.kind} {case.method} {case.path[:60]}): {e!r}")
                continue
        finally:
            conn.close()
        report.slowest = max(report.slowest, time.monotonic() - t0)
        report.tried["http"] += 1
        report.statuses[f"http {status}"] += 1
        if status >= 500:
            report.failures.append(f"http case {case.index} ({case.kind} {case.method} {case.path[:60]}): {status} "
                                   f"{raw[:160]!r}")
        elif case.kind == "vanish":
            continue  # left mid-stream: the server frees the sequence; the checks after the run say it stayed well
        elif status >= 400 and case.method != "HEAD":
            try:
                answer = json.loads(raw)
                # an error object; or the protocol's readiness answer, {"ready": false} with 400
                ok = isinstance(answer, dict) and ("error" in answer or (
                    case.path.endswith("/ready") and status == 400 and answer == {"ready": False}))
            except ValueError:
                ok = False
            if not ok or not kind.startswith("application/json"):
                report.failures.append(f"http case {case.index} ({case.kind}): {status} without a JSON error "
                                       f"({kind}: {raw[:80]!r})")
        elif status == 200 and b"event: error" in raw:
            for chunk in raw.decode("utf-8", "replace").split("\n\n"):
                if chunk.startswith("event: error") and '"code":"INTERNAL"' in chunk.replace(" ", ""):
                    report.failures.append(f"http case {case.index}: an INTERNAL error mid-stream {chunk[:160]!r}")
    return report

