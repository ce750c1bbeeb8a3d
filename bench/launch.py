"""Host time per kernel launch on the CuPy path: `python -m bench.launch`.

A training step is ~800 kernel launches (fp32; ~1,400 with fp16), so every microsecond of Python
between a launcher and the driver costs ~1 ms per step. This benchmark measures exactly that
Python, on the launchers' own idiom:

    module("conv.cu").get_function("conv2d_fwd_igemm_f32")(grid, block, (x, w, y, np.int32(N), ...))

- Anywhere (no GPU, no CuPy needed): the CuPy path of `kernels.RawKernel` runs against a stand-in
  for CuPy whose kernel function takes the launch and does nothing; arrays are stand-ins that look
  like CuPy arrays to our code. What is left is our Python: the module lookup, the argument check
  and the hand-over. The stand-in's own call is timed separately and subtracted.
- On a GPU (CuPy sees one): the same launches for real, beside CuPy's own launch of the same
  compiled kernel (`cupy.RawModule(...).get_function(...)`, i.e. what a bare `cupy.RawKernel`
  does), and the ratio of the two.

    python -m bench.launch                    # both parts where a GPU is present
    python -m bench.launch --count 2000 --json launch.json

Times are the best of `--repeat` loops of `--count` launches (the host's noise is one-sided).
"""

import argparse
import contextlib
import json
import platform
import sys
import time
import types

import numpy as np

# (file, kernel): a 3-argument elementwise kernel and the 14-argument
# convolution (the forward implicit GEMM), the two ends of what a training step launches.
CASES = (("elementwise.cu", "relu_forward_f32"), ("conv.cu", "conv2d_fwd_igemm_f32"))


# ---- a stand-in for CuPy: looks like it to our launch path, launches nothing ------------------------

class StandInArray:
    """Looks like a `cupy.ndarray` to kernels/ (its type's module is 'cupy'); wraps a NumPy array
    for dtype, shape, strides and flags. `.data.ptr` is the host address (never dereferenced)."""

    __module__ = "cupy"

    def __init__(self, host):
        self._host = host
        self.dtype, self.shape, self.strides = host.dtype, host.shape, host.strides
        self.size, self.ndim, self.nbytes = host.size, host.ndim, host.nbytes
        self.data = types.SimpleNamespace(ptr=host.__array_interface__["data"][0])

    @property
    def flags(self):
        return self._host.flags

    def __getitem__(self, index):
        return StandInArray(self._host[index])

    def reshape(self, *shape):
        return StandInArray(self._host.reshape(*shape))


StandInArray.__name__ = StandInArray.__qualname__ = "ndarray"


class StandInFunction:
    """What `cupy.RawModule.get_function` returns; a call records the launch and does nothing."""

    def __init__(self, name):
        self.name = name
        self.calls = 0
        self.last = None
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem=0, **kwargs):
        self.calls += 1
        self.last = (grid, block, args, shared_mem)


class StandInRawModule:
    """`cupy.RawModule(code=..., options=..., backend=...)` that compiles nothing. get_function
    returns a new function object per call, as CuPy does."""

    made = []

    def __init__(self, code=None, options=(), backend="nvrtc", **kwargs):
        self.code, self.options, self.backend = code, tuple(options), backend
        self.functions = []
        StandInRawModule.made.append(self)

    def get_function(self, name):
        fn = StandInFunction(name)
        self.functions.append(fn)
        return fn

    def compile(self):
        return self


def standin_cupy_module():
    """A module object to put in sys.modules['cupy']: ndarray, RawModule, asarray, empty and
    cuda.runtime.getDevice (always device 0)."""
    mod = types.ModuleType("cupy")
    mod.__version__ = "stand-in"
    mod.ndarray = StandInArray
    mod.RawModule = StandInRawModule
    mod.asarray = lambda a, dtype=None: a if isinstance(a, StandInArray) else StandInArray(np.asarray(a, dtype))
    mod.empty = lambda shape, dtype=np.float32: StandInArray(np.empty(shape, dtype))
    mod.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 0))
    mod.is_standin = True
    return mod


@contextlib.contextmanager
def standin_cupy():
    """Within the block, `import cupy` gives the stand-in (the real one, if any, is put back)."""
    saved = {k: v for k, v in sys.modules.items() if k == "cupy" or k.startswith("cupy.")}
    for k in saved:
        del sys.modules[k]
    sys.modules["cupy"] = standin_cupy_module()
    try:
        yield sys.modules["cupy"]
    finally:
        for k in [k for k in sys.modules if k == "cupy" or k.startswith("cupy.")]:
            del sys.modules[k]
        sys.modules.update(saved)


# ---- the launches --------------------------------------------------------------------------------------

def _case_args(kernel, make):
    """grid, block and args for one launch of `kernel`; `make(shape, dtype)` makes an array."""
    i32 = np.int32
    if kernel == "relu_forward_f32":
        x, y = make((4096,), np.float32), make((4096,), np.float32)
        return (16,), (256,), (x, y, np.int64(4096))
    if kernel == "conv2d_fwd_igemm_f32":       # N=2, 8x8x16 -> 16 channels, 3x3, stride 1, pad 1
        from kernels.conv import _IG_TILE   # the launcher's tile: the grid kernels.conv would use
        N, H, W, C, K, R, S, P, Q = 2, 8, 8, 16, 16, 3, 3, 8, 8
        x, wt, y = make((N, H, W, C), np.float32), make((K, R, S, C), np.float32), make((N, P, Q, K), np.float32)
        grid = (-(-(N * P * Q) // _IG_TILE), -(-K // _IG_TILE))
        return grid, (256,), (x, wt, y, i32(N), i32(H), i32(W), i32(C), i32(K), i32(R), i32(S), i32(P), i32(Q),
                              i32(1), i32(1))
    raise ValueError(kernel)


def _best_per_call(fn, count, repeat):
    """Best over `repeat` loops of `count` calls of fn(), in microseconds per call."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / count * 1e6


def measure_standin(count=20000, repeat=5):
    """Our Python per launch with the driver call replaced by a stand-in (runs anywhere).

    -> list of {kernel, args, us_per_launch, standin_us, ours_us, launches}: us_per_launch is the
    launcher idiom end to end, standin_us the stand-in function's own call, ours_us the difference.
    """
    rows = []
    with standin_cupy():
        from kernels.runtime import launch as _launch
        for filename, kernel in CASES:
            grid, block, args = _case_args(kernel, lambda shape, dt: StandInArray(np.zeros(shape, dt)))
            get = _launch.module
            get(filename).get_function(kernel)(grid, block, args)     # first launch: builds the caches

            def launch():
                get(filename).get_function(kernel)(grid, block, args)

            total = _best_per_call(launch, count, repeat)
            # the stand-in function our path handed the launch to, called directly
            made = [fn for m in StandInRawModule.made for fn in m.functions if fn.name == kernel]
            target = made[-1]
            calls_before = target.calls
            g, b, a, _ = target.last
            own = _best_per_call(lambda: target(g, b, a, shared_mem=0), count, repeat)
            if target.calls - calls_before != count * repeat:
                raise RuntimeError(f"{kernel}: the launches did not reach the stand-in driver call")
            launches = sum(fn.calls for m in StandInRawModule.made for fn in m.functions if fn.name == kernel)
            rows.append({"kernel": kernel, "args": len(args), "us_per_launch": total, "standin_us": own,
                         "ours_us": max(0.0, total - own), "launches": launches - count * repeat})
    return rows


def measure_gpu(count=20000, repeat=5):
    """On a GPU: our launch path and CuPy's own launch of the same compiled kernel, host time per
    launch. None without a GPU."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    from kernels.runtime import launch as _launch
    rows = []
    for filename, kernel in CASES:
        print(f"[bench.launch] {kernel} on the GPU: starting", flush=True)
        grid, block, args = _case_args(kernel, lambda shape, dt: cupy.zeros(shape, dt))
        ours = _launch.module(filename).get_function(kernel)
        ours(grid, block, args)                                   # compiles (NVRTC), builds caches
        bare = _launch.module(filename)._cupy_module().get_function(kernel)   # CuPy's Function
        bare(grid, block, args)
        cupy.cuda.Device().synchronize()

        def timed(fn):
            result = _best_per_call(fn, count, repeat)
            cupy.cuda.Device().synchronize()
            return result

        t_ours = timed(lambda: _launch.module(filename).get_function(kernel)(grid, block, args))
        t_bare = timed(lambda: bare(grid, block, args))
        rows.append({"kernel": kernel, "args": len(args), "ours_us": t_ours, "cupy_us": t_bare,
                     "ratio": t_ours / t_bare})
    return rows


def run(count=20000, repeat=5, gpu=True, out=None):
    """Measure and print; returns {"standin": rows, "gpu": rows or None, ...}."""
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "python": platform.python_version(), "count": count, "repeat": repeat}
    result["standin"] = measure_standin(count, repeat)
    print(f"Host time per launch, CuPy path with a stand-in driver call (best of {repeat} x {count} launches)")
    print(f"{'kernel':<24} {'args':>4} {'us/launch':>10} {'stand-in':>9} {'ours':>7}")
    for r in result["standin"]:
        print(f"{r['kernel']:<24} {r['args']:>4} {r['us_per_launch']:>10.2f} {r['standin_us']:>9.2f} "
              f"{r['ours_us']:>7.2f}")
    result["gpu"] = measure_gpu(count, repeat) if gpu else None
    if result["gpu"]:
        print("On the GPU: our launch path beside CuPy's own launch of the same kernel")
        print(f"{'kernel':<24} {'args':>4} {'ours us':>8} {'cupy us':>8} {'ratio':>6}")
        for r in result["gpu"]:
            print(f"{r['kernel']:<24} {r['args']:>4} {r['ours_us']:>8.2f} {r['cupy_us']:>8.2f} {r['ratio']:>6.2f}")
    elif gpu:
        print("no GPU: the real launch is not measured (CuPy missing or no device)")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=20000, help="launches per timed loop (default 20000)")
    p.add_argument("--repeat", type=int, default=5, help="timed loops; the best is reported (default 5)")
    p.add_argument("--no-gpu", action="store_true", help="only the stand-in measurement")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        p.error("--count and --repeat must be >= 1")
    run(args.count, args.repeat, gpu=not args.no_gpu, out=args.json)
    return 0


if __name__ == "__main__":
    from bench import stop_on_setup_error
    sys.exit(stop_on_setup_error("bench.launch", main))
