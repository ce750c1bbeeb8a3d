"""`kernels.resources(kernel, arch)`: registers, spills, stack and shared memory, from ptxas.

NVRTC compiles a kernel's source for a real architecture with ptxas inside; asked with
`-Xptxas -v` (NVRTC passes options after -Xptxas to ptxas; `--ptxas-options=-v` is the same), ptxas
writes what each entry function uses into the program log:

    ptxas info    : Compiling entry function 'gemm_tiled_f32' for 'sm_80'
    ptxas info    : Function properties for gemm_tiled_f32
    ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 40 registers, used 1 barriers, 8192 bytes smem, 400 bytes cmem[0]

which is all we read (no GPU needed: NVRTC is a library, see kernels/runtime/nvrtc.py).  The module is
compiled with the options it was loaded with and CuPy's `-ftz=true`, once per architecture;
the results are cached in memory and on disk (beside the emulator's builds, keyed by the source,
the options and the NVRTC version).

    r = kernels.resources(kernels.load_module("gemm.cu").get_function("gemm_tiled_f32"), "sm_80")
    r.registers, r.spill_store_bytes, r.static_shared_bytes
    r.occupancy(block_size=256)          # kernels.occupancy with these registers and shared memory
"""

import json
import logging
import re
import threading
from dataclasses import asdict, dataclass, fields

from . import cuda_env, nvrtc
from ..emu.occupancy_calculator import architecture, occupancy

__all__ = ["resources", "module_resources", "Resources"]


@dataclass(frozen=True)
class Resources:
    """What ptxas reports for one kernel on one architecture.

    registers: 32-bit registers per thread; spill_store_bytes, spill_load_bytes: bytes of
    register spills (stores to and loads from local memory, per thread); stack_bytes: the stack
    frame (local memory: arrays indexed at run time, spills); static_shared_bytes: __shared__
    variables; barriers: named barriers used; constant_bytes: the parameter bank cmem[0].
    """
    kernel: str
    arch: str
    registers: int
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    stack_bytes: int = 0
    static_shared_bytes: int = 0
    barriers: int = 0
    constant_bytes: int = 0

    def occupancy(self, block_size, dynamic_shared_bytes=0):
        """kernels.occupancy on this architecture with these registers and shared memory."""
        return occupancy(self.arch, block_size, self.registers, self.static_shared_bytes + dynamic_shared_bytes)


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_FIELDS = {"barriers": re.compile(r"used (\d+) barriers"), "static_shared_bytes": re.compile(r"(\d+) bytes smem"),
           "constant_bytes": re.compile(r"(\d+) bytes cmem\[0\]")}


def parse_ptxas_log(log, arch):
    """{entry function name: Resources} from a ptxas -v log (NVRTC's program log)."""
    found, entry, properties_of = {}, None, None
    values = {}

    def close():
        if entry is not None and "registers" in values:
            found[entry] = Resources(kernel=entry, arch=arch, **values)

    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            close()
            entry, values, properties_of = m.group(1), {}, None
            continue
        m = _PROPERTIES.search(line)
        if m:
            properties_of = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and entry is not None and properties_of == entry:
            values["stack_bytes"], values["spill_store_bytes"], values["spill_load_bytes"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m and entry is not None:
            values["registers"] = int(m.group(1))
            for key, pattern in _FIELDS.items():
                f = pattern.search(line)
                if f:
                    values[key] = int(f.group(1))
    close()
    return found


def _nvrtc_options(options):
    """A RawModule's options for NVRTC: its -I folders apart (cuda_env.include_dirs; the source
    has its local includes inlined already), the rest as given but the architecture, then CuPy's
    -ftz=true and ptxas -v."""
    opts, it = [], iter(options)
    for opt in it:
        if opt in ("-I", "--include-path"):
            next(it, None)
        elif not opt.startswith(("-I", "--include-path=", "-arch", "--gpu-architecture")):
            opts.append(opt)
    return opts + ["-ftz=true", "-Xptxas", "-v"], cuda_env.include_dirs(options)


_lock = threading.Lock()
_memory = {}
_log = logging.getLogger("kernels.runtime.ptxas")
_RESOURCE_FIELDS = {f.name: f.type for f in fields(Resources)}


def _cache_file(key):
    from ..emu.emulator import cache_dir, cache_error
    folder = cache_dir() / "ptxas"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cache_error(folder, e) from None
    return folder / f"{key}.json"


def _field_ok(kind, value):
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, str)


def _read_cached(path):
    """{kernel name: Resources} from a cache file, or None when there is none or it is damaged
    (logged: it is then computed anew and rewritten)."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not an object")
        found = {}
        for name, r in data.items():
            if not (isinstance(r, dict) and set(r) <= set(_RESOURCE_FIELDS) and r.get("kernel") == name
                    and all(_field_ok(_RESOURCE_FIELDS[k], v) for k, v in r.items())):
                raise ValueError(f"the entry of {name!r} is not a ptxas report")
            found[name] = Resources(**r)   # (a missing field: TypeError)
        return found
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:   # (json.JSONDecodeError and UnicodeDecodeError are ValueErrors)
        _log.warning("the ptxas cache entry %s is damaged (%s); computing it again", path, e)
        return None


def module_resources(code, arch="sm_80", options=(), filename="kernel.cu"):
    """{kernel name: Resources} of every entry function of a CUDA C source on `arch`."""
    a = architecture(arch).name
    opts, dirs = _nvrtc_options(options)
    from ..emu.emulator import _digest
    key = _digest("ptxas", code, opts, a, nvrtc.nvrtc_version())
    with _lock:
        hit = _memory.get(key)
        if hit is not None:
            return hit
        path = _cache_file(key)
        found = _read_cached(path)
        if found is None:
            result = nvrtc.compile_cuda(code, arch=a, options=opts, filename=filename, include_dirs=dirs)
            found = parse_ptxas_log(result.log, a)
            from ..emu.emulator import write_cache_file
            write_cache_file(path, json.dumps({name: asdict(r) for name, r in found.items()}))
        _memory[key] = found
        return found


def resources(kernel, arch="sm_80"):
    """Resources of one kernel (a kernels.RawKernel, e.g. load_module("gemm.cu").get_function(...))
    on arch 'sm_60', 'sm_70', 'sm_80' or 'sm_90', from NVRTC's ptxas report (cached).

    Raises kernels.runtime.nvrtc.NVRTCUnavailableError without libnvrtc, kernels.CompileError when the
    source does not compile for that architecture.
    """
    module = getattr(kernel, "module", None)
    if module is None or not hasattr(kernel, "name"):
        raise TypeError(f"resources: pass a kernel (kernels.RawKernel), got {type(kernel).__name__}")
    found = module_resources(module.code, arch, module.options, module.filename)
    if kernel.name not in found:
        raise KeyError(f"resources: ptxas reported nothing for '{kernel.name}' on {arch} "
                       f"(found: {', '.join(sorted(found)) or 'none'})")
    return found[kernel.name]
