"""Nsight Compute beside the performance model: `python -m bench.ncu_probe --out DIR`.

The model (kernels/emu/perfmodel.py, fed by kernels/runtime/predict.py) predicts each launch's
DRAM bytes and L2 sectors from the emulator's counts; a few version pairs it orders otherwise than
an H100 did (bench/NOTES.md, "Predicted beside measured").  This measures, on a GPU, what the model
predicts for those cases, so that one short run says where it is wrong:

    python -m bench.ncu_probe --out DIR        # on a GPU: Nsight Compute runs the driver below;
                                               # DIR/ncu.json, the raw CSVs, and the table
    python -m bench.ncu_probe --report DIR     # the table again from DIR/ncu.json (no GPU needed)
    python -m bench.ncu_probe --driver [--cases NAME ...]   # what ncu runs (see below)
    python -m bench.ncu_probe --list           # the cases and their NVTX range names

The driver runs each case of PROBES (kernels/cases.py's ops at the ResNet-50 layer of
cases.SHAPES["resnet50"]) once to warm up (compiling, a backward's forward, the max-pool argmax),
then once more inside an NVTX range named after the case (cupy.cuda.nvtx.RangePush/RangePop).  On
the simulated GPU (KERNELS_CUDASIM=1) or the emulator the ranges are no-ops and the shapes are
SHAPES["emu"]: seconds, to prove the plumbing.

The runner finds `ncu` (PATH, then /usr/local/cuda/bin, then /opt/nvidia/nsight-compute/*/) and
runs the driver under it: `--clock-control none` (the GPU's clocks as they are: never changed),
`--nvtx --nvtx-include RANGE/` for each case's push/pop range (only those kernels are profiled),
`--metrics` METRICS, the report to DIR/ncu_probe.ncu-rep; then exports it twice with `--import
... --csv --page raw --print-units base`: DIR/ncu_raw.csv (the kernels' own names) and
DIR/ncu_raw_nvtx.csv (`--print-nvtx-rename kernel`: each kernel named after its range), joined on
the result ID into DIR/ncu.json {"cases": {case: {kernel: {metric: value in base units}}}}.  The
model's predictions of the same cases are made meanwhile in a subprocess on the CPU (the twins on
the emulator, as `python -m kernels.<op>` does) and printed beside the measured figures.

When ncu is missing, or cannot read the GPU's counters (ERR_NVGPUCTRPERM: no permission;
LibraryNotLoaded), it says so in one line, writes {"status": "skipped"} and exits 0: a GPU session
goes on.  Exit 1 when ncu ran but gave nothing, 2 for bad arguments.
"""

import argparse
import csv
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
from bench import write_json  # noqa: E402


@dataclass(frozen=True)
class Probe:
    """One case: an op of kernels/cases.py's `family` at `version`; `shapes` overrides the family's
    SHAPES ("resnet50": measured and predicted, "twin": what the emulator counts for the prediction,
    "emu": the simulated GPU's) where the layer is not the family's default."""
    family: str
    op: str
    version: int
    shapes: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self):
        return f"{self.op} v{self.version}"

    @property
    def range(self):
        """The NVTX range: the name in letters, digits and underscores (ncu's filter syntax gives
        '/', '@', '[' and ']' meanings)."""
        return re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_")

    def shape(self, size):
        from kernels import cases
        return tuple(self.shapes.get(size) or cases.CASES[self.family].SHAPES[size])


# the head's global average pool (7x7x2048), not the pool family's default layer
_HEAD_POOL = {"resnet50": (256, 7, 7, 2048, 1, 1, 0), "twin": (8, 7, 7, 2048, 1, 1, 0), "emu": (2, 3, 3, 64, 1, 1, 0)}

# The cases, in the order they run.  Add a line to measure another: any op of kernels/cases.py.
PROBES = [
    # input v2's float4 stores 48 bytes apart: measured slower than v1, predicted faster
    Probe("input", "input_normalize u8->f32", 1),
    Probe("input", "input_normalize u8->f32", 2),
    Probe("input", "input_normalize u8->f32", 3),
    Probe("input", "input_normalize u8->f16", 1),
    Probe("input", "input_normalize u8->f16", 3),
    Probe("pool", "maxpool2d_backward", 1),
    Probe("pool", "maxpool2d_backward", 2),
    Probe("pool", "maxpool2d_backward", 3),
    Probe("pool", "maxpool2d_backward f16", 2),
    Probe("pool", "maxpool2d_backward f16", 3),
    Probe("elementwise", "relu_forward f16", 1),
    Probe("elementwise", "relu_forward f16", 2),
    Probe("batchnorm", "batchnorm_relu_backward f16", 4),
    Probe("batchnorm", "batchnorm_relu_backward from conv partials f16", 5),
    Probe("pool", "global_avgpool_backward f16", 2, _HEAD_POOL),
    Probe("pool", "global_avgpool_backward f16", 3, _HEAD_POOL),
    # issue 25's last fusions: the pools' backward with a batch norm's sums, and the pair form
    Probe("pool", "maxpool2d_backward relu_bn f16", 3),
    Probe("pool", "global_avgpool_backward relu_bn f16", 3, _HEAD_POOL),
    Probe("batchnorm", "batchnorm_relu_backward from conv partials pair f16", 5),
]

# What ncu counts (Nsight Compute's metric names): time, DRAM bytes, L2 sectors by operation, the
# L1's global sectors and requests, instructions, achieved occupancy, the launch.
METRICS = [
    "gpu__time_duration.sum",
    "dram__bytes_read.sum", "dram__bytes_write.sum",
    "lts__t_sectors_op_read.sum", "lts__t_sectors_op_write.sum",
    "lts__t_sectors_op_atom.sum", "lts__t_sectors_op_red.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum", "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum", "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
    "smsp__inst_executed.sum",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread", "launch__grid_size", "launch__block_size",
]
L2_SECTOR_METRICS = METRICS[3:7]

# where ncu is looked for after PATH (the toolkit's, then a standalone Nsight Compute's, newest last)
NCU_PLACES = ["/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"]

# ncu's lines when it cannot read the counters: then the probe is skipped, not failed
_REFUSED = ("ERR_NVGPUCTRPERM", "LibraryNotLoaded")


def select(names):
    """The probes named (by name or NVTX range), in PROBES' order; ValueError for an unknown name."""
    if not names:
        return list(PROBES)
    known = {p.name: p for p in PROBES} | {p.range: p for p in PROBES}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown case(s) {bad}; see python -m bench.ncu_probe --list")
    wanted = {known[n] for n in names}
    return [p for p in PROBES if p in wanted]


# ---------------------------------------------------------------------------------- the driver
def _nvtx(xp):
    """(push, pop): CuPy's NVTX ranges, or no-ops (the emulator, the simulated GPU, a CuPy built
    without NVTX)."""
    nvtx = getattr(getattr(xp, "cuda", None), "nvtx", None)
    if nvtx is None or getattr(xp, "__cudasim__", False) or not getattr(nvtx, "available", True):
        return (lambda name: None), (lambda: None)
    return nvtx.RangePush, nvtx.RangePop


def drive(probes, check=False, manifest=None, say=print):
    """Run each probe once to warm up, then once inside its NVTX range.  On a GPU at the ResNet-50
    shape; on the simulated GPU or the emulator at the family's "emu" shape.  check: compare each
    result with kernels/reference.py (float64 on the host: slow at the ResNet-50 shape).  Returns
    {case: [kernels launched in its range]} (also written to `manifest`, a JSON path)."""
    import numpy as np
    from kernels import cases
    from kernels.lesson import gpu_module
    from kernels.runtime import trace
    xp = gpu_module() or np
    real = xp is not np and not getattr(xp, "__cudasim__", False)
    size = "resnet50" if real else "emu"
    device = "gpu" if xp is not np else "emu"
    push, pop = _nvtx(xp)
    sync = (lambda: xp.cuda.get_current_stream().synchronize()) if xp is not np else (lambda: None)
    made, launched, failed = {}, {}, []
    where = "a GPU" if real else ("the simulated GPU" if xp is not np else "the emulator")
    say(f"[ncu_probe] driver: {len(probes)} cases on {where}, size {size}")
    for p in probes:
        key = (p.family, p.shape(size))
        if key not in made:
            made[key] = cases.make(p.family, xp, key[1], device)
        case = made[key]
        state = case.prepare(p.op)
        case.run(p.op, p.version, state)          # the warm-up: nothing here is profiled
        sync()
        with trace.collect() as t:
            push(p.range)
            try:
                got = case.run(p.op, p.version, state)
                sync()
            finally:
                pop()
        launched[p.name] = [r["kernel"] for r in t.launches]
        text = f"[ncu_probe] {p.name} ({p.range}): {', '.join(launched[p.name]) or 'no kernel'}"
        if check:
            error, tolerance = case.check(p.op, p.version, got)
            ok = error <= tolerance
            text += f"; {'ok' if ok else 'FAIL'} error {error:.1e} (tolerance {tolerance:.0e})"
            if not ok:
                failed.append(p.name)
        say(text)
    if manifest:
        write_json({"size": size, "device": where, "cases": launched}, manifest, quiet=True)
    say(f"[ncu_probe] driver: {len(probes)} cases ran on {where}" + (f"; {len(failed)} FAILED the check"
                                                                     if failed else ""))
    return launched, failed


# ---------------------------------------------------------------------------------- predictions
def predict_probes(probes, gpu="H100"):
    """{case: the model's figures at the ResNet-50 shape}: seconds, limit, and per launch and in
    total dram_read_bytes, dram_written_bytes, l2_sectors (perfmodel.LaunchWork), from the twins'
    counts on the emulator (kept on disk, as python -m kernels.<op> keeps them)."""
    import numpy as np
    from kernels import cases, lesson
    from kernels.runtime import plan
    out = {}
    for p in probes:
        try:
            cls = cases.CASES[p.family]
            real, twin = cls(plan.cupy, p.shape("resnet50"), "gpu"), cls(np, p.shape("twin"), "emu")
            pred = lesson.predict_one(real, twin, p.shape("twin"), p.op, p.version, gpu)
        except Exception as exc:   # one case the model cannot predict: said, the others go on
            out[p.name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        rows = []
        for lp in pred.launches:
            w = lp.work
            rows.append({"kernel": lp.kernel, "seconds": lp.seconds, "limit": lp.limit,
                         "dram_read_bytes": w.dram_read_bytes if w else 0.0,
                         "dram_written_bytes": w.dram_written_bytes if w else 0.0,
                         "l2_sectors": w.l2_sectors if w else 0.0})
        # kernel_seconds: the kernels' own time, what ncu's gpu__time_duration measures (no memsets,
        # no host time between launches)
        kernel_seconds = sum(r["seconds"] for r, lp in zip(rows, pred.launches) if lp.work is not None)
        out[p.name] = {"seconds": pred.seconds, "kernel_seconds": kernel_seconds, "limit": pred.limit, "launches": rows,
                       **{k: sum(r[k] for r in rows) for k in ("dram_read_bytes", "dram_written_bytes", "l2_sectors")}}
    return out


# ---------------------------------------------------------------------------------- ncu's CSV
_TIME = {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9}
_PREFIX = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _to_base(text, unit):
    """(value, unit) of one raw-page cell in the metric's base unit (nsecond, byte, sector, ...):
    --print-units base gives those already; a scaled one ('Mbyte', 'usecond') is converted.  The
    number's thousands separators go; 'n/a' or an empty cell is None."""
    text = (text or "").strip().replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None, unit
    if unit in _TIME:
        return value * _TIME[unit], "nsecond"
    m = re.fullmatch(r"([KMGT])([a-z].*)", unit or "")
    if m:
        return value * _PREFIX[m.group(1)], m.group(2)
    return value, unit


def parse_raw_csv(text):
    """ncu's `--csv --page raw` output (any lines before the header, ==PROF== ones and the
    application's, are skipped): a header row ("ID", "Process ID", ..., "Kernel Name", ..., then one
    column per metric), a row of units (empty under the identity columns), one row per profiled
    kernel.  -> ([{"id", "kernel", "metrics": {name: value in base units}}], {metric: base unit})."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        return [], {}
    reader = csv.reader(io.StringIO("\n".join(lines[start:])))
    header = next(reader)
    metric_cols = [i for i, h in enumerate(header) if "__" in h]
    id_col, name_col = header.index("ID"), header.index("Kernel Name")
    rows, printed, units = [], {}, {}
    for row in reader:
        if len(row) != len(header) or not any(row):
            continue
        if not row[id_col].strip():              # the units row
            printed = {header[i]: row[i] for i in metric_cols}
            continue
        metrics = {}
        for i in metric_cols:
            metrics[header[i]], units[header[i]] = _to_base(row[i], printed.get(header[i], ""))
        rows.append({"id": int(row[id_col]), "kernel": row[name_col], "metrics": metrics})
    return rows, units


def attribute(raw_rows, nvtx_rows, probes, manifest=None):
    """{case: {kernel: {metric: value}}}: each profiled kernel under the case whose NVTX range the
    renamed export names for its ID; without that export, in launch order by the driver's
    manifest ({case: [kernels]}); what neither places goes under "(unattributed)".  A kernel that
    a case launches twice is "kernel", then "kernel #2"."""
    by_range = {p.range: p.name for p in probes}
    ranged = {}
    for r in nvtx_rows:
        for rng, name in sorted(by_range.items(), key=lambda kv: -len(kv[0])):
            if re.search(rf"(?<![A-Za-z0-9_]){re.escape(rng)}(?![A-Za-z0-9_])", r["kernel"]):
                ranged[r["id"]] = name
                break
    order = []
    if not ranged and manifest:
        order = [name for p in probes for name in [p.name] * len(manifest.get(p.name, []))]
    out = {}
    for k, r in enumerate(sorted(raw_rows, key=lambda r: r["id"])):
        case = ranged.get(r["id"]) or (order[k] if k < len(order) else "(unattributed)")
        kernels = out.setdefault(case, {})
        name, n = r["kernel"], 2
        while name in kernels:
            name, n = f"{r['kernel']} #{n}", n + 1
        kernels[name] = r["metrics"]
    return out


# ---------------------------------------------------------------------------------- the runner
def find_ncu(places=None):
    """The ncu executable: on PATH, else the first of `places` (NCU_PLACES; globs take the newest
    version) that exists; None when there is none."""
    found = shutil.which("ncu")
    if found:
        return found
    for place in places if places is not None else NCU_PLACES:
        hits = sorted(glob.glob(place), key=_version_key)
        for hit in reversed(hits):
            if os.access(hit, os.X_OK):
                return hit
    return None


def _version_key(path):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path)]


def ncu_command(ncu, report, probes, metrics=None, python=None):
    """The profiling command: the driver under ncu, its clocks untouched, only the probes' NVTX
    ranges profiled, the report to `report` (.ncu-rep added by ncu)."""
    argv = [ncu, "--clock-control", "none", "--nvtx"]
    for p in probes:
        argv += ["--nvtx-include", f"{p.range}/"]      # '/': a push/pop range
    argv += ["--metrics", ",".join(metrics or METRICS), "--force-overwrite", "--export", str(report),
             python or sys.executable, "-m", "bench.ncu_probe", "--driver", "--manifest",
             str(Path(report).parent / "driver.json"), "--cases", *[p.range for p in probes]]
    return argv


def export_command(ncu, report, nvtx_names=False):
    """The raw page of a report as CSV, every value in its base unit; nvtx_names: each kernel named
    after the NVTX range it ran in."""
    argv = [ncu, "--import", f"{report}.ncu-rep", "--csv", "--page", "raw", "--print-units", "base"]
    return argv + (["--print-nvtx-rename", "kernel"] if nvtx_names else [])


def _refused(text):
    """ncu's line saying it cannot read the counters, or None."""
    for line in text.splitlines():
        if any(token in line for token in _REFUSED):
            return line.strip()
    return None


def _unknown_metrics(text, metrics):
    """Metrics an ==ERROR== line of ncu says it cannot find (an older ncu, another GPU)."""
    bad = set()
    for line in text.splitlines():
        if line.startswith("==ERROR==") and "metric" in line.lower():
            bad.update(m for m in metrics if m in line)
    return bad


def run(out, probes, predict=True, timeout=None, say=print):
    """Profile `probes` under ncu into `out`; returns (exit code, the result dict also written to
    out/ncu.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"status": "skipped", "metrics": list(METRICS), "cases": {}}
    deadline = time.monotonic() + timeout if timeout else None

    def left(default):
        return default if deadline is None else max(1.0, deadline - time.monotonic())

    def finish(code, status, reason=None):
        result["status"] = status
        if reason:
            result["reason"] = reason
        write_json(result, out / "ncu.json", quiet=True)
        return code, result

    if os.environ.get("KERNELS_CUDASIM", "").strip() not in ("", "0"):
        say("ncu_probe: skipped: the GPU is simulated (KERNELS_CUDASIM=1); `--driver` runs the cases on it")
        return finish(0, "skipped", "the GPU is simulated")
    ncu = find_ncu()
    if ncu is None:
        say(f"ncu_probe: skipped: no ncu (Nsight Compute) on PATH or in {', '.join(NCU_PLACES)}")
        return finish(0, "skipped", "ncu not found")
    result["ncu"] = ncu
    predictor = None
    if predict:   # on the CPU while ncu has the GPU
        with open(out / "predicted.log", "w") as log:
            predictor = subprocess.Popen([sys.executable, "-m", "bench.ncu_probe", "--predictions",
                                          str(out / "predicted.json"), "--cases", *[p.range for p in probes]],
                                         cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        version = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=60)
        result["ncu_version"] = (version.stdout.strip().splitlines() or [""])[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        result["ncu_version"] = f"unknown ({type(exc).__name__})"
    report = out / "ncu_probe"
    metrics = list(METRICS)
    for attempt in (1, 2):
        argv = ncu_command(ncu, report, probes, metrics)
        result["command"] = argv
        say(f"[ncu_probe] {' '.join(argv[:4])} ... ({len(probes)} NVTX ranges, {len(metrics)} metrics): starting")
        t0 = time.monotonic()
        log, rc = _run_group(argv, left(None))
        (out / "ncu.log").write_text(log)
        result["ncu_seconds"] = time.monotonic() - t0
        refused = _refused(log)
        if refused:
            say(f"ncu_probe: skipped: ncu cannot read the GPU's counters: {refused}")
            _stop(predictor)
            return finish(0, "skipped", refused)
        bad = _unknown_metrics(log, metrics)
        if rc != 0 and bad and attempt == 1:
            say(f"ncu_probe: this ncu does not know {sorted(bad)}: again without")
            metrics = [m for m in metrics if m not in bad]
            result["dropped_metrics"] = sorted(bad)
            continue
        break
    result["metrics"] = metrics
    if not Path(f"{report}.ncu-rep").exists():
        errors = [line for line in log.splitlines() if line.startswith("==ERROR==")]
        reason = errors[-1] if errors else f"ncu exited {rc} without a report (see {out / 'ncu.log'})"
        say(f"ncu_probe: FAILED: {reason}")
        _stop(predictor)
        return finish(1, "failed", reason)
    texts = {}
    for name, nvtx_names in (("ncu_raw.csv", False), ("ncu_raw_nvtx.csv", True)):
        proc = subprocess.run(export_command(ncu, report, nvtx_names), capture_output=True, text=True,
                              errors="replace", timeout=120)
        (out / name).write_text(proc.stdout + (proc.stderr if proc.returncode else ""))
        texts[name] = proc.stdout if proc.returncode == 0 else ""
    raw, units = parse_raw_csv(texts["ncu_raw.csv"])
    nvtx_rows, _ = parse_raw_csv(texts["ncu_raw_nvtx.csv"])
    manifest = _load(out / "driver.json")
    result["units"] = units
    result["cases"] = attribute(raw, nvtx_rows, probes, (manifest or {}).get("cases"))
    if not raw:
        say(f"ncu_probe: FAILED: ncu profiled no kernel (see {out / 'ncu.log'})")
        _stop(predictor)
        return finish(1, "failed", "no kernel profiled")
    code, result = finish(0, "ok")               # the measurement is kept before waiting for the model
    if predictor is not None:
        try:
            predictor.wait(timeout=left(120))
        except subprocess.TimeoutExpired:
            _stop(predictor)
            say(f"ncu_probe: the predictions were not ready in time (python -m bench.ncu_probe --report {out} "
                f"makes them anywhere)")
        predicted = _load(out / "predicted.json")
        if predicted:
            result["predicted"] = predicted
            code, result = finish(0, "ok")
    print_table(result, probes, say)
    return code, result


def _run_group(argv, timeout):
    """(output, exit code or None) of argv run in its own process group: past `timeout` seconds the
    whole group (ncu and the driver it started) is killed."""
    try:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
    except OSError as exc:
        return f"ncu_probe: cannot run {argv[0]}: {exc}", None
    try:
        return proc.communicate(timeout=timeout)[0], proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        text = proc.communicate()[0]
        return f"{text}\nncu_probe: ncu ran past {timeout:.0f} s and was stopped", None


def _stop(proc):
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def _load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------- the table
def measured_totals(kernels):
    """A case's measured figures summed over its kernels: seconds, dram_read_bytes,
    dram_written_bytes, l2_sectors (reads, writes, atomics, reductions), l1 store sectors."""
    def total(*names):
        values = [m.get(n) for m in kernels.values() for n in names]
        return sum(v for v in values if v is not None) if any(v is not None for v in values) else None

    t = total("gpu__time_duration.sum")
    return {"seconds": t * 1e-9 if t is not None else None, "dram_read_bytes": total("dram__bytes_read.sum"),
            "dram_written_bytes": total("dram__bytes_write.sum"), "l2_sectors": total(*L2_SECTOR_METRICS),
            "l2_write_sectors": total("lts__t_sectors_op_write.sum"),
            "l1_store_sectors": total("l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum")}


def _pair(measured, model, scale, fmt):
    m = "-" if measured is None else format(measured / scale, fmt)
    p = "-" if model is None else format(model / scale, fmt)
    r = f"{measured / model:.2f}" if measured is not None and model else "-"
    return f"{m:>8} {p:>8} {r:>5}"


def print_table(result, probes=None, say=print):
    """Per case: ncu's time, DRAM bytes read and written and L2 sectors beside the model's, with the
    ratio measured / predicted."""
    names = [p.name for p in (probes or PROBES)]
    names += [n for n in result.get("cases", {}) if n not in names]
    predicted = result.get("predicted") or {}
    say(f"\nNsight Compute ({result.get('ncu_version', 'ncu')}) beside the model (kernels/emu/perfmodel.py, "
        f"H100 at the ResNet-50 shape); ratio = measured / predicted")
    head = (f"{'case':<50}{'kernels':>8}  {'time us  (ncu, model, x)':>24}  {'DRAM read MB':>22}  "
            f"{'DRAM write MB':>22}  {'L2 sectors M':>22}")
    say(head)
    say("-" * len(head))
    for name in names:
        kernels = result.get("cases", {}).get(name)
        if not kernels:
            continue
        m, p = measured_totals(kernels), predicted.get(name, {})
        if "error" in p:
            p = {}
        say(f"{name[:49]:<50}{len(kernels):>8}  {_pair(m['seconds'], p.get('kernel_seconds'), 1e-6, '.1f')}  "
            f"{_pair(m['dram_read_bytes'], p.get('dram_read_bytes'), 1e6, '.1f')}  "
            f"{_pair(m['dram_written_bytes'], p.get('dram_written_bytes'), 1e6, '.1f')}  "
            f"{_pair(m['l2_sectors'], p.get('l2_sectors'), 1e6, '.2f')}")
    say("(L2 sectors: lts__t_sectors_op_read + write + atom + red; the model's: the 32-byte sectors of every "
        "global request; every figure per case, summed over its kernels; ncu.json has each kernel's metrics)")


# ---------------------------------------------------------------------------------- the command
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for ncu.json, the raw CSVs, the report and ncu's log (created)")
    p.add_argument("--report", metavar="DIR", help="print the table of DIR/ncu.json again (predictions made here "
                                                   "when it has none)")
    p.add_argument("--driver", action="store_true", help="run the cases once each inside their NVTX ranges "
                                                         "(what ncu runs)")
    p.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases (names or NVTX ranges; --list)")
    p.add_argument("--check", action="store_true", help="with --driver: compare each result with the reference")
    p.add_argument("--list", action="store_true", help="the cases and their NVTX ranges")
    p.add_argument("--no-predict", action="store_true", help="the measured figures only, no model predictions")
    p.add_argument("--timeout", type=float, help="end within this many seconds: ncu stopped, the predictions "
                                                "left out (default: no limit)")
    p.add_argument("--manifest", help=argparse.SUPPRESS)      # the driver's {case: [kernels]}
    p.add_argument("--predictions", help=argparse.SUPPRESS)   # the runner's predicting subprocess
    args = p.parse_args(argv)
    try:
        probes = select(args.cases)
    except ValueError as exc:
        p.error(str(exc))
    if args.list:
        for probe in probes:
            print(f"{probe.name:<56} {probe.range}")
        return 0
    if args.predictions:
        write_json(predict_probes(probes), args.predictions, quiet=True)
        return 0
    if args.driver:
        _, failed = drive(probes, args.check, args.manifest)
        return 1 if failed else 0
    if args.report:
        result = _load(Path(args.report) / "ncu.json")
        if result is None:
            p.error(f"--report {args.report}: no readable ncu.json there")
        if result.get("status") != "ok":
            print(f"ncu_probe: {args.report}/ncu.json: {result.get('status')}: {result.get('reason', '')}")
            return 0
        if not result.get("predicted") and not args.no_predict:
            result["predicted"] = predict_probes(probes)
        print_table(result, probes)
        return 0
    if not args.out:
        p.error("give --out DIR (or --driver, --report DIR, --list)")
    code, _ = run(args.out, probes, predict=not args.no_predict, timeout=args.timeout)
    return code


if __name__ == "__main__":
    from bench import stop_on_setup_error
    sys.exit(stop_on_setup_error("bench.ncu_probe", main))
