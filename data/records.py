"""The on-disk format shared by stage 1 (data.pack) and stage 2 (data.loader).

One LMDB environment (a directory holding data.mdb and lock.mdb) per split.

Keys and values
---------------
``b"0000000000"`` .. ``b"%010d" % (count - 1)``
    One record per image, addressable by its index (ASCII decimal, so keys sort
    in index order and ``mdb_dump`` output is readable). The value is::

        offset size  field
        0      4     magic b"RN50"
        4      4     label        int32, little-endian, index into meta["classes"]
        8      2     num_boxes    uint16
        10     2     flags        uint16, bit 0 = re-encoded by the packer
        12     16*n  boxes        float32 [n, 4] (ymin, xmin, ymax, xmax) in [0, 1]
        12+16n ...   the JPEG file, byte for byte (or re-encoded, see flags)

``b"__meta__"``
    JSON, written in the same transaction as the last record, so a database
    that has it is complete: ``{"format": "rn50-lmdb", "version": 1,
    "count": N, "classes": [wnid, ...], "split": "train", "reencoded": [[index, name], ...],
    "damaged": [[index, name, libjpeg-turbo warning], ...], "skipped": [[name, reason], ...],
    "plan": sha256-of-the-source-list}``. ``damaged`` lists the re-encoded records whose
    source JPEG decoded only with a warning; databases packed before it existed lack it.
    A record's label is an index into ``classes``; the loader replaces a record whose
    label is not.

``b"__progress__"`` (only while packing)
    JSON ``{"plan": ..., "source_done": k, "count": n, "reencoded": [...], "damaged": [...],
    "skipped": [...]}``: the first k source files are dealt with and records 0..n-1 are
    committed. A killed pack resumes from there; the directory keeps the suffix ``.partial``
    until the pack finishes, so a half-written database is never mistaken for a complete one.
"""

import json
import os
import struct

import numpy as np

FORMAT_NAME = "rn50-lmdb"
FORMAT_VERSION = 1
RECORD_MAGIC = b"RN50"
META_KEY = b"__meta__"
PROGRESS_KEY = b"__progress__"
FLAG_REENCODED = 1
_HEADER = struct.Struct("<4siHH")

HOW_TO_BUILD = ("build one with: python -m data.pack --src <imagenet folder or tars> --dst <out dir> "
                "(or data.synthetic.make_dataset + data.pack.pack_folder for a small synthetic set)")


class DataError(RuntimeError):
    """Input data that cannot be used, or an environment the data pipeline cannot work in (a
    loader worker that died, no room for the batch slots). The message is one line; train.py
    prints it and exits 2."""


class DatabaseError(DataError):
    """A database that is missing, incomplete, truncated, damaged or of an unknown format."""


def record_key(index):
    """The LMDB key (bytes) of record ``index`` (int >= 0)."""
    return b"%010d" % index


def encode_record(jpeg, label, boxes=None, flags=0):
    """Pack one record.

    jpeg: bytes of a JPEG file. label: int class index. boxes: None or float array
    [n, 4] (ymin, xmin, ymax, xmax) relative to the image, each in [0, 1].
    Returns the value bytes (layout in the module docstring).
    """
    if boxes is None:
        boxes = np.zeros((0, 4), np.float32)
    boxes = np.ascontiguousarray(boxes, dtype="<f4").reshape(-1, 4)
    return _HEADER.pack(RECORD_MAGIC, int(label), len(boxes), int(flags)) + boxes.tobytes() + bytes(jpeg)


def decode_record(value):
    """Unpack a record value -> (jpeg: memoryview, label: int, boxes: float32 [n, 4], flags: int).

    Raises ValueError if the value is not a record of this format.
    """
    value = memoryview(value)
    if len(value) < _HEADER.size:
        raise ValueError(f"record of {len(value)} bytes is shorter than its {_HEADER.size}-byte header")
    magic, label, n, flags = _HEADER.unpack_from(value, 0)
    if magic != RECORD_MAGIC:
        raise ValueError(f"record magic {bytes(magic)!r} is not {RECORD_MAGIC!r}")
    end = _HEADER.size + 16 * n
    if len(value) < end:
        raise ValueError("record is shorter than its bounding boxes")
    boxes = np.frombuffer(value[_HEADER.size:end], dtype="<f4").reshape(n, 4).astype(np.float32)
    return value[end:], label, boxes, flags


def check_database_files(path):
    """Raise DatabaseError (with how to build one) unless ``path`` looks like a finished LMDB.

    Checks: the directory and data.mdb exist, it is not a ``.partial`` pack, and the
    file is at least as long as LMDB's own meta page says (a truncated copy would
    otherwise crash the reader with SIGBUS when it touches a missing page).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        if os.path.exists(path + ".partial"):
            raise DatabaseError(f"database {path!r} is not finished: a pack was interrupted "
                                f"({path}.partial exists); rerun the same pack command to resume it")
        raise DatabaseError(f"database {path!r} does not exist; {HOW_TO_BUILD}")
    data_file = os.path.join(path, "data.mdb")
    if not os.path.isfile(data_file):
        raise DatabaseError(f"{path!r} is not an LMDB database directory (no data.mdb); {HOW_TO_BUILD}")


_OPEN = {}  # (pid, real path) -> [env, meta, users]: LMDB allows one handle per file per process


def open_database(path):
    """Open a finished database read-only -> (lmdb.Environment, meta dict).

    Each process opens its own handle (LMDB handles do not survive fork); within a
    process, handles are shared and counted: release each with ``close_database(env)``.
    Raises DatabaseError with a one-line explanation for missing, unfinished, truncated,
    damaged or foreign databases: the metadata must be a JSON object of this format with an
    int ``count`` >= 1 and a non-empty ``classes`` list, and the database must hold at least
    ``count`` records besides it (LMDB errors such as ``CorruptedError`` while checking this
    are reported the same way).
    """
    import lmdb

    check_database_files(path)
    path = os.fspath(path)
    key = (os.getpid(), os.path.realpath(path))
    if key in _OPEN:
        _OPEN[key][2] += 1
        return _OPEN[key][0], _OPEN[key][1]
    try:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False,
                        max_readers=512, subdir=True)
    except lmdb.Error as e:
        raise DatabaseError(f"cannot open LMDB database {path!r} ({e}); it may be damaged; {HOW_TO_BUILD}") from None
    info, stat = env.info(), env.stat()
    needed = (info["last_pgno"] + 1) * stat["psize"]
    have = os.path.getsize(os.path.join(path, "data.mdb"))
    if have < needed:
        env.close()
        raise DatabaseError(f"database {path!r} is truncated: data.mdb has {have} bytes, LMDB needs {needed}; "
                            f"copy it again or rebuild it; {HOW_TO_BUILD}")
    try:
        meta = _read_checked_meta(env, path)
    except BaseException:
        env.close()
        raise
    _OPEN[key] = [env, meta, 1]
    return env, meta


def _read_checked_meta(env, path):
    # The metadata record, checked as far as the loader relies on it: a dict of our format with
    # an int count >= 1, a non-empty list of class names, and as many records as it says.
    import lmdb

    def damaged(what):
        return DatabaseError(f"database {path!r} is damaged: {what}; rebuild it; {HOW_TO_BUILD}")

    try:
        with env.begin() as txn:
            raw = txn.get(META_KEY)
        entries = env.stat()["entries"]
    except lmdb.Error as e:  # e.g. lmdb.CorruptedError from a damaged page
        raise damaged(f"LMDB cannot read it ({type(e).__name__}: {e})") from None
    if raw is None:
        raise DatabaseError(f"database {path!r} has no metadata record: it is unfinished or not ours; {HOW_TO_BUILD}")
    try:
        meta = json.loads(bytes(raw))
    except ValueError:  # not UTF-8 or not JSON
        raise damaged("its metadata record is not JSON") from None
    if not isinstance(meta, dict):
        raise damaged(f"its metadata record is a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise DatabaseError(f"database {path!r} has format {meta.get('format')!r} v{meta.get('version')}, "
                            f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}; {HOW_TO_BUILD}")
    count, classes = meta.get("count"), meta.get("classes")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise damaged(f"its metadata count {count!r} is not a whole number >= 1")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise damaged(f"its metadata classes {str(classes)[:60]} is not a non-empty list of class names")
    if entries < count + 1:  # the records 0 .. count-1 and the metadata record
        raise damaged(f"its metadata says {count} records but it holds {entries - 1}")
    return meta


def close_database(env):
    """Release a handle from ``open_database`` (closed when its last user releases it)."""
    for key, entry in list(_OPEN.items()):
        if entry[0] is env:
            entry[2] -= 1
            if entry[2] == 0:
                del _OPEN[key]
                env.close()
            return
    env.close()


def read_meta(path):
    """The metadata dict of a finished database (see module docstring)."""
    env, meta = open_database(path)
    close_database(env)
    return meta
