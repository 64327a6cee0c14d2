"""Model work: one engine per model version owns its ONNX Runtime sessions and batches every request's steps."""
