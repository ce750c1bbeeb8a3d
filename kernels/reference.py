"""NumPy reference implementations of every op in the op contract (kernels/contract.py).

This one file plays two parts:

1. It is the `cpu` device of nn/: the autograd calls these functions directly when a model lives
   on the CPU, so they are vectorised (no Python loops over pixels) and convolution is
   im2col + one BLAS matrix multiply, fast enough to train a small ResNet on a laptop.
2. It is the reference every CUDA kernel in kernels/ is tested against: `kernels/ops.py` exposes
   the same functions with the same signatures, and its tests compare against these.

So every op here is written to be obviously correct first, and fast second. Each op starts with
a short comment giving its math.

Conventions (the same for kernels/ops.py):
- Activations are NHWC: x[N, H, W, C]. Convolution weights are OIHW: w[K, C, R, S] (as
  torchvision). Linear weights are [out, in]. Labels are integer class indices [N].
- Any float dtype is accepted (float64 is used by the gradient checks). Statistics of float16
  inputs are accumulated in float32; outputs keep the dtype of the main input.
- Functions return NEW arrays, except where "IN PLACE" is stated (BN running statistics, SGD).
- Bad input raises ValueError / TypeError naming the argument.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# The layout table of flat parameter buffers is plain host data (offsets, per-tensor weight decay
# and LARS mask) plus device copies for the kernels; one class serves both implementations.
from .optimizer import ParamSegments

__all__ = [
    "conv2d_forward", "conv2d_forward_bn_stats", "conv2d_backward_data", "conv2d_backward_data_relu_bn",
    "conv2d_backward_weight", "conv_weight", "linear_forward", "linear_backward",
    "batchnorm_forward_train", "batchnorm_forward_train_from_stats", "batchnorm_forward_inference",
    "batchnorm_backward",
    "batchnorm_relu_forward_train", "batchnorm_relu_backward",
    "batchnorm_add_relu_forward_train", "batchnorm_add_relu_backward",
    "batchnorm_partial_stats", "batchnorm_backward_reduce", "batchnorm_backward_elemt",
    "batchnorm_relu_grad_partials", "batchnorm_backward_from_partials", "batchnorm_backward_from_partials_pair",
    "relu_forward", "relu_backward", "add", "add_relu_forward",
    "maxpool2d_forward", "maxpool2d_backward", "maxpool2d_backward_relu_bn", "global_avgpool_backward_relu_bn",
    "global_avgpool_forward", "global_avgpool_backward",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "topk_correct", "accumulate_loss",
    "sgd_momentum_update", "lars_trust_ratio", "global_grad_norm",
    "ParamSegments", "momentum_update_flat", "lars_trust_ratio_flat", "nonfinite_flag", "loss_scale_update",
    "input_normalize", "cast",
]


# ----------------------------------------------------------------------------------------------
# small checks shared by the ops


def _check_ndim(name, a, ndim, layout):
    if not hasattr(a, "ndim") or a.ndim != ndim:
        got = getattr(a, "shape", type(a).__name__)
        raise ValueError(f"{name} must be a {ndim}-d array {layout}, got shape {got}")


def _check_float(name, a):
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")


def _stat_dtype(dtype):
    """Accumulation dtype for reductions: at least float32 (float16 sums lose too much)."""
    return np.promote_types(dtype, np.float32)


def _out_size(size, k, stride, padding, what):
    out = (size + 2 * padding - k) // stride + 1
    if out <= 0:
        raise ValueError(f"{what}: input size {size} with kernel {k}, stride {stride}, padding "
                         f"{padding} gives an empty output")
    return out


# ----------------------------------------------------------------------------------------------
# convolution (NHWC activations, OIHW weights), via im2col + matmul


def _im2col(x, R, S, stride, padding):
    """Patches of x as a matrix.

    x: [N, H, W, C]  ->  cols: [N*P*Q, R*S*C], row (n, p, q) holding the R x S x C window whose
    top-left corner is input pixel (p*stride - padding, q*stride - padding), in (r, s, c) order
    (c fastest, so the copy reads x mostly contiguously).
    """
    N, H, W, C = x.shape
    P = _out_size(H, R, stride, padding, "conv2d")
    Q = _out_size(W, S, stride, padding, "conv2d")
    if padding:
        x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    # windows[n, i, j, c, r, s] = x[n, i + r, j + s, c]  (a view, no copy yet)
    windows = sliding_window_view(x, (R, S), axis=(1, 2))[:, ::stride, ::stride][:, :P, :Q]
    # -> [N, P, Q, R, S, C]; reshape makes the one copy
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(N * P * Q, R * S * C), P, Q


def conv2d_forward(x, w, stride, padding):
    """2-D convolution (cross-correlation), no bias, dilation 1, groups 1.

    y[n, p, q, k] = sum_{c, r, s} x[n, p*stride + r - padding, q*stride + s - padding, c] * w[k, c, r, s]
    (x is zero outside the image).

    x: [N, H, W, C] (NHWC), w: [K, C, R, S] (OIHW)  ->  y: [N, P, Q, K],
    P = (H + 2*padding - R)//stride + 1, Q likewise. dtype of x.
    """
    _check_ndim("x", x, 4, "[N, H, W, C]")
    _check_ndim("w", w, 4, "[K, C, R, S]")
    N, H, W, C = x.shape
    K, Cw, R, S = w.shape
    if Cw != C:
        raise ValueError(f"conv2d: x has {C} channels (last axis, NHWC) but w expects {Cw} (w.shape[1])")
    if R == 1 and S == 1 and padding == 0:
        # 1x1 convolution: a plain matrix multiply over the (strided) pixels
        xs = x[:, ::stride, ::stride] if stride > 1 else x
        P, Q = xs.shape[1], xs.shape[2]
        y = xs.reshape(-1, C) @ w.reshape(K, C).T
        return y.reshape(N, P, Q, K)
    cols, P, Q = _im2col(x, R, S, stride, padding)
    w_mat = w.transpose(0, 2, 3, 1).reshape(K, R * S * C)   # [K, (r, s, c)] matches cols
    return (cols @ w_mat.T).reshape(N, P, Q, K)


def conv2d_backward_data(dy, w, x_shape, stride, padding):
    """Gradient of conv2d_forward with respect to x.

    dx[n, h, w, c] = sum over (p, q, r, s) with p*stride + r - padding = h, q*stride + s - padding = w
                     of dy[n, p, q, k] * w[k, c, r, s]
    Computed as dcols = dy @ w_mat (one matmul), then col2im: each of the R*S taps scatters its
    slice back into the padded image (a loop over taps, never over pixels).

    dy: [N, P, Q, K], w: [K, C, R, S], x_shape: (N, H, W, C)  ->  dx: x_shape, dtype of dy.
    """
    _check_ndim("dy", dy, 4, "[N, P, Q, K]")
    _check_ndim("w", w, 4, "[K, C, R, S]")
    N, H, W, C = x_shape
    K, Cw, R, S = w.shape
    P = _out_size(H, R, stride, padding, "conv2d")
    Q = _out_size(W, S, stride, padding, "conv2d")
    if dy.shape != (N, P, Q, K) or Cw != C:
        raise ValueError(f"conv2d_backward_data: dy shape {dy.shape}, w shape {w.shape} and "
                         f"x_shape {tuple(x_shape)} do not fit together (expected dy {(N, P, Q, K)})")
    if R == 1 and S == 1 and padding == 0:
        dxs = dy.reshape(-1, K) @ w.reshape(K, C)
        if stride == 1:
            return dxs.reshape(N, H, W, C)
        dx = np.zeros((N, H, W, C), dtype=dxs.dtype)
        dx[:, ::stride, ::stride] = dxs.reshape(N, P, Q, C)
        return dx
    w_mat = w.transpose(0, 2, 3, 1).reshape(K, R * S * C)
    dcols = (dy.reshape(-1, K) @ w_mat).reshape(N, P, Q, R, S, C)
    Hp, Wp = H + 2 * padding, W + 2 * padding
    dxp = np.zeros((N, Hp, Wp, C), dtype=dcols.dtype)
    for r in range(R):
        for s in range(S):
            # tap (r, s) of output pixel (p, q) read padded input pixel (p*stride + r, q*stride + s)
            dxp[:, r:r + stride * P:stride, s:s + stride * Q:stride] += dcols[:, :, :, r, s]
    return dxp[:, padding:padding + H, padding:padding + W]


def conv2d_backward_data_relu_bn(dy, w, x_shape, stride, padding, a, bn_x, bn_mean, dz=None):
    """(g, part): g = conv2d_backward_data(...) (+ dz) where a > 0, else 0, and the batch-norm
    backward's partial sums of g over all its rows as one block, part [2, 1, C] (statistics dtype):
    [sum g, sum g * (bn_x - bn_mean)] (batchnorm_relu_grad_partials).  a: the convolution's input,
    the output of relu(batchnorm(bn_x) [+ r]) with batch mean bn_mean; a, bn_x (and dz, a's gradient
    from another consumer, added before the mask): shape x_shape."""
    da = conv2d_backward_data(dy, w, x_shape, stride, padding)
    if dz is not None:
        if dz.shape != da.shape:
            raise ValueError(f"conv2d_backward_data_relu_bn: dz shape {dz.shape} differs from x_shape {da.shape}")
        da = (da + dz).astype(da.dtype, copy=False)
    return batchnorm_relu_grad_partials(da, a, bn_x, bn_mean)


def conv2d_backward_weight(x, dy, w_shape, stride, padding, dtype=None):
    """Gradient of conv2d_forward with respect to w.

    dw[k, c, r, s] = sum_{n, p, q} dy[n, p, q, k] * x[n, p*stride + r - padding, q*stride + s - padding, c]
    Computed as dy^T @ im2col(x) (one matmul).

    x: [N, H, W, C], dy: [N, P, Q, K], w_shape: (K, C, R, S)  ->  dw: w_shape (OIHW), in `dtype`
    (None: x's).
    """
    dw = _conv2d_backward_weight(x, dy, w_shape, stride, padding)
    return dw if dtype is None or dw.dtype == np.dtype(dtype) else dw.astype(dtype)


def conv_weight(w, dtype):
    """w as `dtype` (the weight of conv2d_forward / conv2d_backward_data for activations of that
    dtype); w itself when it has it."""
    return w if w.dtype == np.dtype(dtype) else w.astype(dtype)


def _conv2d_backward_weight(x, dy, w_shape, stride, padding):
    _check_ndim("x", x, 4, "[N, H, W, C]")
    _check_ndim("dy", dy, 4, "[N, P, Q, K]")
    N, H, W, C = x.shape
    K, Cw, R, S = w_shape
    P = _out_size(H, R, stride, padding, "conv2d")
    Q = _out_size(W, S, stride, padding, "conv2d")
    if dy.shape != (N, P, Q, K) or Cw != C:
        raise ValueError(f"conv2d_backward_weight: x shape {x.shape}, dy shape {dy.shape} and "
                         f"w_shape {tuple(w_shape)} do not fit together (expected dy {(N, P, Q, K)})")
    if R == 1 and S == 1 and padding == 0:
        xs = x[:, ::stride, ::stride] if stride > 1 else x
        return (dy.reshape(-1, K).T @ xs.reshape(-1, C)).reshape(K, C, 1, 1)
    cols, _, _ = _im2col(x, R, S, stride, padding)
    dw_mat = dy.reshape(-1, K).T @ cols                      # [K, (r, s, c)]
    return dw_mat.reshape(K, R, S, C).transpose(0, 3, 1, 2).copy()


# ----------------------------------------------------------------------------------------------
# fully connected


def linear_forward(x, w, b=None):
    """y = x @ w^T + b.   x: [N, Cin], w: [Cout, Cin], b: [Cout] or None  ->  y: [N, Cout], x's dtype
    (a float32 bias of float16 activations is added, then the sum rounded to float16)."""
    _check_ndim("x", x, 2, "[N, Cin]")
    _check_ndim("w", w, 2, "[Cout, Cin]")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x has {x.shape[1]} features but w expects {w.shape[1]} (w.shape[1])")
    y = x @ w.T
    if b is not None:
        if b.shape != (w.shape[0],):
            raise ValueError(f"linear: b must have shape {(w.shape[0],)}, got {b.shape}")
        y = (y + b).astype(x.dtype, copy=False)
    return y


def linear_backward(dy, x, w, need_bias_grad=True, dtype=None):
    """Gradients of linear_forward: dx = dy @ w, dw = dy^T @ x, db = sum_n dy.

    dy: [N, Cout], x: [N, Cin], w: [Cout, Cin]  ->  (dx [N, Cin], dw [Cout, Cin], db [Cout] or None);
    dw and db in `dtype` (None: dy's).
    """
    _check_ndim("dy", dy, 2, "[N, Cout]")
    dx = dy @ w
    dw = dy.T @ x
    db = dy.sum(axis=0, dtype=_stat_dtype(dy.dtype)) if need_bias_grad else None
    dtype = np.dtype(dy.dtype if dtype is None else dtype)
    dw = dw.astype(dtype, copy=False)
    db = None if db is None else db.astype(dtype, copy=False)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# batch normalisation (statistics per channel = last axis, over all other axes)


def _as_rows(x):
    """View x [N, H, W, C] or [M, C] as [M, C] (channels last)."""
    if x.ndim not in (2, 4):
        raise ValueError(f"batchnorm: x must be [N, H, W, C] or [M, C], got shape {x.shape}")
    return x.reshape(-1, x.shape[-1])


def _check_channels(x, **per_channel):
    C = x.shape[-1]
    for name, a in per_channel.items():
        if a.shape != (C,):
            raise ValueError(f"batchnorm: {name} must have shape ({C},) (x has {C} channels), got {a.shape}")


def batchnorm_forward_train(x, gamma, beta, running_mean, running_var, eps=1e-5, momentum=0.1):
    """Batch normalisation with batch statistics (training mode).

    mean_c = mean over (n, h, w) of x;  var_c = biased variance;  invstd_c = 1/sqrt(var_c + eps)
    y = (x - mean_c) * invstd_c * gamma_c + beta_c
    IN PLACE: running_mean = (1-momentum)*running_mean + momentum*mean_c
              running_var  = (1-momentum)*running_var  + momentum*var_c*M/(M-1)   (unbiased)
    with M = N*H*W values per channel.

    x: [N, H, W, C] or [M, C]; gamma, beta, running_mean, running_var: [C]
    ->  (y like x, saved_mean [C], saved_invstd [C]); saved stats in float32 (float64 for float64 x).
    """
    rows = _bn_train_rows("batchnorm_forward_train", x, gamma, beta, running_mean, running_var)
    sd = _stat_dtype(x.dtype)
    mean = rows.mean(axis=0, dtype=sd)
    centred = rows.astype(sd, copy=False) - mean
    var = np.einsum("mc,mc->c", centred, centred) / rows.shape[0]
    return _bn_train_normalise(x, centred, mean, var, gamma, beta, running_mean, running_var, eps, momentum)


def _bn_train_rows(op, x, gamma, beta, running_mean, running_var):
    _check_float("x", x)
    _check_channels(x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    rows = _as_rows(x)
    if rows.shape[0] < 2:
        raise ValueError(f"{op}: needs more than one value per channel, got x shape {x.shape}")
    return rows


def _bn_train_normalise(x, centred, mean, var, gamma, beta, running_mean, running_var, eps, momentum):
    """The rest of a training forward once the batch statistics are known: y, the running
    statistics (IN PLACE), and what the backward keeps.  centred = rows of x - mean."""
    M = centred.shape[0]
    sd = centred.dtype
    invstd = 1.0 / np.sqrt(var + eps)
    y = centred * (invstd * gamma.astype(sd, copy=False)) + beta.astype(sd, copy=False)
    running_mean *= 1.0 - momentum
    running_mean += (momentum * mean).astype(running_mean.dtype)
    running_var *= 1.0 - momentum
    running_var += (momentum * var * (M / (M - 1))).astype(running_var.dtype)
    return y.astype(x.dtype, copy=False).reshape(x.shape), mean, invstd


def batchnorm_partials(x):
    """Batch-norm partials of x [N, H, W, C] or [M, C] as one block of all its rows: [4, 1, C], rows
    (count M, shift = the mean, offset 0, M2 = sum of squared deviations), in the statistics dtype.
    What conv2d_forward_bn_stats returns here (the kernels split the rows into 64-row blocks)."""
    _check_float("x", x)
    rows = _as_rows(x)
    sd = _stat_dtype(x.dtype)
    mean = rows.mean(axis=0, dtype=sd)             # as batchnorm_forward_train computes them, so that
    centred = rows.astype(sd, copy=False) - mean   # its statistics from these are the same numbers
    stats = np.zeros((4, 1, x.shape[-1]), dtype=sd)
    stats[0] = rows.shape[0]
    stats[1] = mean
    stats[3] = np.einsum("mc,mc->c", centred, centred)
    return stats


def merge_bn_partials(stats):
    """(count, mean, biased variance) per channel, float64 [C] each, of batch-norm partials
    stats [4, P, C] (rows count n_p, shift a_p, offset d_p, M2_p per block p of rows: block p's mean is
    a_p + d_p, M2_p its sum of squared deviations from that mean).  Chan's formula for P parts at
    once, about block 0's mean g = a_0 + d_0, with e_p = (a_p - a_0) + (d_p - d_0):
        N = sum n_p,  S = sum n_p e_p,  Q = sum (M2_p + n_p e_p^2);  mean = g + S/N,  var = (Q - S^2/N) / N
    in float64 (batchnorm.cu's batchnorm_partials_reduce and _finalize do the same)."""
    s = np.asarray(stats, dtype=np.float64)
    if s.ndim != 3 or s.shape[0] != 4 or s.shape[1] < 1:
        raise ValueError(f"batch-norm partials must be [4, P, C] (count, shift, offset, M2), got shape {s.shape}")
    n, a, d, m2 = s
    e = (a - a[0]) + (d - d[0])
    N, S = n.sum(axis=0), (n * e).sum(axis=0)
    Q = (m2 + n * e * e).sum(axis=0)
    return N, (a[0] + d[0]) + S / N, np.maximum(Q - S * (S / N), 0.0) / N


def conv2d_forward_bn_stats(x, w, stride, padding):
    """(y, stats): y = conv2d_forward(x, w, stride, padding) and batchnorm_partials(y), the
    statistics batchnorm_forward_train_from_stats takes (the kernels write them in the convolution's
    epilogue, per 64-row output tile; here they are one block of all of y's rows)."""
    y = conv2d_forward(x, w, stride, padding)
    return y, batchnorm_partials(y)


def batchnorm_forward_train_from_stats(x, stats, gamma, beta, running_mean, running_var, eps=1e-5, momentum=0.1,
                                       relu=False, residual=None):
    """batchnorm_forward_train (relu=True: batchnorm_relu_forward_train; residual: the add + ReLU of
    batchnorm_add_relu_forward_train) with the batch's statistics from partials of x (stats
    [4, P, C], see merge_bn_partials) instead of from x: the same returns and IN PLACE updates.
    With batchnorm_partials(x) (P = 1) the numbers are exactly batchnorm_forward_train's."""
    op = "batchnorm_forward_train_from_stats"
    if residual is not None and not relu:
        raise ValueError(f"{op}: residual is only supported together with relu=True")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual shape {residual.shape} differs from x shape {x.shape}")
    rows = _bn_train_rows(op, x, gamma, beta, running_mean, running_var)
    if stats.ndim != 3 or stats.shape[0] != 4 or stats.shape[2] != x.shape[-1]:
        raise ValueError(f"{op}: stats must be [4, P, {x.shape[-1]}], got shape {stats.shape}")
    sd = _stat_dtype(x.dtype)
    _, mean, var = merge_bn_partials(stats)
    mean, var = mean.astype(sd), var.astype(sd)
    centred = rows.astype(sd, copy=False) - mean
    y, mean, invstd = _bn_train_normalise(x, centred, mean, var, gamma, beta, running_mean, running_var, eps,
                                          momentum)
    if residual is not None:
        y += residual
    if relu:
        np.maximum(y, 0, out=y)
    return y, mean, invstd


def batchnorm_forward_inference(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """Batch normalisation with the running statistics (evaluation mode).

    y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta.
    x: [N, H, W, C] or [M, C]; the rest [C]  ->  y like x.
    """
    _check_float("x", x)
    _check_channels(x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    sd = _stat_dtype(x.dtype)
    scale = gamma.astype(sd) / np.sqrt(running_var.astype(sd) + eps)
    shift = beta.astype(sd) - running_mean.astype(sd) * scale
    return (x * scale + shift).astype(x.dtype, copy=False)


def batchnorm_backward(dy, x, gamma, saved_mean, saved_invstd):
    """Gradients of batchnorm_forward_train (with batch statistics).

    xhat = (x - mean) * invstd
    dbeta_c  = sum dy;   dgamma_c = sum dy * xhat
    dx = gamma * invstd * (dy - dbeta_c/M - xhat * dgamma_c/M)     (sums over the M = N*H*W values)

    dy, x: [N, H, W, C] or [M, C]; gamma, saved_mean, saved_invstd: [C]
    ->  (dx like x, dgamma [C], dbeta [C]); dgamma/dbeta in the statistics dtype (>= float32).
    """
    _check_channels(x, gamma=gamma, saved_mean=saved_mean, saved_invstd=saved_invstd)
    if dy.shape != x.shape:
        raise ValueError(f"batchnorm_backward: dy shape {dy.shape} differs from x shape {x.shape}")
    sd = _stat_dtype(x.dtype)
    dy_rows = _as_rows(dy).astype(sd, copy=False)
    xhat = (_as_rows(x).astype(sd, copy=False) - saved_mean) * saved_invstd
    M = dy_rows.shape[0]
    dbeta = dy_rows.sum(axis=0)
    dgamma = np.einsum("mc,mc->c", dy_rows, xhat)
    dx = (gamma * saved_invstd) * (dy_rows - dbeta / M - xhat * (dgamma / M))
    return dx.astype(dy.dtype, copy=False).reshape(x.shape), dgamma, dbeta


def batchnorm_relu_forward_train(x, gamma, beta, running_mean, running_var, eps=1e-5, momentum=0.1):
    """y = relu(batchnorm_train(x)); same arguments, returns and in-place updates as
    batchnorm_forward_train."""
    y, mean, invstd = batchnorm_forward_train(x, gamma, beta, running_mean, running_var, eps, momentum)
    return np.maximum(y, 0, out=y), mean, invstd


def batchnorm_relu_backward(dy, y, x, gamma, saved_mean, saved_invstd):
    """Gradients of batchnorm_relu_forward_train: the ReLU passes dy where y > 0, then BN backward.

    dy, y (the ReLU output), x: same shape  ->  (dx, dgamma, dbeta).
    """
    return batchnorm_backward(relu_backward(dy, y), x, gamma, saved_mean, saved_invstd)


def batchnorm_add_relu_forward_train(x, residual, gamma, beta, running_mean, running_var, eps=1e-5,
                                     momentum=0.1):
    """y = relu(batchnorm_train(x) + residual): the end of a residual block.

    residual: same shape as x. Returns (y, saved_mean, saved_invstd); running stats IN PLACE.
    """
    if residual.shape != x.shape:
        raise ValueError(f"batchnorm_add_relu: residual shape {residual.shape} differs from x shape {x.shape}")
    z, mean, invstd = batchnorm_forward_train(x, gamma, beta, running_mean, running_var, eps, momentum)
    z += residual
    return np.maximum(z, 0, out=z), mean, invstd


def batchnorm_add_relu_backward(dy, y, x, gamma, saved_mean, saved_invstd):
    """Gradients of batchnorm_add_relu_forward_train.

    dz = dy * (y > 0);  dresidual = dz;  (dx, dgamma, dbeta) = batchnorm_backward(dz, ...).
    ->  (dx, dresidual, dgamma, dbeta).
    """
    dz = relu_backward(dy, y)
    dx, dgamma, dbeta = batchnorm_backward(dz, x, gamma, saved_mean, saved_invstd)
    return dx, dz, dgamma, dbeta


# Synchronised BN (data parallelism) splits the batch over processes: each one reduces its own
# rows, the processes all-reduce the [3, C] / [2, C] sums, and every process then finishes with
# the global numbers. These three ops are the per-process pieces.


def batchnorm_partial_stats(x, shift):
    """This process's share of the batch statistics, for synchronised batch norm.

    count_c = M (rows here);  s1_c = sum (x - shift_c);  s2_c = sum (x - shift_c)^2
    Summed over processes, mean = shift + S1/COUNT and var = S2/COUNT - (S1/COUNT)^2. The shift (a
    per-channel constant every process shares, e.g. the running mean) keeps that difference from
    cancelling catastrophically when |mean| >> std.

    x: [N, H, W, C] or [M, C]; shift: [C]  ->  stats [3, C] (rows count, s1, s2) in the statistics
    dtype (>= float32; float64 for float64 x).
    """
    _check_float("x", x)
    _check_channels(x, shift=shift)
    sd = _stat_dtype(x.dtype)
    centred = _as_rows(x).astype(sd, copy=False) - shift.astype(sd, copy=False)
    stats = np.empty((3, x.shape[-1]), dtype=sd)
    stats[0] = centred.shape[0]
    stats[1] = centred.sum(axis=0)
    stats[2] = np.einsum("mc,mc->c", centred, centred)
    return stats


def batchnorm_backward_reduce(dy, x, saved_mean, saved_invstd):
    """This process's share of the two per-channel reductions of the BN backward pass.

    xhat = (x - mean) * invstd;  sums[0]_c = sum dy;  sums[1]_c = sum dy * xhat
    (these are also this process's dbeta and dgamma).
    dy, x: [N, H, W, C] or [M, C]; saved_mean, saved_invstd: [C]  ->  sums [2, C] (statistics dtype).
    """
    _check_channels(x, saved_mean=saved_mean, saved_invstd=saved_invstd)
    if dy.shape != x.shape:
        raise ValueError(f"batchnorm_backward_reduce: dy shape {dy.shape} differs from x shape {x.shape}")
    sd = _stat_dtype(x.dtype)
    dy_rows = _as_rows(dy).astype(sd, copy=False)
    xhat = (_as_rows(x).astype(sd, copy=False) - saved_mean) * saved_invstd
    return np.stack([dy_rows.sum(axis=0), np.einsum("mc,mc->c", dy_rows, xhat)])


def batchnorm_backward_elemt(dy, x, gamma, saved_mean, saved_invstd, sums, count):
    """dx of batch norm from the (global) reductions: as batchnorm_backward, with M = count rows
    over all processes and sums = the all-reduced batchnorm_backward_reduce.

    dx = gamma * invstd * (dy - sums[0]/count - xhat * sums[1]/count)
    dy, x: [N, H, W, C] or [M, C]; gamma, saved_mean, saved_invstd: [C]; sums [2, C]; count: number
    ->  dx like x, dtype of dy.
    """
    _check_channels(x, gamma=gamma, saved_mean=saved_mean, saved_invstd=saved_invstd)
    if dy.shape != x.shape or sums.shape != (2, x.shape[-1]):
        raise ValueError(f"batchnorm_backward_elemt: dy {dy.shape}, x {x.shape} and sums {sums.shape} "
                         f"do not fit together (sums must be [2, C])")
    sd = _stat_dtype(x.dtype)
    xhat = (_as_rows(x).astype(sd, copy=False) - saved_mean) * saved_invstd
    dx = (gamma * saved_invstd) * (_as_rows(dy).astype(sd, copy=False) - sums[0] / count - xhat * (sums[1] / count))
    return dx.astype(dy.dtype, copy=False).reshape(x.shape)


def batchnorm_relu_grad_partials(dy, y, x, saved_mean):
    """(g, part): g = dy where y > 0, else 0 (like dy), and part [2, 1, C] in the statistics dtype:
    one block of all rows, part[0] = sum g, part[1] = sum g * (x - saved_mean), from g as stored."""
    _check_channels(x, saved_mean=saved_mean)
    if not dy.shape == y.shape == x.shape:
        raise ValueError(f"batchnorm_relu_grad_partials: dy {dy.shape}, y {y.shape} and x {x.shape} must have "
                         f"one shape")
    g = np.where(y > 0, dy, np.zeros((), dtype=dy.dtype))
    sd = _stat_dtype(x.dtype)
    g_rows = _as_rows(g).astype(sd, copy=False)
    centred = _as_rows(x).astype(sd, copy=False) - saved_mean
    part = np.stack([g_rows.sum(axis=0), np.einsum("mc,mc->c", g_rows, centred)])[:, None, :]
    return g, part


def batchnorm_backward_from_partials(g, x, gamma, saved_mean, saved_invstd, part):
    """(dx, dgamma, dbeta) of batch norm from g (its output's gradient, after any ReLU mask) and the
    partial sums part [2, B, C] (batchnorm_relu_grad_partials, conv2d_backward_data_relu_bn):
    dbeta = sum_b part[0], dgamma = invstd * sum_b part[1], dx as batchnorm_backward.  With g's
    own partials the numbers are batchnorm_backward's."""
    return _backward_from_partials(g, x, gamma, saved_mean, saved_invstd, part)


def _backward_from_partials(g, x, gamma, saved_mean, saved_invstd, part):
    _check_channels(x, gamma=gamma, saved_mean=saved_mean, saved_invstd=saved_invstd)
    C = x.shape[-1]
    if g.shape != x.shape or part.ndim != 3 or part.shape[0] != 2 or part.shape[1] < 1 or part.shape[2] != C:
        raise ValueError(f"batchnorm_backward_from_partials: g {g.shape}, x {x.shape} and part {part.shape} do not "
                         f"fit together (part must be [2, B, {C}])")
    sd = _stat_dtype(x.dtype)
    sums = np.asarray(part, dtype=np.float64).sum(axis=1).astype(sd)
    dbeta, dgamma = sums[0], sums[1] * saved_invstd
    M = g.size // C
    xhat = (_as_rows(x).astype(sd, copy=False) - saved_mean) * saved_invstd
    dx = (gamma * saved_invstd) * (_as_rows(g).astype(sd, copy=False) - dbeta / M - xhat * (dgamma / M))
    return dx.astype(g.dtype, copy=False).reshape(x.shape), dgamma, dbeta


def batchnorm_backward_from_partials_pair(g, x, gamma, saved_mean, saved_invstd, part, x2, mean2):
    """(dx, dgamma, dbeta, part2): batchnorm_backward_from_partials, and the second batch norm's
    partial sums of g over all its rows as one block, part2 [2, 1, C] (statistics dtype):
    [sum g, sum g * (x2 - mean2)]."""
    if x2.shape != x.shape:
        raise ValueError(f"batchnorm_backward_from_partials_pair: x2 shape {x2.shape} differs from x shape {x.shape}")
    _check_channels(x2, mean2=mean2)
    dx, dgamma, dbeta = _backward_from_partials(g, x, gamma, saved_mean, saved_invstd, part)
    sd = _stat_dtype(x.dtype)
    g_rows = _as_rows(g).astype(sd, copy=False)
    centred = _as_rows(x2).astype(sd, copy=False) - mean2
    part2 = np.stack([g_rows.sum(axis=0), np.einsum("mc,mc->c", g_rows, centred)])[:, None, :]
    return dx, dgamma, dbeta, part2


# ----------------------------------------------------------------------------------------------
# elementwise


def relu_forward(x):
    """y = max(x, 0), any shape."""
    return np.maximum(x, 0)


def relu_backward(dy, y):
    """dx = dy where y > 0, else 0 (y is the ReLU output). Any shape."""
    if dy.shape != y.shape:
        raise ValueError(f"relu_backward: dy shape {dy.shape} differs from y shape {y.shape}")
    return np.where(y > 0, dy, np.zeros((), dtype=dy.dtype))


def add(a, b):
    """a + b, same shapes."""
    if a.shape != b.shape:
        raise ValueError(f"add: a shape {a.shape} differs from b shape {b.shape}")
    return a + b


def add_relu_forward(a, b):
    """relu(a + b), same shapes."""
    z = add(a, b)
    return np.maximum(z, 0, out=z)


# ----------------------------------------------------------------------------------------------
# pooling


def maxpool2d_forward(x, kernel_size=3, stride=2, padding=1):
    """Max pooling over kernel_size x kernel_size windows (padding counts as -infinity).

    y[n, p, q, c] = max_{i, j < k} x[n, p*stride + i - padding, q*stride + j - padding, c]
    argmax[n, p, q, c] = h*W + w of the winning input pixel (flat index within its (n, c) plane);
    ties go to the first window position in row-major (i, j) order; padding never wins
    (every window holds at least one real pixel when padding < kernel_size).

    x: [N, H, W, C]  ->  (y [N, P, Q, C] dtype of x, argmax int32 [N, P, Q, C]).
    """
    _check_ndim("x", x, 4, "[N, H, W, C]")
    if padding >= kernel_size:
        raise ValueError(f"maxpool2d: padding {padding} must be smaller than kernel_size {kernel_size}")
    N, H, W, C = x.shape
    k = kernel_size
    P = _out_size(H, k, stride, padding, "maxpool2d")
    Q = _out_size(W, k, stride, padding, "maxpool2d")
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    real = np.pad(np.ones((H, W), dtype=bool), padding, constant_values=False)   # not padding
    # Loop over the k*k taps (not pixels): keep the best value and which tap gave it. The first
    # real pixel of a window is taken, then only strictly larger ones (an earlier tap wins ties;
    # NaN compares false, so a NaN stays where it is first taken and never displaces a number:
    # exactly what the kernel does, and a diverged model's NaNs cannot pick a padding pixel).
    best = np.zeros((N, P, Q, C), dtype=x.dtype)
    best_tap = np.zeros((N, P, Q, C), dtype=np.int32)
    have = np.zeros((1, P, Q, 1), dtype=bool)
    for i in range(k):
        for j in range(k):
            v = xp[:, i:i + stride * P:stride, j:j + stride * Q:stride]
            is_real = real[i:i + stride * P:stride, j:j + stride * Q:stride][None, :, :, None]
            better = is_real & (~have | (v > best))
            np.copyto(best, v, where=better)
            best_tap[better] = i * k + j
            have = have | is_real
    # tap (i, j) of output (p, q) is input pixel (p*stride + i - padding, q*stride + j - padding)
    h = np.arange(P, dtype=np.int32)[:, None, None] * stride - padding + best_tap // k
    w = np.arange(Q, dtype=np.int32)[None, :, None] * stride - padding + best_tap % k
    return best, (h * W + w).astype(np.int32)


def maxpool2d_backward(dy, argmax, x_shape, kernel_size, stride, padding):
    """Gradient of maxpool2d_forward: each dy goes to its window's winning input pixel
    (accumulated where windows overlap).

    dy: [N, P, Q, C], argmax: int [N, P, Q, C] (from the forward), x_shape: (N, H, W, C),
    kernel_size, stride, padding: those of the forward (checked against the shapes; argmax alone
    says where each gradient goes)  ->  dx: x_shape, dtype of dy.
    """
    if dy.shape != argmax.shape:
        raise ValueError(f"maxpool2d_backward: dy shape {dy.shape} differs from argmax shape {argmax.shape}")
    N, H, W, C = x_shape
    P = _out_size(H, kernel_size, stride, padding, "maxpool2d_backward")
    Q = _out_size(W, kernel_size, stride, padding, "maxpool2d_backward")
    if dy.shape != (N, P, Q, C):
        raise ValueError(f"maxpool2d_backward: dy shape {dy.shape} does not match x_shape {tuple(x_shape)} pooled "
                         f"with kernel_size={kernel_size}, stride={stride}, padding={padding}")
    n = np.arange(N, dtype=np.int64)[:, None, None, None]
    c = np.arange(C, dtype=np.int64)[None, None, None, :]
    flat = (n * (H * W) + argmax.astype(np.int64)) * C + c    # index into dx.ravel()
    dx = np.bincount(flat.ravel(), weights=dy.ravel(), minlength=N * H * W * C)
    return dx.astype(dy.dtype, copy=False).reshape(x_shape)


def maxpool2d_backward_relu_bn(dy, argmax, y, a, bn_x, bn_mean, kernel_size, stride, padding):
    """(g, part): g = maxpool2d_backward(...) where a > 0, else 0, and the batch-norm backward's
    partial sums of g over all its rows as one block, part [2, 1, C] (statistics dtype):
    [sum g, sum g * (bn_x - bn_mean)] (batchnorm_relu_grad_partials).  a: the max pool's input,
    relu(batchnorm(bn_x)) with batch mean bn_mean; y, argmax: the pool's forward outputs (y is not
    needed here: the mask is a's)."""
    if y.shape != dy.shape:
        raise ValueError(f"maxpool2d_backward_relu_bn: y shape {y.shape} differs from dy shape {dy.shape}")
    da = maxpool2d_backward(dy, argmax, a.shape, kernel_size, stride, padding)
    return batchnorm_relu_grad_partials(da, a, bn_x, bn_mean)


def global_avgpool_forward(x):
    """y[n, c] = mean over (h, w) of x[n, h, w, c].   x: [N, H, W, C]  ->  y: [N, C]."""
    _check_ndim("x", x, 4, "[N, H, W, C]")
    return x.mean(axis=(1, 2), dtype=_stat_dtype(x.dtype)).astype(x.dtype, copy=False)


def global_avgpool_backward(dy, x_shape):
    """dx[n, h, w, c] = dy[n, c] / (H*W).   dy: [N, C]  ->  dx: x_shape [N, H, W, C]."""
    N, H, W, C = x_shape
    if dy.shape != (N, C):
        raise ValueError(f"global_avgpool_backward: dy shape {dy.shape}, expected {(N, C)}")
    return np.broadcast_to((dy / (H * W))[:, None, None, :], (N, H, W, C)).copy()


def global_avgpool_backward_relu_bn(dy, a, bn_x, bn_mean):
    """(g, part): g = global_avgpool_backward(dy, a.shape) where a > 0, else 0, and the batch-norm
    backward's partial sums of g over all its rows as one block, part [2, 1, C] (statistics dtype):
    [sum g, sum g * (bn_x - bn_mean)] (batchnorm_relu_grad_partials)."""
    return batchnorm_relu_grad_partials(global_avgpool_backward(dy, a.shape), a, bn_x, bn_mean)


# ----------------------------------------------------------------------------------------------
# loss and metrics


def _check_labels(labels, N, K):
    if labels.ndim != 1 or labels.shape[0] != N:
        raise ValueError(f"labels must have shape ({N},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    if N and (labels.min() < 0 or labels.max() >= K):
        raise ValueError(f"labels must lie in [0, {K}), got values from {labels.min()} to {labels.max()}")


def softmax_cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy, with optional label smoothing.

    log p = logits - max - log(sum exp(logits - max))            (stable log-softmax)
    target = (1 - eps) * onehot(label) + eps / K
    loss = -(1/N) * sum_n sum_k target[n, k] * log p[n, k]

    logits: [N, K] float, labels: int [N]  ->  (loss: array of shape () in the logits' statistics
    dtype (float32, or float64 for float64 logits), probs: [N, K] softmax, same dtype).
    """
    _check_ndim("logits", logits, 2, "[N, K]")
    _check_float("logits", logits)
    N, K = logits.shape
    _check_labels(labels, N, K)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    z = logits.astype(_stat_dtype(logits.dtype), copy=False)
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(N), labels]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=1)
    return np.asarray(nll.mean(), dtype=z.dtype), np.exp(logp)


def softmax_cross_entropy_backward(probs, labels, label_smoothing=0.0, grad_scale=1.0):
    """dlogits = grad_scale * (probs - target) / N, target as in the forward.

    probs: [N, K] (from the forward), labels: int [N]  ->  dlogits [N, K], dtype of probs.
    grad_scale is the upstream gradient of the loss (e.g. the AMP loss scale).
    """
    N, K = probs.shape
    _check_labels(labels, N, K)
    d = probs - label_smoothing / K
    d[np.arange(N), labels] -= 1.0 - label_smoothing
    if hasattr(grad_scale, "shape"):      # a one-element array (the loss scaler's, on the device)
        return d * (grad_scale.reshape(()).astype(d.dtype) / d.dtype.type(N))
    return d * (grad_scale / N)


def accumulate_loss(loss, totals):
    """totals[0] += loss, totals[1] += 1 if loss is finite, else totals[2] += 1; IN PLACE.
    loss: one-element float array; totals: float64 [3]. Returns None."""
    v = float(np.asarray(loss).reshape(()))
    if np.isfinite(v):
        totals[0] += v
        totals[1] += 1.0
    else:
        totals[2] += 1.0


def topk_correct(logits, labels, ks=(1, 5)):
    """How many rows have their label among the k largest logits, for each k in ks; then how many
    rows hold a NaN or inf logit.

    The label's rank = #classes with a larger logit + #classes with an equal logit and a lower
    index (ties broken towards the lower class index); a row counts for k when rank < k. A row
    with any non-finite logit counts for no k (NaN compares false with everything: without this
    rule an all-NaN row would rank its label first).
    logits: [N, K], labels: int [N]  ->  int64 array [len(ks) + 1]: the counts, then the
    non-finite rows.
    """
    _check_ndim("logits", logits, 2, "[N, K]")
    N, K = logits.shape
    _check_labels(labels, N, K)
    label_logit = logits[np.arange(N), labels][:, None]
    lower_index = np.arange(K)[None, :] < labels[:, None]
    rank = (logits > label_logit).sum(axis=1) + ((logits == label_logit) & lower_index).sum(axis=1)
    finite = np.isfinite(logits).all(axis=1)
    return np.array([(finite & (rank < k)).sum() for k in ks] + [(~finite).sum()], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# optimiser arithmetic


def sgd_momentum_update(param, grad, momentum_buf, lr, momentum=0.9, weight_decay=0.0, nesterov=False):
    """SGD with momentum, IN PLACE on param and momentum_buf (PyTorch convention):

    g = grad + weight_decay * param
    v = momentum * v + g
    param -= lr * (g + momentum * v  if nesterov else  v)

    param, grad, momentum_buf: same shape and dtype. Returns None.
    """
    if not (param.shape == grad.shape == momentum_buf.shape):
        raise ValueError(f"sgd_momentum_update: param {param.shape}, grad {grad.shape} and "
                         f"momentum_buf {momentum_buf.shape} must have the same shape")
    g = grad + weight_decay * param if weight_decay else grad
    momentum_buf *= momentum
    momentum_buf += g
    param -= lr * (g + momentum * momentum_buf if nesterov else momentum_buf)


def lars_trust_ratio(param, grad, weight_decay, eta=0.001, eps=1e-9):
    """LARS layer-wise trust ratio: eta * ||w|| / (||g|| + weight_decay * ||w|| + eps),
    or 1.0 where ||w|| or ||g|| is 0.   -> Python float."""
    w_norm = float(np.sqrt(np.sum(np.square(param, dtype=np.float64))))
    g_norm = float(np.sqrt(np.sum(np.square(grad, dtype=np.float64))))
    if w_norm == 0.0 or g_norm == 0.0:
        return 1.0
    return eta * w_norm / (g_norm + weight_decay * w_norm + eps)


def global_grad_norm(list_of_grads, out=None):
    """sqrt(sum over all arrays and elements of g^2), accumulated in float64. -> Python float
    (inf or nan if any gradient holds one); with out (an array of one element) stored there in its
    dtype, and out returned."""
    norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in list_of_grads)))
    if out is None:
        return norm
    if out.size != 1:
        raise ValueError(f"global_grad_norm: out must have one element, got shape {tuple(out.shape)}")
    out[...] = norm
    return out


def _one(value):
    """A number or a one-element array as a NumPy scalar of its own dtype (float for numbers)."""
    return np.asarray(value).reshape(())[()] if hasattr(value, "shape") else value


def momentum_update_flat(params_flat, grads_flat, momentum_flat, segments, lr, momentum=0.9, nesterov=False,
                         lr_in_momentum=False, lr_scale=None, grad_scale=None, skip=None):
    """Momentum SGD (or LARS) over every tensor s of flat buffers laid out by `segments`
    (ParamSegments: offsets, weight_decay wd_s), IN PLACE; nothing happens when skip[0] != 0.

    g = grad * grad_scale + wd_s * w;  lr_s = lr * lr_scale[s]
    SGD  (lr_in_momentum False): v = momentum * v + g;  w -= lr_s * (g + momentum * v if nesterov else v)
    LARS (lr_in_momentum True):  v = momentum * v + lr_s * g;  w -= v
    lr, grad_scale: numbers or one-element arrays; lr_scale: None or [S]; skip: None or int [1].
    Tensor by tensor with sgd_momentum_update's arithmetic: SGD here equals the per-tensor op bit
    for bit. Returns None.
    """
    if skip is not None and int(np.asarray(skip).reshape(-1)[0]):
        return
    lr, scale = _one(lr), None if grad_scale is None else _one(grad_scale)
    for s, (a, b) in enumerate(zip(segments.offsets[:-1], segments.offsets[1:])):
        w, v, g = params_flat[a:b], momentum_flat[a:b], grads_flat[a:b]
        if scale is not None:
            g = g * scale
        lr_s = lr if lr_scale is None else lr * lr_scale[s]
        wd = float(segments.weight_decay[s])
        if lr_in_momentum:
            g = g + wd * w if wd else g
            v *= momentum
            v += lr_s * g
            w -= v
        else:
            sgd_momentum_update(w, g, v, lr_s, momentum, wd, nesterov)


def lars_trust_ratio_flat(params_flat, grads_flat, segments, eta=0.001, eps=1e-9, return_norms=False,
                          grad_scale=None):
    """lars_trust_ratio of every tensor of flat buffers laid out by `segments` (ratio 1 where
    segments.use_trust is False), gradients multiplied by grad_scale first. -> float32 [S]
    (and the weight and gradient norms, float32 [S] each, with return_norms)."""
    scale = 1.0 if grad_scale is None else float(_one(grad_scale))
    ratios, w_norms, g_norms = [], [], []
    for s, (a, b) in enumerate(zip(segments.offsets[:-1], segments.offsets[1:])):
        w = params_flat[a:b].astype(np.float64)
        g = grads_flat[a:b].astype(np.float64) * scale
        w_norms.append(np.sqrt(np.sum(w * w)))
        g_norms.append(np.sqrt(np.sum(g * g)))
        trust = lars_trust_ratio(w, g, float(segments.weight_decay[s]), eta, eps) if segments.use_trust[s] else 1.0
        ratios.append(trust)
    ratios = np.array(ratios, dtype=np.float32)
    if return_norms:
        return ratios, np.array(w_norms, dtype=np.float32), np.array(g_norms, dtype=np.float32)
    return ratios


def nonfinite_flag(x, flag):
    """flag[0] = 1 if any element of x is NaN or inf (else unchanged), IN PLACE. Returns None."""
    if not np.isfinite(x).all():
        flag[0] = 1


def loss_scale_update(scale_state, counts, dynamic, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                      min_scale=1.0):
    """The loss scaler's bookkeeping after a step, IN PLACE. scale_state float32 [2] = [S, 1/S];
    counts int32 [3] = [found_inf, good_steps, skipped_steps]. Overflow: skipped += 1 and (dynamic)
    S = max(S * backoff, min_scale), good = 0; else (dynamic) good += 1 and S *= growth after
    growth_interval good steps (good = 0). Then 1/S is refreshed and found_inf cleared."""
    f32 = np.float32
    scale = scale_state[0]
    if counts[0]:
        counts[2] += 1
        if dynamic:
            scale = max(f32(scale * f32(backoff_factor)), f32(min_scale))
            counts[1] = 0
    elif dynamic:
        counts[1] += 1
        if counts[1] >= growth_interval:
            scale = f32(scale * f32(growth_factor))
            counts[1] = 0
    scale_state[0] = scale
    scale_state[1] = f32(1.0) / f32(scale)
    counts[0] = 0


# ----------------------------------------------------------------------------------------------
# input and casts


def input_normalize(images_uint8, mean=(123.68, 116.78, 103.94), std=None, dtype=np.float32):
    """x = (images - mean) / std per RGB channel (std None: no division, as the MLPerf reference).

    images_uint8: uint8 [N, H, W, 3] (NHWC, RGB, 0..255)  ->  x: dtype [N, H, W, 3].
    """
    _check_ndim("images_uint8", images_uint8, 4, "[N, H, W, 3]")
    if images_uint8.dtype != np.uint8:
        raise TypeError(f"images_uint8 must be uint8, got dtype {images_uint8.dtype}")
    if images_uint8.shape[-1] != 3:
        raise ValueError(f"images_uint8 must have 3 channels last (NHWC RGB), got shape {images_uint8.shape}")
    x = images_uint8.astype(np.float32) - np.asarray(mean, dtype=np.float32)
    if std is not None:
        x /= np.asarray(std, dtype=np.float32)
    return x.astype(dtype, copy=False)


def cast(x, dtype):
    """x.astype(dtype) (a new array)."""
    return x.astype(dtype)
