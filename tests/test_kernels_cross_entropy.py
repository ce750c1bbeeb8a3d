"""Softmax cross-entropy and top-k kernels (kernels/cross_entropy.cu) against the NumPy reference
in float64 and central finite differences.  Emulator always, GPU when present."""

import numpy as np
import pytest

from kernels import cross_entropy as ce
from kernels import reference as ref

SHAPES = [(1, 1), (1, 1000), (7, 37), (19, 1000), (4, 33)]


def rel_err(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def make(N, K, rng, scale=3.0):
    logits = (rng.standard_normal((N, K)) * scale).astype(np.float32)
    labels = rng.integers(0, K, N).astype(np.int32)
    return logits, labels


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("N,K", SHAPES)
def test_forward_and_backward_match_reference(backend, N, K, smoothing, version):
    rng = np.random.default_rng(N * 1000 + K)
    logits, labels = make(N, K, rng)
    loss, probs = ce.softmax_cross_entropy_forward(backend.to_device(logits), backend.to_device(labels),
                                                   smoothing, version=version)
    loss_ref, probs_ref = ref.softmax_cross_entropy_forward(logits.astype(np.float64), labels, smoothing)
    h = backend.to_host
    assert loss.shape == () and loss.dtype == np.float32
    assert probs.shape == (N, K) and probs.dtype == np.float32
    # a loss of exactly 0 (K = 1, no smoothing) is compared absolutely
    assert abs(float(h(loss)) - float(loss_ref)) <= 1e-5 * max(abs(float(loss_ref)), 1e-2)
    assert rel_err(h(probs), probs_ref) < 1e-5
    dlogits = ce.softmax_cross_entropy_backward(probs, backend.to_device(labels), smoothing, grad_scale=3.0)
    want = ref.softmax_cross_entropy_backward(probs_ref, labels, smoothing, grad_scale=3.0)
    if np.max(np.abs(want)) == 0:   # K = 1 without smoothing: the gradient is exactly 0
        assert np.max(np.abs(h(dlogits))) < 1e-6
    else:
        assert rel_err(h(dlogits), want) < 1e-5


def test_large_logits_do_not_overflow(backend):
    """max-subtraction: logits around 1e4 (exp would overflow float32) give the same loss."""
    rng = np.random.default_rng(1)
    logits, labels = make(5, 100, rng)
    shifted = logits + np.float32(1e4)
    loss, probs = ce.softmax_cross_entropy_forward(backend.to_device(shifted), backend.to_device(labels))
    loss_ref, probs_ref = ref.softmax_cross_entropy_forward(shifted.astype(np.float64), labels)
    assert np.isfinite(float(backend.to_host(loss)))
    assert abs(float(backend.to_host(loss)) - float(loss_ref)) < 1e-5 * abs(float(loss_ref))
    assert rel_err(backend.to_host(probs), probs_ref) < 1e-5


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_backward_matches_finite_differences(smoothing):
    """Our backward (float32) against central differences of the float64 reference loss."""
    rng = np.random.default_rng(2)
    logits, labels = make(3, 7, rng)
    z = logits.astype(np.float64)
    numeric = np.zeros_like(z)
    h = 1e-6
    for i in np.ndindex(z.shape):
        old = z[i]
        z[i] = old + h
        up = float(ref.softmax_cross_entropy_forward(z, labels, smoothing)[0])
        z[i] = old - h
        down = float(ref.softmax_cross_entropy_forward(z, labels, smoothing)[0])
        z[i] = old
        numeric[i] = (up - down) / (2 * h)
    _, probs = ce.softmax_cross_entropy_forward(logits, labels, smoothing)
    assert rel_err(ce.softmax_cross_entropy_backward(probs, labels, smoothing), numeric) < 1e-5


def test_backward_takes_the_gradient_scale_from_a_device_array(backend):
    # the loss scaler keeps its scale on the device: the same gradient as the scale as a number
    rng = np.random.default_rng(6)
    logits, labels = make(9, 37, rng)
    _, probs = ce.softmax_cross_entropy_forward(backend.to_device(logits), backend.to_device(labels), 0.1)
    scale = 2.0 ** 13
    as_number = ce.softmax_cross_entropy_backward(probs, backend.to_device(labels), 0.1, grad_scale=scale)
    for shape in ((1,), ()):
        dev = backend.to_device(np.full(shape, scale, np.float32))
        as_array = ce.softmax_cross_entropy_backward(probs, backend.to_device(labels), 0.1, grad_scale=dev)
        np.testing.assert_array_equal(backend.to_host(as_array), backend.to_host(as_number))
    _, probs_ref = ref.softmax_cross_entropy_forward(logits.astype(np.float64), labels, 0.1)
    want = ref.softmax_cross_entropy_backward(probs_ref, labels, 0.1, grad_scale=scale)
    assert rel_err(backend.to_host(as_number), want) < 1e-5
    np.testing.assert_allclose(ref.softmax_cross_entropy_backward(probs_ref, labels, 0.1,
                                                                  grad_scale=np.array([scale])), want, rtol=1e-12)


def test_accumulate_loss_counts_finite_and_nonfinite_steps(backend):
    values = [2.5, np.nan, 1.25, np.inf, 0.5, -np.inf, 3.0]
    totals = backend.to_device(np.zeros(3, np.float64))
    want = np.zeros(3)
    for v in values:
        loss = np.array(v, np.float32)
        ce.accumulate_loss(backend.to_device(loss), totals)
        ref.accumulate_loss(loss, want)
    np.testing.assert_array_equal(backend.to_host(totals), want)
    np.testing.assert_array_equal(want, [7.25, 4, 3])


@pytest.mark.parametrize("N,K", [(1, 1), (9, 10), (40, 1000), (13, 33)])
def test_topk_correct_matches_reference_with_ties(backend, N, K):
    rng = np.random.default_rng(K)
    # small integers: many ties, which must go to the lower class index
    logits = rng.integers(0, 4, (N, K)).astype(np.float32)
    labels = rng.integers(0, K, N).astype(np.int32)
    ks = (1, 5, K, K + 3)
    got = ce.topk_correct(backend.to_device(logits), backend.to_device(labels), ks)
    assert got.dtype == np.int64 and got.shape == (5,)
    np.testing.assert_array_equal(backend.to_host(got), ref.topk_correct(logits, labels, ks))
    # distinct values: no ties
    logits = rng.standard_normal((N, K)).astype(np.float32)
    got = ce.topk_correct(backend.to_device(logits), backend.to_device(labels), (1, 5))
    np.testing.assert_array_equal(backend.to_host(got), ref.topk_correct(logits, labels, (1, 5)))


def test_topk_counts_a_known_case(backend):
    logits = np.array([[0.1, 0.9, 0.0, 0.5, 0.2, 0.3, 0.4],     # label 1: rank 0
                       [0.1, 0.9, 0.0, 0.5, 0.2, 0.3, 0.4],     # label 4: rank 4 (0.9 .5 .4 .3 above)
                       [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]],    # label 6: ties, rank 6
                      dtype=np.float32)
    labels = np.array([1, 4, 6], dtype=np.int32)
    got = ce.topk_correct(backend.to_device(logits), backend.to_device(labels), (1, 5, 6, 7))
    np.testing.assert_array_equal(backend.to_host(got), [1, 2, 2, 3, 0])


@pytest.mark.parametrize("N,K", [(8, 10), (37, 1000)])
def test_rows_with_nan_or_inf_logits_are_never_correct(backend, N, K):
    # A diverged model: all-NaN rows, rows with one NaN or one inf (even at the label, where inf
    # would otherwise rank first), next to healthy rows. Only the healthy rows may count, and the
    # last count says how many rows were not finite.
    rng = np.random.default_rng(N)
    logits = rng.standard_normal((N, K)).astype(np.float32)
    labels = rng.integers(0, K, N).astype(np.int32)
    logits[0] = np.nan
    logits[1, (labels[1] + 1) % K] = np.nan
    logits[2, labels[2]] = np.inf
    logits[3, labels[3]] = -np.inf
    logits[4, :] = np.inf
    ks = (1, 5, K)
    want = ref.topk_correct(logits, labels, ks)
    healthy = np.arange(5, N)
    np.testing.assert_array_equal(want[:-1], ref.topk_correct(logits[healthy], labels[healthy], ks)[:-1])
    assert want[-1] == 5 and want[2] == N - 5    # k = K counts every healthy row, no broken one
    got = ce.topk_correct(backend.to_device(logits), backend.to_device(labels), ks)
    np.testing.assert_array_equal(backend.to_host(got), want)


def test_bad_inputs_raise_clear_errors():
    logits, labels = make(4, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        ce.softmax_cross_entropy_forward(logits, np.array([0, 1, 10, 2], np.int32))
    with pytest.raises(ValueError, match=r"labels must lie"):
        ce.topk_correct(logits, np.array([0, -1, 1, 2], np.int32))
    with pytest.raises(TypeError, match="labels must be int32"):
        ce.softmax_cross_entropy_forward(logits, labels.astype(np.int64))
    with pytest.raises(TypeError, match="logits must be float32"):
        ce.softmax_cross_entropy_forward(logits.astype(np.float64), labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        ce.softmax_cross_entropy_forward(logits, labels[:3])
    with pytest.raises(ValueError, match="label_smoothing"):
        ce.softmax_cross_entropy_forward(logits, labels, label_smoothing=1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        ce.softmax_cross_entropy_forward(np.asfortranarray(logits), labels)
    with pytest.raises(ValueError, match="ks must be"):
        ce.topk_correct(logits, labels, ks=(0,))
    with pytest.raises(ValueError, match="grad_scale"):
        ce.softmax_cross_entropy_backward(logits, labels, grad_scale=float("inf"))
