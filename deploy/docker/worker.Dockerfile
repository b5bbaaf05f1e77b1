# The GPU worker's image: `fluxredux worker`, torch with CUDA and the model packages.
# Build from the repository root (CUDA and torch are build arguments: match the driver):
#   docker build -f deploy/docker/worker.Dockerfile -t fluxredux-worker:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION
ARG TORCH_INDEX
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/fluxredux
ENV PATH=/opt/fluxredux/bin:$PATH
# torch first, from its own index: the CUDA build that fits the base image.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir ".[model]"

FROM ${CUDA_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home fluxredux \
    && mkdir -p /var/lib/fluxredux /srv/files /hf && chown 10001 /var/lib/fluxredux /srv/files /hf
COPY --from=build /opt/fluxredux /opt/fluxredux
ENV PATH=/opt/fluxredux/bin:$PATH \
    FLUXREDUX_DATA_DIR=/var/lib/fluxredux \
    HF_HOME=/hf
USER 10001
ENTRYPOINT ["fluxredux"]
CMD ["worker"]
