# monaserve image: one backbone, many Mona adapters, served over HTTP.
#
#   docker build -t monaserve:cuda .                         # CUDA runtime (default)
#   docker build --build-arg TARGET=cpu -t monaserve:cpu .   # CPU only
#
# Weights and adapters live on volumes, never in the image: /models (backbone file or Hugging Face
# cache, and compiled graphs) and /var/lib/monaserve/adapters (the adapter store; or set MONASERVE_STORE=s3://bucket/prefix).
# Every `monaserve serve` flag has a MONASERVE_* environment twin.

ARG TARGET=cuda

# ---- bases: the same image for building and running, so the venv's interpreter path matches ----
FROM python:3.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# ---- build: a virtual environment with torch for the target and the package from this repository ----
FROM base-${TARGET} AS build
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY adapters ./adapters
COPY server ./server
COPY client ./client
COPY testing ./testing
RUN pip install ".[s3]"

# ---- runtime: the venv only, as an unprivileged user ----
FROM base-${TARGET} AS runtime
COPY --from=build /opt/venv /opt/venv
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/monaserve --create-home monaserve \
    && mkdir -p /var/lib/monaserve/adapters /models \
    && chown -R monaserve:monaserve /var/lib/monaserve /models
USER 10001:10001
WORKDIR /var/lib/monaserve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models/huggingface \
    MONASERVE_HOST=0.0.0.0 \
    MONASERVE_PORT=8000 \
    MONASERVE_GRPC_PORT=8001 \
    MONASERVE_WEIGHTS=hub \
    MONASERVE_STORE=/var/lib/monaserve/adapters \
    MONASERVE_COMPILE_CACHE=/models/compile-cache \
    MONASERVE_DRAIN_DELAY_S=5
VOLUME ["/var/lib/monaserve/adapters", "/models"]
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('MONASERVE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["monaserve", "serve"]
