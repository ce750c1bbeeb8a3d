"""Benchmark cases for kernels/elementwise.cu: memory-bound, so bytes moved is the measure."""

import numpy as np

from bench.kernel_cases import lesson_case
from kernels import cases as lesson

# Activation shapes of ResNet-50 at batch 256 (NHWC) where ReLU / add+ReLU run.
_RESNET50 = [(256, 112, 112, 64), (256, 56, 56, 256), (256, 28, 28, 512), (256, 14, 14, 1024), (256, 7, 7, 2048)]
_TINY = [(2, 9, 9, 16)]
_PROFILE = [(1, 56, 56, 256)]   # stage 1's output, one image of the batch


def cases(xp, size):
    out = []
    for shape in {"resnet50": _RESNET50, "profile": _PROFILE}.get(size, _TINY):
        c = lesson.make("elementwise", xp, (int(np.prod(shape)),))
        s = "x".join(map(str, shape)) + (" (batch 1 of 256)" if size == "profile" else "")
        name = xp.__name__
        group = [
            lesson_case(c, "relu_forward", 1, f"relu_forward f32 [{s}]", lambda c=c: xp.maximum(c.a, 0), f"{name}.maximum"),
            lesson_case(c, "add_relu_forward", 1, f"add_relu_forward f32 [{s}]",
                        lambda c=c: xp.maximum(c.a + c.b, 0), f"{name} a+b, maximum"),
            lesson_case(c, "relu_forward f16", 1, f"relu_forward f16 [{s}]", lambda c=c: xp.maximum(c.a16, 0),
                        f"{name}.maximum"),
            lesson_case(c, "cast f32->f16", 1, f"cast f32->f16 [{s}]", lambda c=c: c.a.astype(np.float16), "astype"),
        ]
        out += group
    return out
