"""What the launchers would launch on a GPU, worked out without one: `kernels.runtime.plan`.

    from kernels.runtime import plan
    with plan.planning() as p:                         # `import cupy` gives the stand-in here
        case = kernels.cases.make("batchnorm", plan.cupy, (256, 56, 56, 64))
        case.run("batchnorm_forward_train", 2, case.prepare("batchnorm_forward_train"))
    p.operations    # [Operation("launch", kernel, grid, block, shared_mem, args), Operation("memset", ...)]

Inside `planning()` the launchers run exactly as on a GPU (their grids are chosen for a GPU:
`xp is not np`), but on arrays that hold no data (`PlanArray`: a shape, a dtype and a made-up
device address), so a batch-256 ResNet-50 layer costs nothing to "allocate"; every kernel launch
is recorded with its grid, block, dynamic shared memory and arguments instead of being run, as
are the device work CuPy itself would do (`cupy.zeros`: a memset; `cupy.asarray` of host data:
a copy to the device).  The performance model (kernels/emu/perfmodel.py) takes these as the
launch configuration at the real shape; the counts come from the emulator at a small shape.

Nothing is computed: arithmetic on PlanArrays gives PlanArrays of the result's shape and dtype,
and a launcher that reads device values back on the host would get no numbers (none of ours does
on the CuPy path).
"""

import contextlib
import sys
import threading
import types
from dataclasses import dataclass, field

import numpy as np

from . import raw

__all__ = ["PlanArray", "Operation", "Plan", "planning", "cupy"]


class _Data:
    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


class _Flags:
    def __init__(self, c, f):
        self.c_contiguous, self.f_contiguous, self.writeable = c, f, True

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "WRITEABLE": True}[key]


_next_address = [1 << 40]
_address_lock = threading.Lock()


def _allocate(nbytes):
    """A made-up device address, 256-byte aligned like cudaMalloc's, never dereferenced."""
    with _address_lock:
        ptr = _next_address[0]
        _next_address[0] += (max(1, nbytes) + 511) // 256 * 256
    return ptr


def _contiguous_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(1, n)
    return tuple(reversed(strides))


class PlanArray:
    """A device array without data: what a launcher looks at (shape, dtype, strides, flags, the
    address) and what arithmetic would give.  Its type looks like `cupy.ndarray` to kernels/."""

    __array_ufunc__ = None        # numpy scalars defer to our reflected operators

    def __init__(self, shape, dtype, ptr=None, strides=None, base=None):
        self.shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        self.itemsize = self.dtype.itemsize
        self.nbytes = self.size * self.itemsize
        self.strides = tuple(strides) if strides is not None else _contiguous_strides(self.shape, self.itemsize)
        self.base = base
        self.data = _Data(ptr if ptr is not None else _allocate(self.nbytes))

    @property
    def flags(self):
        c = self.strides == _contiguous_strides(self.shape, self.itemsize) or self.size <= 1
        return _Flags(c, self.ndim <= 1 and c)

    def __repr__(self):
        return f"PlanArray({self.shape}, {self.dtype})"

    def __len__(self):
        return self.shape[0]

    # views
    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = list(shape)
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1], dtype=np.int64)) or 1
            shape[shape.index(-1)] = self.size // known
        return PlanArray(tuple(shape), self.dtype, self.data.ptr, base=self)

    def ravel(self):
        return self.reshape(-1)

    def view(self, dtype=None):
        return self if dtype is None else PlanArray((self.nbytes // np.dtype(dtype).itemsize,), dtype, self.data.ptr)

    def __getitem__(self, index):
        """Basic indexing (ints, slices, Ellipsis, None); the address follows the first element."""
        probe = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=self.shape,
                                                strides=self.strides if self.size else (0,) * self.ndim)
        view = probe[index]
        offset = view.__array_interface__["data"][0] - probe.__array_interface__["data"][0]
        return PlanArray(view.shape, self.dtype, self.data.ptr + offset, view.strides, base=self)

    def __setitem__(self, index, value):
        pass

    @property
    def T(self):
        return PlanArray(self.shape[::-1], self.dtype, self.data.ptr, self.strides[::-1], base=self)

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        axes = tuple(axes) or tuple(reversed(range(self.ndim)))
        return PlanArray(tuple(self.shape[a] for a in axes), self.dtype, self.data.ptr,
                         tuple(self.strides[a] for a in axes), base=self)

    # new arrays (what CuPy would compute; nothing is)
    def copy(self):
        return PlanArray(self.shape, self.dtype)

    def astype(self, dtype, copy=True):
        return PlanArray(self.shape, dtype)

    def _binary(self, other):
        if isinstance(other, PlanArray):
            shape = np.broadcast_shapes(self.shape, other.shape)
            dtype = np.result_type(self.dtype, other.dtype)
        else:
            shape = self.shape
            dtype = np.result_type(self.dtype, np.asarray(other).dtype) if isinstance(other, np.generic) \
                else self.dtype
        return PlanArray(shape, dtype)

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _binary
    __iadd__ = __isub__ = __imul__ = __itruediv__ = _binary
    __gt__ = __lt__ = __ge__ = __le__ = _binary

    def __neg__(self):
        return PlanArray(self.shape, self.dtype)

    def _read(self):
        """A value read back on the host: recorded (the host waits for the GPU there); no number."""
        _record(Operation("read", nbytes=self.itemsize))
        return 0

    def __float__(self):
        return float(self._read())

    def __int__(self):
        return int(self._read())

    __index__ = __int__

    def __bool__(self):
        return bool(self._read())

    def get(self):
        _record(Operation("read", nbytes=self.nbytes))
        return np.zeros(self.shape, self.dtype)

    def _reduce(self, axis=None, keepdims=False, **_):
        if axis is None:
            return PlanArray((), self.dtype)
        axes = {a % self.ndim for a in (axis if isinstance(axis, tuple) else (axis,))}
        shape = tuple(1 if i in axes else s for i, s in enumerate(self.shape) if keepdims or i not in axes)
        return PlanArray(shape, self.dtype)

    sum = mean = max = min = var = _reduce


PlanArray.__module__ = "cupy"          # kernels/ tells CuPy arrays by their type's module
PlanArray.__name__ = PlanArray.__qualname__ = "ndarray"


def _shape_of(shape):
    return tuple(shape) if isinstance(shape, (tuple, list)) else (int(shape),)


@dataclass
class Operation:
    """One piece of device work a launcher asked for: kind 'launch' (kernel, grid, block,
    shared_mem, args), 'memset' (nbytes: cupy.zeros), 'copy' (nbytes: host data to the device) or
    'read' (nbytes: device data read on the host, which waits for the GPU)."""
    kind: str
    kernel: object = None
    grid: tuple = ()
    block: tuple = ()
    shared_mem: int = 0
    args: tuple = ()
    nbytes: int = 0

    @property
    def name(self):
        return self.kernel.name if self.kernel is not None else self.kind


@dataclass
class Plan:
    operations: list = field(default_factory=list)

    @property
    def launches(self):
        return [o for o in self.operations if o.kind == "launch"]


_active = threading.local()


def _record(op):
    plan = getattr(_active, "plan", None)
    if plan is not None:
        plan.operations.append(op)


def _dims(v):
    if isinstance(v, int):
        return (v, 1, 1)
    v = tuple(int(x) for x in v)
    return v + (1,) * (3 - len(v))


class _Recorder:
    """Takes the runtime's launches (raw._tracer) while planning: recorded, not run."""

    def launch(self, kernel, grid, block, args, shared_mem, kwargs):
        _record(Operation("launch", kernel, _dims(grid), _dims(block), int(shared_mem), tuple(args)))


# ------------------------------------------------------------------------ the stand-in module
def _empty(shape, dtype=np.float32, order="C"):
    return PlanArray(_shape_of(shape), dtype)


def _zeros(shape, dtype=np.float32, order="C"):
    a = PlanArray(_shape_of(shape), dtype)
    if a.nbytes:
        _record(Operation("memset", nbytes=a.nbytes))
    return a


def _asarray(a, dtype=None):
    if isinstance(a, PlanArray):
        return a if dtype is None else a.astype(dtype)
    host = np.asarray(a, dtype=dtype)
    out = PlanArray(host.shape, host.dtype)
    if out.nbytes:
        _record(Operation("copy", nbytes=out.nbytes))
    return out


def _make_module():
    mod = types.ModuleType("cupy")
    mod.__doc__ = "kernels.runtime.plan's stand-in for CuPy: arrays without data, launches recorded"
    mod.ndarray = PlanArray
    mod.empty = _empty
    mod.zeros = _zeros
    mod.empty_like = lambda a, dtype=None: PlanArray(a.shape, dtype or a.dtype)
    mod.zeros_like = lambda a, dtype=None: _zeros(a.shape, dtype or a.dtype)
    mod.ones = mod.full = lambda shape, *a, dtype=np.float32, **k: PlanArray(_shape_of(shape), dtype)
    mod.asarray = mod.array = _asarray
    mod.arange = lambda n, dtype=np.int64: PlanArray((int(n),), dtype)
    mod.broadcast_to = lambda a, shape: PlanArray(_shape_of(shape), a.dtype)
    mod.maximum = mod.where = lambda *a, **k: a[0]
    mod.sqrt = mod.exp = mod.log = lambda a: a
    mod.stack = lambda arrays: PlanArray((len(arrays),), np.int64)
    random = types.SimpleNamespace()
    random.seed = lambda seed=None: None
    random.standard_normal = lambda shape, dtype=np.float64: PlanArray(_shape_of(shape), dtype)
    random.randint = lambda low, high=None, size=None, dtype=np.int64: PlanArray(_shape_of(size or 1), dtype)
    random.random = random.rand = lambda shape, dtype=np.float64: PlanArray(_shape_of(shape), dtype)
    mod.random = random
    mod.linalg = types.SimpleNamespace(norm=lambda a: PlanArray((), np.float32))
    mod.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 0))
    for name in ("float16", "float32", "float64", "int32", "int64", "uint8", "uint16", "bool_"):
        setattr(mod, name, getattr(np, name))
    mod.__version__ = "plan"
    return mod


cupy = _make_module()
"""The stand-in module: pass it as `xp` (kernels.cases.make(family, plan.cupy, shape))."""


@contextlib.contextmanager
def planning():
    """Within the block `import cupy` gives the stand-in and every kernel launch is recorded
    (not run) into the yielded Plan.  The real CuPy, if loaded, is put back afterwards; no
    kernel's handles are touched (the launches never reach a backend)."""
    saved = {k: v for k, v in sys.modules.items() if k == "cupy" or k.startswith("cupy.")}
    previous_tracer = raw._tracer
    plan = Plan()
    _active.plan = plan
    for k in saved:
        del sys.modules[k]
    sys.modules["cupy"] = cupy
    raw._tracer = _Recorder()
    try:
        yield plan
    finally:
        raw._tracer = previous_tracer
        _active.plan = None
        del sys.modules["cupy"]
        sys.modules.update(saved)
