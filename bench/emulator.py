"""What the emulator's checks and its profiler cost: `python -m bench.emulator`.

Runs every case of bench.kernel_cases at the tiny size on the CPU emulator, plain, with each
check of KERNELS_EMU_SANITIZE (memcheck, racecheck, initcheck, synccheck, all) and under
kernels.profile(), and prints the time of each as a ratio to the plain launch measured in the
same run (median of --repeat runs after one warm-up, which also builds the instrumented
modules).  Also the host time of one launch of an empty kernel, plain and sanitized.

    python -m bench.emulator                    # all groups
    python -m bench.emulator --groups reduce elementwise --repeat 5 --json out.json
"""

import argparse
import importlib
import json
import platform
import statistics
import sys
import time

import numpy as np

import kernels
from bench.kernel_cases import MODULES

MODES = [("plain", ""), ("memcheck", "memcheck"), ("racecheck", "racecheck"), ("initcheck", "initcheck"),
         ("synccheck", "synccheck"), ("all", "all"), ("profile", None)]


def _median_seconds(fn, checks, repeat):
    """Median seconds of fn() under kernels.sanitize(checks), or kernels.profile() for None."""
    with (kernels.profile() if checks is None else kernels.sanitize(checks)):
        fn()   # warm-up: builds (or loads) the module for this mode
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def launch_overhead(repeat=2000):
    """Microseconds of one launch of an empty 1-thread kernel, plain and with all checks."""
    k = kernels.RawKernel('extern "C" __global__ void nothing(float* x) {}', "nothing")
    x = np.zeros(4, np.float32)
    out = {}
    for name, checks in (("plain", ""), ("all", "all")):
        with kernels.sanitize(checks):
            k((1,), (1,), (x,))
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(repeat):
                    k((1,), (1,), (x,))
                best = min(best, (time.perf_counter() - t0) / repeat)
        out[name] = best * 1e6
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="*", default=MODULES, choices=MODULES)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    print(f"# {platform.processor() or platform.machine()}, {platform.python_version()}, "
          f"median of {args.repeat} runs, times relative to the plain launch of the same case")
    overhead = launch_overhead()
    print(f"# one empty launch: {overhead['plain']:.1f} us plain, {overhead['all']:.1f} us with all checks")
    header = f"{'case':58s} {'plain ms':>9s} " + " ".join(f"{m:>9s}" for m, _ in MODES[1:])
    print(header)
    rows = []
    for group in args.groups:
        module = importlib.import_module(f"bench.kernel_cases.{group}")
        for case in module.cases(np, "tiny"):
            times = {name: _median_seconds(case.run, checks, args.repeat) for name, checks in MODES}
            plain = times["plain"]
            rows.append({"group": group, "case": case.name, "seconds": times})
            print(f"{case.name[:58]:58s} {plain * 1e3:9.2f} " +
                  " ".join(f"{times[m] / plain:8.1f}x" for m, _ in MODES[1:]), flush=True)
    ratios = {m: statistics.median(r["seconds"][m] / r["seconds"]["plain"] for r in rows) for m, _ in MODES[1:]}
    total = {m: sum(r["seconds"][m] for r in rows) for m, _ in MODES}
    print(f"{'median ratio over the cases':58s} {'':9s} " + " ".join(f"{ratios[m]:8.1f}x" for m, _ in MODES[1:]))
    print(f"{'sum of the medians':58s} {total['plain'] * 1e3:9.1f} " +
          " ".join(f"{total[m] / total['plain']:8.1f}x" for m, _ in MODES[1:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"launch_us": overhead, "cases": rows, "median_ratio": ratios}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
