"""A performance model: what a GPU would make of the emulator's counts.

kernels.profile() counts what a kernel does (requests, sectors, wavefronts, atomics) at a small
shape; kernels/runtime/ptx.py reads from NVRTC's PTX what each loop trip costs in instructions and
how long one warp waits per trip; kernels/runtime/plan.py works out the launches a real shape
makes (grid, block, arguments) without running them.  kernels/runtime/predict.py puts them
together into `LaunchWork` per launch; this file turns those into seconds on a `GPU` of the table
below, with the side that limits:

  dram      the bytes the launch reads and writes (each distinct byte once) at the published
            bandwidth, plus the cost of turning the bus round between reads and writes, which a
            device-to-device copy measures: a copy of N bytes takes 2N / copy bandwidth, so
            min(reads, writes) x (2 / copy - 2 / peak) is added; reads alone stream at the peak
  l2        32-byte sectors every request moves through L2 / L2 bandwidth
  issue     instructions of the busiest SM / what its 4 schedulers and units issue per clock
            (UNIT_RATES: 4 warp-instructions per clock in all; FP32 4 on its two FMA pipes,
            integer multiply-add 2 (on one of them), integer add/logic/compare 2, conversions and
            the special-function unit 0.5, shuffles 1, loads and stores 1: the CUDA Programming
            Guide's throughput table, per 32 lanes)
  l1        sectors / 4 per clock and shared-memory wavefronts / 1 per clock, on the busiest SM
  latency   the busiest SM's rounds of resident blocks x the time one warp needs for its own trips
            (kernels/runtime/ptx.py: each trip waits for its loads): Little's law, the parallelism
            in flight.  A one-block grid, a loop that waits for every load, too few warps: slow.
  atomics   the most atomics on one address x one L2 clock each (they are applied in turn)

  launch    = max(latency, max(the others) + ramp), the waves of blocks over the SMs included
              (the busiest SM holds ceil(blocks / SMs) blocks, ceil(that / resident blocks) rounds);
              ramp: one warp's work outside its loops over global memory (the start before its
              loads stream, a block's tree reduction and store after them): the pipeline fills
              and drains once even when a throughput limits the rest
  case      = the launches in order, each starting when both the GPU is free and the host has
              issued it (HOST_SECONDS_PER_OPERATION of Python and CuPy per launch, memset or copy):
              a tiny kernel costs its host time, a long one hides the next launch's.

Every parameter of a GPU is a published figure or one this project measured, with its source
beside it; none was fitted to a kernel's time.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["GPU", "GPUS", "ARCH_GPU", "HOST_SECONDS_PER_OPERATION", "LaunchWork", "LaunchPrediction",
           "CasePrediction", "predict_launch", "predict_operations", "dram_seconds", "UNIT_RATES"]


@dataclass(frozen=True)
class GPU:
    """One GPU's figures.  `sources` says where each comes from (key: the field name)."""
    name: str
    arch: str
    sms: int
    clock_hz: float                   # boost clock
    dram_bytes_per_s: float           # published peak
    copy_bytes_per_s: float           # a device-to-device copy: read + write bytes per second
    l2_bytes: int
    l2_bytes_per_s: float
    dram_latency_s: float             # a load that misses L2, with the memory system busy
    l2_latency_s: float               # a load that hits L2
    fp32_flops: float                 # FMA = 2 FLOPs, CUDA cores
    fp16_matrix_flops: float          # dense float16 matrix multiply: tensor cores (sm_70+), else half2
    sources: dict = field(default_factory=dict, compare=False)

    @property
    def boost_clock_hz(self):
        return self.clock_hz


_DATASHEET = "NVIDIA's datasheet (SXM board; dense tensor-core figures, no sparsity)"
_COPY_RATIO = 2.983e12 / 3.35e12    # the H100's measured copy over its published bandwidth
_LATENCY = ("a DRAM load of a busy HBM GPU: published unloaded latencies are 400-800 core cycles "
            "(~250-450 ns; NVIDIA's guides: 'hundreds of cycles', microbenchmark studies of A100/H100); "
            "queueing adds to it under load. One figure for every HBM GPU here")
_L2_LATENCY = "an L2 hit: ~200-300 core cycles in published microbenchmarks of Volta to Hopper"


def _sources(copy, l2bw):
    return {"sms": _DATASHEET, "clock_hz": _DATASHEET, "dram_bytes_per_s": _DATASHEET, "fp32_flops": _DATASHEET,
            "fp16_matrix_flops": _DATASHEET, "l2_bytes": _DATASHEET, "copy_bytes_per_s": copy,
            "l2_bytes_per_s": l2bw, "dram_latency_s": _LATENCY, "l2_latency_s": _L2_LATENCY}


_ESTIMATED_COPY = ("estimated: the published bandwidth x 0.89, the ratio the H100 measured "
                   "(2.98 TB/s copy / 3.35 TB/s)")
_L2_BW = "published estimate of the L2 bandwidth (about 2.7x the DRAM bandwidth on A100 and H100)"

GPUS = {
    "P100": GPU("Tesla P100 SXM2 16 GB", "sm_60", 56, 1.480e9, 732e9, 732e9 * _COPY_RATIO, 4 << 20, 2.0e12,
                600e-9, 200e-9, 10.6e12, 21.2e12, _sources(_ESTIMATED_COPY, _L2_BW)),
    "V100": GPU("Tesla V100 SXM2", "sm_70", 80, 1.530e9, 900e9, 900e9 * _COPY_RATIO, 6 << 20, 3.1e12,
                600e-9, 200e-9, 15.7e12, 125e12, _sources(_ESTIMATED_COPY, _L2_BW)),
    "A100": GPU("A100 SXM4 80 GB", "sm_80", 108, 1.410e9, 2039e9, 2039e9 * _COPY_RATIO, 40 << 20, 7.2e12,
                600e-9, 200e-9, 19.5e12, 312e12, _sources(_ESTIMATED_COPY, _L2_BW)),
    "H100": GPU("H100 SXM5 80 GB", "sm_90", 132, 1.980e9, 3350e9, 2.983e12, 50 << 20, 9.0e12,
                600e-9, 200e-9, 67e12, 989e12,
                _sources("measured by this project on an H100 80GB HBM3, 2026-12-06 (bench.kernels' 1 GiB "
                         "device-to-device copy): 2.98 TB/s", _L2_BW)),
    "H200": GPU("H200 SXM 141 GB", "sm_90", 132, 1.980e9, 4800e9, 4.3e12, 50 << 20, 9.0e12,
                600e-9, 200e-9, 67e12, 989e12,
                _sources("~4.3 TB/s measured on one H200, not by this project (shared/REFERENCE.md)", _L2_BW)),
}
ARCH_GPU = {"sm_60": "P100", "sm_70": "V100", "sm_80": "A100", "sm_90": "H100"}

HOST_SECONDS_PER_OPERATION = 25e-6
"""Host time per kernel launch, memset or copy on the CuPy path (our launcher's Python, CuPy's
and the driver's): CuPy's documentation ("Performance Best Practices") shows `cp.arange(1000).sum()`,
two small kernels, taking 49 us of CPU time; numba issue #3003 measured CuPy's launch overhead at
25 us.  A machine's CPU changes it; bench.launch measures our part of it."""

# warp-instructions per clock per SM, per unit (32 lanes each): the CUDA C++ Programming Guide's
# "throughput of native arithmetic instructions" for compute capability 8.0/9.0 (FP32 128 lanes,
# 32-bit integer and compare 64, conversions 16, special functions 16, shuffles 32), loads/stores
# 32 lanes per clock per SM; 'other' (branches, barriers, 64-bit float) counted at the issue rate.
UNIT_RATES = {"fp32": 4.0, "imad": 2.0, "alu": 2.0, "conv": 0.5, "mufu": 0.5, "shfl": 1.0, "mem": 1.0,
              "other": 4.0, "tensor": None}
ISSUE_PER_CLOCK = 4.0           # 4 schedulers per SM, one warp-instruction each per clock
L1_SECTORS_PER_CLOCK = 4        # 128 bytes of global data per SM per clock
SHARED_WAVEFRONTS_PER_CLOCK = 1


@dataclass
class LaunchWork:
    """One launch at the real shape, as kernels/runtime/predict.py works it out.

    blocks, threads_per_block, blocks_per_sm (resident, from the occupancy calculator; 0: the
    block cannot launch); dram_bytes (distinct bytes of the arguments read and written);
    l2_sectors (32-byte sectors of every global request, loads, stores and atomics); l1_cycles
    (SM-cycles of L1 traffic, summed over SMs); instructions ({unit: warp-instructions}, None when
    the PTX could not be read); warp_cycles (cycles one warp needs for its own work, alone; None:
    unknown); ramp_cycles (the part of them outside its loops over global memory); atomic_most (atomics on the busiest address); flops, tensor_cores: for the
    compute bound when there are no instruction counts; notes: what was estimated how."""
    kernel: str
    blocks: int
    threads_per_block: int
    blocks_per_sm: int
    dram_read_bytes: float
    dram_written_bytes: float
    l2_sectors: float = 0.0
    l1_cycles: float = 0.0
    instructions: Optional[dict] = None
    warp_cycles: Optional[float] = None
    ramp_cycles: float = 0.0
    atomic_most: float = 0.0
    flops: float = 0.0
    tensor_cores: bool = False
    notes: list = field(default_factory=list)


@dataclass
class LaunchPrediction:
    kernel: str
    seconds: float
    limit: str                        # the side giving the time (see the module docstring)
    parts: dict                       # side -> seconds
    rounds: int = 1
    work: Optional[LaunchWork] = None


@dataclass
class CasePrediction:
    seconds: float
    limit: str                        # the limit of the launch that takes longest, or "host"
    launches: list                    # [LaunchPrediction] (memsets and copies included)
    host_seconds: float = 0.0
    gpu_seconds: float = 0.0
    host_reads: bool = False          # a value read on the host: the host waits for the GPU

    @property
    def hidden_seconds(self):
        """The time between events when the host's launching is hidden behind a wait on the GPU
        (kernels/runtime/timing.py): the GPU's own time, back to back; a case that reads a value on
        the host cannot hide it (its host waits for the GPU), and is timed per call."""
        return self.seconds if self.host_reads else self.gpu_seconds

    @property
    def hidden_limit(self):
        """The limit of hidden_seconds: that of the launch that takes longest (per call: `limit`)."""
        if self.host_reads:
            return self.limit
        return max(self.launches, key=lambda p: p.seconds).limit if self.launches else "host"


def _issue_cycles(instructions):
    """Cycles an SM needs to issue `instructions` ({unit: warp-instructions})."""
    total = sum(v for k, v in instructions.items() if k != "tensor")
    cycles = total / ISSUE_PER_CLOCK
    for unit, n in instructions.items():
        rate = UNIT_RATES.get(unit)
        if rate:
            cycles = max(cycles, n / rate)
    # integer multiply-adds share the FMA pipes with FP32 (4 warp-instructions per clock together)
    fma = instructions.get("fp32", 0.0) + instructions.get("imad", 0.0)
    return max(cycles, fma / UNIT_RATES["fp32"])


def dram_seconds(gpu, read, written):
    """Time to read and write these bytes (see the module docstring): the published bandwidth,
    plus the read/write turnaround the measured copy shows."""
    turnaround = max(0.0, 2 / gpu.copy_bytes_per_s - 2 / gpu.dram_bytes_per_s)
    return (read + written) / gpu.dram_bytes_per_s + turnaround * min(read, written)


def predict_launch(gpu: GPU, w: LaunchWork) -> LaunchPrediction:
    """Seconds of one launch on `gpu` (no host time) and what limits it."""
    if w.blocks <= 0:
        return LaunchPrediction(w.kernel, 0.0, "empty", {}, 0, w)
    resident = max(1, w.blocks_per_sm)
    busiest = math.ceil(w.blocks / gpu.sms)          # blocks of the busiest SM
    rounds = math.ceil(busiest / resident)
    share = busiest / w.blocks                       # its part of the launch's work
    clock = gpu.clock_hz
    parts = {"dram": dram_seconds(gpu, w.dram_read_bytes, w.dram_written_bytes),
             "l2": w.l2_sectors * 32 / gpu.l2_bytes_per_s,
             "l1": w.l1_cycles / gpu.sms * (gpu.sms * share) / clock}
    if w.instructions is not None:
        parts["issue"] = _issue_cycles({k: v * share for k, v in w.instructions.items()}) / clock
        tensor = w.instructions.get("tensor", 0.0) * share
        if tensor:   # warp-level matrix products of 16x16x16 (8192 FLOPs each)
            parts["tensor"] = tensor * 8192 / (gpu.fp16_matrix_flops / gpu.sms)
    elif w.flops:
        peak = gpu.fp16_matrix_flops if w.tensor_cores else gpu.fp32_flops
        parts["compute"] = w.flops / peak
    if w.atomic_most:
        parts["atomics"] = w.atomic_most / clock
    limit = max(parts, key=parts.get)
    seconds = parts[limit] + w.ramp_cycles / clock
    if w.warp_cycles is not None:
        parts["latency"] = rounds * w.warp_cycles / clock
        if parts["latency"] > seconds:
            limit, seconds = "latency", parts["latency"]
    return LaunchPrediction(w.kernel, seconds, limit, parts, rounds, w)


def predict_operations(gpu: GPU, operations, host_seconds=HOST_SECONDS_PER_OPERATION):
    """The time of a sequence of device operations as CUDA events around them measure it when the
    GPU is idle at the first event (a call timed alone; `.hidden_seconds`: behind a wait).

    operations: dicts {"kind": "launch", "work": LaunchWork} | {"kind": "memset", "nbytes"} |
    {"kind": "copy", "nbytes"} | {"kind": "read", "nbytes"} (a device value read on the host:
    the host waits for the GPU).  Each costs `host_seconds` on the host before the GPU can start
    it; the GPU runs them in order.  Returns a CasePrediction."""
    host = gpu_free = 0.0
    busy = 0.0
    launches = []
    for op in operations:
        kind = op["kind"]
        host += host_seconds
        if kind == "launch":
            p = predict_launch(gpu, op["work"])
        elif kind == "memset":
            t = dram_seconds(gpu, 0, op["nbytes"])
            p = LaunchPrediction("memset", t, "dram", {"dram": t})
        elif kind == "copy":     # a few bytes to the device: its latency, a few microseconds
            t = 2e-6 + op["nbytes"] / 25e9
            p = LaunchPrediction("copy to device", t, "copy", {"copy": t})
        elif kind == "read":
            t = 2e-6 + op["nbytes"] / 25e9
            start = max(host, gpu_free)
            gpu_free = host = start + t
            launches.append(LaunchPrediction("copy to host", t, "copy", {"copy": t}))
            continue
        else:
            raise ValueError(f"unknown operation {kind!r}")
        start = max(host, gpu_free)
        gpu_free = start + p.seconds
        busy += p.seconds
        launches.append(p)
    total = max(gpu_free, host if operations and operations[-1]["kind"] == "read" else 0.0)
    longest = max(launches, key=lambda p: p.seconds, default=None)
    limit = "host" if total > 2 * busy or longest is None else longest.limit
    return CasePrediction(total, limit, launches, host, busy, any(op["kind"] == "read" for op in operations))
