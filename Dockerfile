# Three images from one file (build one with --target; BuildKit builds only the stages a target needs):
#   serve      slim server + client: onnxruntime, grpc, numpy; no torch; runs as uid 10001, fine read-only
#   serve-gpu  the same on onnxruntime-gpu (CUDA execution provider), on a CUDA runtime base. Untested here:
#              no GPU machine has built or run it; the CUDA path is unproven (BENCHMARKS.md)
#   export     torch (CPU-only wheels by default), onnx, onnxscript: turns checkpoints into repository versions
# PYTHON_IMAGE and CUDA_IMAGE name the public bases; scripts/local-base-image.sh makes a stand-in for machines
# that cannot pull them (the image does not depend on it).
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS serve
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY attnserve ./attnserve
COPY model_src ./model_src
COPY model_repository ./model_repository
COPY export ./export
COPY serving ./serving
COPY protos ./protos
COPY bench ./bench
RUN pip install '.[cpu]' && useradd --system --uid 10001 attnserve
USER attnserve
EXPOSE 50051 9100 8000
ENTRYPOINT ["attnserve"]
CMD ["serve", "--repo", "/models", "--address", "0.0.0.0:50051", "--metrics-port", "9100", "--metrics-address", "0.0.0.0"]

FROM ${PYTHON_IMAGE} AS export
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY --from=serve /app /app
RUN pip install --extra-index-url "${TORCH_INDEX}" '.[export,cpu]'
COPY checkpoints ./checkpoints
ENTRYPOINT ["attnserve"]
CMD ["export", "checkpoints/dates", "--repo", "/models", "--name", "dates", "--if-changed"]

# Last, so builders that build every stage before the target (the legacy one) never need the CUDA base
# for the other two images.
FROM ${CUDA_IMAGE} AS serve-gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY --from=serve /app /app
# Exactly one onnxruntime distribution: with both installed the CUDA provider disappears.
RUN pip install '.[gpu]'
EXPOSE 50051 9100 8000
ENTRYPOINT ["attnserve"]
CMD ["serve", "--repo", "/models", "--address", "0.0.0.0:50051", "--providers", "cuda,cpu", "--require-gpu", \
     "--metrics-address", "0.0.0.0"]
