"""kernels.profile(), kernels.resources() and kernels.occupancy() against numbers worked out by hand.

The kernels of tests/cuda/access_patterns.cu have one memory pattern each; every expected count
below follows from the addresses (32-byte sectors, 32 banks of 4-byte words) as the comment
next to it says.  reduce.cu's shared-memory tree is counted step by step.  Occupancy cases are
the CUDA Occupancy Calculator's arithmetic done by hand for P100, V100, A100 and H100.
"""

import os
from pathlib import Path

import numpy as np
import pytest

import kernels
from kernels import occupancy, resources
from kernels.runtime.ptxas import Resources, module_resources, parse_ptxas_log

CUDA = Path(__file__).resolve().parent / "cuda"
SCHEDULES = ["forward", "reverse", "random:3"]
I32 = np.int32


@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch):
    monkeypatch.delenv("KERNELS_EMU_SANITIZE", raising=False)
    monkeypatch.delenv("KERNELS_EMU_SCHEDULE", raising=False)


_MODULE = {}


def patterns():
    if "m" not in _MODULE:
        _MODULE["m"] = kernels.RawModule(code=(CUDA / "access_patterns.cu").read_text(),
                                         filename="tests/cuda/access_patterns.cu")
    return _MODULE["m"]


def run(name, grid, block, args, shared_mem=0):
    """Profile one launch of an access_patterns.cu kernel: its LaunchProfile."""
    with kernels.profile() as prof:
        patterns().get_function(name)(grid, block, args, shared_mem=shared_mem)
    assert len(prof.launches) == 1
    return prof.launches[0]


def g(p, what, op):
    """Shorthand: global requests/sectors of op 'ld'/'st'/'atom'."""
    name = {"req": f"smsp__inst_executed_op_global_{op}.sum",
            "sec": f"l1tex__t_sectors_pipe_lsu_mem_global_op_{op}.sum"}[what]
    return p.metrics[name]


def s(p, what, op):
    """Shorthand: shared requests/wavefronts/conflicts of op 'ld'/'st'."""
    name = {"req": f"smsp__inst_executed_op_shared_{op}.sum",
            "wf": f"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_{op}.sum",
            "conflicts": f"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_{op}.sum"}[what]
    return p.metrics[name]


def aligned_zeros(n, dtype, alignment):
    """Zeros at an address that is a multiple of `alignment` bytes (NumPy promises 16), the first
    n elements of an allocation of their own (the sectors are counted from its start)."""
    held = []   # kept alive, so that each try is a new address
    for extra in range(256):
        a = np.zeros(n + extra, dtype)[:n]
        if a.ctypes.data % alignment == 0:
            return a
        held.append(a)
    pytest.skip(f"no {alignment}-byte aligned allocation in 256 tries")


def rand(n, dtype=np.float32):
    return np.random.default_rng(n).standard_normal(n).astype(dtype)


# ------------------------------------------------------------------------------ global memory
def test_coalesced_float_copy_is_4_sectors_per_request():
    # 1000 floats, 4 blocks of 256: 31 full warps (128 bytes = 4 sectors each) and one warp of
    # 8 lanes (32 bytes = 1 sector); every byte of every sector is used
    x, y = rand(1000), np.zeros(1000, np.float32)
    p = run("copy_f32", (4,), (256,), (x, y, I32(1000)))
    np.testing.assert_array_equal(y, x)
    for op in ("ld", "st"):
        assert g(p, "req", op) == 32
        assert g(p, "sec", op) == 31 * 4 + 1
        assert p.derived[f"global_{op}_efficiency"] == pytest.approx(100.0)
    assert p.derived["global_ld_sectors_per_request"] == pytest.approx(125 / 32)
    assert p.metrics["dram__bytes_read.sum"] == 4000 and p.metrics["dram__bytes_write.sum"] == 4000
    assert p.metrics["smsp__inst_executed_op_shared_ld.sum"] == 0
    assert p.outside_arguments == 0 and p.cut_phases == 0
    assert (p.kernel, p.grid, p.block, p.shared_mem) == ("copy_f32", (4, 1, 1), (256, 1, 1), 0)


def test_full_warps_exactly_4_sectors_and_table_row():
    x, y = rand(1024), np.zeros(1024, np.float32)
    with kernels.profile() as prof:
        patterns().get_function("copy_f32")((4,), (256,), (x, y, I32(1024)))
    p = prof.launches[0]
    assert p.derived["global_ld_sectors_per_request"] == 4.0
    assert p.derived["global_st_sectors_per_request"] == 4.0
    text = _table_text(prof)
    assert "copy_f32" in text and "4.00" in text and "100" in text


def _table_text(prof):
    import io
    buf = io.StringIO()
    prof.table(file=buf)
    return buf.getvalue()


def test_view_one_float_into_its_allocation_costs_a_fifth_sector():
    # x starts 4 bytes into its allocation (a GPU allocation is 256-byte aligned): each warp's
    # 128 bytes straddle 5 sectors; the last 8 lanes (bytes 3972..4003) straddle 2
    base = rand(1001)
    x, y = base[1:], np.zeros(1000, np.float32)
    p = run("copy_f32", (4,), (256,), (x, y, I32(1000)))
    np.testing.assert_array_equal(y, x)
    assert g(p, "sec", "ld") == 31 * 5 + 2
    assert g(p, "sec", "st") == 31 * 4 + 1          # y is its own allocation
    assert p.derived["global_ld_efficiency"] == pytest.approx(100 * 4000 / (157 * 32))
    assert p.metrics["dram__bytes_read.sum"] == 32 * 126   # bytes 4..4003: sectors 0..125


@pytest.mark.parametrize("stride,sectors", [(1, 4), (2, 8), (8, 32), (64, 32)])
def test_strided_read(stride, sectors):
    # lane i reads float i * stride: a warp spans 128 * stride bytes, one sector per lane at most
    n = 256
    x, y = rand(n * stride), np.zeros(n, np.float32)
    p = run("copy_strided_f32", (1,), (256,), (x, y, I32(n), I32(stride)))
    np.testing.assert_array_equal(y, x[::stride])
    assert g(p, "req", "ld") == 8
    assert g(p, "sec", "ld") == 8 * sectors
    assert p.derived["global_ld_sectors_per_request"] == sectors
    assert p.derived["global_ld_efficiency"] == pytest.approx(100 * 4 * 32 / (32 * sectors))
    assert p.metrics["dram__bytes_read.sum"] == 32 * 8 * sectors
    assert g(p, "sec", "st") == 8 * 4


def test_float4_loads_are_16_sectors_per_request():
    # 256 lanes x 16 bytes: 8 requests of 512 bytes = 16 sectors, all bytes used
    x, y = rand(1024), np.zeros(1024, np.float32)
    p = run("copy_f32x4", (1,), (256,), (x, y, I32(256)))
    np.testing.assert_array_equal(y, x)
    for op in ("ld", "st"):
        assert g(p, "req", op) == 8 and g(p, "sec", op) == 8 * 16
        assert p.derived[f"global_{op}_efficiency"] == pytest.approx(100.0)
    sites = p.sites()
    assert {(t["space"], t["op"], t["size"]) for t in sites} == {("global", "ld", 16), ("global", "st", 16)}


def test_2d_block_warp_spans_two_rows():
    # block (16, 2): warp 0 = rows 0 and 1, two 64-byte pieces = 2 x 2 sectors; 32 blocks
    width, height = 64, 16
    x, y = rand(width * height), np.zeros(width * height, np.float32)
    p = run("copy_rows_f32", (width // 16, height // 2), (16, 2), (x, y, I32(width)))
    np.testing.assert_array_equal(y, x)
    assert g(p, "req", "ld") == 32 and g(p, "sec", "ld") == 32 * 4


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_grid_stride_loop_groups_lanes_by_iteration(schedule, monkeypatch):
    # one block of 256 over 1000 floats: lanes 0..231 run 4 iterations, 232..255 run 3.
    # iterations 0-2: 8 full warps each; iteration 3: warps 0-6 full, warp 7 with 8 lanes
    monkeypatch.setenv("KERNELS_EMU_SCHEDULE", schedule)
    x, y = rand(1000), np.zeros(1000, np.float32)
    p = run("copy_grid_stride_f32", (1,), (256,), (x, y, I32(1000)))
    np.testing.assert_array_equal(y, x)
    assert g(p, "req", "ld") == 3 * 8 + 8
    assert g(p, "sec", "ld") == 31 * 4 + 1
    (load,) = [t for t in p.sites() if t["op"] == "ld"]
    assert load["lanes"] == 1000 and load["requests"] == 32


def test_atomics_one_request_per_warp():
    counter = np.zeros(1, np.int32)
    p = run("atomic_count", (2,), (64,), (counter,))
    assert counter[0] == 128
    assert g(p, "req", "atom") == 4 and g(p, "sec", "atom") == 4
    assert g(p, "req", "ld") == 0 and g(p, "req", "st") == 0
    assert p.metrics["dram__bytes_read.sum"] == 32 and p.metrics["dram__bytes_write.sum"] == 32


# ------------------------------------------------------------------------------ shared memory
@pytest.mark.parametrize("kernel", ["shared_stride_f32", "shared_stride_template_f32"])
@pytest.mark.parametrize("stride,wavefronts", [(1, 1), (2, 2), (32, 32), (33, 1), (4, 4), (16, 16)])
def test_shared_bank_conflicts(kernel, stride, wavefronts):
    # word i * stride is in bank (i * stride) % 32: stride 2 puts two lanes in each even bank
    # (2-way), stride 32 all 32 lanes in bank 0 (32-way), stride 33 one lane per bank
    y = np.zeros(32, np.float32)
    p = run(kernel, (1,), (32,), (y, I32(stride)))
    assert g(p, "req", "ld") == 0 and p.outside_arguments == 0     # shared, not global
    np.testing.assert_array_equal(y, np.arange(32, dtype=np.float32))
    for op in ("ld", "st"):
        assert s(p, "req", op) == 1
        assert s(p, "wf", op) == wavefronts
        assert s(p, "conflicts", op) == wavefronts - 1
        assert p.derived[f"shared_{op}_wavefronts_per_request"] == wavefronts


def test_shared_broadcast_is_free():
    x, y = np.array([3.5], np.float32), np.zeros(32, np.float32)
    p = run("shared_broadcast_f32", (1,), (32,), (x, y))
    assert np.all(y == 3.5)
    assert s(p, "req", "ld") == 1 and s(p, "wf", "ld") == 1 and s(p, "conflicts", "ld") == 0
    assert s(p, "req", "st") == 1 and s(p, "wf", "st") == 1        # lane 0 alone
    assert g(p, "req", "ld") == 1 and g(p, "sec", "ld") == 1


@pytest.mark.parametrize("kernel,wavefronts", [("shared_f32x2", 2), ("shared_f32x4", 4)])
def test_shared_wide_accesses_by_half_and_quarter_warps(kernel, wavefronts):
    # 8-byte accesses: two half-warps of 128 bytes, one wavefront each; 16-byte: four quarters
    y = np.zeros(32, np.float32)
    p = run(kernel, (1,), (32,), (y,))
    for op in ("ld", "st"):
        assert s(p, "req", op) == 1 and s(p, "wf", op) == wavefronts and s(p, "conflicts", op) == 0


@pytest.mark.parametrize("kernel,wavefronts", [("wmma_tile_ldm16", 8), ("wmma_tile_ldm24", 4)])
def test_wmma_fragments_move_16_byte_row_pieces(kernel, wavefronts):
    # load_matrix_sync: 32 pieces of 16 bytes (16 rows x 2 halves of a row), one per lane, served
    # a quarter-warp (8 rows) at a time.  ldm 16: rows 32 bytes apart, rows r and r + 4 share
    # their 4 banks: 2 wavefronts per quarter, 8 per load; ldm 24: rows 48 bytes apart, 4.
    # store_matrix_sync of the 16x16 float result: 64 pieces, two requests of 16 sectors.
    a = (np.arange(256) % 7 - 3).astype(np.float16)
    c = aligned_zeros(256, np.float32, 32)     # store_matrix_sync wants 32-byte alignment, as on a GPU
    p = run(kernel, (1,), (32,), (a, c))
    m = a.astype(np.float64).reshape(16, 16)
    np.testing.assert_allclose(c.reshape(16, 16), m @ m)
    assert s(p, "req", "ld") == 2 and s(p, "wf", "ld") == 2 * wavefronts
    assert s(p, "conflicts", "ld") == 2 * (wavefronts - 4)
    assert g(p, "req", "st") == 2 and g(p, "sec", "st") == 32
    assert p.derived["global_st_efficiency"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------ a real kernel
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_reduce_tree_counted_step_by_step(schedule, monkeypatch):
    # sum_block_shared, 4 blocks of 256 over 8192 floats.  Global: 8 grid-stride iterations of
    # 8 warps per block, 4 sectors each; one store of one lane per block.  Shared, per block:
    # buf[tid] = ...: 8 store requests; the tree steps 128, 64, 32, 16, 8, 4, 2, 1 have 4, 2, 1,
    # 1, 1, 1, 1, 1 active warps = 12 warp-steps, each 2 loads and 1 store; buf[0]: 1 load.
    monkeypatch.setenv("KERNELS_EMU_SCHEDULE", schedule)
    x = rand(8192)
    partial = np.zeros(4, np.float32)
    k = kernels.load_module("reduce.cu").get_function("sum_block_shared")
    with kernels.profile() as prof:
        k((4,), (256,), (x, partial, np.int64(x.size)), shared_mem=256 * 4)
    np.testing.assert_allclose(partial.sum(), x.astype(np.float64).sum(), rtol=1e-5, atol=1e-3)
    p = prof.launches[0]
    assert g(p, "req", "ld") == 4 * 8 * 8 and g(p, "sec", "ld") == 4 * 8 * 8 * 4
    assert g(p, "req", "st") == 4 and g(p, "sec", "st") == 4
    assert s(p, "req", "ld") == 4 * (2 * 12 + 1) and s(p, "wf", "ld") == 4 * 25
    assert s(p, "req", "st") == 4 * (8 + 12) and s(p, "conflicts", "st") == 0
    lines = {(t["line"], t["space"], t["op"]) for t in p.sites()}
    text = (kernels.KERNEL_DIR / "reduce.cu").read_text().splitlines()
    tree = next(i + 1 for i, line in enumerate(text) if "buf[threadIdx.x] += buf[threadIdx.x + stride]" in line)
    assert {(tree, "shared", "ld"), (tree, "shared", "st")} <= lines
    (tree_loads,) = [t for t in p.sites() if t["line"] == tree and t["op"] == "ld"]
    assert tree_loads["instructions"] == 2 and tree_loads["requests"] == 4 * 24


def test_profile_blocks_nest_and_end():
    x, y = rand(256), np.zeros(256, np.float32)
    k = patterns().get_function("copy_f32")
    with kernels.profile() as outer:
        k((1,), (256,), (x, y, I32(256)))
        with kernels.profile() as inner:
            k((1,), (256,), (x, y, I32(128)))
    k((1,), (256,), (x, y, I32(256)))   # not profiled
    assert len(outer.launches) == 2 and len(inner.launches) == 1
    assert g(inner.launches[0], "req", "ld") == 4
    totals, requested, derived = outer.total()
    assert totals["smsp__inst_executed_op_global_ld.sum"] == 8 + 4
    assert requested["ld"] == 4 * 384 and derived["global_ld_efficiency"] == pytest.approx(100.0)
    assert outer.by_kernel()["copy_f32"]["launches"] == 2


def test_profile_with_sanitizer_counts_the_same():
    y = np.zeros(32, np.float32)
    with kernels.sanitize("all"), kernels.profile() as prof:
        patterns().get_function("shared_stride_f32")((1,), (32,), (y, I32(2)))
    assert s(prof.launches[0], "wf", "ld") == 2
    with kernels.profile() as prof, kernels.sanitize("racecheck"):
        patterns().get_function("shared_stride_f32")((1,), (32,), (y, I32(32)))
    assert s(prof.launches[0], "wf", "st") == 32


def test_source_table_names_lines():
    import io
    y = np.zeros(32, np.float32)
    p = run("shared_stride_f32", (1,), (32,), (y, I32(32)))
    text = (CUDA / "access_patterns.cu").read_text().splitlines()
    store = next(i + 1 for i, line in enumerate(text) if "words[t * stride] = (float)t;" in line)
    buf = io.StringIO()
    p.source_table(file=buf)
    row = next(r for r in buf.getvalue().splitlines() if f"access_patterns.cu:{store}" in r)
    assert "shared" in row and row.split()[-1] == "31"


# ------------------------------------------------------------------------------ occupancy
# (arch, block, registers, shared bytes) -> (blocks per SM, warps per SM, limited by)
OCCUPANCY_CASES = [
    # 8 warps; 32 regs: 1024 per warp, 16384 per sub-partition / 1024 = 16 warps x 4 = 64: 8 blocks
    ("sm_80", 256, 32, 0, 8, 64, "warps, registers"),
    # 64 regs: 2048 per warp -> 8 warps per sub-partition -> 32 warps: 4 blocks
    ("sm_80", 256, 64, 0, 4, 32, "registers"),
    # 48 KiB + the 1 KiB reserved = 50176 bytes; 167936 / 50176 = 3 blocks
    ("sm_80", 128, 40, 48 * 1024, 3, 12, "shared memory"),
    # 80 regs: 2560 per warp; 16384 / 2560 = 6 per sub-partition = 24 warps (65536 / 2560 would say 25)
    ("sm_80", 32, 80, 0, 24, 24, "registers"),
    # P100 has 2 sub-partitions: 32768 / 1280 = 25 warps each = 50 warps: 6 blocks of 8
    ("sm_60", 256, 40, 0, 6, 48, "registers"),
    # 20000 bytes -> 20224 (256-byte units); 65536 / 20224 = 3
    ("sm_60", 128, 16, 20000, 3, 12, "shared memory"),
    # V100: 98304 / 32768 = 3 blocks
    ("sm_70", 256, 32, 32 * 1024, 3, 24, "shared memory"),
    # 255 regs: 8160 -> 8192 per warp; 16384 / 8192 = 2 per sub-partition = 8 warps: 8 blocks of 1
    ("sm_70", 32, 255, 0, 8, 8, "registers"),
    # H100: 1024 threads x 64 regs: 2048 per warp x 32 warps = the whole register file: 1 block
    ("sm_90", 1024, 64, 0, 1, 32, "registers"),
    # 1 warp, 16 regs: 32 blocks max per SM
    ("sm_90", 32, 16, 0, 32, 32, "blocks"),
    # 227 KiB + 1 KiB = 233472 = the whole SM: 1 block
    ("sm_90", 256, 32, 227 * 1024, 1, 8, "shared memory"),
    # 65 regs -> 2080 -> 2304 per warp x 32 warps > 65536: cannot launch
    ("sm_80", 1024, 65, 0, 0, 0, "registers"),
]


@pytest.mark.parametrize("arch,block,regs,smem,blocks,warps,limit", OCCUPANCY_CASES)
def test_occupancy_hand_computed(arch, block, regs, smem, blocks, warps, limit):
    o = occupancy(arch, block, regs, smem)
    assert (o.blocks_per_sm, o.warps_per_sm, o.limited_by) == (blocks, warps, limit)
    assert o.occupancy == pytest.approx(warps / 64)
    if blocks == 0:
        assert "registers" in o.note


def test_occupancy_refuses_nonsense():
    with pytest.raises(ValueError, match="unknown architecture"):
        occupancy("sm_75", 256, 32, 0)
    with pytest.raises(ValueError, match="block_size"):
        occupancy("sm_80", 2048, 32, 0)
    assert occupancy("sm_60", 256, 32, 64 * 1024).blocks_per_sm == 0   # over P100's 48 KiB per block


# ------------------------------------------------------------------------------ resources (ptxas)
needs_nvrtc = pytest.mark.skipif(os.environ.get("KERNELS_SKIP_NVRTC") == "1", reason="KERNELS_SKIP_NVRTC=1")

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k2' for 'sm_80'
ptxas info    : Function properties for k2
ptxas         .     256 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 256 bytes cumulative stack size, 364 bytes cmem[0]
ptxas info    : Compile time = 17.464 ms
ptxas info    : Function properties for helper
ptxas         .     64 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 6 registers, used 1 barriers, 1024 bytes smem, 364 bytes cmem[0]
"""


def test_parse_ptxas_log():
    found = parse_ptxas_log(PTXAS_LOG, "sm_80")
    assert found["k2"] == Resources(
        kernel="k2", arch="sm_80", registers=40, spill_store_bytes=8, spill_load_bytes=12, stack_bytes=256,
        static_shared_bytes=0, barriers=0, constant_bytes=364)
    k = found["k"]
    assert (k.registers, k.static_shared_bytes, k.barriers, k.stack_bytes) == (6, 1024, 1, 0)


RESOURCE_SOURCE = r"""
extern "C" __global__ void staged(const float* x, float* y, int n) {
    __shared__ float tile[256];
    float local[64];                                   // written at run-time indices: local memory
    for (int i = 0; i < 64; ++i) local[(i * n) & 63] = x[i * n + threadIdx.x];
    tile[threadIdx.x] = local[threadIdx.x & 63];
    __syncthreads();
    y[threadIdx.x] = tile[255 - threadIdx.x];
}
extern "C" __global__ void pressure(const float* x, float* y, int n) {
    float acc[32];
    #pragma unroll
    for (int j = 0; j < 32; ++j) acc[j] = x[j * n + threadIdx.x];
    for (int k = 0; k < n; ++k) {
        #pragma unroll
        for (int j = 0; j < 32; ++j) acc[j] = acc[j] * acc[(j + 1) & 31] + x[k];
    }
    float s = 0.0f;
    #pragma unroll
    for (int j = 0; j < 32; ++j) s += acc[j];
    y[threadIdx.x] = s;
}
"""


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_60", "sm_70", "sm_80", "sm_90"])
def test_resources_per_architecture(arch):
    k = kernels.RawKernel(RESOURCE_SOURCE, "staged")
    r = resources(k, arch)
    assert (r.kernel, r.arch, r.static_shared_bytes, r.stack_bytes, r.barriers) == ("staged", arch, 1024, 256, 1)
    assert r.spill_store_bytes == 0 and 1 <= r.registers <= 255
    o = r.occupancy(256)
    assert o == occupancy(arch, 256, r.registers, 1024)
    assert resources(k, arch) is r                   # cached
    # 32 live accumulators in at most 24 registers spill
    squeezed = module_resources(RESOURCE_SOURCE, arch, options=("--maxrregcount=16",))["pressure"]
    assert squeezed.spill_store_bytes > 0 and squeezed.spill_load_bytes > 0 and squeezed.registers <= 24
    assert module_resources(RESOURCE_SOURCE, arch)["pressure"].spill_store_bytes == 0


@needs_nvrtc
def test_resources_of_a_project_kernel():
    k = kernels.load_module("reduce.cu").get_function("sum_block_shared")
    r = resources(k, "sm_80")
    assert r.spill_store_bytes == 0 and r.barriers == 1 and r.static_shared_bytes == 0
    with pytest.raises(TypeError, match="kernel"):
        resources("sum_block_shared", "sm_80")


@pytest.mark.parametrize("mode", ["1", "gdb"])
def test_debug_modes_profile_the_run_that_counts(mode, monkeypatch):
    monkeypatch.setenv("KERNELS_EMU_DEBUG", mode)
    x, y = rand(1024), np.zeros(1024, np.float32)
    k = kernels.RawModule(code=(CUDA / "access_patterns.cu").read_text()).get_function("copy_f32")
    with kernels.profile() as prof:
        k((4,), (256,), (x, y, I32(1024)))
    np.testing.assert_array_equal(y, x)
    (p,) = prof.launches
    assert g(p, "req", "ld") == 32 and g(p, "sec", "ld") == 128


# ---------------------------------------------- what the performance model reads of a profile
_MODEL_KERNELS = r'''
extern "C" __global__ void every_eighth(const float* __restrict__ x, float* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i * 8 < n) y[i] = x[i * 8];                      // one float of each 32-byte sector
}
extern "C" __global__ void four_counters(int* counts, float* sums) {
    atomicAdd(&counts[threadIdx.x % 4], 1);              // 4 addresses
    atomicAdd(&sums[blockIdx.x * blockDim.x + threadIdx.x], 1.0f);   // one address each
}
extern "C" __global__ void low_warps_load(const float* __restrict__ x, float* __restrict__ y) {
    float v = 0.0f;
    if (threadIdx.x < 64) v = x[blockIdx.x * 64 + threadIdx.x];   // warps 0 and 1 of each block
    y[blockIdx.x * blockDim.x + threadIdx.x] = v;
}
'''


def _model_kernel(name):
    if "model" not in _MODULE:
        _MODULE["model"] = kernels.RawModule(code=_MODEL_KERNELS, filename="model_kernels.cu")
    return _MODULE["model"].get_function(name)


def _profiled(name, grid, block, args):
    with kernels.profile() as prof:
        _model_kernel(name)(grid, block, args)
    assert len(prof.launches) == 1
    return prof.launches[0]


def test_touched_bytes_per_argument_count_whole_sectors():
    n = 1024
    x, y = aligned_zeros(n, np.float32, 256), aligned_zeros(n // 8, np.float32, 256)
    p = _profiled("every_eighth", (1,), (128,), (x, y, I32(n)))
    by_index = {a["index"]: a for a in p.arguments}
    # x: 4 KiB, one float read per 32-byte sector: every sector read, none written
    assert by_index[0] == {"index": 0, "bytes": 4096, "read_bytes": 4096, "written_bytes": 0}
    # y: 128 floats written once (16 sectors), none read
    assert by_index[1] == {"index": 1, "bytes": 512, "read_bytes": 0, "written_bytes": 512}
    assert 2 not in by_index                      # the int argument is no array


def test_atomics_are_counted_per_address():
    counts, sums = np.zeros(4, np.int32), np.zeros(512, np.float32)
    p = _profiled("four_counters", (2,), (256,), (counts, sums))
    # 512 + 512 lane-level atomics; 4 counters + 512 sums; the busiest counter gets 512 / 4
    assert p.atomics == {"ops": 1024, "addresses": 4 + 512, "most": 128}
    np.testing.assert_array_equal(counts, [128, 128, 128, 128])


def test_sites_count_the_warps_that_ran_them():
    x, y = np.ones(3 * 64, np.float32), np.zeros(3 * 256, np.float32)
    p = _profiled("low_warps_load", (3,), (256,), (x, y))
    sites = {(s["space"], s["op"]): s for s in p.sites()}
    load, store = sites[("global", "ld")], sites[("global", "st")]
    assert (load["requests"], load["warps"]) == (6, 6)        # 2 warps in each of 3 blocks
    assert (store["requests"], store["warps"]) == (24, 24)    # all 8 warps of 3 blocks
    np.testing.assert_array_equal(y.reshape(3, 256)[:, :64], 1.0)
