"""Exceptions of kernels/: compiling CUDA C source, and running it on the CPU emulator.

`CompileError` is raised for a failed build of a kernel source, whichever compiler ran: NVRTC
(the GPU compiler, see kernels/runtime/nvrtc.py, which raises its subclass `NVRTCError`) or the system
C++ compiler used by the CPU emulator. It carries the compiler's full message, so a learner sees
exactly what the compiler said, with the kernel's file name and line number.

`EmulatorError` and its subclasses are what a kernel launch on the CPU emulator raises when the
kernel breaks a rule of the GPU (kernels/emu/emulator.py); `SanitizerError` and its four subclasses,
one per tool of NVIDIA's compute-sanitizer, are the findings of KERNELS_EMU_SANITIZE.
"""

import re

__all__ = ["CompileError", "first_error_line", "EmulatorError", "LaunchConfigError", "BarrierDivergenceError",
           "DeadlockError", "WarpCollectiveError", "KernelAssertionError", "KernelFault", "OutOfBoundsError",
           "SanitizerError", "MemcheckError", "RacecheckError", "InitcheckError", "SynccheckError"]

# "kernel.cu(12): error: ..."          NVRTC / nvcc front end (EDG)
# "kernel.cu:12:5: error: ..."         g++ / clang
_NVRTC_LOCATION = re.compile(r"^(?P<file>[^\n()]+)\((?P<line>\d+)\): (?:catastrophic )?error", re.M)
_GCC_LOCATION = re.compile(r"^(?P<file>[^\n:]+):(?P<line>\d+):(?:\d+:)? (?:fatal )?error", re.M)


def first_error_line(log, filename=None):
    """Line number (int, 1-based) of the first error a compiler reports in `log`, or None.

    Understands the NVRTC format `file.cu(12): error: ...` and the g++/clang format
    `file.cu:12:5: error: ...`. With `filename`, only errors located in that file count
    (an error inside an included header is then skipped in favour of the kernel's own line).
    """
    hits = []
    for pattern in (_NVRTC_LOCATION, _GCC_LOCATION):
        for m in pattern.finditer(log or ""):
            hits.append((m.start(), m.group("file").strip(), int(m.group("line"))))
    hits.sort()
    for _, file, line in hits:
        if filename is None or file == filename or file.endswith("/" + filename.lstrip("./")):
            return line
    return None


class CompileError(RuntimeError):
    """A CUDA C source failed to compile.

    Attributes:
        log:      str, the compiler's complete output (errors and warnings, with file and line).
        filename: str or None, the name the source was compiled under (shown in the log).
        line:     int or None, the line of the first error in `filename`, parsed from `log`.

    `str(err)` is the one-line summary followed by the compiler's log, so an uncaught error
    prints the compiler's message as the compiler wrote it.
    """

    def __init__(self, message, log="", filename=None, line=None):
        self.message = message
        self.log = log or ""
        self.filename = filename
        self.line = line if line is not None else first_error_line(self.log, filename)
        super().__init__(message)

    def __str__(self):
        log = self.log.strip()
        return f"{self.message}\n{log}" if log else self.message

    def __reduce__(self):
        # keep the attributes across pickling (pytest-xdist, multiprocessing)
        return (type(self), (self.message, self.log, self.filename, self.line))


# ---------------------------------------------------------------------------------- the emulator
class EmulatorError(RuntimeError):
    """A kernel launch on the CPU emulator failed; the message names the kernel."""


class LaunchConfigError(EmulatorError, ValueError):
    """Grid, block or shared-memory size that a GPU would refuse."""


class BarrierDivergenceError(EmulatorError):
    """Threads of one block wait at different __syncthreads() calls."""


class DeadlockError(EmulatorError):
    """No thread can make progress (a warp collective waits for a lane that returned, ...)."""


class WarpCollectiveError(EmulatorError):
    """Lanes of a warp disagree on a shuffle/vote, or a shuffle reads outside its mask."""


class KernelAssertionError(EmulatorError, AssertionError):
    """assert() failed or __trap() was called in kernel code."""


class KernelFault(EmulatorError):
    """The kernel crashed (invalid memory access, integer division by zero, stack overflow)."""


class OutOfBoundsError(KernelFault, IndexError):
    """The kernel accessed memory outside an argument array: found by the guard bytes (a write
    just past either end, after the launch) or, in debug mode, at the access itself."""


# ---------------------------------------------------------------------------------- the sanitizer
class SanitizerError(EmulatorError):
    """A finding of KERNELS_EMU_SANITIZE: a kernel broke a rule that a GPU may not forgive.

    Attributes (None where they do not apply):
        kernel:   str, the kernel's name.
        check:    'memcheck', 'racecheck', 'initcheck' or 'synccheck'.
        kind:     what was found, e.g. 'out-of-bounds', 'misaligned', 'read-after-write',
                  'write-after-read', 'write-after-write', 'uninitialized', 'barrier after exit'.
        file, line:             the source line of the access (or barrier, or collective).
        other_file, other_line: a race's other access.
        block, thread:          (x, y, z) of the thread that made the access.
        other_block, other_thread: the thread of the other access.
        target:   the argument array or __shared__ variable, as the message names it.
        offset:   byte offset of the access in `target`.
    """

    check = None

    def __init__(self, message, **details):
        super().__init__(message)
        for key in ("kernel", "kind", "file", "line", "other_file", "other_line", "block", "thread", "other_block",
                    "other_thread", "target", "offset"):
            setattr(self, key, details.get(key))

    def __reduce__(self):
        details = {k: v for k, v in self.__dict__.items()}
        return (_rebuild_sanitizer_error, (type(self), str(self), details))


def _rebuild_sanitizer_error(cls, message, details):
    return cls(message, **details)


class MemcheckError(SanitizerError):
    """memcheck: an access outside every argument array and __shared__ variable, a misaligned
    access (an N-byte access at an address that is not a multiple of N), another thread's
    local memory, or an invalid async copy."""

    check = "memcheck"


class RacecheckError(SanitizerError):
    """racecheck: two threads access the same bytes, at least one writes, not both atomically,
    and nothing orders them (no barrier in a block, no __syncwarp in a warp, no atomic hand-off
    between blocks)."""

    check = "racecheck"


class InitcheckError(SanitizerError):
    """initcheck: a read of shared memory no thread of the block wrote, or of global memory
    nobody wrote that did not come initialised from the host."""

    check = "initcheck"


class SynccheckError(SanitizerError):
    """synccheck: a barrier while threads of the block have exited, or a warp collective whose
    mask names lanes that have exited or do not exist."""

    check = "synccheck"
