"""kernels: hand-written CUDA C kernels and the machinery that runs them.

- `RawKernel` / `RawModule` (kernels/runtime/raw.py): the cupy.RawKernel interface; CuPy arrays
  launch on the GPU, NumPy arrays run on the CPU emulator (kernels/emu/emulator.py).
- `load_module("relu.cu")`: a .cu file of this folder as a RawModule.
- `sanitize("all")`: memcheck, racecheck, initcheck and synccheck for the emulator launches in a
  `with` block (or KERNELS_EMU_SANITIZE=all for all of them); findings are `SanitizerError`s.
- `profile()`: Nsight Compute's memory metrics (requests, sectors, shared-memory wavefronts and
  bank conflicts) of the emulator launches in a `with` block (kernels/emu/profiler.py).
- `resources(kernel, arch)`: registers, spills, stack and shared memory from ptxas (NVRTC,
  kernels/runtime/ptxas.py); `occupancy(arch, block, registers, shared)`: the CUDA Occupancy
  Calculator's resident blocks and warps per SM (kernels/emu/occupancy_calculator.py).
- `reference` (kernels/reference.py): NumPy implementations of every op, the `cpu` device.
- `ops` (kernels/ops.py): one launcher per op, shapes and dtypes checked, same signatures.
- `versions` (kernels/versions.py): each op family's numbered versions and which one runs;
  `python -m kernels.<op>` checks and times every version (kernels/lesson.py, kernels/cases.py).
See kernels/README.md for how a kernel goes from source to a launch.

With KERNELS_CUDASIM=1, importing this package makes `import cupy` give the simulated GPU
(kernels/emu/cudasim.py): the cuda device's code runs on the CPU, its kernels on the emulator.

Nothing here imports nn/ or data/.
"""

import os as _os

if _os.environ.get("KERNELS_CUDASIM", "").strip() not in ("", "0"):
    from .emu import cudasim as _cudasim
    _cudasim.install()      # before anything imports the real CuPy (refused if something already has)

from .emu.errors import (BarrierDivergenceError, CompileError, DeadlockError, EmulatorError, InitcheckError,
                     KernelAssertionError, KernelFault, LaunchConfigError, MemcheckError, OutOfBoundsError,
                     RacecheckError, SanitizerError, SynccheckError, WarpCollectiveError)
from .runtime.raw import KERNEL_DIR, RawKernel, RawModule, launch_count, load_module
from .emu.sanitizer import mark_uninitialized, sanitize
from .emu.profiler import profile
from .emu.occupancy_calculator import occupancy
from .runtime.ptxas import resources
from .runtime import trace

__all__ = ["RawKernel", "RawModule", "load_module", "launch_count", "trace", "KERNEL_DIR", "CompileError", "EmulatorError",
           "LaunchConfigError", "BarrierDivergenceError", "DeadlockError", "WarpCollectiveError",
           "KernelAssertionError", "KernelFault", "OutOfBoundsError", "SanitizerError", "MemcheckError",
           "RacecheckError", "InitcheckError", "SynccheckError", "sanitize", "mark_uninitialized", "profile",
           "resources", "occupancy"]
