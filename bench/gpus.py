"""The GPUs this project targets, and the roofline bound they give a kernel.

The table itself (GPUS: SMs, clock, published and measured bandwidths, L2 size and bandwidth,
DRAM and L2 latency, peak FLOP/s, each with its source in `GPU.sources`) lives with the
performance model that uses it, kernels/emu/perfmodel.py, because `python -m kernels.<op>`
prints the model's predictions too; bench/ reads it from there.  `python -m bench.kernels
--profile` prints, per profiled case, the roofline bound of its counts (`bound()`):

    dram     = bytes from DRAM / bandwidth          (the profile's estimate: distinct sectors)
    l1       = L1 cycles / (SMs x clock)            (each SM moves 4 global sectors (128 bytes)
                                                     or one shared-memory wavefront per clock)
    compute  = FLOPs / peak                         (the op's analytic FLOPs)
    bound    = max(dram, l1, compute)               and the side that gives it: the limit

`ideal()` is the same bound for the fewest bytes the op must move.  A bound is not a
prediction: no launch overhead, tail of small grids, instruction issue, latency or atomics; the
model (perfmodel.predict_launch) adds them and is what `--profile` predicts a time with.
"""

from typing import Optional

from kernels.emu.perfmodel import ARCH_GPU, GPU, GPUS, L1_SECTORS_PER_CLOCK, SHARED_WAVEFRONTS_PER_CLOCK

__all__ = ["GPU", "GPUS", "ARCH_GPU", "bound", "ideal", "l1_cycles"]


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
