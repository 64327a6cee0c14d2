"""The Open Inference Protocol (KServe v2) over gRPC, `inference.GRPCInferenceService`, on the engine API.

Field mapping only (tensors in `kserve_tensors.py`): ModelInfer is a Predict per batch row (rows go through the
engine's batching together) plus an Encode per row when the Encode outputs are named; ModelStreamInfer is
Triton's decoupled streaming, a Generate per request with one response per token. Errors of unary calls are the
interceptor's statuses; a failed request of a stream is an `error_message` in it, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np

from protos.attnserve.kserve.v2 import kserve_pb2 as pb

from ..api.service import InferenceAPI
from ..domain import FinishEvent, GenerateRequest, ModelRef, TokenEvent
from ..errors import InvalidRequest, ServingError
from ..metrics import Metrics
from . import convert
from . import kserve_tensors as t
from .oip import PLATFORM, infer, server_version
from .status import status_of

SERVICE = "inference.GRPCInferenceService"
_CONFIG_TYPES = {"BYTES": pb.TYPE_STRING, "INT64": pb.TYPE_INT64, "FP32": pb.TYPE_FP32}
_STREAMED = {"TEXT", "TOKEN_IDS", "LOGPROBS", "CROSS_ATTENTION", "DECODER_SELF_ATTENTION", "ALIGNMENT", "MARKUP"}


class KServeServicer:
    def __init__(self, api: InferenceAPI, ready: Callable[[], bool], max_batch: int, metrics: Metrics) -> None:
        self.api, self.ready, self.max_batch, self.metrics = api, ready, max_batch, metrics

    # ------------------------------------------------------------------ health and metadata
    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        version = t.version_of(request.version, request.name)  # no number: INVALID_ARGUMENT, not "unready"
        try:
            served = self.api.registry.get(request.name, version)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=served.healthy)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="attnserve", version=server_version(),
                                         extensions=["model_configuration", "parameters"])

    def _describe(self, name: str, version: str):
        if not name:
            raise InvalidRequest("name is empty; name the model")
        return self.api.describe(ModelRef(name, t.version_of(version, name)))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        d = self._describe(request.name, request.version)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=d.manifest.name, versions=[str(d.manifest.version)], platform=PLATFORM,
            inputs=[meta(name=n, datatype=dt, shape=s) for n, (dt, s) in t.INPUTS.items()],
            outputs=[meta(name=n, datatype=dt, shape=s) for n, (dt, s) in t.OUTPUTS.items()])

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        d = self._describe(request.name, request.version)
        m = d.manifest
        config = pb.ModelConfig(
            name=m.name, platform=PLATFORM, backend="onnxruntime", max_batch_size=self.max_batch,
            input=[pb.ModelInput(name=n, data_type=_CONFIG_TYPES[dt], dims=s[1:], optional=True)
                   for n, (dt, s) in t.INPUTS.items()],
            output=[pb.ModelOutput(name=n, data_type=_CONFIG_TYPES[dt], dims=s[1:])
                    for n, (dt, s) in t.OUTPUTS.items()],
            # decoupled: ModelStreamInfer answers one request with a response per token (ModelInfer: one in all)
            model_transaction_policy=pb.ModelTransactionPolicy(decoupled=True))
        for key, value in (("task", m.task), ("precision", m.precision), ("providers", ",".join(d.providers)),
                           ("streaming", "ModelStreamInfer: one response per generated token")):
            config.parameters[key].string_value = str(value)
        return pb.ModelConfigResponse(config=config)

    # ------------------------------------------------------------------ inference
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        call = t.infer_from_pb(request)
        served, values = await infer(self.api, call, call.deadline(convert.deadline_of(context.time_remaining())),
                                     self.max_batch)
        return t.response_to_pb(served, request.id, values)

    async def ModelStreamInfer(self, requests: AsyncIterator,
                               context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request of the stream runs at once, beside the others; their responses interleave."""
        out: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def read() -> None:
            async for request in requests:
                task = asyncio.get_running_loop().create_task(self._one_stream(request, context, out))
                running.add(task)
                task.add_done_callback(running.discard)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while not (reader.done() and not running and out.empty()):
                getter = asyncio.ensure_future(out.get())
                await asyncio.wait([getter, reader, *running], return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            reader.result()  # a broken request stream ends the call with its error
        finally:
            for task in (reader, *running):
                task.cancel()

    async def _one_stream(self, request, context, out: asyncio.Queue) -> None:
        """One request of a stream, counted in the metrics under its own code (the call's is OK while it goes on)."""
        code = "OK"
        try:
            if not isinstance(request, pb.ModelInferRequest):
                raise InvalidRequest(f"the request does not parse ({request.error})")
            call = t.infer_from_pb(request)
            extra = [o for o in call.outputs if o not in _STREAMED]
            if extra or len(call.sources) != 1 or call.beam_size > 1:
                raise InvalidRequest(
                    "ModelStreamInfer streams one TEXT or SOURCE_IDS row, greedy or sampled, with outputs among "
                    f"{', '.join(sorted(_STREAMED))}; use ModelInfer for batches, beam search and {extra or 'these'}")
            await self._stream_tokens(request.id, call, call.deadline(convert.deadline_of(context.time_remaining())),
                                      out)
        except Exception as e:  # the request fails alone, as Triton reports it: the stream goes on
            status, message = status_of(e, "ModelStreamInfer request")
            code = status.name
            await out.put(pb.ModelStreamInferResponse(
                error_message=f"[{status.name}] {message}",
                infer_response=pb.ModelInferResponse(id=getattr(request, "id", ""))))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.metrics.requests.labels("ModelStreamInfer request", code).inc()

    async def _stream_tokens(self, request_id: str, call: t.InferCall, deadline, out: asyncio.Queue) -> None:
        """One response per token; the last is flagged final (or an empty final one follows, when asked)."""
        served, held = None, None  # a token's response waits for the next event: the last is flagged final
        req = GenerateRequest(call.model, call.sources[0], call.options, call.attention, deadline, call.alignment,
                              call.markup)
        async with contextlib.aclosing(self.api.generate(req)) as events:
            async for ev in events:
                if isinstance(ev, TokenEvent):
                    if held is not None:
                        await out.put(self._token_response(served, request_id, call, held, {}))
                    held = ev
                elif isinstance(ev, FinishEvent):
                    finish = {"finish_reason": ev.reason, "generated_tokens": ev.generated_tokens}
                    if held is not None:  # the last token carries the links complete only now, and the markup
                        held.alignment = [*held.alignment, *ev.new_links]
                        await out.put(self._token_response(served, request_id, call, held, {
                            **finish, "triton_final_response": not call.empty_final}, ev.markup))
                    if call.empty_final or held is None:
                        values = {"MARKUP": [ev.markup or ""]} if "MARKUP" in call.outputs and held is None else {}
                        final = t.response_to_pb(served, request_id, values,
                                                 {**finish, "triton_final_response": True})
                        await out.put(pb.ModelStreamInferResponse(infer_response=final))
                else:
                    served = ev.model

    @staticmethod
    def _token_response(model: ModelRef, request_id: str, call: t.InferCall, ev: TokenEvent, parameters: dict,
                        markup: str | None = None) -> pb.ModelStreamInferResponse:
        response = t.response_to_pb(model, request_id, token_values(call.outputs, ev, markup),
                                    {"triton_final_response": False, "token_index": ev.index, **parameters})
        return pb.ModelStreamInferResponse(infer_response=response)


def token_values(outputs: tuple[str, ...], ev: TokenEvent, markup: str | None = None) -> dict[str, np.ndarray |
                                                                                                   list[str]]:
    """One streamed token's outputs, each with a batch of 1; MARKUP on the last token's response only."""
    values: dict[str, np.ndarray | list[str]] = {}
    for name in outputs:
        if name == "TEXT":
            values[name] = [ev.text]
        elif name == "TOKEN_IDS":
            values[name] = np.array([[ev.id]], np.int64)  # (1, 1)
        elif name == "LOGPROBS":
            values[name] = np.array([[ev.logprob]], np.float32)  # (1, 1)
        elif name == "ALIGNMENT":
            values[name] = t.link_rows(ev.alignment)[None]  # (1, links, 4): the links complete at this token
        elif name == "MARKUP":
            if markup is not None:
                values[name] = [markup]
        else:
            values[name] = t.stacked_attention(ev.attention, t.ATTENTION_OUTPUTS[name])[None]  # (1, L, h, 1, k)
    return values


def add_to_server(servicer: KServeServicer, server: grpc.aio.Server) -> None:
    """Register the handlers under the protocol's service name (the messages' own package differs, see the
    .proto)."""
    unary = {"ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
             "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
             "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
             "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
             "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
             "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
             "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse)}
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=req.FromString,
                                                           response_serializer=resp.SerializeToString)
                for name, (req, resp) in unary.items()}
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer, request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelStreamInferResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
