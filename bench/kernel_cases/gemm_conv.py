"""Benchmark cases for kernels/gemm.cu and kernels/conv.cu.

size="resnet50": every distinct convolution of ResNet-50 v1.5 at batch 256 (the 7x7/2 stem, the
1x1 and 3x3 convolutions of each stage, the strided 3x3 of each stage's first block and the 1x1/2
downsample), each as forward, backward-data and backward-weight with the implicit-GEMM kernels;
im2col for the two most common 3x3 shapes; the fully connected layer's GEMMs (256x2048 @
2048x1000 and its two gradients) and a 4096^3 GEMM in float32 and with tensor cores (fp16 in,
fp32 out).  Baselines: cuBLAS through cupy.matmul, cuDNN through kernels/cudnn_engine.py when it
can run here.

The float16 convolutions (conv.cu versions 4 and 5, tensor cores) run at every ResNet-50 shape
too, against cuDNN in float16 (the weight as kernels.conv.conv_weight gives it, channels last, for
both; the weight gradient in float32 for ours, as training asks, in float16 for cuDNN); their
TFLOP/s are compared with the measured float16 matmul peak.

size="tiny": a few small shapes with every version, and the kinds of layer of ResNet-50 (the
stem's 7x7/2 on 3 channels, 1x1, 3x3, 3x3/2, the 1x1/2 projection) at 1/8 of the channels and a
7x7 or 16x16 image, with both float16 versions: seconds on the CPU emulator.
size="profile": every version of three of ResNet-50's convolutions (the 7x7/2 stem at batch 1 and
a quarter of its height and width, stage 1's 3x3 and its 1x1 reduce at batch 1 on 16x16), the fully connected
layer's forward GEMM at 128 of its 256 rows and 128 of its 1000 classes with all 2048 features
(each tile's reduction as long as at full size, the tiles full), and a 256^3 GEMM:
what the emulator profiles in a few seconds each (the twins `python -m bench.kernels --profile`
predicts the ResNet-50 cases from).
Versions are numbered as in the headers of conv.cu (1 naive, 2 im2col + GEMM, 3 implicit GEMM,
4 tensor cores, 5 tensor cores with asynchronous copies) and gemm.cu (1 naive, 2 tiled, 3 register
blocking, 4 tensor cores).
"""

import numpy as np

from bench.kernel_cases import lesson_case
from kernels import cases as lesson
from kernels import conv as CV
from kernels import gemm as G
from kernels import versions

BATCH = 256
RELU_BN_VERSIONS = (3, 4, 5)   # the versions with the ReLU + batch-norm epilogue in their backward data


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


def _cudnn():
    try:
        from kernels import cudnn_engine
        ok, _ = cudnn_engine.cudnn_available()
        return cudnn_engine if ok else None
    except Exception:   # no CuPy / cuDNN frontend: no baseline
        return None


def resnet50_conv_kinds_scaled():
    """The kinds of convolution of ResNet-50 at emulator size: the stem (7x7/2, 3 channels, 16x16
    image), then 1x1, 3x3, 3x3/2 and the 1x1/2 projection at 1/8 of stage 1's channels on a 7x7
    image, as (H, W, C, K, R, stride, padding)."""
    return [(16, 16, 3, 8, 7, 2, 3), (7, 7, 32, 8, 1, 1, 0), (7, 7, 8, 8, 3, 1, 1), (7, 7, 16, 16, 3, 2, 1),
            (7, 7, 32, 64, 1, 2, 0)]


def follows_bn_relu(shape):
    """Whether ResNet-50's convolution of this (H, W, C, K, R, stride, padding) takes relu(batchnorm(.))
    as its input, so that its backward data may carry the ReLU's and batch norm's backward in its
    epilogue (conv2d_backward_data_relu_bn): the 3x3 (conv2) and the 1x1 expand (conv3, K = 4 C) of
    a bottleneck.  (The 1x1 reduce and the projection follow a residual add + ReLU; the stem, the image.)"""
    _, _, C, K, R, _, _ = shape
    return (R == 3 and C != 3) or (R == 1 and K == 4 * C)


def follows_identity_block(shape):
    """Whether the convolution's input is the block before's add + ReLU output and its backward data
    adds that input's other gradient before the mask (the "+ shortcut + relu bn" op): a bottleneck's
    1x1 reduce (C = 4 K, stride 1) in a block with an identity shortcut (the shortcut's gradient), or
    the 1x1 stride-2 projection of stages 2-4 (K = 2 C; the block's reduce's da, whose backward runs
    first)."""
    _, _, C, K, R, stride, _ = shape
    return R == 1 and ((stride == 1 and C == 4 * K) or (stride == 2 and K == 2 * C))


def _conv_cases(xp, n, shape, conv_versions, cudnn, note="", relu_bn=(), shortcut=None):
    """shortcut: which "+ relu bn" op the versions in relu_bn get: None as the layer at this shape has
    (follows_identity_block), "both" (a profile twin that stands for both kinds)."""
    H, W, C, K, R, stride, pad = shape
    c = lesson.make("conv", xp, (n, H, W, C, K, R, stride, pad))
    label = f"{R}x{R} s{stride} [{n},{H},{W},{C}]->{K}{note}"
    baselines = {"conv2d_forward": lambda: cudnn.conv2d_forward(c.x, c.w, stride, pad),
                 "conv2d_backward_data": lambda: cudnn.conv2d_backward_data(c.dy, c.w, c.x.shape, stride, pad),
                 "conv2d_backward_weight": lambda: cudnn.conv2d_backward_weight(c.x, c.dy, c.w.shape, stride, pad),
                 # float16: the same channels-last weight as ours; cuDNN's weight gradient stays float16
                 "conv2d_forward f16": lambda: cudnn.conv2d_forward(c.x16, c.wk16(), stride, pad),
                 "conv2d_backward_data f16": lambda: cudnn.conv2d_backward_data(c.dy16, c.wk16(), c.x.shape, stride,
                                                                                pad),
                 "conv2d_backward_weight f16->f32": lambda: cudnn.conv2d_backward_weight(c.x16, c.dy16, c.w.shape,
                                                                                         stride, pad)}
    out = []
    for v in conv_versions:
        # relu_bn: the versions whose backward data also runs with the ReLU + batch-norm epilogue
        kinds = (False, True) if shortcut == "both" else (follows_identity_block(shape),)
        fused = [op for k in kinds for op in c.relu_bn_ops(v, shortcut=k)] if v in relu_bn else []
        for op in c.ops(v) + fused:
            baseline = baselines.get(op) if cudnn else None    # (none for the forward with batch-norm statistics)
            case = lesson_case(c, op, v, f"{op} v{v} {label}", baseline,
                               "cuDNN" + (" fp16" if v in CV.F16_VERSIONS else "") if baseline else "",
                               key=("R", R, "stride", stride))
            case.notes["tensor_cores"] = v in CV.F16_VERSIONS   # against the fp16 matrix peak
            case.notes["tiled"] = True      # blocks of output tiles, each over the whole reduction
            out.append(case)
    return out


def _gemm_case(xp, name, M, N, K, trans_a=False, trans_b=False, half=False, version=None, key=()):
    c = lesson.make("gemm", xp, (M, N, K, int(trans_a), int(trans_b)))
    op = "gemm_f16" if half else "gemm"
    version = version or (4 if half else 3)
    baseline = None
    if xp is not np:
        a, b = (c.a16, c.b16) if half else (c.a, c.b)
        opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
        baseline = lambda: xp.matmul(opa, opb)
    case = lesson_case(c, op, version, f"{name} v{version} {M}x{K} @ {K}x{N}{' fp16->fp32' if half else ''}",
                       baseline, "cuBLAS (cupy.matmul)" if baseline else "", key=key)
    case.notes["tensor_cores"] = half and version == 4
    case.notes["tiled"] = True
    return case


def _profile_cases(xp):
    out = []
    # a quarter of H and W (the stem), 16x16 images (whole 64-row tiles, so that the real layer's
    # tiles each do a profiled tile's work): one twin per filter size and stride
    for shape, note in [((56, 56, 3, 64, 7, 2, 3), " stem/4"), ((16, 16, 64, 64, 3, 1, 1), " stage1 16x16"),
                        ((16, 16, 256, 64, 1, 1, 0), " stage1 reduce 16x16"),
                        ((16, 16, 64, 64, 3, 2, 1), " strided 16x16"),
                        ((16, 16, 256, 64, 1, 2, 0), " projection 16x16")]:
        # the twins of the backward data with the ReLU + batch-norm epilogue (the 1x1 s1 one is the
        # reduce's shape, as for the plain backward data of the expand layers it is predicted beside)
        relu_bn = RELU_BN_VERSIONS if shape[2] != 3 else ()   # not the stem's
        out += _conv_cases(xp, 1, shape, versions.numbers("conv"), None, note, relu_bn, shortcut="both")
    for version in G.F32_VERSIONS:
        out.append(_gemm_case(xp, "fc forward 128 of 256x1000", 128, 128, 2048, trans_b=True, version=version,
                              key=("fc",)))
        out.append(_gemm_case(xp, "gemm", 256, 256, 256, version=version))
    out.append(_gemm_case(xp, "gemm", 256, 256, 256, half=True))
    return out


def cases(xp, size):
    """The benchmark cases (see the module docstring); xp is numpy (emulator) or cupy (GPU)."""
    if size == "profile":
        return _profile_cases(xp)
    if size == "tiny":
        out = []
        for shape in [(9, 9, 3, 8, 3, 1, 1), (7, 7, 5, 7, 1, 2, 0)]:   # (+ the epilogue on 3 and 5 channels)
            out += _conv_cases(xp, 2, shape, versions.numbers("conv"), None, relu_bn=RELU_BN_VERSIONS)
        for shape in resnet50_conv_kinds_scaled():
            fused = follows_bn_relu(shape) or follows_identity_block(shape)
            out += _conv_cases(xp, 2, shape, CV.F16_VERSIONS, None, relu_bn=RELU_BN_VERSIONS if fused else ())
        for version in G.F32_VERSIONS:
            out.append(_gemm_case(xp, "gemm", 33, 17, 65, version=version))
        out.append(_gemm_case(xp, "gemm_f16", 33, 17, 65, half=True))
        out.append(_gemm_case(xp, "linear fc forward", 4, 10, 32, trans_b=True))
        return out
    if size != "resnet50":
        raise ValueError(f"size must be 'tiny' or 'resnet50', got {size!r}")
    cudnn = _cudnn()
    out = []
    for shape in resnet50_conv_shapes():
        ours = (3, versions.FAMILIES["conv"].default_f16)
        fused = follows_bn_relu(shape) or follows_identity_block(shape)
        out += _conv_cases(xp, BATCH, shape, ours, cudnn, relu_bn=ours if fused else ())
    for shape in [(56, 56, 64, 64, 3, 1, 1), (56, 56, 128, 128, 3, 2, 1)]:
        out += _conv_cases(xp, BATCH, shape, (4,), cudnn)        # tensor cores without the async copies
    for shape in [(56, 56, 64, 64, 3, 1, 1), (28, 28, 128, 128, 3, 1, 1)]:
        out += _conv_cases(xp, BATCH, shape, (2,), cudnn)
    # fully connected layer: y = x @ w^T, dx = dy @ w, dw = dy^T @ x; the forward in every float32
    # version (the naive one and the shared-memory tiles beside the default register blocking)
    for version in G.F32_VERSIONS[:-1]:
        out.append(_gemm_case(xp, "fc forward", BATCH, 1000, 2048, trans_b=True, version=version, key=("fc",)))
    out.append(_gemm_case(xp, "fc forward", BATCH, 1000, 2048, trans_b=True, key=("fc",)))
    out.append(_gemm_case(xp, "fc backward data", BATCH, 2048, 1000))
    out.append(_gemm_case(xp, "fc backward weight", 1000, 2048, BATCH, trans_a=True))
    for version in (2, 3):
        out.append(_gemm_case(xp, "gemm square", 4096, 4096, 4096, version=version))
    out.append(_gemm_case(xp, "gemm square", 4096, 4096, 4096, half=True))
    out.append(_gemm_case(xp, "fc forward", BATCH, 1000, 2048, trans_b=True, half=True))
    return out
