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
        # version 2: 16-byte vectors; the float16 ops a mixed-precision step runs, and float32's for comparison
        for op, baseline, bname in (
                ("relu_forward", lambda c=c: xp.maximum(c.a, 0), f"{name}.maximum"),
                ("add_relu_forward", lambda c=c: xp.maximum(c.a + c.b, 0), f"{name} a+b, maximum"),
                ("relu_forward f16", lambda c=c: xp.maximum(c.a16, 0), f"{name}.maximum"),
                ("relu_backward f16", lambda c=c: xp.where(c.a16 > 0, c.b16, 0), f"{name}.where"),
                ("add f16", lambda c=c: c.a16 + c.b16, f"{name} a+b"),
                ("add_relu_forward f16", lambda c=c: xp.maximum(c.a16 + c.b16, 0), f"{name} a+b, maximum"),
                ("cast f32->f16", lambda c=c: c.a.astype(np.float16), "astype"),
                ("cast f16->f32", lambda c=c: c.a16.astype(np.float32), "astype")):
            label = op if op.endswith(("f16", "f32")) and " " in op else f"{op} f32"
            group.append(lesson_case(c, op, 2, f"{label} v2 [{s}]", baseline, bname))
        out += group
    return out
