"""kernels.pool.maxpool2d_backward_relu_bn: the max pool's backward where its input is
a = relu(batchnorm(bn_x)) (ResNet's stem), with the ReLU's mask and the batch norm's backward partial
sums in the epilogue of version 3 (pool.cu, "version 3 with the batch norm's backward in its
epilogue"): the mask taken from the pool's output y on dy, one partial row per block of 256 threads.

Checked against independent references: g bit for bit the plain version-3 backward masked where
a > 0 (and within float rounding of the float64 scatter of kernels/reference.py), every block's
partials against the float64 sums of g as stored over the pixels and channels its threads cover (the
thread layout of pool.cu, re-derived here), within the header's bound of 4 * trips + 256 / groups
roundings per term.  The outputs start as NaN, so an entry no thread writes fails.  Shapes: the
stem's channels at emulator size in both dtypes, odd heights and widths (a block of pixels without
its right column or lower row), a 2x2 window, one-pixel outputs, and channel counts whose vectors do
not divide the block (3, 12, 67: the fallback, plain backward then batchnorm_relu_grad_partials, whose
blocks are its own: checked by the sum over blocks).  Each test runs on the CPU emulator and, with a
GPU, on it.
"""

import numpy as np
import pytest

from kernels import pool as PL
from kernels import reference as ref
from tests.conftest import Backend

U = 2.0 ** -24
F16_OUT = 2e-3
BLOCK = 256
EMU = Backend("emu")

# (a shape NHWC, kernel_size, padding): stride 2 throughout (the epilogue's kernel; other strides fall back)
CASES = [
    ((2, 12, 12, 64), 3, 1),    # the stem's 64 channels: V = 8 halves / 4 floats, 8 or 16 groups
    ((3, 9, 11, 16), 3, 1),     # odd H and W: the last row and column of blocks are half blocks
    ((2, 8, 8, 32), 2, 0),      # a 2x2 window: no overlap, one output per block of pixels
    ((4, 2, 2, 8), 3, 1),       # one output pixel per image
    ((1, 7, 7, 3), 3, 1),       # C = 3: groups do not divide 256: the fallback
    ((2, 6, 6, 12), 3, 1),      # C = 12: 3 float vectors or 12 halves: the fallback
    ((1, 5, 6, 67), 3, 1),      # C = 67: the fallback
]
IDS = [f"a{'x'.join(map(str, s))}-k{k}-p{p}" for s, k, p in CASES]


@pytest.fixture(autouse=True)
def _outputs_start_as_nan(monkeypatch):
    monkeypatch.setattr(PL, "empty", lambda xp, shape, dtype: xp.full(shape, np.nan, dtype=dtype))


def _problem(shape, k, pad, dtype, seed):
    """bn_x about 2 with a per-channel mean near it (not its exact mean), a = relu(bn_x - mean): about
    half the pixels masked, and some windows entirely at zero (their winner has a = 0: masked too);
    y, argmax from the max pool's forward of a; dy random."""
    rng = np.random.default_rng(seed)
    bn_x = (2.0 + rng.standard_normal(shape)).astype(dtype)
    mean = (2.0 + 0.1 * rng.standard_normal(shape[3])).astype(np.float32)
    a = np.maximum(bn_x.astype(np.float32) - mean, 0).astype(dtype)
    y, argmax = ref.maxpool2d_forward(a, k, 2, pad)
    dy = rng.standard_normal(y.shape).astype(dtype)
    return dy, argmax.astype(np.int32), y, a, bn_x, mean


def _vector(C, dtype):
    V = 16 // np.dtype(dtype).itemsize
    return 1 if C % V else V


def _thread_blocks(shape, dtype, grid):
    """For each block b of the launch: the (pixel, channel) pairs its threads cover, as pool.cu lays
    them out: thread v = ((n * T2 + t) * U2 + u) * groups + g takes pixels (2t, 2u), (2t, 2u + 1),
    (2t + 1, 2u), (2t + 1, 2u + 1) of image n (those inside) and channels g*V .. g*V + V - 1; block b
    runs v = b * 256 + i, + 256 * grid, ..."""
    N, H, W, C = shape
    V = _vector(C, dtype)
    groups, T2, U2 = C // V, -(-H // 2), -(-W // 2)
    v = np.arange(N * T2 * U2 * groups)
    g, rest = v % groups, v // groups
    u, rest = rest % U2, rest // U2
    t, n = rest % T2, rest // T2
    block = (v // BLOCK) % grid
    trips = -(-len(v) // (BLOCK * grid))
    out = [[] for _ in range(grid)]
    for dh in (0, 1):
        for dw in (0, 1):
            h, w = 2 * t + dh, 2 * u + dw
            inside = (h < H) & (w < W)
            pixel = (n * H + h) * W + w
            for j in range(V):
                for b, p, c in zip(block[inside], pixel[inside], (g * V + j)[inside]):
                    out[b].append((p, c))
    return out, trips, groups


def _check(g, part, dy, argmax, y, a, bn_x, mean, k, pad, backend, fused):
    shape, dtype = a.shape, a.dtype
    N, H, W, C = shape
    assert g.dtype == dtype and g.shape == shape
    assert part.dtype == np.float32 and part.ndim == 3 and part.shape[0] == 2 and part.shape[2] == C
    assert not np.isnan(part).any(), f"unwritten partials: {np.argwhere(np.isnan(part))[:4].tolist()}"
    d = backend.to_device
    plain = backend.to_host(PL.maxpool2d_backward(d(dy), d(argmax), shape, k, 2, pad, version=3))
    np.testing.assert_array_equal(g, np.where(a > 0, plain, np.zeros((), dtype)))      # the mask, bit for bit
    want = np.where(a > 0, ref.maxpool2d_backward(dy.astype(np.float64), argmax, shape, k, 2, pad), 0.0)
    scale = max(np.abs(want).max(), 1e-30)
    assert np.abs(g - want).max() / scale < (F16_OUT if dtype == np.float16 else 1e-6)

    g_rows = g.astype(np.float64).reshape(-1, C)
    terms = np.stack([g_rows, g_rows * (bn_x.astype(np.float64).reshape(-1, C) - mean)])   # [2, M, C]
    if fused:
        blocks, trips, groups = _thread_blocks(shape, dtype, part.shape[1])
        roundings = 4 * trips + BLOCK // groups + 2
        for b, cover in enumerate(blocks):
            want_b = np.zeros((2, C))
            size_b = np.zeros((2, C))
            if cover:
                p, c = np.array(cover).T
                np.add.at(want_b, (slice(None), c), terms[:, p, c])
                np.add.at(size_b, (slice(None), c), np.abs(terms[:, p, c]))
            err = np.abs(part[:, b].astype(np.float64) - want_b)
            bound = roundings * U * size_b
            assert np.all(err <= bound), f"block {b}: error {err.max():.3g} over the bound"
    else:   # the fallback's own blocks: their sum, within a bound for any order of M terms
        M = g_rows.shape[0]
        err = np.abs(part.astype(np.float64).sum(axis=1) - terms.sum(axis=1))
        assert np.all(err <= (M + 2) * U * np.abs(terms).sum(axis=1))


def _fused(shape, dtype):
    C = shape[3]
    return BLOCK % (C // _vector(C, dtype)) == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_relu_bn_epilogue(backend, case, dtype):
    shape, k, pad = case
    dy, argmax, y, a, bn_x, mean = _problem(shape, k, pad, dtype, CASES.index(case))
    d = backend.to_device
    g, part = PL.maxpool2d_backward_relu_bn(d(dy), d(argmax), d(y), d(a), d(bn_x), d(mean), k, 2, pad)
    _check(backend.to_host(g), backend.to_host(part), dy, argmax, y, a, bn_x, mean, k, pad, backend,
           _fused(shape, dtype))


def test_the_stems_shape_takes_the_epilogue_and_finishes_the_batch_norm(monkeypatch):
    """The stem's channels in float16 take the fused kernel (V = 8, 8 groups; on the emulator's
    64-block grid every thread makes several trips, and the bound grows with them), and its partials
    finish the batch norm's backward as float64 sums of g would."""
    from kernels import batchnorm as BN
    shape = (4, 16, 16, 64)
    dy, argmax, y, a, bn_x, mean = _problem(shape, 3, 1, np.float16, 11)
    calls, real = [], PL._kernel
    monkeypatch.setattr(PL, "_kernel", lambda name: (calls.append(name), real(name))[1])
    g, part = PL.maxpool2d_backward_relu_bn(dy, argmax, y, a, bn_x, mean, 3, 2, 1)
    assert calls == ["maxpool2d_backward_blocks_relu_bn_f16x8"]
    _check(g, part, dy, argmax, y, a, bn_x, mean, 3, 1, EMU, True)
    gamma = np.linspace(0.5, 1.5, 64).astype(np.float32)
    invstd = np.full(64, 1.3, np.float32)
    dx, dgamma, dbeta = BN.batchnorm_backward_from_partials(g, bn_x, gamma, mean, invstd, part)
    want = ref.batchnorm_backward_from_partials(g.astype(np.float64), bn_x.astype(np.float64), gamma, mean, invstd,
                                                part.astype(np.float64).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(dbeta, want[2], rtol=1e-5, atol=1e-5 * np.abs(want[2]).max())
    np.testing.assert_allclose(dgamma, want[1], rtol=1e-5, atol=1e-5 * np.abs(want[1]).max())
    np.testing.assert_allclose(dx.astype(np.float64), want[0], rtol=0, atol=2e-3 * np.abs(want[0]).max())


@pytest.mark.parametrize("version", [1, 2])
def test_other_versions_mask_then_read_once_more(version):
    """Versions 1 and 2 (and float16 under version 1, which runs version 2) have no epilogue: their
    backward, then batchnorm_relu_grad_partials; the same g up to the order of adds (version 1's
    atomics), the sums over their own blocks."""
    shape = (2, 10, 10, 16)
    for dtype in (np.float32, np.float16):
        dy, argmax, y, a, bn_x, mean = _problem(shape, 3, 1, dtype, 7)
        g, part = PL.maxpool2d_backward_relu_bn(dy, argmax, y, a, bn_x, mean, 3, 2, 1, version=version)
        v = 2 if version == 1 and dtype == np.float16 else version
        plain = PL.maxpool2d_backward(dy, argmax, shape, 3, 2, 1, version=v)
        np.testing.assert_array_equal(g, np.where(a > 0, plain, np.zeros((), dtype)))
        g_rows = g.astype(np.float64).reshape(-1, 16)
        terms = np.stack([g_rows, g_rows * (bn_x.astype(np.float64).reshape(-1, 16) - mean)])
        err = np.abs(part.astype(np.float64).sum(axis=1) - terms.sum(axis=1))
        assert np.all(err <= (len(g_rows) + 2) * U * np.abs(terms).sum(axis=1))


def test_the_kernel_passes_the_sanitizer(monkeypatch):
    """memcheck, racecheck (the block's shared sums between the barrier's two sides), initcheck and
    synccheck: half blocks of pixels, idle threads past the end, several trips."""
    import kernels
    from kernels.runtime import launch
    monkeypatch.setattr(PL, "empty", launch.empty)
    with kernels.sanitize("all"):
        for shape, dtype in (((3, 9, 11, 16), np.float16), ((2, 12, 12, 64), np.float32)):
            dy, argmax, y, a, bn_x, mean = _problem(shape, 3, 1, dtype, 3)
            g, part = PL.maxpool2d_backward_relu_bn(dy, argmax, y, a, bn_x, mean, 3, 2, 1)
            _check(g, part, dy, argmax, y, a, bn_x, mean, 3, 1, EMU, True)


def test_bad_arguments_are_refused():
    dy, argmax, y, a, bn_x, mean = _problem((1, 8, 8, 8), 3, 1, np.float32, 4)
    call = PL.maxpool2d_backward_relu_bn
    with pytest.raises(ValueError, match="maxpool2d_backward_relu_bn"):
        call(dy, argmax, y[:, :2], a, bn_x, mean, 3, 2, 1)
    with pytest.raises(ValueError, match="maxpool2d_backward_relu_bn"):
        call(dy, argmax, y, a, bn_x[:, :4], mean, 3, 2, 1)
    with pytest.raises(TypeError, match="maxpool2d_backward_relu_bn"):
        call(dy, argmax, y, a.astype(np.float16), bn_x, mean, 3, 2, 1)
    with pytest.raises(ValueError, match="maxpool2d_backward_relu_bn"):
        call(dy, argmax, y, a, bn_x, mean[:4], 3, 2, 1)
    with pytest.raises(ValueError, match="does not match"):
        call(dy, argmax, y, a, bn_x, mean, 3, 2, 0)      # the geometry of another pool
    with pytest.raises(ValueError, match="maxpool2d_backward_relu_bn"):
        ref.maxpool2d_backward_relu_bn(dy, argmax, y[:, :2], a, bn_x, mean, 3, 2, 1)


def test_reference_is_the_pool_backward_then_mask_then_sums():
    dy, argmax, y, a, bn_x, mean = _problem((2, 9, 9, 5), 3, 1, np.float64, 9)
    g, part = ref.maxpool2d_backward_relu_bn(dy, argmax, y, a, bn_x, mean, 3, 2, 1)
    want = np.where(a > 0, ref.maxpool2d_backward(dy, argmax, a.shape, 3, 2, 1), 0.0)
    np.testing.assert_array_equal(g, want)
    rows = want.reshape(-1, 5)
    np.testing.assert_allclose(part[:, 0], np.stack([rows.sum(0), (rows * (bn_x.reshape(-1, 5) - mean)).sum(0)]),
                               rtol=1e-12)


# ---- the head: the global average pool after the last add + ReLU batch norm -------------------------
GAP_CASES = [((2, 7, 7, 64), np.float16), ((3, 3, 3, 16), np.float32), ((2, 2, 2, 3), np.float32),
             ((1, 1, 1, 8), np.float16), ((2, 3, 3, 300), np.float16), ((4, 5, 4, 128), np.float32)]


def _gap_problem(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    bn_x = (2.0 + rng.standard_normal(shape)).astype(dtype)
    mean = (2.0 + 0.1 * rng.standard_normal(shape[3])).astype(np.float32)
    a = np.maximum(bn_x.astype(np.float32) - mean, 0).astype(dtype)
    dy = rng.standard_normal((shape[0], shape[3])).astype(dtype)
    return dy, a, bn_x, mean


@pytest.mark.parametrize("shape,dtype", GAP_CASES, ids=[f"{'x'.join(map(str, s))}-{np.dtype(d).name}"
                                                         for s, d in GAP_CASES])
def test_average_pool_relu_bn_epilogue(backend, shape, dtype):
    """g bit for bit the plain version-3 backward masked where a > 0 (and dy / HW within rounding);
    part one row per image (B = N), each against the float64 sums of g as stored over that image's
    pixels, within the kernel's roundings (a thread's pixels, then its block's rows of threads)."""
    dy, a, bn_x, mean = _gap_problem(shape, dtype, GAP_CASES.index((shape, dtype)))
    d = backend.to_device
    g, part = (backend.to_host(v) for v in PL.global_avgpool_backward_relu_bn(d(dy), d(a), d(bn_x), d(mean)))
    N, H, W, C = shape
    plain = backend.to_host(PL.global_avgpool_backward(d(dy), shape))
    np.testing.assert_array_equal(g, np.where(a > 0, plain, np.zeros((), dtype)))
    want = np.where(a > 0, dy.astype(np.float64)[:, None, None, :] / (H * W), 0.0)
    assert np.abs(g - want).max() <= (F16_OUT if dtype == np.float16 else 1e-6) * max(np.abs(want).max(), 1e-30)
    assert part.dtype == np.float32 and part.shape == (2, N, C) and not np.isnan(part).any()
    V = _vector(C, dtype)
    TY = BLOCK // min(C // V, 32)
    terms = np.stack([g.astype(np.float64), g.astype(np.float64) * (bn_x.astype(np.float64) - mean)])
    for n in range(N):
        image = terms[:, n].reshape(2, -1, C)
        err = np.abs(part[:, n].astype(np.float64) - image.sum(axis=1))
        bound = (-(-(H * W) // TY) + TY + 2) * U * np.abs(image).sum(axis=1)
        assert np.all(err <= bound), n


def test_average_pool_relu_bn_without_version_3():
    """Pool versions 1 and 2: the plain backward, then batchnorm_relu_grad_partials; the same g."""
    from kernels import versions
    dy, a, bn_x, mean = _gap_problem((2, 3, 3, 16), np.float32, 5)
    with versions.running("pool", 2):
        g, part = PL.global_avgpool_backward_relu_bn(dy, a, bn_x, mean)
    np.testing.assert_array_equal(g, np.where(a > 0, PL.global_avgpool_backward(dy, a.shape), 0).astype(np.float32))
    terms = np.stack([g.astype(np.float64), g.astype(np.float64) * (bn_x - mean)]).reshape(2, -1, 16)
    assert np.all(np.abs(part.astype(np.float64).sum(axis=1) - terms.sum(axis=1))
                  <= (terms.shape[1] + 2) * U * np.abs(terms).sum(axis=1))


def test_average_pool_relu_bn_passes_the_sanitizer(monkeypatch):
    import kernels
    from kernels.runtime import launch
    monkeypatch.setattr(PL, "empty", launch.empty)
    for shape, dtype in (((2, 3, 3, 300), np.float16), ((3, 3, 3, 16), np.float32)):
        dy, a, bn_x, mean = _gap_problem(shape, dtype, 8)
        with kernels.sanitize("all"):
            g, part = PL.global_avgpool_backward_relu_bn(dy, a, bn_x, mean)
        np.testing.assert_array_equal(g, np.where(a > 0, PL.global_avgpool_backward(dy, shape), np.zeros((), dtype)))


def test_average_pool_relu_bn_refuses_bad_arguments():
    dy, a, bn_x, mean = _gap_problem((2, 3, 3, 8), np.float32, 6)
    call = PL.global_avgpool_backward_relu_bn
    with pytest.raises(ValueError, match="global_avgpool_backward_relu_bn"):
        call(dy[:1], a, bn_x, mean)
    with pytest.raises(ValueError, match="global_avgpool_backward_relu_bn"):
        call(dy, a, bn_x[:1], mean)
    with pytest.raises(TypeError, match="global_avgpool_backward_relu_bn"):
        call(dy, a.astype(np.float16), bn_x, mean)
    g, part = ref.global_avgpool_backward_relu_bn(dy.astype(np.float64), a, bn_x.astype(np.float64), mean)
    np.testing.assert_array_equal(g, np.where(a > 0, ref.global_avgpool_backward(dy.astype(np.float64), a.shape), 0))
    assert part.shape == (2, 1, 8)
