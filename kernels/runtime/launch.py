"""Helpers shared by the launchers (kernels/<op>.py): which backend the arrays live on, argument
validation with clear messages, and launch-grid arithmetic.

A launcher validates everything before launching: a wrong dtype, shape or a non-contiguous
array is a TypeError/ValueError naming the argument, never a wrong answer or a crash.
"""

import numpy as np

from ..emu import sanitizer as _sanitizer
from .raw import load_module

__all__ = ["array_module", "is_cupy", "check_array", "check_shape_tuple", "blocks_for", "module", "replace_source",
           "empty_like", "empty", "FLOAT_DTYPES"]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

# The emulator runs blocks one after another; a grid-stride loop over fewer, fuller blocks
# computes the same result with fewer fibers, so launches on NumPy arrays cap the grid lower.
_MAX_BLOCKS = {"cupy": 65535, "numpy": 64}


def is_cupy(a):
    return type(a).__module__.split(".")[0] == "cupy"


def array_module(*arrays):
    """numpy or cupy, whichever holds `arrays` (None entries ignored); mixing them is an error."""
    kinds = {("cupy" if is_cupy(a) else "numpy") for a in arrays if a is not None}
    if len(kinds) > 1:
        raise TypeError("arguments mix NumPy and CuPy arrays; move them to one device first")
    if kinds == {"cupy"}:
        import cupy
        return cupy
    return np


def check_array(op, name, a, dtype=None, ndim=None, shape=None, contiguous=True):
    """Raise a clear TypeError/ValueError unless `a` is an array as described.

    dtype may be a dtype or a tuple of allowed dtypes; shape may contain None for "any".
    """
    if not hasattr(a, "dtype") or not hasattr(a, "shape") or isinstance(a, np.generic):
        raise TypeError(f"{op}: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if dtype is not None:
        allowed = tuple(np.dtype(d) for d in (dtype if isinstance(dtype, (tuple, list)) else (dtype,)))
        if a.dtype not in allowed:
            names = " or ".join(d.name for d in allowed)
            raise TypeError(f"{op}: {name} must be {names}, got {a.dtype}")
    if ndim is not None:
        allowed_ndim = ndim if isinstance(ndim, (tuple, list)) else (ndim,)
        if a.ndim not in allowed_ndim:
            raise ValueError(f"{op}: {name} must have {' or '.join(map(str, allowed_ndim))} dimensions, "
                             f"got shape {tuple(a.shape)}")
    if shape is not None:
        if len(shape) != a.ndim or any(s is not None and s != t for s, t in zip(shape, a.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(a.shape)}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous (got strides {a.strides}); "
                         f"pass xp.ascontiguousarray({name})")
    return a


def check_shape_tuple(op, name, shape, layout):
    """`shape` as a tuple of 4 positive ints (e.g. an x_shape argument), or a clear error.
    layout names the axes in the message, e.g. "(N, H, W, C)"."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a tuple of 4 ints {layout}, got {shape!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"{op}: {name} must be 4 positive ints {layout}, got {shape}")
    return shape


def blocks_for(n, block, xp, per_thread=1):
    """Blocks for n elements at `per_thread` elements per thread, capped for grid-stride loops."""
    need = max(1, -(-int(n) // (block * per_thread)))
    return min(need, _MAX_BLOCKS["cupy" if xp is not np else "numpy"])


_modules = {}   # (filename, options) -> RawModule: a launch looks its module up without touching the disk
_sources = {}   # filename -> path of a learner's copy launched instead (kernels.versions.use)


def module(filename, options=()):
    """The RawModule of kernels/<filename> (compiled once per process and backend), or of the
    learner's copy that replaces it (`replace_source`).

    Unlike `load_module`, which checks the file's modification time at every call, this is one
    dictionary look-up: launchers call it at every launch, and kernel sources do not change under
    a running training.
    """
    try:
        return _modules[filename, options]
    except (KeyError, TypeError):   # not loaded yet, or options given as a list
        options = tuple(options)
        mod = _modules.get((filename, options))
        if mod is None:
            mod = _modules[filename, options] = load_module(str(_sources.get(filename, filename)), options)
        return mod


def replace_source(filename, path):
    """Launch the kernels of kernels/<filename> from the .cu file at `path` from now on (None: from
    the project's file again).  kernels.versions checks that the copy defines the same kernels."""
    if path is None:
        _sources.pop(filename, None)
    else:
        _sources[filename] = path
    for key in [k for k in _modules if k[0] == filename]:
        del _modules[key]


def empty(xp, shape, dtype):
    """A launcher's output or workspace: xp.empty(shape, dtype).  On the emulator with initcheck on
    (KERNELS_EMU_SANITIZE, kernels.sanitize) the array starts "uninitialised", as cupy.empty()
    memory is on a GPU: a kernel that reads bytes of it no launch has written is reported, however
    NumPy happened to fill the fresh pages."""
    return _fresh(xp.empty(shape, dtype=dtype))


def empty_like(a):
    """empty() of a's shape and dtype."""
    return _fresh(array_module(a).empty_like(a))


def _fresh(a):
    if isinstance(a, np.ndarray) and _sanitizer.initchecking():
        _sanitizer.mark_uninitialized(a)
    return a
