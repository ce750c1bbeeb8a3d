"""kernels/runtime/timing.py: a call timed with the host's launch time hidden, and per call.

The protocol is checked against a small model of a GPU that is independent of it: one in-order
queue, a host clock that every API call advances, work that starts when both the GPU is free and
the host has queued it, events stamped when the GPU reaches them.  In that model the answers are
known exactly: a call's kernels take `gpu` seconds, the host `host` seconds to queue them.
The delay kernel itself runs on the CPU emulator, and on a GPU where there is one.
"""

import types

import numpy as np
import pytest

import kernels
from kernels.runtime import timing
from kernels.runtime.timing import HIDDEN, HOST_CLOCK, PER_CALL, Timing, time_call
from tests.conftest import CUDASIM, real_gpu_only

API_S = 2e-6         # host time of one event record or launch in the model


class ModelEvent:
    """A CUDA event of ModelGPU: stamped with the time the GPU reaches it."""

    def __init__(self, gpu):
        self.gpu, self.t = gpu, None

    def record(self):
        self.t = self.gpu.queue(0.0)

    def synchronize(self):
        self.gpu.synchronize(self.t)


class ModelGPU:
    """One stream: `now` is the host's clock, `free` when the GPU finishes what it holds.  `cuda`
    holds the parts of CuPy that time_call uses (Event, get_elapsed_time in milliseconds)."""

    def __init__(self):
        self.now = 0.0
        self.free = 0.0
        self.delays = []          # the waits asked for, in seconds
        self.cuda = types.SimpleNamespace(Event=lambda: ModelEvent(self),
                                          get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3)

    def clock(self):
        return self.now

    def queue(self, seconds):
        """The host queues work of `seconds`; returns when the GPU reaches it."""
        self.now += API_S
        start = max(self.free, self.now)
        self.free = start + seconds
        return start

    def host(self, seconds):
        self.now += seconds

    def synchronize(self, t):
        self.now = max(self.now, t)

    def delay(self, xp, seconds):
        assert xp is self
        self.delays.append(seconds)
        self.queue(seconds)


def op(gpu, host_s, gpu_s, launches=1, reads=False):
    """A call: `launches` kernels of gpu_s/launches each, host_s of Python before each; with
    reads, a value read on the host at the end (the host waits for the GPU)."""
    def call():
        for _ in range(launches):
            gpu.host(host_s / launches)
            end = gpu.queue(gpu_s / launches) + gpu_s / launches
        if reads:
            gpu.synchronize(end)
            gpu.host(1e-6)
    return call


def timed(gpu, call, repeat=7):
    return time_call(call, gpu, repeat, warmup=1, delay=gpu.delay, clock=gpu.clock)


@pytest.mark.parametrize("host_s, gpu_s, launches", [(25e-6, 10e-6, 1), (25e-6, 1e-6, 1), (400e-6, 50e-6, 3),
                                                     (10e-6, 2e-3, 1), (80e-6, 30e-6, 4)])
def test_the_host_is_hidden_and_the_kernels_own_time_measured(host_s, gpu_s, launches):
    gpu = ModelGPU()
    t = timed(gpu, op(gpu, host_s, gpu_s, launches))
    assert t.method == HIDDEN and not t.note
    assert t.seconds == pytest.approx(gpu_s, rel=1e-9)
    # alone, the GPU waits for the host: what the per-call timing must keep showing
    alone = max(gpu_s, host_s + gpu_s / launches) + launches * API_S
    assert t.per_call_seconds == pytest.approx(alone, rel=0.05)
    assert t.per_call_seconds > t.seconds


def test_a_wait_too_short_is_found_and_made_longer():
    """The per-call calls are quick and the timed ones slow: the first wait ends before the host has
    queued the call. Accepting that time would include the host's (the check must refuse it)."""
    gpu = ModelGPU()
    calls = {"n": 0}
    quick, slow = op(gpu, 20e-6, 5e-6), op(gpu, 900e-6, 5e-6)

    def call():
        calls["n"] += 1
        (quick if calls["n"] <= 1 + 3 else slow)()     # warm-up and the 3 per-call calls are quick
    t = time_call(call, gpu, 5, warmup=1, per_call_repeat=3, delay=gpu.delay, clock=gpu.clock)
    assert t.method == HIDDEN
    assert t.seconds == pytest.approx(5e-6, rel=1e-9)
    assert gpu.delays[:2] == [0.0, timing.MIN_DELAY_S]       # the warm-up launch, then the first wait
    assert max(gpu.delays) > 900e-6                            # it grew past the host's time
    assert t.per_call_seconds == pytest.approx(20e-6 + 5e-6 + API_S, rel=0.05)


def test_one_slow_call_of_the_host_does_not_end_the_hidden_timing():
    """A pause of the host longer than the longest wait (a garbage collection, a first compile) in one
    timed call: that call is timed again, and the timing stays hidden."""
    gpu = ModelGPU()
    calls = {"n": 0}
    normal, paused = op(gpu, 25e-6, 8e-6), op(gpu, 3 * timing.MAX_DELAY_S, 8e-6)

    def call():
        calls["n"] += 1
        (paused if calls["n"] == 1 + 3 + 2 else normal)()     # the second hidden call pauses
    t = time_call(call, gpu, 5, warmup=1, per_call_repeat=3, delay=gpu.delay, clock=gpu.clock)
    assert t.method == HIDDEN and t.seconds == pytest.approx(8e-6, rel=1e-9)
    assert max(gpu.delays) == timing.MAX_DELAY_S


def test_a_call_that_reads_on_the_host_is_timed_per_call_with_the_reason():
    gpu = ModelGPU()
    t = timed(gpu, op(gpu, 25e-6, 40e-6, reads=True))
    assert t.method == PER_CALL and "waits for the GPU" in t.note
    assert t.seconds == t.per_call_seconds == pytest.approx(25e-6 + 40e-6 + API_S, rel=0.05)
    assert max(gpu.delays) == timing.MAX_DELAY_S   # it gave up after the longest wait, not for ever


def test_hide_host_false_is_per_call():
    gpu = ModelGPU()
    t = time_call(op(gpu, 25e-6, 10e-6), gpu, 3, hide_host=False, delay=gpu.delay, clock=gpu.clock)
    assert t.method == PER_CALL and not gpu.delays
    assert t.seconds == pytest.approx(25e-6 + 10e-6 + API_S, rel=0.05)


def test_on_the_cpu_the_host_clock():
    ticks = iter(np.arange(0.0, 1.0, 0.001))
    t = time_call(lambda: None, np, 5, warmup=2, clock=lambda: next(ticks))
    assert t == Timing(0.001, HOST_CLOCK, 0.001)


def test_the_simulated_gpu_is_timed_per_call_and_says_why():
    from kernels.emu import cudasim
    cp = cudasim.module()
    x = cp.zeros(64, dtype=np.float32)
    t = time_call(lambda: x.__iadd__(1), cp, 3, warmup=1)
    assert t.method == PER_CALL and "simulated GPU" in t.note and t.seconds > 0
    assert float(x.get()[0]) == 1 + 3      # the warm-up and the per-call calls; none hidden


def test_the_delay_kernel_waits_at_least_its_cycles_on_the_emulator():
    """On the emulator clock64() counts nanoseconds: 3 ms of cycles is 3 ms of the host's clock."""
    import time
    fn = kernels.load_module("runtime/delay.cu").get_function("gpu_delay")
    spun = np.zeros(1, np.int64)
    t0 = time.perf_counter()
    fn((1,), (1,), (np.int64(3_000_000), spun))
    elapsed = time.perf_counter() - t0
    assert spun[0] >= 3_000_000 and elapsed >= 3e-3
    fn((1,), (1,), (np.int64(0), spun))
    assert 0 <= spun[0] < 3_000_000


@pytest.mark.gpu
@real_gpu_only("the simulated GPU runs each launch when issued: nothing to hide")
def test_the_delay_holds_the_gpu_and_the_hidden_time_is_the_kernels():
    """On a GPU: the wait lasts its cycles, and a small kernel timed hidden takes less than the same
    call timed alone."""
    import cupy
    from kernels import elementwise
    x = cupy.zeros(1 << 12, dtype=np.float32)
    spun = timing.launch_delay(cupy, 1e-3)
    cupy.cuda.Device().synchronize()
    assert int(spun.get()[0]) >= timing.delay_cycles(cupy, 1e-3)
    t = time_call(lambda: elementwise.relu_forward(x), cupy, 20)
    assert t.method == HIDDEN
    assert t.seconds < t.per_call_seconds


@pytest.mark.gpu
@pytest.mark.skipif(not CUDASIM, reason="the simulated GPU's run of this path (KERNELS_CUDASIM=1); on a real GPU the "
                                        "test above times for real")
def test_the_whole_hidden_path_runs_on_a_cupy_shaped_module_and_refuses_a_gpu_that_runs_at_issue():
    """The hidden timing's real calls (the device's clock rate, the delay kernel through our
    launcher, events) on the simulated GPU with its name taken off: it runs every launch when
    issued, so the host is never done queueing before the wait ends, and the self-check must say
    so (per call, with the reason) instead of reporting a time."""
    import cupy

    class Unnamed:               # the simulated module, not saying that it is
        def __getattr__(self, name):
            if name == "__cudasim__":
                raise AttributeError(name)
            return getattr(cupy, name)

    xp = Unnamed()
    x = cupy.zeros(256, dtype=np.float32)
    t = time_call(lambda: x.__iadd__(1), xp, 3, warmup=1)
    assert t.method == PER_CALL and "waits for the GPU" in t.note
    assert t.seconds == t.per_call_seconds > 0
    spun = timing._SPUN[cupy.cuda.runtime.getDevice()]
    # the waits grew to MAX_DELAY_S, and it gave up only after a wait that long
    assert int(spun.get()[0]) >= timing.delay_cycles(cupy, timing.MAX_DELAY_S)


def test_the_clock_rate_comes_from_the_attribute_where_the_properties_lack_it(monkeypatch):
    """CUDA 13's device properties have no clockRate: the attribute gives it, and without either 2 GHz."""
    monkeypatch.setattr(timing, "_CLOCK_HZ", {})

    def runtime(props, attribute):
        def get_attribute(attr, device):
            assert attr == 13 and device == 0
            if attribute is None:
                raise RuntimeError("no such function")
            return attribute
        return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(
            getDevice=lambda: 0, getDeviceProperties=lambda d: props, deviceGetAttribute=get_attribute)))

    assert timing.delay_cycles(runtime({"clockRate": 1_980_000}, None), 1e-3) == 1_980_000
    timing._CLOCK_HZ.clear()
    assert timing.delay_cycles(runtime({"name": b"GPU"}, 1_755_000), 1e-3) == 1_755_000
    timing._CLOCK_HZ.clear()
    assert timing.delay_cycles(runtime({"name": b"GPU"}, None), 1e-3) == 2_000_000
