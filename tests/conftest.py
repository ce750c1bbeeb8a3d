"""Shared pytest setup: tests marked `@pytest.mark.gpu` run only where CuPy sees a CUDA GPU.

Without one they are skipped with the reason (CuPy missing, no device, driver error), so the
same command runs everything on a GPU machine and the rest everywhere else. Other test files
may call `gpu_available()` directly (e.g. to parametrize a backend list).

The simulated GPU: `KERNELS_CUDASIM=1 python -m pytest -m gpu` runs the GPU tests on a CPU
(kernels/emu/cudasim.py: `import cupy` gives a CuPy-shaped stand-in whose kernels run on the
emulator). `CUDASIM` tells a test it is there, so that a shape only a GPU can afford may
shrink; `real_gpu_only(reason)` marks what only real hardware can show (timings, cuDNN,
NCCL, NVRTC's code), skipped under the simulator with the reason.
"""

import functools
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CUDASIM = os.environ.get("KERNELS_CUDASIM", "").strip() not in ("", "0")
if CUDASIM:
    import kernels  # noqa: F401  (installs the simulated GPU as `cupy` before any test imports CuPy)


def real_gpu_only(reason):
    """Mark a test (or a parameter) that needs real GPU hardware for `reason`: skipped under the
    simulated GPU, which runs the same Python but has no timings, cuDNN, NCCL or NVRTC."""
    return pytest.mark.skipif(CUDASIM, reason=f"needs a real GPU ({reason}); the GPU is simulated (KERNELS_CUDASIM=1)")


@functools.lru_cache(maxsize=None)
def gpu_available():
    """(True, "<n> CUDA device(s)") if CuPy imports and sees a GPU, else (False, the reason).

    CuPy is imported here, lazily, so test collection never needs it. Any failure (no CuPy, no
    driver, a driver too old for the CuPy wheel, ...) counts as "no GPU", with its message.
    """
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc}); install the `gpu` extra"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy finds no usable CUDA device ({type(exc).__name__}: {exc})"
    if count <= 0:
        return False, "CuPy finds no CUDA device"
    if getattr(cupy, "__cudasim__", False):
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        return True, f"{count} simulated CUDA device ({name}, KERNELS_CUDASIM=1)"
    return True, f"{count} CUDA device(s)"


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None:
        ok, reason = gpu_available()
        if not ok:
            pytest.skip(f"GPU test skipped: {reason}")


class Backend:
    """Where a kernel test runs: 'emu' (NumPy arrays, the CPU emulator) or 'cuda' (CuPy arrays).

    `to_device(a)` moves a NumPy array there, `to_host(a)` brings a result back as NumPy.
    """

    def __init__(self, name):
        self.name = name
        if name == "cuda":
            import cupy
            self.xp = cupy
        else:
            import numpy
            self.xp = numpy

    def to_device(self, a):
        return self.xp.asarray(a)

    def to_host(self, a):
        if self.name == "cuda":
            return self.xp.asnumpy(a)
        return a

    def __repr__(self):
        return self.name


@pytest.fixture(params=["emu", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    """Run the test once on the CPU emulator and, where a GPU is present, once on the GPU."""
    return Backend(request.param)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """train.py's tiny synthetic dataset, packed (a folder with train.lmdb and val.lmdb), built once
    per test session in a private cache. Tests that change it work on a copy."""
    sys.path.insert(0, str(ROOT))
    import train
    old = os.environ.get("MLPERF_RESNET_CACHE")
    os.environ["MLPERF_RESNET_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return Path(train.prepare_synthetic("tiny", progress=False))
    finally:
        if old is None:
            del os.environ["MLPERF_RESNET_CACHE"]
        else:
            os.environ["MLPERF_RESNET_CACHE"] = old


@pytest.fixture
def mpiexec():
    """The mpiexec of the test extra's MPICH wheel (or one on PATH), with mpi4py; else skip."""
    here = Path(sys.executable).parent / "mpiexec"
    path = str(here) if here.exists() else shutil.which("mpiexec")
    if path is None:
        pytest.skip("no mpiexec (pip install -e '.[test]' brings the mpich wheel)")
    pytest.importorskip("mpi4py")
    return path
