"""Differentiable ops on Tensors: each op's forward and backward side by side.

Every function here follows one pattern:

    def op(x, w, ...):
        ops = _ops(x, w)                      # the device's op module (kernels.reference or kernels.ops)
        y = ops.op_forward(x.data, w.data)    # raw arrays in, raw arrays out
        def backward(dy):                     # closes over what the backward pass needs
            return ops.op_backward_x(...), ops.op_backward_w(...)
        return Tensor._from_op(y, (x, w), backward)

The arithmetic lives in kernels/ (see the op contract); this file only wires forward to backward.
Activations are NHWC [N, H, W, C]; conv weights OIHW. Nothing here branches on the device.
"""

import numpy as np

from nn.tensor import Tensor

__all__ = ["conv2d", "conv2d_bn_stats", "linear", "batch_norm", "share_grad_partials", "relu", "add", "add_relu", "max_pool2d", "transpose",
           "normalize_images",
           "global_avg_pool", "cross_entropy", "cast"]


def _ops(*tensors):
    """The op module of the tensors' common device; a clear error when they disagree."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t is not None and t.device != device:
            raise ValueError(f"tensors on different devices: {device.name} and {t.device.name}; "
                             f"move them with .to(device) first")
    return device.ops


def _as_tensor(x, name):
    if isinstance(x, Tensor):
        return x
    raise TypeError(f"{name} must be an nn.Tensor, got {type(x).__name__}")


# ---- convolution --------------------------------------------------------------------------------


def conv2d(x, weight, stride=1, padding=0):
    """y = conv(x, weight): x [N, H, W, C] (NHWC), weight [K, C, R, S] (OIHW) -> y [N, P, Q, K].

    The weight is put once (ops.conv_weight) in the dtype and memory order the device's convolutions
    read, for the forward and the backward-data pass together: on emu and cuda channels-last (one
    launch per step, none for a 1x1 filter), cast to float16 for float16 x (mixed precision: the
    float32 master's gradient comes back in float32)."""
    return _conv2d(x, weight, stride, padding, bn_stats=False)


def conv2d_bn_stats(x, weight, stride=1, padding=0):
    """(y, stats): conv2d's y (a Tensor, with conv2d's backward) and the batch-norm partials of y
    (an array [4, P, K], ops.conv2d_forward_bn_stats: on emu and cuda written by the convolution's
    epilogue), for batch_norm(y, ..., stats=stats) in training: batch norm then reads y once, not
    twice."""
    return _conv2d(x, weight, stride, padding, bn_stats=True)


def _conv2d(x, weight, stride, padding, bn_stats):
    ops = _ops(x, weight)
    x_data = x.data
    w_data = ops.conv_weight(weight.data, x_data.dtype)
    if bn_stats:
        y, stats = ops.conv2d_forward_bn_stats(x_data, w_data, stride, padding)
    else:
        y = ops.conv2d_forward(x_data, w_data, stride, padding)
    w_shape, w_dtype = weight.shape, weight.dtype

    def backward(dy):
        dx = None
        if x.requires_grad:
            link = getattr(x, "_bn_grad_partials", None)
            if link is not None and link.pending > 1:   # another convolution takes x too, and comes later:
                link.pending -= 1                        # this part of x's gradient goes to its epilogue
                da = ops.conv2d_backward_data(dy, w_data, x_data.shape, stride, padding)
                link.dz = da if link.dz is None else ops.add(link.dz, da)
            elif link is not None:   # x = relu(bn(.) [+ r]): that batch norm's backward sums in this epilogue
                dz, link.dz = link.dz, None   # x's gradient from its other consumer, if it came that way
                dx, link.part = ops.conv2d_backward_data_relu_bn(dy, w_data, x_data.shape, stride, padding, x_data,
                                                                 link.bn_x, link.mean, dz)
                link.g = dx
            else:
                dx = ops.conv2d_backward_data(dy, w_data, x_data.shape, stride, padding)
        dw = (ops.conv2d_backward_weight(x_data, dy, w_shape, stride, padding, dtype=w_dtype)
              if weight.requires_grad else None)
        return dx, dw

    out = Tensor._from_op(y, (x, weight), backward)
    return (out, stats) if bn_stats else out


# ---- fully connected ----------------------------------------------------------------------------


def linear(x, weight, bias=None):
    """y = x @ weight^T + bias: x [N, Cin], weight [Cout, Cin], bias [Cout] or None -> y [N, Cout].

    Mixed precision: a float32 (master) weight with float16 x is cast once for the forward and
    backward passes, a float32 bias is added as it is; their gradients come back in float32."""
    ops = _ops(x, weight, bias)
    x_data, w_data = x.data, weight.data
    if w_data.dtype != x_data.dtype:
        w_data = ops.cast(w_data, x_data.dtype)
    y = ops.linear_forward(x_data, w_data, None if bias is None else bias.data)
    w_dtype = weight.dtype

    def backward(dy):
        dx, dw, db = ops.linear_backward(dy, x_data, w_data, need_bias_grad=bias is not None, dtype=w_dtype)
        return (dx, dw) if bias is None else (dx, dw, db)

    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor._from_op(y, parents, backward)


# ---- batch norm (optionally fused with the ReLU, or with residual add + ReLU) -------------------


def batch_norm(x, weight, bias, running_mean, running_var, training, eps=1e-5, momentum=0.1,
               relu=False, residual=None, sync=None, stats=None, grad_partials=False, residual_grad_to_link=False):
    """Batch normalisation over (N, H, W) per channel, optionally fused with what follows it:

        relu=False, residual=None:  y = bn(x)
        relu=True,  residual=None:  y = relu(bn(x))
        relu=True,  residual=r:     y = relu(bn(x) + r)        (the end of a residual block)

    x: Tensor [N, H, W, C] or [M, C]; weight (gamma), bias (beta): Parameters [C];
    running_mean, running_var: arrays [C], updated IN PLACE when training.
    training=True uses batch statistics; False uses the running statistics.
    sync: None (statistics of this process's batch), or a communicator (nn.distributed) whose
    ranks each hold part of one batch: training then uses the statistics of the whole batch
    (synchronised BN, see _batch_norm_synchronised).
    stats: None, or the batch-norm partials of x from the convolution that produced it
    (conv2d_bn_stats): training without sync then takes the batch statistics from them
    (ops.batchnorm_forward_train_from_stats, one read of x fewer); the backward is the same.
    grad_partials (training without sync; relu=True): the convolution that takes y as its input may
    compute the first half of this batch norm's backward in its backward-data pass
    (ops.conv2d_backward_data_relu_bn: y's gradient after the ReLU's mask, and the partial sums of
    it and of it times x - mean); the backward then only finishes it (ops.batchnorm_backward_from_partials:
    one read of that gradient and x; with a residual, that gradient is also the residual's).  Where
    y's gradient comes otherwise (several consumers, or one that is not a convolution), the backward
    is the unfused one's, as without it.
    A plain batch norm (relu=False) with grad_partials offers its input and mean to an add + ReLU
    batch norm that takes its output as the residual (a projection shortcut: relu(bn3(c3) + bn(cp))):
    behind the add both have the same output gradient g, so when that one finishes from partials, its
    dx pass also sums for this one (ops.batchnorm_backward_from_partials_pair), and this backward, seeing
    that very g arrive, finishes from those partials (one read of g and x instead of two).
    residual_grad_to_link (with a residual that carries such a link, i.e. a residual block's
    identity shortcut whose input also feeds the block's first convolution): the residual's
    gradient is handed to that convolution's backward-data pass, which adds it before the mask,
    instead of being returned to autograd (which would add it in a pass of its own).  Only for a
    residual whose one other consumer is a convolution: the layer code knows that, this op cannot.
    """
    if residual is not None and not relu:
        raise ValueError("batch_norm: residual is only supported together with relu=True")
    ops = _ops(x, weight, bias, residual)
    x_data, gamma = x.data, weight.data
    parents = (x, weight, bias) if residual is None else (x, weight, bias, residual)

    if not training:
        return _batch_norm_inference(ops, x, weight, bias, running_mean, running_var, eps, relu, residual)
    if sync is not None:
        return _batch_norm_synchronised(ops, x, weight, bias, running_mean, running_var, eps, momentum,
                                        relu, residual, sync)

    if stats is not None:     # the statistics from the convolution: the normalising pass only
        y, mean, invstd = ops.batchnorm_forward_train_from_stats(
            x_data, stats, gamma, bias.data, running_mean, running_var, eps, momentum, relu,
            None if residual is None else residual.data)
    elif residual is not None:
        y, mean, invstd = ops.batchnorm_add_relu_forward_train(
            x_data, residual.data, gamma, bias.data, running_mean, running_var, eps, momentum)
    elif relu:
        y, mean, invstd = ops.batchnorm_relu_forward_train(
            x_data, gamma, bias.data, running_mean, running_var, eps, momentum)
    else:
        y, mean, invstd = ops.batchnorm_forward_train(
            x_data, gamma, bias.data, running_mean, running_var, eps, momentum)

    link = _GradPartials(x_data, mean) if relu and grad_partials else None
    to_link = getattr(residual, "_bn_grad_partials", None) if residual_grad_to_link else None
    # a plain batch norm's offer (below): its input and mean, and later the partial sums of its gradient
    pair = _GradPartials(x_data, mean) if grad_partials and not relu and residual is None else None
    residual_pair = getattr(residual, "_bn_pair_partials", None) if residual is not None else None
    if residual is not None:
        def backward(dy):
            g, part = link.take() if link is not None else (None, None)
            if dy is g and residual_pair is not None:   # the residual is a batch norm's: its sums too
                dx, dgamma, dbeta, residual_pair.part = ops.batchnorm_backward_from_partials_pair(
                    dy, x_data, gamma, mean, invstd, part, residual_pair.bn_x, residual_pair.mean)
                residual_pair.g = dres = dy
            elif dy is g:   # masked already, with its partial sums: dresidual is g itself
                dx, dgamma, dbeta = ops.batchnorm_backward_from_partials(dy, x_data, gamma, mean, invstd, part)
                dres = dy
            else:
                dx, dres, dgamma, dbeta = ops.batchnorm_add_relu_backward(dy, y, x_data, gamma, mean, invstd)
            if to_link is not None:   # the residual's gradient goes to its other consumer's epilogue
                to_link.dz, dres = dres, None
            return dx, dgamma, dbeta, dres
    elif link is not None:
        def backward(dy):
            g, part = link.take()
            if dy is g:   # the convolution's backward-data pass produced dy with the partial sums
                return ops.batchnorm_backward_from_partials(dy, x_data, gamma, mean, invstd, part)
            return ops.batchnorm_relu_backward(dy, y, x_data, gamma, mean, invstd)
    elif relu:
        def backward(dy):
            return ops.batchnorm_relu_backward(dy, y, x_data, gamma, mean, invstd)
    elif pair is not None:
        def backward(dy):
            g, part = pair.take()
            if dy is g:   # the add + ReLU batch norm beside this one summed for it in its dx pass
                return ops.batchnorm_backward_from_partials(dy, x_data, gamma, mean, invstd, part)
            return ops.batchnorm_backward(dy, x_data, gamma, mean, invstd)
    else:
        def backward(dy):
            return ops.batchnorm_backward(dy, x_data, gamma, mean, invstd)

    out = Tensor._from_op(y, parents, _cast_param_grads(backward, parents))
    if link is not None and out.requires_grad:
        out._bn_grad_partials = link
    if pair is not None and out.requires_grad:
        out._bn_pair_partials = pair
    return out


def share_grad_partials(x, convolutions):
    """x (the output of batch_norm(..., grad_partials=True)) is the input of `convolutions`
    convolutions and of nothing else (a residual block's input with a projection shortcut: the
    block's first convolution and the projection's).  Each but the last whose backward runs hands its
    part of x's gradient to the next one's epilogue (dz) instead of returning it to autograd, and the
    last adds it before the mask: the batch norm then finishes from partials too.  Only the layer code
    knows x has no other consumer; a consumer that is not one of these would make the gradient a sum,
    which the batch norm handles as without the link."""
    link = getattr(x, "_bn_grad_partials", None)
    if link is not None:
        link.pending = int(convolutions)


class _GradPartials:
    """What a batch norm + ReLU (batch_norm(..., grad_partials=True)) shares with the convolution
    that takes its output: its input and batch mean (for the partial sums the convolution's
    backward computes), the output's gradient from its other consumer (dz, handed over by the next
    block's batch norm through an identity shortcut, residual_grad_to_link, or by another
    convolution, share_grad_partials) and, after that backward, its results (g: the
    gradient after the ReLU's mask, part: the partial sums), which the batch norm's backward takes
    once."""

    __slots__ = ("bn_x", "mean", "g", "part", "dz", "pending")

    def __init__(self, bn_x, mean):
        self.bn_x, self.mean, self.g, self.part, self.dz = bn_x, mean, None, None, None
        self.pending = 1   # the convolutions still to run their backward (share_grad_partials)

    def take(self):
        """(g, part) of the convolution's backward, once: the link lets go of them."""
        g, part, self.g, self.part = self.g, self.part, None, None
        return g, part


def _batch_norm_inference(ops, x, weight, bias, running_mean, running_var, eps, relu, residual):
    """Evaluation-mode BN: a fixed per-channel affine map y = x*scale + shift (then add/ReLU).
    Its backward is simple array arithmetic (no kernel needed): dx = dz*scale,
    dgamma = sum dz*xhat, dbeta = sum dz, with xhat = (x - running_mean)/sqrt(running_var + eps)."""
    y = ops.batchnorm_forward_inference(x.data, weight.data, bias.data, running_mean, running_var, eps)
    if residual is not None:
        y = ops.add_relu_forward(y, residual.data)
    elif relu:
        y = ops.relu_forward(y)
    x_data, gamma = x.data, weight.data
    parents = (x, weight, bias) if residual is None else (x, weight, bias, residual)

    def backward(dy):
        dz = ops.relu_backward(dy, y) if relu else dy
        invstd = 1.0 / (running_var + eps) ** 0.5
        C = x_data.shape[-1]
        dz_rows = dz.reshape(-1, C)
        xhat = (x_data.reshape(-1, C) - running_mean) * invstd
        dx = (dz * (gamma * invstd)).astype(dz.dtype, copy=False)
        grads = (dx, (dz_rows * xhat).sum(axis=0), dz_rows.sum(axis=0))
        return grads + ((dz,) if residual is not None else ())

    return Tensor._from_op(y, parents, _cast_param_grads(backward, parents))


_SYNC_BN_OPS = ("batchnorm_partial_stats", "batchnorm_backward_reduce", "batchnorm_backward_elemt")


def _batch_norm_synchronised(ops, x, weight, bias, running_mean, running_var, eps, momentum, relu,
                             residual, sync):
    """Training-mode BN whose statistics span every rank of `sync` (one all-reduce each way).

    forward:  stats = [count, sum(x - shift), sum((x - shift)^2)] per channel on this rank,
              all-reduced -> global mean and (biased) variance; y = bn(x) with them (the inference
              op does exactly that arithmetic), then the fused ReLU / residual add.
    backward: [sum dy, sum dy*xhat] per channel, all-reduced -> dx of the GLOBAL batch norm.
              dgamma, dbeta stay this rank's own sums: the data-parallel gradient all-reduce adds
              them up like every other parameter gradient.
    The shift is the running mean (identical on every rank), so the one-pass variance does not
    cancel. The running statistics are updated as the local op does, with the global count.
    """
    missing = [name for name in _SYNC_BN_OPS if not hasattr(ops, name)]
    if missing:
        raise NotImplementedError(f"synchronised batch norm needs the ops {', '.join(missing)}, which "
                                  f"{ops.__name__} does not provide yet; use sync_bn=False (statistics per rank) "
                                  f"or the cpu device")
    x_data, gamma = x.data, weight.data
    parents = (x, weight, bias) if residual is None else (x, weight, bias, residual)
    stats = ops.batchnorm_partial_stats(x_data, running_mean)
    sync.allreduce_(stats)
    count = float(_global_rows(x_data, sync))   # known on the host: no read of stats[0]
    if count < 2:
        raise ValueError(f"batch_norm: synchronised statistics need more than one value per channel, got {count:g}")
    shifted_mean = stats[1] / count
    mean = running_mean.astype(stats.dtype) + shifted_mean
    var = stats[2] / count - shifted_mean * shifted_mean
    var = var * (var > 0)                        # rounding can leave -1e-17 for a constant channel
    invstd = 1.0 / (var + eps) ** 0.5
    y = ops.batchnorm_forward_inference(x_data, gamma, bias.data, mean, var, eps)
    if residual is not None:
        y = ops.add_relu_forward(y, residual.data)
    elif relu:
        y = ops.relu_forward(y)
    running_mean *= 1.0 - momentum
    running_mean += (momentum * mean).astype(running_mean.dtype)
    running_var *= 1.0 - momentum
    running_var += (momentum * var * (count / (count - 1))).astype(running_var.dtype)

    def backward(dy):
        dz = ops.relu_backward(dy, y) if relu or residual is not None else dy
        sums = ops.batchnorm_backward_reduce(dz, x_data, mean, invstd)
        dgamma, dbeta = sums[1].copy(), sums[0].copy()     # this rank's share, before the all-reduce
        sync.allreduce_(sums)
        dx = ops.batchnorm_backward_elemt(dz, x_data, gamma, mean, invstd, sums, count)
        return (dx, dgamma, dbeta) + ((dz,) if residual is not None else ())

    return Tensor._from_op(y, parents, _cast_param_grads(backward, parents))


_checked_rows = set()


def _global_rows(x, sync):
    """The number of values per channel over all ranks: this rank's rows times the world size,
    checked once per (communicator, row count) that every rank has the same (a host all-reduce,
    no device read)."""
    rows = x.size // x.shape[-1]
    key = (id(sync), rows)
    if key not in _checked_rows:
        lo, hi = np.array([rows], np.int64), np.array([rows], np.int64)
        sync.allreduce_(lo, "min")
        sync.allreduce_(hi, "max")
        if lo[0] != hi[0]:
            raise ValueError(f"synchronised batch norm needs the same batch on every rank, got {lo[0]} to {hi[0]} "
                             f"values per channel")
        _checked_rows.add(key)
    return rows * sync.world_size


def _cast_param_grads(backward, parents):
    """Wrap `backward` so each gradient has its parent's dtype (BN statistics are accumulated in
    float32 even for float16 activations; gamma/beta gradients must match the fp32 master)."""
    def cast_backward(dy):
        return tuple(g if g is None or g.dtype == p.data.dtype else g.astype(p.data.dtype)
                     for g, p in zip(backward(dy), parents))
    return cast_backward


# ---- elementwise --------------------------------------------------------------------------------


def relu(x):
    """y = max(x, 0); backward passes dy where y > 0."""
    ops = _ops(x)
    y = ops.relu_forward(x.data)
    return Tensor._from_op(y, (x,), lambda dy: (ops.relu_backward(dy, y),))


def add(a, b):
    """y = a + b (same shapes); backward hands dy to both."""
    ops = _ops(a, b)
    return Tensor._from_op(ops.add(a.data, b.data), (a, b), lambda dy: (dy, dy))


# `a + b` on Tensors is this op. Attached here, where the ops live, so that tensor.py (the
# autograd core) needs nothing from this module: imports point one way.
Tensor.__add__ = lambda a, b: add(a, b)


def add_relu(a, b):
    """y = relu(a + b) (same shapes); backward hands dy*(y > 0) to both."""
    ops = _ops(a, b)
    y = ops.add_relu_forward(a.data, b.data)

    def backward(dy):
        dz = ops.relu_backward(dy, y)
        return dz, dz

    return Tensor._from_op(y, (a, b), backward)


# ---- pooling ------------------------------------------------------------------------------------


def _link_for_a_pool(x):
    """x's batch-norm link when a pool's backward may sum for it: no convolution shares x
    (share_grad_partials) and no other gradient was handed to it (dz, which the pools' epilogues do
    not add); else None."""
    link = getattr(x, "_bn_grad_partials", None)
    return link if link is not None and link.pending == 1 and link.dz is None else None


def max_pool2d(x, kernel_size=3, stride=2, padding=1):
    """Max pooling: x [N, H, W, C] -> y [N, P, Q, C]; backward routes dy to each window's winner.

    Where x = relu(batch_norm(...)) carries that batch norm's link (batch_norm(..., grad_partials=True):
    ResNet's stem) and the pool is x's one consumer, the backward also computes the first half of the
    batch norm's backward (ops.maxpool2d_backward_relu_bn: x's gradient after the ReLU's mask and its
    partial sums), which the batch norm then finishes from partials, as after a convolution."""
    ops = _ops(x)
    x_data = x.data
    y, argmax = ops.maxpool2d_forward(x_data, kernel_size, stride, padding)
    x_shape = x.shape

    def backward(dy):
        link = _link_for_a_pool(x)
        if link is not None:
            link.g, link.part = ops.maxpool2d_backward_relu_bn(dy, argmax, y, x_data, link.bn_x, link.mean,
                                                               kernel_size, stride, padding)
            return (link.g,)
        return (ops.maxpool2d_backward(dy, argmax, x_shape, kernel_size, stride, padding),)

    return Tensor._from_op(y, (x,), backward)


def global_avg_pool(x):
    """Mean over (H, W): x [N, H, W, C] -> y [N, C]; backward spreads dy/(H*W) evenly.

    Where x = relu(batch_norm(...) + r) carries that batch norm's link (ResNet's last block) and the
    pool is x's one consumer, the backward also computes the first half of the batch norm's backward
    (ops.global_avgpool_backward_relu_bn), as max_pool2d does for the stem's."""
    ops = _ops(x)
    x_data, x_shape = x.data, x.shape

    def backward(dy):
        link = _link_for_a_pool(x)
        if link is not None:
            link.g, link.part = ops.global_avgpool_backward_relu_bn(dy, x_data, link.bn_x, link.mean)
            return (link.g,)
        return (ops.global_avgpool_backward(dy, x_shape),)

    return Tensor._from_op(ops.global_avgpool_forward(x_data), (x,), backward)


# ---- loss ---------------------------------------------------------------------------------------


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy: logits Tensor [N, K] float, labels int [N] (array or Tensor)
    -> scalar Tensor (shape ()). With label_smoothing eps the target is (1-eps)*onehot + eps/K.

    Backward: dlogits = g * (softmax - target) / N, where g is the gradient arriving at the loss
    (1 normally; the loss scale under mixed precision)."""
    logits = _as_tensor(logits, "logits")
    ops = _ops(logits)
    labels = as_labels(labels, logits.device)
    loss, probs = ops.softmax_cross_entropy_forward(logits.data, labels, label_smoothing)
    logits_dtype = logits.dtype

    def backward(g):
        # g: a Python number or a one-element device array (the loss scale): the kernel reads it,
        # so the step needs no round trip to the host
        dlogits = ops.softmax_cross_entropy_backward(probs, labels, label_smoothing, grad_scale=g)
        return (dlogits.astype(logits_dtype, copy=False),)

    backward.takes_scalar_seed = True       # Tensor.backward hands it the seed as it is
    return Tensor._from_op(loss, (logits,), backward)


def as_labels(labels, device):
    """Class labels of any integer dtype (array, list or Tensor) as int32 on `device`: the one
    rule of every device (the kernels read int32; a loader should produce int32 so that this is
    free). Anything but integers is refused with the same TypeError everywhere."""
    labels = labels.data if isinstance(labels, Tensor) else labels
    labels = device.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.dtype != np.int32:
        labels = labels.astype(np.int32)   # values outside [0, K) stay outside: the ops refuse them
    return labels


# ---- casts (mixed precision) --------------------------------------------------------------------


def cast(x, dtype):
    """x as another float dtype (e.g. fp32 master weights -> fp16 for compute); the gradient is
    cast back to x's dtype."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    ops = _ops(x)
    src_dtype = x.dtype
    return Tensor._from_op(ops.cast(x.data, dtype), (x,), lambda dy: (ops.cast(dy, src_dtype),))


# ---- layout and input ---------------------------------------------------------------------------


def transpose(x, axes):
    """A contiguous copy of x with its axes permuted (e.g. NCHW -> NHWC with axes (0, 2, 3, 1));
    backward applies the inverse permutation."""
    xp = x.device.xp
    axes = tuple(axes)
    inverse = tuple(int(i) for i in np.argsort(axes))
    y = xp.ascontiguousarray(x.data.transpose(axes))
    return Tensor._from_op(y, (x,), lambda dy: (xp.ascontiguousarray(dy.transpose(inverse)),))


def normalize_images(images_uint8, device="cpu", mean=(123.68, 116.78, 103.94), std=None, dtype=np.float32):
    """uint8 images [N, H, W, 3] (NHWC, RGB; NumPy or CuPy) -> float Tensor [N, H, W, 3] on `device`,
    (images - mean) / std (std None: mean subtraction only, as the MLPerf reference). Feed the
    result to the model with model(x, layout="NHWC")."""
    from nn.device import get_device
    device = get_device(device)
    images = device.asarray(images_uint8)
    return Tensor(device.ops.input_normalize(images, mean, std, dtype), device=device)
