"""Our kernels' memory access patterns, measured by kernels.profile() on the emulator, held to budgets.

- every memory-bound kernel (elementwise, batch norm, pooling, optimizer, input, the loss) moves
  at least 80 % useful bytes in its global loads and stores (the bytes its lanes ask for over
  the bytes of the 32-byte sectors moved); the few that cannot are listed with their measured
  floor and the reason;
- the GEMM and convolution tiles keep the bank conflicts measured here (TILE_CONFLICTS): their
  shared-memory loads have none, the stores that transpose a tile have the conflicts written down;
- no kernel spills registers on sm_80 or sm_90 (ptxas through NVRTC, kernels.resources).

A change that makes any of these worse fails here; one that makes them better should lower the
budget.  The shapes are small (the whole file takes seconds) but have ResNet-50's channel counts
where those matter for coalescing.  `python -m bench.kernels --profile` shows the same counts at
larger shapes, with predicted times (bench/NOTES.md).
"""

import os

import numpy as np
import pytest

import kernels
from kernels import cases as lesson

MIN_EFFICIENCY = 80.0
SMALL_OUTPUT = 4096   # bytes: below this a kernel writes a handful of scalars; store efficiency is moot


@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch):
    for name in ("KERNELS_EMU_SANITIZE", "KERNELS_EMU_SCHEDULE", "KERNELS_EMU_DEBUG"):
        monkeypatch.delenv(name, raising=False)


def profile(family, shape, op, version):
    """The Profile of one call of `op` (after one unprofiled call: builds, a backward's forward)."""
    case = lesson.make(family, np, shape)
    state = case.prepare(op)
    case.run(op, version, state)
    with kernels.profile() as prof:
        case.run(op, version, state)
    return prof


# (family, shape, versions): every op of these cases, every version
MEMORY_BOUND = [
    ("elementwise", (1 << 16,), (1, 2)),
    ("batchnorm", (2, 8, 8, 64), (1, 2, 3, 4, 5)),
    ("pool", (1, 16, 16, 64, 3, 2, 1), (1, 2, 3)),     # max pool 3x3/2 on 64 channels
    ("pool", (2, 7, 7, 256, 1, 1, 0), (2, 3)),        # (the global average pool's shape)
    ("optimizer", (24, 4), (1, 2, 3)),                # ResNet-50's first 24 tensors at a quarter size
    ("input", (1, 32, 32), (1, 2, 3)),
    ("cross_entropy", (8, 1000), (2,)),
]

# (family, op, version): measured floors (%) below 80, and why
EXCEPTIONS = {
    ("elementwise", "relu_backward", 1): {
        "ld": 75.0, "why": "dx = y > 0 ? dy : 0 reads dy only in the lanes whose y is positive (half of them "
                           "here): those requests carry half the lanes over the sectors the warp needs anyway"},
    ("elementwise", "relu_backward f16", 1): {
        "ld": 75.0, "st": 50.0,
        "why": "as relu_backward: dy is read only in the lanes whose y is positive; and the emulator's C++ "
               "compiler keeps the float16 select as a branch, so each arm stores with half of the lanes"},
    ("pool", "maxpool2d_backward f16", 2): {
        "ld": 74.0, "why": "as maxpool2d_backward: dy is read only where argmax names this pixel"},
    ("pool", "maxpool2d_backward f16", 3): {
        "ld": 60.0, "why": "a thread's 8 channels of argmax are 32 bytes, two int4 loads: each request's lanes "
                           "sit 32 bytes apart and use half of its sectors, the next request the other half "
                           "(from L1); dy's 16-byte vectors use all of theirs"},
    **{("batchnorm", op + " f16", version): {
        "ld": floor, "why": "versions 1-3's float16 passes (*_f16x8) load each thread's 8 channels of per-channel "
                            "numbers one float at a time, lanes 32 bytes apart (12 % of each request's sectors), "
                            "for one or two 16-byte vectors of data; version 2's sums read 2-byte values.  "
                            "Version 4 is the fix (bench/NOTES.md, 'Every byte once')"}
       for op, version, floor in (("batchnorm_backward", 2, 29.0), ("batchnorm_relu_backward", 2, 34.0),
                                  ("batchnorm_add_relu_backward", 2, 34.0),
                                  ("batchnorm_forward_train from conv stats", 3, 20.0),
                                  ("batchnorm_relu_forward_train from conv stats", 3, 20.0),
                                  ("batchnorm_add_relu_forward_train from conv stats", 3, 24.0))},
    **{("batchnorm", op + " f16", 4): {
        "ld": floor, "why": "a thread's 8 channels of per-channel numbers are two float4 loads 32 bytes apart (each "
                            "request uses half of its sectors, the next the other half, from L1); at this shape a "
                            "thread has one or two rows, so they are a third of the bytes; at ResNet-50's (8 rows a "
                            "thread) a few percent"}
       for op, floor in (("batchnorm_forward_train from conv stats", 63.0),
                         ("batchnorm_relu_forward_train from conv stats", 63.0),
                         ("batchnorm_add_relu_forward_train from conv stats", 69.0), ("batchnorm_backward", 72.0),
                         ("batchnorm_relu_backward", 75.0), ("batchnorm_add_relu_backward", 75.0))},
    ("batchnorm", "batchnorm_relu_backward from conv partials f16", 5): {
        "ld": 67.0, "why": "version 4's dx pass, alone: as version 4's float16 backward, its per-channel numbers "
                           "are two float4 loads 32 bytes apart, a third of the bytes at this shape (one or two "
                           "rows a thread), a few percent at ResNet-50's"},
    ("pool", "maxpool2d_backward relu_bn f16", 3): {
        "ld": 63.0, "why": "as maxpool2d_backward f16 v3: argmax's 8 int32 a thread are two int4 loads 32 bytes "
                           "apart; y, dy and bn_x's 16-byte vectors use all of their sectors"},
    ("batchnorm", "batchnorm_relu_backward from conv partials pair f16", 5): {
        "ld": 69.0, "why": "the pair form's dx pass: as version 5's, its per-channel numbers (and mean2) are float4 "
                           "loads 32 bytes apart, a third of the bytes at this shape, a few percent at ResNet-50's"},
    ("pool", "maxpool2d_backward", 2): {
        "ld": 68.0, "why": "the gather reads dy only where argmax names this pixel: about half of the lanes of "
                           "each request, so the sectors it moves are half used"},
    ("input", "input_normalize u8->f32", 2): {
        "ld": 33.0, "st": 50.0, "why": "four RGB pixels per thread are three 4-byte loads 12 bytes apart "
                                       "(each request uses a third of its sectors; the next two requests use "
                                       "the rest, from L1) and three float4 stores 48 bytes apart"},
}


def _memory_cases():
    for family, shape, versions in MEMORY_BOUND:
        case = lesson.make(family, np, shape)
        for version in versions:
            for op in case.ops(version) + case.shared_ops():
                if family == "pool" and (op.startswith("global") != (shape[4] == 1)):
                    continue   # max pool ops on the max-pool shape, average pool ops on theirs
                yield pytest.param(family, shape, op, version, id=f"{family}-{op}-v{version}")


@pytest.mark.parametrize("family,shape,op,version", list(_memory_cases()))
def test_memory_bound_kernels_use_the_bytes_they_move(family, shape, op, version):
    prof = profile(family, shape, op, version)
    metrics, requested, derived = prof.total()
    floors = EXCEPTIONS.get((family, op, version), {})
    assert prof.launches
    for kind in ("ld", "st"):
        efficiency = derived[f"global_{kind}_efficiency"]
        if efficiency is None or (kind == "st" and requested["st"] < SMALL_OUTPUT):
            continue
        floor = floors.get(kind, MIN_EFFICIENCY)
        assert efficiency >= floor - 0.05, (f"{op} v{version}: global {kind} efficiency {efficiency:.1f} % < "
                                            f"{floor} %\n{_worst_lines(prof, kind)}")


def _worst_lines(prof, kind):
    rows = [f"  {s['file']}:{s['line']} {s['size']} B, {s['per_request']:.2f} sectors/request, "
            f"{s['efficiency']:.0f} %" for p in prof.launches for s in p.sites()
            if s["space"] == "global" and s["op"] == kind and s["efficiency"] is not None]
    return "\n".join(sorted(rows, key=lambda r: float(r.rsplit(" ", 2)[-2]))[:5])


# (family, shape, op, version) -> {kernel: (shared-load conflict wavefronts, shared-store ones)}
TILE_CONFLICTS = {
    # the 64x64 register-blocked GEMM under im2col: its loads are float4s of padded rows (no
    # conflict); filling As transposed (As[k][m]) puts two lanes in one bank
    ("conv", (1, 8, 8, 64, 64, 3, 1, 1), "conv2d_forward", 2): {"gemm_regblock_f32": (0, 4608)},
    ("conv", (1, 8, 8, 64, 64, 3, 1, 1), "conv2d_backward_data", 2): {"gemm_regblock_f32": (0, 1280)},
    ("conv", (1, 8, 8, 64, 64, 3, 1, 1), "conv2d_backward_weight", 2): {"gemm_regblock_f32": (0, 0)},
    # the implicit GEMM: the same tiles, filled from the convolution's indices
    ("conv", (1, 8, 8, 64, 64, 3, 1, 1), "conv2d_forward", 3): {"conv2d_fwd_igemm_f32": (0, 2304)},
    ("conv", (1, 8, 8, 64, 64, 3, 1, 1), "conv2d_backward_data", 3): {"conv2d_bwd_data_igemm_f32": (0, 1152)},
    ("conv", (1, 8, 8, 64, 64, 3, 1, 1), "conv2d_backward_weight", 3): {"conv2d_bwd_weight_igemm_f32": (0, 0)},
    ("conv", (1, 8, 8, 128, 64, 1, 1, 0), "conv2d_forward", 3): {"conv2d_fwd_igemm_f32": (0, 512)},
    ("conv", (1, 16, 16, 3, 64, 7, 2, 3), "conv2d_forward", 3): {"conv2d_fwd_igemm_f32": (0, 640)},
    ("conv", (1, 16, 16, 3, 64, 7, 2, 3), "conv2d_backward_data", 3): {"conv2d_bwd_data_igemm_f32": (0, 25088)},
    # the ReLU + batch-norm epilogue of backward data: its column sums go through the freed tiles
    # (v3: rows of 16 threads' float4s; v4/5: the float tile's rows, each thread its 4 columns)
    # without a conflict of their own: v3 keeps the plain kernel's transposed fill, v4/5 none
    ("conv", (1, 8, 8, 64, 64, 3, 1, 1), "conv2d_backward_data + relu bn", 3):
        {"conv2d_bwd_data_igemm_relu_bn_f32": (0, 1152)},
    ("conv", (1, 8, 8, 64, 64, 3, 1, 1), "conv2d_backward_data + relu bn f16", 4):
        {"conv2d_bwd_data_wmma_relu_bn_f16": (0, 0)},
    ("conv", (1, 16, 16, 64, 64, 3, 2, 1), "conv2d_backward_data + relu bn f16", 5):
        {"conv2d_bwd_data_wmma_async_relu_bn_f16": (0, 0)},
    # gemm.cu: version 2's unpadded 16 x 16 tiles: a warp fills 32 consecutive floats (512 with
    # Bs[16][17], whose padding put rows ty and ty + 1 of a warp's fill in one bank)
    ("gemm", (64, 64, 64, 0, 0), "gemm", 2): {"gemm_tiled_f32": (0, 0)},
    ("gemm", (64, 64, 64, 0, 0), "gemm", 3): {"gemm_regblock_f32": (0, 256)},
    ("gemm", (64, 64, 64, 1, 1), "gemm", 3): {"gemm_regblock_f32": (0, 256)},
    ("gemm", (64, 64, 64, 0, 0), "gemm_f16", 4): {"gemm_wmma_f16": (0, 0)},
}


@pytest.mark.parametrize("key", list(TILE_CONFLICTS), ids=lambda k: f"{k[0]}-{k[2]}-v{k[3]}-{'x'.join(map(str, k[1]))}")
def test_gemm_and_conv_tiles_keep_their_bank_conflict_budget(key):
    family, shape, op, version = key
    prof = profile(family, shape, op, version)
    seen = {}
    for p in prof.launches:
        ld, st = seen.get(p.kernel, (0, 0))
        seen[p.kernel] = (ld + p.metrics["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"],
                          st + p.metrics["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"])
    for kernel, (ld_budget, st_budget) in TILE_CONFLICTS[key].items():
        assert kernel in seen, f"{op} v{version} no longer launches {kernel} (launched: {sorted(seen)})"
        ld, st = seen[kernel]
        assert ld <= ld_budget and st <= st_budget, (
            f"{kernel}: {ld} load and {st} store bank-conflict wavefronts, budget {ld_budget} and {st_budget}")
        # and its shared loads stay conflict-free, whatever the budget says of stores
        assert ld == 0


def _all_kernels():
    for path in sorted(kernels.KERNEL_DIR.glob("*.cu")):
        module = kernels.load_module(path.name)
        for name in sorted(module.signatures):
            yield path.name, name


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KERNELS_SKIP_NVRTC") == "1", reason="KERNELS_SKIP_NVRTC=1")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_no_kernel_spills_registers(arch):
    spilled = []
    for filename, name in _all_kernels():
        r = kernels.resources(kernels.load_module(filename).get_function(name), arch)
        if r.spill_store_bytes or r.spill_load_bytes:
            spilled.append(f"{filename}:{name} {r.spill_store_bytes} B stored, {r.spill_load_bytes} B loaded "
                           f"({r.registers} registers)")
    assert not spilled, "\n".join(spilled)
