"""Loader throughput: our loader vs a plain Pillow pipeline, same images, same worker count.

    python -m bench.loader                       # ImageNet-sized, all cores
    python -m bench.loader --workers 2 --images 2000 --json runs/bench/loader.json
    python -m bench.loader --tiny                # seconds, for CI

What is measured (images/s, after a warm-up batch so that process start-up is excluded):
- ``ours``: data.loader.Loader, training augmentation (TF-style crop, flip, bilinear
  resize to --size) into shared-memory batches, --workers processes.
- ``pillow``: the common baseline: --workers processes (multiprocessing.Pool) reading the
  same LMDB, ``Image.open`` -> the same crop sampler -> ``crop().resize(BILINEAR)`` ->
  optional mirror -> ``np.asarray`` into a batch that is pickled back to the parent
  (as a PyTorch DataLoader would).
- ``decode``: single-core JPEG decode rates of simplejpeg and Pillow on the same files.

The images are synthetic (data.synthetic.render_image) at ImageNet's typical size,
500x375 or 375x500, JPEG quality 90. Real photographs hold more high-frequency detail
and decode somewhat slower; the ratio between the two pipelines is the figure to read.
"""

import argparse
import io
import multiprocessing as mp
import os
import platform
import shutil
import tempfile
import time

import numpy as np

from bench import write_json


def make_jpegs(root, count, sizes, quality, seed=0):
    """Write ``count`` synthetic JPEGs of the given (width, height) sizes under root/train/<wnid>/."""
    from PIL import Image

    from data.synthetic import class_wnids, render_image

    wnids = class_wnids(10)
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        w, h = sizes[i % len(sizes)]
        folder = os.path.join(root, "train", wnids[i % 10])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(render_image(rng, i % 10, h, w)).save(os.path.join(folder, f"{i:06d}.JPEG"), quality=quality)


# -- the Pillow baseline ------------------------------------------------------------------

_PIL_STATE = {}


def _pil_init(lmdb_path, size):
    from data.records import open_database

    _PIL_STATE["env"], _ = open_database(lmdb_path)
    _PIL_STATE["size"] = size


def _pil_batch(task):
    from PIL import Image

    from data.augment import sample_distorted_crop
    from data.records import decode_record, record_key

    epoch, indices = task
    size = _PIL_STATE["size"]
    images = np.empty((len(indices), size, size, 3), np.uint8)
    labels = np.empty(len(indices), np.int32)
    with _PIL_STATE["env"].begin() as txn:
        for j, index in enumerate(indices):
            jpeg, label, _, _ = decode_record(txn.get(record_key(int(index))))
            rng = np.random.default_rng([0, epoch, 1, int(index)])
            img = Image.open(io.BytesIO(jpeg)).convert("RGB")
            y0, x0, h, w = sample_distorted_crop(rng, img.height, img.width)
            img = img.crop((x0, y0, x0 + w, y0 + h)).resize((size, size), Image.BILINEAR)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            images[j] = np.asarray(img)
            labels[j] = label
    return images, labels


def bench_pillow(lmdb_path, num_samples, batch_size, size, workers, batches):
    from data.loader import epoch_permutation

    tasks = []
    epoch = 0
    while len(tasks) < batches + 1:
        perm = epoch_permutation(num_samples, 0, epoch)
        tasks += [(epoch, perm[k:k + batch_size]) for k in range(0, num_samples - batch_size + 1, batch_size)]
        epoch += 1
    tasks = tasks[:batches + 1]
    with mp.get_context("forkserver").Pool(workers, initializer=_pil_init, initargs=(lmdb_path, size)) as pool:
        it = pool.imap(_pil_batch, tasks)
        next(it)  # warm-up: process start, imports
        t0 = time.perf_counter()
        n = sum(len(images) for images, _ in it)
        return n / (time.perf_counter() - t0)


def bench_ours(lmdb_path, batch_size, size, workers, batches):
    from data.loader import Loader

    with Loader(lmdb_path, batch_size, train=True, image_size=size, workers=workers) as loader:
        seen, t0, n = 0, None, 0
        while seen < batches + 1:
            for images, _ in loader:
                seen += 1
                if t0 is None:
                    t0 = time.perf_counter()  # after the warm-up batch
                else:
                    n += len(images)
                if seen == batches + 1:
                    break
        return n / (time.perf_counter() - t0)


def bench_decoders(lmdb_path, count):
    from PIL import Image

    from data.decode import decode_jpeg
    from data.records import close_database, decode_record, open_database, record_key

    env, meta = open_database(lmdb_path)
    with env.begin() as txn:
        jpegs = [bytes(decode_record(txn.get(record_key(i % meta["count"])))[0]) for i in range(count)]
    close_database(env)
    out = {}
    for name, fn in (("simplejpeg", decode_jpeg),
                     ("pillow", lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))):
        fn(jpegs[0])
        t0 = time.perf_counter()
        for b in jpegs:
            fn(b)
        out[name] = len(jpegs) / (time.perf_counter() - t0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="output image size")
    p.add_argument("--images", type=int, default=256, help="distinct JPEGs to generate")
    p.add_argument("--batches", type=int, default=30, help="batches timed per pipeline")
    p.add_argument("--tiny", action="store_true", help="64x48 images, 32 px output, 1 worker: a CI smoke run")
    p.add_argument("--json", default="runs/bench/loader.json", help="where to write the results")
    p.add_argument("--workdir", default=None, help="keep the generated JPEGs and LMDB here")
    a = p.parse_args(argv)
    sizes, quality = [(500, 375), (375, 500), (500, 333)], 90
    if a.tiny:
        sizes, a.size, a.workers, a.batch_size, a.images, a.batches = [(64, 48), (48, 64)], 32, 1, 8, 48, 4
    from data.pack import pack_folder

    work = a.workdir or tempfile.mkdtemp(prefix="bench-loader-")
    try:
        if not os.path.isfile(os.path.join(work, "db", "train.lmdb", "data.mdb")):
            t0 = time.perf_counter()
            make_jpegs(work, a.images, sizes, quality)
            pack_folder(work, os.path.join(work, "db"), splits=("train",), workers=a.workers, progress=False)
            print(f"generated and packed {a.images} JPEGs in {time.perf_counter() - t0:.1f} s")
        db = os.path.join(work, "db", "train.lmdb")
        decode = bench_decoders(db, min(a.images, 200))
        ours = bench_ours(db, a.batch_size, a.size, a.workers, a.batches)
        pillow = bench_pillow(db, a.images, a.batch_size, a.size, a.workers, a.batches)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"ours_images_per_s": ours, "pillow_images_per_s": pillow, "speedup": ours / pillow,
              "ours_images_per_s_per_worker": ours / a.workers, "decode_images_per_s_one_core": decode,
              "workers": a.workers, "batch_size": a.batch_size, "output_size": a.size,
              "source_sizes": sizes, "jpeg_quality": quality, "distinct_images": a.images,
              "timed_batches": a.batches, "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "processor": platform.processor(), "tiny": a.tiny}
    print(f"decode, one core:   simplejpeg {decode['simplejpeg']:8.0f} img/s   pillow {decode['pillow']:8.0f} img/s")
    print(f"train pipeline, {a.workers} worker(s), {a.size}px output, batch {a.batch_size}:")
    print(f"  ours   {ours:8.0f} img/s  ({ours / a.workers:.0f} per worker)")
    print(f"  pillow {pillow:8.0f} img/s  ({pillow / a.workers:.0f} per worker)")
    print(f"  speed-up {ours / pillow:.2f}x")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        write_json(result, a.json)
    return result


if __name__ == "__main__":
    main()
