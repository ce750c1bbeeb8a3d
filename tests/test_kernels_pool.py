"""Pooling kernels (kernels/pool.cu) against the NumPy reference (float64) and central finite
differences.  Emulator always, GPU when present."""

import numpy as np
import pytest

from kernels import pool
from kernels import reference as ref
from kernels import versions
from kernels.runtime import trace

# (x shape, kernel_size, stride, padding): the stem's 3/2/1 on odd and tiny sizes, padding
# as large as allowed, stride 2 on odd sizes, stride = kernel, a 1x1 kernel
MAXPOOL_CASES = [((2, 7, 9, 3), 3, 2, 1), ((1, 1, 1, 5), 3, 2, 1), ((1, 112 // 8, 112 // 8, 64), 3, 2, 1),
                 ((2, 6, 5, 4), 3, 2, 2), ((1, 5, 5, 2), 2, 1, 0), ((2, 13, 11, 3), 3, 3, 0),
                 ((1, 4, 4, 7), 1, 1, 0)]


def rel_err(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def case_id(case):
    shape, k, s, p = case
    return f"{'x'.join(map(str, shape))}-k{k}s{s}p{p}"


@pytest.mark.parametrize("case", MAXPOOL_CASES, ids=case_id)
def test_maxpool_matches_reference(backend, case):
    shape, k, s, p = case
    rng = np.random.default_rng(shape[1] * 100 + k)
    x = rng.standard_normal(shape).astype(np.float32)
    y, argmax = pool.maxpool2d_forward(backend.to_device(x), k, s, p)
    y_ref, argmax_ref = ref.maxpool2d_forward(x, k, s, p)
    np.testing.assert_array_equal(backend.to_host(y), y_ref)          # a max is exact
    np.testing.assert_array_equal(backend.to_host(argmax), argmax_ref)
    assert argmax.dtype == np.int32
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    dx_ref = ref.maxpool2d_backward(dy.astype(np.float64), argmax_ref, shape, k, s, p)
    for version in (1, 2, 3):
        dx = pool.maxpool2d_backward(backend.to_device(dy), argmax, shape, k, s, p, version=version)
        assert dx.shape == shape
        assert rel_err(backend.to_host(dx), dx_ref) < 1e-6, version


def test_maxpool_ties_go_to_the_first_pixel(backend):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, (2, 9, 7, 5)).astype(np.float32)    # many equal values
    x[0, :3, :3, 0] = -np.inf                                   # a window of -inf pixels and padding
    y, argmax = pool.maxpool2d_forward(backend.to_device(x))
    y_ref, argmax_ref = ref.maxpool2d_forward(x)
    np.testing.assert_array_equal(backend.to_host(y), y_ref)
    np.testing.assert_array_equal(backend.to_host(argmax), argmax_ref)
    # the all -inf window at the corner: a real pixel wins, never the padding
    assert argmax_ref[0, 0, 0, 0] == 0


def test_maxpool_with_nan_inputs_picks_real_pixels_like_the_kernel(backend):
    # A diverged model feeds NaN through a few steps before the loss is read: pooling must not
    # crash nor route gradients to padding. The first real pixel is taken, then only larger ones
    # (NaN compares false), in the reference as in the kernel.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 6, 4)).astype(np.float32)
    x[0] = np.nan                                   # a whole image of NaN
    x[1, 2:5, 1:4, 1] = np.nan                      # NaN patches next to numbers
    x[1, 0, 0, 2] = np.nan
    y, argmax = pool.maxpool2d_forward(backend.to_device(x))
    y_ref, argmax_ref = ref.maxpool2d_forward(x)
    np.testing.assert_array_equal(backend.to_host(argmax), argmax_ref)
    np.testing.assert_array_equal(backend.to_host(y), y_ref)           # NaN == NaN for assert_array_equal
    assert argmax_ref.min() >= 0 and np.isnan(y_ref[0]).all() and np.isfinite(y_ref[1, :, :, 0]).all()
    dx = ref.maxpool2d_backward(np.ones_like(y_ref), argmax_ref, x.shape, 3, 2, 1)
    assert dx.shape == x.shape and dx.sum() == y_ref.size


@pytest.mark.parametrize("version", [1, 2, 3])
def test_maxpool_backward_of_a_geometry_with_the_shapes_of_another(backend, version):
    """4/2/1 on 8x8 gives the 4x4 output of 3/2/1: the geometry travels with the call, nothing is
    guessed from the shapes (the gradient used to be routed as for 3/2/1 on emu/cuda)."""
    rng = np.random.default_rng(2)
    shape, k, s, p = (2, 8, 8, 3), 4, 2, 1
    x = rng.standard_normal(shape).astype(np.float32)
    y, argmax = ref.maxpool2d_forward(x, k, s, p)
    assert y.shape == ref.maxpool2d_forward(x, 3, 2, 1)[0].shape
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = pool.maxpool2d_backward(backend.to_device(dy), backend.to_device(argmax), shape, k, s, p, version=version)
    want = ref.maxpool2d_backward(dy.astype(np.float64), argmax, shape, k, s, p)
    assert rel_err(backend.to_host(dx), want) < 1e-6


def test_maxpool_backward_matches_finite_differences():
    rng = np.random.default_rng(3)
    shape = (1, 5, 4, 2)
    x = rng.permutation(np.arange(np.prod(shape))).reshape(shape).astype(np.float64) * 0.1   # distinct: no ties
    w = rng.standard_normal(ref.maxpool2d_forward(x)[0].shape)
    numeric = np.zeros_like(x)
    h = 1e-4
    for i in np.ndindex(shape):
        old = x[i]
        x[i] = old + h
        up = np.sum(w * ref.maxpool2d_forward(x)[0])
        x[i] = old - h
        down = np.sum(w * ref.maxpool2d_forward(x)[0])
        x[i] = old
        numeric[i] = (up - down) / (2 * h)
    _, argmax = pool.maxpool2d_forward(x.astype(np.float32))
    dx = pool.maxpool2d_backward(w.astype(np.float32), argmax, shape, 3, 2, 1)
    assert rel_err(dx, numeric) < 1e-5


@pytest.mark.parametrize("shape", [(3, 7, 7, 33), (1, 1, 1, 5), (2, 2, 3, 64)], ids=lambda s: "x".join(map(str, s)))
def test_global_avgpool_matches_reference(backend, shape):
    rng = np.random.default_rng(shape[-1])
    x = rng.standard_normal(shape).astype(np.float32)
    y = pool.global_avgpool_forward(backend.to_device(x))
    assert y.shape == (shape[0], shape[-1])
    assert rel_err(backend.to_host(y), ref.global_avgpool_forward(x.astype(np.float64))) < 1e-5
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = pool.global_avgpool_backward(backend.to_device(dy), shape)
    assert rel_err(backend.to_host(dx), ref.global_avgpool_backward(dy.astype(np.float64), shape)) < 1e-6


# stride 2 on even, odd and one-pixel images, windows 3/2/1, 2/2/0 (one output per 2x2 block), 3/2/0,
# 3/2/2; channels a multiple of the 16-byte vector or not (C = 3, 5, 12)
BLOCK_CASES = [((2, 9, 9, 16), 3, 2, 1), ((1, 112 // 4, 112 // 4, 64), 3, 2, 1), ((2, 7, 5, 3), 3, 2, 1),
               ((2, 6, 6, 8), 2, 2, 0), ((1, 5, 5, 5), 3, 2, 0), ((2, 3, 3, 12), 3, 2, 2), ((1, 1, 1, 8), 3, 2, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=case_id)
def test_maxpool_backward_version_3_is_version_2_bit_for_bit(backend, case, dtype):
    """Version 3 (a thread per 2x2 block of pixels, 16-byte vectors where C allows) adds the same dy
    in the same order as version 2's gather: the same bits, also at ties (many equal inputs), and
    the float64 reference's numbers to one rounding per add."""
    shape, k, s, p = case
    rng = np.random.default_rng(shape[1] * 100 + shape[-1])
    x = rng.integers(0, 4, shape).astype(dtype)
    y, argmax = pool.maxpool2d_forward(backend.to_device(x), k, s, p)
    dy = backend.to_device(rng.standard_normal(y.shape).astype(dtype))
    with trace.collect() as t:
        dx3 = backend.to_host(pool.maxpool2d_backward(dy, argmax, shape, k, s, p, version=3))
    dx2 = backend.to_host(pool.maxpool2d_backward(dy, argmax, shape, k, s, p, version=2))
    V = 16 // np.dtype(dtype).itemsize if shape[-1] % (16 // np.dtype(dtype).itemsize) == 0 else 1
    assert set(t.by_kernel()) == {f"maxpool2d_backward_blocks_{'f32' if dtype == np.float32 else 'f16'}x{V}"}
    np.testing.assert_array_equal(dx3, dx2)
    want = ref.maxpool2d_backward(backend.to_host(dy).astype(np.float64), backend.to_host(argmax).astype(np.int64),
                                  shape, k, s, p)
    assert rel_err(dx3, want) < (1e-6 if dtype == np.float32 else 2e-3)


def test_maxpool_backward_version_3_runs_version_2_where_it_does_not_apply(backend):
    """Stride 1 (version 3 is written for stride 2) and a view off a 16-byte boundary (one channel a
    thread, no vectors)."""
    rng = np.random.default_rng(6)
    shape = (1, 6, 6, 8)
    x = rng.standard_normal(shape).astype(np.float32)
    _, argmax = pool.maxpool2d_forward(backend.to_device(x), 3, 1, 1)
    dy = backend.to_device(rng.standard_normal(shape).astype(np.float32))
    with trace.collect() as t:
        pool.maxpool2d_backward(dy, argmax, shape, 3, 1, 1, version=3)
    assert set(t.by_kernel()) == {"maxpool2d_backward_gather_f32"}
    _, argmax = pool.maxpool2d_forward(backend.to_device(x), 3, 2, 1)
    dy = rng.standard_normal(argmax.size + 1).astype(np.float32)
    dy_off = backend.to_device(dy)[1:].reshape(argmax.shape)   # one float into its buffer: misaligned
    with trace.collect() as t:
        dx = pool.maxpool2d_backward(dy_off, argmax, shape, 3, 2, 1, version=3)
    assert set(t.by_kernel()) == {"maxpool2d_backward_blocks_f32x1"}
    want = ref.maxpool2d_backward(backend.to_host(dy_off).astype(np.float64), backend.to_host(argmax).astype(np.int64),
                                  shape, 3, 2, 1)
    assert rel_err(backend.to_host(dx), want) < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(3, 7, 7, 33), (1, 1, 1, 5), (2, 2, 3, 64), (2, 7, 7, 2048), (2, 4, 4, 12)],
                         ids=lambda s: "x".join(map(str, s)))
def test_global_avgpool_backward_version_3(backend, shape, dtype):
    """Version 3 writes 16-byte vectors (one value a thread where C is not a multiple): the same bits
    as version 2 (each thread divides its dy once, as version 2 divides each element)."""
    rng = np.random.default_rng(shape[-1] + 1)
    dy = backend.to_device(rng.standard_normal((shape[0], shape[-1])).astype(dtype))
    with versions.use(pool=3), trace.collect() as t:
        dx3 = backend.to_host(pool.global_avgpool_backward(dy, shape))
    with versions.use(pool=2):
        dx2 = backend.to_host(pool.global_avgpool_backward(dy, shape))
    V = 16 // np.dtype(dtype).itemsize
    V = V if shape[-1] % V == 0 else 1
    assert set(t.by_kernel()) == {f"global_avgpool_backward_{'f32' if dtype == np.float32 else 'f16'}x{V}"}
    np.testing.assert_array_equal(dx3, dx2)
    want = ref.global_avgpool_backward(backend.to_host(dy).astype(np.float64), shape)
    assert rel_err(dx3, want) < (1e-6 if dtype == np.float32 else 1e-3)


def test_global_avgpool_backward_matches_finite_differences():
    rng = np.random.default_rng(4)
    shape = (2, 3, 2, 3)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((2, 3))
    numeric = np.zeros_like(x)
    h = 1e-6
    for i in np.ndindex(shape):
        old = x[i]
        x[i] = old + h
        up = np.sum(w * ref.global_avgpool_forward(x))
        x[i] = old - h
        down = np.sum(w * ref.global_avgpool_forward(x))
        x[i] = old
        numeric[i] = (up - down) / (2 * h)
    assert rel_err(pool.global_avgpool_backward(w.astype(np.float32), shape), numeric) < 1e-5


def test_float16(backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 7, 7, 9)).astype(np.float16)
    y, argmax = pool.maxpool2d_forward(backend.to_device(x))
    y_ref, argmax_ref = ref.maxpool2d_forward(x)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(backend.to_host(y), y_ref)
    np.testing.assert_array_equal(backend.to_host(argmax), argmax_ref)
    dy = rng.standard_normal(y_ref.shape).astype(np.float16)
    dx = pool.maxpool2d_backward(backend.to_device(dy), argmax, x.shape, 3, 2, 1)
    assert rel_err(backend.to_host(dx), ref.maxpool2d_backward(dy.astype(np.float64), argmax_ref, x.shape,
                                                               3, 2, 1)) < 1e-2
    avg = pool.global_avgpool_forward(backend.to_device(x))
    assert avg.dtype == np.float16
    assert rel_err(backend.to_host(avg), ref.global_avgpool_forward(x.astype(np.float64))) < 1e-2


def test_bad_inputs_raise_clear_errors():
    x = np.zeros((1, 5, 5, 2), np.float32)
    with pytest.raises(TypeError, match="x must be float32 or float16"):
        pool.maxpool2d_forward(x.astype(np.float64))
    with pytest.raises(ValueError, match="4 dimensions"):
        pool.maxpool2d_forward(x[0])
    with pytest.raises(ValueError, match="padding 3 must be smaller than kernel_size 3"):
        pool.maxpool2d_forward(x, 3, 2, 3)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        pool.maxpool2d_forward(x, 3, 0, 1)
    with pytest.raises(ValueError, match="does not fit"):
        pool.maxpool2d_forward(x, 9, 1, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        pool.maxpool2d_forward(np.swapaxes(x, 1, 2))
    y, argmax = pool.maxpool2d_forward(x)
    with pytest.raises(ValueError, match="argmax must have shape"):
        pool.maxpool2d_backward(y, argmax[:, :1], x.shape, 3, 2, 1)
    with pytest.raises(ValueError, match="does not match x_shape"):
        pool.maxpool2d_backward(y, argmax, (1, 9, 9, 2), 3, 2, 1)
    with pytest.raises(ValueError, match="argmax holds indices outside"):
        pool.maxpool2d_backward(y, argmax + 100, x.shape, 3, 2, 1, version=1)
    with pytest.raises(ValueError, match="dy shape"):
        pool.global_avgpool_backward(np.zeros((1, 3), np.float32), x.shape)
    with pytest.raises(ValueError, match="x_shape must be"):
        pool.global_avgpool_backward(np.zeros((1, 2), np.float32), (1, 2))
