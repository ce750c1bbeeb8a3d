#!/usr/bin/env bash
# Prepare a GPU session on an offline GPU machine that has Python 3.12, CuPy, PyTorch, Numba,
# NumPy and cuDNN but not the wheels below.
# Run HERE, in the repository root, on a machine that reaches PyPI:
#     bash bench/gpu_wheels.sh            # -> .whl/ (git-ignored), about 8 MB
# then carry .whl to the GPU machine and run bench/gpu_session.sh there. It installs .whl/*.whl:
# the project's own dependencies the machine lacks, and pytest-xdist (with execnet) and
# pytest-timeout for the GPU tests in 8 processes; .whl/fallback/ holds the CUDA 13 crt headers
# wheel, installed only when the machine has no crt/mma.h that kernels/runtime/cuda_env.py finds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
rm -rf .whl && mkdir -p .whl/fallback
download() {
    python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 "$@"
}
download -d .whl lmdb simplejpeg mlperf-logging "nvidia-cudnn-frontend==1.28.0" pytest-xdist execnet pytest-timeout
download -d .whl/fallback "nvidia-cuda-crt==13.0.88"
ls -la .whl .whl/fallback
