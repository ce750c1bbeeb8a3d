"""Batch-norm kernels (kernels/batchnorm.cu) against the NumPy reference in float64 (both versions of
the reductions), central finite differences, and the mean-1000 / std-0.1 variance requirement.
Emulator always, GPU when present."""

import zlib

import numpy as np
import pytest

from kernels import batchnorm as bn
from kernels import reference as ref
from kernels import versions

SHAPES = [(2, 7, 7, 5), (1, 7, 7, 33), (3, 1, 1, 64), (37, 3), (4, 3, 5, 40)]
MODES = ["plain", "relu", "add_relu"]


def rel_err(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def make_inputs(shape, rng, dtype=np.float32):
    C = shape[-1]
    x = (rng.standard_normal(shape) * 2.0 + rng.standard_normal(C)).astype(dtype)
    gamma = (rng.standard_normal(C) * 0.5 + 1.0).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    running_mean = rng.standard_normal(C).astype(np.float32)
    running_var = (rng.random(C) + 0.5).astype(np.float32)
    return x, gamma, beta, running_mean, running_var


def f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def ref_forward(mode, x, residual, gamma, beta, rm, rv, eps=1e-5, momentum=0.1):
    if mode == "plain":
        return ref.batchnorm_forward_train(x, gamma, beta, rm, rv, eps, momentum)
    if mode == "relu":
        return ref.batchnorm_relu_forward_train(x, gamma, beta, rm, rv, eps, momentum)
    return ref.batchnorm_add_relu_forward_train(x, residual, gamma, beta, rm, rv, eps, momentum)


def our_forward(mode, x, residual, gamma, beta, rm, rv, eps=1e-5, momentum=0.1):
    if mode == "plain":
        return bn.batchnorm_forward_train(x, gamma, beta, rm, rv, eps, momentum)
    if mode == "relu":
        return bn.batchnorm_relu_forward_train(x, gamma, beta, rm, rv, eps, momentum)
    return bn.batchnorm_add_relu_forward_train(x, residual, gamma, beta, rm, rv, eps, momentum)


def our_backward(mode, dy, y, x, gamma, mean, invstd):
    """-> (dx, dresidual or None, dgamma, dbeta)"""
    if mode == "plain":
        dx, dg, db = bn.batchnorm_backward(dy, x, gamma, mean, invstd)
        return dx, None, dg, db
    if mode == "relu":
        dx, dg, db = bn.batchnorm_relu_backward(dy, y, x, gamma, mean, invstd)
        return dx, None, dg, db
    return bn.batchnorm_add_relu_backward(dy, y, x, gamma, mean, invstd)


def ref_backward(mode, dy, y, x, gamma, mean, invstd):
    if mode == "plain":
        dx, dg, db = ref.batchnorm_backward(dy, x, gamma, mean, invstd)
        return dx, None, dg, db
    if mode == "relu":
        dx, dg, db = ref.batchnorm_relu_backward(dy, y, x, gamma, mean, invstd)
        return dx, None, dg, db
    return ref.batchnorm_add_relu_backward(dy, y, x, gamma, mean, invstd)


@pytest.mark.parametrize("version", [1, 2, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_train_and_backward_match_reference(backend, shape, mode, version):
    # version 1's E[x^2] - E[x]^2 loses a few digits more (the lesson of batchnorm.cu): 1e-4 there
    with versions.use(batchnorm=version):
        _forward_train_and_backward_match_reference(backend, shape, mode, tol=1e-4 if version == 1 else 1e-5)


def _forward_train_and_backward_match_reference(backend, shape, mode, tol):
    rng = np.random.default_rng(zlib.crc32(repr((shape, mode)).encode()))
    x, gamma, beta, rm, rv = make_inputs(shape, rng)
    residual = rng.standard_normal(shape).astype(np.float32)
    rm64, rv64 = f64(rm, rv)
    y_ref, mean_ref, invstd_ref = ref_forward(mode, *f64(x, residual, gamma, beta), rm64, rv64)
    d = backend.to_device
    rm_dev, rv_dev = d(rm), d(rv)
    y, mean, invstd = our_forward(mode, d(x), d(residual), d(gamma), d(beta), rm_dev, rv_dev)
    h = backend.to_host
    assert y.dtype == np.float32 and y.shape == shape
    assert mean.dtype == np.float32 and mean.shape == (shape[-1],)
    assert rel_err(h(y), y_ref) < tol
    assert rel_err(h(mean), mean_ref) < tol
    assert rel_err(h(invstd), invstd_ref) < tol
    assert rel_err(h(rm_dev), rm64) < tol
    assert rel_err(h(rv_dev), rv64) < tol

    dy = rng.standard_normal(shape).astype(np.float32)
    got = our_backward(mode, d(dy), y, d(x), d(gamma), mean, invstd)
    want = ref_backward(mode, *f64(dy, h(y), x, gamma, h(mean), h(invstd)))
    for name, g, w in zip(("dx", "dresidual", "dgamma", "dbeta"), got, want):
        if w is None:
            assert g is None
            continue
        assert rel_err(h(g), w) < tol, name


@pytest.mark.parametrize("shape", [(2, 7, 7, 5), (1, 1, 1, 33), (9, 3)], ids=lambda s: "x".join(map(str, s)))
def test_inference_matches_reference(backend, shape):
    rng = np.random.default_rng(7)
    x, gamma, beta, rm, rv = make_inputs(shape, rng)
    y = bn.batchnorm_forward_inference(*map(backend.to_device, (x, gamma, beta, rm, rv)), eps=1e-3)
    want = ref.batchnorm_forward_inference(*f64(x, gamma, beta, rm, rv), eps=1e-3)
    assert rel_err(backend.to_host(y), want) < 1e-5


def test_running_statistics_use_unbiased_variance(backend):
    # M = 4 values per channel: the unbiased factor M / (M - 1) = 4/3 is easy to see.
    x = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 14.0], [6.0, 10.0]], dtype=np.float32)
    rm = np.zeros(2, np.float32)
    rv = np.ones(2, np.float32)
    rm_d, rv_d = backend.to_device(rm), backend.to_device(rv)
    ones = backend.to_device(np.ones(2, np.float32))
    bn.batchnorm_forward_train(backend.to_device(x), ones, ones * 0, rm_d, rv_d, momentum=0.25)
    mean = x.astype(np.float64).mean(0)
    unbiased = x.astype(np.float64).var(0, ddof=1)
    np.testing.assert_allclose(backend.to_host(rm_d), 0.25 * mean, rtol=1e-6)
    np.testing.assert_allclose(backend.to_host(rv_d), 0.75 + 0.25 * unbiased, rtol=1e-6)


def test_variance_is_accurate_when_mean_dwarfs_std(backend):
    """The issue's requirement: mean 1000, std 0.1 -> relative error of the variance < 1e-4."""
    rng = np.random.default_rng(3)
    C = 5
    x = (1000.0 + 0.1 * rng.standard_normal((8, 16, 16, C))).astype(np.float32)
    # the exact variance of the float32 values we pass
    want = x.astype(np.float64).reshape(-1, C).var(axis=0)
    mean, var = bn.batchnorm_batch_stats(backend.to_device(x))
    assert np.max(np.abs(backend.to_host(var) - want) / want) < 1e-4
    # the training forward's saved_invstd carries the same variance (eps = 0 to read it back)
    ones = backend.to_device(np.ones(C, np.float32))
    _, _, invstd = bn.batchnorm_forward_train(backend.to_device(x), ones, ones, backend.to_device(np.zeros(C, np.float32)),
                                              backend.to_device(np.ones(C, np.float32)), eps=0.0)
    var_from_invstd = 1.0 / backend.to_host(invstd).astype(np.float64) ** 2
    assert np.max(np.abs(var_from_invstd - want) / want) < 1e-4


def test_naive_variance_fails_where_welford_does_not(backend):
    """The lesson of batchnorm.cu: E[x^2] - E[x]^2 in float32 is noise at mean 1000, std 0.1."""
    rng = np.random.default_rng(4)
    x = (1000.0 + 0.1 * rng.standard_normal((2048, 3))).astype(np.float32)
    want = x.astype(np.float64).var(axis=0)
    _, naive = bn.batchnorm_batch_stats(backend.to_device(x), version=1)
    _, good = bn.batchnorm_batch_stats(backend.to_device(x), version=2)
    assert np.max(np.abs(backend.to_host(naive) - want) / want) > 1e-2
    assert np.max(np.abs(backend.to_host(good) - want) / want) < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_backward_matches_finite_differences(mode):
    """Our float32 backward against central differences of the float64 reference forward."""
    rng = np.random.default_rng(11)
    shape = (2, 2, 3, 3)
    x, gamma, beta, rm, rv = make_inputs(shape, rng)
    residual = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(shape)   # loss = sum(w * y): dy = w
    x64, r64, g64, b64 = f64(x, residual, gamma, beta)

    def loss(x_, r_, g_, b_):
        y, _, _ = ref_forward(mode, x_, r_, g_, b_, np.zeros(3), np.ones(3))
        return float(np.sum(w * y))

    def numeric(which):
        args = [x64.copy(), r64.copy(), g64.copy(), b64.copy()]
        grad = np.zeros_like(args[which])
        h = 1e-6
        for i in np.ndindex(grad.shape):
            old = args[which][i]
            args[which][i] = old + h
            up = loss(*args)
            args[which][i] = old - h
            down = loss(*args)
            args[which][i] = old
            grad[i] = (up - down) / (2 * h)
        return grad

    y, mean, invstd = our_forward(mode, x, residual, gamma, beta, rm, rv)
    dx, dres, dgamma, dbeta = our_backward(mode, w.astype(np.float32), y, x, gamma, mean, invstd)
    assert rel_err(dx, numeric(0)) < 1e-4
    assert rel_err(dgamma, numeric(2)) < 1e-4
    assert rel_err(dbeta, numeric(3)) < 1e-4
    if mode == "add_relu":
        assert rel_err(dres, numeric(1)) < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_float16_activations(backend, mode):
    rng = np.random.default_rng(5)
    shape = (2, 5, 5, 17)
    x, gamma, beta, rm, rv = make_inputs(shape, rng, dtype=np.float16)
    residual = rng.standard_normal(shape).astype(np.float16)
    d = backend.to_device
    y, mean, invstd = our_forward(mode, d(x), d(residual), d(gamma), d(beta), d(rm), d(rv))
    assert y.dtype == np.float16 and mean.dtype == np.float32
    y_ref, mean_ref, invstd_ref = ref_forward(mode, *f64(x, residual, gamma, beta, rm, rv))
    h = backend.to_host
    assert rel_err(h(y), y_ref) < 1e-2
    assert rel_err(h(mean), mean_ref) < 1e-5   # statistics are float32 from exact float16 values
    assert rel_err(h(invstd), invstd_ref) < 1e-5
    dy = rng.standard_normal(shape).astype(np.float16)
    got = our_backward(mode, d(dy), y, d(x), d(gamma), mean, invstd)
    want = ref_backward(mode, *f64(dy, h(y), x, gamma, h(mean), h(invstd)))
    for g, w in zip(got, want):
        if w is not None:
            assert rel_err(h(g), w) < 1e-2
    y_inf = bn.batchnorm_forward_inference(d(x), d(gamma), d(beta), d(rm), d(rv))
    assert y_inf.dtype == np.float16
    assert rel_err(h(y_inf), ref.batchnorm_forward_inference(*f64(x, gamma, beta, rm, rv))) < 1e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 64), (21, 8), (2, 2, 3, 256)], ids=lambda s: "x".join(map(str, s)))
def test_float16_with_8_channel_vectors(backend, shape, mode):
    """Versions 1-3 (run as version 3), C a multiple of 8 (C/8 dividing 256): the normalizing passes
    move 16-byte vectors of 8 channels (*_f16x8); the same results as the reference; a misaligned
    array takes the 32 x 8 kernels instead, with the same results.  (Version 4: the tests below.)"""
    import kernels
    rng = np.random.default_rng(9)
    x, gamma, beta, rm, rv = make_inputs(shape, rng, dtype=np.float16)
    residual = rng.standard_normal(shape).astype(np.float16)
    dy = rng.standard_normal(shape).astype(np.float16)
    d, h = backend.to_device, backend.to_host
    y_ref, mean_ref, invstd_ref = ref_forward(mode, *f64(x, residual, gamma, beta, rm, rv))
    for aligned in (True, False):
        if aligned:
            xs, rs, dys = d(x), d(residual), d(dy)
        else:   # one element into a larger buffer: 2-byte aligned, never 16
            xs, rs, dys = (d(np.concatenate([[0], a.ravel()]).astype(np.float16))[1:].reshape(shape)
                           for a in (x, residual, dy))
        with versions.use(batchnorm=3), kernels.trace.collect() as t:
            y, mean, invstd = our_forward(mode, xs, rs, d(gamma), d(beta), d(rm), d(rv))
            got = our_backward(mode, dys, y, xs, d(gamma), mean, invstd)
            y_inf = bn.batchnorm_forward_inference(xs, d(gamma), d(beta), d(rm), d(rv))
        vector_kernels = {k for k in t.by_kernel() if k.endswith("_f16x8")}
        assert len(vector_kernels) == (3 if aligned else 0), vector_kernels
        assert y.dtype == np.float16 and rel_err(h(y), y_ref) < 2e-3
        want = ref_backward(mode, *f64(dy, h(y), x, gamma, h(mean), h(invstd)))
        for g, w in zip(got, want):
            if w is not None:
                assert rel_err(h(g), w) < (1e-4 if g.dtype == np.float32 else 2e-3)
        assert rel_err(h(y_inf), ref.batchnorm_forward_inference(*f64(x, gamma, beta, rm, rv))) < 2e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(2, 7, 7, 5), (2, 3, 5, 64), (21, 8), (2, 2, 3, 256), (1, 3, 3, 2048), (37, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_version_4_backward_in_vectors(backend, shape, mode, dtype):
    """Version 4's backward (reduction over slices of rows, finalize in double, dx pass) against the
    float64 reference: 16-byte vectors where C is a multiple of 8 halves or 4 floats (C = 2048
    float32: 512 groups, two tiles of blocks), one channel per thread otherwise and for an array off
    a 16-byte boundary; the add + ReLU form's dresidual written by the reduction and read by dx."""
    import kernels
    rng = np.random.default_rng(zlib.crc32(repr((shape, mode, np.dtype(dtype).name)).encode()))
    x, gamma, beta, rm, rv = make_inputs(shape, rng, dtype=dtype)
    residual = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    d, h = backend.to_device, backend.to_host
    y, mean, invstd = ref_forward(mode, *f64(x, residual, gamma, beta, rm, rv))
    y, mean, invstd = y.astype(dtype), mean.astype(np.float32), invstd.astype(np.float32)
    want = ref_backward(mode, *f64(dy, y, x, gamma, mean, invstd))
    C = shape[-1]
    vector = 16 // np.dtype(dtype).itemsize
    prefix = {"plain": "batchnorm", "relu": "batchnorm_relu", "add_relu": "batchnorm_add_relu"}[mode]
    sfx = "f32" if dtype == np.float32 else "f16"
    for aligned in (True, False):
        if aligned:
            dys, ys, xs = d(dy), d(y), d(x)
        else:   # one element into a larger buffer: never 16-byte aligned
            dys, ys, xs = (d(np.concatenate([[0], a.ravel()]).astype(dtype))[1:].reshape(shape) for a in (dy, y, x))
        with versions.use(batchnorm=4), kernels.trace.collect() as t:
            got = our_backward(mode, dys, ys, xs, d(gamma), d(mean), d(invstd))
        V = vector if aligned and C % vector == 0 else 1
        assert f"{prefix}_backward_reduce_{sfx}x{V}" in t.by_kernel()
        assert "batchnorm_backward_reduce_finalize" in t.by_kernel()
        assert not {k for k in t.by_kernel() if "backward_partial" in k or k.endswith("backward_finalize")}
        for name, g, w in zip(("dx", "dresidual", "dgamma", "dbeta"), got, want):
            if w is None:
                assert g is None
                continue
            tol = 1e-5 if dtype == np.float32 else (1e-4 if g.dtype == np.float32 else 2e-3)
            assert rel_err(h(g), w) < tol, (name, aligned)
        if mode == "add_relu":   # dresidual is dy where y > 0: exact
            np.testing.assert_array_equal(h(got[1]), np.where(y > 0, dy, 0).astype(dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(2, 7, 7, 5), (2, 3, 5, 64), (21, 8), (1, 3, 3, 2048)],
                         ids=lambda s: "x".join(map(str, s)))
def test_version_4_normalising_passes_in_vectors(backend, shape, mode, dtype):
    """Version 4's forward (statistics from partials, as version 3) and inference normalise in rows
    of 16-byte vectors (*_rows_f16x8 / _f32x4), one value a thread where C is not a multiple or an
    array is off a 16-byte boundary: the reference's numbers either way, and version 3's bits."""
    import kernels
    rng = np.random.default_rng(zlib.crc32(repr((shape, mode, "rows", np.dtype(dtype).name)).encode()))
    x, gamma, beta, rm, rv = make_inputs(shape, rng, dtype=dtype)
    residual = rng.standard_normal(shape).astype(dtype) if mode == "add_relu" else None
    d, h = backend.to_device, backend.to_host
    C = shape[-1]
    stats = bn.batchnorm_chan_partials(d(x))
    y_ref, mean_ref, invstd_ref = ref_forward(mode, *f64(x, x if residual is None else residual, gamma, beta, rm, rv))
    vector = 16 // np.dtype(dtype).itemsize
    sfx = "f32" if dtype == np.float32 else "f16"
    name = {"plain": "batchnorm_apply_rows", "relu": "batchnorm_relu_apply_rows",
            "add_relu": "batchnorm_add_relu_apply_rows"}[mode]
    for aligned in (True, False):
        if aligned:
            xs, rs = d(x), None if residual is None else d(residual)
        else:   # one element into a larger buffer: never 16-byte aligned
            xs, rs = (None if a is None else d(np.concatenate([[0], a.ravel()]).astype(dtype))[1:].reshape(shape)
                      for a in (x, residual))
        outs = {}
        for version in (3, 4):
            with versions.use(batchnorm=version), kernels.trace.collect() as t:
                outs[version] = [h(a) for a in bn.batchnorm_forward_train_from_stats(
                    xs, stats, d(gamma), d(beta), d(rm.copy()), d(rv.copy()), relu=mode != "plain", residual=rs)]
                outs[version].append(h(bn.batchnorm_forward_inference(xs, d(gamma), d(beta), d(rm), d(rv))))
            if version == 4:
                V = vector if aligned and C % vector == 0 else 1
                assert {f"{name}_{sfx}x{V}", f"batchnorm_inference_rows_{sfx}x{V}"} <= set(t.by_kernel())
        for a, b in zip(outs[3], outs[4]):
            np.testing.assert_array_equal(a, b)
        y, mean, invstd, y_inf = outs[4]
        assert rel_err(y, y_ref) < (1e-5 if dtype == np.float32 else 2e-3)
        assert rel_err(mean, mean_ref) < 1e-5 and rel_err(invstd, invstd_ref) < 1e-5
        want_inf = ref.batchnorm_forward_inference(*f64(x, gamma, beta, rm, rv))
        assert rel_err(y_inf, want_inf) < (1e-5 if dtype == np.float32 else 2e-3)


def test_version_4_backward_is_deterministic_and_close_to_version_2(backend):
    rng = np.random.default_rng(11)
    shape = (3, 6, 6, 64)
    x, gamma, beta, rm, rv = map(backend.to_device, make_inputs(shape, rng, dtype=np.float16))
    y, mean, invstd = bn.batchnorm_relu_forward_train(x, gamma, beta, rm, rv)
    dy = backend.to_device(rng.standard_normal(shape).astype(np.float16))
    runs = {}
    for version in (4, 4, 2):
        with versions.use(batchnorm=version):
            runs.setdefault(version, []).append([backend.to_host(a)
                                                 for a in bn.batchnorm_relu_backward(dy, y, x, gamma, mean, invstd)])
    for a, b in zip(*runs[4]):
        assert np.array_equal(a, b)
    for a, b in zip(runs[4][0], runs[2][0]):   # other summation orders: float32 rounding, then float16's
        assert rel_err(a, b) < (1e-5 if a.dtype == np.float32 else 2e-3)


def test_results_are_deterministic(backend):
    rng = np.random.default_rng(6)
    x, gamma, beta, rm, rv = map(backend.to_device, make_inputs((4, 6, 6, 40), rng))
    a = bn.batchnorm_forward_train(x, gamma, beta, rm.copy(), rv.copy())
    b = bn.batchnorm_forward_train(x, gamma, beta, rm.copy(), rv.copy())
    for u, v in zip(a, b):
        assert np.array_equal(backend.to_host(u), backend.to_host(v))


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(8)
    x, gamma, beta, rm, rv = make_inputs((2, 3, 3, 4), rng)
    with pytest.raises(TypeError, match="x must be float32 or float16"):
        bn.batchnorm_forward_train(x.astype(np.float64), gamma, beta, rm, rv)
    with pytest.raises(ValueError, match="gamma must have shape"):
        bn.batchnorm_forward_train(x, gamma[:3], beta, rm, rv)
    with pytest.raises(TypeError, match="running_var must be float32"):
        bn.batchnorm_forward_train(x, gamma, beta, rm, rv.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        bn.batchnorm_forward_train(np.swapaxes(x, 1, 2), gamma, beta, rm, rv)
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn.batchnorm_forward_train(x[:1, :1, :1], gamma, beta, rm, rv)
    with pytest.raises(ValueError, match="dimensions"):
        bn.batchnorm_forward_train(x[0], gamma, beta, rm, rv)
    with pytest.raises(ValueError, match="residual must have shape"):
        bn.batchnorm_add_relu_forward_train(x, x[:1], gamma, beta, rm, rv)
    with pytest.raises(ValueError, match="momentum"):
        bn.batchnorm_forward_train(x, gamma, beta, rm, rv, momentum=1.5)
    ro = rm.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean is updated in place"):
        bn.batchnorm_forward_train(x, gamma, beta, ro, rv)
    y, mean, invstd = bn.batchnorm_forward_train(x, gamma, beta, rm, rv)
    with pytest.raises(ValueError, match="dy must have shape"):
        bn.batchnorm_backward(y[:1], x, gamma, mean, invstd)
    with pytest.raises(TypeError, match="y must be float32"):
        bn.batchnorm_relu_backward(y, y.astype(np.float16), x, gamma, mean, invstd)


# ------------------------------------------------------------------ version 3: statistics from partials
def tile_partials(x, rows=64, order=None):
    """Batch-norm partials [4, P, C] of x as conv.cu's epilogue writes them (a block per `rows` rows,
    shift = its first row), computed in float64 on the host; order: a permutation of the blocks."""
    C = x.shape[-1]
    r = np.asarray(x, dtype=np.float64).reshape(-1, C)
    blocks = [r[i:i + rows] for i in range(0, r.shape[0], rows)]
    stats = np.empty((4, len(blocks), C))
    for p, b in enumerate(blocks):
        stats[0, p], stats[1, p] = len(b), b[0]
        stats[2, p], stats[3, p] = (b - b[0]).mean(axis=0), ((b - b.mean(axis=0)) ** 2).sum(axis=0)
    if order is not None:
        stats = stats[:, order]
    return np.ascontiguousarray(stats, dtype=np.float32)


def from_stats(mode, x, stats, residual, gamma, beta, rm, rv, module=bn, **kw):
    return module.batchnorm_forward_train_from_stats(x, stats, gamma, beta, rm, rv, relu=mode != "plain",
                                                     residual=residual if mode == "add_relu" else None, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(2, 7, 7, 5), (1, 9, 15, 33), (3, 1, 1, 64), (37, 3), (4, 3, 5, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_forward_train_from_stats_matches_reference(backend, shape, mode):
    """Version 3's forward takes the statistics from partials (the convolution's 64-row tiles, version
    2's row slices, or one block, in any order): what the reference forward returns and updates."""
    rng = np.random.default_rng(zlib.crc32(repr((shape, mode, 3)).encode()))
    x, gamma, beta, rm, rv = make_inputs(shape, rng)
    residual = rng.standard_normal(shape).astype(np.float32)
    rm64, rv64 = f64(rm, rv)
    y_ref, mean_ref, invstd_ref = ref_forward(mode, *f64(x, residual, gamma, beta), rm64, rv64)
    d, h = backend.to_device, backend.to_host
    P = -(-x.size // x.shape[-1] // 64)
    for stats in (tile_partials(x), tile_partials(x, order=np.random.default_rng(1).permutation(P)),
                  tile_partials(x, rows=7), bn.batchnorm_chan_partials(d(x)), ref.batchnorm_partials(x)):
        rm_dev, rv_dev = d(rm.copy()), d(rv.copy())     # (on the emulator d() is the array itself)
        y, mean, invstd = from_stats(mode, d(x), d(stats), d(residual), d(gamma), d(beta), rm_dev, rv_dev)
        assert y.dtype == np.float32 and y.shape == shape and mean.dtype == invstd.dtype == np.float32
        for got, want in ((y, y_ref), (mean, mean_ref), (invstd, invstd_ref), (rm_dev, rm64), (rv_dev, rv64)):
            assert rel_err(h(got), want) < 1e-5


def test_from_stats_saves_what_the_backward_needs(backend):
    """The saved mean and invstd are those of version 2's forward to float32 rounding, so the backward
    (unchanged) gives the same gradients."""
    rng = np.random.default_rng(12)
    shape = (3, 6, 7, 24)
    x, gamma, beta, rm, rv = map(backend.to_device, make_inputs(shape, rng))
    dy = backend.to_device(rng.standard_normal(shape).astype(np.float32))
    y2, mean2, invstd2 = bn.batchnorm_relu_forward_train(x, gamma, beta, rm.copy(), rv.copy())
    y3, mean3, invstd3 = bn.batchnorm_forward_train_from_stats(x, bn.batchnorm_chan_partials(x), gamma, beta,
                                                               rm.copy(), rv.copy(), relu=True)
    h = backend.to_host
    for a, b in ((y3, y2), (mean3, mean2), (invstd3, invstd2)):
        assert rel_err(h(a), h(b)) < 1e-6
    g2 = bn.batchnorm_relu_backward(dy, y2, x, gamma, mean2, invstd2)
    g3 = bn.batchnorm_relu_backward(dy, y3, x, gamma, mean3, invstd3)
    for a, b in zip(g3, g2):
        assert rel_err(h(a), h(b)) < 1e-5


@pytest.mark.parametrize("shape", [(2, 3, 5, 64), (1, 9, 15, 17)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
def test_float16_from_stats(backend, shape, mode):
    """float16 x: with 16-byte vectors where C % 8 == 0, element by element otherwise."""
    rng = np.random.default_rng(14)
    x, gamma, beta, rm, rv = make_inputs(shape, rng, dtype=np.float16)
    residual = rng.standard_normal(shape).astype(np.float16)
    y_ref, mean_ref, invstd_ref = ref_forward(mode, *f64(x, residual, gamma, beta, rm, rv))
    d, h = backend.to_device, backend.to_host
    y, mean, invstd = from_stats(mode, d(x), d(tile_partials(x)), d(residual), d(gamma), d(beta), d(rm), d(rv))
    assert y.dtype == np.float16
    assert rel_err(h(y), y_ref) < 2e-3
    assert rel_err(h(mean), mean_ref) < 1e-5 and rel_err(h(invstd), invstd_ref) < 1e-5


def test_from_stats_of_a_constant_channel_and_a_large_offset(backend):
    """A constant channel has variance 0 exactly (invstd = 1/sqrt(eps), y = beta); a channel at
    mean 1000, std 0.1 keeps its variance to 1e-4 (the requirement version 2 meets)."""
    rng = np.random.default_rng(15)
    x = np.stack([np.full(4096, 3.25), 1000.0 + 0.1 * rng.standard_normal(4096)], axis=1).astype(np.float32)
    want = x.astype(np.float64).var(axis=0)
    ones = np.ones(2, np.float32)
    d, h = backend.to_device, backend.to_host
    for stats in (tile_partials(x), bn.batchnorm_chan_partials(d(x))):
        y, mean, invstd = bn.batchnorm_forward_train_from_stats(d(x), d(stats), d(ones), d(ones.copy()),
                                                                d(ones * 0), d(ones.copy()), eps=1e-5)
        assert h(mean)[0] == np.float32(3.25) and h(invstd)[0] == np.float32(1 / np.sqrt(np.float32(1e-5)))
        assert np.all(h(y)[:, 0] == 1.0)
        var = 1.0 / h(invstd)[1].astype(np.float64) ** 2 - 1e-5
        assert abs(var - want[1]) / want[1] < 1e-4


def test_from_stats_rejects_bad_input():
    rng = np.random.default_rng(16)
    x, gamma, beta, rm, rv = make_inputs((2, 3, 3, 4), rng)
    stats = tile_partials(x)
    with pytest.raises(ValueError, match=r"stats must be \[4, P, 4\]"):
        bn.batchnorm_forward_train_from_stats(x, stats[:3], gamma, beta, rm, rv)
    with pytest.raises(ValueError, match=r"stats must be \[4, P, 4\]"):
        bn.batchnorm_forward_train_from_stats(x, np.ascontiguousarray(stats[..., :3]), gamma, beta, rm, rv)
    with pytest.raises(TypeError, match="stats must be float32"):
        bn.batchnorm_forward_train_from_stats(x, stats.astype(np.float64), gamma, beta, rm, rv)
    with pytest.raises(ValueError, match="residual is only supported together with relu"):
        bn.batchnorm_forward_train_from_stats(x, stats, gamma, beta, rm, rv, residual=x)
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn.batchnorm_forward_train_from_stats(x[:1, :1, :1], stats, gamma, beta, rm, rv)


@pytest.mark.parametrize("mode", MODES)
def test_reference_from_its_own_partials_is_the_forward_bit_for_bit(mode):
    """The cpu device: batch norm from reference.batchnorm_partials (one block) gives exactly what
    the plain forward gives, so a cpu run trains to the same numbers with and without the fusion."""
    rng = np.random.default_rng(17)
    for dtype in (np.float32, np.float64):
        x, gamma, beta, rm, rv = (a.astype(dtype) for a in make_inputs((3, 5, 5, 7), rng))
        residual = rng.standard_normal(x.shape).astype(dtype)
        rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
        want = ref_forward(mode, x, residual, gamma, beta, rm1, rv1)
        got = from_stats(mode, x, ref.batchnorm_partials(x), residual, gamma, beta, rm2, rv2, module=ref)
        for a, b in zip(got + (rm2, rv2), want + (rm1, rv1)):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_partials_merge_by_chans_formula():
    """reference.merge_bn_partials: any split of the rows into blocks, any order, gives the
    statistics of the whole (float64), the shifts far from the mean or not."""
    rng = np.random.default_rng(18)
    x = 50.0 + rng.standard_normal((301, 3))
    want = x.mean(axis=0), x.var(axis=0)
    for rows in (1, 7, 64, 301):
        stats = tile_partials(x, rows).astype(np.float64)
        stats[2] += stats[1] - 40.0                     # another shift: 40
        stats[1] = 40.0
        for order in (None, rng.permutation(stats.shape[1])):
            n, mean, var = ref.merge_bn_partials(stats if order is None else stats[:, order])
            assert np.all(n == 301)
            np.testing.assert_allclose(mean, want[0], rtol=1e-7)
            np.testing.assert_allclose(var, want[1], rtol=1e-5)
