"""The simulated GPU: a CuPy-shaped module over NumPy arrays and the CPU emulator.

    KERNELS_CUDASIM=1 python -m pytest -m gpu          # the GPU tests, on a CPU
    KERNELS_CUDASIM=1 python train.py --device cuda --synthetic tiny --epochs 1

With KERNELS_CUDASIM=1 (the idea of Numba's NUMBA_ENABLE_CUDASIM), importing `kernels` puts this
module's stand-in in sys.modules["cupy"] (and cupy.cuda, cupy.cuda.runtime, cupy.cuda.memory,
cupy.random, cupy.linalg), so every `import cupy` of the project gets it and the `cuda` device's
Python runs unchanged: arrays of a class that is not numpy.ndarray (type module "cupy"), kernels
launched through `cupy.RawModule`, streams, events, the memory pool, CUDA graphs.  What it is:

- arrays: `ndarray` holds a NumPy array in memory handed out by a `MemoryPool` (256-byte aligned,
  sizes rounded to 512 bytes as CuPy's pool does; `used_bytes`/`total_bytes` count live and
  cached blocks; `set_limit` and CUPY_GPU_MEMORY_LIMIT give CuPy's OutOfMemoryError).  Arithmetic, indexing, reductions and the NumPy functions CuPy has run in NumPy
  and give device arrays (a reduction gives a 0-d array, as CuPy's do).  What needs the host
  says so, as on a GPU: `np.asarray(x)` is a TypeError (use `.get()`), mixing a NumPy array into
  a device operation is a TypeError, and `cupy.empty` memory holds garbage (bytes 0xFF: NaN, -1)
  instead of whatever zeros NumPy found.
- kernels: `RawModule(code=...)` compiles the same CUDA C for the emulator (kernels/emu/
  emulator.py) at the declared GPU's architecture (-arch=sm_90 for an H100), and a launch runs it
  on the arrays' NumPy memory: the .cu files run unchanged.
- streams and events: every operation runs when issued, on its stream, so each stream's order is
  kept (and any correct program's cross-stream order too); `Event.record`, `Stream.wait_event`,
  `get_elapsed_time` (host time of the emulator: no GPU time), `Stream.null`, `with stream:`.
- CUDA graphs: between `Stream.begin_capture()` and `end_capture()` nothing executes: kernel
  launches and array operations issued on the capturing stream are recorded (their arguments,
  hence their buffers, fixed) and `Graph.launch()` replays them on the same buffers.  A result
  allocated during the capture holds garbage until a replay fills it; a host read on the
  capturing stream (`.get()`, `float(x)`, `synchronize()`) raises cudaErrorStreamCaptureUnsupported
  and invalidates the capture, as CUDA does.
- the device: `cuda.runtime.getDeviceCount()` is 1, `getDeviceProperties` describes the GPU named
  by KERNELS_CUDASIM_GPU (H100 by default; A100, H200, V100, P100), `memGetInfo` counts the pools'
  memory against its size, `Device`, `runtimeGetVersion`/`driverGetVersion`.

What it is not: a timing of anything (the emulator runs one thread at a time), cuDNN, NCCL,
NVRTC's own compiler (the kernels are compiled by the C++ compiler; tests/test_compile.py checks
them with NVRTC), or concurrency between streams (a missing wait_event is not found).  Importing
`cupy.cuda.nccl` / `cupy.cuda.cudnn` / `cupy.cuda.nvrtc` raises an ImportError naming the simulator.

This module imports nothing of kernels/ above kernels/emu/.
"""

import collections
import contextlib
import itertools
import os
import sys
import threading
import time
import types
import weakref
from dataclasses import dataclass

import numpy as np

from . import sanitizer as _sanitizer
from .emulator import EmuModule

__all__ = ["ENV", "GPU_ENV", "active", "install", "module", "declared_gpu", "SimulatedGPU", "GPUS",
           "NotSimulatedError", "not_simulated", "ndarray"]

ENV = "KERNELS_CUDASIM"
GPU_ENV = "KERNELS_CUDASIM_GPU"
VERSION = "14.2.0+cudasim"       # the CuPy this stand-in imitates, marked as simulated
RUNTIME_VERSION = 13020          # CUDA 13.2 runtime, 13.0 driver: what the H100 run of 2026-12-06 reported
DRIVER_VERSION = 13000


def active():
    """True when `import cupy` gives this module's stand-in."""
    return getattr(sys.modules.get("cupy"), "__cudasim__", False) is True


class NotSimulatedError(RuntimeError):
    """What only a real GPU has (cuDNN, NCCL, NVRTC's compiler) was asked of the simulated GPU."""


def not_simulated(what):
    """The error for `what` (e.g. "cuDNN"), naming the simulator and what to do."""
    return NotSimulatedError(f"{what} needs a real GPU: the GPU here is simulated ({ENV}=1, kernels/emu/cudasim.py); "
                             f"unset {ENV} on a machine with a GPU")


# ---------------------------------------------------------------------------------- the declared GPU

@dataclass(frozen=True)
class SimulatedGPU:
    """What getDeviceProperties says about the simulated GPU (datasheet figures)."""
    name: str
    major: int
    minor: int
    sms: int
    memory: int                 # totalGlobalMem, bytes
    smem_optin: int             # sharedMemPerBlockOptin: dynamic shared memory a block may opt into
    smem_per_sm: int            # sharedMemPerMultiprocessor
    l2: int                     # bytes
    clock_khz: int
    memory_clock_khz: int
    bus_width: int              # bits
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32

    @property
    def arch(self):
        return f"sm_{self.major}{self.minor}"


GPUS = {
    # H100 SXM: totalGlobalMem as CuPy reported it on an H100 80GB HBM3 (2026-12-06)
    "H100": SimulatedGPU("NVIDIA H100 80GB HBM3", 9, 0, 132, 85017493504, 227 * 1024, 228 * 1024, 50 << 20,
                         1980000, 2619000, 5120),
    "H200": SimulatedGPU("NVIDIA H200", 9, 0, 132, 150754820096, 227 * 1024, 228 * 1024, 50 << 20,
                         1980000, 3201000, 6144),
    "A100": SimulatedGPU("NVIDIA A100-SXM4-80GB", 8, 0, 108, 85198045184, 163 * 1024, 164 * 1024, 40 << 20,
                         1410000, 1593000, 5120),
    "V100": SimulatedGPU("Tesla V100-SXM2-16GB", 7, 0, 80, 16935682048, 96 * 1024, 96 * 1024, 6 << 20,
                         1530000, 877000, 4096),
    "P100": SimulatedGPU("Tesla P100-SXM2-16GB", 6, 0, 56, 17071734784, 48 * 1024, 64 * 1024, 4 << 20,
                         1480000, 715000, 4096),
}


def declared_gpu():
    """The SimulatedGPU named by KERNELS_CUDASIM_GPU (default H100); a ValueError for an unknown name."""
    name = os.environ.get(GPU_ENV, "").strip() or "H100"
    try:
        return GPUS[name.upper()]
    except KeyError:
        raise ValueError(f"{GPU_ENV}={name!r}: the simulated GPU must be one of {', '.join(GPUS)}") from None


# ---------------------------------------------------------------------------------- CUDA errors

class CUDARuntimeError(RuntimeError):
    """What cupy_backends.cuda.api.runtime.CUDARuntimeError is on a GPU: 'cudaErrorX: message'."""

    def __init__(self, name, message):
        self.status = name
        super().__init__(f"{name}: {message}")


CUDARuntimeError.__module__ = "cupy_backends.cuda.api.runtime"


class OutOfMemoryError(MemoryError):
    """cupy.cuda.memory.OutOfMemoryError, with CuPy's message."""

    def __init__(self, size, total, limit=0):
        message = f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes"
        message += f", limit set to: {limit:,} bytes)." if limit else ")."
        super().__init__(message)


OutOfMemoryError.__module__ = "cupy.cuda.memory"


def _capture_error():
    return CUDARuntimeError("cudaErrorStreamCaptureUnsupported", "operation not permitted when stream is capturing")


# ---------------------------------------------------------------------------------- streams, events, graphs

_local = threading.local()          # .streams: the `with stream:` stack; .allocator: using_allocator's
_ptrs = itertools.count(0x7F0000001000, 0x100)
_capturing = weakref.WeakSet()      # streams in capture now


def _current_stream():
    stack = getattr(_local, "streams", None)
    return stack[-1] if stack else Stream.null


class Stream:
    """A CUDA stream.  Work issued on it runs at once (so in order); while it captures, work is
    recorded into the graph instead.  `with stream:` makes it the current stream."""

    null = None        # the legacy default stream, set below

    def __init__(self, null=False, non_blocking=False, ptr=None, priority=None):
        self.ptr = 0 if null else next(_ptrs)
        self.non_blocking = bool(non_blocking)
        self._nodes = None          # the graph being captured, or None
        self._invalid = None        # why the capture was invalidated

    # -- issuing work
    def _issue(self, work):
        """Run `work` (a function of no arguments that changes device memory) now, or record it."""
        if self._nodes is not None:
            self._nodes.append(work)
            return
        if self.ptr == 0 and _capturing:
            self._check_legacy()
        work()

    def _check_legacy(self):
        """Work on the legacy default stream waits for every blocking stream: not while one captures."""
        for s in list(_capturing):
            if not s.non_blocking:
                s._invalidate("the legacy default stream was used while a blocking stream was capturing")
                raise CUDARuntimeError("cudaErrorStreamCaptureImplicit",
                                       "operation would make the legacy stream depend on a capturing blocking stream")

    def _host_read(self):
        """Called before the host reads device memory through this stream (or waits for it)."""
        if self._nodes is not None:
            self._invalidate("the host waited for the capturing stream (a copy to the host or a synchronize)")
            raise _capture_error()

    def _invalidate(self, why):
        if self._invalid is None:
            self._invalid = why

    # -- the stream API
    def __enter__(self):
        if not hasattr(_local, "streams"):
            _local.streams = []
        _local.streams.append(self)
        return self

    def __exit__(self, *exc):
        _local.streams.pop()

    def use(self):
        """Make this the current stream (until another `use` or the end of an enclosing `with`)."""
        if not getattr(_local, "streams", None):
            _local.streams = [self]
        else:
            _local.streams[-1] = self
        return self

    def synchronize(self):
        self._host_read()

    @property
    def done(self):
        self._host_read()
        return True

    def record(self, event=None):
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event):
        """Later work on this stream waits for `event`: here everything issued before it has run."""
        if not isinstance(event, Event):
            raise TypeError(f"wait_event needs a cupy.cuda.Event, got {type(event).__name__}")

    def begin_capture(self, mode=None):
        if self.ptr == 0:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported", "the legacy default stream cannot be captured")
        if self._nodes is not None:
            raise CUDARuntimeError("cudaErrorIllegalState", "the stream is already capturing")
        self._nodes, self._invalid = [], None
        _capturing.add(self)

    def end_capture(self):
        if self._nodes is None:
            raise CUDARuntimeError("cudaErrorIllegalState", "the stream is not capturing")
        nodes, invalid = self._nodes, self._invalid
        self._nodes, self._invalid = None, None
        _capturing.discard(self)
        if invalid is not None:
            raise CUDARuntimeError("cudaErrorStreamCaptureInvalidated", f"the capture was invalidated: {invalid}")
        return Graph(nodes)

    def is_capturing(self):
        return self._nodes is not None

    def __eq__(self, other):
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self):
        return hash(self.ptr)

    def __repr__(self):
        return f"<cupy.cuda.Stream {'null' if self.ptr == 0 else hex(self.ptr)} (simulated)>"


Stream.null = Stream(null=True)
Stream.__module__ = "cupy.cuda.stream"


def get_current_stream(device_id=None):
    return _current_stream()


class Event:
    """A CUDA event: `record` marks a point of a stream (the host clock when the work before it ran)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.ptr = next(_ptrs)
        self.disable_timing = disable_timing
        self._time = None

    def _mark(self):
        self._time = time.perf_counter()

    def record(self, stream=None):
        (stream or _current_stream())._issue(self._mark)

    def synchronize(self):
        pass

    @property
    def done(self):
        return True


Event.__module__ = "cupy.cuda.stream"


def get_elapsed_time(start_event, end_event):
    """Milliseconds between two recorded events: the emulator's host time, not a GPU's."""
    for e in (start_event, end_event):
        if e._time is None:
            raise CUDARuntimeError("cudaErrorInvalidResourceHandle", "the event has not been recorded")
        if e.disable_timing:
            raise CUDARuntimeError("cudaErrorInvalidResourceHandle", "the event was created with disable_timing")
    return (end_event._time - start_event._time) * 1e3


class Graph:
    """A captured CUDA graph: `launch()` replays the recorded work, in order, on the same buffers."""

    def __init__(self, nodes):
        self._nodes = tuple(nodes)

    def launch(self, stream=None):
        (stream or _current_stream())._issue(self._replay)

    def upload(self, stream=None):
        pass

    def _replay(self):
        for work in self._nodes:
            work()

    def __len__(self):
        return len(self._nodes)


Graph.__module__ = "cupy.cuda.graph"


# ---------------------------------------------------------------------------------- memory

_ALIGN = 256        # cudaMalloc's alignment (CuPy's allocations inherit it)
_ROUND = 512        # CuPy's pool rounds every allocation up to this


class Memory:
    """One allocation: `nbytes` of 256-byte-aligned host memory standing in for device memory."""

    def __init__(self, nbytes, pool=None):
        self.size = int(nbytes)
        self.device_id = 0
        try:
            raw = np.empty(self.size + _ALIGN, np.uint8)
        except MemoryError:
            raise OutOfMemoryError(self.size, pool.total_bytes() if pool else 0) from None
        start = -raw.__array_interface__["data"][0] % _ALIGN
        self.buffer = raw[start:start + self.size]
        self.ptr = self.buffer.__array_interface__["data"][0] if self.size else 0
        if pool is not None and self.size:
            # the block goes back to its pool when the last array (view) of it is gone
            weakref.finalize(raw, pool._release, self.size)


class MemoryPointer:
    """A pointer into a Memory: `.ptr` (the address), `.mem`."""

    def __init__(self, mem, offset):
        self.mem, self.offset = mem, int(offset)
        self.device_id = 0

    @property
    def ptr(self):
        return self.mem.ptr + self.offset if self.mem.size else 0

    def __int__(self):
        return self.ptr


MemoryPointer.__module__ = "cupy.cuda.memory"


class _ArrayPointer:
    """`ndarray.data`: the address of the array's first element (and the allocation it lies in)."""

    __slots__ = ("ptr", "mem")

    def __init__(self, ptr, mem=None):
        self.ptr, self.mem = ptr, mem

    def __int__(self):
        return self.ptr


_pools = weakref.WeakSet()


class MemoryPool:
    """CuPy's memory pool: blocks freed by arrays are kept for reuse (`free_bytes`) until
    `free_all_blocks()`; `used_bytes` counts the blocks of live arrays, `total_bytes` both."""

    def __init__(self, allocator=None):
        self._used = 0
        self._free = collections.Counter()     # rounded size -> cached blocks
        self._limit = _limit_from_environment()
        # re-entrant: a Memory's finalizer returns its block through _release, and garbage collection
        # can run it on this thread while malloc holds the lock (iterating the pools' WeakSet in _fits
        # allocates); a plain Lock then waits for itself forever (seen in the GPU tests)
        self._lock = threading.RLock()
        _pools.add(self)

    def malloc(self, size):
        size = int(size)
        if size < 0:
            raise ValueError(f"malloc: size must be >= 0, got {size}")
        rounded = -(-size // _ROUND) * _ROUND
        if rounded == 0:
            return MemoryPointer(Memory(0), 0)
        with self._lock:
            if self._free[rounded]:
                self._free[rounded] -= 1
            else:
                if not self._fits(rounded):
                    self._free.clear()          # as CuPy: give the cache back, then try again
                    if not self._fits(rounded):
                        raise OutOfMemoryError(size, self.total_bytes(), self._limit)
            self._used += rounded
        try:
            return MemoryPointer(Memory(rounded, self), 0)
        except OutOfMemoryError:
            with self._lock:
                self._used -= rounded
            raise

    def _fits(self, rounded):
        if self._limit and self.total_bytes() + rounded > self._limit:
            return False
        return _device_bytes_in_use() + rounded <= declared_gpu().memory

    def _release(self, rounded):
        with self._lock:
            self._used -= rounded
            self._free[rounded] += 1

    def used_bytes(self):
        return self._used

    def free_bytes(self):
        return sum(size * n for size, n in self._free.items())

    def total_bytes(self):
        return self._used + self.free_bytes()

    def n_free_blocks(self):
        return sum(self._free.values())

    def free_all_blocks(self, stream=None):
        with self._lock:
            self._free.clear()

    def set_limit(self, size=None, fraction=None):
        if fraction is not None:
            size = int(declared_gpu().memory * float(fraction))
        self._limit = int(size or 0)

    def get_limit(self):
        return self._limit


MemoryPool.__module__ = "cupy.cuda.memory"


def _limit_from_environment():
    """CuPy's CUPY_GPU_MEMORY_LIMIT: bytes ("1073741824") or a share of the GPU ("50%"); 0: none."""
    value = os.environ.get("CUPY_GPU_MEMORY_LIMIT", "").strip()
    if not value:
        return 0
    try:
        if value.endswith("%"):
            return int(declared_gpu().memory * float(value[:-1]) / 100)
        return int(value)
    except ValueError:
        raise ValueError(f"CUPY_GPU_MEMORY_LIMIT={value!r}: give bytes or a percentage such as 50%") from None


def _device_bytes_in_use():
    return sum(p.total_bytes() for p in list(_pools))


_default_pool = MemoryPool()


def get_default_memory_pool():
    return _default_pool


def get_allocator():
    return getattr(_local, "allocator", None) or _default_pool.malloc


def set_allocator(allocator=None):
    _local.allocator = allocator


@contextlib.contextmanager
def using_allocator(allocator=None):
    previous = getattr(_local, "allocator", None)
    _local.allocator = allocator
    try:
        yield
    finally:
        _local.allocator = previous


class PinnedMemoryPointer(bytearray):
    """Page-locked host memory (here ordinary memory): a buffer NumPy can view."""

    @property
    def ptr(self):
        return np.frombuffer(self, np.uint8).__array_interface__["data"][0] if len(self) else 0


class PinnedMemoryPool:
    """The pool of pinned host memory: `used_bytes` counts the live blocks."""

    def __init__(self):
        self._used = 0

    def malloc(self, size):
        mem = PinnedMemoryPointer(int(size))
        self._used += len(mem)
        weakref.finalize(mem, self._release, len(mem))
        return mem

    def _release(self, size):
        self._used -= size

    def used_bytes(self):
        return self._used

    def total_bytes(self):
        return self._used

    def n_free_blocks(self):
        return 0

    def free_all_blocks(self):
        pass


_pinned_pool = PinnedMemoryPool()


def get_default_pinned_memory_pool():
    return _pinned_pool


def alloc_pinned_memory(size):
    return _pinned_pool.malloc(size)


def _allocate(shape, dtype, order="C"):
    """A new NumPy array in memory from the current allocator (the default pool unless
    `using_allocator` says otherwise)."""
    dtype = np.dtype(dtype)
    shape = _shape_tuple(shape)
    count = 1
    for n in shape:
        count *= n
    pointer = get_allocator()(count * dtype.itemsize)
    if not isinstance(pointer, MemoryPointer):
        raise TypeError(f"the simulated GPU allocates through its own pools; the allocator returned "
                        f"{type(pointer).__name__}")
    buffer = pointer.mem.buffer[pointer.offset:pointer.offset + count * dtype.itemsize]
    return np.ndarray(shape, dtype, buffer=buffer, order="F" if order == "F" else "C")


def _shape_tuple(shape):
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(n) for n in shape)


def _poison(a):
    """Fill fresh device memory with what a GPU might hold: bytes 0xFF (NaN for floats, -1 for ints)."""
    if a.size == 0:
        return
    if a.dtype == np.bool_:
        a.fill(True)
    elif a.flags.c_contiguous or a.flags.f_contiguous:
        a.reshape(-1, order="A").view(np.uint8).fill(0xFF)
    else:
        a.fill(np.nan if a.dtype.kind in "fc" else -1)


# ---------------------------------------------------------------------------------- arrays

def _root(a):
    """The NumPy array owning a's memory (NumPy keeps .base pointing at the owner)."""
    base = a.base
    return base if isinstance(base, np.ndarray) else a


def _raw(x):
    """x with every device array replaced by its NumPy storage (through tuples, lists, dicts)."""
    t = type(x)
    if t is ndarray:
        return x._a
    if t is tuple or t is list:
        return t(_raw(v) for v in x)
    if t is dict:
        return {k: _raw(v) for k, v in x.items()}
    return x


def _storages(x, out):
    """The NumPy storages of the device arrays in x (appended to out)."""
    t = type(x)
    if t is ndarray:
        out.append(x)
    elif t is tuple or t is list:
        for v in x:
            _storages(v, out)
    elif t is dict:
        for v in x.values():
            _storages(v, out)
    return out


def _reject_host_arrays(what, x):
    """CuPy refuses NumPy arrays in device operations (no implicit host-to-device copy)."""
    t = type(x)
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {t} ({what}: a NumPy array in an operation on the GPU; "
                        f"cupy.asarray() it first)")
    if t is tuple or t is list:
        for v in x:
            _reject_host_arrays(what, v)
    elif t is dict:
        for v in x.values():
            _reject_host_arrays(what, v)


def _wrap(a):
    obj = object.__new__(ndarray)
    obj._a = a
    return obj


def _fresh_like(r):
    """A device allocation of r's shape and dtype, laid out as r (C or Fortran order)."""
    order = "F" if (r.flags.f_contiguous and not r.flags.c_contiguous) else "C"
    return _allocate(r.shape, r.dtype, order)


def _adopt(r, inputs, poison, targets):
    """The device value(s) of NumPy result r: a view of an input stays a view of it (the same
    memory); a new array is copied into device memory (or, during a capture, left as garbage and
    listed in `targets` for the replay to fill)."""
    if isinstance(r, np.generic):
        r = np.asarray(r)
    if isinstance(r, np.ndarray):
        root = _root(r)
        for x in inputs:
            if x._a is r:
                return x
            if _root(x._a) is root:
                return _wrap(r)
        dst = _fresh_like(r)
        if poison:
            _poison(dst)
            targets.append(dst)
        else:
            np.copyto(dst, r, casting="unsafe")
        return _wrap(dst)
    if isinstance(r, tuple) and any(isinstance(v, (np.ndarray, np.generic)) for v in r):
        return tuple(_adopt(v, inputs, poison, targets) for v in r)
    if isinstance(r, list) and any(isinstance(v, (np.ndarray, np.generic)) for v in r):
        return [_adopt(v, inputs, poison, targets) for v in r]
    return r


def _flatten_results(r):
    if isinstance(r, (tuple, list)):
        out = []
        for v in r:
            out.extend(_flatten_results(v))
        return out
    if isinstance(r, (np.ndarray, np.generic)):
        return [np.asarray(r)]
    return []


def _compute(f, *sources):
    """An operation that makes new arrays (or views): f() computes it in NumPy on the storages.

    Outside a capture it runs now.  During one it still runs (for the results' shapes and dtypes:
    it writes nothing that exists), its new arrays are left as garbage, and the replay recomputes
    them into the same memory."""
    inputs = []
    for s in sources:
        _storages(s, inputs)
    stream = _current_stream()
    if stream._nodes is None:
        if stream.ptr == 0 and _capturing:
            stream._check_legacy()
        return _adopt(f(), inputs, False, [])
    with np.errstate(all="ignore"):
        r = f()
    fresh = []
    out = _adopt(r, inputs, True, fresh)
    if fresh:
        fresh_ids = {id(a) for a in fresh}
        # where the new arrays are among f()'s results (views of the inputs need no work)
        places = [(i, a) for i, a in enumerate(_flatten_results(_raw(out))) if id(a) in fresh_ids]

        def replay():
            results = _flatten_results(f())
            for i, dst in places:
                np.copyto(dst, results[i], casting="unsafe")
        stream._issue(replay)
    return out


def _write(work):
    """An operation that writes existing device memory: run now, or record it in the capture."""
    _current_stream()._issue(work)


def _host_read():
    _current_stream()._host_read()


class ndarray:
    """A CuPy-shaped array whose memory is a NumPy array (`_a`) in the simulated GPU's memory."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        shape, dtype = _shape_tuple(shape), np.dtype(dtype)
        if memptr is None:
            a = _allocate(shape, dtype, order)
        else:
            a = np.ndarray(shape, dtype, buffer=memptr.mem.buffer, offset=memptr.offset, strides=strides,
                           order=order)
        self._a = a

    # -- what the array is
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    strides = property(lambda self: self._a.strides)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)

    @property
    def flags(self):
        return _Flags(self._a)

    @property
    def data(self):
        return _ArrayPointer(self._a.__array_interface__["data"][0] if self._a.size else 0)

    @property
    def device(self):
        return Device(0)

    @property
    def base(self):
        root = _root(self._a)
        return None if root is self._a else _wrap(root)

    @property
    def T(self):
        return _wrap(self._a.T)

    def __len__(self):
        return len(self._a)

    # -- the host: explicit copies only
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        (stream or _current_stream())._host_read()
        if out is not None:
            np.copyto(out, self._a)
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"set() takes a NumPy array, got {type(arr).__name__}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set(): the NumPy array {arr.dtype}{list(arr.shape)} does not match "
                             f"{self.dtype}{list(self.shape)}")
        dst = self._a
        (stream or _current_stream())._issue(lambda: np.copyto(dst, arr))

    def item(self):
        _host_read()
        return self._a.item()

    def tolist(self):
        _host_read()
        return self._a.tolist()

    def __float__(self):
        _host_read()
        return float(self._a)

    def __int__(self):
        _host_read()
        return int(self._a)

    def __complex__(self):
        _host_read()
        return complex(self._a)

    def __bool__(self):
        _host_read()
        return bool(self._a)

    def __repr__(self):
        if _current_stream()._nodes is not None:
            return f"<cupy.ndarray {self.dtype}{list(self.shape)} (unreadable: the stream is capturing)>"
        return repr(self._a)

    def __str__(self):
        if _current_stream()._nodes is not None:
            return self.__repr__()
        return str(self._a)

    def __format__(self, spec):
        if self.ndim == 0 and spec:
            _host_read()
            return format(self._a.item(), spec)
        return format(str(self), spec)

    # -- NumPy's protocols: np.add(x, y), np.sum(x) on device arrays run here, as with CuPy
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _reject_host_arrays(f"numpy.{ufunc.__name__}", inputs)
        out = kwargs.get("out")
        if out is not None:
            outs = out if isinstance(out, tuple) else (out,)
            if not all(type(o) is ndarray for o in outs):
                raise TypeError(f"numpy.{ufunc.__name__}: out= must be device arrays")
            raw_inputs, raw_kwargs = _raw(inputs), _raw(kwargs)
            _write(lambda: getattr(ufunc, method)(*raw_inputs, **raw_kwargs))
            return outs[0] if len(outs) == 1 else outs
        if method == "at":
            raise TypeError(f"numpy.{ufunc.__name__}.at on device arrays: not simulated (the project does not use it)")
        return _compute(lambda: getattr(ufunc, method)(*_raw(inputs), **_raw(kwargs)), inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        mine = _module_functions.get(func.__name__)
        if mine is None:
            return NotImplemented
        return mine(*args, **kwargs)

    # -- indexing
    def __getitem__(self, key):
        key = _view_key(key)
        return _compute(lambda: self._a[_raw(key)], self, key)

    def __setitem__(self, key, value):
        dst, k, v = self._a, _raw(key), _raw(value)
        if isinstance(v, np.ndarray) and type(value) is not ndarray:
            v = v.copy()     # a copy from the host, taken now
        _write(lambda: dst.__setitem__(k, v))

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    # -- methods that write
    def fill(self, value):
        dst = self._a
        if type(value) is ndarray:           # a 0-d device array: its value when the fill runs
            if value.ndim != 0:
                raise ValueError("fill() takes a scalar or a 0-d array")
            src = value._a
            _write(lambda: np.copyto(dst, src, casting="unsafe"))
        else:
            _write(lambda: dst.fill(value))

    # -- methods that make arrays or views
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _compute(lambda: self._a.astype(dtype, order=order, copy=True), self)

    def copy(self, order="C"):
        return _compute(lambda: self._a.copy(order=order), self)

    def view(self, *args, **kwargs):
        return _compute(lambda: self._a.view(*args, **kwargs), self)


def _view_key(key):
    """An index of only integers and slices, with `...` added so that NumPy returns a 0-d view
    rather than a NumPy scalar (CuPy's x[i] is a device array)."""
    items = key if isinstance(key, tuple) else (key,)
    if all(isinstance(k, (int, np.integer, slice)) and not isinstance(k, bool) for k in items):
        return items + (Ellipsis,)
    return key


class _Flags:
    """CuPy's flags: c_contiguous, f_contiguous, owndata (no `writeable`: device memory always is)."""

    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, a):
        self.c_contiguous = a.flags.c_contiguous
        self.f_contiguous = a.flags.f_contiguous
        self.owndata = _root(a) is a

    def __getitem__(self, name):
        return getattr(self, {"C_CONTIGUOUS": "c_contiguous", "F_CONTIGUOUS": "f_contiguous",
                              "OWNDATA": "owndata"}.get(name, name))


ndarray.__module__ = "cupy"


def _method(name):
    def method(self, *args, **kwargs):
        return _compute(lambda: getattr(self._a, name)(*_raw(args), **_raw(kwargs)), self, args, kwargs)
    method.__name__ = name
    return method


for _name in ("reshape", "ravel", "flatten", "transpose", "swapaxes", "squeeze", "sum", "mean", "var", "std",
              "max", "min", "prod", "argmax", "argmin", "any", "all", "cumsum", "cumprod", "dot", "clip", "round",
              "nonzero", "take", "repeat", "argsort", "diagonal", "conj", "trace"):
    setattr(ndarray, _name, _method(_name))


def _operator(ufunc, reflected=False, inplace=False):
    if inplace:
        def op(self, other):
            ufunc(self, other, out=self)
            return self
    elif reflected:
        def op(self, other):
            if isinstance(other, np.ndarray):
                return NotImplemented
            return ufunc(other, self)
    else:
        def op(self, other):
            return ufunc(self, other)
    return op


for _name, _ufunc in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply), ("truediv", np.true_divide),
                      ("floordiv", np.floor_divide), ("mod", np.remainder), ("pow", np.power),
                      ("matmul", np.matmul), ("and", np.bitwise_and), ("or", np.bitwise_or),
                      ("xor", np.bitwise_xor), ("lshift", np.left_shift), ("rshift", np.right_shift)):
    setattr(ndarray, f"__{_name}__", _operator(_ufunc))
    setattr(ndarray, f"__r{_name}__", _operator(_ufunc, reflected=True))
    setattr(ndarray, f"__i{_name}__", _operator(_ufunc, inplace=True))
for _name, _ufunc in (("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("le", np.less_equal),
                      ("gt", np.greater), ("ge", np.greater_equal)):
    setattr(ndarray, f"__{_name}__", _operator(_ufunc))
ndarray.__neg__ = lambda self: np.negative(self)
ndarray.__pos__ = lambda self: np.positive(self)
ndarray.__abs__ = lambda self: np.absolute(self)
ndarray.__invert__ = lambda self: np.invert(self)


# ---------------------------------------------------------------------------------- module functions

def _asarray(a, dtype=None, order=None, *, blocking=False):
    if type(a) is ndarray:
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = np.asarray(a, dtype=dtype, order=order)
    return _compute(lambda: host)     # copied into device memory (a capture's replay copies it again)


def _array(obj, dtype=None, copy=True, order="K", ndmin=0, **kwargs):
    if type(obj) is ndarray:
        result = obj.astype(dtype or obj.dtype, copy=True) if copy else _asarray(obj, dtype)
        return result
    return _asarray(np.array(obj, dtype=dtype, order=order, ndmin=ndmin))


def _ascontiguousarray(a, dtype=None):
    if type(a) is not ndarray:
        return _asarray(np.ascontiguousarray(a, dtype=dtype))
    return _compute(lambda: np.ascontiguousarray(a._a, dtype=dtype), a)


def _asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if type(a) is ndarray:
        return a.get(stream=stream, order=order, out=out)
    return np.asarray(a, order=order)


def _empty(shape, dtype=float, order="C"):
    a = _allocate(shape, dtype, order)
    _poison(a)
    if a.flags.c_contiguous and _sanitizer.initchecking():
        _sanitizer.mark_uninitialized(a)
    return _wrap(a)


def _empty_like(a, dtype=None, order="K", subok=None, shape=None):
    return _empty(a.shape if shape is None else shape, a.dtype if dtype is None else dtype,
                  "F" if order == "F" else "C")


def _creation(name):
    fn = getattr(np, name)

    def create(*args, **kwargs):
        _reject_host_arrays(f"cupy.{name}", (args, kwargs))
        return _compute(lambda: fn(*_raw(args), **_raw(kwargs)), args, kwargs)
    create.__name__ = name
    return create


def _function(name):
    fn = getattr(np, name)

    def call(*args, **kwargs):
        _reject_host_arrays(f"cupy.{name}", (args, kwargs))
        out = kwargs.get("out")
        if out is not None:
            if type(out) is not ndarray:
                raise TypeError(f"cupy.{name}: out= must be a device array")
            raw_args, raw_kwargs = _raw(args), _raw(kwargs)
            _write(lambda: fn(*raw_args, **raw_kwargs))
            return out
        return _compute(lambda: fn(*_raw(args), **_raw(kwargs)), args, kwargs)
    call.__name__ = name
    return call


def _copyto(dst, src, casting="same_kind", where=True):
    if type(dst) is not ndarray:
        raise TypeError("cupy.copyto: dst must be a device array")
    _reject_host_arrays("cupy.copyto", (src, where))
    d, s, w = dst._a, _raw(src), _raw(where)
    _write(lambda: np.copyto(d, s, casting=casting, where=w))


def _broadcast_to(a, shape):
    # CuPy's broadcast views are writable (NumPy's are read-only): a kernel may be handed one
    r = np.broadcast_to(a._a, shape)
    return _wrap(np.lib.stride_tricks.as_strided(a._a, r.shape, r.strides))


_CREATION = ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange", "linspace", "eye",
             "identity")
_FUNCTIONS = (
    # element-wise
    "add", "subtract", "multiply", "divide", "true_divide", "floor_divide", "power", "negative", "positive",
    "abs", "absolute", "sqrt", "square", "reciprocal", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p",
    "sin", "cos", "tan", "tanh", "sinh", "cosh", "arctan", "arctan2", "maximum", "minimum", "fmax", "fmin",
    "clip", "sign", "floor", "ceil", "trunc", "rint", "around", "round", "isnan", "isinf", "isfinite",
    "equal", "not_equal", "less", "less_equal", "greater", "greater_equal", "logical_and", "logical_or",
    "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "invert", "left_shift",
    "right_shift", "mod", "remainder", "fmod", "where", "nan_to_num", "isclose",
    # reductions and searches
    "sum", "prod", "mean", "var", "std", "max", "min", "amax", "amin", "argmax", "argmin", "any", "all",
    "cumsum", "cumprod", "count_nonzero", "nansum", "nanmax", "nanmin", "nanmean", "allclose", "array_equal",
    "argsort", "unique", "nonzero", "argwhere", "flatnonzero", "searchsorted", "bincount", "diff",
    "dot", "vdot", "matmul", "tensordot", "einsum", "inner", "outer",
    # shapes and copies
    "reshape", "ravel", "transpose", "moveaxis", "swapaxes", "squeeze", "expand_dims", "concatenate", "stack",
    "hstack", "vstack", "split", "array_split", "broadcast_arrays", "tile", "repeat", "flip", "roll", "pad",
    "take", "take_along_axis", "atleast_1d", "atleast_2d", "atleast_3d", "copy", "diag", "tril", "triu",
)
_module_functions = {name: _creation(name) for name in _CREATION}
_module_functions.update({name: _function(name) for name in _FUNCTIONS})
_module_functions.update(asarray=_asarray, array=_array, asanyarray=_asarray, ascontiguousarray=_ascontiguousarray,
                         asnumpy=_asnumpy, empty=_empty, empty_like=_empty_like, copyto=_copyto,
                         broadcast_to=_broadcast_to)


class _RandomState:
    """cupy.random: NumPy's generator, its numbers put in device memory (CuPy's own differ anyway)."""

    def __init__(self, seed=None):
        self._rs = np.random.RandomState(seed)

    def seed(self, seed=None):
        self._rs.seed(seed)

    def standard_normal(self, size=None, dtype=float):
        return _asarray(self._rs.standard_normal(size).astype(dtype, copy=False))

    def randint(self, low, high=None, size=None, dtype=int):
        return _asarray(self._rs.randint(low, high, size).astype(dtype, copy=False))


# ---------------------------------------------------------------------------------- kernels

class RawModule:
    """cupy.RawModule: the CUDA C source compiled for the CPU emulator at the declared GPU's
    architecture; its kernels run on the arrays' memory."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, log_stream=None, jitify=False):
        if code is None:
            raise not_simulated("loading a compiled module (RawModule(path=...))")
        options = tuple(options)
        if not any(o.startswith(("-arch", "--gpu-architecture")) for o in options):
            options += (f"-arch={declared_gpu().arch}",)
        self.code, self.options, self.backend = code, options, backend
        self._emu = EmuModule(code, options)
        self._functions = {}

    def compile(self, log_stream=None):
        self._emu.compile()
        return self

    def get_function(self, name):
        """The kernel `name`, compiled now (as CuPy compiles on the first get_function)."""
        fn = self._functions.get(name)
        if fn is None:
            efn = self._emu.get_function(name)
            efn._bind()
            fn = self._functions[name] = Function(efn)
        return fn


RawModule.__module__ = "cupy"


class Function:
    """A kernel of a RawModule: `fn(grid, block, args, shared_mem=0, stream=None)`."""

    def __init__(self, efn):
        self._efn = efn
        self._pointer = tuple(p.is_pointer for p in efn.signature.params)

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._efn.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        self._efn.max_dynamic_shared_size_bytes = value

    def __call__(self, grid, block, args, shared_mem=0, stream=None, enable_cooperative_groups=False):
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"kernel '{self._efn.name}': args must be a tuple, got {type(args).__name__}")
        values = []
        for i, a in enumerate(args):
            if type(a) is ndarray:
                values.append(a._a)
            elif isinstance(a, np.ndarray):
                raise TypeError(f"kernel '{self._efn.name}' argument {i}: Unsupported type {type(a)} (a NumPy "
                                f"array passed to a GPU kernel)")
            elif i < len(self._pointer) and self._pointer[i] and (a is None or (isinstance(a, (int, np.integer))
                                                                                and int(a) == 0)):
                values.append(None)     # the null pointer
            else:
                values.append(a)
        efn, values = self._efn, tuple(values)
        (stream or _current_stream())._issue(lambda: efn(grid, block, values, shared_mem=shared_mem))


Function.__module__ = "cupy.cuda.function"


# ---------------------------------------------------------------------------------- the device

def _visible():
    """CUDA_VISIBLE_DEVICES set to nothing hides the GPU, simulated or not."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is None or value.strip() not in ("", "-1")


def getDeviceCount():
    if not _visible():
        raise CUDARuntimeError("cudaErrorNoDevice", "no CUDA-capable device is detected")
    return 1


def _check_device(device):
    device = int(device)
    if device != 0 or not _visible():
        raise CUDARuntimeError("cudaErrorInvalidDevice", "invalid device ordinal")
    return device


def getDevice():
    return 0


def setDevice(device):
    _check_device(device)


def deviceSynchronize():
    for s in list(_capturing):
        s._invalidate("cudaDeviceSynchronize during the capture")
        raise _capture_error()


def getDeviceProperties(device):
    _check_device(device)
    g = declared_gpu()
    return {
        "name": f"{g.name} (simulated)".encode(), "totalGlobalMem": g.memory, "sharedMemPerBlock": 48 * 1024,
        "regsPerBlock": 65536, "warpSize": 32, "maxThreadsPerBlock": 1024, "maxThreadsDim": (1024, 1024, 64),
        "maxGridSize": (2**31 - 1, 65535, 65535), "clockRate": g.clock_khz, "totalConstMem": 65536,
        "major": g.major, "minor": g.minor, "multiProcessorCount": g.sms, "memoryClockRate": g.memory_clock_khz,
        "memoryBusWidth": g.bus_width, "l2CacheSize": g.l2, "maxThreadsPerMultiProcessor": g.threads_per_sm,
        "sharedMemPerMultiprocessor": g.smem_per_sm, "regsPerMultiprocessor": 65536,
        "sharedMemPerBlockOptin": g.smem_optin, "maxBlocksPerMultiProcessor": g.blocks_per_sm,
        "concurrentKernels": 1, "asyncEngineCount": 2, "unifiedAddressing": 1, "managedMemory": 1,
        "ECCEnabled": 1, "integrated": 0, "canMapHostMemory": 1, "computeMode": 0, "pciBusID": 0,
        "pciDeviceID": 0, "pciDomainID": 0, "isMultiGpuBoard": 0,
    }


def memGetInfo():
    total = declared_gpu().memory
    return max(0, total - _device_bytes_in_use()), total


def runtimeGetVersion():
    return RUNTIME_VERSION


def driverGetVersion():
    return DRIVER_VERSION


class Device:
    """cupy.cuda.Device: the one simulated GPU, id 0."""

    def __init__(self, device=None):
        self.id = 0 if device is None else _check_device(device)

    def use(self):
        pass

    def synchronize(self):
        deviceSynchronize()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @property
    def compute_capability(self):
        g = declared_gpu()
        return f"{g.major}{g.minor}"

    @property
    def pci_bus_id(self):
        return "0000:00:00.0"

    @property
    def mem_info(self):
        return memGetInfo()

    def __int__(self):
        return self.id

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (simulated {declared_gpu().name})>"


Device.__module__ = "cupy.cuda.device"


# ---------------------------------------------------------------------------------- the modules

def _not_here(package, names):
    """A module __getattr__: the libraries only a GPU has are an ImportError naming the simulator."""
    def __getattr__(name):
        if name in names:
            raise ImportError(str(not_simulated(f"{package}.{name} ({names[name]})")), name=f"{package}.{name}")
        raise AttributeError(f"the simulated CuPy ({ENV}=1, kernels/emu/cudasim.py) has no {package}.{name}")
    return __getattr__


def _build():
    cupy = types.ModuleType("cupy", "The simulated GPU's CuPy (kernels/emu/cudasim.py).")
    cuda = types.ModuleType("cupy.cuda")
    runtime = types.ModuleType("cupy.cuda.runtime")
    memory = types.ModuleType("cupy.cuda.memory")
    random = types.ModuleType("cupy.random")
    linalg = types.ModuleType("cupy.linalg")

    cupy.__version__ = VERSION
    cupy.__cudasim__ = True
    cupy.__file__ = __file__
    cupy.ndarray = ndarray
    cupy.RawModule = RawModule
    cupy.cuda, cupy.random, cupy.linalg = cuda, random, linalg
    cupy.get_default_memory_pool = get_default_memory_pool
    cupy.get_default_pinned_memory_pool = get_default_pinned_memory_pool
    cupy.newaxis, cupy.nan, cupy.inf, cupy.pi, cupy.e = None, np.nan, np.inf, np.pi, np.e
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                 "uint64", "bool_", "complex64", "complex128", "dtype", "result_type", "can_cast", "promote_types",
                 "finfo", "iinfo", "intp", "ndim", "shape", "isscalar"):
        setattr(cupy, name, getattr(np, name))
    cupy.bool = np.bool_
    for name, fn in _module_functions.items():
        setattr(cupy, name, fn)
    cupy.__getattr__ = _not_here("cupy", {"cudnn": "cuDNN", "cutensor": "cuTENSOR"})

    cuda.Stream, cuda.Event, cuda.Device, cuda.MemoryPool = Stream, Event, Device, MemoryPool
    cuda.MemoryPointer, cuda.Memory, cuda.Graph = MemoryPointer, Memory, Graph
    cuda.get_current_stream, cuda.get_elapsed_time = get_current_stream, get_elapsed_time
    cuda.using_allocator, cuda.set_allocator, cuda.get_allocator = using_allocator, set_allocator, get_allocator
    cuda.alloc_pinned_memory, cuda.PinnedMemoryPool = alloc_pinned_memory, PinnedMemoryPool
    cuda.runtime, cuda.memory = runtime, memory
    cuda.is_available = lambda: _visible()
    cuda.__getattr__ = _not_here("cupy.cuda", {"nccl": "NCCL", "cudnn": "cuDNN", "nvrtc": "NVRTC",
                                               "cublas": "cuBLAS", "compiler": "NVRTC"})

    for fn in (getDeviceCount, getDevice, setDevice, deviceSynchronize, getDeviceProperties, memGetInfo,
               runtimeGetVersion, driverGetVersion):
        setattr(runtime, fn.__name__, fn)
    runtime.CUDARuntimeError = CUDARuntimeError
    runtime.is_hip = False

    memory.OutOfMemoryError, memory.MemoryPool, memory.MemoryPointer = OutOfMemoryError, MemoryPool, MemoryPointer
    memory.Memory = Memory

    state = _RandomState()
    for name in ("seed", "standard_normal", "randint"):
        setattr(random, name, getattr(state, name))

    linalg.norm = _function_from(np.linalg.norm, "linalg.norm")

    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime, "cupy.cuda.memory": memory,
            "cupy.random": random, "cupy.linalg": linalg}


def _function_from(fn, name):
    def call(*args, **kwargs):
        _reject_host_arrays(f"cupy.{name}", (args, kwargs))
        return _compute(lambda: fn(*_raw(args), **_raw(kwargs)), args, kwargs)
    return call


_modules = _build()
_cupy = _modules["cupy"]


def module():
    """The stand-in `cupy` module (without installing it)."""
    return _cupy


def install():
    """Make `import cupy` give the stand-in (KERNELS_CUDASIM=1: kernels/__init__.py calls this).

    Refuses (ImportError) when the real CuPy is already imported: arrays of both would meet."""
    present = sys.modules.get("cupy")
    if present is _cupy:
        return _cupy
    if present is not None:
        where = getattr(present, "__file__", None) or "?"
        raise ImportError(f"{ENV}=1 asks for the simulated GPU, but the real CuPy ({where}) was imported before "
                          f"`kernels`: import kernels (or nn) first, or unset {ENV}")
    declared_gpu()          # an unknown KERNELS_CUDASIM_GPU is one clear error, now
    sys.modules.update(_modules)
    return _cupy
