"""Protobuf <-> domain conversion, the error -> status-code map, and request validation against the limits."""

import json
import math

import grpc
import numpy as np
import pytest

from model_repository import open_version
from protos.attnserve.v1 import attnserve_pb2 as pb
from serving.api.validation import model_limits, resolve_params
from serving.domain import (
    AttentionSlice,
    AttentionSpec,
    DecodeOptions,
    DecodeParams,
    FinishEvent,
    Limits,
    ModelDescription,
    ModelRef,
    Served,
    Source,
    TokenEvent,
)
from serving.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidRequest,
    LimitExceeded,
    ModelFailure,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from serving.frontends.convert import (
    attention_from_pb,
    attention_to_pb,
    finish_to_pb,
    generate_from_pb,
    info_to_pb,
    options_from_pb,
    predict_from_pb,
    source_from_pb,
    summary_to_pb,
    token_event_to_pb,
)
from serving.frontends.status import status_of

SERVED = Served(ModelRef("tiny", 3), (7, 8, 9), ("a", "b", "c"))


# ---------------------------------------------------------------- protobuf -> domain
def test_unset_decoding_options_are_none():
    assert options_from_pb(pb.DecodingOptions()) == DecodeOptions(None, None, None, None, None, ())


def test_decoding_options_set_to_zero_are_not_unset():
    o = options_from_pb(pb.DecodingOptions(max_new_tokens=0, temperature=0.0, top_k=0, top_p=0.0, seed=0))
    assert (o.max_new_tokens, o.temperature, o.top_k, o.top_p, o.seed) == (0, 0.0, 0, 0.0, 0)


def test_decoding_options_carry_their_values():
    o = options_from_pb(pb.DecodingOptions(max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.25, seed=2**63 - 1,
                                           stop=["x", "yz"]))
    assert o == DecodeOptions(5, 0.5, 3, 0.25, 2**63 - 1, ("x", "yz"))


def test_sources_are_text_or_ids_or_neither():
    assert source_from_pb(pb.Source(text="héllo")) == Source(text="héllo", ids=None)
    assert source_from_pb(pb.Source(ids=pb.TokenIds(ids=[4, 5, 6]))) == Source(text=None, ids=(4, 5, 6))
    assert source_from_pb(pb.Source()) == Source(text=None, ids=None)
    assert source_from_pb(pb.Source(text="")) == Source(text="", ids=None)  # set but empty: validation's call


@pytest.mark.parametrize(("kind", "kinds"), [
    (pb.ATTENTION_KIND_CROSS, {"cross"}),
    (pb.ATTENTION_KIND_SELF, {"decoder_self", "encoder_self"}),
    (pb.ATTENTION_KIND_ALL, {"cross", "decoder_self", "encoder_self"}),
])
def test_attention_kinds(kind, kinds):
    spec = attention_from_pb(pb.AttentionRequest(kind=kind, layers=[1], heads=[0, 2], mean_over_heads=True))
    assert spec == AttentionSpec(frozenset(kinds), (1,), (0, 2), True)


def test_no_attention_is_none():
    assert attention_from_pb(pb.AttentionRequest()) is None


@pytest.mark.parametrize("extra", [{"layers": [0]}, {"heads": [1]}, {"mean_over_heads": True}])
def test_attention_none_with_a_selection_is_refused(extra):
    with pytest.raises(InvalidRequest, match="ATTENTION_KIND_UNSPECIFIED"):
        attention_from_pb(pb.AttentionRequest(kind=pb.ATTENTION_KIND_UNSPECIFIED, **extra))


def test_an_unknown_attention_kind_is_refused():
    request = pb.AttentionRequest()
    request.kind = 7  # proto3 enums are open: a newer client may send a value this server does not know
    with pytest.raises(InvalidRequest, match="attention.kind 7"):
        attention_from_pb(request)


def test_whole_requests_convert():
    req = pb.PredictRequest(model=pb.ModelRef(name="tiny", version=2), source=pb.Source(text="abc"),
                            options=pb.DecodingOptions(top_k=4), beam_size=3,
                            attention=pb.AttentionRequest(kind=pb.ATTENTION_KIND_CROSS))
    out = predict_from_pb(req, deadline=12.5)
    assert (out.model, out.source, out.options.top_k, out.options.temperature) == (
        ModelRef("tiny", 2), Source(text="abc"), 4, None)
    assert (out.attention.kinds, out.deadline, out.beam_size) == (frozenset({"cross"}), 12.5, 3)
    gen = generate_from_pb(pb.GenerateRequest(source=pb.Source(ids=pb.TokenIds(ids=[5]))), deadline=None)
    assert (gen.model, gen.source, gen.attention, gen.deadline) == (ModelRef("", 0), Source(ids=(5,)), None, None)


# ---------------------------------------------------------------- domain -> protobuf
def test_attention_to_pb_gives_shapes_and_row_major_weights():
    weights = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 10  # (heads, Tq, Tk)
    t = attention_to_pb(AttentionSlice("cross", 1, (0, 3), False, weights))
    assert (t.kind, t.layer, list(t.head_indices), t.mean_over_heads) == ("cross", 1, [0, 3], False)
    assert (t.query_length, t.key_length) == (3, 4)
    np.testing.assert_array_equal(np.asarray(t.weights, np.float32).reshape(2, 3, 4), weights)
    assert t.weights[1 * 4 + 2] == pytest.approx(weights[0, 1, 2])  # head 0, query 1, key 2


@pytest.mark.parametrize(("reason", "code"), [
    ("eos", pb.FINISH_REASON_EOS), ("length", pb.FINISH_REASON_LENGTH), ("stop", pb.FINISH_REASON_STOP),
])
def test_finish_to_pb(reason, code):
    ev = FinishEvent(reason, prompt_tokens=3, generated_tokens=5, text="hello", queue_ms=1.5,
                     time_to_first_token_ms=2.5, total_ms=9.0)
    msg = finish_to_pb(ev, SERVED)
    assert not msg.HasField("token") and msg.HasField("finish")
    f = msg.finish
    assert (f.reason, f.prompt_tokens, f.generated_tokens, f.text) == (code, 3, 5, "hello")
    assert (f.model.name, f.model.version, list(f.source_tokens)) == ("tiny", 3, ["a", "b", "c"])
    assert (f.timings.queue_ms, f.timings.time_to_first_token_ms, f.timings.total_ms) == (1.5, 2.5, 9.0)


def test_source_tokens_come_with_the_first_token_only():
    weights = np.full((1, 1, 3), 1 / 3, np.float32)
    first = token_event_to_pb(TokenEvent(9, "x", -0.25, 0, [AttentionSlice("cross", 0, (0,), True, weights)]),
                              SERVED)
    later = token_event_to_pb(TokenEvent(10, "y", -1.0, 1), SERVED)
    assert list(first.source_tokens) == ["a", "b", "c"] and list(later.source_tokens) == []
    assert (first.token.id, first.token.text, first.token.logprob, first.token.index) == (9, "x", -0.25, 0)
    assert len(first.attention) == 1 and first.attention[0].key_length == 3
    assert (later.token.index, len(later.attention), later.HasField("finish")) == (1, 0, False)


@pytest.fixture(scope="module")
def description(tiny_repo) -> ModelDescription:
    manifest = open_version(tiny_repo / "tiny" / "1")
    return ModelDescription(manifest, ("CPUExecutionProvider",), (1, 4), True,
                            model_limits(Limits(max_source_tokens=10_000), manifest.model.max_len))


def test_summary_to_pb(description):
    m = description.manifest
    s = summary_to_pb(description)
    assert (s.name, s.version, list(s.versions_on_disk)) == ("tiny", 1, [1, 4])
    assert (s.task, s.precision) == (m.task or "", m.precision)
    assert s.precision == "fp32"


def test_info_to_pb(description):
    m = description.manifest
    info = info_to_pb(description)
    assert (info.name, info.version, list(info.versions_on_disk)) == ("tiny", 1, [1, 4])
    assert json.loads(info.config_json) == m.model_config
    assert json.loads(info.validation_json) == m.validation
    assert list(info.execution_providers) == ["CPUExecutionProvider"]
    assert (info.precision, info.opset, info.task) == (m.precision, m.opset, m.task or "")
    assert info.vocab_size == m.model.tgt_vocab_size
    assert [(b.graph, b.block, b.layer, b.kind, b.heads, b.head_dim, b.probabilities_exported)
            for b in info.attention_blocks] == [
        (b.graph, b.block, b.layer, b.kind, b.heads, b.head_dim, b.probabilities_output is not None)
        for b in m.attention_blocks]
    assert any(b.probabilities_exported for b in info.attention_blocks)
    assert not all(b.probabilities_exported for b in info.attention_blocks)  # the fast graphs export none
    assert info.limits.max_source_tokens == m.model.max_len  # capped by the model, not the server's 10_000
    assert info.limits.max_new_tokens == min(Limits().max_new_tokens, m.model.max_len - 1)
    assert info.limits.max_message_bytes == Limits().max_message_bytes


# ---------------------------------------------------------------- errors -> status codes
@pytest.mark.parametrize(("error", "code"), [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ModelFailure, grpc.StatusCode.INTERNAL),
])
def test_each_domain_error_has_its_code_and_keeps_its_message(error, code):
    assert status_of(error("what went wrong")) == (code, "what went wrong")

    class Narrower(error):
        pass

    assert status_of(Narrower("sub"))[0] == code


def test_an_unknown_error_is_internal_and_does_not_leak_its_message():
    code, message = status_of(KeyError("/secret/path/of/the/server"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in message and "KeyError" in message


def test_an_unexpected_error_is_logged_once_with_its_traceback_under_the_id_the_client_gets(caplog):
    import re

    from serving.errors import InternalError, describe, logged

    try:
        {}["missing"]
    except KeyError as e:
        error = e
    caplog.set_level("ERROR", logger="serving.errors")
    wrapped = logged(error, "a request to tiny v1")
    assert isinstance(wrapped, InternalError)
    error_id = re.search(r"error id ([0-9a-f]{12})", str(wrapped)).group(1)
    assert [r.exc_info[1] for r in caplog.records] == [error] and error_id in caplog.records[0].getMessage()
    assert describe(wrapped, "ModelInfer") == ("INTERNAL", 500, str(wrapped))  # told as it is, not logged again
    assert status_of(wrapped) == (grpc.StatusCode.INTERNAL, str(wrapped)) and len(caplog.records) == 1
    assert describe(InvalidRequest("bad"), "x") == ("INVALID_ARGUMENT", 400, "bad") and len(caplog.records) == 1


# ---------------------------------------------------------------- validation
def test_resolve_params_fills_in_the_defaults():
    limits = Limits(default_new_tokens=11)
    assert resolve_params(DecodeOptions(), limits) == DecodeParams(max_new_tokens=11, temperature=0.0, top_k=0,
                                                                   top_p=1.0, seed=None, stop=())
    assert resolve_params(DecodeOptions(), limits).greedy


def test_resolve_params_keeps_valid_values():
    o = DecodeOptions(max_new_tokens=128, temperature=100.0, top_k=5, top_p=1.0, seed=2**63 - 1, stop=("a",) * 8)
    assert resolve_params(o, Limits()) == DecodeParams(128, 100.0, 5, 1.0, 2**63 - 1, ("a",) * 8)
    assert resolve_params(DecodeOptions(temperature=1e-3), Limits()).temperature == 1e-3


@pytest.mark.parametrize(("options", "field"), [
    (DecodeOptions(temperature=1e-45), "temperature"),
    (DecodeOptions(temperature=1e-4), "temperature"),
    (DecodeOptions(temperature=101.0), "temperature"),
    (DecodeOptions(temperature=-1.0), "temperature"),
    (DecodeOptions(temperature=math.nan), "temperature"),
    (DecodeOptions(temperature=math.inf), "temperature"),
    (DecodeOptions(top_p=math.nan), "top_p"),
    (DecodeOptions(top_p=0.0), "top_p"),
    (DecodeOptions(top_p=1.5), "top_p"),
    (DecodeOptions(top_k=-1), "top_k"),
    (DecodeOptions(seed=-1), "seed"),
    (DecodeOptions(seed=2**63), "seed"),
    (DecodeOptions(stop=("s",) * 9), "stop strings"),
    (DecodeOptions(stop=("",)), "stop strings"),
    (DecodeOptions(max_new_tokens=0), "max_new_tokens"),
    (DecodeOptions(max_new_tokens=129), "max_new_tokens"),
])
def test_resolve_params_refusals_name_their_field(options, field):
    with pytest.raises(InvalidRequest, match=field):
        resolve_params(options, Limits())


def test_model_limits_cap_lengths_by_max_len():
    capped = model_limits(Limits(), max_len=20)
    assert (capped.max_source_tokens, capped.max_new_tokens) == (20, 19)  # the decoder's <bos> takes a position
    assert capped.max_stop_strings == Limits().max_stop_strings
    roomy = model_limits(Limits(), max_len=10_000)
    assert (roomy.max_source_tokens, roomy.max_new_tokens) == (256, 128)


def test_capped_limits_refuse_what_the_model_cannot_hold():
    with pytest.raises(InvalidRequest, match="max_new_tokens 20 is over the limit of 19"):
        resolve_params(DecodeOptions(max_new_tokens=20), model_limits(Limits(), max_len=20))
