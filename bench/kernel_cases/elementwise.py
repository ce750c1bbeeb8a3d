"""Benchmark cases for kernels/elementwise.cu: memory-bound, so bytes moved is the measure."""

import numpy as np

from bench.kernel_cases import Case
from kernels import elementwise as ew

# Activation shapes of ResNet-50 at batch 256 (NHWC) where ReLU / add+ReLU run.
_RESNET50 = [(256, 112, 112, 64), (256, 56, 56, 256), (256, 28, 28, 512), (256, 14, 14, 1024), (256, 7, 7, 2048)]
_TINY = [(2, 9, 9, 16)]


def cases(xp, size):
    shapes = _RESNET50 if size == "resnet50" else _TINY
    out = []
    for shape in shapes:
        n = int(np.prod(shape))
        a = xp.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
        b = xp.asarray(np.random.default_rng(1).standard_normal(shape, dtype=np.float32))
        s = "x".join(map(str, shape))
        out.append(Case(f"relu_forward f32 [{s}]", lambda a=a: ew.relu_forward(a), bytes=8 * n,
                        baseline=lambda a=a: xp.maximum(a, 0), baseline_name=f"{xp.__name__}.maximum"))
        out.append(Case(f"add_relu_forward f32 [{s}]", lambda a=a, b=b: ew.add_relu_forward(a, b), bytes=12 * n,
                        baseline=lambda a=a, b=b: xp.maximum(a + b, 0), baseline_name=f"{xp.__name__} a+b, maximum"))
        h = a.astype(np.float16)
        out.append(Case(f"relu_forward f16 [{s}]", lambda h=h: ew.relu_forward(h), bytes=4 * n,
                        baseline=lambda h=h: xp.maximum(h, 0), baseline_name=f"{xp.__name__}.maximum"))
        out.append(Case(f"cast f32->f16 [{s}]", lambda a=a: ew.cast(a, np.float16), bytes=6 * n,
                        baseline=lambda a=a: a.astype(np.float16), baseline_name="astype"))
    return out
