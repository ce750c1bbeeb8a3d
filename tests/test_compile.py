"""Every CUDA source in kernels/ compiles with NVRTC for P100, V100, A100 and H100/H200.

No GPU is needed: NVRTC (from the `nvidia-cuda-nvrtc-cu12` wheel in the `test` extra) compiles
each `kernels/**/*.cu` to a CUBIN for sm_60, sm_70, sm_80 and sm_90, which also runs ptxas and
so checks register and shared-memory limits of each GPU, and (from ptxas's resource report) that
no kernel spills registers to local memory. A built-in known-good kernel always
compiles too, so this file tests the compiler path even before kernels/ holds any .cu file.

If libnvrtc cannot be found, these tests FAIL (CI installs it, so its absence is a broken setup,
not a reason to skip). Set KERNELS_SKIP_NVRTC=1 to skip them deliberately on a machine without it.
"""

import os
import pathlib
import re

import pytest

from kernels.runtime import nvrtc
from kernels.emu.errors import CompileError, first_error_line

ARCHS = ("sm_60", "sm_70", "sm_80", "sm_90")
REPO = pathlib.Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "kernels"
CU_FILES = sorted(KERNEL_DIR.rglob("*.cu"))
# CUDA written the way public teaching code is (cooperative groups, async copies), which the
# emulator's tests run (tests/test_emulator_sanitizer.py): it must compile for real GPUs too.
# Volta and later: tiles need independent thread scheduling, cp.async falls back below sm_80.
EMU_CU_FILES = sorted((REPO / "tests" / "cuda").glob("*.cu"))
EMU_ARCHS = ("sm_70", "sm_80", "sm_90")

GOOD_KERNEL = r"""
// a grid-stride SAXPY with a shared-memory block sum: enough to exercise the whole toolchain
extern "C" __global__ void saxpy_and_block_sum(const float* __restrict__ x, float* __restrict__ y,
                                               float a, int n, float* block_sums) {
    __shared__ float partial[256];
    float acc = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        y[i] = a * x[i] + y[i];
        acc += y[i];
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(block_sums, partial[0]);
}
"""

# The undefined identifier is on line 4 (line 1 is the empty line after the opening quotes).
BAD_KERNEL = """
extern "C" __global__ void broken(float* x) {
    int i = threadIdx.x;
    x[i] = not_declared_anywhere * 2.0f;
}
"""
BAD_LINE = 4

HALF_KERNEL = r"""
#include <cuda_fp16.h>
extern "C" __global__ void half_axpy(const __half* x, __half* y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2half(a * __half2float(x[i]) + __half2float(y[i]));
}
extern "C" __global__ void half_add(const __half* x, __half* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __hadd(x[i], y[i]);
}
"""

BF16_CONVERT_KERNEL = r"""
#include <cuda_bf16.h>
extern "C" __global__ void bf16_to_float(const __nv_bfloat16* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __bfloat162float(x[i]);
}
extern "C" __global__ void float_to_bf16(const float* x, __nv_bfloat16* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2bfloat16(x[i]);
}
"""

BF16_ARITH_KERNEL = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void bf16_fma(const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = __hfma(a[i], b[i], c[i]);
}
"""


@pytest.fixture(scope="module")
def require_nvrtc():
    """Fail (not skip) when NVRTC is missing, unless KERNELS_SKIP_NVRTC=1 asks to skip."""
    ok, reason = nvrtc.nvrtc_available()
    if ok:
        return reason
    if os.environ.get("KERNELS_SKIP_NVRTC") == "1":
        pytest.skip(f"KERNELS_SKIP_NVRTC=1 and NVRTC is unavailable: {reason}")
    pytest.fail(
        f"NVRTC is needed to compile-check the kernels but is unavailable: {reason}. "
        "Set KERNELS_SKIP_NVRTC=1 to skip these tests deliberately.",
        pytrace=False,
    )


def _is_cubin(blob):
    return len(blob) > 64 and blob[:4] == b"\x7fELF"


CU_PARAMS = [pytest.param(p, id=str(p.relative_to(KERNEL_DIR))) for p in CU_FILES] or [
    pytest.param(None, id="none", marks=pytest.mark.skip(reason="kernels/ holds no .cu file yet"))]


def ptxas_report(log):
    """{kernel: (registers, spill store bytes, spill load bytes)} from the log of a compile with
    `-Xptxas -v` (ptxas's resource report, one entry per kernel)."""
    out, name, spills = {}, None, (0, 0)
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spills = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out[name] = (int(m.group(1)),) + spills
            name, spills = None, (0, 0)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", CU_PARAMS)
def test_kernel_source_compiles(require_nvrtc, path, arch):
    # -Xptxas -v: ptxas reports each kernel's registers and spills; a kernel that spills registers
    # to local memory (slow, and a sign of a tile too big for the thread) fails here
    name = str(path.relative_to(REPO))
    result = nvrtc.compile_file(path, arch=arch, include_dirs=[str(KERNEL_DIR)], filename=name,
                                options=["-Xptxas", "-v"])
    assert _is_cubin(result.cubin), f"{name}: NVRTC returned no CUBIN for {arch}"
    report = ptxas_report(result.log)
    assert report, f"{name}: no ptxas resource report for {arch}"
    for kernel, (registers, stores, loads) in report.items():
        assert stores == loads == 0, f"{name}: {kernel} spills {stores} bytes of registers on {arch}"


@pytest.mark.parametrize("arch", EMU_ARCHS)
@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in EMU_CU_FILES])
def test_emulator_example_compiles(require_nvrtc, path, arch):
    name = str(path.relative_to(REPO))
    if "cooperative_groups" in path.read_text() and not any(
            os.path.isdir(os.path.join(d, "cuda", "std")) for d in nvrtc.cuda_include_dirs()):
        pytest.fail("<cooperative_groups.h> of CUDA 12 needs the libcu++ headers: pip install nvidia-cuda-cccl-cu12 "
                    "(part of the `test` extra)", pytrace=False)
    result = nvrtc.compile_file(path, arch=arch, filename=name)
    assert _is_cubin(result.cubin), f"{name}: NVRTC returned no CUBIN for {arch}"


@pytest.mark.parametrize("arch", ARCHS)
def test_builtin_good_kernel_compiles(require_nvrtc, arch):
    result = nvrtc.compile_cuda(GOOD_KERNEL, arch=arch, filename="good.cu")
    assert _is_cubin(result.cubin)
    assert result.arch == arch
    assert b"saxpy_and_block_sum" in result.cubin  # the entry point is in the machine code
    assert b".visible .entry saxpy_and_block_sum" in result.ptx
    assert "error" not in result.log.lower()


def test_compute_arch_gives_ptx_only(require_nvrtc):
    result = nvrtc.compile_cuda(GOOD_KERNEL, arch="compute_80", filename="good.cu")
    assert result.cubin == b""
    assert b".target sm_80" in result.ptx


@pytest.mark.parametrize("arch", ("sm_60", "sm_90"))
def test_bad_kernel_reports_file_and_line(require_nvrtc, arch):
    with pytest.raises(nvrtc.NVRTCError) as info:
        nvrtc.compile_cuda(BAD_KERNEL, arch=arch, filename="broken_kernel.cu")
    err = info.value
    assert isinstance(err, CompileError)
    assert err.filename == "broken_kernel.cu" and err.line == BAD_LINE and err.arch == arch
    message = str(err)
    assert f"broken_kernel.cu({BAD_LINE}): error" in message  # the compiler's own words
    assert f"broken_kernel.cu:{BAD_LINE}" in message.splitlines()[0]  # and our summary line
    assert "not_declared_anywhere" in message


def test_ptxas_limits_are_checked(require_nvrtc):
    # 80 KB of static shared memory: over the 48 KB static limit of every GPU; only ptxas knows.
    source = """
extern "C" __global__ void too_much_shared(float* x) {
    __shared__ float tile[20480];
    tile[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    x[threadIdx.x] = tile[(threadIdx.x + 1) % 20480];
}
"""
    with pytest.raises(nvrtc.NVRTCError, match="too much shared data"):
        nvrtc.compile_cuda(source, arch="sm_80", filename="too_much_shared.cu")


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_header_kernel_compiles(require_nvrtc, arch):
    assert nvrtc.cuda_include_dirs(), "no CUDA include dir with cuda_fp16.h: pip install nvidia-cuda-runtime-cu12"
    assert _is_cubin(nvrtc.compile_cuda(HALF_KERNEL, arch=arch, filename="half.cu").cubin)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_conversions_compile(require_nvrtc, arch):
    assert _is_cubin(nvrtc.compile_cuda(BF16_CONVERT_KERNEL, arch=arch, filename="bf16.cu").cubin)


@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
def test_bf16_arithmetic_compiles_on_ampere_and_later(require_nvrtc, arch):
    # Native bf16 arithmetic starts at sm_80; older headers had none below it (the 12.9 headers
    # emulate it through float), so kernels must not rely on it for sm_60/sm_70.
    assert _is_cubin(nvrtc.compile_cuda(BF16_ARITH_KERNEL, arch=arch, filename="bf16_fma.cu").cubin)


def test_defines_and_include_dirs_are_passed(require_nvrtc, tmp_path):
    (tmp_path / "tile.cuh").write_text("#define TILE_FROM_HEADER 16\n")
    source = '#include "tile.cuh"\n#if TILE_FROM_HEADER * SCALE != 32\n#error wrong\n#endif\n' + GOOD_KERNEL
    nvrtc.compile_cuda(source, arch="sm_80", options=("-DSCALE=2",), include_dirs=[str(tmp_path)])
    with pytest.raises(nvrtc.NVRTCError, match="wrong"):
        nvrtc.compile_cuda(source, arch="sm_80", options=("-DSCALE=3",), include_dirs=[str(tmp_path)])


def test_bad_arguments_are_refused_clearly(require_nvrtc):
    with pytest.raises(ValueError, match="arch"):
        nvrtc.compile_cuda(GOOD_KERNEL, arch="ampere")
    with pytest.raises(ValueError, match="not supported"):
        nvrtc.compile_cuda(GOOD_KERNEL, arch="sm_10")
    with pytest.raises(TypeError, match="options"):
        nvrtc.compile_cuda(GOOD_KERNEL, options="-DX=1")
    with pytest.raises(ValueError, match="arch="):
        nvrtc.compile_cuda(GOOD_KERNEL, options=("-arch=sm_70",))
    with pytest.raises(TypeError, match="source"):
        nvrtc.compile_cuda(GOOD_KERNEL.encode())


def test_missing_library_gives_install_hint(monkeypatch):
    # Pretend nothing is installed: the answer must say what to install, not crash.
    monkeypatch.setattr(nvrtc, "_library_candidates", lambda: iter([("/nonexistent/libnvrtc.so.12", "test")]))
    monkeypatch.setattr(nvrtc, "_lib", None)
    monkeypatch.setattr(nvrtc, "_load_failure", None)
    ok, reason = nvrtc.nvrtc_available()
    assert not ok
    assert "nvidia-cuda-nvrtc-cu12" in reason and "/nonexistent/libnvrtc.so.12" in reason
    with pytest.raises(nvrtc.NVRTCUnavailableError, match="KERNELS_NVRTC_LIBRARY"):
        nvrtc.compile_cuda(GOOD_KERNEL)


def test_first_error_line_understands_both_compilers():
    nvrtc_log = 'cuda_fp16.hpp(10): warning: x\nrelu.cu(7): error: identifier "y" is undefined\n'
    gcc_log = "relu.cu: In function 'void k()':\nrelu.cu:12:5: error: 'y' was not declared\n"
    assert first_error_line(nvrtc_log) == 7
    assert first_error_line(gcc_log, "relu.cu") == 12
    assert first_error_line("header.h:3:1: error: a\nmain.cu:9:2: error: b\n", "main.cu") == 9
    assert first_error_line("all good") is None
    err = CompileError("could not compile relu.cu", log=gcc_log, filename="relu.cu")
    assert err.line == 12 and err.log == gcc_log and "relu.cu:12:5: error" in str(err)


def test_compile_file_names_the_file_and_finds_its_headers(require_nvrtc, tmp_path):
    (tmp_path / "common.cuh").write_text("__device__ inline float twice(float v) { return 2.0f * v; }\n")
    good = tmp_path / "good.cu"
    good.write_text('#include "common.cuh"\nextern "C" __global__ void k(float* x) { x[0] = twice(x[0]); }\n')
    assert _is_cubin(nvrtc.compile_file(good, arch="sm_70").cubin)
    bad = tmp_path / "bad.cu"
    bad.write_text('#include "common.cuh"\nextern "C" __global__ void k(float* x) {\n  x[0] = thrice(x[0]);\n}\n')
    with pytest.raises(nvrtc.NVRTCError) as info:
        nvrtc.compile_file(bad, arch="sm_70")
    assert info.value.line == 3 and f"{bad}(3): error" in str(info.value)
