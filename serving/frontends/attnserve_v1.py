"""The attnserve.v1 servicer: wire types in, an engine API call, wire types out; nothing else.

Errors, metrics and the shutdown refusal are the interceptor's (status.py); policy is the engine API's.
"""

from __future__ import annotations

import contextlib

import grpc

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc

from ..api.service import InferenceAPI
from ..domain import FinishEvent, Served, TokenEvent
from . import convert


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    return convert.deadline_of(context.time_remaining())


class AttnServeServicer(pb_grpc.AttnServeServiceServicer):
    def __init__(self, api: InferenceAPI) -> None:
        self.api = api

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        served: Served | None = None
        async with contextlib.aclosing(self.api.generate(convert.generate_from_pb(request, _deadline(context)))) as s:
            async for ev in s:
                if isinstance(ev, TokenEvent):
                    yield convert.token_event_to_pb(ev, served)
                elif isinstance(ev, FinishEvent):
                    yield convert.finish_to_pb(ev, served)
                else:
                    served = ev

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        return convert.predict_to_pb(await self.api.predict(convert.predict_from_pb(request, _deadline(context))))

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        return convert.encoding_to_pb(await self.api.encode(convert.encode_from_pb(request, _deadline(context))))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.summary_to_pb(d) for d in self.api.list_models()])

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        return convert.info_to_pb(self.api.describe(convert.model_from_pb(request.model)))

    async def ReloadModels(self, request: pb.ReloadModelsRequest, context) -> pb.ReloadModelsResponse:
        return pb.ReloadModelsResponse(models=[convert.summary_to_pb(d) for d in await self.api.reload()])
