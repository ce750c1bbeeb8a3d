"""Stage 1: pack ImageNet (folder layout or the official tars) into one LMDB per split.

    python -m data.pack --src /data/imagenet --dst /data/lmdb [--workers 16]
    python -m data.pack --src /data/imagenet --dst /data/lmdb --verify

``--src`` holds either the folder layout ``train/<wnid>/*.JPEG`` and
``val/<wnid>/*.JPEG`` (a flat ``val/`` needs ``--val-labels``), or the official
``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per class inside) and
``ILSVRC2012_img_val.tar`` (flat, needs ``--val-labels``). Output:
``<dst>/train.lmdb`` and ``<dst>/val.lmdb``; the record layout is in data/records.py.

``--val-labels FILE``: one line per validation image, either ``<file name> <wnid>``
or just ``<wnid>`` (then line i labels ``ILSVRC2012_val_%08d.JPEG % i``, i from 1).
The devkit's ``ILSVRC2012_validation_ground_truth.txt`` holds devkit class ids,
not wnids; map them through the devkit's meta.mat first.
``--boxes DIR``: optional bounding-box XML files (``DIR/<wnid>/<stem>.xml`` or
``DIR/<stem>.xml``, PASCAL VOC layout as in ILSVRC2012_bbox_train_v2.tar).

What is stored: every JPEG byte for byte (grayscale ones too), except that a file
whose *content* is not a JPEG (e.g. the PNG among ImageNet's training files) or is a
CMYK/YCCK JPEG (22 of them) is re-encoded as an RGB JPEG, quality 100, 4:4:4.
A damaged JPEG that libjpeg-turbo decodes only with a warning (a truncated file,
corrupt entropy-coded data) is re-encoded the same way from its best-effort decode
and listed in the metadata as ``damaged``. A file that neither decodes as JPEG nor
opens in Pillow is skipped and listed in the metadata (``--strict`` makes it fail the
pack instead); so is a file whose header claims more than ``data.decode.MAX_PIXELS``
pixels (refused before anything is allocated) and anything that is not a regular file (a
FIFO named x.jpg would block the read forever). A box file that is not usable XML is
logged and its image stored without boxes (``--strict``: the pack fails). ``--verify``
also reports stored JPEGs that decode with a warning.

Safety: the database is built in ``<name>.partial`` and renamed when finished; each
transaction commits a run of records together with a progress record, so a killed
pack resumes where it stopped when run again with the same arguments. The LMDB map
grows (doubles) whenever it is full. A destination that cannot be written (a file in
the way, no permission, a full disk) ends the pack with a one-line error and exit
code 2; after a full disk, the same command resumes from the last commit.
"""

import argparse
import errno
import hashlib
import io
import json
import logging
import math
import os
import shutil
import signal
import stat
import sys
import tarfile
import time
import warnings
import xml.etree.ElementTree as ET

import numpy as np

from .records import (FLAG_REENCODED, close_database, FORMAT_NAME, FORMAT_VERSION, META_KEY, PROGRESS_KEY, DatabaseError,
                      decode_record, encode_record, open_database, record_key)

log = logging.getLogger("data.pack")

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"


class PackError(RuntimeError):
    """A source that cannot be packed (bad layout, unreadable file under --strict, ...)
    or a destination that cannot be written."""


# ---------------------------------------------------------------------------------------
# Content inspection and re-encoding (runs in the worker processes)
# ---------------------------------------------------------------------------------------

def _encode_rgb(rgb):
    # The one re-encoding the packer does: RGB JPEG, quality 100, 4:4:4 chroma.
    from PIL import Image

    out = io.BytesIO()
    (rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)).save(out, "JPEG", quality=100, subsampling=0)
    return out.getvalue()


def prepare_image(data):
    """Decide how one source file is stored.

    data: the file's bytes. Returns (jpeg_bytes, reencoded: bool, warning: str or None).
    warning is libjpeg-turbo's message for a damaged JPEG that decodes only with a warning
    (truncated, corrupt entropy-coded data): such a file is re-encoded from that decode,
    so that the stored record decodes cleanly.
    Raises ValueError if the content is neither a decodable JPEG nor an image Pillow reads,
    or if its header claims more than ``data.decode.MAX_PIXELS`` pixels.
    Detection is by content (magic bytes, JPEG colour space, decoder warnings), never by
    file name. Cost: one decode per clean JPEG, as a plain check would take.
    """
    from .decode import check_pixels, decode_jpeg_checked, jpeg_header

    if data[:3] == b"\xff\xd8\xff":
        try:
            height, width, colorspace = jpeg_header(data)
        except ValueError as e:
            raise ValueError(f"undecodable JPEG: {e}") from None
        check_pixels(height, width)  # a decompression bomb is refused before anything is allocated
        try:
            rgb, warning = decode_jpeg_checked(data)  # proves it decodes; a clean file is kept as it is
        except ValueError as e:
            raise ValueError(f"undecodable JPEG: {e}") from None
        if warning is not None:
            return _encode_rgb(rgb), True, warning
        if colorspace not in ("CMYK", "YCCK"):
            return data, False, None
    from PIL import Image

    def unreadable(e):
        # (no str(e): Pillow's messages hold object addresses, and the metadata must be reproducible)
        return ValueError(f"neither a JPEG nor an image Pillow can read ({type(e).__name__})")

    try:
        with warnings.catch_warnings():  # Pillow's warning about a large image: check_pixels decides below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own limit (2x its warning limit)
        raise ValueError(f"refused before decoding by Pillow: {e}") from None
    except Exception as e:  # Pillow raises many types for bad input
        raise unreadable(e) from None
    with img:
        check_pixels(img.height, img.width)  # before Pillow allocates the image
        try:
            rgb = img.convert("RGB")
        except Exception as e:
            raise unreadable(e) from None
    return _encode_rgb(rgb), True, None


def parse_box_xml(path):
    """Bounding boxes of a PASCAL-VOC XML file -> float32 [n, 4] (ymin, xmin, ymax, xmax)
    as fractions of the image size, clipped to [0, 1].

    Raises ValueError saying what is wrong for a file that is not such XML: not well-formed,
    no ``<size>`` or a width or height that is not a positive number, a coordinate that is
    missing or not a finite number, a box whose max is below its min.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"not well-formed XML ({e})") from None

    def number(node, tag, where):
        text = node.findtext(tag)
        if text is None:
            raise ValueError(f"{where} has no <{tag}>")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{where}: <{tag}> {text.strip()[:20]!r} is not a finite number")
        return value

    size = root.find("size")
    if size is None:
        raise ValueError("no <size> (the image's width and height, which the boxes are relative to)")
    width, height = number(size, "width", "<size>"), number(size, "height", "<size>")
    if width <= 0 or height <= 0:
        raise ValueError(f"<size> says {width:g}x{height:g}: a width and height must be > 0")
    boxes = []
    for k, box in enumerate(root.iter("bndbox")):
        xmin, ymin, xmax, ymax = (number(box, t, f"<bndbox> {k}") for t in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise ValueError(f"<bndbox> {k} has its max below its min")
        boxes.append((ymin / height, xmin / width, ymax / height, xmax / width))
    return np.clip(np.array(boxes, np.float32).reshape(-1, 4), 0.0, 1.0)


def _read_regular_file(path):
    # Only a regular file is read: a FIFO named x.jpg would block the pack forever, and a
    # device (a link to /dev/zero) would never end. O_NONBLOCK lets us open a FIFO to look at it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a folder" if stat.S_ISDIR(mode) else "special")
            raise ValueError(f"not a regular file ({kind})")
        return f.read()


def _prepare_item(item):
    # item = (name, label, path or None, bytes or None, box xml path or None)
    # -> (name, record value or None, reencoded, why it is unreadable, libjpeg-turbo warning, box file problem)
    name, label, path, data, box_path = item
    try:
        if data is None:
            data = _read_regular_file(path)
        jpeg, reencoded, warning = prepare_image(data)
    except (OSError, ValueError) as e:
        return name, None, False, str(e), None, None
    boxes, box_problem = None, None
    if box_path:  # a bad box file is the box file's fault: the image is kept, without boxes
        try:
            boxes = parse_box_xml(box_path)
        except (OSError, ValueError) as e:
            box_problem = f"{box_path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
    return name, encode_record(jpeg, label, boxes, FLAG_REENCODED if reencoded else 0), reencoded, None, warning, \
        box_problem


# ---------------------------------------------------------------------------------------
# Sources: a deterministic, ordered list of (name, label, path, bytes, box path)
# ---------------------------------------------------------------------------------------

def _is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def read_val_labels(path):
    """Parse a validation label file -> {file name: wnid} (format in the module docstring)."""
    labels = {}
    with open(path) as f:
        lines = [ln.split() for ln in f if ln.strip()]
    for i, parts in enumerate(lines, start=1):
        if len(parts) >= 2:
            labels[os.path.basename(parts[0])] = parts[1]
        else:
            labels["ILSVRC2012_val_%08d.JPEG" % i] = parts[0]
    return labels


def _box_path(boxes_dir, wnid, file_name):
    if not boxes_dir:
        return None
    stem = os.path.splitext(file_name)[0]
    for p in (os.path.join(boxes_dir, wnid, stem + ".xml"), os.path.join(boxes_dir, stem + ".xml")):
        if os.path.isfile(p):
            return p
    return None


class FolderSource:
    """Images of one split in a folder: ``<dir>/<wnid>/<file>`` or flat with a label file."""

    def __init__(self, split_dir, classes=None, val_labels=None, boxes_dir=None):
        if not os.path.isdir(split_dir):
            raise PackError(f"source folder {split_dir!r} does not exist")
        subdirs = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        entries = []  # (relative name, wnid)
        if subdirs:
            for wnid in subdirs:
                for f in sorted(os.listdir(os.path.join(split_dir, wnid))):
                    if _is_image_name(f):
                        entries.append((f"{wnid}/{f}", wnid))
        else:
            if val_labels is None:
                raise PackError(f"{split_dir!r} has no class subfolders; pass --val-labels for a flat folder")
            labels = read_val_labels(val_labels)
            for f in sorted(os.listdir(split_dir)):
                if _is_image_name(f):
                    if f not in labels:
                        raise PackError(f"{f!r} has no entry in the label file {val_labels!r}")
                    entries.append((f, labels[f]))
        if not entries:
            raise PackError(f"no image files (*.JPEG, *.jpg, *.png) found under {split_dir!r}")
        self.classes = list(classes) if classes is not None else sorted({w for _, w in entries})
        index = {w: i for i, w in enumerate(self.classes)}
        missing = sorted({w for _, w in entries} - set(index))
        if missing:
            raise PackError(f"classes {missing[:5]} of {split_dir!r} are not in the class list")
        self.split_dir = split_dir
        self.items = [(name, index[w], os.path.join(split_dir, name), None,
                       _box_path(boxes_dir, w, os.path.basename(name))) for name, w in entries]
        self.plan = hashlib.sha256(json.dumps([self.classes, entries]).encode()).hexdigest()

    def __len__(self):
        return len(self.items)

    def iterate(self, start=0):
        """Items from position ``start`` on (name, label, path, None, box path)."""
        return iter(self.items[start:])

    def read_bytes(self, name):
        with open(os.path.join(self.split_dir, name), "rb") as f:
            return f.read()


class TarSource:
    """The official ImageNet tars: train = a tar of per-class tars, val = a flat tar + labels."""

    def __init__(self, tar_path, classes=None, val_labels=None, boxes_dir=None):
        if not os.path.isfile(tar_path):
            raise PackError(f"source tar {tar_path!r} does not exist")
        self.tar_path, self.boxes_dir = tar_path, boxes_dir
        with tarfile.open(tar_path) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
        self.nested = bool(members) and all(m.name.endswith(".tar") for m in members)
        if self.nested:
            found = sorted(os.path.basename(m.name)[:-4] for m in members)
            self.labels_by_file = None
        else:
            if val_labels is None:
                raise PackError(f"{tar_path!r} is a flat tar; pass --val-labels to label its images")
            self.labels_by_file = read_val_labels(val_labels)
            found = sorted(set(self.labels_by_file.values()))
        self.classes = list(classes) if classes is not None else found
        self._index = {w: i for i, w in enumerate(self.classes)}
        stat = os.stat(tar_path)
        label_digest = hashlib.sha256(json.dumps(self.labels_by_file, sort_keys=True).encode()).hexdigest()
        self.plan = hashlib.sha256(json.dumps([os.path.abspath(tar_path), stat.st_size, self.classes,
                                               label_digest]).encode()).hexdigest()
        self._len = None

    def __len__(self):
        if self._len is None:
            self._len = sum(1 for _ in self._walk(read=False))
        return self._len

    def _walk(self, read=True):
        # Yields (name, wnid, bytes or None) in the tars' stored order.
        with tarfile.open(self.tar_path) as outer:
            for member in outer:
                if not member.isfile():
                    continue
                if self.nested:
                    wnid = os.path.basename(member.name)[:-4]
                    with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                        for m in inner:
                            if m.isfile() and _is_image_name(m.name):
                                yield (f"{wnid}/{os.path.basename(m.name)}", wnid,
                                       inner.extractfile(m).read() if read else None)
                elif _is_image_name(member.name):
                    base = os.path.basename(member.name)
                    if base not in self.labels_by_file:
                        raise PackError(f"{base!r} has no entry in the validation label file")
                    yield base, self.labels_by_file[base], outer.extractfile(member).read() if read else None

    def iterate(self, start=0):
        for k, (name, wnid, data) in enumerate(self._walk(read=True)):
            if k < start:
                continue
            if wnid not in self._index:
                raise PackError(f"class {wnid!r} of {name!r} is not in the class list")
            yield (name, self._index[wnid], None, data, _box_path(self.boxes_dir, wnid, os.path.basename(name)))

    def read_bytes(self, name):
        for n, _, data in self._walk(read=True):
            if n == name:
                return data
        raise KeyError(name)


# ---------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------

def free_space(path):
    """'12.3 GiB free': the free space of the filesystem holding path (or its nearest existing
    ancestor), for messages about full disks."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024


def _write_failed(partial, error, done, total):
    """The PackError for a write into the database that failed (full disk, I/O error)."""
    return PackError(f"writing {partial!r} failed ({error}) with {free_space(partial)} there: is the disk "
                     f"full? Nothing committed is lost ({done} of {total} source files): free some space and "
                     f"rerun the same command to resume the pack")


def _check_destination(folder):
    """Create ``folder`` (and its parents) or raise PackError saying why it cannot be."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        if existing == os.path.abspath(folder):
            raise PackError(f"the destination {folder!r} is a file, not a folder")
        raise PackError(f"cannot create the folder {folder!r}: {existing!r} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise PackError(f"cannot create the folder {folder!r}: {e.strerror or e}") from None


def _open_writable(partial, map_size):
    import lmdb

    try:
        return lmdb.open(partial, map_size=int(map_size), subdir=True, readahead=False, meminit=False)
    except (OSError, lmdb.Error) as e:
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PackError(f"cannot write the database {partial!r}: {e.strerror}") from None
        raise PackError(f"cannot write the database {partial!r}: {getattr(e, 'strerror', None) or e} "
                        f"({free_space(partial)} there)") from None


def _commit(env, records, progress):
    """Write records + progress in one transaction, doubling the map while it is full.

    Raises lmdb.Error (other than MapFullError) when the disk refuses the write; the
    transaction is then aborted and the database holds the previous commit.
    """
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in records:
                    txn.put(key, value)
                for key, value in progress.items():
                    if value is None:
                        txn.delete(key)
                    else:
                        txn.put(key, value)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


# Tests: after this many source items the packing process sends SIGINT to its process group, as
# Ctrl-C in a terminal does (the CLI path has no other way in).
_interrupt_after_items = None


def _interrupt_process_group():
    # Ctrl-C as a terminal sends it, with the pool workers given 0.5 s to react before this process
    # does (so that a test sees what they do with it).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        os.killpg(os.getpgrp(), signal.SIGINT)
        time.sleep(0.5)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_without_ctrl_c(workers):
    """A pool of `workers` spawned processes that ignore SIGINT.  Ctrl-C in a terminal signals the
    whole process group; the packing process handles it (the pool is terminated, what was committed
    stays), so a worker must not die of it with a traceback, not even while it is still importing
    NumPy.  An ignored signal stays ignored through the exec of a spawned worker (and Python keeps
    it so), so the workers are started while this process ignores SIGINT; the initializer does the
    same for a worker the pool starts later."""
    import multiprocessing as mp
    import threading

    main = threading.current_thread() is threading.main_thread()   # only it may set handlers
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        return mp.get_context("spawn").Pool(workers, initializer=_ignore_sigint)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _bounded_map(pool, workers, items, block):
    # Ordered parallel map that keeps at most two blocks of items in flight (Pool.imap
    # would read the whole source, e.g. a 140 GB tar, into its task queue).
    from collections import deque
    from itertools import islice

    in_flight = deque()
    while True:
        chunk = list(islice(items, block))
        if chunk:
            in_flight.append(pool.map_async(_prepare_item, chunk,
                                             chunksize=max(1, len(chunk) // (4 * workers))))
        if in_flight and (len(in_flight) >= 2 or not chunk):
            yield from in_flight.popleft().get()
        if not chunk and not in_flight:
            return


def pack(source, dst, split="train", workers=None, strict=False, commit_every=256, map_size=1 << 30,
         overwrite=False, progress=True, _crash_after_commits=None):
    """Pack one split from ``source`` (a FolderSource or TarSource) into the LMDB ``dst``.

    dst: the database directory to create (e.g. ``out/train.lmdb``); built as
        ``dst + ".partial"`` and renamed at the end; an existing ``.partial`` of the same
        plan is resumed. workers: processes (None = all cores; <= 1 packs in-process).
    strict: fail on an unreadable file or box file instead of skipping it. commit_every: records
    per transaction. map_size: initial LMDB map size in bytes (grows as needed).
    Returns the metadata dict written (see data/records.py).
    """
    import lmdb
    from tqdm import tqdm

    dst = os.fspath(dst).rstrip("/")
    partial = dst + ".partial"
    _check_destination(os.path.dirname(os.path.abspath(dst)))
    if os.path.exists(dst):
        if not overwrite:
            try:
                env, meta = open_database(dst)
                close_database(env)
            except DatabaseError as e:
                raise PackError(f"{dst!r} exists but is not a finished database ({e}); "
                                f"remove it or pass overwrite=True / --overwrite") from None
            if meta.get("plan") != source.plan:
                raise PackError(f"{dst!r} was packed from a different source; pass overwrite=True / --overwrite")
            log.info("%s is already packed (%d records)", dst, meta["count"])
            return meta
        _remove(dst)
    env = _open_writable(partial, map_size)
    with env.begin() as txn:
        raw = txn.get(PROGRESS_KEY)
    state = json.loads(bytes(raw)) if raw else None
    if state is not None and (state.get("plan") != source.plan or overwrite):
        if not overwrite:
            env.close()
            raise PackError(f"{partial!r} is an unfinished pack of a different source; remove it or "
                            f"pass overwrite=True / --overwrite")
        env.close()
        _remove(partial)
        env = _open_writable(partial, map_size)
        state = None
    if state is None:
        state = {"plan": source.plan, "source_done": 0, "count": 0, "skipped": [], "reencoded": [], "damaged": []}
    elif progress:
        log.info("resuming %s at source item %d (%d records)", partial, state["source_done"], state["count"])
    state.setdefault("damaged", [])  # a pack begun before damaged files were told apart
    committed = state["source_done"]
    total = len(source)
    items = source.iterate(start=state["source_done"])
    workers = os.cpu_count() if workers is None else int(workers)
    pool = None
    if workers > 1:
        pool = _pool_without_ctrl_c(workers)
        results = _bounded_map(pool, workers, items, block=max(commit_every, 8 * workers))
    else:
        results = map(_prepare_item, items)
    bar = tqdm(total=total, initial=state["source_done"], desc=f"pack {split}", unit="img",
               disable=not progress, dynamic_ncols=True)
    pending, commits = [], 0
    try:
        for name, value, reencoded, error, warning, box_problem in results:
            state["source_done"] += 1
            if box_problem is not None:
                if strict:
                    raise PackError(f"bad box file for {name!r}: {box_problem}")
                log.warning("ignoring the box file %s; %s is stored without boxes", box_problem, name)
            if value is None:
                if strict:
                    raise PackError(f"cannot read {name!r}: {error}")
                log.warning("skipping unreadable %s: %s", name, error)
                state["skipped"].append([name, error])
            else:
                pending.append((record_key(state["count"]), value))
                if reencoded:
                    state["reencoded"].append([state["count"], name])
                if warning is not None:
                    log.warning("re-encoding damaged JPEG %s (libjpeg-turbo: %s)", name, warning)
                    state["damaged"].append([state["count"], name, warning])
                state["count"] += 1
            bar.update(1)
            if state["source_done"] == _interrupt_after_items:
                _interrupt_process_group()
            if len(pending) >= commit_every:
                try:
                    _commit(env, pending, {PROGRESS_KEY: json.dumps(state).encode()})
                except lmdb.Error as e:
                    raise _write_failed(partial, e, committed, total) from None
                pending, commits, committed = [], commits + 1, state["source_done"]
                if _crash_after_commits is not None and commits >= _crash_after_commits:
                    os._exit(3)  # test hook: die like a killed process, no cleanup at all
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "split": split, "count": state["count"],
                "classes": list(source.classes), "plan": source.plan, "reencoded": state["reencoded"],
                "damaged": state["damaged"], "skipped": state["skipped"]}
        if state["count"] == 0:
            raise PackError(f"no readable images in the {split} source")
        try:
            _commit(env, pending, {PROGRESS_KEY: None, META_KEY: json.dumps(meta).encode()})
            env.sync()
        except lmdb.Error as e:
            raise _write_failed(partial, e, committed, total) from None
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        env.close()
    try:
        os.replace(partial, dst)
    except OSError as e:
        raise PackError(f"the pack is complete in {partial!r} but renaming it to {dst!r} failed "
                        f"({e.strerror or e}); rename it by hand") from None
    if progress:
        log.info("packed %s: %d images, %d re-encoded (%d of them damaged JPEGs), %d skipped", dst, meta["count"],
                 len(meta["reencoded"]), len(meta["damaged"]), len(meta["skipped"]))
    return meta


def _remove(path):
    # --overwrite: remove an old database (or unfinished pack) before building a new one.
    try:
        shutil.rmtree(path)
    except OSError as e:
        raise PackError(f"cannot remove {path!r} to rebuild it: {e.strerror or e}") from None


def make_source(src, split, classes=None, val_labels=None, boxes_dir=None):
    """The source of one split under ``src``: ``src/<split>/`` or ``src/ILSVRC2012_img_<split>.tar``."""
    folder = os.path.join(src, split)
    tar = os.path.join(src, TRAIN_TAR if split == "train" else VAL_TAR)
    if os.path.isdir(folder):
        return FolderSource(folder, classes, val_labels, boxes_dir)
    if os.path.isfile(tar):
        return TarSource(tar, classes, val_labels, boxes_dir)
    raise PackError(f"no {split} data in {src!r}: expected a folder {folder!r} or a tar {tar!r}")


def pack_folder(src, dst, splits=("train", "val"), workers=None, val_labels=None, boxes_dir=None,
                strict=False, overwrite=False, progress=True, **kwargs):
    """Pack every split of an ImageNet-style ``src`` into ``<dst>/<split>.lmdb``.

    src: folder with ``train/<wnid>/*`` and ``val/<wnid>/*`` (or the official tars).
    The class list is the sorted wnids of the train split (the first split packed)
    and is shared by all splits. Returns {split: database path}.
    Extra keyword arguments go to ``pack``.
    """
    paths, classes = {}, None
    for split in splits:
        source = make_source(src, split, classes, val_labels, boxes_dir)
        classes = source.classes
        path = os.path.join(dst, f"{split}.lmdb")
        pack(source, path, split=split, workers=workers, strict=strict, overwrite=overwrite,
             progress=progress, **kwargs)
        paths[split] = path
    return paths


def verify(db_path, source, progress=True):
    """Check a database against its source -> list of problems (empty when it matches).

    Every stored record must equal its source file byte for byte (re-encoded ones must
    decode to the source image's size), with the same label, in source order, and must
    decode without a libjpeg-turbo warning (a damaged JPEG stored by an older pack, or
    damaged in the database since).
    """
    from PIL import Image
    from tqdm import tqdm

    from .decode import decode_jpeg_checked

    env, meta = open_database(db_path)
    problems = []
    skipped = {name for name, _ in meta["skipped"]}
    reencoded = {index for index, _ in meta["reencoded"]}
    if meta.get("plan") != source.plan:
        problems.append("the database was packed from a different source list")
    if meta["classes"] != list(source.classes):
        problems.append("class lists differ")
    index = 0
    with env.begin() as txn:
        for name, label, path, data, _ in tqdm(source.iterate(), total=len(source), desc="verify",
                                               unit="img", disable=not progress):
            if name in skipped:
                continue
            raw = txn.get(record_key(index))
            if raw is None:
                problems.append(f"record {index} ({name}) is missing")
                break
            jpeg, stored_label, _, flags = decode_record(raw)
            if data is None:
                with open(path, "rb") as f:
                    data = f.read()
            if stored_label != label:
                problems.append(f"record {index} ({name}): label {stored_label} != {label}")
            try:
                image, warning = decode_jpeg_checked(jpeg)
            except ValueError as e:
                image, warning = None, None
                problems.append(f"record {index} ({name}): the stored JPEG does not decode ({e})")
            if warning is not None:
                problems.append(f"record {index} ({name}): the stored JPEG decodes with a warning "
                                f"(libjpeg-turbo: {warning}); pack again with --overwrite to re-encode it")
            if index in reencoded or flags & FLAG_REENCODED:
                with Image.open(io.BytesIO(data)) as img:
                    size = img.size
                if image is not None and (image.shape[1], image.shape[0]) != size:
                    problems.append(f"record {index} ({name}): re-encoded size "
                                    f"{(image.shape[1], image.shape[0])} != {size}")
            elif bytes(jpeg) != data:
                problems.append(f"record {index} ({name}): bytes differ from the source file")
            index += 1
    if index != meta["count"]:
        problems.append(f"database has {meta['count']} records, source gives {index}")
    close_database(env)
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.pack", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="ImageNet folder (train/, val/) or folder with the official tars")
    p.add_argument("--dst", required=True, help="output folder; gets <split>.lmdb per split")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--val-labels", default=None, help="label file for a flat val folder/tar")
    p.add_argument("--boxes", default=None, help="folder of bounding-box XML files (optional)")
    p.add_argument("--strict", action="store_true",
                   help="fail on an unreadable file or box file instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="rebuild existing databases")
    p.add_argument("--verify", action="store_true", help="check existing databases against the source")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.verify:
            bad, classes = False, None
            for split in args.splits:
                source = make_source(args.src, split, classes, args.val_labels, args.boxes)
                classes = source.classes
                problems = verify(os.path.join(args.dst, f"{split}.lmdb"), source)
                for line in problems[:20]:
                    print(f"{split}: {line}")
                print(f"{split}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
                bad = bad or bool(problems)
            return 1 if bad else 0
        pack_folder(args.src, args.dst, args.splits, args.workers, args.val_labels, args.boxes,
                    args.strict, args.overwrite)
    except (PackError, DatabaseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a source folder we may not read: the system's one-line reason
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted" + ("" if args.verify else ": run the same command again to resume from the last commit"),
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
