"""Training throughput of ResNet-50 v1.5: `python -m bench.train`.

The step measured is train.py's own: Trainer.step, on a Trainer built for its step alone
(Trainer.for_step: the model, optimizer, loss scaler and all-reduce a run builds, without data,
run folder or log). Synthetic input already on the device (uint8 images as after the prefetcher,
normalised by the step's input kernel; no loader: bench.loader measures that), one model per
configuration:

    fp32-ours    float32, our convolution kernels
    fp32-cudnn   float32, convolutions through cuDNN (nn.device.set_conv_engine('cudnn')), TF32 off
    amp-ours     fp16 activations, fp32 master weights, static loss scale 128 (nn.amp.LossScaler)
    amp-cudnn    the same with cuDNN convolutions

For each: a warm-up (excluded), a throughput pass of asynchronous steps timed end to end
(images/s), and a separate profiled pass that synchronises the device at the phase boundaries
Trainer.step marks (forward incl. the input kernel and the loss, backward incl. zero_grad,
optimizer incl. the loss scaler) to give the per-phase breakdown, plus peak device memory: the
high-water mark of CuPy's memory pool (bytes reserved from the device, the analogue of PyTorch's
max_memory_reserved; the pool is emptied before each configuration) and the largest bytes in use
seen at the phase boundaries. The loss shown is the mean over the timed steps, read once after them.

    python -m bench.train                                  # GPU: batch 256, 224 px, all four
    python -m bench.train --size tiny --device cpu emu     # CPU: width 1/16, 32 px, batch 4
    python -m bench.train --configs amp-cudnn --cuda-graph --json out.json
    python -m bench.train --optimizer lars                 # LARS instead of SGD
    python -m bench.train --size tiny --device emu --sync-check     # host reads and launches per step

Trainer.step (nn.optim over flat buffers: one update launch; the loss added to a device-side
total, never read inside the step; the loss scaler on the device) is what --cuda-graph captures
(nn/cuda_graph.py) before timing replays, as train.py --cuda-graph does.

--sync-check runs steady-state steps of Trainer.step and counts what each one does: host syncs
per step (reads through nn.device.to_numpy, the only door from device to host; 0 is the goal; a
read added to Trainer.step shows here) and kernel launches per step, for SGD fp32, SGD fp16
with dynamic loss scaling, LARS, and (under `mpiexec -n 2`, CPU MPI) synchronised BN over 2
ranks. Exit 1 if any configuration makes a host read.

A configuration that fails (e.g. fp16 activations where a kernel is float32-only) is reported in
the table with its error; the others still run. The exit code is 0 unless every run failed.
"""

import argparse
import json
import platform
import statistics
import sys
import time
import traceback

import numpy as np

from bench import progress as _progress, stop_on_setup_error, write_json
from kernels.runtime.cuda_env import CudaSetupError

__all__ = ["SIZES", "CONFIGS", "run", "measure", "build_setup", "converge", "gpu_available", "print_table",
           "sync_check"]

# size name -> model width, image side, batch, classes, warm-up steps, timed steps, profiled steps
SIZES = {
    "resnet50": dict(width=1.0, image=224, batch=256, classes=1000, warmup=5, steps=20, profile_steps=5),
    "tiny": dict(width=1 / 16, image=32, batch=4, classes=10, warmup=1, steps=3, profile_steps=2),
}

# name -> (precision, conv engine)
CONFIGS = {
    "fp32-ours": ("fp32", "ours"),
    "fp32-cudnn": ("fp32", "cudnn"),
    "amp-ours": ("amp", "ours"),
    "amp-cudnn": ("amp", "cudnn"),
}

LOSS_SCALE = 128.0     # the MLPerf reference's static scale


def gpu_available():
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _sync(device):
    if device == "cuda":
        import cupy
        cupy.cuda.get_current_stream().synchronize()


# ---- one configuration --------------------------------------------------------------------------


class Setup:
    """One configuration: train.py's Trainer built for its step alone (Trainer.for_step: model,
    optimizer, loss scaler, all-reduce, the device-side running loss [sum, finite steps, NaN/inf
    steps]) and one synthetic batch kept on the device (x: uint8 images [B, S, S, 3] NHWC, y:
    int32 labels [B]), as after the prefetcher."""

    def __init__(self, trainer, x, y, device, precision):
        self.trainer, self.x, self.y = trainer, x, y
        self.device, self.precision = device, precision

    model = property(lambda self: self.trainer.model)
    opt = property(lambda self: self.trainer.opt)
    scaler = property(lambda self: self.trainer.scaler)
    loss_totals = property(lambda self: self.trainer.loss_window)


LR = 0.01   # small: a benchmark must not diverge on a fixed batch


def build_setup(precision, device, size, seed=0, optimizer="sgd", dynamic_scale=False, comm=None, sync_bn=False):
    """train.py's Trainer (Trainer.for_step) and one synthetic batch on `device`.

    precision: 'fp32' or 'amp' (train.py's --precision fp16); size: a SIZES entry (dict);
    optimizer: 'sgd' or 'lars' (nn.optim); dynamic_scale: dynamic loss scaling for amp (default:
    the reference's static 128); comm: a communicator of several ranks (data parallel,
    optionally synchronised BN). Learning rate LR, momentum 0.9, weight decay 5e-5, no label
    smoothing.
    """
    import nn
    import train
    if optimizer not in ("sgd", "lars"):
        raise ValueError(f"optimizer must be 'sgd' or 'lars', got {optimizer!r}")
    amp = precision == "amp"
    cfg = dict(device=device, precision="fp16" if amp else "fp32",
               loss_scale="dynamic" if dynamic_scale else LOSS_SCALE, width=size["width"],
               zero_init_residual=False, seed=seed, sync_bn=sync_bn and comm is not None, optimizer=optimizer,
               momentum=0.9, weight_decay=5e-5, label_smoothing=0.0, profile=False)
    trainer = train.Trainer.for_step(cfg, size["classes"], comm)
    trainer.opt.lr = LR
    rng = np.random.default_rng(seed)
    B, S = size["batch"], size["image"]
    dev = nn.device.get_device(device)
    # made once and kept: the input is "already on the device", as after a prefetcher
    x = dev.asarray(rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8))
    y = dev.asarray(rng.integers(0, size["classes"], B).astype(np.int32))
    return Setup(trainer, x, y, device, precision)


def eager_step(s):
    """One training step: train.py's Trainer.step on the setup's batch (no host read; what
    --cuda-graph captures). The loss goes to s.loss_totals on the device, unread."""
    s.trainer.step(s.x, s.y)


class _Memory:
    """Peak device memory of CuPy's default pool (and of extra pools, e.g. a graph's)."""

    def __init__(self, device):
        self.device = device
        self.extra_pools = []
        self.peak_used = 0
        self.peak_reserved = 0
        if device == "cuda":
            import cupy
            self.pool = cupy.get_default_memory_pool()
            self.pool.free_all_blocks()
            self.sample()

    def sample(self):
        if self.device != "cuda":
            return
        used = self.pool.used_bytes() + sum(p.used_bytes() for p in self.extra_pools)
        reserved = self.pool.total_bytes() + sum(p.total_bytes() for p in self.extra_pools)
        self.peak_used = max(self.peak_used, int(used))
        self.peak_reserved = max(self.peak_reserved, int(reserved))

    def result(self):
        if self.device != "cuda":
            return {"peak_reserved_bytes": None, "peak_used_bytes_sampled": None, "device_used_bytes": None}
        import cupy
        free, total = cupy.cuda.runtime.memGetInfo()
        return {"peak_reserved_bytes": self.peak_reserved, "peak_used_bytes_sampled": self.peak_used,
                "device_used_bytes": int(total - free)}


def measure(name, device, size_name="tiny", cuda_graph=False, optimizer="sgd", seed=0, steps=None,
            warmup=None, profile_steps=None):
    """Benchmark one configuration. Returns a dict (one table row); never raises for a failing
    configuration: the row then has 'error' (or 'skipped' when it cannot run on this device).
    A CudaSetupError (NVRTC or a CUDA header missing) is raised: every configuration would fail."""
    precision, engine = CONFIGS[name]
    size = dict(SIZES[size_name])
    for key, value in (("steps", steps), ("warmup", warmup), ("profile_steps", profile_steps)):
        if value is not None:
            size[key] = value
    row = {"config": name, "device": device, "precision": precision, "engine": engine, "size": size_name,
           "batch": size["batch"], "image": size["image"], "width": size["width"], "cuda_graph": bool(cuda_graph),
           "optimizer": optimizer}
    if device != "cuda" and engine == "cudnn":
        row["skipped"] = "the cuDNN engine needs the cuda device"
        return row
    if device != "cuda" and cuda_graph:
        row["skipped"] = "CUDA graphs need the cuda device"
        return row
    import nn
    memory = _Memory(device)
    try:
        nn.device.set_conv_engine(engine if device == "cuda" else "ours")
        s = build_setup(precision, device, size, seed, optimizer)
        memory.sample()
        if cuda_graph:
            from nn.cuda_graph import GraphedStep
            step = GraphedStep(lambda: eager_step(s), warmup=max(1, size["warmup"]), keep_alive=(s.x, s.y))
            for _ in range(size["warmup"] + 1):      # the eager warm-up, then the capture (and one replay)
                step()
            memory.extra_pools.append(step.pool)
            run_step = step
        else:
            for _ in range(size["warmup"]):
                eager_step(s)
            run_step = lambda: eager_step(s)
        _sync(device)
        memory.sample()
        s.loss_totals.fill(0)        # from here: the timed steps' losses only
        # throughput: asynchronous steps, one sync at the end
        t0 = time.perf_counter()
        for _ in range(size["steps"]):
            run_step()
        _sync(device)
        elapsed = time.perf_counter() - t0
        memory.sample()
        row["step_ms"] = 1e3 * elapsed / size["steps"]
        row["images_per_s"] = size["batch"] * size["steps"] / elapsed
        total, finite, _ = (float(v) for v in nn.device.to_numpy(s.loss_totals))   # read once, after them
        row["loss"] = total / finite if finite else float("nan")     # the mean loss of the timed steps
        if s.scaler is not None:
            row["loss_scale"] = s.scaler.scale
            row["skipped_steps"] = s.scaler.skipped_steps
        row.update(_profile(s, size["profile_steps"], device, memory) if not cuda_graph else
                   {"phases_ms": None, "phases_note": "one graph launch: no phase boundaries inside"})
        row.update(memory.result())
    except CudaSetupError:
        raise
    except Exception as exc:    # reported in the table, the other configurations still run
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        row["traceback"] = traceback.format_exc(limit=6)
        row.update(memory.result() if device == "cuda" else {})
    finally:
        try:
            nn.device.set_conv_engine("ours")
        except Exception:
            pass
    return row


class _PhaseTimer:
    """Takes the place of train.py's Phases clock (trainer.phases) for the profiled pass: at each
    phase boundary Trainer.step marks (input, forward, backward, optimizer) it synchronises the
    device, records the phase's seconds and samples the memory pool."""

    def __init__(self, device, memory):
        self.device, self.memory = device, memory
        self.times = {}

    def start(self):
        _sync(self.device)
        self.step, self.t = {}, time.perf_counter()

    def mark(self, name):
        _sync(self.device)
        now = time.perf_counter()
        self.step[name] = now - self.t
        self.t = now
        self.memory.sample()

    def end(self):
        for name, seconds in self.step.items():
            self.times.setdefault(name, []).append(seconds)


def _profile(s, steps, device, memory):
    """Median milliseconds of each phase of Trainer.step, with a device sync at every boundary.
    forward includes the input kernel (uint8 -> normalised float) and the loss."""
    timer, kept = _PhaseTimer(device, memory), s.trainer.phases
    s.trainer.phases = timer
    try:
        for _ in range(max(1, steps)):
            timer.start()
            eager_step(s)
            timer.end()
    finally:
        s.trainer.phases = kept
    t = timer.times
    phases = {"forward": [a + b for a, b in zip(t["input"], t["forward"])], "backward": t["backward"],
              "optimizer": t["optimizer"]}
    return {"phases_ms": {k: 1e3 * statistics.median(v) for k, v in phases.items()}}


# ---- the whole benchmark --------------------------------------------------------------------------


def environment():
    """Versions and the device, for the JSON record."""
    env = {"python": sys.version.split()[0], "numpy": np.__version__, "machine": platform.machine(),
           "processor": platform.processor()}
    try:
        import cupy
        env["cupy"] = cupy.__version__
        if cupy.cuda.runtime.getDeviceCount() > 0:
            props = cupy.cuda.runtime.getDeviceProperties(0)
            name = props["name"]
            env["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
            env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            env["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception as exc:
        env["cupy"] = f"unavailable ({type(exc).__name__})"
    return env


def run(devices=None, configs=None, size=None, cuda_graph=False, optimizer="sgd", out=None, steps=None,
        warmup=None, profile_steps=None, quiet=False):
    """Run every (device, configuration); print the table; write JSON to `out` if given.
    Returns the result dict {'environment', 'rows'}."""
    gpu = gpu_available()
    devices = devices or (["cuda"] if gpu else ["cpu", "emu"])
    if "cuda" in devices and not gpu:
        raise SystemExit("bench.train: --device cuda asked for, but CuPy sees no GPU")
    size = size or ("resnet50" if devices == ["cuda"] else "tiny")
    configs = configs or list(CONFIGS)
    rows = []
    counts = {"steps": steps, "warmup": warmup, "profile_steps": profile_steps}
    used = dict(SIZES[size], **{k: v for k, v in counts.items() if v is not None})
    result = {"benchmark": "bench.train", "environment": environment(), "size": size,
              "sizes": {size: used}, "rows": rows}
    for device in devices:
        for name in configs:
            if not quiet:
                _progress("bench.train", f"{device} {name}{' +graph' if cuda_graph else ''}: starting")
            rows.append(measure(name, device, size, cuda_graph, optimizer, steps=steps, warmup=warmup,
                                profile_steps=profile_steps))
            if not quiet:
                print(_format_row(rows[-1]), flush=True)
            if out:     # the rows so far: a run stopped at its time limit keeps them
                write_json(dict(result, partial=True), out, default=float, quiet=True)
    print_table(result)
    if out:
        write_json(result, out, default=float)
    return result


def _gb(b):
    return "" if b is None else f"{b / 1e9:.2f}"


def _format_row(r):
    head = f"{r['device']:<5} {r['config']:<11}{'+graph' if r['cuda_graph'] else '':<7}{r['optimizer']:<5}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    ph = r.get("phases_ms") or {}
    phases = "".join(f"{ph[k]:>9.2f}" if k in ph else f"{'-':>9}" for k in ("forward", "backward", "optimizer"))
    return (f"{head}{r['images_per_s']:>10.1f}{r['step_ms']:>10.2f}{phases}"
            f"{_gb(r.get('peak_reserved_bytes')):>9}{_gb(r.get('peak_used_bytes_sampled')):>9}{r['loss']:>9.4f}")


def print_table(result):
    env = result["environment"]
    where = env.get("gpu") or f"CPU ({env.get('processor') or env.get('machine')}), no GPU"
    s = result["sizes"][result["size"]]
    print(f"\nbench.train on {where}; size={result['size']} (width {s['width']:g}, {s['image']} px, batch "
          f"{s['batch']}); warm-up {s['warmup']}, timed {s['steps']}, profiled {s['profile_steps']} steps")
    header = (f"{'dev':<5} {'config':<11}{'':<7}{'opt':<5}{'img/s':>10}{'step ms':>10}{'fwd ms':>9}{'bwd ms':>9}"
              f"{'opt ms':>9}{'peak GB':>9}{'used GB':>9}{'loss':>9}")
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(_format_row(r))
    print("(img/s, step ms: asynchronous steps; fwd/bwd/opt: a separate pass with a device sync at each "
          "boundary; peak GB: memory-pool high-water, used GB: largest in-use bytes seen at phase boundaries)")


# ---- convergence smoke test ---------------------------------------------------------------------


def converge(device, steps=200, size="tiny", seed=0, lr=None, progress=False, overrides=None, zero_init=True):
    """Train on a fixed set of synthetic texture images (data.synthetic, rendered in memory) and
    return the per-step losses. Batches go through data.device_prefetch.DevicePrefetcher (pinned
    buffers and a copy stream on cuda) and the input kernel (uint8 NHWC -> normalised float).

    size 'tiny': width 1/16, 32 px, one batch of 32 images, lr 0.05; 'small' (for a GPU): width
    1/4, 64 px, batch 128 from 512 images, lr 0.1. SGD momentum 0.9, zero_init_residual (each
    block starts as the identity: stable from the first step). `overrides` replaces entries of
    that table (width, image, batch, images, lr); `lr` overrides the learning rate.
    Returns {'losses': [...], 'first', 'last', 'ratio' (last/first), 'seconds', ...} where first
    and last are the mean losses of the first and last 10% of the steps.
    """
    import nn
    from nn import functional as F
    from data import synthetic
    from data.device_prefetch import DevicePrefetcher
    cfg = {"tiny": dict(width=1 / 16, image=32, batch=32, images=32, lr=0.05),
           "small": dict(width=0.25, image=64, batch=128, images=512, lr=0.1)}[size]
    cfg.update(overrides or {})
    classes = 10
    rng = np.random.default_rng(seed)
    labels = (np.arange(cfg["images"]) % classes).astype(np.int32)
    images = np.stack([synthetic.render_image(rng, int(c), cfg["image"], cfg["image"], classes, period=(3.0, 6.0),
                                              object_frac=(0.6, 0.9), distractor=0.0) for c in labels])
    model = nn.resnet50(num_classes=classes, width=cfg["width"], seed=seed, zero_init_residual=zero_init).to(device)
    opt = nn.optim.SGD(model.named_parameters(), lr=lr if lr is not None else cfg["lr"], momentum=0.9,
                       weight_decay=5e-5)
    per_epoch = cfg["images"] // cfg["batch"]

    def batches():
        for step in range(steps):
            if step % per_epoch == 0:
                order = np.random.default_rng([seed, step // per_epoch]).permutation(cfg["images"])
            idx = order[(step % per_epoch) * cfg["batch"]:(step % per_epoch + 1) * cfg["batch"]]
            yield images[idx], labels[idx]

    losses = []
    t0 = time.perf_counter()
    for step, (xb, yb) in enumerate(DevicePrefetcher(batches(), device)):
        x = F.normalize_images(xb, device=device, std=(58.4, 57.1, 57.4))
        loss = F.cross_entropy(model(x, layout="NHWC"), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.data))     # a sync per step: fine for a smoke test
        if progress and step % 20 == 0:
            print(f"step {step:4d} loss {losses[-1]:.4f}", flush=True)
    k = max(1, len(losses) // 10)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    return {"device": device, "size": size, "steps": steps, "losses": losses, "first": first, "last": last,
            "ratio": last / first, "seconds": time.perf_counter() - t0}


# ---- host syncs and launches per step ------------------------------------------------------------


SYNC_CHECK_CONFIGS = [  # (label, precision, optimizer, dynamic loss scaling)
    ("SGD fp32", "fp32", "sgd", False),
    ("SGD fp16, dynamic loss scale", "amp", "sgd", True),
    ("LARS fp32", "fp32", "lars", False),
]


def sync_check(device="emu", size_name="tiny", steps=3, warmup=2, quiet=False):
    """Count host reads (nn.device.host_reads) and kernel launches (kernels.launch_count) over
    `steps` steady-state steps of each configuration, after `warmup` steps. Run under an MPI
    launcher with 2+ ranks, the configuration is data-parallel SGD fp32 with synchronised BN.
    Returns one dict per configuration: label, host_syncs_per_step, launches_per_step."""
    import kernels
    import nn
    from nn import distributed
    size = dict(SIZES[size_name])
    comm = None
    configs = SYNC_CHECK_CONFIGS
    if distributed.launched_world_size() > 1:
        comm = distributed.current() or distributed.init(device="cuda" if device == "cuda" else "cpu")
        configs = [(f"SGD fp32, sync BN over {comm.world_size} ranks", "fp32", "sgd", False)]
    rows = []
    for label, precision, optimizer, dynamic in configs:
        if precision == "amp" and device == "cpu":
            rows.append({"label": label, "skipped": "fp16 activations run on emu and cuda"})
            continue
        s = build_setup(precision, device, size, optimizer=optimizer, dynamic_scale=dynamic, comm=comm,
                        sync_bn=comm is not None)
        for _ in range(warmup):
            eager_step(s)
        _sync(device)
        reads, launches = nn.device.host_reads(), kernels.launch_count()
        with kernels.trace.collect() as trace:        # which kernels: the launch trace
            for _ in range(steps):
                eager_step(s)
        row = {"label": label, "device": device, "size": size_name,
               "host_syncs_per_step": (nn.device.host_reads() - reads) / steps,
               "launches_per_step": (kernels.launch_count() - launches) / steps,
               "kernels_per_step": {k: n / steps for k, n in trace.by_kernel().most_common()}}
        _sync(device)
        totals = nn.device.to_numpy(s.loss_totals)     # read once, outside the counted steps
        row["mean_loss"] = float(totals[0] / max(totals[1], 1))
        rows.append(row)
        if not quiet and distributed.is_main(comm):
            top = ", ".join(f"{k} {n:g}" for k, n in list(row["kernels_per_step"].items())[:4])
            print(f"{label:<42} host syncs per step: {row['host_syncs_per_step']:g}   "
                  f"launches per step: {row['launches_per_step']:g} ({len(row['kernels_per_step'])} kernels; "
                  f"most: {top})", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", nargs="+", choices=["cpu", "emu", "cuda"],
                   help="default: cuda if CuPy sees a GPU, else cpu and emu")
    p.add_argument("--size", choices=sorted(SIZES), help="default: resnet50 on cuda, tiny otherwise")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="default: all four")
    p.add_argument("--cuda-graph", action="store_true", help="capture the step as a CUDA graph and time replays")
    p.add_argument("--optimizer", choices=["sgd", "lars"], default="sgd", help="nn.optim.SGD or nn.optim.LARS")
    p.add_argument("--sync-check", action="store_true",
                   help="instead: count host syncs and kernel launches per steady-state step (SGD fp32, SGD fp16 "
                        "dynamic scaling, LARS; sync BN when run under mpiexec -n 2); exit 1 on any host read")
    p.add_argument("--check-steps", type=int, default=3, help="steady-state steps counted by --sync-check (3)")
    p.add_argument("--steps", type=int, help="timed steps (default from --size)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default from --size)")
    p.add_argument("--profile-steps", type=int, help="profiled steps (default from --size)")
    p.add_argument("--json", dest="out", help="write the results here")
    p.add_argument("--converge", type=int, metavar="STEPS",
                   help="instead: a convergence smoke test of STEPS steps on synthetic textures; exit 1 "
                        "unless the loss falls below 0.75x its start")
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "profile_steps", "converge"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {v}")
    if args.sync_check:
        device = (args.device or ["cuda" if gpu_available() else "emu"])[0]
        size = args.size or ("resnet50" if device == "cuda" else "tiny")
        rows = sync_check(device, size, steps=args.check_steps)
        from nn import distributed
        if args.out and distributed.is_main():
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)
        return 0 if rows and all(r["host_syncs_per_step"] == 0 for r in rows) else 1
    if args.converge:
        device = (args.device or ["cuda" if gpu_available() else "cpu"])[0]
        size = "small" if device == "cuda" and args.size != "tiny" else "tiny"
        _progress("bench.train", f"convergence, {args.converge} steps on {device} ({size}): starting")
        res = converge(device, args.converge, size, progress=True)
        ok = res["ratio"] < 0.75 and np.isfinite(res["last"])
        print(f"convergence on {device} ({size}): loss {res['first']:.4f} -> {res['last']:.4f} "
              f"(x{res['ratio']:.2f}) in {res['steps']} steps, {res['seconds']:.1f} s: {'PASS' if ok else 'FAIL'}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(res, passed=bool(ok)), f, indent=2)
        return 0 if ok else 1
    result = run(args.device, args.configs, args.size, args.cuda_graph, args.optimizer, args.out,
                 args.steps, args.warmup, args.profile_steps)
    ok = any("images_per_s" in r for r in result["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(stop_on_setup_error("bench.train", main))
