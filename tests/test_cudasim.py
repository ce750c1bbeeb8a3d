"""The simulated GPU (kernels/emu/cudasim.py, KERNELS_CUDASIM=1) against NumPy.

Two kinds of tests:
- GPU tests (`-m gpu`) of what CuPy promises and the project relies on: an array's round trip,
  the order of a stream, events, a CUDA graph replaying on the same buffers what eager launches
  compute, the memory pool's counters, host reads refused during a capture. They run against the
  stand-in under KERNELS_CUDASIM=1 and against the real CuPy on a GPU: the same test holds both
  to NumPy, so a difference between the simulator and a GPU shows as a failure on the GPU.
- The simulator's own promises, which need no GPU and run in every test run: the declared GPU,
  kernels compiled at its architecture, garbage in fresh memory, the refusals that name it.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kernels
from kernels.emu import cudasim

ROOT = Path(__file__).resolve().parent.parent

AXPY = r'''
extern "C" __global__ void axpy(float a, const float* __restrict__ x, float* __restrict__ y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = a * x[i] + y[i];
}
extern "C" __global__ void arch(int* out) { out[0] = __CUDA_ARCH__; }
'''


def _axpy():
    return kernels.RawKernel(AXPY, "axpy")


# ------------------------------------------------------------------ GPU tests: the stand-in and CuPy alike

@pytest.mark.gpu
def test_round_trip_and_device_arrays():
    import cupy
    rng = np.random.default_rng(0)
    host = rng.standard_normal((7, 5)).astype(np.float32)
    x = cupy.asarray(host)
    assert isinstance(x, cupy.ndarray) and not isinstance(x, np.ndarray)
    assert x.shape == (7, 5) and x.dtype == np.float32 and x.strides == host.strides and x.nbytes == host.nbytes
    assert x.flags.c_contiguous and x.data.ptr % 256 == 0        # an allocation is 256-byte aligned
    back = x.get()
    assert isinstance(back, np.ndarray) and np.array_equal(back, host)
    host[0, 0] = 99.0                                             # the device copy is its own memory
    assert float(x[0, 0]) != 99.0
    with pytest.raises(TypeError):
        np.asarray(x)                                            # no silent copy to the host
    # arithmetic, reductions and views stay on the device and agree with NumPy
    y = (x * 2 + 1)[1:5].T
    assert isinstance(y, cupy.ndarray) and y.shape == (5, 4)
    np.testing.assert_array_equal(cupy.asnumpy(y), (back * 2 + 1)[1:5].T)
    s = x.sum(axis=0)
    assert isinstance(s, cupy.ndarray)
    np.testing.assert_allclose(s.get(), back.sum(axis=0), rtol=1e-6)
    total = x.sum()
    assert isinstance(total, cupy.ndarray) and total.ndim == 0
    v = x.reshape(-1)
    v[3] = 5.0                                                    # a view writes the array's memory
    assert float(x[0, 3]) == 5.0


@pytest.mark.gpu
def test_a_stream_runs_its_work_in_order_and_events_order_streams():
    import cupy
    rng = np.random.default_rng(1)
    host_x = rng.standard_normal(3000).astype(np.float32)
    host_y = rng.standard_normal(3000).astype(np.float32)
    k = _axpy()
    first, second = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    x, y = cupy.asarray(host_x), cupy.asarray(host_y)
    cupy.cuda.get_current_stream().synchronize()
    want_y = host_y.copy()
    with first:
        for a in (0.5, -2.0, 3.0):                                # each launch reads the previous one's y
            k((4,), (256,), (np.float32(a), x, y, np.int32(3000)))
            want_y = np.float32(a) * host_x + want_y
        y *= 2
        want_y = want_y * 2
        done = first.record()
    second.wait_event(done)
    with second:
        z = y - x                                                 # sees everything `first` did
    second.synchronize()
    np.testing.assert_allclose(y.get(), want_y, rtol=1e-6)
    np.testing.assert_allclose(z.get(), want_y - host_x, rtol=1e-6)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    k((4,), (256,), (np.float32(1.0), x, y, np.int32(3000)))
    stop.record()
    stop.synchronize()
    assert stop.done and cupy.cuda.get_elapsed_time(start, stop) >= 0.0


@pytest.mark.gpu
def test_a_graph_replays_on_the_same_buffers_what_eager_launches_compute():
    import cupy
    rng = np.random.default_rng(2)
    n = 1000
    host_x = rng.standard_normal(n).astype(np.float32)
    host_y = rng.standard_normal(n).astype(np.float32)
    k = _axpy()

    def step(x, y):
        """A kernel, an in-place array operation and a new array: what a training step does."""
        k((4,), (256,), (np.float32(0.5), x, y, np.int32(n)))
        x *= np.float32(1.5)
        return y - x

    # eager, three times, in NumPy (float32, the same operations in the same order)
    want_x, want_y = host_x.copy(), host_y.copy()
    for _ in range(3):
        want_y = np.float32(0.5) * want_x + want_y
        want_x = want_x * np.float32(1.5)
    want_z = want_y - want_x

    pool = cupy.cuda.MemoryPool()
    stream = cupy.cuda.Stream(non_blocking=True)
    x, y = cupy.asarray(host_x), cupy.asarray(host_y)
    cupy.cuda.get_current_stream().synchronize()
    with cupy.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        z = step(x, y)
        graph = stream.end_capture()
    np.testing.assert_array_equal(x.get(), host_x)               # capturing executed nothing
    np.testing.assert_array_equal(y.get(), host_y)
    for _ in range(3):
        graph.launch(stream=stream)
    stream.synchronize()
    np.testing.assert_allclose(x.get(), want_x, rtol=1e-6)
    np.testing.assert_allclose(y.get(), want_y, rtol=1e-6)
    np.testing.assert_allclose(z.get(), want_z, rtol=1e-6, atol=1e-6)   # the array the capture made, refilled


@pytest.mark.gpu
def test_a_host_read_during_a_capture_is_refused_and_ends_it():
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    pool = cupy.cuda.MemoryPool()
    x = cupy.arange(10, dtype=np.float32)
    cupy.cuda.get_current_stream().synchronize()
    with cupy.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        y = x * 2
        with pytest.raises(Exception, match="cudaErrorStreamCapture"):
            y.get()
        assert stream.is_capturing()
        with pytest.raises(Exception, match="cudaErrorStreamCapture"):
            stream.end_capture()
    assert not stream.is_capturing()
    with stream:
        np.testing.assert_array_equal((x * 2).get(), np.arange(10, dtype=np.float32) * 2)   # usable again


@pytest.mark.gpu
def test_the_pool_counts_live_and_cached_blocks():
    import cupy
    pool = cupy.cuda.MemoryPool()
    assert pool.used_bytes() == pool.total_bytes() == 0
    with cupy.cuda.using_allocator(pool.malloc):
        a = cupy.empty(1000, np.float32)                        # 4000 bytes: one 4096-byte block (512s)
        b = cupy.zeros((3, 100), np.float64)                     # 2400 bytes: 2560
        assert pool.used_bytes() == 4096 + 2560
        view = a[10:20]
        del a                                                     # the view keeps the block alive
        assert pool.used_bytes() == 4096 + 2560
        del view
        assert pool.used_bytes() == 2560 and pool.total_bytes() == 4096 + 2560   # kept for reuse
        c = cupy.empty(1024, np.float32)                         # the cached block, reused
        assert pool.used_bytes() == 4096 + 2560 and pool.total_bytes() == 4096 + 2560
        del b, c
    assert pool.used_bytes() == 0 and pool.n_free_blocks() == 2
    pool.free_all_blocks()
    assert pool.total_bytes() == 0


@pytest.mark.gpu
def test_device_properties_and_memory_info():
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    assert n >= 1 and props["multiProcessorCount"] > 0 and props["major"] >= 6
    assert props["sharedMemPerBlockOptin"] >= props["sharedMemPerBlock"] == 48 * 1024
    free, total = cupy.cuda.runtime.memGetInfo()
    assert 0 < free <= total <= props["totalGlobalMem"]
    assert cupy.cuda.runtime.runtimeGetVersion() > 0 and cupy.cuda.Device().id == 0


# ------------------------------------------------------------------ the simulator itself (no GPU needed)

def test_the_declared_gpu(monkeypatch):
    monkeypatch.delenv(cudasim.GPU_ENV, raising=False)
    cp = cudasim.module()
    props = cp.cuda.runtime.getDeviceProperties(0)
    assert props["name"].startswith(b"NVIDIA H100") and b"simulated" in props["name"]
    assert (props["major"], props["minor"], props["multiProcessorCount"]) == (9, 0, 132)
    assert props["sharedMemPerBlockOptin"] == 227 * 1024 and props["totalGlobalMem"] == 85017493504
    assert cp.cuda.Device().compute_capability == "90"
    monkeypatch.setenv(cudasim.GPU_ENV, "a100")
    props = cp.cuda.runtime.getDeviceProperties(0)
    assert (props["major"], props["multiProcessorCount"], props["sharedMemPerBlockOptin"]) == (8, 108, 163 * 1024)
    monkeypatch.setenv(cudasim.GPU_ENV, "B200")
    with pytest.raises(ValueError, match="KERNELS_CUDASIM_GPU='B200'.*H100"):
        cp.cuda.runtime.getDeviceProperties(0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="cudaErrorNoDevice"):
        cp.cuda.runtime.getDeviceCount()


def test_a_block_freed_while_the_pool_allocates_does_not_deadlock(monkeypatch):
    """Garbage collection can free a block (its finalizer gives it back to the pool) on the thread
    that is inside the pool's malloc, holding its lock: the lock must be re-entrant.  (A plain lock
    hung the simulated-GPU test run in tests/test_cuda_graph.py.)  The block is dropped from inside
    malloc here; the allocation runs in a thread that a deadlock would leave stuck."""
    import threading
    pool = cudasim.MemoryPool()
    doomed = [pool.malloc(4096)]
    real = cudasim._device_bytes_in_use

    def in_use_while_a_block_dies():
        doomed.clear()          # the last reference: its finalizer runs here, inside malloc
        return real()

    monkeypatch.setattr(cudasim, "_device_bytes_in_use", in_use_while_a_block_dies)
    got = []
    t = threading.Thread(target=lambda: got.append(pool.malloc(8192)), daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "malloc waited for its own lock"
    assert got and pool.used_bytes() == 8192 and pool.n_free_blocks() == 1


def test_fresh_memory_holds_garbage_until_written():
    cp = cudasim.module()
    a = cp.empty((4, 3), np.float32)
    assert np.isnan(a.get()).all()                        # not the zeros NumPy happened to find
    assert (cp.empty(5, np.int32).get() == -1).all()
    assert (cp.zeros(5, np.int32).get() == 0).all()


def test_a_pool_limit_is_an_out_of_memory_error_as_cupys(monkeypatch):
    cp = cudasim.module()
    pool = cp.cuda.MemoryPool()
    pool.set_limit(size=8192)
    with cp.cuda.using_allocator(pool.malloc):
        a = cp.empty(1024, np.float32)
        with pytest.raises(cp.cuda.memory.OutOfMemoryError,
                           match=r"allocating 8,192 bytes \(allocated so far: 4,096 bytes, limit set to: 8,192"):
            cp.empty(2048, np.float32)
        del a
        b = cp.empty(2048, np.float32)       # the cached block went back to the device to make room
    assert pool.used_bytes() == pool.total_bytes() == 8192 and b.size == 2048
    monkeypatch.setenv("CUPY_GPU_MEMORY_LIMIT", "50%")
    assert cp.cuda.MemoryPool().get_limit() == cudasim.declared_gpu().memory // 2


def test_out_of_place_results_of_a_capture_are_garbage_until_replayed():
    cp = cudasim.module()
    stream = cp.cuda.Stream(non_blocking=True)
    x = cp.arange(4, dtype=np.float32)
    with stream:
        stream.begin_capture()
        y = x + 1
        x += 10
        graph = stream.end_capture()
    assert np.isnan(y.get()).all() and np.array_equal(x.get(), [0, 1, 2, 3])
    graph.launch()
    assert np.array_equal(y.get(), [1, 2, 3, 4]) and np.array_equal(x.get(), [10, 11, 12, 13])
    graph.launch()
    assert np.array_equal(y.get(), [11, 12, 13, 14]) and np.array_equal(x.get(), [20, 21, 22, 23])


def test_the_legacy_stream_during_a_blocking_capture_is_an_error():
    cp = cudasim.module()
    blocking = cp.cuda.Stream()
    x = cp.zeros(3, np.float32)
    blocking.begin_capture()
    try:
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="cudaErrorStreamCaptureImplicit"):
            x.fill(1)                                        # the current stream is the legacy one
    finally:
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="Invalidated"):
            blocking.end_capture()
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="legacy"):
        cp.cuda.Stream.null.begin_capture()


def test_numpy_arrays_do_not_mix_into_device_operations():
    cp = cudasim.module()
    x = cp.ones(3, np.float32)
    for bad in (lambda: x + np.ones(3, np.float32), lambda: np.ones(3, np.float32) * x,
                lambda: cp.maximum(x, np.zeros(3, np.float32))):
        with pytest.raises(TypeError, match="Unsupported type"):
            bad()
    assert float((x + np.float32(2))[0]) == 3.0 and float((2 * x).sum()) == 6.0     # scalars are fine


def test_what_only_a_gpu_has_is_refused_by_name():
    cp = cudasim.module()
    for name in ("nccl", "cudnn", "nvrtc"):
        with pytest.raises(ImportError, match="needs a real GPU.*KERNELS_CUDASIM"):
            getattr(cp.cuda, name)
    with pytest.raises(AttributeError, match="simulated CuPy"):
        cp.cuda.no_such_thing


def test_installing_refuses_when_the_real_cupy_came_first(monkeypatch):
    import types
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    with pytest.raises(ImportError, match="real CuPy.*imported before `kernels`"):
        cudasim.install()


def _simulated(code, **env):
    e = dict(os.environ, KERNELS_CUDASIM="1", **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)


def test_kernels_run_at_the_declared_gpus_architecture_through_the_projects_launch_path():
    """`import nn` is enough to make `cupy` the simulator (train.py's order); data/device_prefetch's
    own `import cupy` then gets it too; a kernels.RawKernel launch on its arrays goes through
    CuPy's RawModule, compiled for the emulator at the declared GPU's __CUDA_ARCH__."""
    code = (
        "import numpy as np, nn, sys\n"
        "import cupy\n"
        "from data.device_prefetch import DevicePrefetcher\n"
        "assert cupy.__cudasim__ and nn.device.cuda_is_simulated() and nn.device.auto_device() == 'cuda'\n"
        "batches = [(np.full((2, 4, 4, 3), i, np.uint8), np.arange(2, dtype=np.int32) + i) for i in range(3)]\n"
        "got = [(int(x.astype(np.int64).sum()), y.get().tolist()) for x, y in DevicePrefetcher(batches, 'cuda')]\n"
        "assert got == [(96 * i, [i, i + 1]) for i in range(3)], got\n"
        "import kernels\n"
        f"k = kernels.RawKernel({AXPY!r}, 'arch')\n"
        "out = cupy.zeros(1, np.int32)\n"
        "k((1,), (1,), (out,))\n"
        "print(int(out[0]))\n")
    for gpu, arch in (("H100", 900), ("P100", 600)):
        proc = _simulated(code, KERNELS_CUDASIM_GPU=gpu)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.split()[-1] == str(arch)


def test_train_py_says_the_gpu_is_simulated_in_its_log(tiny_data, tmp_path):
    """The MLPerf log's platform names the simulated GPU, never a real one."""
    code = ("import sys, train\n"
            f"sys.exit(train.main(['--data', {str(tiny_data)!r}, '--device', 'cuda', '--workers', '0', "
            "'--no-progress', '--batch-size', '8', '--width', '0.0625', '--image-size', '32', '--max-steps', '1', "
            f"'--out', {str(tmp_path / 'run')!r}]))\n")
    proc = _simulated(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "run" / "mlperf.log").read_text()
    assert '"submission_platform", "value": "1xNVIDIA H100 80GB HBM3 (simulated)"' in log


def _simulated_gpu_suite(folder):
    from tests.conftest import CUDASIM, gpu_available
    if CUDASIM:
        return "this run is on the simulated GPU already"
    ok, why = gpu_available()
    if ok:
        return f"a GPU is here ({why}): this run executes the GPU tests on it"
    return ([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
             f"--basetemp={folder / 'tmp'}", f"--junitxml={folder / 'gpu-tests.xml'}"],
            dict(os.environ, KERNELS_CUDASIM="1"))


@pytest.mark.slow
@pytest.mark.early(command=_simulated_gpu_suite, timeout=1800)
def test_the_gpu_tests_pass_on_the_simulated_gpu(early_run):
    """Every GPU test, on the CPU: `KERNELS_CUDASIM=1 python -m pytest -m gpu` in a subprocess, so that
    the one test command (README.md, .ci/run) runs them where there is no GPU. At least 90 % of them
    run (the rest need real hardware: the cuDNN engine), and all of those pass."""
    import xml.etree.ElementTree as ET
    returncode, stdout, stderr, folder = early_run
    tail = "\n".join(line for line in stdout.splitlines() if ":::MLLOG" not in line)[-6000:] + stderr[-2000:]
    suite = ET.parse(folder / "gpu-tests.xml").getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    total, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    assert returncode == 0 and failed == 0, tail
    assert total > 0 and total - skipped >= 0.9 * total, f"{total - skipped} of {total} GPU tests ran\n{tail}"
