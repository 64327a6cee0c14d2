"""What every hardening runner shares: the service, its request types, the status groups."""

from __future__ import annotations

from pathlib import Path

import grpc

from protos.attnserve.v1 import attnserve_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "/attnserve.v1.AttnServeService/"
REQUESTS = {"Generate": pb.GenerateRequest, "Predict": pb.PredictRequest, "Encode": pb.EncodeRequest,
            "GetModelInfo": pb.GetModelInfoRequest, "ListModels": pb.ListModelsRequest,
            "ReloadModels": pb.ReloadModelsRequest}
S = grpc.StatusCode
CLIENT_ERRORS = frozenset({S.INVALID_ARGUMENT, S.NOT_FOUND, S.RESOURCE_EXHAUSTED, S.OUT_OF_RANGE})
AUTH = frozenset({S.UNAUTHENTICATED, S.PERMISSION_DENIED})  # with tokens configured, or for management calls
INT32_MIN, INT32_MAX, INT64_MIN, INT64_MAX = -(2**31), 2**31 - 1, -(2**63), 2**63 - 1


