"""`RawKernel` and `RawModule`: one CUDA C source, two places to run it.

    k = kernels.RawKernel(code, "relu_forward")
    k((blocks,), (256,), (x, y, np.int32(n)))        # x, y NumPy arrays -> CPU emulator
    k((blocks,), (256,), (x_gpu, y_gpu, np.int32(n)))  # CuPy arrays -> GPU, through CuPy

The constructor and the call have the same shape as `cupy.RawKernel`.  The backend is chosen by
the arrays: CuPy arrays launch on the GPU (CuPy compiles with NVRTC), NumPy arrays run on the
CPU emulator (kernels/emu/emulator.py).  On both, the arguments are first checked against the
kernel's parameter list (kernels/emu/signature.py): a float64 array passed as `float*`, a strided
view, or a Python int passed where the kernel wants a 32-bit `int`, is refused with a message
saying what to pass.

A launch on the GPU costs a few microseconds of our Python (`python -m bench.launch`): the
argument check is compiled once per kernel signature (signature.compiled_check), and the CuPy
function handle is looked up once per kernel and kept.
"""

import os
import re
import sys
from pathlib import Path

from . import cuda_env
from ..emu.emulator import EmuModule
from ..emu.signature import check_args, compiled_check, expand_entry_points, find_kernels

__all__ = ["RawKernel", "RawModule", "load_module", "KERNEL_DIR", "launch_count"]

_launches = 0
_tracer = None        # kernels/runtime/trace.py installs one while a launch trace is on


def launch_count():
    """How many kernels this process has launched through RawKernel (both backends) so far."""
    return _launches

KERNEL_DIR = Path(__file__).resolve().parent.parent


def _array_kind(args):
    """'cupy' if any argument is a CuPy array, else 'numpy'."""
    for a in args:
        mod = type(a).__module__.split(".")[0]
        if mod == "cupy" and hasattr(a, "dtype"):
            return "cupy"
    return "numpy"


_device_query = (None, None)   # (the cupy module, its function telling the current device)


def _cupy_device(_loaded=sys.modules):
    """The current CUDA device's id: CuPy loads a module, and so a kernel handle, per device."""
    module, query = _device_query
    if module is None or module is not _loaded.get("cupy"):
        return _new_device_query()
    return query()


def _new_device_query():
    global _device_query
    import cupy
    _device_query = (cupy, cupy.cuda.runtime.getDevice)
    return _device_query[1]()


def _array_class(args, kind):
    """The array class of a launch: numpy.ndarray, or the CuPy array class of its arguments."""
    if kind == "cupy":
        return next(type(a) for a in args if type(a).__module__.split(".")[0] == "cupy" and hasattr(a, "dtype"))
    import numpy as np
    return np.ndarray


_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[^\n]*$', re.M)


def display_path(path):
    """How messages and debuggers name a source file: relative to the repository
    (`kernels/common.cuh`) when it is in it, else its absolute path."""
    path = Path(path).resolve()
    try:
        shown = os.path.relpath(path, KERNEL_DIR.parent)
    except ValueError:
        return str(path)
    return str(path) if shown.startswith("..") else shown


def expand_local_includes(code, filename, include_dirs, _seen=None):
    """Inline every `#include "name"` found in include_dirs, with #line directives so that
    compiler messages still name the right file and line (the header by display_path: the
    `kernels/` folder included, so that gdb finds it).

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
            body = expand_local_includes(path.read_text(), display_path(path), include_dirs, seen)
            out.append(f'#line 1 "{display_path(path)}"\n{body}\n#line {line + 1} "{filename}"')
        pos = m.end()
    out.append(code[pos:])
    return "".join(out)


class RawModule:
    """A CUDA C source holding one or more extern "C" __global__ kernels.

    Args:
        code:     the CUDA C source (str).  `#include "..."` of local headers and KERNEL_ENTRY
                  lines (kernels/common.cuh) are expanded; `.code` is the source both compilers get.
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
        # one self-contained source: local headers inlined, KERNEL_ENTRY lines written out as kernels
        self.code = expand_entry_points(expand_local_includes(code, self.filename, cuda_env.include_dirs(self.options)),
                                        self.filename)
        self.signatures = find_kernels(self.code)
        self._emu = None
        self._cupy = None
        self._functions = {}

    def get_function(self, name):
        """The kernel called `name`, launchable on both backends."""
        try:
            return self._functions[name]
        except KeyError:
            pass
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
            # CUDA headers that CuPy's include path misses (crt/mma.h): cuda_env.py finds them
            options = self.options + cuda_env.extra_include_options()
            self._cupy = cupy.RawModule(code=source, options=options, backend="nvrtc")
        return self._cupy

    def compile(self, backend="emu"):
        """Compile now for 'emu' (the C++ compiler) or 'cuda' (NVRTC through CuPy)."""
        if backend == "emu":
            self._emu_module().compile()
        elif backend == "cuda":
            try:
                self._cupy_module().compile()
            except Exception as exc:
                cuda_env.raise_with_install_hint(exc, self.filename)
                raise
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
        self._cupy_functions = {}      # device id -> CuPy's handle of this kernel, from the first launch there
        self._checks = {}              # array class -> (kind, compiled argument check)
        # the first pointer parameter's argument tells NumPy from CuPy at a glance
        self._probe = next((i for i, p in enumerate(self.signature.params) if p.is_pointer), None)

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
        for fn in self._cupy_functions.values():
            fn.max_dynamic_shared_size_bytes = self._max_dynamic_shared

    def __call__(self, grid, block, args, shared_mem=0, **kwargs):
        global _launches
        _launches += 1
        if _tracer is not None:        # KERNELS_TRACE or kernels.trace.collect(): record and time it
            return _tracer.launch(self, grid, block, args, shared_mem, kwargs)
        self._launch(grid, block, args, shared_mem, **kwargs)

    def _launch(self, grid, block, args, shared_mem=0, **kwargs):
        try:
            kind, check = self._checks[type(args[self._probe])]
        except (KeyError, IndexError, TypeError):
            kind, check = self._check_for(args)
        if kind == "cupy":
            values = check(args)
            if values is None:   # the reference check: the clear error, or Python numbers converted
                import numpy as np
                values = tuple(np.uint64(0) if v is None else v for v in check_args(self.signature, args, "cupy"))
            device = _cupy_device()
            fn = self._cupy_functions.get(device) or self._bind_cupy(device)
            if type(grid) is not tuple:
                grid = (grid,) if isinstance(grid, int) else tuple(grid)
            if type(block) is not tuple:
                block = (block,) if isinstance(block, int) else tuple(block)
            fn(grid, block, values, shared_mem=shared_mem, **kwargs)
            return
        if kwargs:
            raise TypeError(f"kernel '{self.name}': unexpected arguments {sorted(kwargs)} on the CPU emulator")
        fn = self.module._emu_module().get_function(self.name)
        if self._max_dynamic_shared is not None:
            fn.max_dynamic_shared_size_bytes = self._max_dynamic_shared
        fn(grid, block, args, shared_mem=shared_mem)   # the emulator checks the arguments itself

    def _check_for(self, args):
        """(kind, compiled check) for the arrays of this launch, remembered per array class."""
        if not isinstance(args, (tuple, list)):
            check_args(self.signature, args, "numpy")     # raises the clear TypeError
        kind = _array_kind(args)
        cls = _array_class(args, kind)
        entry = (kind, compiled_check(self.signature, cls))
        self._checks[cls] = entry
        return entry

    def _bind_cupy(self, device):
        """CuPy's function handle of this kernel on `device` (compiles the module with NVRTC the
        first time; CuPy caches the binary)."""
        try:
            fn = self.module._cupy_module().get_function(self.name)
        except Exception as exc:
            cuda_env.raise_with_install_hint(exc, self.module.filename)
            raise
        if self._max_dynamic_shared is not None:
            fn.max_dynamic_shared_size_bytes = self._max_dynamic_shared
        self._cupy_functions[device] = fn
        return fn


_modules = {}


def load_module(filename, options=()):
    """RawModule for a .cu file in kernels/ (or a path), cached per (file, options).

    Compiler messages name the file as `kernels/<name>.cu`; the file's folder, then kernels/, is
    on the include path, so kernels (and copies of them elsewhere) can `#include "common.cuh"`.
    """
    path = Path(filename)
    if not path.is_absolute() and not path.exists():
        path = KERNEL_DIR / filename
    if not path.exists():
        raise FileNotFoundError(f"kernel source not found: {filename}")
    key = (str(path.resolve()), tuple(options), path.stat().st_mtime_ns)
    mod = _modules.get(key)
    if mod is None:
        shown = display_path(path)
        # `#include "common.cuh"` and friends: the file's folder is on the include path, then
        # kernels/ (for a learner's copy of a kernel kept elsewhere)
        options = tuple(options) + ("-I", str(path.resolve().parent))
        if path.resolve().parent != KERNEL_DIR:
            options += ("-I", str(KERNEL_DIR))
        mod = RawModule(code=path.read_text(), options=options, filename=shown)
        _modules[key] = mod
    return mod
