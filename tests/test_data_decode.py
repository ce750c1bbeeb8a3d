"""data.decode.decode_jpeg against Pillow's decode of the same file (both libjpeg-turbo)."""

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageFilter

from data.decode import decode_jpeg


def _photo_like(h, w, seed):
    # Noise blurred into blobs plus edges: exercises the IDCT and the chroma upsampling.
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(img).copy()
    arr[h // 3: h // 2, :] = rng.integers(0, 256, 3)
    return arr


def _pil_jpeg(arr, mode, **save):
    out = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(out, "JPEG", **save)
    return out.getvalue()


def _pillow_rgb(buf):
    return np.asarray(Image.open(io.BytesIO(buf)).convert("RGB")).astype(int)


CASES = {
    "rgb q90 4:2:0": lambda a: _pil_jpeg(a, "RGB", quality=90),
    "rgb q75 4:4:4": lambda a: _pil_jpeg(a, "RGB", quality=75, subsampling=0),
    "rgb progressive": lambda a: _pil_jpeg(a, "RGB", quality=85, progressive=True),
    "grayscale": lambda a: _pil_jpeg(a, "L", quality=90),
    "cmyk (Adobe, Pillow)": lambda a: _pil_jpeg(a, "CMYK", quality=90),
    "ycck (Adobe, libjpeg-turbo)": lambda a: simplejpeg.encode_jpeg(
        np.ascontiguousarray(np.concatenate([a, a[..., :1] // 3], -1)), quality=90, colorspace="CMYK"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("size", [(47, 61), (120, 90)])
def test_decode_equals_pillow_within_one(case, size):
    buf = CASES[case](_photo_like(*size, seed=list(CASES).index(case)))
    ours = decode_jpeg(buf)
    assert ours.dtype == np.uint8 and ours.shape == (*size, 3) and ours.flags.c_contiguous
    diff = np.abs(ours.astype(int) - _pillow_rgb(buf))
    assert diff.max() <= 1, (case, diff.max())


def test_accepts_memoryview_and_bytearray():
    buf = CASES["rgb q90 4:2:0"](_photo_like(30, 40, 1))
    ref = decode_jpeg(buf)
    np.testing.assert_array_equal(decode_jpeg(memoryview(buf)), ref)
    np.testing.assert_array_equal(decode_jpeg(bytearray(buf)), ref)


def test_dct_domain_downscale():
    buf = CASES["rgb q90 4:2:0"](_photo_like(160, 240, 2))
    small = decode_jpeg(buf, min_height=35, min_width=50)
    assert small.shape == (40, 60, 3)  # 1/4 scale is the smallest that keeps >= 35 x 50
    full = decode_jpeg(buf).astype(float)
    block_mean = full.reshape(40, 4, 60, 4, 3).mean((1, 3))
    assert np.abs(small - block_mean).mean() < 3  # same picture, box-averaged


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="not a JPEG"):
        decode_jpeg(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError):
        decode_jpeg(b"\xff\xd8\xff\xe0" + bytes(50))  # a JPEG marker, then nothing decodable
    with pytest.raises(TypeError, match="buf"):
        decode_jpeg("not bytes")
