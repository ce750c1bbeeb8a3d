"""The CPU emulator runs CUDA C as a GPU would: indices, barriers, shared memory, warp intrinsics,
atomics, half precision; and it turns kernel bugs into Python exceptions, never a hang or a crash.

Every test compares with an independent NumPy computation of what the hardware would produce.
"""

import ctypes
import errno
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kernels
from kernels.emu import emulator

rng = np.random.default_rng(1234)


def module(src, **kw):
    return kernels.RawModule(code=textwrap.dedent(src), **kw)


@pytest.fixture(autouse=True)
def plain_emulator(monkeypatch):
    """These tests are about the plain emulator: no checks or schedule from the environment
    (tests/test_emulator_sanitizer.py covers those)."""
    monkeypatch.delenv("KERNELS_EMU_SANITIZE", raising=False)
    monkeypatch.delenv("KERNELS_EMU_SCHEDULE", raising=False)


# ------------------------------------------------------------------------------ the tutorial kernel
TUTORIAL = r"""
// Row sums of a matrix, written the way CUDA tutorials write it:
// a 2-D grid of 2-D blocks, each block loads a tile into dynamic shared memory, reduces each
// tile row with a tree (__syncthreads() inside the loop), finishes with a warp shuffle and
// atomicAdd()s its partial row sums into global memory.
extern "C" __global__ void row_sums(const float* __restrict__ a, float* __restrict__ out, int rows, int cols) {
    extern __shared__ float tile[];                    // blockDim.y x blockDim.x floats
    const int r = blockIdx.y * blockDim.y + threadIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    float* row = tile + threadIdx.y * blockDim.x;
    row[threadIdx.x] = (r < rows && c < cols) ? a[(long long)r * cols + c] : 0.0f;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride >= 32; stride /= 2) {
        if (threadIdx.x < stride) row[threadIdx.x] += row[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x < 32) {
        float v = row[threadIdx.x];
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
        if (threadIdx.x == 0 && r < rows) atomicAdd(&out[r], v);
    }
}
"""


@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 300), (33, 1000), (130, 129)])
def test_tutorial_kernel_matches_numpy(rows, cols):
    k = module(TUTORIAL).get_function("row_sums")
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    out = np.zeros(rows, np.float32)
    bx, by = 128, 4
    grid = ((cols + bx - 1) // bx, (rows + by - 1) // by)
    k(grid, (bx, by), (a, out, np.int32(rows), np.int32(cols)), shared_mem=bx * by * 4)
    np.testing.assert_allclose(out, a.astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------ indices
def test_thread_and_block_indices_in_three_dimensions():
    src = r"""
    extern "C" __global__ void ids(int* out) {
        int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
        int i = b * (blockDim.x * blockDim.y * blockDim.z) + t;
        out[4 * i + 0] = threadIdx.x + 10 * threadIdx.y + 100 * threadIdx.z;
        out[4 * i + 1] = blockIdx.x + 10 * blockIdx.y + 100 * blockIdx.z;
        out[4 * i + 2] = blockDim.x + 10 * blockDim.y + 100 * blockDim.z;
        out[4 * i + 3] = gridDim.x + 10 * gridDim.y + 100 * gridDim.z;
    }"""
    grid, block = (3, 2, 2), (5, 3, 2)
    out = np.full(3 * 2 * 2 * 5 * 3 * 2 * 4, -1, np.int32)
    module(src).get_function("ids")(grid, block, (out,))
    out = out.reshape(2, 2, 3, 2, 3, 5, 4)  # bz by bx tz ty tx field
    bz, by, bx, tz, ty, tx = np.meshgrid(*[np.arange(n) for n in (2, 2, 3, 2, 3, 5)], indexing="ij")
    np.testing.assert_array_equal(out[..., 0], tx + 10 * ty + 100 * tz)
    np.testing.assert_array_equal(out[..., 1], bx + 10 * by + 100 * bz)
    assert np.all(out[..., 2] == 5 + 30 + 200) and np.all(out[..., 3] == 3 + 20 + 200)


def test_grid_stride_loop_and_device_function_and_template():
    src = r"""
    template <typename T> __device__ __forceinline__ T cube(T v) { return v * v * v; }
    template <typename T> __device__ void cube_all(const T* x, T* y, int n) {
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) y[i] = cube(x[i]);
    }
    extern "C" {
    __global__ void cube_f32(const float* x, float* y, int n) { cube_all(x, y, n); }
    __global__ void cube_f64(const double* x, double* y, int n) { cube_all(x, y, n); }
    }"""
    m = module(src)
    for name, dt in (("cube_f32", np.float32), ("cube_f64", np.float64)):
        x = rng.standard_normal(1001).astype(dt)
        y = np.zeros_like(x)
        m.get_function(name)((3,), (64,), (x, y, np.int32(x.size)))
        np.testing.assert_allclose(y, x.astype(np.float64) ** 3, rtol=1e-6)


# ------------------------------------------------------------------------------ barriers & shared memory
def test_syncthreads_orders_shared_memory():
    # Reversal through shared memory is wrong without a real barrier: thread 0 would read
    # tile[n-1] before thread n-1 wrote it.
    src = r"""
    extern "C" __global__ void reverse(const int* x, int* y) {
        __shared__ int tile[256];
        tile[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
        __syncthreads();
        y[blockIdx.x * blockDim.x + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
    }"""
    x = rng.integers(0, 1000, 512).astype(np.int32)
    y = np.zeros_like(x)
    module(src).get_function("reverse")((2,), (256,), (x, y))
    np.testing.assert_array_equal(y, x.reshape(2, 256)[:, ::-1].ravel())


def test_threads_that_returned_do_not_block_a_barrier():
    src = r"""
    extern "C" __global__ void partial(int* y, int n) {
        __shared__ int s[128];
        if (threadIdx.x >= n) return;           // these threads never reach the barrier
        s[threadIdx.x] = threadIdx.x;
        __syncthreads();
        y[threadIdx.x] = s[n - 1 - threadIdx.x];
    }"""
    y = np.zeros(128, np.int32)
    module(src).get_function("partial")((1,), (128,), (y, np.int32(100)))
    np.testing.assert_array_equal(y[:100], np.arange(100)[::-1])


def test_syncthreads_count_and_or():
    src = r"""
    extern "C" __global__ void votes(const int* p, int* out) {
        int v = p[threadIdx.x];
        int c = __syncthreads_count(v);
        int a = __syncthreads_and(v);
        int o = __syncthreads_or(v);
        if (threadIdx.x == 0) { out[0] = c; out[1] = a; out[2] = o; }
    }"""
    f = module(src).get_function("votes")
    for p in (rng.integers(0, 2, 96), np.ones(96), np.zeros(96)):
        p = p.astype(np.int32)
        out = np.zeros(3, np.int32)
        f((1,), (96,), (p, out))
        assert list(out) == [p.sum(), int(p.all()), int(p.any())]


# ------------------------------------------------------------------------------ warp intrinsics
WARP_SRC = r"""
extern "C" __global__ void warp_ops(const int* v, const int* pred, int* out, int arg, int width) {
    const int t = threadIdx.x;
    const int x = v[t];
    out[8 * t + 0] = __shfl_sync(0xffffffff, x, arg, width);
    out[8 * t + 1] = __shfl_up_sync(0xffffffff, x, arg, width);
    out[8 * t + 2] = __shfl_down_sync(0xffffffff, x, arg, width);
    out[8 * t + 3] = __shfl_xor_sync(0xffffffff, x, arg, width);
    out[8 * t + 4] = (int)__ballot_sync(0xffffffff, pred[t]);
    out[8 * t + 5] = __any_sync(0xffffffff, pred[t]);
    out[8 * t + 6] = __all_sync(0xffffffff, pred[t]);
    out[8 * t + 7] = __shfl_sync(0xffffffff, __float_as_int(1.5f * x), (t + 1) % 32);
}
"""


def _warp_model(v, pred, arg, width):
    """What the hardware returns, lane by lane (CUDA programming guide, warp shuffle functions)."""
    n = v.size
    out = np.zeros((n, 8), np.int64)
    for t in range(n):
        w, lane = divmod(t, 32)
        base = w * 32
        seg = lane & ~(width - 1)
        src = seg + (arg & (width - 1))
        out[t, 0] = v[base + src]
        src = lane - arg
        out[t, 1] = v[base + src] if src >= seg else v[t]
        src = lane + arg
        out[t, 2] = v[base + src] if src < seg + width else v[t]
        src = lane ^ arg
        out[t, 3] = v[base + src] if src < seg + width else v[t]
        lanes = pred[base:base + 32]
        ballot = sum(1 << i for i in range(32) if lanes[i])
        out[t, 4] = np.int64(np.uint32(ballot).view(np.int32))
        out[t, 5] = int(lanes.any())
        out[t, 6] = int(lanes.all())
        out[t, 7] = np.float32(1.5 * v[base + (t + 1) % 32]).view(np.int32)
    return out


@pytest.mark.parametrize("arg,width", [(0, 32), (1, 32), (5, 32), (16, 32), (3, 8), (1, 4), (7, 16), (31, 32)])
def test_warp_shuffles_and_votes_follow_hardware_lane_order(arg, width):
    v = rng.integers(-1000, 1000, 64).astype(np.int32)
    pred = rng.integers(0, 2, 64).astype(np.int32)
    pred[32:] = 1  # second warp: all true
    out = np.zeros(64 * 8, np.int32)
    module(WARP_SRC).get_function("warp_ops")((1,), (64,), (v, pred, out, np.int32(arg), np.int32(width)))
    np.testing.assert_array_equal(out.reshape(64, 8), _warp_model(v, pred, arg, width))


def test_warp_reduce_with_partial_last_warp_and_half_mask():
    src = r"""
    extern "C" __global__ void warp_sum(const float* x, float* out) {
        float v = x[threadIdx.x];
        if (threadIdx.x < 16) {  // only the low half of warp 0 takes part
            for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0x0000ffff, v, o, 16);
            if (threadIdx.x == 0) out[0] = v;
        }
        unsigned m = __activemask();      // before the __syncwarp no lane can have returned, in any order
        __syncwarp();
        if (threadIdx.x == 0) out[1] = (float)__popc(m);
    }"""
    x = rng.standard_normal(40).astype(np.float32)  # 40 threads: the second warp has 8 lanes
    out = np.zeros(2, np.float32)
    module(src).get_function("warp_sum")((1,), (40,), (x, out))
    assert out[0] == pytest.approx(x[:16].astype(np.float64).sum(), rel=1e-5)
    assert out[1] == 32


# ------------------------------------------------------------------------------ atomics
def test_atomics_on_global_and_shared_memory():
    src = r"""
    extern "C" __global__ void atomics(const int* keys, int n, int* hist_global, float* fsum, double* dsum,
                                       unsigned* ucount, int* imax, int* imin, int* cas_winner, int* exch) {
        __shared__ int hist[16];
        if (threadIdx.x < 16) hist[threadIdx.x] = 0;
        __syncthreads();
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) {
            int k = keys[i];
            atomicAdd(&hist[k & 15], 1);
            atomicAdd(fsum, (float)k);
            atomicAdd(dsum, (double)k * 0.5);
            atomicAdd(ucount, 1u);
            atomicMax(imax, k);
            atomicMin(imin, k);
            if (atomicCAS(cas_winner, -1, i) == -1) atomicExch(exch, k);
        }
        __syncthreads();
        if (threadIdx.x < 16) atomicAdd(&hist_global[threadIdx.x], hist[threadIdx.x]);
    }"""
    n = 1000
    keys = rng.integers(-500, 500, n).astype(np.int32)
    hist = np.zeros(16, np.int32)
    fsum, dsum = np.zeros(1, np.float32), np.zeros(1, np.float64)
    ucount = np.zeros(1, np.uint32)
    imax, imin = np.array([-(2**31)], np.int32), np.array([2**31 - 1], np.int32)
    winner, exch = np.array([-1], np.int32), np.zeros(1, np.int32)
    module(src).get_function("atomics")((4,), (256,), (keys, np.int32(n), hist, fsum, dsum, ucount, imax, imin,
                                                      winner, exch))
    np.testing.assert_array_equal(hist, np.bincount(keys & 15, minlength=16))
    assert fsum[0] == pytest.approx(keys.sum(), abs=1e-3)
    assert dsum[0] == pytest.approx(keys.sum() * 0.5)
    assert ucount[0] == n and imax[0] == keys.max() and imin[0] == keys.min()
    assert 0 <= winner[0] < n and exch[0] == keys[winner[0]]


# ------------------------------------------------------------------------------ half precision & math
def test_half_and_bfloat16_conversions_are_bit_exact():
    src = r"""
    #include <cuda_fp16.h>
    #include <cuda_bf16.h>
    extern "C" __global__ void conv(const float* x, __half* h, float* back, unsigned short* b, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) {
            h[i] = __float2half_rn(x[i]);
            back[i] = __half2float(h[i]);
            b[i] = __bfloat16_as_ushort(__float2bfloat16(x[i]));
        }
    }"""
    special = np.array([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, 6.1e-5, 6.0e-8, 2.98e-8,
                        2.9802322e-08, 5.96e-8, 1e-10, np.inf, -np.inf, np.nan], np.float32)
    x = np.concatenate([special, rng.standard_normal(3000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 3000)])
    x = x.astype(np.float32)
    h = np.zeros(x.size, np.float16)
    back = np.zeros(x.size, np.float32)
    b = np.zeros(x.size, np.uint16)
    module(src).get_function("conv")(((x.size + 255) // 256,), (256,), (x, h, back, b, np.int32(x.size)))
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(h.view(np.uint16)[~nan], ref.view(np.uint16)[~nan])
    assert np.all(np.isnan(h[nan]))
    np.testing.assert_array_equal(back[~nan], ref[~nan].astype(np.float32))
    # bfloat16: round to nearest even on the top 16 bits, computed independently in 64-bit ints
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(b[finite], rounded[finite])
    assert np.all((b[~finite] & 0x7F80) == 0x7F80) and np.all((b[~finite] & 0x7F) != 0)


def test_math_library_and_intrinsics():
    src = r"""
    extern "C" __global__ void maths(const float* x, float* y, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i >= n) return;
        float v = x[i];
        y[6 * i + 0] = expf(v);
        y[6 * i + 1] = __expf(v);
        y[6 * i + 2] = rsqrtf(fabsf(v) + 1.0f);
        y[6 * i + 3] = fmaxf(v, 0.25f);
        y[6 * i + 4] = __fdividef(v, 3.0f);
        y[6 * i + 5] = (float)max(__float2int_rn(v * 10.0f), -3) + min(2u, 7u);
    }"""
    x = rng.uniform(-5, 5, 500).astype(np.float32)
    y = np.zeros(6 * x.size, np.float32)
    module(src).get_function("maths")((2,), (256,), (x, y, np.int32(x.size)))
    y = y.reshape(-1, 6)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(y[:, 0], np.exp(xd), rtol=1e-6)
    np.testing.assert_allclose(y[:, 1], np.exp(xd), rtol=1e-5)
    np.testing.assert_allclose(y[:, 2], 1 / np.sqrt(np.abs(xd) + 1), rtol=1e-6)
    np.testing.assert_array_equal(y[:, 3], np.maximum(x, np.float32(0.25)))
    np.testing.assert_allclose(y[:, 4], xd / 3, rtol=1e-6)
    np.testing.assert_array_equal(y[:, 5], np.maximum(np.rint(x * np.float32(10)), -3) + 2)


def test_printf_from_a_kernel_reaches_stdout(capfd):
    src = r"""
    #include <cstdio>
    extern "C" __global__ void hello(int v) { if (threadIdx.x == 3) printf("thread %d says %d\n", threadIdx.x, v); }"""
    module(src).get_function("hello")((1,), (8,), (np.int32(42),))
    assert "thread 3 says 42" in capfd.readouterr().out


# ------------------------------------------------------------------------------ arguments as CuPy expects
SCALE = r"""
extern "C" __global__ void scale(const float* x, float* y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i];
}
extern "C" __global__ void scale64(const double* x, double* y, double a, long long n) {
    long long i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i];
}
"""


def test_scalar_arguments_must_be_numpy_scalars_of_the_declared_type():
    m = module(SCALE)
    k = m.get_function("scale")
    x = np.arange(10, dtype=np.float32)
    y = np.zeros_like(x)
    with pytest.raises(TypeError, match=r"Python float.*np\.float32"):
        k((1,), (32,), (x, y, 2.0, np.int32(10)))
    with pytest.raises(TypeError, match=r"Python int.*np\.int32"):
        k((1,), (32,), (x, y, np.float32(2), 10))
    with pytest.raises(TypeError, match=r"float64 array.*float32"):
        k((1,), (32,), (x.astype(np.float64), y, np.float32(2), np.int32(10)))
    with pytest.raises(TypeError, match=r"np\.float64.*np\.float32"):
        k((1,), (32,), (x, y, np.float64(2), np.int32(10)))
    with pytest.raises(TypeError, match="takes 4 arguments"):
        k((1,), (32,), (x, y, np.float32(2)))
    k((1,), (32,), (x, y, np.float32(2), np.int32(10)))
    np.testing.assert_array_equal(y, 2 * x)
    # Python float for a double and Python int for a 64-bit int cannot be misread: accepted
    x64, y64 = np.arange(5, dtype=np.float64), np.zeros(5)
    m.get_function("scale64")((1,), (32,), (x64, y64, 3.0, 5))
    np.testing.assert_array_equal(y64, 3 * x64)


def test_launch_limits_are_those_of_a_gpu():
    k = module(SCALE).get_function("scale")
    x = np.zeros(4, np.float32)
    args = (x, x.copy(), np.float32(1), np.int32(4))
    with pytest.raises(kernels.LaunchConfigError, match="1088 threads"):
        k((1,), (64, 17), args)
    with pytest.raises(kernels.LaunchConfigError, match=r"block\.x = 1025"):
        k((1,), (1025,), args)
    with pytest.raises(kernels.LaunchConfigError, match=r"block\.z"):
        k((1,), (1, 1, 65), args)
    with pytest.raises(kernels.LaunchConfigError, match="dynamic shared memory"):
        k((1,), (32,), args, shared_mem=48 * 1024 + 1)
    k.max_dynamic_shared_size_bytes = 64 * 1024  # opt in, as with cudaFuncSetAttribute
    k((1,), (32,), args, shared_mem=64 * 1024)
    with pytest.raises(kernels.LaunchConfigError):
        k((0,), (32,), args)


def test_unknown_kernel_name_lists_the_kernels():
    with pytest.raises(AttributeError, match="found: scale, scale64"):
        module(SCALE).get_function("nope")


# ------------------------------------------------------------------------------ errors
def test_compile_error_names_file_and_line():
    src = "extern \"C\" __global__ void broken(float* x) {\n    x[0] = undefined_name;\n}\n"
    k = kernels.RawKernel(src, "broken", filename="kernels/broken.cu")
    with pytest.raises(kernels.CompileError) as err:
        k((1,), (1,), (np.zeros(1, np.float32),))
    assert err.value.line == 2
    assert "kernels/broken.cu:2" in str(err.value) and "undefined_name" in str(err.value)


def test_divergent_barriers_raise_instead_of_hanging():
    src = r"""
    extern "C" __global__ void diverge(float* x) {
        if (threadIdx.x < 16) {
            __syncthreads();
        } else {
            __syncthreads();
        }
        x[threadIdx.x] = 1.0f;
    }"""
    with pytest.raises(kernels.BarrierDivergenceError, match=r"<kernel source>:4.*<kernel source>:6|:6.*:4"):
        module(src).get_function("diverge")((1,), (64,), (np.zeros(64, np.float32),))


def test_warp_collective_waiting_for_a_returned_lane_is_reported():
    src = r"""
    extern "C" __global__ void early(float* x, int n) {
        if (threadIdx.x >= n) return;     // a classic bug before a full-mask shuffle
        float v = __shfl_down_sync(0xffffffff, x[threadIdx.x], 1);
        x[threadIdx.x] = v;
    }"""
    with pytest.raises(kernels.DeadlockError, match="already returned"):
        module(src).get_function("early")((1,), (32,), (np.zeros(32, np.float32), np.int32(20)))


def test_assert_in_kernel_raises_with_block_and_thread():
    src = r"""
    #include <cassert>
    extern "C" __global__ void check(const int* x) { assert(x[threadIdx.x] >= 0); }"""
    x = np.zeros(64, np.int32)
    x[37] = -1
    with pytest.raises(kernels.KernelAssertionError, match=r"x\[threadIdx.x\] >= 0.*thread \(37,0,0\)"):
        module(src).get_function("check")((1,), (64,), (x,))


def test_invalid_pointer_is_an_exception_not_a_crash():
    src = r"""
    extern "C" __global__ void deref(float* x, long long offset) { x[offset] = 1.0f; }"""
    x = np.zeros(4, np.float32)
    with pytest.raises(kernels.KernelFault, match="block \\(0,0,0\\) thread \\(0,0,0\\)"):
        module(src).get_function("deref")((1,), (1,), (x, -(x.ctypes.data // 4)))  # writes to address 0
    # the interpreter is fine and the next launch works
    module(src).get_function("deref")((1,), (1,), (x, 2))
    assert x[2] == 1.0


# ------------------------------------------------------------------------------ what a compiler or libc would hide
# Bugs that g++ -O2 or the C library would turn into silence or a dead interpreter: each must be
# a Python exception naming the kernel (one module, so one compile).
HIDDEN = r"""
extern "C" __global__ void one_line_barriers(float* x, int split) {
    if ((int)threadIdx.x < split) { __syncthreads(); } else { __syncthreads(); }
    x[threadIdx.x] = 1.0f;
}
extern "C" __global__ void write_through_null(float* out, int how) {
    if (how == 0) *(float*)0 = 1.0f;                 // undefined behaviour: g++ deletes it and what follows
    if (how == 1) { float* p = nullptr; p[3] = 1.0f; }
    if (how == 2) { const float* p = nullptr; out[0] = p[threadIdx.x]; }
    out[threadIdx.x] = 2.0f;
}
extern "C" __global__ void stop(float* out, int how) {
    out[threadIdx.x] = 2.0f;
    if (threadIdx.x == 5) {
        if (how == 0) exit(3);
        if (how == 1) abort();
        if (how == 2) std::exit(4);
        __trap();
    }
}
"""


def test_barriers_on_one_line_are_told_apart():
    k = module(HIDDEN).get_function("one_line_barriers")
    x = np.zeros(64, np.float32)
    with pytest.raises(kernels.BarrierDivergenceError,
                       match=r"thread \(0,0,0\) waits at <kernel source>:3 while .* thread \(16,0,0\) waits at another "
                             r"__syncthreads\(\) of the same line, <kernel source>:3"):
        k((1,), (64,), (x, np.int32(16)))
    k((1,), (64,), (x, np.int32(64)))        # every thread takes the same branch: fine
    k((1,), (64,), (x, np.int32(0)))
    assert np.all(x == 1.0)


@pytest.mark.parametrize("how", [0, 1, 2])
def test_a_null_pointer_faults_instead_of_vanishing(how):
    out = np.zeros(8, np.float32)
    with pytest.raises(kernels.KernelFault, match=r"in kernel 'write_through_null' at address 0x[0-9a-f]+ "
                                                  r"\(a null pointer\), block \(0,0,0\) thread \(0,0,0\)"):
        module(HIDDEN).get_function("write_through_null")((1,), (8,), (out, np.int32(how)))
    module(HIDDEN).get_function("write_through_null")((1,), (8,), (out, np.int32(-1)))
    assert np.all(out == 2.0)


def test_exit_and_abort_in_a_kernel_raise_instead_of_ending_python():
    # (in a child process: before the fix, exit() ended the interpreter that ran it)
    code = textwrap.dedent("""
        import numpy as np, kernels
        from tests.test_emulator import HIDDEN
        k = kernels.RawModule(code=HIDDEN).get_function("stop")
        for how in range(4):
            try:
                k((1,), (32,), (np.zeros(32, np.float32), np.int32(how)))
                print("no error")
            except kernels.KernelFault as e:
                print(type(e).__name__, e)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4, proc.stdout
    where = r"called in kernel 'stop' \(function stop\), block \(0,0,0\) thread \(5,0,0\)"
    for line, call, at in zip(lines, ["exit\\(3\\)", "abort\\(\\)", "exit\\(4\\)", "__trap\\(\\)"], [15, 16, 17, 18]):
        assert re.fullmatch(rf"KernelFault <kernel source>:{at}: {call} {where}; .*", line), line
    assert "device code has no exit() or abort()" in lines[0] and "the launch fails, as on a GPU" in lines[3]


OOB = r"""
extern "C" __global__ void copy_shifted(const float* x, float* y, int n, int shift) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + shift];
}
extern "C" __global__ void write_past(float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = 1.0f;         // off by one
}
"""


@pytest.fixture
def debug_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNELS_EMU_DEBUG", "1")
    yield


def test_debug_mode_catches_reads_past_either_end(debug_mode):
    m = module(OOB)
    k = m.get_function("copy_shifted")
    x = rng.standard_normal(100).astype(np.float32)
    y = np.zeros_like(x)
    k((1,), (128,), (x, y, np.int32(100), np.int32(0)))     # in bounds: fine, and correct
    np.testing.assert_array_equal(y, x)
    with pytest.raises(kernels.OutOfBoundsError, match=r"read .*past the end of argument 0 'x'"):
        k((1,), (128,), (x, y, np.int32(100), np.int32(1)))
    with pytest.raises(kernels.OutOfBoundsError, match=r"read .*before the start of argument 0 'x'"):
        k((1,), (128,), (x, y, np.int32(100), np.int32(-1)))


def test_debug_mode_catches_an_off_by_one_write(debug_mode):
    k = module(OOB).get_function("write_past")
    for n in (64, 100, 3):  # sizes that do and do not fill whole 16-byte lines
        y = np.zeros(n, np.float32)
        with pytest.raises(kernels.OutOfBoundsError, match="past the end of argument 0 'y'"):
            k((1,), (128,), (y, np.int32(n)))


def test_debug_mode_writes_results_back_and_poisons_shared_memory(debug_mode):
    src = r"""
    extern "C" __global__ void uninit(float* y) {
        __shared__ float s[32];
        if (threadIdx.x == 0) s[0] = 1.0f;
        __syncthreads();
        y[threadIdx.x] = s[threadIdx.x];      // reads 31 values nobody wrote
    }"""
    y = np.zeros(32, np.float32)
    module(src).get_function("uninit")((1,), (32,), (y,))
    assert y[0] == 1.0 and np.all(np.isnan(y[1:]))


UNCHECKED = r"""
extern "C" __global__ void copy_unchecked(const float* x, float* y) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;     // no `if (i < n)`: threads >= n overrun
    y[i] = x[i];
}
__device__ unsigned int executions;
extern "C" __global__ void count_executions(unsigned int* seen) {
    atomicAdd(&executions, 1u);
    seen[0] = executions;
}
"""


@pytest.mark.parametrize("mode", ["1", "gdb"])
def test_debug_modes_name_the_first_bad_access(mode, monkeypatch):
    # 1000 floats, 4 blocks of 256: thread 232 of block 3 is the first to read element 1000
    monkeypatch.setenv("KERNELS_EMU_DEBUG", mode)
    x, y = rng.standard_normal(1000).astype(np.float32), np.zeros(1000, np.float32)
    with pytest.raises(kernels.OutOfBoundsError,
                       match=r"read 0 byte\(s\) past the end of argument 0 'x' \(float32\[1000\]\) \(element 1000 of "
                             r"1000\) in kernel 'copy_unchecked', block \(3, 0, 0\) thread \(232, 0, 0\)"):
        module(UNCHECKED).get_function("copy_unchecked")((4,), (256,), (x, y))


@pytest.mark.parametrize("mode,runs", [("1", 2), ("gdb", 1)])
def test_gdb_mode_runs_a_kernel_once(mode, runs, monkeypatch):
    # a module variable survives between runs: KERNELS_EMU_DEBUG=1 runs every kernel twice
    # (the second time to catch underruns), KERNELS_EMU_DEBUG=gdb once, so a breakpoint fires once
    monkeypatch.setenv("KERNELS_EMU_DEBUG", mode)
    k = module(UNCHECKED + f"// {mode}\n").get_function("count_executions")
    seen = np.zeros(1, np.uint32)
    k((1,), (32,), (seen,))
    assert seen[0] == 32          # the results are those of the first run
    k((1,), (32,), (seen,))
    assert seen[0] == 32 * runs + 32


def test_gdb_mode_names_sources_by_absolute_path(monkeypatch, tmp_path):
    kernel_dir = str(kernels.KERNEL_DIR)
    plain = kernels.load_module("elementwise.cu").code
    assert '#line 1 "kernels/common.cuh"' in plain        # messages: relative to the repository
    monkeypatch.setenv("KERNELS_EMU_DEBUG", "gdb")
    unit, _ = emulator.EmuModule(plain, filename="kernels/elementwise.cu")._translation_unit()
    assert unit.startswith(f'#line 1 "{kernel_dir}/elementwise.cu"\n')
    assert f'#line 1 "{kernel_dir}/common.cuh"' in unit and '"kernels/common.cuh"' not in unit
    # a source given as a string: written to the cache, so that gdb can list it
    monkeypatch.setenv("KERNELS_EMU_CACHE", str(tmp_path))
    unit, _ = emulator.EmuModule(OOB)._translation_unit()
    first = unit.splitlines()[0]
    path = first.split('"')[1]
    assert path.startswith(str(tmp_path)) and open(path).read().splitlines()[:3] == OOB.splitlines()[:3]


GDB_DEMO = """
import numpy as np
from kernels import elementwise, versions
x = np.linspace(-1, 1, 1000, dtype=np.float32)
with versions.use(elementwise=1):   # one element per loop iteration (version 2 moves 16-byte vectors)
    print("relu sum", float(elementwise.relu_forward(x).sum()))
"""


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_gdb_recipe_stops_once_in_the_chosen_thread(tmp_path):
    # kernels/README.md's recipe: a conditional breakpoint on the kernel's template, `next` to
    # the first line of the body, `step` into common.cuh's to_float, back out, on
    text = (kernels.KERNEL_DIR / "elementwise.cu").read_text().splitlines()
    line = next(i + 1 for i, t in enumerate(text) if "float v = to_float(x[i]);" in t)
    (tmp_path / "demo.py").write_text(GDB_DEMO)
    (tmp_path / "commands").write_text(
        "set pagination off\nset breakpoint pending on\n"
        "break relu_forward<float> if blockIdx.x == 1 && threadIdx.x == 37\n"
        "run\nnext\nprint i\nstep\nfinish\nnext\nprint v\ncontinue\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNELS_EMU_")}
    env.update(KERNELS_EMU_DEBUG="gdb", PYTHONPATH=str(kernels.KERNEL_DIR.parent))
    proc = subprocess.run(["gdb", "-q", "-batch", "-nx", "-x", str(tmp_path / "commands"), "--args", sys.executable,
                           str(tmp_path / "demo.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout
    assert out.count("hit Breakpoint 1") == 1, out + proc.stderr
    assert f"{kernels.KERNEL_DIR}/elementwise.cu:{line}" in out
    assert "$1 = 293" in out                                    # i = 1 * 256 + 37
    assert f"{kernels.KERNEL_DIR}/common.cuh:" in out and "float to_float(T v) { return (float)v; }" in out
    assert "relu sum" in out and "exited normally" in out


# ------------------------------------------------------------------------------ cache & fallbacks
def test_compiled_modules_are_cached(monkeypatch):
    src = SCALE + "\n// cache test marker\n"
    module(src).get_function("scale")((1,), (32,), (np.zeros(4, np.float32), np.zeros(4, np.float32),
                                                   np.float32(1), np.int32(4)))
    calls = []
    monkeypatch.setattr(emulator, "_build", lambda *a, **k: calls.append(a))
    y = np.zeros(4, np.float32)
    module(src).get_function("scale")((1,), (32,), (np.ones(4, np.float32), y, np.float32(3), np.int32(4)))
    assert calls == [] and np.all(y == 3)


def _unwritable(monkeypatch, folder):
    """Make `folder` read-only, also for root (who writes anyway): its os.mkdir/os.open for
    writing then fail with EACCES, as they would for a user."""
    folder.chmod(0o555)
    monkeypatch.setattr(os, "mkdir", _refuse_under(folder, os.mkdir))
    if hasattr(pathlib, "_NormalAccessor"):   # Python 3.10: Path.mkdir calls the os.mkdir it bound at import
        monkeypatch.setattr(pathlib._NormalAccessor, "mkdir", staticmethod(os.mkdir))
    real_open = os.open
    refuse = _refuse_under(folder, real_open)
    monkeypatch.setattr(os, "open", lambda path, flags, *a, **k: (refuse if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                                                                  else real_open)(path, flags, *a, **k))


def _refuse_under(folder, real):
    def call(path, *args, **kw):
        if str(os.fspath(path)).startswith(str(folder)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path, *args, **kw)
    return call


@pytest.mark.parametrize("case", ["file", "file_above", "read_only", "read_only_home"])
def test_an_unusable_cache_folder_is_one_line_naming_the_variable(case, monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if case == "file":
        (tmp_path / "cache").write_text("")
        monkeypatch.setenv("KERNELS_EMU_CACHE", str(tmp_path / "cache"))
    elif case == "file_above":
        (tmp_path / "cache").write_text("")
        monkeypatch.setenv("KERNELS_EMU_CACHE", str(tmp_path / "cache" / "emu"))
    elif case == "read_only":
        (tmp_path / "cache").mkdir()
        monkeypatch.setenv("KERNELS_EMU_CACHE", str(tmp_path / "cache"))
        _unwritable(monkeypatch, tmp_path / "cache")
    else:
        monkeypatch.delenv("KERNELS_EMU_CACHE", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        (tmp_path / "home").mkdir()
        _unwritable(monkeypatch, tmp_path / "home")
    try:
        with pytest.raises(emulator.EmulatorCacheError) as err:
            module(SCALE + f"\n// {case}\n").get_function("scale")(
                (1,), (32,), (np.zeros(4, np.float32), np.zeros(4, np.float32), np.float32(1), np.int32(4)))
    finally:
        for d in (tmp_path / "cache", tmp_path / "home"):
            if d.is_dir():
                d.chmod(0o755)
    message = str(err.value)
    assert "\n" not in message and "set KERNELS_EMU_CACHE to a writable folder" in message
    assert str(tmp_path / ("home" if case == "read_only_home" else "cache")) in message
    assert ("a file is in the way" if case.startswith("file") else "Permission denied") in message


def _copy_entry(path, folder):
    """Copy the cache entry whose library is `path` (and its record) into `folder`."""
    stem = path.name.rsplit("-", 1)[0]
    for f in (path, path.with_name(f"{stem}.sha256")):
        shutil.copy(f, folder / f.name)
    return folder / path.name, folder / f"{stem}.sha256"


def test_cache_entries_are_verified_before_loading(tmp_path):
    # The runtime's entry, copied: whole, it verifies; damaged in any way, it does not.
    library, record = _copy_entry(emulator._load_runtime()._path, tmp_path)
    stem = record.stem
    assert emulator._cached_entry(tmp_path, stem) == (library, None)
    good_library, good_record = library.read_bytes(), record.read_text()
    damages = {"truncated": lambda: library.write_bytes(good_library[: len(good_library) // 2]),
               "empty": lambda: library.write_bytes(b""),
               "changed": lambda: library.write_bytes(good_library[:-1] + bytes([good_library[-1] ^ 1])),
               "missing": library.unlink,
               "record damaged": lambda: record.write_text("garbage\n"),
               "record names another file": lambda: record.write_text(good_record.replace(stem, "other"))}
    for what, damage in damages.items():
        damage()
        path, problem = emulator._cached_entry(tmp_path, stem)
        assert path is None and problem, what
        library.write_bytes(good_library)
        record.write_text(good_record)
    record.unlink()
    assert emulator._cached_entry(tmp_path, stem) == (None, None)      # no entry: built, nothing to report


DAMAGES = ("truncated", "empty", "record")


def test_a_damaged_cache_entry_is_rebuilt_with_one_line(tmp_path):
    # A child process builds three entries, they are damaged, and a second child must rebuild
    # them (before the fix, loading the truncated library ended it with SIGBUS).
    _copy_entry(emulator._load_runtime()._path, tmp_path)   # (the runtime: not rebuilt here)
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from kernels.emu.emulator import EmuModule
        from tests.test_emulator import DAMAGES, SCALE
        for damage in DAMAGES:
            x, y = np.arange(40, dtype=np.float32), np.zeros(40, np.float32)
            EmuModule(SCALE + f"// {damage}\\n").get_function("scale")((2,), (32,), (x, y, np.float32(3), np.int32(40)))
            assert np.array_equal(y, 3 * x)
            print(damage, file=sys.stderr)
    """)
    env = dict(os.environ, KERNELS_EMU_CACHE=str(tmp_path))
    env.pop("KERNELS_EMU_UCONTEXT", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def child():
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, (proc.returncode, proc.stderr)
        return proc.stderr.splitlines()

    assert child() == list(DAMAGES)
    before = set(tmp_path.glob("kernel_*.so"))
    entries = sorted(before, key=lambda p: p.stat().st_mtime_ns)   # in the order built: DAMAGES
    assert len(entries) == 3
    entries[0].write_bytes(entries[0].read_bytes()[: entries[0].stat().st_size // 2])
    entries[1].write_bytes(b"")
    records = [p for p in tmp_path.glob("kernel_*.sha256")]
    record = next(r for r in records if entries[2].name.startswith(r.stem + "-"))
    record.write_text("not a record")
    lines = child()
    assert lines[1::2] == list(DAMAGES), lines
    pattern = r"the CPU emulator's cache entry kernel_\w+ is damaged \((.*)\); rebuilding it"
    reasons = [re.fullmatch(pattern, line) for line in lines[0::2]]
    assert len(reasons) == 3 and all(reasons), lines
    assert re.fullmatch(rf"{entries[0].name} is \d+ bytes, \d+ were written", reasons[0].group(1))
    assert re.fullmatch(rf"{entries[1].name} is 0 bytes, \d+ were written", reasons[1].group(1))
    assert reasons[2].group(1) == f"its record {record.name} is damaged"
    assert child() == list(DAMAGES)                     # rebuilt: whole again


PTXAS_LOG = """ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 368 bytes cmem[0]
"""


def test_a_damaged_ptxas_cache_file_is_computed_again(monkeypatch, tmp_path, caplog):
    from kernels.runtime import nvrtc, ptxas
    monkeypatch.setenv("KERNELS_EMU_CACHE", str(tmp_path))
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (12, 4))
    compiles = []
    monkeypatch.setattr(nvrtc, "compile_cuda", lambda *a, **k: compiles.append(a) or
                        type("Result", (), {"log": PTXAS_LOG})())
    monkeypatch.setattr(ptxas, "_memory", {})
    expect = {"k": ptxas.Resources("k", "sm_80", 40, 0, 0, 8, 4096, 1, 368)}
    assert ptxas.module_resources("// damaged ptxas cache") == expect and len(compiles) == 1
    [cached] = (tmp_path / "ptxas").glob("*.json")
    good = cached.read_text()
    damages = ["", "{not json", "[]", '{"k": 3}', '{"k": {"kernel": "k", "arch": "sm_80", "registers": "40"}}',
               '{"k": {"kernel": "k", "arch": "sm_80"}}', '{"k": {"kernel": "k", "arch": "sm_80", "registers": 40, '
               '"colour": 1}}', '{"k": {"kernel": "other", "arch": "sm_80", "registers": 40}}', b"\xff\xfe"]
    for n, damage in enumerate(damages, start=2):
        (cached.write_bytes if isinstance(damage, bytes) else cached.write_text)(damage)
        ptxas._memory.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kernels.runtime.ptxas"):
            assert ptxas.module_resources("// damaged ptxas cache") == expect, damage
        assert len(compiles) == n and cached.read_text() == good, damage
        [record] = caplog.records
        assert re.fullmatch(rf"the ptxas cache entry {re.escape(str(cached))} is damaged \(.+\); computing it again",
                            record.getMessage()), damage
    ptxas._memory.clear()
    assert ptxas.module_resources("// damaged ptxas cache") == expect and len(compiles) == len(damages) + 1


def test_ucontext_fallback_runs_the_same_kernels(tmp_path):
    # The portable fiber implementation (used where the x86-64 switch is not available) is
    # exercised in a fresh process, since a process loads one runtime.
    code = textwrap.dedent("""
        import numpy as np, kernels
        from tests.test_emulator import TUTORIAL
        k = kernels.RawModule(code=TUTORIAL).get_function("row_sums")
        a = np.random.default_rng(0).standard_normal((9, 200)).astype(np.float32)
        out = np.zeros(9, np.float32)
        k((2, 3), (128, 4), (a, out, np.int32(9), np.int32(200)), shared_mem=128 * 4 * 4)
        assert np.allclose(out, a.sum(axis=1), rtol=1e-5, atol=1e-4), (out, a.sum(axis=1))
        print("ok")
    """)
    env = dict(os.environ, KERNELS_EMU_UCONTEXT="1", KERNELS_EMU_CACHE=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------ guard bytes (always on)
GUARDED = r"""
extern "C" __global__ void write_at(float* y, long long index, float value) {
    if (threadIdx.x == 0) y[index] = value;
}
extern "C" __global__ void write_two(float* a, float* b, int n) {
    int i = threadIdx.x;
    if (i < n) { a[i] = 1.0f + i; b[i] = -1.0f - i; }
}
extern "C" __global__ void write_three(const float* before, float* a, const float* after, int n) {
    if ((int)threadIdx.x < n) a[threadIdx.x] = 1.0f + threadIdx.x;
}
extern "C" __global__ void write_vec(float4* y, int n4) {
    if (threadIdx.x == 0) y[n4] = make_float4(1.2345678f, 2.2345678f, 3.2345678f, 4.2345678f);   // one float4 too far
}
"""


@pytest.mark.parametrize("n", [1, 7, 64, 100, 1003])
def test_write_just_past_the_end_is_reported_naming_the_argument(n):
    k = module(GUARDED).get_function("write_at")
    buf = np.zeros(n + 4, np.float32)          # own the bytes around y, so the test corrupts nothing
    y = buf[2:2 + n]
    y[:] = rng.standard_normal(n)
    with pytest.raises(kernels.OutOfBoundsError,
                       match=rf"wrote outside argument 0 'y' \(float32\[{n}\]\): byte 0 past the end "
                             rf"\(inside element {n} of {n}\).*KERNELS_EMU_SANITIZE=memcheck"):
        k((1,), (32,), (y, n, np.float32(1.2345678)))
    with pytest.raises(kernels.OutOfBoundsError, match=r"byte 4 before the start.*KERNELS_EMU_SANITIZE=memcheck"):
        k((1,), (32,), (y, -1, np.float32(1.2345678)))
    # in bounds: no report, and the value is there
    k((1,), (32,), (y, n - 1, np.float32(3.25)))
    assert y[n - 1] == 3.25


def test_a_zero_size_array_has_guard_bytes_too():
    k = module(GUARDED).get_function("write_at")
    for y in (np.zeros(0, np.float32), np.zeros(8, np.float32)[3:3]):   # own memory, and a view inside a buffer
        with pytest.raises(kernels.OutOfBoundsError,
                           match=r"wrote outside argument 0 'y' \(float32\[0\]\): byte 0 past the end "
                                 r"\(inside element 0 of 0\)"):
            k((1,), (32,), (y, 0, np.float32(1.2345678)))
    # empty arrays at either end of another argument: its writes are no false alarm
    buf = np.zeros(12, np.float32)
    a, before, after = buf[2:10], buf[2:2], buf[10:10]
    module(GUARDED).get_function("write_three")((1,), (32,), (before, a, after, np.int32(8)))
    np.testing.assert_array_equal(buf, np.r_[0, 0, 1.0 + np.arange(8), 0, 0])


def test_a_learners_copy_writing_past_the_end_is_named_in_an_op(tmp_path):
    # What a training run meets (train.py --kernels elementwise=my.cu): a copy of elementwise.cu
    # whose axpy runs one element too far, called through the op's launcher.
    from kernels import elementwise, versions
    src = (kernels.KERNEL_DIR / "elementwise.cu").read_text()
    loop = "GRID_STRIDE_LOOP(i, n) { y[i] = fmaf(alpha, x[i], y[i]); }"
    assert loop in src
    copy = tmp_path / "my_elementwise.cu"
    copy.write_text(src.replace(loop, loop.replace("(i, n)", "(i, n + 1)")))
    buf = np.ones(1000 + 8, np.float32)           # own the bytes around x and y: nothing is corrupted
    x, y = buf[:500], buf[504:1004]               # (y[500] = 2 * 1 + 1 changes the byte past y's end)
    with versions.use(f"elementwise={copy}"), \
            pytest.raises(kernels.OutOfBoundsError, match=r"kernel 'axpy_f32' wrote outside argument 1 'y' "
                                                          r"\(float32\[500\]\): byte \d past the end \(inside element 500 of 500\)"):
        elementwise.axpy(2.0, x, y)


def test_guard_bytes_catch_a_vector_store_past_the_end():
    buf = np.zeros(4 * 5 + 8, np.float32)
    y = buf[4:4 + 4 * 4]                         # four float4, 16-byte aligned
    with pytest.raises(kernels.OutOfBoundsError, match=r"argument 0 'y' \(float32\[16\]\): byte 0 past the end"):
        module(GUARDED).get_function("write_vec")((1,), (32,), (y, np.int32(4)))


def test_adjacent_arguments_sharing_one_buffer_are_no_false_alarm():
    # Views that touch: the bytes past the end of `a` are `b`'s, which the kernel may write.
    buf = np.zeros(200, np.float32)
    a, b = buf[:100], buf[100:]
    module(GUARDED).get_function("write_two")((1,), (128,), (a, b, np.int32(100)))
    np.testing.assert_array_equal(a, 1.0 + np.arange(100))
    np.testing.assert_array_equal(b, -1.0 - np.arange(100))


def test_guard_bytes_never_read_across_a_page():
    # An array that fills a page exactly, with no-access pages on both sides: the guard check
    # must not touch the neighbouring pages (it would crash the interpreter).
    rt = emulator._load_runtime()
    base = rt.emu_map_guarded(4096, 4096)
    try:
        page = np.frombuffer((ctypes.c_char * 4096).from_address(base), dtype=np.float32)
        module(GUARDED).get_function("write_at")((1,), (32,), (page, 1023, np.float32(2.0)))
        assert page[1023] == 2.0
    finally:
        rt.emu_unmap_guarded(base, 4096, 4096)


# ------------------------------------------------------------------------------ denormals as CuPy compiles
DENORMALS = r"""
extern "C" __global__ void denormals(const float* x, const float* s, float* y, int* lt, const double* dx,
                                     double* dy, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[3 * i + 0] = x[i] + x[i];          // a denormal input is read as zero
    y[3 * i + 1] = x[i] * s[i];          // a product that falls below FLT_MIN is written as zero
    y[3 * i + 2] = x[i] + s[i];
    lt[i] = x[i] < 0.0f;                 // comparisons read denormals as zero too
    dy[i] = dx[i] * 0.5;
}
"""


def _flush(a):
    a = np.asarray(a, np.float32)
    return np.where(np.abs(a) < np.finfo(np.float32).tiny, np.copysign(np.float32(0), a), a).astype(np.float32)


def _denormal_inputs(n=512):
    tiny = np.finfo(np.float32).tiny
    x = (rng.uniform(-2, 2, n) * tiny).astype(np.float32)          # half of them denormal
    x[:4] = [tiny, -tiny, 1.0, -3.0]
    s = rng.choice(np.array([1e-3, 0.5, 2.0, 1e30, -0.25], np.float32), n).astype(np.float32)
    return x, s


def _run_denormals(options=()):
    x, s = _denormal_inputs()
    n = x.size
    y = np.zeros(3 * n, np.float32)
    lt = np.zeros(n, np.int32)
    dx = np.full(n, 1e-310)
    dy = np.zeros(n)
    module(DENORMALS, options=options).get_function("denormals")((2,), (256,), (x, s, y, lt, dx, dy, np.int32(n)))
    return x, s, y.reshape(n, 3), lt, dy


def test_float_denormals_are_flushed_as_cupy_compiles_with_ftz():
    x, s, y, lt, dy = _run_denormals()
    assert np.count_nonzero(np.abs(x) < np.finfo(np.float32).tiny) > 200
    xf = _flush(x)                       # flush inputs, compute in float32, flush the result
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(y[:, 0], _flush(xf + xf))
        np.testing.assert_array_equal(y[:, 1], _flush(xf * s))
        np.testing.assert_array_equal(y[:, 2], _flush(xf + s))
    np.testing.assert_array_equal(lt, (xf < 0).astype(np.int32))
    # x86 flushes double denormals too (a GPU does not): the documented difference
    assert np.all(dy == 0)
    # NumPy's own arithmetic is left as it was
    assert np.float32(1e-40) * np.float32(1) != 0


def test_ftz_false_keeps_denormals():
    x, s, y, lt, dy = _run_denormals(options=("-ftz=false",))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(y[:, 0], x + x)
        np.testing.assert_array_equal(y[:, 1], x * s)
        np.testing.assert_array_equal(y[:, 2], x + s)
    np.testing.assert_array_equal(lt, (x < 0).astype(np.int32))
    np.testing.assert_array_equal(dy, np.full(x.size, 1e-310) * 0.5)


def test_ftz_option_parsing():
    assert emulator.flush_denormals(()) is True
    assert emulator.flush_denormals(("-ftz=false",)) is False
    assert emulator.flush_denormals(("--ftz=false", "-ftz=true")) is True   # the last one wins, as in NVRTC
    assert emulator.flush_denormals(("-DX=1", "--ftz=False")) is False



MULTIPLY_ADD = r"""
extern "C" __global__ void multiply_add(const float* a, const float* b, const float* c, float* y, float* z, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = a[i] * b[i] + c[i];     // two roundings: never fused by the emulator
        z[i] = fmaf(a[i], b[i], c[i]); // one rounding
    }
}
"""


def test_multiply_add_is_fused_only_where_the_kernel_says_fmaf():
    """The emulator builds kernels with -ffp-contract=off (and -mfma where an x86-64 CPU has it):
    a*b + c rounds twice on every CPU, as NumPy's float32 does; fmaf rounds once."""
    n = 4096
    a, b = (rng.uniform(1, 2, n).astype(np.float32) for _ in range(2))
    c = -(a.astype(np.float64) * b).astype(np.float32)          # a*b + c is the product's rounding error
    y, z = np.zeros(n, np.float32), np.zeros(n, np.float32)
    module(MULTIPLY_ADD).get_function("multiply_add")((n // 256,), (256,), (a, b, c, y, z, np.int32(n)))
    np.testing.assert_array_equal(y, a * b + c)                  # NumPy: rounded product, then the sum
    exact = (a.astype(np.float64) * b + c).astype(np.float32)   # the product is exact in float64
    np.testing.assert_array_equal(z, exact)
    assert np.count_nonzero(y != z) > n // 2                      # so the two really differ
    assert "-ffp-contract=off" in emulator._float_flags()


# ------------------------------------------------------------------------------ Ctrl-C
SIGINT_CHILD = r'''
import signal, sys, time
import numpy as np, kernels
src = r"""
extern "C" __global__ void spin(const volatile int* flag) { while (flag[0] == 0) {} }
extern "C" __global__ void stride0(float* y, int n) {       // a grid-stride loop with stride 0
    for (int i = threadIdx.x; i < n; i += blockDim.x * (gridDim.x - 1)) y[i] += 1.0f;
}
extern "C" __global__ void spin_in_libm(const volatile int* flag, float* out) {
    float v = 0.5f;
    while (flag[0] == 0) v = expf(v) * 0.25f;              // most of the time inside expf
    out[0] = v;
}
extern "C" __global__ void spin_at_barrier(const volatile int* flag) { while (flag[0] == 0) __syncthreads(); }
extern "C" __global__ void busy_ms(int ms) {
    long long t0 = clock64();                               // nanoseconds on the emulator
    while (clock64() - t0 < (long long)ms * 1000000) {}
}
extern "C" __global__ void fill(float* y, int n) { if (threadIdx.x < n) y[threadIdx.x] = 7.0f; }
"""
m = kernels.RawModule(code=src).compile()
flag = np.zeros(1, np.int32)
calls = []
launches = [("spin", (2,), (64,), (flag,)),
            ("stride0", (1,), (32,), (np.zeros(100, np.float32), np.int32(100))),
            ("spin_in_libm", (1,), (1,), (flag, np.zeros(1, np.float32))),
            ("spin_at_barrier", (1,), (64,), (flag,)),
            ("busy_ms", (1,), (1,), (np.int32(1500),)),     # with a handler of our own
            ("spin", (1,), (1,), (flag,))]                   # with a handler of our own: 2 Ctrl-C
for name, grid, block, args in launches:
    if name == "busy_ms":
        signal.signal(signal.SIGINT, lambda s, f: calls.append(time.time()))
    print("ready", flush=True)
    t0 = time.time()
    try:
        m.get_function(name)(grid, block, args)
        print("returned", name, time.time() - t0, len(calls), flush=True)
    except KeyboardInterrupt as e:
        print("interrupted", name, time.time(), len(calls), e, flush=True)
    y = np.zeros(5, np.float32)
    m.get_function("fill")((1,), (32,), (y, np.int32(5)))   # the interpreter and the emulator still work
    assert np.all(y == 7)
print("done", flush=True)
'''


@pytest.mark.slow
def test_ctrl_c_stops_a_running_kernel_and_the_interpreter_goes_on(tmp_path):
    import signal
    import time
    script = tmp_path / "child.py"
    script.write_text(SIGINT_CHILD)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("KERNELS_EMU_SANITIZE", "KERNELS_EMU_SCHEDULE", "KERNELS_EMU_DEBUG"):
        env.pop(name, None)   # the plain module, built before "ready": no compiling during a launch
    proc = subprocess.Popen([sys.executable, str(script)], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for presses in (1, 1, 1, 1, 1, 2):
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read() if not line else "")
            time.sleep(0.3)                           # well inside the kernel by now
            sent = time.time()
            for _ in range(presses):
                proc.send_signal(signal.SIGINT)
                time.sleep(0.2)
            line = proc.stdout.readline().split(" ", 4)
            lines.append(line)
            if line[0] == "interrupted":
                assert float(line[2]) - sent < 1.0 + 0.2 * (presses - 1), line   # within about a second
        assert proc.stdout.readline().strip() == "done"
    finally:
        proc.kill()
        proc.wait()
    kinds = [(l[0], l[1]) for l in lines]
    assert kinds == [("interrupted", "spin"), ("interrupted", "stride0"), ("interrupted", "spin_in_libm"),
                     ("interrupted", "spin_at_barrier"), ("returned", "busy_ms"), ("interrupted", "spin")], lines
    assert "Ctrl-C" in lines[0][4] and ("block (0,0,0)" in lines[0][4] or "block (1,0,0)" in lines[0][4])
    # a program's own SIGINT handler runs once the kernel has finished (train.py finishes its
    # step this way); a second Ctrl-C during the same launch stops the kernel
    assert float(lines[4][2]) > 1.4 and lines[4][3].strip() == "1"
    assert lines[5][3] == "2"
