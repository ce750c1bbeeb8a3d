"""Mixed precision through our kernels (the emulator runs the GPU's code path): float16
activations with float32 master weights.

The kernels must follow the NumPy reference run with the same float16 activations (the same
function, so the same rounding, up to summation order), and the result must stay close to the
float32 model. Per-tensor gradients of this tiny model are NOT compared with float32: fp16
storage alone moves some of them by tens of percent (cancellation in batch-norm gradients;
measured: cpu-fp16 and emu-fp16 both differ from float64 by up to 55% on layer1.0.bn1.weight,
and from each other by under 1%).
"""

import numpy as np
import pytest

pytest.importorskip("kernels.ops")
import nn  # noqa: E402


def _run(device, dtype, x, labels):
    model = nn.resnet50(num_classes=5, width=1 / 16, seed=7, activation_dtype=dtype).to(device)
    model.eval()  # batch statistics of 2 images would amplify rounding further (see test_nn_emu)
    logits = model(x if dtype is None else x.astype(dtype), layout="NHWC")
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward(1024.0)  # a loss scale, as mixed precision training uses
    assert all(p.data.dtype == np.float32 and p.grad.dtype == np.float32 for p in model.parameters())
    grads = {k: np.asarray(p.grad, np.float64) / 1024.0 for k, p in model.named_parameters()}
    return np.asarray(logits.data, np.float64), float(loss.data), grads


def test_fp16_kernels_follow_the_fp16_reference_and_track_fp32():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    labels = np.array([1, 3], np.int32)
    l32, loss32, _ = _run("cpu", None, x, labels)
    lref, lossref, gref = _run("cpu", np.float16, x, labels)
    lemu, lossemu, gemu = _run("emu", np.float16, x, labels)
    assert np.isfinite(lemu).all() and lemu.shape == (2, 5)
    # the kernels against the reference, both in fp16
    assert np.linalg.norm(lemu - lref) / np.linalg.norm(lref) < 5e-3
    assert abs(lossemu - lossref) / abs(lossref) < 5e-3
    for k in gref:
        rel = np.linalg.norm(gemu[k] - gref[k]) / max(np.linalg.norm(gref[k]), 1e-30)
        assert rel < 2e-2, (k, rel)
    # and both close to the fp32 model where fp16 keeps them close: logits and loss
    assert np.linalg.norm(lemu - l32) / np.linalg.norm(l32) < 2e-2
    assert abs(lossemu - loss32) / abs(loss32) < 2e-2
