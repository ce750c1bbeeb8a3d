"""Launchers of kernels/gemm.cu: matrix multiply and the fully connected layer.

    c = gemm(a, b)                                   # a @ b, float32, version 3 (register blocking)
    c = gemm(a, b, trans_b=True, version=2)          # a @ b.T with the shared-memory tiles
    gemm(a, b, alpha=2.0, beta=1.0, c=c)             # c = 2 a @ b + c, in place
    c = gemm_f16(a16, b16)                           # float16 inputs, float32 result, tensor cores
    c16 = gemm_f16(a16, b16, out_dtype=np.float16)   # ... rounded to float16 once, at the end
    y = linear_forward(x, w, b)                      # x @ w.T + b (float32, or float16 x and w)
    dx, dw, db = linear_backward(dy, x, w)

NumPy arrays run on the CPU emulator, CuPy arrays on the GPU.  Matrices are row-major and
C-contiguous; transposes are flags, never copies.

Versions (the header of gemm.cu; `python -m kernels.gemm` checks and times them): 1 naive (float32
and float16 inputs), 2 shared-memory tiles, 3 register blocking (the default for float32),
4 tensor cores (float16 inputs: gemm_f16's default).
"""

import numpy as np

from . import versions
from .runtime.launch import array_module, blocks_for, check_array, empty, module

__all__ = ["gemm", "gemm_f16", "linear_forward", "linear_backward", "column_sum", "F32_VERSIONS", "F16_VERSIONS"]

F32_VERSIONS = (1, 2, 3)   # the versions that multiply float32 matrices (gemm)
F16_VERSIONS = (1, 4)      # and float16 ones (gemm_f16)

_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)


def _data_ptr(a):
    if type(a).__module__.split(".")[0] == "cupy":
        return int(a.data.ptr)
    return int(a.__array_interface__["data"][0])


def _vec_ok(a):
    """float4 loads are legal: 16-byte aligned base and rows a multiple of 4 floats."""
    return int(_data_ptr(a) % 16 == 0 and a.shape[1] % 4 == 0)


def _check_gemm_args(op, a, b, trans_a, trans_b, c, beta, dtype, c_dtype=np.float32):
    check_array(op, "a", a, dtype=dtype, ndim=2)
    check_array(op, "b", b, dtype=dtype, ndim=2)
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    Kb, N = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if K != Kb:
        raise ValueError(f"{op}: inner dimensions differ: op(a) is {M}x{K} (a {tuple(a.shape)}, trans_a={trans_a}) "
                         f"but op(b) is {Kb}x{N} (b {tuple(b.shape)}, trans_b={trans_b})")
    if c is not None:
        check_array(op, "c", c, dtype=c_dtype, shape=(M, N))
    elif beta != 0:
        raise ValueError(f"{op}: beta={beta} needs c (the matrix to accumulate into)")
    for name, v in (("M", M), ("N", N), ("K", K)):
        if v >= 2**31:
            raise ValueError(f"{op}: {name}={v} does not fit the kernels' 32-bit sizes")
    return M, N, K


def _prepare(op, allowed, version, a, b, trans_a, trans_b, alpha, beta, c, dtype, c_dtype=np.float32):
    """Validate, allocate C if needed -> (xp, c, kernel args) or (xp, c, None) when C is empty."""
    if version not in allowed:
        other = "gemm_f16 (float16 inputs)" if op == "gemm" else "gemm (float32 inputs)"
        raise ValueError(f"{op}: version must be one of {', '.join(map(str, allowed))}, got {version!r} "
                         f"(the other versions of gemm.cu are {other})")
    M, N, K = _check_gemm_args(op, a, b, trans_a, trans_b, c, beta, dtype, c_dtype)
    xp = array_module(a, b, c)
    if c is None:
        c = empty(xp, (M, N), dtype=c_dtype)
    if M == 0 or N == 0:
        return xp, c, None
    args = (a, b, c, np.int32(M), np.int32(N), np.int32(K), np.int32(a.shape[1]), np.int32(b.shape[1]),
            np.int32(N), np.int32(bool(trans_a)), np.int32(bool(trans_b)), np.float32(alpha), np.float32(beta))
    return xp, c, args


def gemm(a, b, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, c=None, version=None):
    """C = alpha * op(a) @ op(b) + beta * C in float32.

    a: float32 [M, K] (or [K, M] with trans_a), b: float32 [K, N] (or [N, K] with trans_b),
    both C-contiguous.  c: float32 [M, N] or None.  With c given it is updated IN PLACE and
    returned; without, a new [M, N] array is returned (beta must then be 0).
    version: 1 (one thread per output), 2 (16x16 shared-memory tiles), 3 (128x128 tiles, 8x8
    outputs per thread, float4 loads) or None: the version in use (3 unless chosen otherwise).
    """
    version = versions.version("gemm", version, "gemm")
    xp, c, args = _prepare("gemm", F32_VERSIONS, version, a, b, trans_a, trans_b, alpha, beta, c, np.float32)
    if args is None:
        return c
    M, N = c.shape
    mod = module("gemm.cu")
    if version == 1:
        blocks = blocks_for(M * N, 256, xp)
        mod.get_function("gemm_naive_f32")((blocks,), (256,), args)
    elif version == 2:
        mod.get_function("gemm_tiled_f32")((-(-M // 16), -(-N // 16)), (16, 16), args)
    else:
        grid = (-(-M // 128), -(-N // 128))
        mod.get_function("gemm_regblock_f32")(grid, (256,), args + (np.int32(_vec_ok(a)), np.int32(_vec_ok(b))))
    return c


def gemm_f16(a, b, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, c=None, version=4, out_dtype=np.float32):
    """C = alpha * op(a) @ op(b) + beta * C with float16 a, b and float32 accumulation.

    Same arguments as `gemm`, but a and b are float16.  version 4 uses the tensor cores (sm_70+; on
    an older GPU the same kernel falls back to scalar FMAs), 1 is one thread per output.  Products
    of halves are exact in float32, so the only rounding beyond float32 accumulation is the
    rounding of the inputs to float16.  out_dtype: C's dtype, float32 or (version 4) float16,
    rounded once after the float32 sum.
    """
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in (_F32, _F16) or (out_dtype == _F16 and version != 4):
        raise ValueError(f"gemm_f16: out_dtype must be float32, or float16 with version 4, got {out_dtype} "
                         f"(version {version})")
    xp, c, args = _prepare("gemm_f16", F16_VERSIONS, version, a, b, trans_a, trans_b, alpha, beta, c, np.float16,
                           out_dtype)
    if args is None:
        return c
    M, N = c.shape
    mod = module("gemm.cu")
    if version == 1:
        blocks = blocks_for(M * N, 256, xp)
        mod.get_function("gemm_naive_f16")((blocks,), (256,), args)
    else:
        name = "gemm_wmma_f16" if out_dtype == _F32 else "gemm_wmma_f16_out_f16"
        mod.get_function(name)((-(-M // 64), -(-N // 64)), (128,), args)
    return c


def column_sum(x):
    """out[n] = sum_m x[m, n] for x float32 or float16 [M, N] (C-contiguous) -> float32 [N]
    (summed in float32)."""
    check_array("column_sum", "x", x, dtype=(np.float32, np.float16), ndim=2)
    xp = array_module(x)
    M, N = x.shape
    out = xp.zeros((N,), dtype=np.float32)
    if M and N:
        name = "column_sum_f32" if x.dtype == _F32 else "column_sum_f16"
        module("gemm.cu").get_function(name)((-(-N // 32),), (32, 8), (x, out, np.int32(M), np.int32(N)))
    return out


def linear_forward(x, w, b=None, version=None):
    """Fully connected layer: y = x @ w.T + b.

    x: float32 [N, Cin], w: float32 [Cout, Cin] (PyTorch layout), b: float32 [Cout] or None
    ->  y: float32 [N, Cout].  One GEMM (w read transposed in place; `version` of gemm, None: the
    version in use) plus a bias pass.  Or x, w float16 (b float32 or float16) -> y float16: the
    tensor-core GEMM (version 4) rounding once to half, and the bias added in float.
    """
    op = "linear_forward"
    check_array(op, "x", x, dtype=(np.float32, np.float16), ndim=2)
    check_array(op, "w", w, dtype=x.dtype, ndim=2)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} features but w expects {w.shape[1]} "
                         f"(w is [Cout, Cin] = {tuple(w.shape)})")
    half = x.dtype == _F16
    if b is not None:
        check_array(op, "b", b, dtype=(np.float32, np.float16) if half else np.float32, shape=(w.shape[0],))
    xp = array_module(x, w, b)
    if half:
        y = gemm_f16(x, w, trans_b=True, out_dtype=np.float16)
        if b is not None and b.dtype == _F16:
            b = b.astype(np.float32)
    else:
        y = gemm(x, w, trans_b=True, version=version)
    if b is not None and y.size:
        M, N = y.shape
        blocks = blocks_for(y.size, 256, xp)
        module("gemm.cu").get_function("bias_add_rows_f16" if half else "bias_add_rows_f32")(
            (blocks,), (256,), (y, b, np.int32(M), np.int32(N)))
    return y


def linear_backward(dy, x, w, need_bias_grad=True, version=None, dtype=None):
    """Gradients of linear_forward: dx = dy @ w, dw = dy.T @ x, db = column sums of dy.

    dy: float32 [N, Cout], x: float32 [N, Cin], w: float32 [Cout, Cin]
    ->  (dx [N, Cin], dw [Cout, Cin], db [Cout] or None), float32.  Or float16 dy, x, w: dx float16,
    dw and db in `dtype` (None: float16; float32 for a float32 master weight: summed in float32,
    never rounded to half).
    """
    op = "linear_backward"
    check_array(op, "dy", dy, dtype=(np.float32, np.float16), ndim=2)
    check_array(op, "x", x, dtype=dy.dtype, ndim=2)
    check_array(op, "w", w, dtype=dy.dtype, ndim=2)
    n, cout = dy.shape
    if x.shape[0] != n or w.shape != (cout, x.shape[1]):
        raise ValueError(f"{op}: dy {tuple(dy.shape)}, x {tuple(x.shape)} and w {tuple(w.shape)} do not "
                         f"fit together (expected x [{n}, Cin] and w [{cout}, Cin])")
    array_module(dy, x, w)
    dtype = dy.dtype if dtype is None else np.dtype(dtype)
    if dy.dtype == _F32:
        if dtype != _F32:
            raise TypeError(f"{op}: float32 inputs give float32 gradients, got dtype={dtype}")
        dx = gemm(dy, w, version=version)
        dw = gemm(dy, x, trans_a=True, version=version)
        db = column_sum(dy) if need_bias_grad else None
        return dx, dw, db
    if dtype not in (_F16, _F32):
        raise TypeError(f"{op}: dtype of dw and db must be float16 or float32, got {dtype}")
    dx = gemm_f16(dy, w, out_dtype=np.float16)
    dw = gemm_f16(dy, x, trans_a=True, out_dtype=dtype)
    db = column_sum(dy) if need_bias_grad else None
    if db is not None and dtype == _F16:
        db = db.astype(np.float16)
    return dx, dw, db


if __name__ == "__main__":   # `python -m kernels.gemm ARGS` is `python -m kernels gemm ARGS` (the lesson)
    import runpy
    import sys
    sys.argv[1:1] = ["gemm"]
    runpy.run_module("kernels", run_name="__main__")
