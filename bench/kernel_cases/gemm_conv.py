"""Benchmark cases for kernels/gemm.cu and kernels/conv.cu.

size="resnet50": every distinct convolution of ResNet-50 v1.5 at batch 256 (the 7x7/2 stem, the
1x1 and 3x3 convolutions of each stage, the strided 3x3 of each stage's first block and the 1x1/2
downsample), each as forward, backward-data and backward-weight with the implicit-GEMM kernels;
im2col for the two most common 3x3 shapes; the fully connected layer's GEMMs (256x2048 @
2048x1000 and its two gradients) and a 4096^3 GEMM in float32 and with tensor cores (fp16 in,
fp32 out).  Baselines: cuBLAS through cupy.matmul, cuDNN through kernels/cudnn_engine.py when it
can run here.

size="tiny": a few small shapes with every version, seconds on the CPU emulator.
"""

import numpy as np

from bench.kernel_cases import Case
from kernels import conv as CV
from kernels import gemm as G

BATCH = 256
F32 = 4


def resnet50_conv_shapes():
    """Distinct (H, W, C, K, R, stride, padding) of ResNet-50 v1.5's convolutions, in network order."""
    shapes = [(224, 224, 3, 64, 7, 2, 3)]                            # stem
    size, cin = 56, 64                                               # after the 3x3/2 max pool
    for width, blocks, first_stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        cout = 4 * width
        for b in range(blocks):
            stride = first_stride if b == 0 else 1
            out = (size - 1) // stride + 1
            shapes.append((size, size, cin, width, 1, 1, 0))         # 1x1 reduce
            shapes.append((size, size, width, width, 3, stride, 1))  # 3x3 (v1.5: the stride is here)
            shapes.append((out, out, width, cout, 1, 1, 0))          # 1x1 expand
            if b == 0:
                shapes.append((size, size, cin, cout, 1, stride, 0))  # projection shortcut
            size, cin = out, cout
    seen, distinct = set(), []
    for s in shapes:
        if s not in seen:
            seen.add(s)
            distinct.append(s)
    return distinct


def _randn(xp, shape):
    """float32 standard normal numbers made where they are used (no host-to-GPU copy)."""
    if xp is np:
        return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return xp.random.standard_normal(shape, dtype=np.float32)


def _cudnn():
    try:
        from kernels import cudnn_engine
        ok, _ = cudnn_engine.cudnn_available()
        return cudnn_engine if ok else None
    except Exception:   # no CuPy / cuDNN frontend: no baseline
        return None


def _conv_cases(xp, n, shape, versions, cudnn):
    H, W, C, K, R, stride, pad = shape
    P = CV.conv_output_size(H, R, stride, pad)
    Q = CV.conv_output_size(W, R, stride, pad)
    x = _randn(xp, (n, H, W, C))
    w = _randn(xp, (K, C, R, R)) * np.float32(0.05)
    dy = _randn(xp, (n, P, Q, K))
    flops = 2 * n * P * Q * K * C * R * R
    x_b, w_b, y_b = x.size * F32, w.size * F32, dy.size * F32
    label = f"{R}x{R} s{stride} [{n},{H},{W},{C}]->{K}"
    cases = []
    for v in versions:
        tag = "" if v == "implicit_gemm" else f" ({v})"
        cases.append(Case(
            name=f"conv2d_forward {label}{tag}", flops=flops, bytes=x_b + w_b + y_b,
            run=lambda v=v: CV.conv2d_forward(x, w, stride, pad, version=v),
            baseline=(lambda: cudnn.conv2d_forward(x, w, stride, pad)) if cudnn else None,
            baseline_name="cuDNN" if cudnn else ""))
        cases.append(Case(
            name=f"conv2d_backward_data {label}{tag}", flops=flops, bytes=x_b + w_b + y_b,
            run=lambda v=v: CV.conv2d_backward_data(dy, w, x.shape, stride, pad, version=v),
            baseline=(lambda: cudnn.conv2d_backward_data(dy, w, x.shape, stride, pad)) if cudnn else None,
            baseline_name="cuDNN" if cudnn else ""))
        cases.append(Case(
            name=f"conv2d_backward_weight {label}{tag}", flops=flops, bytes=x_b + w_b + y_b,
            run=lambda v=v: CV.conv2d_backward_weight(x, dy, w.shape, stride, pad, version=v),
            baseline=(lambda: cudnn.conv2d_backward_weight(x, dy, w.shape, stride, pad)) if cudnn else None,
            baseline_name="cuDNN" if cudnn else ""))
    return cases


def _gemm_case(xp, name, M, N, K, trans_a=False, trans_b=False, half=False, version=None):
    dtype = np.float16 if half else np.float32
    a = _randn(xp, (K, M) if trans_a else (M, K)).astype(dtype)
    b = _randn(xp, (N, K) if trans_b else (K, N)).astype(dtype)
    c = xp.empty((M, N), dtype=np.float32)
    item = 2 if half else 4
    if half:
        run = lambda: G.gemm_f16(a, b, trans_a, trans_b, c=c, version=version or "wmma")
    else:
        run = lambda: G.gemm(a, b, trans_a, trans_b, c=c, version=version or "fast")
    baseline = None
    if xp is not np:
        opa = a.T if trans_a else a
        opb = b.T if trans_b else b
        baseline = lambda: xp.matmul(opa, opb)
    tag = f" [{version}]" if version else ""
    return Case(name=f"{name}{tag} {M}x{K} @ {K}x{N}{' fp16->fp32' if half else ''}",
                run=run, flops=2 * M * N * K, bytes=(M * K + K * N) * item + M * N * 4,
                baseline=baseline, baseline_name="cuBLAS (cupy.matmul)" if baseline else "")


def cases(xp, size):
    """The benchmark cases (see the module docstring); xp is numpy (emulator) or cupy (GPU)."""
    if size == "tiny":
        out = []
        for shape in [(9, 9, 3, 8, 3, 1, 1), (7, 7, 5, 7, 1, 2, 0)]:
            out += _conv_cases(xp, 2, shape, CV.VERSIONS, None)
        for version in G.VERSIONS:
            out.append(_gemm_case(xp, "gemm", 33, 17, 65, version=version))
        out.append(_gemm_case(xp, "gemm_f16", 33, 17, 65, half=True))
        out.append(_gemm_case(xp, "linear fc forward", 4, 10, 32, trans_b=True))
        return out
    if size != "resnet50":
        raise ValueError(f"size must be 'tiny' or 'resnet50', got {size!r}")
    cudnn = _cudnn()
    out = []
    for shape in resnet50_conv_shapes():
        out += _conv_cases(xp, BATCH, shape, ("implicit_gemm",), cudnn)
    for shape in [(56, 56, 64, 64, 3, 1, 1), (28, 28, 128, 128, 3, 1, 1)]:
        out += _conv_cases(xp, BATCH, shape, ("im2col",), cudnn)
    # fully connected layer: y = x @ w^T, dx = dy @ w, dw = dy^T @ x
    out.append(_gemm_case(xp, "fc forward", BATCH, 1000, 2048, trans_b=True))
    out.append(_gemm_case(xp, "fc backward data", BATCH, 2048, 1000))
    out.append(_gemm_case(xp, "fc backward weight", 1000, 2048, BATCH, trans_a=True))
    for version in ("tiled", "fast"):
        out.append(_gemm_case(xp, "gemm square", 4096, 4096, 4096, version=version))
    out.append(_gemm_case(xp, "gemm square", 4096, 4096, 4096, half=True))
    out.append(_gemm_case(xp, "fc forward", BATCH, 1000, 2048, trans_b=True, half=True))
    return out
