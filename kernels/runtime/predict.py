"""Predict a GPU time from the emulator: the counts of a small shape, the launches of the real one.

    from kernels.runtime import predict
    twin = predict.profile_of(lambda: small_case.run(op, version, state))      # emulator, counted
    ops = predict.plan_of(lambda: real_case.run(op, version, state))          # real shape, not run
    p = predict.predict(ops, twin, "H100")                                     # a CasePrediction
    p.seconds, p.limit

`profile_of` runs a call twice on the emulator (the first builds what it caches, e.g. a backward's
forward) and profiles the second (kernels.profile()); `plan_of` runs the same call twice on
kernels/runtime/plan.py's stand-in arrays at the real shape and records the second run's
launches.  `predict` matches each planned launch with the profiled launch of the same kernel, in
order, and scales that launch's counts to the real shape:

  by its data  the ratio of the bytes its arguments touch at the two shapes (an argument the
               small launch touched mostly counts with its real size, one it touched in a few
               places, a row of a matrix, with what it touched): grid-stride loops, reductions,
               the loops over the data.  A matrix product's tiles each run the whole reduction:
               with `work_ratio` (the ratio of FLOPs) those grow with their work instead (the
               small shape must fill its tiles: a partly empty tile does a full tile's work).
  by its warps the code outside the loops, and loops over shared memory only (a block's tree
               reduction): once per warp or block of the real launch.

A launch's loads wait for DRAM when it streams more than half the L2, or when the launch before
it streamed more than the L2 holds (what it wrote for this one, a reduction's partial sums, has
been pushed out by then); for L2 otherwise.  A matrix product's tiles are read by many blocks:
its loads wait for DRAM once per byte, for the L2 on the other reads.

Instructions and the time a warp waits per loop trip come from the PTX (kernels/runtime/ptx.py;
without NVRTC the model keeps the memory sides only); registers and shared memory give the
resident blocks per SM (kernels.resources, kernels.occupancy).
"""

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from . import plan as _plan
from . import ptx as _ptx
from .ptxas import resources
from ..emu import perfmodel
from ..emu import profiler as _profiler
from ..emu.occupancy_calculator import occupancy

__all__ = ["profile_of", "profile_cached", "plan_of", "predict", "launch_work", "gpu", "TwinLaunch"]


def gpu(name_or_gpu):
    """A perfmodel.GPU from its name ('H100') or itself."""
    if isinstance(name_or_gpu, perfmodel.GPU):
        return name_or_gpu
    try:
        return perfmodel.GPUS[name_or_gpu]
    except KeyError:
        raise ValueError(f"unknown GPU {name_or_gpu!r}; known: {', '.join(perfmodel.GPUS)}") from None


def profile_of(run):
    """The LaunchProfiles of the second of two calls of run() on the emulator."""
    run()
    with _profiler.profile() as prof:
        run()
    return prof.launches


class TwinLaunch:
    """What the predictions need of a LaunchProfile (kernel, grid, block, shared_mem, arguments,
    atomics, sites()), as profile_cached keeps it on disk."""

    def __init__(self, kernel, grid, block, shared_mem, arguments, atomics, sites):
        self.kernel, self.grid, self.block, self.shared_mem = kernel, tuple(grid), tuple(block), shared_mem
        self.arguments, self.atomics, self._sites = arguments, atomics, sites

    def sites(self):
        return self._sites

    @classmethod
    def of(cls, p):
        keep = ("file", "line", "space", "op", "requests", "lanes", "warps", "sectors", "wavefronts", "ideal")
        return cls(p.kernel, p.grid, p.block, p.shared_mem, p.arguments, p.atomics,
                   [{k: x[k] for k in keep if k in x} for x in p.sites()])

    def to_dict(self):
        return {"kernel": self.kernel, "grid": list(self.grid), "block": list(self.block),
                "shared_mem": self.shared_mem, "arguments": self.arguments, "atomics": self.atomics,
                "sites": self._sites}


_sources = None


def _sources_digest():
    """A digest of everything a profile depends on: the kernels, their headers, the launchers,
    the emulator and profiler (any change makes the cached profiles stale)."""
    global _sources
    if _sources is None:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for pattern in ("*.cu", "*.cuh", "*.py", "emu/*.cpp", "emu/*.py", "emu/include/*.h", "runtime/*.py"):
            for path in sorted(root.glob(pattern)):
                h.update(path.name.encode())
                h.update(path.read_bytes())
        _sources = h.hexdigest()[:24]
    return _sources


def profile_cached(key, run):
    """profile_of(run) as TwinLaunches, kept on disk (beside the emulator's builds) under `key`
    (a JSON-able description of what run() does: family, shape, op, version) and the digest of
    the kernel sources (a learner's copy in use included): a lesson's predictions cost the
    emulator once."""
    from ..emu.emulator import cache_dir
    from . import launch
    copies = {f: hashlib.sha256(Path(p).read_bytes()).hexdigest() for f, p in sorted(launch._sources.items())}
    name = hashlib.sha256(json.dumps([key, _sources_digest(), copies], default=str).encode()).hexdigest()[:32]
    folder = cache_dir() / "twins"
    path = folder / f"{name}.json"
    try:
        return [TwinLaunch(**d) for d in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        pass
    launches = [TwinLaunch.of(p) for p in profile_of(run)]
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump([t.to_dict() for t in launches], f)
    os.replace(tmp, path)
    return launches


def plan_of(run):
    """The plan.Operations of the second of two calls of run() on stand-in arrays (run() must
    build its inputs with kernels.runtime.plan.cupy, e.g. a kernels.cases case made with it)."""
    with _plan.planning() as p:
        run()
        first = len(p.operations)
        run()
    return p.operations[first:]


def _prod(t):
    return int(np.prod([max(1, int(x)) for x in t]))


def _touched(op, twin):
    """(bytes the real launch reads, writes; bytes the profiled one touched) (see the module
    docstring)."""
    real_sizes = {i: a.nbytes for i, a in enumerate(op.args) if isinstance(a, _plan.PlanArray)}
    small = read = written = 0.0
    for a in twin.arguments:
        r, w = min(a["read_bytes"], a["bytes"]), min(a["written_bytes"], a["bytes"])
        size_real = real_sizes.get(a["index"], a["bytes"])
        grow = size_real / a["bytes"] if max(r, w) >= 0.5 * a["bytes"] else 1.0
        small += r + w
        read += r * grow
        written += w * grow
    return read, written, small


def _data_keys(code):
    """The (file, line, space, op) keys of the loops over global memory: their counts grow with
    the data; the rest (code outside loops, shared-memory-only loops) with the warps."""
    keys = set()
    for loop in code.loops:
        if any(k[2] == "global" for k in loop.keys):
            keys.update(loop.keys)
    keys.update(code.remainder_keys)
    return keys


def launch_work(op, twin, arch, g, work_ratio=None, evicted=False):
    """perfmodel.LaunchWork of one planned launch `op` from its profiled twin (a LaunchProfile,
    or None: then only the bytes of its arguments are known).  Its loads wait for DRAM when it
    streams more than half the L2 or when `evicted` (the launch before it streamed more than the
    L2 holds, so what it left there is gone), for L2 otherwise; a tiled matrix product's loads
    (work_ratio given) for DRAM once per byte and for the L2 on every other read."""
    kernel = op.kernel
    blocks, threads = _prod(op.grid), _prod(op.block)
    warps = blocks * math.ceil(threads / 32)
    notes = []
    try:
        r = resources(kernel, arch)
        resident = r.occupancy(threads, op.shared_mem).blocks_per_sm
    except Exception as exc:   # no NVRTC: 32 registers assumed
        resident = occupancy(arch, threads, 32, op.shared_mem).blocks_per_sm
        notes.append(f"registers unknown ({type(exc).__name__}): 32 assumed")
    if twin is None:
        nbytes = sum(a.nbytes for a in op.args if isinstance(a, _plan.PlanArray))
        notes.append("not profiled: its arguments' bytes once")
        return perfmodel.LaunchWork(kernel.name, blocks, threads, resident, float(nbytes), 0.0, notes=notes)
    read, written, small = _touched(op, twin)
    real = read + written
    s = real / small if small else 1.0
    small_warps = _prod(twin.grid) * math.ceil(_prod(twin.block) / 32)
    per_warp = warps / small_warps
    if work_ratio and s > 1.01:
        s = work_ratio
    try:
        code = _ptx.kernel_code(kernel, arch)
    except Exception as exc:
        code = None
        notes.append(f"no PTX ({type(exc).__name__}): no instruction counts")
    data = _data_keys(code) if code else None
    sites = {(x["file"], x["line"], x["space"], x["op"]): x for x in twin.sites()}

    def scale(key):
        return s if data is None or _nearest(key, data) is not None else per_warp

    l2_sectors = sum(x["sectors"] * scale(k) for k, x in sites.items() if x["space"] == "global")
    wavefronts = sum((x["wavefronts"] if x["op"] != "atom" else x["requests"]) * scale(k)
                     for k, x in sites.items() if x["space"] == "shared")
    l1 = l2_sectors / perfmodel.L1_SECTORS_PER_CLOCK + wavefronts / perfmodel.SHARED_WAVEFRONTS_PER_CLOCK
    at = twin.atomics
    hot = at["ops"] > 32 * max(1, at["addresses"])        # a few accumulators: they grow with the data
    most = at["most"] * (s if hot else 1.0)
    work = perfmodel.LaunchWork(kernel.name, blocks, threads, resident, read, written, l2_sectors, l1,
                                atomic_most=most, notes=notes)
    if code is not None:
        from_dram = evicted or real > g.l2_bytes / 2
        # a matrix product's tiles are read by many blocks: a load waits for DRAM at most once
        # per byte read, the L2 serves the rest, so its latency is the mix of the two.  (A
        # streaming kernel's loads of a few per-channel values hit too, but in the same trip as
        # a load from DRAM: they do not shorten its wait.)
        loaded = 32 * sum(x["sectors"] * scale(k) for k, x in sites.items() if x["space"] == "global" and x["op"] == "ld")
        share = min(1.0, read / loaded) if loaded and work_ratio else 1.0
        seconds = g.l2_latency_s + share * (g.dram_latency_s - g.l2_latency_s) if from_dram else g.l2_latency_s
        latency = seconds * g.clock_hz
        if from_dram and real <= g.l2_bytes / 2:
            notes.append("its inputs came from an earlier launch that streamed more than the L2 holds: DRAM latency")
        work.instructions, work.warp_cycles, work.ramp_cycles = _instructions(code, sites, scale, warps, latency,
                                                                              small_warps)
    return work


def _instructions(code, sites, scale, warps, latency, small_warps):
    """({unit: warp-instructions}, cycles the busiest warp needs, the part of them outside the
    loops over global memory) of a launch of `warps` warps.

    Every source loop's iterations come from the emulator's count of one of its memory lines
    (the largest: a line under a condition runs less), shared by the warps that ran it (the
    same share of the warps as in the profiled launch: a kernel whose warps past the last
    channel return at once keeps them idle); a loop of no counted line runs once per trip of
    the loop around it, a loop whose lines the emulator never counted does not run, and blocks
    that did not run in the profiled launch are left out (KernelCode.live_part).  An unrolled
    loop runs floor(iterations per entry / unroll) trips, its remainder the rest."""
    def ran(key):
        found = _nearest(key, sites)
        return found is not None and sites[found]["requests"] > 0

    instructions = {u: c * warps for u, c in code.outside.cost.items()}
    cycles = ramp = _ptx.trip_cycles(code.outside.instrs, latency)
    trips = {}                                       # PTX loop index -> trips per warp
    order = sorted(range(len(code.source_loops)), key=lambda i: _depth(code, code.source_loops[i].main))
    for i in order:
        sl = code.source_loops[i]
        main = code.loops[sl.main]
        rem = code.loops[sl.remainder] if sl.remainder >= 0 else None
        entries = trips.get(main.parent, 0.0) if main.parent >= 0 else 1.0
        counted = _anchor_iterations(sl.anchors, sites, scale)
        if counted is not None:
            small_total, grow, active = counted
            total = small_total * grow
            if not active or small_total <= 1.5 * active:
                # every warp that ran it did about one iteration: the data, not the code, left the
                # other warps idle, and a larger shape gives them work
                busy = min(warps, max(1.0, total))
            else:     # warps idle by the code (past the last channel): as many in proportion
                busy = warps * min(1.0, active / small_warps)
            iterations = total / max(1.0, busy)
        elif sl.anchors:
            busy, iterations = warps, 0.0   # memory lines the profiled launch never ran: nor does it
        else:
            busy, iterations = warps, entries
        if main.parent >= 0 and entries == 0:
            iterations = 0.0          # inside a version of an outer loop that does not run
        if rem is not None or sl.inline_remainder:
            per_entry = iterations / entries if entries else 0.0
            main_trips = math.floor(per_entry / sl.unroll) * entries
            rem_trips = iterations - sl.unroll * main_trips
        else:
            main_trips, rem_trips = iterations, 0.0
        trips[sl.main] = main_trips
        for other in sl.versions:
            trips[other] = 0.0
        cost, instrs = code.live_part(sl.main, ran)
        for unit, c in cost.items():
            instructions[unit] = instructions.get(unit, 0.0) + c * main_trips * busy
        spent = main_trips * _ptx.trip_cycles(instrs, latency)
        if rem is not None:
            trips[sl.remainder] = rem_trips
            cost, instrs = code.live_part(sl.remainder, ran)
            for unit, c in cost.items():
                instructions[unit] = instructions.get(unit, 0.0) + c * rem_trips * busy
            spent += rem_trips * _ptx.trip_cycles(instrs, latency)
        cycles += spent
        if not any(k[2] == "global" for k in main.keys):
            ramp += spent                 # a block-level loop (a tree over shared memory)
    return instructions, cycles, ramp


def _nearest(key, keys):
    """`key` or the key of `keys` one or two lines away in the same file, space and op (the
    emulator's debug information and the PTX's can name neighbouring lines of one statement)."""
    if key in keys:
        return key
    near = [k for k in keys if k[0] == key[0] and k[2:] == key[2:] and abs(k[1] - key[1]) <= 2]
    return min(near, key=lambda k: abs(k[1] - key[1])) if near else None


def _anchor_iterations(anchors, sites, scale):
    """(source iterations of a loop in the profiled launch, warp-level, all warps; the factor to
    the real shape; the profiled launch's warps that ran it), or None: what the memory line
    saying the most says (requests / copies per iteration; a line under a condition says fewer).
    A line the emulator's debug information put one or two lines away (inlined conversions)
    still counts."""
    best = None
    for key, copies in anchors.items():
        found = _nearest(key, sites)
        site = sites[found] if found else None
        if site is None or not site["requests"]:
            continue
        n = site["requests"] / copies
        if best is None or n * scale(key) > best[0] * best[1]:
            best = (n, scale(key), site.get("warps", 0))
    return best


def _depth(code, loop):
    d = 0
    while loop >= 0:
        loop = code.loops[loop].parent
        d += 1
    return d


def predict(operations, twin_launches, gpu_name="H100", arch=None, work_ratio=None):
    """CasePrediction of planned `operations` (plan_of) from the profiled `twin_launches`
    (profile_of) on a GPU (a name of perfmodel.GPUS).  work_ratio: the real shape's FLOPs over the
    profiled one's, for matrix products (see the module docstring)."""
    g = gpu(gpu_name)
    arch = arch or g.arch
    pool = list(twin_launches)
    used = [False] * len(pool)
    twins = []
    for op in operations:
        twin = None
        if op.kind == "launch":
            for k, t in enumerate(pool):
                if not used[k] and t.kernel == op.kernel.name:
                    used[k] = True
                    twin = t
                    break
        twins.append(twin)
    # the bytes each operation streams through L2 (a timing loop repeats the case: the last
    # operation comes before the first)
    streamed = []
    for op, twin in zip(operations, twins):
        if op.kind == "launch":
            streamed.append(sum(_touched(op, twin)[:2]) if twin is not None else
                            sum(a.nbytes for a in op.args if isinstance(a, _plan.PlanArray)))
        else:
            streamed.append(op.nbytes)
    ops = []
    for i, (op, twin) in enumerate(zip(operations, twins)):
        if op.kind != "launch":
            ops.append({"kind": op.kind, "nbytes": op.nbytes})
            continue
        evicted = streamed[i - 1] > g.l2_bytes if operations else False
        ops.append({"kind": "launch", "work": launch_work(op, twin, arch, g, work_ratio, evicted)})
    return perfmodel.predict_operations(g, ops)
