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
           "set_conv_engine"]

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
