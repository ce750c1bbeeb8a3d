"""The op contract between nn/ and kernels/: every op the autograd calls, in one place.

nn/ never calls a kernel directly. Each op of nn/functional.py, nn/optim.py and nn/amp.py asks
its tensor's device for `device.ops.<name>(...)`, and two modules implement every name below
with exactly the signature below (tests/test_op_contract.py holds them to it):

    kernels/reference.py   NumPy: the `cpu` device, and the reference every kernel is tested against
    kernels/ops.py         our CUDA kernels: the `emu` (CPU emulator) and `cuda` (GPU) devices

Conventions: activations NHWC `x[N, H, W, C]`, convolution weights OIHW `w[K, C, R, S]`
(torchvision's), linear weights `[out, in]`, labels int32 `[N]`. Functions return new arrays,
except where IN PLACE is stated. Statistics of float16 inputs are accumulated in float32.
Everything an op needs is an argument (a pooling's geometry too): nothing is inferred from
shapes, which can be ambiguous. Which kernel version runs is not part of the contract: that is
chosen per op family (kernels/ops.py), the results are the same within rounding.

The bodies below are the semantics, written out; they are not called.
"""

import numpy as np

# ---- convolution and the classifier ---------------------------------------------------------------


def conv2d_forward(x, w, stride, padding):
    """y[n, p, q, k] = sum_{c, r, s} x[n, p*stride + r - padding, q*stride + s - padding, c] * w[k, c, r, s]
    (zero padding; no bias, dilation 1, groups 1).  x [N, H, W, C], w [K, C, R, S] -> y [N, P, Q, K]."""


def conv2d_forward_bn_stats(x, w, stride, padding):
    """(y, stats): y = conv2d_forward(x, w, stride, padding) and the batch-norm partials of y for
    batchnorm_forward_train_from_stats: stats [4, P, K] (float32, or wider), for each block of y's
    rows (pixels) and channel the count n, a shift a, the offset d of the block's mean from it and
    M2, the block's sum of squared deviations from its mean a + d.  How the rows are split into
    blocks is the implementation's (our kernels: 64-row output tiles, from the convolution's
    epilogue; the reference: one block)."""


def conv2d_backward_data(dy, w, x_shape, stride, padding):
    """dx of conv2d_forward: dy [N, P, Q, K], w [K, C, R, S] -> dx of shape x_shape (N, H, W, C)."""


def conv2d_backward_data_relu_bn(dy, w, x_shape, stride, padding, a, bn_x, bn_mean, dz=None):
    """(g, part): the backward data pass of a convolution whose input a = relu(batchnorm(bn_x)) (a
    training-mode batch norm with batch mean bn_mean, then a ReLU; or relu(batchnorm(bn_x) + r), the
    end of a residual block), with the first half of that batch norm's backward in its epilogue:
        da = conv2d_backward_data(dy, w, x_shape, stride, padding)  (+ dz: a's gradient from its
             other consumer, a residual block's identity shortcut, like a; None: none)
        g  = da where a > 0, else 0     (the ReLU's backward; like dy, x_shape)
        part [2, B, C] float32 (or wider): for each block b of g's rows (pixels) and channel c,
             part[0, b, c] = sum g,  part[1, b, c] = sum g * (bn_x - bn_mean[c])
    summed over the block's rows, from g as stored.  How the rows are split into blocks is the
    implementation's (our kernels: the convolution's 64-row tiles; the reference: one block).
    batchnorm_backward_from_partials(g, bn_x, ...) finishes the batch norm's backward."""


def conv2d_backward_weight(x, dy, w_shape, stride, padding, dtype=None):
    """dw of conv2d_forward: x [N, H, W, C], dy [N, P, Q, K] -> dw of shape w_shape (K, C, R, S), in
    `dtype` (None: x's; float32 for the float32 master weight of float16 activations)."""


def conv_weight(w, dtype):
    """w [K, C, R, S] as `dtype` (w.astype(dtype), or w itself) for conv2d_forward and
    conv2d_backward_data of activations of that dtype: a step prepares each weight once, for both
    (a mixed-precision step casts its float32 master).  The result is only read; its memory may be
    in another order than OIHW (a view: the kernels' channels-last order)."""


def linear_forward(x, w, b=None):
    """y = x @ w^T + b.  x [N, Cin], w [Cout, Cin] (x's dtype), b [Cout] or None (x's dtype or
    float32) -> y [N, Cout], x's dtype."""


def linear_backward(dy, x, w, need_bias_grad=True, dtype=None):
    """(dx = dy @ w, dw = dy^T @ x, db = sum_n dy or None); dx in dy's dtype, dw and db in `dtype`
    (None: dy's; float32 for float32 master parameters of a float16 layer)."""


# ---- batch normalisation --------------------------------------------------------------------------


def batchnorm_forward_train(x, gamma, beta, running_mean, running_var, eps=1e-5, momentum=0.1):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the batch's per-channel mean and biased
    variance; running_mean/var updated IN PLACE with momentum (unbiased variance).
    -> (y, saved_mean, saved_invstd)."""


def batchnorm_forward_train_from_stats(x, stats, gamma, beta, running_mean, running_var, eps=1e-5, momentum=0.1,
                                       relu=False, residual=None):
    """batchnorm_forward_train with the statistics of x given as partials (stats [4, P, C] of
    conv2d_forward_bn_stats, merged by Chan's formula: mean = sum n (a + d) / N, var = (sum M2 + sum
    n (a + d - mean)^2) / N) instead of computed from x: one read of x fewer.  relu: relu(bn(x));
    residual (with relu): relu(bn(x) + residual).  Running statistics IN PLACE, as
    batchnorm_forward_train. -> (y, saved_mean, saved_invstd); the backward is that of the
    unfused op of the same mode."""


def batchnorm_forward_inference(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta."""


def batchnorm_backward(dy, x, gamma, saved_mean, saved_invstd):
    """(dx, dgamma, dbeta) of batchnorm_forward_train."""


def batchnorm_relu_forward_train(x, gamma, beta, running_mean, running_var, eps=1e-5, momentum=0.1):
    """relu(batchnorm_forward_train(...)): one pass. -> (y, saved_mean, saved_invstd)."""


def batchnorm_relu_backward(dy, y, x, gamma, saved_mean, saved_invstd):
    """(dx, dgamma, dbeta) of batchnorm_relu_forward_train (y: its output, for the ReLU mask)."""


def batchnorm_add_relu_forward_train(x, residual, gamma, beta, running_mean, running_var, eps=1e-5, momentum=0.1):
    """relu(batchnorm_forward_train(x) + residual): the end of a residual block, one pass.
    -> (y, saved_mean, saved_invstd)."""


def batchnorm_add_relu_backward(dy, y, x, gamma, saved_mean, saved_invstd):
    """(dx, dgamma, dbeta, dresidual) of batchnorm_add_relu_forward_train."""


def batchnorm_relu_grad_partials(dy, y, x, saved_mean):
    """(g, part) of conv2d_backward_data_relu_bn from dy = da: g = dy where y > 0, else 0, and
    part [2, B, C] = per block of rows, [sum g, sum g * (x - saved_mean)] (the way to them when the
    convolution has no such epilogue: one more read of dy, y and x)."""


def batchnorm_backward_from_partials(g, x, gamma, saved_mean, saved_invstd, part):
    """(dx, dgamma, dbeta) of a training-mode batch norm from its output's gradient g (after the
    ReLU's mask, if any) and part [2, B, C] of conv2d_backward_data_relu_bn: dbeta = sum_b part[0],
    dgamma = invstd * sum_b part[1], dx = gamma * invstd * (g - dbeta / M - xhat * dgamma / M):
    one read of g and x, one write of dx."""


def batchnorm_backward_from_partials_pair(g, x, gamma, saved_mean, saved_invstd, part, x2, mean2):
    """(dx, dgamma, dbeta, part2): batchnorm_backward_from_partials of the first of two batch norms
    whose outputs are added (relu(bn(x) + bn2(x2)): both have the output gradient g), and part2
    [2, B2, C] float32 (or wider): per block of g's rows, [sum g, sum g * (x2 - mean2)] (x2: bn2's
    input, mean2 its batch mean), for batchnorm_backward_from_partials(g, x2, ...) of the second.
    How the rows are split into blocks is the implementation's."""


def batchnorm_partial_stats(x, shift):
    """This process's share of synchronised BN's statistics: [count, sum(x - shift), sum((x - shift)^2)]
    per channel -> stats [3, C] (float32 or wider)."""


def batchnorm_backward_reduce(dy, x, saved_mean, saved_invstd):
    """This process's [sum dy, sum dy * xhat] per channel -> sums [2, C]."""


def batchnorm_backward_elemt(dy, x, gamma, saved_mean, saved_invstd, sums, count):
    """dx of batch norm from the global sums (all-reduced) and the global count of rows."""


# ---- elementwise ----------------------------------------------------------------------------------


def relu_forward(x):
    """y = max(x, 0)."""


def relu_backward(dy, y):
    """dx = dy where y > 0, else 0."""


def add(a, b):
    """a + b (same shapes)."""


def add_relu_forward(a, b):
    """relu(a + b) (same shapes)."""


def cast(x, dtype):
    """x as another dtype (a new array; float32 <-> float16 round to nearest even)."""


# ---- pooling --------------------------------------------------------------------------------------


def maxpool2d_forward(x, kernel_size=3, stride=2, padding=1):
    """Max over kernel_size x kernel_size windows (padding never wins; ties and NaN: the first real
    pixel, then strictly larger ones). x [N, H, W, C] -> (y [N, P, Q, C], argmax int32 [N, P, Q, C]),
    argmax = h * W + w of the winner within its (n, c) plane."""


def maxpool2d_backward(dy, argmax, x_shape, kernel_size, stride, padding):
    """dx of maxpool2d_forward: each dy[n, p, q, c] added to the pixel argmax names. The geometry is
    that of the forward."""


def maxpool2d_backward_relu_bn(dy, argmax, y, a, bn_x, bn_mean, kernel_size, stride, padding):
    """(g, part): the backward of a max pool whose input a = relu(batchnorm(bn_x)) (a training-mode
    batch norm with batch mean bn_mean, then a ReLU: ResNet's stem), with the first half of that
    batch norm's backward, as conv2d_backward_data_relu_bn gives it for a batch norm before a
    convolution:
        g    = maxpool2d_backward(dy, argmax, a.shape, ...) where a > 0, else 0     (like a)
        part [2, B, C] float32 (or wider): per block b of g's rows (pixels) and channel c,
             part[0, b, c] = sum g,  part[1, b, c] = sum g * (bn_x - bn_mean[c])
    from g as stored.  y, argmax: the max pool's forward outputs of a.  How the rows are split into
    blocks is the implementation's.  batchnorm_backward_from_partials(g, bn_x, ...) finishes it."""


def global_avgpool_forward(x):
    """y[n, c] = mean over (h, w) of x[n, h, w, c]."""


def global_avgpool_backward(dy, x_shape):
    """dx[n, h, w, c] = dy[n, c] / (H * W)."""


def global_avgpool_backward_relu_bn(dy, a, bn_x, bn_mean):
    """(g, part): the backward of a global average pool whose input a = relu(batchnorm(bn_x) + r)
    (ResNet's last block), with the first half of that batch norm's backward:
        g    = global_avgpool_backward(dy, a.shape) where a > 0, else 0     (like a)
        part [2, B, C] float32 (or wider): per block b of g's rows, [sum g, sum g * (bn_x - bn_mean)]
    from g as stored, for batchnorm_backward_from_partials(g, bn_x, ...).  How the rows are split
    into blocks is the implementation's."""


# ---- the loss and the metrics ---------------------------------------------------------------------


def softmax_cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Mean over rows of -sum_k target[k] log softmax(logits)[k], target = (1 - eps) onehot + eps / K.
    -> (loss (0-d, float32 or wider), probs [N, K])."""


def softmax_cross_entropy_backward(probs, labels, label_smoothing=0.0, grad_scale=1.0):
    """dlogits = grad_scale * (probs - target) / N; grad_scale a number or a one-element device array."""


def topk_correct(logits, labels, ks=(1, 5)):
    """For each k, the rows whose label is among the k largest logits (ties to the lower index), then
    the rows holding a NaN/inf logit (never correct). -> int64 [len(ks) + 1]."""


def accumulate_loss(loss, totals):
    """IN PLACE: totals[0] += loss, totals[1] += 1 if loss is finite, else totals[2] += 1."""


# ---- the optimizer and mixed precision ------------------------------------------------------------


def sgd_momentum_update(param, grad, momentum_buf, lr, momentum=0.9, weight_decay=0.0, nesterov=False):
    """One tensor, IN PLACE: g = grad + wd * w; v = m * v + g; w -= lr * (g + m * v if nesterov else v)."""


def lars_trust_ratio(param, grad, weight_decay, eta=0.001, eps=1e-9):
    """eta * ||w|| / (||g|| + wd * ||w|| + eps), 1 where a norm is 0 -> Python float."""


def global_grad_norm(list_of_grads, out=None):
    """sqrt(sum of g^2 over every array) -> Python float; with out (float32 [1] on the same device)
    written there and out returned, nothing read on the host."""


def momentum_update_flat(params_flat, grads_flat, momentum_flat, segments, lr, momentum=0.9, nesterov=False,
                         lr_in_momentum=False, lr_scale=None, grad_scale=None, skip=None):
    """Every tensor of flat buffers laid out by `segments` (ParamSegments) in one go, IN PLACE, nothing
    when skip[0] != 0: g = grad * grad_scale + wd_s * w, lr_s = lr * lr_scale[s];
    SGD: v = m * v + g; w -= lr_s * v (Nesterov as above); LARS (lr_in_momentum): v = m * v + lr_s * g; w -= v.
    lr and grad_scale: numbers or one-element device arrays."""


def lars_trust_ratio_flat(params_flat, grads_flat, segments, eta=0.001, eps=1e-9, return_norms=False,
                          grad_scale=None):
    """lars_trust_ratio of every tensor of flat buffers (1 where segments.use_trust is False) -> float32 [S]."""


def nonfinite_flag(x, flag):
    """IN PLACE: flag[0] = 1 when any element of x is NaN or inf."""


def loss_scale_update(scale_state, counts, dynamic, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                      min_scale=1.0):
    """IN PLACE, the loss scaler after a step: scale_state = [S, 1/S], counts = [found_inf, good_steps,
    skipped_steps]; overflow: skipped += 1 (dynamic: S = max(S * backoff, min_scale)); else (dynamic)
    S *= growth after growth_interval good steps; found_inf cleared."""


# ---- input ----------------------------------------------------------------------------------------


def input_normalize(images_uint8, mean=(123.68, 116.78, 103.94), std=None, dtype=np.float32):
    """x = (images - mean) / std per RGB channel (std None: no division, as the MLPerf reference).
    uint8 [N, H, W, 3] -> dtype [N, H, W, 3]."""


OPS = [name for name, value in dict(globals()).items()
       if callable(value) and getattr(value, "__module__", None) == __name__ and not name.startswith("_")]
