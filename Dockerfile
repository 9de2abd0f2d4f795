# monaserve image: one backbone, many Mona adapters, served over HTTP.
#
#   docker build -t monaserve:cuda .                         # CUDA runtime (default)
#   docker build --build-arg TARGET=cpu -t monaserve:cpu .   # CPU only
#
# The bases and torch's package index are build arguments, so the same file builds where Docker Hub and the
# PyTorch index are out of reach (docs/deployment.md#building-without-a-registry): CPU_BASE (any Debian-like
# image with python3 and python3-venv), CUDA_BASE, CPU_TORCH_INDEX and CUDA_TORCH_INDEX.
#
# Weights and adapters live on volumes, never in the image: /models (backbone file or Hugging Face
# cache, and compiled graphs) and /var/lib/monaserve/adapters (the adapter store; or set MONASERVE_STORE=s3://bucket/prefix).
# Every `monaserve serve` flag has a MONASERVE_* environment twin.

ARG TARGET=cuda
ARG CPU_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu128

# ---- bases: the same image for building and running, so the venv's interpreter path matches ----
FROM ${CPU_BASE} AS base-cpu
ARG CPU_TORCH_INDEX
ENV TORCH_INDEX_URL=${CPU_TORCH_INDEX}

FROM ${CUDA_BASE} AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ARG CUDA_TORCH_INDEX
ENV TORCH_INDEX_URL=${CUDA_TORCH_INDEX}

# ---- runtime: a virtual environment with torch for the target and the package, run as an unprivileged user ----
# One stage: torch's layer (several GB with CUDA) is written once, not copied from a build stage, and is
# reused while only the package changes. The sources are a few hundred KB; pip's build files go in the same
# step that makes them.
FROM base-${TARGET} AS runtime
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"
COPY pyproject.toml README.md /src/
COPY adapters /src/adapters
COPY server /src/server
COPY client /src/client
COPY testing /src/testing
RUN pip install "/src[s3]" && rm -rf /src
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
