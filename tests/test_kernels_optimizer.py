"""Optimizer kernels (kernels/optimizer.cu): fused SGD (per tensor and flat multi-tensor), LARS trust
ratios and the global gradient norm, against the NumPy reference in float64.
Emulator always, GPU when present."""

import numpy as np
import pytest

from kernels import optimizer as opt
from kernels import reference as ref


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
def test_flat_update_and_lars_match_per_tensor_reference(backend, nesterov, use_lars):
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
    opt.sgd_momentum_update_flat(pd, gd, vd, 0.1, 0.9, seg, nesterov=nesterov, lr_scale=ratios)
    for i, (pw, gw, vw) in enumerate(zip(seg.split(p64), seg.split(g64), seg.split(v64))):
        lr = 0.1 * (want_ratios[i] if use_lars else 1.0)
        ref.sgd_momentum_update(pw, gw, vw, lr, 0.9, wd[i], nesterov)
    assert rel_err(backend.to_host(pd), p64) < 1e-5
    assert rel_err(backend.to_host(vd), v64) < 1e-5


def test_flat_weight_decay_is_per_segment(backend):
    """With zero gradients and momentum, only tensors with weight decay move."""
    seg = opt.ParamSegments([10, 20, 30], [0.0, 0.5, 0.0], xp=backend.xp, chunk_size=7)
    p = np.ones(60, np.float32)
    pd = backend.to_device(p)
    zeros = backend.to_device(np.zeros(60, np.float32))
    opt.sgd_momentum_update_flat(pd, zeros, zeros.copy(), 0.1, 0.0, seg)
    got = backend.to_host(pd)
    np.testing.assert_allclose(got[:10], 1.0)
    np.testing.assert_allclose(got[10:30], 1.0 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(got[30:], 1.0)


def test_lars_trust_ratio_single_tensor(backend):
    rng = np.random.default_rng(4)
    w, g = randn(rng, 5, 7, 3, 3), randn(rng, 5, 7, 3, 3) * 0.01
    got = opt.lars_trust_ratio(backend.to_device(w), backend.to_device(g), 5e-5)
    assert isinstance(got, float)
    want = ref.lars_trust_ratio(w.astype(np.float64), g.astype(np.float64), 5e-5)
    assert abs(got - want) < 1e-5 * want
    zero = np.zeros_like(w)
    assert opt.lars_trust_ratio(backend.to_device(zero), backend.to_device(g), 5e-5) == 1.0
    assert opt.lars_trust_ratio(backend.to_device(w), backend.to_device(zero), 5e-5) == 1.0


def test_global_grad_norm(backend):
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
        opt.sgd_momentum_update_flat(np.zeros(9, np.float32), np.zeros(9, np.float32), np.zeros(9, np.float32),
                                     0.1, 0.9, seg)
    with pytest.raises(ValueError, match="lr_scale must have shape"):
        opt.sgd_momentum_update_flat(p, p.copy(), p.copy(), 0.1, 0.9, seg, lr_scale=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="segments must be a ParamSegments"):
        opt.lars_trust_ratio_flat(p, p.copy(), [3, 5])
    with pytest.raises(ValueError, match="one number or one per tensor"):
        opt.ParamSegments([3, 5], [0.0])
    with pytest.raises(TypeError, match=r"list_of_grads\[1\] must be float32"):
        opt.global_grad_norm([p, p.astype(np.float16)])
