"""`RawKernel` and `RawModule`: one CUDA C source, two places to run it.

    k = kernels.RawKernel(code, "relu_forward")
    k((blocks,), (256,), (x, y, np.int32(n)))        # x, y NumPy arrays -> CPU emulator
    k((blocks,), (256,), (x_gpu, y_gpu, np.int32(n)))  # CuPy arrays -> GPU, through CuPy

The constructor and the call have the same shape as `cupy.RawKernel`.  The backend is chosen by
the arrays: CuPy arrays launch on the GPU (CuPy compiles with NVRTC), NumPy arrays run on the
CPU emulator (kernels/emulator.py).  On both, the arguments are first checked against the
kernel's parameter list (kernels/signature.py): a float64 array passed as `float*`, or a Python
int passed where the kernel wants a 32-bit `int`, is refused with a message saying what to pass.
"""

import os
import re
from pathlib import Path

from .emulator import EmuModule
from .signature import check_args, find_kernels

__all__ = ["RawKernel", "RawModule", "load_module", "KERNEL_DIR", "launch_count"]

_launches = 0


def launch_count():
    """How many kernels this process has launched through RawKernel (both backends) so far."""
    return _launches

KERNEL_DIR = Path(__file__).resolve().parent


def _array_kind(args):
    """'cupy' if any argument is a CuPy array, else 'numpy'."""
    for a in args:
        mod = type(a).__module__.split(".")[0]
        if mod == "cupy" and hasattr(a, "dtype"):
            return "cupy"
    return "numpy"


_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[^\n]*$', re.M)


def _include_dirs(options):
    dirs, it = [], iter(options)
    for opt in it:
        if opt in ("-I", "--include-path"):
            dirs.append(next(it, ""))
        elif opt.startswith("--include-path="):
            dirs.append(opt.split("=", 1)[1])
        elif opt.startswith("-I") and len(opt) > 2:
            dirs.append(opt[2:])
    return dirs


def expand_local_includes(code, filename, include_dirs, _seen=None):
    """Inline every `#include "name"` found in include_dirs, with #line directives so that
    compiler messages still name the right file and line.

    Both backends then compile one self-contained source, so their caches (CuPy's, keyed by
    the source text, and the emulator's) see a change in a shared header.  Each header is
    inlined once (headers have include guards anyway); `#include <...>` is left alone.
    """
    seen = set() if _seen is None else _seen
    out, pos = [], 0
    for m in _LOCAL_INCLUDE.finditer(code):
        path = next((Path(d) / m.group(1) for d in include_dirs if (Path(d) / m.group(1)).is_file()), None)
        if path is None:
            continue
        line = code.count("\n", 0, m.start()) + 1
        out.append(code[pos:m.start()])
        key = str(path.resolve())
        if key not in seen:
            seen.add(key)
            body = expand_local_includes(path.read_text(), m.group(1), include_dirs, seen)
            out.append(f'#line 1 "{m.group(1)}"\n{body}\n#line {line + 1} "{filename}"')
        pos = m.end()
    out.append(code[pos:])
    return "".join(out)


class RawModule:
    """A CUDA C source holding one or more extern "C" __global__ kernels.

    Args:
        code:     the CUDA C source (str).
        options:  NVRTC options (tuple of str), e.g. ('-std=c++17', '-DTILE=16').  The emulator
                  understands -D, -U, -I, -std and -arch (which sets __CUDA_ARCH__; default sm_80).
        filename: the name compiler messages use for this source (kernels/foo.cu when loaded
                  with `load_module`).
    """

    def __init__(self, code=None, *, options=(), filename=None, path=None):
        if path is not None:
            raise TypeError("RawModule(path=...) loads compiled cubins in CuPy; pass the CUDA C source as code=")
        if not isinstance(code, str):
            raise TypeError(f"RawModule: code must be the CUDA C source as a str, got {type(code).__name__}")
        self.options = tuple(options)
        self.filename = filename or "<kernel source>"
        self.code = expand_local_includes(code, self.filename, _include_dirs(self.options))
        self.signatures = find_kernels(self.code)
        self._emu = None
        self._cupy = None
        self._functions = {}

    def get_function(self, name):
        """The kernel called `name`, launchable on both backends."""
        if name not in self._functions:
            if name not in self.signatures:
                known = ", ".join(sorted(self.signatures)) or "none"
                raise AttributeError(f"{self.filename}: no extern \"C\" __global__ function named '{name}' "
                                     f"(found: {known})")
            self._functions[name] = RawKernel._from_module(self, name)
        return self._functions[name]

    # -- backends, built lazily
    def _emu_module(self):
        if self._emu is None:
            self._emu = EmuModule(self.code, self.options, self.filename)
        return self._emu

    def _cupy_module(self):
        if self._cupy is None:
            import cupy
            source = self.code
            if self.filename and not self.filename.startswith("<"):
                source = f'#line 1 "{self.filename}"\n{self.code}'
            self._cupy = cupy.RawModule(code=source, options=self.options, backend="nvrtc")
        return self._cupy

    def compile(self, backend="emu"):
        """Compile now for 'emu' (the C++ compiler) or 'cuda' (NVRTC through CuPy)."""
        if backend == "emu":
            self._emu_module().compile()
        elif backend == "cuda":
            self._cupy_module().compile()
        else:
            raise ValueError(f"backend must be 'emu' or 'cuda', got {backend!r}")
        return self


class RawKernel:
    """One extern "C" __global__ kernel.  `RawKernel(code, name, options=())`, called as
    `kernel(grid, block, args, shared_mem=0)` exactly like `cupy.RawKernel`.

    grid, block: int or tuple of 1-3 ints.  args: tuple of arrays (all NumPy or all CuPy) and
    NumPy scalars of the parameters' exact types.  shared_mem: bytes of dynamic shared memory.
    """

    def __init__(self, code, name, options=(), *, filename=None):
        module = RawModule(code=code, options=options, filename=filename)
        if name not in module.signatures:
            known = ", ".join(sorted(module.signatures)) or "none"
            raise AttributeError(f"{module.filename}: no extern \"C\" __global__ function named '{name}' "
                                 f"(found: {known})")
        self._init(module, name)

    @classmethod
    def _from_module(cls, module, name):
        self = cls.__new__(cls)
        self._init(module, name)
        return self

    def _init(self, module, name):
        self.module = module
        self.name = name
        self.signature = module.signatures[name]
        self._max_dynamic_shared = None

    @property
    def code(self):
        return self.module.code

    @property
    def max_dynamic_shared_size_bytes(self):
        """Dynamic shared memory a launch may ask for (48 KiB unless raised, as in CUDA)."""
        if self._max_dynamic_shared is None:
            return 48 * 1024
        return self._max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        self._max_dynamic_shared = int(value)

    def __call__(self, grid, block, args, shared_mem=0, **kwargs):
        global _launches
        _launches += 1
        if _array_kind(args) == "cupy":
            return self._launch_cuda(grid, block, args, shared_mem, **kwargs)
        if kwargs:
            raise TypeError(f"kernel '{self.name}': unexpected arguments {sorted(kwargs)} on the CPU emulator")
        fn = self.module._emu_module().get_function(self.name)
        if self._max_dynamic_shared is not None:
            fn.max_dynamic_shared_size_bytes = self._max_dynamic_shared
        fn(grid, block, args, shared_mem=shared_mem)

    def _launch_cuda(self, grid, block, args, shared_mem, **kwargs):
        import numpy as np
        values = check_args(self.signature, args, "cupy")
        values = [np.uint64(0) if v is None else v for v in values]
        fn = self.module._cupy_module().get_function(self.name)
        if self._max_dynamic_shared is not None:
            fn.max_dynamic_shared_size_bytes = self._max_dynamic_shared
        grid = (grid,) if isinstance(grid, int) else tuple(grid)
        block = (block,) if isinstance(block, int) else tuple(block)
        fn(grid, block, tuple(values), shared_mem=shared_mem, **kwargs)


_modules = {}


def load_module(filename, options=()):
    """RawModule for a .cu file in kernels/ (or a path), cached per (file, options).

    Compiler messages name the file as `kernels/<name>.cu`; the file's folder is on the include
    path, so kernels can `#include "common.cuh"`.
    """
    path = Path(filename)
    if not path.is_absolute() and not path.exists():
        path = KERNEL_DIR / filename
    if not path.exists():
        raise FileNotFoundError(f"kernel source not found: {filename}")
    key = (str(path.resolve()), tuple(options), path.stat().st_mtime_ns)
    mod = _modules.get(key)
    if mod is None:
        try:
            shown = os.path.relpath(path.resolve(), KERNEL_DIR.parent)
        except ValueError:
            shown = str(path)
        if shown.startswith(".."):
            shown = str(path)
        # `#include "common.cuh"` and friends: the file's folder is on the include path
        options = tuple(options) + ("-I", str(path.resolve().parent))
        mod = RawModule(code=path.read_text(), options=options, filename=shown)
        _modules[key] = mod
    return mod
