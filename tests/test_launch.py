"""The launch path: the compiled argument check gives check_args' verdict, strided arrays are refused
on both backends, the CuPy path hands the driver exactly the checked values and looks the kernel up
once, and `python -m bench.launch` runs.

The CuPy path is exercised everywhere with bench.launch's stand-in for CuPy (its arrays look like
CuPy arrays to our code; its kernel function records the launch instead of calling the driver).
"""

import glob
import os

import numpy as np
import pytest

from bench import launch as bench_launch
from bench.launch import StandInArray, standin_cupy
from kernels.runtime import launch as _launch
from kernels.runtime.raw import KERNEL_DIR, RawKernel, load_module
from kernels.emu.signature import _check_args_slowly, compiled_check

RELU = r'''
extern "C" __global__ void relu_copy(const float* x, float* y, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}
'''


def _all_signatures():
    sigs = []
    for path in sorted(glob.glob(str(KERNEL_DIR / "*.cu"))):
        sigs.extend(load_module(os.path.basename(path)).signatures.values())
    return sigs


def _valid_args(sig, make, rng):
    """Arguments every parameter accepts: arrays of the pointee's dtype, NumPy scalars of the type."""
    dtype_of = {"f16": np.float16, "f32": np.float32, "f64": np.float64, "i8": np.int8, "u8": np.uint8,
                "i16": np.int16, "u16": np.uint16, "i32": np.int32, "u32": np.uint32, "i64": np.int64,
                "u64": np.uint64, "bool": np.bool_, "bf16": np.uint16, "void": np.float32, "?": np.float32}
    args = []
    for p in sig.params:
        base = p.code.split("x")[0] if "x" in p.code and p.code[0] in "fiub" else p.code
        dt = dtype_of.get(base, np.float32)
        if p.is_pointer:
            args.append(make(rng.standard_normal(5).astype(dt)))
        else:
            args.append(dt(rng.integers(1, 9)) if dt is not np.bool_ else np.bool_(True))
    return tuple(args)


def _verdict(sig, args, kind):
    """check_args' verdict, parameter by parameter (its reference path, not the compiled one)."""
    try:
        return ("ok", _check_args_slowly(sig, args, kind))
    except (TypeError, ValueError) as exc:
        return ("error", type(exc))


def _mutations(args, sig, make):
    """Argument tuples that differ from valid ones in one place, each a thing check_args refuses or
    converts: wrong dtype, a Python number, a strided or read-only view, a wrong count, a list."""
    out = [list(args), args[:-1], args + (np.int32(1),)]
    for i, p in enumerate(sig.params):
        a = list(args)
        if p.is_pointer:
            host = np.zeros(10, np.float64)
            for bad in (make(host), make(np.zeros(10, np.float32)[::2]), None, np.float32(1), [1.0]):
                a[i] = bad
                out.append(tuple(a))
            if not p.const:
                ro = np.zeros(5, np.float32)
                ro.flags.writeable = False
                a[i] = make(ro)
                out.append(tuple(a))
        else:
            for bad in (7, 7.0, -3, np.float64(2), np.int16(2), True, np.zeros(())):
                a[i] = bad
                out.append(tuple(a))
        a[i] = args[i]
    return out


@pytest.mark.parametrize("kind", ["numpy", "cupy"])
def test_compiled_check_agrees_with_check_args_on_every_kernel(kind):
    """For every kernel of kernels/*.cu: valid arguments pass the fast check with the same values as
    check_args; each one-place change is either refused by both (fast None, slow raises) or, where
    check_args converts (a Python int for a 64-bit parameter), converted to the same value."""
    rng = np.random.default_rng(0)
    make = (lambda a: a) if kind == "numpy" else StandInArray
    cls = np.ndarray if kind == "numpy" else StandInArray
    sigs = _all_signatures()
    assert len(sigs) > 50
    for sig in sigs:
        check = compiled_check(sig, cls)
        args = _valid_args(sig, make, rng)
        fast, slow = check(args), _verdict(sig, args, kind)
        assert slow[0] == "ok", (sig.describe(), slow)
        assert fast is not None, f"{sig.describe()}: the fast check refused valid arguments\n{check.source}"
        want = [np.uint64(0) if v is None and kind == "cupy" else v for v in slow[1]]
        assert len(fast) == len(want) and all(f is w or (type(f) is type(w) and f == w) for f, w in zip(fast, want))
        for bad in _mutations(args, sig, make):
            fast, slow = check(bad), _verdict(sig, bad, kind)
            if fast is None:
                continue   # check_args decides (and raised or converted: both are its verdict)
            assert slow[0] == "ok", (sig.describe(), bad, "fast check accepted what check_args refuses")
            want = [np.uint64(0) if v is None and kind == "cupy" else v for v in slow[1]]
            for f, w in zip(fast, want):
                assert type(f) is type(w) and (f is w or f == w), (sig.describe(), bad)


def test_check_args_names_a_strided_array_on_the_emulator():
    k = RawKernel(RELU, "relu_copy")
    x = np.arange(20, dtype=np.float32) - 10
    y = np.empty(10, np.float32)
    with pytest.raises(TypeError) as info:
        k((1,), (32,), (x[::2], y, np.int64(10)))
    message = str(info.value)
    assert "'x'" in message and "contiguous" in message.lower()
    k((1,), (32,), (np.ascontiguousarray(x[::2]), y, np.int64(10)))    # the fix the message gives works
    np.testing.assert_array_equal(y, np.maximum(x[::2], 0))
    with pytest.raises(TypeError, match=r"'y'.*contiguous"):
        k((1,), (32,), (x[:10], np.empty((10, 2), np.float32)[:, 0], np.int64(10)))


def test_cupy_path_refuses_a_strided_array_and_launches_nothing():
    with standin_cupy():
        k = RawKernel(RELU, "relu_copy")
        x = StandInArray(np.zeros(20, np.float32))
        y = StandInArray(np.zeros(10, np.float32))
        with pytest.raises(TypeError) as info:
            k((1,), (32,), (x[::2], y, np.int64(10)))
        assert "'x'" in str(info.value) and "contiguous" in str(info.value).lower()
        with pytest.raises(TypeError, match=r"'y'.*contiguous"):
            k((1,), (32,), (x[:10], StandInArray(np.zeros((10, 2), np.float32))[:, 0], np.int64(10)))
        assert k._cupy_functions == {}           # nothing reached the driver


def test_cupy_path_hands_the_checked_values_to_one_cached_function():
    from bench.launch import StandInRawModule
    with standin_cupy():
        StandInRawModule.made.clear()
        k = RawKernel(RELU, "relu_copy")
        x, y = StandInArray(np.zeros(8, np.float32)), StandInArray(np.zeros(8, np.float32))
        k(2, 32, (x, y, 8))                    # a Python int for `long long`: converted
        k((2,), (32,), (x, None, np.int64(8)))  # a null pointer: np.uint64(0) for CuPy
        k.max_dynamic_shared_size_bytes = 64 * 1024
        k((2, 1), (32, 1), [x, y, np.int64(8)], shared_mem=16)
        (module,) = StandInRawModule.made
        (fn,) = module.functions                # looked up once, at the first launch
        assert fn.calls == 3 and fn.max_dynamic_shared_size_bytes == 64 * 1024
        grid, block, args, shared = fn.last
        assert grid == (2, 1) and block == (32, 1) and shared == 16
        assert args[0] is x and args[1] is y and type(args[2]) is np.int64 and args[2] == 8
        with pytest.raises(TypeError, match=r"Python int.*np\.int32"):
            RawKernel(RELU.replace("long long n", "int n"), "relu_copy")((1,), (32,), (x, y, 8))
        with pytest.raises(TypeError, match="float64 array"):
            k((1,), (32,), (StandInArray(np.zeros(8)), y, np.int64(8)))
        with pytest.raises(TypeError, match="do not mix"):
            k((1,), (32,), (np.zeros(8, np.float32), y, np.int64(8)))
        assert fn.calls == 3


def test_cuda_options_include_the_header_folders_cupy_misses(monkeypatch):
    from bench.launch import StandInRawModule
    from kernels.runtime import cuda_env
    monkeypatch.setattr(cuda_env, "extra_include_options", lambda: ("-I/wheels/cuda_nvcc/include",))
    with standin_cupy():
        StandInRawModule.made.clear()
        k = RawKernel(RELU, "relu_copy", options=("-DX=1",))
        k((1,), (32,), (StandInArray(np.zeros(4, np.float32)), StandInArray(np.zeros(4, np.float32)), np.int64(4)))
        (module,) = StandInRawModule.made
        assert module.options == ("-DX=1", "-I/wheels/cuda_nvcc/include") and module.backend == "nvrtc"


def test_launcher_module_lookup_is_cached_and_matches_load_module():
    a = _launch.module("elementwise.cu")
    assert _launch.module("elementwise.cu") is a
    assert _launch.module("elementwise.cu", []) is a           # options as a list
    assert a is load_module("elementwise.cu")
    assert _launch.module("gemm.cu", ("-arch=sm_60",)) is not _launch.module("gemm.cu")


def test_bench_launch_runs_and_prints_the_figure(capsys):
    result = bench_launch.run(count=200, repeat=1, gpu=False)
    rows = result["standin"]
    assert [r["kernel"] for r in rows] == ["relu_forward_f32", "conv2d_fwd_igemm_f32"]
    assert [r["args"] for r in rows] == [3, 14]
    assert all(r["us_per_launch"] > 0 and r["ours_us"] >= 0 for r in rows)
    out = capsys.readouterr().out
    assert "us/launch" in out and "conv2d_fwd_igemm_f32" in out


def test_bench_launch_cases_are_real_launches():
    """What bench.launch times on a GPU computes the right thing (checked here on the emulator), so
    the GPU figure is of a correct launch, not of a kernel reading past its arrays."""
    from kernels import reference
    rng = np.random.default_rng(3)
    make = lambda shape, dtype: rng.standard_normal(shape).astype(dtype)
    grid, block, (x, wt, y, *rest) = bench_launch._case_args("conv2d_fwd_igemm_f32", make)
    _launch.module("conv.cu").get_function("conv2d_fwd_igemm_f32")(grid, block, (x, wt, y, *rest))
    want = reference.conv2d_forward(x.astype(np.float64), wt.transpose(0, 3, 1, 2).astype(np.float64), 1, 1)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    grid, block, (x, y, n) = bench_launch._case_args("relu_forward_f32", make)
    _launch.module("elementwise.cu").get_function("relu_forward_f32")(grid, block, (x, y, n))
    np.testing.assert_array_equal(y, np.maximum(x, 0))


@pytest.mark.gpu
def test_launches_reach_cupy_again_after_the_bench_stand_in():
    """bench.launch measures our Python against a stand-in for CuPy, then the same kernels on the GPU:
    the kernel handles bound while the stand-in was `cupy` must not be used once it is gone (they
    launch nothing: the H100 run's 'CuPy launch 0.16 us' was the stand-in's own call)."""
    import cupy
    from kernels import elementwise
    x = cupy.asarray(np.linspace(-2, 2, 4096, dtype=np.float32))
    elementwise.relu_forward(x)                       # handles bound with the real CuPy first
    bench_launch.measure_standin(count=2, repeat=1)   # ... then with the stand-in
    np.testing.assert_array_equal(elementwise.relu_forward(x).get(), np.maximum(x.get(), 0))
    rows = bench_launch.measure_gpu(count=2, repeat=1)
    assert [r["kernel"] for r in rows] == [k for _, k in bench_launch.CASES]
    for filename, _ in bench_launch.CASES:
        assert isinstance(_launch.module(filename)._cupy_module(), cupy.RawModule)
