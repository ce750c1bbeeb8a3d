"""A launch trace: which kernels a program launches, with what, and for how long.

    KERNELS_TRACE=1 python train.py --device emu --synthetic tiny --epochs 1
        every launch on stderr (kernel, grid, block, shared memory, argument shapes, time), and
        after every training step one line: the launches of that step, per kernel
    KERNELS_TRACE=trace.jsonl python train.py ...
        the same as JSON lines in that file ({"launch": ...} and {"step": ...} records)

    from kernels import trace
    with trace.collect() as t:             # from Python, without printing
        ...
    t.by_kernel()                          # Counter: kernel name -> launches
    t.launches                             # one dict per launch

Both backends are traced (the emulator and CuPy arrays on a GPU). A traced launch is timed: on a
GPU it waits for the kernel to finish, so a trace changes the speed it shows (fine for seeing
what runs, not for measuring how fast: bench/ does that). Launches replayed by a CUDA graph do
not go through Python and are not seen. `mark_step()` closes a step; nn.device.Device.mark_step
calls it, and train.py marks every training step.
"""

import json
import os
import sys
import time
from collections import Counter

from . import raw

__all__ = ["collect", "mark_step", "enabled", "Trace"]


def _describe(a):
    """An argument as the trace shows it: 'float32[8,16,16,3]', 'int32 8', 'null'."""
    if a is None:
        return "null"
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is not None and dtype is not None and getattr(a, "ndim", 0) > 0:
        return f"{dtype}[{','.join(map(str, shape))}]"
    if dtype is not None:
        return f"{dtype} {a}"
    return f"{type(a).__name__} {a}"


def _dims(v):
    return list(v) if isinstance(v, (tuple, list)) else [int(v)]


class Trace:
    """The launches recorded while it is active (`launches`: a list of dicts) and per step
    (`steps`: a list of Counters kernel -> launches)."""

    def __init__(self, sink=None):
        self.launches, self.steps = [], []
        self._step = Counter()
        self.sink = sink          # None, or a function(record: dict) that shows/writes it

    def by_kernel(self):
        """Counter: kernel name -> launches, over everything recorded."""
        return Counter(r["kernel"] for r in self.launches)

    def record(self, rec):
        self.launches.append(rec)
        self._step[rec["kernel"]] += 1
        if self.sink is not None:
            self.sink({"launch": rec})

    def end_step(self):
        counts, self._step = self._step, Counter()
        self.steps.append(counts)
        if self.sink is not None:
            self.sink({"step": len(self.steps), "launches": sum(counts.values()), "kernels": dict(counts)})
        return counts


class _Tracer:
    """What the runtime calls for every launch while a trace is on: launch, time, record."""

    def __init__(self):
        self.traces = []

    def launch(self, kernel, grid, block, args, shared_mem, kwargs):
        t0 = time.perf_counter()
        kernel._launch(grid, block, args, shared_mem, **kwargs)
        on_gpu = any(type(a).__module__.split(".")[0] == "cupy" for a in args)
        if on_gpu:
            import cupy
            cupy.cuda.get_current_stream().synchronize()
        rec = {"kernel": kernel.name, "file": kernel.module.filename, "grid": _dims(grid), "block": _dims(block),
               "shared_mem": int(shared_mem), "args": [_describe(a) for a in args],
               "ms": (time.perf_counter() - t0) * 1e3, "backend": "cuda" if on_gpu else "emu"}
        for t in self.traces:
            t.record(rec)


_TRACER = _Tracer()


def _install():
    raw._tracer = _TRACER if _TRACER.traces else None


def _printer(stream):
    def show(rec):
        if "launch" in rec:
            r = rec["launch"]
            print(f"[trace] {r['file']}:{r['kernel']} grid={tuple(r['grid'])} block={tuple(r['block'])} "
                  f"smem={r['shared_mem']} ({', '.join(r['args'])}) {r['ms']:.3f} ms", file=stream)
        else:
            top = ", ".join(f"{k} x{n}" for k, n in sorted(rec["kernels"].items(), key=lambda kv: -kv[1]))
            print(f"[trace] step {rec['step']}: {rec['launches']} launches of {len(rec['kernels'])} kernels: {top}",
                  file=stream)
        stream.flush()
    return show


def _jsonl(path):
    f = open(path, "a")

    def write(rec):
        f.write(json.dumps(rec) + "\n")
        f.flush()
    return write


_env_trace = None


def _from_environment():
    """KERNELS_TRACE=1 (stderr) or =<file> (JSON lines), read when this module is imported."""
    global _env_trace
    value = os.environ.get("KERNELS_TRACE", "").strip()
    if not value or value == "0":
        return
    _env_trace = Trace(_printer(sys.stderr) if value in ("1", "stderr") else _jsonl(value))
    _TRACER.traces.append(_env_trace)
    _install()


class collect:
    """Context manager: a Trace of the launches made inside it (nothing printed)."""

    def __enter__(self):
        self.trace = Trace()
        _TRACER.traces.append(self.trace)
        _install()
        return self.trace

    def __exit__(self, *exc):
        _TRACER.traces.remove(self.trace)
        _install()


def enabled():
    """True while a trace (KERNELS_TRACE or collect()) is recording."""
    return raw._tracer is not None


def mark_step():
    """End a training step in every active trace (KERNELS_TRACE then prints the step's line)."""
    for t in _TRACER.traces:
        t.end_step()


_from_environment()
