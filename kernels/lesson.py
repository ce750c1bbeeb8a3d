"""`python -m kernels.<op>`: every version of one op, checked against the reference and timed.

    python -m kernels.conv                   every version, at the default shape of the device
    python -m kernels.conv --version 1       only version 1
    python -m kernels.conv --shape 4,28,28,32,64,3,2,1      N,H,W,C,K,R,stride,padding
    python -m kernels.conv --shape K=128     change one number of the default shape
    python -m kernels.conv --list            the versions (from the header of conv.cu) and the shape
    python -m kernels.conv --source my_conv.cu --version 1   check your own copy of conv.cu

On a GPU (CuPy sees one) the kernels run there, timed with CUDA events (median of repeats after a
warm-up, the host's launch time hidden: kernels/runtime/timing.py), with the bandwidth or FLOP rate
they reach.  Otherwise they run on the CPU emulator at
a small shape: the check is the same, but the times are the emulator's, not a GPU's (blocks run
one after another on one core; a naive kernel can be the fastest there).  Every result is
compared with kernels/reference.py in float64; the command exits 1 if any version fails.  A
copy that does not compile shows the compiler's message: its errors at `FILE:LINE:COLUMN` (FILE
as given to --source) with the source lines they mean, without the emulator's own machinery.
The ops are those of kernels/<op>.py: the ones whose kernel changes with the version are listed
under each version, the ones every version shares once, after them.
"""

import argparse
import contextlib
import platform
import sys
from pathlib import Path

import numpy as np

from . import cases, versions
from .emu.errors import CompileError
from .runtime.raw import display_path
from .runtime.timing import time_call

__all__ = ["main", "median_time", "gpu_module"]


def gpu_module():
    """cupy when it imports and sees a GPU, else None."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:
        pass
    return None


def median_time(fn, xp, repeat, warmup=1):
    """Median seconds of fn() over `repeat` calls after `warmup` untimed ones: on the GPU, CUDA
    events with the host's launch time hidden behind a wait (kernels/runtime/timing.py: where the
    host would only see the time to queue the work, and events around a lone call the host's
    time too); on the CPU, the host's clock."""
    return time_call(fn, xp, repeat, warmup, per_call_repeat=1).seconds


def _parse_shape(case_class, text, device):
    """--shape: all numbers in order ('2,9,9,8'), or NAME=VALUE changes of the default ('K=128')."""
    names = case_class.SHAPE
    default = list(case_class.SHAPES[device])
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if parts and all("=" in p for p in parts):
            for p in parts:
                name, value = (t.strip() for t in p.split("=", 1))
                if name not in names:
                    raise ValueError(f"no shape parameter {name!r}: the names are {', '.join(names)}")
                default[names.index(name)] = int(value)
            return tuple(default)
        values = tuple(int(p) for p in parts)
    except ValueError as e:
        raise ValueError(f"--shape {text!r}: {e}") from None
    if len(values) != len(names):
        raise ValueError(f"--shape {text!r}: give {len(names)} numbers ({','.join(names)}) or NAME=VALUE pairs")
    return values


def _format_time(t):
    return f"{t * 1e6:8.1f} us" if t < 1e-3 else f"{t * 1e3:8.2f} ms"


def _rate(work, t):
    nbytes, flops = work
    out = []
    if nbytes:
        out.append(f"{nbytes / t / 1e9:8.1f} GB/s")
    if flops:
        out.append(f"{flops / t / 1e12:7.2f} TFLOP/s")
    return "  ".join(out)


def list_versions(family, out=None, source=None):
    out = out or sys.stdout
    f = versions.FAMILIES[family]
    case = cases.CASES[family]
    print(f"kernels/{f.source}: {case.title}", file=out)
    for n, text in versions.describe(family, source).items():
        marks = []
        if n == f.default:
            marks.append("the default" + (" for float32" if f.f16 else ""))
        if f.f16 and n == f.default_f16:
            marks.append("the default for float16")
        in_use = n in (versions.in_use()[family], versions.in_use_f16().get(family))
        if in_use and n not in (f.default, f.default_f16):
            marks.append("in use")
        if n not in f.training:
            marks.append("not used by training")
        print(f"  version {n}  {text}" + (f"  [{', '.join(marks)}]" if marks else ""), file=out)
    print(f"shape: {','.join(case.SHAPE)}  (emulator default {','.join(map(str, case.SHAPES['emu']))}; "
          f"GPU default {','.join(map(str, case.SHAPES['gpu']))})", file=out)


@contextlib.contextmanager
def _source(family, path):
    """Within the block, launches of `family` come from the learner's copy at `path`."""
    if path is None:
        yield None
        return
    from .runtime import launch as _launch
    resolved = versions.check_source(family, path)
    f = versions.FAMILIES[family]
    _launch.replace_source(f.source, resolved)
    try:
        yield resolved
    finally:
        _launch.replace_source(f.source, None)


class _Errors:
    """How the ops of one run report their exceptions: one line each, except a compile error,
    which shows the compiler's whole message (kernels.CompileError: file:line:col, the
    compiler's text and the source lines) once, naming the learner's copy as they gave it; the
    ops after it that fail to compile the same way say so in one line."""

    def __init__(self, copy=None, typed=None):
        self.names = {}
        if copy is not None and typed is not None:
            self.names[display_path(copy)] = typed
        self.compile_errors = set()

    def text(self, e):
        message = str(e)
        if not isinstance(e, CompileError):
            return f"{type(e).__name__}: {message.splitlines()[0] if message else ''}"
        for shown, typed in self.names.items():      # as the compiler named it -> as the learner typed it
            message = message.replace(f"{shown}:", f"{typed}:").replace(f"{shown}(", f"{typed}(")
        if message in self.compile_errors:
            return f"{type(e).__name__}: the same compile error as above"
        self.compile_errors.add(message)
        first, *rest = message.splitlines()
        return "\n".join([f"{type(e).__name__}: {first}", *(f"      {line}" for line in rest)])


def _one(case, op, version, xp, repeat, out, errors=None):
    """Check and time one op of one version; True when it passes."""
    label = f"    {op:<34}"
    try:
        got = case.run(op, version, case.prepare(op))
        error, tolerance = case.check(op, version, got)
    except Exception as e:   # a failing kernel is reported, the other versions still run
        print(f"{label} ERROR {(errors or _Errors()).text(e)}", file=out)
        return False
    ok = error <= tolerance
    verdict = "ok  " if ok else "FAIL"
    text = f"{label} {verdict} error {error:.1e} (tolerance {tolerance:.0e})"
    if ok:
        state = case.prepare(op)
        fn = lambda: case.run(op, version, state)   # noqa: E731
        t = median_time(fn, xp, 1, warmup=1)
        n = repeat or max(1, min(50 if xp is not np else 5, int(0.3 / max(t, 1e-9))))
        if n > 1:
            t = median_time(fn, xp, n, warmup=0)
        text += f"  {_format_time(t)}"
        if xp is not np:
            text += f"  {_rate(case.work(op), t)}"
    print(text, file=out)
    return ok


def run(family, version=None, shape=None, repeat=None, emulator=False, source=None, out=None, predict_on="H100"):
    """Check and time the versions of `family` (all, or `version`); returns True when all pass.
    predict_on: a GPU of kernels/emu/perfmodel.py to predict every version on at the ResNet-50
    shape (`predictions`), or None."""
    out = out or sys.stdout
    xp = None if emulator else gpu_module()
    xp = xp or np
    device = "emu" if xp is np else "gpu"
    case_class = cases.CASES[family]
    f = versions.FAMILIES[family]
    with _source(family, source) as copy:
        errors = _Errors(copy, source)
        case = case_class(xp, shape, device)
        where = (f"on the CPU emulator ({platform.machine()}): results are checked as on a GPU, but the times are "
                 f"the emulator's, not a GPU's (it runs one block after another on one core, so a naive kernel "
                 f"can be the fastest here)" if xp is np else
                 f"on the GPU ({_gpu_name(xp)}): median time of repeated runs (CUDA events)")
        print(f"python -m kernels.{family}: {case_class.title} (kernels/{f.source}"
              f"{f', from your copy {copy}' if copy else ''}), {case.describe_shape()}", file=out)
        print(where, file=out)
        summaries = versions.describe(family, copy)
        ok = True
        for n in ([version] if version else versions.numbers(family)):
            print(f"  version {n}  {summaries.get(n, '(not listed in the header)')}", file=out)
            with versions.running(family, n):
                for op in case.ops(n):
                    ok &= _one(case, op, n, xp, repeat, out, errors)
        shared = case.shared_ops()
        if shared:
            print(f"  the same in every version (run with version {versions.in_use()[family]}):", file=out)
            for op in shared:
                ok &= _one(case, op, None, xp, repeat, out, errors)
        if predict_on and ok:
            predictions(family, [version] if version else list(versions.numbers(family)), predict_on, xp, repeat, out)
    print("all versions match the reference" if ok else "FAILED: a version does not match the reference", file=out)
    return ok


# ---------------------------------------------------------------------------------- predictions
def _us(t):
    return f"{t * 1e6:9.1f} us" if t < 1e-3 else f"{t * 1e3:9.2f} ms"


def predictions(family, numbers, gpu_name="H100", xp=np, repeat=None, out=None):
    """Print the performance model's time (kernels/emu/perfmodel.py) of every op of `numbers`
    (versions of `family`) at the ResNet-50 layer of cases.SHAPES["resnet50"], from the
    emulator's counts at SHAPES["twin"] (kept on disk: the first run counts, later ones read),
    with the side that limits it; on a GPU (xp is CuPy) the measured time at that shape beside
    it, marked where the model is off by more than 1.5x or orders two versions otherwise."""
    from .runtime import plan, predict   # the model's machinery: only when a prediction is asked for
    out = out or sys.stdout
    case_class = cases.CASES[family]
    real_shape, twin_shape = case_class.SHAPES["resnet50"], case_class.SHAPES["twin"]
    real = case_class(plan.cupy, real_shape, "gpu")
    twin = case_class(np, twin_shape, "emu")
    timed = case_class(xp, real_shape, "gpu") if xp is not np else None
    g = predict.gpu(gpu_name)
    print(f"predicted on an {g.name} at ResNet-50's {real.describe_shape()} (the model of kernels/emu/perfmodel.py "
          f"from the emulator's counts at {twin.describe_shape()}; python -m bench.kernels --profile for every layer)"
          + ("; measured here beside it" if timed is not None else ""), file=out)
    rows = []
    for n in numbers + [None]:
        ops = real.ops(n) if n is not None else real.shared_ops()
        for op in ops:
            if op in case_class.OTHER_LAYERS:
                continue
            try:
                with versions.running(family, n) if n is not None else contextlib.nullcontext():
                    p = predict_one(real, twin, twin_shape, op, n, gpu_name)
                    measured = None
                    if timed is not None:
                        state = timed.prepare(op)
                        measured = median_time(lambda: timed.run(op, n, state), xp, repeat or 5)
            except Exception as e:   # a prediction that cannot be made is said, the lesson goes on
                print(f"    {'version ' + str(n) if n else 'every version':<13} {op:<34} no prediction: "
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=out)
                continue
            rows.append((n, op, p, measured))
    worst = {}
    width = max([34] + [len(op) + 1 for _n, op, _p, _m in rows])
    for n, op, p, measured in rows:
        nbytes = real.work(op)[0]
        t = p.hidden_seconds     # as median_time measures it: the host's launch time hidden
        share = f"{100 * nbytes / t / g.copy_bytes_per_s:5.0f} % of copy bandwidth" if nbytes else ""
        text = (f"    {'version ' + str(n) if n else 'every version':<13} {op:<{width}}{_us(t)}  limited by "
                f"{p.hidden_limit:<8}{share}")
        if measured is not None:
            r = t / measured
            text += f"   measured {_us(measured)}  {r:5.2f}x" + ("  * the model is off" if not 1 / 1.5 <= r <= 1.5 else "")
        print(text, file=out)
        worst.setdefault(op, []).append((n, t, measured))
    for op, entries in worst.items():   # versions the model orders otherwise than the GPU
        timed_entries = [e for e in entries if e[2] is not None and e[0] is not None]
        for i, a in enumerate(timed_entries):
            for b in timed_entries[i + 1:]:
                if (a[1] < b[1]) != (a[2] < b[2]):
                    print(f"  * {op}: the model orders versions {a[0]} and {b[0]} otherwise than this GPU", file=out)


def predict_one(real, twin, twin_shape, op, version, gpu_name="H100"):
    """The model's prediction (a perfmodel.CasePrediction) of `op` at `version` (None: the version in
    use) on `real`, a case of its family on kernels.runtime.plan's stand-in arrays at the real shape,
    from the emulator's counts of `twin`, the same case at `twin_shape` (counted once, kept on disk).
    A GEMM's or convolution's tiles scale with the ratio of their FLOPs."""
    from .runtime import predict   # the model's machinery: only when a prediction is asked for
    with versions.running(real.family, version) if version is not None else contextlib.nullcontext():
        state_twin, state_real = twin.prepare(op), real.prepare(op)
        launches = predict.profile_cached([real.family, twin_shape, op, version],
                                          lambda: twin.run(op, version, state_twin))
        planned = predict.plan_of(lambda: real.run(op, version, state_real))
    tiled = real.family in ("gemm", "conv") and twin.work(op)[1]
    ratio = real.work(op)[1] / twin.work(op)[1] if tiled else None
    return predict.predict(planned, launches, gpu_name, work_ratio=ratio)


def _gpu_name(xp):
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])


def main(family, argv=None):
    """The command line of `python -m kernels.<family>`; returns the exit code (0 all versions
    match the reference, 1 one does not, 2 bad arguments)."""
    f = versions.FAMILIES[family]
    case_class = cases.CASES[family]
    p = argparse.ArgumentParser(
        prog=f"python -m kernels.{family}",
        description=f"Check every version of kernels/{f.source} ({case_class.title}) against kernels/reference.py "
                    f"and time it: on the GPU when CuPy sees one, else on the CPU emulator at a small shape.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", type=int, choices=versions.numbers(family), help="only this version")
    p.add_argument("--shape", help=f"{','.join(case_class.SHAPE)} (all, in order) or NAME=VALUE,... changes of the "
                                   f"default")
    p.add_argument("--list", action="store_true", help="list the versions and the shape, run nothing")
    p.add_argument("--repeat", type=int, help="timed runs per op (default: as many as fit in about 0.3 s)")
    p.add_argument("--emulator", action="store_true", help="run on the CPU emulator even where there is a GPU")
    p.add_argument("--source", help=f"a copy of kernels/{f.source} to check instead (your own version of it)")
    p.add_argument("--gpu", default="H100", help="the GPU the performance model predicts every version on at the "
                                                  "ResNet-50 shape (H100, H200, A100, V100, P100; default H100)")
    p.add_argument("--no-predict", action="store_true", help="check and time only, no predictions")
    args = p.parse_args(argv)
    if args.list:
        try:
            list_versions(family, source=args.source)
        except (OSError, ValueError) as e:
            p.error(str(e))
        return 0
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be >= 1")
    device = "emu" if args.emulator or gpu_module() is None else "gpu"
    try:
        shape = _parse_shape(case_class, args.shape, device) if args.shape else None
        if args.source and not Path(args.source).is_file():
            raise ValueError(f"--source {args.source}: no such file")
        ok = run(family, args.version, shape, args.repeat, args.emulator, args.source,
                 predict_on=None if args.no_predict else args.gpu)
    except ValueError as e:
        p.error(str(e))
    return 0 if ok else 1
