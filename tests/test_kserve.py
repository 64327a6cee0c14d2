"""The Open Inference Protocol (KServe v2) through tritonclient[grpc], unchanged: every answer equal to what
attnserve.v1 gives for the same input, on the same server and engine."""

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from serving.client import AttnServeClient

from .server_harness import start

TEXTS = ["abc", "hello", "qwertyui", "zz"]


@pytest.fixture(scope="module")
def server(serving_repo):
    s = start(serving_repo, max_new_tokens=64)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def triton(server):
    client = tc.InferenceServerClient(server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def ours(server):
    with AttnServeClient(server.address) as c:
        yield c


def _text_input(texts: list[str]) -> tc.InferInput:
    inp = tc.InferInput("TEXT", [len(texts), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    return inp


def _outputs(*names: str) -> list[tc.InferRequestedOutput]:
    return [tc.InferRequestedOutput(n) for n in names]


def test_health_metadata_and_config(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("tiny") and triton.is_model_ready("tiny", "1")
    assert not triton.is_model_ready("tiny", "7") and not triton.is_model_ready("missing")
    meta = triton.get_server_metadata(as_json=True)
    assert meta["name"] == "attnserve" and "model_configuration" in meta["extensions"]
    model = triton.get_model_metadata("tiny", as_json=True)
    assert model["name"] == "tiny" and model["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in model["inputs"]} == {"TEXT": "BYTES", "SOURCE_IDS": "INT64"}
    assert {"TEXT", "TOKEN_IDS", "LOGPROBS", "CROSS_ATTENTION", "EMBEDDINGS"} <= {o["name"] for o in model["outputs"]}
    config = triton.get_model_config("tiny", as_json=True)["config"]
    assert config["name"] == "tiny" and config["max_batch_size"] == 32
    assert {i["name"]: i["data_type"] for i in config["input"]} == {"TEXT": "TYPE_STRING", "SOURCE_IDS": "TYPE_INT64"}


def test_a_batch_of_texts_answers_as_predict_does_each_and_shares_the_engine(server, triton, ours):
    engine = server.app.registry.get("tiny").engine
    steps = engine.steps
    r = triton.infer("tiny", [_text_input(TEXTS)], outputs=_outputs("TEXT", "TOKEN_IDS", "LOGPROBS"),
                     parameters={"max_new_tokens": 20}, request_id="42")
    batched_steps = engine.steps - steps
    assert r.get_response().id == "42"
    texts, ids, logprobs = r.as_numpy("TEXT"), r.as_numpy("TOKEN_IDS"), r.as_numpy("LOGPROBS")
    assert texts.shape == (4, 1) and ids.shape[0] == logprobs.shape[0] == 4
    alone = [ours.predict(t, model="tiny", max_new_tokens=20) for t in TEXTS]
    for i, p in enumerate(alone):
        assert texts[i][0].decode() == p.text
        n = len(p.tokens)
        assert list(ids[i][:n]) == [k.id for k in p.tokens] and all(ids[i][n:] == -1)
        np.testing.assert_allclose(logprobs[i][:n], [k.logprob for k in p.tokens], atol=1e-6)
    assert batched_steps < sum(len(p.tokens) + 1 for p in alone)  # the rows shared decoder steps


def test_attention_and_encode_outputs_are_predict_and_encode_as_tensors(triton, ours):
    names = ("TEXT", "CROSS_ATTENTION", "DECODER_SELF_ATTENTION", "ENCODER_SELF_ATTENTION", "EMBEDDINGS",
             "HIDDEN_STATES")
    r = triton.infer("tiny", [_text_input(["hello", "qwertyui"])], outputs=_outputs(*names),
                     parameters={"max_new_tokens": 12})
    for i, text in enumerate(["hello", "qwertyui"]):
        p = ours.predict(text, model="tiny", attention="all", max_new_tokens=12)
        for kind, name in (("cross", "CROSS_ATTENTION"), ("decoder_self", "DECODER_SELF_ATTENTION"),
                           ("encoder_self", "ENCODER_SELF_ATTENTION")):
            mats = [np.asarray(a.weights).reshape(len(a.head_indices), a.query_length, a.key_length)
                    for a in p.attention if a.kind == kind]
            want = np.stack(mats)  # (L, h, Tq, Tk)
            got = r.as_numpy(name)[i]
            L, h, tq, tk = want.shape
            np.testing.assert_allclose(got[:L, :h, :tq, :tk], want, atol=1e-6)
            assert not got[:, :, tq:, :].any() and not got[:, :, :, tk:].any()  # padding only beyond
        e = ours.encode(text, model="tiny")
        s = e.static_embeddings
        np.testing.assert_allclose(r.as_numpy("EMBEDDINGS")[i][: s.rows], np.asarray(s.values).reshape(s.rows, s.cols),
                                   atol=1e-6)
        hidden = np.stack([np.asarray(m.values).reshape(m.rows, m.cols) for m in e.layer_outputs])
        np.testing.assert_allclose(r.as_numpy("HIDDEN_STATES")[i][:, : s.rows], hidden, atol=1e-6)


def test_token_ids_in_and_parameters(triton, ours):
    ids = ours.encode("hello", model="tiny").token_ids
    inp = tc.InferInput("SOURCE_IDS", [1, len(ids)], "INT64")
    inp.set_data_from_numpy(np.array([list(ids)], np.int64))
    r = triton.infer("tiny", [inp], parameters={"max_new_tokens": 8, "temperature": 0.7, "seed": 3})
    p = ours.predict("hello", model="tiny", max_new_tokens=8, temperature=0.7, seed=3)
    assert r.as_numpy("TEXT")[0][0].decode() == p.text


def test_streaming_gives_the_generate_stream_token_by_token(triton, ours):
    results: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for empty_final in (False, True):
            triton.async_stream_infer("tiny", [_text_input(["hello"])], request_id=f"s{empty_final}",
                                      outputs=_outputs("TEXT", "TOKEN_IDS", "CROSS_ATTENTION"),
                                      parameters={"max_new_tokens": 15}, enable_empty_final_response=empty_final)
            got = []
            while True:
                result, error = results.get(timeout=30)
                assert error is None, error
                response = result.get_response()
                if result.as_numpy("TOKEN_IDS") is not None:
                    got.append((int(result.as_numpy("TOKEN_IDS")[0][0]), result.as_numpy("TEXT")[0][0].decode(),
                                result.as_numpy("CROSS_ATTENTION")[0]))
                if response.parameters["triton_final_response"].bool_param:
                    assert bool(result.as_numpy("TOKEN_IDS") is None) == empty_final
                    break
            stream = [m for m in ours.generate("hello", model="tiny", max_new_tokens=15, attention="cross")
                      if m.HasField("token")]
            assert [g[0] for g in got] == [m.token.id for m in stream]
            assert "".join(g[1] for g in got) == "".join(m.token.text for m in stream)
            for (_, _, att), m in zip(got, stream, strict=True):
                want = np.stack([np.asarray(a.weights).reshape(len(a.head_indices), 1, a.key_length)
                                 for a in m.attention])  # (L, h, 1, S)
                np.testing.assert_allclose(att, want, atol=1e-6)
    finally:
        triton.stop_stream()


def test_bad_tensors_and_parameters_get_the_statuses_triton_users_expect(triton):
    cases = [
        (dict(inputs=[tc.InferInput("FOO", [1], "BYTES")]), "INVALID_ARGUMENT", "unexpected inference input 'FOO'"),
        (dict(inputs=[tc.InferInput("TEXT", [1, 1], "INT32")]), "INVALID_ARGUMENT", "data-type is 'INT32'"),
        (dict(inputs=[_text_input(["abc"])], outputs=_outputs("LOGITS")), "INVALID_ARGUMENT",
         "unexpected inference output 'LOGITS'"),
        (dict(inputs=[_text_input(["abc"])], parameters={"temprature": 0.5}), "INVALID_ARGUMENT", "temprature"),
        (dict(inputs=[_text_input(["abc"])], parameters={"temperature": 1e9}), "INVALID_ARGUMENT", "temperature"),
        (dict(inputs=[_text_input(["abc"])], parameters={"max_new_tokens": "many"}), "INVALID_ARGUMENT",
         "max_new_tokens"),
        (dict(inputs=[_text_input(["abc"])], model_version="x1"), "INVALID_ARGUMENT", "not a version number"),
        (dict(inputs=[_text_input(["abc"])], model_version="\u00b2"), "INVALID_ARGUMENT", "not a version number"),
        (dict(inputs=[_text_input(["ab"] * 33)]), "INVALID_ARGUMENT", "max_batch_size of 32"),
        (dict(inputs=[_text_input(["abc"])], outputs=_outputs("CROSS_ATTENTION"),
              parameters={"mean_over_heads": "maybe"}), "INVALID_ARGUMENT", "must be a boolean"),
        (dict(inputs=[_text_input(["abc"])], timeout=1), "DEADLINE_EXCEEDED", "deadline"),
        (dict(inputs=[_text_input(["abc"])], model_name="missing"), "NOT_FOUND", "'missing' is not loaded"),
    ]
    inputs = cases[1][0]["inputs"][0]
    inputs.set_data_from_numpy(np.array([[1]], np.int32))
    for kwargs, code, needle in cases:
        args = {"model_name": "tiny", **kwargs}
        with pytest.raises(InferenceServerException) as e:
            triton.infer(**args)
        assert e.value.status() == f"StatusCode.{code}" and needle in e.value.message(), (kwargs, e.value)
    assert triton.infer("tiny", [_text_input(["abc"])]).as_numpy("TEXT").shape == (1, 1)  # still serving


def test_a_failed_request_of_a_stream_is_reported_in_it_and_the_stream_goes_on(triton):
    results: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        triton.async_stream_infer("tiny", [_text_input(["a", "b"])], request_id="bad")
        _, error = results.get(timeout=30)
        assert error is not None and "INVALID_ARGUMENT" in str(error) and "one TEXT" in str(error)
        triton.async_stream_infer("tiny", [_text_input(["abc"])], request_id="good",
                                  enable_empty_final_response=True)
        texts = []
        while True:
            result, error = results.get(timeout=30)
            assert error is None
            if result.as_numpy("TEXT") is not None:
                texts.append(result.as_numpy("TEXT")[0][0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        assert texts
    finally:
        triton.stop_stream()


def test_version_strings_that_are_no_number_are_refused_on_every_call(triton):
    for call in (lambda: triton.is_model_ready("tiny", "\u00b2"), lambda: triton.get_model_metadata("tiny", "\u00b2"),
                 lambda: triton.get_model_config("tiny", "\u00b2")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "not a version number" in e.value.message()
    assert triton.is_model_ready("tiny", "999") is False and triton.is_model_ready("tiny")


def test_mean_over_heads_as_a_string_and_the_config_says_decoupled(triton):
    def heads(flag):
        result = triton.infer("tiny", [_text_input(["abc"])], outputs=_outputs("CROSS_ATTENTION"),
                              parameters={"mean_over_heads": flag})
        return result.as_numpy("CROSS_ATTENTION").shape[2]  # [N, layers, heads, T_q, T_k]

    assert heads("false") == heads(False) > 1 and heads("true") == heads(True) == 1
    config = triton.get_model_config("tiny").config
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 32


@pytest.mark.parametrize(("shape", "raw"), [([2**32, 2**32], b""), ([-1, -1], b"\0" * 8), ([4, 0], b""),
                                            ([2**62, 2], b"\0" * 16), ([0, 2**62], b"")])
def test_source_ids_shapes_that_cannot_hold_their_data_are_refused(server, shape, raw):
    from protos.attnserve.kserve.v2 import kserve_pb2 as pb

    request = pb.ModelInferRequest(model_name="tiny", raw_input_contents=[raw])
    request.inputs.add(name="SOURCE_IDS", datatype="INT64", shape=shape)
    with grpc.insecure_channel(server.address) as ch:
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            infer(request, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()


def test_a_batch_fails_whole_and_its_other_rows_are_cancelled():
    import asyncio

    from serving.errors import LimitExceeded
    from serving.frontends.oip import _whole

    cancelled = []

    async def slow(i):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    async def refused():
        await asyncio.sleep(0.01)
        raise LimitExceeded("over the limit")

    async def main():
        with pytest.raises(LimitExceeded):
            await asyncio.wait_for(_whole([slow(0), refused(), slow(2)]), 10)
        assert await _whole([asyncio.sleep(0, result=i) for i in range(3)]) == [0, 1, 2]

    asyncio.run(main())
    assert sorted(cancelled) == [0, 2]


def test_raw_grpc_status_for_a_call_without_a_model_name(server):
    from protos.attnserve.kserve.v2 import kserve_pb2 as pb

    with grpc.insecure_channel(server.address) as ch:
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            infer(pb.ModelInferRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_name is empty" in e.value.details()
