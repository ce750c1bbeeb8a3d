"""Input normalisation kernel (kernels/input.cu) against the NumPy reference.
Emulator always, GPU when present."""

import numpy as np
import pytest

from kernels import input as inp
from kernels import reference as ref
from kernels.runtime import trace

STD = (58.395, 57.12, 57.375)


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("std", [None, STD], ids=["mean-only", "mean-std"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 7, 5, 3), (3, 9, 11, 3), (1, 16, 16, 3), (3, 29, 31, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_float32(backend, shape, std, version):
    rng = np.random.default_rng(sum(shape))
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    flat = images.reshape(-1)
    flat[:6] = [0, 255, 0, 255, 0, 255][:flat.size]    # the extremes
    x = inp.input_normalize(backend.to_device(images), std=std, version=version)
    assert x.dtype == np.float32 and x.shape == shape
    want = ref.input_normalize(images, std=std, dtype=np.float64)
    got = backend.to_host(x).astype(np.float64)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


@pytest.mark.parametrize("version", [1, 3])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 29, 31, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("std", [None, STD], ids=["mean-only", "mean-std"])
def test_float16_output(backend, std, shape, version):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    x = inp.input_normalize(backend.to_device(images), std=std, dtype=np.float16, version=version)
    assert x.dtype == np.float16
    want = ref.input_normalize(images, std=std, dtype=np.float64)
    # float16 rounding: half an ulp, relative 2^-11
    assert np.max(np.abs(backend.to_host(x).astype(np.float64) - want) / np.maximum(np.abs(want), 1e-3)) <= 2.0**-11


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_version_3_stages_whole_tiles_and_matches_version_1(backend, dtype):
    """3 x 29 x 31 x 3 = 8091 bytes: one whole 4096-byte tile (its second starts on channel G:
    4096 = 1 mod 3) and a tail of 3995 values one per thread.  Without std the same bits as version 1
    (MLPerf's recipe); with std within one float rounding."""
    rng = np.random.default_rng(3)
    images = backend.to_device(rng.integers(0, 256, (3, 29, 31, 3), dtype=np.uint8))
    with trace.collect() as t:
        x3 = backend.to_host(inp.input_normalize(images, dtype=dtype, version=3))
        s3 = backend.to_host(inp.input_normalize(images, std=STD, dtype=dtype, version=3))
    assert set(t.by_kernel()) == {f"input_normalize_tiles_{'f32' if dtype == np.float32 else 'f16'}"}
    np.testing.assert_array_equal(x3, backend.to_host(inp.input_normalize(images, dtype=dtype, version=1)))
    s1 = backend.to_host(inp.input_normalize(images, std=STD, dtype=dtype, version=1))
    np.testing.assert_allclose(s3, s1, rtol=2 ** -23 if dtype == np.float32 else 2 ** -10, atol=1e-7)


def test_custom_mean_and_unaligned_input_fall_back_correctly():
    rng = np.random.default_rng(2)
    buf = rng.integers(0, 256, 1 + 2 * 3 * 3 * 3, dtype=np.uint8)
    images = buf[1:].reshape(2, 3, 3, 3)       # data pointer 1 byte past an aligned one
    want = (images.astype(np.float64) - [1.0, 2.0, 3.0]) / [2.0, 4.0, 8.0]
    for version in (2, 3):
        with trace.collect() as t:
            x = inp.input_normalize(images, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0), version=version)
        assert set(t.by_kernel()) == {"input_normalize_f32"}
        np.testing.assert_allclose(x, want, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
    images = np.zeros((1, 4, 4, 3), np.uint8)
    with pytest.raises(TypeError, match="images_uint8 must be uint8"):
        inp.input_normalize(images.astype(np.float32))
    with pytest.raises(ValueError, match="3 channels last"):
        inp.input_normalize(np.zeros((1, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="4 dimensions"):
        inp.input_normalize(images[0])
    with pytest.raises(ValueError, match="C-contiguous"):
        inp.input_normalize(np.swapaxes(images, 1, 2))
    with pytest.raises(ValueError, match="mean must be 3 finite numbers"):
        inp.input_normalize(images, mean=(1.0, 2.0))
    with pytest.raises(ValueError, match="std must not contain 0"):
        inp.input_normalize(images, std=(1.0, 0.0, 1.0))
    with pytest.raises(TypeError, match="dtype must be float32 or float16"):
        inp.input_normalize(images, dtype=np.float64)
