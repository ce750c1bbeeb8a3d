"""Launchers of kernels/pool.cu: max pooling (any square kernel, stride, padding) and global
average pooling, forward and backward, on NHWC activations (float32 or float16, C-contiguous).

    y, argmax = maxpool2d_forward(x, kernel_size=3, stride=2, padding=1)
    dx = maxpool2d_backward(dy, argmax, x.shape)
    y = global_avgpool_forward(x);  dx = global_avgpool_backward(dy, x.shape)

Versions (the header of pool.cu; `python -m kernels.pool` checks and times them) are those of the
max-pool backward: 1 scatters with atomicAdd, float32 only (a float16 gradient runs version 2
unless version 1 is asked for by name; measured 2.1x faster than 2 on an H100); 2 gathers,
deterministically; 3 (the default: predicted 1.9x faster than 1) gathers per 2x2 block of pixels in
16-byte vectors (stride 2; other strides run version 2), the same bits as 2; version 3 also writes
the global-average-pool backward in 16-byte vectors.  maxpool2d_backward_relu_bn is the backward
of a max pool after a batch norm + ReLU (ResNet's stem) with the mask and that batch norm's
backward partial sums in version 3's epilogue (batchnorm_backward_from_partials finishes it);
global_avgpool_backward_relu_bn the same for the average pool after the last add + ReLU batch norm.
"""

import numpy as np

from . import versions
from .runtime.launch import (FLOAT_DTYPES, array_module, blocks_for, check_array, check_shape_tuple, empty, is_cupy,
                             module)

__all__ = ["maxpool2d_forward", "maxpool2d_backward", "maxpool2d_backward_relu_bn", "global_avgpool_forward",
           "global_avgpool_backward", "global_avgpool_backward_relu_bn"]

_BLOCK = 256
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


def _kernel(name):
    return module("pool.cu").get_function(name)


def _launch(name, n, args, xp):
    _kernel(name)((blocks_for(n, _BLOCK, xp),), (_BLOCK,), args)


def _data_ptr(a):
    return int(a.data.ptr) if is_cupy(a) else int(a.__array_interface__["data"][0])


def _vector(C, *arrays):
    """Version 3's channels per thread: a 16-byte vector (4 floats, 8 halves) where C is a multiple of
    it and every array starts on a 16-byte boundary, else 1."""
    V = 16 // arrays[0].dtype.itemsize
    return 1 if C % V or any(_data_ptr(a) % 16 for a in arrays) else V


def _positive_int(op, name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def _pool_geometry(op, x_shape, kernel_size, stride, padding):
    k = _positive_int(op, "kernel_size", kernel_size, 1)
    s = _positive_int(op, "stride", stride, 1)
    pad = _positive_int(op, "padding", padding, 0)
    if pad >= k:
        raise ValueError(f"{op}: padding {pad} must be smaller than kernel_size {k} (else a window could "
                         f"hold only padding)")
    N, H, W, C = x_shape
    if H + 2 * pad < k or W + 2 * pad < k:
        raise ValueError(f"{op}: a {k}x{k} window does not fit the padded {H}x{W} input (padding {pad})")
    return k, s, pad, (H + 2 * pad - k) // s + 1, (W + 2 * pad - k) // s + 1


def maxpool2d_forward(x, kernel_size=3, stride=2, padding=1):
    """Max pooling over kernel_size x kernel_size windows; padding never wins.

    x: float32/float16 [N, H, W, C]  ->  (y [N, P, Q, C] like x, argmax int32 [N, P, Q, C]) with
    P = (H + 2*padding - kernel_size) // stride + 1 (Q alike) and argmax = h*W + w of the winning
    pixel within its (n, c) plane (ties: first pixel in row-major window order).
    """
    op = "maxpool2d_forward"
    check_array(op, "x", x, dtype=FLOAT_DTYPES, ndim=4)
    N, H, W, C = x.shape
    k, s, pad, P, Q = _pool_geometry(op, x.shape, kernel_size, stride, padding)
    xp = array_module(x)
    y = empty(xp, (N, P, Q, C), dtype=x.dtype)
    argmax = empty(xp, (N, P, Q, C), dtype=np.int32)
    if y.size:
        _launch(f"maxpool2d_forward_{_SUFFIX[x.dtype]}", y.size,
                (x, y, argmax) + tuple(np.int32(v) for v in (N, H, W, C, P, Q, k, s, pad)), xp)
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape, kernel_size, stride, padding, version=None):
    """Gradient of maxpool2d_forward: each dy goes to its window's winning pixel (summed where
    windows overlap).

    dy: float32/float16 [N, P, Q, C]; argmax: int32 [N, P, Q, C] from the forward; x_shape:
    (N, H, W, C); kernel_size, stride, padding: those of the forward (the gather kernel finds the
    windows covering a pixel from them; always passed, never guessed from the shapes: a 4/2/1
    pooling of an 8x8 input has the shapes of a 3/2/1 one).
    version: 1 (one thread per output scatters with atomicAdd; float32 only; the order of the adds
    into a pixel, and so its last bits, can change from run to run on a GPU), 2 (one thread per
    input pixel gathers: deterministic), 3 (one thread per 2x2 block of input pixels and 16-byte
    vector of channels gathers, for stride 2, version 2 otherwise; version 2's bits) or None: the
    version in use (3 unless chosen otherwise; with version 1 in use a float16 dy runs version 2,
    version 1 having no float16 kernel).
    ->  dx [N, H, W, C] like dy.
    """
    op = "maxpool2d_backward"
    check_array(op, "dy", dy, dtype=FLOAT_DTYPES, ndim=4)
    check_array(op, "argmax", argmax, dtype=np.int32, shape=dy.shape)
    array_module(dy, argmax)
    N, H, W, C = check_shape_tuple(op, "x_shape", x_shape, "(N, H, W, C)")
    requested = version
    version = versions.version("pool", version, op)
    if requested is None and version == 1 and dy.dtype != np.float32:
        version = 2    # version 1 adds with float32 atomics: float16 gradients gather
    k, s, pad, P, Q = _pool_geometry(op, (N, H, W, C), kernel_size, stride, padding)
    if dy.shape != (N, P, Q, C):
        raise ValueError(f"{op}: dy shape {tuple(dy.shape)} does not match x_shape {(N, H, W, C)} pooled "
                         f"with kernel_size={k}, stride={s}, padding={pad} (expected {(N, P, Q, C)})")
    xp = array_module(dy)
    if version == 1:
        if dy.dtype != np.float32:
            raise TypeError(f"{op}: version 1 (scatter with atomicAdd) supports float32 dy only, got {dy.dtype}")
        if not is_cupy(argmax) and argmax.size and (int(argmax.min()) < 0 or int(argmax.max()) >= H * W):
            raise ValueError(f"{op}: argmax holds indices outside [0, {H * W}) for x_shape {(N, H, W, C)}")
        dx = xp.zeros((N, H, W, C), dtype=np.float32)
        _launch("maxpool2d_backward_scatter_f32", dy.size,
                (dy, argmax, dx) + tuple(np.int32(v) for v in (N, H, W, C, P, Q)), xp)
        return dx
    dx = empty(xp, (N, H, W, C), dtype=dy.dtype)
    blocks = N * (-(-H // 2)) * (-(-W // 2)) * C   # version 3's threads, at one channel each
    if version >= 3 and s == 2 and blocks < 2 ** 31:
        V = _vector(C, dy, argmax, dx)
        _launch(f"maxpool2d_backward_blocks_{_SUFFIX[dy.dtype]}x{V}", blocks // V,
                (dy, argmax, dx) + tuple(np.int32(v) for v in (N, H, W, C, P, Q, k, pad)), xp)
        return dx
    _launch(f"maxpool2d_backward_gather_{_SUFFIX[dy.dtype]}", dx.size,
            (dy, argmax, dx) + tuple(np.int32(v) for v in (N, H, W, C, P, Q, k, s, pad)), xp)
    return dx


def maxpool2d_backward_relu_bn(dy, argmax, y, a, bn_x, bn_mean, kernel_size, stride, padding, version=None):
    """(g, part): the max pool's backward where its input a = relu(batchnorm(bn_x)) (ResNet's stem),
    with the first half of that batch norm's backward in its epilogue, as conv.py's
    conv2d_backward_data_relu_bn gives it for a batch norm before a convolution:
        g    = maxpool2d_backward(dy, argmax, a.shape, ...) where a > 0, else 0   (like a)
        part float32 [2, B, C]: per block b of g's pixels, [sum g, sum g * (bn_x - bn_mean)]
    for batchnorm_backward_from_partials(g, bn_x, ...).

    dy, y (the forward's output), argmax: [N, P, Q, C]; a, bn_x: [N, H, W, C], all float32 or all
    float16; bn_mean float32 [C], the batch mean of bn_x.  Version 3 (stride 2, the channel vectors
    of a pixel dividing 256) runs maxpool2d_backward_blocks_relu_bn: the mask from y (a pixel's
    gradient comes from the windows it won, where y = a), one partial row per block of 256 threads
    (B = the grid).  Otherwise the max pool's backward of that version, then
    batchnorm_relu_grad_partials (one more read of g, a and bn_x): the same g, other blocks."""
    op = "maxpool2d_backward_relu_bn"
    check_array(op, "dy", dy, dtype=FLOAT_DTYPES, ndim=4)
    check_array(op, "argmax", argmax, dtype=np.int32, shape=dy.shape)
    check_array(op, "y", y, dtype=dy.dtype, shape=dy.shape)
    check_array(op, "a", a, dtype=dy.dtype, ndim=4)
    check_array(op, "bn_x", bn_x, dtype=dy.dtype, shape=a.shape)
    N, H, W, C = a.shape
    check_array(op, "bn_mean", bn_mean, dtype=np.float32, shape=(C,))
    xp = array_module(dy, argmax, y, a, bn_x, bn_mean)
    k, s, pad, P, Q = _pool_geometry(op, (N, H, W, C), kernel_size, stride, padding)
    if dy.shape != (N, P, Q, C):
        raise ValueError(f"{op}: dy shape {tuple(dy.shape)} does not match a's shape {(N, H, W, C)} pooled "
                         f"with kernel_size={k}, stride={s}, padding={pad} (expected {(N, P, Q, C)})")
    version = versions.version("pool", version, op)
    blocks = N * (-(-H // 2)) * (-(-W // 2)) * C   # version 3's threads, at one channel each
    g = empty(xp, (N, H, W, C), dtype=dy.dtype)
    V = _vector(C, dy, argmax, y, bn_x, g) if C else 1
    if version >= 3 and s == 2 and 0 < blocks < 2 ** 31 and _BLOCK % (C // V) == 0:
        grid = blocks_for(blocks // V, _BLOCK, xp)
        part = empty(xp, (2, grid, C), dtype=np.float32)
        _kernel(f"maxpool2d_backward_blocks_relu_bn_{_SUFFIX[dy.dtype]}x{V}")(
            (grid,), (_BLOCK,), (dy, argmax, y, bn_x, bn_mean, g, part)
            + tuple(np.int32(v) for v in (N, H, W, C, P, Q, k, pad)))
        return g, part
    from .batchnorm import batchnorm_relu_grad_partials   # batchnorm.py does not import this module
    fallback = 2 if version == 1 and dy.dtype != np.float32 else version   # version 1 has no float16 kernel
    da = maxpool2d_backward(dy, argmax, (N, H, W, C), k, s, pad, version=fallback)
    return batchnorm_relu_grad_partials(da, a, bn_x, bn_mean)


def global_avgpool_forward(x):
    """y[n, c] = mean over (h, w) of x[n, h, w, c].  x: float32/float16 [N, H, W, C] -> y [N, C]."""
    op = "global_avgpool_forward"
    check_array(op, "x", x, dtype=FLOAT_DTYPES, ndim=4)
    N, H, W, C = x.shape
    if H * W == 0:
        raise ValueError(f"{op}: x has no pixels (shape {tuple(x.shape)})")
    xp = array_module(x)
    y = empty(xp, (N, C), dtype=x.dtype)
    if y.size:
        _launch(f"global_avgpool_forward_{_SUFFIX[x.dtype]}", y.size,
                (x, y, np.int32(N), np.int32(H * W), np.int32(C)), xp)
    return y


def global_avgpool_backward(dy, x_shape):
    """dx[n, h, w, c] = dy[n, c] / (H*W).  dy: float32/float16 [N, C]; x_shape (N, H, W, C) -> dx.
    Pool version 3 in use: 16-byte vectors (the same bits)."""
    op = "global_avgpool_backward"
    check_array(op, "dy", dy, dtype=FLOAT_DTYPES, ndim=2)
    N, H, W, C = check_shape_tuple(op, "x_shape", x_shape, "(N, H, W, C)")
    if dy.shape != (N, C):
        raise ValueError(f"{op}: dy shape {tuple(dy.shape)} does not match x_shape {(N, H, W, C)} "
                         f"(expected {(N, C)})")
    xp = array_module(dy)
    dx = empty(xp, (N, H, W, C), dtype=dy.dtype)
    if versions.version("pool") >= 3 and N <= 65535:   # each thread divides V values once, writes them to its pixels
        V = _vector(C, dy, dx)
        GX = min(C // V, _BLOCK)
        TY = _BLOCK // GX
        slices = 1 if xp is np else max(1, min(-(-(H * W) // (TY * 4)), 65535))   # ~4 pixels a thread on a GPU
        _kernel(f"global_avgpool_backward_{_SUFFIX[dy.dtype]}x{V}")(
            (-(-(C // V) // GX), N, slices), (GX, TY), (dy, dx, np.int32(N), np.int32(H * W), np.int32(C)))
        return dx
    _launch(f"global_avgpool_backward_{_SUFFIX[dy.dtype]}", dx.size,
            (dy, dx, np.int32(N), np.int32(H * W), np.int32(C)), xp)
    return dx


def global_avgpool_backward_relu_bn(dy, a, bn_x, bn_mean):
    """(g, part): the global average pool's backward where its input a = relu(batchnorm(bn_x) + r)
    (ResNet's last block), with the first half of that batch norm's backward in its epilogue:
        g    = global_avgpool_backward(dy, a.shape) where a > 0, else 0     (like a)
        part float32 [2, B, C]: per block b of g's pixels, [sum g, sum g * (bn_x - bn_mean)]
    for batchnorm_backward_from_partials(g, bn_x, ...).  dy: [N, C]; a, bn_x: [N, H, W, C], all float32
    or all float16; bn_mean float32 [C].  Pool version 3: global_avgpool_backward_relu_bn_* (one
    partial row per image, B = N); otherwise the average pool's backward, then
    batchnorm_relu_grad_partials (one more read of g, a and bn_x)."""
    op = "global_avgpool_backward_relu_bn"
    check_array(op, "dy", dy, dtype=FLOAT_DTYPES, ndim=2)
    check_array(op, "a", a, dtype=dy.dtype, ndim=4)
    check_array(op, "bn_x", bn_x, dtype=dy.dtype, shape=a.shape)
    N, H, W, C = a.shape
    check_array(op, "bn_mean", bn_mean, dtype=np.float32, shape=(C,))
    if dy.shape != (N, C):
        raise ValueError(f"{op}: dy shape {tuple(dy.shape)} does not match a's shape {(N, H, W, C)} "
                         f"(expected {(N, C)})")
    xp = array_module(dy, a, bn_x, bn_mean)
    if versions.version("pool", None, op) >= 3 and 0 < N <= 65535 and C and H * W:
        g = empty(xp, (N, H, W, C), dtype=dy.dtype)
        V = _vector(C, dy, a, bn_x, g)
        GX = min(C // V, 32)        # 32 channel vectors side by side, 8 rows of threads over the pixels
        part = empty(xp, (2, N, C), dtype=np.float32)
        _kernel(f"global_avgpool_backward_relu_bn_{_SUFFIX[dy.dtype]}x{V}")(
            (-(-(C // V) // GX), N), (GX, _BLOCK // GX), (dy, a, bn_x, bn_mean, g, part, np.int32(N),
                                                          np.int32(H * W), np.int32(C)))
        return g, part
    from .batchnorm import batchnorm_relu_grad_partials   # batchnorm.py does not import this module
    return batchnorm_relu_grad_partials(global_avgpool_backward(dy, (N, H, W, C)), a, bn_x, bn_mean)


if __name__ == "__main__":   # `python -m kernels.pool ARGS` is `python -m kernels pool ARGS` (the lesson)
    import runpy
    import sys
    sys.argv[1:1] = ["pool"]
    runpy.run_module("kernels", run_name="__main__")
