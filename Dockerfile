# The benchmark image: MLPerf ResNet-50 v1.5 on CuPy, driven the way MLPerf drives its references.
#
#   docker build --build-arg CUDA_MAJOR=12 -t mlperf-resnet .
#   docker run --runtime=nvidia --shm-size=16g -v /imn:/imn mlperf-resnet ./run_and_time.sh $SEED | tee benchmark-$NOW.log
#
# /imn holds train.lmdb and val.lmdb (python -m data.pack, see README.md). Add
# -v "$PWD/runs:/workspace/mlperf-resnet/runs" to keep the run directories (mlperf.log, checkpoints).
#
# CUDA_MAJOR (11, 12 or 13; default 12) picks the base image and the pip extra of setup.cfg:
#   11 -> gpu-cuda11 (CUDA 11.x drivers, P100-era hosts; no cuDNN engine)
#   12 -> gpu        (CUDA 12.x drivers; sm_60 .. sm_90: Pascal to Hopper)
#   13 -> gpu-cuda13 (CUDA 13.x drivers; sm_75 and newer, Blackwell included)
# The host driver must support the image's CUDA version (nvidia-smi shows it).
#
# Why -devel and not -runtime: CuPy compiles our kernels at run time with NVRTC, and they include
# <cuda_fp16.h>, <cuda_bf16.h> and <mma.h>. For CUDA 12 and 13 the extras bring NVRTC and those
# headers as wheels (which CuPy prefers; `python -m bench.check_extras` checks them), but CUDA 11's
# CuPy 13 reads them from a toolkit only; -devel also gives nvcc and cuobjdump for debugging.
# Why no -cudnn tag: cuDNN comes from the pip extra (nvidia-cudnn-cu12 / -cu13), exactly as in the
# plain install, so there is one cuDNN and setup.cfg sets its version.
# Ubuntu 22.04's python3 is 3.10, which the project needs at least.

ARG CUDA_MAJOR=12
ARG CUDA11_IMAGE=nvidia/cuda:11.8.0-devel-ubuntu22.04
ARG CUDA12_IMAGE=nvidia/cuda:12.4.1-devel-ubuntu22.04
ARG CUDA13_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu22.04

# One stage per CUDA major; the last FROM picks one (BuildKit pulls only the one it needs).
FROM ${CUDA11_IMAGE} AS cuda11
FROM ${CUDA12_IMAGE} AS cuda12
FROM ${CUDA13_IMAGE} AS cuda13

FROM cuda${CUDA_MAJOR} AS benchmark
ARG CUDA_MAJOR

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# g++: the CPU emulator compiles the CUDA kernels with it (tests, --device emu).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv g++ \
    && rm -rf /var/lib/apt/lists/*

# The README's plain route installs into a virtual environment; so does the image.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --upgrade pip
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The extra that matches CUDA_MAJOR, kept in a file so that both install steps read the same one.
RUN case "$CUDA_MAJOR" in \
        11) echo gpu-cuda11 ;; \
        12) echo gpu ;; \
        13) echo gpu-cuda13 ;; \
        *) echo "CUDA_MAJOR must be 11, 12 or 13, got '$CUDA_MAJOR'" >&2; exit 1 ;; \
    esac > /etc/mlperf-gpu-extra

WORKDIR /workspace/mlperf-resnet

# Dependencies first, from the package metadata alone, so that editing the code does not download
# CuPy and cuDNN again; then the whole project. Both steps run README.md's command.
COPY setup.cfg pyproject.toml README.md ./
RUN GPU_EXTRA=$(cat /etc/mlperf-gpu-extra) \
    && pip install -e ".[$GPU_EXTRA]"
COPY . .
RUN GPU_EXTRA=$(cat /etc/mlperf-gpu-extra) \
    && pip install -e ".[$GPU_EXTRA]"

# Fail the build, not the benchmark, when something is missing (no GPU is needed for these).
RUN g++ --version > /dev/null \
    && python train.py --help > /dev/null \
    && python -m bench.mlperf_result --help > /dev/null \
    && bash -n run_and_time.sh

CMD ["./run_and_time.sh"]
