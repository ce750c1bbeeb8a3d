"""Stage 2: the loader's contract: order, determinism, shards, resume, corrupt records.

Most tests use a database of solid-colour images, one colour per record, so that every
image the loader yields can be traced back to its record by its colour (crops and
resizes keep a solid colour), independently of the loader's own bookkeeping."""

import logging
import os
import shutil
import signal

import lmdb
import numpy as np
import pytest
from PIL import Image

from data.augment import eval_transform_into
from data.loader import Loader, LoaderError
from data.pack import pack_folder
from data.records import close_database, decode_record, encode_record, open_database, record_key
from data.synthetic import make_dataset

N, B, S = 70, 8, 16


@pytest.fixture(scope="module")
def colour_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for i in range(N):
        colour = np.array([(i % 6) * 45 + 10, (i // 6 % 6) * 45 + 10, (i // 36) * 120 + 60], np.uint8)
        h, w = rng.integers(20, 41, size=2)
        os.makedirs(root / "train" / f"n{i % 3}", exist_ok=True)
        Image.fromarray(np.broadcast_to(colour, (h, w, 3)).copy()).save(
            root / "train" / f"n{i % 3}" / f"{i:03d}.JPEG", quality=95)
    path = pack_folder(str(root), str(root / "db"), splits=("train",), workers=1, progress=False)["train"]
    env, meta = open_database(path)
    from data.decode import decode_jpeg

    table, labels = [], []
    with env.begin() as txn:
        for k in range(meta["count"]):
            jpeg, label, _, _ = decode_record(txn.get(record_key(k)))
            table.append(decode_jpeg(jpeg).reshape(-1, 3).mean(0))
            labels.append(label)
    close_database(env)
    return path, np.array(table), np.array(labels)


def identify(images, table):
    """Record index of each yielded image, by nearest mean colour (asserting a clear match)."""
    means = images.reshape(len(images), -1, 3).mean(1)
    dist = np.linalg.norm(means[:, None, :] - table[None], axis=-1)
    assert np.all(dist.min(1) < 6), "an image that is not a crop of any record"
    return dist.argmin(1)


@pytest.fixture(scope="module")
def texture_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(str(root), num_classes=3, train_per_class=12, val_per_class=5, image_size_range=(32, 48), seed=1)
    return pack_folder(str(root), str(root / "db"), workers=1, progress=False)


def run_epochs(loader, epochs):
    out = []
    for _ in range(epochs):
        out.append([(x.copy(), y.copy()) for x, y in loader])
    return out


def test_train_epoch_is_the_seeded_permutation(colour_db):
    path, table, labels = colour_db
    with Loader(path, B, train=True, image_size=S, seed=5, workers=0) as loader:
        assert len(loader) == N // B and loader.num_samples == N and loader.classes == ["n0", "n1", "n2"]
        epochs = run_epochs(loader, 2)
        assert loader.position == (2, 0)
    seen = []
    for e, batches in enumerate(epochs):
        assert len(batches) == N // B
        ids = []
        for images, y in batches:
            assert images.shape == (B, S, S, 3) and images.dtype == np.uint8 and y.dtype == np.int32
            idx = identify(images, table)
            np.testing.assert_array_equal(y, labels[idx])  # labels belong to their images
            ids.extend(idx)
        # the documented order: default_rng([seed, epoch, 0, 0]).permutation(N), last 6 dropped
        np.testing.assert_array_equal(ids, np.random.default_rng([5, e, 0, 0]).permutation(N)[:N // B * B])
        seen.append(ids)
    assert seen[0] != seen[1]


def test_same_batches_whatever_the_number_of_workers(texture_db):
    results = {}
    for workers, prefetch in ((0, None), (1, 2), (2, 5)):
        with Loader(texture_db["train"], 5, train=True, image_size=24, seed=3, workers=workers,
                    prefetch=prefetch, color_jitter=0.3) as loader:
            train = run_epochs(loader, 2)
        with Loader(texture_db["val"], 4, train=False, image_size=24, workers=workers) as loader:
            val = run_epochs(loader, 1)
        results[workers] = (train, val)
    ref_train, ref_val = results[0]
    assert len(ref_train[0]) == 36 // 5 and len(ref_val[0]) == 4 and ref_val[0][-1][0].shape[0] == 3
    assert not np.array_equal(ref_train[0][0][0], ref_train[1][0][0])  # epochs differ
    for workers in (1, 2):
        train, val = results[workers]
        for a, b in zip(sum(ref_train + ref_val, []), sum(train + val, [])):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


def test_shards_are_disjoint_and_eval_counts_every_image_once(colour_db):
    path, table, labels = colour_db
    world = 3
    train_ids, eval_ids, lengths = [], [], []
    for rank in range(world):
        with Loader(path, B, train=True, image_size=S, rank=rank, world_size=world, workers=0) as loader:
            lengths.append(len(loader))
            ids = [identify(x, table) for x, _ in loader]
            train_ids.append(np.concatenate(ids))
        with Loader(path, B, train=False, image_size=S, rank=rank, world_size=world, workers=0) as loader:
            batches = [(identify(x, table), y.copy()) for x, y in loader]
            assert len(batches) == len(loader)
            for idx, y in batches:
                np.testing.assert_array_equal(y, labels[idx])
            eval_ids.append(np.concatenate([idx for idx, _ in batches]))
    assert lengths == [(N // world) // B] * world  # same number of batches on every rank
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(train_ids[a]) & set(train_ids[b])
    assert all(len(ids) == len(set(ids)) for ids in train_ids)
    np.testing.assert_array_equal(np.sort(np.concatenate(eval_ids)), np.arange(N))  # exactly once


def test_resume_at_epoch_and_batch_is_identical(texture_db):
    path = texture_db["train"]
    with Loader(path, 4, train=True, image_size=24, seed=9, workers=2) as loader:
        full = run_epochs(loader, 2)
    with Loader(path, 4, train=True, image_size=24, seed=9, epoch=1, start_batch=3, workers=2) as loader:
        assert loader.position == (1, 3)
        resumed = [(x.copy(), y.copy()) for x, y in loader]
    assert len(resumed) == len(full[1]) - 3
    for a, b in zip(full[1][3:], resumed):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # interrupting an iteration (break) and iterating again continues where it stopped
    with Loader(path, 4, train=True, image_size=24, seed=9, workers=2, prefetch=4) as loader:
        first = []
        for x, y in loader:
            first.append((x.copy(), y.copy()))
            if len(first) == 2:
                break
        assert loader.position == (0, 2)
        rest = run_epochs(loader, 1)[0]
    for a, b in zip(full[0], first + rest):
        np.testing.assert_array_equal(a[0], b[0])


def test_corrupt_record_is_logged_and_replaced_deterministically(colour_db, tmp_path, caplog):
    path, table, labels = colour_db
    bad_path = str(tmp_path / "bad.lmdb")
    shutil.copytree(path, bad_path)
    victim = int(np.random.default_rng([0, 0, 0, 0]).permutation(N)[0])  # first sample of epoch 0
    env = lmdb.open(bad_path)
    with env.begin(write=True) as txn:
        _, label, _, _ = decode_record(txn.get(record_key(victim)))
        txn.put(record_key(victim), encode_record(b"\xff\xd8\xff\xe0 broken beyond repair", label))
    env.close()
    outputs = []
    for workers in (0, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.loader"):
            with Loader(bad_path, B, train=True, image_size=S, workers=workers) as loader:
                batches = run_epochs(loader, 1)[0]
                assert len(loader.corrupt_records) == 1
                epoch, index, replacement, reason = loader.corrupt_records[0]
        assert (epoch, index) == (0, victim) and replacement != victim and "JPEG" in reason
        assert f"record {victim} is corrupt" in caplog.text
        assert len(batches) == N // B
        first = identify(batches[0][0], table)
        assert first[0] == replacement and batches[0][1][0] == labels[replacement]
        outputs.append(batches)
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a[0], b[0])


def test_eval_batches_are_the_eval_transform(texture_db):
    path = texture_db["val"]
    env, meta = open_database(path)
    with Loader(path, 4, train=False, image_size=24, workers=0, dct_scaling=False) as loader:
        assert loader.eval_resize == 27  # round(24 * 256 / 224)
        images = np.concatenate([x for x, _ in run_epochs(loader, 1)[0]])
    assert len(images) == meta["count"] == 15
    with env.begin() as txn:
        for k in range(meta["count"]):
            out = np.zeros((24, 24, 3), np.uint8)
            eval_transform_into(decode_record(txn.get(record_key(k)))[0], out, 27, dct_scaling=False)
            np.testing.assert_array_equal(images[k], out)
    close_database(env)


def test_bad_arguments_are_rejected(colour_db):
    path = colour_db[0]
    for kwargs, match in [(dict(batch_size=0), "batch_size"), (dict(rank=3, world_size=3), "rank"),
                          (dict(start_batch=100), "start_batch"), (dict(batch_size=71), "batch_size"), (dict(eval_resize=10), "eval_resize"),
                          (dict(color_jitter=1.5), "color_jitter"), (dict(image_size=16.0), "image_size")]:
        args = dict(batch_size=B, image_size=S)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            Loader(path, train=True, workers=0, **args)


def test_a_dead_worker_is_reported(colour_db):
    with Loader(colour_db[0], B, train=True, image_size=S, workers=1, prefetch=2) as loader:
        it = iter(loader)
        next(it)
        os.kill(loader._procs[0].pid, signal.SIGKILL)
        with pytest.raises(LoaderError, match=r"loader worker 0 \(pid \d+\) died \(killed by SIGKILL"):
            for _ in it:
                pass


def _put_records(src, dst, changes):
    """Copy the database at ``src`` to ``dst`` with records replaced: {index: (jpeg or None, label)}."""
    shutil.copytree(src, dst)
    env = lmdb.open(dst)
    with env.begin(write=True) as txn:
        for index, (jpeg, label) in changes.items():
            old_jpeg, _, _, _ = decode_record(txn.get(record_key(index)))
            txn.put(record_key(index), encode_record(bytes(old_jpeg) if jpeg is None else jpeg, label))
    env.close()
    return dst


def test_out_of_range_labels_are_replaced_like_corrupt_records(colour_db, tmp_path, caplog):
    path, table, labels = colour_db
    perm0 = np.random.default_rng([0, 0, 0, 0]).permutation(N)
    too_big, negative = int(perm0[0]), int(perm0[9])  # first samples of batches 0 and 1 of epoch 0
    bad_path = _put_records(path, str(tmp_path / "bad.lmdb"), {too_big: (None, 3), negative: (None, -1)})
    outputs = []
    for workers in (0, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.loader"):
            with Loader(bad_path, B, train=True, image_size=S, workers=workers) as loader:
                epochs = run_epochs(loader, 2)
                corrupt = list(loader.corrupt_records)
        # the documented rule, computed here: every time a bad record comes up in epoch e, it is
        # replaced by default_rng([seed, e, 2, index, attempt]).integers(N), attempt = 1, 2, ...
        # while the replacement is bad too (record 50 draws itself once in epoch 0)
        reasons = {too_big: "label 3 is outside [0, 3), the database's 3 classes",
                   negative: "label -1 is outside [0, 3), the database's 3 classes"}
        expected = []
        for e in range(2):
            order = np.random.default_rng([0, e, 0, 0]).permutation(N)[:N // B * B]
            for position, index in enumerate(order):
                index, attempt = int(index), 0
                while index in reasons:
                    attempt += 1
                    replacement = int(np.random.default_rng([0, e, 2, index, attempt]).integers(N))
                    expected.append((e, index, replacement, reasons[index]))
                    index = replacement
                images, y = epochs[e][position // B]
                assert identify(images[position % B:position % B + 1], table)[0] == index
                assert y[position % B] == labels[index]
        assert corrupt == expected and len(expected) >= 3
        for victim in (too_big, negative):  # logged once each, however often it came up
            assert caplog.text.count(f"record {victim} is corrupt") == 1
        outputs.append(epochs)
    for a, b in zip(sum(outputs[0], []), sum(outputs[1], [])):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_damaged_jpeg_record_is_used_and_logged_once(texture_db, tmp_path, caplog):
    from tests.test_data_decode import damaged_jpegs

    truncated = damaged_jpegs()["truncated"]
    bad_path = _put_records(texture_db["val"], str(tmp_path / "bad.lmdb"), {4: (truncated, 1)})
    for workers in (0, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.loader"):
            with Loader(bad_path, 4, train=False, image_size=24, workers=workers, dct_scaling=False) as loader:
                epochs = run_epochs(loader, 2)
                assert loader.damaged_records == {4: "Premature end of JPEG file"}
                assert loader.corrupt_records == []
        assert caplog.text.count("record 4 is a damaged JPEG (libjpeg-turbo: Premature end of JPEG file)") == 1
        expected = np.zeros((24, 24, 3), np.uint8)  # record 4 = batch 1, row 0, used as decoded
        eval_transform_into(truncated, expected, 27, dct_scaling=False)
        for images, y in (epochs[0][1], epochs[1][1]):
            np.testing.assert_array_equal(images[0], expected)
            assert y[0] == 1


CHILD = r"""
import os, sys, time
from data.loader import Loader

def descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found

if __name__ == "__main__":
    loader = Loader(sys.argv[1], 4, train=True, image_size=16, workers=2)
    batches = iter(loader)
    next(batches)
    print(" ".join(map(str, descendants(os.getpid()))), flush=True)
    while True:
        for _ in loader:
            time.sleep(0.01)
"""


def _alive(pid):
    # a zombie has exited; it only waits for its (new) parent to reap it
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to find the child processes")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_forkserver_and_tracker_die_with_their_parent(texture_db, tmp_path, sig):
    import subprocess
    import sys
    import time

    import data

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(data.__file__)))
    proc = subprocess.Popen([sys.executable, str(script), texture_db["train"]], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=repo))
    pids = []
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        pids = [int(p) for p in line.split()]
        commands = []
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                commands.append(f.read().replace(b"\0", b" ").decode())
        # the 2 workers (forked by the forkserver), the forkserver, the resource tracker
        assert len(pids) == 4, commands
        assert sum("forkserver" in c for c in commands) == 3 and sum("resource_tracker" in c for c in commands) == 1
        proc.send_signal(sig)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(map(_alive, pids)):
            time.sleep(0.1)
        survivors = [c for p, c in zip(pids, commands) if _alive(p)]
        assert not survivors, f"still alive 10 s after the parent died: {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:  # a failed test leaves nothing behind either
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
