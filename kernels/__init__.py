"""kernels: hand-written CUDA C kernels and the machinery that runs them.

- `RawKernel` / `RawModule` (kernels/runtime.py): the cupy.RawKernel interface; CuPy arrays
  launch on the GPU, NumPy arrays run on the CPU emulator (kernels/emulator.py).
- `load_module("relu.cu")`: a .cu file of this folder as a RawModule.
- `reference` (kernels/reference.py): NumPy implementations of every op, the `cpu` device.
- `ops` (kernels/ops.py): one launcher per op, shapes and dtypes checked, same signatures.
- `versions` (kernels/versions.py): each op family's numbered versions and which one runs;
  `python -m kernels.<op>` checks and times every version (kernels/lesson.py, kernels/cases.py).
See kernels/README.md for how a kernel goes from source to a launch.

Nothing here imports nn/ or data/.
"""

from .errors import CompileError
from .emulator import (BarrierDivergenceError, DeadlockError, EmulatorError, KernelAssertionError, KernelFault,
                       LaunchConfigError, OutOfBoundsError, WarpCollectiveError)
from .runtime import KERNEL_DIR, RawKernel, RawModule, launch_count, load_module
from . import trace

__all__ = ["RawKernel", "RawModule", "load_module", "launch_count", "trace", "KERNEL_DIR", "CompileError", "EmulatorError",
           "LaunchConfigError", "BarrierDivergenceError", "DeadlockError", "WarpCollectiveError",
           "KernelAssertionError", "KernelFault", "OutOfBoundsError"]
