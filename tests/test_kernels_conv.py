"""kernels/conv.cu through kernels/conv.py: forward, backward-data and backward-weight, every
version, against kernels.reference in float64 at awkward shapes (batch 1, odd channel counts,
1x1 and 7x7 images, stride 2 on odd sizes, padding wider than the kernel's half-width, 1x1 /
3x3 / 7x7 filters), the backward passes also against central finite differences, and the checks
on bad input.  The float16 (tensor-core) versions against the float64 reference of their
float16-rounded inputs (a float16 result may differ by its one rounding, 2^-11; a float32 weight
gradient by float32 summation), also built for sm_60 (no tensor cores) and sm_70 (no async
copies) on the emulator.  (tests/test_compile.py compiles them for real GPUs: no register spills.)

Each test runs on the CPU emulator and, where a GPU is present, on the GPU (`backend` fixture).
"""

import numpy as np
import pytest

from kernels import batchnorm as BN
from kernels import conv as CV
from kernels import reference as ref
from kernels import versions
from kernels.runtime.raw import RawKernel

F32_VERSIONS = tuple(v for v in versions.numbers("conv") if v not in CV.F16_VERSIONS)

# (x shape NHWC, w shape OIHW, stride, padding)
CASES = [
    ((1, 7, 7, 3), (5, 3, 3, 3), 1, 1),      # batch 1, 3 channels, 7x7 image, 3x3 "same"
    ((2, 9, 9, 5), (7, 5, 3, 3), 2, 2),      # stride 2 on an odd size, padding > half-width
    ((1, 7, 7, 7), (4, 7, 7, 7), 2, 3),      # 7x7 filter on a 7x7 image
    ((2, 5, 6, 4), (3, 4, 1, 1), 2, 0),      # 1x1 stride 2 (the downsample), non-square image
    ((1, 1, 1, 3), (2, 3, 1, 1), 1, 0),      # 1x1 image, 1x1 filter
    ((1, 1, 1, 5), (3, 5, 3, 3), 1, 1),      # 1x1 image, 3x3 filter: only the centre tap lands
    ((2, 11, 11, 3), (70, 3, 7, 7), 2, 3),   # the stem's 7x7/2, more than one 64-wide tile of K
    ((1, 8, 8, 67), (9, 67, 3, 3), 1, 2),    # more than one tile of C (backward data's N)
    ((1, 3, 4, 2), (2, 2, 3, 3), 3, 4),      # padding wider than the kernel, stride 3
]
IDS = [f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}-s{s}-p{p}" for x, w, s, p in CASES]


def _rel_err(got, want):
    scale = max(np.abs(want).max(), 1e-30)
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / scale)


def _problem(case, seed):
    xs, ws, stride, pad = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    y_shape = ref.conv2d_forward(np.zeros(xs), np.zeros(ws), stride, pad).shape
    dy = rng.standard_normal(y_shape).astype(np.float32)
    return x, w, dy, stride, pad


@pytest.mark.parametrize("version", F32_VERSIONS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conv2d_matches_reference(backend, version, case):
    x, w, dy, stride, pad = _problem(case, seed=CASES.index(case))
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    d = backend.to_device

    y = backend.to_host(CV.conv2d_forward(d(x), d(w), stride, pad, version=version))
    want = ref.conv2d_forward(x64, w64, stride, pad)
    assert y.shape == want.shape and y.dtype == np.float32
    assert _rel_err(y, want) < 1e-5, f"forward {version}: {_rel_err(y, want):.2e}"

    dx = backend.to_host(CV.conv2d_backward_data(d(dy), d(w), x.shape, stride, pad, version=version))
    want = ref.conv2d_backward_data(dy64, w64, x.shape, stride, pad)
    assert dx.shape == x.shape
    assert _rel_err(dx, want) < 1e-5, f"backward data {version}: {_rel_err(dx, want):.2e}"

    # the weight as a training step hands it over (conv_weight: channels-last memory): the same results
    wk = CV.conv_weight(d(w), np.float32)
    np.testing.assert_array_equal(backend.to_host(CV.conv2d_forward(d(x), wk, stride, pad, version=version)), y)
    np.testing.assert_array_equal(
        backend.to_host(CV.conv2d_backward_data(d(dy), wk, x.shape, stride, pad, version=version)), dx)

    dw = backend.to_host(CV.conv2d_backward_weight(d(x), d(dy), w.shape, stride, pad, version=version))
    want = ref.conv2d_backward_weight(x64, dy64, w.shape, stride, pad)
    assert dw.shape == w.shape
    assert _rel_err(dw, want) < 1e-5, f"backward weight {version}: {_rel_err(dw, want):.2e}"


@pytest.mark.parametrize("split_k", [1, 2, 3, 7, 1000])
def test_backward_weight_split_k(backend, split_k):
    # N*P*Q = 2*9*9 = 162 reduction indices: 11 steps of 16, so 3 and 7 splits leave ragged ends
    x, w, dy, stride, pad = _problem(((2, 9, 9, 5), (7, 5, 3, 3), 1, 1), seed=3)
    dw = CV.conv2d_backward_weight(backend.to_device(x), backend.to_device(dy), w.shape, stride, pad,
                                   split_k=split_k)
    want = ref.conv2d_backward_weight(x.astype(np.float64), dy.astype(np.float64), w.shape, stride, pad)
    assert _rel_err(backend.to_host(dw), want) < 1e-5


def _finite_difference_gradients(x, w, g, stride, pad, eps=1e-6):
    """(dL/dx, dL/dw) of L = sum(conv2d_forward(x, w) * g): central differences of the float64
    reference forward, at the values of x, w and g (any dtype) in float64."""
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))

    def numeric(arr):
        grad = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + eps
            up = np.sum(ref.conv2d_forward(x64, w64, stride, pad) * g64)
            arr[i] = old - eps
            down = np.sum(ref.conv2d_forward(x64, w64, stride, pad) * g64)
            arr[i] = old
            grad[i] = (up - down) / (2 * eps)
        return grad

    return numeric(x64), numeric(w64)


@pytest.mark.parametrize("case", [((1, 5, 5, 3), (2, 3, 3, 3), 1, 1), ((2, 5, 4, 2), (3, 2, 3, 3), 2, 2),
                                  ((1, 4, 4, 3), (2, 3, 1, 1), 2, 0)])
def test_backward_matches_finite_differences(backend, case):
    """Gradients of L = sum(conv2d_forward(x, w) * g): central differences of the float64
    reference forward, against every version of the kernels' backward passes."""
    x, w, g, stride, pad = _problem(case, seed=7)
    num_dx, num_dw = _finite_difference_gradients(x, w, g, stride, pad)
    d = backend.to_device
    for version in F32_VERSIONS:
        dx = backend.to_host(CV.conv2d_backward_data(d(g), d(w), x.shape, stride, pad, version=version))
        dw = backend.to_host(CV.conv2d_backward_weight(d(x), d(g), w.shape, stride, pad, version=version))
        assert _rel_err(dx, num_dx) < 1e-5, f"{version} dx vs finite differences: {_rel_err(dx, num_dx):.2e}"
        assert _rel_err(dw, num_dw) < 1e-5, f"{version} dw vs finite differences: {_rel_err(dw, num_dw):.2e}"


def test_permute_weight(backend):
    w = np.random.default_rng(8).standard_normal((5, 3, 7, 2)).astype(np.float32)
    for perm in [(0, 2, 3, 1), (2, 3, 0, 1), (0, 3, 1, 2), (3, 2, 1, 0)]:
        got = backend.to_host(CV.permute_weight(backend.to_device(w), perm))
        np.testing.assert_array_equal(got, w.transpose(perm))


@pytest.mark.gpu
def test_resnet_like_layers_on_gpu(backend):
    if backend.name != "cuda":
        pytest.skip("larger shapes only on the GPU")
    for case in [((8, 28, 28, 64), (128, 64, 3, 3), 2, 1), ((4, 56, 56, 64), (256, 64, 1, 1), 1, 0),
                 ((2, 64, 64, 3), (64, 3, 7, 7), 2, 3)]:
        x, w, dy, stride, pad = _problem(case, seed=9)
        x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
        d = backend.to_device
        for version in ("implicit_gemm", "im2col"):
            y = backend.to_host(CV.conv2d_forward(d(x), d(w), stride, pad, version=version))
            assert _rel_err(y, ref.conv2d_forward(x64, w64, stride, pad)) < 1e-5
            dx = backend.to_host(CV.conv2d_backward_data(d(dy), d(w), x.shape, stride, pad, version=version))
            assert _rel_err(dx, ref.conv2d_backward_data(dy64, w64, x.shape, stride, pad)) < 1e-5
            dw = backend.to_host(CV.conv2d_backward_weight(d(x), d(dy), w.shape, stride, pad, version=version))
            assert _rel_err(dw, ref.conv2d_backward_weight(x64, dy64, w.shape, stride, pad)) < 1e-5


# ------------------------------------------------------------------ float16: tensor cores
F16_CASES = [
    ((1, 7, 7, 3), (5, 3, 3, 3), 1, 1),      # 3 channels: the element-by-element gather (the stem's)
    ((2, 9, 9, 8), (16, 8, 3, 3), 2, 2),     # 16-byte vectors, stride 2 on an odd size, padding > half-width
    ((2, 5, 6, 16), (72, 16, 1, 1), 2, 0),   # 1x1 stride 2 (the downsample), K past one 64-wide tile
    ((1, 8, 8, 67), (9, 67, 3, 3), 1, 2),    # odd C past one tile of backward data's 64 columns
    ((2, 11, 11, 3), (8, 3, 7, 7), 2, 3),    # the stem's 7x7/2 with 3 channels
    ((1, 1, 1, 8), (3, 8, 3, 3), 1, 1),      # 1x1 image, 3x3 filter: only the centre tap lands
    ((1, 3, 4, 8), (8, 8, 3, 3), 3, 4),      # padding wider than the kernel, stride 3
]
F16_IDS = [f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}-s{s}-p{p}" for x, w, s, p in F16_CASES]
F16_OUT = 2e-3     # a float16 result, rounded once: at most 2^-11 of its size off
F32_SUM = 1e-5     # float32 sums of (exact) products of halves


def _problem16(case, seed):
    x, w, dy, stride, pad = _problem(case, seed)
    return x.astype(np.float16), (w * 0.3).astype(np.float32), dy.astype(np.float16), stride, pad


@pytest.mark.parametrize("version", CV.F16_VERSIONS)
@pytest.mark.parametrize("case", F16_CASES, ids=F16_IDS)
def test_f16_conv2d_matches_reference(backend, version, case):
    x, w32, dy, stride, pad = _problem16(case, seed=F16_CASES.index(case))
    d = backend.to_device
    w16 = w32.astype(np.float16)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w16, dy))
    wk = CV.conv_weight(d(w32), np.float16)           # the float32 master, cast once: channels-last memory
    assert wk.dtype == np.float16 and wk.shape == w32.shape and wk.transpose(0, 2, 3, 1).flags.c_contiguous
    np.testing.assert_array_equal(backend.to_host(wk), w16)

    want = ref.conv2d_forward(x64, w64, stride, pad)
    for w in (wk, d(w16)):                            # as conv_weight gives it, and plain OIHW
        y = backend.to_host(CV.conv2d_forward(d(x), w, stride, pad, version=version))
        assert y.dtype == np.float16 and y.shape == want.shape
        assert _rel_err(y, want) < F16_OUT, f"forward: {_rel_err(y, want):.2e}"

    want = ref.conv2d_backward_data(dy64, w64, x.shape, stride, pad)
    for w in (wk, d(w16)):
        dx = backend.to_host(CV.conv2d_backward_data(d(dy), w, x.shape, stride, pad, version=version))
        assert dx.dtype == np.float16 and dx.shape == x.shape
        assert _rel_err(dx, want) < F16_OUT, f"backward data: {_rel_err(dx, want):.2e}"

    want = ref.conv2d_backward_weight(x64, dy64, w32.shape, stride, pad)
    dw = backend.to_host(CV.conv2d_backward_weight(d(x), d(dy), w32.shape, stride, pad, version=version,
                                                   dtype=np.float32))
    assert dw.dtype == np.float32 and dw.shape == w32.shape
    assert _rel_err(dw, want) < F32_SUM, f"backward weight (float32): {_rel_err(dw, want):.2e}"
    dw = backend.to_host(CV.conv2d_backward_weight(d(x), d(dy), w32.shape, stride, pad, version=version))
    assert dw.dtype == np.float16
    assert _rel_err(dw, want) < F16_OUT, f"backward weight (float16): {_rel_err(dw, want):.2e}"


@pytest.mark.parametrize("split_k", [1, 2, 3, 7, 1000])
def test_f16_backward_weight_split_k(backend, split_k):
    # N*P*Q = 2*13*13 = 338 reduction indices: 6 steps of 64, so 4 and 7 splits leave ragged ends;
    # R*S*C = 9*8 = 72 columns of dw: two tiles, the second nearly empty
    x, w32, dy, stride, pad = _problem16(((2, 13, 13, 8), (5, 8, 3, 3), 1, 1), seed=3)
    want = ref.conv2d_backward_weight(x.astype(np.float64), dy.astype(np.float64), w32.shape, stride, pad)
    for version in CV.F16_VERSIONS:
        for dtype in (np.float32, np.float16):
            dw = CV.conv2d_backward_weight(backend.to_device(x), backend.to_device(dy), w32.shape, stride, pad,
                                           version=version, split_k=split_k, dtype=dtype)
            assert _rel_err(backend.to_host(dw), want) < (F32_SUM if dtype == np.float32 else F16_OUT)


@pytest.mark.parametrize("case", [((1, 5, 5, 8), (2, 8, 3, 3), 1, 1), ((2, 5, 4, 3), (3, 3, 3, 3), 2, 2),
                                  ((1, 4, 4, 8), (8, 8, 1, 1), 2, 0)])
def test_f16_backward_matches_finite_differences(backend, case):
    """Gradients of L = sum(conv2d_forward(x, w) * g) for the float16-rounded x, w and g: central
    differences of the float64 reference forward, against the float16 versions' backward passes."""
    x, w32, g, stride, pad = _problem16(case, seed=7)
    num_dx, num_dw = _finite_difference_gradients(x, w32.astype(np.float16), g, stride, pad)
    d = backend.to_device
    wk = CV.conv_weight(d(w32), np.float16)
    for version in CV.F16_VERSIONS:
        dx = backend.to_host(CV.conv2d_backward_data(d(g), wk, x.shape, stride, pad, version=version))
        dw = backend.to_host(CV.conv2d_backward_weight(d(x), d(g), w32.shape, stride, pad, version=version,
                                                       dtype=np.float32))
        assert _rel_err(dx, num_dx) < F16_OUT, f"{version} dx vs finite differences: {_rel_err(dx, num_dx):.2e}"
        assert _rel_err(dw, num_dw) < F32_SUM, f"{version} dw vs finite differences: {_rel_err(dw, num_dw):.2e}"


@pytest.mark.parametrize("arch", ["sm_60", "sm_70"])
def test_f16_kernels_built_for_older_gpus(arch):
    """On the emulator, conv.cu built for sm_60 multiplies the float16 tiles with float FMAs (no
    tensor cores: float16 storage, float32 math) and for sm_70 loads them without async copies."""
    with CV.emulate_arch(arch):
        for case in (F16_CASES[0], F16_CASES[3]):
            x, w32, dy, stride, pad = _problem16(case, seed=11)
            x64, w64, dy64 = x.astype(np.float64), w32.astype(np.float16).astype(np.float64), dy.astype(np.float64)
            wk = CV.conv_weight(w32, np.float16)
            for version in CV.F16_VERSIONS:
                y = CV.conv2d_forward(x, wk, stride, pad, version=version)
                assert _rel_err(y, ref.conv2d_forward(x64, w64, stride, pad)) < F16_OUT
                dx = CV.conv2d_backward_data(dy, wk, x.shape, stride, pad, version=version)
                assert _rel_err(dx, ref.conv2d_backward_data(dy64, w64, x.shape, stride, pad)) < F16_OUT
                dw = CV.conv2d_backward_weight(x, dy, w32.shape, stride, pad, version=version, split_k=2,
                                               dtype=np.float32)
                assert _rel_err(dw, ref.conv2d_backward_weight(x64, dy64, w32.shape, stride, pad)) < F32_SUM


def test_conv_weight_is_channels_last_memory(backend):
    w = np.random.default_rng(8).standard_normal((70, 33, 3, 3)).astype(np.float32)   # C past 32: 2 blocks
    for src in (w, w.astype(np.float16)):
        wk = CV.conv_weight(backend.to_device(src), np.float16)
        assert wk.shape == w.shape and wk.transpose(0, 2, 3, 1).flags.c_contiguous
        np.testing.assert_array_equal(backend.to_host(wk), w.astype(np.float16))
        assert CV.conv_weight(wk, np.float16) is wk                      # already in that form: no launch
    wk = CV.conv_weight(backend.to_device(w), np.float32)                # float32: channels last too
    assert wk.shape == w.shape and wk.transpose(0, 2, 3, 1).flags.c_contiguous
    np.testing.assert_array_equal(backend.to_host(wk), w)
    assert CV.conv_weight(wk, np.float32) is wk
    w1 = backend.to_device(w[:, :, :1, :1].copy())                       # 1x1: OIHW is channels last
    assert CV.conv_weight(w1, np.float32) is w1
    with pytest.raises(ValueError, match="C-contiguous"):
        CV.conv_weight(backend.to_device(w).transpose(1, 0, 2, 3), np.float32)


def _conflicts(launch):
    m = launch.metrics
    return (m["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"]
            + m["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"])


@pytest.mark.parametrize("case", [((2, 12, 12, 16), (16, 16, 3, 3), 1, 1), ((2, 12, 12, 16), (128, 16, 1, 1), 2, 0),
                                  ((2, 12, 12, 16), (16, 16, 3, 3), 2, 1)], ids=["3x3", "1x1-s2", "3x3-s2"])
def test_f16_tiles_are_coalesced_and_conflict_free(case):
    """kernels.profile() on the emulator (bench/NOTES.md, "Tensor-core convolutions"): with channels
    in 16-byte vectors every global load and store of the tensor-core versions, the split-K reduce
    and the weight cast uses all the bytes of the sectors it moves, and no shared-memory access of
    their tiles meets a bank conflict."""
    import kernels
    x, w32, dy, stride, pad = _problem16(case, seed=12)
    for version in CV.F16_VERSIONS:
        with kernels.profile() as prof:
            wk = CV.conv_weight(w32, np.float16)
            CV.conv2d_forward(x, wk, stride, pad, version=version)
            CV.conv2d_backward_data(dy, wk, x.shape, stride, pad, version=version)
            for split_k in (1, 2):   # dw written by the GEMM itself, and through the workspace + reduce
                CV.conv2d_backward_weight(x, dy, w32.shape, stride, pad, version=version, split_k=split_k,
                                          dtype=np.float32)
        names = [launch.kernel for launch in prof.launches]
        assert "conv2d_bwd_weight_reduce_oihw_f32" in names and "conv_weight_f32_to_krsc_f16" in names
        for launch in prof.launches:
            d = launch.derived
            assert _conflicts(launch) == 0, (version, launch.kernel)
            assert d["global_ld_efficiency"] == 100.0, (version, launch.kernel, d)
            if launch.kernel.startswith("conv2d_bwd_weight_wmma") and launch.grid[2] == 1 and w32.shape[2] > 1:
                continue   # one split writes dw in OIHW order itself, R*S floats apart (small: the weights)
            assert d["global_st_efficiency"] == 100.0, (version, launch.kernel, d)


def test_f16_stem_gathers_its_3_channels_from_few_sectors():
    """The stem's 3 channels (no 16-byte vectors): the forward's lanes load consecutive reduction
    indices, so a warp's 2-byte loads share sectors (a lane per 8 of them read 1 in 8 bytes: 12.5%)."""
    import kernels
    x, w32, dy, stride, pad = _problem16(((1, 32, 32, 3), (64, 3, 7, 7), 2, 3), seed=13)
    wk = CV.conv_weight(w32, np.float16)
    for version in CV.F16_VERSIONS:
        with kernels.profile() as prof:
            CV.conv2d_forward(x, wk, stride, pad, version=version)
        (launch,) = prof.launches
        assert launch.derived["global_ld_efficiency"] > 50, launch.derived
        shared = launch.metrics["smsp__inst_executed_op_shared_ld.sum"] + launch.metrics["smsp__inst_executed_op_shared_st.sum"]
        assert _conflicts(launch) < 0.02 * shared, (_conflicts(launch), shared)


def test_fast_division_by_an_invariant_divisor():
    """common.cuh's FastDiv: n / d and n % d by multiply-shift, for the divisors the kernels use and
    a few awkward ones, on numerators up to 2^31 - 1."""
    src = r"""#include "common.cuh"
    extern "C" __global__ void divide(const int* n, const int* d, int* q, int* r, int count, int divisors) {
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count * divisors; i += blockDim.x * gridDim.x) {
            const FastDiv f = make_fastdiv(d[i / count]);
            fast_divmod(n[i % count], f, q[i], r[i]);
        }
    }"""
    from kernels.runtime.raw import KERNEL_DIR
    kernel = RawKernel(src, "divide", options=("-I", str(KERNEL_DIR)))
    rng = np.random.default_rng(0)
    n = np.concatenate([np.arange(300), rng.integers(0, 2**31 - 1, 700), [2**31 - 1, 2**31 - 2, 2**30]]).astype(np.int32)
    d = np.array([1, 2, 3, 5, 7, 9, 49, 56 * 56, 112 * 112 * 64, 2**30 + 1, 2**31 - 1, 641, 6700417], np.int32)
    q, r = np.empty(n.size * d.size, np.int32), np.empty(n.size * d.size, np.int32)
    kernel((64,), (256,), (n, d, q, r, np.int32(n.size), np.int32(d.size)))
    nn_, dd = np.tile(n, d.size).astype(np.int64), np.repeat(d, n.size).astype(np.int64)
    np.testing.assert_array_equal(q, nn_ // dd)
    np.testing.assert_array_equal(r, nn_ % dd)


# ------------------------------------------------------------------ batch-norm statistics in the epilogue
U = 2.0 ** -24     # float32's unit roundoff
TILE = 64          # output rows per tile, and so per block of the partials (versions 3 to 5)


def _stats_bound(y):
    """(mean, var, mean tolerance, var tolerance) per channel of y as stored, float64: the bound
    conv.cu's header proves for the statistics of its epilogue (any mean offset: only the spread
    R = max |y - mean| enters, beside the mean's own rounding):
        |mean - mean64| <= u |mean64| + 73 u R        |var - var64| <= 36 u var64 + 162 u R^2"""
    rows = y.astype(np.float64).reshape(-1, y.shape[-1])
    mean, var = rows.mean(axis=0), rows.var(axis=0)
    spread = np.abs(rows - mean).max(axis=0)
    return mean, var, U * np.abs(mean) + 73 * U * spread, 36 * U * var + 162 * U * spread ** 2


def _check_bn_stats(y, stats, epilogue):
    """stats are batch-norm partials of y within the bound; epilogue: laid out as the forward
    kernels write them (a 64-row tile per block, shift = the tile's first row, exactly)."""
    K = y.shape[-1]
    rows = y.reshape(-1, K)
    M = rows.shape[0]
    assert stats.dtype == np.float32 and stats.ndim == 3 and stats.shape[0] == 4 and stats.shape[2] == K
    if epilogue:
        P = -(-M // TILE)
        assert stats.shape[1] == P
        counts = np.minimum(TILE, M - TILE * np.arange(P))
        np.testing.assert_array_equal(stats[0], np.repeat(counts[:, None], K, axis=1))
        np.testing.assert_array_equal(stats[1], rows[::TILE].astype(np.float32))
    else:
        np.testing.assert_array_equal(stats[0].sum(axis=0), np.full(K, M))
    _, mean, var = ref.merge_bn_partials(stats)
    want_mean, want_var, tol_mean, tol_var = _stats_bound(y)
    assert np.all(np.abs(mean - want_mean) <= tol_mean), np.max(np.abs(mean - want_mean) / tol_mean)
    assert np.all(np.abs(var - want_var) <= tol_var), np.max(np.abs(var - want_var) / tol_var)
    if M > 1:   # and as batch norm merges them (batchnorm.cu, version 3), to its float32 saved statistics
        ones = np.ones(K, np.float32)
        _, saved_mean, invstd = BN.batchnorm_forward_train_from_stats(y, stats, ones, ones.copy(), ones * 0,
                                                                      ones.copy(), eps=0.0)
        var_bn = 1.0 / invstd.astype(np.float64) ** 2          # invstd's own roundings: 3 u var more
        assert np.all(np.abs(saved_mean - want_mean) <= tol_mean)
        assert np.all(np.abs(var_bn - want_var) <= tol_var + 3 * U * want_var)
    return mean, var


def _resnet50_kinds():
    """Every distinct (C, K, R, stride, padding) of ResNet-50 v1.5's convolutions, on small images
    (N, H, W) whose N*P*Q rows are one ragged tile past a full one where the stride allows."""
    from bench.kernel_cases.gemm_conv import resnet50_conv_shapes
    kinds = sorted({s[2:] for s in resnet50_conv_shapes()}, key=lambda k: (k[2], k[0], k[1], k[3]))
    out = []
    for C, K, R, stride, pad in kinds:
        n, hw = {(7, 2): (1, 17), (3, 2): (2, 11), (1, 2): (2, 11)}.get((R, stride), (2, 6))   # 81, 72, 72, 72 rows
        out.append(((n, hw, hw, C), (K, C, R, R), stride, pad))
    return out


RESNET50_KINDS = _resnet50_kinds()
KIND_IDS = [f"C{x[3]}-K{w[0]}-{w[2]}x{w[3]}s{s}" for x, w, s, p in RESNET50_KINDS]


@pytest.mark.parametrize("version", (3, versions.FAMILIES["conv"].default_f16))
@pytest.mark.parametrize("case", RESNET50_KINDS, ids=KIND_IDS)
def test_bn_stats_of_every_resnet50_convolution(backend, case, version):
    """The forward with batch-norm statistics in its epilogue, at each kind of ResNet-50 layer (its
    channels, filter and stride; a small batch): the same y as the plain forward, bit for bit, and
    partials of y within the bound (float32 version 3, float16 version 5)."""
    x, w, _, stride, pad = _problem(case, seed=RESNET50_KINDS.index(case))
    w = (w / np.sqrt(w[0].size)).astype(np.float32)
    x = x + np.float32(0.5)                # a mean per channel beside the spread: the shift has work
    dtype = np.float32 if version == 3 else np.float16
    d = backend.to_device
    xd, wk = d(x.astype(dtype)), CV.conv_weight(d(w), dtype)
    y, stats = CV.conv2d_forward_bn_stats(xd, wk, stride, pad, version=version)
    y, stats = backend.to_host(y), backend.to_host(stats)
    np.testing.assert_array_equal(y, backend.to_host(CV.conv2d_forward(xd, wk, stride, pad, version=version)))
    _check_bn_stats(y, stats, epilogue=True)


# (x shape NHWC, w shape OIHW, stride, padding): awkward rows and channels
BN_STATS_CASES = [
    ((2, 11, 11, 3), (67, 3, 7, 7), 2, 3),    # C = 3 (the stem's gather), K = 67: a ragged second column tile
    ((1, 1, 1, 8), (67, 8, 1, 1), 1, 0),      # one pixel: one row, one partial with count 1 and M2 0
    ((1, 1, 1, 8), (5, 8, 3, 3), 1, 1),       # one pixel through a 3x3 filter (only the centre tap)
    ((1, 5, 13, 8), (16, 8, 1, 1), 1, 0),     # 65 rows: a full tile and a tile of one row
    ((2, 8, 4, 16), (72, 16, 3, 3), 1, 1),    # 64 rows exactly: one tile, no ragged edge
    ((3, 7, 7, 8), (130, 8, 3, 3), 2, 1),     # 48 rows, three column tiles (130 = 2 * 64 + 2)
]
BN_STATS_IDS = [f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}-s{s}-p{p}" for x, w, s, p in BN_STATS_CASES]


@pytest.mark.parametrize("version", versions.numbers("conv"))
@pytest.mark.parametrize("case", BN_STATS_CASES, ids=BN_STATS_IDS)
def test_bn_stats_at_awkward_shapes(backend, case, version):
    """Every version: 3 to 5 write the partials in the forward's epilogue, 1 and 2 (and cuDNN, through
    kernels.ops) read y once more for them (batchnorm_chan_partials); the same statistics either way."""
    x, w, _, stride, pad = _problem(case, seed=BN_STATS_CASES.index(case))
    dtype = np.float16 if version in CV.F16_VERSIONS else np.float32
    d = backend.to_device
    xd, wk = d(x.astype(dtype)), CV.conv_weight(d((w / np.sqrt(w[0].size)).astype(np.float32)), dtype)
    y, stats = CV.conv2d_forward_bn_stats(xd, wk, stride, pad, version=version)
    y, stats = backend.to_host(y), backend.to_host(stats)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, backend.to_host(CV.conv2d_forward(xd, wk, stride, pad, version=version)))
    _check_bn_stats(y, stats, epilogue=version >= 3)


@pytest.mark.parametrize("version", (3, 4, 5))
def test_bn_stats_bound_holds_at_a_large_mean_offset(backend, version):
    """Adversarial data for one-pass statistics, through a 1x1 filter: output channels 0-3 have a mean
    ~3000 times their spread (inputs 1000 + noise, positive weights), channels 4-7 a mean that flips
    from image to image (inputs at +-1000: tiles straddling two images hold both, the blocks' means
    are far apart, the batch's mean is not).  The statistics stay within the bound, which does not
    grow with the offset; float32 sum and sum of squares (E[y^2] - E[y]^2) are off by far more than
    it on channels 0-3."""
    rng = np.random.default_rng(5)
    dtype = np.float32 if version == 3 else np.float16
    x = 1000.0 + rng.standard_normal((3, 9, 9, 16))          # 243 rows: 4 tiles, images change inside tiles
    x[1, ..., 8:] -= 2000.0                                   # input channels 8-15 of image 1 at -1000
    w = np.zeros((8, 16, 1, 1))
    w[:4, :8] = np.abs(rng.standard_normal((4, 8, 1, 1))) / 4.0
    w[4:, 8:] = rng.standard_normal((4, 8, 1, 1)) / 4.0
    x, w = x.astype(dtype), w.astype(np.float32)
    y, stats = CV.conv2d_forward_bn_stats(backend.to_device(x), CV.conv_weight(backend.to_device(w), dtype), 1, 0,
                                          version=version)
    y, stats = backend.to_host(y), backend.to_host(stats)
    _, got_var = _check_bn_stats(y, stats, epilogue=True)
    # The bound is the worst case, every rounding error of one sign.  Measured, they cancel: the
    # variance is within u (var + R^2) (0.45 of it at most over three seeds, every version; tiles
    # summed without their shift: up to 42 times it, at least 2.9 with this seed)
    rows = y.reshape(-1, y.shape[-1]).astype(np.float64)
    want_var, spread = rows.var(axis=0), np.abs(rows - rows.mean(axis=0)).max(axis=0)
    assert np.all(np.abs(got_var - want_var) <= 2 * U * (want_var + spread ** 2))
    rows = rows[:, :4].astype(np.float32)
    naive = (rows * rows).mean(axis=0, dtype=np.float32) - rows.mean(axis=0, dtype=np.float32) ** 2
    mean, var, _, tol_var = (a[:4] for a in _stats_bound(y))
    assert np.all(np.abs(mean) > 1000 * np.sqrt(var))        # the offset is there
    assert np.all(np.abs(naive - var) > 30 * tol_var)        # and defeats E[y^2] - E[y]^2 in float32


@pytest.mark.parametrize("arch", ["sm_60", "sm_70"])
def test_f16_bn_stats_built_for_older_gpus(arch):
    """The float16 epilogue after the FMA tiles of sm_60 and the synchronous loads of sm_70."""
    x, w, _, stride, pad = _problem(BN_STATS_CASES[0], seed=13)
    with CV.emulate_arch(arch):
        for version in CV.F16_VERSIONS:
            y, stats = CV.conv2d_forward_bn_stats(x.astype(np.float16), CV.conv_weight(w / 12, np.float16), stride,
                                                  pad, version=version)
            _check_bn_stats(y, stats, epilogue=True)


def test_bn_stats_kernels_pass_the_sanitizer():
    """memcheck, racecheck, initcheck and synccheck on the epilogues (ragged rows and columns, the
    stem's 3 channels) and on the partials of versions 1 and 2."""
    import kernels
    with kernels.sanitize("all"):
        for case in (BN_STATS_CASES[0], BN_STATS_CASES[3]):
            x, w, _, stride, pad = _problem(case, seed=17)
            for version in versions.numbers("conv"):
                dtype = np.float16 if version in CV.F16_VERSIONS else np.float32
                y, stats = CV.conv2d_forward_bn_stats(x.astype(dtype), CV.conv_weight(w / 12, dtype), stride, pad,
                                                      version=version)
                _check_bn_stats(y, stats, epilogue=version >= 3)


# ------------------------------------------------------------------ bad input
def test_f16_conv_rejects_bad_arguments():
    x = np.zeros((1, 5, 5, 8), np.float16)
    w = np.zeros((4, 8, 3, 3), np.float16)
    dy = np.zeros((1, 5, 5, 4), np.float16)
    with pytest.raises(TypeError, match="w must be float16"):
        CV.conv2d_forward(x, w.astype(np.float32), 1, 1)
    with pytest.raises(TypeError, match="version 3 of conv computes on float32"):
        CV.conv2d_forward(x, w, 1, 1, version=3)
    with pytest.raises(TypeError, match="version 4 of conv computes on float16"):
        CV.conv2d_forward(x.astype(np.float32), w.astype(np.float32), 1, 1, version=4)
    with pytest.raises(ValueError, match="channels-last"):
        CV.conv2d_forward(x, np.zeros((4, 8, 3, 6), np.float16)[..., ::2], 1, 1)
    with pytest.raises(ValueError, match="dy must have shape"):
        CV.conv2d_backward_data(dy[:, :4], w, x.shape, 1, 1)
    with pytest.raises(TypeError, match="dtype of dw"):
        CV.conv2d_backward_weight(x, dy, w.shape, 1, 1, dtype=np.float64)
    with pytest.raises(TypeError, match="float32 dw"):
        CV.conv2d_backward_weight(x.astype(np.float32), dy.astype(np.float32), w.shape, 1, 1, dtype=np.float16)
    with pytest.raises(TypeError, match="dtype must be float32 or float16"):
        CV.conv_weight(w, np.float64)


# ------------------------------------------------------------------ bad input
def test_conv_rejects_bad_arguments():
    x = np.zeros((1, 5, 5, 3), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    dy = np.zeros((1, 5, 5, 4), np.float32)
    with pytest.raises(TypeError, match="x must be float32"):
        CV.conv2d_forward(x.astype(np.float64), w, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        CV.conv2d_forward(np.zeros((1, 3, 5, 5), np.float32), w, 1, 1)   # NCHW by mistake
    with pytest.raises(ValueError, match="C-contiguous"):
        CV.conv2d_forward(np.zeros((1, 5, 5, 6), np.float32)[..., ::2], w, 1, 1)
    with pytest.raises(ValueError, match="4 dimensions"):
        CV.conv2d_forward(x[0], w, 1, 1)
    with pytest.raises(ValueError, match="stride"):
        CV.conv2d_forward(x, w, 0, 1)
    with pytest.raises(TypeError, match="stride"):
        CV.conv2d_forward(x, w, 1.0, 1)
    with pytest.raises(ValueError, match="padding"):
        CV.conv2d_forward(x, w, 1, -1)
    with pytest.raises(ValueError, match="empty output"):
        CV.conv2d_forward(x, np.zeros((4, 3, 7, 7), np.float32), 1, 0)
    with pytest.raises(ValueError, match="version"):
        CV.conv2d_forward(x, w, 1, 1, version="winograd")
    with pytest.raises(ValueError, match="dy must have shape"):
        CV.conv2d_backward_data(dy[:, :4], w, x.shape, 1, 1)
    with pytest.raises(ValueError, match="x_shape"):
        CV.conv2d_backward_data(dy, w, (1, 5, 5), 1, 1)
    with pytest.raises(ValueError, match="dy must have shape"):
        CV.conv2d_backward_weight(x, dy, (4, 3, 3, 3), 2, 1)
    with pytest.raises(ValueError, match="channels"):
        CV.conv2d_backward_weight(x, dy, (4, 2, 3, 3), 1, 1)
    with pytest.raises(ValueError, match="split_k"):
        CV.conv2d_backward_weight(x, dy, w.shape, 1, 1, split_k=0)


def test_bench_cases_cover_resnet50_and_run_tiny():
    from bench.kernel_cases import gemm_conv
    shapes = gemm_conv.resnet50_conv_shapes()
    assert shapes[0] == (224, 224, 3, 64, 7, 2, 3)                 # the stem
    assert (56, 56, 256, 512, 1, 2, 0) in shapes                    # stage 2 projection shortcut
    assert (14, 14, 512, 512, 3, 2, 1) in shapes                    # stage 4 strided 3x3 (v1.5)
    assert len(shapes) == len(set(shapes)) == 23
    cases = gemm_conv.cases(np, "tiny")
    assert cases and all(c.flops > 0 and c.bytes > 0 for c in cases)
    for c in cases:
        out = c.run()
        assert out is not None and all(np.all(np.isfinite(o)) for o in out)
    # every float16 version at every kind of ResNet-50 layer, against the float16 matmul peak
    for version in CV.F16_VERSIONS:
        for kind in ("7x7 s2", "1x1 s1", "3x3 s1", "3x3 s2", "1x1 s2"):
            named = [c for c in cases if kind in c.name and f" v{version} " in c.name]
            assert len(named) >= 3 and all(c.notes.get("tensor_cores") for c in named), (version, kind)
