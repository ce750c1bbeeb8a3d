"""cpu (NumPy reference ops) and emu (our CUDA kernels on the CPU emulator) agree on a full
forward + backward + SGD step of a small ResNet-50 (width 1/16, batch 2): logits, loss, every
parameter's gradient and the updated weights.

Switches itself on once kernels/ops.py exists and imports.

Why two tests. A training-mode step of this tiny network is badly conditioned: batch-norm over
the 2 values per channel left at layer4 of a 32x32 input, and BN biases whose gradients are
sums that nearly cancel, amplify float32 rounding so much that our own cpu path in float32
differs from itself in float64 by up to ~30% in some gradients (measured; see notes/nn.md).
No two float32 implementations can then agree to 1e-4. So:
  1. eval mode (running statistics, well conditioned: float32 vs float64 differ by ~1e-6),
     at the issue's exact setting (32x32, batch 2): everything within 1e-4 relative;
  2. train mode (batch statistics) at 64x64 input, where float32 noise is ~1e-4: each emu
     result must be as close to the float64 truth as float32 allows, i.e. within
     max(1e-4, 4 x the error of our own float32 cpu result).
"""

import importlib

import numpy as np
import pytest

import nn
from nn import functional as F

try:
    importlib.import_module("kernels.ops")
    HAVE_OPS = True
except ImportError:
    HAVE_OPS = False

TOL = 1e-4
needs_ops = pytest.mark.skipif(not HAVE_OPS, reason="kernels.ops not available yet")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-30))


def one_step(device, x, labels, training, dtype=np.float32):
    """One SGD step from a fixed init: returns {'logits', 'loss', 'grad/<name>', 'state/<key>'}."""
    model = nn.resnet50(num_classes=10, width=1 / 16, seed=0).to(device, dtype=dtype).train(training)
    opt = nn.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    logits = model(x.astype(dtype))
    loss = F.cross_entropy(logits, labels)
    opt.zero_grad()
    loss.backward()
    out = {"logits": logits.numpy(), "loss": np.array(loss.item())}
    out.update({f"grad/{n}": nn.device.to_numpy(p.grad).copy() for n, p in model.named_parameters()})
    opt.step()
    out.update({f"state/{k}": nn.device.to_numpy(v).copy() for k, v in model.state_dict().items()})
    return out


def inputs(size):
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    return x, np.array([3, 7], dtype=np.int32)


@pytest.mark.slow
@needs_ops
def test_cpu_and_emu_agree_on_an_eval_mode_step():
    x, labels = inputs(32)
    cpu = one_step("cpu", x, labels, training=False)
    emu = one_step("emu", x, labels, training=False)
    bad = {k: e for k in cpu if (e := rel_err(cpu[k], emu[k])) >= TOL}
    assert not bad, f"cpu and emu differ by >= {TOL} relative: {bad}"


@pytest.mark.slow
@needs_ops
def test_cpu_and_emu_agree_on_a_train_mode_step_as_well_as_float32_allows():
    x, labels = inputs(64)
    truth = one_step("cpu", x, labels, training=True, dtype=np.float64)
    cpu = one_step("cpu", x, labels, training=True)
    emu = one_step("emu", x, labels, training=True)
    bad = {}
    for k in truth:
        allowed = max(TOL, 4 * rel_err(cpu[k], truth[k]))
        if (e := rel_err(emu[k], truth[k])) > allowed:
            bad[k] = (e, allowed)
    assert not bad, f"emu further from the float64 result than float32 allows (error, allowed): {bad}"


@pytest.mark.parametrize("dtype", [np.int64, np.int16, np.uint8, np.int32])
def test_labels_of_any_integer_dtype_give_the_same_loss_on_every_device(dtype):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((6, 9)).astype(np.float32)
    labels = rng.integers(0, 9, 6)
    want = F.cross_entropy(nn.Tensor(logits), labels.astype(np.int32)).data
    for device in ("cpu", "emu"):
        got = F.cross_entropy(nn.Tensor(logits, device=device), labels.astype(dtype)).data
        assert float(got) == pytest.approx(float(want), rel=1e-6), device
        assert nn.metrics.topk_correct(nn.Tensor(logits, device=device), list(labels), ks=(1, 3)) == \
            nn.metrics.topk_correct(nn.Tensor(logits), labels.astype(np.int32), ks=(1, 3))


def test_non_integer_labels_are_refused_alike_on_every_device():
    logits = np.zeros((2, 3), np.float32)
    for device in ("cpu", "emu"):
        with pytest.raises(TypeError, match="labels must be integer class indices, got dtype float64"):
            F.cross_entropy(nn.Tensor(logits, device=device), np.array([0.0, 1.0]))
