# dilo in a container: the CPU build by default, CUDA with --build-arg VARIANT=cuda.
#
#   docker build -t dilo:cpu .
#   docker build -t dilo:cuda --build-arg VARIANT=cuda .
#   docker run --rm dilo:cpu                                   # the quickstart job
#   docker compose -f launch/docker-compose.yml up --scale worker=4   # coordinator + 4 workers
#
# torch comes from PyTorch's wheel index for the variant (CPU wheels are ~200 MB, not the CUDA
# build pip would pick by default); dilo itself is installed from this directory.
ARG VARIANT=cpu

FROM python:3.12-slim AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends iproute2 && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS base-cuda
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu126
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv iproute2 \
    && rm -rf /var/lib/apt/lists/*

FROM base-${VARIANT}
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 DILO_LOG=INFO
WORKDIR /opt/dilo
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch>=2.4"
COPY pyproject.toml README.md ./
COPY dilo ./dilo
RUN pip install --no-cache-dir .
COPY configs ./configs
# the coordinator's port, and the gossip peers' (membership.p2p_bind)
EXPOSE 29600 29700
ENTRYPOINT ["dilo"]
CMD ["run", "configs/quickstart.toml"]
