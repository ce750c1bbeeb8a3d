"""KERNEL_ENTRY instantiation lists (kernels/common.cuh, kernels/emu/signature.py expand_entry_points):
each line becomes an extern "C" kernel with the template's parameters, on the same line, that runs
on the emulator, is checked like any other kernel, and is refused with the file and line when the
line is wrong."""

import re

import numpy as np
import pytest

from kernels import CompileError, RawModule, load_module
from kernels.runtime import nvrtc
from kernels.runtime.raw import KERNEL_DIR
from kernels.emu.signature import expand_entry_points, find_kernels

SOURCE = r'''#include "common.cuh"

/* y = a * x + b, one element per loop iteration */
template <typename T, bool SQUARE>
__device__ void affine(const T* __restrict__ x, T* __restrict__ y, float a, float b, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        float v = a * to_float(x[i]) + b;
        y[i] = from_float<T>(SQUARE ? v * v : v);
    }
}

KERNEL_ENTRY(affine_f32, affine<float, false>)
KERNEL_ENTRY(affine_f16,
             affine<__half, false>)
KERNEL_ENTRY(affine_square_f32, affine<float, true>);

extern "C" __global__ void after_the_list(int* out) { out[0] = __LINE__; }
'''


def _module():
    return RawModule(code=SOURCE, options=("-I", str(KERNEL_DIR)), filename="affine.cu")


def test_each_line_becomes_a_kernel_with_the_template_parameters_on_the_same_line():
    expanded = expand_entry_points(SOURCE, "affine.cu")
    assert expanded.count("\n") == SOURCE.count("\n")   # compiler lines, #line and gdb stay right
    assert "KERNEL_ENTRY(" not in expanded.split("#include", 1)[1]
    sigs = find_kernels(expanded)
    assert set(sigs) == {"affine_f32", "affine_f16", "affine_square_f32", "after_the_list"}
    assert [(p.name, p.code, p.is_pointer) for p in sigs["affine_f16"].params] == [
        ("x", "f16", True), ("y", "f16", True), ("a", "f32", False), ("b", "f32", False), ("n", "i64", False)]
    assert sigs["affine_f32"].params[0].const and not sigs["affine_f32"].params[1].const
    lines = SOURCE.splitlines()
    assert lines[sigs["affine_square_f32"].line - 1].startswith("KERNEL_ENTRY(affine_square_f32")
    assert find_kernels(SOURCE) == sigs              # the parser expands by itself
    assert expand_entry_points(expanded) == expanded  # nothing left to expand


def test_generated_kernels_run_and_are_checked():
    m = _module()
    x = np.linspace(-2, 2, 301).astype(np.float32)
    y = np.empty_like(x)
    m.get_function("affine_f32")((2,), (64,), (x, y, np.float32(3), np.float32(-1), np.int64(x.size)))
    np.testing.assert_array_equal(y, np.float32(3) * x + np.float32(-1))
    m.get_function("affine_square_f32")((2,), (64,), (x, y, np.float32(3), np.float32(-1), np.int64(x.size)))
    np.testing.assert_allclose(y, (3.0 * x.astype(np.float64) - 1) ** 2, rtol=1e-6, atol=1e-6)
    h = x.astype(np.float16)
    yh = np.empty_like(h)
    m.get_function("affine_f16")((2,), (64,), (h, yh, np.float32(0.5), np.float32(0.25), np.int64(h.size)))
    np.testing.assert_array_equal(yh, (np.float32(0.5) * h.astype(np.float32) + np.float32(0.25)).astype(np.float16))
    with pytest.raises(TypeError, match=r"affine_f16.*float32 array.*half"):
        m.get_function("affine_f16")((1,), (32,), (x, yh, np.float32(1), np.float32(0), np.int64(4)))
    out = np.zeros(1, np.int32)
    m.get_function("after_the_list")((1,), (1,), (out,))
    assert out[0] == 17                                 # __LINE__ after the list is still its own line


@pytest.mark.parametrize("line,message", [
    ("KERNEL_ENTRY(f_f32, nowhere<float>)", r"no function template 'nowhere'"),
    ("KERNEL_ENTRY(f_f32, affine<float>)", r"takes 2 template arguments \(T, SQUARE\), got 1"),
    ("KERNEL_ENTRY(f_f32)", r"expected KERNEL_ENTRY\(kernel_name, template_name<arguments>\)"),
    ("KERNEL_ENTRY(f_f32, kernel_template<float>)", r"must be a __device__ function"),
])
def test_a_wrong_line_is_refused_with_its_file_and_line(line, message):
    source = SOURCE + "template <typename T> __global__ void kernel_template(T* y) {}\n" + line + "\n"
    lineno = source.count("\n")
    with pytest.raises(CompileError, match=message) as info:
        expand_entry_points(source, "affine.cu")
    assert info.value.filename == "affine.cu" and info.value.line == lineno
    assert str(info.value).startswith(f"affine.cu:{lineno}: ")


def test_every_kernel_file_is_expanded_and_exports_its_list():
    for path in sorted(KERNEL_DIR.glob("*.cu")):
        raw = path.read_text()
        names = re.findall(r"^KERNEL_ENTRY\((\w+),", raw, re.M)
        module = load_module(path.name)
        assert not re.search(r"^\s*KERNEL_ENTRY\(", module.code, re.M), path.name
        assert set(names) <= set(module.signatures), (path.name, set(names) - set(module.signatures))


def test_a_compiler_that_meets_the_line_itself_says_what_to_do():
    ok, reason = nvrtc.nvrtc_available()
    if not ok:
        pytest.skip(f"NVRTC unavailable: {reason}")
    with pytest.raises(nvrtc.NVRTCError, match="kernels.load_module"):
        nvrtc.compile_cuda(SOURCE, arch="sm_80", filename="affine.cu", include_dirs=[str(KERNEL_DIR)])
    result = nvrtc.compile_cuda(expand_entry_points(SOURCE), arch="sm_80", filename="affine.cu",
                                include_dirs=[str(KERNEL_DIR)])
    assert b".entry affine_f16" in result.ptx
