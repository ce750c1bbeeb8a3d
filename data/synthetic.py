"""A small ImageNet-like dataset of real JPEG files, for the default run and the tests.

    python -m data.synthetic --root /tmp/synth --classes 10 --train 150 --val 30

Layout as ImageNet: ``<root>/train/<wnid>/<wnid>_<k>.JPEG`` and
``<root>/val/<wnid>/<wnid>_val_<k>.JPEG`` with made-up wnids ``n9000000c``.

What a class is
---------------
Every image shows one or two *objects* on a cluttered background. The class is
the **texture that fills the objects** (10 families): horizontal stripes, vertical
stripes, diagonal stripes (either diagonal), wavy stripes, checkerboard, dots,
concentric rings, grid lines, flat fill, speckle. Every family is its own mirror
image, because training flips images horizontally: "/" and "\\" stripes as two
classes would be indistinguishable after augmentation. With more than 10 classes the object's
*shape* (disk, square, triangle, diamond, cross) is part of the class too
(class = texture + 10 * shape), up to 50 classes.

What is random, so that it is not trivial: the image size and aspect
(``image_size_range`` for each side independently), every colour (so colour says
nothing about the class), the background (a two-colour gradient, noise and
low-contrast blobs), the object's position, scale (35-70 % of the shorter side),
shape (when it is not part of the class), the texture's period (4-9 px), phase and
orientation (+-12 degrees), a small distractor object with another class's
texture in a quarter of the images, and ~3 % grayscale files. A CNN must learn
local texture statistics at several scales, invariant to colour and position; a
colour or pixel-mean classifier stays at chance level (tests/test_data_synthetic.py
checks both sides of that).

ImageNet's file quirks are reproduced when ``quirks=True``: one CMYK JPEG and one
PNG saved under a .JPEG name in the training split, and the grayscale files.
Everything is a deterministic function of ``seed``.
"""

import argparse
import io
import json
import os

import numpy as np

# Bumped whenever the pictures change, so that callers can key caches on it.
VERSION = 2
NUM_TEXTURES = 10
SHAPES = ("disk", "square", "triangle", "diamond", "cross")
# Shapes for content="shape": each is its own mirror image, so the training flip keeps the class.
SHAPE_CLASSES = ("disk", "square", "triangle", "diamond", "cross", "ring", "wide bar", "tall bar", "x",
                 "inverted triangle")
TEXTURE_NAMES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "wavy stripes",
                 "checkerboard", "dots", "concentric rings", "grid lines", "flat", "speckle")


def class_wnids(num_classes):
    """Made-up WordNet-style ids, sorted in class order: ['n90000000', 'n90000001', ...]."""
    return ["n%08d" % (90000000 + c) for c in range(num_classes)]


def _texture(kind, u, v, r, period, rng):
    # Binary pattern (bool array) of texture family ``kind`` on rotated coordinates u, v.
    phase = rng.uniform(0, period)
    if kind == 0:
        return np.sin(2 * np.pi * (v + phase) / period) > 0
    if kind == 1:
        return np.sin(2 * np.pi * (u + phase) / period) > 0
    if kind == 2:  # either diagonal: a horizontal flip (training augmentation) maps one onto the other
        sign = 1.0 if rng.random() < 0.5 else -1.0
        return np.sin(2 * np.pi * (u + sign * v + phase) / (period * 1.41)) > 0
    if kind == 3:
        wave = 0.6 * period * np.sin(2 * np.pi * u / (3.0 * period))
        return np.sin(2 * np.pi * (v + wave + phase) / period) > 0
    if kind == 4:
        return (np.floor((u + phase) / period) + np.floor((v + phase) / period)) % 2 == 0
    if kind == 5:
        du = np.mod(u + phase, period) - period / 2
        dv = np.mod(v + phase, period) - period / 2
        return du * du + dv * dv < (period / 3.2) ** 2
    if kind == 6:
        return np.sin(2 * np.pi * (r + phase) / period) > 0
    if kind == 7:
        return (np.mod(u + phase, period) < period / 3.5) | (np.mod(v + phase, period) < period / 3.5)
    if kind == 8:
        return np.ones(u.shape, bool)
    cell = max(1.5, period / 3)  # speckle: random cells of ~2-3 px
    grid = rng.random((int(u.shape[0] / cell) + 2, int(u.shape[1] / cell) + 2)) < 0.5
    iy = (np.arange(u.shape[0]) / cell).astype(int)
    ix = (np.arange(u.shape[1]) / cell).astype(int)
    return grid[iy[:, None], ix[None, :]]


def _shape_mask(shape, dy, dx, radius):
    # dy, dx: offsets from the object's centre (already rotated); radius: half size.
    ay, ax = np.abs(dy), np.abs(dx)
    if shape == "disk":
        return dy * dy + dx * dx <= radius * radius
    if shape == "square":
        return (ay <= radius * 0.85) & (ax <= radius * 0.85)
    if shape == "triangle":
        return (dy <= radius * 0.7) & (dy >= -radius) & (ax <= (dy + radius) * 0.6)
    if shape == "diamond":
        return ay + ax <= radius
    if shape == "ring":
        d2 = dy * dy + dx * dx
        return (d2 <= radius * radius) & (d2 >= (0.55 * radius) ** 2)
    if shape == "wide bar":
        return (ay <= radius * 0.4) & (ax <= radius)
    if shape == "tall bar":
        return (ax <= radius * 0.4) & (ay <= radius)
    if shape == "x":
        return (np.abs(dy - dx) <= radius * 0.3 * 1.41) & (ay <= radius * 0.8) & (ax <= radius * 0.8) | \
               (np.abs(dy + dx) <= radius * 0.3 * 1.41) & (ay <= radius * 0.8) & (ax <= radius * 0.8)
    if shape == "inverted triangle":
        return (dy >= -radius * 0.7) & (dy <= radius) & (ax <= (radius - dy) * 0.6)
    return ((ay <= radius * 0.35) & (ax <= radius)) | ((ax <= radius * 0.35) & (ay <= radius))


def _contrasting_colours(rng):
    while True:
        a, b = rng.integers(0, 256, size=(2, 3))
        if np.abs(a - b).sum() > 180:
            return a.astype(np.float64), b.astype(np.float64)


def _draw_object(img, rng, texture, shape, size_frac, period=(4.0, 9.0)):
    h, w, _ = img.shape
    radius = 0.5 * size_frac * min(h, w)
    cy, cx = rng.uniform(0.15 * h, 0.85 * h), rng.uniform(0.15 * w, 0.85 * w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    angle = np.deg2rad(rng.uniform(-12, 12))
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    mask = _shape_mask(shape, v, u, radius)
    pattern = _texture(texture, u, v, np.hypot(u, v), rng.uniform(*period), rng)
    fg, bg = _contrasting_colours(rng)
    fill = np.where(pattern[..., None], fg, bg)
    img[mask] = fill[mask]


def render_image(rng, label, height, width, num_classes=10, period=(4.0, 9.0), object_frac=(0.35, 0.7),
                 distractor=0.25, content="texture", textures=None):
    """Draw one image of class ``label``.

    rng: numpy.random.Generator. height, width: ints. num_classes: <= 50.
    period: range of the texture period in pixels; object_frac: range of the object's size as a
    fraction of the shorter side; distractor: probability of a small object of another class.
    (Coarser textures and larger objects make the task easier at small image sizes.)
    content: "texture" (the class is the texture, as described above) or "shape" (the class is
    the object's outline, one of SHAPE_CLASSES, filled with a random texture: coarse structure
    that survives ResNet's 4x downsampling stem at small image sizes; up to 10 classes).
    textures: with content="texture", the texture family of each class (indices into
    TEXTURE_NAMES; default all ten in order), to leave out families that look alike at low
    resolution.
    Returns uint8 [height, width, 3] RGB. The content rules are in the module docstring.
    """
    if content not in ("texture", "shape"):
        raise ValueError(f"content must be 'texture' or 'shape', got {content!r}")
    if content == "shape":
        return _render_shape_class(rng, label, height, width, num_classes, period, object_frac, distractor)
    if not 1 <= num_classes <= NUM_TEXTURES * len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{NUM_TEXTURES * len(SHAPES)}, got {num_classes}")
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} out of range for {num_classes} classes")
    texture = label % NUM_TEXTURES if textures is None else int(textures[label % len(textures)])
    shape_in_class = num_classes > NUM_TEXTURES
    img = _background(rng, height, width)
    if rng.random() < distractor:  # distractor: a small object with another texture
        other = (texture + rng.integers(1, NUM_TEXTURES)) % NUM_TEXTURES
        _draw_object(img, rng, other, SHAPES[rng.integers(len(SHAPES))], rng.uniform(0.15, 0.22), period)
    for _ in range(1 if rng.random() < 0.6 else 2):
        shape = SHAPES[(label // NUM_TEXTURES) % len(SHAPES)] if shape_in_class else SHAPES[rng.integers(len(SHAPES))]
        _draw_object(img, rng, texture, shape, rng.uniform(*object_frac), period)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _background(rng, height, width):
    # Gradient between two colours + low-contrast blobs, all class-independent.
    c0, c1 = rng.integers(0, 256, size=(2, 3)).astype(np.float64)
    t = np.linspace(0, 1, width)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, height)[:, None, None]
    img = np.broadcast_to(c0 + (c1 - c0) * t, (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(2, 5)):
        by, bx, br = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.1, 0.3) * min(height, width)
        blob = ((yy - by) ** 2 + (xx - bx) ** 2) < br * br
        img[blob] = 0.7 * img[blob] + 0.3 * rng.integers(0, 256, size=3)
    return img


def _render_shape_class(rng, label, height, width, num_classes, period, object_frac, distractor):
    # content="shape": the outline is the class; texture, colours, position and size are random.
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPE_CLASSES)} for content='shape', got {num_classes}")
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} out of range for {num_classes} classes")
    img = _background(rng, height, width)
    if rng.random() < distractor:
        other = SHAPE_CLASSES[(label + rng.integers(1, num_classes)) % num_classes] if num_classes > 1 else "disk"
        _draw_object(img, rng, rng.integers(NUM_TEXTURES), other, rng.uniform(0.15, 0.22), period)
    _draw_object(img, rng, rng.integers(NUM_TEXTURES), SHAPE_CLASSES[label], rng.uniform(*object_frac), period)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _encode(img, rng, quality, kind):
    from PIL import Image

    out = io.BytesIO()
    pil = Image.fromarray(img)
    if kind == "png":
        pil.save(out, "PNG")
    elif kind == "cmyk":
        pil.convert("CMYK").save(out, "JPEG", quality=quality)
    elif kind == "gray":
        pil.convert("L").save(out, "JPEG", quality=quality)
    else:
        pil.save(out, "JPEG", quality=quality)
    return out.getvalue()


def make_dataset(root, num_classes=10, train_per_class=100, val_per_class=20, image_size_range=(64, 96),
                 seed=0, quality=90, quirks=True, progress=False, period=(4.0, 9.0), object_frac=(0.35, 0.7),
                 distractor=0.25, content="texture", textures=None):
    """Write the synthetic dataset under ``root`` (see the module docstring).

    image_size_range: (lo, hi) pixels, each side drawn independently, inclusive.
    period, object_frac, distractor, content: what the images show and how hard they are
    (see render_image).
    quirks: add one CMYK JPEG, one PNG named .JPEG (train split) and ~3 % grayscale JPEGs.
    Deterministic in all arguments. If ``root`` already holds a dataset made with the
    same arguments (``root/synthetic.json``), nothing is rewritten.
    Returns the manifest dict: {"classes": [wnid, ...], "train": n, "val": n, ...}.
    """
    lo, hi = (int(v) for v in image_size_range)
    if not 8 <= lo <= hi:
        raise ValueError(f"image_size_range must be (lo, hi) with 8 <= lo <= hi, got {image_size_range!r}")
    if train_per_class < 1 or val_per_class < 0:
        raise ValueError("train_per_class must be >= 1 and val_per_class >= 0")
    classes = class_wnids(num_classes)
    manifest = {"version": VERSION, "classes": classes, "train": num_classes * train_per_class, "val": num_classes * val_per_class,
                "args": [num_classes, train_per_class, val_per_class, [lo, hi], seed, quality, bool(quirks),
                         list(period), list(object_frac), distractor, content,
                         None if textures is None else [int(t) for t in textures]]}
    manifest_path = os.path.join(root, "synthetic.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            if json.load(f) == manifest:
                return manifest
    from tqdm import tqdm

    jobs = [("train", c, k) for c in range(num_classes) for k in range(train_per_class)]
    jobs += [("val", c, k) for c in range(num_classes) for k in range(val_per_class)]
    for split, c, k in tqdm(jobs, desc="synthetic images", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, c, k])
        height, width = rng.integers(lo, hi + 1, size=2)
        img = render_image(rng, c, int(height), int(width), num_classes, period, object_frac, distractor, content,
                           textures)
        kind = "jpeg"
        if quirks and split == "train" and c == 0 and k == 1:
            kind = "cmyk"
        elif quirks and split == "train" and c == 0 and k == 2:
            kind = "png"
        elif quirks and rng.random() < 0.03:
            kind = "gray"
        folder = os.path.join(root, split, classes[c])
        os.makedirs(folder, exist_ok=True)
        name = f"{classes[c]}_{k}.JPEG" if split == "train" else f"{classes[c]}_val_{k}.JPEG"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(_encode(img, rng, quality, kind))
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    return manifest


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.synthetic", description="Write a synthetic ImageNet-like dataset.")
    p.add_argument("--root", required=True)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train", type=int, default=100, help="training images per class")
    p.add_argument("--val", type=int, default=20, help="validation images per class")
    p.add_argument("--size", type=int, nargs=2, default=(64, 96), metavar=("LO", "HI"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    m = make_dataset(a.root, a.classes, a.train, a.val, tuple(a.size), a.seed, progress=True)
    print(f"wrote {m['train']} train + {m['val']} val images of {len(m['classes'])} classes under {a.root}")


if __name__ == "__main__":
    main()
