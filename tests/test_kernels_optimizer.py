"""Optimizer kernels (kernels/optimizer.cu): fused SGD (per tensor and flat multi-tensor), LARS trust
ratios and the global gradient norm, against the NumPy reference in float64.
Emulator always, GPU when present."""

import numpy as np
import pytest

from kernels import optimizer as opt
from kernels import reference as ref
from kernels import versions
from kernels.runtime import trace


@pytest.fixture(params=[2, 3], ids=["v2", "v3"])
def norms_version(request):
    """Versions 2 (scalar loops) and 3 (float4 vectors) of the norms."""
    with versions.use(optimizer=request.param):
        yield request.param


def rel_err(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("shape,weight_decay", [((1,), 0.0), ((7, 3, 3, 5), 5e-5), ((1001,), 0.1)])
def test_sgd_momentum_update_matches_reference(backend, shape, weight_decay, nesterov):
    rng = np.random.default_rng(len(shape))
    p, g, v = randn(rng, *shape), randn(rng, *shape), randn(rng, *shape)
    p64, g64, v64 = (a.astype(np.float64) for a in (p, g, v))
    pd, gd, vd = map(backend.to_device, (p, g, v))
    for _ in range(3):   # a few steps: the momentum buffer carries over
        opt.sgd_momentum_update(pd, gd, vd, 0.1, 0.9, weight_decay, nesterov)
        ref.sgd_momentum_update(p64, g64, v64, 0.1, 0.9, weight_decay, nesterov)
    assert rel_err(backend.to_host(pd), p64) < 1e-5
    assert rel_err(backend.to_host(vd), v64) < 1e-5


def make_flat(rng, backend, sizes, chunk_size):
    wd = [5e-5 if i % 2 == 0 else 0.0 for i in range(len(sizes))]   # odd tensors play BN/bias: no decay
    seg = opt.ParamSegments(sizes, wd, xp=backend.xp, chunk_size=chunk_size)
    p, g, v = (randn(rng, seg.total) for _ in range(3))
    return seg, wd, p, g, v


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("use_lars", [False, True])
def test_flat_update_and_lars_match_per_tensor_reference(backend, nesterov, use_lars, norms_version):
    rng = np.random.default_rng(3)
    sizes = [64, 0, 3 * 3 * 7 * 5, 1, 2000, 33]   # an empty tensor and several chunks per tensor
    seg, wd, p, g, v = make_flat(rng, backend, sizes, chunk_size=500)
    assert seg.num_chunks == 1 + 1 + 1 + 4 + 1
    p64, g64, v64 = (a.astype(np.float64) for a in (p, g, v))   # before the in-place update
    pd, gd, vd = map(backend.to_device, (p, g, v))
    ratios = None
    want_ratios = [ref.lars_trust_ratio(w.astype(np.float64), gr.astype(np.float64), d)
                   for w, gr, d in zip(seg.split(p), seg.split(g), wd)]
    if use_lars:
        ratios, w_norms, g_norms = opt.lars_trust_ratio_flat(pd, gd, seg, return_norms=True)
        assert ratios.dtype == np.float32 and ratios.shape == (len(sizes),)
        assert rel_err(backend.to_host(ratios), want_ratios) < 1e-5
        assert rel_err(backend.to_host(w_norms), [np.linalg.norm(w.astype(np.float64)) for w in seg.split(p)]) < 1e-5
        assert rel_err(backend.to_host(g_norms), [np.linalg.norm(w.astype(np.float64)) for w in seg.split(g)]) < 1e-5
    lr = backend.to_device(np.array([0.1], np.float32))        # a device buffer, as nn.optim keeps it
    opt.momentum_update_flat(pd, gd, vd, seg, lr, 0.9, nesterov=nesterov, lr_scale=ratios)
    for i, (pw, gw, vw) in enumerate(zip(seg.split(p64), seg.split(g64), seg.split(v64))):
        step_lr = 0.1 * (want_ratios[i] if use_lars else 1.0)
        ref.sgd_momentum_update(pw, gw, vw, step_lr, 0.9, wd[i], nesterov)
    assert rel_err(backend.to_host(pd), p64) < 1e-5
    assert rel_err(backend.to_host(vd), v64) < 1e-5


def test_flat_lars_puts_the_learning_rate_inside_the_momentum(backend):
    # LARS as the MLPerf reference: v = m*v + lr*trust*(g + wd*w); w -= v, written out in float64
    # over three steps with a changing learning rate (where lr inside or outside v differ).
    rng = np.random.default_rng(8)
    sizes = [300, 7, 1200]
    wd = [1e-3, 0.0, 5e-4]
    trust = [True, False, True]          # the middle tensor plays a BN parameter: no trust ratio
    seg = opt.ParamSegments(sizes, wd, xp=backend.xp, chunk_size=256, use_trust=trust)
    p, g, v = randn(rng, seg.total), randn(rng, seg.total) * 0.1, np.zeros(seg.total, np.float32)
    p64, v64 = p.astype(np.float64), v.astype(np.float64)
    pd, gd, vd = map(backend.to_device, (p, g, v))
    for lr in (0.5, 0.25, 2.0):
        ratios = opt.lars_trust_ratio_flat(pd, gd, seg)
        opt.momentum_update_flat(pd, gd, vd, seg, lr, 0.9, lr_in_momentum=True, lr_scale=ratios)
        for s, (a, b) in enumerate(zip(seg.offsets[:-1], seg.offsets[1:])):
            w, gs = p64[a:b], g[a:b].astype(np.float64)
            r = ref.lars_trust_ratio(w, gs, wd[s]) if trust[s] else 1.0
            v64[a:b] = 0.9 * v64[a:b] + lr * r * (gs + wd[s] * w)
            p64[a:b] -= v64[a:b]
    assert rel_err(backend.to_host(pd), p64) < 1e-5 and rel_err(backend.to_host(vd), v64) < 1e-5


def test_flat_update_unscales_gradients_and_skips_on_overflow(backend):
    rng = np.random.default_rng(9)
    seg = opt.ParamSegments([50, 70], [1e-4, 0.0], xp=backend.xp, chunk_size=32)
    p, g, v = randn(rng, 120), randn(rng, 120), randn(rng, 120)
    scale = 1024.0
    p64, v64 = p.astype(np.float64), v.astype(np.float64)
    pd, vd = backend.to_device(p.copy()), backend.to_device(v.copy())
    gd = backend.to_device((g * scale).astype(np.float32))
    inv = backend.to_device(np.array([1 / scale], np.float32))
    skip = backend.to_device(np.array([1], np.int32))
    opt.momentum_update_flat(pd, gd, vd, seg, 0.1, 0.9, grad_scale=inv, skip=skip)     # skipped: nothing moves
    np.testing.assert_array_equal(backend.to_host(pd), p)
    np.testing.assert_array_equal(backend.to_host(vd), v)
    skip = backend.to_device(np.array([0], np.int32))
    opt.momentum_update_flat(pd, gd, vd, seg, 0.1, 0.9, grad_scale=inv, skip=skip)
    for s, (a, b) in enumerate(zip(seg.offsets[:-1], seg.offsets[1:])):
        ref.sgd_momentum_update(p64[a:b], g[a:b].astype(np.float64), v64[a:b], 0.1, 0.9, [1e-4, 0.0][s])
    assert rel_err(backend.to_host(pd), p64) < 1e-5 and rel_err(backend.to_host(vd), v64) < 1e-5


def test_reference_flat_sgd_is_bit_identical_to_the_per_tensor_op():
    # the cpu device's optimizer uses the flat op: its results must not change by a bit
    rng = np.random.default_rng(10)
    sizes = [30, 1, 64, 500]
    wd = [1e-4, 0.0, 0.0, 1e-4]
    seg = opt.ParamSegments(sizes, wd)
    p, g, v = randn(rng, seg.total), randn(rng, seg.total), randn(rng, seg.total)
    pf, vf = p.copy(), v.copy()
    ref.momentum_update_flat(pf, g, vf, seg, np.array([0.05], np.float32), 0.9, nesterov=True)
    for s, (a, b) in enumerate(zip(seg.offsets[:-1], seg.offsets[1:])):
        ref.sgd_momentum_update(p[a:b], g[a:b], v[a:b], 0.05, 0.9, wd[s], True)
    np.testing.assert_array_equal(pf, p)
    np.testing.assert_array_equal(vf, v)


def test_flat_weight_decay_is_per_segment(backend):
    """With zero gradients and momentum, only tensors with weight decay move."""
    seg = opt.ParamSegments([10, 20, 30], [0.0, 0.5, 0.0], xp=backend.xp, chunk_size=7)
    p = np.ones(60, np.float32)
    pd = backend.to_device(p)
    zeros = backend.to_device(np.zeros(60, np.float32))
    opt.momentum_update_flat(pd, zeros, zeros.copy(), seg, 0.1, 0.0)
    got = backend.to_host(pd)
    np.testing.assert_allclose(got[:10], 1.0)
    np.testing.assert_allclose(got[10:30], 1.0 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(got[30:], 1.0)


@pytest.mark.parametrize("n", [1, 1000, 70001])
def test_nonfinite_flag(backend, n):
    rng = np.random.default_rng(n)
    x = randn(rng, n)
    flag = backend.to_device(np.zeros(1, np.int32))
    opt.nonfinite_flag(backend.to_device(x), flag)
    assert backend.to_host(flag)[0] == 0
    for bad in (np.inf, -np.inf, np.nan):
        y = x.copy()
        y[int(rng.integers(n))] = bad
        flag = backend.to_device(np.zeros(1, np.int32))
        opt.nonfinite_flag(backend.to_device(y), flag)
        assert backend.to_host(flag)[0] == 1, bad
    big = np.full(n, 3e38, np.float32)            # finite: a sum of squares would overflow, the flag must not
    flag = backend.to_device(np.zeros(1, np.int32))
    opt.nonfinite_flag(backend.to_device(big), flag)
    assert backend.to_host(flag)[0] == 0


def test_loss_scale_update_follows_the_reference(backend):
    # a random sequence of clean and overflowing steps, dynamic and static, against the reference
    rng = np.random.default_rng(11)
    for dynamic in (True, False):
        state = np.array([2.0 ** 15, 2.0 ** -15], np.float32)
        counts = np.zeros(3, np.int32)
        sd, cd = backend.to_device(state), backend.to_device(counts)
        for step in range(40):
            overflow = rng.random() < 0.3
            counts[0] = int(overflow)
            if overflow:
                flag = backend.to_host(cd)
                flag[0] = 1
                cd = backend.to_device(flag)
            ref.loss_scale_update(state, counts, dynamic, 2.0, 0.5, 3, 1.0)
            opt.loss_scale_update(sd, cd, dynamic, 2.0, 0.5, 3, 1.0)
            np.testing.assert_array_equal(backend.to_host(sd), state)
            np.testing.assert_array_equal(backend.to_host(cd), counts)
        assert counts[0] == 0 and counts[2] > 5
        if not dynamic:
            assert state[0] == 2.0 ** 15


def test_lars_trust_ratio_single_tensor(backend, norms_version):
    rng = np.random.default_rng(4)
    w, g = randn(rng, 5, 7, 3, 3), randn(rng, 5, 7, 3, 3) * 0.01
    got = opt.lars_trust_ratio(backend.to_device(w), backend.to_device(g), 5e-5)
    assert isinstance(got, float)
    want = ref.lars_trust_ratio(w.astype(np.float64), g.astype(np.float64), 5e-5)
    assert abs(got - want) < 1e-5 * want
    zero = np.zeros_like(w)
    assert opt.lars_trust_ratio(backend.to_device(zero), backend.to_device(g), 5e-5) == 1.0
    assert opt.lars_trust_ratio(backend.to_device(w), backend.to_device(zero), 5e-5) == 1.0


def test_global_grad_norm(backend, norms_version):
    rng = np.random.default_rng(5)
    grads = [randn(rng, 64, 3, 7, 7), randn(rng, 1), randn(rng, 2048), np.zeros((0,), np.float32), randn(rng, 5, 5)]
    got = opt.global_grad_norm([backend.to_device(a) for a in grads])
    assert isinstance(got, float)
    want = ref.global_grad_norm([a.astype(np.float64) for a in grads])
    assert abs(got - want) < 1e-5 * want
    bad = grads[2].copy()
    bad[17] = np.inf
    assert opt.global_grad_norm([backend.to_device(grads[0]), backend.to_device(bad)]) == np.inf
    bad[17] = np.nan
    assert np.isnan(opt.global_grad_norm([backend.to_device(bad)]))


def test_global_grad_norm_into_a_device_array(backend, norms_version):
    """out=: the norm stays on the device (no host read: nothing launched after it waits), equal to the
    float form; an empty list writes 0; a wrong out is refused by name."""
    rng = np.random.default_rng(6)
    grads = [backend.to_device(a) for a in (randn(rng, 64, 3, 7, 7), randn(rng, 2048), randn(rng, 5, 5))]
    out = backend.to_device(np.full(1, np.nan, np.float32))
    with trace.collect() as t:
        got = opt.global_grad_norm(grads, out=out)
    assert got is out and {"sqrt_of_sum_f32"} <= set(t.by_kernel())
    want = ref.global_grad_norm([backend.to_host(g).astype(np.float64) for g in grads])
    assert abs(float(backend.to_host(out)[0]) - want) < 1e-5 * want
    assert float(backend.to_host(out)[0]) == opt.global_grad_norm(grads)
    assert opt.global_grad_norm([], out=out) is out and float(backend.to_host(out)[0]) == 0.0
    with pytest.raises(ValueError, match="out must have shape"):
        opt.global_grad_norm(grads, out=backend.to_device(np.zeros(2, np.float32)))
    with pytest.raises(TypeError, match="out must be float32"):
        opt.global_grad_norm(grads, out=backend.to_device(np.zeros(1, np.float64)))
    # the reference does the same on the CPU
    ref_out = np.zeros(1, np.float32)
    assert ref.global_grad_norm([backend.to_host(g) for g in grads], out=ref_out) is ref_out
    assert abs(float(ref_out[0]) - want) < 1e-6 * want


def test_version_3_norms_load_vectors_and_fall_back_off_alignment(backend):
    """Version 3 launches the float4 kernels; chunks starting and ending off a multiple of 4 floats
    (tensors of 1, 33, 315 floats) add their odd floats one per thread; a buffer one float into its
    allocation runs the scalar kernels; both give the reference's numbers.  A 100,003-float gradient
    runs on more than one block with a tail of 3."""
    rng = np.random.default_rng(8)
    sizes = [64, 1, 3 * 3 * 7 * 5, 2000, 33]
    seg, wd, p, g, _ = make_flat(rng, backend, sizes, chunk_size=500)
    want = [ref.lars_trust_ratio(w.astype(np.float64), gr.astype(np.float64), d)
            for w, gr, d in zip(seg.split(p), seg.split(g), wd)]
    big = randn(rng, 100_003)
    with versions.use(optimizer=3):
        for offset, kernels_ran in ((0, {"chunk_sum_squares_vec_f32", "sum_squares_vec_f32"}),
                                    (1, {"chunk_sum_squares_f32", "sum_squares_blocks_f32"})):
            pd, gd, bd = (backend.to_device(np.concatenate([np.zeros(offset, np.float32), a]))[offset:]
                          for a in (p, g, big))
            with trace.collect() as t:
                ratios = opt.lars_trust_ratio_flat(pd, gd, seg)
                norm = opt.global_grad_norm([bd, gd])
            assert kernels_ran <= set(t.by_kernel()), (offset, set(t.by_kernel()))
            assert rel_err(backend.to_host(ratios), want) < 1e-5
            want_norm = ref.global_grad_norm([big.astype(np.float64), g.astype(np.float64)])
            assert abs(norm - want_norm) < 1e-5 * want_norm
            assert ratios.shape == (len(sizes),)


def test_param_segments_split_views_the_buffer():
    seg = opt.ParamSegments([6, 4], 0.0)
    flat = np.arange(10, dtype=np.float32)
    a, b = seg.split(flat, [(2, 3), (4,)])
    assert a.shape == (2, 3) and np.shares_memory(a, flat)
    np.testing.assert_array_equal(b, [6, 7, 8, 9])


def test_bad_inputs_raise_clear_errors():
    p = np.zeros(8, np.float32)
    with pytest.raises(TypeError, match="grad must be float32"):
        opt.sgd_momentum_update(p, p.astype(np.float64), p.copy(), 0.1)
    with pytest.raises(ValueError, match="momentum_buf must have shape"):
        opt.sgd_momentum_update(p, p.copy(), np.zeros(7, np.float32), 0.1)
    with pytest.raises(ValueError, match="three different arrays"):
        opt.sgd_momentum_update(p, p.copy(), p, 0.1)
    with pytest.raises(ValueError, match="lr must be finite"):
        opt.sgd_momentum_update(p, p.copy(), p.copy(), float("nan"))
    seg = opt.ParamSegments([3, 5], [0.0, 1e-4])
    with pytest.raises(ValueError, match=r"params_flat must have shape \(8\)"):
        opt.momentum_update_flat(np.zeros(9, np.float32), np.zeros(9, np.float32), np.zeros(9, np.float32),
                                 seg, 0.1, 0.9)
    with pytest.raises(ValueError, match="lr_scale must have shape"):
        opt.momentum_update_flat(p, p.copy(), p.copy(), seg, 0.1, 0.9, lr_scale=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="lr must have shape"):
        opt.momentum_update_flat(p, p.copy(), p.copy(), seg, np.ones(2, np.float32), 0.9)
    with pytest.raises(ValueError, match="nesterov"):
        opt.momentum_update_flat(p, p.copy(), p.copy(), seg, 0.1, 0.9, nesterov=True, lr_in_momentum=True)
    with pytest.raises(TypeError, match="segments must be a ParamSegments"):
        opt.lars_trust_ratio_flat(p, p.copy(), [3, 5])
    with pytest.raises(ValueError, match="one number or one per tensor"):
        opt.ParamSegments([3, 5], [0.0])
    with pytest.raises(TypeError, match=r"list_of_grads\[1\] must be float32"):
        opt.global_grad_norm([p, p.astype(np.float16)])
