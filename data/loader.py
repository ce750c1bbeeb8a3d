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
  parent; the server is started in the standard library's folder, so it imports nothing from
  the current one) each open the LMDB themselves (read-only, no lock, no readahead). Batches
  are written by the workers straight into shared-memory slots (a file in /dev/shm whose
  pages are reserved up front, unlinked as soon as every worker has mapped it, so nothing
  leaks if we crash); at most ``prefetch`` batches are in flight, and they come out in order.
  Each worker has a pipe for its tasks and one for its results (no multiprocessing.Queue,
  whose named semaphores a SIGKILL would leave in /dev/shm).
- A record that fails to decode, or whose label is not a class of the database
  (outside [0, len(classes))), is logged once and replaced, every time it comes up, by
  record ``default_rng([seed, epoch, 2, index, attempt]).integers(N)``
  (``loader.corrupt_records``); the epoch goes on. A record that decodes with a
  libjpeg-turbo warning (truncated, damaged entropy-coded data) is used as decoded and
  logged once (``loader.damaged_records``). When a record and the 10 drawn to replace it
  all cannot be used, the loader raises DatabaseError naming the record.
- Nothing is waited for that cannot come: the loader waits on the workers' pipes and their
  process sentinels together, so a worker's error (DatabaseError, or LoaderError for anything
  else) or death (LoaderError naming the worker) ends the wait at once; the other workers are
  then stopped and the next iteration starts new ones. A signal whose handler raises (Ctrl-C)
  ends any wait. All of these are DataError (data.records): one line, exit 2 in train.py.
- Workers end with the process that started them, however it ends (kill -9 included):
  each watches it through a pidfd (Linux >= 5.3; elsewhere it polls) and exits when it
  is gone. The forkserver and multiprocessing's resource tracker exit by themselves once
  no process holds their pipes, i.e. once the workers are gone.

The arrays yielded are views into the shared slots and stay valid until the next
batch is requested; pass ``copy=True`` to get private copies.
"""

import errno
import logging
import math
import multiprocessing as mp
import os
import select
import signal
import tempfile
import threading
import time
import traceback
from collections import deque
from multiprocessing import connection as mp_connection

import numpy as np

from .records import HOW_TO_BUILD, DatabaseError, DataError, close_database, decode_record, open_database, record_key

log = logging.getLogger("data.loader")

MAX_REPLACEMENTS = 10


class LoaderError(DataError):
    """The loader cannot go on: a worker died or failed, or there is no room for the batch slots.
    (A badly damaged database raises DatabaseError.) The message is one line."""


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
        import lmdb

        self.path, self._lmdb_error = os.fspath(lmdb_path), lmdb.Error
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
                except (ValueError, OSError, self._lmdb_error) as e:  # decode errors are ValueError
                    reason = str(e) if isinstance(e, (ValueError, OSError)) else f"LMDB: {type(e).__name__}: {e}"
                    tried += 1
                    if tried > MAX_REPLACEMENTS:
                        first, first_reason = corrupt[-MAX_REPLACEMENTS][0], corrupt[-MAX_REPLACEMENTS][2]
                        raise DatabaseError(f"database {self.path!r} is badly damaged: record {first} cannot be "
                                            f"used ({first_reason}), nor can the {MAX_REPLACEMENTS} records drawn "
                                            f"to replace it (the last, record {index}: {reason}); rebuild it; "
                                            f"{HOW_TO_BUILD}") from None
                    replacement = int(np.random.default_rng([self.cfg["seed"], epoch, 2, index, tried])
                                      .integers(self.num_samples))
                    corrupt.append((index, replacement, reason))
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
    # Runs in a worker process: map the slots, open the database, then make the batches that
    # arrive on ``tasks`` (our end of a pipe from the loader) until the loader closes it, and
    # report each on ``results``. Messages: ("ready", None, None), ("done", batch id, (slot, count,
    # corrupt, damaged)), ("error", batch id or None, (kind, one-line message)); after an error
    # the worker stops (the loader stops every worker then).
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
    except BaseException as e:
        _send_error(results, None, e)
        return
    try:
        results.send(("ready", None, None))
        while True:
            try:
                batch_id, slot, indices, epoch = tasks.recv()
            except EOFError:  # the loader closed our task pipe, or its process is gone
                break
            try:
                made = maker.make(slot, indices, epoch)
            except BaseException as e:
                _send_error(results, batch_id, e)
                break
            results.send(("done", batch_id, (slot, len(indices), *made)))
    except OSError:  # the loader's end of a pipe is closed: it is gone, nothing to report to
        pass
    finally:
        maker.close()


def _send_error(results, batch_id, error):
    # One line for the loader to raise: a DataError's own message; for anything else (a bug) its
    # type, message and the line that raised it.
    if isinstance(error, DataError):
        message = str(error)
    else:
        frames = traceback.extract_tb(error.__traceback__)
        where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
        message = f"{type(error).__name__}: {error}{where}"
    try:
        results.send(("error", batch_id, ("database" if isinstance(error, DatabaseError) else "other", message)))
    except OSError:
        pass


def _slot_bytes(num_slots, batch_size, image_size):
    return num_slots * batch_size * (image_size * image_size * 3 + 4)


def _size_text(n):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _map_slots(path, num_slots, batch_size, image_size):
    # images uint8 [slots, B, S, S, 3] followed by labels int32 [slots, B], one shared file.
    mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(_slot_bytes(num_slots, batch_size, image_size),))
    n_img = num_slots * batch_size * image_size * image_size * 3
    images = mm[:n_img].reshape(num_slots, batch_size, image_size, image_size, 3)
    labels = mm[n_img:].view(np.int32).reshape(num_slots, batch_size)
    return images, labels


_forkserver_lock = threading.Lock()


def _context(start_method):
    """The multiprocessing context for the workers; for forkserver, with its server started in
    the standard library's folder and nothing preloaded. Why: the server (and multiprocessing's
    resource tracker, started with it) runs as `python -c ...`, so the first entry of its
    sys.path is '', the current folder, on every Python up to 3.13 (it ignores the sys.path it is
    sent): started where a run starts, it would import a numba.py lying there (preloading NumPy
    and Numba), or a socket.py (its own imports), and so would every worker forked from it. In
    the standard library's folder, '' names a folder already on its path. (An empty temporary
    folder removed right after the start would do on Python 3.10-3.12; 3.13 fails to import
    when its current folder is gone.) Nothing is preloaded because the server could only find
    our modules through its own sys.path, which need not be the loader's: each worker imports
    them itself with the loader's own sys.path, as multiprocessing sets it up in every child,
    i.e. the code the loader's process would import. That costs each worker ~0.3 s of imports
    at its start (python -X importtime): a 2-worker loader on the tiny synthetic set took
    1.7-2.1 s from construction to its first batch, against 0.9-1.1 s with a preloading server
    (2-core development machine, 3 runs each)."""
    ctx = mp.get_context(start_method)
    if start_method != "forkserver":
        return ctx
    import sysconfig
    from multiprocessing import forkserver

    stdlib = sysconfig.get_path("stdlib")
    with _forkserver_lock:
        here = os.open(".", os.O_RDONLY)  # a descriptor: the folder's path may have changed meanwhile
        try:
            if stdlib and os.path.isdir(stdlib):
                os.chdir(stdlib)
            forkserver.ensure_running()  # nothing to do when it runs already
        finally:
            os.fchdir(here)
            os.close(here)
    return ctx


def _slots_dir():
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


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

    Raises (all data.records.DataError, one line each): DatabaseError for a database that is
    missing, unfinished, truncated or damaged (when it is opened, or while iterating when a
    record and the 10 records drawn to replace it cannot be used); LoaderError when /dev/shm
    cannot hold the batch slots (checked here and when they are made) and when a worker dies or
    fails. ValueError for bad arguments.
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
        self._procs, self._maker, self._task_conns, self._result_conns = [], None, [], []
        self._images = self._labels = None
        self._batch_counter = 0
        self._generation = 0  # counts worker sets: an abandoned iteration leaves a newer set alone
        self._next_worker = 0
        self._check_room()
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

    def _check_room(self):
        # Up front, before anything is built: /dev/shm (64 MiB in a default docker container)
        # must hold the batch slots; the workers would otherwise die of SIGBUS mid-run.
        directory, size = _slots_dir(), _slot_bytes(self.num_slots, self.batch_size, self.image_size)
        st = os.statvfs(directory)
        if st.f_bavail * st.f_frsize < size:
            raise self._room_error(f"{directory} has {_size_text(st.f_bavail * st.f_frsize)} free")

    def _room_error(self, what, remedy=None):
        directory = _slots_dir()
        size = _slot_bytes(self.num_slots, self.batch_size, self.image_size)
        remedy = remedy or f"give {directory} more room (docker run --shm-size)"
        slots = f"{self.num_slots} slot{'s' if self.num_slots > 1 else ''}"
        return LoaderError(
            f"{what}, but the loader's batch slots need {_size_text(size)} there ({slots} of {self.batch_size} "
            f"images of {self.image_size}x{self.image_size}x3): lower --batch-size, --image-size or --workers "
            f"(2 slots per worker; Loader: batch_size, image_size, prefetch) or {remedy}")

    def _make_slot_file(self):
        # The shared slots: a file in /dev/shm whose pages are all reserved now, so that a full
        # /dev/shm is this one line and never a SIGBUS in a worker writing into a slot later.
        directory = _slots_dir()
        size = _slot_bytes(self.num_slots, self.batch_size, self.image_size)
        try:
            fd, path = tempfile.mkstemp(prefix="rn50-loader-", dir=directory)
        except OSError as e:
            raise LoaderError(f"cannot create the loader's batch slots in {directory}: {e.strerror or e}") from None
        try:
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a filesystem without it
                    raise
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            if e.errno == errno.EFBIG:
                raise self._room_error(f"a file-size limit refuses a file this large in {directory} ({e.strerror})",
                                       "raise the limit (ulimit -f)") from None
            if e.errno == errno.ENOSPC:
                raise self._room_error(f"{directory} is full ({e.strerror})") from None
            raise LoaderError(f"cannot make the loader's batch slots in {directory}: {e.strerror or e}") from None
        os.close(fd)
        return path

    def _start(self):
        if self._maker is not None or self._procs:
            return
        path = self._make_slot_file()
        try:
            self._images, self._labels = _map_slots(path, self.num_slots, self.batch_size, self.image_size)
            if self.workers == 0:
                self._maker = _BatchMaker(self.lmdb_path, self._images, self._labels, self._cfg)
                return
            ctx = _context(self.start_method)
            owner = (os.getpid(), _process_start_time(os.getpid()))
            # One pipe each way per worker, no multiprocessing.Queue: a queue holds named
            # semaphores (files in /dev/shm) that a SIGKILL of the whole process group leaves behind.
            for w in range(self.workers):
                task_r, task_w = ctx.Pipe(duplex=False)
                result_r, result_w = ctx.Pipe(duplex=False)
                self._task_conns.append(task_w)
                self._result_conns.append(result_r)
                try:
                    p = ctx.Process(target=_worker_main, daemon=True, name=f"rn50-loader-{w}",
                                    args=(w, self.lmdb_path, path, self.batch_size, self.image_size,
                                          self.num_slots, self._cfg, task_r, result_w, owner))
                    p.start()
                    self._procs.append(p)
                finally:  # the worker has its own copies: ours would hide its death (no EOF)
                    task_r.close()
                    result_w.close()
            ready = 0
            while ready < self.workers:
                self._receive()  # raises for a worker that failed to start
                ready += 1
            self._next_worker = 0
        except BaseException:
            self._stop_workers(0.0)
            raise
        finally:
            os.unlink(path)  # every process has it mapped now; the memory lives until they exit

    def _worker_died(self, w):
        p = self._procs[w]
        p.join(timeout=1.0)
        code = p.exitcode
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
            if code == -signal.SIGKILL:
                how += ": out of memory? see dmesg"
        else:
            how = "still running but its pipe is closed" if code is None else f"exit code {code}"
        return LoaderError(f"loader worker {w} (pid {p.pid}) died ({how}) while making batches of "
                           f"{self.lmdb_path!r}; the batches it had cannot come")

    def _receive(self):
        """The next message of any worker -> (kind, batch id, payload), waiting as long as it takes
        but never for a worker that is gone. Raises LoaderError when a worker has died and the
        error a worker reports (DatabaseError for a badly damaged database, else LoaderError)."""
        conns = self._result_conns
        while True:
            # a worker's death makes its sentinel ready, and its pipe (EOF); a signal handler that
            # raises (KeyboardInterrupt) ends the wait
            ready = mp_connection.wait(conns + [p.sentinel for p in self._procs])
            for w, conn in enumerate(conns):  # messages first: a worker may have sent its last one and exited
                if conn in ready or conn.poll():
                    try:
                        kind, batch_id, payload = conn.recv()
                    except (EOFError, OSError):
                        raise self._worker_died(w) from None
                    if kind == "error":
                        origin, message = payload
                        if origin == "database":
                            raise DatabaseError(message)
                        raise LoaderError(f"loader worker {w} (pid {self._procs[w].pid}) failed on "
                                          f"{self.lmdb_path!r}: {message}")
                    return kind, batch_id, payload
            for w, p in enumerate(self._procs):
                if p.sentinel in ready:
                    raise self._worker_died(w)

    def _submit(self, batch_id, slot, indices, epoch):
        w = self._next_worker
        self._next_worker = (w + 1) % len(self._task_conns)
        try:
            self._task_conns[w].send((batch_id, slot, indices, epoch))
        except OSError:  # BrokenPipeError: the worker is gone
            raise self._worker_died(w) from None

    def _stop_workers(self, wait):
        # Close the task pipes (a worker exits after the batch it is making), give the workers
        # ``wait`` seconds, then kill what is left.
        self._generation += 1
        for conn in self._task_conns:
            conn.close()
        deadline = time.monotonic() + wait
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():  # SIGKILL: a worker has nothing to save, and a stopped one ignores SIGTERM
                p.kill()
        for p in self._procs:
            p.join()
        for conn in self._result_conns:
            conn.close()
        self._procs, self._task_conns, self._result_conns = [], [], []

    def close(self):
        """Stop the workers and release the shared slots. Safe to call twice."""
        self._stop_workers(5.0)
        if self._maker is not None:
            self._maker.close()
            self._maker = None
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
        generation = self._generation
        free = deque(range(self.num_slots))
        done, outstanding = {}, 0
        next_submit = next_yield = self.start_batch
        try:
            while next_yield < len(batches):
                while free and next_submit < len(batches):
                    self._submit(base + next_submit, free.popleft(), batches[next_submit], epoch)
                    next_submit += 1
                    outstanding += 1
                while base + next_yield not in done:
                    _, batch_id, payload = self._receive()
                    done[batch_id] = payload
                    outstanding -= 1
                slot, count, corrupt, damaged = done.pop(base + next_yield)
                self._record_problems(epoch, corrupt, damaged)
                next_yield += 1
                self.start_batch = next_yield
                yield self._output(slot, count)
                free.append(slot)
            self.set_epoch(epoch + 1)
        except GeneratorExit:
            # Abandoned mid-epoch (break, the iterator dropped): let the batches in flight be
            # written, so that no worker writes into a slot the next iteration reuses.
            if generation == self._generation:
                try:
                    while outstanding > 0:
                        self._receive()
                        outstanding -= 1
                except Exception:  # a worker died or failed meanwhile: the next iteration starts afresh
                    self._stop_workers(0.0)
                except BaseException:  # Ctrl-C
                    self._stop_workers(0.0)
                    raise
            raise
        except BaseException:
            # A worker failed or died, or Ctrl-C: the batches in flight may never come, so nobody
            # waits for them; the workers are stopped and the next iteration starts new ones.
            if generation == self._generation:
                self._stop_workers(0.0)
            raise
