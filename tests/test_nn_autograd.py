"""The autograd core: gradients where branches meet, accumulation, no_grad, freeing of saved
arrays, train/eval behaviour of BN, and the errors of misuse."""

import gc
import weakref

import numpy as np
import pytest

import nn
from nn import functional as F


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_gradients_add_up_where_branches_meet():
    x = nn.Tensor(rand((3, 4)), requires_grad=True)
    y = F.add(F.relu(x), x)               # x feeds two paths (like a residual block's input)
    y.backward(np.ones((3, 4)))
    assert np.array_equal(x.grad, (x.data > 0) + 1.0)


def test_diamond_graph_and_shared_subgraph():
    # a = relu(x); b = a + a; c = b + a  ->  dc/dx = 3 * (x > 0)
    x = nn.Tensor(rand((5,), 1), requires_grad=True)
    a = F.relu(x)
    c = F.add(F.add(a, a), a)
    g = rand((5,), 2)
    c.backward(g)
    assert np.allclose(x.grad, 3 * g * (x.data > 0))


def test_leaf_gradients_accumulate_over_backward_calls():
    w = nn.Parameter(rand((2, 3)))
    x = nn.Tensor(rand((4, 3), 1))
    for _ in range(2):
        F.linear(x, w).backward(np.ones((4, 2)))
    assert np.allclose(w.grad, 2 * np.ones((4, 2)).T @ x.data)
    assert x.grad is None                  # x did not require grad


def test_no_grad_records_nothing():
    w = nn.Parameter(rand((2, 3)))
    with nn.no_grad():
        y = F.linear(nn.Tensor(rand((4, 3))), w)
        assert not nn.is_grad_enabled()
    assert nn.is_grad_enabled()
    assert not y.requires_grad and y._backward is None and y._parents == ()
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward(np.ones(y.shape))


def test_saved_arrays_are_freed_by_backward():
    w = nn.Parameter(rand((4, 3, 3, 3)) * 0.1)
    x = nn.Tensor(rand((2, 5, 5, 3)), requires_grad=True)
    hidden = F.relu(x)                      # its array is saved by the conv for dw
    hidden_ref = weakref.ref(hidden.data)
    loss = F.cross_entropy(F.global_avg_pool(F.conv2d(hidden, w, 1, 1)), np.array([0, 3]))
    del hidden
    gc.collect()
    assert hidden_ref() is not None         # kept alive by the graph
    loss.backward()
    gc.collect()
    assert hidden_ref() is None             # freed once its consumers ran backward
    assert loss._backward is None and loss._parents == ()
    assert w.grad is not None and x.grad is not None


def test_backward_argument_checks():
    x = nn.Tensor(rand((3,)), requires_grad=True)
    y = F.relu(x)
    with pytest.raises(RuntimeError, match="non-scalar"):
        y.backward()
    with pytest.raises(TypeError, match="logits must be an nn.Tensor"):
        F.cross_entropy(np.zeros((2, 3)), np.array([0, 1]))


def test_ops_refuse_tensors_on_different_devices():
    a = nn.Tensor(rand((2, 2)))
    b = nn.Tensor(rand((2, 2)), device="emu")
    with pytest.raises(ValueError, match="different devices: cpu and emu"):
        F.add(a, b)
    with pytest.raises(ValueError, match="device must be one of"):
        nn.Tensor(rand((2,)), device="tpu")


def test_batchnorm_train_updates_running_stats_eval_uses_them():
    bn = nn.BatchNorm2d(3)
    x = nn.Tensor((rand((4, 5, 5, 3)) * 3 + 2).astype(np.float32))
    y = bn(x)
    rows = x.data.reshape(-1, 3).astype(np.float64)
    assert np.allclose(bn.running_mean, 0.1 * rows.mean(0), rtol=1e-5)
    assert np.allclose(bn.running_var, 0.9 + 0.1 * rows.var(0, ddof=1), rtol=1e-5)
    assert int(bn.num_batches_tracked) == 1
    assert np.allclose(y.data.reshape(-1, 3).mean(0), 0, atol=1e-5)
    bn.eval()
    y_eval = bn(x)
    expect = (x.data - bn.running_mean) / np.sqrt(bn.running_var + 1e-5)
    assert np.allclose(y_eval.data, expect, rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 1  # eval does not count


def test_tensor_surface():
    t = nn.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert t.shape == (2, 3) and t.dtype == np.float32 and t.device == nn.cpu and t.ndim == 2
    assert np.array_equal(t.numpy(), t.data) and "device='cpu'" in repr(t)
    s = t + t
    assert np.array_equal(s.data, 2 * t.data)
    assert nn.Tensor(np.array(2.5)).item() == 2.5
