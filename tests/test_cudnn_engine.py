"""The cuDNN convolution engine (kernels/cudnn_engine.py).

On a GPU with the `gpu` extra: forward, backward-data and backward-weight through cuDNN agree
with the float64 NumPy reference (kernels/reference.py) at awkward shapes, in float32, float16
and bfloat16; plans are cached per problem; results are right on a non-default stream; and
cuDNN agrees with our own kernels (kernels/ops.py) where those exist.

Everywhere: the pure-Python parts (geometry, NHWC strides, plan keys, argument checks) and that
importing the engine needs neither CuPy nor cuDNN.
"""

import subprocess
import sys

import numpy as np
import pytest

from kernels import cudnn_engine as ce
from kernels import reference as ref
from tests.conftest import real_gpu_only

needs_cudnn = real_gpu_only("the cuDNN library")

# (x_shape NHWC, w_shape OIHW, stride, padding): batch 1, odd channels, 7x7 and 1x1 images,
# stride 2 on odd sizes, padding larger than the kernel's half-width, the ResNet stem's 7x7/2.
CASES = [
    ((1, 7, 7, 3), (5, 3, 3, 3), 2, 1),
    ((2, 1, 1, 6), (4, 6, 1, 1), 1, 0),
    ((2, 9, 11, 8), (16, 8, 7, 7), 2, 3),
    ((3, 6, 5, 16), (8, 16, 3, 3), 1, 2),
    ((2, 8, 8, 16), (32, 16, 1, 1), 2, 0),
]
CASE_IDS = [f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}-s{s}-p{p}" for x, w, s, p in CASES]


# ----------------------------------------------------------------------------- CPU: pure Python

@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CASES, ids=CASE_IDS)
def test_geometry_matches_reference_output_shape(x_shape, w_shape, stride, padding):
    g = ce.conv_geometry(x_shape, w_shape, stride, padding)
    y = ref.conv2d_forward(np.zeros(x_shape), np.zeros(w_shape), stride, padding)
    assert (g.N, g.P, g.Q, g.K) == y.shape
    assert (g.N, g.H, g.W, g.C) == x_shape and (g.K, g.C, g.R, g.S) == w_shape


@pytest.mark.parametrize("n, c, h, w", [(2, 3, 5, 7), (1, 1, 1, 1), (4, 64, 56, 56)])
def test_nhwc_strides_describe_a_c_contiguous_nhwc_array(n, c, h, w):
    a = np.empty((n, h, w, c), dtype=np.float32)
    nchw_view_strides = [s // a.itemsize for s in a.transpose(0, 3, 1, 2).strides]
    assert ce.nhwc_strides(n, c, h, w) == nchw_view_strides


def test_plan_key_separates_what_changes_the_plan():
    g = ce.conv_geometry((2, 7, 7, 3), (5, 3, 3, 3), 2, 1)
    key = ce.plan_key("fprop", g, "float32", 0, tf32=False)
    assert key == ce.plan_key("fprop", ce.conv_geometry((2, 7, 7, 3), (5, 3, 3, 3), 2, 1), "float32", 0, tf32=False)
    others = [
        ce.plan_key("dgrad", g, "float32", 0, tf32=False),
        ce.plan_key("fprop", g, "float16", 0, tf32=False),
        ce.plan_key("fprop", g, "float32", 1, tf32=False),
        ce.plan_key("fprop", g, "float32", 0, tf32=True),
        ce.plan_key("fprop", ce.conv_geometry((2, 7, 7, 3), (5, 3, 3, 3), 1, 1), "float32", 0, tf32=False),
        ce.plan_key("fprop", ce.conv_geometry((2, 7, 7, 3), (5, 3, 3, 3), 2, 0), "float32", 0, tf32=False),
        ce.plan_key("fprop", ce.conv_geometry((3, 7, 7, 3), (5, 3, 3, 3), 2, 1), "float32", 0, tf32=False),
    ]
    assert len({key, *others}) == len(others) + 1
    # TF32 only matters for float32 inputs
    assert ce.plan_key("fprop", g, "float16", 0, tf32=True) == ce.plan_key("fprop", g, "float16", 0, tf32=False)
    with pytest.raises(ValueError, match="op"):
        ce.plan_key("conv", g, "float32")


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, error, match", [
    ((2, 7, 7, 3), (5, 4, 3, 3), 1, 1, ValueError, "input channels"),
    ((2, 7, 7, 3), (5, 3, 3, 3), 0, 1, ValueError, "stride"),
    ((2, 7, 7, 3), (5, 3, 3, 3), 1.0, 1, TypeError, "stride"),
    ((2, 7, 7, 3), (5, 3, 3, 3), True, 1, TypeError, "stride"),
    ((2, 7, 7, 3), (5, 3, 3, 3), 1, -1, ValueError, "padding"),
    ((2, 2, 2, 3), (5, 3, 5, 5), 1, 1, ValueError, "does not fit"),
    ((2, 7, 7), (5, 3, 3, 3), 1, 1, ValueError, "x must have 4 dimensions"),
    ((2, 7, 7, 3), (5, 3, 3, 0), 1, 1, ValueError, "w"),
])
def test_geometry_refuses_bad_arguments(x_shape, w_shape, stride, padding, error, match):
    with pytest.raises(error, match=match):
        ce.conv_geometry(x_shape, w_shape, stride, padding)


def test_ops_refuse_bad_arrays_before_touching_the_gpu():
    x = np.zeros((2, 7, 7, 3), np.float32)
    w = np.zeros((5, 3, 3, 3), np.float32)
    dy = np.zeros((2, 4, 4, 5), np.float32)
    with pytest.raises(TypeError, match="x must be a CuPy array"):
        ce.conv2d_forward(x, w, 2, 1)
    with pytest.raises(TypeError, match="float64"):
        ce.conv2d_forward(x.astype(np.float64), w.astype(np.float64), 2, 1)
    with pytest.raises(TypeError, match="one dtype"):
        ce.conv2d_forward(x, w.astype(np.float16), 2, 1)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        ce.conv2d_forward(np.zeros((2, 7, 3, 7), np.float32).transpose(0, 1, 3, 2), w, 2, 1)
    with pytest.raises(ValueError, match=r"dy has shape \(2, 4, 4, 6\)"):
        ce.conv2d_backward_data(np.zeros((2, 4, 4, 6), np.float32), w, x.shape, 2, 1)
    with pytest.raises(ValueError, match="dy has shape"):
        ce.conv2d_backward_weight(x, np.zeros((2, 3, 4, 5), np.float32), w.shape, 2, 1)
    with pytest.raises(TypeError, match="dy must be a CuPy array"):
        ce.conv2d_backward_data(dy, w, x.shape, 2, 1)
    with pytest.raises(TypeError, match="w must be a 4-tuple|w must have"):
        ce.conv2d_forward(x, None, 2, 1)


def test_import_needs_neither_cupy_nor_cudnn():
    code = ("import sys, kernels.cudnn_engine as ce; "
            "assert 'cupy' not in sys.modules and 'cudnn' not in sys.modules, sorted(sys.modules); "
            "ok, reason = ce.cudnn_available(); assert isinstance(ok, bool) and reason; print(ok, reason)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- GPU

def _tolerance(dtype_name):
    # float32: cuDNN may pick Winograd/FFT engines, accurate to ~1e-5 of the largest value; a
    # real bug (wrong tap, layout or padding) gives errors of order 1. Half inputs: the output
    # is rounded to 8 (bf16) or 11 (fp16) significant bits.
    return {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}[dtype_name]


def _rel_err(got, want):
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@pytest.fixture(scope="module")
def cp():
    ok, reason = ce.cudnn_available()
    if not ok:
        pytest.skip(f"cuDNN engine unavailable: {reason}")
    import cupy
    return cupy


def _host_dtype(dtype_name):
    if dtype_name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need the ml_dtypes package")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype_name)


def _device_array(cp, host_f32, dtype_name):
    """(CuPy array in dtype_name, the same rounded values as float64 NumPy)."""
    rounded = host_f32.astype(_host_dtype(dtype_name))
    try:
        dev = cp.asarray(rounded)
    except Exception as exc:  # a CuPy without bfloat16 support
        pytest.skip(f"CuPy cannot hold {dtype_name} arrays here: {exc}")
    return dev, rounded.astype(np.float64)


def _to_f64(cp, array):
    return cp.asnumpy(array).astype(np.float64)


@pytest.mark.gpu
@needs_cudnn
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CASES, ids=CASE_IDS)
def test_cudnn_matches_reference(cp, x_shape, w_shape, stride, padding, dtype_name):
    rng = np.random.default_rng(hash((x_shape, w_shape, stride, padding)) % 2**32)
    g = ce.conv_geometry(x_shape, w_shape, stride, padding)
    x, x64 = _device_array(cp, rng.standard_normal(x_shape, dtype=np.float32), dtype_name)
    w, w64 = _device_array(cp, rng.standard_normal(w_shape, dtype=np.float32), dtype_name)
    dy, dy64 = _device_array(cp, rng.standard_normal((g.N, g.P, g.Q, g.K), dtype=np.float32), dtype_name)
    tol = _tolerance(dtype_name)

    y = ce.conv2d_forward(x, w, stride, padding)
    assert y.shape == (g.N, g.P, g.Q, g.K) and y.dtype == x.dtype
    assert _rel_err(_to_f64(cp, y), ref.conv2d_forward(x64, w64, stride, padding)) < tol

    dx = ce.conv2d_backward_data(dy, w, x_shape, stride, padding)
    assert dx.shape == x_shape and dx.dtype == x.dtype
    assert _rel_err(_to_f64(cp, dx), ref.conv2d_backward_data(dy64, w64, x_shape, stride, padding)) < tol

    dw = ce.conv2d_backward_weight(x, dy, w_shape, stride, padding)
    assert dw.shape == w_shape and dw.dtype == x.dtype
    assert _rel_err(_to_f64(cp, dw), ref.conv2d_backward_weight(x64, dy64, w_shape, stride, padding)) < tol


@pytest.mark.gpu
@needs_cudnn
def test_plans_are_cached_per_problem(cp):
    ce.clear_cache()
    x = cp.asarray(np.random.default_rng(1).standard_normal((2, 7, 7, 3), dtype=np.float32))
    w = cp.asarray(np.random.default_rng(2).standard_normal((5, 3, 3, 3), dtype=np.float32))
    first = ce.conv2d_forward(x, w, 2, 1)
    assert ce.cache_size() == 1
    again = ce.conv2d_forward(x, w, 2, 1)
    assert ce.cache_size() == 1
    assert cp.array_equal(first, again)
    ce.conv2d_forward(x, w, 1, 1)
    ce.conv2d_forward(x.astype(cp.float16), w.astype(cp.float16), 2, 1)
    assert ce.cache_size() == 3


@pytest.mark.gpu
@needs_cudnn
def test_runs_on_cupys_current_stream(cp):
    rng = np.random.default_rng(3)
    x_host = rng.standard_normal((4, 16, 16, 8), dtype=np.float32)
    w_host = rng.standard_normal((16, 8, 3, 3), dtype=np.float32)
    want = ref.conv2d_forward(x_host.astype(np.float64), w_host.astype(np.float64), 1, 1)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        y = ce.conv2d_forward(cp.asarray(x_host), cp.asarray(w_host), 1, 1)
        got = cp.asnumpy(y, stream=stream)
        stream.synchronize()
    assert _rel_err(got.astype(np.float64), want) < _tolerance("float32")


@pytest.mark.gpu
@needs_cudnn
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CASES[:3], ids=CASE_IDS[:3])
def test_cudnn_matches_our_kernels(cp, x_shape, w_shape, stride, padding):
    ops = pytest.importorskip("kernels.ops", reason="kernels/ops.py (our convolution kernels) not written yet")
    if not hasattr(ops, "conv2d_forward"):
        pytest.skip("kernels.ops has no conv2d_forward yet")
    rng = np.random.default_rng(4)
    g = ce.conv_geometry(x_shape, w_shape, stride, padding)
    x = cp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
    w = cp.asarray(rng.standard_normal(w_shape, dtype=np.float32))
    dy = cp.asarray(rng.standard_normal((g.N, g.P, g.Q, g.K), dtype=np.float32))
    pairs = [
        (ce.conv2d_forward(x, w, stride, padding), ops.conv2d_forward(x, w, stride, padding)),
        (ce.conv2d_backward_data(dy, w, x_shape, stride, padding), ops.conv2d_backward_data(dy, w, x_shape, stride, padding)),
        (ce.conv2d_backward_weight(x, dy, w_shape, stride, padding), ops.conv2d_backward_weight(x, dy, w_shape, stride, padding)),
    ]
    for theirs, ours in pairs:
        assert _rel_err(_to_f64(cp, ours), _to_f64(cp, theirs)) < _tolerance("float32")
