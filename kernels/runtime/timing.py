"""Timing one call of an op on the GPU: its kernels' time, with the host's launch time hidden.

CUDA events measure GPU time: `start.record(); op(); stop.record()` is the time from the GPU
reaching `start` to it reaching `stop`.  But when the GPU is idle, it reaches `start` at once and
then waits for the host to queue the op: the Python of the launcher, CuPy's allocation, the
driver.  That is about 25 us per launch, so a 10 us kernel timed this way measures 35 us, and
its share of the memory bandwidth reads three times too low whatever the kernel does.  The host's
time is real (a step whose host cannot run ahead pays it), but it is not the kernel's.

`time_call` measures both:

- per call: as above, each call alone; the GPU waits for the host.  What a user calling the op
  once from Python sees.
- host hidden: first `gpu_delay` (kernels/runtime/delay.cu) holds the GPU for a while, then the
  start event, the op and the stop event are queued behind it.  When the wait ends, the whole
  call is already queued, so the events see the GPU's own time: what the op costs inside a
  training step whose host runs ahead of the GPU, or inside a CUDA graph.  This is the method of
  NVIDIA's nvbench ("blocking kernel").

The hidden timing checks itself: the host clock, read before the first event and after the last,
must show that the host finished queueing before the GPU could have reached the op (the event
before the wait and the one after it give the wait's length on the GPU).  If not, the wait is
made longer and the call timed again; an op that reads a value on the host (`.get()`: the host
waits for the GPU, so its queueing can never finish first) is reported per call, with the reason.

On the CPU (NumPy arrays: the emulator) there is one clock: `time.perf_counter` around the call.
On the simulated GPU (KERNELS_CUDASIM=1) every launch runs when issued: nothing can be hidden,
and times are per call.
"""

import statistics
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["Timing", "time_call", "HIDDEN", "PER_CALL", "HOST_CLOCK", "delay_cycles"]

HIDDEN = "host hidden"
PER_CALL = "per call"
HOST_CLOCK = "host clock"

MIN_DELAY_S = 100e-6     # the first wait; longer when the calls take the host longer
MAX_DELAY_S = 50e-3      # beyond this the host is not going to finish first: report per call
MARGIN_S = 20e-6         # from the host queueing a launch to the GPU holding it


@dataclass
class Timing:
    """seconds: the median by `method`; per_call_seconds: the median of calls timed alone (on the
    CPU, one clock: the same as seconds); note: why the host's time could not be hidden, when it
    could not."""
    seconds: float
    method: str
    per_call_seconds: float = None
    note: str = ""


def delay_cycles(xp, seconds):
    """SM clock cycles that last `seconds` at the device's rated clock (at a lower clock, longer)."""
    return int(seconds * _clock_hz(xp))


_CLOCK_HZ = {}
_SPUN = {}


def _clock_hz(xp):
    """The SM clock the device is rated at, in Hz.  CUDA 13 took `clockRate` out of the device
    properties: then the attribute cudaDevAttrClockRate (13 in CUDA's enum), else 2 GHz.  Its
    accuracy matters little: a wait that ends early is found by the check and made longer."""
    rt = xp.cuda.runtime
    device = rt.getDevice()
    if device not in _CLOCK_HZ:
        khz = rt.getDeviceProperties(device).get("clockRate") or 0
        if not khz:
            try:
                khz = rt.deviceGetAttribute(getattr(rt, "cudaDevAttrClockRate", 13), device)
            except Exception:   # an older or partial runtime binding: the default below
                khz = 0
        _CLOCK_HZ[device] = (khz or 2_000_000) * 1e3
    return _CLOCK_HZ[device]


def launch_delay(xp, seconds):
    """Queue `gpu_delay` for about `seconds` on the current stream; returns the device array its
    thread writes the cycles it waited to."""
    from .launch import module
    device = xp.cuda.runtime.getDevice()
    spun = _SPUN.get(device)
    if spun is None:
        spun = _SPUN[device] = xp.zeros(1, dtype=np.int64)
    module("runtime/delay.cu").get_function("gpu_delay")((1,), (1,), (np.int64(delay_cycles(xp, seconds)), spun))
    return spun


def time_call(fn, xp, repeat, warmup=1, hide_host=True, per_call_repeat=None, *, delay=None,
              clock=time.perf_counter):
    """Time fn(): a Timing (see the module docstring).  repeat: timed calls with the host hidden
    (and of the per-call timing, unless per_call_repeat says otherwise); warmup: untimed calls
    first.  delay(xp, seconds) queues the wait (default: launch_delay); clock: the host's clock
    (both replaceable for the tests)."""
    for _ in range(warmup):
        fn()
    if xp is np:
        times = []
        for _ in range(repeat):
            t0 = clock()
            fn()
            times.append(clock() - t0)
        t = statistics.median(times)
        return Timing(t, HOST_CLOCK, t)
    delay = delay or launch_delay
    e0, start, stop = xp.cuda.Event(), xp.cuda.Event(), xp.cuda.Event()
    per_call, host = [], []
    for _ in range(per_call_repeat or repeat):
        start.record()
        h0 = clock()
        fn()
        stop.record()
        host.append(clock() - h0)
        stop.synchronize()
        per_call.append(xp.cuda.get_elapsed_time(start, stop) / 1e3)
    t_call = statistics.median(per_call)
    if not hide_host:
        return Timing(t_call, PER_CALL, t_call)
    if getattr(xp, "__cudasim__", False):
        return Timing(t_call, PER_CALL, t_call, "the simulated GPU runs each launch when it is issued")
    delay(xp, 0.0)            # compiled and bound now, not inside the first timed call
    wait = min(MAX_DELAY_S, max(MIN_DELAY_S, 2 * statistics.median(host) + MARGIN_S))
    times = []
    while len(times) < repeat:
        h0 = clock()
        e0.record()
        delay(xp, wait)
        start.record()
        fn()
        stop.record()
        queued = clock() - h0
        stop.synchronize()
        waited = xp.cuda.get_elapsed_time(e0, start) / 1e3
        if queued + MARGIN_S < waited:
            times.append(xp.cuda.get_elapsed_time(start, stop) / 1e3)
            continue
        # the GPU reached the op before the host had queued it all: wait longer and time it again
        if wait >= MAX_DELAY_S:
            note = (f"the host took {queued * 1e3:.2f} ms to queue the call against a wait of {waited * 1e3:.2f} ms "
                    f"on the GPU: it waits for the GPU (a value read on the host?)")
            return Timing(t_call, PER_CALL, t_call, note)
        wait = min(MAX_DELAY_S, 2 * max(wait, queued + MARGIN_S))
    return Timing(statistics.median(times), HIDDEN, t_call)
