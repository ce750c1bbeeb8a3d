"""The CPU emulator: runs unchanged CUDA C kernels on NumPy arrays.

From source to launch:
  1. `EmuModule(code, options)` prepares one C++ translation unit: a `#line` directive (so that
     compiler messages point at your .cu file), your source, and for every extern "C" __global__
     function an exported entry point that unpacks the argument list the way cuLaunchKernel does.
     The header kernels/emu/include/cuda_emu.h is force-included: it maps CUDA C onto C++.
  2. The system C++ compiler builds it into a shared library, cached in the user cache directory
     under a hash of everything that went into it (source, options, headers, compiler), beside a
     record of its checksum: a damaged library is rebuilt, never loaded (see "the cache" below).
  3. A launch passes the grid, the block, the dynamic shared-memory size and pointers to the
     arguments to the runtime (kernels/emu/runtime.cpp), which runs every block, giving every
     CUDA thread a fiber so that __syncthreads() and warp shuffles really synchronise.

Environment variables:
  KERNELS_EMU_DEBUG=1    bounds-checked launches: every array argument is copied between guard
                         pages, so an access past either end raises OutOfBoundsError naming the
                         kernel, the argument and the first bad access; shared memory is poisoned
                         (0xff) per block; shuffles from lanes outside the mask are errors;
                         compiled with -O0 -g.  Each kernel runs twice (arrays ending at a guard
                         page, then starting at one).
  KERNELS_EMU_DEBUG=gdb  the same, run once (arrays ending at a guard page: overruns fault where
                         they happen), with absolute source paths in the debug information:
                         for stepping through a kernel in gdb (kernels/README.md has a recipe).
  KERNELS_EMU_SANITIZE=all (or a comma list of memcheck, racecheck, initcheck, synccheck)
                         the four checks of NVIDIA's compute-sanitizer on every launch, with a
                         SanitizerError naming the line(s), thread(s) and memory of a finding
                         (kernels/emu/sanitizer.py, emu/sanitizer.cpp; `kernels.sanitize()` for a block).
  KERNELS_EMU_SCHEDULE=forward|reverse|random[:seed]
                         the order of a block's threads between barriers, and of the blocks.
  KERNELS_EMU_CACHE=DIR  where compiled kernels are kept (default $XDG_CACHE_HOME/mlperf-resnet-cupy/emu,
                         or ~/.cache/mlperf-resnet-cupy/emu); one that cannot be written is an
                         EmulatorCacheError naming this variable.
  CXX=...                the C++ compiler (default: c++, then g++, then clang++).
  KERNELS_EMU_UCONTEXT=1 use the portable ucontext fiber switch instead of the x86-64 one.

Always on:
  - Ctrl-C stops a running kernel (a runaway loop included) with KeyboardInterrupt; with a
    SIGINT handler of the program's own (train.py's "finish the step"), the handler runs after
    the launch and a second Ctrl-C stops the kernel.
  - the guard bytes: a write into the 8 bytes just before or just after an array argument (a
    0-byte one too) is reported after the launch as OutOfBoundsError naming the argument
    (KERNELS_EMU_DEBUG=1 then finds the thread).
  - a null pointer faults (KernelFault) instead of being optimised away with what follows it
    (-fno-delete-null-pointer-checks); exit(), abort() and __trap() in a kernel stop the launch
    with a KernelFault instead of ending the process (cuda_emu.h).
  - float32 denormals are flushed to zero (FTZ/DAZ) as CuPy's -ftz=true compiles them, unless the
    module's options say -ftz=false.
"""

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from . import profiler as _profiler
from . import sanitizer as _san
from .errors import (BarrierDivergenceError, CompileError, DeadlockError, EmulatorCacheError, EmulatorError,
                     KernelAssertionError, KernelFault, LaunchConfigError, OutOfBoundsError, SynccheckError,
                     WarpCollectiveError)
from .signature import code_size, find_kernels

__all__ = ["EmuModule", "EmuFunction", "EmulatorError", "LaunchConfigError", "BarrierDivergenceError",
           "DeadlockError", "WarpCollectiveError", "KernelAssertionError", "KernelFault", "OutOfBoundsError",
           "EmulatorCacheError", "debug_enabled", "debug_mode", "cache_dir", "emulated_arch"]

_HERE = Path(__file__).resolve().parent
_INCLUDE = _HERE / "include"
# one translation unit: the scheduler, the sanitizer (which uses its state), the profiler (fed by
# the sanitizer's access hook)
_RUNTIME_SOURCES = (_HERE / "runtime.cpp", _HERE / "sanitizer.cpp", _HERE / "profiler.cpp")
_MAX_THREADS_PER_BLOCK = 1024
_MAX_BLOCK = (1024, 1024, 64)
_MAX_GRID = (2**31 - 1, 65535, 65535)
_DEFAULT_DYNAMIC_SHARED = 48 * 1024
# Largest dynamic shared memory a block may opt into, by compute capability (bytes).
_MAX_OPTIN_SHARED = {60: 48 * 1024, 61: 48 * 1024, 70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024,
                     86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_DEFAULT_ARCH = 80
_GUARD_BYTES = 1 << 20
_PAGE = 4096
_PROFILE = _san.PROFILE


# ---------------------------------------------------------------------------------- errors
# The exception classes live in kernels/emu/errors.py; emu_launch's error codes map onto them.
_ERROR_CLASSES = {1: LaunchConfigError, 2: BarrierDivergenceError, 3: DeadlockError, 4: KernelFault,
                  5: KernelAssertionError, 6: WarpCollectiveError, 10: KernelFault}
_SYNC_ERRORS = {2: "divergent barriers", 3: "deadlock", 6: "warp collective mismatch"}


def debug_mode():
    """KERNELS_EMU_DEBUG: '' (off: '', '0', 'false', 'no', 'off'), 'gdb' (one run, for a
    debugger) or 'checked' (anything else, '1': the two bounds-checked runs)."""
    value = os.environ.get("KERNELS_EMU_DEBUG", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return ""
    return "gdb" if value == "gdb" else "checked"


def debug_enabled():
    """True when KERNELS_EMU_DEBUG turns a debug mode on (see debug_mode)."""
    return bool(debug_mode())


def cache_dir():
    """Directory of compiled kernel libraries (created on demand): $KERNELS_EMU_CACHE, else
    $XDG_CACHE_HOME/mlperf-resnet-cupy/emu, else ~/.cache/mlperf-resnet-cupy/emu.  One that cannot
    be created raises EmulatorCacheError, a one-line message naming KERNELS_EMU_CACHE."""
    d = os.environ.get("KERNELS_EMU_CACHE")
    if d:
        path = Path(d)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "mlperf-resnet-cupy" / "emu"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cache_error(path, e) from None
    return path


def cache_error(path, error):
    """The one-line EmulatorCacheError for an OSError met creating or writing `path` in the cache."""
    reason = error.strerror or str(error)
    if isinstance(error, FileExistsError) or isinstance(error, NotADirectoryError):
        reason = "a file is in the way"
    origin = ("from KERNELS_EMU_CACHE" if os.environ.get("KERNELS_EMU_CACHE") else
              "from XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME") else "the default")
    return EmulatorCacheError(f"the CPU emulator's cache folder cannot be used: {path} ({origin}): {reason}; "
                              f"set KERNELS_EMU_CACHE to a writable folder")


# ---------------------------------------------------------------------------------- compiler
_compiler_lock = threading.Lock()
_compiler_info = None


def _compiler():
    """(path, version string) of the C++ compiler."""
    global _compiler_info
    with _compiler_lock:
        if _compiler_info is None:
            candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
            for c in candidates:
                path = shutil.which(c)
                if path:
                    out = subprocess.run([path, "--version"], capture_output=True, text=True)
                    _compiler_info = (path, out.stdout.splitlines()[0] if out.stdout else c)
                    break
            else:
                raise EmulatorError(
                    "the CPU emulator needs a C++ compiler (g++ or clang++) and none was found; "
                    "install one (Debian/Ubuntu: apt-get install g++) or set CXX")
    return _compiler_info


def _float_flags():
    """Floating-point code generation for kernel modules: a*b + c is never fused into one FMA
    (-ffp-contract=off; GCC's default would fuse it wherever the CPU has FMA, aarch64 always), so
    results do not depend on the CPU; only an explicit fmaf() fuses, as the kernel asks.  Where an
    x86-64 CPU has FMA, -mfma makes that fmaf() one instruction instead of a call into libm (a fifth
    of a tiled convolution's time here); the results are the same either way (fmaf is exact)."""
    global _float_flags_cache
    if _float_flags_cache is None:
        flags = ["-ffp-contract=off"]
        if platform.machine() in ("x86_64", "AMD64"):
            try:
                with open("/proc/cpuinfo") as f:
                    cpu_flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
            except OSError:
                cpu_flags = []
            if "fma" in cpu_flags:
                flags.append("-mfma")
        _float_flags_cache = flags
    return _float_flags_cache


_float_flags_cache = None


def _build(sources_text, extra_flags, stem, display_name, link_with=None, libs=(), link_flags=(),
           compile_only=(), relative_paths=True):
    """Compile one translation unit into a shared library, the cache entry `stem`; returns its path.

    compile_only: flags for the compile step alone, which then runs apart from the link
    (-fsanitize=thread instruments the code, but must not link libtsan: the runtime answers).
    relative_paths: with -g, record the working directory as '.' (the line table then names
    files as the #line directives do); False keeps absolute paths for a debugger.
    """
    cxx, _ = _compiler()
    folder = cache_dir()
    try:
        workspace = tempfile.TemporaryDirectory(prefix="emu-build-", dir=folder)
    except OSError as e:
        raise cache_error(folder, e) from None
    with workspace as tmp:
        src = Path(tmp) / "unit.cpp"
        src.write_text(sources_text)
        tmp_out = Path(tmp) / f"{stem}.so"
        common = [cxx, "-std=c++17", "-fPIC", "-fno-strict-aliasing", "-fvisibility=hidden", "-I", str(_INCLUDE),
                  *extra_flags]
        if "-g" in extra_flags and relative_paths:   # file names in the line table as the #line directives give them
            common.append(f"-fdebug-prefix-map={os.getcwd()}=.")
        link = []
        if link_with is not None:
            link += [str(link_with), f"-Wl,-rpath,{Path(link_with).parent}", "-Wl,-z,defs"]
        link += [*link_flags, "-lm", *libs]
        if compile_only:
            obj = Path(tmp) / "unit.o"
            steps = [common + list(compile_only) + ["-c", str(src), "-o", str(obj)],
                     [cxx, "-shared", str(obj), "-o", str(tmp_out)] + link]
        else:
            steps = [common + ["-shared", str(src), "-o", str(tmp_out)] + link]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                log = proc.stderr.replace(str(src), "<emulator unit>")
                raise CompileError(f"{display_name}: the CPU emulator's C++ compiler failed", log=log,
                                   filename=display_name)
        return _store_entry(folder, stem, tmp_out)


# ---------------------------------------------------------------------------------- the cache
# An entry is a library named by its content, `<stem>-<sha256 prefix>.so`, and a record
# `<stem>.sha256` ("<sha256> <size> <file name>"), written after the library and replaced
# atomically.  A library is loaded only when its size and checksum match its record, so a
# 0-byte or truncated file (a full disk, a copy cut short) is rebuilt, never loaded: dlopen of
# a truncated library ends the process with SIGBUS.  Two processes building one entry at once
# each write a complete library and a record that matches it.
_log = logging.getLogger("kernels.emu")


def write_cache_file(path, text):
    """Write a small text file of the cache atomically (a temporary file, then a rename), readable
    by all as the compiler's libraries are; EmulatorCacheError when the folder is not writable."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise cache_error(path.parent, e) from None


def _file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _store_entry(folder, stem, built):
    """Move the library `built` into the cache as entry `stem`; its path."""
    digest, size = _file_digest(built), built.stat().st_size
    path = folder / f"{stem}-{digest[:16]}.so"
    try:
        os.replace(built, path)
    except OSError as e:
        raise cache_error(folder, e) from None
    write_cache_file(folder / f"{stem}.sha256", f"{digest} {size} {path.name}\n")
    return path


def _cached_entry(folder, stem):
    """(path of the library of entry `stem`, None) when it is whole; (None, None) when there is
    none; (None, what is wrong) when it is damaged."""
    record = folder / f"{stem}.sha256"
    try:
        text = record.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as e:
        return None, f"its record {record.name} cannot be read ({getattr(e, 'strerror', None) or e})"
    fields = text.split()
    if (len(fields) != 3 or not re.fullmatch(r"[0-9a-f]{64}", fields[0]) or not fields[1].isdigit()
            or fields[2] != f"{stem}-{fields[0][:16]}.so"):
        return None, f"its record {record.name} is damaged"
    digest, size, name = fields[0], int(fields[1]), fields[2]
    path = folder / name
    try:
        actual = path.stat().st_size
        if actual != size:
            return None, f"{name} is {actual} bytes, {size} were written"
        if _file_digest(path) != digest:
            return None, f"{name} does not match its checksum"
    except OSError as e:
        return None, f"{name} cannot be read ({e.strerror or e})"
    return path, None


def _cached_library(stem, build):
    """The path of cache entry `stem`, verified, or built by build(stem) when missing or damaged."""
    path, damage = _cached_entry(cache_dir(), stem)
    if path is not None:
        return path
    if damage:
        _log.warning("the CPU emulator's cache entry %s is damaged (%s); rebuilding it", stem, damage)
    return build(stem)


def _digest(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _header_digest():
    return _digest(*[(str(f.relative_to(_INCLUDE)), f.read_bytes()) for f in sorted(_INCLUDE.rglob("*"))
                     if f.is_file()])


# ---------------------------------------------------------------------------------- runtime library
class _Region(ctypes.Structure):
    _fields_ = [("begin", ctypes.c_ulonglong), ("end", ctypes.c_ulonglong), ("kind", ctypes.c_int),
                ("index", ctypes.c_int), ("init", ctypes.c_void_p), ("origin", ctypes.c_ulonglong)]


class _Access(ctypes.Structure):
    _fields_ = [("pc", ctypes.c_ulonglong), ("block", ctypes.c_uint * 3), ("thread", ctypes.c_uint * 3),
                ("size", ctypes.c_int), ("kind", ctypes.c_int)]


class _Finding(ctypes.Structure):
    _fields_ = [("check", ctypes.c_int), ("what", ctypes.c_int), ("address", ctypes.c_ulonglong),
                ("region", ctypes.c_int), ("offset", ctypes.c_longlong), ("access", _Access), ("other", _Access),
                ("has_other", ctypes.c_int), ("mask", ctypes.c_uint), ("file", ctypes.c_char_p),
                ("line", ctypes.c_int)]


class _FaultInfo(ctypes.Structure):
    _fields_ = [("signal", ctypes.c_int), ("is_write", ctypes.c_int), ("in_stack_guard", ctypes.c_int),
                ("address", ctypes.c_ulonglong), ("block", ctypes.c_uint * 3), ("thread", ctypes.c_uint * 3),
                ("guard_array", ctypes.c_int), ("guard_offset", ctypes.c_longlong)]


class _LaunchParams(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_ulonglong),
                ("kernel_name", ctypes.c_char_p), ("entry", ctypes.c_void_p), ("args", ctypes.c_void_p),
                ("debug", ctypes.c_int), ("dynamic_shared", ctypes.c_void_p),
                ("static_shared_begin", ctypes.c_void_p), ("static_shared_end", ctypes.c_void_p),
                ("ftz", ctypes.c_int), ("sigint", ctypes.c_int), ("code_begin", ctypes.c_void_p),
                ("code_end", ctypes.c_void_p), ("arrays", ctypes.c_void_p), ("narrays", ctypes.c_int),
                ("schedule", ctypes.c_int), ("seed", ctypes.c_ulonglong), ("sanitize", ctypes.c_int),
                ("regions", ctypes.c_void_p), ("nregions", ctypes.c_int),
                ("dynamic_shared_capacity", ctypes.c_ulonglong)]


# emu_abi.h: error codes of emu_launch, and what Ctrl-C does during a launch
_ERR_SIGNAL, _ERR_INTERRUPTED, _ERR_GUARD, _ERR_SANITIZER = 4, 7, 8, 9
_SIGINT_LEAVE, _SIGINT_STOP, _SIGINT_FORWARD = 0, 1, 2
_MAIN_THREAD = threading.main_thread().ident
_LITTLE_ENDIAN = sys.byteorder == "little"
# signal.getsignal wraps the C function in an enum conversion that costs microseconds per launch
_getsignal = getattr(signal, "_signal", signal).getsignal
_SIGINT = int(signal.SIGINT)


def _sigint_mode():
    """What Ctrl-C does during a launch, following Python's SIGINT handler (signals reach
    Python's handlers in the main thread only; elsewhere the runtime leaves SIGINT alone)."""
    if threading.get_ident() != _MAIN_THREAD:
        return _SIGINT_LEAVE
    handler = _getsignal(_SIGINT)
    if handler is signal.default_int_handler:
        return _SIGINT_STOP
    return _SIGINT_FORWARD if callable(handler) else _SIGINT_LEAVE


_runtime = None
_runtime_lock = threading.RLock()
# One launch at a time per process: the runtime's scheduler and __shared__ statics are global.
_launch_lock = threading.RLock()


def _load_runtime():
    global _runtime
    with _runtime_lock:
        if _runtime is not None:
            return _runtime
        cxx, version = _compiler()
        src = "".join(f'#line 1 "{path}"\n{path.read_text()}\n' for path in _RUNTIME_SOURCES)
        flags = ["-O2"]
        if os.environ.get("KERNELS_EMU_UCONTEXT", "") not in ("", "0"):
            flags.append("-DEMU_USE_UCONTEXT")  # the portable fiber switch (tests use it)
        # timer_create, dl_iterate_phdr and pthreads live in libc itself since glibc 2.34
        libs = ["-lrt", "-ldl", "-lpthread"] if sys.platform.startswith("linux") else []
        key = _digest("runtime", src, flags, libs, _header_digest(), version, sys.platform)
        path = _cached_library(f"libkernels_emu_runtime_{key}",
                               lambda stem: _build(src, flags, stem, "emu/runtime.cpp", libs=libs))
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        lib.emu_launch.argtypes = [ctypes.POINTER(_LaunchParams)]
        lib.emu_launch.restype = ctypes.c_int
        lib.emu_last_error.restype = ctypes.c_char_p
        lib.emu_last_fault.argtypes = [ctypes.POINTER(_FaultInfo)]
        lib.emu_map_guarded.argtypes = [ctypes.c_ulonglong, ctypes.c_ulonglong]
        lib.emu_map_guarded.restype = ctypes.c_void_p
        lib.emu_unmap_guarded.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_ulonglong]
        lib.emu_unmap_guarded.restype = ctypes.c_int
        lib.emu_code_range.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                       ctypes.POINTER(ctypes.c_void_p)]
        lib.emu_code_range.restype = ctypes.c_int
        lib.emu_last_finding.argtypes = [ctypes.POINTER(_Finding)]
        lib.emu_last_profile.argtypes = [ctypes.c_void_p]
        lib.emu_profile_sites.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.emu_profile_sites.restype = ctypes.c_int
        lib._path = path
        _runtime = lib
        return lib


# ---------------------------------------------------------------------------------- options
def emulated_arch(options):
    """Compute capability (e.g. 80) named by -arch/--gpu-architecture in options, else 80."""
    arch = _DEFAULT_ARCH
    it = iter(options)
    for opt in it:
        m = re.match(r"^(?:-arch|--gpu-architecture)(?:=|$)(.*)", opt)
        if m:
            value = m.group(1) or next(it, "")
            d = re.search(r"(\d+)", value)
            if d:
                arch = int(d.group(1))
    return arch


def flush_denormals(options):
    """False when the NVRTC options switch -ftz off (the last -ftz/--ftz option wins, as NVRTC
    reads them), else True: CuPy compiles every kernel with -ftz=true.

    Note that CuPy appends its -ftz=true AFTER the caller's options, so on the GPU through CuPy
    a kernel's own -ftz=false is overridden; the emulator honours it for kernels meant for a
    compiler that passes it on (NVRTC used directly, nvcc).
    """
    ftz = True
    for opt in options:
        m = re.match(r"^--?ftz(?:=(\w+))?$", opt)
        if m:
            ftz = (m.group(1) or "true").lower() in ("true", "1")
    return ftz


def _translate_options(options):
    """NVRTC options -> C++ compiler flags (defines, include paths, -std); the rest is ignored."""
    flags = []
    it = iter(options)
    for opt in it:
        if opt in ("-D", "--define-macro", "-I", "--include-path", "-U", "--undefine-macro"):
            value = next(it, "")
            opt = {"--define-macro": "-D", "--include-path": "-I", "--undefine-macro": "-U"}.get(opt, opt)
            flags += [opt, value]
        elif opt.startswith(("-D", "-I", "-U")):
            flags.append(opt)
        elif opt.startswith(("--define-macro=", "--include-path=", "--undefine-macro=")):
            key, value = opt.split("=", 1)
            flags.append({"--define-macro": "-D", "--include-path": "-I", "--undefine-macro": "-U"}[key] + value)
        elif opt.startswith(("-std=", "--std=")):
            flags.append("-std=" + opt.split("=", 1)[1])
        elif opt in ("--use_fast_math", "-use_fast_math"):
            flags.append("-D__USE_FAST_MATH__=1")
    return flags


# ---------------------------------------------------------------------------------- modules
_LINE_DIRECTIVE = re.compile(r'^([ \t]*#[ \t]*line[ \t]+\d+[ \t]+)"([^"]*)"', re.M)
_ANY_LINE_DIRECTIVE = re.compile(r"^[ \t]*#[ \t]*line\b.*$", re.M)


def _source_file(name):
    """The absolute path of source file `name` (absolute, or relative to the working directory
    or to the repository), or None."""
    p = Path(name)
    for candidate in ([p] if p.is_absolute() else [Path.cwd() / p, _HERE.parent.parent / p]):
        if candidate.is_file():
            return str(candidate.resolve())
    return None


def _paths_for_debugger(code, filename):
    """(code, filename) with every #line directive naming a file by its absolute path, so that
    gdb finds the sources from any directory (KERNELS_EMU_DEBUG=gdb).  A source that is no file
    (a string given to RawKernel) is written to the cache, without its #line directives, and
    named by that file."""
    own = _source_file(filename)
    if own is not None:
        return _LINE_DIRECTIVE.sub(lambda m: m.group(1) + '"' + (_source_file(m.group(2)) or m.group(2)) + '"',
                                   code), own
    text = _ANY_LINE_DIRECTIVE.sub("", code)   # (same line count: the file is the unit's text)
    folder = cache_dir() / "sources"
    path = folder / f"{_digest('source', text)}.cu"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        whole = path.is_file() and path.read_bytes() == text.encode()   # (a small file: compared whole)
    except OSError as e:
        raise cache_error(folder, e) from None
    if not whole:
        write_cache_file(path, text)
    return text, str(path)


_EXTERN_SHARED = re.compile(r"\bextern\s+__shared__\b")
_EXTERN_SHARED_NAME = re.compile(r"\bextern\s+__shared__\b[^;]*?([A-Za-z_]\w*)\s*\[\s*\]\s*;")


class EmuModule:
    """One CUDA C source compiled for the CPU emulator (the emulator's cupy.RawModule)."""

    def __init__(self, code, options=(), filename=None):
        self.code = code
        self.options = tuple(options)
        self.filename = filename or "<kernel source>"
        self.arch = emulated_arch(self.options)
        if self.arch not in _MAX_OPTIN_SHARED:
            self.arch_shared_limit = 48 * 1024
        else:
            self.arch_shared_limit = _MAX_OPTIN_SHARED[self.arch]
        self.signatures = find_kernels(code)
        self.debug_mode = debug_mode()
        self.debug = bool(self.debug_mode)
        self.ftz = flush_denormals(self.options)
        self._libs = {}
        self._functions = {}

    # The one textual change: `extern __shared__` cannot be expressed with a macro that also
    # makes `__shared__` static, so it is rewritten (same line count) before compiling.
    def _translation_unit(self):
        names = sorted(set(_EXTERN_SHARED_NAME.findall(self.code)))
        code, filename = self.code, self.filename
        if self.debug_mode == "gdb":
            code, filename = _paths_for_debugger(code, filename)
        body = _EXTERN_SHARED.sub("extern __emu_dynamic_shared__", code)
        lines = [f'#line 1 "{filename}"', body, "", '#line 1 "<emulator entry points>"',
                 "#include <emu_entry.h>",
                 f"EMU_DYNAMIC_SHARED_BUFFER({self.arch_shared_limit})"]
        for name in self.signatures:
            lines.append(f"EMU_EXPORT_KERNEL({name})")
        return "\n".join(lines) + "\n", names

    def _load(self, instrumented=False):
        """The compiled library: plain, or instrumented for the sanitizer's memory checks."""
        lib = self._libs.get(instrumented)
        if lib is not None:
            return lib
        with _runtime_lock:
            if instrumented in self._libs:
                return self._libs[instrumented]
            runtime = _load_runtime()
            _, version = _compiler()
            unit, shared_names = self._translation_unit()
            if self.debug:
                # (pads before __shared__ variables, in their order: for the poisoning)
                flags = ["-O0", "-g", "-fno-toplevel-reorder", "-D__KERNELS_EMU_DEBUG__=1"]
            elif instrumented:
                # -O1 without scalar replacement: accesses stay as the source writes them (a
                # float4 load stays one 16-byte load, none are vectorised or merged), and without
                # sinking (a load the source makes unconditionally is not moved into a branch:
                # the profiler's requests); -g: source lines for the messages;
                # -fno-toplevel-reorder: __shared__ variables in order
                flags = ["-O1", "-g", "-fno-toplevel-reorder"]
                if "clang" not in version.lower():
                    flags[1:1] = ["-fno-tree-sra", "-fno-tree-sink"]
            else:
                flags = ["-O2"]
            # A dereference of a null (or other constant) pointer is undefined behaviour, which g++
            # is free to delete together with everything after it: the kernel would return without
            # a word.  Kept, it faults (KernelFault) or memcheck reports it.
            flags.append("-fno-delete-null-pointer-checks")
            flags += [*_float_flags(), f"-D__CUDA_ARCH__={self.arch * 10}", "-D__CUDACC_RTC__=1",
                      "-D__KERNELS_EMULATOR__=1",
                      "-include", "cuda_emu.h", *_translate_options(self.options)]
            compile_only = []
            if instrumented:
                flags.append("-D__KERNELS_EMU_SANITIZE__=1")
                # no calls at function entry and exit: the pc of each access names its site
                # (tested with g++; clang++ takes the same option through -mllvm, untested here)
                no_entry_exit = (["-mllvm", "-tsan-instrument-func-entry-exit=0"] if "clang" in version.lower()
                                 else ["--param=tsan-instrument-func-entry-exit=0"])
                compile_only = ["-fsanitize=thread", *no_entry_exit]
            link_flags = [f"-Wl,--defsym={name}=__emu_dynamic_shared" for name in shared_names]
            key = _digest("module", unit, flags, compile_only, link_flags, _header_digest(), version,
                          runtime._path.name)
            path = _cached_library(f"kernel_{key}", lambda stem: _build(
                unit, flags, stem, self.filename, link_with=runtime._path, link_flags=link_flags,
                compile_only=compile_only, relative_paths=self.debug_mode != "gdb"))
            lib = ctypes.CDLL(str(path))
            lib._path = path
            self._libs[instrumented] = lib
            return lib

    def get_function(self, name):
        """The kernel `name` (an extern "C" __global__ function of this source)."""
        if name not in self._functions:
            if name not in self.signatures:
                known = ", ".join(sorted(self.signatures)) or "none"
                raise AttributeError(f"{self.filename}: no extern \"C\" __global__ function named '{name}' "
                                     f"(found: {known})")
            self._functions[name] = EmuFunction(self, name)
        return self._functions[name]

    def compile(self, instrumented=False):
        """Build (or fetch from the cache) now, instead of at the first launch."""
        self._load(instrumented)
        return self


class _Binding:
    """One kernel in one compiled library: its entry point, and a parameter block and argument
    block of its own, filled anew by each launch (launches hold _launch_lock)."""

    def __init__(self, fn, lib):
        self.lib = lib
        name, signature = fn.name, fn.signature
        entry = getattr(lib, f"__emu_entry_{name}")
        sig = getattr(lib, f"__emu_sig_{name}")
        sig.restype = ctypes.c_char_p
        # "P4,S4,..." : pointer (pointee size) or scalar (size), as the C++ compiler sees them
        compiled = [c for c in sig().decode().split(",") if c]
        if len(compiled) != len(signature.params):
            raise EmulatorError(f"kernel '{name}': parsed {len(signature.params)} parameters but the "
                                f"compiler sees {len(compiled)}; please report this source")
        sizes = []
        for p, c in zip(signature.params, compiled):
            kind, size = c[0], int(c[1:])
            if (kind == "P") != p.is_pointer:
                raise EmulatorError(f"kernel '{name}': parameter `{p.decl}` parsed as "
                                    f"{'pointer' if p.is_pointer else 'scalar'} but the compiler disagrees")
            expect = code_size(p.code)
            if expect is not None and size != expect and not p.is_pointer:
                raise EmulatorError(f"kernel '{name}': parameter `{p.decl}` is {size} bytes, expected {expect}")
            sizes.append(size)
        self.param_sizes = sizes
        self.entry = ctypes.cast(entry, ctypes.c_void_p).value
        self.dyn = ctypes.cast(getattr(lib, "__emu_dynamic_shared"), ctypes.c_void_p).value
        info = getattr(lib, "__emu_static_shared_range")
        info.restype = None
        lo, hi = ctypes.c_void_p(), ctypes.c_void_p()
        info(ctypes.byref(lo), ctypes.byref(hi))
        self.static_lo, self.static_hi = lo.value, hi.value
        code_lo, code_hi = ctypes.c_void_p(), ctypes.c_void_p()
        if not _load_runtime().emu_code_range(self.entry, ctypes.byref(code_lo), ctypes.byref(code_hi)):
            code_lo.value = code_hi.value = None   # Ctrl-C then stops the kernel at its next barrier
        params = _LaunchParams()
        params.kernel_name = name.encode()
        params.entry = self.entry
        params.dynamic_shared = self.dyn
        params.static_shared_begin = self.static_lo
        params.static_shared_end = self.static_hi
        params.dynamic_shared_capacity = fn.module.arch_shared_limit
        params.ftz = 1 if fn.module.ftz else 0
        params.code_begin, params.code_end = code_lo.value, code_hi.value
        self.params = params
        # a 16-byte aligned slot per parameter, argv pointing at them
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-max(size, 8) // 16) * 16
        self.cells = (ctypes.c_uint64 * (total // 8 + 2))()
        base = -(-ctypes.addressof(self.cells) // 16) * 16
        skip = (base - ctypes.addressof(self.cells)) // 8
        self.slots = tuple(skip + off // 8 for off in offsets)
        self.slot_addresses = tuple(base + off for off in offsets)
        self.argv = (ctypes.c_void_p * max(1, len(sizes)))(*self.slot_addresses)
        params.args = ctypes.addressof(self.argv)
        self.spans = (ctypes.c_ulonglong * (2 * max(1, sum(p.is_pointer for p in signature.params))))()
        params.arrays = ctypes.addressof(self.spans)
        self._symbols = None
        self._shared_variables = None
        self._shared_regions = None
        self.config = None   # the launch_config() the parameter block was last set for

    # -- what the sanitizer's messages need (instrumented libraries only)
    def symbols(self):
        if self._symbols is None:
            lib = self.lib

            def address_of(symbol):
                return ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value

            self._symbols = _san.ModuleSymbols(lib._path, address_of)
        return self._symbols

    def shared_variables(self):
        """[(address, size, display name)] of the module's static __shared__ variables (also
        those g++ left outside their section: see ModuleSymbols.shared_variables)."""
        if self._shared_variables is None:
            lo, hi = self.static_lo or 0, self.static_hi or 0
            self._shared_variables = self.symbols().shared_variables(lo, hi)
        return self._shared_variables

    def shared_regions(self):
        """(ctypes array of _Region, count): the __shared__ variables, for a debug launch."""
        if self._shared_regions is None:
            found = self.shared_variables()
            array = (_Region * max(1, len(found)))(*[_Region(a, a + n, _san._REGION_SHARED, k, None, 0)
                                                     for k, (a, n, _) in enumerate(found)])
            self._shared_regions = (array, len(found))
        return self._shared_regions


class EmuFunction:
    """One kernel of an EmuModule.  Call as k(grid, block, args, shared_mem=0)."""

    def __init__(self, module, name):
        self.module = module
        self.name = name
        self.signature = module.signatures[name]
        self.max_dynamic_shared_size_bytes = _DEFAULT_DYNAMIC_SHARED
        self._pointer_params = tuple(p.is_pointer for p in self.signature.params)
        self._bindings = {}

    def _binding(self, instrumented=False):
        b = self._bindings.get(instrumented)
        if b is None:
            b = self._bindings[instrumented] = _Binding(self, self.module._load(instrumented))
        return b

    def _bind(self):
        self._binding(False)

    @property
    def static_shared_bytes(self):
        """Bytes of __shared__ variables in the whole module (an upper bound for one kernel)."""
        b = self._binding(False)
        return (b.static_hi or 0) - (b.static_lo or 0)

    def __call__(self, grid, block, args, shared_mem=0):
        from .signature import check_args
        grid = _dim3("grid", grid, _MAX_GRID, self.name)
        block = _dim3("block", block, _MAX_BLOCK, self.name)
        nthreads = block[0] * block[1] * block[2]
        if nthreads > _MAX_THREADS_PER_BLOCK:
            raise LaunchConfigError(f"kernel '{self.name}': block {block} has {nthreads} threads; a GPU allows "
                                    f"at most {_MAX_THREADS_PER_BLOCK} per block")
        shared_mem = int(shared_mem)
        if shared_mem < 0:
            raise LaunchConfigError(f"kernel '{self.name}': shared_mem must be >= 0, got {shared_mem}")
        limit = self.max_dynamic_shared_size_bytes
        if shared_mem > limit:
            hint = (f"; set kernel.max_dynamic_shared_size_bytes (up to {self.module.arch_shared_limit} on "
                    f"sm_{self.module.arch}) to opt in" if shared_mem <= self.module.arch_shared_limit else
                    f"; sm_{self.module.arch} allows at most {self.module.arch_shared_limit} bytes per block")
            raise LaunchConfigError(f"kernel '{self.name}': {shared_mem} bytes of dynamic shared memory requested, "
                                    f"more than the {limit}-byte limit{hint}")
        values = check_args(self.signature, args, "numpy")
        config = _san.launch_config()
        with _launch_lock:
            binding = self._binding(bool(config[0] & _san.INSTRUMENTED))
            if self.module.debug:
                self._launch_checked(binding, config, grid, block, values, shared_mem)
            else:
                self._launch(binding, config, grid, block, values, shared_mem, [_ptr(v) for v in values])

    def __setattr__(self, key, value):
        if key == "max_dynamic_shared_size_bytes":
            value = int(value)
            limit = getattr(self.module, "arch_shared_limit", None)
            if limit is not None and value > limit:
                raise LaunchConfigError(f"kernel '{self.name}': sm_{self.module.arch} allows at most {limit} bytes "
                                        f"of dynamic shared memory per block, asked for {value}")
        object.__setattr__(self, key, value)

    # -- plain launch
    def _launch(self, binding, config, grid, block, values, shared_mem, pointers, regions=None, record=True):
        """Run the kernel once on `pointers` (the arrays' data or, in debug mode, their guarded
        copies; `regions` are then those copies, and the guard bytes are left to them).
        record: False for a debug run whose results are discarded (not profiled)."""
        cells, slots, sizes, spans = binding.cells, binding.slots, binding.param_sizes, binding.spans
        owners = []    # the argument index of each array in spans (begin, end), for the guard bytes
        for i, (v, ptr) in enumerate(zip(values, pointers)):
            if self._pointer_params[i]:
                cells[slots[i]] = ptr or 0
                if regions is None and ptr:   # (a 0-byte array too: a write to its element 0 is outside it)
                    lo, hi = (0, v.nbytes) if v.flags.c_contiguous else _extent(v)
                    k = 2 * len(owners)
                    spans[k] = ptr + lo
                    spans[k + 1] = ptr + hi
                    owners.append(i)
            else:
                raw = v.tobytes() if isinstance(v, np.generic) else np.asarray(v).tobytes()
                if len(raw) != sizes[i]:
                    p = self.signature.params[i]
                    raise TypeError(f"kernel '{self.name}' argument {i} `{p.decl}` is {sizes[i]} bytes, "
                                    f"got a {len(raw)}-byte {type(v).__name__}")
                if len(raw) <= 8 and _LITTLE_ENDIAN:
                    cells[slots[i]] = int.from_bytes(raw, "little")
                else:
                    ctypes.memmove(binding.slot_addresses[i], raw, len(raw))
        checks, schedule, seed, schedule_text = config
        params = binding.params
        params.grid[:] = grid
        params.block[:] = block
        params.shared_mem = shared_mem
        params.sigint = _sigint_mode()
        params.narrays = len(owners)
        named = None
        if config is not binding.config:   # the same object while nothing changes
            binding.config = config
            params.debug = 1 if self.module.debug else 0
            params.schedule = schedule
            params.seed = seed
            params.sanitize = checks
            params.regions = None
            params.nregions = 0
            if params.debug and not checks:
                # the __shared__ variables, for the runtime to poison those outside the section too
                region_array, params.nregions = binding.shared_regions()
                params.regions = ctypes.addressof(region_array)
        if checks:
            named, region_array = self._regions(binding, values, pointers, shared_mem)
            params.regions = ctypes.addressof(region_array)
            params.nregions = len(named)
            if checks & _san.CHECKS["memcheck"]:
                params.narrays = 0   # memcheck sees every access as it happens: guard bytes add nothing
        sys.stdout.flush()
        rt = _runtime
        rc = rt.emu_launch(ctypes.byref(params))
        if rc != 0:
            self._raise(rt, rc, values, regions, owners, binding, named, block, schedule_text)
        if checks and checks & _PROFILE and record:
            _profiler.record(rt, self, binding, grid, block, shared_mem, values, pointers)

    def _regions(self, binding, values, pointers, shared_mem):
        """The memory a sanitizer finding can name: ([RegionInfo], ctypes array of _Region)."""
        named, raw = [], []
        for i, (v, ptr) in enumerate(zip(values, pointers)):
            if not (self._pointer_params[i] and ptr and isinstance(v, np.ndarray)):
                continue
            lo, hi = (0, v.nbytes) if v.flags.c_contiguous else _extent(v)
            p = self.signature.params[i]
            # (looked up by the array's own address: in debug mode ptr is a guarded copy's)
            flags = _san.init_flags(_ptr(v), v.nbytes) if lo == 0 else None
            name = f"argument {i} '{p.name or p.decl}' ({v.dtype}[{', '.join(map(str, v.shape))}])"
            named.append(_san.RegionInfo(_san._REGION_ARGUMENT, name, v, ptr + lo, hi - lo))
            raw.append((ptr + lo, ptr + hi, _san._REGION_ARGUMENT, i, flags.ctypes.data if flags is not None else None,
                        ptr + lo - _allocation_offset(v, lo)))
        for k, (address, size, display) in enumerate(binding.shared_variables()):
            named.append(_san.RegionInfo(_san._REGION_SHARED, f"__shared__ {display}", None, address, size))
            raw.append((address, address + size, _san._REGION_SHARED, k, None, 0))
        named.append(_san.RegionInfo(_san._REGION_DYNAMIC_SHARED, f"the {shared_mem} bytes of dynamic shared "
                                     f"memory the launch asked for", None, binding.dyn, shared_mem))
        raw.append((binding.dyn, binding.dyn + shared_mem, _san._REGION_DYNAMIC_SHARED, -1, None, 0))
        array = (_Region * len(raw))(*[_Region(*r) for r in raw])
        return named, array

    def _raise(self, rt, rc, values, regions, owners, binding, named, block, schedule_text):
        message = rt.emu_last_error().decode(errors="replace")
        if rc == _ERR_INTERRUPTED:
            raise KeyboardInterrupt(message)
        if rc == _ERR_SANITIZER:
            finding = _Finding()
            rt.emu_last_finding(ctypes.byref(finding))
            raise _san.make_error(self.name, finding, named or [], lambda pcs: binding.symbols().lines(pcs),
                                  schedule_text, block)
        fault = _FaultInfo()
        rt.emu_last_fault(ctypes.byref(fault))
        if rc == _ERR_GUARD:
            index = owners[fault.guard_array]
            raise OutOfBoundsError(self._describe_guard(index, values[index], fault.guard_offset))
        if rc == _ERR_SIGNAL:
            culprit = _classify_fault(fault, regions) if regions else None
            if culprit:
                raise OutOfBoundsError(f"{culprit} in kernel '{self.name}', block {tuple(fault.block)} "
                                       f"thread {tuple(fault.thread)}")
            if not self.module.debug and not fault.in_stack_guard:
                message += (" (run with KERNELS_EMU_SANITIZE=memcheck to find the access and its line, or "
                            "KERNELS_EMU_DEBUG=1 to check every access against the array bounds)")
        if schedule_text:
            message += f" [KERNELS_EMU_SCHEDULE={schedule_text}]"
        if rc in _SYNC_ERRORS and binding.params.sanitize & _san.CHECKS["synccheck"]:
            # with synccheck on, every synchronisation finding is a SynccheckError
            raise SynccheckError(f"synccheck: {message}", kernel=self.name, kind=_SYNC_ERRORS[rc])
        raise _ERROR_CLASSES.get(rc, EmulatorError)(message)

    def _describe_guard(self, index, a, offset):
        """The message for guard bytes found changed around array `a` (argument `index`):
        offset >= 0 counts from the array's end, offset < 0 from its begin."""
        p = self.signature.params[index]
        what = f"argument {index} '{p.name or p.decl}'"
        if isinstance(a, np.ndarray):
            what += f" ({a.dtype}[{', '.join(map(str, a.shape))}])"
        if offset >= 0:
            where = f"byte {offset} past the end"
            if isinstance(a, np.ndarray):
                where += f" (inside element {a.size + offset // a.itemsize} of {a.size})"
        else:
            where = f"byte {-offset} before the start"
        return (f"kernel '{self.name}' wrote outside {what}: {where} changed during the launch; "
                f"run with KERNELS_EMU_SANITIZE=memcheck to find the thread and the line")

    # -- debug launch: every array between guard pages; end-aligned (overruns), then, unless
    #    KERNELS_EMU_DEBUG=gdb, once more start-aligned (underruns)
    def _launch_checked(self, binding, config, grid, block, values, shared_mem):
        rt = _load_runtime()
        arrays = {}
        for v in values:
            if isinstance(v, np.ndarray):
                arrays.setdefault(id(v), v)
        _check_overlaps(self.name, list(arrays.values()), self.signature, values)
        placements = ("end",) if self.module.debug_mode == "gdb" else ("end", "start")
        runs = []
        try:
            for placement in placements:
                regions = {}
                runs.append(regions)
                for i, v in enumerate(values):
                    if isinstance(v, np.ndarray) and id(v) not in regions:
                        regions[id(v)] = _GuardedCopy(rt, v, placement, i, self.signature.params[i])
                pointers = [regions[id(v)].data_ptr if isinstance(v, np.ndarray) else _ptr(v) for v in values]
                guarded = [regions[id(v)] for v in values if isinstance(v, np.ndarray)]
                if placement == "end":
                    # The run whose results count: the first bad access past an end faults as it
                    # happens, so the report names it (and gdb stops there).
                    self._launch(binding, config, grid, block, values, shared_mem, pointers, guarded)
                else:
                    # This run only proves that nothing reads or writes before the start of an
                    # array: on copies of the original inputs, its results and printf discarded.
                    with _quiet_stdout():
                        self._launch(binding, config, grid, block, values, shared_mem, pointers, guarded,
                                     record=False)
                for r in regions.values():
                    r.check_canary(self.name)
            counted = runs[0]
            for i, v in enumerate(values):
                r = counted.get(id(v)) if isinstance(v, np.ndarray) else None
                if r is not None and not self.signature.params[i].const and not r.copied_back:
                    r.copy_back()
        finally:
            for regions in runs:
                for r in regions.values():
                    r.free()


def _dim3(what, value, limits, name):
    if isinstance(value, (int, np.integer)):
        value = (int(value),)
    try:
        dims = tuple(int(v) for v in value)
    except TypeError:
        raise LaunchConfigError(f"kernel '{name}': {what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    if not 1 <= len(dims) <= 3:
        raise LaunchConfigError(f"kernel '{name}': {what} must have 1 to 3 dimensions, got {value!r}")
    dims = dims + (1,) * (3 - len(dims))
    for d, lim, axis in zip(dims, limits, "xyz"):
        if d < 1 or d > lim:
            raise LaunchConfigError(f"kernel '{name}': {what}.{axis} = {d} is outside [1, {lim}] (as on a GPU)")
    return dims


def _ptr(v):
    """The data pointer of array v (0 for None, None for a scalar)."""
    if v is None:
        return 0
    if isinstance(v, np.ndarray):
        try:   # five times faster than __array_interface__, for writable C-contiguous arrays
            return _addressof(_c_char.from_buffer(v))
        except (TypeError, ValueError, BufferError):
            return v.__array_interface__["data"][0]
    return None


_addressof, _c_char = ctypes.addressof, ctypes.c_char


def _allocation_offset(a, lo=0):
    """Bytes from the start of the allocation `a` is a view of (its outermost NumPy base) to
    a's lowest byte (a's data pointer + lo); 0 for an array that owns its memory.  On a GPU an
    allocation starts 256-byte aligned: the profiler counts sectors from there."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root is a:
        return 0
    root_lo = _extent(root)[0]
    offset = (_ptr(a) + lo) - (_ptr(root) + root_lo)
    return offset if offset >= 0 else 0


def _extent(a):
    """(lowest byte offset, highest byte offset + 1) touched by array a relative to its data pointer."""
    if a.size == 0:
        return 0, 0
    lo = hi = 0
    for n, s in zip(a.shape, a.strides):
        if s >= 0:
            hi += (n - 1) * s
        else:
            lo += (n - 1) * s
    return lo, hi + a.itemsize


def _check_overlaps(name, arrays, signature, values):
    spans = []
    for a in arrays:
        lo, hi = _extent(a)
        base = _ptr(a)
        spans.append((base + lo, base + hi, a))
    spans.sort(key=lambda s: s[0])
    for (a0, a1, x), (b0, b1, y) in zip(spans, spans[1:]):
        if b0 < a1:
            raise EmulatorError(f"kernel '{name}': KERNELS_EMU_DEBUG cannot check two arguments that are "
                                f"different views of overlapping memory; pass the same array object or "
                                f"separate arrays")


class _GuardedCopy:
    """A copy of one argument array with inaccessible pages on both sides."""

    def __init__(self, rt, array, placement, index, param):
        self.rt = rt
        self.array = array
        self.index = index
        self.name = param.name or param.decl
        self.copied_back = False
        lo, hi = _extent(array)
        self.lo = lo
        self.nbytes = hi - lo
        self.pages = max(_PAGE, -(-(self.nbytes + 16) // _PAGE) * _PAGE)
        base = rt.emu_map_guarded(self.pages, _GUARD_BYTES)
        if not base:
            raise EmulatorError("could not map guarded memory for a debug launch")
        self.base = base
        if placement == "start":
            start = base
        else:
            # end-aligned, the start kept 16-byte aligned (vector loads): at most 15 bytes of slack
            start = (base + self.pages - self.nbytes) & ~15
        self.start = start
        self.data_ptr = start - lo
        buf = (ctypes.c_ubyte * self.pages).from_address(base)
        self.view = np.frombuffer(buf, dtype=np.uint8)
        self.view[:] = 0xA5
        self._mirror()[...] = array
        self.slack = (start + self.nbytes, base + self.pages)

    def _mirror(self):
        a = self.array
        buf = (ctypes.c_ubyte * self.pages).from_address(self.base)
        offset = self.data_ptr - self.base
        return np.ndarray(a.shape, dtype=a.dtype, buffer=buf, offset=offset, strides=a.strides)

    def describe(self):
        return f"argument {self.index} '{self.name}' ({self.array.dtype}[{', '.join(map(str, self.array.shape))}])"

    def check_canary(self, kernel):
        """The bytes between the guard pages and the array (0xA5 before the launch) unchanged?"""
        s0, s1 = self.slack
        tail = self.view[s0 - self.base:s1 - self.base]
        if tail.size and np.any(tail != 0xA5):
            first = int(np.argmax(tail != 0xA5))
            raise OutOfBoundsError(f"kernel '{kernel}' wrote {first + 1}+ byte(s) past the end of {self.describe()}")
        head = self.view[:self.start - self.base]
        if head.size and np.any(head != 0xA5):
            first = int(np.argmax(head[::-1] != 0xA5))
            raise OutOfBoundsError(f"kernel '{kernel}' wrote {first + 1}+ byte(s) before the start of "
                                   f"{self.describe()}")

    def copy_back(self):
        self.array[...] = self._mirror()
        self.copied_back = True

    def free(self):
        self.view = None
        self.rt.emu_unmap_guarded(self.base, self.pages, _GUARD_BYTES)

    def classify(self, address):
        lo_guard = self.base - _GUARD_BYTES
        hi_end = self.base + self.pages + _GUARD_BYTES
        if lo_guard <= address < self.base:
            before = self.start - address
            return f"access {before} byte(s) before the start of {self.describe()}"
        if self.base + self.pages <= address < hi_end:
            past = address - (self.start + self.nbytes)
            elem = (address - self.data_ptr) // self.array.itemsize
            return (f"access {past} byte(s) past the end of {self.describe()} "
                    f"(element {elem} of {self.array.size})")
        return None


def _classify_fault(fault, regions):
    for r in regions:
        what = r.classify(fault.address)
        if what:
            rw = {1: "write", 0: "read"}.get(fault.is_write)
            return what.replace("access", rw, 1) if rw else what
    return None


class _quiet_stdout:
    """Silence file descriptor 1 (kernel printf) for the duration of a block."""

    def __enter__(self):
        sys.stdout.flush()
        self.saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 1)
        os.close(self.saved)
        return False
