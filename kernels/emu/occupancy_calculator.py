"""`kernels.occupancy(arch, block_size, registers_per_thread, shared_bytes_per_block)`.

How many blocks of a kernel one streaming multiprocessor (SM) holds at once, by the rules of
NVIDIA's CUDA Occupancy Calculator (the arithmetic of cuda_occupancy.h) for the GPUs this
project targets.  Four resources each allow some number of resident blocks; the smallest wins:

  warps      an SM holds at most 64 warps (2048 threads); a block takes ceil(threads / 32).
  registers  65536 32-bit registers per SM, split evenly over its sub-partitions (4; P100's
             sm_60 has 2), each warp taking registers_per_thread x 32 rounded up to 256.  A
             sub-partition holds floor(its registers / a warp's) warps.  A block whose warps,
             rounded up to a multiple of the sub-partitions, need more than 65536 cannot launch.
  shared memory  per SM 64 KiB (sm_60), 96 KiB (sm_70), 164 KiB (sm_80), 228 KiB (sm_90); a
             block takes its static + dynamic bytes, plus 1 KiB the system reserves per block
             on sm_80 and later, rounded up to 256 bytes (sm_60, sm_70) or 128 (sm_80, sm_90).
             The calculator assumes the largest shared-memory carve-out, as the driver picks it
             when a kernel needs it.
  blocks     at most 32 resident blocks per SM.

Occupancy = resident warps / 64.  It is not speed: a kernel with few warps and much work per
thread (register-blocked GEMM) can be fast; but low occupancy in a memory-bound kernel means
too few loads in flight to hide DRAM latency.
"""

from dataclasses import dataclass, field

__all__ = ["occupancy", "Occupancy", "ARCHITECTURES", "Architecture"]


@dataclass(frozen=True)
class Architecture:
    """The per-SM limits the occupancy rules use (the CUDA Occupancy Calculator's table)."""
    name: str
    gpus: str
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    registers_per_sm: int = 65536
    registers_per_block: int = 65536
    max_registers_per_thread: int = 255
    register_allocation_unit: int = 256       # registers, per warp
    sub_partitions: int = 4
    shared_per_sm: int = 0                    # bytes, the largest carve-out
    max_shared_per_block: int = 49152         # bytes, with the opt-in
    shared_allocation_unit: int = 256
    reserved_shared_per_block: int = 0


ARCHITECTURES = {
    "sm_60": Architecture("sm_60", "P100", sub_partitions=2, shared_per_sm=65536, max_shared_per_block=49152,
                          shared_allocation_unit=256),
    "sm_70": Architecture("sm_70", "V100", shared_per_sm=98304, max_shared_per_block=98304,
                          shared_allocation_unit=256),
    "sm_80": Architecture("sm_80", "A100", shared_per_sm=167936, max_shared_per_block=166912,
                          shared_allocation_unit=128, reserved_shared_per_block=1024),
    "sm_90": Architecture("sm_90", "H100, H200", shared_per_sm=233472, max_shared_per_block=232448,
                          shared_allocation_unit=128, reserved_shared_per_block=1024),
}


@dataclass(frozen=True)
class Occupancy:
    """What occupancy() found.

    blocks_per_sm, warps_per_sm: resident at once; occupancy: warps_per_sm / max_warps_per_sm
    (0.0 to 1.0); limited_by: the resource(s) allowing the fewest blocks ("warps", "registers",
    "shared memory", "blocks"; several joined by ", " when they tie); limits: blocks per SM
    each resource allows; note: why a block cannot launch at all, else "".
    """
    arch: str
    block_size: int
    registers_per_thread: int
    shared_bytes_per_block: int
    blocks_per_sm: int
    warps_per_sm: int
    max_warps_per_sm: int
    occupancy: float
    limited_by: str
    limits: dict = field(default_factory=dict)
    note: str = ""


def _round_up(x, unit):
    return -(-x // unit) * unit


def architecture(arch):
    """The Architecture for 'sm_80', 'sm80', '80' or 80."""
    key = str(arch).lower().replace("sm_", "").replace("sm", "")
    name = f"sm_{key}"
    if name not in ARCHITECTURES:
        raise ValueError(f"occupancy: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def occupancy(arch, block_size, registers_per_thread, shared_bytes_per_block=0):
    """Resident blocks and warps per SM of a kernel on `arch` ('sm_60', 'sm_70', 'sm_80', 'sm_90').

    block_size: threads per block (1..1024); registers_per_thread: as ptxas reports it
    (kernels.resources); shared_bytes_per_block: static + dynamic shared memory of one block.
    Returns an Occupancy.
    """
    a = architecture(arch)
    block_size, regs, smem = int(block_size), int(registers_per_thread), int(shared_bytes_per_block)
    if not 1 <= block_size <= 1024:
        raise ValueError(f"occupancy: block_size must be in [1, 1024], got {block_size}")
    if regs < 0 or smem < 0:
        raise ValueError("occupancy: registers and shared memory cannot be negative")
    warps_per_block = -(-block_size // 32)
    limits, notes = {}, []

    limits["warps"] = a.max_warps_per_sm // warps_per_block

    if regs > a.max_registers_per_thread:
        limits["registers"] = 0
        notes.append(f"{regs} registers per thread is more than {a.max_registers_per_thread}")
    elif regs == 0:
        limits["registers"] = a.max_blocks_per_sm
    else:
        per_warp = _round_up(regs * 32, a.register_allocation_unit)
        assumed = per_warp * _round_up(warps_per_block, a.sub_partitions)   # the hardware's launch check
        if assumed > a.registers_per_block or per_warp * warps_per_block > a.registers_per_block:
            limits["registers"] = 0
            notes.append(f"a block needs {assumed} registers, more than the {a.registers_per_block} a block may have")
        else:
            warps_per_sub = (a.registers_per_sm // a.sub_partitions) // per_warp
            limits["registers"] = warps_per_sub * a.sub_partitions // warps_per_block

    used = smem + a.reserved_shared_per_block
    if smem > a.max_shared_per_block:
        limits["shared memory"] = 0
        notes.append(f"{smem} bytes of shared memory per block is more than {a.name}'s {a.max_shared_per_block}")
    elif used == 0:
        limits["shared memory"] = a.max_blocks_per_sm
    else:
        limits["shared memory"] = a.shared_per_sm // _round_up(used, a.shared_allocation_unit)

    limits["blocks"] = a.max_blocks_per_sm
    blocks = min(limits.values())
    limited_by = ", ".join(k for k, v in limits.items() if v == blocks)
    warps = blocks * warps_per_block
    return Occupancy(arch=a.name, block_size=block_size, registers_per_thread=regs, shared_bytes_per_block=smem,
                     blocks_per_sm=blocks, warps_per_sm=warps, max_warps_per_sm=a.max_warps_per_sm,
                     occupancy=warps / a.max_warps_per_sm, limited_by=limited_by, limits=limits,
                     note="; ".join(notes))
