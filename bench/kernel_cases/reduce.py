"""Benchmark cases for kernels/reduce.cu: every version of the sum, against xp.sum."""

import numpy as np

from bench.kernel_cases import Case
from kernels import reduce as rd


def cases(xp, size):
    n = 256 * 56 * 56 * 256 if size == "resnet50" else 100_000
    x = xp.asarray(np.random.default_rng(0).random(n, dtype=np.float32))
    out = []
    for method in rd.METHODS:
        if method == "atomic" and size == "resnet50":
            continue  # version 1 serialises every add on one address: minutes at this size
        out.append(Case(f"sum {method} [{n}]", lambda m=method: rd.sum(x, method=m), bytes=4 * n,
                        baseline=lambda: x.sum(), baseline_name=f"{xp.__name__}.sum"))
    return out
