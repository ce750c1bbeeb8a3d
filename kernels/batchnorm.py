"""Launchers of kernels/batchnorm.cu: batch normalisation over NHWC activations, plain and fused.

x is [N, H, W, C] or [M, C] (channels last), float32 or float16, C-contiguous; the statistics
are per channel over the other axes.  gamma, beta, running_mean, running_var, saved_mean and
saved_invstd are float32 [C].  Every launcher returns new arrays on the device of x (NumPy ->
CPU emulator, CuPy -> GPU), except the running statistics, which the training forward updates
IN PLACE, as the op contract (kernels/reference.py) says.

    y, mean, invstd = batchnorm_forward_train(x, gamma, beta, running_mean, running_var)
    dx, dgamma, dbeta = batchnorm_backward(dy, x, gamma, mean, invstd)

Versions (the header of batchnorm.cu; `python -m kernels.batchnorm` checks and times them): the
reductions run as version 1 (one thread per channel over all rows) or version 2 (blocks of 32 x 8
threads, blockIdx.x a tile of 32 channels, blockIdx.y a slice of rows, partial summaries [G, C]
merged in order by a second launch, so results are deterministic on the GPU too).  Version 3 is
version 2 with one more way in: batchnorm_forward_train_from_stats takes the statistics as partials
from the convolution that produced x (kernels/conv.py, conv2d_forward_bn_stats) and reads x only to
normalise; nn.layers.conv_bn chooses it for a convolution and its batch norm in training.  The
others, called directly under version 3, run version 2.  Version 4 is version 3 with every pass in
16-byte vectors (_rows_layout: a thread keeps 8 halves or 4 floats of channels and walks rows) and
its own backward (the reduction over slices of rows, the ReLU mask as bits, the add + ReLU form's
dresidual written by the reduction).  Version 5 (the default) is version 4 with the backward's sums
taken from whoever produced its output gradient: batchnorm_backward_from_partials (after a
convolution's or the max pool's backward epilogue) and batchnorm_backward_from_partials_pair (an
add + ReLU batch norm whose dx pass also sums for the plain batch norm of its residual).  Which version runs is the version in use (kernels.versions.use(batchnorm=1)); the op
contract's functions take no version argument.

    y, stats = conv2d_forward_bn_stats(x, w, stride, padding)          # kernels/conv.py
    y, mean, invstd = batchnorm_forward_train_from_stats(y, stats, gamma, beta, running_mean, running_var,
                                                         relu=True)
"""

import numpy as np

from . import versions
from .runtime.launch import FLOAT_DTYPES, array_module, blocks_for, check_array, empty, empty_like, module

__all__ = ["batchnorm_forward_train", "batchnorm_forward_inference", "batchnorm_backward",
           "batchnorm_relu_forward_train", "batchnorm_relu_backward",
           "batchnorm_add_relu_forward_train", "batchnorm_add_relu_backward", "batchnorm_batch_stats",
           "batchnorm_forward_train_from_stats", "batchnorm_chan_partials",
           "batchnorm_relu_grad_partials", "batchnorm_backward_from_partials",
           "batchnorm_backward_from_partials_pair", "batchnorm_partial_stats", "batchnorm_backward_reduce", "batchnorm_backward_elemt"]

_TILE_C, _ROWS = 32, 8          # blockDim = (32, 8): must match BN_TILE_C, BN_ROWS in the .cu
_BLOCK = (_TILE_C, _ROWS, 1)
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


def _kernel(name):
    return module("batchnorm.cu").get_function(name)


def _grid(M, C, xp, reduction):
    """(tiles of 32 channels, row slices).  On the GPU: enough blocks to fill it (about 1024 for
    a reduction, whose partial results grow with the slices; up to 65535 slices for the
    elementwise passes); on the emulator, which runs blocks one after another, at most 4."""
    tiles = -(-C // _TILE_C)
    if xp is np:
        slices = min(4, -(-M // 32))
    elif reduction:
        slices = min(max(1, 1024 // tiles), -(-M // (_ROWS * 16)), 65535)
    else:
        slices = min(-(-M // (_ROWS * 4)), 65535)
    return tiles, max(1, slices)


_F16 = np.dtype(np.float16)


def _data_ptr(a):
    return int(a.data.ptr) if type(a).__module__.split(".")[0] == "cupy" else int(a.__array_interface__["data"][0])


def _x8(x, C, *arrays):
    """The *_f16x8 kernels apply: float16, C a multiple of 8 whose C/8 groups divide the 256 threads
    of a block, every activation array 16-byte aligned."""
    return (x.dtype == _F16 and C % 8 == 0 and 256 % (C // 8) == 0
            and all(_data_ptr(a) % 16 == 0 for a in (x,) + arrays if a is not None))


def _x8_grid(M, C, xp):
    return (blocks_for(M * (C // 8), 256, xp),), (256,)


def _check_x(op, name, x):
    check_array(op, name, x, dtype=FLOAT_DTYPES, ndim=(2, 4))
    return x.shape[-1]


def _check_like(op, name, a, x):
    check_array(op, name, a, dtype=x.dtype, shape=x.shape)


def _check_channel_vectors(op, C, writable=(), **vectors):
    for name, v in vectors.items():
        check_array(op, name, v, dtype=np.float32, shape=(C,))
        if name in writable and not getattr(v.flags, "writeable", True):
            raise ValueError(f"{op}: {name} is updated in place but the array is read-only")


def _check_scalars(op, eps, momentum=None):
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: momentum must be in [0, 1], got {momentum}")


def _batch_stats(op, x, eps, momentum, running_mean, running_var, want_var=False, version=None):
    """Launch the statistics passes of `version` (None: the version in use).  Returns
    (saved_mean, saved_invstd, batch_var or None)."""
    version = versions.version("batchnorm", version, op)
    xp = array_module(x)
    C = x.shape[-1]
    M = x.size // C if C else 0
    if M < 2:
        raise ValueError(f"{op}: needs more than one value per channel (M = N*H*W >= 2), got x shape {tuple(x.shape)}")
    sfx = _SUFFIX[x.dtype]
    mean = empty(xp, C, dtype=np.float32)
    invstd = empty(xp, C, dtype=np.float32)
    var = empty(xp, C, dtype=np.float32) if want_var else None
    if version == 1:   # one thread per channel, sum and sum of squares
        _kernel(f"batchnorm_stats_naive_{sfx}")(
            (-(-C // 128),), (128,),
            (x, np.int64(M), np.int32(C), np.float32(eps), np.float32(momentum), mean, invstd, var, running_mean,
             running_var))
        return mean, invstd, var
    tiles, G = _grid(M, C, xp, reduction=True)
    part = empty(xp, (3, G, C), dtype=np.float32)    # count, mean, M2 per (row slice, channel)
    _kernel(f"batchnorm_stats_partial_{sfx}")((tiles, G), _BLOCK, (x, part[0], part[1], part[2], np.int64(M),
                                                                  np.int32(C)))
    _kernel(f"batchnorm_stats_finalize_{sfx}")(
        (-(-C // 128),), (128,),
        (x, part[0], part[1], part[2], np.int32(G), np.int64(M), np.int32(C), np.float32(eps),
         np.float32(momentum), mean, invstd, var, running_mean, running_var))
    return mean, invstd, var


def _forward_train(op, mode, x, residual, gamma, beta, running_mean, running_var, eps, momentum):
    C = _check_x(op, "x", x)
    if residual is not None:
        _check_like(op, "residual", residual, x)
    _check_channel_vectors(op, C, ("running_mean", "running_var"), gamma=gamma, beta=beta,
                           running_mean=running_mean, running_var=running_var)
    _check_scalars(op, eps, momentum)
    array_module(x, residual, gamma, beta, running_mean, running_var)   # refuses mixed devices
    mean, invstd, _ = _batch_stats(op, x, eps, momentum, running_mean, running_var)
    return _apply(mode, x, residual, gamma, beta, mean, invstd), mean, invstd


def _apply(mode, x, residual, gamma, beta, mean, invstd):
    """The normalising pass of the training forward: y = (x - mean) * invstd * gamma + beta, then
    the ReLU or the residual add and ReLU of `mode`."""
    xp = array_module(x)
    C = x.shape[-1]
    M = x.size // C
    y = empty_like(x)
    name = {"plain": "batchnorm_apply", "relu": "batchnorm_relu_apply", "add_relu": "batchnorm_add_relu_apply"}[mode]
    args = (x, residual, y, gamma, beta, mean, invstd, np.int64(M), np.int32(C))
    if versions.version("batchnorm") >= 4 and M:   # rows of 16-byte vectors, constants loaded once a thread
        V, GX, TY = _rows_layout(C, x, residual, y, gamma, beta, mean, invstd)
        _kernel(f"{name}_rows_{_SUFFIX[x.dtype]}x{V}")(_rows_grid(M, C, V, GX, TY, xp, reduction=False), (GX, TY),
                                                      args)
    elif _x8(x, C, residual, y):   # float16, 8 channels per thread as 16-byte vectors
        _kernel(f"{name}_f16x8")(*_x8_grid(M, C, xp), args)
    else:
        _kernel(f"{name}_{_SUFFIX[x.dtype]}")(_grid(M, C, xp, reduction=False), _BLOCK, args)
    return y


def batchnorm_forward_train(x, gamma, beta, running_mean, running_var, eps=1e-5, momentum=0.1):
    """Batch norm with the statistics of this batch (training mode).

    x: float32/float16 [N, H, W, C] or [M, C]; gamma, beta, running_mean, running_var: float32 [C].
    Returns (y like x, saved_mean float32 [C], saved_invstd float32 [C]) with
    saved_invstd = 1/sqrt(var + eps), var the biased batch variance.  running_mean/running_var
    are updated IN PLACE: running = (1 - momentum) * running + momentum * batch statistic, with
    the unbiased variance var * M / (M - 1) for running_var.
    """
    return _forward_train("batchnorm_forward_train", "plain", x, None, gamma, beta, running_mean, running_var,
                          eps, momentum)


def batchnorm_relu_forward_train(x, gamma, beta, running_mean, running_var, eps=1e-5, momentum=0.1):
    """y = relu(batchnorm_train(x)) in one pass over x; arguments, returns and in-place running
    statistics as batchnorm_forward_train."""
    return _forward_train("batchnorm_relu_forward_train", "relu", x, None, gamma, beta, running_mean,
                          running_var, eps, momentum)


def batchnorm_add_relu_forward_train(x, residual, gamma, beta, running_mean, running_var, eps=1e-5,
                                     momentum=0.1):
    """y = relu(batchnorm_train(x) + residual) (the end of a bottleneck block) in one pass.

    residual: same shape and dtype as x.  Returns (y, saved_mean, saved_invstd); running
    statistics IN PLACE, as batchnorm_forward_train.
    """
    return _forward_train("batchnorm_add_relu_forward_train", "add_relu", x, residual, gamma, beta,
                          running_mean, running_var, eps, momentum)


def batchnorm_chan_partials(x):
    """Batch-norm partials of x [N, H, W, C] or [M, C] (float32/float16), as version 3 takes them:
    float32 [4, G, C], rows (count, shift, mean - shift, M2) per slice of rows and channel
    (batchnorm_chan_partials_*: version 2's row slices, shift x[0, c]).  What the convolutions that
    cannot write them in their epilogue (conv.cu versions 1 and 2, cuDNN) give batch norm instead:
    the same statistics, for one more read of x."""
    op = "batchnorm_chan_partials"
    C = _check_x(op, "x", x)
    xp = array_module(x)
    M = x.size // C if C else 0
    if M < 1 or C < 1:
        raise ValueError(f"{op}: x has no values (shape {tuple(x.shape)})")
    tiles, G = _grid(M, C, xp, reduction=True)
    stats = empty(xp, (4, G, C), dtype=np.float32)
    _kernel(f"batchnorm_chan_partials_{_SUFFIX[x.dtype]}")((tiles, G), _BLOCK, (x, stats, np.int64(M), np.int32(C)))
    return stats


def batchnorm_forward_train_from_stats(x, stats, gamma, beta, running_mean, running_var, eps=1e-5, momentum=0.1,
                                       relu=False, residual=None):
    """Batch norm in training mode with its statistics given as partials (version 3): what
    batchnorm_forward_train (relu: _relu_, residual: _add_relu_) returns and updates, for one read
    of x instead of two.

    stats: float32 [4, P, C], rows (count, shift, mean - shift, M2) per block of x's rows and
    channel, as conv2d_forward_bn_stats (kernels/conv.py) or batchnorm_chan_partials give them; they
    must be x's (nothing reads x to check).  Two launches merge them (batchnorm_partials_reduce over
    slices of blocks, in double; batchnorm_partials_finalize: saved mean and invstd, running
    statistics IN PLACE), one normalises.  residual (same shape and dtype as x) needs relu=True.
    -> (y like x, saved_mean float32 [C], saved_invstd float32 [C]).
    """
    op = "batchnorm_forward_train_from_stats"
    C = _check_x(op, "x", x)
    if residual is not None:
        if not relu:
            raise ValueError(f"{op}: residual is only supported together with relu=True")
        _check_like(op, "residual", residual, x)
    check_array(op, "stats", stats, dtype=np.float32, ndim=3)
    if stats.shape[0] != 4 or stats.shape[2] != C or stats.shape[1] < 1:
        raise ValueError(f"{op}: stats must be [4, P, {C}] (count, shift, offset, M2 per block of rows), got shape "
                         f"{tuple(stats.shape)}")
    _check_channel_vectors(op, C, ("running_mean", "running_var"), gamma=gamma, beta=beta,
                           running_mean=running_mean, running_var=running_var)
    _check_scalars(op, eps, momentum)
    array_module(x, stats, residual, gamma, beta, running_mean, running_var)   # refuses mixed devices
    xp = array_module(x)
    M = x.size // C if C else 0
    if M < 2:
        raise ValueError(f"{op}: needs more than one value per channel (M = N*H*W >= 2), got x shape {tuple(x.shape)}")
    P = stats.shape[1]
    tiles, G = _grid(P, C, xp, reduction=True)
    sums = empty(xp, (3, G, C), dtype=np.float64)     # N, S, Q per (slice of blocks, channel)
    _kernel("batchnorm_partials_reduce")((tiles, G), _BLOCK, (stats, np.int32(P), np.int32(C), sums))
    mean = empty(xp, C, dtype=np.float32)
    invstd = empty(xp, C, dtype=np.float32)
    _kernel("batchnorm_partials_finalize")(
        (-(-C // 128),), (128,), (stats, sums, np.int32(G), np.int32(P), np.int32(C), np.float32(eps),
                                  np.float32(momentum), mean, invstd, running_mean, running_var))
    mode = "add_relu" if residual is not None else "relu" if relu else "plain"
    return _apply(mode, x, residual, gamma, beta, mean, invstd), mean, invstd


def batchnorm_forward_inference(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta (evaluation mode).

    x: float32/float16 [N, H, W, C] or [M, C]; the rest float32 [C].  -> y like x.
    """
    op = "batchnorm_forward_inference"
    C = _check_x(op, "x", x)
    _check_channel_vectors(op, C, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    _check_scalars(op, eps)
    array_module(x, gamma, beta, running_mean, running_var)
    xp = array_module(x)
    y = empty_like(x)
    M = x.size // C if C else 0
    if M:
        args = (x, y, gamma, beta, running_mean, running_var, np.float32(eps), np.int64(M), np.int32(C))
        if versions.version("batchnorm") >= 4:
            V, GX, TY = _rows_layout(C, x, y, gamma, beta, running_mean, running_var)
            _kernel(f"batchnorm_inference_rows_{_SUFFIX[x.dtype]}x{V}")(
                _rows_grid(M, C, V, GX, TY, xp, reduction=False), (GX, TY), args)
        elif _x8(x, C, y):
            _kernel("batchnorm_inference_f16x8")(*_x8_grid(M, C, xp), args)
        else:
            _kernel(f"batchnorm_inference_{_SUFFIX[x.dtype]}")(_grid(M, C, xp, reduction=False), _BLOCK, args)
    return y


def _backward(op, mode, dy, y, x, gamma, saved_mean, saved_invstd):
    C = _check_x(op, "x", x)
    _check_like(op, "dy", dy, x)
    if y is not None:
        _check_like(op, "y", y, x)
    _check_channel_vectors(op, C, gamma=gamma, saved_mean=saved_mean, saved_invstd=saved_invstd)
    array_module(dy, y, x, gamma, saved_mean, saved_invstd)
    xp = array_module(x)
    M = x.size // C if C else 0
    if M < 1:
        raise ValueError(f"{op}: x has no rows (shape {tuple(x.shape)})")
    sfx = _SUFFIX[x.dtype]
    relu = "relu_" if mode != "plain" else ""
    dgamma = empty(xp, C, dtype=np.float32)
    dbeta = empty(xp, C, dtype=np.float32)
    if versions.version("batchnorm") >= 4:
        return _backward_rows(mode, dy, y, x, gamma, saved_mean, saved_invstd, dgamma, dbeta, M, C, xp)
    if versions.version("batchnorm") == 1:   # one thread per channel
        _kernel(f"batchnorm_{relu}backward_sums_naive_{sfx}")(
            (-(-C // 128),), (128,), (dy, y, x, saved_mean, saved_invstd, dgamma, dbeta, np.int64(M), np.int32(C)))
    else:
        tiles, G = _grid(M, C, xp, reduction=True)
        part = empty(xp, (2, G, C), dtype=np.float32)   # sum dz, sum dz * (x - mean) per (row slice, channel)
        _kernel(f"batchnorm_{relu}backward_partial_{sfx}")(
            (tiles, G), _BLOCK, (dy, y, x, saved_mean, part[0], part[1], np.int64(M), np.int32(C)))
        _kernel("batchnorm_backward_finalize")((-(-C // 128),), (128,),
                                               (part[0], part[1], np.int32(G), np.int32(C), saved_invstd, dgamma,
                                                dbeta))
    dx = empty_like(x)
    dresidual = empty_like(x) if mode == "add_relu" else None
    name = {"plain": "batchnorm_backward_dx", "relu": "batchnorm_relu_backward_dx",
            "add_relu": "batchnorm_add_relu_backward_dx"}[mode]
    args = (dy, y, x, gamma, saved_mean, saved_invstd, dgamma, dbeta, dx, dresidual, np.int64(M), np.int32(C))
    if _x8(x, C, dy, y, dx, dresidual):
        _kernel(f"{name}_f16x8")(*_x8_grid(M, C, xp), args)
    else:
        _kernel(f"{name}_{sfx}")(_grid(M, C, xp, reduction=False), _BLOCK, args)
    return dx, dresidual, dgamma, dbeta


_ROW_THREADS = 256     # BN_VEC_THREADS in the .cu: threads of a version 4 block
_FOLD_ABOVE, _FOLD_ROWS = 512, 64   # version 5: more partials than this are folded in groups of 64 rows first


def _rows_layout(C, *arrays):
    """Version 4's thread layout: (V, GX, TY) = channels per thread (a 16-byte vector where C is a
    multiple of it and every array, activations and per-channel float32 vectors, starts on a
    16-byte boundary, else 1), channel groups side by side in a block, rows of threads in a block."""
    V = 16 // arrays[0].dtype.itemsize
    if C % V or any(_data_ptr(a) % 16 for a in arrays if a is not None):
        V = 1
    GX = min(C // V, _ROW_THREADS)
    return V, GX, _ROW_THREADS // GX


def _rows_grid(M, C, V, GX, TY, xp, reduction):
    """(tiles of GX channel groups, slices of rows).  On the GPU the reduction gets about 2048 blocks
    (at least 8 rows a thread), several waves of blocks on any GPU, and the elementwise passes 8 rows
    a thread; the emulator, which runs blocks one after another, gets at most 4 slices."""
    tiles = -(-(C // V) // GX)
    if xp is np:
        slices = min(4, -(-M // TY))
    else:   # about 2048 blocks for a reduction, 8 rows a thread for an elementwise pass
        slices = min(max(1, 2048 // tiles) if reduction else 65535, -(-M // (TY * 8)), 65535)
    return tiles, max(1, slices)


def _backward_rows(mode, dy, y, x, gamma, saved_mean, saved_invstd, dgamma, dbeta, M, C, xp):
    """Version 4's backward (batchnorm.cu, "version 4"): the reduction (and, with add + ReLU,
    dresidual), its finalize, and dx, in 16-byte vectors."""
    dx = empty_like(x)
    dresidual = empty_like(x) if mode == "add_relu" else None
    coef = empty(xp, (3, C), dtype=np.float32)   # pass 3's per-channel constants
    V, GX, TY = _rows_layout(C, x, dy, y, dx, dresidual, saved_mean, coef)
    form = f"{_SUFFIX[x.dtype]}x{V}"
    prefix = {"plain": "batchnorm", "relu": "batchnorm_relu", "add_relu": "batchnorm_add_relu"}[mode]
    tiles, G = _rows_grid(M, C, V, GX, TY, xp, reduction=True)
    part = empty(xp, (2, G, C), dtype=np.float32)   # sum dz, sum dz * (x - mean) per (row slice, channel)
    # the ReLU form in vectors: y > 0 as one byte of bits per row and vector, for dx
    mask = empty(xp, M * C // V, dtype=np.uint8) if mode == "relu" and V > 1 else None
    _kernel(f"{prefix}_backward_reduce_{form}")(
        (tiles, G), (GX, TY), (dy, y, x, saved_mean, dresidual, mask, part, np.int64(M), np.int32(C)))
    _kernel("batchnorm_backward_reduce_finalize")((-(-C // _TILE_C),), (_TILE_C, 32),
                                                  (part, np.int32(G), np.int32(C), np.int64(M), gamma, saved_invstd,
                                                   dgamma, dbeta, coef))
    # dx from dz: the add + ReLU form's dresidual is dz; the ReLU form masks dy by the bits (or y itself)
    dz = dresidual if mode == "add_relu" else dy
    name = "batchnorm_relu_backward_dx_rows" if mode == "relu" else "batchnorm_backward_dx_rows"
    _kernel(f"{name}_{form}")(_rows_grid(M, C, V, GX, TY, xp, reduction=False), (GX, TY),
                              (dz, y if mode == "relu" else None, mask, x, saved_mean, coef, dx, np.int64(M),
                               np.int32(C)))
    return dx, dresidual, dgamma, dbeta


def batchnorm_backward(dy, x, gamma, saved_mean, saved_invstd):
    """Gradients of batchnorm_forward_train.

    dy, x: float32/float16 [N, H, W, C] or [M, C] (same shape and dtype); gamma, saved_mean,
    saved_invstd: float32 [C] (the last two from the forward).
    -> (dx like x, dgamma float32 [C], dbeta float32 [C]).
    """
    dx, _, dgamma, dbeta = _backward("batchnorm_backward", "plain", dy, None, x, gamma, saved_mean, saved_invstd)
    return dx, dgamma, dbeta


def batchnorm_relu_backward(dy, y, x, gamma, saved_mean, saved_invstd):
    """Gradients of batchnorm_relu_forward_train; y is its output (the ReLU mask is y > 0).

    -> (dx like x, dgamma float32 [C], dbeta float32 [C]).
    """
    dx, _, dgamma, dbeta = _backward("batchnorm_relu_backward", "relu", dy, y, x, gamma, saved_mean, saved_invstd)
    return dx, dgamma, dbeta


def batchnorm_add_relu_backward(dy, y, x, gamma, saved_mean, saved_invstd):
    """Gradients of batchnorm_add_relu_forward_train; y is its output (the ReLU mask is y > 0).

    -> (dx like x, dresidual like x (= dy where y > 0), dgamma float32 [C], dbeta float32 [C]).
    """
    return _backward("batchnorm_add_relu_backward", "add_relu", dy, y, x, gamma, saved_mean, saved_invstd)


def batchnorm_relu_grad_partials(dy, y, x, saved_mean):
    """(g, part): g = dy where y > 0, else 0 (like dy), and the batch-norm backward's partial sums
    part float32 [2, G, C] per slice of rows: [sum g, sum g * (x - saved_mean)] -- the first half of
    a batch norm's backward behind a ReLU whose output is y, for batchnorm_backward_from_partials.
    What conv2d_backward_data_relu_bn returns when the convolution has no such epilogue (conv.cu
    versions 1 and 2, cuDNN): one read of dy, y and x and one write of g, by version 4's add + ReLU
    reduction (whose dresidual is g)."""
    op = "batchnorm_relu_grad_partials"
    C = _check_x(op, "x", x)
    _check_like(op, "dy", dy, x)
    _check_like(op, "y", y, x)
    _check_channel_vectors(op, C, saved_mean=saved_mean)
    xp = array_module(dy, y, x, saved_mean)
    M = x.size // C
    if M < 1:
        raise ValueError(f"{op}: x has no rows (shape {tuple(x.shape)})")
    g = empty_like(x)
    V, GX, TY = _rows_layout(C, x, dy, y, g, saved_mean)
    tiles, G = _rows_grid(M, C, V, GX, TY, xp, reduction=True)
    part = empty(xp, (2, G, C), dtype=np.float32)
    _kernel(f"batchnorm_add_relu_backward_reduce_{_SUFFIX[x.dtype]}x{V}")(
        (tiles, G), (GX, TY), (dy, y, x, saved_mean, g, None, part, np.int64(M), np.int32(C)))
    return g, part


def batchnorm_backward_from_partials(g, x, gamma, saved_mean, saved_invstd, part):
    """Gradients of a training-mode batch norm from g, its output's gradient after any ReLU's mask,
    and the partial sums part float32 [2, B, C] (sum g, sum g * (x - saved_mean) per block of rows)
    that the convolution after it wrote in its backward-data epilogue (conv2d_backward_data_relu_bn)
    or batchnorm_relu_grad_partials computed.  Batch norm version 5: what is left of the backward
    is version 4's finalize (the B partials of each channel added in order, in double) and its dx
    pass, one read of g and x and one write of dx.

    -> (dx like x, dgamma float32 [C], dbeta float32 [C])."""
    return _from_partials("batchnorm_backward_from_partials", g, x, gamma, saved_mean, saved_invstd, part)


def batchnorm_backward_from_partials_pair(g, x, gamma, saved_mean, saved_invstd, part, x2, mean2):
    """batchnorm_backward_from_partials for the first of two batch norms whose outputs are added
    (ResNet's projection block, relu(bn(x) + bn2(x2))): behind the add both have the output gradient
    g, so its dx pass (batchnorm_backward_dx_rows_pair_*) also sums what the second needs, over x2
    (bn2's input, batch mean mean2): x2 read once there, instead of g and x2 by a reduction of bn2's
    own.  -> (dx, dgamma, dbeta, part2), part2 float32 [2, G, C]: per slice of rows, [sum g,
    sum g * (x2 - mean2)], for batchnorm_backward_from_partials(g, x2, ...) of the second."""
    return _from_partials("batchnorm_backward_from_partials_pair", g, x, gamma, saved_mean, saved_invstd, part,
                          pair=(x2, mean2))


def _from_partials(op, g, x, gamma, saved_mean, saved_invstd, part, pair=None):
    """Batch norm 5's backward from part [2, B, C]: the fold past 512 partials, the finalize, the dx
    pass (with pair = (x2, mean2), the pair form's dx pass, which returns part2 as well)."""
    C = _check_x(op, "x", x)
    _check_like(op, "g", g, x)
    _check_channel_vectors(op, C, gamma=gamma, saved_mean=saved_mean, saved_invstd=saved_invstd)
    if pair is not None:
        _check_like(op, "x2", pair[0], x)
        _check_channel_vectors(op, C, mean2=pair[1])
    if getattr(part, "ndim", 0) != 3 or part.shape[0] != 2 or part.shape[1] < 1 or part.shape[2] != C:
        raise ValueError(f"{op}: part must be [2, B, {C}] (sum g, sum g * (x - mean) per block of rows), "
                         f"got shape {tuple(getattr(part, 'shape', ()))}")
    check_array(op, "part", part, dtype=np.float32)
    xp = array_module(g, x, gamma, saved_mean, saved_invstd, part, *(pair or ()))
    M = x.size // C
    if M < 1:
        raise ValueError(f"{op}: x has no rows (shape {tuple(x.shape)})")
    dgamma = empty(xp, C, dtype=np.float32)
    dbeta = empty(xp, C, dtype=np.float32)
    coef = empty(xp, (3, C), dtype=np.float32)
    B = part.shape[1]
    if B > _FOLD_ABOVE:   # many partials (one per 64-row tile): first fold them in groups, on many blocks
        groups = -(-B // _FOLD_ROWS)
        folded = empty(xp, (2, groups, C), dtype=np.float32)
        _kernel("batchnorm_backward_partials_fold")((-(-C // _TILE_C), groups), _BLOCK,
                                                    (part, np.int32(B), np.int32(C), np.int32(_FOLD_ROWS), folded))
        part, B = folded, groups
    _kernel("batchnorm_backward_reduce_finalize")((-(-C // _TILE_C),), (_TILE_C, 32),
                                                  (part, np.int32(B), np.int32(C), np.int64(M), gamma,
                                                   saved_invstd, dgamma, dbeta, coef))
    dx = empty_like(x)
    if pair is None:
        V, GX, TY = _rows_layout(C, x, g, dx, saved_mean, coef)
        _kernel(f"batchnorm_backward_dx_rows_{_SUFFIX[x.dtype]}x{V}")(
            _rows_grid(M, C, V, GX, TY, xp, reduction=False), (GX, TY),
            (g, None, None, x, saved_mean, coef, dx, np.int64(M), np.int32(C)))
        return dx, dgamma, dbeta
    x2, mean2 = pair
    V, GX, TY = _rows_layout(C, x, g, dx, saved_mean, coef, x2, mean2)
    tiles, G = _rows_grid(M, C, V, GX, TY, xp, reduction=True)   # a slice of rows per block: its sums
    part2 = empty(xp, (2, G, C), dtype=np.float32)
    _kernel(f"batchnorm_backward_dx_rows_pair_{_SUFFIX[x.dtype]}x{V}")(
        (tiles, G), (GX, TY), (g, x, saved_mean, coef, dx, x2, mean2, part2, np.int64(M), np.int32(C)))
    return dx, dgamma, dbeta, part2


def batchnorm_batch_stats(x, version=None):
    """Per-channel mean and biased variance of x [N, H, W, C] or [M, C] -> (mean, var), float32 [C].

    version 2 (what versions 3 and 4 run here): shifted Welford + Chan merges;
    version 1: one thread per channel, var = E[x^2] - E[x]^2 in float32 -- the textbook formula,
    kept to show how it fails when |mean| >> std.  None: the version in use.
    """
    op = "batchnorm_batch_stats"
    _check_x(op, "x", x)
    mean, _, var = _batch_stats(op, x, 0.0, 0.0, None, None, want_var=True, version=version)
    return mean, var


# ------------------------------------------------------------------ synchronised batch norm
# Launchers of kernels/batchnorm_sync.cu: the per-process reductions and the elementwise pass
# that nn/distributed.py's synchronised batch norm puts around its all-reduces.

def _sync_kernel(name):
    return module("batchnorm_sync.cu").get_function(name)


def _sync_reduce(kernel, args, M, C, xp):
    """Two launches: partial sums per row chunk [G, 2, C], then their ordered sum [2, C]."""
    tiles, chunks = _grid(M, C, xp, reduction=True)
    partial = empty(xp, (chunks, 2, C), dtype=np.float32)
    _sync_kernel(kernel)((tiles, chunks), _BLOCK, args + (partial, np.int64(M), np.int32(C)))
    out = empty(xp, (2, C), dtype=np.float32)
    blocks = blocks_for(2 * C, 256, xp)
    _sync_kernel("bn_sync_sum_partials")((blocks,), (256,), (partial, out, np.int32(chunks), np.int32(C)))
    return out


def batchnorm_partial_stats(x, shift):
    """This process's share of the batch statistics: float32 [3, C] rows (count, s1, s2) with
    s1 = sum (x - shift), s2 = sum (x - shift)^2 per channel.  x: [N, H, W, C] or [M, C]
    float32/float16; shift: float32 [C] (shared by every process, e.g. the running mean)."""
    op = "batchnorm_partial_stats"
    C = _check_x(op, "x", x)
    _check_channel_vectors(op, C, shift=shift)
    xp = array_module(x, shift)
    M = x.size // C if C else 0
    stats = xp.zeros((3, C), dtype=np.float32)
    stats[0] = M
    if M and C:
        stats[1:] = _sync_reduce(f"bn_sync_partial_stats_{_SUFFIX[x.dtype]}", (x, shift), M, C, xp)
    return stats


def batchnorm_backward_reduce(dy, x, saved_mean, saved_invstd):
    """This process's (sum dy, sum dy * xhat) per channel: float32 [2, C]."""
    op = "batchnorm_backward_reduce"
    C = _check_x(op, "x", x)
    _check_like(op, "dy", dy, x)
    _check_channel_vectors(op, C, saved_mean=saved_mean, saved_invstd=saved_invstd)
    xp = array_module(dy, x, saved_mean, saved_invstd)
    M = x.size // C if C else 0
    if not (M and C):
        return xp.zeros((2, C), dtype=np.float32)
    return _sync_reduce(f"bn_sync_backward_reduce_{_SUFFIX[x.dtype]}", (dy, x, saved_mean, saved_invstd), M, C, xp)


def batchnorm_backward_elemt(dy, x, gamma, saved_mean, saved_invstd, sums, count):
    """dx = gamma * invstd * (dy - sums[0]/count - xhat * sums[1]/count), from the reductions
    summed over every process (sums float32 [2, C]) and the global number of rows `count`."""
    op = "batchnorm_backward_elemt"
    C = _check_x(op, "x", x)
    _check_like(op, "dy", dy, x)
    _check_channel_vectors(op, C, gamma=gamma, saved_mean=saved_mean, saved_invstd=saved_invstd)
    check_array(op, "sums", sums, dtype=np.float32, shape=(2, C))
    if not count > 0:
        raise ValueError(f"{op}: count must be > 0, got {count}")
    xp = array_module(dy, x, gamma, sums)
    dx = empty_like(dy)
    M = x.size // C if C else 0
    if M and C:
        blocks = blocks_for(M * C, 256, xp)
        _sync_kernel(f"bn_sync_backward_elemt_{_SUFFIX[x.dtype]}")(
            (blocks,), (256,), (dy, x, gamma, saved_mean, saved_invstd, sums, np.float32(1.0 / count), dx,
                                np.int64(M), np.int32(C)))
    return dx


if __name__ == "__main__":   # `python -m kernels.batchnorm ARGS` is `python -m kernels batchnorm ARGS` (the lesson)
    import runpy
    import sys
    sys.argv[1:1] = ["batchnorm"]
    runpy.run_module("kernels", run_name="__main__")
