"""Compile CUDA C source with NVRTC, NVIDIA's runtime compiler, without a GPU.

NVRTC is a plain shared library (libnvrtc) that turns CUDA C++ into PTX and, for a real
architecture (`-arch=sm_80`), into a CUBIN: it runs ptxas inside, so register and shared-memory
limits of that GPU are checked too. It needs no GPU and no driver, which is why the test suite
uses it to prove every kernel in kernels/ compiles for P100 (sm_60), V100 (sm_70), A100 (sm_80)
and H100/H200 (sm_90) on any machine. (On a GPU, CuPy compiles the same sources with the same
NVRTC; this module is only the check.)

This is a thin ctypes binding of our own to the few C functions needed:
nvrtcVersion, nvrtcGetSupportedArchs, nvrtcCreateProgram, nvrtcCompileProgram,
nvrtcGetProgramLog(Size), nvrtcGetCUBIN(Size), nvrtcGetPTX(Size), nvrtcDestroyProgram,
nvrtcGetErrorString. It imports neither CuPy nor anything GPU-related.

Where the library comes from, first match wins:
  1. $KERNELS_NVRTC_LIBRARY, the full path of a libnvrtc to use;
  2. the `nvidia-cuda-nvrtc-cu12` wheel (site-packages/nvidia/cuda_nvrtc/lib), which the
     project's `test` extra installs;
  3. a CUDA toolkit: $CUDA_PATH, $CUDA_HOME, /usr/local/cuda (lib64/, lib/, bin/);
  4. the system loader (ldconfig, LD_LIBRARY_PATH).
CUDA headers such as <cuda_fp16.h> and <cuda_bf16.h> are NOT built into NVRTC 12.x; they are
found in the `nvidia-cuda-runtime-cu12` wheel (site-packages/nvidia/cuda_runtime/include), the
`nvidia-cuda-nvcc-cu12` wheel (crt/mma.h, which <mma.h> includes: nvidia/cuda_nvcc/include) or a
toolkit's include/ directory and passed with -I automatically.

Example:
    >>> from kernels.runtime.nvrtc import compile_cuda
    >>> r = compile_cuda('extern "C" __global__ void k(float* x) { x[threadIdx.x] = 1.0f; }',
    ...                  arch="sm_90")
    >>> len(r.cubin) > 0
    True
"""

import ctypes
import ctypes.util
import glob
import os
import sys
import threading
import time
from dataclasses import dataclass

from ..emu.errors import CompileError, first_error_line

__all__ = [
    "CompileResult",
    "NVRTCError",
    "NVRTCUnavailableError",
    "compile_cuda",
    "compile_file",
    "cuda_include_dirs",
    "find_nvrtc_library",
    "nvrtc_available",
    "nvrtc_version",
    "supported_archs",
]

NVRTC_SUCCESS = 0
NVRTC_ERROR_COMPILATION = 6
_INSTALL_HINT = (
    "install it with `pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12` "
    "(part of the `test` extra: pip install -e \".[test]\"), or point $KERNELS_NVRTC_LIBRARY "
    "at a libnvrtc shared library"
)


class NVRTCError(CompileError):
    """NVRTC refused a source: compile error, ptxas resource error or invalid option.

    Besides CompileError's `log`, `filename` and `line`, carries `arch` (e.g. "sm_80") and
    `result` (the nvrtcResult code, 6 = NVRTC_ERROR_COMPILATION).
    """

    def __init__(self, message, log="", filename=None, line=None, arch=None, result=None):
        self.arch = arch
        self.result = result
        super().__init__(message, log=log, filename=filename, line=line)

    def __reduce__(self):
        return (type(self), (self.message, self.log, self.filename, self.line, self.arch, self.result))


class NVRTCUnavailableError(RuntimeError):
    """libnvrtc could not be found or loaded; the message says where we looked and how to fix it."""


@dataclass(frozen=True)
class CompileResult:
    """What NVRTC produced for one source and one architecture.

    cubin:   bytes, the machine code (ELF) for a real architecture `sm_XX`; b"" for `compute_XX`.
    log:     str, the compiler's messages (warnings, e.g. the deprecation notice for sm_60/sm_70);
             "" when it had nothing to say.
    ptx:     bytes, the PTX assembly (NUL-terminated text as NVRTC returns it); may be b"".
    arch:    str, the target, e.g. "sm_80".
    seconds: float, wall time of nvrtcCompileProgram.
    """

    cubin: bytes
    log: str
    ptx: bytes = b""
    arch: str = ""
    seconds: float = 0.0


# ----------------------------------------------------------------------------- locating files

def _site_dirs():
    """Every directory Python imports from (where pip wheels land), without duplicates."""
    dirs = []
    for d in sys.path:
        if d and os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    return dirs


def _wheel_dirs(package, sub):
    """Folders `nvidia/<package>/<sub>` of an NVIDIA pip wheel, e.g. ('cuda_nvrtc', 'lib')."""
    found = []
    for site in _site_dirs():
        for pattern in (os.path.join(site, "nvidia", package, sub),
                        os.path.join(site, "nvidia", "cu1*", sub)):  # CUDA 13 wheels' layout
            for d in sorted(glob.glob(pattern)):
                if os.path.isdir(d) and d not in found:
                    found.append(d)
    return found


def _toolkit_roots():
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return [r for r in roots if r and os.path.isdir(r)]


def _nvrtc_in(directory):
    """The main libnvrtc in `directory` (not libnvrtc-builtins, not the .alt variant), or None."""
    if sys.platform.startswith("win"):
        names = glob.glob(os.path.join(directory, "nvrtc64_*.dll"))
    else:
        names = glob.glob(os.path.join(directory, "libnvrtc.so*")) + glob.glob(
            os.path.join(directory, "libnvrtc.*.dylib"))
    names = sorted(n for n in names if "builtins" not in os.path.basename(n))
    return names[0] if names else None


def _library_candidates():
    """(path-or-soname, where-from) pairs in search order."""
    env = os.environ.get("KERNELS_NVRTC_LIBRARY")
    if env:
        yield env, "$KERNELS_NVRTC_LIBRARY"
    for d in _wheel_dirs("cuda_nvrtc", "lib") + _wheel_dirs("cuda_nvrtc", "bin"):
        lib = _nvrtc_in(d)
        if lib:
            yield lib, "the nvidia-cuda-nvrtc wheel"
    for root in _toolkit_roots():
        for sub in ("lib64", "lib", "bin", os.path.join("targets", "x86_64-linux", "lib")):
            lib = _nvrtc_in(os.path.join(root, sub))
            if lib:
                yield lib, f"the CUDA toolkit at {root}"
    name = ctypes.util.find_library("nvrtc")
    if name:
        yield name, "the system loader"
    for soname in ("libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so.11.2", "libnvrtc.so"):
        yield soname, "the system loader"


def find_nvrtc_library():
    """Path (or loader name) of the libnvrtc this module would use, or None if there is none.

    Only checks that a candidate exists; `nvrtc_available()` also loads it.
    """
    for candidate, _ in _library_candidates():
        if os.path.sep in candidate:
            if os.path.isfile(candidate):
                return candidate
            continue
        try:  # a bare soname: only the loader knows whether it exists
            ctypes.CDLL(candidate)
            return candidate
        except OSError:
            continue
    return None


def cuda_include_dirs():
    """Directories holding the CUDA headers (<cuda_fp16.h>, <cuda_bf16.h>, ...), best first.

    The nvidia-cuda-runtime wheel's include/ comes first (it is installed with the same CUDA
    major version as the NVRTC wheel), then the nvidia-cuda-nvcc wheel's (crt/mma.h for <mma.h>),
    then $CUDA_PATH/include, $CUDA_HOME/include and /usr/local/cuda/include, then the
    nvidia-cuda-cccl wheel's include/ (libcu++, which <cooperative_groups.h> needs). Returns []
    when none is found. The CuPy runtime can pass these with
    -I too, for kernels that include the half-precision headers.
    """
    dirs = list(_wheel_dirs("cuda_runtime", "include")) + list(_wheel_dirs("cuda_nvcc", "include"))
    for root in _toolkit_roots():
        dirs.append(os.path.join(root, "include"))
    result = []
    for d in dirs:
        has = os.path.isfile(os.path.join(d, "cuda_fp16.h")) or os.path.isfile(os.path.join(d, "crt", "mma.h"))
        if has and d not in result:
            result.append(d)
    # libcu++ (<cuda/std/...>), which CUDA 12's <cooperative_groups.h> includes: the
    # nvidia-cuda-cccl wheel, or a toolkit's include/ (where it sits beside the others)
    for d in _wheel_dirs("cuda_cccl", "include"):
        if os.path.isdir(os.path.join(d, "cuda", "std")) and d not in result:
            result.append(d)
    return result


# ----------------------------------------------------------------------------- the library

_lock = threading.Lock()
_lib = None
_lib_path = None
_load_failure = None


def _declare(lib):
    c_int, c_size_t, c_char_p, c_void_p = ctypes.c_int, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p
    P = ctypes.POINTER
    signatures = {
        "nvrtcVersion": [P(c_int), P(c_int)],
        "nvrtcGetErrorString": [c_int],
        "nvrtcCreateProgram": [P(c_void_p), c_char_p, c_char_p, c_int, P(c_char_p), P(c_char_p)],
        "nvrtcDestroyProgram": [P(c_void_p)],
        "nvrtcCompileProgram": [c_void_p, c_int, P(c_char_p)],
        "nvrtcGetProgramLogSize": [c_void_p, P(c_size_t)],
        "nvrtcGetProgramLog": [c_void_p, c_char_p],
        "nvrtcGetPTXSize": [c_void_p, P(c_size_t)],
        "nvrtcGetPTX": [c_void_p, c_char_p],
        "nvrtcGetCUBINSize": [c_void_p, P(c_size_t)],
        "nvrtcGetCUBIN": [c_void_p, c_char_p],
        "nvrtcGetNumSupportedArchs": [P(c_int)],
        "nvrtcGetSupportedArchs": [P(c_int)],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)  # AttributeError -> not a usable libnvrtc
        fn.argtypes = argtypes
        fn.restype = c_char_p if name == "nvrtcGetErrorString" else c_int


def _load():
    """Load libnvrtc once; raise NVRTCUnavailableError saying where we looked if we cannot."""
    global _lib, _lib_path, _load_failure
    with _lock:
        if _lib is not None:
            return _lib
        if _load_failure is not None:
            raise NVRTCUnavailableError(_load_failure)
        tried = []
        for candidate, origin in _library_candidates():
            try:
                lib = ctypes.CDLL(candidate)
                _declare(lib)
            except (OSError, AttributeError) as exc:
                tried.append(f"{candidate} ({origin}): {exc}")
                continue
            _lib, _lib_path = lib, candidate
            return lib
        _load_failure = "libnvrtc (the CUDA runtime compiler) was not found; " + _INSTALL_HINT
        if tried:
            _load_failure += ". Tried: " + "; ".join(tried)
        raise NVRTCUnavailableError(_load_failure)


def _error_string(lib, result):
    msg = lib.nvrtcGetErrorString(result)
    return msg.decode() if msg else f"nvrtcResult {result}"


def _check(lib, result, call):
    if result != NVRTC_SUCCESS:
        raise RuntimeError(f"{call} failed: {_error_string(lib, result)}")


def nvrtc_available():
    """(True, "NVRTC 12.9 from <path>") if libnvrtc loads, else (False, why and how to fix)."""
    try:
        _load()
        major, minor = nvrtc_version()
    except (NVRTCUnavailableError, RuntimeError) as exc:
        return False, str(exc)
    return True, f"NVRTC {major}.{minor} from {_lib_path}"


def nvrtc_version():
    """(major, minor) of the loaded NVRTC, e.g. (12, 9). Raises NVRTCUnavailableError."""
    lib = _load()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def supported_archs():
    """Sorted list of the compute capabilities this NVRTC can target, e.g. [50, ..., 90, 100, 120]."""
    lib = _load()
    n = ctypes.c_int()
    _check(lib, lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
    archs = (ctypes.c_int * n.value)()
    _check(lib, lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
    return sorted(archs)


# ----------------------------------------------------------------------------- compiling

def _normalize_arch(arch):
    """'sm_80' | 'compute_80' | '80' | 80 -> ('sm_80' or 'compute_80', 80)."""
    if isinstance(arch, bool) or not isinstance(arch, (str, int)):
        raise TypeError(f"arch must be a string like 'sm_80' or an int like 80, got {arch!r}")
    text = str(arch).strip().lower()
    kind = "sm"
    for prefix in ("sm_", "compute_"):
        if text.startswith(prefix):
            kind, text = prefix[:-1], text[len(prefix):]
    # 'sm_90a' style suffixes name feature sets of one GPU; accept them as NVRTC does.
    digits = text.rstrip("af")
    if not digits.isdigit():
        raise ValueError(f"arch must look like 'sm_80', 'compute_80' or 80, got {arch!r}")
    return f"{kind}_{text}", int(digits)


def _check_options(options):
    if isinstance(options, (str, bytes)):
        raise TypeError(f"options must be a sequence of strings, e.g. ('-DTILE=16',), got the string {options!r}")
    out = []
    for opt in options:
        if not isinstance(opt, str):
            raise TypeError(f"options must hold strings, got {opt!r} ({type(opt).__name__})")
        if opt.startswith(("-arch", "--gpu-architecture")):
            raise ValueError(f"pass the target with arch=..., not in options ({opt!r})")
        out.append(opt)
    return out


def compile_cuda(source, arch="sm_80", options=(), filename="kernel.cu", include_dirs=()):
    """Compile CUDA C++ `source` for one GPU architecture with NVRTC; no GPU needed.

    Args:
        source:       str, the CUDA C++ text (a .cu file's contents).
        arch:         target, "sm_XX" (default "sm_80": PTX and CUBIN, ptxas limits checked),
                      "compute_XX" (PTX only) or an int XX.
        options:      sequence of str, extra NVRTC options ("-DTILE=16", "--use_fast_math", ...).
        filename:     str, the name the compiler uses for the source in its messages
                      ("relu.cu(12): error: ..."); no file is read.
        include_dirs: sequence of str, extra -I directories searched before the CUDA headers.

    Returns:
        CompileResult with `cubin` (non-empty for sm_XX), `ptx`, `log`, `arch`, `seconds`.

    Raises:
        NVRTCError (a kernels.CompileError) with the compiler's log when compilation
        fails; NVRTCUnavailableError when libnvrtc cannot be found; TypeError/ValueError for
        bad arguments.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str of CUDA C code, got {type(source).__name__}")
    if not isinstance(filename, str) or not filename:
        raise TypeError(f"filename must be a non-empty str, got {filename!r}")
    target, number = _normalize_arch(arch)
    opts = [f"-arch={target}"]
    opts += [f"-I{d}" for d in include_dirs]
    opts += [f"-I{d}" for d in cuda_include_dirs()]
    opts += _check_options(options)

    lib = _load()
    known = supported_archs()
    if number not in known:
        major, minor = nvrtc_version()
        raise ValueError(f"arch {arch!r} is not supported by NVRTC {major}.{minor}; it supports {known}")

    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), filename.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        c_opts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        start = time.perf_counter()
        result = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
        seconds = time.perf_counter() - start
        log = _read(lib, prog, lib.nvrtcGetProgramLogSize, lib.nvrtcGetProgramLog).rstrip(b"\0")
        log = log.decode("utf-8", errors="replace").strip()
        if result != NVRTC_SUCCESS:
            line = first_error_line(log, filename)
            where = f"{filename}:{line}" if line is not None else filename
            message = f"NVRTC could not compile {where} for {target} ({_error_string(lib, result)})"
            if "could not open source file" in log and not cuda_include_dirs():
                message += ("; the CUDA headers (cuda_fp16.h, ...) come from the nvidia-cuda-runtime-cu12 wheel: "
                            "pip install nvidia-cuda-runtime-cu12")
            raise NVRTCError(message, log=log, filename=filename, line=line, arch=target, result=result)
        cubin = b""
        if target.startswith("sm_"):
            cubin = _read(lib, prog, lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
        ptx = _read(lib, prog, lib.nvrtcGetPTXSize, lib.nvrtcGetPTX, optional=True)
        return CompileResult(cubin=cubin, log=log, ptx=ptx, arch=target, seconds=seconds)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _read(lib, prog, get_size, get_data, optional=False):
    """Copy one NVRTC output buffer (log, PTX or CUBIN) into bytes."""
    size = ctypes.c_size_t()
    result = get_size(prog, ctypes.byref(size))
    if result != NVRTC_SUCCESS:
        if optional:
            return b""
        _check(lib, result, get_size.__name__)
    if size.value == 0:
        return b""
    buf = ctypes.create_string_buffer(size.value)
    _check(lib, get_data(prog, buf), get_data.__name__)
    return buf.raw


def compile_file(path, arch="sm_80", options=(), include_dirs=(), filename=None):
    """Compile the .cu file at `path` as kernels.load_module would: its own directory (then
    include_dirs) is searched for `#include "..."`, and KERNEL_ENTRY lines become kernels.

    `filename` (default: `path` as given) is the name shown in compiler messages.
    Same return value and errors as `compile_cuda`.
    """
    from .raw import expand_local_includes
    from ..emu.signature import expand_entry_points
    with open(path, encoding="utf-8") as f:
        source = f.read()
    dirs = [os.path.dirname(os.path.abspath(path))] + list(include_dirs)
    name = filename or str(path)
    # what kernels.load_module compiles: local headers inlined, KERNEL_ENTRY lines written out
    source = expand_entry_points(expand_local_includes(source, name, dirs), name)
    return compile_cuda(source, arch=arch, options=options, filename=name, include_dirs=dirs)
