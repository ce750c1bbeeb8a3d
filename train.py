"""MLPerf image classification: ResNet-50 v1.5 trained until top-1 reaches the target.

    python train.py                         # built-in default: synthetic data, best device
    python train.py --data /imn             # the MLPerf v0.5 recipe on packed ImageNet
    python train.py --data /imn --precision fp16 --conv-engine cudnn --batch-size 256
    python train.py --resume runs/20261128-1300     # continue exactly where a run stopped

--data DIR is a folder holding train.lmdb and val.lmdb, made once by
    python -m data.pack --src /path/to/imagenet --dst DIR

Every run writes into its run directory (--out, default runs/<date-time>):
    mlperf.log        the MLPerf log (:::MLLOG lines), checked by mlperf-logging's checker
    metrics.jsonl     one JSON line per epoch (loss, accuracy, learning rate, times)
    plot.png          loss, accuracy and learning rate, redrawn after every epoch
    checkpoint_last.npz, checkpoint_best.npz    written atomically; --resume reads them
    config.json       the resolved configuration

Exit codes: 0 target reached (or the run finished as asked: --max-steps, --dry-run);
1 all epochs done without reaching the target; 2 bad usage or missing dataset;
3 the loss diverged (NaN/inf); 4 out of device memory; 130 interrupted (checkpoint saved).
"""

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

import data.loader
import data.records
from data.device_prefetch import DevicePrefetcher
import nn
from nn import distributed

# ----------------------------------------------------------------------------- defaults
# The MLPerf v0.5 reference recipe (../shared/REFERENCE.md), used with --data.
RECIPE = dict(batch_size=256, base_lr=0.128, lr_per=256, warmup_epochs=5, decay_epochs=(30, 60, 80, 90),
              decay=0.1, momentum=0.9, weight_decay=1e-4, epochs=90, eval_every=1, target_accuracy=0.749,
              image_size=224, width=1.0, label_smoothing=0.0, optimizer="sgd", schedule="step", min_crop_area=0.05)

# The built-in default run on synthetic data (no --data). On a CPU it trains a narrow ResNet-50
# v1.5 on small images, sized so that 2 cores finish in a few minutes. The synthetic images
# (data/synthetic.py) are textured objects on cluttered backgrounds; the class is the texture.
# At 48 px, behind ResNet's 4x downsampling stem, fine textures alias, so the default dataset
# uses coarse ones, large objects, few distractors and the 7 texture families that stay distinct
# at that resolution (dots, grid lines and speckle blur into each other at 48 px); random crops keep at least half the image.
SYNTHETIC = {
    # name: dict of data.synthetic.make_dataset arguments
    "default": dict(num_classes=7, train_per_class=200, val_per_class=50, image_size_range=(64, 96),
                    period=(8, 16), object_frac=(0.5, 0.85), distractor=0.05, textures=(0, 1, 2, 3, 4, 6, 8)),
    "tiny": dict(num_classes=4, train_per_class=24, val_per_class=8, image_size_range=(40, 56),
                 period=(8, 16), object_frac=(0.5, 0.85), distractor=0.05, textures=(0, 1, 6, 8)),
}
DEFAULT_CPU = dict(width=1 / 16, image_size=48, batch_size=32, epochs=60, warmup_epochs=2, base_lr=0.1,
                   lr_per=32, decay_epochs=(), schedule="cosine", target_accuracy=0.93, eval_every=1,
                   zero_init_residual=True, min_crop_area=0.5)
DEFAULT_GPU = dict(width=1.0, image_size=128, batch_size=128, epochs=30, warmup_epochs=2, base_lr=0.2,
                   lr_per=128, decay_epochs=(), schedule="cosine", target_accuracy=0.93, eval_every=1,
                   zero_init_residual=True, min_crop_area=0.5)

# Test hook: end the process abruptly after this training step (tests/test_train.py).
_CRASH_AT_STEP = int(os.environ.get("MLPERF_RESNET_CRASH_AT_STEP", "0") or 0)

EXIT_OK, EXIT_NOT_REACHED, EXIT_USAGE, EXIT_DIVERGED, EXIT_OOM, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def _comm():
    """This process's communicator (a single-process one when train.py is used as a library)."""
    return distributed.current() or distributed.init(backend="single")


class UsageError(Exception):
    """A bad flag combination or a missing dataset: exit code 2 with a one-line message."""


# ----------------------------------------------------------------------------- command line
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="folder with train.lmdb and val.lmdb (see data.pack)")
    d.add_argument("--synthetic", nargs="?", const="default", choices=sorted(SYNTHETIC),
                   help="use the built-in synthetic dataset (generated once, cached); the default without --data")
    d.add_argument("--workers", type=int, help="loader processes (default: CPU cores - 1; 0 = in-process)")
    d.add_argument("--image-size", type=int, help="training/eval crop side (224 for the recipe)")
    d.add_argument("--min-crop-area", type=float,
                   help="smallest random crop, as a fraction of the image (0.05 for the recipe)")
    m = p.add_argument_group("model and device")
    m.add_argument("--device", choices=["auto", "cpu", "emu", "cuda"], default=None,
                   help="auto (default): cuda if CuPy sees a GPU, else cpu. emu runs our CUDA kernels on the "
                        "CPU emulator (slow: for checking, not training)")
    m.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="activations: fp32, or fp16 on cuda (bf16 is refused: several ops have no bf16 kernels)")
    m.add_argument("--conv-engine", choices=["ours", "cudnn"], help="convolutions: our kernels or cuDNN (cuda)")
    m.add_argument("--loss-scale", help="with --precision fp16: 'dynamic' (default) or a fixed scale, e.g. 128 "
                                        "as the reference")
    m.add_argument("--width", type=float, help="channel multiplier of every stage (1.0 = ResNet-50)")
    m.add_argument("--zero-init-residual", action="store_true", default=None,
                   help="start each block's last BN gamma at 0")
    m.add_argument("--sync-bn", action="store_true", default=None,
                   help="with several ranks: batch-norm statistics over all ranks (default: per rank, as the "
                        "reference)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, help="images per step (256 for the recipe)")
    o.add_argument("--lr", type=float, dest="base_lr", help="peak learning rate per --lr-per images (0.128)")
    o.add_argument("--lr-per", type=int, help="the batch size --lr is quoted for (256): lr = lr * batch / lr_per")
    o.add_argument("--optimizer", choices=["sgd", "lars"])
    o.add_argument("--schedule", choices=["step", "poly", "cosine"],
                   help="step: warm-up + x0.1 at --decay-epochs (the v0.5 recipe); poly: power 2; cosine")
    o.add_argument("--warmup-epochs", type=float)
    o.add_argument("--decay-epochs", type=float, nargs="*")
    o.add_argument("--momentum", type=float)
    o.add_argument("--weight-decay", type=float, help="L2 on weights, not on BN parameters or biases (1e-4)")
    o.add_argument("--label-smoothing", type=float)
    r = p.add_argument_group("run")
    r.add_argument("--epochs", type=int, help="at most this many epochs (90)")
    r.add_argument("--eval-every", type=int, help="evaluate on the whole validation set every N epochs (1)")
    r.add_argument("--target-accuracy", type=float, help="stop as soon as top-1 reaches this (0.749)")
    r.add_argument("--seed", type=int, help="seed of the initialisation and the data order (0)")
    r.add_argument("--out", help="run directory (default runs/<date-time>)")
    r.add_argument("--resume", help="a run directory or checkpoint .npz to continue exactly")
    r.add_argument("--max-steps", type=int, help="stop after this many training steps (checkpoint kept)")
    r.add_argument("--dry-run", action="store_true", help="check the configuration, build everything, do not train")
    r.add_argument("--profile", action="store_true", help="print a per-phase time breakdown every epoch")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only)")
    return p


# Flags a resumed run may change; everything else comes from the checkpoint's configuration.
RESUMABLE_OVERRIDES = {"epochs", "target_accuracy", "max_steps", "workers", "profile", "no_progress", "eval_every",
                       "out", "dry_run", "device"}


def resolve_config(args):
    """Defaults + flags -> a plain dict; refuses bad combinations with UsageError."""
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    if args.data and args.synthetic:
        raise UsageError("--data and --synthetic are exclusive: train on one dataset")
    device = args.device or "auto"
    if device == "auto":
        device = nn.device.auto_device(say=_say)   # says why not the GPU when CuPy is there but unusable
    elif device == "cuda" and not _gpu_available():
        raise UsageError(f"--device cuda: {nn.device.cuda_unavailable_reason() or 'CuPy is not installed'} "
                         f"(install the gpu extra that matches your CUDA: README.md)")
    cfg = dict(RECIPE)
    if not args.data:
        cfg.update(DEFAULT_GPU if device == "cuda" else DEFAULT_CPU)
        cfg["synthetic"] = args.synthetic or "default"
    else:
        cfg["synthetic"] = None
    cfg.setdefault("zero_init_residual", False)
    cfg.update(device=device, precision="fp32", conv_engine="ours", loss_scale="dynamic", seed=0, workers=None,
               data=args.data, max_steps=None, profile=False, no_progress=False, dry_run=False, out=None,
               sync_bn=False)
    for k, v in given.items():
        if k in ("resume",):
            continue
        cfg[k] = tuple(v) if isinstance(v, list) else v
    cfg["device"] = device
    _validate(cfg)
    return cfg


def _validate(cfg):
    def need(cond, msg):
        if not cond:
            raise UsageError(msg)

    need(cfg["batch_size"] >= 1, f"--batch-size must be >= 1, got {cfg['batch_size']}")
    need(cfg["epochs"] >= 1, f"--epochs must be >= 1, got {cfg['epochs']}")
    need(cfg["eval_every"] >= 1, f"--eval-every must be >= 1, got {cfg['eval_every']}")
    need(0 < cfg["target_accuracy"] <= 1, f"--target-accuracy must be in (0, 1], got {cfg['target_accuracy']}")
    need(cfg["width"] > 0, f"--width must be > 0, got {cfg['width']}")
    need(cfg["image_size"] >= 16, f"--image-size must be >= 16, got {cfg['image_size']}")
    need(cfg["base_lr"] > 0 and cfg["lr_per"] >= 1, "--lr must be > 0 and --lr-per >= 1")
    need(cfg["warmup_epochs"] >= 0, "--warmup-epochs must be >= 0")
    need(0 < cfg["min_crop_area"] <= 1, "--min-crop-area must be in (0, 1]")
    need(0 <= cfg["label_smoothing"] < 1, "--label-smoothing must be in [0, 1)")
    need(cfg["weight_decay"] >= 0 and 0 <= cfg["momentum"] < 1, "--weight-decay >= 0 and 0 <= --momentum < 1")
    need(cfg["workers"] is None or cfg["workers"] >= 0, "--workers must be >= 0")
    need(cfg["max_steps"] is None or cfg["max_steps"] >= 1, "--max-steps must be >= 1")
    world = _comm().world_size
    need(cfg["batch_size"] % world == 0,
         f"--batch-size {cfg['batch_size']} (the global batch) must be a multiple of the {world} ranks")
    need(cfg["precision"] != "bf16", "--precision bf16 is not supported yet: batch norm, pooling, the elementwise ops "
         "and the input kernel have no bfloat16 versions (and bf16 needs an A100 or newer); use --precision fp16 "
         "(the same tensor-core speed, with dynamic loss scaling) or fp32")
    if cfg["precision"] != "fp32":
        need(cfg["device"] == "cuda", f"--precision {cfg['precision']} needs --device cuda (cpu and emu train in fp32)")
    if cfg["conv_engine"] == "cudnn":
        need(cfg["device"] == "cuda", "--conv-engine cudnn needs --device cuda")
    if cfg["loss_scale"] != "dynamic":
        try:
            ok = float(cfg["loss_scale"]) > 0
        except ValueError:
            ok = False
        need(ok, f"--loss-scale must be 'dynamic' or a positive number, got {cfg['loss_scale']!r}")


def _gpu_available():
    return nn.device.cuda_unavailable_reason() is None


# ----------------------------------------------------------------------------- datasets
def cache_root():
    base = os.environ.get("MLPERF_RESNET_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "mlperf-resnet-cupy"


def prepare_synthetic(name, progress=True):
    """Generate (once) and pack (once) a synthetic dataset; return the folder with the LMDBs."""
    from data import pack, synthetic

    import hashlib

    spec = SYNTHETIC[name]
    key = hashlib.sha256(json.dumps([synthetic.VERSION, spec], sort_keys=True).encode()).hexdigest()[:10]
    root = cache_root() / "synthetic" / f"{name}-{key}"
    lmdb_dir = root / "lmdb"
    if (lmdb_dir / "train.lmdb").is_dir() and (lmdb_dir / "val.lmdb").is_dir():
        return lmdb_dir
    _say(f"preparing the synthetic dataset '{name}' under {root} (once; cached)")
    synthetic.make_dataset(str(root / "images"), seed=0, progress=progress, **spec)
    pack.pack_folder(str(root / "images"), str(lmdb_dir), workers=min(4, os.cpu_count() or 1), progress=progress)
    return lmdb_dir


def dataset_dir(cfg):
    if cfg["synthetic"]:
        return prepare_synthetic(cfg["synthetic"], progress=not cfg["no_progress"])
    d = Path(cfg["data"])
    missing = [s for s in ("train.lmdb", "val.lmdb") if not (d / s).exists()]
    if missing:
        raise UsageError(f"no packed dataset in {d} (missing {', '.join(missing)}); build one once with: "
                         f"python -m data.pack --src /path/to/imagenet --dst {d}")
    return d


# ----------------------------------------------------------------------------- logging & outputs
def _say(msg):
    if not distributed.is_main():
        return
    try:
        from tqdm import tqdm
        tqdm.write(msg)
    except ImportError:
        print(msg)
    sys.stdout.flush()


class MLPerfLog:
    """The :::MLLOG lines through mlperf-logging's mllog, to RUN_DIR/mlperf.log and stdout."""

    def __init__(self, path, echo=True):
        from mlperf_logging import mllog

        self.mllog = mllog
        self.c = mllog.constants
        logger = logging.getLogger(f"mlperf_resnet_cupy.mllog.{path}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for h in list(logger.handlers):
            logger.removeHandler(h)
        self.file_handler = logging.FileHandler(path, mode="w")
        logger.addHandler(self.file_handler)
        if echo:
            logger.addHandler(_TqdmHandler())
        mllog.config(logger=logger, default_stack_offset=1)
        self.log = mllog.get_mllogger()

    def event(self, key, value=None, **metadata):
        self.log.event(key=key, value=value, metadata=metadata or None, stack_offset=2)

    def start(self, key, value=None, **metadata):
        self.log.start(key=key, value=value, metadata=metadata or None, stack_offset=2)

    def end(self, key, value=None, **metadata):
        self.log.end(key=key, value=value, metadata=metadata or None, stack_offset=2)

    def close(self):
        self.file_handler.close()


class _NoLog:
    """The MLPerf log of ranks other than 0: the same calls, nothing written."""

    def __init__(self):
        from mlperf_logging import mllog
        self.c = mllog.constants

    def event(self, *args, **kwargs):
        pass

    start = end = event

    def close(self):
        pass


class _TqdmHandler(logging.Handler):
    """A logging handler writing through tqdm, so that progress bars stay intact."""

    def emit(self, record):
        _say(self.format(record))


def write_plot(path, history):
    """loss, accuracy and learning rate per epoch, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker="o", ms=3)
    axes[0].set_title("training loss")
    ev = [h for h in history if h.get("top1") is not None]
    axes[1].plot([h["epoch"] + 1 for h in ev], [h["top1"] for h in ev], marker="o", ms=3, label="top-1")
    axes[1].plot([h["epoch"] + 1 for h in ev], [h["top5"] for h in ev], marker="o", ms=3, label="top-5")
    if history:
        axes[1].axhline(history[-1]["target"], color="gray", ls="--", lw=1, label="target")
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    axes[1].set_title("validation accuracy")
    axes[2].plot(epochs, [h["lr_end"] for h in history], marker="o", ms=3)
    axes[2].set_title("learning rate (end of epoch)")
    for a in axes:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    fig.tight_layout()
    tmp = str(path) + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def atomic_write_text(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Phases:
    """Wall time per phase (--profile); on the GPU each phase ends with a synchronise."""

    def __init__(self, enabled, xp):
        self.enabled, self.xp = enabled, xp
        self.totals = {}
        self.t = time.perf_counter()

    def mark(self, name):
        if not self.enabled:
            return
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self.t
        self.t = now

    def reset_clock(self):
        self.t = time.perf_counter()

    def report(self):
        total = sum(self.totals.values()) or 1.0
        parts = ", ".join(f"{k} {v:.2f}s ({100 * v / total:.0f}%)" for k, v in self.totals.items())
        self.totals = {}
        return parts


# ----------------------------------------------------------------------------- the run
class Diverged(Exception):
    pass


def make_schedule(cfg, steps_per_epoch, peak_lr):
    total = cfg["epochs"] * steps_per_epoch
    # a warm-up longer than the run (e.g. --epochs 2 with the default 2 warm-up epochs) is cut short
    warm = min(round(cfg["warmup_epochs"] * steps_per_epoch), max(0, total - 1))
    if cfg["schedule"] == "step":
        return nn.schedules.WarmupPiecewise(peak_lr, steps_per_epoch, cfg["warmup_epochs"],
                                            boundaries=tuple(cfg["decay_epochs"]), decay=cfg["decay"])
    if cfg["schedule"] == "poly":
        return nn.schedules.Polynomial(peak_lr, total, warm, power=2.0, end_lr=1e-4)
    return nn.schedules.Cosine(peak_lr, total, warm)


def find_checkpoint(path):
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint_last.npz"
    if not p.is_file():
        raise UsageError(f"--resume: no checkpoint at {p}")
    return p


def run(cfg, resume=None):
    """Train as configured; returns the exit code."""
    given = cfg.pop("_explicit", {})
    if resume is not None:
        ckpt = find_checkpoint(resume)
        with np.load(ckpt, allow_pickle=False) as f:
            saved = json.loads(str(f["extra/config"]))
        refused = sorted(k for k in given if k not in RESUMABLE_OVERRIDES | {"resume"})
        if refused:
            raise UsageError(f"--resume continues the saved configuration; these flags cannot change: "
                             f"{', '.join('--' + k.replace('_', '-') for k in refused)}")
        cfg = dict(saved, **{k: cfg[k] for k in given if k in RESUMABLE_OVERRIDES})
        if "max_steps" not in given:
            cfg["max_steps"] = None  # a step limit applies to the run that was given it
        cfg["out"] = cfg.get("out") or str(ckpt.parent)
    comm = _comm()
    run_dir = Path(cfg["out"] or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(comm.allgather_object(str(run_dir))[0])  # rank 0's name on every rank
    if resume is None and (run_dir / "checkpoint_last.npz").exists():
        raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:
            for stale in ("metrics.jsonl", "plot.png"):
                (run_dir / stale).unlink(missing_ok=True)
    comm.barrier()
    cfg["out"] = str(run_dir)
    comm.assert_same(json.dumps(cfg, sort_keys=True, default=str), "the configuration")
    log_name = "mlperf.log" if resume is None else f"mlperf-resumed-{time.strftime('%Y%m%d-%H%M%S')}.log"
    # The MLPerf lines go to stdout too (as the reference prints them) for dataset runs; the
    # built-in synthetic run keeps its console to progress bars and one line per epoch.
    mlog = MLPerfLog(str(run_dir / log_name), echo=not cfg["synthetic"]) if distributed.is_main() else _NoLog()
    c = mlog.c
    try:
        mlog.event(c.CACHE_CLEAR, True)
        mlog.start(c.INIT_START)
        mlog.event(c.SUBMISSION_BENCHMARK, c.RESNET)
        mlog.event(c.SUBMISSION_ORG, "mlperf-resnet-cupy")
        mlog.event(c.SUBMISSION_DIVISION, c.OPEN)
        mlog.event(c.SUBMISSION_STATUS, c.RESEARCH)
        mlog.event(c.SUBMISSION_PLATFORM, _platform(cfg))
        return _train(cfg, run_dir, mlog, resume)
    finally:
        mlog.close()


def _platform(cfg):
    world = _comm().world_size
    if cfg["device"] == "cuda":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return f"{world}x{name}"
    import platform
    return f"{world}x{cfg['device']}: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def _train(cfg, run_dir, mlog, resume):
    c = mlog.c
    comm = _comm()
    world, rank = comm.world_size, comm.rank
    if cfg["synthetic"] and comm.local_rank == 0:  # one preparer per node (the cache is node-local)
        dataset_dir(cfg)
    comm.barrier()
    data_dir = dataset_dir(cfg)
    device = nn.get_device(cfg["device"])
    xp = device.xp
    if cfg["conv_engine"] == "cudnn":
        nn.device.set_conv_engine("cudnn")
    act_dtype = {"fp32": None, "fp16": np.float16, "bf16": "bfloat16"}[cfg["precision"]]
    in_dtype = np.float32 if act_dtype is None else act_dtype

    local_batch = cfg["batch_size"] // world
    workers = cfg["workers"]
    if workers is None and world > 1:  # share the node's cores between its ranks' loaders
        workers = max(1, ((os.cpu_count() or 2) - 1) // comm.local_size)
    try:
        train_loader = data.loader.Loader(data_dir / "train.lmdb", local_batch, train=True,
                                          image_size=cfg["image_size"], seed=cfg["seed"], workers=workers,
                                          rank=rank, world_size=world,
                                          crop={"area_range": (cfg["min_crop_area"], 1.0)})
    except ValueError as e:
        raise UsageError(f"{data_dir / 'train.lmdb'}: {e}") from None
    eval_batch = max(local_batch, 64)
    val_loader = data.loader.Loader(data_dir / "val.lmdb", eval_batch, train=False, image_size=cfg["image_size"],
                                    seed=cfg["seed"], workers=workers, rank=rank, world_size=world)
    num_classes = len(train_loader.classes)
    if list(val_loader.classes) != list(train_loader.classes):
        raise UsageError(f"{data_dir}: train.lmdb and val.lmdb have different class lists; pack them together")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UsageError(f"batch size {cfg['batch_size']} exceeds the {train_loader.num_samples} training images")

    model = nn.resnet50(num_classes=num_classes, width=cfg["width"], zero_init_residual=cfg["zero_init_residual"],
                        seed=cfg["seed"], activation_dtype=act_dtype).to(device)
    if cfg["sync_bn"] and world > 1:
        distributed.convert_sync_batchnorm(model, comm)
    peak_lr = cfg["base_lr"] * cfg["batch_size"] / cfg["lr_per"]
    Opt = nn.optim.SGD if cfg["optimizer"] == "sgd" else nn.optim.LARS
    opt = Opt(model.named_parameters(), lr=0.0, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    schedule = make_schedule(cfg, steps_per_epoch, peak_lr)
    scaler = None
    if cfg["precision"] == "fp16":  # fp32 master weights; the loss scaled so fp16 gradients do not underflow
        dynamic = cfg["loss_scale"] == "dynamic"
        scaler = nn.amp.LossScaler(init_scale=2.0 ** 15 if dynamic else float(cfg["loss_scale"]), dynamic=dynamic)

    epoch, batch, step, best, history = 0, 0, 0, 0.0, []
    if resume is not None:
        extras = nn.checkpoint.load(str(find_checkpoint(resume)), model, opt)
        epoch, batch, step = int(extras["epoch"]), int(extras["batch"]), int(extras["step"])
        best = float(extras["best_top1"])
        history = json.loads(extras["history"])
        if scaler is not None and extras.get("scaler"):
            scaler.load_state_dict(json.loads(extras["scaler"]))
        _say(f"resuming {run_dir} at epoch {epoch + 1}, batch {batch} (step {step})")
    distributed.broadcast_parameters(model, comm)  # every rank starts from the same weights
    ddp = distributed.DataParallel(model, comm) if world > 1 else None

    if distributed.is_main():
        atomic_write_text(run_dir / "config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str))
    mlog.event(c.SEED, cfg["seed"])
    mlog.event(c.GLOBAL_BATCH_SIZE, cfg["batch_size"])
    mlog.event(c.TRAIN_SAMPLES, train_loader.num_samples)
    mlog.event(c.EVAL_SAMPLES, val_loader.num_samples)
    mlog.event(c.OPT_NAME, c.SGD if cfg["optimizer"] == "sgd" else c.LARS)
    mlog.event(c.OPT_BASE_LR, peak_lr)
    mlog.event(c.OPT_LR_WARMUP_EPOCHS, cfg["warmup_epochs"])
    mlog.event(c.OPT_WEIGHT_DECAY, cfg["weight_decay"])
    mlog.event("opt_momentum", cfg["momentum"])
    mlog.event("opt_learning_rate_decay_boundary_epochs", list(cfg["decay_epochs"]))
    mlog.event("model_bn_span", cfg["batch_size"] if cfg["sync_bn"] else local_batch)

    params = model.num_parameters()
    _say(f"ResNet-50 v1.5 width {cfg['width']:g}: {params:,} parameters, {num_classes} classes, "
         f"{cfg['image_size']}px, device {device.name}, {cfg['precision']}; "
         f"{train_loader.num_samples} training images ({steps_per_epoch} steps of {cfg['batch_size']}), "
         f"{val_loader.num_samples} validation images; peak lr {peak_lr:g} ({cfg['schedule']})")
    if cfg["dry_run"]:
        lrs = [schedule(s) for s in (0, steps_per_epoch, steps_per_epoch * cfg["epochs"] - 1)]
        _say(f"dry run: learning rate {lrs[0]:.4g} at step 0, {lrs[1]:.4g} after epoch 1, {lrs[2]:.4g} at the "
             f"last step; data in {data_dir}; outputs would go to {run_dir}")
        train_loader.close()
        val_loader.close()
        mlog.end(c.INIT_STOP)
        return EXIT_OK

    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        _say("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort at once)")

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    mlog.end(c.INIT_STOP)
    mlog.start(c.RUN_START)
    t_run = time.time()
    phases = Phases(cfg["profile"], xp)
    status, code = c.ABORTED, EXIT_NOT_REACHED

    def save(name, epoch_, batch_):
        if not distributed.is_main():
            return
        nn.checkpoint.save(str(run_dir / name), model, opt, epoch=epoch_, batch=batch_, step=step, best_top1=best,
                           history=json.dumps(history), config=json.dumps(cfg, default=str),
                           scaler=json.dumps(scaler.state_dict()) if scaler else "")

    # on cuda: the next batch goes to the GPU on a second stream while this step runs
    prefetcher = DevicePrefetcher(train_loader, device.name)
    try:
        with train_loader, val_loader:
            while epoch < cfg["epochs"]:
                mlog.start(c.EPOCH_START, epoch_num=epoch + 1)
                if batch == 0:
                    mlog.start(c.BLOCK_START, first_epoch_num=epoch + 1, epoch_count=1)
                train_loader.set_epoch(epoch, batch)
                t_epoch = time.time()
                loss_sum, loss_n, seen = 0.0, 0, 0
                bar = _bar(total=steps_per_epoch, initial=batch, desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                           disable=cfg["no_progress"])
                phases.reset_clock()
                for images, labels in prefetcher:
                    phases.mark("data")
                    lr = schedule(step)
                    opt.lr = lr
                    x = nn.functional.normalize_images(images, device=device, dtype=in_dtype)
                    y = device.asarray(labels)
                    phases.mark("input")
                    logits = model(x, layout="NHWC")
                    loss = nn.functional.cross_entropy(logits, y, label_smoothing=cfg["label_smoothing"])
                    value = float(loss.data)
                    if world > 1:  # one decision for all ranks: the mean loss, and whether anyone stops
                        flags = np.array([value, float(stop["requested"])])
                        comm.allreduce_(flags)
                        value = float(flags[0]) / world
                        stop["requested"] = stop["requested"] or flags[1] > 0
                    phases.mark("forward")
                    opt.zero_grad()
                    if not math.isfinite(value):
                        if scaler is None:
                            raise Diverged(f"the loss is {value} at epoch {epoch + 1}, step {step} (learning rate "
                                           f"{lr:.4g}); lower --lr or raise --warmup-epochs")
                        scaler.update(False)  # fp16 overflow: skip this step with a smaller loss scale
                    else:
                        if scaler is not None:
                            scaler.backward(loss)
                        else:
                            loss.backward()
                        if ddp is not None:
                            ddp.finish()  # gradients averaged over all ranks
                        phases.mark("backward")
                        if scaler is not None:
                            scaler.step(opt)
                        else:
                            opt.step()
                    phases.mark("optimizer")
                    step += 1
                    batch += 1
                    if _CRASH_AT_STEP and step == _CRASH_AT_STEP:
                        os._exit(137)  # test hook: die like `kill -9`, no cleanup
                    if math.isfinite(value):
                        loss_sum += value
                        loss_n += 1
                    seen += len(labels) * world
                    elapsed = max(time.time() - t_epoch, 1e-9)
                    bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}", img_s=f"{seen / elapsed:.0f}")
                    bar.update(1)
                    if stop["requested"] or (cfg["max_steps"] and step >= cfg["max_steps"]):
                        break
                bar.close()
                mid_epoch = batch < steps_per_epoch
                if mid_epoch:
                    save("checkpoint_last.npz", epoch, batch)
                    comm.barrier()
                    if stop["requested"]:
                        _say(f"interrupted: checkpoint saved to {run_dir / 'checkpoint_last.npz'}; "
                             f"continue with: python train.py --resume {run_dir}")
                        code = EXIT_INTERRUPTED
                    else:
                        _say(f"stopped after --max-steps {cfg['max_steps']}; checkpoint saved "
                             f"({run_dir / 'checkpoint_last.npz'})")
                        code = EXIT_OK
                    break
                mlog.end(c.EPOCH_STOP, epoch_num=epoch + 1)
                train_time = time.time() - t_epoch
                record = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(loss_n, 1), "lr_end": opt.lr,
                          "train_seconds": train_time, "images_per_s": seen / max(train_time, 1e-9),
                          "top1": None, "top5": None, "target": cfg["target_accuracy"]}
                if scaler is not None:
                    record["loss_scale"] = scaler.scale
                reached = False
                if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
                    mlog.start(c.EVAL_START, epoch_num=epoch + 1)
                    t_eval = time.time()
                    top1, top5 = evaluate(model, val_loader, device, in_dtype, cfg["no_progress"])
                    phases.mark("evaluation")
                    record.update(top1=top1, top5=top5, eval_seconds=time.time() - t_eval)
                    mlog.end(c.EVAL_STOP, epoch_num=epoch + 1)
                    mlog.event(c.EVAL_ACCURACY, top1, epoch_num=epoch + 1)
                    reached = top1 >= cfg["target_accuracy"]
                mlog.end(c.BLOCK_STOP, first_epoch_num=epoch + 1)
                history.append(record)
                if distributed.is_main():
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                acc = (f"top-1 {record['top1']:.4f} top-5 {record['top5']:.4f}" if record["top1"] is not None
                       else "no evaluation")
                _say(f"epoch {epoch + 1:3d}: loss {record['train_loss']:.4f}  {acc}  lr {opt.lr:.4g}  "
                     f"{record['images_per_s']:.0f} img/s  ({train_time:.1f}s)")
                if cfg["profile"]:
                    _say(f"  time per phase: {phases.report()}")
                epoch, batch = epoch + 1, 0
                if record["top1"] is not None and record["top1"] > best:
                    best = record["top1"]
                    save("checkpoint_best.npz", epoch, 0)
                save("checkpoint_last.npz", epoch, 0)
                if distributed.is_main():
                    write_plot(run_dir / "plot.png", history)
                comm.barrier()  # no rank goes on (or exits) before the checkpoint is in place
                if reached:
                    status, code = c.SUCCESS, EXIT_OK
                    _say(f"target top-1 {cfg['target_accuracy']} reached after {epoch} epochs, "
                         f"{time.time() - t_run:.1f}s of training")
                    break
                if stop["requested"] or (cfg["max_steps"] and step >= cfg["max_steps"]):
                    code = EXIT_INTERRUPTED if stop["requested"] else EXIT_OK
                    why = "interrupted" if stop["requested"] else f"stopped after --max-steps {cfg['max_steps']}"
                    _say(f"{why}: checkpoint saved to {run_dir / 'checkpoint_last.npz'}; "
                         f"continue with: python train.py --resume {run_dir}")
                    break
            else:
                _say(f"target top-1 {cfg['target_accuracy']} not reached in {cfg['epochs']} epochs "
                     f"(best {best:.4f})")
    except Diverged as e:
        _say(f"error: {e}")
        code = EXIT_DIVERGED
    except KeyboardInterrupt:
        _say("aborted at once (second Ctrl-C); the last epoch's checkpoint is intact")
        code = EXIT_INTERRUPTED
    except Exception as e:
        if _is_oom(e):
            _say("error: " + nn.memory.oom_message(e, cfg["batch_size"], world, cfg["image_size"], cfg["width"],
                                                  num_classes, cfg["precision"]))
            code = EXIT_OOM
        else:
            raise
    finally:
        signal.signal(signal.SIGINT, old_handler)
        mlog.end(c.RUN_STOP, status=status)
    _say(f"outputs in {run_dir}: mlperf.log, metrics.jsonl, plot.png, checkpoint_last.npz, checkpoint_best.npz "
         f"(best top-1 {best:.4f})")
    return code


def _bar(**kw):
    from tqdm import tqdm
    # bars only on a terminal (a log file would fill with redraws) and only on rank 0
    kw["disable"] = kw.get("disable") or not sys.stderr.isatty() or not distributed.is_main()
    return tqdm(unit="step", dynamic_ncols=True, leave=False, **kw)


def _is_oom(e):
    return type(e).__name__ in ("OutOfMemoryError", "CUDARuntimeError") and "memory" in str(e).lower()


def evaluate(model, loader, device, in_dtype, no_progress=False):
    """Top-1 and top-5 accuracy over the whole split (every image exactly once)."""
    model.eval()
    correct1 = correct5 = total = 0
    try:
        with nn.no_grad():
            for images, labels in _bar(total=len(loader), desc="eval", disable=no_progress, iterable=loader):
                x = nn.functional.normalize_images(images, device=device, dtype=in_dtype)
                logits = model(x, layout="NHWC")
                k5 = min(5, logits.shape[1])
                c1, c5 = nn.metrics.topk_correct(logits, device.asarray(labels), ks=(1, k5))
                correct1, correct5, total = correct1 + c1, correct5 + c5, total + len(labels)
    finally:
        model.train()
    # each rank evaluated its own shard: add the counts up exactly
    correct1, correct5, total = distributed.allreduce_counts([correct1, correct5, total], _comm())
    return correct1 / total, correct5 / total


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    # Several ranks (mpirun -np N python train.py ...): the communicator first, before anything
    # touches the GPU, since each rank picks its GPU from its rank on the node.
    comm = distributed.init(device=args.device if args.device not in (None, "auto")
                            else ("cuda" if _gpu_available() else "cpu"))
    try:
        cfg = resolve_config(args)
        cfg["_explicit"] = {k: True for k, v in vars(args).items() if v is not None and v is not False}
        code = run(cfg, resume=args.resume)
    except UsageError as e:
        if distributed.is_main():
            print(f"train.py: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except data.records.DatabaseError as e:
        if distributed.is_main():
            print(f"train.py: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    finally:
        comm.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
