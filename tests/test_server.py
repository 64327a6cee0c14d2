"""The gRPC server end to end: a real server on a free port, real exported models, the real client."""

import threading
import time

import grpc
import numpy as np
import pytest
import torch

from model_src.checkpoint import load_model
from model_src.decoding import generate as torch_generate
from protos.attnserve.v1 import attnserve_pb2 as pb
from serving.client import AttnServeClient
from serving.domain import Limits
from serving.frontends.server import ServerConfig

from .server_harness import ServerThread, start

INPUTS = ["abc", "hello", "qwertyui", "zz", "mnop"]


@pytest.fixture(scope="module")
def server(serving_repo):
    cfg = ServerConfig(repo=serving_repo, address="127.0.0.1:0", metrics_port=0, poll_seconds=0,
                       drain_seconds=0.0, limits=Limits(max_new_tokens=250, max_source_tokens=64))
    s = ServerThread(cfg)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with AttnServeClient(server.address) as c:
        yield c


def _stream(client, text, **kw):
    tokens, attention, finish = [], [], None
    for msg in client.generate(text, **kw):
        if msg.HasField("token"):
            tokens.append(msg.token)
            attention.append(list(msg.attention))
        if msg.HasField("finish"):
            finish = msg.finish
    return tokens, attention, finish


def test_stream_equals_predict_equals_pytorch_greedy(client, tiny_checkpoint):
    model, tok, _ = load_model(tiny_checkpoint)
    reference = torch_generate(model, [tok.encode(t) for t in INPUTS], max_new_tokens=30)
    for text, ref in zip(INPUTS, reference, strict=True):
        tokens, _, finish = _stream(client, text, model="tiny", max_new_tokens=30)
        assert [t.id for t in tokens] == ref
        predicted = client.predict(text, model="tiny", max_new_tokens=30)
        assert [t.id for t in predicted.tokens] == ref
        assert predicted.text == finish.text == "".join(t.text for t in tokens) == tok.decode(ref)
        assert finish.generated_tokens == len(ref) and finish.prompt_tokens == len(text)


def test_streamed_attention_equals_pytorch_and_rows_sum_to_1(client, tiny_checkpoint):
    model, tok, _ = load_model(tiny_checkpoint)
    text = "hello"
    tokens, attention, _ = _stream(client, text, model="tiny", attention="all", max_new_tokens=30)
    src = torch.tensor([tok.encode(text)])
    smask = torch.ones_like(src, dtype=torch.bool)
    tgt = torch.tensor([[model.config.bos_id] + [t.id for t in tokens]])
    with torch.no_grad():
        _, self_ref, cross_ref = model.decode(tgt, torch.ones_like(tgt, dtype=torch.bool),
                                              model.encode(src, smask), smask)
    for step, tensors in enumerate(attention):
        kinds = {(t.kind, t.layer) for t in tensors}
        assert kinds == {(k, layer) for k in ("cross", "decoder_self") for layer in range(2)}
        for t in tensors:
            w = np.asarray(t.weights).reshape(len(t.head_indices), 1, t.key_length)
            np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
            ref = (cross_ref if t.kind == "cross" else self_ref)[t.layer, 0, :, step: step + 1]
            if t.kind == "decoder_self":
                ref = ref[..., : step + 1]
                assert t.key_length == step + 1
            np.testing.assert_allclose(w, ref.numpy(), atol=1e-5)


def test_first_message_names_the_source_tokens(client):
    messages = list(client.generate("abc", model="tiny", max_new_tokens=3))
    assert list(messages[0].source_tokens) == ["a", "b", "c"]
    assert all(not m.source_tokens for m in messages[1:])


def test_attention_selection_layers_heads_mean(client):
    _, attention, _ = _stream(client, "abc", model="tiny", attention="cross", layers=[1], heads=[0, 2],
                              max_new_tokens=5)
    t = attention[0][0]
    assert len(attention[0]) == 1 and (t.kind, t.layer, list(t.head_indices)) == ("cross", 1, [0, 2])
    assert len(t.weights) == 2 * 3
    _, mean, _ = _stream(client, "abc", model="tiny", attention="cross", layers=[1], heads=[0, 2],
                         mean_over_heads=True, max_new_tokens=5)
    w = np.asarray(t.weights).reshape(2, 3)
    np.testing.assert_allclose(np.asarray(mean[0][0].weights), w.mean(0), atol=1e-6)


def test_requests_without_attention_use_the_fast_graphs(server, client):
    runner = server.app.registry.get("tiny").runner
    before = dict(runner.calls)
    _stream(client, "hello", model="tiny")
    client.predict("hello", model="tiny")
    after = runner.calls
    assert after["decoder"] > before.get("decoder", 0)
    assert after["decoder_attn"] == before.get("decoder_attn", 0)
    assert after["encoder_attn"] == before.get("encoder_attn", 0)
    _stream(client, "hello", model="tiny", attention="cross")
    assert runner.calls["decoder_attn"] > before.get("decoder_attn", 0)


def test_predict_full_matrices_and_beam_search(client, tiny_checkpoint):
    from model_src.decoding import beam_search

    r = client.predict("hello", model="tiny", attention="all", max_new_tokens=30)
    T, S = len(r.tokens), 5
    shapes = {(t.kind, t.layer): (len(t.head_indices), t.query_length, t.key_length) for t in r.attention}
    assert shapes[("encoder_self", 0)] == (4, S, S)
    assert shapes[("cross", 1)] == (4, T, S)
    assert shapes[("decoder_self", 0)] == (4, T, T)
    self0 = next(t for t in r.attention if t.kind == "decoder_self" and t.layer == 0)
    m = np.asarray(self0.weights).reshape(4, T, T)
    assert np.triu(m, 1).max() == 0.0  # causal
    model, tok, _ = load_model(tiny_checkpoint)
    best = beam_search(model, tok.encode("hello"), beam_size=3, max_new_tokens=30)[0]
    beam = client.predict("hello", model="tiny", beam_size=3, max_new_tokens=30)
    assert [t.id for t in beam.tokens] == best[0]
    assert beam.score == pytest.approx(best[1], abs=1e-4)


def test_sampling_with_a_seed_is_reproducible(client):
    a = client.predict("qwerty", model="noisy", temperature=1.0, top_p=0.9, seed=11, max_new_tokens=20)
    b = client.predict("qwerty", model="noisy", temperature=1.0, top_p=0.9, seed=11, max_new_tokens=20)
    c = client.predict("qwerty", model="noisy", temperature=1.0, top_p=0.9, seed=12, max_new_tokens=20)
    assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
    assert [t.id for t in a.tokens] != [t.id for t in c.tokens]


def test_stop_string_ends_the_stream(client):
    full = client.predict("qwertyui", model="tiny", max_new_tokens=30).text
    assert len(full) >= 3
    stop = full[2:4]
    _tokens, _, finish = _stream(client, "qwertyui", model="tiny", stop=[stop], max_new_tokens=30)
    assert finish.reason == pb.FINISH_REASON_STOP and finish.text == full[: full.find(stop)]


def test_encode_static_vs_contextual(client):
    a = client.encode("abc", model="tiny")
    b = client.encode("xbz", model="tiny")
    assert a.tokens[1] == b.tokens[1] == "b"
    d = a.static_embeddings.cols
    emb_a = np.asarray(a.static_embeddings.values).reshape(3, d)
    emb_b = np.asarray(b.static_embeddings.values).reshape(3, d)
    np.testing.assert_array_equal(emb_a[1], emb_b[1])
    last_a = np.asarray(a.layer_outputs[-1].values).reshape(3, d)
    last_b = np.asarray(b.layer_outputs[-1].values).reshape(3, d)
    assert np.abs(last_a[1] - last_b[1]).max() > 1e-3
    assert len(a.layer_outputs) == 2


def test_list_models_and_info(client):
    names = {(m.name, m.version) for m in client.list_models().models}
    assert names == {("tiny", 1), ("noisy", 1)}
    info = client.model_info("tiny")
    assert info.execution_providers == ["CPUExecutionProvider"]
    assert len(info.attention_blocks) == 12 and info.limits.max_new_tokens == 250


BAD = [
    ({"source": "", "model": "tiny"}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ({"source": "a" * 65, "model": "tiny"}, grpc.StatusCode.INVALID_ARGUMENT, "max_source_tokens"),
    ({"source": "abc", "model": "nope"}, grpc.StatusCode.NOT_FOUND, "not loaded"),
    ({"source": "abc", "model": "tiny", "version": 7}, grpc.StatusCode.NOT_FOUND, "version 7"),
    ({"source": "abc", "model": "tiny", "max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "at least 1"),
    ({"source": "abc", "model": "tiny", "max_new_tokens": 251}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ({"source": "abc", "model": "tiny", "temperature": -0.5}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"source": "abc", "model": "tiny", "temperature": 1e-45}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"source": "abc", "model": "tiny", "temperature": 1e9}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"source": "abc", "model": "tiny", "top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"source": "abc", "model": "tiny", "top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"source": "abc", "model": "tiny", "attention": "cross", "layers": [5]}, grpc.StatusCode.INVALID_ARGUMENT,
     "layer 5"),
    ({"source": "abc", "model": "tiny", "attention": "cross", "heads": [9]}, grpc.StatusCode.INVALID_ARGUMENT,
     "head 9"),
    ({"source": [4, 5, 999], "model": "tiny"}, grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    ({"source": "abc"}, grpc.StatusCode.INVALID_ARGUMENT, "several models"),
]


def test_beam_size_over_the_limit_is_invalid(client):
    with pytest.raises(grpc.RpcError) as e:
        client.predict("abc", model="tiny", beam_size=99)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "beam_size must be 0..8" in e.value.details()


@pytest.mark.parametrize("kwargs,code,needle", BAD)
def test_bad_requests_get_precise_status_and_the_server_keeps_serving(client, kwargs, code, needle):
    kwargs = dict(kwargs)
    source = kwargs.pop("source")
    for call in (lambda: list(client.generate(source, **kwargs)), lambda: client.predict(source, **kwargs)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code
        assert needle in e.value.details()
    assert client.predict("abc", model="tiny").text


def test_cancel_mid_stream_frees_the_sequence(server, client):
    engine = server.app.registry.get("noisy").engine
    call = client.generate("abcdefgh", model="noisy", max_new_tokens=250, attention="all")
    first = next(call)
    assert first.HasField("token")
    call.cancel()
    deadline = time.monotonic() + 5
    while engine.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load == 0
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED


def test_deadline_mid_stream_frees_the_sequence(server, client):
    engine = server.app.registry.get("noisy").engine
    steps = engine.steps
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate("abcdefgh", model="noisy", max_new_tokens=250, attention="all", timeout=0.05))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while engine.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load == 0
    assert engine.steps - steps < 250  # stopped early, not run to the end
    assert client.predict("abc", model="tiny").text


def test_too_many_streams_is_resource_exhausted(serving_repo):
    s = start(serving_repo, ["noisy"], max_concurrent_streams=2)
    try:
        with AttnServeClient(s.address) as c:
            calls = [c.generate("abcdefgh", max_new_tokens=120, attention="all") for _ in range(2)]
            for call in calls:
                next(call)
            with pytest.raises(grpc.RpcError) as e:
                next(c.generate("abc", max_new_tokens=5))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_streams" in e.value.details()
            for call in calls:
                call.cancel()
    finally:
        s.stop()


def test_oversized_predict_response_names_the_limit(serving_repo):
    s = start(serving_repo, ["tiny"], max_message_bytes=2000)
    try:
        with AttnServeClient(s.address) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.predict("abcdefgh", attention="all", max_new_tokens=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_message_bytes" in e.value.details()
            assert c.predict("abc").text
    finally:
        s.stop()


def test_metrics_endpoint(server, client):
    import urllib.request

    client.predict("abc", model="tiny")
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics").read().decode()
    for name in ("attnserve_requests_total", "attnserve_request_duration_seconds", "attnserve_models_loaded",
                 "attnserve_time_to_first_token_seconds", "attnserve_inter_token_latency_seconds",
                 "attnserve_generated_tokens_total", "attnserve_in_flight_requests"):
        assert name in text
    assert 'attnserve_requests_total{code="OK",method="Predict"}' in text
    assert 'provider="CPUExecutionProvider"' in text


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"attnserve.v1.AttnServeService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    with grpc.insecure_channel(server.address) as ch:  # v1: the same messages on the wire, under v1's name
        v1 = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                              request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                              response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        asked = reflection_pb2.ServerReflectionRequest(file_containing_symbol="attnserve.v1.AttnServeService")
        answer = next(v1(iter([asked])))
    assert answer.file_descriptor_response.file_descriptor_proto  # the contract, served over v1


def test_every_health_method_the_proto_declares_answers(server):
    """grpcio-health-checking releases differ: newer ones declare List (and leave it unimplemented); the server
    answers every method its installed proto declares, so reflection never advertises a dead one."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    methods = [m.name for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods]
    assert {"Check", "Watch"} <= set(methods)
    with grpc.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(service="model/tiny")).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert next(stub.Watch(health_pb2.HealthCheckRequest(service=""))).status == \
            health_pb2.HealthCheckResponse.SERVING
        if "List" in methods:
            statuses = stub.List(health_pb2.HealthListRequest()).statuses
            assert {"", "liveness", "model/tiny"} <= set(statuses)


def test_concurrent_streams_batched_together_give_the_same_tokens(server, tiny_checkpoint):
    """Continuous batching: sequences of different lengths, joining at different steps, share decoder steps
    through padded, masked caches; each must get exactly the tokens it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    texts = ["a", "hello", "qwertyui", "zz", "mnop", "abcdefgh", "xyz", "trained", "b", "klmno"]
    model, tok, _ = load_model(tiny_checkpoint)
    alone = torch_generate(model, [tok.encode(t) for t in texts], max_new_tokens=20)
    engine = server.app.registry.get("tiny").engine

    def burst() -> int:
        """All texts at once; returns the decoder steps they took together."""
        steps_before = engine.steps
        clients = [AttnServeClient(server.address) for _ in texts]
        for c in clients:
            c.list_models()  # connected before the burst: only the stagger below separates the arrivals
        start = threading.Barrier(len(texts))

        def run(i):
            start.wait()
            time.sleep(0.0003 * (i % 4))  # staggered arrivals: sequences join a batch already under way
            return [m.token.id for m in clients[i].generate(texts[i], model="tiny", max_new_tokens=20)
                    if m.HasField("token")]

        try:
            with ThreadPoolExecutor(len(texts)) as pool:
                together = list(pool.map(run, range(len(texts))))
        finally:
            for c in clients:
                c.close()
        assert together == alone
        return engine.steps - steps_before

    # fewer decoder steps than the sum of every sequence's own steps: they were batched. On a machine busy with
    # other work the arrivals can spread out, so a burst that happened to run one by one is tried again (up to 3).
    solo = sum(len(a) + 1 for a in alone)
    steps = []
    for _ in range(3):
        steps.append(burst())
        if steps[-1] < solo:
            break
    assert steps[-1] < solo, f"decoder steps per burst {steps}; {solo} unbatched"


def test_generate_command_streams_and_plots_a_heatmap(server, tmp_path, capsys):
    from serving.client.cli import generate_main, models_main, predict_main

    png = tmp_path / "attn.png"
    assert generate_main(["hello", "--server", server.address, "--model", "tiny", "--attention", "cross",
                          "--mean", "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    assert "layer 1 ->" in out and "heatmap written" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    png2 = tmp_path / "self.png"
    assert predict_main(["hello", "--server", server.address, "--model", "tiny", "--attention", "self",
                         "--plot", str(png2)]) == 0
    assert png2.exists()
    assert models_main(["--server", server.address, "--info"]) == 0
    assert "12 attention blocks" in capsys.readouterr().out
    assert generate_main(["", "--server", server.address, "--model", "tiny"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_a_huge_field_echoed_in_an_error_keeps_its_precise_status(client):
    """Status details travel in trailing metadata (16 KiB at most): the message is clipped, the code stays."""
    with pytest.raises(grpc.RpcError) as e:
        client.model_info("m" * 60_000)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and len(e.value.details().encode()) <= 4096
    with pytest.raises(grpc.RpcError) as e:
        client.model_info("\u05e9" * 20_000)  # every byte percent-encoded on the wire
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
