"""data.decode.decode_jpeg against Pillow's decode of the same file (both libjpeg-turbo)."""

import io
import re

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageFilter

from data.decode import decode_jpeg, decode_jpeg_checked


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


def _entropy_coded_segment(jpeg):
    # (start, end) of the scan's entropy-coded data: after the SOS header, before EOI.
    sos = jpeg.find(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big"), jpeg.rindex(b"\xff\xd9")


def damaged_jpegs(seed=4):
    """A clean baseline JPEG (96 x 128, encoded by libjpeg-turbo) and two damaged copies:
    {"clean", "truncated" (cut at half its length), "entropy" (8 bytes in the middle of the
    entropy-coded segment XORed with 0x5A)}. Shared with tests/test_data_pack.py."""
    clean = simplejpeg.encode_jpeg(np.ascontiguousarray(_photo_like(96, 128, seed)), quality=90)
    start, end = _entropy_coded_segment(clean)
    entropy = bytearray(clean)
    middle = (start + end) // 2
    for k in range(middle, middle + 8):
        entropy[k] ^= 0x5A
    return {"clean": clean, "truncated": clean[:len(clean) // 2], "entropy": bytes(entropy)}


def test_damaged_jpegs_decode_with_the_decoders_warning():
    jpegs = damaged_jpegs()
    clean, warning = decode_jpeg_checked(jpegs["clean"])
    assert warning is None
    np.testing.assert_array_equal(clean, decode_jpeg(jpegs["clean"]))
    # truncated at half: libjpeg-turbo fills the missing rows with grey and warns; Pillow refuses it
    image, warning = decode_jpeg_checked(jpegs["truncated"])
    assert warning == "Premature end of JPEG file"
    assert image.shape == (96, 128, 3)
    np.testing.assert_array_equal(image, decode_jpeg(jpegs["truncated"]))  # the same best-effort image
    np.testing.assert_array_equal(image[:40], clean[:40])  # the first rows are all there ...
    assert np.all(image[-16:] == 128)  # ... the last ones are grey
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(jpegs["truncated"])).load()
    # 8 flipped bytes of entropy-coded data: the Huffman decoder loses step, the MCUs end
    # before the data does, and libjpeg-turbo says how many bytes were left over
    image, warning = decode_jpeg_checked(jpegs["entropy"])
    assert re.fullmatch(r"Corrupt JPEG data: \d+ extraneous bytes before marker 0xd9", warning), warning
    assert np.abs(image.astype(int) - clean).max() > 50  # garbled
    for kind in ("truncated", "entropy"):
        with pytest.raises(ValueError):
            decode_jpeg(jpegs[kind], strict=True)
    with pytest.raises(ValueError):
        decode_jpeg_checked(b"\xff\xd8\xff\xe0" + bytes(50))  # not decodable at all: still an error


def test_entropy_damage_without_a_warning_is_invisible():
    # The documented limit: JPEG has no checksum, so when the Huffman decoder falls back into
    # step and ends exactly where the data ends, the file decodes garbled with no warning.
    jpegs = damaged_jpegs(seed=2)
    image, warning = decode_jpeg_checked(jpegs["entropy"])
    assert warning is None
    assert np.abs(image.astype(int) - decode_jpeg(jpegs["clean"])).max() > 50
