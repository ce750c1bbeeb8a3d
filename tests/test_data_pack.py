"""Stage 1: data.pack on a small folder with ImageNet's quirks, tars, interruption, verify,
damaged JPEGs, and destinations that cannot be written."""

import ctypes
import io
import json
import logging
import multiprocessing as mp
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile

import lmdb
import numpy as np
import pytest
import simplejpeg
from PIL import Image

import data
from data.decode import decode_jpeg
from data.loader import Loader
from data.pack import FolderSource, PackError, main, pack, pack_folder, parse_box_xml, verify
from data.records import (META_KEY, DatabaseError, close_database, decode_record, encode_record, open_database,
                          record_key)
from tests.test_data_decode import damaged_jpegs

CLASSES = ["n01000001", "n01000002", "n01000003"]


def _image(seed, h=30, w=40):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    return np.clip(base + 3 * np.stack([yy, xx, yy + xx], -1) + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def _save(arr, path, fmt="JPEG", mode="RGB", **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt, **kw)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return buf.getvalue()


def make_source(root, with_bad=True):
    """train/ with 3 classes x 4 images (incl. grayscale, CMYK, PNG named .JPEG, corrupt,
    not-an-image), val/ with 2 per class. Returns {relative name: kind}."""
    kinds = {}
    for split, per_class in (("train", 4), ("val", 2)):
        for c, wnid in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
            for k in range(per_class):
                name = f"{wnid}/{wnid}_{k}.JPEG"
                path = os.path.join(root, split, name)
                kind = "jpeg"
                if split == "train":
                    kind = {(0, 1): "gray", (1, 2): "cmyk", (2, 0): "png"}.get((c, k), "jpeg")
                arr = _image(100 * c + k + (50 if split == "val" else 0))
                if kind == "png":
                    _save(arr, path, "PNG")
                else:
                    _save(arr, path, mode={"gray": "L", "cmyk": "CMYK"}.get(kind, "RGB"), quality=90)
                kinds[f"{split}/{name}"] = kind
    if with_bad:
        with open(os.path.join(root, "train", CLASSES[2], f"{CLASSES[2]}_8.JPEG"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + bytes(30))  # a JPEG start, then garbage
        with open(os.path.join(root, "train", CLASSES[2], f"{CLASSES[2]}_9.JPEG"), "wb") as f:
            f.write(b"this is not an image")
        kinds[f"train/{CLASSES[2]}/{CLASSES[2]}_8.JPEG"] = "corrupt"
        kinds[f"train/{CLASSES[2]}/{CLASSES[2]}_9.JPEG"] = "corrupt"
    return kinds


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    kinds = make_source(str(root))
    dst = tmp_path_factory.mktemp("db")
    paths = pack_folder(str(root), str(dst), workers=2, progress=False)
    return str(root), paths, kinds


def _records(path):
    env, meta = open_database(path)
    with env.begin() as txn:
        recs = [decode_record(bytes(txn.get(record_key(i)))) for i in range(meta["count"])]
    close_database(env)
    return [(bytes(j), l, b.tolist(), f) for j, l, b, f in recs], meta


def test_quirks_stored_as_specified(packed):
    root, paths, kinds = packed
    recs, meta = _records(paths["train"])
    assert meta["classes"] == CLASSES and meta["split"] == "train"
    names = sorted(n for n, k in kinds.items() if n.startswith("train/") and k != "corrupt")
    assert meta["count"] == len(names) == 12
    assert sorted(n for n, _ in meta["skipped"]) == [f"{CLASSES[2]}/{CLASSES[2]}_8.JPEG", f"{CLASSES[2]}/{CLASSES[2]}_9.JPEG"]
    reencoded = {name: i for i, name in meta["reencoded"]}
    assert sorted(reencoded) == [f"{CLASSES[1]}/{CLASSES[1]}_2.JPEG", f"{CLASSES[2]}/{CLASSES[2]}_0.JPEG"]
    for i, name in enumerate(names):
        jpeg, label, boxes, flags = recs[i]
        rel = name[len("train/"):]
        with open(os.path.join(root, name), "rb") as f:
            src = f.read()
        assert label == CLASSES.index(rel.split("/")[0])
        if kinds[name] in ("jpeg", "gray"):
            assert jpeg == src and flags == 0, name  # byte for byte, grayscale included
        else:
            assert reencoded[rel] == i and flags == 1
            hdr = Image.open(io.BytesIO(jpeg))
            assert hdr.format == "JPEG" and hdr.mode == "RGB"
            ref = np.asarray(Image.open(io.BytesIO(src)).convert("RGB")).astype(int)
            diff = np.abs(decode_jpeg(jpeg).astype(int) - ref)
            assert diff.max() <= 4 and diff.mean() < 0.6, name  # quality 100, 4:4:4: colour round trip only
    val, vmeta = _records(paths["val"])
    assert vmeta["count"] == 6 and vmeta["classes"] == CLASSES and [r[1] for r in val] == [0, 0, 1, 1, 2, 2]


def test_strict_fails_on_unreadable(tmp_path):
    make_source(str(tmp_path / "src"))
    with pytest.raises(PackError, match="_8.JPEG"):
        pack_folder(str(tmp_path / "src"), str(tmp_path / "db"), splits=("train",), workers=1,
                    strict=True, progress=False)
    assert not os.path.exists(tmp_path / "db" / "train.lmdb")


def _crashing_pack(src, dst):
    pack(FolderSource(os.path.join(src, "train")), dst, workers=1, commit_every=3, progress=False,
         _crash_after_commits=2)


def test_interrupted_pack_resumes_to_the_same_database(packed, tmp_path):
    root, paths, _ = packed
    dst = str(tmp_path / "train.lmdb")
    proc = mp.get_context("fork").Process(target=_crashing_pack, args=(root, dst))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3  # died without any cleanup after 2 commits (6 of 14 files)
    assert os.path.isdir(dst + ".partial") and not os.path.exists(dst)
    with pytest.raises(DatabaseError, match="interrupted"):
        open_database(dst)
    with pytest.raises(DatabaseError, match="interrupted"):
        Loader(dst, 2, train=True, workers=0)
    env = lmdb.open(dst + ".partial", readonly=True, lock=False)
    with env.begin() as txn:
        progress = json.loads(bytes(txn.get(b"__progress__")))
        assert txn.get(META_KEY) is None
    env.close()
    assert progress["source_done"] == 6 and progress["count"] == 6
    meta = pack(FolderSource(os.path.join(root, "train")), dst, workers=2, commit_every=3, progress=False)
    assert not os.path.exists(dst + ".partial")
    resumed, rmeta = _records(dst)
    clean, cmeta = _records(paths["train"])
    assert rmeta == cmeta == meta
    assert resumed == clean


def test_missing_truncated_and_foreign_databases(packed, tmp_path):
    _, paths, _ = packed
    with pytest.raises(DatabaseError, match="does not exist.*python -m data.pack"):
        open_database(str(tmp_path / "nope.lmdb"))
    with pytest.raises(DatabaseError, match="python -m data.pack"):
        Loader(str(tmp_path / "nope.lmdb"), 2, train=True, workers=0)
    cut = str(tmp_path / "cut.lmdb")
    shutil.copytree(paths["train"], cut)
    data = os.path.join(cut, "data.mdb")
    os.truncate(data, os.path.getsize(data) // 2)
    with pytest.raises(DatabaseError, match="truncated.*python -m data.pack"):
        open_database(cut)
    with pytest.raises(DatabaseError, match="truncated"):
        Loader(cut, 2, train=False, workers=0)
    empty = tmp_path / "empty.lmdb"
    empty.mkdir()
    with pytest.raises(DatabaseError, match="no data.mdb"):
        open_database(str(empty))


def test_map_size_grows(tmp_path):
    # 6 noisy 160x160 JPEGs (~30 KB each) into a 64 KiB map: only growing makes them fit.
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "src" / "n1")
    files = []
    for k in range(6):
        files.append(_save(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8),
                           tmp_path / "src" / "n1" / f"{k}.JPEG", quality=90))
    dst = str(tmp_path / "t.lmdb")
    meta = pack(FolderSource(str(tmp_path / "src")), dst, workers=1, map_size=64 << 10, commit_every=2,
                progress=False)
    assert os.path.getsize(os.path.join(dst, "data.mdb")) > sum(map(len, files)) > 64 << 10
    assert [r[0] for r in _records(dst)[0]] == files and meta["count"] == 6


def test_already_packed_is_kept_and_other_sources_refused(packed, tmp_path):
    root, paths, _ = packed
    before = os.path.getmtime(os.path.join(paths["val"], "data.mdb"))
    pack_folder(root, os.path.dirname(paths["val"]), splits=("val",), workers=1, progress=False)
    assert os.path.getmtime(os.path.join(paths["val"], "data.mdb")) == before
    with pytest.raises(PackError, match="different source"):
        pack(FolderSource(os.path.join(root, "train")), paths["val"], progress=False)


def test_verify(packed, tmp_path):
    root, paths, _ = packed
    assert verify(paths["train"], FolderSource(os.path.join(root, "train")), progress=False) == []
    assert main(["--src", root, "--dst", os.path.dirname(paths["train"]), "--verify"]) == 0
    copy = tmp_path / "src"
    shutil.copytree(root, copy)
    victim = copy / "train" / CLASSES[0] / f"{CLASSES[0]}_3.JPEG"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = verify(paths["train"], FolderSource(str(copy / "train")), progress=False)
    assert any("bytes differ" in p and "_3.JPEG" in p for p in problems)
    assert main(["--src", str(copy), "--dst", os.path.dirname(paths["train"]), "--splits", "train", "--verify"]) == 1


def test_official_tars_and_boxes(packed, tmp_path):
    root, paths, _ = packed
    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid in CLASSES:
            inner_path = tmp_path / f"{wnid}.tar"
            with tarfile.open(inner_path, "w") as inner:
                for f in sorted(os.listdir(os.path.join(root, "train", wnid))):
                    inner.add(os.path.join(root, "train", wnid, f), arcname=f)
            outer.add(inner_path, arcname=f"{wnid}.tar")
    labels = tmp_path / "val_labels.txt"
    with tarfile.open(tars / "ILSVRC2012_img_val.tar", "w") as vt, open(labels, "w") as lf:
        for wnid in CLASSES:
            for f in sorted(os.listdir(os.path.join(root, "val", wnid))):
                vt.add(os.path.join(root, "val", wnid, f), arcname=f)
                lf.write(f"{f} {wnid}\n")
    boxes = tmp_path / "boxes" / CLASSES[0]
    boxes.mkdir(parents=True)
    (boxes / f"{CLASSES[0]}_0.xml").write_text(
        "<annotation><size><width>40</width><height>30</height></size>"
        "<object><bndbox><xmin>4</xmin><ymin>3</ymin><xmax>20</xmax><ymax>15</ymax></bndbox></object>"
        "<object><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object></annotation>")
    np.testing.assert_allclose(parse_box_xml(boxes / f"{CLASSES[0]}_0.xml"),
                               [[0.1, 0.1, 0.5, 0.5], [0, 0, 1, 1]], atol=1e-6)
    out = pack_folder(str(tars), str(tmp_path / "db"), workers=2, val_labels=str(labels),
                      boxes_dir=str(tmp_path / "boxes"), progress=False)
    from_tar, tmeta = _records(out["train"])
    from_folder, fmeta = _records(paths["train"])
    assert tmeta["count"] == fmeta["count"] and tmeta["classes"] == CLASSES
    assert [r[0] for r in from_tar] == [r[0] for r in from_folder]
    assert [r[1] for r in from_tar] == [r[1] for r in from_folder]
    np.testing.assert_allclose(from_tar[0][2], [[0.1, 0.1, 0.5, 0.5], [0, 0, 1, 1]], atol=1e-6)
    assert all(len(r[2]) == 0 for r in from_tar[1:])
    assert [r[1] for r in _records(out["val"])[0]] == [0, 0, 1, 1, 2, 2]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--src", str(tmp_path), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no train data") and err.count("\n") == 1


def test_damaged_jpegs_are_reencoded_listed_and_verified(tmp_path, caplog):
    # A half-truncated JPEG and one with damaged entropy-coded data decode only with a
    # libjpeg-turbo warning: packed re-encoded from that decode, listed; --verify reports
    # such a record when a database holds it as it was (an older pack, or damage since).
    jpegs = damaged_jpegs()
    src = tmp_path / "src" / "train" / "n1"
    src.mkdir(parents=True)
    names = {"clean": "n1/a.JPEG", "truncated": "n1/b.JPEG", "entropy": "n1/c.JPEG"}
    for kind, name in names.items():
        (tmp_path / "src" / "train" / name).write_bytes(jpegs[kind])
    expected = {}
    for kind in ("truncated", "entropy"):  # the library's own verdict, asked directly
        with pytest.raises(ValueError) as e:
            simplejpeg.decode_jpeg(jpegs[kind], strict=True)
        expected[kind] = str(e.value)
    assert expected["truncated"] == "Premature end of JPEG file"
    assert expected["entropy"].startswith("Corrupt JPEG data: ")
    with caplog.at_level(logging.WARNING, logger="data.pack"):
        path = pack_folder(str(tmp_path / "src"), str(tmp_path / "db"), splits=("train",), workers=1,
                           progress=False)["train"]
    recs, meta = _records(path)
    assert meta["damaged"] == [[1, names["truncated"], expected["truncated"]],
                               [2, names["entropy"], expected["entropy"]]]
    assert meta["reencoded"] == [[1, names["truncated"]], [2, names["entropy"]]] and meta["skipped"] == []
    for kind in ("truncated", "entropy"):
        assert f"re-encoding damaged JPEG {names[kind]} (libjpeg-turbo: {expected[kind]})" in caplog.text
    assert recs[0][0] == jpegs["clean"] and recs[0][3] == 0
    for index, kind in ((1, "truncated"), (2, "entropy")):
        jpeg, _, _, flags = recs[index]
        assert flags == 1
        stored = simplejpeg.decode_jpeg(jpeg, strict=True).astype(int)  # decodes cleanly now
        best_effort = simplejpeg.decode_jpeg(jpegs[kind], strict=False).astype(int)
        diff = np.abs(stored - best_effort)
        assert diff.max() <= 4 and diff.mean() < 0.6  # quality 100, 4:4:4: colour round trip only
    assert verify(path, FolderSource(str(tmp_path / "src" / "train")), progress=False) == []
    # --strict fails only on files that do not decode at all
    strict = pack_folder(str(tmp_path / "src"), str(tmp_path / "strict"), splits=("train",), workers=1,
                         strict=True, progress=False)["train"]
    assert _records(strict)[1]["damaged"] == meta["damaged"]
    # A database that holds the truncated file byte for byte, as packs before this check did
    old = tmp_path / "old" / "train.lmdb"
    shutil.copytree(path, old)
    env = lmdb.open(str(old))
    with env.begin(write=True) as txn:
        txn.put(record_key(1), encode_record(jpegs["truncated"], 0))
    env.close()
    problems = verify(str(old), FolderSource(str(tmp_path / "src" / "train")), progress=False)
    assert problems == [f"record 1 ({names['truncated']}): the stored JPEG decodes with a warning "
                        f"(libjpeg-turbo: Premature end of JPEG file); pack again with --overwrite to re-encode it"]
    assert main(["--src", str(tmp_path / "src"), "--dst", str(old.parent), "--splits", "train", "--verify"]) == 1


def _one_line_error(err):
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


def test_destination_in_a_file_is_a_one_line_error(packed, tmp_path, capsys):
    root = packed[0]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["--src", root, "--dst", str(blocker / "out"), "--splits", "val"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line == f"error: cannot create the folder '{blocker / 'out'}': '{blocker}' is a file, not a folder"
    assert main(["--src", root, "--dst", str(blocker), "--splits", "val"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line == f"error: the destination '{blocker}' is a file, not a folder"
    assert blocker.read_text() == "not a folder"


def _without_dac_override():
    # preexec_fn: drop CAP_DAC_OVERRIDE (and CAP_DAC_READ_SEARCH) from the bounding set, so that
    # root, too, is refused writes into a read-only folder after the exec.
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


def _run_pack_cli(args, preexec_fn=None):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(data.__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    return subprocess.run([sys.executable, "-m", "data.pack", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=preexec_fn)


def test_read_only_destination_is_a_one_line_error(packed, tmp_path):
    root = packed[0]
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    probe = subprocess.run([sys.executable, "-c", f"open({str(read_only / 'probe')!r}, 'w')"],
                           preexec_fn=_without_dac_override, capture_output=True)
    if probe.returncode == 0:
        pytest.skip("cannot make a read-only folder here: this user may write anywhere (root with "
                    "CAP_DAC_OVERRIDE that could not be dropped)")
    try:
        proc = _run_pack_cli(["--src", root, "--dst", str(read_only), "--splits", "val", "--workers", "1"],
                             _without_dac_override)
        assert proc.returncode == 2
        assert _one_line_error(proc.stderr) == (f"error: cannot write the database '{read_only / 'val.lmdb.partial'}': "
                                                f"Permission denied")
        proc = _run_pack_cli(["--src", root, "--dst", str(read_only / "out"), "--splits", "val", "--workers", "1"],
                             _without_dac_override)
        assert proc.returncode == 2
        assert _one_line_error(proc.stderr) == (f"error: cannot create the folder '{read_only / 'out'}': "
                                                f"Permission denied")
    finally:
        read_only.chmod(0o755)


FREE_SPACE = r"\d+(\.\d)? (bytes|KiB|MiB|GiB|TiB) free"


def test_full_disk_is_a_one_line_error_and_the_pack_resumes(tmp_path):
    # A real write failure: RLIMIT_FSIZE makes the kernel refuse writes past 96 KiB with EFBIG
    # (Python ignores SIGXFSZ), which LMDB reports as on a full disk.
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "src" / "train" / "n1")
    for k in range(12):  # ~18 KB each
        _save(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), tmp_path / "src" / "train" / "n1" / f"{k}.JPEG",
              quality=90)
    args = ["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "db"), "--splits", "train", "--workers", "1"]

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (96 << 10, 96 << 10))

    proc = _run_pack_cli(args, small_disk)
    assert proc.returncode == 2, proc.stderr
    partial = tmp_path / "db" / "train.lmdb.partial"
    assert re.fullmatch(rf"error: writing '{re.escape(str(partial))}' failed \(mdb_txn_commit: .+\) with "
                        rf"{FREE_SPACE} there: is the disk full\? Nothing committed is lost \(0 of 12 source "
                        rf"files\): free some space and rerun the same command to resume the pack",
                        _one_line_error(proc.stderr)), proc.stderr
    proc = _run_pack_cli(args)
    assert proc.returncode == 0, proc.stderr
    assert verify(str(tmp_path / "db" / "train.lmdb"), FolderSource(str(tmp_path / "src" / "train")),
                  progress=False) == []


def test_write_failure_mid_pack_keeps_what_was_committed(packed, tmp_path, monkeypatch):
    root, paths, _ = packed
    import data.pack as pack_module

    real_commit, calls = pack_module._commit, []

    def failing_commit(env, records, progress):
        calls.append(len(records))
        if len(calls) == 3:
            raise lmdb.Error("mdb_txn_commit: Input/output error")
        real_commit(env, records, progress)

    monkeypatch.setattr(pack_module, "_commit", failing_commit)
    dst = str(tmp_path / "train.lmdb")
    with pytest.raises(PackError) as e:
        pack(FolderSource(os.path.join(root, "train")), dst, workers=1, commit_every=3, progress=False)
    assert re.fullmatch(rf"writing '{re.escape(dst)}.partial' failed \(mdb_txn_commit: Input/output error\) with "
                        rf"{FREE_SPACE} there: is the disk full\? Nothing committed is lost \(6 of 14 source "
                        rf"files\): free some space and rerun the same command to resume the pack", str(e.value))
    monkeypatch.setattr(pack_module, "_commit", real_commit)
    meta = pack(FolderSource(os.path.join(root, "train")), dst, workers=1, commit_every=3, progress=False)
    resumed, rmeta = _records(dst)
    clean, cmeta = _records(paths["train"])
    assert rmeta == cmeta == meta and resumed == clean


def _ctrl_c_pack(root, dst, stderr_path):
    # A terminal's Ctrl-C: the CLI in its own process group, SIGINT to the whole group (pool
    # workers included) after 5 of the 14 images.
    os.setsid()
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT)
    os.dup2(fd, 2)
    import data.pack as pack_module
    pack_module._interrupt_after_items = 5
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os._exit(pack_module.main(["--src", root, "--dst", dst, "--splits", "train", "--workers", "2"]))


def test_ctrl_c_stops_the_pack_in_one_line_and_it_resumes(packed, tmp_path):
    root, paths, _ = packed
    dst, err = str(tmp_path / "db"), tmp_path / "stderr.txt"
    import data.pack as pack_module
    proc = mp.get_context("fork").Process(target=_ctrl_c_pack, args=(root, dst, str(err)))
    proc.start()
    proc.join(120)
    text = err.read_text()
    assert proc.exitcode == 130, text
    assert "Traceback" not in text, text
    assert text.strip().splitlines()[-1] == "interrupted: run the same command again to resume from the last commit"
    assert os.path.isdir(os.path.join(dst, "train.lmdb.partial"))
    assert pack_module.main(["--src", root, "--dst", dst, "--splits", "train", "--workers", "2"]) == 0
    assert _records(os.path.join(dst, "train.lmdb")) == _records(paths["train"])


def test_pack_workers_ignore_ctrl_c_from_their_first_instruction():
    """The pool's workers are started while the packer ignores SIGINT (an ignored signal stays
    ignored through exec), so a Ctrl-C while a worker is still importing NumPy does not kill it
    with a traceback; the packer's own Ctrl-C handling is back once the pool exists."""
    import signal
    from data.pack import _pool_without_ctrl_c
    before = signal.getsignal(signal.SIGINT)
    pool = _pool_without_ctrl_c(2)
    try:
        for proc in pool._pool:                      # read at once: before any initializer could run
            with open(f"/proc/{proc.pid}/status") as f:
                ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
            assert ignored & (1 << (signal.SIGINT - 1)), f"worker {proc.pid} does not ignore SIGINT"
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        pool.terminate()
        pool.join()
