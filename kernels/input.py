"""Launcher of kernels/input.cu: a uint8 NHWC batch from the loader -> the model's float NHWC
input, mean subtracted (and optionally divided by std), in one pass on the device.

    x = input_normalize(images)                                  # float32, MLPerf: mean only
    x = input_normalize(images, std=(58.4, 57.1, 57.4), dtype=np.float16)
    x = input_normalize(images, version=2)                       # four pixels per thread

Versions (the header of input.cu; `python -m kernels.input` checks and times them): 1 (measured
faster than 2 on an H100), one value per thread; 2, four pixels per thread with 16-byte
stores (float32 output and aligned buffers; otherwise version 1 runs); 3, tiles of 4096 image bytes
loaded as 16-byte vectors into shared memory and written as 16-byte vectors (float32 and float16;
16-byte aligned buffers, otherwise version 1 runs; the default, predicted faster than both).
"""

import numpy as np

from . import versions
from .runtime.launch import array_module, blocks_for, check_array, empty, module

__all__ = ["input_normalize"]

_BLOCK = 256
_TILE = 4096        # INPUT_TILE in input.cu: image bytes a version 3 block stages at a time (256 x 16)


def _three(op, name, value):
    try:
        v = [float(t) for t in value]
    except TypeError:
        raise TypeError(f"{op}: {name} must be a sequence of 3 numbers (R, G, B), got {value!r}")
    if len(v) != 3 or not all(np.isfinite(v)):
        raise ValueError(f"{op}: {name} must be 3 finite numbers (R, G, B), got {value!r}")
    return v


def _data_ptr(a):
    if hasattr(a, "data") and hasattr(a.data, "ptr"):
        return a.data.ptr
    return a.__array_interface__["data"][0]


def input_normalize(images_uint8, mean=(123.68, 116.78, 103.94), std=None, dtype=np.float32, version=None):
    """x = (images - mean) / std per RGB channel (std None: no division, as the MLPerf reference).

    images_uint8: uint8 [N, H, W, 3] (NHWC, RGB), C-contiguous, NumPy (emulator) or CuPy (GPU).
    dtype: float32 or float16.  version: 2 (4 pixels per thread, wide loads and stores; float32
    with aligned buffers, else version 1 runs), 1 (one value per thread), 3 (16-byte loads staged in
    shared memory, 16-byte stores; 16-byte aligned buffers, else version 1 runs), None: the version
    in use.
    -> x: dtype [N, H, W, 3] on the device of the images.
    """
    op = "input_normalize"
    check_array(op, "images_uint8", images_uint8, dtype=np.uint8, ndim=4)
    if images_uint8.shape[-1] != 3:
        raise ValueError(f"{op}: images_uint8 must have 3 channels last (NHWC RGB), got shape "
                         f"{tuple(images_uint8.shape)}")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise TypeError(f"{op}: dtype must be float32 or float16, got {dtype}")
    version = versions.version("input", version, op)
    m = _three(op, "mean", mean)
    s = [1.0, 1.0, 1.0] if std is None else _three(op, "std", std)
    if any(v == 0.0 for v in s):
        raise ValueError(f"{op}: std must not contain 0, got {std!r}")
    xp = array_module(images_uint8)
    x = empty(xp, images_uint8.shape, dtype=dtype)
    n = images_uint8.size
    if n == 0:
        return x
    consts = tuple(np.float32(v) for v in m + s)
    aligned = _data_ptr(images_uint8) % 4 == 0 and _data_ptr(x) % 16 == 0
    if version == 3 and _data_ptr(images_uint8) % 16 == 0 and _data_ptr(x) % 16 == 0:
        tiles = n // _TILE
        module("input.cu").get_function(f"input_normalize_tiles_{'f32' if dtype == np.float32 else 'f16'}")(
            (blocks_for(max(1, tiles), 1, xp),), (_BLOCK,), (images_uint8, x, np.int64(n)) + consts)
    elif version == 2 and dtype == np.float32 and aligned:
        pixels = n // 3
        blocks = blocks_for(max(1, pixels // 4), _BLOCK, xp)
        module("input.cu").get_function("input_normalize_vec4_f32")(
            (blocks,), (_BLOCK,), (images_uint8, x, np.int64(pixels)) + consts)
    else:
        name = "input_normalize_f32" if dtype == np.float32 else "input_normalize_f16"
        module("input.cu").get_function(name)((blocks_for(n, _BLOCK, xp),), (_BLOCK,),
                                              (images_uint8, x, np.int64(n)) + consts)
    return x


if __name__ == "__main__":   # `python -m kernels.input ARGS` is `python -m kernels input ARGS` (the lesson)
    import runpy
    import sys
    sys.argv[1:1] = ["input"]
    runpy.run_module("kernels", run_name="__main__")
