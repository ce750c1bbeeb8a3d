"""Per-kernel microbenchmarks: `python -m bench.kernels`.

On a GPU (CuPy sees one): every kernel at the ResNet-50 v1.5 shapes for batch 256, timed with
CUDA events (median of repeats after warm-up), reported as time, achieved GB/s or TFLOP/s, the
percentage of the ceilings measured in the same run (a large device-to-device copy; a large
cuBLAS matmul) and the ratio to cuDNN / cuBLAS / a CuPy built-in doing the same work.  Each
case is timed two ways (kernels/runtime/timing.py): with the host's launch time hidden behind a
wait on the GPU (`seconds`, `pct_copy_bw`: the kernels' own time, as a training step whose host
runs ahead sees it) and each call alone (`seconds_per_call`, `pct_copy_bw_per_call`: the GPU
waits for the host's ~25 us per launch, which is most of a small kernel's time).

Without a GPU it runs tiny sizes through the CPU emulator, to show that every case works
end to end (the times then measure the emulator, not a GPU).

    python -m bench.kernels                      # auto: GPU if present, else emulator + tiny
    python -m bench.kernels --size tiny --json out.json --groups elementwise reduce

--profile: every case at a representative shape (size "profile": ResNet-50's layers scaled down
so that the emulator can run them, each name says how) run once on the emulator under
kernels.profile(): Nsight Compute's memory metrics, each kernel's registers, spills and occupancy
on --arch (kernels.resources, kernels.occupancy), and the time bound on a named GPU from
bench/gpus.py (max of DRAM bytes / bandwidth, L1 traffic / L1 throughput, FLOPs / peak), with the
side that limits and how far it is from the op's own roofline.  With a GPU, the same cases run
there too and their measured times print beside the predictions.

    python -m bench.kernels --profile                       # sm_80, predictions for an A100
    python -m bench.kernels --profile --arch sm_90 --gpu H200 --json profile.json
"""

import argparse
import importlib
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import kernels
import kernels.emu.profiler
from bench import gpus, progress, stop_on_setup_error, write_json
from bench.kernel_cases import MODULES, Case, twin_of
from kernels.lesson import gpu_module
from kernels.runtime.timing import HOST_CLOCK, PER_CALL, time_call
from kernels.runtime import plan, predict
from kernels.runtime.cuda_env import CudaSetupError


def _gpu():
    return gpu_module()


def _timing(fn, xp, repeat, warmup=2):
    """kernels.runtime.timing.Timing of fn(): `repeat` calls with the host hidden, half as many alone."""
    return time_call(fn, xp, repeat, warmup, per_call_repeat=max(3, repeat // 2))


def _time(fn, xp, repeat, warmup=2):
    """Median seconds of fn() over `repeat` runs (CUDA events on the GPU, the host's time hidden)."""
    return _timing(fn, xp, repeat, warmup).seconds


def measure_ceilings(xp, repeat, size="resnet50"):
    """Copy bandwidth (bytes read + written per second) and matmul peak (FLOP/s), measured here
    (size 'tiny' on a GPU, the simulated one included: a 32 MB copy and 256x256 products, which
    exercise the code, not the GPU)."""
    if xp is np:
        a = np.ones(32 << 20, np.uint8)
        b = np.empty_like(a)
        t = _time(lambda: np.copyto(b, a), np, repeat)
        m = np.ones((512, 512), np.float32)
        tm = _time(lambda: m @ m, np, repeat)
        return {"copy_bytes_per_s": 2 * a.nbytes / t, "matmul_flops_per_s": 2 * 512 ** 3 / tm,
                "matmul_fp16_flops_per_s": None}
    nbytes, n = (32 << 20, 256) if size == "tiny" else (1 << 30, 8192)
    a = xp.ones(nbytes, xp.uint8)
    b = xp.empty_like(a)
    t = _time(lambda: b.__setitem__(Ellipsis, a), xp, repeat)
    m = xp.random.standard_normal((n, n), dtype=xp.float32)
    tm = _time(lambda: m @ m, xp, max(3, repeat // 3))
    h = m.astype(xp.float16)
    th = _time(lambda: h @ h, xp, max(3, repeat // 3))
    return {"copy_bytes_per_s": 2 * nbytes / t, "matmul_flops_per_s": 2 * n ** 3 / tm,
            "matmul_fp16_flops_per_s": 2 * n ** 3 / th}


PARTIAL_EVERY_S = 2.0
"""How often, at most, run() rewrites its JSON while it goes (a whole rewrite per case would make the
644 cases' run write its growing file 644 times)."""


def run(groups=None, size=None, repeat=None, out=None):
    xp = _gpu() or np
    size = size or ("resnet50" if xp is not np else "tiny")
    repeat = repeat or (20 if xp is not np else 3)
    progress("bench.kernels", "the copy and matmul ceilings: starting")
    ceilings = measure_ceilings(xp, repeat, size)
    rows = []
    result = {"device": _device_name(xp), "size": size, "repeat": repeat, "ceilings": ceilings, "cases": rows,
              "python": sys.version.split()[0], "numpy": np.__version__,
              "cupy": getattr(xp, "__version__", None) if xp is not np else None, "complete": False}
    written = None   # time.monotonic() of the last partial write
    for name in groups or MODULES:   # in the order asked for: a run stopped early keeps the first groups
        try:
            mod = importlib.import_module(f"bench.kernel_cases.{name}")
        except ImportError as exc:
            rows.append({"group": name, "name": "(not available)", "error": f"{type(exc).__name__}: {exc}"})
            continue
        progress("bench.kernels", f"group {name}: starting")
        for case in mod.cases(xp, size):
            case.group = name
            rows.append(_run_case(case, xp, repeat, ceilings))
            # what is measured so far, kept if a time limit stops the run ("complete": false)
            if out and (written is None or time.monotonic() - written >= PARTIAL_EVERY_S):
                write_json(result, out, quiet=True)
                written = time.monotonic()
    result["complete"] = True
    print_table(result)
    if out:
        write_json(result, out)
    return result


def _device_name(xp):
    if xp is np:
        return f"CPU emulator ({platform.processor() or platform.machine()})"
    props = xp.cuda.runtime.getDeviceProperties(0)
    return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])


def _run_case(case: Case, xp, repeat, ceilings):
    row = {"group": case.group, "name": case.name, "bytes": case.bytes, "flops": case.flops,
           "baseline_name": case.baseline_name}
    if case.notes.get("not_timed"):
        row["skipped"] = case.notes["not_timed"]
        return row
    try:
        timing = _timing(case.run, xp, repeat)
        t = row["seconds"] = timing.seconds
        row["timing"] = timing.method
        row["seconds_per_call"] = timing.per_call_seconds
        if timing.note:
            row["timing_note"] = timing.note
        if case.bytes:
            row["bytes_per_s"] = case.bytes / t
            row["pct_copy_bw"] = 100 * row["bytes_per_s"] / ceilings["copy_bytes_per_s"]
            row["pct_copy_bw_per_call"] = 100 * case.bytes / timing.per_call_seconds / ceilings["copy_bytes_per_s"]
        if case.flops:
            row["flops_per_s"] = case.flops / t
            half = case.notes.get("tensor_cores") and ceilings.get("matmul_fp16_flops_per_s")
            row["pct_matmul_peak"] = 100 * row["flops_per_s"] / ceilings["matmul_fp16_flops_per_s" if half else
                                                                         "matmul_flops_per_s"]
        if case.baseline is not None:
            base = _timing(case.baseline, xp, repeat)
            tb = row["baseline_seconds"] = base.seconds
            row["baseline_timing"] = base.method
            row["baseline_seconds_per_call"] = base.per_call_seconds
            if base.method == timing.method:
                row["ours_over_baseline_time"] = t / tb
            else:   # one of them reads on the host (timed per call): compare the calls alone, both
                row["ours_over_baseline_time"] = timing.per_call_seconds / base.per_call_seconds
                row["ours_over_baseline_timing"] = PER_CALL
            if case.flops:
                row["baseline_flops_per_s"] = case.flops / tb
    except CudaSetupError:
        raise                 # every case that needs the missing header would fail the same way
    except Exception as exc:  # a failing case is reported, the others still run
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def print_table(result):
    c = result["ceilings"]
    print(f"\nkernels on {result['device']}, size={result['size']}, median of {result['repeat']}")
    print(f"measured ceilings: copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"matmul fp32 {c['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s"
          + (f", fp16 {c['matmul_fp16_flops_per_s'] / 1e12:.1f} TFLOP/s" if c.get("matmul_fp16_flops_per_s") else ""))
    header = (f"{'group':<22}{'kernel':<52}{'time':>10}{'GB/s':>9}{'%copy':>7}{'%call':>7}{'TFLOP/s':>9}{'%mm':>6}"
              f"{'vs base':>9}  baseline")
    print(header)
    print("-" * len(header))
    for r in result["cases"]:
        if "error" in r:
            print(f"{r['group']:<22}{r['name'][:51]:<52}  ERROR {r['error']}")
            continue
        if "skipped" in r:
            print(f"{r['group']:<22}{r['name'][:51]:<52}  not timed: {r['skipped']}")
            continue
        t = r["seconds"]
        tstr = f"{t * 1e6:.1f}us" if t < 1e-3 else f"{t * 1e3:.2f}ms"
        gbs = f"{r['bytes_per_s'] / 1e9:.1f}" if "bytes_per_s" in r else ""
        pc = f"{r['pct_copy_bw']:.0f}" if "pct_copy_bw" in r else ""
        if r.get("timing") == PER_CALL:
            pc += "*"
        pcall = f"{r['pct_copy_bw_per_call']:.0f}" if "pct_copy_bw_per_call" in r else ""
        tf = f"{r['flops_per_s'] / 1e12:.2f}" if "flops_per_s" in r else ""
        pm = f"{r['pct_matmul_peak']:.0f}" if "pct_matmul_peak" in r else ""
        ratio = f"{r['ours_over_baseline_time']:.2f}x" if "ours_over_baseline_time" in r else ""
        if r.get("ours_over_baseline_timing") == PER_CALL:
            ratio += "*"
        print(f"{r['group']:<22}{r['name'][:51]:<52}{tstr:>10}{gbs:>9}{pc:>7}{pcall:>7}{tf:>9}{pm:>6}{ratio:>9}  "
              f"{r.get('baseline_name', '')}")
    on_cpu = all(r.get("timing") in (None, HOST_CLOCK) for r in result["cases"])
    print(("(time: the host's clock around each call, on the CPU emulator (%call the same);" if on_cpu else
           "(time, GB/s, %copy: the kernels' own time, the host's launch time hidden behind a wait on the GPU; "
           "%call: each call timed alone, the GPU waiting for the host (* : the host could not be hidden, see "
           "timing_note in the JSON);") + "\n vs base: our time / baseline time (* : per call, both, where one could not "
          "hide the host); below 1 is faster than the baseline; "
          "%mm of the fp16 matmul peak for float16 (tensor-core) cases)")


# ---------------------------------------------------------------------------------- --profile
def profile_case(case: Case, arch):
    """Run `case` once on the emulator under kernels.profile() (after one plain run: it builds the
    modules and what a case computes once, a backward's forward): a row with its metrics summed over
    its launches, each launch's kernel resources and occupancy on `arch`, its DRAM and L1 traffic,
    and its roofline bound on every GPU of bench/gpus.py; row["_launches"] keeps the
    LaunchProfiles (for the predictions; not written to JSON)."""
    launches = predict.profile_of(case.run)
    prof = kernels.emu.profiler.Profile()
    prof.launches = launches
    metrics, requested, derived = prof.total()
    row = {"group": case.group, "name": case.name, "bytes": case.bytes, "flops": case.flops, "metrics": metrics,
           "requested_bytes": requested, "derived": derived, "launches": [], "_launches": launches}
    for p in launches:
        entry = {"kernel": p.kernel, "grid": list(p.grid), "block": list(p.block), "shared_mem": p.shared_mem}
        try:
            r = kernels.resources(p.function, arch)
            o = r.occupancy(p.block[0] * p.block[1] * p.block[2], p.shared_mem)
            entry.update(registers=r.registers, spill_bytes=r.spill_store_bytes + r.spill_load_bytes,
                         stack_bytes=r.stack_bytes, static_shared_bytes=r.static_shared_bytes,
                         occupancy=o.occupancy, limited_by=o.limited_by)
        except Exception as exc:   # no NVRTC here: the counts still stand
            entry["resources_error"] = f"{type(exc).__name__}: {exc}"
        row["launches"].append(entry)
    tensor = bool(case.notes.get("tensor_cores"))
    dram = metrics["dram__bytes_read.sum"] + metrics["dram__bytes_write.sum"]
    cycles = gpus.l1_cycles(metrics)
    row.update(dram_bytes=dram, l1_cycles=cycles, tensor_cores=tensor, predictions={})
    for key, gpu in gpus.GPUS.items():
        b = gpus.bound(gpu, dram, cycles, case.flops, tensor)
        best = gpus.ideal(gpu, case.bytes, case.flops, tensor)
        b["ideal_s"] = best
        b["x_ideal"] = b["bound_s"] / best if best else None
        row["predictions"][key] = b
    return row


def predict_case(case: Case, twin_row, gpu, arch):
    """The model's prediction (kernels/runtime/predict.py) of a ResNet-50 case (made on
    kernels.runtime.plan.cupy) from its profiled twin's row: a dict."""
    ops = predict.plan_of(case.run)
    tiled = case.notes.get("tiled") and case.flops and twin_row.get("flops")
    work_ratio = case.flops / twin_row["flops"] if tiled else None
    p = predict.predict(ops, twin_row["_launches"], gpu, arch, work_ratio)
    g = gpus.GPUS[gpu]
    row = {"group": case.group, "name": case.name, "twin": twin_row["name"], "bytes": case.bytes,
           "flops": case.flops,
           # what bench.kernels measures: the host's launch time hidden (a value read on the host: per call)
           "predicted_s": p.hidden_seconds, "limit": p.hidden_limit,
           # each call alone, the GPU waiting for the host's time per launch
           "predicted_per_call_s": p.seconds, "limit_per_call": p.limit,
           "host_s": p.host_seconds, "gpu_s": p.gpu_seconds, "host_reads": p.host_reads, "launches": []}
    if case.bytes:
        row["predicted_pct_copy_bw"] = 100 * case.bytes / p.hidden_seconds / g.copy_bytes_per_s
        row["predicted_pct_copy_bw_per_call"] = 100 * case.bytes / p.seconds / g.copy_bytes_per_s
    for lp in p.launches:
        e = {"kernel": lp.kernel, "seconds": lp.seconds, "limit": lp.limit, "parts": lp.parts}
        if lp.work is not None:
            e.update(blocks=lp.work.blocks, threads_per_block=lp.work.threads_per_block,
                     blocks_per_sm=lp.work.blocks_per_sm, rounds=lp.rounds, notes=lp.work.notes)
        row["launches"].append(e)
    return row


_BASELINE_VERSION = re.compile(r"^our (v\d+\b.*)$")
_NAMED_VERSION = re.compile(r"^(.*?) v\d+ [^\[]*(\[.*)$")


def measured_times(data):
    """{case name: (seconds, timing)} of a kernels.json that `bench.kernels --json` wrote on a GPU;
    timing: how it was timed (kernels.runtime.timing's HIDDEN or PER_CALL; a file from before the
    hidden timing has only per-call times).  A row whose baseline is another version of our own
    kernel ("our v1 scatter + atomicAdd") gives that version's time too, under the name its own
    row has now."""
    out = {}
    for r in data.get("cases", []):
        if r.get("seconds"):
            out[r["name"]] = (r["seconds"], r.get("timing", PER_CALL))
        m, n = _BASELINE_VERSION.match(r.get("baseline_name") or ""), _NAMED_VERSION.match(r["name"])
        if m and n and r.get("baseline_seconds"):
            out.setdefault(f"{n.group(1)} {m.group(1).strip()} {n.group(2)}",
                           (r["baseline_seconds"], r.get("baseline_timing", PER_CALL)))
    return out


def compared_prediction(row):
    """The prediction to set beside a row's measured time: per call when it was timed per call."""
    if row.get("measured_timing") == PER_CALL:
        return row.get("predicted_per_call_s")
    return row.get("predicted_s")


def version_pairs(rows):
    """Pairs (a, b) of prediction rows of one op at one shape in two versions."""
    def shape(name):
        return name[name.find("["):] if "[" in name else ""

    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            ka, kb = a["key"], b["key"]
            if (a["group"] == b["group"] and ka[0] == kb[0] and ka[2:] == kb[2:] and ka[1] != kb[1]
                    and shape(a["name"]) == shape(b["name"])):
                out.append((a, b))
    return out


def _same_order(a, b):
    """True when the model orders two cases as the GPU did (a tie in the prediction does not)."""
    p = compared_prediction(a) - compared_prediction(b)
    m = a["measured_s"] - b["measured_s"]
    return p != 0 and (p < 0) == (m < 0)


def summarize(rows):
    """The last line's figures over the rows with a measured time: {'median', 'within', 'count',
    'pairs_agree', 'pairs'} (None where there is nothing to count)."""
    both = [r for r in rows if r.get("measured_s") and compared_prediction(r)]
    ratios = sorted(compared_prediction(r) / r["measured_s"] for r in both)
    pairs = [(a, b) for a, b in version_pairs(both)]
    agree = sum(_same_order(a, b) for a, b in pairs)
    return {"median": statistics.median(ratios) if ratios else None,
            "within": sum(1 / 1.5 <= x <= 1.5 for x in ratios), "count": len(ratios),
            "pairs_agree": agree, "pairs": len(pairs),
            "pairs_list": [{"a": a["name"], "b": b["name"], "predicted": [compared_prediction(a), compared_prediction(b)],
                            "measured": [a["measured_s"], b["measured_s"]],
                            "agrees": _same_order(a, b)}
                           for a, b in pairs]}


def run_profile(groups=None, arch="sm_80", gpu=None, size="profile", repeat=None, out=None, measured=None,
                only_measured=False, quiet=False):
    """`python -m bench.kernels --profile`: profile_case for every case of `size` (the twins) and
    the model's prediction of every ResNet-50 case from its twin on `gpu`; with `measured` (the
    path of a kernels.json written by `bench.kernels --json` on a GPU) the measured times beside
    the predictions (`only_measured`: only the cases it holds).  With a GPU here, the twins' own
    times are measured too.  Returns the result dict (printed as two tables)."""
    gpu = gpu or gpus.ARCH_GPU[arch]
    device = _gpu()
    measured_data = json.loads(Path(measured).read_text()) if measured else None
    times = measured_times(measured_data) if measured_data else {}
    profiled, rows = [], []
    for name in MODULES:
        if groups and name not in groups:
            continue
        mod = importlib.import_module(f"bench.kernel_cases.{name}")
        real = mod.cases(plan.cupy, "resnet50")
        for c in real:
            c.group = name
        if only_measured:
            real = [c for c in real if c.name in times]
            if not real:
                continue
        twins = mod.cases(np, size)
        on_gpu = mod.cases(device, size) if device is not None else [None] * len(twins)
        twin_rows = {}
        for case, twin_gpu in zip(twins, on_gpu):
            case.group = name
            if only_measured and not any(twin_of(c, twins) is case for c in real):
                continue
            try:
                row = profile_case(case, arch)
                if twin_gpu is not None:
                    row["measured_s"] = _time(twin_gpu.run, device, repeat or 20)
            except Exception as exc:   # a failing case is reported, the others still run
                row = {"group": name, "name": case.name, "error": f"{type(exc).__name__}: {exc}"}
            twin_rows[id(case)] = row
            profiled.append(row)
            if not quiet:
                print(f"  profiled {case.name}", file=sys.stderr, flush=True)
        for c in real:
            twin = twin_of(c, twins)
            trow = twin_rows.get(id(twin)) if twin is not None else None
            if trow is None or "error" in trow:
                row = {"group": name, "name": c.name, "error": "no profiled twin" if trow is None else
                       f"twin {trow['name']}: {trow['error']}"}
            else:
                try:
                    row = predict_case(c, trow, gpu, arch)
                except Exception as exc:
                    row = {"group": name, "name": c.name, "error": f"{type(exc).__name__}: {exc}"}
            row["key"] = list(c.key)
            if c.name in times:
                row["measured_s"], row["measured_timing"] = times[c.name]
                if compared_prediction(row):
                    row["ratio"] = compared_prediction(row) / row["measured_s"]
            if c.notes.get("not_timed"):
                row["not_timed"] = c.notes["not_timed"]
            rows.append(row)
    result = {"arch": arch, "gpu": gpu, "gpu_figures": vars(gpus.GPUS[gpu]), "size": size, "profiled": profiled,
              "cases": rows, "measured_on": _device_name(device) if device is not None else None,
              "measured_file": str(measured) if measured else None,
              "measured_device": measured_data.get("device") if measured_data else None}
    if measured:
        result["summary"] = summarize(rows)
    if not quiet:
        print_profile_table(result)
        print_prediction_table(result)
    if out:
        write_json({k: v for k, v in result.items()} | {"profiled": [_public(r) for r in profiled]}, out, indent=1)
    return result


def _public(row):
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _us(seconds):
    return "" if seconds is None else (f"{seconds * 1e6:.1f}" if seconds < 1e-3 else f"{seconds * 1e6:.0f}")


def print_profile_table(result):
    gpu = result["gpu"]
    g = gpus.GPUS[gpu]
    print(f"\nkernels profiled on the emulator (size={result['size']}, the twins of the predictions below); "
          f"resources and occupancy for {result['arch']}; roofline bounds for {g.name}: "
          f"{g.dram_bytes_per_s / 1e9:.0f} GB/s, {g.fp32_flops / 1e12:.1f} TFLOP/s fp32, "
          f"{g.fp16_matrix_flops / 1e12:.0f} fp16 matrix, {g.sms} SMs at {g.clock_hz / 1e9:.2f} GHz")
    measured = result.get("measured_on")
    head = (f"{'case':<62}{'ld sec/rq':>10}{'ld eff':>7}{'st eff':>7}{'sh wf/rq':>9}{'confl':>7}{'regs':>5}"
            f"{'spill':>6}{'occ':>5}{'traffic':>8}{'bound us':>9}{'limit':>8}{'x ideal':>8}"
            + (f"{'meas. us':>9}" if measured else ""))
    print(head)
    print("-" * len(head))
    for r in result["profiled"]:
        if "error" in r:
            print(f"{r['name'][:61]:<62}ERROR {r['error']}")
            continue
        m, d, p = r["metrics"], r["derived"], r["predictions"][gpu]
        launches = r["launches"]
        regs = max((e.get("registers", 0) for e in launches), default=0)
        spill = sum(e.get("spill_bytes", 0) for e in launches)
        occ = min((e["occupancy"] for e in launches if "occupancy" in e), default=None)
        conflicts = (m["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"]
                     + m["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"])
        traffic = r["dram_bytes"] / r["bytes"] if r["bytes"] else None

        def f(v, spec):
            return "" if v is None else format(v, spec)

        print(f"{r['name'][:61]:<62}{f(d['global_ld_sectors_per_request'], '.2f'):>10}"
              f"{f(d['global_ld_efficiency'], '.0f'):>7}{f(d['global_st_efficiency'], '.0f'):>7}"
              f"{f(d['shared_ld_wavefronts_per_request'], '.2f'):>9}{conflicts:>7}{regs:>5}{spill:>6}"
              f"{f(occ, '.0%'):>5}{f(traffic, '.2f'):>8}{_us(p['bound_s']):>9}{p['limit']:>8}"
              f"{f(p['x_ideal'], '.1f'):>8}" + (f"{_us(r.get('measured_s')):>9}" if measured else ""))
    print("(ld sec/rq: sectors per global load request (4 = coalesced floats); eff: % of the moved bytes used; "
          "sh wf/rq: shared-memory wavefronts per load;\n confl: bank-conflict wavefronts; regs: the most "
          "registers per thread of the case's kernels; spill: bytes; occ: the lowest occupancy;\n traffic: "
          "estimated DRAM bytes / the fewest the op must move; bound: max(DRAM, L1, compute) in microseconds "
          "at this shape, without launch latency;\n limit: the side giving the bound; x ideal: the bound / "
          "the op's own roofline (1.0: this kernel's traffic is the op's minimum)"
          + (f"; meas.: measured on {measured}" if measured else "") + ")")


def print_prediction_table(result):
    g = gpus.GPUS[result["gpu"]]
    rows = result["cases"]
    measured = bool(result.get("measured_file"))
    timings = {r.get("measured_timing") for r in rows if "measured_s" in r}
    how = ""
    if measured and timings == {PER_CALL}:     # say it once: a file from before the host was hidden
        how = " (timed per call: each ratio against the per-call prediction)"
    print(f"\npredicted on {g.name} (kernels/emu/perfmodel.py: the twin's counts scaled to the ResNet-50 shape, its "
          f"launches planned at that shape){'; measured: ' + result['measured_file'] + how if measured else ''}")
    head = (f"{'case':<62}{'launches':>9}{'predicted us':>13}{'%copy':>6}{'call us':>9}{'%call':>6}{'limit':>9}"
            + (f"{'measured us':>12}{'ratio':>7}" if measured else ""))
    print(head)
    print("-" * len(head))
    for r in rows:
        if measured and "measured_s" not in r:
            continue
        if "error" in r:
            print(f"{r['name'][:61]:<62}  ERROR {r['error']}")
            continue
        pc = f"{r['predicted_pct_copy_bw']:.0f}" if "predicted_pct_copy_bw" in r else ""
        pk = f"{r['predicted_pct_copy_bw_per_call']:.0f}" if "predicted_pct_copy_bw_per_call" in r else ""
        line = (f"{r['name'][:61]:<62}{len(r['launches']):>9}{_us(r['predicted_s']):>13}{pc:>6}"
                f"{_us(r['predicted_per_call_s']):>9}{pk:>6}{r['limit']:>9}")
        if measured:
            ratio = r.get("ratio")
            mark = "" if ratio is None or 1 / 1.5 <= ratio <= 1.5 else " *"
            if r.get("measured_timing") == PER_CALL and not how:
                mark += " (per call)"
            line += f"{_us(r['measured_s']):>12}{ratio:>7.2f}{mark}" if ratio is not None else f"{_us(r['measured_s']):>12}"
        print(line)
    print("(launches: kernels, memsets and copies the case makes; predicted, %copy: the time bench.kernels measures, "
          "the host's launch time hidden (a case that reads a value on the host: per call), and its fewest bytes / "
          "that time, as % of the copy bandwidth;\n call us, %call: the same for a call timed alone, which pays the "
          "host's time per launch; limit: dram, l2, l1, issue, latency (Little's law: too few loads in flight), "
          "atomics, host (launch overhead)" + ("; ratio: predicted / measured (per call: against the per-call "
                                               "prediction), * beyond 1.5x" if measured else "") + ")")
    s = result.get("summary")
    if s:
        for pair in s["pairs_list"]:
            (pa, pb), (ma, mb) = pair["predicted"], pair["measured"]
            print(f"versions: {pair['a']} / {pair['b']}: measured {ma / mb:.2f}, predicted {pa / pb:.2f}"
                  f" ({'same order' if pair['agrees'] else 'ORDER DIFFERS'})")
        median = f"{s['median']:.2f}" if s["median"] is not None else "n/a"
        print(f"predicted/measured: median {median}, {s['within']} of {s['count']} within 1.5x; "
              f"version order agrees in {s['pairs_agree']} of {s['pairs']} pairs")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "resnet50", "profile"],
                   help="default: resnet50 on a GPU, tiny otherwise; profile with --profile")
    p.add_argument("--groups", nargs="*", choices=MODULES, help="only these groups of kernels")
    p.add_argument("--repeat", type=int, help="timed runs per case (median reported)")
    p.add_argument("--json", dest="out", help="write the full results here")
    p.add_argument("--profile", action="store_true",
                   help="profile every case on the emulator and predict its time (see above)")
    p.add_argument("--arch", choices=sorted(gpus.ARCH_GPU),
                   help="the architecture for registers, spills and occupancy (with --profile; default: the "
                        "GPU's, else sm_80)")
    p.add_argument("--gpu", choices=sorted(gpus.GPUS), help="the GPU of the predictions (default: --arch's)")
    p.add_argument("--measured", metavar="FILE.json",
                   help="with --profile: a kernels.json that `bench.kernels --json` wrote on a GPU; its times print "
                        "beside the predictions of the cases it holds, with a last line: median predicted/measured, "
                        "how many within 1.5x, how many version pairs the model orders as the GPU did")
    args = p.parse_args(argv)
    if args.measured and not args.profile:
        p.error("--measured goes with --profile")
    if args.measured and not Path(args.measured).is_file():
        p.error(f"--measured {args.measured}: no such file")
    if args.profile:
        arch = args.arch or (gpus.GPUS[args.gpu].arch if args.gpu else "sm_80")
        run_profile(args.groups, arch, args.gpu, args.size or "profile", args.repeat, args.out, args.measured,
                    only_measured=bool(args.measured))
    else:
        run(args.groups, args.size, args.repeat, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(stop_on_setup_error("bench.kernels", main))
