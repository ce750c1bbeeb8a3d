"""kernels.conv.conv2d_backward_data_relu_bn: the backward data of a convolution whose input is
a = relu(batchnorm(bn_x)), with the ReLU's mask and the batch norm's backward partial sums in the
epilogue of versions 3 to 5 (conv.cu, "The batch norm's backward in the backward-data epilogue").

Checked against independent float64 sums: g is bit for bit the plain backward data of the same
version where a > 0 and zero elsewhere (and within the version's tolerance of the float64
reference); every block's partials, laid out as the docstring says (64-pixel tiles; version 5 per
stride phase, phase-major), equal the float64 sums of g as stored over that block's pixels within
the header's bound of 20 roundings per term.  The outputs start as NaN (every test), so an entry no
block writes (a missing zero partial of an empty version-5 tile) fails.  Shapes: ResNet-50's conv2
(3x3, stride 1 and the v1.5 stride 2) and conv3 (1x1 expand, K = 4 C) at emulator size, 1x1
stride 2, awkward channel counts (3, 12, 67: the epilogue's element path), one-pixel images and
row counts that are no multiple of 64.  Versions 1 and 2 (no epilogue: batch norm's
batchnorm_relu_grad_partials reads da once more) give the same g and sums over their own blocks.
Each test runs on the CPU emulator and, with a GPU, on it.
"""

import numpy as np
import pytest

from kernels import conv as CV
from kernels import reference as ref
from tests.conftest import Backend

U = 2.0 ** -24      # float32's unit roundoff
ROUNDINGS = 20      # per term of a tile's sum (conv.cu's header: version 3, 2 + 3 + 15; versions 4/5, 2 + 7 + 7)
TILE = 64
F16_OUT = 2e-3      # a float16 result, rounded once
F32_OUT = 1e-5      # float32 sums of products
EPILOGUE_VERSIONS = (3, 4, 5)
EMU = Backend("emu")

# (x shape NHWC, w shape OIHW, stride, padding)
CASES = [
    ((2, 6, 6, 16), (16, 16, 3, 3), 1, 1),     # conv2, stride 1: 72 rows, a full tile and a ragged one
    ((2, 11, 11, 16), (16, 16, 3, 3), 2, 1),   # conv2, stride 2 (v1.5): 242 rows; v5's phases of 72, 60, 60, 50
    ((2, 6, 6, 16), (64, 16, 1, 1), 1, 0),     # conv3, the 1x1 expand: K = 4 C
    ((3, 9, 9, 8), (16, 8, 1, 1), 2, 0),       # 1x1 stride 2: v5's phase (0, 0) has 2 tiles, the others' 2nd is empty
    ((3, 1, 1, 8), (32, 8, 1, 1), 2, 0),       # one-pixel images, stride 2: v5's phases 1-3 have no pixel at all
    ((1, 1, 1, 8), (5, 8, 3, 3), 1, 1),        # one pixel through a 3x3 filter: one row
    ((2, 7, 7, 3), (8, 3, 3, 3), 1, 1),        # C = 3: the element-by-element epilogue
    ((2, 5, 5, 12), (8, 12, 3, 3), 2, 1),      # C = 12: 8-byte vectors in the epilogue, none in the loads
    ((1, 8, 8, 67), (9, 67, 3, 3), 1, 1),      # C = 67: two column tiles, the second of 3 columns; 64 rows
]
IDS = [f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}-s{s}-p{p}" for x, w, s, p in CASES]


@pytest.fixture(autouse=True)
def _outputs_start_as_nan(monkeypatch):
    """conv.py's outputs (g, part) filled with NaN before the launch: whatever no block writes stays NaN."""
    monkeypatch.setattr(CV, "empty", lambda xp, shape, dtype: xp.full(shape, np.nan, dtype=dtype))


def _dtype(version):
    return np.float16 if version in CV.F16_VERSIONS else np.float32


def _problem(case, seed, dtype):
    """dy, w (float32 master), a, bn_x, bn_mean: bn_x about 2 with a per-channel mean bn_mean (not
    bn_x's exact mean, as a batch's statistics need not be), a = relu(bn_x - bn_mean): about half the
    gradient masked, and a mean large beside the spread (a sum that forgot it would be far off)."""
    xs, ws, stride, pad = case
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(ws) / np.sqrt(ws[1] * ws[2] * ws[3])).astype(np.float32)
    y_shape = ref.conv2d_forward(np.zeros(xs), np.zeros(ws), stride, pad).shape
    dy = rng.standard_normal(y_shape).astype(dtype)
    bn_x = (2.0 + rng.standard_normal(xs)).astype(dtype)
    bn_mean = (2.0 + 0.1 * rng.standard_normal(xs[3])).astype(np.float32)
    a = np.maximum(bn_x.astype(np.float32) - bn_mean, 0).astype(dtype)
    return dy, w, a, bn_x, bn_mean


def _blocks(x_shape, stride, version):
    """The pixels (flat indices n*H*W + h*W + w) of each block b of part, as conv.py's docstring lays
    them out: 64-pixel tiles of the NHWC order (versions 3, 4), or per stride phase, phase-major,
    tiles of the phase's pixels (n, hh, ww) in that order (version 5; a tile past them is empty)."""
    N, H, W, _ = x_shape
    pixels = np.arange(N * H * W).reshape(N, H, W)
    if version != 5:
        return [pixels.ravel()[i:i + TILE] for i in range(0, N * H * W, TILE)]
    tiles = -(-(N * -(-H // stride) * -(-W // stride)) // TILE)
    out = []
    for ph in range(stride):
        for pw in range(stride):
            phase = pixels[:, ph::stride, pw::stride].ravel()
            out += [phase[t * TILE:(t + 1) * TILE] for t in range(tiles)]
    return out


def _check(g, part, dy, w, a, bn_x, bn_mean, x_shape, stride, pad, version, backend, dz=None):
    """g and part of `version` against the plain backward data and float64 sums (module docstring);
    dz: the other consumer's gradient, added to da as stored (da + dz rounded to the dtype)."""
    d = backend.to_device
    C = x_shape[3]
    dtype = _dtype(version)
    assert g.dtype == dtype and g.shape == x_shape
    assert part.dtype == np.float32 and part.ndim == 3 and part.shape[0] == 2 and part.shape[2] == C
    assert not np.isnan(part).any(), f"unwritten partials: {np.argwhere(np.isnan(part))[:4].tolist()}"
    da = backend.to_host(CV.conv2d_backward_data(d(dy), CV.conv_weight(d(w), dtype), x_shape, stride, pad,
                                                 version=version))
    if dz is not None:
        da = (da + dz).astype(dtype)
    np.testing.assert_array_equal(g, np.where(a > 0, da, np.zeros((), dtype)))   # the mask, bit for bit
    want = ref.conv2d_backward_data(dy.astype(np.float64), w.astype(dtype).astype(np.float64), x_shape, stride, pad)
    want = np.where(a > 0, want if dz is None else want + dz, 0.0)
    scale = max(np.abs(want).max(), 1e-30)
    assert np.abs(g - want).max() / scale < (F16_OUT if dtype == np.float16 else F32_OUT)

    g_rows = g.astype(np.float64).reshape(-1, C)
    terms = np.stack([g_rows, g_rows * (bn_x.astype(np.float64).reshape(-1, C) - bn_mean)])   # [2, M, C]
    if version in EPILOGUE_VERSIONS:
        blocks = _blocks(x_shape, stride, version)
        assert part.shape[1] == len(blocks)
        for b, rows in enumerate(blocks):
            want_b = terms[:, rows].sum(axis=1)
            bound = ROUNDINGS * U * np.abs(terms[:, rows]).sum(axis=1)
            err = np.abs(part[:, b].astype(np.float64) - want_b)
            assert np.all(err <= bound), (f"block {b} ({len(rows)} pixels): error {err.max():.3g}, "
                                          f"bound {bound[err > bound].min():.3g}")
    else:   # another split into blocks: their sum, within a bound for any order of M terms
        M = g_rows.shape[0]
        err = np.abs(part.astype(np.float64).sum(axis=1) - terms.sum(axis=1))
        assert np.all(err <= (M + 2) * U * np.abs(terms).sum(axis=1))


@pytest.mark.parametrize("version", EPILOGUE_VERSIONS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_relu_bn_epilogue(backend, case, version):
    xs, _, stride, pad = case
    dy, w, a, bn_x, bn_mean = _problem(case, CASES.index(case), _dtype(version))
    d = backend.to_device
    g, part = CV.conv2d_backward_data_relu_bn(d(dy), CV.conv_weight(d(w), _dtype(version)), xs, stride, pad, d(a),
                                              d(bn_x), d(bn_mean), version=version)
    _check(backend.to_host(g), backend.to_host(part), dy, w, a, bn_x, bn_mean, xs, stride, pad, version, backend)


@pytest.mark.parametrize("version", (1, 2, 3, 4, 5))
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6]], ids=[IDS[1], IDS[2], IDS[6]])
def test_relu_bn_adds_the_shortcut_gradient(backend, case, version):
    """dz (a's gradient from an identity shortcut) is added to da before the mask, in the epilogue
    of versions 3-5 (the vector path at C = 16, the element path at C = 3) and by an add kernel in
    versions 1 and 2: g and the partials then are those of the sum."""
    xs, _, stride, pad = case
    dy, w, a, bn_x, bn_mean = _problem(case, 5, _dtype(version))
    dz = np.random.default_rng(6).standard_normal(xs).astype(_dtype(version))
    d = backend.to_device
    g, part = CV.conv2d_backward_data_relu_bn(d(dy), CV.conv_weight(d(w), _dtype(version)), xs, stride, pad, d(a),
                                              d(bn_x), d(bn_mean), d(dz), version=version)
    _check(backend.to_host(g), backend.to_host(part), dy, w, a, bn_x, bn_mean, xs, stride, pad, version, backend, dz)


@pytest.mark.parametrize("version", (1, 2))
@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=[IDS[1], IDS[6]])
def test_relu_bn_without_the_epilogue(backend, case, version):
    """Versions 1 and 2 compute da, then batch norm's batchnorm_relu_grad_partials reads it once more."""
    xs, _, stride, pad = case
    dy, w, a, bn_x, bn_mean = _problem(case, 1, np.float32)
    d = backend.to_device
    g, part = CV.conv2d_backward_data_relu_bn(d(dy), d(w), xs, stride, pad, d(a), d(bn_x), d(bn_mean),
                                              version=version)
    _check(backend.to_host(g), backend.to_host(part), dy, w, a, bn_x, bn_mean, xs, stride, pad, version, backend)


@pytest.mark.parametrize("arch", ["sm_60", "sm_70"])
def test_relu_bn_epilogue_built_for_older_gpus(arch):
    """The float16 epilogue after the FMA tiles of sm_60 and the synchronous loads of sm_70."""
    with CV.emulate_arch(arch):
        for case in (CASES[1], CASES[6]):
            xs, _, stride, pad = case
            dy, w, a, bn_x, bn_mean = _problem(case, 2, np.float16)
            for version in CV.F16_VERSIONS:
                g, part = CV.conv2d_backward_data_relu_bn(dy, CV.conv_weight(w, np.float16), xs, stride, pad, a,
                                                          bn_x, bn_mean, version=version)
                _check(g, part, dy, w, a, bn_x, bn_mean, xs, stride, pad, version, EMU)


def test_relu_bn_kernels_pass_the_sanitizer(monkeypatch):
    """memcheck, racecheck, initcheck and synccheck on the epilogues: ragged rows and columns, the
    element path (C = 3), version 5's empty tiles and phases."""
    import kernels
    from kernels.runtime import launch
    monkeypatch.setattr(CV, "empty", launch.empty)   # initcheck's own "uninitialised" outputs
    with kernels.sanitize("all"):
        for case in (CASES[3], CASES[4], CASES[6]):
            xs, _, stride, pad = case
            for version in EPILOGUE_VERSIONS:
                dy, w, a, bn_x, bn_mean = _problem(case, 3, _dtype(version))
                g, part = CV.conv2d_backward_data_relu_bn(dy, CV.conv_weight(w, _dtype(version)), xs, stride, pad, a,
                                                          bn_x, bn_mean, version=version)
                _check(g, part, dy, w, a, bn_x, bn_mean, xs, stride, pad, version, EMU)


def test_relu_bn_rejects_bad_arguments():
    xs = (1, 5, 5, 8)
    dy, w, a, bn_x, bn_mean = _problem((xs, (4, 8, 3, 3), 1, 1), 4, np.float16)
    wk = CV.conv_weight(w, np.float16)
    call = CV.conv2d_backward_data_relu_bn
    with pytest.raises(ValueError, match="a must have x_shape"):
        call(dy, wk, xs, 1, 1, a[:, :4], bn_x, bn_mean)
    with pytest.raises(ValueError, match="bn_x must have x_shape"):
        call(dy, wk, xs, 1, 1, a, np.ascontiguousarray(bn_x[..., :4]), bn_mean)
    with pytest.raises(TypeError, match="bn_x must be float16"):
        call(dy, wk, xs, 1, 1, a, bn_x.astype(np.float32), bn_mean)
    with pytest.raises(TypeError, match="bn_mean must be float32"):
        call(dy, wk, xs, 1, 1, a, bn_x, bn_mean.astype(np.float16))
    with pytest.raises(ValueError, match="bn_mean must have shape"):
        call(dy, wk, xs, 1, 1, a, bn_x, bn_mean[:4])
    with pytest.raises(ValueError, match="dz must have x_shape"):
        call(dy, wk, xs, 1, 1, a, bn_x, bn_mean, a[:, :4])
    with pytest.raises(TypeError, match="dz must be float16"):
        call(dy, wk, xs, 1, 1, a, bn_x, bn_mean, a.astype(np.float32))
    with pytest.raises(ValueError, match="dy must have shape"):
        call(dy[:, :4], wk, xs, 1, 1, a, bn_x, bn_mean)
    with pytest.raises(TypeError, match="version 3 of conv computes on float32"):
        call(dy, wk, xs, 1, 1, a, bn_x, bn_mean, version=3)
