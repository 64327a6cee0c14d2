"""The Open Inference Protocol's calls on the engine API, shared by its gRPC (`kserve_v2.py`) and REST
(`http_server.py`) front ends: field mapping only, and no grpc here."""

from __future__ import annotations

import asyncio
from importlib import metadata

import numpy as np

from ..api.service import InferenceAPI
from ..domain import EncodeRequest, ModelRef, PredictRequest
from ..errors import InvalidRequest
from . import kserve_tensors as t

PLATFORM = "attnserve"


def server_version() -> str:
    try:
        return metadata.version("attnserve")
    except metadata.PackageNotFoundError:
        return "0"


async def _whole(coros: list) -> list:
    """Run a batch's rows together, admitted or failed as one: the first row to fail (refused by a limit, a bad
    row) cancels the others, so no row keeps running for an answer nobody will read."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def infer(api: InferenceAPI, call: t.InferCall, deadline: float | None,
                max_batch: int) -> tuple[ModelRef, dict]:
    """ModelInfer on the engine API, for gRPC and REST: a Predict per row (batched by the engine together), an
    Encode per row when the Encode outputs are named; returns the model that answered and the output values.
    A batch larger than the `max_batch_size` ModelConfig advertises is refused before any row runs."""
    if len(call.sources) > max_batch:
        raise InvalidRequest(f"a batch of {len(call.sources)} rows for model '{call.model.name}' is over its "
                             f"max_batch_size of {max_batch} (ModelConfig); split it")
    wants_predict = any(o not in t.ENCODE_OUTPUTS for o in call.outputs)
    wants_encode = any(o in t.ENCODE_OUTPUTS for o in call.outputs)
    predictions = await _whole([api.predict(PredictRequest(
        call.model, s, call.options, call.attention, deadline, call.alignment, call.markup, beam_size=call.beam_size))
        for s in call.sources]) if wants_predict else []
    encodings = await _whole([api.encode(EncodeRequest(call.model, s, deadline))
                              for s in call.sources]) if wants_encode else []
    served = (predictions or encodings)[0].served.model
    values: dict[str, np.ndarray | list[str]] = {}
    for name in call.outputs:
        if name == "TEXT":
            values[name] = [p.text for p in predictions]
        elif name == "TOKEN_IDS":
            values[name] = t.padded([np.array([k.id for k in p.tokens], np.int64) for p in predictions], -1,
                                    np.int64)  # (N, T)
        elif name == "LOGPROBS":
            values[name] = t.padded([np.array([k.logprob for k in p.tokens], np.float32) for p in predictions],
                                    0.0, np.float32)  # (N, T)
        elif name in t.ATTENTION_OUTPUTS:
            values[name] = t.padded([t.stacked_attention(p.attention, t.ATTENTION_OUTPUTS[name])
                                     for p in predictions], 0.0, np.float32)  # (N, L, h, Tq, Tk)
        elif name == "ALIGNMENT":
            values[name] = t.padded([t.link_rows(p.alignment) for p in predictions], -1, np.int64)  # (N, links, 4)
        elif name == "MARKUP":
            values[name] = [p.markup or "" for p in predictions]
        elif name == "EMBEDDINGS":
            values[name] = t.padded([e.embeddings for e in encodings], 0.0, np.float32)  # (N, S, d)
        else:
            values[name] = t.padded([e.hidden_states for e in encodings], 0.0, np.float32)  # (N, L, S, d)
    return served, values
