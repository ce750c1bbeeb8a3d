"""Batch norm version 5: the backward of a batch norm + ReLU finished from the partial sums that the
convolution after the ReLU computes in its backward-data pass (ops.conv2d_backward_data_relu_bn,
ops.batchnorm_backward_from_partials; F.batch_norm's grad_partials).  Checked here: the reference
against batchnorm_relu_backward in float64, the kernels against the reference (float32 and float16,
awkward channel counts, two rows), the layer code's choice (the fused ops run exactly where a
convolution is the output's one consumer, and the gradients equal version 4's otherwise too), and
the tiny ResNet-50 training to version 4's losses on emu (float32, float16) and cpu.  The
convolution's epilogue itself is tested in tests/test_conv_relu_bn.py."""

import numpy as np
import pytest

import nn
from kernels import batchnorm as bn
from kernels import ops
from kernels import reference as ref
from kernels.runtime import trace
from tests._tiny_training import run_tiny

FUSED_BN = "batchnorm_backward_dx_rows"     # version 5's dx pass (the plain form of version 4's kernel)


def _bn_relu_problem(rng, M, C, dtype=np.float64):
    """(dy, y, x, gamma, mean, invstd): a batch norm + ReLU's forward and an output gradient."""
    x = rng.standard_normal((M, C)) * 2.0 + rng.standard_normal(C)
    gamma, beta = rng.random(C) + 0.5, rng.standard_normal(C) * 0.5
    y, mean, invstd = ref.batchnorm_relu_forward_train(x, gamma, beta, np.zeros(C), np.ones(C))
    dy = rng.standard_normal((M, C))
    return tuple(np.asarray(a, dtype=dtype) for a in (dy, y, x)) + (gamma, mean, invstd)


@pytest.mark.parametrize("M,C,blocks", [(300, 16, 1), (300, 16, 7), (2, 5, 1), (130, 67, 3)])
def test_reference_from_partials_is_the_relu_backward(M, C, blocks):
    rng = np.random.default_rng(M + C)
    dy, y, x, gamma, mean, invstd = _bn_relu_problem(rng, M, C)
    g, part = ref.batchnorm_relu_grad_partials(dy, y, x, mean)
    assert part.shape == (2, 1, C)
    np.testing.assert_array_equal(g, np.where(y > 0, dy, 0.0))
    # any split of the rows into blocks: the partials of each block, summed by the op
    edges = np.linspace(0, M, blocks + 1).astype(int)
    split = np.concatenate([ref.batchnorm_relu_grad_partials(dy[a:b], y[a:b], x[a:b], mean)[1]
                            for a, b in zip(edges[:-1], edges[1:]) if b > a], axis=1)
    want = ref.batchnorm_relu_backward(dy, y, x, gamma, mean, invstd)
    for p in (part, split):
        got = ref.batchnorm_backward_from_partials(g, x, gamma, mean, invstd, p)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_reference_conv_relu_bn_is_dgrad_then_mask_then_sums():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 7, 6))
    gamma, beta = rng.random(6) + 0.5, rng.standard_normal(6)
    a, mean, _ = ref.batchnorm_relu_forward_train(x, gamma, beta, np.zeros(6), np.ones(6))
    w = rng.standard_normal((5, 6, 3, 3))
    dy = rng.standard_normal((2, 4, 4, 5))
    g, part = ref.conv2d_backward_data_relu_bn(dy, w, x.shape, 2, 1, a, x, mean)
    da = ref.conv2d_backward_data(dy, w, x.shape, 2, 1)
    np.testing.assert_array_equal(g, np.where(a > 0, da, 0.0))
    rows, xc = g.reshape(-1, 6), (x - mean).reshape(-1, 6)
    np.testing.assert_allclose(part[:, 0], [rows.sum(0), (rows * xc).sum(0)], rtol=1e-12, atol=1e-12)
    assert 0 < (a > 0).mean() < 1                      # the mask removes some of da, keeps some


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("M,C", [(300, 64), (77, 67), (2, 8), (65, 3)])
def test_kernels_match_the_reference(dtype, M, C):
    """On the emulator: the partials (version 4's add + ReLU reduction, whose dresidual is g) and
    the backward from them, against float64.  float16: g is dy rounded (exact where kept); sums of
    float16 values in float32."""
    rng = np.random.default_rng(M * C)
    dy, y, x, gamma, mean, invstd = _bn_relu_problem(rng, M, C)
    dy, y, x = (a.astype(dtype) for a in (dy, y, x))
    gamma, mean, invstd = (np.asarray(a, dtype=np.float32) for a in (gamma, mean, invstd))
    g, part = bn.batchnorm_relu_grad_partials(dy, y, x, mean)
    g_ref, part_ref = ref.batchnorm_relu_grad_partials(*(a.astype(np.float64) for a in (dy, y, x, mean)))
    np.testing.assert_array_equal(g.astype(np.float64), g_ref)
    scale = np.abs(g_ref).sum(0) * (np.abs(x.astype(np.float64) - mean).max(0) + 1)
    assert part.dtype == np.float32 and part.shape[0] == 2 and part.shape[2] == C
    assert np.all(np.abs(part.astype(np.float64).sum(1) - part_ref[:, 0]) <= 1e-6 * scale + 1e-30)
    dx, dgamma, dbeta = bn.batchnorm_backward_from_partials(g, x, gamma, mean, invstd, part)
    want = ref.batchnorm_relu_backward(*(a.astype(np.float64) for a in (dy, y, x, gamma, mean, invstd)))
    tol = 2e-3 if dtype == np.float16 else 1e-5
    assert dx.dtype == dtype and dx.shape == x.shape
    for name, got, exp in (("dx", dx, want[0]), ("dgamma", dgamma, want[1]), ("dbeta", dbeta, want[2])):
        err = np.abs(got.astype(np.float64) - exp).max() / max(np.abs(exp).max(), 1e-30)
        assert err < tol, (name, err)


U32 = 2.0 ** -24


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("M,C", [(300, 64), (77, 67), (2, 8), (65, 3), (1000, 16)])
def test_the_pair_form_sums_for_the_other_batch_norm(monkeypatch, dtype, M, C):
    """batchnorm_backward_from_partials_pair: dx, dgamma, dbeta bit for bit those of
    batchnorm_backward_from_partials (the same arithmetic), and part2 per slice of rows (version 4's
    layout: rows r with (r // TY) % G == slice) against float64 sums of g and g (x2 - mean2), within
    the roundings of its order (the thread's rows, then TY threads).  Outputs start as NaN."""
    rng = np.random.default_rng(M * C + 1)
    dy, y, x, gamma, mean, invstd = _bn_relu_problem(rng, M, C)
    dy, y, x = (a.astype(dtype) for a in (dy, y, x))
    gamma, mean, invstd = (np.asarray(a, dtype=np.float32) for a in (gamma, mean, invstd))
    x2 = (3.0 + rng.standard_normal((M, C))).astype(dtype)
    mean2 = (3.0 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    g, part = bn.batchnorm_relu_grad_partials(dy, y, x, mean)
    want = bn.batchnorm_backward_from_partials(g, x, gamma, mean, invstd, part)
    monkeypatch.setattr(bn, "empty", lambda xp, shape, dtype: xp.full(shape, np.nan, dtype=dtype))
    dx, dgamma, dbeta, part2 = bn.batchnorm_backward_from_partials_pair(g, x, gamma, mean, invstd, part, x2, mean2)
    for a, b in zip((dx, dgamma, dbeta), want):
        np.testing.assert_array_equal(a, b)
    assert part2.dtype == np.float32 and part2.shape[0] == 2 and part2.shape[2] == C
    assert not np.isnan(part2).any()
    G = part2.shape[1]
    V, GX, TY = bn._rows_layout(C, x, g, dx, mean, mean, x2, mean2)
    rows = np.arange(M)
    terms = np.stack([g.astype(np.float64), g.astype(np.float64) * (x2.astype(np.float64) - mean2)])   # [2, M, C]
    per_thread = -(-M // (TY * G))
    for b in range(G):
        mine = rows[(rows // TY) % G == b]
        err = np.abs(part2[:, b].astype(np.float64) - terms[:, mine].sum(axis=1))
        assert np.all(err <= (per_thread + TY + 2) * U32 * np.abs(terms[:, mine]).sum(axis=1)), b
    # and the reference: the same sums over all rows as one block
    r = ref.batchnorm_backward_from_partials_pair(g.astype(np.float64), x.astype(np.float64), gamma, mean, invstd,
                                                  part.astype(np.float64), x2.astype(np.float64), mean2)
    np.testing.assert_allclose(r[3][:, 0], terms.sum(axis=1), rtol=1e-12, atol=1e-12)


def test_the_pair_kernel_passes_the_sanitizer():
    import kernels
    rng = np.random.default_rng(9)
    for dtype, (M, C) in ((np.float16, (77, 64)), (np.float32, (65, 3))):
        dy, y, x, gamma, mean, invstd = _bn_relu_problem(rng, M, C)
        dy, y, x = (a.astype(dtype) for a in (dy, y, x))
        gamma, mean, invstd = (np.asarray(a, dtype=np.float32) for a in (gamma, mean, invstd))
        g, part = bn.batchnorm_relu_grad_partials(dy, y, x, mean)
        with kernels.sanitize("all"):
            out = bn.batchnorm_backward_from_partials_pair(g, x, gamma, mean, invstd, part, x, mean)
        np.testing.assert_array_equal(out[0], bn.batchnorm_backward_from_partials(g, x, gamma, mean, invstd, part)[0])


def test_kernels_reject_what_does_not_fit():
    x = np.zeros((8, 4), np.float32)
    c = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"part must be \[2, B, 4\]"):
        bn.batchnorm_backward_from_partials(x, x, c, c, c, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="part"):
        ref.batchnorm_backward_from_partials(x, x, c, c, c, np.zeros((2, 1, 5), np.float32))
    part = np.zeros((2, 1, 4), np.float32)
    with pytest.raises(ValueError, match="batchnorm_backward_from_partials_pair: x2"):
        bn.batchnorm_backward_from_partials_pair(x, x, c, c, c, part, x[:4], c)
    with pytest.raises(ValueError, match="mean2"):
        bn.batchnorm_backward_from_partials_pair(x, x, c, c, c, part, x, c[:3])
    with pytest.raises(ValueError, match="x2"):
        ref.batchnorm_backward_from_partials_pair(x, x, c, c, c, part, x[:4], c)
    with pytest.raises((ValueError, TypeError)):
        bn.batchnorm_relu_grad_partials(x, x[:4], x, c)


def _block_grads(device, version, consumers="conv"):
    """Gradients of conv -> BN + ReLU -> conv (3x3, stride 2) -> BN + ReLU, and the batch-norm
    backward ops that ran.  consumers="two": the first BN's output also feeds a second branch."""
    nn.layers.manual_seed(0)
    rng = np.random.default_rng(1)
    c1, b1 = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
    c2, b2 = nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
    for m in (c1, b1, c2, b2):
        m.to(device)
    x = nn.Tensor(rng.standard_normal((2, 9, 9, 8)).astype(np.float32), requires_grad=True, device=device)
    ran = []
    with nn.device.use_kernels(batchnorm=version), _count(ran):
        a = nn.layers.conv_bn(c1, b1, x, relu=True)
        y = nn.layers.conv_bn(c2, b2, a, relu=True)
        if consumers == "two":
            y = nn.functional.add(y, nn.functional.max_pool2d(a, 3, 2, 1))   # both 5x5
        y.backward(nn.device.get_device(device).asarray(rng.standard_normal(y.shape).astype(np.float32)))
    grads = [nn.device.to_numpy(t.grad) for t in (x, c1.weight, b1.weight, b1.bias, c2.weight, b2.weight)]
    return grads, ran


class _count:
    """Records which of the batch-norm backward ops run (ops and reference alike)."""

    NAMES = ("batchnorm_backward_from_partials", "batchnorm_relu_backward", "conv2d_backward_data_relu_bn",
             "batchnorm_backward_from_partials_pair")

    def __init__(self, ran):
        self.ran, self.saved = ran, []

    def __enter__(self):
        for mod in (ops, ref):
            for name in self.NAMES:
                f = getattr(mod, name)
                self.saved.append((mod, name, f))
                setattr(mod, name, lambda *a, _f=f, _n=name, **k: (self.ran.append(_n), _f(*a, **k))[1])

    def __exit__(self, *exc):
        for mod, name, f in self.saved:
            setattr(mod, name, f)


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_the_layer_code_fuses_where_a_convolution_takes_the_output(device):
    got, ran = _block_grads(device, 5)
    want, ran4 = _block_grads(device, 4)
    # b1's output feeds c2: its backward comes from c2's partials; b2's output is the block's end
    assert ran.count("conv2d_backward_data_relu_bn") == 1 and ran.count("batchnorm_backward_from_partials") == 1
    assert ran.count("batchnorm_relu_backward") == 1
    assert "batchnorm_backward_from_partials" not in ran4 and "conv2d_backward_data_relu_bn" not in ran4
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max())


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_a_second_consumer_falls_back_to_the_relu_backward(device):
    """When the ReLU's output also feeds a max pool, its gradient is a sum: the convolution still
    computes its partials (it cannot know), but the batch norm sees a different gradient and runs
    the ReLU form's backward on the sum (the mask applied twice is the mask applied once)."""
    got, ran = _block_grads(device, 5, consumers="two")
    want, _ = _block_grads(device, 4, consumers="two")
    assert "batchnorm_backward_from_partials" not in ran and ran.count("batchnorm_relu_backward") == 2
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max())


@pytest.mark.parametrize("device,dtype", [("emu", None), ("emu", np.float16), ("cpu", None)],
                         ids=["emu-fp32", "emu-fp16", "cpu"])
def test_tiny_resnet50_trains_to_version_4s_losses(device, dtype):
    fused = run_tiny(3, device, dtype)                 # the default: batch norm version 5
    plain = run_tiny(3, device, dtype, batchnorm=4)
    assert fused.losses[-1] < fused.losses[0] - 0.3    # it trains
    if device == "emu":
        def count(run, prefix):
            return sum(n for k, n in run.trace.by_kernel().items() if k.startswith(prefix)) // 3   # per step
        # the 33 batch norms + ReLU: 32 feed a convolution, the stem's feeds the max pool (whose backward
        # sums for it); of the 16 add + ReLU ones, 12 feed a block with an identity shortcut, 3 a block
        # with a projection (two convolutions), the last the global average pool (whose backward sums)
        assert count(plain, "batchnorm_relu_backward_reduce") == 33
        assert count(fused, "batchnorm_relu_backward_reduce") == 0
        assert count(plain, "batchnorm_add_relu_backward_reduce") == 16
        assert count(fused, "batchnorm_add_relu_backward_reduce") == 0
        assert count(fused, FUSED_BN) == count(plain, FUSED_BN) + 33
        for pool in ("maxpool2d_backward_blocks_relu_bn", "global_avgpool_backward_relu_bn"):
            assert count(fused, pool) == 1 and count(plain, pool) == 0
        # the 4 projections' plain batch norms: from the sums of their block's add + ReLU one (the pair form)
        assert count(fused, FUSED_BN + "_pair") == 4 and count(plain, FUSED_BN + "_pair") == 0
        def plain_reduce(run):   # version 4's reduction of the plain form (not its _finalize)
            return count(run, "batchnorm_backward_reduce_f32") + count(run, "batchnorm_backward_reduce_f16")
        assert plain_reduce(plain) == 4 and plain_reduce(fused) == 0
        assert count(fused, "add_") == 0      # each second gradient added in an epilogue
        conv = "conv2d_bwd_data_" + ("igemm" if dtype is None else "wmma_async")
        assert count(fused, conv + "_relu_bn") == 47 and count(plain, conv + "_relu_bn") == 0
    # float32: the sums in another order; float16: a last-bit change moves an activation by an ulp
    rtol = 1e-5 if dtype is None else 5e-4
    np.testing.assert_allclose(fused.losses, plain.losses, rtol=rtol)
    for (name, a), (_, b) in zip(fused.model.named_parameters(), plain.model.named_parameters()):
        a, b = nn.device.to_numpy(a.data), nn.device.to_numpy(b.data)
        np.testing.assert_allclose(a, b, rtol=rtol * 10, atol=rtol * 10 * max(np.abs(b).max(), 1e-3), err_msg=name)


@pytest.mark.parametrize("B,C", [(513, 67), (2000, 64), (700, 3)])
def test_many_partials_are_folded_first(B, C):
    """A convolution's epilogue writes one partial per 64-row tile: past 512 of them the backward
    folds them in groups of 64 (batchnorm_backward_partials_fold) before the finalize.  dgamma and
    dbeta against the float64 sums of the same partials, exactly to float32 rounding."""
    rng = np.random.default_rng(B)
    M = 64 * B
    part = rng.standard_normal((2, B, C)).astype(np.float32)
    g = np.zeros((M, C), np.float32)     # dx is not the point here (g = 0, x = mean: dx = -dbeta/M...)
    x = np.zeros((M, C), np.float32)
    gamma = (rng.random(C) + 0.5).astype(np.float32)
    invstd = (rng.random(C) + 0.5).astype(np.float32)
    mean = np.zeros(C, np.float32)
    dx, dgamma, dbeta = bn.batchnorm_backward_from_partials(g, x, gamma, mean, invstd, part)
    sums = part.astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(dbeta, sums[0], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(dgamma, sums[1] * invstd, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(dx[::997], np.broadcast_to(-(gamma * invstd) * sums[0] / M, (len(dx[::997]), C)),
                               rtol=1e-5, atol=1e-9)


def _two_blocks(device, version, last_projects=False):
    """Gradients of three bottlenecks (the first with a projection shortcut, the second with an
    identity one, the third with an identity one or, last_projects, a projection) and the calls of
    the fused ops (with whether a dz came along)."""
    from nn.resnet import Bottleneck
    nn.layers.manual_seed(0)
    rng = np.random.default_rng(4)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))
    third = (Bottleneck(16, 8, stride=2, downsample=nn.Sequential(nn.Conv2d(16, 32, 1, stride=2), nn.BatchNorm2d(32)))
             if last_projects else Bottleneck(16, 4))
    blocks = [Bottleneck(8, 4, stride=2, downsample=down), Bottleneck(16, 4), third]
    for b in blocks:
        b.to(device)
    x = nn.Tensor(rng.standard_normal((2, 8, 8, 8)).astype(np.float32), requires_grad=True, device=device)
    calls = []
    real = ops.conv2d_backward_data_relu_bn, ref.conv2d_backward_data_relu_bn

    def spy(f):
        def call(*a, **k):
            calls.append("dz" if (a[8] if len(a) > 8 else k.get("dz")) is not None else "no dz")
            return f(*a, **k)
        return call

    ran = []
    try:
        ops.conv2d_backward_data_relu_bn, ref.conv2d_backward_data_relu_bn = spy(real[0]), spy(real[1])
        with nn.device.use_kernels(batchnorm=version), _count(ran):
            y = x
            for b in blocks:
                y = b(y)
            y.backward(nn.device.get_device(device).asarray(rng.standard_normal(y.shape).astype(np.float32)))
    finally:
        ops.conv2d_backward_data_relu_bn, ref.conv2d_backward_data_relu_bn = real
    params = [p for b in blocks for _, p in b.named_parameters()]
    return [nn.device.to_numpy(t.grad) for t in [x] + params], calls, ran


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_identity_shortcuts_hand_their_gradient_to_the_first_convolution(device):
    """A block's add + ReLU output feeds the next block's first convolution and, through an identity
    shortcut, its add + ReLU.  That second gradient goes to the convolution's backward-data epilogue
    (dz, added before the mask), so the add + ReLU batch norm finishes from partials too; after a
    projection shortcut (two convolutions take the input) nothing is fused there.  The first block's
    add + ReLU batch norm, finishing from partials, sums for its projection's batch norm in its dx pass
    (the pair form), which then finishes from those."""
    got, calls, ran = _two_blocks(device, 5)
    want, calls4, _ = _two_blocks(device, 4)
    assert calls4 == []
    # per block: conv2 and conv3 take a BN + ReLU output (no dz); block 2's and 3's conv1 take the add +
    # ReLU output of the block before (dz: its identity shortcut's gradient); block 1's conv1 and
    # projection take x, which no batch norm made
    assert sorted(calls) == ["dz", "dz"] + ["no dz"] * 6
    # bn1, bn2 of every block, bn3 of blocks 1 (the pair form) and 2, block 1's projection (from the pair)
    assert ran.count("batchnorm_backward_from_partials") == 8
    assert ran.count("batchnorm_backward_from_partials_pair") == 1
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max())


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_a_projection_block_hands_one_convolutions_gradient_to_the_other(device):
    """A block with a projection shortcut: its input feeds its first convolution and the
    projection's.  The one whose backward runs first hands its da to the other's epilogue (dz), so
    the batch norm before (the previous block's add + ReLU) finishes from partials too, and the
    gradients equal version 4's."""
    got, calls, ran = _two_blocks(device, 5, last_projects=True)
    want, _, _ = _two_blocks(device, 4, last_projects=True)
    # 2 + 2 + 2 convolutions behind a batch norm + ReLU; block 2's first takes block 1's output (dz from
    # the identity shortcut); block 3's input feeds its first convolution and its projection: the
    # second of those to run gets the first's da as dz, the first runs plain
    assert sorted(calls) == ["dz", "dz"] + ["no dz"] * 6
    # block 3's projection: its add + ReLU batch norm is the network's last (no convolution after it), so
    # that projection runs the plain backward; block 1's finishes from its pair's sums
    assert ran.count("batchnorm_backward_from_partials") == 8
    assert ran.count("batchnorm_backward_from_partials_pair") == 1
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max())
