"""The HTTP front end at the HTTP level: the Open Inference Protocol's REST endpoints, Triton's generate and
generate_stream (SSE), errors as JSON with Triton's statuses, a disconnect mid-stream, TLS and tokens."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time

import numpy as np
import pytest

from serving.client import AttnServeClient
from serving.frontends.security import SecurityConfig

from .server_harness import start
from .test_security import INFERENCE, pki  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def server(serving_repo):
    s = start(serving_repo, http_port=0, max_new_tokens=250, max_message_bytes=1 << 20)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def grpc_client(server):
    with AttnServeClient(server.address) as c:
        yield c


def request(port: int, method: str, path: str, body=None, headers=None, context=None, host="127.0.0.1"):
    conn = (http.client.HTTPSConnection(host, port, context=context, timeout=30) if context
            else http.client.HTTPConnection(host, port, timeout=30))
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    payload = json.loads(raw) if resp.getheader("Content-Type", "").startswith("application/json") else raw
    return resp.status, payload, resp


def sse(port: int, path: str, body) -> list[dict]:
    status, raw, _ = request(port, "POST", path, body)
    assert status == 200, raw
    events = []
    for chunk in raw.decode().split("\n\n"):
        if chunk.startswith("data: "):
            events.append(json.loads(chunk[len("data: "):]))
    return events


def test_health_metadata_and_readiness(server):
    port = server.app.http_port
    assert request(port, "GET", "/v2/health/live")[0] == 200
    assert request(port, "GET", "/v2/health/ready")[:2] == (200, {"ready": True})
    status, meta, _ = request(port, "GET", "/v2")
    assert status == 200 and meta["name"] == "attnserve" and "generate" in meta["extensions"]
    status, model, _ = request(port, "GET", "/v2/models/tiny")
    assert status == 200 and model["versions"] == ["1"] and {i["name"] for i in model["inputs"]} == {"TEXT",
                                                                                                   "SOURCE_IDS"}
    assert request(port, "GET", "/v2/models/tiny/versions/1/ready")[0] == 200
    assert request(port, "GET", "/v2/models/nope/ready")[:2] == (400, {"ready": False})
    status, index, _ = request(port, "POST", "/v2/repository/index", {})
    assert status == 200 and {m["name"] for m in index} == {"tiny", "noisy"}


def test_infer_matches_the_grpc_predict(server, grpc_client):
    port = server.app.http_port
    texts = ["hello", "abc"]
    body = {"id": "r1", "inputs": [{"name": "TEXT", "shape": [2, 1], "datatype": "BYTES", "data": texts}],
            "outputs": [{"name": "TEXT"}, {"name": "TOKEN_IDS"}, {"name": "CROSS_ATTENTION"}],
            "parameters": {"attention_layers": "1"}}
    status, resp, _ = request(port, "POST", "/v2/models/tiny/infer", body)
    assert status == 200 and resp["id"] == "r1" and resp["model_version"] == "1"
    out = {o["name"]: o for o in resp["outputs"]}
    want = [grpc_client.predict(t, model="tiny", attention="cross", layers=[1]) for t in texts]
    assert out["TEXT"]["data"] == [w.text for w in want]
    ids = np.array(out["TOKEN_IDS"]["data"]).reshape(out["TOKEN_IDS"]["shape"])  # (N, T)
    assert [list(row[row >= 0]) for row in ids] == [[k.id for k in w.tokens] for w in want]
    cross = np.array(out["CROSS_ATTENTION"]["data"], np.float32).reshape(out["CROSS_ATTENTION"]["shape"])
    first = next(a for a in want[0].attention if a.kind == "cross")  # (N, L=1, h, T, S) vs Predict's matrix
    expected = np.asarray(first.weights, np.float32).reshape(len(first.head_indices), first.query_length,
                                                             first.key_length)
    np.testing.assert_allclose(cross[0, 0, :, :first.query_length, :first.key_length], expected, atol=1e-6)
    ids_body = {"inputs": [{"name": "SOURCE_IDS", "shape": [1, 3], "datatype": "INT64", "data": [[5, 6, 7]]}]}
    status, resp, _ = request(port, "POST", "/v2/models/tiny/infer", ids_body)
    assert status == 200 and resp["outputs"][0]["data"] == [grpc_client.predict([5, 6, 7], model="tiny").text]


def test_generate_and_generate_stream_give_the_grpc_tokens_and_attention(server, grpc_client):
    port = server.app.http_port
    status, answer, _ = request(port, "POST", "/v2/models/tiny/generate", {"text_input": "hello"})
    want = grpc_client.predict("hello", model="tiny")
    assert status == 200 and answer["text_output"] == want.text
    assert answer["token_ids"] == [k.id for k in want.tokens] and answer["finish_reason"] == "eos"
    beam = request(port, "POST", "/v2/models/tiny/generate", {"text_input": "hello", "parameters": {"beam_size": 3}})[1]
    assert beam["token_ids"] == [k.id for k in grpc_client.predict("hello", model="tiny", beam_size=3).tokens]

    events = sse(port, "/v2/models/tiny/generate_stream",
                 {"text_input": "qwerty", "parameters": {"attention": "all", "max_tokens": 12}})
    stream = [m for m in grpc_client.generate("qwerty", model="tiny", attention="all", max_new_tokens=12)
              if m.HasField("token")]
    tokens, finish = events[:-1], events[-1]
    assert [e["token_id"] for e in tokens] == [m.token.id for m in stream]
    assert "".join(e["text_output"] for e in tokens) == finish["final_text"]
    assert tokens[0]["source_tokens"] == list("qwerty") and finish["finish_reason"] in ("eos", "length")
    for event, msg in zip(tokens, stream, strict=True):
        mine = {(a["kind"], a["layer"]): np.array(a["weights"]) for a in event["attention"]}
        theirs = {(a.kind, a.layer): np.array(a.weights) for a in msg.attention}
        assert mine.keys() == theirs.keys() == {(k, layer) for k in ("cross", "decoder_self") for layer in (0, 1)}
        for key, weights in theirs.items():
            np.testing.assert_allclose(mine[key], weights, atol=1e-6)


@pytest.mark.parametrize("method,path,body,status,fragment", [
    ("POST", "/v2/models/nope/generate", {"text_input": "x"}, 404, "model 'nope' is not loaded"),
    ("POST", "/v2/models/tiny/generate", {"text_input": 5}, 400, "'text_input' must be a string"),
    ("POST", "/v2/models/tiny/generate", b"{not json", 400, "not valid JSON"),
    ("POST", "/v2/models/tiny/generate", {"text_input": "x", "parameters": {"top_q": 1}}, 400, "unknown parameter"),
    ("POST", "/v2/models/tiny/generate", {"text_input": "x", "parameters": {"temperature": -1}}, 400, "temperature"),
    ("POST", "/v2/models/tiny/generate", {"text_input": "x" * 300}, 400, "source"),
    ("POST", "/v2/models/tiny/generate_stream", {"text_input": "x", "parameters": {"beam_size": 3}}, 400, "beam"),
    ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "FP32", "data": [1]}]},
     400, "unexpected inference input 'IMAGE'"),
    ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": "TEXT", "shape": [2, 1], "datatype": "BYTES",
                                                   "data": ["a"]}]}, 400, "do not fill shape"),
    ("GET", "/v2/models/tiny/generate", None, 405, "Method Not Allowed"),
    ("GET", "/v3/anything", None, 404, "Not Found"),
    ("POST", "/v2/models/tiny/generate", {"text_input": "x" * (2 << 20)}, 413, "Too Large"),
    # what a new user's mistakes and a fuzzer found answering 500 before
    ("GET", "/v2/models/tiny/versions/%C2%B2/ready", None, 400, "not a version number"),
    ("GET", "/v2/models/tiny/versions/%C2%B2", None, 400, "not a version number"),
    ("POST", "/v2/models/tiny/versions/%C2%B2/infer", {"inputs": []}, 400, "not a version number"),
    ("POST", "/v2/models/tiny/infer", b"[" * 100_000, 400, "too deeply"),
    ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": "SOURCE_IDS", "shape": [2**32, 2**32], "datatype": "INT64",
                                                   "data": []}]}, 400, "do not fill shape"),
    ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": "SOURCE_IDS", "shape": [2, 2], "datatype": "INT64",
                                                   "data": [[5, 6], [7]]}]}, 400, "do not fill shape"),
    ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": "SOURCE_IDS", "shape": [1, 1], "datatype": "INT64",
                                                   "data": [2**70]}]}, 400, "INT64 integers"),
    ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": "SOURCE_IDS", "shape": [3, 0], "datatype": "INT64",
                                                   "data": []}]}, 400, "rows of no token"),
    ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": ["TEXT"], "shape": [1], "datatype": "BYTES",
                                                   "data": ["a"]}]}, 400, "unexpected inference input"),
    ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": "TEXT", "shape": [33], "datatype": "BYTES",
                                                   "data": ["ab"] * 33}]}, 400, "max_batch_size of 32"),
    ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                                       "outputs": [{"name": "CROSS_ATTENTION"}],
                                       "parameters": {"mean_over_heads": "maybe"}}, 400, "must be a boolean"),
    ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                                       "parameters": {"stop": {"a": 1}}}, 400, "parameter 'stop' must be a string"),
    ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                                       "parameters": {"timeout": -5}}, 400, "microseconds"),
    ("POST", "/v2/models/tiny/generate", {"text_input": "x", "parameters": {"attention": [1]}}, 400,
     "parameter 'attention' must be one of"),
])
def test_bad_requests_get_json_errors_with_tritons_statuses(server, method, path, body, status, fragment):
    got, payload, _ = request(server.app.http_port, method, path, body)
    assert got == status, payload
    assert fragment in payload["error"]
    assert request(server.app.http_port, "POST", "/v2/models/tiny/generate", {"text_input": "ab"})[0] == 200


def test_attention_names_mean_the_same_over_http_and_grpc(server, grpc_client):
    port = server.app.http_port
    for kind in ("self", "all", "cross"):  # the names attnserve.v1 has too
        status, answer, _ = request(port, "POST", "/v2/models/tiny/generate",
                                    {"text_input": "hello", "parameters": {"attention": kind}})
        assert status == 200, answer
        want = grpc_client.predict("hello", model="tiny", attention=kind)
        mine = {(a["kind"], a["layer"]): np.array(a["weights"]) for a in answer["attention"]}
        theirs = {(a.kind, a.layer): np.array(a.weights) for a in want.attention}
        assert mine.keys() == theirs.keys(), kind
        assert any(k == "encoder_self" for k, _ in mine) == (kind in ("self", "all")), kind
        for key, weights in theirs.items():
            np.testing.assert_allclose(mine[key], weights, atol=1e-6)


def test_mean_over_heads_false_as_a_string_means_false(server):
    body = lambda flag: {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["abc"]}],  # noqa: E731
                         "outputs": [{"name": "CROSS_ATTENTION"}], "parameters": {"mean_over_heads": flag}}
    shapes = {}
    for flag in ("false", "true", False, "TRUE"):
        status, payload, _ = request(server.app.http_port, "POST", "/v2/models/tiny/infer", body(flag))
        assert status == 200, payload
        shapes[str(flag)] = payload["outputs"][0]["shape"]  # [N, layers, heads, T_q, T_k]
    assert shapes["false"] == shapes["False"] and shapes["false"][2] > 1  # every head
    assert shapes["true"][2] == shapes["TRUE"][2] == 1  # their mean


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(server):
    engine = server.app.registry.get("noisy").engine
    steps = engine.steps
    sock = socket.create_connection(("127.0.0.1", server.app.http_port))
    body = json.dumps({"text_input": "abcdefgh", "parameters": {"max_tokens": 250}}).encode()
    sock.sendall(b"POST /v2/models/noisy/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while received.count(b"data: ") < 2:  # two tokens have streamed: the sequence is running
        received += sock.recv(65536)
    sock.close()
    deadline = time.monotonic() + 5
    while engine.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load == 0 and engine.steps - steps < 200  # dropped, not run to 250 tokens
    metrics = server.app.metrics.requests.labels("HTTP generate_stream", "CANCELLED")._value.get()
    assert metrics >= 1


def test_the_http_port_has_the_grpc_ports_tls_and_tokens(serving_repo, pki):  # noqa: F811
    folder = pki["folder"]
    security = SecurityConfig(tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                              auth_token_file=folder / "inference.tokens")
    s = start(serving_repo, ["tiny"], http_port=0, security=security)
    try:
        port, ctx = s.app.http_port, ssl.create_default_context(cafile=str(pki["ca"]))
        body = {"text_input": "abc"}
        status, payload, resp = request(port, "POST", "/v2/models/tiny/generate", body, context=ctx, host="localhost")
        assert status == 401 and "Bearer" in payload["error"] and resp.getheader("WWW-Authenticate") == "Bearer"
        wrong = {"Authorization": "Bearer not-a-token-the-server-knows-000"}
        assert request(port, "POST", "/v2/models/tiny/generate", body, wrong, ctx, "localhost")[0] == 401
        good = {"Authorization": f"Bearer {INFERENCE[1]}"}
        status, payload, _ = request(port, "POST", "/v2/models/tiny/generate", body, good, ctx, "localhost")
        assert status == 200 and payload["text_output"]
        assert request(port, "GET", "/v2/health/ready", context=ctx, host="localhost")[0] == 200  # probes: open
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            request(port, "GET", "/v2/health/ready")  # plaintext to a TLS port
    finally:
        s.stop()


def test_mutual_tls_on_the_http_port_wants_a_client_certificate(serving_repo, pki):  # noqa: F811
    security = SecurityConfig(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    s = start(serving_repo, ["tiny"], http_port=0, security=security)
    try:
        port = s.app.http_port
        anonymous = ssl.create_default_context(cafile=str(pki["ca"]))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            request(port, "GET", "/v2/health/ready", context=anonymous, host="localhost")
        client = ssl.create_default_context(cafile=str(pki["ca"]))
        client.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
        assert request(port, "POST", "/v2/models/tiny/generate", {"text_input": "abc"}, context=client,
                       host="localhost")[0] == 200
        rogue = ssl.create_default_context(cafile=str(pki["ca"]))
        rogue.load_cert_chain(str(pki["rogue_cert"]), str(pki["rogue_key"]))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            request(port, "GET", "/v2/health/ready", context=rogue, host="localhost")
    finally:
        s.stop()


def test_an_answer_over_max_message_bytes_is_refused_as_grpc_would(server):
    text = "the quick brown fox jumps over the lazy dog, 1234567890"
    body = lambda n: {"inputs": [{"name": "TEXT", "shape": [n], "datatype": "BYTES", "data": [text] * n}],  # noqa: E731
                      "outputs": [{"name": "HIDDEN_STATES"}, {"name": "EMBEDDINGS"}]}
    status, payload, _ = request(server.app.http_port, "POST", "/v2/models/tiny/infer", body(32))
    assert status == 429 and "--max-message-bytes" in payload["error"], payload
    status, payload, _ = request(server.app.http_port, "POST", "/v2/models/tiny/infer", body(1))
    assert status == 200 and payload["outputs"][0]["shape"][0] == 1


def test_the_http_front_end_does_not_import_grpc():
    import subprocess
    import sys

    probe = "import sys, serving.frontends.http_server; print(sorted(m for m in sys.modules if m.startswith('grpc')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
