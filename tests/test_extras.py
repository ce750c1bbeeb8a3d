"""The GPU extras of setup.cfg make a machine with only the NVIDIA driver work: bench/check_extras.py
installs each into a fresh virtual environment and, without a GPU, loads NVRTC, resolves every CUDA
header our kernels include on CuPy's include path, compiles every kernel with CuPy's NVRTC program
and loads NCCL, each from the environment itself.

The real check downloads ~0.5 GB per extra (light install; `full`: 4.5-5.5 GB) and takes about a
minute per extra (measured: bench/NOTES.md), so it runs when MLPERF_CHECK_EXTRAS asks for it:
    MLPERF_CHECK_EXTRAS=light python -m pytest tests/test_extras.py      # gpu and gpu-cuda13
    MLPERF_CHECK_EXTRAS=full:gpu-cuda13 python -m pytest tests/test_extras.py
"""

import os

import pytest

from bench import check_extras


def _requested():
    value = os.environ.get("MLPERF_CHECK_EXTRAS", "").strip()
    if not value or value == "0":
        return None, ()
    mode, _, names = value.partition(":")
    if mode not in ("light", "full"):
        raise ValueError(f"MLPERF_CHECK_EXTRAS must be 'light' or 'full', optionally ':extra,extra', got {value!r}")
    return mode, tuple(n for n in names.split(",") if n) or check_extras.DEFAULT_EXTRAS


MODE, EXTRAS = _requested()


@pytest.mark.slow
@pytest.mark.parametrize("extra", EXTRAS or check_extras.DEFAULT_EXTRAS)
def test_extra_makes_a_bare_driver_machine_work(extra, tmp_path):
    if MODE is None:
        pytest.skip("MLPERF_CHECK_EXTRAS is not set: the extras check downloads ~0.5 GB per extra "
                    "(set MLPERF_CHECK_EXTRAS=light to run it)")
    if not check_extras.pypi_reachable():
        pytest.skip("PyPI cannot be reached from this machine")
    import shutil
    free = shutil.disk_usage(tmp_path).free
    if free < 4 * 2 ** 30:
        pytest.skip(f"only {free / 2 ** 30:.1f} GiB free under {tmp_path}: the check installs ~1.2 GiB per extra")
    res = check_extras.check_extra(extra, full=MODE == "full", workdir=str(tmp_path))
    lines = []
    check_extras.print_result(res, say=lines.append)
    assert res["ok"], "\n".join(lines)
    names = {c["name"] for c in res["checks"]}
    assert {"NVRTC loads", "NCCL loads", "<crt/mma.h> resolves"} <= names
    assert sum("compiles" in n for n in names) >= 2 * 10      # every kernels/*.cu, two architectures


def test_probe_reports_a_missing_cupy_instead_of_failing():
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    out = check_extras.probe()
    assert out["checks"][0]["name"] == "cupy imports" and not out["checks"][0]["ok"]
    assert "cupy" in out["checks"][0]["detail"].lower()


def test_unknown_extra_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        check_extras.main(["gpu-cuda10"])
    assert info.value.code == check_extras.EXIT_USAGE
