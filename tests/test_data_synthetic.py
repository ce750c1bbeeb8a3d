"""data.synthetic: layout, determinism, ImageNet's quirks, and that the class is in the
texture (a texture statistic separates classes; colour does not)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from data.synthetic import class_wnids, make_dataset, render_image


def _files(root):
    out = {}
    for split in ("train", "val"):
        for dirpath, _, names in os.walk(os.path.join(root, split)):
            for n in names:
                with open(os.path.join(dirpath, n), "rb") as f:
                    out[os.path.relpath(os.path.join(dirpath, n), root)] = f.read()
    return out


def test_layout_sizes_quirks_and_determinism(tmp_path):
    args = dict(num_classes=4, train_per_class=8, val_per_class=3, image_size_range=(40, 70), seed=11)
    manifest = make_dataset(str(tmp_path / "a"), **args)
    assert manifest["classes"] == class_wnids(4) and manifest["train"] == 32 and manifest["val"] == 12
    files = _files(tmp_path / "a")
    assert len(files) == 44
    assert sorted(os.listdir(tmp_path / "a" / "train")) == class_wnids(4)
    kinds, sizes = {}, []
    for name, data in files.items():
        assert name.endswith(".JPEG")
        with Image.open(io.BytesIO(data)) as img:
            kinds.setdefault((img.format, img.mode), []).append(name)
            sizes.append(img.size)
    assert len(kinds[("PNG", "RGB")]) == 1 and len(kinds[("JPEG", "CMYK")]) == 1
    assert kinds[("JPEG", "CMYK")][0].startswith("train")
    assert ("JPEG", "L") in kinds and len(kinds[("JPEG", "RGB")]) > 35
    sizes = np.array(sizes)
    assert sizes.min() >= 40 and sizes.max() <= 70 and len({tuple(s) for s in sizes}) > 30  # varied, not square
    make_dataset(str(tmp_path / "b"), **args)
    assert _files(tmp_path / "b") == files  # deterministic, byte for byte
    make_dataset(str(tmp_path / "c"), **{**args, "seed": 12})
    assert _files(tmp_path / "c") != files
    with pytest.raises(ValueError, match="image_size_range"):
        make_dataset(str(tmp_path / "d"), image_size_range=(50, 40))


def _texture_features(img):
    # Oriented band energies of the grey image's power spectrum (log), mean-removed.
    g = img.astype(float).mean(-1)
    power = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean(), s=(64, 64)))) ** 2
    yy, xx = np.mgrid[-32:32, -32:32]
    r, theta = np.hypot(yy, xx), np.mod(np.arctan2(yy, xx), np.pi)
    f = [power[(r >= r0) & (r < r1) & (theta >= t * np.pi / 8) & (theta < (t + 1) * np.pi / 8)].mean()
         for r0, r1 in ((2, 5), (5, 8), (8, 12), (12, 18), (18, 32)) for t in range(8)]
    f = np.log(np.array(f) + 1e-3)
    return f - f.mean()


def _nearest_centroid_accuracy(x, y, num_classes):
    train = np.arange(len(y)) % 4 != 0
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-9
    z = (x - mu) / sd
    centroids = np.array([z[train & (y == c)].mean(0) for c in range(num_classes)])
    pred = np.argmin(((z[~train, None, :] - centroids[None]) ** 2).sum(-1), 1)
    return (pred == y[~train]).mean()


def test_class_lives_in_the_texture_not_the_colour():
    feats, colours, labels = [], [], []
    for c in range(10):
        for k in range(32):
            rng = np.random.default_rng([3, c, k])
            h, w = rng.integers(64, 97, size=2)
            img = render_image(rng, c, int(h), int(w))
            feats.append(_texture_features(img))
            colours.append(img.reshape(-1, 3).mean(0))
            labels.append(c)
    labels = np.array(labels)
    texture_acc = _nearest_centroid_accuracy(np.array(feats), labels, 10)
    print(f"texture {texture_acc:.2f}")
    colour_acc = _nearest_centroid_accuracy(np.array(colours), labels, 10)
    # chance is 0.10 (80 held-out images: a 3-sigma band is about +-0.10)
    assert texture_acc > 0.3, texture_acc
    assert colour_acc < 0.25, colour_acc


def test_render_arguments():
    rng = np.random.default_rng(0)
    assert render_image(rng, 13, 50, 60, num_classes=20).shape == (50, 60, 3)
    with pytest.raises(ValueError, match="num_classes"):
        render_image(rng, 0, 50, 60, num_classes=51)
    with pytest.raises(ValueError, match="label"):
        render_image(rng, 10, 50, 60, num_classes=10)
