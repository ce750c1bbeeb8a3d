"""Benchmark cases for kernels/reduce.cu: every version of the sum, against xp.sum."""

from bench.kernel_cases import lesson_case
from kernels import cases as lesson
from kernels import versions


def cases(xp, size):
    n = {"resnet50": 256 * 56 * 56 * 256, "profile": 1 << 20}.get(size, 100_000)
    c = lesson.make("reduce", xp, (n,))
    out = []
    for v in versions.numbers("reduce"):
        out.append(lesson_case(c, "sum", v, f"sum v{v} [{n}]", lambda: c.x.sum(), f"{xp.__name__}.sum"))
        if v == 1 and size == "resnet50":   # predicted (bench.kernels --profile), not timed
            out[-1].notes["not_timed"] = "every add serialises on one address: seconds to minutes at this size"
    return out
