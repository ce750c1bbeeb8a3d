"""kernels/gemm.cu through kernels/gemm.py: every version and transpose against a float64 NumPy
product, the tensor-core half-precision kernel, the linear layer against kernels.reference and
against finite differences, and the argument checks.

Each test runs on the CPU emulator and, where a GPU is present, on the GPU (`backend` fixture).
"""

import numpy as np
import pytest

from kernels import gemm as G
from kernels import reference as ref
from kernels.runtime.raw import load_module
from tests.conftest import CUDASIM, Backend

SHAPES = [(1, 1, 1), (1, 17, 33), (17, 33, 65), (65, 1, 17), (33, 65, 1), (130, 129, 20), (7, 5, 128)]
TRANS = [(False, False), (False, True), (True, False), (True, True)]


def _operands(rng, M, N, K, ta, tb, dtype=np.float32):
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(dtype)
    return a, b


def _product64(a, b, ta, tb):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64.T if ta else a64) @ (b64.T if tb else b64)


def _rel_err(got, want):
    scale = max(np.abs(want).max(), 1e-30)
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / scale)


@pytest.mark.parametrize("version", G.F32_VERSIONS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_gemm_matches_float64_product(backend, version, M, N, K):
    rng = np.random.default_rng(M * 10007 + N * 101 + K)
    for ta, tb in TRANS:
        a, b = _operands(rng, M, N, K, ta, tb)
        c = backend.to_host(G.gemm(backend.to_device(a), backend.to_device(b), ta, tb, version=version))
        assert c.shape == (M, N) and c.dtype == np.float32
        err = _rel_err(c, _product64(a, b, ta, tb))
        assert err < 1e-5, f"{version} M={M} N={N} K={K} trans=({ta}, {tb}): relative error {err:.2e}"


@pytest.mark.parametrize("version", G.F32_VERSIONS)
def test_gemm_alpha_beta_updates_c_in_place(backend, version):
    rng = np.random.default_rng(1)
    M, N, K = 33, 17, 65
    for ta, tb in TRANS:
        a, b = _operands(rng, M, N, K, ta, tb)
        c0 = rng.standard_normal((M, N)).astype(np.float32)
        c = backend.to_device(c0.copy())   # to_device may return c0 itself
        out = G.gemm(backend.to_device(a), backend.to_device(b), ta, tb, alpha=-0.5, beta=2.0, c=c, version=version)
        assert out is c
        want = -0.5 * _product64(a, b, ta, tb) + 2.0 * c0.astype(np.float64)
        assert _rel_err(backend.to_host(c), want) < 1e-5


@pytest.mark.parametrize("version", G.F32_VERSIONS)
def test_gemm_beta_zero_ignores_garbage_in_c(backend, version):
    rng = np.random.default_rng(2)
    a, b = _operands(rng, 9, 11, 13, False, False)
    c = backend.to_device(np.full((9, 11), np.nan, dtype=np.float32))
    G.gemm(backend.to_device(a), backend.to_device(b), c=c, version=version)
    assert _rel_err(backend.to_host(c), _product64(a, b, False, False)) < 1e-5


def test_gemm_fast_scalar_fallback_on_misaligned_rows(backend):
    # Rows of 8 floats (float4-friendly) but a base pointer 4 bytes past 16-byte alignment:
    # the kernel must take its scalar path and still be right.
    rng = np.random.default_rng(3)
    M, N, K = 70, 66, 24
    for ta, tb in TRANS:
        a, b = _operands(rng, M, N, K, ta, tb)
        xp = backend.xp
        bufs = []
        for m in (a, b):
            raw = xp.zeros(m.size + 8, dtype=np.float32)
            base = int(raw.data.ptr) if backend.name == "cuda" else raw.__array_interface__["data"][0]
            start = ((16 - base % 16) % 16) // 4 + 1     # aligned start + 1 float
            view = raw[start:start + m.size].reshape(m.shape)
            view[...] = backend.to_device(m)
            bufs.append(view)
        assert G._vec_ok(bufs[0]) == 0 and G._vec_ok(bufs[1]) == 0
        c = backend.to_host(G.gemm(bufs[0], bufs[1], ta, tb))
        assert _rel_err(c, _product64(a, b, ta, tb)) < 1e-5


def test_gemm_k_zero_gives_beta_c(backend):
    a = backend.to_device(np.zeros((3, 0), np.float32))
    b = backend.to_device(np.zeros((0, 4), np.float32))
    c0 = np.arange(12, dtype=np.float32).reshape(3, 4)
    c = backend.to_device(c0.copy())
    G.gemm(a, b, beta=0.5, c=c)
    np.testing.assert_array_equal(backend.to_host(c), 0.5 * c0)


@pytest.mark.parametrize("version", G.F16_VERSIONS)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (17, 33, 65), (65, 17, 33), (130, 70, 40)])
def test_gemm_f16_matches_float64(backend, version, M, N, K):
    rng = np.random.default_rng(M + 7 * N + 13 * K)
    for ta, tb in TRANS:
        a32, b32 = _operands(rng, M, N, K, ta, tb)
        a, b = a32.astype(np.float16), b32.astype(np.float16)
        c = backend.to_host(G.gemm_f16(backend.to_device(a), backend.to_device(b), ta, tb, version=version))
        assert c.dtype == np.float32 and c.shape == (M, N)
        # exact products of the half inputs, float32 sums: tight against the rounded inputs ...
        assert _rel_err(c, _product64(a, b, ta, tb)) < 1e-5
        # ... and within half-precision input rounding of the unrounded product
        assert _rel_err(c, _product64(a32, b32, ta, tb)) < 1e-2


def test_gemm_f16_alpha_beta(backend):
    rng = np.random.default_rng(4)
    a, b = (m.astype(np.float16) for m in _operands(rng, 40, 24, 48, True, False))
    c0 = rng.standard_normal((40, 24)).astype(np.float32)
    c = backend.to_device(c0.copy())   # to_device may return c0 itself
    G.gemm_f16(backend.to_device(a), backend.to_device(b), True, False, alpha=3.0, beta=-1.0, c=c)
    assert _rel_err(backend.to_host(c), 3.0 * _product64(a, b, True, False) - c0) < 1e-5


def test_wmma_kernel_scalar_fallback_for_sm60():
    """Compiled for sm_60 (no tensor cores) the same kernel multiplies with scalar FMAs."""
    mod = load_module("gemm.cu", options=("-arch=sm_60",))
    rng = np.random.default_rng(5)
    M, N, K = 70, 33, 40
    for ta, tb in TRANS:
        a, b = (m.astype(np.float16) for m in _operands(rng, M, N, K, ta, tb))
        c = np.empty((M, N), np.float32)
        args = (a, b, c, np.int32(M), np.int32(N), np.int32(K), np.int32(a.shape[1]), np.int32(b.shape[1]),
                np.int32(N), np.int32(ta), np.int32(tb), np.float32(1.0), np.float32(0.0))
        mod.get_function("gemm_wmma_f16")((2, 1), (128,), args)
        assert _rel_err(c, _product64(a, b, ta, tb)) < 1e-5


@pytest.mark.gpu
def test_gemm_large_on_gpu():
    backend = Backend("cuda")     # large shapes: the GPU only
    rng = np.random.default_rng(6)
    # the simulated GPU runs it on the emulator: a quarter of each side, still several tiles and ragged
    M, N, K = (259, 197, 131) if CUDASIM else (1031, 777, 515)
    for ta, tb in TRANS:
        a, b = _operands(rng, M, N, K, ta, tb)
        want = _product64(a, b, ta, tb)
        for version in G.F32_VERSIONS:
            c = backend.to_host(G.gemm(backend.to_device(a), backend.to_device(b), ta, tb, version=version))
            assert _rel_err(c, want) < 1e-5
        c = backend.to_host(G.gemm_f16(backend.to_device(a.astype(np.float16)), backend.to_device(b.astype(np.float16)),
                                       ta, tb))
        assert _rel_err(c, want) < 1e-2


# ------------------------------------------------------------------ linear layer
@pytest.mark.parametrize("N,Cin,Cout", [(1, 1, 1), (3, 17, 5), (16, 65, 33)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_forward_matches_reference(backend, N, Cin, Cout, with_bias):
    rng = np.random.default_rng(N + Cin + Cout)
    x = rng.standard_normal((N, Cin)).astype(np.float32)
    w = rng.standard_normal((Cout, Cin)).astype(np.float32)
    b = rng.standard_normal(Cout).astype(np.float32) if with_bias else None
    y = G.linear_forward(backend.to_device(x), backend.to_device(w), None if b is None else backend.to_device(b))
    want = ref.linear_forward(x.astype(np.float64), w.astype(np.float64), None if b is None else b.astype(np.float64))
    assert _rel_err(backend.to_host(y), want) < 1e-5


@pytest.mark.parametrize("N,Cin,Cout", [(1, 1, 1), (3, 17, 5), (70, 9, 33)])
def test_linear_backward_matches_reference(backend, N, Cin, Cout):
    rng = np.random.default_rng(10 + N + Cin + Cout)
    x = rng.standard_normal((N, Cin)).astype(np.float32)
    w = rng.standard_normal((Cout, Cin)).astype(np.float32)
    dy = rng.standard_normal((N, Cout)).astype(np.float32)
    dx, dw, db = G.linear_backward(backend.to_device(dy), backend.to_device(x), backend.to_device(w))
    rdx, rdw, rdb = ref.linear_backward(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64))
    assert _rel_err(backend.to_host(dx), rdx) < 1e-5
    assert _rel_err(backend.to_host(dw), rdw) < 1e-5
    assert _rel_err(backend.to_host(db), rdb) < 1e-5
    _, _, none = G.linear_backward(backend.to_device(dy), backend.to_device(x), backend.to_device(w),
                                   need_bias_grad=False)
    assert none is None


def test_linear_backward_matches_finite_differences(backend):
    """dL/dx, dL/dw, dL/db of L = sum(linear_forward(x, w, b) * g), by central differences on the
    float64 reference forward, against the kernels' backward."""
    rng = np.random.default_rng(11)
    N, Cin, Cout = 3, 4, 5
    x = rng.standard_normal((N, Cin)).astype(np.float32).astype(np.float64)
    w = rng.standard_normal((Cout, Cin)).astype(np.float32).astype(np.float64)
    b = rng.standard_normal(Cout).astype(np.float32).astype(np.float64)
    g = rng.standard_normal((N, Cout)).astype(np.float32).astype(np.float64)

    def loss():
        return float(np.sum(ref.linear_forward(x, w, b) * g))

    def numeric(arr, eps=1e-6):
        grad = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + eps
            up = loss()
            arr[i] = old - eps
            down = loss()
            arr[i] = old
            grad[i] = (up - down) / (2 * eps)
        return grad

    dx, dw, db = G.linear_backward(*(backend.to_device(a.astype(np.float32)) for a in (g, x, w)))
    assert _rel_err(backend.to_host(dx), numeric(x)) < 1e-5
    assert _rel_err(backend.to_host(dw), numeric(w)) < 1e-5
    assert _rel_err(backend.to_host(db), numeric(b)) < 1e-5


def test_column_sum(backend):
    rng = np.random.default_rng(12)
    for M, N in [(1, 1), (7, 33), (100, 65)]:
        x = rng.standard_normal((M, N)).astype(np.float32)
        got = backend.to_host(G.column_sum(backend.to_device(x)))
        assert _rel_err(got, x.astype(np.float64).sum(axis=0)) < 1e-5


# ------------------------------------------------------------------ bad input
def test_gemm_rejects_bad_arguments():
    a = np.ones((4, 5), np.float32)
    b = np.ones((5, 3), np.float32)
    with pytest.raises(TypeError, match="a must be float32"):
        G.gemm(a.astype(np.float64), b)
    with pytest.raises(ValueError, match="inner dimensions"):
        G.gemm(a, b, trans_b=True)
    with pytest.raises(ValueError, match="C-contiguous"):
        G.gemm(np.ones((5, 4), np.float32).T, b)
    with pytest.raises(ValueError, match="2 dimensions"):
        G.gemm(a.reshape(1, 4, 5), b)
    with pytest.raises(ValueError, match="beta"):
        G.gemm(a, b, beta=1.0)
    with pytest.raises(ValueError, match="c must have shape"):
        G.gemm(a, b, c=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="version"):
        G.gemm(a, b, version="turbo")
    with pytest.raises(ValueError, match=r"version must be one of 1, 2, 3, got 4 .*gemm_f16"):
        G.gemm(a, b, version=4)
    with pytest.raises(TypeError, match="float16"):
        G.gemm_f16(a, b)
    with pytest.raises(TypeError, match="must be a NumPy or CuPy array"):
        G.gemm([[1.0]], b)


def test_linear_rejects_bad_arguments():
    x = np.ones((2, 3), np.float32)
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="features"):
        G.linear_forward(x, w.T.copy())
    with pytest.raises(ValueError, match="b must have shape"):
        G.linear_forward(x, w, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        G.linear_backward(np.ones((2, 5), np.float32), x, w)


# ------------------------------------------------------------------ the emulator's <mma.h>
_WMMA_TEST_KERNEL = r"""
#include <mma.h>
#include <cuda_fp16.h>
using namespace nvcuda;
// one warp: D = A @ B + C for one 32x8x16 tile; A col-major in memory, C/D column-major
extern "C" __global__ void wmma_32x8x16(const __half* a, const __half* b, const float* c, float* d, int offset) {
    wmma::fragment<wmma::matrix_a, 32, 8, 16, __half, wmma::col_major> fa;
    wmma::fragment<wmma::matrix_b, 32, 8, 16, __half, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 32, 8, 16, float> fc;
    wmma::load_matrix_sync(fa, a + offset, 32);
    wmma::load_matrix_sync(fb, b, 8);
    wmma::load_matrix_sync(fc, c, 32, wmma::mem_col_major);
    for (int i = 0; i < fc.num_elements; ++i) fc.x[i] *= 2.0f;   // same for every element: legal
    wmma::mma_sync(fc, fa, fb, fc);
    wmma::store_matrix_sync(d, fc, 32, wmma::mem_col_major);
}
"""


def test_emulated_wmma_shape_layouts_and_checks():
    from kernels.emu.emulator import EmulatorError
    from kernels.runtime.raw import RawKernel
    k = RawKernel(_WMMA_TEST_KERNEL, "wmma_32x8x16")
    rng = np.random.default_rng(13)
    A = rng.standard_normal((32, 16)).astype(np.float16)
    B = rng.standard_normal((16, 8)).astype(np.float16)
    Cm = rng.standard_normal((32, 8)).astype(np.float32)

    def aligned32(values, slack=0):
        """values (1-D) copied into a 32-byte aligned array (with `slack` spare elements after)."""
        raw = np.zeros(values.size + slack + 32, values.dtype)
        start = (-raw.__array_interface__["data"][0] % 32) // values.itemsize
        out = raw[start:start + values.size + slack]
        out[:values.size] = values
        return out

    a = aligned32(A.T.reshape(-1), slack=16)                     # column-major A
    b, c = aligned32(B.reshape(-1)), aligned32(Cm.T.reshape(-1))   # row-major B, column-major C
    d = aligned32(np.zeros(32 * 8, np.float32))
    k((1,), (32,), (a, b, c, d, np.int32(0)))
    want = A.astype(np.float64) @ B.astype(np.float64) + 2.0 * Cm
    assert _rel_err(d.reshape(8, 32).T, want) < 1e-6
    # a pointer off the 32-byte grid is undefined behaviour on a GPU: the emulator refuses it
    with pytest.raises(EmulatorError, match="32-byte"):
        k((1,), (32,), (a, b, c, d, np.int32(1)))


_WMMA_PER_WARP_KERNEL = r"""
#include <mma.h>
#include <cuda_fp16.h>
using namespace nvcuda;
// warp w of the block: D[w] = A[w] @ B[w] (16x16x16, row-major), each warp its own tiles
extern "C" __global__ void wmma_per_warp(const __half* a, const __half* b, float* d) {
    const int w = threadIdx.x / 32;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(fa, a + 256 * w, 16);
    wmma::load_matrix_sync(fb, b + 256 * w, 16);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::mma_sync(acc, fa, fb, acc);   // twice: the second product reuses the warp's scratch
    wmma::store_matrix_sync(d + 256 * w, acc, 16, wmma::mem_row_major);
}
"""


def test_emulated_wmma_spreads_each_warps_tile_over_its_lanes():
    """Every warp of a block multiplies its own tiles (the emulator's per-warp scratch area), and a
    warp of fewer than 32 threads is refused: WMMA needs all of a warp's lanes."""
    from kernels.emu.emulator import EmulatorError
    from kernels.runtime.raw import RawKernel
    k = RawKernel(_WMMA_PER_WARP_KERNEL, "wmma_per_warp")
    rng = np.random.default_rng(14)
    warps = 3

    def aligned32(values):
        raw = np.zeros(values.size + 32, values.dtype)
        start = (-raw.__array_interface__["data"][0] % 32) // values.itemsize
        out = raw[start:start + values.size].reshape(values.shape)
        out[...] = values
        return out

    A = aligned32(rng.standard_normal((warps, 16, 16)).astype(np.float16))
    B = aligned32(rng.standard_normal((warps, 16, 16)).astype(np.float16))
    d = aligned32(np.zeros((warps, 16, 16), np.float32))
    k((1,), (32 * warps,), (A, B, d))
    want = 2.0 * np.einsum("wik,wkj->wij", A.astype(np.float64), B.astype(np.float64))
    assert _rel_err(d, want) < 1e-6
    with pytest.raises(EmulatorError, match="all 32 lanes"):
        k((1,), (48,), (A, B, d))
