"""The synchronised-batch-norm kernels (kernels/batchnorm_sync.cu) against kernels/reference.py,
on the emulator and, where present, the GPU: partial statistics, backward reductions, the
elementwise backward; and their composition equals the ordinary batch-norm backward when
there is one process."""

import numpy as np
import pytest

from kernels import batchnorm as bn
from kernels import reference as ref

SHAPES = [(1, 1, 1, 3), (2, 7, 7, 5), (3, 5, 3, 37), (64, 33)]
rng = np.random.default_rng(11)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 2e-3)])
def test_sync_pieces_match_the_reference(backend, shape, dtype, tol):
    C = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    shift = rng.standard_normal(C).astype(np.float32) + 5
    mean = rng.standard_normal(C).astype(np.float32) + 5
    invstd = (rng.random(C) + 0.5).astype(np.float32)
    gamma = rng.standard_normal(C).astype(np.float32)
    d = backend.to_device
    stats = backend.to_host(bn.batchnorm_partial_stats(d(x), d(shift)))
    want = ref.batchnorm_partial_stats(x.astype(np.float64), shift.astype(np.float64))
    np.testing.assert_allclose(stats, want, rtol=tol, atol=tol * np.abs(want).max())
    sums = backend.to_host(bn.batchnorm_backward_reduce(d(dy), d(x), d(mean), d(invstd)))
    want = ref.batchnorm_backward_reduce(dy.astype(np.float64), x.astype(np.float64), mean.astype(np.float64),
                                         invstd.astype(np.float64))
    np.testing.assert_allclose(sums, want, rtol=tol, atol=tol * np.abs(want).max())
    count = 2.5 * x.size / C  # as if other processes held more rows
    dx = backend.to_host(bn.batchnorm_backward_elemt(d(dy), d(x), d(gamma), d(mean), d(invstd),
                                                     d(sums.astype(np.float32)), count))
    want = ref.batchnorm_backward_elemt(dy.astype(np.float64), x.astype(np.float64), gamma.astype(np.float64),
                                        mean.astype(np.float64), invstd.astype(np.float64), sums.astype(np.float64),
                                        count)
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_allclose(dx.astype(np.float64), want, rtol=10 * tol, atol=10 * tol * np.abs(want).max())


def test_one_process_composition_is_the_plain_backward(backend):
    x = rng.standard_normal((4, 6, 6, 9)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma = rng.standard_normal(9).astype(np.float32)
    d = backend.to_device
    y, mean, invstd = ref.batchnorm_forward_train(x, gamma, np.zeros(9, np.float32), np.zeros(9, np.float32),
                                                  np.ones(9, np.float32))
    sums = bn.batchnorm_backward_reduce(d(dy), d(x), d(mean), d(invstd))
    dx = backend.to_host(bn.batchnorm_backward_elemt(d(dy), d(x), d(gamma), d(mean), d(invstd), sums, x.size // 9))
    want, dgamma, dbeta = ref.batchnorm_backward(dy, x, gamma, mean, invstd)
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(backend.to_host(sums), np.stack([dbeta, dgamma]), rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_refused():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError, match="shift must be float32"):
        bn.batchnorm_partial_stats(x, np.zeros(3, np.float64))
    with pytest.raises(ValueError, match="shape"):
        bn.batchnorm_backward_reduce(np.zeros((4, 2), np.float32), x, np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="count must be > 0"):
        bn.batchnorm_backward_elemt(x, x, np.ones(3, np.float32), np.zeros(3, np.float32), np.ones(3, np.float32),
                                    np.zeros((2, 3), np.float32), 0)


def test_synchronised_bn_through_our_kernels_equals_plain_bn_for_one_process():
    # nn's synchronised batch norm on the emu device (these kernels + a one-process all-reduce)
    # against ordinary batch norm on the cpu device (the NumPy reference)
    import nn
    from nn import data_parallel, distributed

    comm = distributed.init(backend="single")
    # a shallow, well-conditioned net: deep ResNets at tiny batch sizes amplify rounding (see test_nn_emu)
    x = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 4
    out = {}
    for device, sync in (("cpu", False), ("emu", True)):
        model = nn.resnet18(num_classes=4, width=1 / 8, seed=1).to(device)
        if sync:
            data_parallel.convert_sync_batchnorm(model, comm)
        loss = nn.functional.cross_entropy(model(x, layout="NHWC"), y)
        loss.backward()
        out[device] = (float(loss.data), {k: np.asarray(p.grad, np.float64) for k, p in model.named_parameters()})
    (loss_cpu, g_cpu), (loss_emu, g_emu) = out["cpu"], out["emu"]
    assert loss_emu == pytest.approx(loss_cpu, rel=1e-4)  # fp32 through 50 layers, other summation orders
    for k in g_cpu:
        assert np.linalg.norm(g_emu[k] - g_cpu[k]) / np.linalg.norm(g_cpu[k]) < 1e-3, k
