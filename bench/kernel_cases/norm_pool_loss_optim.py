"""Benchmark cases for batch norm (plain and fused), pooling, softmax cross-entropy + top-k, the
optimizer (fused SGD over one flat buffer, LARS ratios, global norm) and input normalisation.

All of these are memory bound: `bytes` is the fewest bytes each op must move (every input read
once, every output written once); our kernels sometimes read an input twice (batch norm reads x
once for the statistics and once to normalise), which the achieved GB/s then shows.  Baselines
are CuPy built-ins doing the same arithmetic (CuPy 14 has no cuDNN batch norm or pooling).
"""

import numpy as np

from bench.kernel_cases import Case
from kernels import batchnorm as bn
from kernels import cross_entropy as ce
from kernels import input as inp
from kernels import optimizer as opt
from kernels import pool

# Batch-norm activation shapes of ResNet-50 at batch 256 (NHWC): the stem, then the output of
# each stage (BN + add + ReLU at the end of every bottleneck) and the stage's inner width.
_BN_RESNET50 = [(256, 112, 112, 64), (256, 56, 56, 64), (256, 56, 56, 256), (256, 28, 28, 128),
                (256, 28, 28, 512), (256, 14, 14, 256), (256, 14, 14, 1024), (256, 7, 7, 512),
                (256, 7, 7, 2048)]
_BN_TINY = [(2, 5, 5, 40)]


def _randn(xp, shape, seed, dtype=np.float32):
    if xp is np:
        return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    xp.random.seed(seed)
    return xp.random.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)


def resnet50_param_sizes():
    """(element count, gets weight decay) of each of ResNet-50 v1.5's 161 parameter tensors, in
    torchvision order: convolutions and the fc weight decay, BN gamma/beta and the fc bias do not."""
    sizes = [(64 * 3 * 7 * 7, True), (64, False), (64, False)]
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            for k, c_out in ((1, width), (3, width), (1, 4 * width)):
                c = c_in if k == 1 and c_out == width else width
                sizes += [(c_out * c * k * k, True), (c_out, False), (c_out, False)]
            if b == 0:   # the projection shortcut
                sizes += [(4 * width * c_in, True), (4 * width, False), (4 * width, False)]
            c_in = 4 * width
    sizes += [(1000 * 2048, True), (1000, False)]
    return sizes


def _bn_cases(xp, shape):
    C = shape[-1]
    n = int(np.prod(shape))
    s = "x".join(map(str, shape))
    x, res, dy = _randn(xp, shape, 1), _randn(xp, shape, 2), _randn(xp, shape, 3)
    gamma, beta = xp.ones(C, np.float32), xp.zeros(C, np.float32)
    rm, rv = xp.zeros(C, np.float32), xp.ones(C, np.float32)
    y, mean, invstd = bn.batchnorm_relu_forward_train(x, gamma, beta, rm, rv)
    x2 = x.reshape(-1, C)
    eps = 1e-5

    def xp_forward(relu=False, residual=None):
        mu = x2.mean(axis=0)
        var = x2.var(axis=0)
        out = (x2 - mu) * (gamma / xp.sqrt(var + eps)) + beta
        if residual is not None:
            out += residual.reshape(-1, C)
        return xp.maximum(out, 0) if relu else out

    def xp_backward(relu=False):
        g = dy.reshape(-1, C)
        if relu:
            g = xp.where(y.reshape(-1, C) > 0, g, 0)
        xhat = (x2 - mean) * invstd
        db = g.sum(axis=0)
        dg = (g * xhat).sum(axis=0)
        return (gamma * invstd) * (g - db / x2.shape[0] - xhat * (dg / x2.shape[0])), dg, db

    f = 4
    name = xp.__name__
    return [
        Case(f"batchnorm_forward_train [{s}]", lambda: bn.batchnorm_forward_train(x, gamma, beta, rm, rv),
             bytes=2 * f * n, baseline=xp_forward, baseline_name=f"{name} mean/var/normalise",
             notes={"our_passes_over_x": 2}),
        Case(f"batchnorm_relu_forward_train [{s}]", lambda: bn.batchnorm_relu_forward_train(x, gamma, beta, rm, rv),
             bytes=2 * f * n, baseline=lambda: xp_forward(relu=True), baseline_name=f"{name} + maximum"),
        Case(f"batchnorm_add_relu_forward_train [{s}]",
             lambda: bn.batchnorm_add_relu_forward_train(x, res, gamma, beta, rm, rv),
             bytes=3 * f * n, baseline=lambda: xp_forward(relu=True, residual=res), baseline_name=f"{name} + add, maximum"),
        Case(f"batchnorm_forward_inference [{s}]", lambda: bn.batchnorm_forward_inference(x, gamma, beta, rm, rv),
             bytes=2 * f * n, baseline=lambda: (x2 - rm) * (gamma / xp.sqrt(rv + eps)) + beta,
             baseline_name=f"{name} elementwise"),
        Case(f"batchnorm_backward [{s}]", lambda: bn.batchnorm_backward(dy, x, gamma, mean, invstd),
             bytes=3 * f * n, baseline=xp_backward, baseline_name=f"{name} sums + elementwise",
             notes={"our_passes": "dy, x read twice"}),
        Case(f"batchnorm_relu_backward [{s}]", lambda: bn.batchnorm_relu_backward(dy, y, x, gamma, mean, invstd),
             bytes=4 * f * n, baseline=lambda: xp_backward(relu=True), baseline_name=f"{name} where + sums"),
        Case(f"batchnorm_add_relu_backward [{s}]",
             lambda: bn.batchnorm_add_relu_backward(dy, y, x, gamma, mean, invstd),
             bytes=5 * f * n, baseline=lambda: xp_backward(relu=True), baseline_name=f"{name} where + sums"),
    ]


def _pool_cases(xp, size):
    out = []
    shape = (256, 112, 112, 64) if size == "resnet50" else (2, 9, 9, 16)
    x = _randn(xp, shape, 4)
    y, argmax = pool.maxpool2d_forward(x)
    dy = _randn(xp, y.shape, 5)
    s = "x".join(map(str, shape))
    nx, ny = int(np.prod(shape)), int(np.prod(y.shape))
    out.append(Case(f"maxpool2d_forward 3x3 s2 p1 [{s}]", lambda: pool.maxpool2d_forward(x), bytes=4 * nx + 8 * ny))
    out.append(Case(f"maxpool2d_backward gather [{s}]", lambda: pool.maxpool2d_backward(dy, argmax, shape, 3, 2, 1),
                    bytes=8 * ny + 4 * nx,
                    baseline=lambda: pool.maxpool2d_backward(dy, argmax, shape, 3, 2, 1, method="scatter"),
                    baseline_name="our scatter + atomicAdd (version 1)"))
    a_shape = (256, 7, 7, 2048) if size == "resnet50" else (2, 3, 3, 64)
    a_x = _randn(xp, a_shape, 6)
    a_dy = _randn(xp, (a_shape[0], a_shape[-1]), 7)
    s = "x".join(map(str, a_shape))
    n = int(np.prod(a_shape))
    small = 4 * a_shape[0] * a_shape[-1]
    out.append(Case(f"global_avgpool_forward [{s}]", lambda: pool.global_avgpool_forward(a_x), bytes=4 * n + small,
                    baseline=lambda: a_x.mean(axis=(1, 2)), baseline_name=f"{xp.__name__} mean"))
    out.append(Case(f"global_avgpool_backward [{s}]", lambda: pool.global_avgpool_backward(a_dy, a_shape),
                    bytes=4 * n + small,
                    baseline=lambda: xp.broadcast_to((a_dy / (a_shape[1] * a_shape[2]))[:, None, None, :],
                                                     a_shape).copy(),
                    baseline_name=f"{xp.__name__} broadcast copy"))
    return out


def _loss_cases(xp, size):
    N, K = (256, 1000) if size == "resnet50" else (8, 1000)
    logits = _randn(xp, (N, K), 8) * 3
    labels = xp.asarray(np.random.default_rng(9).integers(0, K, N).astype(np.int32))
    loss, probs = ce.softmax_cross_entropy_forward(logits, labels, 0.1)
    rows = xp.arange(N)

    def xp_forward():
        m = logits.max(axis=1, keepdims=True)
        e = xp.exp(logits - m)
        s = e.sum(axis=1, keepdims=True)
        logp = logits - m - xp.log(s)
        return (-(0.9 * logp[rows, labels] + 0.1 * logp.mean(axis=1))).mean(), e / s

    def xp_backward():
        d = probs - 0.1 / K
        d[rows, labels] -= 0.9
        return d / N

    def xp_topk():
        label_logit = logits[rows, labels][:, None]
        rank = (logits > label_logit).sum(axis=1)
        return xp.stack([(rank < 1).sum(), (rank < 5).sum()])

    b = 4 * N * K
    return [
        Case(f"softmax_cross_entropy_forward [{N},{K}] smoothing 0.1",
             lambda: ce.softmax_cross_entropy_forward(logits, labels, 0.1), bytes=2 * b,
             baseline=xp_forward, baseline_name=f"{xp.__name__} log-softmax"),
        Case(f"softmax_cross_entropy_backward [{N},{K}]",
             lambda: ce.softmax_cross_entropy_backward(probs, labels, 0.1), bytes=2 * b,
             baseline=xp_backward, baseline_name=f"{xp.__name__} elementwise"),
        Case(f"topk_correct k=1,5 [{N},{K}]", lambda: ce.topk_correct(logits, labels, (1, 5)), bytes=b,
             baseline=xp_topk, baseline_name=f"{xp.__name__} compare + sum"),
    ]


def _optimizer_cases(xp, size):
    if size == "resnet50":
        table = resnet50_param_sizes()
    else:
        table = [(s, d) for s, d in resnet50_param_sizes()[:12]]
        table = [(max(1, s // 64), d) for s, d in table]
    sizes = [s for s, _ in table]
    wd = [5e-5 if d else 0.0 for _, d in table]
    segments = opt.ParamSegments(sizes, wd, xp=xp)
    n = segments.total
    p, g, v = _randn(xp, n, 10), _randn(xp, n, 11) * 0.01, xp.zeros(n, np.float32)
    ratios = opt.lars_trust_ratio_flat(p, g, segments)
    lr = xp.asarray(np.array([0.1], np.float32))     # in a device buffer, as nn.optim keeps it
    views_p, views_g = segments.split(p), segments.split(g)

    def xp_sgd():   # the unfused update on the flat buffer, one weight decay for all
        gg = g + 5e-5 * p
        v[...] = 0.9 * v + gg
        p[...] -= 0.1 * v

    def xp_lars():  # one norm per tensor, tensor by tensor
        return [xp.linalg.norm(a) for a in views_p] + [xp.linalg.norm(a) for a in views_g]

    label = f"{n / 1e6:.1f}M params" if n >= 10**6 else f"{n} params"
    label += f", {len(sizes)} tensors"
    return [
        Case(f"momentum_update_flat [{label}]",
             lambda: opt.momentum_update_flat(p, g, v, segments, lr, 0.9), bytes=20 * n,
             baseline=xp_sgd, baseline_name=f"{xp.__name__} elementwise (unfused)"),
        Case(f"momentum_update_flat, LARS [{label}]",
             lambda: opt.momentum_update_flat(p, g, v, segments, lr, 0.9, lr_in_momentum=True, lr_scale=ratios),
             bytes=20 * n),
        Case(f"lars_trust_ratio_flat [{label}]", lambda: opt.lars_trust_ratio_flat(p, g, segments), bytes=8 * n,
             baseline=xp_lars, baseline_name=f"{xp.__name__}.linalg.norm per tensor"),
        Case(f"global_grad_norm [{label}]", lambda: opt.global_grad_norm([g]), bytes=4 * n,
             baseline=lambda: float(xp.linalg.norm(g)), baseline_name=f"{xp.__name__}.linalg.norm"),
    ]


def _input_cases(xp, size):
    shape = (256, 224, 224, 3) if size == "resnet50" else (2, 16, 16, 3)
    images = xp.asarray(np.random.default_rng(12).integers(0, 256, shape, dtype=np.uint8))
    mean = xp.asarray(np.array([123.68, 116.78, 103.94], np.float32))
    n = int(np.prod(shape))
    s = "x".join(map(str, shape))
    return [
        Case(f"input_normalize u8->f32 vec4 [{s}]", lambda: inp.input_normalize(images), bytes=5 * n,
             baseline=lambda: images.astype(np.float32) - mean, baseline_name=f"{xp.__name__} astype - mean"),
        Case(f"input_normalize u8->f32 scalar [{s}]", lambda: inp.input_normalize(images, method="scalar"),
             bytes=5 * n),
        Case(f"input_normalize u8->f16 [{s}]", lambda: inp.input_normalize(images, dtype=np.float16), bytes=3 * n,
             baseline=lambda: (images.astype(np.float32) - mean).astype(np.float16),
             baseline_name=f"{xp.__name__} astype - mean, astype"),
    ]


def cases(xp, size):
    """The cases of this group: xp numpy (emulator; size "tiny") or cupy; size "tiny" or "resnet50"."""
    out = []
    for shape in (_BN_RESNET50 if size == "resnet50" else _BN_TINY):
        out += _bn_cases(xp, shape)
    out += _pool_cases(xp, size)
    out += _loss_cases(xp, size)
    out += _optimizer_cases(xp, size)
    out += _input_cases(xp, size)
    return out
