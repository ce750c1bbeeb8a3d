"""kernels.emu: a CUDA GPU on the CPU, for learning and testing without one.

- emulator.py              compiles a kernel's CUDA C with the system C++ compiler against
                           include/cuda_emu.h and runs every CUDA thread as a fiber
                           (runtime.cpp), with real barriers, warp collectives and atomics.
- sanitizer.py             memcheck, racecheck, initcheck and synccheck (sanitizer.cpp), as
                           NVIDIA's compute-sanitizer names them.
- profiler.py              Nsight Compute's memory counts of a launch: requests, sectors,
                           shared-memory wavefronts, bank conflicts (profiler.cpp).
- occupancy_calculator.py  the CUDA Occupancy Calculator's rules, per GPU architecture.
- signature.py             a kernel's parameter list read from its source, and the argument
                           check both backends run before a launch.
- errors.py                CompileError (raised by either compiler) and the emulator's errors.
- cudasim.py               the simulated GPU (KERNELS_CUDASIM=1): a CuPy-shaped module over NumPy
                           memory whose RawModule kernels run on the emulator, installed as
                           `cupy` by kernels/__init__.py.

This is the bottom of kernels/: nothing here imports kernels/runtime/ or the ops.  This file
imports nothing, so that importing one module of the package never loads the others.
"""
