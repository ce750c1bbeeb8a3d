"""The data pipeline on hostile input: every damaged database, dead worker, decompression bomb,
FIFO, bad box file and full /dev/shm ends in one line (DataError; train.py: exit 2) or a logged
skip, never a hang or a traceback; workers import nothing from the current folder and leave no
semaphore files behind; runs that prepare the synthetic cache together build it once.

Damaged databases are copies of train.py's tiny synthetic set with one kind of damage each. The
tests that could hang without the fix carry a timeout, so that a hang fails them."""

import io
import json
import logging
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

import data
from data import decode
from data.loader import Loader, LoaderError
from data.pack import main as pack_main
from data.pack import pack_folder, prepare_image
from data.records import (META_KEY, DatabaseError, close_database, decode_record, encode_record, open_database,
                          read_meta, record_key)

ROOT = Path(data.__file__).resolve().parent.parent
REPO_ENV = dict(os.environ, PYTHONPATH=str(ROOT))
HANG = pytest.mark.timeout(90)  # a hang fails the test instead of stalling CI


def _copy(tiny_data, tmp_path):
    dst = tmp_path / "db"
    shutil.copytree(tiny_data, dst)
    return dst


def _rewrite_records(path, change):
    """change(index, jpeg, label, boxes) -> new record value, or None to delete the record."""
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        count = json.loads(bytes(txn.get(META_KEY)))["count"]
        for k in range(count):
            jpeg, label, boxes, _ = decode_record(txn.get(record_key(k)))
            value = change(k, bytes(jpeg), label, boxes)
            if value is None:
                txn.delete(record_key(k))
            else:
                txn.put(record_key(k), value)
    env.close()


def _rewrite_meta(path, change):
    """change(meta dict) -> the new metadata record (bytes)."""
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(META_KEY, change(json.loads(bytes(txn.get(META_KEY)))))
    env.close()


def _damage_pages(path, page_kind):
    """Overwrite the header of every LMDB page of one kind (1 = branch, 2 = leaf), except the leaf
    that holds the metadata record, as a disk error would: LMDB then raises CorruptedError."""
    file = Path(path) / "data.mdb"
    buf = bytearray(file.read_bytes())
    page = 4096
    env = lmdb.open(str(path), readonly=True, lock=False)
    assert env.stat()["psize"] == page
    env.close()
    damaged = 0
    for p in range(2, len(buf) // page):  # pages 0 and 1 are LMDB's own meta pages
        flags = struct.unpack_from("<H", buf, p * page + 10)[0]
        if flags == page_kind and META_KEY not in buf[p * page:(p + 1) * page]:
            buf[p * page:p * page + 16] = b"\xa5" * 16
            damaged += 1
    assert damaged > 0
    file.write_bytes(bytes(buf))


def _all_labels(label):
    return lambda k, jpeg, _, boxes: encode_record(jpeg, label, boxes)


def _bad_magic(k, jpeg, label, boxes):
    return b"XXXX" + encode_record(jpeg, label, boxes)[4:]


def _nan_boxes(k, jpeg, label, boxes):
    return encode_record(jpeg, label, np.full((1, 4), np.nan, np.float32))


# (split, damage, what the error says): damage that leaves no usable record, found while reading
GIVE_UP = {
    "every train label out of range": ("train", lambda p: _rewrite_records(p, _all_labels(7)), "label 7 is outside"),
    "every val label out of range": ("val", lambda p: _rewrite_records(p, _all_labels(-1)), "label -1 is outside"),
    "bad record magic": ("train", lambda p: _rewrite_records(p, _bad_magic), "record magic b'XXXX'"),
    "NaN boxes": ("train", lambda p: _rewrite_records(p, _nan_boxes), "bbox coordinates"),
    "damaged leaf pages": ("train", lambda p: _damage_pages(p, 2), "LMDB: CorruptedError"),
}
# damage that opening the database finds
AT_OPEN = {
    "count larger than the records": (lambda p: _rewrite_meta(p, lambda m: json.dumps({**m, "count": m["count"] + 5})
                                                               .encode()), "says 101 records but it holds 96"),
    "missing records": (lambda p: _rewrite_records(p, lambda k, j, l, b: None if k % 10 == 3 else encode_record(j, l, b)),
                        "says 96 records but it holds 86"),
    "classes: []": (lambda p: _rewrite_meta(p, lambda m: json.dumps({**m, "classes": []}).encode()),
                    "classes [] is not a non-empty list"),
    "meta not JSON": (lambda p: _rewrite_meta(p, lambda m: b"{not json"), "metadata record is not JSON"),
    "meta a list": (lambda p: _rewrite_meta(p, lambda m: b"[1, 2]"), "is a JSON list, not an object"),
    "string count": (lambda p: _rewrite_meta(p, lambda m: json.dumps({**m, "count": "96"}).encode()),
                     "count '96' is not a whole number"),
    "damaged branch page": (lambda p: _damage_pages(p, 1), "LMDB cannot read it (CorruptedError"),
}


def _one_line(error):
    text = str(error)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@HANG
@pytest.mark.parametrize("case", GIVE_UP)
def test_a_database_without_usable_records_is_one_error_naming_a_record(tiny_data, tmp_path, case):
    split, damage, reason = GIVE_UP[case]
    db = _copy(tiny_data, tmp_path) / f"{split}.lmdb"
    damage(db)
    for workers in (0, 2):
        loader = Loader(db, 8, train=split == "train", image_size=16, workers=workers)
        t0 = time.monotonic()
        with pytest.raises(DatabaseError) as info:
            for _ in loader:
                pass
        message = _one_line(info.value)
        assert f"database '{db}' is badly damaged: record " in message and reason in message, message
        assert not loader._procs, "the workers are stopped after the error"
        assert time.monotonic() - t0 < 30
        # the loader stays usable: the next iteration starts new workers and fails the same way
        with pytest.raises(DatabaseError, match="badly damaged"):
            next(iter(loader))
        loader.close()


@HANG
@pytest.mark.parametrize("case", AT_OPEN)
def test_damage_found_when_opening_is_one_error(tiny_data, tmp_path, case):
    damage, reason = AT_OPEN[case]
    db = _copy(tiny_data, tmp_path) / "train.lmdb"
    damage(db)
    for workers in (0, 2):
        with pytest.raises(DatabaseError) as info:
            Loader(db, 8, train=True, image_size=16, workers=workers)
        message = _one_line(info.value)
        assert message.startswith(f"database '{db}' is damaged: ") and reason in message, message


def _train_py(args, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=REPO_ENV,
                          capture_output=True, text=True, timeout=timeout)


@HANG
@pytest.mark.parametrize("workers", [0, 1])
def test_train_py_on_a_database_without_usable_labels_exits_2_in_one_line(tiny_data, tmp_path, workers):
    # The run from the hostile sweep: it hung with workers >= 1 and printed a traceback with 0.
    db = _copy(tiny_data, tmp_path)
    _rewrite_records(db / "train.lmdb", _all_labels(7))
    proc = _train_py(["--data", db, "--out", tmp_path / "run", "--device", "cpu", "--workers", workers,
                      "--no-progress", "--batch-size", "8", "--width", "0.0625", "--image-size", "32"])
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and errors[0].startswith(f"train.py: error: database '{db / 'train.lmdb'}' is badly "
                                                     f"damaged: record "), proc.stderr


@HANG
@pytest.mark.parametrize("when", ["mid-epoch", "between epochs"])
def test_a_killed_worker_is_one_error_naming_it(tiny_data, when):
    with Loader(tiny_data / "train.lmdb", 8, train=True, image_size=16, workers=2) as loader:
        batches = iter(loader)
        next(batches)
        if when == "between epochs":
            for _ in batches:
                pass
            batches = iter(loader)
        victim = loader._procs[1].pid
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(LoaderError) as info:
            for _ in batches:
                pass
        assert _one_line(info.value).startswith(f"loader worker 1 (pid {victim}) died (killed by SIGKILL")
        assert not loader._procs
        images, _ = next(iter(loader))  # new workers
        assert images.shape == (8, 16, 16, 3)


@HANG
def test_one_ctrl_c_ends_a_wait_for_a_stuck_worker(tiny_data):
    # A worker that never answers (stopped here; a hung filesystem alike): one KeyboardInterrupt
    # ends the wait, and the workers are gone afterwards, the stopped one included (SIGKILL).
    import threading

    with Loader(tiny_data / "train.lmdb", 8, train=True, image_size=16, workers=1, prefetch=2) as loader:
        batches = iter(loader)
        next(batches)
        worker = loader._procs[0]
        os.kill(worker.pid, signal.SIGSTOP)
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                for _ in batches:
                    pass
        finally:
            timer.cancel()
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGKILL)
        assert time.monotonic() - t0 < 10
        assert not loader._procs and worker.exitcode == -signal.SIGKILL


def test_slots_too_large_for_dev_shm_are_refused_up_front(tiny_data):
    with pytest.raises(LoaderError) as info:
        Loader(tiny_data / "train.lmdb", 8, train=True, image_size=100_000, workers=1)
    message = _one_line(info.value)
    assert "free, but the loader's batch slots need 447.0 GiB there (2 slots of 8 images of 100000x100000x3)" in message
    for flag in ("--batch-size", "--image-size", "--workers", "--shm-size"):
        assert flag in message


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_size_limit_on_the_slots_is_one_error(tiny_data, workers):
    # 16 images of 128x128x3 in 1 or 2 slots: 0.75 or 1.5 MiB, over a 256 KiB ulimit -f
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    loader = Loader(tiny_data / "train.lmdb", 16, train=True, image_size=128, workers=workers)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, hard))
    try:
        with pytest.raises(LoaderError) as info:
            next(iter(loader))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = _one_line(info.value)
    assert message.startswith("a file-size limit refuses a file this large in ") and "File too large" in message
    assert message.endswith("or raise the limit (ulimit -f)")
    assert not loader._procs
    next(iter(loader))  # without the limit it works
    loader.close()


def test_a_full_dev_shm_is_one_error_not_a_sigbus_later(tiny_data, monkeypatch):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with Loader(tiny_data / "train.lmdb", 8, train=True, image_size=16, workers=1) as loader:
        with pytest.raises(LoaderError, match=r"is full \(No space left on device\), but the loader's batch slots need"):
            next(iter(loader))


NUMBA_HERE = """
with open(__file__ + ".imported", "w") as f:
    f.write("imported from the current folder")
"""

LOADER_CHILD = r"""
import sys, time
from data.loader import Loader

if __name__ == "__main__":
    loader = Loader(sys.argv[1], 4, train=True, image_size=16, workers=2)
    images, labels = next(iter(loader))
    print("batch", images.shape, flush=True)
    if sys.argv[2] == "wait":
        time.sleep(120)
    loader.close()
"""


@HANG
def test_workers_import_nothing_from_the_current_folder(tiny_data, tmp_path):
    here, scripts = tmp_path / "here", tmp_path / "scripts"
    here.mkdir()
    scripts.mkdir()
    (here / "numba.py").write_text(NUMBA_HERE)
    (scripts / "child.py").write_text(LOADER_CHILD)
    proc = subprocess.run([sys.executable, str(scripts / "child.py"), str(tiny_data / "train.lmdb"), "exit"],
                          cwd=here, env=REPO_ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "batch (4, 16, 16, 3)" in proc.stdout, proc.stderr
    assert not (here / "numba.py.imported").exists(), "a worker (or the forkserver) imported ./numba.py"


def _session(sid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[3]) == sid:
                pids.append(int(entry))
    return pids


@HANG
@pytest.mark.skipif(not os.path.isdir("/dev/shm") or not os.path.isdir("/proc/self"), reason="needs /dev/shm and /proc")
def test_sigkill_of_the_whole_run_leaves_no_semaphore_files(tiny_data, tmp_path):
    # kill -9 of the process group (docker kill, the OOM killer, a scheduler) takes the resource
    # tracker with it, so nothing would remove a named semaphore the loader had made.
    (tmp_path / "child.py").write_text(LOADER_CHILD)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(tiny_data / "train.lmdb"), "wait"],
                            cwd=ROOT, env=REPO_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert "batch" in proc.stdout.readline(), proc.stderr.read()
        processes = _session(proc.pid)
        assert len(processes) >= 4  # the loader's process, 2 workers, the forkserver (and the tracker)
        semaphores = set()
        for pid in processes:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                path = line.split(maxsplit=5)[-1]
                if path.startswith("/dev/shm/sem."):
                    semaphores.add(path.removesuffix(" (deleted)"))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = sorted(p for p in semaphores if os.path.exists(p))
    for p in left:  # leave the machine clean even when the test fails
        os.unlink(p)
    assert not left, f"semaphore files left in /dev/shm: {left}"


# --------------------------------------------------------------------------- decompression bombs
def bomb_jpeg(height=65500, width=65500):
    """A valid 16x16 JPEG whose frame header (SOF0) says height x width: a few hundred bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, "JPEG", quality=90)
    jpeg = bytearray(buf.getvalue())
    sof = jpeg.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    struct.pack_into(">HH", jpeg, sof + 5, height, width)
    return bytes(jpeg)


BOMB_CHILD = r"""
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
from data.decode import decode_jpeg
from data.pack import prepare_image
bomb = open(sys.argv[1], "rb").read()
for f in (decode_jpeg, prepare_image):
    t0 = time.monotonic()
    try:
        f(bomb)
        print(f.__name__, "decoded it")
    except ValueError as e:
        print(f.__name__, "refused in %.3f s:" % (time.monotonic() - t0), e)
"""


def test_a_decompression_bomb_is_refused_before_allocating(tmp_path):
    # 65500 x 65500 x 3 bytes would be 12 GiB; the decoders run under a 1 GiB address-space limit
    bomb = bomb_jpeg()
    assert len(bomb) < 1000
    (tmp_path / "bomb.jpg").write_bytes(bomb)
    (tmp_path / "child.py").write_text(BOMB_CHILD)
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "bomb.jpg")], cwd=ROOT,
                          env=REPO_ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    for name, line in zip(("decode_jpeg", "prepare_image"), lines):
        assert line.startswith(f"{name} refused in "), line
        assert float(line.split()[3]) < 1.0
        assert line.endswith(f"the header says 65500x65500 pixels, over the limit of {decode.MAX_PIXELS} "
                             f"(data.decode.MAX_PIXELS): refused before decoding (a decompression bomb?)")
    assert decode.MAX_PIXELS == 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS
    rgb = decode.decode_jpeg(bomb_jpeg(16, 16))  # the same file with its true size decodes
    assert rgb.shape == (16, 16, 3)


def bomb_png(height, width):
    """A valid 16x16 PNG whose header (IHDR, CRC fixed up) says height x width."""
    import zlib

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    ihdr = png.index(b"IHDR")
    struct.pack_into(">II", png, ihdr + 4, width, height)
    struct.pack_into(">I", png, ihdr + 17, zlib.crc32(png[ihdr:ihdr + 17]))
    return bytes(png)


def test_a_bomb_is_a_skipped_file_in_the_pack_and_a_replaced_record_in_the_loader(tmp_path, caplog):
    folder = tmp_path / "src" / "train" / "n0"
    folder.mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((20, 24, 3), 60 * k, np.uint8)).save(folder / f"ok{k}.JPEG", quality=90)
    # 100 M pixels: over the limit, yet only 300 MB should a regression decode it in this process
    (folder / "bomb.JPEG").write_bytes(bomb_jpeg(10000, 10000))
    (folder / "big.JPEG").write_bytes(bomb_png(8000, 12000))  # 96 M pixels: Pillow itself would only warn
    with caplog.at_level(logging.WARNING, logger="data.pack"):
        path = pack_folder(str(tmp_path / "src"), str(tmp_path / "db"), splits=("train",), workers=1,
                           progress=False)["train"]
    meta = read_meta(path)
    assert meta["count"] == 3
    assert [name for name, _ in meta["skipped"]] == ["n0/big.JPEG", "n0/bomb.JPEG"]
    assert "skipping unreadable n0/bomb.JPEG: the header says 10000x10000 pixels" in caplog.text
    assert "skipping unreadable n0/big.JPEG: the header says 12000x8000 pixels" in caplog.text
    # a bomb written into a database later is a record the loader replaces
    env = lmdb.open(path)
    with env.begin(write=True) as txn:
        txn.put(record_key(1), encode_record(bomb_jpeg(10000, 10000), 0))
    env.close()
    for workers in (0, 1):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.loader"):
            with Loader(path, 3, train=False, image_size=16, workers=workers) as loader:
                images = np.concatenate([x.copy() for x, _ in loader])
                corrupt = list(loader.corrupt_records)
        assert images.shape == (3, 16, 16, 3)
        assert corrupt and {index for _, index, _, _ in corrupt} == {1}
        assert all(r.startswith("the header says 10000x10000 pixels, over the limit") for _, _, _, r in corrupt)
        assert "record 1 is corrupt (the header says 10000x10000 pixels" in caplog.text


# --------------------------------------------------------------------------- data.pack's sources
def _small_source(root, names):
    folder = Path(root) / "train" / "n0"
    folder.mkdir(parents=True)
    for k, name in enumerate(names):
        Image.fromarray(np.full((30, 40, 3), 40 * k, np.uint8)).save(folder / name, quality=90)
    return folder


@HANG
def test_a_fifo_named_like_an_image_is_skipped_not_waited_for(tmp_path, caplog):
    folder = _small_source(tmp_path / "src", ["a.JPEG", "c.JPEG"])
    os.mkfifo(folder / "b.jpg")  # nobody ever writes into it
    for workers in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.pack"):
            path = pack_folder(str(tmp_path / "src"), str(tmp_path / f"db{workers}"), splits=("train",),
                               workers=workers, progress=False)["train"]
        meta = read_meta(path)
        assert meta["count"] == 2 and meta["skipped"] == [["n0/b.jpg", "not a regular file (a FIFO)"]]
        assert "skipping unreadable n0/b.jpg: not a regular file (a FIFO)" in caplog.text


BAD_BOXES = {
    "a.JPEG": ("<annotation><size><width>40", "not well-formed XML (no element found: line 1, column 27)"),
    "b.JPEG": ("<annotation><object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
               "</object></annotation>", "no <size> (the image's width and height, which the boxes are relative to)"),
    "c.JPEG": ("<annotation><size><width>0</width><height>30</height></size></annotation>",
               "<size> says 0x30: a width and height must be > 0"),
    "d.JPEG": ("<annotation><size><width>40</width><height>30</height></size><object><bndbox><xmin>4</xmin>"
               "<ymin>3</ymin><xmax>nan</xmax><ymax>15</ymax></bndbox></object></annotation>",
               "<bndbox> 0: <xmax> 'nan' is not a finite number"),
    "e.JPEG": ("<annotation><size><width>40</width><height>30</height></size><object><bndbox><xmin>4</xmin>"
               "<ymin>3</ymin><xmax>20</xmax><ymax>15</ymax></bndbox></object></annotation>", None),
}


def test_a_bad_box_file_is_blamed_and_its_image_kept_without_boxes(tmp_path, caplog, capsys):
    _small_source(tmp_path / "src", list(BAD_BOXES))
    boxes = tmp_path / "boxes" / "n0"
    boxes.mkdir(parents=True)
    for name, (xml, _) in BAD_BOXES.items():
        (boxes / name.replace(".JPEG", ".xml")).write_text(xml)
    args = ["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "db"), "--splits", "train", "--workers", "1",
            "--boxes", str(tmp_path / "boxes")]
    with caplog.at_level(logging.WARNING, logger="data.pack"):
        assert pack_main(args) == 0
    env, meta = open_database(tmp_path / "db" / "train.lmdb")
    assert meta["count"] == 5 and meta["skipped"] == []
    with env.begin() as txn:
        stored = [decode_record(txn.get(record_key(k)))[2] for k in range(5)]
    close_database(env)
    for (name, (_, problem)), record_boxes in zip(BAD_BOXES.items(), stored):
        xml = boxes / name.replace(".JPEG", ".xml")
        if problem is None:
            np.testing.assert_allclose(record_boxes, [[0.1, 0.1, 0.5, 0.5]], atol=1e-6)
        else:
            assert record_boxes.shape == (0, 4)
            assert f"ignoring the box file {xml}: {problem}; n0/{name} is stored without boxes" in caplog.text
    # --strict: the first bad box file fails the pack, in one line
    capsys.readouterr()
    assert pack_main(args[:3] + [str(tmp_path / "strict")] + args[4:] + ["--strict"]) == 2
    err = capsys.readouterr().err  # the progress bar, then the error
    assert "Traceback" not in err and err.endswith("\n")
    assert err.splitlines()[-1] == f"error: bad box file for 'n0/a.JPEG': {boxes / 'a.xml'}: {BAD_BOXES['a.JPEG'][1]}"


# --------------------------------------------------------------------------- the synthetic cache
PREPARE = """
import sys
sys.path.insert(0, sys.argv[1])
import train
print("dataset:", train.prepare_synthetic("tiny", progress=False), flush=True)
"""


@pytest.mark.slow
def test_runs_preparing_the_synthetic_cache_together_build_it_once(tmp_path):
    env = dict(REPO_ENV, MLPERF_RESNET_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(ROOT)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    said = [out for out, _ in outputs]
    paths = {line for out in said for line in out.splitlines() if line.startswith("dataset:")}
    assert len(paths) == 1, said
    builders = [out for out in said if "(once; cached)" in out]
    waiters = [out for out in said if "waiting for another run that is preparing the synthetic dataset" in out]
    assert len(builders) == 1, said
    assert len(waiters) <= 2  # the others waited for the lock, or came when the cache was ready
    folder = Path(paths.pop().split(": ", 1)[1])
    for split, count in (("train", 96), ("val", 32)):
        meta = read_meta(folder / f"{split}.lmdb")
        assert meta["count"] == count and meta["skipped"] == [] and meta["damaged"] == []
