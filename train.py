"""MLPerf ResNet-50 v1.5 training: the benchmark run.

Work in progress: the kernels, the autograd and the data pipeline are being built (see
README.md). Until the training loop lands, this script says what works so far and runs a
kernel on the CPU emulator to show the path.
"""

import sys

import numpy as np


def main():
    import kernels
    from kernels import elementwise

    x = np.linspace(-2, 2, 9, dtype=np.float32)
    y = elementwise.relu_forward(x)  # our CUDA kernel, run by the CPU emulator
    print("train.py: the training loop is not written yet.")
    print("What works so far: CUDA kernels run on the GPU (CuPy) or on the CPU emulator, e.g.")
    print(f"  relu_forward({x.tolist()})\n    = {y.tolist()}")
    print(f"  (kernels/elementwise.cu, compiled by the emulator; runtime: {kernels.__name__})")
    print("Run the tests: python -m pytest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
