"""The GPUs this project targets, by their published figures, and the time bound they give a kernel.

One table (GPUS) of datasheet numbers: memory bandwidth, peak FLOP/s (float32 on the CUDA cores;
float16 on the tensor cores where there are any), SM count and boost clock.  `python -m
bench.kernels --profile` turns a kernel's profile (kernels.profile(), counted on the emulator)
into a predicted time with `bound()`:

    dram     = bytes from DRAM / bandwidth          (the profile's estimate: distinct sectors)
    l1       = L1 cycles / (SMs x clock)            (each SM moves 4 global sectors (128 bytes)
                                                     or one shared-memory wavefront per clock)
    compute  = FLOPs / peak                         (the op's analytic FLOPs)
    bound    = max(dram, l1, compute)               and the side that gives it: the limit

`dram` and `compute` are the classic roofline; `l1` is the level above DRAM, where uncoalesced
loads (more sectors per request) and bank conflicts (more wavefronts) cost even when DRAM does
not see them.  `ideal()` is the same bound for the fewest bytes the op must move: how far a
kernel's bound is from its op's is what the profile can say without a GPU.  None of it counts
launch latency (a few microseconds), tail effects of grids smaller than the GPU, instruction
issue or memory latency: a measured time is at least the bound, often well above it for small
grids.
"""

from dataclasses import dataclass
from typing import Optional

__all__ = ["GPU", "GPUS", "ARCH_GPU", "bound", "ideal", "l1_cycles"]


@dataclass(frozen=True)
class GPU:
    name: str
    arch: str
    dram_bytes_per_s: float
    fp32_flops: float                 # FMA = 2 FLOPs, CUDA cores
    fp16_matrix_flops: float          # dense float16 matrix multiply: tensor cores (sm_70+), else half2
    sms: int
    boost_clock_hz: float


# NVIDIA's datasheets (SXM boards; dense tensor-core figures, no sparsity)
GPUS = {
    "P100": GPU("Tesla P100 SXM2 16 GB", "sm_60", 732e9, 10.6e12, 21.2e12, 56, 1.480e9),
    "V100": GPU("Tesla V100 SXM2", "sm_70", 900e9, 15.7e12, 125e12, 80, 1.530e9),
    "A100": GPU("A100 SXM4 80 GB", "sm_80", 2039e9, 19.5e12, 312e12, 108, 1.410e9),
    "H100": GPU("H100 SXM5 80 GB", "sm_90", 3350e9, 67e12, 989e12, 132, 1.980e9),
    "H200": GPU("H200 SXM 141 GB", "sm_90", 4800e9, 67e12, 989e12, 132, 1.980e9),
}
ARCH_GPU = {"sm_60": "P100", "sm_70": "V100", "sm_80": "A100", "sm_90": "H100"}

L1_SECTORS_PER_CLOCK = 4          # 128 bytes of global data per SM per clock
SHARED_WAVEFRONTS_PER_CLOCK = 1   # 32 banks x 4 bytes per SM per clock


def l1_cycles(metrics):
    """SM-cycles of L1 data traffic a profile's metrics need (summed over SMs)."""
    sectors = sum(metrics[f"l1tex__t_sectors_pipe_lsu_mem_global_op_{op}.sum"] for op in ("ld", "st", "atom"))
    wavefronts = sum(metrics[f"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_{op}.sum"] for op in ("ld", "st"))
    atomics = metrics["smsp__inst_executed_op_shared_atom.sum"]
    return sectors / L1_SECTORS_PER_CLOCK + (wavefronts + atomics) / SHARED_WAVEFRONTS_PER_CLOCK


def _peak(gpu, tensor_cores):
    return gpu.fp16_matrix_flops if tensor_cores else gpu.fp32_flops


def bound(gpu, dram_bytes, cycles, flops, tensor_cores=False):
    """{'dram_s', 'l1_s', 'compute_s', 'bound_s', 'limit'} of a kernel on `gpu` (a GPU)."""
    t = {"dram_s": dram_bytes / gpu.dram_bytes_per_s, "l1_s": cycles / (gpu.sms * gpu.boost_clock_hz),
         "compute_s": flops / _peak(gpu, tensor_cores)}
    limit = max(t, key=t.get)
    t["bound_s"] = t[limit]
    t["limit"] = limit[:-2]
    return t


def ideal(gpu, nbytes, flops, tensor_cores=False) -> Optional[float]:
    """The op's own roofline: max(fewest bytes / bandwidth, FLOPs / peak) seconds (None: no work)."""
    if not nbytes and not flops:
        return None
    return max(nbytes / gpu.dram_bytes_per_s, flops / _peak(gpu, tensor_cores))
