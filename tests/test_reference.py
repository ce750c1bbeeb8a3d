"""kernels/reference.py against independent naive implementations (explicit loops, float64, tiny
shapes) and its backward ops against central finite differences of its forward ops."""

import itertools

import numpy as np
import pytest

from kernels import reference as ref


def rng(seed=0):
    return np.random.default_rng(seed)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


def numerical_grad(f, x, h=1e-5):
    """Central differences of the scalar function f() with respect to every element of x (in place)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


# ---------------------------------------------------------------------------------------------
# naive implementations (loops, written from the definitions, sharing no code with reference.py)


def naive_conv(x, w, stride, padding):
    N, H, W, C = x.shape
    K, _, R, S = w.shape
    P = (H + 2 * padding - R) // stride + 1
    Q = (W + 2 * padding - S) // stride + 1
    y = np.zeros((N, P, Q, K))
    for n, p, q, k in itertools.product(range(N), range(P), range(Q), range(K)):
        acc = 0.0
        for c, r, s in itertools.product(range(C), range(R), range(S)):
            h, ww = p * stride + r - padding, q * stride + s - padding
            if 0 <= h < H and 0 <= ww < W:
                acc += x[n, h, ww, c] * w[k, c, r, s]
        y[n, p, q, k] = acc
    return y


def naive_maxpool(x, k, stride, padding):
    N, H, W, C = x.shape
    P = (H + 2 * padding - k) // stride + 1
    Q = (W + 2 * padding - k) // stride + 1
    y = np.zeros((N, P, Q, C))
    arg = np.zeros((N, P, Q, C), dtype=np.int64)
    for n, p, q, c in itertools.product(range(N), range(P), range(Q), range(C)):
        best, best_idx = -np.inf, -1
        for i, j in itertools.product(range(k), range(k)):
            h, ww = p * stride + i - padding, q * stride + j - padding
            if 0 <= h < H and 0 <= ww < W and x[n, h, ww, c] > best:
                best, best_idx = x[n, h, ww, c], h * W + ww
        y[n, p, q, c], arg[n, p, q, c] = best, best_idx
    return y, arg


def naive_bn_train(x, gamma, beta, eps):
    rows = x.reshape(-1, x.shape[-1])
    y = np.zeros_like(rows)
    means, vars_ = [], []
    for c in range(rows.shape[1]):
        col = rows[:, c]
        m = sum(col) / len(col)
        v = sum((col - m) ** 2) / len(col)
        y[:, c] = (col - m) / np.sqrt(v + eps) * gamma[c] + beta[c]
        means.append(m)
        vars_.append(v)
    return y.reshape(x.shape), np.array(means), np.array(vars_)


def naive_cross_entropy(logits, labels, eps):
    N, K = logits.shape
    total = 0.0
    for n in range(N):
        logsum = np.log(sum(np.exp(v) for v in logits[n]))
        for k in range(K):
            t = (1 - eps) * (k == labels[n]) + eps / K
            total -= t * (logits[n, k] - logsum)
    return total / N


# ---------------------------------------------------------------------------------------------
# convolution

CONV_CASES = [  # (N, H, W, C, K, R, stride, padding)
    (2, 5, 5, 3, 4, 3, 1, 1),
    (1, 7, 6, 2, 3, 3, 2, 1),
    (2, 9, 9, 3, 2, 7, 2, 3),
    (2, 4, 4, 3, 5, 1, 1, 0),
    (1, 5, 5, 4, 3, 1, 2, 0),
    (1, 4, 5, 2, 2, 2, 1, 0),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_matches_direct_loops(case):
    N, H, W, C, K, R, stride, padding = case
    r = rng(1)
    x = r.standard_normal((N, H, W, C))
    w = r.standard_normal((K, C, R, R))
    y = ref.conv2d_forward(x, w, stride, padding)
    assert y.shape == naive_conv(x, w, stride, padding).shape
    assert rel_err(y, naive_conv(x, w, stride, padding)) < 1e-12


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_backward_matches_finite_differences(case):
    N, H, W, C, K, R, stride, padding = case
    r = rng(2)
    x = r.standard_normal((N, H, W, C))
    w = r.standard_normal((K, C, R, R))
    y_shape = ref.conv2d_forward(x, w, stride, padding).shape
    dy = r.standard_normal(y_shape)
    loss = lambda: float(np.sum(ref.conv2d_forward(x, w, stride, padding) * dy))
    dx = ref.conv2d_backward_data(dy, w, x.shape, stride, padding)
    dw = ref.conv2d_backward_weight(x, dy, w.shape, stride, padding)
    assert dx.shape == x.shape and dw.shape == w.shape
    assert rel_err(dx, numerical_grad(loss, x)) < 1e-8
    assert rel_err(dw, numerical_grad(loss, w)) < 1e-8


def test_conv2d_float32_and_errors():
    r = rng(3)
    x = r.standard_normal((1, 6, 6, 3)).astype(np.float32)
    w = r.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = ref.conv2d_forward(x, w, 2, 1)
    assert y.dtype == np.float32
    assert rel_err(y, naive_conv(x.astype(np.float64), w.astype(np.float64), 2, 1)) < 1e-5
    with pytest.raises(ValueError, match="channels"):
        ref.conv2d_forward(x, w[:, :2], 1, 1)
    with pytest.raises(ValueError, match="x must be a 4-d"):
        ref.conv2d_forward(x[0], w, 1, 1)


# ---------------------------------------------------------------------------------------------
# linear


def test_linear_forward_and_backward():
    r = rng(4)
    x, w, b = r.standard_normal((3, 5)), r.standard_normal((4, 5)), r.standard_normal(4)
    y = ref.linear_forward(x, w, b)
    expect = np.array([[sum(x[n, i] * w[o, i] for i in range(5)) + b[o] for o in range(4)] for n in range(3)])
    assert rel_err(y, expect) < 1e-12
    assert rel_err(ref.linear_forward(x, w, None), expect - b) < 1e-12
    dy = r.standard_normal((3, 4))
    dx, dw, db = ref.linear_backward(dy, x, w)
    loss = lambda: float(np.sum(ref.linear_forward(x, w, b) * dy))
    assert rel_err(dx, numerical_grad(loss, x)) < 1e-8
    assert rel_err(dw, numerical_grad(loss, w)) < 1e-8
    assert rel_err(db, numerical_grad(loss, b)) < 1e-8
    assert ref.linear_backward(dy, x, w, need_bias_grad=False)[2] is None


# ---------------------------------------------------------------------------------------------
# batch norm


@pytest.mark.parametrize("shape", [(2, 3, 3, 4), (6, 3)])
def test_batchnorm_train_forward_and_running_stats(shape):
    r = rng(5)
    x = r.standard_normal(shape) * 2 + 1
    C = shape[-1]
    gamma, beta = r.standard_normal(C), r.standard_normal(C)
    rm, rv = r.standard_normal(C), r.random(C) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = ref.batchnorm_forward_train(x, gamma, beta, rm, rv, eps=1e-5, momentum=0.1)
    y_exp, m_exp, v_exp = naive_bn_train(x, gamma, beta, 1e-5)
    M = x.size // C
    assert rel_err(y, y_exp) < 1e-12
    assert rel_err(mean, m_exp) < 1e-12
    assert rel_err(invstd, 1 / np.sqrt(v_exp + 1e-5)) < 1e-12
    assert rel_err(rm, 0.9 * rm0 + 0.1 * m_exp) < 1e-12
    assert rel_err(rv, 0.9 * rv0 + 0.1 * v_exp * M / (M - 1)) < 1e-12
    y_inf = ref.batchnorm_forward_inference(x, gamma, beta, rm, rv, eps=1e-5)
    assert rel_err(y_inf, (x - rm) / np.sqrt(rv + 1e-5) * gamma + beta) < 1e-12


def _bn_inputs(shape, seed):
    r = rng(seed)
    C = shape[-1]
    return (r.standard_normal(shape), r.standard_normal(C), r.standard_normal(C),
            np.zeros(C), np.ones(C), r.standard_normal(shape))


@pytest.mark.parametrize("shape", [(2, 3, 3, 3), (5, 4)])
def test_batchnorm_backward_matches_finite_differences(shape):
    x, gamma, beta, rm, rv, dy = _bn_inputs(shape, 6)
    loss = lambda: float(np.sum(ref.batchnorm_forward_train(x, gamma, beta, rm, rv)[0] * dy))
    _, mean, invstd = ref.batchnorm_forward_train(x, gamma, beta, rm, rv)
    dx, dgamma, dbeta = ref.batchnorm_backward(dy, x, gamma, mean, invstd)
    assert rel_err(dx, numerical_grad(loss, x)) < 1e-7
    assert rel_err(dgamma, numerical_grad(loss, gamma)) < 1e-8
    assert rel_err(dbeta, numerical_grad(loss, beta)) < 1e-8


def test_batchnorm_relu_fused_matches_composition_and_finite_differences():
    x, gamma, beta, rm, rv, dy = _bn_inputs((2, 3, 3, 3), 7)
    y, mean, invstd = ref.batchnorm_relu_forward_train(x, gamma, beta, rm, rv)
    y_bn, _, _ = ref.batchnorm_forward_train(x, gamma, beta, rm.copy(), rv.copy())
    assert rel_err(y, np.maximum(y_bn, 0)) < 1e-14
    loss = lambda: float(np.sum(ref.batchnorm_relu_forward_train(x, gamma, beta, rm, rv)[0] * dy))
    dx, dgamma, dbeta = ref.batchnorm_relu_backward(dy, y, x, gamma, mean, invstd)
    assert rel_err(dx, numerical_grad(loss, x)) < 1e-7
    assert rel_err(dgamma, numerical_grad(loss, gamma)) < 1e-8
    assert rel_err(dbeta, numerical_grad(loss, beta)) < 1e-8


def test_batchnorm_add_relu_fused_matches_composition_and_finite_differences():
    x, gamma, beta, rm, rv, dy = _bn_inputs((2, 3, 3, 3), 8)
    res = rng(9).standard_normal(x.shape)
    y, mean, invstd = ref.batchnorm_add_relu_forward_train(x, res, gamma, beta, rm, rv)
    y_bn, _, _ = ref.batchnorm_forward_train(x, gamma, beta, rm.copy(), rv.copy())
    assert rel_err(y, np.maximum(y_bn + res, 0)) < 1e-14
    loss = lambda: float(np.sum(ref.batchnorm_add_relu_forward_train(x, res, gamma, beta, rm, rv)[0] * dy))
    dx, dres, dgamma, dbeta = ref.batchnorm_add_relu_backward(dy, y, x, gamma, mean, invstd)
    assert rel_err(dx, numerical_grad(loss, x)) < 1e-7
    assert rel_err(dres, numerical_grad(loss, res)) < 1e-8
    assert rel_err(dgamma, numerical_grad(loss, gamma)) < 1e-8
    assert rel_err(dbeta, numerical_grad(loss, beta)) < 1e-8


def test_batchnorm_errors():
    x, gamma, beta, rm, rv, _ = _bn_inputs((2, 3, 3, 3), 10)
    with pytest.raises(ValueError, match="gamma"):
        ref.batchnorm_forward_train(x, gamma[:2], beta, rm, rv)
    with pytest.raises(ValueError, match="more than one value"):
        ref.batchnorm_forward_train(x[:1, :1, :1], gamma, beta, rm, rv)


# ---------------------------------------------------------------------------------------------
# elementwise and pooling


def test_relu_add():
    r = rng(11)
    a, b, dy = r.standard_normal((3, 4)), r.standard_normal((3, 4)), r.standard_normal((3, 4))
    y = ref.relu_forward(a)
    assert np.array_equal(y, np.where(a > 0, a, 0))
    assert np.array_equal(ref.relu_backward(dy, y), np.where(a > 0, dy, 0))
    assert np.array_equal(ref.add(a, b), a + b)
    assert np.array_equal(ref.add_relu_forward(a, b), np.where(a + b > 0, a + b, 0))
    with pytest.raises(ValueError, match="shape"):
        ref.add(a, b[:2])


@pytest.mark.parametrize("shape,k,stride,padding", [((2, 7, 7, 3), 3, 2, 1), ((1, 6, 5, 2), 3, 2, 1),
                                                    ((1, 4, 4, 2), 2, 2, 0), ((1, 5, 5, 1), 3, 1, 1)])
def test_maxpool_matches_loops_and_finite_differences(shape, k, stride, padding):
    r = rng(12)
    x = r.standard_normal(shape)
    y, arg = ref.maxpool2d_forward(x, k, stride, padding)
    y_exp, arg_exp = naive_maxpool(x, k, stride, padding)
    assert np.array_equal(y, y_exp)
    assert arg.dtype == np.int32 and np.array_equal(arg, arg_exp)
    dy = r.standard_normal(y.shape)
    loss = lambda: float(np.sum(ref.maxpool2d_forward(x, k, stride, padding)[0] * dy))
    dx = ref.maxpool2d_backward(dy, arg, x.shape, k, stride, padding)
    assert rel_err(dx, numerical_grad(loss, x)) < 1e-8


def test_maxpool_ties_go_to_first_tap():
    x = np.zeros((1, 4, 4, 1))
    y, arg = ref.maxpool2d_forward(x, 3, 2, 1)
    # window of output (0, 0) covers input rows/cols -1..1: the first real pixel is (0, 0)
    assert arg[0, 0, 0, 0] == 0 and arg[0, 1, 1, 0] == 1 * 4 + 1
    assert np.array_equal(y, np.zeros((1, 2, 2, 1)))


def test_global_avgpool():
    r = rng(13)
    x = r.standard_normal((2, 3, 4, 5))
    y = ref.global_avgpool_forward(x)
    assert rel_err(y, [[sum(x[n, h, w, c] for h in range(3) for w in range(4)) / 12 for c in range(5)]
                       for n in range(2)]) < 1e-12
    dy = r.standard_normal((2, 5))
    loss = lambda: float(np.sum(ref.global_avgpool_forward(x) * dy))
    assert rel_err(ref.global_avgpool_backward(dy, x.shape), numerical_grad(loss, x)) < 1e-8


# ---------------------------------------------------------------------------------------------
# loss, metrics


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_loops_and_finite_differences(smoothing):
    r = rng(14)
    logits = r.standard_normal((4, 6)) * 3
    labels = np.array([0, 5, 2, 2], dtype=np.int32)
    loss, probs = ref.softmax_cross_entropy_forward(logits, labels, smoothing)
    assert loss.shape == () and loss.dtype == np.float64
    assert abs(float(loss) - naive_cross_entropy(logits, labels, smoothing)) < 1e-12
    assert rel_err(probs.sum(axis=1), np.ones(4)) < 1e-14
    f = lambda: float(ref.softmax_cross_entropy_forward(logits, labels, smoothing)[0])
    d = ref.softmax_cross_entropy_backward(probs, labels, smoothing, grad_scale=1.0)
    assert rel_err(d, numerical_grad(f, logits)) < 1e-8
    d128 = ref.softmax_cross_entropy_backward(probs, labels, smoothing, grad_scale=128.0)
    assert rel_err(d128, 128 * d) < 1e-14


def test_cross_entropy_is_stable_and_checks_labels():
    logits = np.array([[1000.0, 0.0], [0.0, -1000.0]], dtype=np.float32)
    loss, probs = ref.softmax_cross_entropy_forward(logits, np.array([0, 0]))
    assert np.isfinite(loss) and abs(float(loss)) < 1e-6 and loss.dtype == np.float32
    with pytest.raises(ValueError, match="labels must lie"):
        ref.softmax_cross_entropy_forward(logits, np.array([0, 2]))
    with pytest.raises(TypeError, match="integer"):
        ref.softmax_cross_entropy_forward(logits, np.array([0.0, 1.0]))


def test_topk_correct_with_ties():
    logits = np.array([[0.1, 0.9, 0.5, 0.0],
                       [1.0, 1.0, 1.0, 1.0],     # all tied: label 2 has rank 2
                       [0.0, 0.0, 3.0, 0.0]])
    labels = np.array([2, 2, 0])
    # row 0: rank 1; row 1: rank 2; row 2: label 0 ties with 1 and 3 but is the lowest index: rank 1
    assert np.array_equal(ref.topk_correct(logits, labels, ks=(1, 2, 3)), [0, 2, 3, 0])
    r = rng(15)
    big = r.standard_normal((50, 10))
    lab = r.integers(0, 10, 50)
    order = np.argsort(-big, axis=1, kind="stable")
    expect = [sum(lab[n] in order[n, :k] for n in range(50)) for k in (1, 5)]
    assert np.array_equal(ref.topk_correct(big, lab), expect + [0])
    big[7, lab[7]] = np.nan     # a NaN row is never correct, and counted apart
    assert np.array_equal(ref.topk_correct(big, lab), [e - (lab[7] in order[7, :k]) for e, k in zip(expect, (1, 5))]
                          + [1])


# ---------------------------------------------------------------------------------------------
# optimiser arithmetic


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_update_by_hand(nesterov):
    p = np.array([1.0, -2.0])
    v = np.array([0.5, 0.0])
    g = np.array([0.1, 0.2])
    ref.sgd_momentum_update(p, g, v, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    g_eff = np.array([0.1 + 0.01, 0.2 - 0.02])
    v_exp = 0.9 * np.array([0.5, 0.0]) + g_eff
    step = g_eff + 0.9 * v_exp if nesterov else v_exp
    assert rel_err(v, v_exp) < 1e-15
    assert rel_err(p, np.array([1.0, -2.0]) - 0.1 * step) < 1e-15


def test_lars_trust_ratio_and_grad_norm():
    w, g = np.array([3.0, 4.0]), np.array([0.0, 0.5])
    assert abs(ref.lars_trust_ratio(w, g, weight_decay=0.1, eta=0.01, eps=0.0) - 0.01 * 5 / (0.5 + 0.5)) < 1e-15
    assert ref.lars_trust_ratio(np.zeros(2), g, 0.1) == 1.0
    assert ref.lars_trust_ratio(w, np.zeros(2), 0.1) == 1.0
    assert abs(ref.global_grad_norm([np.array([3.0]), np.array([[4.0, 12.0]])]) - 13.0) < 1e-12
    assert not np.isfinite(ref.global_grad_norm([np.array([np.inf], np.float32)]))


def test_input_normalize_and_cast():
    img = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    x = ref.input_normalize(img)
    assert x.dtype == np.float32 and x.shape == img.shape
    assert np.allclose(x[1, 1, 1], img[1, 1, 1] - np.array([123.68, 116.78, 103.94]), atol=1e-4)
    x2 = ref.input_normalize(img, mean=(1, 2, 3), std=(2, 4, 8), dtype=np.float64)
    assert x2.dtype == np.float64 and np.allclose(x2[0, 0, 1], (np.array([3, 4, 5]) - [1, 2, 3]) / [2, 4, 8])
    with pytest.raises(TypeError, match="uint8"):
        ref.input_normalize(img.astype(np.float32))
    h = ref.cast(x, np.float16)
    assert h.dtype == np.float16 and h is not x
