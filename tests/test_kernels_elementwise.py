"""The first kernels (kernels/elementwise.cu, kernels/reduce.cu) against NumPy, on the emulator and,
where there is one, on the GPU: random data at awkward sizes (1 element, not multiples of the
block size or of a 16-byte vector, a 10-million-element reduction), both versions of elementwise.cu
(version 2: 16-byte vectors and a scalar tail; arrays off a 16-byte boundary run version 1)."""

import numpy as np
import pytest

from kernels import elementwise as ew
from kernels import reduce as rd
from kernels import versions
from kernels.runtime import trace

SIZES = [1, 31, 257, 1000, 65537]
rng = np.random.default_rng(7)


def rand(shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def version(request):
    with versions.use(elementwise=request.param):
        yield request.param


@pytest.mark.parametrize("n", SIZES + [8, 4103])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_relu_add_and_fused_add_relu(backend, n, dtype, version):
    a, b, dy = rand(n, dtype), rand(n, dtype), rand(n, dtype)
    a[::7] = 0.0          # ReLU's boundary: y = 0 passes no gradient
    A, B, DY = map(backend.to_device, (a, b, dy))
    y = backend.to_host(ew.relu_forward(A))
    np.testing.assert_array_equal(y, np.maximum(a, 0))
    np.testing.assert_array_equal(backend.to_host(ew.relu_backward(DY, backend.to_device(y))),
                                  np.where(y > 0, dy, 0).astype(dtype))
    # a + b computed in float32 and rounded once: exact for float32, and for float16 equal to
    # NumPy's float16 add (which also rounds the exact sum once)
    np.testing.assert_array_equal(backend.to_host(ew.add(A, B)), a + b)
    np.testing.assert_array_equal(backend.to_host(ew.add_relu_forward(A, B)), np.maximum(a + b, 0))


def test_elementwise_keeps_shape_and_handles_empty(backend):
    x = backend.to_device(rand((3, 5, 7, 2)))
    assert ew.relu_forward(x).shape == (3, 5, 7, 2)
    empty = backend.to_device(np.zeros((0, 4), np.float32))
    assert ew.relu_forward(empty).shape == (0, 4)


@pytest.mark.parametrize("n", SIZES)
def test_scale_axpy_fill(backend, n):
    x, y = rand(n), rand(n)
    alpha = np.float32(rng.standard_normal())
    np.testing.assert_allclose(backend.to_host(ew.scale(backend.to_device(x), alpha)),
                               alpha.astype(np.float64) * x, rtol=1e-6)
    Y = backend.to_device(y.copy())
    out = ew.axpy(alpha, backend.to_device(x), Y)
    assert out is Y
    np.testing.assert_allclose(backend.to_host(Y), alpha.astype(np.float64) * x + y, rtol=1e-5, atol=1e-6)
    F = backend.to_device(np.zeros(n, np.float32))
    ew.fill(F, 2.5)
    assert np.all(backend.to_host(F) == np.float32(2.5))


@pytest.mark.parametrize("n", [1, 1000, 4097])
def test_casts_round_to_nearest_even(backend, n, version):
    x = (rand(n) * np.float32(10.0) ** rng.integers(-8, 5, n).astype(np.float32)).astype(np.float32)
    h = backend.to_host(ew.cast(backend.to_device(x), np.float16))
    assert h.dtype == np.float16
    np.testing.assert_array_equal(h.view(np.uint16), x.astype(np.float16).view(np.uint16))
    back = backend.to_host(ew.cast(backend.to_device(h), np.float32))
    np.testing.assert_array_equal(back, h.astype(np.float32))
    bits = backend.to_host(ew.cast(backend.to_device(x), "bfloat16"))
    u = x.view(np.uint32).astype(np.uint64)
    np.testing.assert_array_equal(bits, ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16))
    np.testing.assert_array_equal(backend.to_host(ew.cast_from_bf16(backend.to_device(bits))),
                                  (bits.astype(np.uint32) << 16).view(np.float32))


def test_version_2_moves_16_byte_vectors_and_falls_back_off_alignment(backend):
    """Version 2 launches the *_vec kernels where every array starts on a 16-byte boundary; a view
    one element in runs version 1's kernel, with the same numbers."""
    a, b = rand(1003, np.float16), rand(1003, np.float16)
    A, B = backend.to_device(a), backend.to_device(b)
    with versions.use(elementwise=2), trace.collect() as t:
        whole = backend.to_host(ew.add_relu_forward(A, B))
        shifted = backend.to_host(ew.add_relu_forward(A[1:], B[1:]))
        h = backend.to_host(ew.cast(backend.to_device(rand(1003))[1:], np.float16))
    assert {"add_relu_forward_vec_f16", "add_relu_forward_f16", "cast_f32_to_f16"} <= set(t.by_kernel())
    assert "cast_f32_to_f16_vec" not in t.by_kernel()
    np.testing.assert_array_equal(whole, np.maximum(a + b, 0))
    np.testing.assert_array_equal(shifted, np.maximum(a[1:] + b[1:], 0))
    assert h.shape == (1002,)


@pytest.mark.parametrize("version", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 100_003])
def test_sum_every_version(backend, version, n):
    x = rand(n)
    s = backend.to_host(rd.sum(backend.to_device(x), version=version))
    assert s.shape == () and s.dtype == np.float32
    ref = x.astype(np.float64).sum()
    # float32 accumulation: error grows at most like n * eps * sum|x| (version 1 adds serially)
    tol = 4 * n * np.finfo(np.float32).eps * np.abs(x).astype(np.float64).sum() + 1e-6
    assert abs(float(s) - ref) <= tol


@pytest.mark.parametrize("version", [2, 3, 4])
def test_sum_ten_million(backend, version):
    x = rng.random(10_000_000, dtype=np.float32)
    s = float(backend.to_host(rd.sum(backend.to_device(x), version=version)))
    assert s == pytest.approx(x.astype(np.float64).sum(), rel=1e-5)


def test_bad_inputs_are_refused_before_launch():
    x = rand(10)
    with pytest.raises(TypeError, match="relu_forward: x must be float32 or float16, got float64"):
        ew.relu_forward(x.astype(np.float64))
    with pytest.raises(ValueError, match="same shape"):
        ew.add(x, rand(11))
    with pytest.raises(ValueError, match="C-contiguous"):
        ew.relu_forward(rand((4, 6))[:, ::2])
    with pytest.raises(TypeError, match="NumPy or CuPy array"):
        ew.relu_forward([1.0, 2.0])
    with pytest.raises(ValueError, match="version must be one of 1, 2, 3, 4"):
        rd.sum(x, version="magic")
    with pytest.raises(TypeError, match="unsupported conversion"):
        ew.cast(x, np.int8)
