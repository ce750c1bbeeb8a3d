"""KERNELS_EMU_SANITIZE and KERNELS_EMU_SCHEDULE: the emulator checks the GPU's rules.

Every classic bug of tests/cuda/planted_bugs.cu is reported by its check (memcheck, racecheck,
initcheck, synccheck) with the source line(s) marked BUG(<case>) there, under each schedule
(forward, reverse, random), and its corrected twin runs clean and computes what NumPy does.
Cooperative groups and cuda_pipeline kernels (tests/cuda/) run right under all four checks.
"""

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import kernels
from kernels.emu import sanitizer

CUDA = Path(__file__).resolve().parent / "cuda"
ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ["forward", "reverse", "random:7"]
rng = np.random.default_rng(2024)


def _module(name):
    return kernels.RawModule(code=(CUDA / name).read_text(), filename=f"tests/cuda/{name}")


_PLANTED = {}


def planted():
    if "m" not in _PLANTED:
        _PLANTED["m"] = _module("planted_bugs.cu")
    return _PLANTED["m"]


def bug_lines(case):
    text = (CUDA / "planted_bugs.cu").read_text().splitlines()
    lines = {i + 1 for i, line in enumerate(text) if f"BUG({case})" in line}
    assert lines, case
    return lines


@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch):
    """Each test sets the checks and the schedule it wants: none from the caller's environment."""
    monkeypatch.delenv("KERNELS_EMU_SANITIZE", raising=False)
    monkeypatch.delenv("KERNELS_EMU_SCHEDULE", raising=False)


@pytest.fixture(params=SCHEDULES)
def schedule(request, monkeypatch):
    monkeypatch.setenv("KERNELS_EMU_SCHEDULE", request.param)
    return request.param


# ------------------------------------------------------------------------------ the planted bugs
@dataclass
class Case:
    name: str              # BUG(<name>) in planted_bugs.cu
    check: str             # the check that must report it
    error: type
    kernel: str            # the buggy kernel; its twin is kernel + "_fixed"
    grid: tuple
    block: tuple
    make: object           # () -> (args tuple, expected outputs {arg index: array} for the twin)
    shared_bug: int = 0
    shared_fixed: int = 0
    fixed: str = None
    words: list = field(default_factory=list)   # what the message must say


def _reverse():
    x = rng.standard_normal(128).astype(np.float32)
    return (x, np.zeros(128, np.float32)), {1: x[::-1]}


def _warp_sum():
    x = rng.standard_normal(64).astype(np.float32)
    return (x, np.zeros(1, np.float32)), {1: np.array([x.astype(np.float64).sum()])}


def _tree_sum():
    x = rng.standard_normal(256).astype(np.float32)
    return (x, np.zeros(2, np.float32)), {1: x.reshape(2, 128).astype(np.float64).sum(1)}


def _accumulate():
    x = rng.standard_normal(6).astype(np.float32)
    return (x, np.zeros(1, np.float32)), {1: np.array([x.astype(np.float64).sum()])}


def _last_block():
    x = rng.standard_normal(50).astype(np.float32)
    return ((x, np.zeros(5, np.float32), np.zeros(1, np.uint32), np.zeros(1, np.float32), np.int32(50)),
            {3: np.array([x.astype(np.float64).sum()])})


def _async_scale():
    x = rng.standard_normal(256).astype(np.float32)
    return (x, np.zeros(256, np.float32)), {1: 2 * x}


def _copy_n():
    x = rng.standard_normal(100).astype(np.float32)
    return (x, np.zeros(100, np.float32), np.int32(100)), {1: x}


def _shift_right():
    x = rng.standard_normal(64).astype(np.float32)
    return (x, np.zeros(64, np.float32)), {1: np.concatenate([[0], x[:-1]])}


def _stage_dynamic():
    x = rng.standard_normal(64).astype(np.float32)
    return (x, np.zeros(64, np.float32)), {1: x[::-1]}


def _sum4():
    x = rng.standard_normal(68).astype(np.float32)
    return (x, np.zeros(16, np.float32)), {1: x[1:65].reshape(16, 4).astype(np.float64).sum(1)}


def _tree_sum_100():
    x = rng.standard_normal(100).astype(np.float32)
    return (x, np.zeros(1, np.float32)), {1: np.array([x.astype(np.float64).sum()])}


def _add_into():
    x = rng.standard_normal(70).astype(np.float32)
    y = kernels.mark_uninitialized(np.empty(70, np.float32))
    return (x, y, np.int32(70)), {1: x}


def _first_warp():
    x = rng.standard_normal(64).astype(np.float32)
    y = np.zeros(64, np.float32)
    expect = y.copy()
    expect[:32] = x[:32][::-1]
    return (x, y), {1: expect}


def _reverse_n():
    x = rng.standard_normal(64).astype(np.float32)
    expect = np.zeros(64, np.float32)
    expect[:40] = x[:40][::-1]
    return (x, np.zeros(64, np.float32), np.int32(40)), {1: expect}


def _neighbour_sum():
    x = rng.standard_normal(32).astype(np.float32)
    expect = np.zeros(32, np.float32)
    expect[:20] = x[:20] + np.concatenate([x[1:20], [0]])
    return (x, np.zeros(32, np.float32), np.int32(20)), {1: expect}


def _pair_swap():
    x = rng.standard_normal(48).astype(np.float32)
    return (x, np.zeros(48, np.float32)), {1: x.reshape(24, 2)[:, ::-1].ravel()}


CASES = [
    Case("shared_no_barrier", "racecheck", kernels.RacecheckError, "reverse", (1,), (128,), _reverse,
         words=["__shared__ 'tile' (in reverse)", "__syncthreads()"]),
    Case("warp_synchronous", "racecheck", kernels.RacecheckError, "warp_sum", (1,), (32,), _warp_sum,
         words=["__shared__ 's' (in warp_sum)", "__syncwarp()"]),
    Case("tree_missing_barrier", "racecheck", kernels.RacecheckError, "tree_sum", (2,), (128,), _tree_sum,
         words=["hazard in kernel 'tree_sum' on __shared__ 's' (in tree_sum)", "__syncthreads()"]),
    Case("global_accumulate", "racecheck", kernels.RacecheckError, "accumulate", (6,), (32,), _accumulate,
         words=["argument 1 'out' (float32[1]), byte 0", "different blocks", "atomic"]),
    Case("last_block_no_fence", "racecheck", kernels.RacecheckError, "last_block_sum", (5,), (32,), _last_block,
         words=["argument 1 'partial'", "__threadfence()"]),
    Case("async_no_wait", "racecheck", kernels.RacecheckError, "async_scale", (1,), (64,), _async_scale,
         words=["__pipeline_wait_prior", "async copy"]),
    Case("global_off_by_one", "memcheck", kernels.MemcheckError, "copy_n", (1,), (128,), _copy_n,
         words=["out-of-bounds read of 4 byte(s)", "0 byte(s) past the end of argument 0 'x' (float32[100])",
                "thread (100, 0, 0)"]),
    Case("shared_overrun", "memcheck", kernels.MemcheckError, "shift_right", (1,), (64,), _shift_right,
         words=["out-of-bounds write", "past the end of __shared__ 'tile' (in shift_right)", "thread (63, 0, 0)"]),
    Case("dynamic_shared_overrun", "memcheck", kernels.MemcheckError, "stage_dynamic", (1,), (64,), _stage_dynamic,
         shared_bug=63 * 4, shared_fixed=64 * 4, fixed="stage_dynamic",
         words=["0 byte(s) past the end of the 252 bytes of dynamic shared memory"]),
    Case("misaligned_float4", "memcheck", kernels.MemcheckError, "sum4", (1,), (16,), _sum4,
         words=["misaligned 16-byte read", "4 byte(s) past a 16-byte boundary", "argument 0 'x'"]),
    Case("shared_uninitialized", "initcheck", kernels.InitcheckError, "tree_sum_100", (1,), (100,), _tree_sum_100,
         words=["uninitialised", "__shared__ 's' (in tree_sum_100)", "shared memory starts undefined"]),
    Case("global_uninitialized", "initcheck", kernels.InitcheckError, "add_into", (1,), (128,), _add_into,
         words=["uninitialised", "argument 1 'y' (float32[70])"]),
    Case("barrier_in_branch", "synccheck", kernels.SynccheckError, "first_warp_reverse", (1,), (64,), _first_warp,
         words=["__syncthreads()", "already returned"]),
    Case("return_before_barrier", "synccheck", kernels.SynccheckError, "reverse_n", (1,), (64,), _reverse_n,
         words=["__syncthreads()", "already returned"]),
    Case("shuffle_after_return", "synccheck", kernels.SynccheckError, "neighbour_sum", (1,), (32,), _neighbour_sum,
         words=["mask 0xffffffff", "has already returned"]),
    Case("mask_absent_lanes", "synccheck", kernels.SynccheckError, "pair_swap", (1,), (48,), _pair_swap,
         words=["mask 0xffffffff", "does not exist"]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_planted_bug_is_reported_at_its_line(case, schedule):
    args, _ = case.make()
    with kernels.sanitize(case.check):
        with pytest.raises(case.error) as info:
            planted().get_function(case.kernel)(case.grid, case.block, args, shared_mem=case.shared_bug)
    err = info.value
    assert isinstance(err, kernels.SanitizerError) and err.check == case.check
    marked = bug_lines(case.name)
    assert err.line in marked, (str(err), marked)
    if err.other_line is not None:                      # a race names both accesses
        assert err.other_line in marked, (str(err), marked)
    message = str(err)
    assert f"kernel '{case.kernel}'" in message and case.check in message
    assert "planted_bugs.cu:" in message and re.search(r"thread \(\d+, \d+, \d+\)", message)
    for words in case.words:
        assert words in message, (words, message)
    if schedule != "forward":
        assert f"[KERNELS_EMU_SCHEDULE={schedule}]" in message


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_corrected_twin_runs_clean_and_right(case, schedule):
    args, expect = case.make()
    with kernels.sanitize("all"):
        planted().get_function(case.fixed or case.kernel + "_fixed")(case.grid, case.block, args,
                                                                      shared_mem=case.shared_fixed)
    for index, want in expect.items():
        np.testing.assert_allclose(args[index], want, rtol=1e-5, atol=1e-5)


ORDERING = r"""
// global memory, two warps of one block: ordered by the barrier only
extern "C" __global__ void global_no_barrier(float* y) { y[threadIdx.x] = 1.0f; y[64 + threadIdx.x] = y[(threadIdx.x + 32) % 64]; }
extern "C" __global__ void global_barrier(float* y) {
    y[threadIdx.x] = 1.0f;
    __syncthreads();
    y[64 + threadIdx.x] = y[(threadIdx.x + 32) % 64];
}
// a counter updated atomically by every thread: read it after a barrier, not before
extern "C" __global__ void count_no_barrier(int* out) {
    __shared__ int c;
    if (threadIdx.x == 0) c = 0;
    __syncthreads();
    atomicAdd(&c, 1);
    if (threadIdx.x == 0) out[0] = c;
}
extern "C" __global__ void count_barrier(int* out) {
    __shared__ int c;
    if (threadIdx.x == 0) c = 0;
    __syncthreads();
    atomicAdd(&c, 1);
    __syncthreads();
    if (threadIdx.x == 0) out[0] = c;
}
// __syncwarp(mask) orders the lanes of its mask, not the others
extern "C" __global__ void halves_own(float* y) {
    __shared__ float s[32];
    s[threadIdx.x] = threadIdx.x;
    if (threadIdx.x < 16) { __syncwarp(0x0000ffffu); y[threadIdx.x] = s[15 - threadIdx.x]; }
    else { __syncwarp(0xffff0000u); y[threadIdx.x] = s[47 - threadIdx.x]; }
}
extern "C" __global__ void halves_other(float* y) {
    __shared__ float s[32];
    s[threadIdx.x] = threadIdx.x;
    if (threadIdx.x < 16) { __syncwarp(0x0000ffffu); y[threadIdx.x] = s[31 - threadIdx.x]; }
    else { __syncwarp(0xffff0000u); y[threadIdx.x] = s[31 - threadIdx.x]; }
}
// neighbouring bytes and halves written by different threads are different memory
extern "C" __global__ void bytes(unsigned char* b) { b[threadIdx.x] = (unsigned char)threadIdx.x; }
extern "C" __global__ void halves(short* b) { b[threadIdx.x] = (short)threadIdx.x; }
// blocks writing the same element
extern "C" __global__ void same_element(const float* x, float* y) { y[threadIdx.x] = x[0] + x[1]; }
"""


@pytest.mark.parametrize("kernel,grid,block,make,race", [
    ("global_no_barrier", 1, 64, lambda: (np.zeros(128, np.float32),), True),
    ("global_barrier", 1, 64, lambda: (np.zeros(128, np.float32),), False),
    ("count_no_barrier", 1, 64, lambda: (np.zeros(1, np.int32),), True),
    ("count_barrier", 1, 64, lambda: (np.zeros(1, np.int32),), False),
    ("halves_own", 1, 32, lambda: (np.zeros(32, np.float32),), False),
    ("halves_other", 1, 32, lambda: (np.zeros(32, np.float32),), True),
    ("bytes", 1, 64, lambda: (np.zeros(64, np.uint8),), False),
    ("halves", 1, 64, lambda: (np.zeros(64, np.int16),), False),
    ("same_element", 2, 32, lambda: (np.ones(2, np.float32), np.zeros(32, np.float32)), True),
])
def test_racecheck_ordering_rules(kernel, grid, block, make, race, schedule):
    k = kernels.RawModule(code=ORDERING, filename="ordering.cu").get_function(kernel)
    with kernels.sanitize("racecheck"):
        if race:
            with pytest.raises(kernels.RacecheckError):
                k((grid,), (block,), make())
        else:
            k((grid,), (block,), make())


def test_with_synccheck_every_synchronisation_error_is_a_synccheck_error():
    src = textwrap.dedent(r"""
    extern "C" __global__ void diverge(float* x) {
        if (threadIdx.x < 16) __syncthreads();
        else __syncthreads();
        x[threadIdx.x] = 1.0f;
    }""")
    k = kernels.RawKernel(src, "diverge", filename="diverge.cu")
    with pytest.raises(kernels.BarrierDivergenceError):
        k((1,), (64,), (np.zeros(64, np.float32),))
    with kernels.sanitize("synccheck"), pytest.raises(kernels.SynccheckError,
                                                      match=r"synccheck: divergent __syncthreads\(\).*diverge.cu:[34]"):
        k((1,), (64,), (np.zeros(64, np.float32),))


HIDDEN = textwrap.dedent(r"""
    extern "C" __global__ void one_line_barriers(float* x) {
        if (threadIdx.x < 16) { __syncthreads(); } else { __syncthreads(); }
        x[threadIdx.x] = 1.0f;
    }
    extern "C" __global__ void write_through_null(float* out, int how) {
        if (how == 0) *(float*)0 = 1.0f;       // undefined behaviour: g++ would delete it and what follows
        if (how == 1) { const float* p = nullptr; out[0] = p[threadIdx.x + 2]; }
        out[threadIdx.x] = 2.0f;
    }
    extern "C" __global__ void write_first(float* y) { y[0] = 1.0f; }
    """)


def test_checks_see_what_the_optimiser_would_hide():
    m = kernels.RawModule(code=HIDDEN, filename="hidden.cu")
    x = np.zeros(64, np.float32)
    with kernels.sanitize("synccheck"), pytest.raises(
            kernels.SynccheckError, match=r"divergent __syncthreads\(\).*waits at hidden.cu:3 while .* waits at "
                                          r"another __syncthreads\(\) of the same line, hidden.cu:3"):
        m.get_function("one_line_barriers")((1,), (64,), (x,))
    for how, (noun, address, line) in enumerate([("write", 0, 7), ("read", 8, 8)]):
        with kernels.sanitize("memcheck"), pytest.raises(
                kernels.MemcheckError, match=rf"memcheck: {noun} of 4 byte\(s\) in kernel 'write_through_null' at "
                                             rf"hidden.cu:{line}, block \(0, 0, 0\) thread \(0, 0, 0\): address "
                                             rf"0x{address:x} is a null pointer"):
            m.get_function("write_through_null")((1,), (32,), (x, np.int32(how)))
    with kernels.sanitize("memcheck"), pytest.raises(
            kernels.MemcheckError, match=r"out-of-bounds write .* 0 byte\(s\) past the end of argument 0 'y' "
                                         r"\(float32\[0\]\)"):
        m.get_function("write_first")((1,), (1,), (np.zeros(0, np.float32),))


def test_the_interpreter_survives_a_finding():
    case = CASES[0]
    args, expect = case.make()
    with kernels.sanitize("racecheck"), pytest.raises(kernels.RacecheckError):
        planted().get_function("reverse")((1,), (128,), args)
    planted().get_function("reverse_fixed")((1,), (128,), args)    # plain, after the finding
    np.testing.assert_array_equal(args[1], expect[1])


def test_a_race_in_a_real_kernel_is_found():
    # reduce.cu's shared-memory tree with its barrier removed: racecheck names the line
    src = (ROOT / "kernels" / "reduce.cu").read_text()
    barrier = "        __syncthreads();  // everyone must see this step's sums before the next step reads them\n"
    assert barrier in src
    broken = src.replace(barrier, "")
    tree_line = next(i + 1 for i, line in enumerate(broken.splitlines())
                     if "buf[threadIdx.x] += buf[threadIdx.x + stride]" in line)
    m = kernels.RawModule(code=broken, filename="kernels/reduce.cu", options=("-I", str(ROOT / "kernels")))
    x = rng.standard_normal(5000).astype(np.float32)
    partial = np.zeros(4, np.float32)
    with kernels.sanitize("racecheck"), pytest.raises(kernels.RacecheckError) as info:
        m.get_function("sum_block_shared")((4,), (128,), (x, partial, np.int64(x.size)), shared_mem=128 * 4)
    assert info.value.line == tree_line and info.value.file == "kernels/reduce.cu"
    assert "the 512 bytes of dynamic shared memory" in str(info.value)


TEMPLATE_SHARED = r"""
// __shared__ arrays declared inside function templates, as kernels/gemm.cu and conv.cu declare
// their tiles: g++ leaves them out of the emulator's shared-memory section (cuda_emu.h)
template <int N>
__device__ void reverse_through(const float* x, float* y, bool sync) {
    __shared__ float spare[4], tile[N];    // tile: the second name of one declaration
    tile[threadIdx.x] = x[threadIdx.x];
    if (threadIdx.x < 4) spare[threadIdx.x] = 0.0f;
    if (sync) __syncthreads();
    y[threadIdx.x] = tile[N - 1 - threadIdx.x];
}
extern "C" __global__ void reverse_template(const float* x, float* y, int sync) { reverse_through<128>(x, y, sync != 0); }

template <int N>
__device__ void fill_one_past(float* y) {
    __shared__ float tile[N];
    tile[threadIdx.x] = 1.0f;                                   // thread N writes past the end
    __syncthreads();
    if (threadIdx.x < N) y[threadIdx.x] = tile[threadIdx.x];
}
extern "C" __global__ void write_past_template(float* y) { fill_one_past<32>(y); }

template <int N>
__device__ void read_unwritten(float* y) {
    __shared__ float tile[N];
    if (threadIdx.x == 0) tile[0] = 1.0f;
    __syncthreads();
    y[threadIdx.x] = tile[threadIdx.x];
}
extern "C" __global__ void read_unwritten_template(float* y) { read_unwritten<32>(y); }
"""


def test_shared_arrays_of_templates_are_checked_as_shared_memory(monkeypatch):
    m = kernels.RawModule(code=TEMPLATE_SHARED)
    x = rng.standard_normal(128).astype(np.float32)
    y = np.zeros(128, np.float32)
    with kernels.sanitize("racecheck"), pytest.raises(kernels.RacecheckError, match=r"__shared__ 'tile' \(in reverse_through\)"):
        m.get_function("reverse_template")((1,), (128,), (x, y, np.int32(0)))
    with kernels.sanitize("all"):
        m.get_function("reverse_template")((1,), (128,), (x, y, np.int32(1)))
    np.testing.assert_array_equal(y, x[::-1])
    with kernels.sanitize("memcheck"), pytest.raises(kernels.MemcheckError,
                                                     match=r"0 byte\(s\) past the end of __shared__ 'tile' \(in fill_one_past\)"):
        m.get_function("write_past_template")((1,), (33,), (y,))
    with kernels.sanitize("initcheck"), pytest.raises(kernels.InitcheckError, match="'tile'"):
        m.get_function("read_unwritten_template")((1,), (32,), (y,))


def test_debug_mode_poisons_shared_arrays_of_templates(monkeypatch):
    monkeypatch.setenv("KERNELS_EMU_DEBUG", "1")
    y = np.zeros(32, np.float32)
    kernels.RawModule(code=TEMPLATE_SHARED + "// debug\n").get_function("read_unwritten_template")((1,), (32,), (y,))
    assert y[0] == 1.0 and np.all(np.isnan(y[1:]))


def test_kernels_reduce_runs_clean_under_every_check(schedule):
    # the untouched kernel, all four checks: no false alarm, the right sum
    m = kernels.load_module("reduce.cu")
    x = rng.standard_normal(3001).astype(np.float32)
    with kernels.sanitize("all"):
        for name, shared in (("sum_block_shared", 128 * 4), ("sum_block_warp", 4 * 4)):
            partial = np.zeros(3, np.float32)
            m.get_function(name)((3,), (128,), (x, partial, np.int64(x.size)), shared_mem=shared)
            assert partial.sum() == pytest.approx(x.astype(np.float64).sum(), abs=1e-3)
        out = np.zeros(1, np.float32)
        m.get_function("sum_grid_atomic")((3,), (128,), (x, out, np.int64(x.size)), shared_mem=16)
        assert out[0] == pytest.approx(x.astype(np.float64).sum(), abs=1e-3)


def test_uninitialized_bytes_become_initialized_when_written():
    src = textwrap.dedent(r"""
    extern "C" __global__ void fill_half(float* y, int n) { if (threadIdx.x < n / 2) y[threadIdx.x] = 1.0f; }
    extern "C" __global__ void double_first(float* y, int m) { if (threadIdx.x < m) y[threadIdx.x] *= 2.0f; }
    """)
    m = kernels.RawModule(code=src, filename="init.cu")
    y = kernels.mark_uninitialized(np.empty(64, np.float32))
    with kernels.sanitize("initcheck"):
        m.get_function("fill_half")((1,), (64,), (y, np.int32(64)))
        m.get_function("double_first")((1,), (64,), (y, np.int32(32)))     # written before: fine
        assert np.all(y[:32] == 2.0)
        with pytest.raises(kernels.InitcheckError, match=r"argument 0 'y' \(float32\[64\]\), byte 128"):
            m.get_function("double_first")((1,), (64,), (y, np.int32(33)))



def test_launcher_outputs_start_uninitialised_under_initcheck():
    """The launchers allocate their outputs and workspaces with kernels.runtime.launch.empty: under
    initcheck those start uninitialised (as cupy.empty memory does), so a kernel reading output
    bytes no launch wrote is found, whatever NumPy's fresh pages held; host-made arrays are trusted."""
    from kernels.runtime import launch as _launch
    src = textwrap.dedent(r"""
    extern "C" __global__ void bump(float* y, int n) { if (threadIdx.x < n) y[threadIdx.x] += 1.0f; }
    extern "C" __global__ void put(float* y, int n) { if (threadIdx.x < n) y[threadIdx.x] = 1.0f; }
    """)
    m = kernels.RawModule(code=src, filename="outputs.cu")
    with kernels.sanitize("initcheck"):
        y = _launch.empty(np, (48,), np.float32)
        with pytest.raises(kernels.InitcheckError, match=r"argument 0 'y' \(float32\[48\]\), byte 0"):
            m.get_function("bump")((1,), (64,), (y, np.int32(48)))
        like = _launch.empty_like(np.zeros((4, 12), np.float32))
        m.get_function("put")((1,), (64,), (like, np.int32(48)))
        m.get_function("bump")((1,), (64,), (like, np.int32(48)))    # written by a launch first: fine
        assert np.all(like == 2.0)
        m.get_function("bump")((1,), (64,), (np.zeros(48, np.float32), np.int32(48)))   # host-made: trusted
    # without initcheck nothing is tracked (a plain launch pays nothing)
    z = _launch.empty(np, (48,), np.float32)
    assert sanitizer.init_flags(z.__array_interface__["data"][0], z.nbytes) is None
    # a project launcher's output under the checks: written by its kernel, then read by another
    from kernels import elementwise
    with kernels.sanitize("all"):
        x = np.linspace(-1, 1, 100, dtype=np.float32)
        y = elementwise.relu_forward(x)
        assert sanitizer.init_flags(y.__array_interface__["data"][0], y.nbytes) is not None
        np.testing.assert_array_equal(elementwise.relu_forward(y), np.maximum(x, 0))


# ------------------------------------------------------------------------------ configuration
def test_check_names_are_parsed_and_refused_clearly():
    assert sanitizer.parse_checks("all") == sanitizer.parse_checks("1") == 15
    assert sanitizer.parse_checks("memcheck, synccheck") == 9
    assert sanitizer.parse_checks("") == sanitizer.parse_checks("0") == 0
    with pytest.raises(ValueError, match="unknown check 'racechek'.*memcheck, racecheck, initcheck, synccheck"):
        sanitizer.parse_checks("racechek")
    assert sanitizer.parse_schedule("reverse") == (1, None)
    assert sanitizer.parse_schedule("random:42") == (2, 42)
    with pytest.raises(ValueError, match="forward, reverse, random or random:SEED"):
        sanitizer.parse_schedule("backwards")


def test_environment_variable_switches_the_checks_on(monkeypatch):
    monkeypatch.setenv("KERNELS_EMU_SANITIZE", "synccheck")
    args, _ = _reverse_n()
    with pytest.raises(kernels.SynccheckError):
        planted().get_function("reverse_n")((1,), (64,), args)
    with kernels.sanitize(False):      # the context manager wins over the environment
        planted().get_function("reverse_n")((1,), (64,), args)


def test_plain_launches_do_not_build_the_instrumented_module():
    m = kernels.RawModule(code="extern \"C\" __global__ void one(float* y) { y[threadIdx.x] = 1.0f; }")
    y = np.zeros(8, np.float32)
    m.get_function("one")((1,), (8,), (y,))
    assert list(m._emu_module()._libs) == [False]
    with kernels.sanitize("synccheck"):              # synccheck needs no instrumentation either
        m.get_function("one")((1,), (8,), (y,))
    assert list(m._emu_module()._libs) == [False]


ORDER = r"""
extern "C" __global__ void record_order(int* threads, int* blocks, int* counter) {
    // each thread runs to the end without waiting: the order of the atomics is the schedule's
    threads[blockIdx.x * blockDim.x + atomicAdd(&counter[1 + blockIdx.x], 1)] = threadIdx.x;
    if (threadIdx.x == 0) blocks[atomicAdd(&counter[0], 1)] = blockIdx.x;
}
"""


def _order(monkeypatch, value, nblocks=5, nthreads=40):
    monkeypatch.setenv("KERNELS_EMU_SCHEDULE", value)
    threads = np.full(nblocks * nthreads, -1, np.int32)
    blocks = np.full(nblocks, -1, np.int32)
    counter = np.zeros(1 + nblocks, np.int32)
    kernels.RawKernel(ORDER, "record_order")((nblocks,), (nthreads,), (threads, blocks, counter))
    return threads.reshape(nblocks, nthreads), blocks


def test_schedules_order_threads_and_blocks(monkeypatch):
    threads, blocks = _order(monkeypatch, "forward")
    assert np.all(threads == np.arange(40)) and list(blocks) == [0, 1, 2, 3, 4]
    threads, blocks = _order(monkeypatch, "reverse")
    assert np.all(threads == np.arange(40)[::-1]) and list(blocks) == [4, 3, 2, 1, 0]
    threads, blocks = _order(monkeypatch, "random:11")
    assert all(sorted(row) == list(range(40)) for row in threads) and sorted(blocks) == [0, 1, 2, 3, 4]
    assert not all(np.all(row == np.arange(40)) for row in threads)     # not the forward order
    again_threads, again_blocks = _order(monkeypatch, "random:11")
    # the seed fixes the orders of a process's sequence of launches; each launch differs
    assert sorted(again_blocks) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------ coverage: groups, pipelines
def test_cooperative_groups_warp_softmax(schedule):
    x = (3 * rng.standard_normal((37, 300))).astype(np.float32)
    y = np.zeros_like(x)
    with kernels.sanitize("all"):
        _module("cg_warp_softmax.cu").get_function("softmax_rows_warp")(((37 + 3) // 4,), (128,),
                                                                      (x, y, np.int32(37), np.int32(300)))
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_cooperative_groups_block_reduce(schedule):
    m = _module("cg_block_reduce.cu")
    x = rng.standard_normal(10007).astype(np.float32)
    partial = np.zeros(7, np.float32)
    xi = rng.integers(-10**6, 10**6, 5000).astype(np.int32)
    out = np.zeros(6, np.int32)
    with kernels.sanitize("all"):
        m.get_function("sum_partials")((7,), (100,), (x, partial, np.int32(x.size)))   # a partial last tile
        m.get_function("max_and_or")((3,), (160,), (xi, out, np.int32(xi.size)))
    assert partial.sum() == pytest.approx(x.astype(np.float64).sum(), abs=1e-3)
    assert out[0::2].max() == xi.max() and np.bitwise_or.reduce(out[1::2]) == np.bitwise_or.reduce(xi)


def test_cooperative_groups_tile_operations():
    src = textwrap.dedent(r"""
    #include <cooperative_groups.h>
    namespace cg = cooperative_groups;
    extern "C" __global__ void tiles(const int* v, int* out) {
        cg::thread_block block = cg::this_thread_block();
        cg::thread_block_tile<8> t = cg::tiled_partition<8>(block);
        const int r = block.thread_rank(), x = v[r];
        int* o = out + 10 * r;
        o[0] = t.thread_rank(); o[1] = t.size(); o[2] = t.meta_group_rank(); o[3] = t.meta_group_size();
        o[4] = t.shfl(x, 3); o[5] = t.shfl_down(x, 2); o[6] = t.shfl_up(x, 1); o[7] = t.shfl_xor(x, 5);
        o[8] = (int)t.ballot(x > 0); o[9] = t.any(x > 90) * 10 + t.all(x > -90);
        t.sync(); block.sync();
    }""")
    n = 44   # the last tile has 4 threads
    v = rng.integers(-100, 100, n).astype(np.int32)
    out = np.zeros((n, 10), np.int32)
    kernels.RawKernel(src, "tiles")((1,), (n,), (v, out))
    for r in range(n):
        base, rank = r - r % 8, r % 8
        size = min(8, n - base)
        tile = v[base:base + size]
        up = r - 1 if rank >= 1 else r
        down = r + 2 if rank + 2 < 8 and rank + 2 < size else r
        xor = base + (rank ^ 5) if (rank ^ 5) < size else r
        ballot = sum(1 << k for k in range(size) if tile[k] > 0)
        want = [rank, 8, r // 8, (n + 7) // 8, v[base + 3] if 3 < size else v[r], v[down], v[up], v[xor], ballot,
                int((tile > 90).any()) * 10 + int((tile > -90).all())]
        assert list(out[r]) == want, (r, list(out[r]), want)


def test_async_copy_double_buffered_tiles(schedule):
    x = rng.standard_normal(4 * 1000).astype(np.float32)
    y = np.zeros_like(x)
    with kernels.sanitize("all"):
        _module("pipeline_tile_copy.cu").get_function("scale_tiles_async")(
            (3,), (64,), (x, y, np.float32(2.5), np.int32(x.size)), shared_mem=2 * 64 * 16)
    np.testing.assert_array_equal(y, np.float32(2.5) * x)


def test_async_copy_lands_at_the_wait_without_the_sanitizer():
    # the plain emulator delays the copy too: reading before the wait sees the old bytes
    args, _ = _async_scale()
    x, y = args
    planted().get_function("async_scale")((1,), (64,), (x, y))
    np.testing.assert_array_equal(y, 0.0)      # tile was still zero when it was read
    planted().get_function("async_scale_fixed")((1,), (64,), (x, y))
    np.testing.assert_array_equal(y, 2 * x)


# ------------------------------------------------------------------------------ our kernels, sanitized, in CI
def _sanitized_kernel_suite(folder):
    # The whole tests/test_kernels_*.py on the emulator with every check on and the random
    # schedule (fixed seed: a failure is reproducible); ~2x the plain time (see README).
    env = dict(os.environ, KERNELS_EMU_SANITIZE="all", KERNELS_EMU_SCHEDULE="random:1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernels_*.py"))
    return [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--basetemp={folder / 'tmp'}",
            *files], env


@pytest.mark.slow
@pytest.mark.early(command=_sanitized_kernel_suite, timeout=1800)
def test_kernel_suite_passes_under_all_four_checks(early_run):
    returncode, stdout, stderr, _ = early_run
    assert returncode == 0, stdout[-6000:] + stderr[-2000:]
    assert re.search(r"\d+ passed", stdout)


def test_bench_emulator_runs_and_reports_every_mode(tmp_path, capsys):
    import json
    from bench import emulator as bench_emulator
    out = tmp_path / "emu.json"
    assert bench_emulator.main(["--groups", "reduce", "--repeat", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["cases"] and all(set(c["seconds"]) == {m for m, _ in bench_emulator.MODES} for c in data["cases"])
    assert all(t > 0 for c in data["cases"] for t in c["seconds"].values())
    assert "median ratio over the cases" in capsys.readouterr().out
