"""Launchers of kernels/reduce.cu: the sum of a float32 array, by each version of the kernel.

    total = reduce.sum(x)                # version 3 (warp shuffles) + a second one-block pass
    total = reduce.sum(x, version=1)     # version 1: an atomicAdd per element
    total = reduce.sum(x, version=2)     # version 2: shared-memory tree + second pass
    total = reduce.sum(x, version=4)     # version 4: version 3's blocks atomicAdd into the result
The result is a float32 array of shape () on the input's device.  The versions are listed in
the header of reduce.cu; `python -m kernels.reduce` checks and times every one of them.
"""

import numpy as np

from . import versions
from .runtime.launch import array_module, blocks_for, check_array, empty, module

__all__ = ["sum"]

_BLOCK = 256
_BLOCK_KERNELS = {2: "sum_block_shared", 3: "sum_block_warp"}


def _block_pass(kernel_name, x, partial, blocks):
    k = module("reduce.cu").get_function(kernel_name)
    smem = _BLOCK * 4 if kernel_name == "sum_block_shared" else (_BLOCK // 32) * 4
    k((blocks,), (_BLOCK,), (x, partial, np.int64(x.size)), shared_mem=smem)


def sum(x, version=None):  # noqa: A001  (the op is called sum)
    """Sum of all elements of a float32 array x (any shape, C-contiguous) -> float32 array ().
    version: 1..4 (None: the version in use, 3)."""
    check_array("sum", "x", x, dtype=np.float32)
    version = versions.version("reduce", version, "sum")
    xp = array_module(x)
    flat = x.reshape(-1)
    out = xp.zeros((), dtype=np.float32)
    if flat.size == 0:
        return out
    blocks = blocks_for(flat.size, _BLOCK, xp, per_thread=4)
    if version in (1, 4):
        k = module("reduce.cu").get_function("sum_atomic" if version == 1 else "sum_grid_atomic")
        smem = 0 if version == 1 else (_BLOCK // 32) * 4
        k((blocks,), (_BLOCK,), (flat, out, np.int64(flat.size)), shared_mem=smem)
        return out
    name = _BLOCK_KERNELS[version]
    partial = empty(xp, blocks, dtype=np.float32)
    _block_pass(name, flat, partial, blocks)      # pass 1: one partial sum per block
    _block_pass(name, partial, out.reshape(1), 1)  # pass 2: one block sums the partials
    return out


if __name__ == "__main__":   # `python -m kernels.reduce ARGS` is `python -m kernels reduce ARGS` (the lesson)
    import runpy
    import sys
    sys.argv[1:1] = ["reduce"]
    runpy.run_module("kernels", run_name="__main__")
