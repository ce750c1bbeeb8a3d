"""Stage 2: the loader. LMDB records -> decoded, augmented uint8 NHWC batches.

    with Loader("out/train.lmdb", batch_size=256, train=True, workers=8) as loader:
        for epoch in range(start_epoch, epochs):
            loader.set_epoch(epoch)
            for images, labels in loader:      # uint8 [B, S, S, 3] RGB, int32 [B]
                ...                            # copy to the device before the next step

How it works
------------
- The main process decides everything random that is not per-pixel: the epoch's
  permutation ``perm = default_rng([seed, epoch, 0, 0]).permutation(N)``, this rank's
  slice of it, and the batches. A sample's augmentation draws from its own
  ``default_rng([seed, epoch, 1, index])``. So batch k of epoch e is a function of
  (seed, epoch, rank, world_size, k) alone: any number of workers, any resume point,
  the same bytes.
- Training: rank r of W gets ``perm[r*M:(r+1)*M]`` with M = N // W (disjoint, equal
  sizes) and yields M // B full batches (the remainder is dropped; a new permutation
  every epoch means every image is still seen). Evaluation: no shuffling, rank r gets
  the contiguous block ``[r*N//W, (r+1)*N//W)`` and yields ceil(size / B) batches, the
  last one possibly short: every image is counted exactly once over all ranks.
- Worker processes (started once, by ``forkserver``: safe after CUDA initialised in the
  parent) each open the LMDB themselves (read-only, no lock, no readahead). Batches
  are written by the workers straight into shared-memory slots (a file in /dev/shm,
  unlinked as soon as every worker has mapped it, so nothing leaks if we crash);
  at most ``prefetch`` batches are in flight, and they come out in order.
- A record that fails to decode, or whose label is not a class of the database
  (outside [0, len(classes))), is logged once and replaced, every time it comes up, by
  record ``default_rng([seed, epoch, 2, index, attempt]).integers(N)``
  (``loader.corrupt_records``); the epoch goes on. A record that decodes with a
  libjpeg-turbo warning (truncated, damaged entropy-coded data) is used as decoded and
  logged once (``loader.damaged_records``).
- Workers end with the process that started them, however it ends (kill -9 included):
  each watches it through a pidfd (Linux >= 5.3; elsewhere it polls) and exits when it
  is gone. The forkserver and multiprocessing's resource tracker exit by themselves once
  no process holds their pipes, i.e. once the workers are gone.

The arrays yielded are views into the shared slots and stay valid until the next
batch is requested; pass ``copy=True`` to get private copies.
"""

import logging
import math
import multiprocessing as mp
import os
import queue
import select
import signal
import tempfile
import threading
import time
import traceback
from collections import deque

import numpy as np

from .records import close_database, decode_record, open_database, record_key

log = logging.getLogger("data.loader")

MAX_REPLACEMENTS = 10


def default_eval_resize(image_size):
    """Shorter side before the central crop: 256 for 224, scaled as image_size * 256 / 224."""
    return int(round(image_size * 256 / 224))


def epoch_permutation(num_samples, seed, epoch):
    """The training order of epoch ``epoch``: int64 [num_samples], a function of (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch, 0, 0]).permutation(num_samples)


def shard_batches(num_samples, batch_size, train, seed, epoch, rank, world_size):
    """This rank's batches of one epoch -> list of int64 index arrays (see module docstring)."""
    if train:
        per_rank = num_samples // world_size
        mine = epoch_permutation(num_samples, seed, epoch)[rank * per_rank:(rank + 1) * per_rank]
        return [mine[k * batch_size:(k + 1) * batch_size] for k in range(per_rank // batch_size)]
    lo, hi = rank * num_samples // world_size, (rank + 1) * num_samples // world_size
    mine = np.arange(lo, hi, dtype=np.int64)
    return [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]


class _BatchMaker:
    """The per-process work: fill slot ``slot`` with the samples of one batch."""

    def __init__(self, lmdb_path, images, labels, cfg):
        self.env, self.meta = open_database(lmdb_path)
        self.num_samples, self.num_classes = self.meta["count"], len(self.meta["classes"])
        self.images, self.labels, self.cfg = images, labels, cfg

    def _sample_into(self, index, out, epoch):
        # -> (label, libjpeg-turbo warning or None); ValueError for a record we cannot use.
        from .augment import eval_transform_into, train_transform_into

        with self.env.begin(buffers=True) as txn:
            raw = txn.get(record_key(int(index)))
            if raw is None:
                raise ValueError(f"record {index} is missing")
            jpeg, label, boxes, _ = decode_record(raw)
            if not 0 <= label < self.num_classes:  # an int32 on disk: a negative label fits too
                raise ValueError(f"label {label} is outside [0, {self.num_classes}), "
                                 f"the database's {self.num_classes} classes")
            cfg = self.cfg
            if cfg["train"]:
                rng = np.random.default_rng([cfg["seed"], epoch, 1, int(index)])
                warning = train_transform_into(jpeg, out, rng, boxes if cfg["use_boxes"] else None,
                                               cfg["color_jitter"], cfg["dct_scaling"], cfg["crop"])
            else:
                warning = eval_transform_into(jpeg, out, cfg["eval_resize"], cfg["dct_scaling"])
        return label, warning

    def make(self, slot, indices, epoch):
        """Fill slot ``slot`` -> (corrupt, damaged): lists of (index, replacement, reason) for
        records replaced, and of (index, warning) for records used despite a decoder warning."""
        corrupt, damaged = [], []
        for j, index in enumerate(indices):
            index, tried = int(index), 0
            while True:
                try:
                    label, warning = self._sample_into(index, self.images[slot, j], epoch)
                    self.labels[slot, j] = label
                    if warning is not None:
                        damaged.append((index, warning))
                    break
                except (ValueError, OSError) as e:  # decode errors are ValueError
                    tried += 1
                    if tried > MAX_REPLACEMENTS:
                        raise RuntimeError(f"{MAX_REPLACEMENTS} replacements for a corrupt record failed too; "
                                           f"the database looks badly damaged: {e}") from e
                    replacement = int(np.random.default_rng([self.cfg["seed"], epoch, 2, index, tried])
                                      .integers(self.num_samples))
                    corrupt.append((index, replacement, str(e)))
                    index = replacement
        return corrupt, damaged

    def close(self):
        close_database(self.env)


def _process_start_time(pid):
    """Start time of process ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22), or
    None if there is no such process or no /proc. With the pid it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # fields after "(comm)" start at 3


def _owner_alive(pid, start_time):
    if start_time is not None:
        return _process_start_time(pid) == start_time  # a zombie still has its /proc entry: fine
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _exit_with_owner(pid, start_time):
    """End this process as soon as process ``pid`` (started at ``start_time``) ends.

    Why: a worker blocks on its task queue, whose pipe it holds both ends of, so it never sees
    EOF when the loader's process dies; it would live on (and keep the forkserver, the resource
    tracker and the shared slots alive with it). A daemon thread waits on a pidfd of the owner
    (Linux >= 5.3: readable the moment the owner exits, however it exits) or else polls it
    twice a second, then calls os._exit: nothing to flush, the database is open read-only.
    """
    def watch():
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd here, or the owner is already gone
            fd = None
        if fd is not None and _owner_alive(pid, start_time):  # the pid was not reused before we opened it
            select.select([fd], [], [])
        else:
            while _owner_alive(pid, start_time):
                time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-owner", daemon=True).start()


def _worker_main(worker_id, lmdb_path, buffer_path, batch_size, image_size, num_slots, cfg, tasks, results,
                 owner=None):
    # Runs in a worker process: map the slots, open the database, serve tasks until None.
    # owner: (pid, start time) of the process that started the loader; we exit when it does.
    # Ctrl-C in a terminal signals every process of the foreground group, workers included: the
    # owner decides what it means (finish the step, checkpoint, close the loader, which stops us),
    # so a worker ignores it instead of dying mid-batch with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if owner is not None:
        _exit_with_owner(*owner)
    try:
        images, labels = _map_slots(buffer_path, num_slots, batch_size, image_size)
        maker = _BatchMaker(lmdb_path, images, labels, cfg)
    except BaseException:
        results.put(("error", None, traceback.format_exc()))
        return
    results.put(("ready", worker_id, None))
    while True:
        task = tasks.get()
        if task is None:
            break
        batch_id, slot, indices, epoch = task
        try:
            results.put(("done", batch_id, (slot, len(indices), *maker.make(slot, indices, epoch))))
        except BaseException:
            results.put(("error", batch_id, traceback.format_exc()))
    maker.close()


def _slot_bytes(num_slots, batch_size, image_size):
    return num_slots * batch_size * (image_size * image_size * 3 + 4)


def _map_slots(path, num_slots, batch_size, image_size):
    # images uint8 [slots, B, S, S, 3] followed by labels int32 [slots, B], one shared file.
    mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(_slot_bytes(num_slots, batch_size, image_size),))
    n_img = num_slots * batch_size * image_size * image_size * 3
    images = mm[:n_img].reshape(num_slots, batch_size, image_size, image_size, 3)
    labels = mm[n_img:].view(np.int32).reshape(num_slots, batch_size)
    return images, labels


class Loader:
    """Batches of one split of a packed LMDB, for one rank.

    lmdb_path: a database written by data.pack. batch_size: images per batch (per rank).
    train: True = shuffled, TF-style random crop + flip (+ optional colour jitter),
        drop-last; False = in order, resize + central crop, every image exactly once.
    image_size: S, output images are S x S. eval_resize: shorter side before the central
        crop (default round(S * 256 / 224)). seed, epoch, start_batch: where to begin
        (resuming at (epoch, start_batch) gives exactly what an uninterrupted run would).
    workers: processes (0 = in this process; default cpu_count - 1, at least 1).
    prefetch: batches in flight (default 2 * workers, at least 2).
    rank, world_size: this process's shard. color_jitter: strength (0 = off).
    use_boxes: crop around the stored object boxes when present (the reference does).
    dct_scaling: let libjpeg-turbo decode at 1/2..1/8 scale when that still gives >= S pixels.
    crop: dict of keyword arguments for data.augment.sample_distorted_crop.
    copy: yield private copies instead of views into the shared slots.

    Yields (images uint8 [b, S, S, 3] NHWC RGB, labels int32 [b]); b = batch_size except
    for the last evaluation batch. Attributes: num_samples (whole split), classes
    (wnids in label order), position ((epoch, batch) of the next batch), corrupt_records
    (list of (epoch, index, replacement, reason), one entry per replacement made: records
    that do not decode or whose label is out of range), damaged_records ({index: libjpeg-turbo
    warning} of records used although they decoded with a warning).
    """

    def __init__(self, lmdb_path, batch_size, train, image_size=224, eval_resize=None, seed=0, epoch=0,
                 start_batch=0, workers=None, prefetch=None, rank=0, world_size=1, color_jitter=0.0,
                 use_boxes=True, dct_scaling=True, crop=None, copy=False, start_method="forkserver"):
        for name, value, lo in (("batch_size", batch_size, 1), ("image_size", image_size, 1), ("epoch", epoch, 0),
                                ("start_batch", start_batch, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        if not 0 <= color_jitter < 1:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter!r}")
        self.eval_resize = default_eval_resize(image_size) if eval_resize is None else int(eval_resize)
        if self.eval_resize < image_size:
            raise ValueError(f"eval_resize ({self.eval_resize}) must be >= image_size ({image_size})")
        env, meta = open_database(lmdb_path)  # raises DatabaseError with how to build one
        close_database(env)
        self.lmdb_path, self.meta = os.fspath(lmdb_path), meta
        self.num_samples, self.classes = meta["count"], list(meta["classes"])
        self.batch_size, self.train, self.image_size = int(batch_size), bool(train), int(image_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        if self.num_samples < world_size:
            raise ValueError(f"world_size {world_size} exceeds the {self.num_samples} samples")
        self.workers = max(1, (os.cpu_count() or 2) - 1) if workers is None else int(workers)
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers!r}")
        self.num_slots = 1 if self.workers == 0 else max(2, 2 * self.workers if prefetch is None else int(prefetch))
        self.copy, self.start_method = bool(copy), start_method
        self._cfg = {"train": self.train, "seed": self.seed, "use_boxes": bool(use_boxes),
                     "color_jitter": float(color_jitter), "dct_scaling": bool(dct_scaling),
                     "crop": dict(crop or {}), "eval_resize": self.eval_resize}
        self.corrupt_records = []  # (epoch, index, replacement, reason)
        self.damaged_records = {}  # index -> warning
        self._logged_corrupt = set()
        self._procs, self._maker, self._tasks, self._results = [], None, None, None
        self._batch_counter = 0
        self.set_epoch(epoch, start_batch)
        if self.train and len(self) == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.num_samples // world_size} training "
                             f"samples of each of the {world_size} rank(s): no full batch to yield")
        if start_batch > len(self):
            raise ValueError(f"start_batch {start_batch} is beyond the epoch's {len(self)} batches")

    # -- epoch bookkeeping -------------------------------------------------------------

    def set_epoch(self, epoch, start_batch=0):
        """Make the next iteration yield epoch ``epoch`` from batch ``start_batch`` on."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    @property
    def position(self):
        """(epoch, batch) of the next batch this loader will yield: save it to resume."""
        return self.epoch, self.start_batch

    def __len__(self):
        """Batches per epoch for this rank (the full epoch, whatever start_batch is)."""
        if self.train:
            return (self.num_samples // self.world_size) // self.batch_size
        lo = self.rank * self.num_samples // self.world_size
        hi = (self.rank + 1) * self.num_samples // self.world_size
        return math.ceil((hi - lo) / self.batch_size)

    @property
    def samples_per_epoch(self):
        """Images this rank yields per full epoch."""
        if self.train:
            return len(self) * self.batch_size
        return (self.rank + 1) * self.num_samples // self.world_size - self.rank * self.num_samples // self.world_size

    # -- workers ------------------------------------------------------------------------

    def _start(self):
        if self._maker is not None or self._procs:
            return
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        size = _slot_bytes(self.num_slots, self.batch_size, self.image_size)
        st = os.statvfs(directory)
        if st.f_bavail * st.f_frsize < size:
            raise RuntimeError(f"{directory} has {st.f_bavail * st.f_frsize >> 20} MiB free, the loader's "
                               f"{self.num_slots} batch slots need {size >> 20} MiB: lower prefetch/batch_size "
                               f"or enlarge it (docker: --shm-size)")
        fd, path = tempfile.mkstemp(prefix="rn50-loader-", dir=directory)
        try:
            os.ftruncate(fd, size)
            os.close(fd)
            self._images, self._labels = _map_slots(path, self.num_slots, self.batch_size, self.image_size)
            if self.workers == 0:
                self._maker = _BatchMaker(self.lmdb_path, self._images, self._labels, self._cfg)
                return
            ctx = mp.get_context(self.start_method)
            if self.start_method == "forkserver":
                ctx.set_forkserver_preload(["data.loader", "data.augment", "data.decode"])
            self._tasks, self._results = ctx.Queue(), ctx.Queue()
            owner = (os.getpid(), _process_start_time(os.getpid()))
            for w in range(self.workers):
                p = ctx.Process(target=_worker_main, daemon=True,
                                args=(w, self.lmdb_path, path, self.batch_size, self.image_size,
                                      self.num_slots, self._cfg, self._tasks, self._results, owner))
                p.start()
                self._procs.append(p)
            for _ in range(self.workers):
                kind, _, payload = self._get_result()
                if kind == "error":
                    raise RuntimeError(f"a loader worker failed to start:\n{payload}")
        except BaseException:
            self.close()
            raise
        finally:
            os.unlink(path)  # every process has it mapped now; the memory lives until they exit

    def _get_result(self):
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"loader worker pid {dead[0].pid} died (exit code {dead[0].exitcode})")

    def close(self):
        """Stop the workers and release the shared slots. Safe to call twice."""
        if self._tasks is not None:
            for _ in self._procs:
                try:
                    self._tasks.put(None)
                except (OSError, ValueError):
                    pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
        self._procs = []
        if self._maker is not None:
            self._maker.close()
            self._maker = None
        self._tasks = self._results = None
        self._images = self._labels = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- iteration ----------------------------------------------------------------------

    def _record_problems(self, epoch, corrupt, damaged):
        # Logged once per record (a bad record comes up every epoch); counted every time.
        for index, replacement, reason in corrupt:
            if index not in self._logged_corrupt:
                self._logged_corrupt.add(index)
                log.warning("epoch %d: record %d is corrupt (%s); using record %d instead (it is replaced "
                            "by another record every time it comes up; logged once)",
                            epoch, index, reason, replacement)
            self.corrupt_records.append((epoch, index, replacement, reason))
        for index, warning in damaged:
            if index not in self.damaged_records:
                self.damaged_records[index] = warning
                log.warning("epoch %d: record %d is a damaged JPEG (libjpeg-turbo: %s); used as decoded "
                            "(logged once; `python -m data.pack --verify` lists such records, a new pack "
                            "re-encodes them)", epoch, index, warning)

    def _output(self, slot, count):
        images, labels = self._images[slot, :count], self._labels[slot, :count]
        if self.copy:
            return images.copy(), labels.copy()
        return images, labels

    def __iter__(self):
        """One epoch (the current one) from ``start_batch``; afterwards the epoch advances."""
        self._start()
        epoch = self.epoch
        batches = shard_batches(self.num_samples, self.batch_size, self.train, self.seed, epoch,
                                self.rank, self.world_size)
        if self.workers == 0:
            for k in range(self.start_batch, len(batches)):
                self._record_problems(epoch, *self._maker.make(0, batches[k], epoch))
                self.start_batch = k + 1
                yield self._output(0, len(batches[k]))
            self.set_epoch(epoch + 1)
            return
        # Batch ids are unique over the loader's life, so results of an abandoned
        # iteration can never be mistaken for this one's.
        base = self._batch_counter
        self._batch_counter += len(batches)
        free = deque(range(self.num_slots))
        done, outstanding = {}, 0
        next_submit = next_yield = self.start_batch
        try:
            while next_yield < len(batches):
                while free and next_submit < len(batches):
                    self._tasks.put((base + next_submit, free.popleft(), batches[next_submit], epoch))
                    next_submit += 1
                    outstanding += 1
                while base + next_yield not in done:
                    kind, batch_id, payload = self._get_result()
                    if kind == "error":
                        raise RuntimeError(f"loader worker failed on a batch:\n{payload}")
                    done[batch_id] = payload
                    outstanding -= 1
                slot, count, corrupt, damaged = done.pop(base + next_yield)
                self._record_problems(epoch, corrupt, damaged)
                next_yield += 1
                self.start_batch = next_yield
                yield self._output(slot, count)
                free.append(slot)
            self.set_epoch(epoch + 1)
        finally:
            # Abandoned mid-epoch (break, exception): wait for the batches still being
            # written so that no worker writes into a slot the next iteration reuses.
            while outstanding > 0 and self._procs:
                try:
                    kind, _, _ = self._get_result()
                except RuntimeError:
                    break
                outstanding -= 1
