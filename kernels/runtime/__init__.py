"""kernels.runtime: how a .cu file becomes a launch, on a GPU through CuPy or on the CPU emulator.

- raw.py       `RawKernel` / `RawModule` / `load_module`: CuPy's interface; CuPy arrays launch on
               the GPU (NVRTC through CuPy), NumPy arrays on the CPU emulator (kernels/emu/).
- launch.py    what every launcher of kernels/<op>.py shares: argument checks, grid sizes,
               output allocation, the module of a kernel file at the chosen version.
- nvrtc.py     NVRTC compile checks for every GPU architecture we support (no GPU needed).
- ptxas.py     registers, spills and shared memory per kernel from ptxas, through NVRTC.
- cuda_env.py  where CuPy finds NVRTC and the CUDA headers our kernels include.
- trace.py     KERNELS_TRACE=1: every launch with its geometry and time.

Imports point down: the ops of kernels/ use this package, this package uses kernels/emu/, and
nothing here imports the ops.  This file imports nothing, so that importing one module of the
package never loads the others.
"""
