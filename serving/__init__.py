"""Serving: runs what `export/` wrote on ONNX Runtime and answers over gRPC; never imports torch.

    domain.py   the engine API's types: requests, events, results (no protocol)
    errors.py   the domain errors every front end maps to its status codes
    engine/     one engine per model version: sessions (runner), feeds, jobs, the engine thread, sampling, registry
    api/        the engine API every protocol calls: resolve, admit, tokenize, validate, submit
    frontends/  wire protocols mapped onto the API: the gRPC server, the attnserve.v1 servicer, status mapping
    client/     the Python client, the command-line client, heatmaps, the health probe

Imports flow one way: frontends -> api -> engine -> domain/errors.
"""
