"""Benchmarks: `attnserve bench` (load over gRPC), in-process anchors, side-by-side comparisons."""
