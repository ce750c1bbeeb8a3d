"""Per-kernel microbenchmarks: `python -m bench.kernels`.

On a GPU (CuPy sees one): every kernel at the ResNet-50 v1.5 shapes for batch 256, timed with
CUDA events (median of repeats after warm-up), reported as time, achieved GB/s or TFLOP/s, the
percentage of the ceilings measured in the same run (a large device-to-device copy; a large
cuBLAS matmul) and the ratio to cuDNN / cuBLAS / a CuPy built-in doing the same work.

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
import platform
import sys

import numpy as np

import kernels
from bench import gpus, progress, stop_on_setup_error, write_json
from bench.kernel_cases import MODULES, Case
from kernels.lesson import gpu_module, median_time
from kernels.runtime.cuda_env import CudaSetupError


def _gpu():
    return gpu_module()


def _time(fn, xp, repeat, warmup=2):
    """Median seconds of fn() over `repeat` runs (CUDA events on the GPU)."""
    return median_time(fn, xp, repeat, warmup)


def measure_ceilings(xp, repeat):
    """Copy bandwidth (bytes read + written per second) and matmul peak (FLOP/s), measured here."""
    if xp is np:
        a = np.ones(32 << 20, np.uint8)
        b = np.empty_like(a)
        t = _time(lambda: np.copyto(b, a), np, repeat)
        m = np.ones((512, 512), np.float32)
        tm = _time(lambda: m @ m, np, repeat)
        return {"copy_bytes_per_s": 2 * a.nbytes / t, "matmul_flops_per_s": 2 * 512 ** 3 / tm,
                "matmul_fp16_flops_per_s": None}
    a = xp.ones(1 << 30, xp.uint8)
    b = xp.empty_like(a)
    t = _time(lambda: b.__setitem__(Ellipsis, a), xp, repeat)
    n = 8192
    m = xp.random.standard_normal((n, n), dtype=xp.float32)
    tm = _time(lambda: m @ m, xp, max(3, repeat // 3))
    h = m.astype(xp.float16)
    th = _time(lambda: h @ h, xp, max(3, repeat // 3))
    return {"copy_bytes_per_s": 2 * (1 << 30) / t, "matmul_flops_per_s": 2 * n ** 3 / tm,
            "matmul_fp16_flops_per_s": 2 * n ** 3 / th}


def run(groups=None, size=None, repeat=None, out=None):
    xp = _gpu() or np
    size = size or ("resnet50" if xp is not np else "tiny")
    repeat = repeat or (20 if xp is not np else 3)
    progress("bench.kernels", "the copy and matmul ceilings: starting")
    ceilings = measure_ceilings(xp, repeat)
    rows = []
    for name in MODULES:
        if groups and name not in groups:
            continue
        try:
            mod = importlib.import_module(f"bench.kernel_cases.{name}")
        except ImportError as exc:
            rows.append({"group": name, "name": "(not available)", "error": f"{type(exc).__name__}: {exc}"})
            continue
        progress("bench.kernels", f"group {name}: starting")
        for case in mod.cases(xp, size):
            case.group = name
            rows.append(_run_case(case, xp, repeat, ceilings))
    result = {"device": _device_name(xp), "size": size, "repeat": repeat, "ceilings": ceilings, "cases": rows,
              "python": sys.version.split()[0], "numpy": np.__version__,
              "cupy": getattr(xp, "__version__", None) if xp is not np else None}
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
    try:
        t = _time(case.run, xp, repeat)
        row["seconds"] = t
        if case.bytes:
            row["bytes_per_s"] = case.bytes / t
            row["pct_copy_bw"] = 100 * row["bytes_per_s"] / ceilings["copy_bytes_per_s"]
        if case.flops:
            row["flops_per_s"] = case.flops / t
            half = case.notes.get("tensor_cores") and ceilings.get("matmul_fp16_flops_per_s")
            row["pct_matmul_peak"] = 100 * row["flops_per_s"] / ceilings["matmul_fp16_flops_per_s" if half else
                                                                         "matmul_flops_per_s"]
        if case.baseline is not None:
            tb = _time(case.baseline, xp, repeat)
            row["baseline_seconds"] = tb
            row["ours_over_baseline_time"] = t / tb
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
    header = f"{'group':<22}{'kernel':<52}{'time':>10}{'GB/s':>9}{'%copy':>7}{'TFLOP/s':>9}{'%mm':>6}{'vs base':>9}  baseline"
    print(header)
    print("-" * len(header))
    for r in result["cases"]:
        if "error" in r:
            print(f"{r['group']:<22}{r['name'][:51]:<52}  ERROR {r['error']}")
            continue
        t = r["seconds"]
        tstr = f"{t * 1e6:.1f}us" if t < 1e-3 else f"{t * 1e3:.2f}ms"
        gbs = f"{r['bytes_per_s'] / 1e9:.1f}" if "bytes_per_s" in r else ""
        pc = f"{r['pct_copy_bw']:.0f}" if "pct_copy_bw" in r else ""
        tf = f"{r['flops_per_s'] / 1e12:.2f}" if "flops_per_s" in r else ""
        pm = f"{r['pct_matmul_peak']:.0f}" if "pct_matmul_peak" in r else ""
        ratio = f"{r['ours_over_baseline_time']:.2f}x" if "ours_over_baseline_time" in r else ""
        print(f"{r['group']:<22}{r['name'][:51]:<52}{tstr:>10}{gbs:>9}{pc:>7}{tf:>9}{pm:>6}{ratio:>9}  "
              f"{r.get('baseline_name', '')}")
    print("(vs base: our time / baseline time; below 1 is faster than the baseline; %mm of the fp16 matmul peak "
          "for float16 (tensor-core) cases)")


# ---------------------------------------------------------------------------------- --profile
def profile_case(case: Case, arch):
    """Run `case` once on the emulator under kernels.profile(): a row with its metrics summed over
    its launches, each launch's kernel resources and occupancy on `arch`, its DRAM and L1 traffic,
    and its bound on every GPU of bench/gpus.py."""
    case.run()   # once unprofiled: builds the modules, and what a case computes once (a backward's forward)
    with kernels.profile() as prof:
        case.run()
    metrics, requested, derived = prof.total()
    row = {"group": case.group, "name": case.name, "bytes": case.bytes, "flops": case.flops, "metrics": metrics,
           "requested_bytes": requested, "derived": derived, "launches": []}
    for p in prof.launches:
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
    row.update(dram_bytes=dram, l1_cycles=cycles, tensor_cores=tensor, scale=case.notes.get("scale", 1),
               predictions={})
    for key, gpu in gpus.GPUS.items():
        b = gpus.bound(gpu, dram, cycles, case.flops, tensor)
        best = gpus.ideal(gpu, case.bytes, case.flops, tensor)
        b["ideal_s"] = best
        b["x_ideal"] = b["bound_s"] / best if best else None
        b["full_shape_bound_s"] = b["bound_s"] * row["scale"]   # the counts grow with the work
        row["predictions"][key] = b
    return row


def run_profile(groups=None, arch="sm_80", gpu=None, size="profile", repeat=None, out=None):
    """`python -m bench.kernels --profile`: profile_case for every case of `size` (and, with a GPU,
    its measured time at the same shape).  Returns the result dict (printed as a table)."""
    gpu = gpu or gpus.ARCH_GPU[arch]
    device = _gpu()
    rows = []
    for name in MODULES:
        if groups and name not in groups:
            continue
        mod = importlib.import_module(f"bench.kernel_cases.{name}")
        on_emulator = mod.cases(np, size)
        on_gpu = mod.cases(device, size) if device is not None else [None] * len(on_emulator)
        for case, twin in zip(on_emulator, on_gpu):
            case.group = name
            try:
                row = profile_case(case, arch)
                if twin is not None:
                    row["measured_s"] = _time(twin.run, device, repeat or 20)
            except Exception as exc:   # a failing case is reported, the others still run
                row = {"group": name, "name": case.name, "error": f"{type(exc).__name__}: {exc}"}
            rows.append(row)
            print(f"  profiled {case.name}", file=sys.stderr, flush=True)
    result = {"arch": arch, "gpu": gpu, "gpu_figures": vars(gpus.GPUS[gpu]), "size": size, "cases": rows,
              "measured_on": _device_name(device) if device is not None else None}
    print_profile_table(result)
    if out:
        write_json(result, out, indent=1)
    return result


def _us(seconds):
    return "" if seconds is None else (f"{seconds * 1e6:.1f}" if seconds < 1e-3 else f"{seconds * 1e6:.0f}")


def print_profile_table(result):
    gpu = result["gpu"]
    g = gpus.GPUS[gpu]
    print(f"\nkernels profiled on the emulator (size={result['size']}); resources and occupancy for {result['arch']}; "
          f"bounds for {g.name}: {g.dram_bytes_per_s / 1e9:.0f} GB/s, {g.fp32_flops / 1e12:.1f} TFLOP/s fp32, "
          f"{g.fp16_matrix_flops / 1e12:.0f} fp16 matrix, {g.sms} SMs at {g.boost_clock_hz / 1e9:.2f} GHz")
    measured = result.get("measured_on")
    head = (f"{'case':<62}{'ld sec/rq':>10}{'ld eff':>7}{'st eff':>7}{'sh wf/rq':>9}{'confl':>7}{'regs':>5}"
            f"{'spill':>6}{'occ':>5}{'traffic':>8}{'bound us':>9}{'limit':>8}{'x ideal':>8}{'full us':>9}"
            + (f"{'meas. us':>9}" if measured else ""))
    print(head)
    print("-" * len(head))
    for r in result["cases"]:
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
              f"{f(p['x_ideal'], '.1f'):>8}{_us(p['full_shape_bound_s']) if r['scale'] != 1 else '':>9}"
              + (f"{_us(r.get('measured_s')):>9}" if measured else ""))
    print("(ld sec/rq: sectors per global load request (4 = coalesced floats); eff: % of the moved bytes used; "
          "sh wf/rq: shared-memory wavefronts per load;\n confl: bank-conflict wavefronts; regs: the most "
          "registers per thread of the case's kernels; spill: bytes; occ: the lowest occupancy;\n traffic: "
          "estimated DRAM bytes / the fewest the op must move; bound: max(DRAM, L1, compute) in microseconds "
          "at this shape, without launch latency;\n limit: the side giving the bound; x ideal: the bound / "
          "the op's own roofline (1.0: this kernel's traffic is the op's minimum);\n full: the bound at ResNet-50's "
          "full shape (batch 256), the counts scaled with the work (for the cases profiled scaled down)"
          + (f"; meas.: measured on {measured}" if measured else "") + ")")


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
    args = p.parse_args(argv)
    if args.profile:
        arch = args.arch or (gpus.GPUS[args.gpu].arch if args.gpu else "sm_80")
        run_profile(args.groups, arch, args.gpu, args.size or "profile", args.repeat, args.out)
    else:
        run(args.groups, args.size, args.repeat, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(stop_on_setup_error("bench.kernels", main))
