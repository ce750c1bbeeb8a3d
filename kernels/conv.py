"""Launchers of kernels/conv.cu: 2-D convolution forward, backward-data and backward-weight.

    y  = conv2d_forward(x, w, stride, padding)                         # version 3, implicit GEMM (default)
    dx = conv2d_backward_data(dy, w, x.shape, stride, padding, version=1)   # naive
    dw = conv2d_backward_weight(x, dy, w.shape, stride, padding, version=2) # im2col + GEMM

Layouts: x [N, H, W, C] and y / dy [N, P, Q, K] (NHWC), w [K, C, R, S] (OIHW, as torchvision),
all float32 and C-contiguous.  NumPy arrays run on the CPU emulator, CuPy arrays on the GPU.
Dilation 1, groups 1, no bias; P = (H + 2*padding - R)//stride + 1, Q likewise.

Versions (the header of conv.cu; `python -m kernels.conv` checks and times them):
    1  naive: one thread per output element
    2  im2col (or col2im) kernel + the GEMM of gemm.cu (the version of gemm in use)
    3  implicit GEMM: a tiled GEMM whose operands are addressed straight in x / dy / w
version=None runs the version in use (kernels.versions; 3 unless chosen otherwise).
"""

import numpy as np

from . import gemm as _gemm
from . import versions
from ._launch import array_module, blocks_for, check_array, check_shape_tuple, module

__all__ = ["conv2d_forward", "conv2d_backward_data", "conv2d_backward_weight", "conv_output_size",
           "permute_weight"]

_BLOCK = 256
_IG_TILE = 64           # implicit-GEMM tile (IG_BM = IG_BN in conv.cu)
_IG_BK = 16             # its reduction step (IG_BK)
_INT32_MAX = 2**31 - 1


def conv_output_size(size, kernel, stride, padding):
    """Output extent of a convolution along one axis: (size + 2*padding - kernel)//stride + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def _check_int(op, name, v, minimum):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v}")
    return int(v)


def _geometry(op, x_shape, w_shape, stride, padding):
    """(N, H, W, C, K, R, S, P, Q, stride, padding) after every check."""
    stride = _check_int(op, "stride", stride, 1)
    padding = _check_int(op, "padding", padding, 0)
    N, H, W, C = x_shape
    K, Cw, R, S = w_shape
    if Cw != C:
        raise ValueError(f"{op}: x has {C} channels (last axis, NHWC) but w expects {Cw} (w.shape[1], OIHW)")
    P, Q = conv_output_size(H, R, stride, padding), conv_output_size(W, S, stride, padding)
    if P < 1 or Q < 1:
        raise ValueError(f"{op}: a {R}x{S} kernel with stride {stride} and padding {padding} on a {H}x{W} "
                         f"image gives an empty output")
    sizes = {"N*H*W*C": N * H * W * C, "N*P*Q*K": N * P * Q * K, "K*C*R*S": K * C * R * S,
             "N*P*Q*R*S": N * P * Q * R * S}
    for what, v in sizes.items():
        if v > _INT32_MAX:
            raise ValueError(f"{op}: {what} = {v} exceeds the kernels' 32-bit index range")
    return N, H, W, C, K, R, S, P, Q, stride, padding


def _shape_args(g):
    return tuple(np.int32(v) for v in g)


def _blocks(n, xp):
    return blocks_for(n, _BLOCK, xp)


def permute_weight(w, perm):
    """w.transpose(perm) as a new C-contiguous array, by the permute4_f32 kernel.

    w: float32 4-D (e.g. OIHW [K, C, R, S]); perm: 4 axes.  perm (0, 2, 3, 1) gives KRSC
    ([K, R, S, C], the forward implicit GEMM's B), (2, 3, 0, 1) gives RSKC (backward data's B).
    """
    check_array("permute_weight", "w", w, dtype=np.float32, ndim=4)
    perm = tuple(int(p) for p in perm)
    if sorted(perm) != [0, 1, 2, 3]:
        raise ValueError(f"permute_weight: perm must be a permutation of (0, 1, 2, 3), got {perm}")
    xp = array_module(w)
    out = xp.empty(tuple(w.shape[p] for p in perm), dtype=np.float32)
    elem_strides = [s // w.itemsize for s in w.strides]
    args = (w, out) + tuple(np.int32(d) for d in out.shape) + tuple(np.int32(elem_strides[p]) for p in perm)
    module("conv.cu").get_function("permute4_f32")((_blocks(out.size, xp),), (_BLOCK,), args)
    return out


def conv2d_forward(x, w, stride, padding, version=None):
    """y = conv2d(x, w): cross-correlation with zero padding, dilation 1, one group, no bias.

    y[n, p, q, k] = sum_{r, s, c} x[n, p*stride + r - padding, q*stride + s - padding, c] * w[k, c, r, s]

    x: float32 [N, H, W, C] (NHWC), w: float32 [K, C, R, S] (OIHW), stride >= 1, padding >= 0
    ->  y: float32 [N, P, Q, K] (NHWC).  version: 1 naive, 2 im2col + GEMM, 3 implicit GEMM, None
    the version in use.
    """
    op = "conv2d_forward"
    version = versions.version("conv", version, op)
    check_array(op, "x", x, dtype=np.float32, ndim=4)
    check_array(op, "w", w, dtype=np.float32, ndim=4)
    xp = array_module(x, w)
    g = _geometry(op, x.shape, w.shape, stride, padding)
    N, H, W, C, K, R, S, P, Q, _, _ = g
    y = xp.empty((N, P, Q, K), dtype=np.float32)
    mod = module("conv.cu")
    if version == 1:
        mod.get_function("conv2d_fwd_naive_f32")((_blocks(y.size, xp),), (_BLOCK,), (x, w, y) + _shape_args(g))
    elif version == 2:
        cols = xp.empty((N * P * Q, R * S * C), dtype=np.float32)
        mod.get_function("im2col_f32")((_blocks(cols.size, xp),), (_BLOCK,), (x, cols) + _shape_args(g))
        wt = permute_weight(w, (0, 2, 3, 1)).reshape(K, R * S * C)
        _gemm.gemm(cols, wt, trans_b=True, c=y.reshape(N * P * Q, K))
    else:
        wt = permute_weight(w, (0, 2, 3, 1))                 # KRSC
        grid = (-(-(N * P * Q) // _IG_TILE), -(-K // _IG_TILE))
        mod.get_function("conv2d_fwd_igemm_f32")(grid, (256,), (x, wt, y) + _shape_args(g))
    return y


def conv2d_backward_data(dy, w, x_shape, stride, padding, version=None):
    """dx = gradient of conv2d_forward with respect to x.

    dx[n, h, w, c] = sum over (r, s, k) with h + padding - r = p*stride, w + padding - s = q*stride
                     (0 <= p < P, 0 <= q < Q) of dy[n, p, q, k] * w[k, c, r, s]

    dy: float32 [N, P, Q, K], w: float32 [K, C, R, S], x_shape: (N, H, W, C)
    ->  dx: float32 x_shape (NHWC).  version as conv2d_forward.
    """
    op = "conv2d_backward_data"
    version = versions.version("conv", version, op)
    check_array(op, "dy", dy, dtype=np.float32, ndim=4)
    check_array(op, "w", w, dtype=np.float32, ndim=4)
    x_shape = check_shape_tuple(op, "x_shape", x_shape, "(N, H, W, C)")
    xp = array_module(dy, w)
    g = _geometry(op, x_shape, w.shape, stride, padding)
    N, H, W, C, K, R, S, P, Q, _, _ = g
    if tuple(dy.shape) != (N, P, Q, K):
        raise ValueError(f"{op}: dy must have shape {(N, P, Q, K)} for x_shape {x_shape} and w {tuple(w.shape)}, "
                         f"got {tuple(dy.shape)}")
    dx = xp.empty(x_shape, dtype=np.float32)
    mod = module("conv.cu")
    if version == 1:
        mod.get_function("conv2d_bwd_data_naive_f32")((_blocks(dx.size, xp),), (_BLOCK,), (dy, w, dx) + _shape_args(g))
    elif version == 2:
        wt = permute_weight(w, (0, 2, 3, 1)).reshape(K, R * S * C)
        dcols = _gemm.gemm(dy.reshape(N * P * Q, K), wt)     # [NPQ, RSC]
        mod.get_function("col2im_f32")((_blocks(dx.size, xp),), (_BLOCK,), (dcols, dx) + _shape_args(g))
    else:
        wr = permute_weight(w, (2, 3, 0, 1))                 # RSKC
        grid = (-(-(N * H * W) // _IG_TILE), -(-C // _IG_TILE))
        mod.get_function("conv2d_bwd_data_igemm_f32")(grid, (256,), (dy, wr, dx) + _shape_args(g))
    return dx


def _split_k(xp, tiles, reduction, split_k):
    """How many slices the backward-weight reduction is split into (gridDim.z)."""
    steps = -(-reduction // _IG_BK)
    if split_k is None:
        # GPU: aim for ~1024 blocks in all, each still walking >= 32 steps of 16; emulator: 1.
        split_k = 1 if xp is np else max(1, min(-(-1024 // tiles), steps // 32))
    split_k = max(1, min(int(split_k), steps))
    chunk = -(-steps // split_k) * _IG_BK
    return -(-reduction // chunk), chunk


def conv2d_backward_weight(x, dy, w_shape, stride, padding, version=None, split_k=None):
    """dw = gradient of conv2d_forward with respect to w.

    dw[k, c, r, s] = sum_{n, p, q} dy[n, p, q, k] * x[n, p*stride + r - padding, q*stride + s - padding, c]

    x: float32 [N, H, W, C], dy: float32 [N, P, Q, K], w_shape: (K, C, R, S)
    ->  dw: float32 w_shape (OIHW).  version as conv2d_forward.  split_k (version 3 only): number of
    slices of the N*P*Q reduction run as separate blocks and summed afterwards (default: chosen for
    the device).
    """
    op = "conv2d_backward_weight"
    version = versions.version("conv", version, op)
    check_array(op, "x", x, dtype=np.float32, ndim=4)
    check_array(op, "dy", dy, dtype=np.float32, ndim=4)
    w_shape = check_shape_tuple(op, "w_shape", w_shape, "(K, C, R, S)")
    if split_k is not None:
        _check_int(op, "split_k", split_k, 1)
    xp = array_module(x, dy)
    g = _geometry(op, x.shape, w_shape, stride, padding)
    N, H, W, C, K, R, S, P, Q, _, _ = g
    if tuple(dy.shape) != (N, P, Q, K):
        raise ValueError(f"{op}: dy must have shape {(N, P, Q, K)} for x {tuple(x.shape)} and w_shape {w_shape}, "
                         f"got {tuple(dy.shape)}")
    dw = xp.empty(w_shape, dtype=np.float32)
    mod = module("conv.cu")
    if version == 1:
        mod.get_function("conv2d_bwd_weight_naive_f32")((_blocks(dw.size, xp),), (_BLOCK,), (x, dy, dw) + _shape_args(g))
    elif version == 3:
        tiles = -(-K // _IG_TILE) * -(-(R * S * C) // _IG_TILE)
        splits, chunk = _split_k(xp, tiles, N * P * Q, split_k)
        ws = xp.empty((splits, K, R * S * C), dtype=np.float32)
        grid = (-(-K // _IG_TILE), -(-(R * S * C) // _IG_TILE), splits)
        mod.get_function("conv2d_bwd_weight_igemm_f32")(grid, (256,), (x, dy, ws) + _shape_args(g) + (np.int32(chunk),))
        mod.get_function("conv2d_bwd_weight_reduce_f32")(
            (_blocks(dw.size, xp),), (_BLOCK,), (ws, dw, np.int32(splits), np.int32(K), np.int32(C), np.int32(R),
                                                 np.int32(S)))
    else:
        cols = xp.empty((N * P * Q, R * S * C), dtype=np.float32)
        mod.get_function("im2col_f32")((_blocks(cols.size, xp),), (_BLOCK,), (x, cols) + _shape_args(g))
        dw_krsc = _gemm.gemm(dy.reshape(N * P * Q, K), cols, trans_a=True)   # [K, RSC]
        dw = permute_weight(dw_krsc.reshape(K, R, S, C), (0, 3, 1, 2))
    return dw


if __name__ == "__main__":
    from kernels.lesson import main
    raise SystemExit(main("conv"))
