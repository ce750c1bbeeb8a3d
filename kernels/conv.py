"""Launchers of kernels/conv.cu: 2-D convolution forward, backward-data and backward-weight.

    y  = conv2d_forward(x, w, stride, padding)                         # the version in use for x's dtype
    dx = conv2d_backward_data(dy, w, x.shape, stride, padding, version=1)   # naive
    dw = conv2d_backward_weight(x, dy, w.shape, stride, padding, version=2) # im2col + GEMM
    wk = conv_weight(w32, np.float16)                                  # fp32 master -> fp16, channels last
    y16 = conv2d_forward(x16, wk, stride, padding)                     # tensor cores (version 5)
    y, stats = conv2d_forward_bn_stats(x, w, stride, padding)          # + batch norm's partials of y
    g, part = conv2d_backward_data_relu_bn(dy, w, x.shape, stride, padding, a, bn_x, bn_mean)
                                # dx masked by a ReLU after batch norm, + that batch norm's backward partials
    dw32 = conv2d_backward_weight(x16, dy16, w.shape, stride, padding, dtype=np.float32)

Layouts: x [N, H, W, C] and y / dy [N, P, Q, K] (NHWC), w [K, C, R, S] (OIHW, as torchvision),
C-contiguous.  NumPy arrays run on the CPU emulator, CuPy arrays on the GPU.  Dilation 1,
groups 1, no bias; P = (H + 2*padding - R)//stride + 1, Q likewise.

Versions (the header of conv.cu; `python -m kernels.conv` checks and times them):
    1  naive: one thread per output element                                       float32
    2  im2col (or col2im) kernel + the GEMM of gemm.cu (the version of gemm in use) float32
    3  implicit GEMM: a tiled GEMM whose operands are addressed straight in x / dy / w   float32
    4  implicit GEMM on tensor cores (WMMA), float32 accumulation                  float16
    5  + asynchronous copies (sm_80+), backward data per stride phase               float16
Versions 3 to 5 carry two fusions with batch norm in their kernels' epilogues: the forward's
batch-norm statistics of y (conv2d_forward_bn_stats, the *_stats kernels) and, for a convolution
whose input is relu(batchnorm(bn_x)), the ReLU's mask and the batch norm's backward partial sums in
the backward data (conv2d_backward_data_relu_bn, the *_relu_bn kernels); versions 1 and 2 compute
the same through batch norm's kernels, reading their output once more.
version=None runs the version in use for the arrays' dtype (kernels.versions: 3 for float32 and 5
for float16 unless chosen otherwise).  The float16 versions take w as float16 OIHW, either
C-contiguous or as conv_weight returns it (channels-last memory viewed as [K, C, R, S]: no copy
per call then); dw comes back in `dtype` (default: x's), so the gradient of a float32 master
weight is never rounded to half.
"""

import contextlib

import numpy as np

from . import batchnorm as _bn
from . import elementwise as _elementwise
from . import gemm as _gemm
from . import versions
from .runtime.launch import array_module, blocks_for, check_array, check_shape_tuple, empty, is_cupy, module

__all__ = ["conv2d_forward", "conv2d_forward_bn_stats", "conv2d_backward_data", "conv2d_backward_data_relu_bn",
           "relu_bn_from_dgrad", "conv2d_backward_weight", "conv_output_size", "permute_weight", "conv_weight",
           "F16_VERSIONS", "emulate_arch"]

_BLOCK = 256
_IG_TILE = 64           # implicit-GEMM tile (IG_BM = IG_BN in conv.cu)
_IG_BK = 16             # its reduction step (IG_BK)
_TC_TILE = 64           # tensor-core tile (TC_BM = TC_BN) and reduction step (TC_BK)
_TC_THREADS = 128
_INT32_MAX = 2**31 - 1
_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
F16_VERSIONS = versions.FAMILIES["conv"].f16   # the versions that take float16 (tensor cores)
_TC_NAMES = {4: "%s_wmma_f16", 5: "%s_wmma_async_f16"}   # their kernels, by pass

_emu_options = ()       # options of the emulator's build of conv.cu (emulate_arch)


@contextlib.contextmanager
def emulate_arch(arch):
    """Within the block, the emulator builds conv.cu for `arch` ("sm_60", "sm_70", "sm_80", ...),
    so the code paths of older GPUs run on the CPU: sm_60 multiplies the float16 tiles with float
    FMAs (no tensor cores).  The default is sm_80.  Launches on a GPU are not affected (NVRTC
    compiles for the GPU at hand)."""
    global _emu_options
    previous, _emu_options = _emu_options, (f"-arch={arch}",)
    try:
        yield
    finally:
        _emu_options = previous


def _module(xp):
    return module("conv.cu", _emu_options if xp is np else ())


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


def _check_dy(op, dy, g, given):
    """dy must have the output shape (N, P, Q, K) of geometry g; given: the shapes g came from."""
    N, _, _, _, K, _, _, P, Q, _, _ = g
    if tuple(dy.shape) != (N, P, Q, K):
        raise ValueError(f"{op}: dy must have shape {(N, P, Q, K)} for {given}, got {tuple(dy.shape)}")


def _shape_args(g):
    return tuple(np.int32(v) for v in g)


def _blocks(n, xp):
    return blocks_for(n, _BLOCK, xp)


def _data_ptr(a):
    return int(a.data.ptr) if is_cupy(a) else int(a.__array_interface__["data"][0])


def _aligned(*arrays):
    """np.int32(1) when every array starts on a 16-byte boundary: the float16 kernels may then move
    8 channels as one 16-byte vector (where the channel count allows)."""
    return np.int32(all(_data_ptr(a) % 16 == 0 for a in arrays))


def _krsc(op, w, dtype):
    """w [K, C, R, S] as the C-contiguous [K, R, S, C] array of `dtype` the kernels read (float16:
    the tensor-core versions; float32: versions 2 and 3): w's own memory when it already is one (a
    channels-last view from conv_weight; a 1x1 filter always is), else one kernel's copy: float16
    by conv_weight_*_to_krsc_f16 (casting a float32 w), float32 by permute4_f32."""
    wk = w.transpose(0, 2, 3, 1)
    if w.dtype == dtype and wk.flags.c_contiguous:
        return wk
    _require_oihw(op, w)
    if dtype == _F16:
        return _to_krsc(w, array_module(w))
    return permute_weight(w if w.dtype == _F32 else w.astype(_F32), (0, 2, 3, 1))


def _oihw_f32(op, w):
    """The (checked) float32 weight as C-contiguous OIHW, what version 1 reads: w, or a permuted
    copy of a channels-last view."""
    if w.flags.c_contiguous:
        return w
    wk = w.transpose(0, 2, 3, 1)
    if not wk.flags.c_contiguous:
        _require_oihw(op, w)
    return permute_weight(wk, (0, 3, 1, 2))


def _require_oihw(op, w):
    if not w.flags.c_contiguous:
        raise ValueError(f"{op}: w must be C-contiguous [K, C, R, S] (OIHW) or channels-last memory viewed as "
                         f"[K, C, R, S] (what conv_weight returns); got strides {w.strides}")


def _to_krsc(w, xp):
    K, C, R, S = w.shape
    wk = empty(xp, (K, R, S, C), dtype=np.float16)
    name = "conv_weight_f32_to_krsc_f16" if w.dtype == _F32 else "conv_weight_f16_to_krsc_f16"
    _module(xp).get_function(name)((K, -(-C // 32)), (_BLOCK,), (w, wk) + tuple(np.int32(v) for v in w.shape),
                                   shared_mem=32 * ((R * S) | 1) * 4)
    return wk


def conv_weight(w, dtype):
    """w [K, C, R, S] (OIHW) as `dtype`, in the memory order the convolutions of that dtype read.

    Channels last ([K, R, S, C] memory, returned as its [K, C, R, S] view, so it is still an
    OIHW-shaped array), made by one kernel: float16 casts and transposes in one launch
    (conv_weight_f32_to_krsc_f16), float32 transposes (permute4_f32).  Forward and backward data of
    the versions in use then read it with no copy of their own.  w already in that form (a 1x1
    filter always is): w itself, no launch.  w: float32 or float16, OIHW C-contiguous or such a
    view.  A training step calls this once per convolution (nn.functional.conv2d), for the forward
    pass and the backward-data pass together.
    """
    op = "conv_weight"
    check_array(op, "w", w, dtype=(np.float32, np.float16), ndim=4, contiguous=False)
    dtype = np.dtype(dtype)
    if dtype not in (_F32, _F16):
        raise TypeError(f"{op}: dtype must be float32 or float16, got {dtype}")
    if w.dtype == dtype and w.transpose(0, 2, 3, 1).flags.c_contiguous:
        return w                        # already in that form: no launch
    return _krsc(op, w, dtype).transpose(0, 3, 1, 2)


def permute_weight(w, perm):
    """w.transpose(perm) as a new C-contiguous array, by the permute4_f32 kernel.

    w: float32 4-D (e.g. OIHW [K, C, R, S]); perm: 4 axes.  perm (0, 2, 3, 1) gives KRSC
    ([K, R, S, C], what versions 2 and 3 read), (0, 3, 1, 2) turns KRSC back into OIHW.
    """
    check_array("permute_weight", "w", w, dtype=np.float32, ndim=4)
    perm = tuple(int(p) for p in perm)
    if sorted(perm) != [0, 1, 2, 3]:
        raise ValueError(f"permute_weight: perm must be a permutation of (0, 1, 2, 3), got {perm}")
    xp = array_module(w)
    out = empty(xp, tuple(w.shape[p] for p in perm), dtype=np.float32)
    elem_strides = [s // w.itemsize for s in w.strides]
    args = (w, out) + tuple(np.int32(d) for d in out.shape) + tuple(np.int32(elem_strides[p]) for p in perm)
    _module(xp).get_function("permute4_f32")((_blocks(out.size, xp),), (_BLOCK,), args)
    return out


def conv2d_forward(x, w, stride, padding, version=None):
    """y = conv2d(x, w): cross-correlation with zero padding, dilation 1, one group, no bias.

    y[n, p, q, k] = sum_{r, s, c} x[n, p*stride + r - padding, q*stride + s - padding, c] * w[k, c, r, s]

    x: float32 [N, H, W, C] (NHWC), w: float32 [K, C, R, S] (OIHW: C-contiguous, or the channels-last
    view conv_weight returns), stride >= 1, padding >= 0
    ->  y: float32 [N, P, Q, K] (NHWC).  version: 1 naive, 2 im2col + GEMM, 3 implicit GEMM, None
    the version in use.  Or x, w float16 (w C-contiguous OIHW or from conv_weight) -> y float16:
    versions 4 and 5, tensor cores.
    """
    op = "conv2d_forward"
    version = versions.version("conv", version, op, getattr(x, "dtype", None))
    if version >= 3:
        return _forward_tiled(op, x, w, stride, padding, version)
    check_array(op, "x", x, dtype=np.float32, ndim=4)
    check_array(op, "w", w, dtype=np.float32, ndim=4, contiguous=False)
    xp = array_module(x, w)
    g = _geometry(op, x.shape, w.shape, stride, padding)
    N, H, W, C, K, R, S, P, Q, _, _ = g
    y = empty(xp, (N, P, Q, K), dtype=np.float32)
    mod = _module(xp)
    if version == 1:
        w = _oihw_f32(op, w)
        mod.get_function("conv2d_fwd_naive_f32")((_blocks(y.size, xp),), (_BLOCK,), (x, w, y) + _shape_args(g))
    else:
        cols = empty(xp, (N * P * Q, R * S * C), dtype=np.float32)
        mod.get_function("im2col_f32")((_blocks(cols.size, xp),), (_BLOCK,), (x, cols) + _shape_args(g))
        wt = _krsc(op, w, _F32).reshape(K, R * S * C)
        _gemm.gemm(cols, wt, trans_b=True, c=y.reshape(N * P * Q, K))
    return y


def conv2d_forward_bn_stats(x, w, stride, padding, version=None):
    """(y, stats): conv2d_forward's y and the batch-norm partials of y, for
    batchnorm.batchnorm_forward_train_from_stats (batch norm version 3).

    stats: float32 [4, P, K], rows (count, shift, mean - shift, M2) per block of y's rows (output
    pixels) and channel.  Versions 3, 4 and 5 write them in the epilogue of the forward kernel
    (conv2d_fwd_igemm_stats_f32, conv2d_fwd_wmma_stats_f16, conv2d_fwd_wmma_async_stats_f16: a block
    is a 64-row output tile, P = ceil(N*P*Q / 64)), from y as stored (rounded to half for float16);
    versions 1 and 2 compute y, then read it once more (batchnorm_chan_partials).  Arguments as
    conv2d_forward.
    """
    op = "conv2d_forward_bn_stats"
    version = versions.version("conv", version, op, getattr(x, "dtype", None))
    if version in (1, 2):
        y = conv2d_forward(x, w, stride, padding, version=version)
        return y, _bn.batchnorm_chan_partials(y)
    return _forward_tiled(op, x, w, stride, padding, version, stats=True)


def conv2d_backward_data(dy, w, x_shape, stride, padding, version=None):
    """dx = gradient of conv2d_forward with respect to x.

    dx[n, h, w, c] = sum over (r, s, k) with h + padding - r = p*stride, w + padding - s = q*stride
                     (0 <= p < P, 0 <= q < Q) of dy[n, p, q, k] * w[k, c, r, s]

    dy: float32 [N, P, Q, K], w: float32 [K, C, R, S], x_shape: (N, H, W, C)
    ->  dx: float32 x_shape (NHWC).  version as conv2d_forward (float16 dy and w: dx float16).
    """
    op = "conv2d_backward_data"
    version = versions.version("conv", version, op, getattr(dy, "dtype", None))
    if version >= 3:
        return _backward_data_tiled(op, dy, w, x_shape, stride, padding, version)
    check_array(op, "dy", dy, dtype=np.float32, ndim=4)
    check_array(op, "w", w, dtype=np.float32, ndim=4, contiguous=False)
    x_shape = check_shape_tuple(op, "x_shape", x_shape, "(N, H, W, C)")
    xp = array_module(dy, w)
    g = _geometry(op, x_shape, w.shape, stride, padding)
    N, H, W, C, K, R, S, P, Q, _, _ = g
    _check_dy(op, dy, g, f"x_shape {x_shape} and w {tuple(w.shape)}")
    dx = empty(xp, x_shape, dtype=np.float32)
    mod = _module(xp)
    if version == 1:
        w = _oihw_f32(op, w)
        mod.get_function("conv2d_bwd_data_naive_f32")((_blocks(dx.size, xp),), (_BLOCK,), (dy, w, dx) + _shape_args(g))
    else:
        wt = _krsc(op, w, _F32).reshape(K, R * S * C)
        dcols = _gemm.gemm(dy.reshape(N * P * Q, K), wt)     # [NPQ, RSC]
        mod.get_function("col2im_f32")((_blocks(dx.size, xp),), (_BLOCK,), (dcols, dx) + _shape_args(g))
    return dx


def conv2d_backward_data_relu_bn(dy, w, x_shape, stride, padding, a, bn_x, bn_mean, dz=None, version=None):
    """(g, part): the backward-data pass of a convolution whose input is a = relu(batchnorm(bn_x)) (or
    relu(batchnorm(bn_x) + r)), with the ReLU's backward and the first half of the batch norm's
    backward in its epilogue.

        da = conv2d_backward_data(dy, w, x_shape, stride, padding)   (+ dz, a's gradient from its
             other consumer, an identity shortcut: added as stored, (da + dz) rounded to dy's dtype)
        g  = da where a > 0, else 0                                   (dy's dtype, x_shape)
        part[0, b, c] = sum of g[m, c],  part[1, b, c] = sum of g[m, c] * (bn_x[m, c] - bn_mean[c])
                        over the rows m (pixels) of block b, from g as stored, in float32

    part: float32 [2, B, C], the layout batchnorm.batchnorm_backward_from_partials reads (part[q][b][c]
    at offset (q * B + b) * C + c).  Versions 3, 4 and 5 compute it in the epilogue of the kernel
    (conv2d_bwd_data_igemm_relu_bn_f32, conv2d_bwd_data_wmma_relu_bn_f16,
    conv2d_bwd_data_wmma_async_relu_bn_f16): a block is a 64-pixel tile, rows 64 b .. 64 b + 63 of
    the [N*H*W, C] matrix for versions 3 and 4 (B = ceil(N*H*W / 64)); for version 5 block
    b = phase * T + t is tile t of stride phase `phase` = (h % stride) * stride + w % stride, whose
    pixels (n, hh, ww) in that order are (n, hh * stride + h % stride, ww * stride + w % stride)
    (T = ceil(N * ceil(H / stride) * ceil(W / stride) / 64), B = stride^2 T; tiles past a phase's
    pixels hold zeros).  Versions 1 and 2 compute da, then read it once more
    (batchnorm.batchnorm_relu_grad_partials).
    a, bn_x (and dz, or None): like dy's dtype, shape x_shape; bn_mean: float32 [C] (the batch norm's
    saved mean).  Other arguments as conv2d_backward_data.
    """
    op = "conv2d_backward_data_relu_bn"
    version = versions.version("conv", version, op, getattr(dy, "dtype", None))
    dtype = _F16 if version in F16_VERSIONS else _F32
    check_array(op, "dy", dy, dtype=dtype, ndim=4)
    x_shape = check_shape_tuple(op, "x_shape", x_shape, "(N, H, W, C)")
    for name, arr in (("a", a), ("bn_x", bn_x)) + ((("dz", dz),) if dz is not None else ()):
        check_array(op, name, arr, dtype=dtype, ndim=4)
        if tuple(arr.shape) != x_shape:
            raise ValueError(f"{op}: {name} must have x_shape {x_shape}, got {tuple(arr.shape)}")
    check_array(op, "bn_mean", bn_mean, dtype=np.float32, ndim=1)
    if bn_mean.shape[0] != x_shape[3]:
        raise ValueError(f"{op}: bn_mean must have shape ({x_shape[3]},) (one per channel of x_shape), got "
                         f"{tuple(bn_mean.shape)}")
    if version in (1, 2):
        return relu_bn_from_dgrad(conv2d_backward_data(dy, w, x_shape, stride, padding, version=version), a, bn_x,
                                  bn_mean, dz)
    return _backward_data_tiled(op, dy, w, x_shape, stride, padding, version, relu_bn=(a, bn_x, dz, bn_mean))


def relu_bn_from_dgrad(da, a, bn_x, bn_mean, dz=None):
    """(g, part) of conv2d_backward_data_relu_bn from a finished da, for a backward data with no such
    epilogue (versions 1 and 2, cuDNN's): da (+ dz, as stored), then batch norm's
    batchnorm_relu_grad_partials (one more read of it, a and bn_x; its own blocks of rows)."""
    if dz is not None:
        da = _elementwise.add(da, dz)
    return _bn.batchnorm_relu_grad_partials(da, a, bn_x, bn_mean)


def _split_k(xp, tiles, reduction, split_k, step=_IG_BK, min_steps=32):
    """(splits, chunk): the backward-weight reduction over `reduction` indices cut into `splits`
    slices of `chunk` indices (gridDim.z), chunk a multiple of the kernel's reduction `step`.
    split_k None: on a GPU ~1024 blocks in all, each still walking >= min_steps steps; emulator 1."""
    steps = -(-reduction // step)
    if split_k is None:
        split_k = 1 if xp is np else max(1, min(-(-1024 // tiles), steps // min_steps))
    split_k = max(1, min(int(split_k), steps))
    chunk = -(-steps // split_k) * step
    return -(-reduction // chunk), chunk


def conv2d_backward_weight(x, dy, w_shape, stride, padding, version=None, split_k=None, dtype=None):
    """dw = gradient of conv2d_forward with respect to w.

    dw[k, c, r, s] = sum_{n, p, q} dy[n, p, q, k] * x[n, p*stride + r - padding, q*stride + s - padding, c]

    x: float32 [N, H, W, C], dy: float32 [N, P, Q, K], w_shape: (K, C, R, S)
    ->  dw: float32 w_shape (OIHW).  version as conv2d_forward.  split_k (versions 3 to 5): number
    of slices of the N*P*Q reduction run as separate blocks and summed afterwards (default: chosen
    for the device).  dtype: of dw, None for x's; float16 x and dy may ask for float32 (the
    gradient of a float32 master weight, summed in float32 and never rounded to half).
    """
    op = "conv2d_backward_weight"
    version = versions.version("conv", version, op, getattr(x, "dtype", None))
    if split_k is not None:
        _check_int(op, "split_k", split_k, 1)
    if version in F16_VERSIONS:
        return _backward_weight_f16(op, x, dy, w_shape, stride, padding, version, split_k, dtype)
    if dtype is not None and np.dtype(dtype) != _F32:
        raise TypeError(f"{op}: float32 x and dy give a float32 dw, got dtype={np.dtype(dtype)}")
    check_array(op, "x", x, dtype=np.float32, ndim=4)
    check_array(op, "dy", dy, dtype=np.float32, ndim=4)
    w_shape = check_shape_tuple(op, "w_shape", w_shape, "(K, C, R, S)")
    xp = array_module(x, dy)
    g = _geometry(op, x.shape, w_shape, stride, padding)
    N, H, W, C, K, R, S, P, Q, _, _ = g
    _check_dy(op, dy, g, f"x {tuple(x.shape)} and w_shape {w_shape}")
    dw = empty(xp, w_shape, dtype=np.float32)
    mod = _module(xp)
    if version == 1:
        mod.get_function("conv2d_bwd_weight_naive_f32")((_blocks(dw.size, xp),), (_BLOCK,), (x, dy, dw) + _shape_args(g))
    elif version == 3:
        tiles = -(-K // _IG_TILE) * -(-(R * S * C) // _IG_TILE)
        splits, chunk = _split_k(xp, tiles, N * P * Q, split_k)
        ws = empty(xp, (splits, K, R * S * C), dtype=np.float32)
        grid = (-(-K // _IG_TILE), -(-(R * S * C) // _IG_TILE), splits)
        mod.get_function("conv2d_bwd_weight_igemm_f32")(grid, (256,), (x, dy, ws) + _shape_args(g) + (np.int32(chunk),))
        mod.get_function("conv2d_bwd_weight_reduce_f32")(
            (_blocks(dw.size, xp),), (_BLOCK,), (ws, dw, np.int32(splits), np.int32(K), np.int32(C), np.int32(R),
                                                 np.int32(S)))
    else:
        cols = empty(xp, (N * P * Q, R * S * C), dtype=np.float32)
        mod.get_function("im2col_f32")((_blocks(cols.size, xp),), (_BLOCK,), (x, cols) + _shape_args(g))
        dw_krsc = _gemm.gemm(dy.reshape(N * P * Q, K), cols, trans_a=True)   # [K, RSC]
        dw = permute_weight(dw_krsc.reshape(K, R, S, C), (0, 3, 1, 2))
    return dw


# ---- versions 4 (and up): float16 on tensor cores --------------------------------------------------


def _forward_tiled(op, x, w, stride, padding, version, stats=False):
    """The forward by versions 3 (conv2d_fwd_igemm_f32), 4 and 5 (tensor cores, float16) -> y; stats=True:
    their *_stats kernel, -> (y, the batch-norm partials of y)."""
    dtype = _F16 if version in F16_VERSIONS else _F32
    check_array(op, "x", x, dtype=dtype, ndim=4)
    xp = array_module(x, w)
    check_array(op, "w", w, dtype=dtype, ndim=4, contiguous=False)
    wk = _krsc(op, w, dtype)
    g = _geometry(op, x.shape, w.shape, stride, padding)
    N, H, W, C, K, R, S, P, Q, _, _ = g
    y = empty(xp, (N, P, Q, K), dtype=dtype)
    if version == 3:
        name, block, tile, aligned = "conv2d_fwd_igemm_f32", 256, _IG_TILE, ()
    else:
        name, block, tile, aligned = _TC_NAMES[version] % "conv2d_fwd", _TC_THREADS, _TC_TILE, (_aligned(x, wk, y),)
    grid = (-(-(N * P * Q) // tile), -(-K // tile))
    if not stats:
        _module(xp).get_function(name)(grid, (block,), (x, wk, y) + _shape_args(g) + aligned)
        return y
    part = empty(xp, (4, grid[0], K), dtype=np.float32)   # count, shift, offset, M2 per (row tile, channel)
    base, suffix = name.rsplit("_", 1)                      # conv2d_fwd_..._f16 -> conv2d_fwd_..._stats_f16
    _module(xp).get_function(f"{base}_stats_{suffix}")(grid, (block,), (x, wk, y, part) + _shape_args(g) + aligned)
    return y, part


def _backward_data_tiled(op, dy, w, x_shape, stride, padding, version, relu_bn=None):
    """Backward data by versions 3 (conv2d_bwd_data_igemm_f32), 4 and 5 (tensor cores, float16) -> dx;
    relu_bn = (a, bn_x, dz, bn_mean): their *_relu_bn kernel instead, -> (g, part)
    (conv2d_backward_data_relu_bn, which checks those four)."""
    dtype = _F16 if version in F16_VERSIONS else _F32
    check_array(op, "dy", dy, dtype=dtype, ndim=4)
    check_array(op, "w", w, dtype=dtype, ndim=4, contiguous=False)
    x_shape = check_shape_tuple(op, "x_shape", x_shape, "(N, H, W, C)")
    xp = array_module(dy, w)
    g = _geometry(op, x_shape, w.shape, stride, padding)
    N, H, W, C, K, R, S, P, Q, stride, _ = g
    _check_dy(op, dy, g, f"x_shape {x_shape} and w {tuple(w.shape)}")
    dx = empty(xp, x_shape, dtype=dtype)
    wk = _krsc(op, w, dtype)                     # KRSC, as the forward pass reads it
    if version == 3:
        name, block, tile = "conv2d_bwd_data_igemm_f32", 256, _IG_TILE
    else:
        name, block, tile = _TC_NAMES[version] % "conv2d_bwd_data", _TC_THREADS, _TC_TILE
    if version == 5:   # one sub-convolution per stride phase: blockIdx.z = the phase
        grid = (-(-(N * -(-H // stride) * -(-W // stride)) // tile), -(-C // tile), stride * stride)
    else:              # every input pixel, every tap
        grid = (-(-(N * H * W) // tile), -(-C // tile))

    def launch(name, args, vectors):
        aligned = (_aligned(*(v for v in vectors if v is not None)),) if version in F16_VERSIONS else ()
        _module(xp).get_function(name)(grid, (block,), args + _shape_args(g) + aligned)

    if relu_bn is None:
        launch(name, (dy, wk, dx), (dy, wk, dx))
        return dx
    a, bn_x, dz, bn_mean = relu_bn
    part = empty(xp, (2, grid[0] * (grid[2] if version == 5 else 1), C), dtype=np.float32)
    base, suffix = name.rsplit("_", 1)               # conv2d_bwd_data_..._f16 -> conv2d_bwd_data_..._relu_bn_f16
    launch(f"{base}_relu_bn_{suffix}", (dy, wk, dx, a, bn_x, dz, bn_mean, part), (dy, wk, dx, a, bn_x, dz))
    return dx, part


def _backward_weight_f16(op, x, dy, w_shape, stride, padding, version, split_k, dtype):
    check_array(op, "x", x, dtype=np.float16, ndim=4)
    check_array(op, "dy", dy, dtype=np.float16, ndim=4)
    w_shape = check_shape_tuple(op, "w_shape", w_shape, "(K, C, R, S)")
    dtype = _F16 if dtype is None else np.dtype(dtype)
    if dtype not in (_F16, _F32):
        raise TypeError(f"{op}: dtype of dw must be float16 or float32, got {dtype}")
    xp = array_module(x, dy)
    g = _geometry(op, x.shape, w_shape, stride, padding)
    N, H, W, C, K, R, S, P, Q, _, _ = g
    _check_dy(op, dy, g, f"x {tuple(x.shape)} and w_shape {w_shape}")
    dw = empty(xp, w_shape, dtype=dtype)
    tiles = -(-K // _TC_TILE) * -(-(R * S * C) // _TC_TILE)
    splits, chunk = _split_k(xp, tiles, N * P * Q, split_k, step=_TC_TILE, min_steps=16)
    # one split writes dw itself; several write float slices of ws, summed by the reduce kernel
    ws = empty(xp, (splits, K, R * S * C) if splits > 1 else (1,), dtype=np.float32)
    mod = _module(xp)
    suffix = "" if dtype == _F16 else "_dw_f32"
    grid = (-(-K // _TC_TILE), -(-(R * S * C) // _TC_TILE), splits)
    mod.get_function(_TC_NAMES[version] % "conv2d_bwd_weight" + suffix)(
        grid, (_TC_THREADS,), (x, dy, ws, dw) + _shape_args(g) + (np.int32(chunk), _aligned(x, dy)))
    if splits > 1:
        mod.get_function("conv2d_bwd_weight_reduce_oihw_" + ("f16" if dtype == _F16 else "f32"))(
            (K, -(-C // 32)), (_BLOCK,), (ws, dw, np.int32(splits), np.int32(K), np.int32(C), np.int32(R),
                                          np.int32(S)), shared_mem=32 * ((R * S) | 1) * 4)
    return dw


if __name__ == "__main__":   # `python -m kernels.conv ARGS` is `python -m kernels conv ARGS` (the lesson)
    import runpy
    import sys
    sys.argv[1:1] = ["conv"]
    runpy.run_module("kernels", run_name="__main__")
