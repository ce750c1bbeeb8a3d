"""Benchmark cases for `python -m bench.kernels`, one module per group of kernels.

Each module defines `cases(xp, size)` returning a list of `Case`:
  xp    numpy (the CPU emulator: only `size="tiny"` is sensible) or cupy (the GPU);
  size  "tiny" (a few thousand elements, seconds on the emulator, for CI), "resnet50"
        (the ResNet-50 v1.5 shapes at batch 256, on a GPU) or "profile" (ResNet-50's layers
        scaled down until the emulator profiles each in a second or two; the name says how:
        `python -m bench.kernels --profile`).
A Case times `run()` (our kernel) and, when given, `baseline()` (cuDNN / cuBLAS / a CuPy
built-in doing the same work), and reports bytes/s against the measured copy bandwidth and
FLOP/s against the measured matmul peak.

The inputs, the calls of each kernel version (numbered as in the kernel files' headers) and the
bytes and FLOPs of each op come from kernels/cases.py, which `python -m kernels.<op>` uses too;
`lesson_case` turns one of its ops into a Case.  This folder adds the shapes (ResNet-50's at
batch 256) and the baselines.

Every Case has a `key`: its op and version (and, where the launches depend on it, the shape's
inner dimension: batch norm's channels).  `python -m bench.kernels --profile` predicts each
ResNet-50 case from the "profile" case of the same key, its twin (`twin_of`): the same kernels
at a shape the emulator counts in a second.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional

__all__ = ["Case", "MODULES", "lesson_case", "twin_of"]

# bench.kernels imports these in order; add a module here when you add a file.
MODULES = ["elementwise", "reduce", "gemm_conv", "norm_pool_loss_optim", "step_fp16"]


@dataclass
class Case:
    name: str                      # "conv2d_forward 3x3 s1 [256,56,56,64]->64"
    run: Callable[[], object]      # launches our kernel once (inputs prepared in advance)
    bytes: int = 0                 # fewest bytes the op must move (inputs read once + outputs written once)
    flops: int = 0                 # floating-point operations (2 per multiply-add)
    baseline: Optional[Callable[[], object]] = None
    baseline_name: str = ""        # "cuDNN", "cuBLAS", "cupy.maximum", ...
    group: str = ""                # filled in by bench.kernels from the module name
    notes: dict = field(default_factory=dict)   # "tensor_cores": True for float16 matrix math;
                                                # "not_timed": why a GPU run skips it (predicted only);
                                                # "tiled": a matrix product's tiles, whose counts
                                                # grow with the FLOPs (bench.kernels --profile)
    key: tuple = ()                # (op, version, extras...): what twin_of matches


def lesson_case(case, op, version, name, baseline=None, baseline_name="", key=()):
    """A Case timing `op` of a kernels.cases case at `version` (None: the version in use), with its
    bytes and FLOPs; the arrays it updates in place are prepared once.  key: extras of its key."""
    state = case.prepare(op)
    nbytes, flops = case.work(op)
    return Case(name=name, run=lambda: case.run(op, version, state), bytes=nbytes, flops=flops, baseline=baseline,
                baseline_name=baseline_name, key=(op, version) + tuple(key))


def twin_of(case, profiled):
    """The case of `profiled` (a list of Cases at the profile size) whose key is `case`'s; else
    the first of the same op and version (a convolution of another stride); else None."""
    for c in profiled:
        if c.key == case.key:
            return c
    for c in profiled:
        if c.key[:2] == case.key[:2]:
            return c
    return None
