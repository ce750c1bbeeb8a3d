"""Benchmark cases for batch norm (plain and fused), pooling, softmax cross-entropy + top-k, the
optimizer (fused SGD over one flat buffer, LARS ratios, global norm) and input normalisation.

All of these are memory bound: `bytes` is the fewest bytes each op must move (every input read
once, every output written once; kernels/cases.py says it per op); our kernels sometimes read an
input twice (batch norm reads x once for the statistics and once to normalise), which the
achieved GB/s then shows.  Baselines are CuPy built-ins doing the same arithmetic (CuPy 14 has no
cuDNN batch norm or pooling).  A case whose name carries no version runs the version the first H100
run measured under that name (MEASURED: the defaults of then), so that its prediction and that
measurement stay comparable; the cases named "v<N>" run version N.
"""

import numpy as np

from bench.kernel_cases import lesson_case
from kernels import cases as lesson

# the versions behind the unversioned names of ../shared/gpu-runs/2026-12-06-h100/kernels.json
MEASURED = {"batchnorm": 2, "pool": 2, "optimizer": 2, "input": 1}

# Batch-norm activation shapes of ResNet-50 at batch 256 (NHWC): the stem, then the output of
# each stage (BN + add + ReLU at the end of every bottleneck) and the stage's inner width.
_BN_RESNET50 = [(256, 112, 112, 64), (256, 56, 56, 64), (256, 56, 56, 256), (256, 28, 28, 128),
                (256, 28, 28, 512), (256, 14, 14, 256), (256, 14, 14, 1024), (256, 7, 7, 512),
                (256, 7, 7, 2048)]
_BN_TINY = [(2, 5, 5, 40)]
# one 16x16 image per channel count of ResNet-50: the launches (channel tiles, idle threads past
# the last channel) depend on the channels, the rest grows with the rows
_BN_PROFILE = [(1, 16, 16, C) for C in sorted({s[-1] for s in _BN_RESNET50})]


def _bn_cases(xp, shape, note=""):
    c = lesson.make("batchnorm", xp, shape)
    C = shape[-1]
    key = ("C", C)
    s = "x".join(map(str, shape)) + note
    x2, eps, name = c.x.reshape(-1, C), 1e-5, xp.__name__

    def xp_forward(relu=False, residual=None):
        out = (x2 - x2.mean(axis=0)) * (c.gamma / xp.sqrt(x2.var(axis=0) + eps)) + c.beta
        if residual is not None:
            out += residual.reshape(-1, C)
        return xp.maximum(out, 0) if relu else out

    def xp_backward(relu=False):
        y, mean, invstd = c.saved("batchnorm_relu_backward")
        g = c.dy.reshape(-1, C)
        if relu:
            g = xp.where(y.reshape(-1, C) > 0, g, 0)
        xhat = (x2 - mean) * invstd
        db = g.sum(axis=0)
        dg = (g * xhat).sum(axis=0)
        return (c.gamma * invstd) * (g - db / x2.shape[0] - xhat * (dg / x2.shape[0])), dg, db

    return [
        lesson_case(c, "batchnorm_forward_train", MEASURED["batchnorm"], f"batchnorm_forward_train [{s}]", xp_forward,
                    f"{name} mean/var/normalise", key=key),
        lesson_case(c, "batchnorm_relu_forward_train", MEASURED["batchnorm"], f"batchnorm_relu_forward_train [{s}]",
                    lambda: xp_forward(relu=True), f"{name} + maximum", key=key),
        lesson_case(c, "batchnorm_add_relu_forward_train", MEASURED["batchnorm"], f"batchnorm_add_relu_forward_train [{s}]",
                    lambda: xp_forward(relu=True, residual=c.residual), f"{name} + add, maximum", key=key),
        lesson_case(c, "batchnorm_forward_inference", MEASURED["batchnorm"], f"batchnorm_forward_inference [{s}]",
                    lambda: (x2 - c.rm) * (c.gamma / xp.sqrt(c.rv + eps)) + c.beta, f"{name} elementwise", key=key),
        lesson_case(c, "batchnorm_backward", MEASURED["batchnorm"], f"batchnorm_backward [{s}]", xp_backward,
                    f"{name} sums + elementwise", key=key),
        lesson_case(c, "batchnorm_relu_backward", MEASURED["batchnorm"], f"batchnorm_relu_backward [{s}]",
                    lambda: xp_backward(relu=True), f"{name} where + sums", key=key),
        lesson_case(c, "batchnorm_add_relu_backward", MEASURED["batchnorm"], f"batchnorm_add_relu_backward [{s}]",
                    lambda: xp_backward(relu=True), f"{name} where + sums", key=key),
    ] + _bn_f16_cases(c, s, key)


def _bn_f16_cases(c, s, key):
    """What a mixed-precision step runs: float16 activations, the training forward with the
    convolution's statistics (version 3, and version 4's vectors) and the backward (version 2's
    kernels, which version 3 runs, and version 4's); version 5's backward behind a ReLU from the next
    convolution's partial sums, in float32 too."""
    out = []
    for op in c.FROM_STATS_F16:
        out += [lesson_case(c, op, n, f"{op.removesuffix(' f16')} f16 v{n} [{s}]", key=key) for n in (3, 4)]
    for op in c.BACKWARD_F16:
        out += [lesson_case(c, op, n, f"{op.removesuffix(' f16')} f16 v{n} [{s}]", key=key) for n in (2, 4)]
    # version 5: the ReLU form's backward from the next convolution's partial sums (float32 and float16)
    out += [lesson_case(c, op, 5, f"{op.removesuffix(' f16')}{' f16' if op.endswith(' f16') else ''} v5 [{s}]",
                        key=key) for op in c.FROM_PARTIALS]
    return out


def _pool_cases(xp, size):
    shape = {"resnet50": (256, 112, 112, 64), "profile": (1, 112, 112, 64)}.get(size, (2, 9, 9, 16))
    c = lesson.make("pool", xp, shape + (3, 2, 1))
    s = "x".join(map(str, shape)) + (" (batch 1 of 256)" if size == "profile" else "")
    a_shape = {"resnet50": (256, 7, 7, 2048), "profile": (8, 7, 7, 2048)}.get(size, (2, 3, 3, 64))
    a = lesson.make("pool", xp, a_shape + (1, 1, 0))   # the head's average pool (the window is unused)
    a_s = "x".join(map(str, a_shape)) + (" (batch 8 of 256)" if size == "profile" else "")
    HW = a_shape[1] * a_shape[2]
    return [
        lesson_case(c, "maxpool2d_forward", None, f"maxpool2d_forward 3x3 s2 p1 [{s}]"),
        lesson_case(c, "maxpool2d_backward", 1, f"maxpool2d_backward v1 scatter + atomicAdd [{s}]",
                    lambda: c.run("maxpool2d_backward", 2, {}), "our v2 gather"),
        lesson_case(c, "maxpool2d_backward", 2, f"maxpool2d_backward v2 gather [{s}]",
                    lambda: c.run("maxpool2d_backward", 1, {}), "our v1 scatter + atomicAdd"),
        lesson_case(a, "global_avgpool_forward", None, f"global_avgpool_forward [{a_s}]",
                    lambda: a.x.mean(axis=(1, 2)), f"{xp.__name__} mean"),
        lesson_case(a, "global_avgpool_backward", MEASURED["pool"], f"global_avgpool_backward [{a_s}]",
                    lambda: xp.broadcast_to((a.dyavg / HW)[:, None, None, :], a_shape).copy(),
                    f"{xp.__name__} broadcast copy"),
        # version 3: 2x2 blocks of pixels in 16-byte vectors; float16 (a mixed-precision step's: version 1
        # has no float16 kernel, version 2 ran it); the average pool's backward in 16-byte vectors
        lesson_case(c, "maxpool2d_backward", 3, f"maxpool2d_backward v3 blocks [{s}]",
                    lambda: c.run("maxpool2d_backward", 1, {}), "our v1 scatter + atomicAdd"),
        lesson_case(c, "maxpool2d_backward f16", 2, f"maxpool2d_backward f16 v2 gather [{s}]"),
        lesson_case(c, "maxpool2d_backward f16", 3, f"maxpool2d_backward f16 v3 blocks [{s}]",
                    lambda: c.run("maxpool2d_backward f16", 2, {}), "our v2 gather"),
        lesson_case(a, "global_avgpool_backward", 3, f"global_avgpool_backward v3 [{a_s}]",
                    lambda: xp.broadcast_to((a.dyavg / HW)[:, None, None, :], a_shape).copy(),
                    f"{xp.__name__} broadcast copy"),
        # the stem's: with its batch norm's ReLU mask and backward partial sums in version 3's epilogue
        lesson_case(c, "maxpool2d_backward relu_bn", 3, f"maxpool2d_backward relu_bn v3 blocks [{s}]"),
        lesson_case(c, "maxpool2d_backward relu_bn f16", 3, f"maxpool2d_backward relu_bn f16 v3 blocks [{s}]"),
        lesson_case(a, "global_avgpool_backward relu_bn f16", 3, f"global_avgpool_backward relu_bn f16 v3 [{a_s}]"),
        lesson_case(a, "global_avgpool_backward f16", 2, f"global_avgpool_backward f16 v2 [{a_s}]"),
        lesson_case(a, "global_avgpool_backward f16", 3, f"global_avgpool_backward f16 v3 [{a_s}]"),
    ]


def _loss_cases(xp, size):
    N, K = (256, 1000) if size in ("resnet50", "profile") else (8, 1000)
    c = lesson.make("cross_entropy", xp, (N, K))
    rows = xp.arange(N)

    def xp_forward():
        m = c.logits.max(axis=1, keepdims=True)
        e = xp.exp(c.logits - m)
        s = e.sum(axis=1, keepdims=True)
        logp = c.logits - m - xp.log(s)
        return (-(0.9 * logp[rows, c.labels] + 0.1 * logp.mean(axis=1))).mean(), e / s

    def xp_backward():
        d = c.probs() - 0.1 / K
        d[rows, c.labels] -= 0.9
        return d / N

    def xp_topk():
        label_logit = c.logits[rows, c.labels][:, None]
        rank = (c.logits > label_logit).sum(axis=1)
        return xp.stack([(rank < 1).sum(), (rank < 5).sum()])

    name = xp.__name__
    return [
        lesson_case(c, "softmax_cross_entropy_forward", None,
                    f"softmax_cross_entropy_forward [{N},{K}] smoothing 0.1", xp_forward, f"{name} log-softmax"),
        lesson_case(c, "softmax_cross_entropy_backward", None, f"softmax_cross_entropy_backward [{N},{K}]",
                    xp_backward, f"{name} elementwise"),
        lesson_case(c, "topk_correct", None, f"topk_correct k=1,5 [{N},{K}]", xp_topk, f"{name} compare + sum"),
    ]


def _optimizer_cases(xp, size):
    # profile: every one of ResNet-50's 161 tensors at 1/16 of its size
    c = lesson.make("optimizer", xp, {"resnet50": (161, 1), "profile": (161, 16)}.get(size, (12, 64)))
    n = c.segments.total
    p, g, v = c.p.copy(), c.g, c.v.copy()
    views_p, views_g = c.segments.split(c.p), c.segments.split(c.g)

    def xp_sgd():   # the unfused update on the flat buffer, one weight decay for all
        gg = g + 5e-5 * p
        v[...] = 0.9 * v + gg
        p[...] -= 0.1 * v

    def xp_lars():  # one norm per tensor, tensor by tensor
        return [xp.linalg.norm(a) for a in views_p] + [xp.linalg.norm(a) for a in views_g]

    label = f"{n / 1e6:.1f}M params" if n >= 10**6 else f"{n} params"
    label += f", {len(c.sizes)} tensors"
    name = xp.__name__
    return [
        lesson_case(c, "momentum update", 2, f"momentum_update_flat v2 [{label}]", xp_sgd,
                    f"{name} elementwise (unfused)"),
        lesson_case(c, "momentum update", 1, f"sgd_momentum_update v1, per tensor [{label}]"),
        lesson_case(c, "lars_trust_ratio_flat", MEASURED["optimizer"], f"lars_trust_ratio_flat [{label}]", xp_lars,
                    f"{name}.linalg.norm per tensor"),
        lesson_case(c, "global_grad_norm", MEASURED["optimizer"], f"global_grad_norm [{label}]", lambda: float(xp.linalg.norm(g)),
                    f"{name}.linalg.norm"),
        # version 3: the norms in float4 vectors, four loads in flight a thread
        lesson_case(c, "lars_trust_ratio_flat", 3, f"lars_trust_ratio_flat v3 [{label}]", xp_lars,
                    f"{name}.linalg.norm per tensor"),
        lesson_case(c, "global_grad_norm", 3, f"global_grad_norm v3 [{label}]", lambda: float(xp.linalg.norm(g)),
                    f"{name}.linalg.norm"),
        # the same into a device array (out=): nothing read on the host, so the timing can hide the host
        lesson_case(c, "global_grad_norm out", 3, f"global_grad_norm v3 out= [{label}]", lambda: xp.linalg.norm(g),
                    f"{name}.linalg.norm, not read"),
    ]


def _input_cases(xp, size):
    shape = {"resnet50": (256, 224, 224), "profile": (2, 224, 224)}.get(size, (2, 16, 16))
    c = lesson.make("input", xp, shape)
    mean = xp.asarray(np.array(c.MEAN, np.float32))
    s = "x".join(map(str, shape + (3,)))
    name = xp.__name__
    return [
        lesson_case(c, "input_normalize u8->f32", 2, f"input_normalize u8->f32 v2 vec4 [{s}]",
                    lambda: c.images.astype(np.float32) - mean, f"{name} astype - mean"),
        lesson_case(c, "input_normalize u8->f32", 1, f"input_normalize u8->f32 v1 scalar [{s}]"),
        lesson_case(c, "input_normalize u8->f16", MEASURED["input"], f"input_normalize u8->f16 [{s}]",
                    lambda: (c.images.astype(np.float32) - mean).astype(np.float16),
                    f"{name} astype - mean, astype"),
        # version 3: 16-byte loads through shared memory, 16-byte stores, float32 and float16
        lesson_case(c, "input_normalize u8->f32", 3, f"input_normalize u8->f32 v3 tiles [{s}]",
                    lambda: c.images.astype(np.float32) - mean, f"{name} astype - mean"),
        lesson_case(c, "input_normalize u8->f16", 1, f"input_normalize u8->f16 v1 scalar [{s}]"),
        lesson_case(c, "input_normalize u8->f16", 3, f"input_normalize u8->f16 v3 tiles [{s}]",
                    lambda: (c.images.astype(np.float32) - mean).astype(np.float16),
                    f"{name} astype - mean, astype"),
    ]


def cases(xp, size):
    """The cases of this group: xp numpy (emulator; size "tiny" or "profile") or cupy; size "tiny",
    "resnet50" or "profile"."""
    out = []
    for shape in {"resnet50": _BN_RESNET50, "profile": _BN_PROFILE}.get(size, _BN_TINY):
        out += _bn_cases(xp, shape)
    out += _pool_cases(xp, size)
    out += _loss_cases(xp, size)
    out += _optimizer_cases(xp, size)
    out += _input_cases(xp, size)
    return out
