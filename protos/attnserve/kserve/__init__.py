"""Generated gRPC code lives below; the .proto files are the source (python -m protos.generate)."""
