# syntax=docker/dockerfile:1
# prvr images. Versions come from requirements.lock only, installed exactly as CI does
# (`make test`): torch==2.13.0 first, then the package with `-c requirements.lock`.
#
#   docker build --target components      -t ghcr.io/prvr/prvr:0.1.0 .        # Kubeflow components (CPU torch)
#   docker build --target components-cuda -t ghcr.io/prvr/prvr:0.1.0-cu128 .  # the train task (CUDA torch)
#   docker build --target serving         -t prvr-serving:0.1.0 .             # TorchServe image
#
# components-cuda is the same image with the CUDA 12.8 wheel of torch==2.13.0 from the
# PyTorch index (CUDA_TORCH_INDEX_URL; e.g. .../whl/cu126 for older drivers). The version
# stays torch==2.13.0 (the lock's pin matches the +cpu / +cu128 local label); the wheel's
# nvidia-* and triton dependencies are pinned by torch itself and come from PyPI in step 2.
# The NVIDIA driver comes from the node (NVIDIA container toolkit), not from this image.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------- builders
FROM ${PYTHON_IMAGE} AS venv

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.lock ./

# 1. The torch wheel alone, from the PyTorch index: CPU here, CUDA in torch-cuda.
#    Its own dependencies come from PyPI in step 2, at their locked versions.
FROM venv AS torch-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --no-deps -c requirements.lock \
        --index-url "${TORCH_INDEX_URL}" torch==2.13.0

FROM venv AS torch-cuda
ARG CUDA_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir --no-deps -c requirements.lock \
        --index-url "${CUDA_TORCH_INDEX_URL}" torch==2.13.0

# 2. Every dependency of the package at its locked version. A stub package lets this layer
#    depend on pyproject.toml and the lock only, so editing prvr/ does not reinstall them.
# 3. The package itself. (The same two steps over either torch.)
FROM torch-cpu AS builder
COPY pyproject.toml ./
RUN mkdir -p prvr && touch prvr/__init__.py \
    && pip install --no-cache-dir -c requirements.lock . \
    && rm -rf prvr build ./*.egg-info
COPY prvr/ prvr/
RUN pip install --no-cache-dir --no-deps --force-reinstall -c requirements.lock . \
    && rm -rf build ./*.egg-info

FROM torch-cuda AS builder-cuda
COPY pyproject.toml ./
RUN mkdir -p prvr && touch prvr/__init__.py \
    && pip install --no-cache-dir -c requirements.lock . \
    && rm -rf prvr build ./*.egg-info
COPY prvr/ prvr/
RUN pip install --no-cache-dir --no-deps --force-reinstall -c requirements.lock . \
    && rm -rf build ./*.egg-info

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --system --gid 1000 prvr \
    && useradd --system --uid 1000 --gid prvr --create-home --home-dir /home/prvr prvr

# Settings: the defaults ship inside the package (prvr/params.yaml); a params.yaml mounted
# into /app, PRVR_<SECTION>__<KEY> variables or --set change them.
WORKDIR /app
RUN chown 1000:1000 /app

# ---------------------------------------------------------------------------- components-cuda
# The pipeline's train task (ghcr.io/prvr/prvr:0.1.0-cu128: components/common.py CUDA_IMAGE).
FROM runtime AS components-cuda
COPY --from=builder-cuda /opt/venv /opt/venv
USER 1000:1000
CMD ["prvr", "--help"]

# ---------------------------------------------------------------------------- components
# The image Kubeflow components (and `prvr` stages in a PyTorchJob) run in.
FROM runtime AS components
COPY --from=builder /opt/venv /opt/venv
USER 1000:1000
CMD ["prvr", "--help"]

# ---------------------------------------------------------------------------- serving
# TorchServe needs a Java runtime: Debian's OpenJDK 17 JRE (headless).
FROM components AS serving

USER 0:0
# slim images drop /usr/share/man; the JRE's postinst needs man1 to register alternatives.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends "openjdk-17-jre-headless=17.0.*" \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# TorchServe writes logs/, key_file.json and its model store into the working directory.
COPY --chown=1000:1000 serving/ serving/
RUN mkdir -p model_store logs run && chown 1000:1000 model_store logs run

USER 1000:1000
ENV LOG_LOCATION=/app/logs \
    METRICS_LOCATION=/app/logs \
    TEMP=/tmp

# inference, management, metrics
EXPOSE 8080 8081 8082
# No model is baked in: `prvr serve-registry` pulls the production version named by
# PRVR_REGISTRY_URI (PRVR_REGISTRY_VERSION for another; S3 credentials from AWS_*), builds its
# archive and runs TorchServe in the foreground (SIGTERM stops it cleanly). serving/config.properties
# binds to 127.0.0.1; here inference and metrics listen on every interface, management stays on
# the loopback. deploy/base/deployment.yaml runs the same command behind its auth proxy.
# `prvr serve-kserve` serves the same model on KServe's model server (deploy/kserve).
CMD ["prvr", "serve-registry", "--workdir=/app/run", "--model-store=/app/model_store", \
     "--ts-set=inference_address=http://0.0.0.0:8080", \
     "--ts-set=metrics_address=http://0.0.0.0:8082"]
