"""What CuPy needs to compile our kernels on a machine that has only the NVIDIA driver.

CuPy compiles every kernel at run time with NVRTC (the CUDA runtime compiler, a shared library),
and our kernels include CUDA headers: <cuda_fp16.h>, <cuda_bf16.h>, <cuda_pipeline.h> (which
includes its two helpers beside it) and <mma.h>, which itself includes "crt/mma.h". The driver brings none of these; the `gpu` extras of setup.cfg bring them
as pip wheels (README.md, "On a GPU").

How CuPy finds them (read from CuPy 14.2's cupy/_environment.py and cupy/_core/core.pyx, and
CuPy 13.6's for CUDA 11):
  - NVRTC (CuPy 14): cuda-pathfinder's `load_nvidia_dynamic_lib("nvrtc")`, which looks in
    site-packages first (CUDA 13 wheels: nvidia/cu13/lib; CUDA 12 wheels: nvidia/cuda_nvrtc/lib),
    then conda, the system loader, $CUDA_PATH/$CUDA_HOME.
  - headers (CuPy 14): `-I<CUDA root>/include`, the root derived from where NVRTC was found
    (CUDA 13 wheels: site-packages/nvidia/cu13; a toolkit: its root; CUDA 12 wheels, whose files
    are spread over several folders: none), plus the include/ of the nvidia-cuda-runtime wheel
    (cuda-pathfinder's `find_nvidia_header_directory("cudart")`).
  - CuPy 13 (the CUDA 11 wheel): libnvrtc.so.11.2 through the system loader only, headers from
    the toolkit ($CUDA_PATH, the nvcc on $PATH, /usr/local/cuda) plus a bundled cuda_fp16.h.
What that misses: the CUDA 12 wheels keep crt/mma.h in the nvcc wheel
(site-packages/nvidia/cuda_nvcc/include), which is on no search path, so <mma.h> (WMMA, our
tensor-core GEMM) would not compile. `extra_include_options()` adds, for each header our kernels
need that CuPy's path lacks, the include folder of an installed NVIDIA wheel of the same CUDA
major version that has it. (Never a toolkit of another version: mixed headers compile wrong.)

`report()` says where each piece was found; bench/check_extras.py runs it in a fresh virtual
environment for each extra.
"""

import glob
import os
import re
import sys
from pathlib import Path

__all__ = ["KERNEL_DIR", "include_dirs", "kernel_headers", "needed_headers", "cupy_include_dirs", "nvrtc_major",
           "wheel_include_dirs", "extra_include_dirs", "extra_include_options", "find_header",
           "install_hint", "raise_with_install_hint", "CudaSetupError", "gpu_extra_for", "cupy_wheel_cuda_major",
           "report"]

KERNEL_DIR = Path(__file__).resolve().parent.parent

# Headers that a header of the toolkit includes and that may sit in another wheel than itself.
_NESTED = {"mma.h": ("crt/mma.h", "crt/mma.hpp")}
_SYSTEM_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*<([^>]+)>', re.M)

# CuPy wheel -> the extra of setup.cfg that installs it with NVRTC, the headers and NCCL
_EXTRAS = {11: "gpu-cuda11", 12: "gpu", 13: "gpu-cuda13"}


class CudaSetupError(RuntimeError):
    """CuPy cannot compile our kernels: NVRTC or a CUDA header is missing. Says what to install."""


def kernel_headers(folder=KERNEL_DIR):
    """The `#include <...>` headers of the kernels (*.cu, *.cuh in `folder`), sorted."""
    found = set()
    for path in sorted(glob.glob(os.path.join(folder, "*.cu")) + glob.glob(os.path.join(folder, "*.cuh"))):
        with open(path, encoding="utf-8") as f:
            found.update(_SYSTEM_INCLUDE.findall(f.read()))
    return sorted(found)


def needed_headers(folder=KERNEL_DIR):
    """kernel_headers() plus the headers they include that may live in another wheel."""
    out = []
    for h in kernel_headers(folder):
        out.append(h)
        out.extend(_NESTED.get(h, ()))
    return out


def find_header(header, dirs):
    """The first folder of `dirs` that holds `header` (a relative path such as 'crt/mma.h'), or None."""
    for d in dirs:
        if os.path.isfile(os.path.join(d, header)):
            return d
    return None


# ---- what CuPy does -----------------------------------------------------------------------------------

def include_dirs(options):
    """The folders of the -I / --include-path options of a compiler command line, in order."""
    dirs, it = [], iter(options)
    for opt in it:
        if opt in ("-I", "--include-path"):
            dirs.append(next(it, ""))
        elif opt.startswith("--include-path="):
            dirs.append(opt.split("=", 1)[1])
        elif opt.startswith("-I") and len(opt) > 2:
            dirs.append(opt[2:])
    return dirs


def cupy_include_dirs(options=()):
    """The -I folders CuPy passes to NVRTC (its own headers, CCCL, the CUDA headers), in order, or
    None when this CuPy does not say (a CuPy without `assemble_cupy_compiler_options`, a stand-in).
    Needs no GPU: it loads NVRTC to read its version."""
    try:
        from cupy._core import core
        opts = core.assemble_cupy_compiler_options(tuple(options))
    except Exception:
        return None
    return include_dirs(opts)


def nvrtc_major():
    """CUDA major version of the NVRTC that CuPy loads (loading it: no GPU needed), or None."""
    try:
        from cupy.cuda import nvrtc
        return int(nvrtc.getVersion()[0])
    except Exception:
        return None


def _distribution_dir(name, major, sub):
    """site-packages/<sub> of the installed distribution `name` when its version is major.x."""
    from importlib import metadata
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    if not str(dist.version).split(".")[0] == str(major):
        return None
    path = Path(str(dist.locate_file(sub)))
    return str(path) if path.is_dir() else None


def wheel_include_dirs(major):
    """Include folders of the installed NVIDIA wheels of CUDA `major` (version checked from the
    package metadata): CUDA 13+ put every header in nvidia/cu13/include; CUDA 11/12 spread them
    over nvidia/cuda_runtime/include and nvidia/cuda_nvcc/include (crt/)."""
    if major is None:
        return []
    if major >= 13:
        names = [("nvidia-cuda-runtime", f"nvidia/cu{major}/include"), ("nvidia-cuda-crt", f"nvidia/cu{major}/include")]
    else:
        names = [(f"nvidia-cuda-runtime-cu{major}", "nvidia/cuda_runtime/include"),
                 (f"nvidia-cuda-nvcc-cu{major}", "nvidia/cuda_nvcc/include")]
    dirs = []
    for name, sub in names:
        d = _distribution_dir(name, major, sub)
        if d and d not in dirs:
            dirs.append(d)
    return dirs


def extra_include_dirs():
    """Folders to add to CuPy's include path so that every header our kernels need resolves:
    for each missing one, the first wheel folder of the same CUDA major that has it."""
    cupy_mod = sys.modules.get("cupy")
    cached = _extra_cache.get(id(cupy_mod))
    if cached is not None and cached[0] is cupy_mod:
        return cached[1]
    dirs = cupy_include_dirs()
    extra = []
    if dirs is not None:
        candidates = wheel_include_dirs(nvrtc_major())
        for header in needed_headers():
            if find_header(header, dirs + extra) is None:
                d = find_header(header, candidates)
                if d is not None:
                    extra.append(d)
    _extra_cache[id(cupy_mod)] = (cupy_mod, extra)
    return extra


_extra_cache = {}


def extra_include_options():
    """extra_include_dirs() as NVRTC options: ('-I<dir>', ...)."""
    return tuple(f"-I{d}" for d in extra_include_dirs())


# ---- when it fails ---------------------------------------------------------------------------------

def gpu_extra_for(cuda_major=None):
    """The pip extra for CUDA `cuda_major` (default: that of the installed CuPy wheel)."""
    if cuda_major is None:
        cuda_major = cupy_wheel_cuda_major()
    return _EXTRAS.get(cuda_major, "gpu")


def cupy_wheel_cuda_major():
    """CUDA major version the installed CuPy wheel was built for (cupy-cuda12x -> 12), or None."""
    from importlib import metadata
    for major in (13, 12, 11):
        try:
            metadata.distribution(f"cupy-cuda{major}x")
            return major
        except metadata.PackageNotFoundError:
            continue
    return None


def install_hint(exc):
    """One sentence saying what to install when `exc` (raised by CuPy while compiling) is a missing
    NVRTC or CUDA header, else None."""
    text = str(exc)
    extra = gpu_extra_for()
    fix = (f'pip install -e ".[{extra}]" (README.md, "On a GPU": the extra brings NVRTC, the CUDA headers '
           f'and NCCL as wheels; a CUDA toolkit of the same version works too)')
    if re.search(r"nvrtc", text, re.I) and re.search(r"find|load|not found|cannot open shared", text, re.I):
        return f"CuPy cannot load NVRTC, the CUDA runtime compiler our kernels need: {fix}"
    m = re.search(r'cannot open source file "([^"]+)"', text)
    if m:
        return f"the CUDA header {m.group(1)} is not on CuPy's include path: {fix}"
    if "Failed to auto-detect CUDA root" in text:
        return f"CuPy finds no CUDA headers: {fix}"
    return None


def raise_with_install_hint(exc, filename):
    """Raise CudaSetupError (from exc) when exc is a missing NVRTC or header; else return."""
    hint = install_hint(exc)
    if hint is not None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CudaSetupError(f"{filename}: {hint}. CuPy said: {first}") from exc


# ---- the report of the extras check -------------------------------------------------------------------

def _loaded_library(fragment):
    """Path of a loaded shared library whose file name contains `fragment` (Linux), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip().split(" ")[-1]
                if fragment in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


def report():
    """Where CuPy finds each piece, without a GPU: a dict with cupy (version), nvrtc (version,
    library), include_dirs (CuPy's), extra_include_dirs (ours), headers ({header: folder or None}),
    nccl (available, version, library). Raises nothing: failures are in the values."""
    out = {"cupy": None, "nvrtc": None, "nvrtc_library": None, "include_dirs": None, "extra_include_dirs": [],
           "headers": {}, "nccl": {"available": False, "version": None, "library": None, "error": None}}
    try:
        import cupy
        out["cupy"] = cupy.__version__
    except Exception as exc:
        out["cupy_error"] = f"{type(exc).__name__}: {exc}"
        return out
    try:
        from cupy.cuda import nvrtc
        out["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
    except Exception as exc:
        out["nvrtc_error"] = f"{type(exc).__name__}: {exc}"
    out["nvrtc_library"] = _loaded_library("libnvrtc.so")
    out["include_dirs"] = cupy_include_dirs()
    out["extra_include_dirs"] = extra_include_dirs()
    search = (out["include_dirs"] or []) + out["extra_include_dirs"]
    out["headers"] = {h: find_header(h, search) for h in needed_headers()}
    try:
        from cupy.cuda import nccl
        out["nccl"]["available"] = bool(getattr(nccl, "available", False))
        if out["nccl"]["available"]:
            out["nccl"]["version"] = int(nccl.get_version())
    except Exception as exc:
        out["nccl"]["error"] = f"{type(exc).__name__}: {exc}"
    out["nccl"]["library"] = _loaded_library("libnccl.so")
    return out
