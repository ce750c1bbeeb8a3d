"""Exceptions shared by everything in kernels/ that compiles CUDA C source.

One class, `CompileError`, is raised for a failed build of a kernel source, whichever compiler
ran: NVRTC (the GPU compiler, see kernels/nvrtc.py, which raises its subclass `NVRTCError`) or
the system C++ compiler used by the CPU emulator. It carries the compiler's full message, so a
learner sees exactly what the compiler said, with the kernel's file name and line number.
"""

import re

__all__ = ["CompileError", "first_error_line"]

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
