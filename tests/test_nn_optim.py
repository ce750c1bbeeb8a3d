"""Optimisers, schedules, loss scaling, checkpoints and metrics against hand-computed values."""

import os

import numpy as np
import pytest

import nn
from nn import functional as F


def make_params():
    w = nn.Parameter(np.array([[1.0, -2.0], [0.5, 3.0]], dtype=np.float32))
    b = nn.Parameter(np.array([0.2, -0.1], dtype=np.float32))
    return w, b


GW = [np.array([[0.1, 0.2], [-0.3, 0.4]], np.float32), np.array([[0.0, -0.1], [0.2, 0.1]], np.float32)]
GB = [np.array([0.5, -0.5], np.float32), np.array([0.1, 0.3], np.float32)]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_two_steps_by_hand(nesterov):
    w, b = make_params()
    w0, b0 = w.data.astype(np.float64), b.data.astype(np.float64)
    opt = nn.optim.SGD([("w", w), ("b", b)], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    vw, vb = np.zeros((2, 2)), np.zeros(2)
    for gw, gb in zip(GW, GB):
        w.grad, b.grad = gw.copy(), gb.copy()
        opt.step()
        g = gw + 0.01 * w0                      # weight decay on the weight ...
        vw = 0.9 * vw + g
        w0 = w0 - 0.1 * (g + 0.9 * vw if nesterov else vw)
        vb = 0.9 * vb + gb                      # ... but not on the bias (1-d)
        b0 = b0 - 0.1 * (gb + 0.9 * vb if nesterov else vb)
    assert np.allclose(w.data, w0, rtol=1e-6, atol=1e-7)
    assert np.allclose(b.data, b0, rtol=1e-6, atol=1e-7)
    assert opt.step_count == 2


def test_sgd_weight_decay_exclusion_is_configurable_and_zero_grad():
    w, b = make_params()
    opt = nn.optim.SGD([w, b], lr=1.0, momentum=0.0, weight_decay=0.5, exclude_bn_and_bias=False)
    b_before = b.data.copy()
    w.grad, b.grad = np.zeros_like(w.data), np.zeros_like(b.data)
    opt.step()
    assert np.allclose(b.data, 0.5 * b_before)          # decayed: w -= 1.0 * 0.5 * w
    w.grad[...] = 3.0
    opt.zero_grad()                                      # zeroed in place, one memset of the flat buffer
    assert np.array_equal(w.grad, np.zeros((2, 2))) and np.array_equal(b.grad, np.zeros(2))
    assert np.shares_memory(w.grad, opt.flat.groups[0].grad) and np.shares_memory(b.grad, opt.flat.groups[0].grad)
    opt.step()                                           # zero gradients: weight decay goes on
    assert np.allclose(b.data, 0.25 * b_before)
    model = nn.resnet50(num_classes=10, width=1 / 16)
    default = nn.optim.SGD(model.named_parameters(), lr=0.1, weight_decay=1e-4)
    assert "fc.bias" in default.excluded and "bn1.weight" in default.excluded
    assert "fc.weight" not in default.excluded and "layer1.0.conv2.weight" not in default.excluded
    custom = nn.optim.SGD(model.named_parameters(), lr=0.1, exclude=lambda name, p: name.startswith("fc."))
    assert custom.excluded == {"fc.weight", "fc.bias"}


def test_optimizer_argument_errors():
    w, _ = make_params()
    with pytest.raises(ValueError, match="empty"):
        nn.optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="nn.Parameter"):
        nn.optim.SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        nn.optim.SGD([w], lr=0.1, momentum=1.5)
    opt = nn.optim.SGD([("w", w)], lr=0.1)
    w.grad = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="'w' has shape"):
        opt.step()


def test_lars_by_hand():
    w, b = make_params()
    w0, b0 = w.data.astype(np.float64), b.data.astype(np.float64)
    opt = nn.optim.LARS([("w", w), ("b", b)], lr=0.5, momentum=0.9, weight_decay=1e-2, eta=0.02)
    vw, vb = np.zeros((2, 2)), np.zeros(2)
    for gw, gb in zip(GW, GB):
        w.grad, b.grad = gw.copy(), gb.copy()
        opt.step()
        trust = 0.02 * np.linalg.norm(w0) / (np.linalg.norm(gw) + 1e-2 * np.linalg.norm(w0) + 1e-9)
        vw = 0.9 * vw + 0.5 * trust * (gw + 1e-2 * w0)
        w0 = w0 - vw
        vb = 0.9 * vb + 0.5 * gb                 # bias: no trust ratio, no weight decay
        b0 = b0 - vb
    assert np.allclose(w.data, w0, rtol=1e-6, atol=1e-7)
    assert np.allclose(b.data, b0, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [nn.optim.SGD, nn.optim.LARS])
def test_optimizer_state_round_trip_continues_identically(cls):
    def run(opt_state=None, params=None):
        w, b = params or make_params()
        opt = cls([("w", w), ("b", b)], lr=0.1, momentum=0.9, weight_decay=0.01)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        return opt, w, b
    opt, w, b = run()
    w.grad, b.grad = GW[0].copy(), GB[0].copy()
    opt.step()
    state = {k: (np.array(v) if hasattr(v, "shape") else v) for k, v in opt.state_dict().items()}
    assert set(state) >= {"lr", "momentum", "weight_decay", "step_count", "momentum_buffer.w", "momentum_buffer.b"}
    w2, b2 = nn.Parameter(w.data.copy()), nn.Parameter(b.data.copy())
    opt2, _, _ = run(state, (w2, b2))
    for o, (ww, bb) in ((opt, (w, b)), (opt2, (w2, b2))):
        ww.grad, bb.grad = GW[1].copy(), GB[1].copy()
        o.step()
    assert np.array_equal(w.data, w2.data) and np.array_equal(b.data, b2.data)
    assert opt2.step_count == 2
    with pytest.raises(ValueError, match="momentum_buffer.x"):
        opt2.load_state_dict({"momentum_buffer.x": np.zeros(2)})
    with pytest.raises(ValueError, match="momentum_buffer.b.*shape"):
        opt2.load_state_dict({"momentum_buffer.b": np.zeros(3)})


# ---------------------------------------------------------------------------------------------
# schedules


def test_mlperf_warmup_piecewise_by_hand():
    base = nn.schedules.mlperf_base_lr(512)
    assert base == pytest.approx(0.256)
    s = nn.schedules.WarmupPiecewise(base, steps_per_epoch=10)
    expect = {0: 0.0, 1: 0.256 / 50, 25: 0.128, 49: 0.256 * 49 / 50, 50: 0.256, 299: 0.256, 300: 0.0256,
              599: 0.0256, 600: 0.00256, 800: 0.000256, 899: 0.000256, 900: 0.0000256, 5000: 0.0000256}
    for step, lr in expect.items():
        assert s(step) == pytest.approx(lr, rel=1e-12), step


def test_polynomial_and_cosine_by_hand():
    p = nn.schedules.Polynomial(1.0, total_steps=110, warmup_steps=10, power=2, end_lr=1e-4)
    assert p(5) == pytest.approx(0.5)
    assert p(10) == pytest.approx(1.0)
    assert p(60) == pytest.approx((1 - 1e-4) * 0.25 + 1e-4)
    assert p(110) == pytest.approx(1e-4) and p(500) == pytest.approx(1e-4)
    c = nn.schedules.Cosine(2.0, total_steps=100, warmup_steps=0, end_lr=0.0)
    assert c(0) == pytest.approx(2.0)
    assert c(50) == pytest.approx(1.0)
    assert c(25) == pytest.approx(1.0 + np.cos(np.pi / 4))
    assert c(100) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="warmup_steps"):
        nn.schedules.Cosine(1.0, total_steps=10, warmup_steps=10)


# ---------------------------------------------------------------------------------------------
# loss scaling


def _tiny_problem():
    fc = nn.Linear(4, 3, rng=np.random.default_rng(0))
    x = nn.Tensor(np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32))
    labels = np.array([0, 1, 2, 1, 0])
    return fc, x, labels


def test_static_loss_scale_gives_the_same_update():
    fc, x, labels = _tiny_problem()
    F.cross_entropy(fc(x), labels).backward()
    plain = [p.grad.copy() for p in fc.parameters()]
    fc.zero_grad()
    scaler = nn.amp.LossScaler(128.0)
    scaler.backward(F.cross_entropy(fc(x), labels))
    assert np.allclose(fc.weight.grad, 128 * plain[0], rtol=1e-6)
    opt = nn.optim.SGD(fc.parameters(), lr=0.1, momentum=0.0)
    w_before = fc.weight.data.copy()
    scaler.step(opt)                                  # the update divides the gradients by 128
    assert np.allclose(fc.weight.data, w_before - 0.1 * plain[0], rtol=1e-6, atol=1e-8)
    assert scaler.scale == 128.0 and scaler.skipped_steps == 0


def test_dynamic_loss_scale_skips_overflow_and_grows():
    fc, _, _ = _tiny_problem()
    opt = nn.optim.SGD(fc.parameters(), lr=0.1)
    scaler = nn.amp.LossScaler(1024.0, dynamic=True, growth_interval=3)
    w_before = fc.weight.data.copy()
    b_before = fc.bias.data.copy()
    fc.weight.grad = np.full(fc.weight.shape, np.inf, np.float32)
    fc.bias.grad = np.zeros(3, np.float32)
    scaler.step(opt)                                 # overflow: skipped (on the device), scale halved
    assert np.array_equal(fc.weight.data, w_before) and np.array_equal(fc.bias.data, b_before)
    assert scaler.scale == 512.0 and scaler.skipped_steps == 1
    for i in range(3):
        fc.weight.grad = np.ones(fc.weight.shape, np.float32)
        fc.bias.grad = np.full(3, 512.0, np.float32)
        scaler.step(opt)
        if i == 0:                                   # the update saw the gradient divided by 512
            np.testing.assert_allclose(fc.bias.data, b_before - 0.1 * 1.0, rtol=1e-6)
    assert scaler.scale == 1024.0 and scaler.good_steps == 0   # grew after 3 clean steps
    restored = nn.amp.LossScaler(dynamic=True).load_state_dict(scaler.state_dict())
    assert restored.scale == 1024.0 and restored.skipped_steps == 1


# ---------------------------------------------------------------------------------------------
# checkpoints and metrics


def test_checkpoint_round_trip(tmp_path):
    model = nn.resnet50(num_classes=10, width=1 / 16, seed=1)
    opt = nn.optim.SGD(model.named_parameters(), lr=0.05, weight_decay=1e-4, nesterov=True)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    labels = np.array([1, 2, 3, 4])
    F.cross_entropy(model(x), labels).backward()
    opt.step()
    path = tmp_path / "ckpt.npz"
    nn.checkpoint.save(path, model, opt, step=7, config='{"batch": 4}')
    assert os.listdir(tmp_path) == ["ckpt.npz"]                 # no temporary file left behind
    model2 = nn.resnet50(num_classes=10, width=1 / 16, seed=2)
    opt2 = nn.optim.SGD(model2.named_parameters(), lr=1.0)
    extra = nn.checkpoint.load(path, model2, opt2)
    assert extra == {"step": 7, "config": '{"batch": 4}'}
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert np.array_equal(a, b), k
    assert opt2.lr == 0.05 and opt2.nesterov and opt2.step_count == 1
    for name, buf in opt.momentum_buffers.items():
        assert np.array_equal(buf, opt2.momentum_buffers[name]), name
    wrong = nn.resnet50(num_classes=5, width=1 / 16)
    with pytest.raises(ValueError, match=r"model/fc\.weight has shape \(10, 128\) \(float32\), this model needs "
                                         r"\(5, 128\)"):
        nn.checkpoint.load(path, wrong)


def test_accuracy_metrics():
    logits = nn.Tensor(np.array([[0.1, 0.9, 0.5], [0.8, 0.1, 0.3], [0.2, 0.3, 0.1]], np.float32))
    labels = np.array([1, 2, 2])     # ranks 0, 1, 2
    assert nn.metrics.topk_correct(logits, labels, ks=(1, 2, 3)) == [1, 2, 3]
    assert nn.metrics.accuracy(logits.data, labels, ks=(1, 2)) == [1 / 3, 2 / 3]
