"""Batch norm with the statistics from the convolution before it (batch norm versions 3 and up;
here version 4, whose backward is its own, where the default 5 takes the backward's sums from
the next convolution: tests/test_bn_backward_fusion.py; nn.layers.conv_bn) trains the tiny ResNet-50 to the same losses as batch norm computing
them itself (version 2), on the emulator in float32 and float16, and on the cpu device, where the
two ways are the same numbers bit for bit.  Evaluation is unchanged.  The kernels' own tests are in
tests/test_kernels_conv.py (the epilogue's statistics, their error bound) and
tests/test_kernels_batchnorm.py (the forward from partials)."""

import numpy as np
import pytest

import nn
from kernels.runtime import trace
from tests._tiny_training import run_tiny

FUSED = {"conv2d_fwd_igemm_stats_f32", "conv2d_fwd_wmma_async_stats_f16", "batchnorm_partials_reduce",
         "batchnorm_partials_finalize"}
UNFUSED = {"conv2d_fwd_igemm_f32", "conv2d_fwd_wmma_async_f16", "batchnorm_stats_partial_f32",
           "batchnorm_stats_partial_f16", "batchnorm_stats_finalize_f32", "batchnorm_stats_finalize_f16"}


def train(device="emu", dtype=None, steps=3, **choice):
    """tests/_tiny_training.py's run, then the model's logits in evaluation mode: (losses,
    logits, the kernels it ran, the model)."""
    run = run_tiny(steps, device, dtype, **choice)
    with nn.device.use_kernels(**choice):
        run.model.eval()
        logits = nn.device.to_numpy(run.model(run.x, layout="NHWC").data)
    return run.losses, logits, set(run.trace.by_kernel()), run.model


@pytest.mark.parametrize("dtype", [None, np.float16], ids=["fp32", "fp16"])
def test_emu_trains_to_the_same_losses_with_and_without_the_fusion(dtype):
    fused, logits, ran, model = train(dtype=dtype, batchnorm=4)
    plain, plain_logits, ran_plain, plain_model = train(dtype=dtype, batchnorm=2)
    assert fused[-1] < fused[0] - 0.3                          # it trains
    name = "fp32" if dtype is None else "fp16"
    want = {"fp32": {"conv2d_fwd_igemm_stats_f32"}, "fp16": {"conv2d_fwd_wmma_async_stats_f16"}}[name]
    assert want | {"batchnorm_partials_reduce", "batchnorm_partials_finalize"} <= ran
    assert not ran_plain & FUSED                               # batchnorm=2 turns it off
    assert not {k for k in ran if k.startswith("batchnorm_stats_")}   # every BN of ResNet-50 follows a conv
    # float32: the statistics differ in their last bits, the losses to float32 rounding; float16:
    # a last-bit change of a statistic moves some activations by one float16 ulp (2^-11)
    rtol = 1e-5 if dtype is None else 5e-4      # (measured: 0 and 6e-5)
    np.testing.assert_allclose(fused, plain, rtol=rtol)
    np.testing.assert_allclose(logits, plain_logits, rtol=rtol * 10, atol=rtol * 10)
    # running statistics alike: in float16, the variance of activations a few of which moved by an ulp
    # (measured: 8e-4)
    buffer_tol = 1e-5 if dtype is None else 4e-3
    for (name, a), (_, b) in zip(model.named_buffers(), plain_model.named_buffers()):
        np.testing.assert_allclose(a, b, rtol=buffer_tol, atol=buffer_tol, err_msg=name)


def test_cpu_trains_to_the_same_numbers_bit_for_bit():
    fused, logits, _, model = train("cpu", batchnorm=4)
    plain, plain_logits, _, plain_model = train("cpu", batchnorm=2)
    assert np.array_equal(fused, plain) and np.array_equal(logits, plain_logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), plain_model.state_dict().items()):
        assert np.array_equal(a, b), name


def test_evaluation_and_synchronised_bn_do_not_fuse():
    """In evaluation the batch norm uses its running statistics: the convolutions run plain; a
    batch norm with sync (statistics over every rank) gets no partials either."""
    model = nn.resnet50(num_classes=10, width=0.0625, seed=0).to("emu").eval()
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with trace.collect() as t:
        model(x, layout="NHWC")
    assert "conv2d_fwd_igemm_f32" in t.by_kernel() and not set(t.by_kernel()) & FUSED
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    conv.to("emu"), bn.to("emu")
    calls = []
    bn.sync = type("Sync", (), {"world_size": 1, "allreduce_": lambda self, a, op="sum": calls.append(op)})()
    with trace.collect() as t:
        nn.layers.conv_bn(conv, bn, nn.Tensor(x, device="emu"), relu=True)
    assert calls and not set(t.by_kernel()) & FUSED


def test_sequential_runs_a_conv_and_its_batch_norm_as_one():
    """nn.Sequential(Conv2d, BatchNorm2d) (the projection shortcut) goes through conv_bn: the same
    numbers as the two layers called one after the other with the fusion off."""
    rng = np.random.default_rng(2)
    x = nn.Tensor(rng.standard_normal((2, 9, 9, 8)).astype(np.float32), device="emu")
    outs = []
    for version in (3, 2):
        with nn.device.use_kernels(batchnorm=version), trace.collect() as t:
            seq = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, rng=np.random.default_rng(3)), nn.BatchNorm2d(16))
            seq.to("emu")
            outs.append((seq(x).data, seq[1].running_var.copy()))
        assert ("batchnorm_partials_reduce" in t.by_kernel()) == (version == 3)
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-6)
