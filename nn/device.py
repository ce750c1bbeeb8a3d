"""Devices: where arrays live and which module runs the ops.

| device | arrays | ops module                                   |
|--------|--------|----------------------------------------------|
| cpu    | NumPy  | kernels.reference (NumPy, im2col + BLAS)     |
| emu    | NumPy  | kernels.ops -> our CUDA kernels on the CPU emulator |
| cuda   | CuPy   | kernels.ops -> our CUDA kernels on the GPU   |

cpu and emu both hold NumPy arrays, so the device is a property of the Tensor, not of its array.
This file is the only place in nn/ that knows the difference between devices: everything else
asks `device.ops` for the op and `device.xp` for the array module.

It is also the one door from the device to the host: every read of a device value in nn/ and
train.py goes through `to_numpy`, which counts (`host_reads()`). On cuda each such read makes the
host wait for the GPU; a training step that reads nothing can be queued far ahead and captured as
a CUDA graph. On cpu and emu the same places are counted, so `python -m bench.train --sync-check`
proves a step sync-free without a GPU.
"""

import importlib

import numpy as np

__all__ = ["Device", "get_device", "cpu", "emu", "cuda", "default_device_for", "is_array", "to_numpy", "host_reads",
           "set_conv_engine", "use_kernels", "select_kernels", "restore_kernels", "kernel_table",
           "cuda_unavailable_reason", "auto_device", "free_device_memory", "kernel_errors",
           "cuda_setup_error"]

_host_reads = 0


class Device:
    """A place to run: `name` ('cpu', 'emu', 'cuda'), `xp` (numpy or cupy), `ops` (the op module).

    The op module and CuPy are imported on first use, so `cpu` works without either.
    """

    def __init__(self, name, ops_module_name, array_module_name):
        self.name = name
        self._ops_module_name = ops_module_name
        self._array_module_name = array_module_name

    @property
    def ops(self):
        """The module holding the op contract's functions for this device."""
        try:
            return importlib.import_module(self._ops_module_name)
        except ImportError as e:
            raise RuntimeError(f"device '{self.name}' needs {self._ops_module_name}, which could not "
                               f"be imported: {e}") from e

    @property
    def xp(self):
        """numpy or cupy: the array module of this device."""
        try:
            return importlib.import_module(self._array_module_name)
        except ImportError as e:
            raise RuntimeError(f"device '{self.name}' needs {self._array_module_name}, which could not "
                               f"be imported (pip install -e '.[gpu]'): {e}") from e

    def asarray(self, a, dtype=None):
        """`a` (NumPy or CuPy array, or anything array-like) as an array of this device."""
        if self._array_module_name == "numpy":
            if type(a).__module__.startswith("cupy"):
                a = to_numpy(a)
            return np.asarray(a, dtype=dtype)
        return self.xp.asarray(a, dtype=dtype)

    def mark_step(self):
        """End a training step for the kernels' launch trace (KERNELS_TRACE prints a summary of the
        step's launches); nothing on cpu, or when no trace is on."""
        if self._ops_module_name == "kernels.ops":
            from kernels.runtime import trace
            if trace.enabled():
                trace.mark_step()

    def __repr__(self):
        return f"device('{self.name}')"

    def __eq__(self, other):
        return isinstance(other, Device) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


cpu = Device("cpu", "kernels.reference", "numpy")
emu = Device("emu", "kernels.ops", "numpy")
cuda = Device("cuda", "kernels.ops", "cupy")
_DEVICES = {"cpu": cpu, "emu": emu, "cuda": cuda}


def get_device(device):
    """A Device from a Device or one of the names 'cpu', 'emu', 'cuda'."""
    if isinstance(device, Device):
        return device
    if isinstance(device, str) and device in _DEVICES:
        return _DEVICES[device]
    raise ValueError(f"device must be one of {sorted(_DEVICES)} or a Device, got {device!r}")


def default_device_for(array):
    """The device an array belongs to when nobody says: cuda for CuPy arrays, cpu otherwise."""
    return cuda if type(array).__module__.startswith("cupy") else cpu


def is_array(obj):
    """True for a NumPy or CuPy array (or NumPy scalar)."""
    return hasattr(obj, "__array_interface__") or type(obj).__module__.startswith("cupy")


def to_numpy(array):
    """A NumPy copy/view of a NumPy or CuPy array (for saving, printing, comparing): the one door
    from the device to the host, counted by host_reads(). On cuda it waits for the GPU."""
    global _host_reads
    _host_reads += 1
    if type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def host_reads():
    """How many device-to-host reads (to_numpy calls) this process has made so far."""
    return _host_reads


def set_conv_engine(name):
    """Which engine runs convolutions on the cuda device: 'ours' (our kernels, the default) or
    'cudnn' (NVIDIA cuDNN through its frontend). cpu and emu are unaffected."""
    importlib.import_module("kernels.ops").set_conv_engine(name)


def use_kernels(spec=None, **choices):
    """A context in which the emu and cuda devices run the chosen kernel versions (cpu is NumPy and
    unaffected): use_kernels(conv=1, batchnorm=2), use_kernels("conv=1,batchnorm=my_bn.cu"),
    use_kernels(conv="my_conv.cu:1") for version 1 of a learner's copy of kernels/conv.cu.  The
    versions are those of `python -m kernels.<family> --list`; see kernels/versions.py."""
    return importlib.import_module("kernels.versions").use(spec, **choices)


def select_kernels(spec, device=None):
    """The versions `spec` chooses (a spec as for use_kernels, or a run's recorded table; None: the
    defaults) for everything from now on, as a training run does.  device 'emu' or 'cuda' compiles
    every learner's copy for it now, so that a compile error shows before any work.  Raises
    ValueError with one line that says what is wrong (for a copy that does not compile: that line,
    then the compiler's message).  Returns what restore_kernels takes."""
    versions = importlib.import_module("kernels.versions")
    from kernels.emu.errors import CompileError
    try:
        return versions.select(spec, compile_for=device if device in ("emu", "cuda") else None)
    except CompileError as e:
        # the compiler's whole message (trimmed of the emulator's machinery), as python -m
        # kernels.<family> --source FILE prints it: the learner's file:line:col first
        raise ValueError(str(e)) from None


def kernel_errors():
    """The exception classes of a kernel that failed: (CompileError, EmulatorError), so that
    train.py can tell a broken kernel (exit 2, one line) from a bug without importing kernels/."""
    errors = importlib.import_module("kernels.emu.errors")
    return errors.CompileError, errors.EmulatorError


def cuda_setup_error():
    """The exception class of CuPy unable to compile our kernels (NVRTC or a CUDA header missing;
    kernels/runtime/cuda_env.py): its message is one line naming the fix, for train.py's exit 2."""
    return importlib.import_module("kernels.runtime.cuda_env").CudaSetupError


def restore_kernels(previous):
    """Undo select_kernels: `previous` is what it returned."""
    importlib.import_module("kernels.versions").restore(previous)


def check_kernel_precision(spec, dtype):
    """Raise ValueError when `spec` chooses a version that activations of `dtype` ('float32' or
    'float16') never run (conv=4, a float16 version, for a float32 run)."""
    importlib.import_module("kernels.versions").check_precision(spec, dtype)


def kernel_table(spec=None):
    """What a run records of its kernels: {family: {'version': N[, 'f16_version': M][, 'file': path,
    'sha256': ...]}} for every family training can choose (f16_version: the version float16
    activations run, for conv), from `spec` (defaults filled in) or, with None, from the
    versions in use now.  Raises ValueError for a bad spec."""
    return importlib.import_module("kernels.versions").table(spec)


_cuda_probe = {}   # id(the cupy module probed) -> (that module, its reason): probed once per process
_reasons_said = set()


def cuda_unavailable_reason():
    """None when CuPy imports and sees a GPU. Otherwise why the cuda device cannot be used, in one
    line; "" when CuPy is simply not installed (a CPU machine: nothing to explain).

    Any failure counts: a CuPy wheel for another CUDA than the driver's, no driver, a broken
    install, no visible device (CUDA_VISIBLE_DEVICES="")."""
    import sys
    before = sys.modules.get("cupy")
    known = _cuda_probe.get(id(before))
    if known is not None and known[0] is before:
        return known[1]
    try:
        import cupy
    except ImportError as e:
        reason = "" if e.name == "cupy" else f"CuPy is installed but does not import ({type(e).__name__}: {e})"
    except Exception as e:
        reason = f"CuPy is installed but does not import ({type(e).__name__}: {_first_line(e)})"
    else:
        version = getattr(cupy, "__version__", "?")
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:
            reason = (f"CuPy {version} is installed but cannot use the GPU ({type(e).__name__}: {_first_line(e)}); "
                      f"`nvidia-smi` shows the driver's CUDA version, which must match the CuPy wheel's "
                      f"(README.md, 'On a GPU')")
        else:
            reason = None if count > 0 else f"CuPy {version} is installed but sees no GPU"
    after = sys.modules.get("cupy")
    _cuda_probe[id(after)] = (after, reason)
    return reason


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def auto_device(say=print):
    """'cuda' if CuPy sees a GPU, else 'cpu'. When CuPy is installed but unusable, say(...) gets one
    line with the reason (said once per process), so a GPU user learns why the CPU was chosen."""
    reason = cuda_unavailable_reason()
    if reason is None:
        return "cuda"
    if reason and reason not in _reasons_said:
        _reasons_said.add(reason)
        say(f"--device auto: training on the CPU, not the GPU: {reason}")
    return "cpu"


def free_device_memory():
    """(free, total) bytes of the current GPU, after handing CuPy's cached blocks back to the
    driver; (None, None) without CuPy or a GPU."""
    try:
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()
        free, total = cupy.cuda.runtime.memGetInfo()
        return int(free), int(total)
    except Exception:
        return None, None
