"""MLPerf image classification: ResNet-50 v1.5 trained until top-1 reaches the target.

    python train.py                         # built-in default: synthetic data, best device
    python train.py --data /imn             # the MLPerf v0.5 recipe on packed ImageNet
    python train.py --data /imn --precision fp16 --conv-engine cudnn --batch-size 256
    python train.py --resume runs/20261128-1300     # continue exactly where a run stopped
    python train.py --device emu --synthetic tiny --kernels conv=1,batchnorm=my_bn.cu
                                            # our CUDA kernels, with chosen versions (kernels/README.md)

--data DIR is a folder holding train.lmdb and val.lmdb, made once by
    python -m data.pack --src /path/to/imagenet --dst DIR

Every run writes into its run directory (--out, default runs/<date-time>):
    mlperf.log        the MLPerf log (:::MLLOG lines), checked by mlperf-logging's checker
    metrics.jsonl     one JSON line per epoch (loss, accuracy, learning rate, times)
    plot.png          loss, accuracy and learning rate, redrawn after every epoch
    checkpoint_last.npz, checkpoint_best.npz    written atomically; --resume reads them
    config.json       the resolved configuration
A run folder belongs to one run: a second train.py on it is refused while the first runs, and a
new run refuses a folder holding another run's files unless given --overwrite.

Exit codes: 0 target reached (or the run finished as asked: --max-steps, --dry-run);
1 all epochs done without reaching the target; 2 bad usage, a missing or damaged dataset or
checkpoint, an output that cannot be written (read-only, full disk), a kernel that failed, or
CuPy unable to compile our kernels (NVRTC or a CUDA header missing: the one line names the fix);
3 diverged (NaN/inf in the loss, the logits or the weights: no checkpoint is ever overwritten
with them; fp16: 50 steps in a row skipped by the loss scaler); 4 out of device memory;
130 interrupted by Ctrl-C, 143 stopped by SIGTERM (both: step finished, checkpoint saved).
A run folder is data: --resume compiles nothing it names (a kernel file of yours is used again
only when --kernels names it with the recorded SHA-256) and checks every checkpoint array
against the model before reading it.
"""

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import data.loader
import data.pack
import data.records
from data.device_prefetch import DevicePrefetcher
import nn
from nn import data_parallel, distributed

# ----------------------------------------------------------------------------- defaults
# The MLPerf v0.5 reference recipe (README.md, "Training on ImageNet"), used with --data.
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

EXIT_OK, EXIT_NOT_REACHED, EXIT_USAGE, EXIT_DIVERGED, EXIT_OOM, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 4, 130, 143


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
                   help="auto (default): cuda if CuPy sees a GPU, else cpu (NumPy). emu: the same training "
                        "through our CUDA C kernels, run by the CPU emulator (about 560 kernel launches a step, "
                        "~5 s a step of the default CPU model: to see and check the GPU code train)")
    m.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="activations: fp32, or fp16 on cuda and emu (bf16 is refused: several ops have no bf16 kernels)")
    m.add_argument("--conv-engine", choices=["ours", "cudnn"], help="convolutions: our kernels or cuDNN (cuda)")
    m.add_argument("--kernels", metavar="FAMILY=VERSION,...",
                   help="which version of our kernels to train with (emu, cuda): e.g. conv=1,batchnorm=2; "
                        "FAMILY=FILE.cu[:VERSION] runs your own copy of kernels/FAMILY.cu. `python -m "
                        "kernels.FAMILY --list` shows the versions; the others stay at their defaults")
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
    r.add_argument("--overwrite", action="store_true",
                   help="let a new run replace the files of an earlier run in --out (refused without it)")
    r.add_argument("--resume", help="a run directory (or checkpoint .npz) to continue exactly, wherever it was "
                                    "moved; --lr, --data (the same dataset at a new place) and the run flags may "
                                    "be given, other flags must match the saved run; a kernel file of yours the "
                                    "run used must be named again (--kernels FAMILY=FILE.cu:V, unchanged)")
    r.add_argument("--max-steps", type=int, help="stop after this many training steps (checkpoint kept)")
    r.add_argument("--dry-run", action="store_true", help="check the configuration, build everything, do not train")
    r.add_argument("--profile", action="store_true", help="print a per-phase time breakdown every epoch "
                                                          "(synchronises the device between phases)")
    r.add_argument("--log-every", type=int, help="read the training loss back from the device every N steps "
                                                 "(20): the steps between never wait for the host")
    m.add_argument("--cuda-graph", action="store_true", default=None,
                   help="capture the training step as a CUDA graph after 3 eager steps and replay it (cuda, "
                        "one rank)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only)")
    return p


# Flags a resumed run may change; everything else comes from the checkpoint's configuration
# (and may be repeated with its saved value). --lr is here so that a diverged run can continue
# from its last finite checkpoint with a lower learning rate, as exit 3 advises.
RESUMABLE_OVERRIDES = {"epochs", "target_accuracy", "max_steps", "workers", "profile", "no_progress", "eval_every",
                       "out", "dry_run", "device", "base_lr", "overwrite", "log_every", "cuda_graph"}


# Text flags whose empty value would otherwise quietly mean something else, and what to give instead.
EMPTY_FLAG_ADVICE = {
    "data": "give the folder holding train.lmdb and val.lmdb, or leave --data out to train on the built-in "
            "synthetic set",
    "out": "give a folder, or leave --out out for runs/<date-time>",
    "resume": "give the run folder (or checkpoint) to continue",
    "kernels": "give FAMILY=VERSION,... or leave --kernels out",
    "loss_scale": "give 'dynamic' or a number",
}
MAX_IMAGE_SIZE = 1024   # ResNet-50 trains at 224 px; 1024 px is already 21x the pixels of a 224 px crop
MAX_WIDTH = 8           # 8x ResNet-50's channels: 64x its 25.6 M parameters


def resolve_config(args):
    """Defaults + flags -> a plain dict; refuses bad combinations with UsageError."""
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    for flag, advice in EMPTY_FLAG_ADVICE.items():   # "--data $DATA" with DATA unset must not mean the default
        value = getattr(args, flag)
        if value is not None and not value.strip():
            raise UsageError(f"--{flag.replace('_', '-')} is empty (an unset variable in a script?): {advice}")
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
        # the simulated GPU (KERNELS_CUDASIM=1) runs every kernel on the emulator: the CPU's shapes
        cfg.update(DEFAULT_GPU if device == "cuda" and not nn.device.cuda_is_simulated() else DEFAULT_CPU)
        cfg["synthetic"] = args.synthetic or "default"
    else:
        cfg["synthetic"] = None
    cfg.setdefault("zero_init_residual", False)
    cfg.update(device=device, precision="fp32", conv_engine="ours", loss_scale="dynamic", seed=0, workers=None,
               data=args.data, max_steps=None, profile=False, no_progress=False, dry_run=False, out=None,
               sync_bn=False, overwrite=False, log_every=20, cuda_graph=False, kernels=None)
    for k, v in given.items():
        if k in ("resume",):
            continue
        cfg[k] = tuple(v) if isinstance(v, list) else v
    cfg["device"] = device
    _resolve_kernels(cfg, args)
    _validate(cfg)
    return cfg


def _resolve_kernels(cfg, args):
    """cfg["kernels"]: the versions of our kernels the run uses, as config.json records them (with
    the path and sha256 of a learner's copy); None on the cpu device, which runs NumPy."""
    if args.kernels and cfg["device"] == "cpu" and not args.resume:
        raise UsageError("--kernels chooses versions of our CUDA kernels: train with --device emu (the CPU "
                         "emulator) or --device cuda; the cpu device runs NumPy")
    if not args.kernels and cfg["device"] == "cpu":
        cfg["kernels"] = None
        return
    try:
        cfg["kernels"] = nn.device.kernel_table(args.kernels or {})
    except ValueError as e:
        raise UsageError(f"--kernels: {e}") from None
    if args.kernels and cfg["precision"] in ("fp32", "fp16") and not args.resume:   # a resume: the saved precision
        try:   # conv=4 (a float16 version) in an fp32 run, or conv=1 in an fp16 one, would change nothing
            nn.device.check_kernel_precision(args.kernels, "float16" if cfg["precision"] == "fp16" else "float32")
        except ValueError as e:
            raise UsageError(f"--kernels: {e} (--precision {cfg['precision']})") from None
    named = {part.split("=", 1)[0].strip() for part in (args.kernels or "").split(",")}
    if "conv" in named and cfg["conv_engine"] == "cudnn":
        raise UsageError("--kernels conv=... and --conv-engine cudnn both choose what runs the convolutions: "
                         "give one of them")


def _validate(cfg):
    def need(cond, msg):
        if not cond:
            raise UsageError(msg)

    finite = math.isfinite
    need(cfg["batch_size"] >= 1, f"--batch-size must be >= 1, got {cfg['batch_size']}")
    need(cfg["epochs"] >= 1, f"--epochs must be >= 1, got {cfg['epochs']}")
    need(cfg["eval_every"] >= 1, f"--eval-every must be >= 1, got {cfg['eval_every']}")
    need(0 < cfg["target_accuracy"] <= 1, f"--target-accuracy must be in (0, 1], got {cfg['target_accuracy']}")
    need(0 < cfg["width"] <= MAX_WIDTH, f"--width must be in (0, {MAX_WIDTH}], got {cfg['width']}")
    need(0 <= cfg["seed"] < 2 ** 63, f"--seed must be a number in 0..2**63-1, got {cfg['seed']}")
    need(16 <= cfg["image_size"] <= MAX_IMAGE_SIZE,
         f"--image-size must be in 16..{MAX_IMAGE_SIZE}, got {cfg['image_size']} (one batch of {cfg['batch_size']} "
         f"such images is {_bytes_text(cfg['batch_size'] * 3 * cfg['image_size'] ** 2)} of shared memory)")
    need(finite(cfg["base_lr"]) and cfg["base_lr"] > 0 and cfg["lr_per"] >= 1,
         f"--lr must be a finite number > 0 and --lr-per >= 1, got --lr {cfg['base_lr']}")
    need(finite(cfg["warmup_epochs"]) and cfg["warmup_epochs"] >= 0,
         f"--warmup-epochs must be a finite number >= 0, got {cfg['warmup_epochs']}")
    need(all(finite(e) and e >= 0 for e in cfg["decay_epochs"]), "--decay-epochs must be finite numbers >= 0")
    need(0 < cfg["min_crop_area"] <= 1, "--min-crop-area must be in (0, 1]")
    need(0 <= cfg["label_smoothing"] < 1, "--label-smoothing must be in [0, 1)")
    need(finite(cfg["weight_decay"]) and cfg["weight_decay"] >= 0 and 0 <= cfg["momentum"] < 1,
         "--weight-decay must be a finite number >= 0 and --momentum in [0, 1)")
    need(cfg["workers"] is None or cfg["workers"] >= 0, "--workers must be >= 0")
    need(cfg["max_steps"] is None or cfg["max_steps"] >= 1, "--max-steps must be >= 1")
    need(cfg["log_every"] >= 1, "--log-every must be >= 1")
    world = _comm().world_size
    need(cfg["batch_size"] % world == 0,
         f"--batch-size {cfg['batch_size']} (the global batch) must be a multiple of the {world} ranks")
    need(cfg["precision"] != "bf16", "--precision bf16 is not supported yet: batch norm, pooling, the elementwise ops "
         "and the input kernel have no bfloat16 versions (and bf16 needs an A100 or newer); use --precision fp16 "
         "(the same tensor-core speed, with dynamic loss scaling) or fp32")
    if cfg["precision"] != "fp32":
        need(cfg["device"] in ("cuda", "emu"), f"--precision {cfg['precision']} needs --device cuda or emu (our float16 "
             f"kernels; the cpu device trains in fp32)")
    if cfg["conv_engine"] == "cudnn":
        need(cfg["device"] == "cuda", "--conv-engine cudnn needs --device cuda")
    if cfg["cuda_graph"]:
        need(cfg["device"] == "cuda", "--cuda-graph needs --device cuda")
        need(world == 1, "--cuda-graph runs one rank (the data-parallel all-reduce is not captured)")
        need(not cfg["profile"], "--cuda-graph and --profile are exclusive (profiling synchronises inside the step)")
    _check_batch_norm_span(cfg, world)
    if cfg["loss_scale"] != "dynamic":
        try:
            ok = float(cfg["loss_scale"]) > 0
        except ValueError:
            ok = False
        need(ok, f"--loss-scale must be 'dynamic' or a positive number, got {cfg['loss_scale']!r}")


def _bytes_text(n):
    """'1.8 TiB': a byte count for messages."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _check_shared_memory(loaders):
    """The loaders' workers write batches into slots in shared memory (/dev/shm), which every rank
    of the node fills at once: refuse up front, before a worker starts, what it cannot hold."""
    import tempfile

    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    need = sum(data.loader._slot_bytes(loader.num_slots, loader.batch_size, loader.image_size) for loader in loaders)
    need *= _comm().local_size
    try:
        st = os.statvfs(directory)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise UsageError(f"{directory} has {_bytes_text(free)} free, the data loaders' batch slots need "
                         f"{_bytes_text(need)}: lower --batch-size, --image-size or --workers, or give it more room "
                         f"(docker run --shm-size)")


def _check_batch_norm_span(cfg, world):
    """Refuse a batch whose smallest feature map leaves batch norm one value per channel (a batch of
    1 at 32 px: the last stage is 1x1): its variance would be 0 and training undefined."""
    per_rank = cfg["batch_size"] if cfg["sync_bn"] else cfg["batch_size"] // world
    smallest = min(shape[0] * shape[1] for kind, _, shape, _ in
                   nn.memory.resnet_layer_shapes(cfg["image_size"], cfg["width"]) if kind == "conv")
    if per_rank * smallest > 1:
        return
    size = cfg["image_size"]
    while min(shape[0] * shape[1] for kind, _, shape, _ in nn.memory.resnet_layer_shapes(size) if kind == "conv") < 2:
        size += 1
    raise UsageError(f"--batch-size {cfg['batch_size']} at --image-size {cfg['image_size']}: batch norm in the "
                     f"last stage would see one value per channel ({per_rank} image of 1x1 per rank), which has no "
                     f"variance; use at least 2 images per rank or --image-size {size} or more")


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
    """Generate (once) and pack (once) a synthetic dataset; return the folder with the LMDBs.
    Runs that start together (or the ranks of one run) take turns on a lock file beside the
    dataset's folder: one builds it, the others say that they wait and then use it."""
    import fcntl

    from data import pack, synthetic

    spec = SYNTHETIC[name]
    key = hashlib.sha256(json.dumps([synthetic.VERSION, spec], sort_keys=True).encode()).hexdigest()[:10]
    root = cache_root() / "synthetic" / f"{name}-{key}"
    lmdb_dir = root / "lmdb"

    def ready():
        return (lmdb_dir / "train.lmdb").is_dir() and (lmdb_dir / "val.lmdb").is_dir()

    if ready():
        return lmdb_dir
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        lock = open(root.parent / f"{root.name}.lock", "a")
        with lock:  # closing the file releases the lock, also when this process is killed
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _say(f"waiting for another run that is preparing the synthetic dataset '{name}' under {root}")
                fcntl.flock(lock, fcntl.LOCK_EX)  # a signal ends the wait (KeyboardInterrupt, SIGTERM)
            if ready():
                return lmdb_dir
            _say(f"preparing the synthetic dataset '{name}' under {root} (once; cached)")
            synthetic.make_dataset(str(root / "images"), seed=0, progress=progress, **spec)
            pack.pack_folder(str(root / "images"), str(lmdb_dir), workers=min(4, os.cpu_count() or 1),
                             progress=progress)
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:
            raise
        raise output_error(e.filename or root, e, "write the dataset cache",
                           "set MLPERF_RESNET_CACHE to a writable folder with ~100 MB free") from None
    except pack.PackError as e:   # the packer's own one-line message (a full or read-only destination)
        raise OutputError(f"{e}; the dataset cache is {cache_root()} (set MLPERF_RESNET_CACHE to another "
                          f"folder)") from None
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


def dataset_identity(data_dir):
    """What makes a packed dataset itself, wherever it lies: per split the record count and the
    packer's plan (a hash of the source file list), and a hash of the class list. A resumed run
    accepts its dataset at a new path when this matches."""
    ident = {}
    for split in ("train", "val"):
        meta = data.records.read_meta(str(Path(data_dir) / f"{split}.lmdb"))
        ident[split] = {"count": meta["count"], "plan": meta.get("plan")}
        ident["classes"] = hashlib.sha256(json.dumps(meta["classes"]).encode()).hexdigest()[:16]
    return ident


# ----------------------------------------------------------------------------- outputs
# Errors of a destination that cannot take our files: exit 2 with one line, never a traceback.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                 errno.EEXIST, errno.EISDIR, errno.EIO}


class OutputError(UsageError):
    """A destination that cannot be written (read-only, not a folder, full): exit 2."""


def output_error(path, e, what="write", advice=""):
    """OutputError(one line) for an OSError `e` met while writing `path`."""
    reason = e.strerror or str(e)
    if e.errno == errno.EEXIST or (e.errno == errno.ENOTDIR):
        reason += " (a file is in the way of a folder)"
    msg = f"cannot {what} {path}: {reason}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        msg += f" ({data.pack.free_space(path)} there)"
    return OutputError(f"{msg}; {advice}" if advice else msg)


class RunFolder:
    """The run directory, owned by one run at a time.

    claim() creates it and takes an exclusive lock on RUN_DIR/.lock (fcntl.flock: the kernel
    releases it when the process ends, however it ends, so a lock is never stale). A second
    train.py on the same folder is refused. A new run refuses a folder that holds files a run
    writes (another run's, or anything it would overwrite) unless `overwrite` is given.
    Files are written atomically (temporary name, fsync, rename) or appended by line."""

    RUN_FILES = ("config.json", "mlperf.log", "metrics.jsonl", "plot.png", "checkpoint_last.npz",
                 "checkpoint_best.npz")
    LOCK = ".lock"

    def __init__(self, path):
        self.path = Path(path)
        self._lock_fd = None
        self.created = False     # claim() made the folder (release(discard_empty=True) may remove it)

    def claim(self, new_run, overwrite=False):
        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(self.path, e, "create the run folder", "choose another --out") from None
        self._lock()
        self.remove_temporaries()
        if new_run:
            found = self.run_files()
            if found and not overwrite:
                self.release()
                if "checkpoint_last.npz" in found:
                    raise UsageError(f"{self.path} already holds a run; continue it with --resume {self.path}, "
                                     f"choose another --out, or pass --overwrite to replace it")
                raise UsageError(f"{self.path} holds files a run would overwrite ({', '.join(found)}); choose "
                                 f"another --out or pass --overwrite")
            for name in found:
                try:
                    (self.path / name).unlink()
                except OSError as e:
                    raise output_error(self.path / name, e, "remove") from None

    def _lock(self):
        import fcntl

        lock = self.path / self.LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise output_error(lock, e, "create the lock file", "choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(f"{self.path} is in use by another train.py ({holder}); wait for it to end or "
                             f"choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._lock_fd = fd

    def release(self, discard_empty=False):
        """Drop the lock. discard_empty: also remove the folder if claim() created it and nothing
        but the lock is in it (a run that failed before writing anything)."""
        if self._lock_fd is None:
            return
        if discard_empty and self.created:
            try:
                if [p.name for p in self.path.iterdir()] == [self.LOCK]:
                    (self.path / self.LOCK).unlink()
                    self.path.rmdir()
            except OSError:
                pass
        os.close(self._lock_fd)  # closing the descriptor drops the flock
        self._lock_fd = None

    def remove_temporaries(self):
        """Delete what a killed run left half-written: a checkpoint's temporary file (0 bytes after a
        SIGKILL during the write) and the temporaries of the files written atomically. Only our own
        names, and only while this process holds the lock."""
        try:
            nn.checkpoint.remove_stale_temporaries(self.path)
            for name in self.RUN_FILES:
                for tmp in (self.path / f"{name}.tmp", self.path / f"{name}.tmp{Path(name).suffix}"):
                    if tmp.is_file() and not tmp.is_symlink():
                        tmp.unlink()
        except OSError as e:
            raise output_error(self.path, e, "clean up the run folder", "choose another --out") from None

    def run_files(self):
        """The files of a run present in the folder."""
        found = [n for n in self.RUN_FILES if (self.path / n).exists()]
        return found + sorted(p.name for p in self.path.glob("mlperf-resumed-*.log"))

    def write_text(self, name, text):
        path = self.path / name
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise output_error(path, e) from None

    def append_line(self, name, line):
        path = self.path / name
        try:
            with open(path, "a") as f:
                f.write(line + "\n")
                f.flush()
        except OSError as e:
            raise output_error(path, e) from None


def _say(msg):
    if not distributed.is_main():
        return
    try:
        from tqdm import tqdm
        tqdm.write(msg)
    except ImportError:
        print(msg)
    sys.stdout.flush()


class _StrictFileHandler(logging.FileHandler):
    """A log file whose write errors (a full disk) reach the run instead of being printed and
    lost, as logging's default handler does."""

    def handleError(self, record):
        raise


class MLPerfLog:
    """The :::MLLOG lines through mlperf-logging's mllog, to RUN_DIR/mlperf.log and stdout."""

    _instances = 0

    def __init__(self, path, echo=True):
        from mlperf_logging import mllog

        self.mllog = mllog
        self.c = mllog.constants
        MLPerfLog._instances += 1  # a logger of its own per log (mllog refuses to be configured twice with one)
        logger = logging.getLogger(f"mlperf_resnet_cupy.mllog.{MLPerfLog._instances}.{path}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for h in list(logger.handlers):
            logger.removeHandler(h)
        try:
            self.file_handler = _StrictFileHandler(path, mode="w")
        except OSError as e:
            raise output_error(path, e) from None
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
        try:
            self.file_handler.close()
        except OSError:
            pass


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
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise output_error(path, e) from None
    finally:
        plt.close(fig)


def atomic_write_text(path, text):
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


# ----------------------------------------------------------------------------- checkpoints
# The extra/ entries of a checkpoint and their dtype kinds ('i' int, 'f' float, 'U' string); the
# last two (the running loss of an unfinished epoch) are absent from older checkpoints.
CHECKPOINT_EXTRAS = {"epoch": "i", "batch": "i", "step": "i", "best_top1": "f", "history": "U", "config": "U",
                     "scaler": "U", "epoch_loss_sum": "f", "epoch_loss_steps": "i"}
REQUIRED_EXTRAS = ("epoch", "batch", "step", "best_top1", "history", "config")


def checkpoint_layout(width, num_classes, optimizer):
    """What a checkpoint of this run's model and optimizer holds, {key: (dtype, shape, required)}
    as nn.checkpoint.layout gives it for the built objects, worked out from the architecture
    alone (nothing allocated), so that a checkpoint is checked before the model exists."""
    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    buffers, params = {}, []
    for kind, name, _, weight in nn.memory.resnet_layer_shapes(224, width, num_classes):
        if kind == "conv":
            bn = "bn1" if name == "conv1" else (name[:-1] + "1" if name.endswith("downsample.0")
                                                 else name.replace(".conv", ".bn"))
            params += [(f"{name}.weight", weight), (f"{bn}.weight", weight[:1]), (f"{bn}.bias", weight[:1])]
            buffers.update({f"{bn}.running_mean": (f32, weight[:1]), f"{bn}.running_var": (f32, weight[:1]),
                            f"{bn}.num_batches_tracked": (i64, ())})
        elif kind == "fc":
            params += [("fc.weight", weight), ("fc.bias", weight[:1])]
    out = {f"model/{k}": (f32, tuple(shape), True) for k, shape in params}
    out.update({f"model/{k}": (dtype, tuple(shape), True) for k, (dtype, shape) in buffers.items()})
    Opt = nn.optim.SGD if optimizer == "sgd" else nn.optim.LARS
    one = nn.Parameter(np.zeros(1, np.float32))
    for k, v in Opt([("p", one)], lr=0.0).state_dict().items():   # the optimizer's scalars
        if not k.startswith("momentum_buffer."):
            out[f"optim/{k}"] = (np.asarray(v).dtype, (), True)
    out.update({f"optim/momentum_buffer.{k}": (f32, tuple(shape), False) for k, shape in params})
    return out


def _saved_run(arrays, path):
    """The saved configuration and history of a checkpoint's extras, checked: CheckpointError if
    they are not what train.py writes."""
    missing = [k for k in REQUIRED_EXTRAS if f"extra/{k}" not in arrays]
    if missing:
        raise nn.checkpoint.CheckpointError(f"{path} was not written by train.py (no extra/{missing[0]})")
    try:
        saved = json.loads(str(arrays["extra/config"]))
        history = json.loads(str(arrays["extra/history"]))
        scaler = str(arrays.get("extra/scaler", ""))
        scaler = json.loads(scaler) if scaler else {}
    except ValueError:
        saved = history = scaler = None
    number = (int, float)
    if not (isinstance(saved, dict) and isinstance(history, list)
            and all(isinstance(h, dict) and isinstance(h.get("epoch"), int)
                    and all(isinstance(h.get(k), number) for k in ("train_loss", "lr_end", "target"))
                    and all(h.get(k) is None or isinstance(h.get(k), number) for k in ("top1", "top5"))
                    for h in history)
            and isinstance(scaler, dict) and (not scaler or isinstance(scaler.get("scale"), number)
                                              and scaler["scale"] > 0)):
        raise nn.checkpoint.CheckpointError(f"{path}: its saved run (configuration, history, loss scale) is not "
                                            f"what train.py writes")
    if min(int(arrays[f"extra/{k}"]) for k in ("epoch", "batch", "step")) < 0:
        raise nn.checkpoint.CheckpointError(f"{path}: its position (epoch, batch, step) is negative")
    return saved


def _resume_layout(cfg, given, path):
    """For nn.checkpoint.read of the checkpoint at `path`: the layout it must have, from its own
    extras (the saved configuration: width, optimizer) and the dataset the resumed run trains on
    (its classes)."""
    def layout(extras):
        saved = _saved_run(extras, path)
        width, optimizer = saved.get("width"), saved.get("optimizer")
        if not (type(width) in (int, float) and 0 < width <= MAX_WIDTH and optimizer in ("sgd", "lars")):
            raise nn.checkpoint.CheckpointError(f"{path}: its saved configuration (width {width!r}, optimizer "
                                                f"{optimizer!r}) is not one train.py runs")
        return checkpoint_layout(width, _resume_num_classes(cfg, given, saved, path), optimizer)
    return layout


def _resume_num_classes(cfg, given, saved, path):
    """The number of classes of the dataset a resumed run will train on, read without preparing
    it: the --data given, else the run's own (its synthetic set, or its folder)."""
    if "data" in given:
        folder = dataset_dir(dict(cfg, synthetic=None))
    elif saved.get("synthetic"):
        if not isinstance(saved["synthetic"], str) or saved["synthetic"] not in SYNTHETIC:
            raise nn.checkpoint.CheckpointError(f"{path}: its saved configuration names a synthetic dataset "
                                                f"{saved['synthetic']!r} that train.py does not have")
        return SYNTHETIC[saved["synthetic"]]["num_classes"]
    else:
        folder = Path(str(saved.get("data")))
        if not (folder / "train.lmdb").exists():
            raise UsageError(f"the dataset of this run is no longer at {saved.get('data')}; if it moved, give its "
                             f"new place with --data")
    return len(data.records.read_meta(str(folder / "train.lmdb"))["classes"])


def open_resume_checkpoint(resume, layout_for=None):
    """The checkpoint a --resume continues from: (run folder, path, arrays).

    RESUME is a run folder (its checkpoint_last.npz, or checkpoint_best.npz when the last one is
    damaged or holds NaN/inf, saying so) or a checkpoint file. Every array is checked against
    its layout (see nn.checkpoint.read; _resume_layout) before it is read. Raises UsageError with
    what to do when no intact checkpoint is there. layout_for(path): the layout for the file at
    path (None: no layout, any model)."""
    p = Path(resume)
    if p.is_dir():
        folder, candidates = p, [p / "checkpoint_last.npz", p / "checkpoint_best.npz"]
    elif p.is_file():
        folder, candidates = p.parent, [p]
    else:
        raise UsageError(f"--resume: no checkpoint at {p}")
    problems = []
    for path in candidates:
        if not path.exists():
            problems.append(f"{path.name} is missing")
            continue
        try:
            arrays = nn.checkpoint.read(str(path), layout=layout_for and layout_for(path), extras=CHECKPOINT_EXTRAS)
            _saved_run(arrays, path)
        except nn.checkpoint.CheckpointError as e:
            problems.append(str(e))
            continue
        bad = nn.checkpoint.nonfinite_keys(arrays)
        if bad:
            problems.append(f"{path.name} holds NaN/inf ({bad[0]}{' and more' if len(bad) > 1 else ''})")
            continue
        if problems:
            _say(f"warning: {'; '.join(problems)}: resuming from {path.name} instead (epoch "
                 f"{int(arrays['extra/epoch']) + (int(arrays['extra/batch']) > 0)}, step {int(arrays['extra/step'])})")
        return folder, path, arrays
    if len(problems) == 1 and problems[0].endswith("is missing"):
        raise UsageError(f"--resume: no checkpoint at {candidates[0]}")
    raise UsageError(f"--resume: no intact checkpoint in {folder}: {'; '.join(problems)}; start a new run "
                     f"(python train.py with another --out)")


def _same_value(a, b):
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def resume_config(cfg, given, saved):
    """The configuration of a resumed run: the saved one, with the flags a resume may change.
    Flags repeated with their saved value are accepted; others that differ are refused. --data may
    name the run's dataset at a new place (checked by dataset_identity, not by path)."""
    changed = sorted(k for k in given
                     if k not in RESUMABLE_OVERRIDES | {"resume", "data", "synthetic", "kernels"}
                     and not _same_value(cfg[k], saved.get(k)))
    if "synthetic" in given and cfg["synthetic"] != saved.get("synthetic"):
        changed.append("synthetic")
    if changed:
        raise UsageError(f"--resume continues the saved configuration; these flags differ from it and cannot "
                         f"change: {', '.join('--' + k.replace('_', '-') for k in changed)}")
    new = dict(saved, **{k: cfg[k] for k in given if k in RESUMABLE_OVERRIDES})
    new["kernels"] = _resume_kernels(cfg["kernels"] if "kernels" in given else None, saved, new["device"])
    _check_saved_types(new, cfg)
    if "max_steps" not in given:
        new["max_steps"] = None  # a step limit applies to the run that was given it
    if "data" in given:
        new_id = dataset_identity(dataset_dir(dict(cfg, synthetic=None)))
        old_id = saved.get("dataset_identity")
        if old_id is not None and not _same_value(new_id, old_id):
            raise UsageError(f"--data {cfg['data']} is not the dataset this run trained on (different records or "
                             f"classes); resume with the run's own dataset")
        new.update(data=cfg["data"], synthetic=None)
    elif saved.get("data") and not saved.get("synthetic"):
        if not all((Path(saved["data"]) / s).exists() for s in ("train.lmdb", "val.lmdb")):
            raise UsageError(f"the dataset of this run is no longer at {saved['data']}; if it moved, give its new "
                             f"place with --data")
    return new


def _resume_kernels(named, saved, device):
    """The kernel table of a resumed run. A run folder is data: the kernel files its configuration
    names are never compiled on its word. A learner's copy is used again only when the command line
    names it (--kernels FAMILY=FILE.cu:V, `named` is that table) and its sha256 equals the recorded
    one; the versions must be those the run used. (On the cpu device no kernel runs: the recorded
    table is kept as it is.)"""
    recorded = saved.get("kernels")
    if recorded is None and named is None:
        return None
    if recorded is None or not isinstance(recorded, dict) or not all(
            isinstance(e, dict) and set(e) <= {"version", "f16_version", "file", "sha256"} for e in recorded.values()):
        if recorded is None:
            raise UsageError("--resume continues the saved configuration; these flags differ from it and cannot "
                             "change: --kernels")
        raise UsageError("--resume: the run's saved kernel choice is not what train.py records; start a new run")
    if device == "cpu" and named is None:
        return recorded
    named = named or {}
    for family, entry in recorded.items():
        if "file" not in entry:
            continue
        sha = entry.get("sha256")
        version = entry.get("f16_version" if saved.get("precision") == "fp16" and "f16_version" in entry else "version")
        spec = f"--kernels {family}=FILE.cu:{version}"
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise UsageError(f"--resume: the run's configuration names a kernel file for {family} "
                             f"({entry['file']}) without its sha256; a run folder's files are never compiled on "
                             f"its word: start a new run with {spec}")
        mine = named.get(family, {})
        if "file" not in mine:
            raise UsageError(f"--resume: this run trained with its own copy of the {family} kernels ({entry['file']}, "
                             f"sha256 {sha[:12]}...), which is compiled again only when you name it: pass {spec} "
                             f"with that file")
        if mine["sha256"] != sha:
            raise UsageError(f"--kernels {family}={mine['file']} is not the file this run trained with (sha256 "
                             f"{mine['sha256'][:12]}..., recorded {sha[:12]}...): it changed since it was recorded, "
                             f"or is another file; pass the same file, or start a new run")
    strip = {"file", "sha256"}
    same = (set(named) == set(recorded) and
            all({k: v for k, v in named[f].items() if k not in strip} == {k: v for k, v in e.items() if k not in strip}
                and ("file" in named[f]) == ("file" in e) for f, e in recorded.items()))
    if named and not same:
        raise UsageError("--resume continues the saved configuration; these flags differ from it and cannot change: "
                         "--kernels")
    # the files as the command line names them (the same contents, perhaps at a new place)
    return {family: named.get(family, entry) if "file" in entry else entry for family, entry in recorded.items()}


def _check_saved_types(cfg, defaults):
    """Check a resumed configuration as flags are checked: each value of the type its flag parses
    to and among its choices, then _validate (a run folder may come from anywhere). Keys an older
    train.py did not save take their defaults."""
    rules = {"decay": ((int, float), None), "zero_init_residual": ((bool,), None)}   # not flags
    for action in build_parser()._actions:
        kinds = ((bool,) if action.nargs == 0 else (int,) if action.type is int
                 else (int, float) if action.type is float else (str,))
        rules.setdefault(action.dest, (kinds, action.choices))
    for key, default in defaults.items():
        cfg.setdefault(key, default)
        value = cfg[key]
        if value is None or key not in rules or key == "kernels":   # kernels: _resume_kernels
            continue
        kinds, choices = rules[key]
        items = list(value) if key == "decay_epochs" and isinstance(value, (list, tuple)) else [value]
        ok = all(isinstance(v, kinds) and (bool in kinds or not isinstance(v, bool)) for v in items)
        if not ok or (choices is not None and value not in choices) or (key == "decay_epochs" and items == [value]):
            raise UsageError(f"--resume: the run's saved configuration holds {key} = {value!r}, which no "
                             f"--{key.replace('_', '-')} gives: start a new run")
    try:
        _validate(cfg)
    except UsageError as e:
        raise UsageError(f"--resume: {e}") from None


# ----------------------------------------------------------------------------- the run
class Diverged(Exception):
    """NaN/inf in the loss, the logits or the weights, or no step trains: exit 3; no checkpoint is
    written with them. `advice`: what to change, when a lower learning rate is not it."""

    def __init__(self, message, advice=None):
        super().__init__(message)
        self.advice = advice


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (what schedulers and `docker stop` send) while training: the
    first one lets the step finish (or ends a wait for a batch, or an evaluation, at once), a
    checkpoint is written and the run exits 130 / 143; a second one aborts at once (the last
    checkpoint stays intact)."""

    CODES = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}

    class WaitInterrupted(Exception):
        """The first signal came while the run waited for a training batch (stop before the step)
        or evaluated (stop before the evaluation)."""

    def __init__(self):
        self.signum = None
        self._waiting = False

    @contextlib.contextmanager
    def waiting(self):
        """Around a wait for the next training batch, and around an evaluation: the first signal
        ends it at once (it raises WaitInterrupted), so that a loader worker that never answers
        (stopped, or on a hung file system) cannot make a Ctrl-C wait for a batch that may never
        come, and a Ctrl-C does not wait for the whole validation set."""
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in self.CODES}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self._waiting:
            _say(f"{signal.Signals(signum).name}: saving a checkpoint (send it again to abort at once)")
            raise self.WaitInterrupted
        _say(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
             f"(send it again to abort at once)")

    @property
    def requested(self):
        return self.signum is not None

    def request(self, signum=signal.SIGINT):  # another rank was interrupted
        self.signum = self.signum or signum

    @property
    def code(self):
        return self.CODES.get(self.signum, EXIT_INTERRUPTED)


@dataclass
class Position:
    """Where a run is: what a checkpoint keeps besides the weights."""
    epoch: int = 0          # epochs completed
    batch: int = 0          # batches done in the current epoch
    step: int = 0           # optimizer steps in all
    best: float = 0.0       # best top-1 so far
    history: list = field(default_factory=list)   # one record per completed epoch (metrics.jsonl)
    loss_sum: float = 0.0   # the current epoch's training loss so far: sum over its finite steps,
    loss_steps: int = 0     # and their number (kept in checkpoints: a resumed epoch reports all of it)


class Trainer:
    """One training run: what it builds (device, loaders, model, optimizer, schedule, loss
    scaler), one training step, the epoch loop and the end-of-epoch work."""

    def __init__(self, cfg, folder, mlog, resume_arrays=None):
        self.train_loader = self.val_loader = None
        try:
            self._build(cfg, folder, mlog, resume_arrays)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg, folder, mlog, resume_arrays):
        self.cfg, self.folder, self.mlog, self.c = cfg, folder, mlog, mlog.c
        self.comm = comm = _comm()
        self.world, self.rank = comm.world_size, comm.rank
        data_dir = dataset_dir(cfg)
        self.device = nn.get_device(cfg["device"])
        if cfg["conv_engine"] == "cudnn":
            try:
                nn.device.set_conv_engine("cudnn")
            except RuntimeError as e:   # no cuDNN here (not installed, or the GPU is simulated): one line
                raise UsageError(f"--conv-engine cudnn: {e}") from None
        self.kernels_before = None
        if self.device.name != "cpu":   # the kernel versions of the run (a resumed run: the saved ones)
            try:
                self.kernels_before = nn.device.select_kernels(cfg["kernels"], self.device.name)
            except ValueError as e:
                raise UsageError(f"--kernels: {e}") from None
            cfg["kernels"] = nn.device.kernel_table()

        local_batch = cfg["batch_size"] // self.world
        workers = cfg["workers"]
        if workers is None and self.world > 1:  # share the node's cores between its ranks' loaders
            workers = max(1, ((os.cpu_count() or 2) - 1) // comm.local_size)
        try:
            self.train_loader = data.loader.Loader(data_dir / "train.lmdb", local_batch, train=True,
                                                   image_size=cfg["image_size"], seed=cfg["seed"], workers=workers,
                                                   rank=self.rank, world_size=self.world,
                                                   crop={"area_range": (cfg["min_crop_area"], 1.0)})
        except ValueError as e:
            raise UsageError(f"{data_dir / 'train.lmdb'}: {e}") from None
        self.val_loader = data.loader.Loader(data_dir / "val.lmdb", max(local_batch, 64), train=False,
                                             image_size=cfg["image_size"], seed=cfg["seed"], workers=workers,
                                             rank=self.rank, world_size=self.world)
        _check_shared_memory((self.train_loader, self.val_loader))
        self.num_classes = len(self.train_loader.classes)
        if list(self.val_loader.classes) != list(self.train_loader.classes):
            raise UsageError(f"{data_dir}: train.lmdb and val.lmdb have different class lists; pack them together")
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise UsageError(f"batch size {cfg['batch_size']} exceeds the {self.train_loader.num_samples} "
                             f"training images")

        self._build_step(self.num_classes)
        self.peak_lr = cfg["base_lr"] * cfg["batch_size"] / cfg["lr_per"]
        self.schedule = make_schedule(cfg, self.steps_per_epoch, self.peak_lr)
        self.pos = Position()
        self.last_checkpoint = None   # (epoch, batch, step) of the finite checkpoint_last in the folder
        self.resumed_from = None      # the checkpoint a resumed run started from
        if resume_arrays is not None:
            extras = nn.checkpoint.restore(resume_arrays, self.model, self.opt)
            self.pos = Position(int(extras["epoch"]), int(extras["batch"]), int(extras["step"]),
                                float(extras["best_top1"]), json.loads(extras["history"]),
                                float(extras.get("epoch_loss_sum", 0.0)), int(extras.get("epoch_loss_steps", 0)))
            if self.scaler is not None and extras.get("scaler"):
                self.scaler.load_state_dict(json.loads(extras["scaler"]))
        data_parallel.broadcast_parameters(self.model, comm)  # every rank starts from the same weights
        self.stop = StopSignals()
        # on cuda the next batch goes to the GPU on a second stream while this step runs
        self.prefetcher = DevicePrefetcher(self.train_loader, self.device.name)
        self.after_step = None        # a test hook: called with the step number after each step
        self.nonfinite_steps = 0      # fp16: consecutive steps skipped for a NaN/inf loss
        self.skipped_in_a_row = 0     # fp16: consecutive steps the loss scaler skipped (gradients overflowed)
        self.skips_seen = self.scaler.skipped_steps if self.scaler is not None else 0   # at the last read
        self.step_at_read = self.pos.step
        self.graphed = None
        if cfg["cuda_graph"]:   # static input buffers; the step is captured after 3 eager ones
            from nn.cuda_graph import GraphedStep
            xp, S = self.device.xp, cfg["image_size"]
            self.static_images = xp.zeros((local_batch, S, S, 3), dtype=np.uint8)
            self.static_labels = xp.zeros(local_batch, dtype=np.int32)
            self.graphed = GraphedStep(lambda: self.step(self.static_images, self.static_labels), warmup=3,
                                       keep_alive=(self.static_images, self.static_labels))

    def _build_step(self, num_classes):
        """What `step` uses: the model, the optimizer (learning rate 0 until the schedule sets it),
        the loss scaler (fp16), the gradient all-reduce (several ranks), the phase clock and the
        device-side running loss. Needs self.cfg, self.comm, self.world and self.device."""
        cfg = self.cfg
        act_dtype = {"fp32": None, "fp16": np.float16, "bf16": "bfloat16"}[cfg["precision"]]
        self.in_dtype = np.float32 if act_dtype is None else act_dtype
        self.model = nn.resnet50(num_classes=num_classes, width=cfg["width"],
                                 zero_init_residual=cfg["zero_init_residual"], seed=cfg["seed"],
                                 activation_dtype=act_dtype).to(self.device)
        if cfg["sync_bn"] and self.world > 1:
            data_parallel.convert_sync_batchnorm(self.model, self.comm)
        Opt = nn.optim.SGD if cfg["optimizer"] == "sgd" else nn.optim.LARS
        self.opt = Opt(self.model.named_parameters(), lr=0.0, momentum=cfg["momentum"],
                       weight_decay=cfg["weight_decay"])
        self.scaler = None
        if cfg["precision"] == "fp16":  # fp32 master weights; the loss scaled so fp16 gradients do not underflow
            dynamic = cfg["loss_scale"] == "dynamic"
            self.scaler = nn.amp.LossScaler(init_scale=2.0 ** 15 if dynamic else float(cfg["loss_scale"]),
                                            dynamic=dynamic)
        # made after the optimizer: each gradient bucket is then a slice of its flat gradient buffer
        self.ddp = data_parallel.DataParallel(self.model, self.comm) if self.world > 1 else None
        self.phases = Phases(cfg["profile"], self.device.xp)
        # the running loss of the steps since the last read: [sum, finite steps, NaN/inf steps]
        self.loss_window = self.device.xp.zeros(3, dtype=np.float64)

    @classmethod
    def for_step(cls, cfg, num_classes, comm=None):
        """A Trainer holding only what `step` needs (see _build_step), built as a run builds it,
        with no data, run folder or log: bench.train times and counts this step. cfg needs
        device, precision, loss_scale, width, zero_init_residual, seed, sync_bn, optimizer,
        momentum, weight_decay, label_smoothing and profile; comm: several ranks (default: one).
        The learning rate is 0 until set (trainer.opt.lr = ...)."""
        self = cls.__new__(cls)
        self.train_loader = self.val_loader = self.kernels_before = None
        self.cfg = cfg
        self.comm = comm if comm is not None else distributed.Communicator()
        self.world, self.rank = self.comm.world_size, self.comm.rank
        self.device = nn.get_device(cfg["device"])
        self._build_step(num_classes)
        data_parallel.broadcast_parameters(self.model, self.comm)
        return self

    def close(self):
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()
        if getattr(self, "kernels_before", None) is not None:
            nn.device.restore_kernels(self.kernels_before)
            self.kernels_before = None

    # ------------------------------------------------------------------ one step
    def train_step(self, images, labels, lr):
        """One training step on one batch, queued on the device: nothing here waits for the GPU
        (the loss is added to a device-side running total, read every --log-every steps)."""
        self.opt.lr = lr                      # written into the optimizer's device buffer
        if self.graphed is None:
            self.step(images, labels)
        else:                                 # the step is a CUDA graph reading static buffers
            self.static_images[...] = images
            self.static_labels[...] = labels
            if self.graphed.graph is not None:   # a replay runs no Python: count the optimizer's step here
                self.opt.step_count += 1
            self.graphed()

    def step(self, images, labels):
        """Forward, loss, backward, (all-reduce,) optimizer: the part a CUDA graph captures. No
        value goes back to the host (nn.device.to_numpy is the only door, and nothing here calls it)."""
        x = nn.functional.normalize_images(images, device=self.device, dtype=self.in_dtype)
        y = self.device.asarray(labels)
        self.phases.mark("input")
        logits = self.model(x, layout="NHWC")
        loss = nn.functional.cross_entropy(logits, y, label_smoothing=self.cfg["label_smoothing"])
        self.device.ops.accumulate_loss(loss.data, self.loss_window)
        self.phases.mark("forward")
        self.opt.zero_grad()
        if self.scaler is not None:
            self.scaler.backward(loss)        # seeded with the loss scale, a device array
        else:
            loss.backward()
        if self.ddp is not None:
            self.ddp.finish()                 # gradients averaged over all ranks
        self.phases.mark("backward")
        if self.scaler is not None:
            self.scaler.step(self.opt)        # skipped on the device if a gradient overflowed
        else:
            self.opt.step()
        self.phases.mark("optimizer")
        self.device.mark_step()               # KERNELS_TRACE: one summary line per step

    def read_losses(self):
        """Read the device-side loss totals of the steps since the last read (the one host read
        of the training loop), sum them over the ranks with the stop requests, reset them.
        Returns (sum of finite losses, finite steps, NaN/inf steps) over all ranks; raises
        Diverged on a NaN/inf loss (fp16: after MAX_NONFINITE_FP16_STEPS skipped steps in a row,
        whether the loss or only the gradients overflowed)."""
        totals = nn.device.to_numpy(self.loss_window).astype(np.float64)
        self.loss_window.fill(0)
        if self.world > 1:   # one decision for all ranks: the losses, and whether anyone stops
            flags = np.append(totals, float(self.stop.requested))
            self.comm.allreduce_(flags)
            totals = flags[:3]
            if flags[3] > 0:
                self.stop.request()
        total, finite, bad = float(totals[0]), int(totals[1]), int(totals[2])
        if bad:
            if self.scaler is None or (finite == 0 and self.nonfinite_steps + bad >= MAX_NONFINITE_FP16_STEPS):
                raise Diverged(f"the loss is NaN/inf in {bad} of the {finite + bad} step(s) up to step "
                               f"{self.pos.step} (epoch {self.pos.epoch + 1}, learning rate {self.opt.lr:.4g})")
            self.nonfinite_steps = self.nonfinite_steps + bad if finite == 0 else bad
        else:
            self.nonfinite_steps = 0
        if self.scaler is not None:
            self._count_skipped_steps()
        return total, finite, bad

    def _count_skipped_steps(self):
        """fp16: how many steps in a row the loss scaler skipped (its counter is read with the loss,
        never inside a step). A window of reads in which every step was skipped extends the streak,
        any other ends it, so a streak is counted in whole windows: it is never overstated."""
        skipped = self.scaler.skipped_steps     # the same on every rank: the gradients were all-reduced
        window = self.pos.step - self.step_at_read
        all_skipped = window > 0 and skipped - self.skips_seen >= window
        self.skips_seen, self.step_at_read = skipped, self.pos.step
        self.skipped_in_a_row = self.skipped_in_a_row + window if all_skipped else 0
        if self.skipped_in_a_row >= MAX_NONFINITE_FP16_STEPS:
            fixed = self.cfg["loss_scale"] != "dynamic"
            raise Diverged(f"the loss scaler skipped all of the last {self.skipped_in_a_row} steps, up to step "
                           f"{self.pos.step} (epoch {self.pos.epoch + 1}): their gradients overflow float16 at loss "
                           f"scale {self.scaler.scale:g}{' (fixed by --loss-scale)' if fixed else ''}, so nothing "
                           f"trains", advice=("use --loss-scale dynamic or a smaller fixed scale (128 as the "
                                              "reference)") if fixed else None)

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self):
        """Train from the current position to the end of the epoch (or a stop). Returns
        (mean loss, images seen, seconds, finished)."""
        cfg, pos = self.cfg, self.pos
        self.train_loader.set_epoch(pos.epoch, pos.batch)
        t0 = time.time()
        if pos.batch == 0:
            pos.loss_sum, pos.loss_steps = 0.0, 0
        seen, shown = 0, float("nan")
        bar = _bar(total=self.steps_per_epoch, initial=pos.batch, desc=f"epoch {pos.epoch + 1}/{cfg['epochs']}",
                   disable=cfg["no_progress"])
        self.phases.reset_clock()
        batches = iter(self.prefetcher)
        while True:
            try:  # one rank alone: a signal during the wait for a batch stops before the step
                with self.stop.waiting() if self.world == 1 else contextlib.nullcontext():
                    images, labels = next(batches)
            except StopIteration:
                break
            except StopSignals.WaitInterrupted:
                total, finite, _ = self.read_losses()
                pos.loss_sum, pos.loss_steps = pos.loss_sum + total, pos.loss_steps + finite
                break
            self.phases.mark("data")
            lr = self.schedule(pos.step)
            self.train_step(images, labels, lr)
            pos.step += 1
            pos.batch += 1
            if self.after_step is not None:
                self.after_step(pos.step)
            seen += len(labels) * self.world
            # the losses are read every --log-every steps, at the end of the epoch and at a stop
            # (one rank alone stops at once; several ranks agree at the next read)
            read = (pos.step % cfg["log_every"] == 0 or pos.batch >= self.steps_per_epoch
                    or self._step_limit_reached() or (self.world == 1 and self.stop.requested))
            if read:
                total, finite, _ = self.read_losses()
                pos.loss_sum, pos.loss_steps = pos.loss_sum + total, pos.loss_steps + finite
                shown = total / finite if finite else shown
                bar.set_postfix(loss=f"{shown:.3f}", lr=f"{lr:.3g}",
                                img_s=f"{seen / max(time.time() - t0, 1e-9):.0f}")
            bar.update(1)
            if read and (self.stop.requested or self._step_limit_reached()):
                break
        bar.close()
        return pos.loss_sum / max(pos.loss_steps, 1), seen, time.time() - t0, pos.batch >= self.steps_per_epoch

    def _step_limit_reached(self):
        return bool(self.cfg["max_steps"]) and self.pos.step >= self.cfg["max_steps"]

    # ------------------------------------------------------------------ the end of an epoch
    def evaluate(self):
        """Top-1 and top-5 over the whole validation set (every image exactly once over all ranks).
        NaN/inf logits raise Diverged: a broken model must not report an accuracy."""
        correct1, correct5, nonfinite, total = evaluate(self.model, self.val_loader, self.device, self.in_dtype,
                                                        self.cfg["no_progress"], with_nonfinite=True)
        if nonfinite:
            raise Diverged(f"evaluation after epoch {self.pos.epoch + 1}: the model gives NaN/inf logits for "
                           f"{nonfinite} of {total} validation images")
        return correct1 / total, correct5 / total

    def end_of_epoch(self, train_loss, seen, train_time):
        """Evaluate (when due), log, checkpoint, plot. Returns True when the target is reached."""
        cfg, c, pos, mlog = self.cfg, self.c, self.pos, self.mlog
        mlog.end(c.EPOCH_STOP, epoch_num=pos.epoch + 1)
        record = {"epoch": pos.epoch, "step": pos.step, "train_loss": train_loss, "lr_end": self.opt.lr,
                  "train_seconds": train_time, "images_per_s": seen / max(train_time, 1e-9),
                  "top1": None, "top5": None, "target": cfg["target_accuracy"]}
        if self.scaler is not None:
            record["loss_scale"] = self.scaler.scale
        reached = False
        if (pos.epoch + 1) % cfg["eval_every"] == 0 or pos.epoch + 1 == cfg["epochs"]:
            mlog.start(c.EVAL_START, epoch_num=pos.epoch + 1)
            t_eval = time.time()
            with self.stop.waiting() if self.world == 1 else contextlib.nullcontext():
                top1, top5 = self.evaluate()   # a signal ends it at once: see train()
            self.phases.mark("evaluation")
            record.update(top1=top1, top5=top5, eval_seconds=time.time() - t_eval)
            mlog.end(c.EVAL_STOP, epoch_num=pos.epoch + 1)
            mlog.event(c.EVAL_ACCURACY, top1, epoch_num=pos.epoch + 1)
            reached = top1 >= cfg["target_accuracy"]
        mlog.end(c.BLOCK_STOP, first_epoch_num=pos.epoch + 1)
        acc = (f"top-1 {record['top1']:.4f} top-5 {record['top5']:.4f}" if record["top1"] is not None
               else "no evaluation")
        _say(f"epoch {pos.epoch + 1:3d}: loss {record['train_loss']:.4f}  {acc}  lr {self.opt.lr:.4g}  "
             f"{record['images_per_s']:.0f} img/s  ({train_time:.1f}s)")
        if cfg["profile"]:
            _say(f"  time per phase: {self.phases.report()}")
        pos.history.append(record)
        pos.epoch, pos.batch = pos.epoch + 1, 0
        improved = record["top1"] is not None and record["top1"] > pos.best
        if improved:
            pos.best = record["top1"]
        # checkpoint_last first: it refuses NaN/inf weights, before anything else is written
        self.save("checkpoint_last.npz")
        if improved:
            self.save("checkpoint_best.npz")
        if distributed.is_main():
            self.folder.append_line("metrics.jsonl", json.dumps(record))
            write_plot(self.folder.path / "plot.png", pos.history)
        self.comm.barrier()  # no rank goes on (or exits) before the checkpoint is in place
        return reached

    def save(self, name):
        """Write a checkpoint of the current position, refusing NaN/inf (Diverged, nothing written).
        Rank 0 writes; every rank learns the outcome."""
        pos, problem = self.pos, None
        if distributed.is_main():
            path = self.folder.path / name
            try:
                nn.checkpoint.save(str(path), self.model, self.opt, require_finite=True, epoch=pos.epoch,
                                   batch=pos.batch, step=pos.step, best_top1=pos.best,
                                   history=json.dumps(pos.history), config=json.dumps(self.cfg, default=str),
                                   scaler=json.dumps(self.scaler.state_dict()) if self.scaler else "",
                                   epoch_loss_sum=float(pos.loss_sum), epoch_loss_steps=int(pos.loss_steps))
            except nn.checkpoint.NonFiniteError as e:
                problem = ("diverged", f"the weights hold NaN/inf at epoch {pos.epoch + (pos.batch > 0)}, step "
                                       f"{pos.step} ({e}); {name} was not written")
            except OSError as e:
                problem = ("output", str(output_error(path, e, advice=self._save_failed_advice())))
        if self.world > 1:
            problem = self.comm.allgather_object(problem)[0]
        if problem is not None:
            raise (Diverged if problem[0] == "diverged" else OutputError)(problem[1])
        if name == "checkpoint_last.npz":
            self.last_checkpoint = (pos.epoch, pos.batch, pos.step)

    def _save_failed_advice(self):
        """What to do when a checkpoint could not be written: continue from the one before, or,
        when there is none in this folder yet, start again."""
        if self.last_checkpoint is not None:
            return f"the previous checkpoint is intact; free some space, then continue with --resume {self.folder.path}"
        if self.resumed_from is not None:
            return (f"no checkpoint of this run is in {self.folder.path} yet; free some space, then resume again "
                    f"from {self.resumed_from}")
        return (f"no checkpoint was written yet (this was the first); free some space, then start the run again "
                f"(the same command with --overwrite)")

    # ------------------------------------------------------------------ the loop
    def train(self):
        """The epoch loop. Returns (exit code, MLPerf status)."""
        cfg, c, pos, mlog = self.cfg, self.c, self.pos, self.mlog
        while pos.epoch < cfg["epochs"]:
            mlog.start(c.EPOCH_START, epoch_num=pos.epoch + 1)
            if pos.batch == 0:
                mlog.start(c.BLOCK_START, first_epoch_num=pos.epoch + 1, epoch_count=1)
            train_loss, seen, train_time, finished = self.train_epoch()
            if not finished:  # interrupted or --max-steps mid-epoch: save the position and stop
                self.save("checkpoint_last.npz")
                self.comm.barrier()
                return self._stopped(), c.ABORTED
            try:
                reached = self.end_of_epoch(train_loss, seen, train_time)
            except StopSignals.WaitInterrupted:
                # a signal during the evaluation: the epoch is trained, not evaluated; the resumed
                # run evaluates it first (its position is the end of this epoch)
                self.save("checkpoint_last.npz")
                return self._stopped(), c.ABORTED
            if reached:
                _say(f"target top-1 {cfg['target_accuracy']} reached after {pos.epoch} epochs, "
                     f"{time.time() - self.t_run:.1f}s of training")
                return EXIT_OK, c.SUCCESS
            if self.stop.requested or self._step_limit_reached():
                return self._stopped(), c.ABORTED
        _say(f"target top-1 {cfg['target_accuracy']} not reached in {cfg['epochs']} epochs (best {pos.best:.4f})")
        return EXIT_NOT_REACHED, c.ABORTED

    def _stopped(self):
        ckpt = self.folder.path / "checkpoint_last.npz"
        if self.stop.requested:
            _say(f"{signal.Signals(self.stop.signum).name.lower()}: checkpoint saved to {ckpt}; continue with: "
                 f"python train.py --resume {self.folder.path}")
            return self.stop.code
        _say(f"stopped after --max-steps {self.cfg['max_steps']}; checkpoint saved to {ckpt}; continue with: "
             f"python train.py --resume {self.folder.path}")
        return EXIT_OK

    def divergence_advice(self):
        """Where the last finite weights are, and the command that continues from them."""
        lower = self.cfg["base_lr"] / 10
        if self.last_checkpoint is None:
            return (f"no checkpoint was written; start again with a lower --lr (now {self.cfg['base_lr']:g}; try "
                    f"{lower:g}) or more --warmup-epochs")
        epoch, batch, step = self.last_checkpoint
        where = f"epoch {epoch} done" if batch == 0 else f"epoch {epoch + 1}, batch {batch}"
        return (f"{self.folder.path / 'checkpoint_last.npz'} holds the last finite weights ({where}, step {step}); "
                f"continue from it with a lower learning rate: python train.py --resume {self.folder.path} "
                f"--lr {lower:g}")

    def log_run_parameters(self):
        cfg, c, mlog = self.cfg, self.c, self.mlog
        mlog.event(c.SEED, cfg["seed"])
        mlog.event(c.GLOBAL_BATCH_SIZE, cfg["batch_size"])
        mlog.event(c.TRAIN_SAMPLES, self.train_loader.num_samples)
        mlog.event(c.EVAL_SAMPLES, self.val_loader.num_samples)
        mlog.event(c.OPT_NAME, c.SGD if cfg["optimizer"] == "sgd" else c.LARS)
        mlog.event(c.OPT_BASE_LR, self.peak_lr)
        mlog.event(c.OPT_LR_WARMUP_EPOCHS, cfg["warmup_epochs"])
        mlog.event(c.OPT_WEIGHT_DECAY, cfg["weight_decay"])
        mlog.event("opt_momentum", cfg["momentum"])
        mlog.event("opt_learning_rate_decay_boundary_epochs", list(cfg["decay_epochs"]))
        mlog.event("model_bn_span", cfg["batch_size"] if cfg["sync_bn"] else cfg["batch_size"] // self.world)
        if cfg.get("kernels") and self.device.name != "cpu":
            mlog.event("kernels", cfg["kernels"])       # the version of each family of our kernels
            chosen = _chosen_kernels(cfg["kernels"])
            if chosen:
                _say(f"kernels: {chosen} (the others at their defaults)")
        _say(f"ResNet-50 v1.5 width {cfg['width']:g}: {self.model.num_parameters():,} parameters, "
             f"{self.num_classes} classes, {cfg['image_size']}px, device {self.device.name}, {cfg['precision']}; "
             f"{self.train_loader.num_samples} training images ({self.steps_per_epoch} steps of {cfg['batch_size']}), "
             f"{self.val_loader.num_samples} validation images; peak lr {self.peak_lr:g} ({cfg['schedule']})")


def _chosen_kernels(table):
    """'conv version 1, batchnorm version 2 of /path/my_bn.cu': the kernels a run does not take
    at their defaults, in words."""
    defaults = nn.device.kernel_table({})
    parts = []
    for family, entry in table.items():
        default = defaults.get(family, {})
        if entry == default:
            continue
        said = []
        if entry["version"] != default.get("version") or "file" in entry:
            said.append(f"{family} version {entry['version']}")
        if entry.get("f16_version") != default.get("f16_version"):
            said.append(f"{family} float16 version {entry['f16_version']}")
        parts.append(", ".join(said) + (f" of {entry['file']}" if "file" in entry else ""))
    return ", ".join(parts)


# fp16: the loss scaler skips a step whose gradients overflow (a NaN/inf loss among them); this many
# in a row is divergence (README.md, exit code 3).
MAX_NONFINITE_FP16_STEPS = 50


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


def finished_run(folder, arrays, goal):
    """The exit code of a run that has nothing left to do (its checkpoint is past the target
    accuracy, or at the end of its epochs), after saying so; None when a resume has work to do.
    goal: the target_accuracy and epochs the resume would run to (the saved ones, or the flags)."""
    epoch, batch = int(arrays["extra/epoch"]), int(arrays["extra/batch"])
    best = float(arrays["extra/best_top1"])
    if batch != 0:
        return None
    if best >= goal["target_accuracy"]:
        _say(f"{folder} already reached its target: top-1 {best:.4f} >= {goal['target_accuracy']} by epoch {epoch}; "
             f"nothing to resume (a higher --target-accuracy would continue it)")
        return EXIT_OK
    if epoch >= goal["epochs"]:
        _say(f"{folder} finished its {epoch} epochs without reaching top-1 {goal['target_accuracy']} (best "
             f"{best:.4f}); nothing to resume (--epochs N with N > {epoch} trains further)")
        return EXIT_NOT_REACHED
    return None


def run(cfg, resume=None):
    """Train as configured; returns the exit code."""
    given = cfg.pop("_explicit", {})
    comm = _comm()
    resume_arrays = ckpt = None
    if resume is not None:
        ckpt_folder, ckpt, resume_arrays = open_resume_checkpoint(resume, lambda path: _resume_layout(cfg, given, path))
        saved = json.loads(str(resume_arrays["extra/config"]))
        checked = dict(saved)
        _check_saved_types(checked, cfg)   # before any of it is used
        finished = finished_run(ckpt_folder, resume_arrays, {k: cfg[k] if k in given else checked[k]
                                                             for k in ("target_accuracy", "epochs")})
        if finished is not None:
            return finished
        cfg = resume_config(cfg, given, saved)
        # --resume DIR continues in DIR, wherever it was copied or moved; --out forks the run elsewhere
        cfg["out"] = cfg["out"] if "out" in given else str(ckpt_folder)
    run_dir = Path(cfg["out"] or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(comm.allgather_object(str(run_dir))[0])  # rank 0's name on every rank
    folder = RunFolder(run_dir)
    continuing = resume is not None and run_dir.resolve() == ckpt_folder.resolve()
    error = None
    if distributed.is_main():
        try:
            folder.claim(new_run=not continuing, overwrite=cfg.get("overwrite", False))
        except UsageError as e:
            error = e
    errors = comm.allgather_object(None if error is None else (type(error).__name__, str(error)))
    if errors[0] is not None:
        raise error if error is not None else UsageError(errors[0][1])
    try:
        return _run_in(folder, cfg, resume_arrays, continuing and ckpt.name == "checkpoint_last.npz", ckpt)
    finally:
        folder.release(discard_empty=True)


def _run_in(folder, cfg, resume_arrays, continues_last, resumed_from=None):
    """The run in its claimed folder. Until training starts (setup: the dataset, the model, the
    loaders), a failure removes the files this run wrote (its MLPerf log; a new run's config.json),
    so that a run that never trained does not hold the folder against the next one."""
    comm = _comm()
    run_dir = folder.path
    cfg["out"] = str(run_dir)
    if cfg["synthetic"] and comm.local_rank == 0:  # one preparer per node (the cache is node-local)
        dataset_dir(cfg)
    comm.barrier()
    cfg["dataset_identity"] = dataset_identity(dataset_dir(cfg))
    comm.assert_same(json.dumps(cfg, sort_keys=True, default=str), "the configuration")
    log_name = "mlperf.log"
    if resume_arrays is not None:  # each resumed part of a run has a log of its own
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
        log_name = f"mlperf-resumed-{stamp}.log"
        while (run_dir / log_name).exists():
            n += 1
            log_name = f"mlperf-resumed-{stamp}-{n}.log"
    # The MLPerf lines go to stdout too (as the reference prints them) for dataset runs; the
    # built-in synthetic run keeps its console to progress bars and one line per epoch.
    mlog = MLPerfLog(str(run_dir / log_name), echo=not cfg["synthetic"]) if distributed.is_main() else _NoLog()
    c = mlog.c
    status, code, trainer, set_up = c.ABORTED, EXIT_NOT_REACHED, None, False
    try:
        mlog.event(c.CACHE_CLEAR, True)
        mlog.start(c.INIT_START)
        mlog.event(c.SUBMISSION_BENCHMARK, c.RESNET)
        mlog.event(c.SUBMISSION_ORG, "mlperf-resnet-cupy")
        mlog.event(c.SUBMISSION_DIVISION, c.OPEN)
        mlog.event(c.SUBMISSION_STATUS, c.RESEARCH)
        mlog.event(c.SUBMISSION_PLATFORM, _platform(cfg))
        trainer = Trainer(cfg, folder, mlog, resume_arrays)
        trainer.resumed_from = resumed_from
        if continues_last:  # the folder's checkpoint_last.npz is the one resumed from: finite
            trainer.last_checkpoint = (trainer.pos.epoch, trainer.pos.batch, trainer.pos.step)
        if _CRASH_AT_STEP:
            trainer.after_step = _crash_at(_CRASH_AT_STEP)
        if distributed.is_main():
            folder.write_text("config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str))
            if resume_arrays is not None:  # metrics.jsonl = the history of the checkpoint resumed from
                folder.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in trainer.pos.history))
        trainer.log_run_parameters()
        if resume_arrays is not None:
            _say(f"resuming {run_dir} at epoch {trainer.pos.epoch + 1}, batch {trainer.pos.batch} "
                 f"(step {trainer.pos.step})")
        if cfg["dry_run"]:
            lrs = [trainer.schedule(s) for s in (0, trainer.steps_per_epoch,
                                                 trainer.steps_per_epoch * cfg["epochs"] - 1)]
            _say(f"dry run: learning rate {lrs[0]:.4g} at step 0, {lrs[1]:.4g} after epoch 1, {lrs[2]:.4g} at "
                 f"the last step; data in {dataset_dir(cfg)}; outputs would go to {run_dir}")
            mlog.end(c.INIT_STOP)
            set_up = True
            return EXIT_OK
        mlog.end(c.INIT_STOP)
        mlog.start(c.RUN_START)
        set_up = True
        trainer.t_run = time.time()
        try:
            # NaN/inf are detected where they matter (the loss read, the evaluation, the checkpoint):
            # NumPy's floating-point warnings on the cpu device would only repeat it, less clearly
            with trainer.stop, np.errstate(all="ignore"):
                code, status = trainer.train()
        except Diverged as e:
            _say(f"error: diverged: {e}; {e.advice or trainer.divergence_advice()}")
            code = EXIT_DIVERGED
        except KeyboardInterrupt:
            _say("aborted at once (second signal); the last checkpoint is intact")
            code = trainer.stop.code
        except OutputError as e:
            _say(f"error: {e}")
            code = EXIT_USAGE
        except Exception as e:
            broken = _kernel_failure(e, cfg)
            if isinstance(e, nn.device.cuda_setup_error()):    # CuPy cannot compile our kernels: the line says why
                _say(f"error: {e}")
                code = EXIT_USAGE
            elif broken is not None:   # a kernel broke a rule of the GPU (a learner's copy, most likely)
                _say(f"error: {broken}" + (f"; {run_dir / 'checkpoint_last.npz'} is intact: fix the kernel, then "
                                          f"continue with --resume {run_dir}" if trainer.last_checkpoint else ""))
                code = EXIT_USAGE
            elif _is_oom(e):
                _say("error: " + nn.memory.oom_message(e, cfg["batch_size"], trainer.world, cfg["image_size"],
                                                      cfg["width"], trainer.num_classes, cfg["precision"]))
                code = EXIT_OOM
            else:
                raise
        try:
            mlog.end(c.RUN_STOP, status=status)
        except OSError as e:
            _say(f"error: {output_error(run_dir / log_name, e)}")
            code = code if code != EXIT_OK else EXIT_USAGE
        written = [n for n in RunFolder.RUN_FILES if (run_dir / n).exists()]
        _say(f"outputs in {run_dir}: {', '.join(written)} (best top-1 {trainer.pos.best:.4f})")
        return code
    finally:
        if trainer is not None:
            trainer.close()
        mlog.close()
        if not set_up and distributed.is_main():
            for name in [log_name] + (["config.json"] if resume_arrays is None else []):
                try:
                    (run_dir / name).unlink(missing_ok=True)
                except OSError:
                    pass


def _crash_at(step_to_die):
    def after_step(step):
        if step == step_to_die:
            os._exit(137)  # die like `kill -9`: no cleanup, no checkpoint
    return after_step


def _platform(cfg):
    world = _comm().world_size
    if cfg["device"] == "cuda":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return f"{world}x{name}"
    import platform
    return f"{world}x{cfg['device']}: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def _bar(**kw):
    from tqdm import tqdm
    # bars only on a terminal (a log file would fill with redraws) and only on rank 0
    kw["disable"] = kw.get("disable") or not sys.stderr.isatty() or not distributed.is_main()
    return tqdm(unit="step", dynamic_ncols=True, leave=False, **kw)


def _kernel_failure(e, cfg):
    """One line for a kernel that failed during training (the emulator's EmulatorError: an access
    out of bounds, a fault, a divergent barrier...; a CompileError), naming the kernel and the
    run's own kernel files; None for any other exception."""
    compile_error, emulator_error = nn.device.kernel_errors()
    if isinstance(e, compile_error):
        first = next((line.strip() for line in e.log.splitlines() if "error" in line), "")
        what = f"{e.message}{': ' + first if first else ''}"
    elif isinstance(e, emulator_error):
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    else:
        return None
    files = [f"{family}={entry['file']}" for family, entry in (cfg.get("kernels") or {}).items()
             if isinstance(entry, dict) and "file" in entry]
    return f"{what}{' (this run uses your kernel file ' + ', '.join(files) + ')' if files else ''}"


def _is_oom(e):
    return type(e).__name__ in ("OutOfMemoryError", "CUDARuntimeError") and "memory" in str(e).lower()


def evaluate(model, loader, device, in_dtype, no_progress=False, with_nonfinite=False):
    """Top-1 and top-5 accuracy over the whole split (every image exactly once over all ranks).
    with_nonfinite: return the counts (top-1 correct, top-5 correct, rows with NaN/inf logits,
    images) instead; NaN/inf rows are never counted correct."""
    model.eval()
    correct1 = correct5 = nonfinite = total = 0
    try:
        with nn.no_grad():
            for images, labels in _bar(total=len(loader), desc="eval", disable=no_progress, iterable=loader):
                x = nn.functional.normalize_images(images, device=device, dtype=in_dtype)
                logits = model(x, layout="NHWC")
                k5 = min(5, logits.shape[1])
                (c1, c5), bad = nn.metrics.topk_counts(logits, device.asarray(labels), ks=(1, k5))
                correct1, correct5, nonfinite, total = correct1 + c1, correct5 + c5, nonfinite + bad, total + len(labels)
    finally:
        model.train()
    # each rank evaluated its own shard: add the counts up exactly
    correct1, correct5, nonfinite, total = data_parallel.allreduce_counts([correct1, correct5, nonfinite, total],
                                                                        _comm())
    if with_nonfinite:
        return correct1, correct5, nonfinite, total
    return correct1 / total, correct5 / total


def _terminated_early(signum, frame):
    """SIGTERM before training started: nothing to save, one line, exit 143."""
    raise SystemExit(EXIT_TERMINATED)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    old_term = signal.signal(signal.SIGTERM, _terminated_early) if _in_main_thread() else None
    # Several ranks (mpirun -np N python train.py ...): the communicator first, before anything
    # touches the GPU, since each rank picks its GPU from its rank on the node.
    try:
        comm = distributed.init(device=args.device if args.device not in (None, "auto")
                                else ("cuda" if _gpu_available() else "cpu"))
    except RuntimeError as e:   # e.g. several ranks on GPUs without NCCL: the message says what to install
        print(f"train.py: error: {e}", file=sys.stderr)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        return EXIT_USAGE
    code = EXIT_USAGE
    try:
        cfg = resolve_config(args)
        cfg["_explicit"] = {k: True for k, v in vars(args).items() if v is not None and v is not False}
        code = run(cfg, resume=args.resume)
    except (UsageError, data.records.DataError, nn.device.cuda_setup_error()) as e:   # bad input or environment
        if distributed.is_main():
            print(f"train.py: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        _say("interrupted before training started: nothing to save")
        code = EXIT_INTERRUPTED
    except SystemExit as e:
        if e.code != EXIT_TERMINATED:
            raise
        _say("terminated (SIGTERM) before training started: nothing to save")
        code = EXIT_TERMINATED
    finally:
        comm.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return code


def _in_main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
