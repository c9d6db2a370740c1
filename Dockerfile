# syntax=docker/dockerfile:1
# ditserve container images, one per target; each runs a `ditserve` subcommand as a
# non-root user (UID 10001), weights mounted at /weights, never baked in:
#
#   docker build --target cpu  -t REGISTRY/ditserve:0.1.0-cpu  .   # CPU torch
#   docker build --target cuda -t REGISTRY/ditserve:0.1.0-cuda .   # CUDA torch (NVIDIA GPUs)
#   docker build --target demo -t REGISTRY/ditserve:0.1.0-demo .   # cpu + the embedded model
#
#   docker run ... REGISTRY/ditserve:0.1.0-cuda stage --config /etc/ditserve/pipeline.yaml
#
# The CUDA target installs PyTorch's CUDA wheel, which carries its own CUDA runtime, cuDNN
# and NCCL libraries (the nvidia-* wheels): a CUDA base image would only duplicate them. The
# host needs an NVIDIA driver new enough for TORCH_CUDA, exposed by the NVIDIA container
# toolkit or the Kubernetes device plugin.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128

# ---- builders: one virtualenv per flavour of torch, then the ditserve package ----------
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

FROM venv AS build-cpu
ARG TORCH_VERSION
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY services /src/services
COPY client /src/client
# torch is already satisfied, so the server extra adds only the pure-Python dependencies.
RUN pip install "/src[server]" && rm -rf /src

FROM venv AS build-cuda
ARG TORCH_VERSION
ARG TORCH_CUDA
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY services /src/services
COPY client /src/client
RUN pip install "/src[server]" && rm -rf /src

# ---- runtime: the same slim layout for both; only the virtualenv differs ----------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HUB_OFFLINE=1 \
    DITSERVE_LOG_LEVEL=INFO
# A numeric user, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 ditserve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin ditserve
# 50051: gRPC (every service); 8080: the HTTP gateway (`ditserve gateway`); 9100:
# Prometheus metrics (--metrics-port 9100).
EXPOSE 50051 8080 9100
ENTRYPOINT ["ditserve"]
CMD ["--help"]

FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
USER 10001:10001

FROM runtime AS cuda
COPY --from=build-cuda /opt/venv /opt/venv
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001

# The embedded demo model ships inside the ditserve package (ditserve/demo/weights), so the
# demo image is the CPU image that checks the model is there and says what it runs.
FROM cpu AS demo
RUN python -c "from ditserve.demo import DEMO_DIT_PATH, DEMO_VAE_PATH; \
assert DEMO_DIT_PATH.is_file() and (DEMO_VAE_PATH / 'config.json').is_file(), \
'the embedded demo model is missing from the ditserve package'"
LABEL org.opencontainers.image.title="ditserve demo" \
      org.opencontainers.image.description="ditserve with its embedded demo DiT and VAE (CPU)"
