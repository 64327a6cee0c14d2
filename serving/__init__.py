"""Serving: runs what `export/` wrote on ONNX Runtime and answers over gRPC; never imports torch.

    api/        the engine API, free of any protocol: domain types, validation, admission, errors
    engine/     one engine per model version: sessions (runner), batching (engine), jobs, sampling, registry
    frontends/  wire protocols mapped onto the API: the gRPC server, the attnserve.v1 servicer, status mapping
    client/     the Python client, the command-line client, heatmaps, the health probe
"""
