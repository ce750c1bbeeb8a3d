"""Launchers of kernels/reduce.cu: the sum of a float32 array, by each version of the kernel.

    total = reduce.sum(x)                      # version 3 + a second one-block pass (default)
    total = reduce.sum(x, method="shared")     # version 2 + second pass
    total = reduce.sum(x, method="atomic")     # version 1
    total = reduce.sum(x, method="grid_atomic")  # version 3, blocks atomicAdd into the result
The result is a float32 array of shape () on the input's device.
"""

import numpy as np

from ._launch import array_module, blocks_for, check_array, module

__all__ = ["sum", "METHODS"]

METHODS = ("warp", "shared", "atomic", "grid_atomic")
_BLOCK = 256


def _block_pass(kernel_name, x, partial, blocks):
    k = module("reduce.cu").get_function(kernel_name)
    smem = _BLOCK * 4 if kernel_name == "sum_block_shared" else (_BLOCK // 32) * 4
    k((blocks,), (_BLOCK,), (x, partial, np.int64(x.size)), shared_mem=smem)


def sum(x, method="warp"):  # noqa: A001  (the op is called sum)
    """Sum of all elements of a float32 array x (any shape, C-contiguous) -> float32 array ()."""
    check_array("sum", "x", x, dtype=np.float32)
    if method not in METHODS:
        raise ValueError(f"sum: method must be one of {METHODS}, got {method!r}")
    xp = array_module(x)
    flat = x.reshape(-1)
    out = xp.zeros((), dtype=np.float32)
    if flat.size == 0:
        return out
    blocks = blocks_for(flat.size, _BLOCK, xp, per_thread=4)
    if method in ("atomic", "grid_atomic"):
        k = module("reduce.cu").get_function("sum_atomic" if method == "atomic" else "sum_grid_atomic")
        smem = 0 if method == "atomic" else (_BLOCK // 32) * 4
        k((blocks,), (_BLOCK,), (flat, out, np.int64(flat.size)), shared_mem=smem)
        return out
    name = "sum_block_warp" if method == "warp" else "sum_block_shared"
    partial = xp.empty(blocks, dtype=np.float32)
    _block_pass(name, flat, partial, blocks)      # pass 1: one partial sum per block
    _block_pass(name, partial, out.reshape(1), 1)  # pass 2: one block sums the partials
    return out
