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


# ---- whole suites in a subprocess, started early -------------------------------------------------
# Two tests run a whole test suite in a subprocess: the kernel tests under the emulator's four
# checks, and the GPU tests on the simulated GPU. Each keeps one core busy for minutes. A test
# marked `@pytest.mark.early(command=f)` has its subprocess started as soon as collection knows it
# will run (after -k/-m selection), so it uses the second core while the rest of the suite runs;
# the test then only waits for it through the `early_run` fixture. `f(folder)` returns
# (argv, env) to run, with `folder` a fresh directory for the subprocess's files, or a string:
# the reason to skip. Nothing runs early for a test that is not selected.

class EarlyRun:
    """A started subprocess of an `early` test; `result()` waits for it."""

    def __init__(self, argv, env, folder, timeout):
        self.folder, self.timeout = folder, timeout
        self._out = open(folder / "stdout.txt", "w+")
        self._err = open(folder / "stderr.txt", "w+")
        import subprocess
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._out, stderr=self._err, text=True)

    def result(self):
        """(returncode, stdout, stderr) once the subprocess has ended; kills it at the time limit."""
        import subprocess
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{' '.join(self.proc.args[:6])} ... ran past its {self.timeout} s")
        self._out.seek(0)
        self._err.seek(0)
        return self.proc.returncode, self._out.read(), self._err.read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_EARLY = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "early(command=f, timeout=1800): the test's subprocess starts as soon as "
                                       "the session is collected (tests/conftest.py)")


@pytest.hookimpl(trylast=True)   # after -k / -m have deselected what will not run
def pytest_collection_modifyitems(session, config, items):
    import tempfile
    for item in items:
        mark = item.get_closest_marker("early")
        if mark is None or config.option.collectonly:
            continue
        folder = Path(tempfile.mkdtemp(prefix="early-"))
        what = mark.kwargs["command"](folder)   # a keyword: pytest.mark.early(f) would mark f itself
        _EARLY[item.nodeid] = what if isinstance(what, str) else EarlyRun(*what, folder,
                                                                              mark.kwargs.get("timeout", 1800))


def pytest_sessionfinish(session, exitstatus):
    for run in _EARLY.values():      # a session stopped early (-x, Ctrl-C) leaves nothing running
        if isinstance(run, EarlyRun):
            run.kill()
            run._out.close()
            run._err.close()
            shutil.rmtree(run.folder, ignore_errors=True)


@pytest.fixture
def early_run(request):
    """The finished subprocess of this `early` test: (returncode, stdout, stderr, folder)."""
    run = _EARLY.get(request.node.nodeid)
    if run is None:
        pytest.fail("early_run needs @pytest.mark.early(command=f)")
    if isinstance(run, str):
        pytest.skip(run)
    return (*run.result(), run.folder)
