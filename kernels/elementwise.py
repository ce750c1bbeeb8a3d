"""Launchers of kernels/elementwise.cu (ReLU, add, fused add+ReLU, scale, axpy, fill, casts).

Every launcher takes NumPy arrays (-> the CPU emulator) or CuPy arrays (-> the GPU), checks
dtypes and shapes, and returns a new array on the same device (axpy and fill work in place).
float32 and float16 are supported where the network needs both.

Versions (the header of elementwise.cu; `python -m kernels.elementwise` checks and times them):
1, one element per loop iteration; 2, 16-byte vectors (8 halves or 4 floats per load and store)
for ReLU forward/backward, add, add + ReLU, and 4 values a thread for the float32 <-> float16
casts (a float4 and 8 bytes of halves), where every array
starts on a 16-byte boundary (otherwise version 1 runs).  The launchers run the version in use
(kernels.versions: `with versions.use(elementwise=1): ...`); the two give the same numbers.
"""

import numpy as np

from . import versions
from .runtime.launch import FLOAT_DTYPES, array_module, blocks_for, check_array, empty, empty_like, module

__all__ = ["relu_forward", "relu_backward", "add", "add_relu_forward", "scale", "axpy", "fill", "cast",
           "cast_from_bf16"]

_BLOCK = 256
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


def _run(name, n, args, xp):
    kernel = module("elementwise.cu").get_function(name)
    kernel((blocks_for(n, _BLOCK, xp),), (_BLOCK,), tuple(args) + (np.int64(n),))


def _data_ptr(a):
    return int(a.data.ptr) if type(a).__module__.split(".")[0] == "cupy" else int(a.__array_interface__["data"][0])


def _run_versioned(name, vec_name, n, arrays, xp, per_vector):
    """Launch `name` (version 1) or `vec_name`, its 16-byte-vector form (version 2 in use, and
    every array starting on a 16-byte boundary).  per_vector: elements per vector (one thread each)."""
    if versions.version("elementwise") >= 2 and all(_data_ptr(a) % 16 == 0 for a in arrays):
        kernel = module("elementwise.cu").get_function(vec_name)
        kernel((blocks_for(max(1, n // per_vector), _BLOCK, xp),), (_BLOCK,), tuple(arrays) + (np.int64(n),))
    else:
        _run(name, n, arrays, xp)


def _per_vector(dtype):
    return 16 // np.dtype(dtype).itemsize


def _same(op, names, arrays):
    first = arrays[0]
    for nm, a in zip(names, arrays):
        check_array(op, nm, a, dtype=FLOAT_DTYPES)
        if a.shape != first.shape or a.dtype != first.dtype:
            raise ValueError(f"{op}: {names[0]} and {nm} must have the same shape and dtype, got "
                             f"{first.dtype}{tuple(first.shape)} and {a.dtype}{tuple(a.shape)}")


def relu_forward(x):
    """y = max(x, 0).  x: float32/float16 array of any shape (C-contiguous)."""
    _same("relu_forward", ["x"], [x])
    xp = array_module(x)
    y = empty_like(x)
    if x.size:
        sfx = _SUFFIX[x.dtype]
        _run_versioned(f"relu_forward_{sfx}", f"relu_forward_vec_{sfx}", x.size, (x, y), xp,
                       _per_vector(x.dtype))
    return y


def relu_backward(dy, y):
    """dx = dy where y > 0, else 0.  y is ReLU's output (what the forward pass keeps)."""
    _same("relu_backward", ["dy", "y"], [dy, y])
    xp = array_module(dy, y)
    dx = empty_like(dy)
    if dy.size:
        sfx = _SUFFIX[dy.dtype]
        _run_versioned(f"relu_backward_{sfx}", f"relu_backward_vec_{sfx}", dy.size, (dy, y, dx), xp,
                       _per_vector(dy.dtype))
    return dx


def add(a, b):
    """c = a + b, same shape and dtype (the residual connection)."""
    _same("add", ["a", "b"], [a, b])
    xp = array_module(a, b)
    c = empty_like(a)
    if a.size:
        sfx = _SUFFIX[a.dtype]
        _run_versioned(f"add_{sfx}", f"add_vec_{sfx}", a.size, (a, b, c), xp, _per_vector(a.dtype))
    return c


def add_relu_forward(a, b):
    """y = max(a + b, 0) in one pass (fused)."""
    _same("add_relu_forward", ["a", "b"], [a, b])
    xp = array_module(a, b)
    y = empty_like(a)
    if a.size:
        sfx = _SUFFIX[a.dtype]
        _run_versioned(f"add_relu_forward_{sfx}", f"add_relu_forward_vec_{sfx}", a.size, (a, b, y),
                       xp, _per_vector(a.dtype))
    return y


def scale(x, alpha):
    """y = alpha * x (float32)."""
    check_array("scale", "x", x, dtype=np.float32)
    xp = array_module(x)
    y = empty_like(x)
    if x.size:
        _run("scale_f32", x.size, (x, y, np.float32(alpha)), xp)
    return y


def axpy(alpha, x, y):
    """y += alpha * x, in place on y (float32, same shape); returns y."""
    check_array("axpy", "x", x, dtype=np.float32)
    check_array("axpy", "y", y, dtype=np.float32, shape=x.shape)
    xp = array_module(x, y)
    if x.size:
        _run("axpy_f32", x.size, (x, y, np.float32(alpha)), xp)
    return y


def fill(y, value):
    """y[...] = value, in place (float32); returns y."""
    check_array("fill", "y", y, dtype=np.float32)
    xp = array_module(y)
    if y.size:
        _run("fill_f32", y.size, (y, np.float32(value)), xp)
    return y


_CASTS = {("float32", "float16"): "cast_f32_to_f16", ("float16", "float32"): "cast_f16_to_f32",
          ("float32", "bfloat16"): "cast_f32_to_bf16", ("bfloat16", "float32"): "cast_bf16_to_f32"}


def cast(x, dtype):
    """x converted to dtype with round-to-nearest-even: float32 <-> float16, float32 -> 'bfloat16'.

    NumPy has no bfloat16, so cast(x, 'bfloat16') returns a uint16 array holding the bfloat16
    bit patterns; `cast_from_bf16(bits)` converts such an array back to float32.
    """
    target = "bfloat16" if str(dtype) == "bfloat16" else np.dtype(dtype).name
    source = x.dtype.name
    check_array("cast", "x", x)
    if source == target:
        return x.copy()
    key = (source, target)
    if key not in _CASTS:
        raise TypeError(f"cast: unsupported conversion {source} -> {target} "
                        f"(supported: {', '.join(f'{a}->{b}' for a, b in _CASTS)})")
    xp = array_module(x)
    out_dtype = np.uint16 if target == "bfloat16" else target
    y = empty(xp, x.shape, dtype=out_dtype)
    if x.size and "bfloat16" not in key:
        _run_versioned(_CASTS[key], _CASTS[key] + "_vec", x.size, (x, y), xp, 4)
    elif x.size:
        _run(_CASTS[key], x.size, (x, y), xp)
    return y


def cast_from_bf16(bits):
    """float32 array from bfloat16 bit patterns (a uint16 array)."""
    check_array("cast_from_bf16", "bits", bits, dtype=np.uint16)
    xp = array_module(bits)
    y = empty(xp, bits.shape, dtype=np.float32)
    if bits.size:
        _run("cast_bf16_to_f32", bits.size, (bits, y), xp)
    return y


if __name__ == "__main__":   # `python -m kernels.elementwise ARGS` is `python -m kernels elementwise ARGS` (the lesson)
    import runpy
    import sys
    sys.argv[1:1] = ["elementwise"]
    runpy.run_module("kernels", run_name="__main__")
