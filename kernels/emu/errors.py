"""Exceptions of kernels/: compiling CUDA C source, and running it on the CPU emulator.

`CompileError` is raised for a failed build of a kernel source, whichever compiler ran: NVRTC
(the GPU compiler, see kernels/runtime/nvrtc.py, which raises its subclass `NVRTCError`) or the system
C++ compiler used by the CPU emulator. It carries the compiler's full message (`log`) and shows it
trimmed of the emulator's own machinery (`trim_log`), so a learner sees what the compiler said
about the kernel, with its file name, line and column.

`EmulatorError` and its subclasses are what a kernel launch on the CPU emulator raises when the
kernel breaks a rule of the GPU (kernels/emu/emulator.py); `SanitizerError` and its four subclasses,
one per tool of NVIDIA's compute-sanitizer, are the findings of KERNELS_EMU_SANITIZE.
"""

import re
from pathlib import Path

__all__ = ["CompileError", "first_error_line", "trim_log", "EmulatorError", "EmulatorCacheError", "LaunchConfigError",
           "BarrierDivergenceError", "DeadlockError", "WarpCollectiveError", "KernelAssertionError", "KernelFault",
           "OutOfBoundsError", "SanitizerError", "MemcheckError", "RacecheckError", "InitcheckError", "SynccheckError"]

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


# The emulator's own sources in a g++/clang log: its headers (cuda_emu.h maps CUDA C onto C++;
# cuda_fp16.h, mma.h, ... stand in for CUDA's) and the entry points it appends to each unit.
_EMU_INCLUDE = Path(__file__).resolve().parent / "include"
_EMU_SHOWN = "kernels/emu/include"
_DIAGNOSTIC = re.compile(r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):(?:\d+:)? (?P<kind>fatal error|error|warning|note):")
_CONTEXT = re.compile(r"^(?P<file>[^\s:][^:]*): (?:In |At |In instantiation)")
_EXCERPT = re.compile(r"^\s*(?:\d+\s*)?\|")          # "  212 |   code" and "      |   ^~~"
_INCLUDE_CHAIN = re.compile(r"^(?:In file included from |\s+from ).*[:,]$")
MAX_ERRORS = 10


def _emulator_file(file):
    return (file.startswith(("<emulator", str(_EMU_INCLUDE) + "/", _EMU_SHOWN + "/"))
            or "/kernels/emu/include/" in file)


def trim_log(log, max_errors=MAX_ERRORS):
    """A g++/clang log as a learner needs it: every error and warning with its file:line:col,
    the compiler's text and the source excerpt, without the emulator's machinery around them.

    Dropped: include chains ("In file included from <command-line>", the force-included
    cuda_emu.h, and their "from ..." lines); errors located only in the emulator's own files
    (its headers, its "<emulator entry points>") when the learner's file has errors too (they
    follow from those); the notes that walk through the emulator's macros ("in definition of
    macro" / "in expansion of macro" inside its headers) and the emulator's source excerpts.
    Errors after the first `max_errors` are counted, not shown (the first is usually the cause).
    The emulator's headers are named kernels/emu/include/<name>. A log in another format (NVRTC's
    `file.cu(12): error: ...`) comes back as it is, stripped.
    """
    lines = (log or "").strip("\n").splitlines()
    if not any(_DIAGNOSTIC.match(line) for line in lines):
        return (log or "").strip()
    # groups: an error or warning with the notes, context and excerpt lines that follow it
    groups, current = [], []
    for line in lines:
        if _INCLUDE_CHAIN.match(line):
            continue
        m = _DIAGNOSTIC.match(line) or _CONTEXT.match(line)
        starts = m is not None and (m.re is _CONTEXT or m.group("kind") != "note")
        if starts and current and not (current[-1][1] and current[-1][1].re is _CONTEXT):
            groups.append(current)
            current = []
        current.append((line, m))
    if current:
        groups.append(current)

    def learners(group):
        return any(m is not None and m.re is _DIAGNOSTIC and not _emulator_file(m.group("file")) for _, m in group)

    if any(learners(g) for g in groups):
        groups = [g for g in groups if learners(g)]
    out, errors, hidden, skipping = [], 0, 0, False
    for group in groups:
        if any(m is not None and m.re is _DIAGNOSTIC and m.group("kind") in ("error", "fatal error") for _, m in group):
            errors += 1
            if errors > max_errors:
                hidden += 1
                continue
        for line, m in group:
            if m is not None:
                file = m.group("file")
                skipping = _emulator_file(file)
                text = line[m.end():]
                if skipping and m.re is _DIAGNOSTIC and text.lstrip().startswith(("in definition of macro",
                                                                                  "in expansion of macro")):
                    continue
                if skipping and m.re is _CONTEXT:
                    continue
                out.append(line.replace(str(_EMU_INCLUDE), _EMU_SHOWN))
            elif _EXCERPT.match(line):
                if not skipping:
                    out.append(line)
            elif line.strip():
                skipping = False
                out.append(line)
    if hidden:
        out.append(f"(and {hidden} more error{'s' if hidden > 1 else ''}, not shown: the first is usually the cause)")
    return "\n".join(out)


class CompileError(RuntimeError):
    """A CUDA C source failed to compile.

    Attributes:
        log:      str, the compiler's complete output (errors and warnings, with file and line).
        filename: str or None, the name the source was compiled under (shown in the log).
        line:     int or None, the line of the first error in `filename`, parsed from `log`.

    `str(err)` is the one-line summary followed by the compiler's message (trim_log: the errors
    with file:line:col, the compiler's text and the source lines, without the emulator's own
    headers and wrappers), so an uncaught error prints what the compiler said about the kernel;
    `log` keeps every line.
    """

    def __init__(self, message, log="", filename=None, line=None):
        self.message = message
        self.log = log or ""
        self.filename = filename
        self.line = line if line is not None else first_error_line(self.log, filename)
        super().__init__(message)

    def __str__(self):
        log = trim_log(self.log)
        return f"{self.message}\n{log}" if log else self.message

    def __reduce__(self):
        # keep the attributes across pickling (pytest-xdist, multiprocessing)
        return (type(self), (self.message, self.log, self.filename, self.line))


# ---------------------------------------------------------------------------------- the emulator
class EmulatorError(RuntimeError):
    """A kernel launch on the CPU emulator failed; the message names the kernel."""


class EmulatorCacheError(EmulatorError):
    """The emulator's cache folder cannot be created or written (a file in the way, a read-only
    folder or home); the one-line message names the folder and KERNELS_EMU_CACHE, the variable to set."""


class LaunchConfigError(EmulatorError, ValueError):
    """Grid, block or shared-memory size that a GPU would refuse."""


class BarrierDivergenceError(EmulatorError):
    """Threads of one block wait at different __syncthreads() calls."""


class DeadlockError(EmulatorError):
    """No thread can make progress (a warp collective waits for a lane that returned, ...)."""


class WarpCollectiveError(EmulatorError):
    """Lanes of a warp disagree on a shuffle/vote, or a shuffle reads outside its mask."""


class KernelAssertionError(EmulatorError, AssertionError):
    """assert() failed in kernel code."""


class KernelFault(EmulatorError):
    """The kernel crashed (invalid memory access, a null pointer included, integer division by zero,
    stack overflow) or stopped itself (__trap(), or exit() or abort(), which device code does not have)."""


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
