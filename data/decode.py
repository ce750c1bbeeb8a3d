"""JPEG decoding through libjpeg-turbo (the simplejpeg binding).

Why simplejpeg: it calls TurboJPEG directly into a NumPy array, releases the GIL,
and can decode at 1/2, 1/4, 1/8 scale inside the IDCT ("DCT-domain downscaling").
Measured on a 2-core x86-64 CPU, 500x375 quality-90 JPEGs, one core: simplejpeg
1,270-2,750 images/s vs Pillow 540-1,730 images/s (Pillow 12, also libjpeg-turbo;
simplejpeg was 1.3-2.4x faster in every run; the gap is Pillow's per-image object
and copy overhead). See data/README.md and ``python -m bench.loader``.

Colour handling (all outputs are RGB):
- YCbCr and grayscale JPEGs: libjpeg-turbo converts to RGB (identical to Pillow).
- CMYK / YCCK JPEGs: decoded to CMYK by libjpeg-turbo, then converted here with
  R = C*K/255 (rounded), where C, K are the stored, Adobe-inverted values that
  Photoshop, libjpeg and Pillow write. That is Pillow's formula, so the result
  equals Pillow's ``.convert("RGB")``; TurboJPEG's own CMYK->RGB path differs by
  up to 2 levels, which is why we do not use it.

Damaged files: libjpeg-turbo recovers from some damage with only a warning (a truncated
file is filled with grey; corrupt entropy-coded data leaves "extraneous bytes before
marker"). ``decode_jpeg`` decodes such files, as Pillow mostly does; ``decode_jpeg_checked``
also says whether libjpeg-turbo warned. It decodes with TurboJPEG's stop-on-warning flag
(simplejpeg's ``strict=True``) and decodes again leniently only when that fails, so a
clean file costs one decode, exactly as before. JPEG has no checksum: damage that keeps the
entropy-coded data consistent (a flipped bit that still reads as valid Huffman codes) decodes
to a garbled image with no warning, and no decoder can tell.

Decompression bombs: a file whose header claims more than ``MAX_PIXELS`` pixels (Pillow's
default limit, ~89 M) is refused with ValueError before anything is allocated.
"""

import numpy as np
import simplejpeg

# The most pixels a file may have before it is decoded. A JPEG's header can claim 65500 x 65500
# in a few hundred bytes, and the decoder would allocate 12 GiB for it (a "decompression bomb");
# the limit is Pillow's default Image.MAX_IMAGE_PIXELS.
MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def check_pixels(height, width):
    """Raise ValueError if an image of height x width pixels is over ``MAX_PIXELS``."""
    if height * width > MAX_PIXELS:
        raise ValueError(f"the header says {width}x{height} pixels, over the limit of {MAX_PIXELS} "
                         f"(data.decode.MAX_PIXELS): refused before decoding (a decompression bomb?)")


def jpeg_header(buf):
    """(height, width, colorspace) of a JPEG in ``buf`` (bytes-like); ValueError if not a JPEG."""
    if bytes(buf[:3]) != b"\xff\xd8\xff":
        raise ValueError("buf is not a JPEG file (it does not start with the JPEG SOI marker FF D8 FF)")
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(buf, strict=False)
    except (ValueError, KeyError, IndexError) as e:  # simplejpeg raises KeyError for some bad headers
        raise ValueError(f"unreadable JPEG header: {e!r}") from None
    return height, width, colorspace


def _cmyk_to_rgb(cmyk):
    # uint8 [H, W, 4] Adobe-inverted CMYK -> uint8 [H, W, 3] RGB, rounded like Pillow.
    c = cmyk.astype(np.uint32)
    return ((c[..., :3] * c[..., 3:4] + 127) // 255).astype(np.uint8)


def decode_jpeg(buf, min_height=0, min_width=0, strict=False):
    """Decode a JPEG to RGB.

    buf: bytes-like holding a whole JPEG file (YCbCr, grayscale, CMYK or YCCK).
    min_height, min_width: if > 0, let libjpeg-turbo downscale by 1/2, 1/4 or 1/8
        in the DCT domain to the smallest size that is still at least this large
        (the result may be up to 8x smaller than the file's own size).
    strict: also raise ValueError (libjpeg-turbo's message) for damage libjpeg-turbo can
        recover from, i.e. for any warning it gives.
    Returns a C-contiguous uint8 array [H, W, 3], RGB.
    Raises ValueError for data that is not a decodable JPEG, and for a header over
    ``MAX_PIXELS`` (before anything is allocated). Without ``strict``, recoverable damage
    (e.g. a truncated scan, which libjpeg fills with grey) is decoded, as Pillow does.
    """
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise TypeError(f"buf must be bytes-like, got {type(buf).__name__}")
    height, width, colorspace = jpeg_header(buf)
    check_pixels(height, width)
    kwargs = dict(min_height=int(min_height), min_width=int(min_width), strict=bool(strict))
    try:
        if colorspace in ("CMYK", "YCCK"):
            return _cmyk_to_rgb(simplejpeg.decode_jpeg(buf, colorspace="CMYK", **kwargs))
        return simplejpeg.decode_jpeg(buf, colorspace="RGB", **kwargs)
    except (KeyError, IndexError) as e:
        raise ValueError(f"undecodable JPEG: {e!r}") from None


def decode_jpeg_checked(buf, min_height=0, min_width=0):
    """Decode a JPEG like ``decode_jpeg`` and report recoverable damage.

    Returns (rgb uint8 [H, W, 3], warning): warning is None for a clean file, else
    libjpeg-turbo's message (e.g. "Premature end of JPEG file" for a truncated file,
    "Corrupt JPEG data: 27 extraneous bytes before marker 0xd9" for damaged entropy-coded
    data); the image is then libjpeg-turbo's best effort, as ``decode_jpeg`` returns it.
    Raises ValueError for data that does not decode at all.
    """
    try:
        return decode_jpeg(buf, min_height, min_width, strict=True), None
    except ValueError as e:
        warning = str(e)
    return decode_jpeg(buf, min_height, min_width, strict=False), warning  # raises if it cannot decode
