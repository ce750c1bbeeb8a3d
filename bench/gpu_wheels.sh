#!/usr/bin/env bash
# Prepare a GPU session on an offline GPU machine that has Python 3.12, CuPy, PyTorch, Numba,
# NumPy and cuDNN but not the wheels below.
# Run HERE, in the repository root, on a machine that reaches PyPI:
#     bash bench/gpu_wheels.sh            # -> .whl/ (git-ignored), about 7 MB
# then carry .whl to the GPU machine and run bench/gpu_session.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
rm -rf .whl && mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    lmdb simplejpeg mlperf-logging "nvidia-cudnn-frontend==1.28.0"
ls -la .whl
