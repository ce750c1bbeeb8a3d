"""The crop sampler (statistically, against expectations derived independently of the code),
the Numba bilinear resize and colour jitter (against float64 NumPy references), and the
evaluation geometry."""

import math

import numpy as np
import pytest

from data.augment import (central_crop_geometry, color_jitter_inplace, resize_bilinear_into,
                          sample_distorted_crop, train_transform_into)

N_DRAWS = 100_000


def _draws(height, width, n=N_DRAWS, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    return np.array([sample_distorted_crop(rng, height, width, **kwargs) for _ in range(n)], np.int64)


def _ks_uniform(u):
    """Kolmogorov-Smirnov distance of samples u to Uniform(0, 1)."""
    u = np.sort(u)
    n = len(u)
    return max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))


KS_CRIT = 1.95 / math.sqrt(N_DRAWS)  # 0.1 % level


def test_aspect_uniform_sqrt_area_uniform_offsets_uniform():
    # A 4000x4000 image with area_range (0.05, 0.5): no clamping can happen (the largest
    # height sqrt(0.5/0.75)*4000 < 4000) and min_object_covered=0 accepts every attempt.
    # Then, per the algorithm: r ~ U[0.75, 1.33); h ~ U{round(sqrt(a_lo A/r)) .. round(sqrt(a_hi A/r))},
    # so sqrt(area/A) = h*sqrt(r/A) ~ U[sqrt(a_lo), sqrt(a_hi)] whatever r is; w/h = r up to
    # rounding (< 0.001 here); offsets uniform on {0 .. H-h-1}.
    H = W = 4000
    d = _draws(H, W, area_range=(0.05, 0.5), min_object_covered=0.0)
    y0, x0, h, w = d.T
    assert np.all((h * w >= 0.05 * H * W) & (h * w <= 0.5 * H * W)), "a fallback or out-of-range area"
    ratio = w / h
    assert abs(ratio.min() - 0.75) < 0.002 and abs(ratio.max() - 1.33) < 0.002
    assert _ks_uniform((ratio - 0.75) / 0.58) < KS_CRIT
    s = np.sqrt(h * w / (H * W))
    lo, hi = math.sqrt(0.05), math.sqrt(0.5)
    assert _ks_uniform((s - lo) / (hi - lo)) < KS_CRIT
    # the area itself is NOT uniform: its median is ((lo+hi)/2)^2, not (0.05+0.5)/2
    assert abs(np.median(h * w / (H * W)) - ((lo + hi) / 2) ** 2) < 0.005
    # TensorFlow draws offsets in [0, H-h): the last position H-h is never used
    assert np.all(y0 <= H - h - 1) and np.all(x0 <= W - w - 1) and y0.min() == 0
    jitter = np.random.default_rng(1).random((2, len(d)))
    assert _ks_uniform((y0 + jitter[0]) / (H - h)) < KS_CRIT
    assert _ks_uniform((x0 + jitter[1]) / (W - w)) < KS_CRIT
    assert abs(np.corrcoef(y0 / (H - h), x0 / (W - w))[0, 1]) < 0.02


def test_exact_small_case_fallback_rate():
    # 100x100, square crops only, min_object_covered 0.6, 3 attempts. By hand:
    # h ~ U{22..100} (79 values; h=22 gives area 484 < 500 and is repaired to 23);
    # accepted iff h*h >= 6000, i.e. h in 78..100 (23 values): p = 23/79 per attempt.
    # Fallback f = (56/79)^3; the output is the whole image with prob f + (1-f)/23.
    d = _draws(100, 100, aspect_ratio_range=(1.0, 1.0), area_range=(0.05, 1.0),
               min_object_covered=0.6, max_attempts=3)
    y0, x0, h, w = d.T
    assert np.all(h == w)
    f = (56 / 79) ** 3
    p_full = f + (1 - f) / 23
    full = (h == 100)
    assert abs(full.mean() - p_full) < 5 * math.sqrt(p_full * (1 - p_full) / N_DRAWS)
    assert h.min() == 78
    counts = np.bincount(h[~full] - 78, minlength=22)  # 78..99, each (1-f)/23 of all draws
    expected = N_DRAWS * (1 - f) / 23
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 50, chi2  # 21 degrees of freedom: P(chi2 > 50) ~ 4e-4


def _accept_model(height, width, a_lo, a_hi, min_cov, ratios):
    """Exact per-attempt distribution of the crop height, enumerated over all integer
    heights for each aspect ratio on a fine grid (no sampling) -> ({(h, w): prob}, p_accept)."""
    A = height * width
    probs, p_acc = {}, 0.0
    for r in ratios:
        h_lo = int(np.rint(np.sqrt(a_lo * A / r)))
        h_hi = int(np.rint(np.sqrt(a_hi * A / r)))
        while np.rint(h_hi * r) > width:  # largest height whose rounded width fits
            h_hi -= 1
        h_hi = min(h_hi, height)
        h = np.arange(h_lo, h_hi + 1) if h_lo < h_hi else np.array([h_hi])
        n = len(h)
        w = np.rint(h * r)
        small = w * h < a_lo * A
        h = np.where(small, h + 1, h)
        w = np.where(small, np.rint(h * r), w)
        big = w * h > a_hi * A
        h = np.where(big, h - 1, h)
        w = np.where(big, np.rint(h * r), w)
        ok = ((w * h >= a_lo * A) & (w * h <= a_hi * A) & (w > 0) & (w <= width) & (h > 0) & (h <= height)
              & (w * h >= min_cov * A))
        for hh, ww in zip(h[ok].astype(int), w[ok].astype(int)):
            probs[(hh, ww)] = probs.get((hh, ww), 0.0) + 1.0 / n / len(ratios)
        p_acc += ok.sum() / n / len(ratios)
    return probs, p_acc


def test_reference_settings_area_distribution_and_fallback():
    # The reference settings on an ImageNet-shaped 375x500 image, but 2 attempts so that
    # fallbacks are frequent enough to count. With the whole image as the box, coverage
    # = area/A, so every area < 0.1 A is rejected although area_range starts at 0.05.
    H, W = 375, 500
    d = _draws(H, W, max_attempts=2)
    y0, x0, h, w = d.T
    ratios = 0.75 + 0.58 * (np.arange(4000) + 0.5) / 4000
    probs, p_acc = _accept_model(H, W, 0.05, 1.0, 0.1, ratios)
    f = (1 - p_acc) ** 2
    fallback = (h == H) & (w == W)  # an accepted crop never has w/h = 4/3 > 1.33
    assert 0.08 < 1 - p_acc < 0.2
    assert abs(fallback.mean() - f) < 5 * math.sqrt(f * (1 - f) / N_DRAWS)
    frac = h[~fallback] * w[~fallback] / (H * W)
    assert frac.min() >= 0.1 and frac.max() <= 1.0
    # Compare the area distribution in 10 bins of sqrt(area fraction).
    edges = np.linspace(math.sqrt(0.1), 1.0, 11)
    model = np.zeros(10)
    for (hh, ww), pr in probs.items():
        model[min(9, np.searchsorted(edges, math.sqrt(hh * ww / (H * W)), side="right") - 1)] += pr
    model /= model.sum()
    seen = np.histogram(np.sqrt(frac), bins=edges)[0]
    expected = model * len(frac)
    chi2 = np.sum((seen - expected) ** 2 / expected)
    print(f'fallback {fallback.mean():.4f} model {f:.4f}; chi2 {chi2:.1f}')
    assert chi2 < 33, (chi2, seen, expected)  # 9 dof: P(chi2 > 33) ~ 1e-4


def test_object_box_is_covered():
    # A small object box: every accepted crop must cover >= 50 % of its pixel rectangle
    # (fractions truncated to pixels); failures fall back to the whole image.
    H, W, box = 200, 300, np.array([[0.1, 0.1, 0.3, 0.4]])
    d = _draws(H, W, n=20_000, bbox=box, min_object_covered=0.5, max_attempts=5)
    y0, x0, h, w = d.T
    by0, bx0, by1, bx1 = int(0.1 * H), int(0.1 * W), int(0.3 * H), int(0.4 * W)
    iy = np.clip(np.minimum(by1, y0 + h) - np.maximum(by0, y0), 0, None)
    ix = np.clip(np.minimum(bx1, x0 + w) - np.maximum(bx0, x0), 0, None)
    covered = iy * ix / ((by1 - by0) * (bx1 - bx0))
    full = (h == H) & (w == W)
    assert np.all(covered[~full] >= 0.5)
    assert 0.05 < full.mean() < 0.95  # both outcomes occur
    assert np.all(y0 + h <= H) and np.all(x0 + w <= W)


@pytest.mark.parametrize("kwargs, match", [
    (dict(area_range=(0.0, 1.0)), "area_range"),
    (dict(area_range=(0.5, 0.2)), "area_range"),
    (dict(area_range=(0.1, 1.5)), "area_range"),
    (dict(aspect_ratio_range=(-1, 2)), "aspect_ratio_range"),
    (dict(max_attempts=0), "max_attempts"),
    (dict(min_object_covered=-0.1), "min_object_covered"),
    (dict(bbox=[[0.1, 0.1, 1.2, 0.5]]), "bbox"),
])
def test_sampler_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_distorted_crop(np.random.default_rng(0), 10, 10, **kwargs)
    with pytest.raises(ValueError, match="height"):
        sample_distorted_crop(np.random.default_rng(0), 0, 10)


def _bilinear_reference(src, out_h, out_w, y0, x0, sy, sx, ylo, yhi, xlo, xhi, flip):
    """float64 NumPy bilinear sampling with half-pixel centres, clamped, rounded."""
    src = src.astype(np.float64)
    i = np.arange(out_h)
    j = np.arange(out_w)
    if flip:
        j = j[::-1]
    y = np.clip(y0 + (i + 0.5) * sy - 0.5, ylo, yhi)
    x = np.clip(x0 + (j + 0.5) * sx - 0.5, xlo, xhi)
    yt, xl = np.floor(y).astype(int), np.floor(x).astype(int)
    yb, xr = np.minimum(yt + 1, yhi), np.minimum(xl + 1, xhi)
    fy, fx = (y - yt)[:, None, None], (x - xl)[None, :, None]
    top = src[yt][:, xl] * (1 - fx) + src[yt][:, xr] * fx
    bot = src[yb][:, xl] * (1 - fx) + src[yb][:, xr] * fx
    return np.clip(np.floor(top * (1 - fy) + bot * fy + 0.5), 0, 255)


def test_resize_matches_float64_reference():
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    worst = 0
    for trial in range(40):
        out_h, out_w = rng.integers(1, 40, size=2)
        h, w = rng.integers(1, 37), rng.integers(1, 53)
        y0, x0 = rng.integers(0, 37 - h + 1), rng.integers(0, 53 - w + 1)
        flip = bool(trial % 2)
        out = np.zeros((out_h, out_w, 3), np.uint8)
        args = (y0, x0, h / out_h, w / out_w, y0, y0 + h - 1, x0, x0 + w - 1, flip)
        resize_bilinear_into(src, out, *args)
        ref = _bilinear_reference(src, out_h, out_w, *args)
        diff = np.abs(out.astype(np.float64) - ref)
        worst = max(worst, diff.max())
        assert diff.mean() < 0.05
    assert worst <= 1
    # identity: a crop resized to its own size is the crop, mirrored when flipped
    out = np.zeros((20, 30, 3), np.uint8)
    resize_bilinear_into(src, out, 5, 7, 1.0, 1.0, 5, 24, 7, 36, True)
    np.testing.assert_array_equal(out, src[5:25, 7:37][:, ::-1])


def test_color_jitter_matches_float64_reference():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    same = img.copy()
    color_jitter_inplace(same, 1.0, 1.0, 1.0)
    np.testing.assert_array_equal(same, img)
    for b, c, s in [(1.3, 0.7, 1.4), (0.6, 1.4, 0.5), (1.0, 1.0, 0.0)]:
        x = img.astype(np.float64)
        grey = lambda a: 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]
        x = np.clip(x * b, 0, 255)
        x = np.clip(grey(x).mean() + (x - grey(x).mean()) * c, 0, 255)
        g = grey(x)[..., None]
        ref = np.floor(np.clip(g + (x - g) * s, 0, 255) + 0.5)
        out = img.copy()
        color_jitter_inplace(out, b, c, s)
        assert np.abs(out - ref).max() <= 1
    out = img.copy()
    color_jitter_inplace(out, 1.0, 1.0, 0.0)  # saturation 0 = grey
    assert np.abs(out.astype(int).max(-1) - out.astype(int).min(-1)).max() <= 1


def test_central_crop_geometry_known_numbers():
    # 375x500 -> shorter side 256: 256x341 (341.33 rounded); centre 224 crop at (16, 58).
    y0, x0, sy, sx = central_crop_geometry(375, 500, 224, 256)
    assert sy == pytest.approx(375 / 256) and sx == pytest.approx(500 / 341)
    assert y0 == pytest.approx(16 * 375 / 256) and x0 == pytest.approx(58 * 500 / 341)
    with pytest.raises(ValueError, match="eval_resize"):
        central_crop_geometry(10, 10, 224, 200)


def test_dct_scaled_decode_gives_the_same_crop():
    # A smooth 400x480 image, tiny output: decoding at 1/8 scale must sample the same
    # region as the full decode (a coordinate bug would shift or scale the picture).
    from PIL import Image
    import io

    yy, xx = np.mgrid[0:400, 0:480]
    img = np.stack([yy * 255 // 400, xx * 255 // 480, (yy + xx) * 255 // 880], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    for seed in range(5):
        outs = []
        for dct in (False, True):
            out = np.zeros((16, 16, 3), np.uint8)
            train_transform_into(jpeg, out, np.random.default_rng(seed), dct_scaling=dct)
            outs.append(out.astype(int))
        assert np.abs(outs[0] - outs[1]).mean() < 4, seed
