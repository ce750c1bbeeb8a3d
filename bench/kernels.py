"""Per-kernel microbenchmarks: `python -m bench.kernels`.

On a GPU (CuPy sees one): every kernel at the ResNet-50 v1.5 shapes for batch 256, timed with
CUDA events (median of repeats after warm-up), reported as time, achieved GB/s or TFLOP/s, the
percentage of the ceilings measured in the same run (a large device-to-device copy; a large
cuBLAS matmul) and the ratio to cuDNN / cuBLAS / a CuPy built-in doing the same work.

Without a GPU it runs tiny sizes through the CPU emulator, to show that every case works
end to end (the times then measure the emulator, not a GPU).

    python -m bench.kernels                      # auto: GPU if present, else emulator + tiny
    python -m bench.kernels --size tiny --json out.json --groups elementwise reduce
"""

import argparse
import importlib
import json
import platform
import sys

import numpy as np

from bench.kernel_cases import MODULES, Case
from kernels.lesson import gpu_module, median_time


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
        for case in mod.cases(xp, size):
            case.group = name
            rows.append(_run_case(case, xp, repeat, ceilings))
    result = {"device": _device_name(xp), "size": size, "repeat": repeat, "ceilings": ceilings, "cases": rows,
              "python": sys.version.split()[0], "numpy": np.__version__,
              "cupy": getattr(xp, "__version__", None) if xp is not np else None}
    print_table(result)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}")
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
            row["pct_matmul_peak"] = 100 * row["flops_per_s"] / ceilings["matmul_flops_per_s"]
        if case.baseline is not None:
            tb = _time(case.baseline, xp, repeat)
            row["baseline_seconds"] = tb
            row["ours_over_baseline_time"] = t / tb
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
    print("(vs base: our time / baseline time; below 1 is faster than the baseline)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "resnet50"], help="default: resnet50 on a GPU, tiny otherwise")
    p.add_argument("--groups", nargs="*", choices=MODULES, help="only these groups of kernels")
    p.add_argument("--repeat", type=int, help="timed runs per case (median reported)")
    p.add_argument("--json", dest="out", help="write the full results here")
    args = p.parse_args(argv)
    run(args.groups, args.size, args.repeat, args.out)


if __name__ == "__main__":
    main()
