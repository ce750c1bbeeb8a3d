"""The Python half of the emulator's sanitizer and schedules.

    KERNELS_EMU_SANITIZE=all          memcheck, racecheck, initcheck and synccheck on every
                                      emulator launch (or a comma list of them; 1 = all)
    with kernels.sanitize("racecheck"):   the same for the launches inside the block
    KERNELS_EMU_SCHEDULE=forward|reverse|random[:seed]
                                      the order the threads of a block run between barriers,
                                      and the order of the blocks

The checks run in kernels/emu/sanitizer.cpp, on a module compiled with -fsanitize=thread
instrumentation (kernels/emu/emulator.py builds it on demand, beside the plain one). This file says
which checks and which order a launch gets, lists the memory a finding can name (argument arrays,
__shared__ variables read from the module's symbol table with `nm`), turns a machine-code address
into a source line (`addr2line`, from binutils, which every g++ installation has) and writes the
messages. See kernels/README.md, "What the emulator checks".
"""

import os
import re
import shutil
import subprocess
import threading
import weakref

import numpy as np

from .errors import InitcheckError, MemcheckError, RacecheckError, SynccheckError

__all__ = ["CHECKS", "sanitize", "mark_uninitialized", "launch_config", "parse_checks", "parse_schedule"]

CHECKS = {"memcheck": 1, "racecheck": 2, "initcheck": 4, "synccheck": 8}
ALL_CHECKS = 15
MEMORY_CHECKS = 7          # the ones that need the instrumented module
PROFILE = 16               # not a check: kernels.profile() (kernels/emu/profiler.py), same module
INSTRUMENTED = MEMORY_CHECKS | PROFILE
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}

# emu_abi.h
_REGION_ARGUMENT, _REGION_SHARED, _REGION_DYNAMIC_SHARED = 0, 1, 2
_READ, _WRITE, _ATOMIC, _ASYNC = 0, 1, 2, 3
(_OUT_OF_BOUNDS, _MISALIGNED, _OTHER_LOCAL, _RAW, _WAR, _WAW, _ASYNC_PENDING, _UNINITIALIZED, _BARRIER_EXITED,
 _MASK_EXITED, _MASK_ABSENT, _BAD_ASYNC_COPY) = range(1, 13)
_NULL_PAGE = 4096          # an access below this address went through a null pointer


# ---------------------------------------------------------------------------------- configuration
def parse_checks(text):
    """KERNELS_EMU_SANITIZE's value -> bit mask of CHECKS ('' or '0': none; 'all' or '1': all)."""
    text = (text or "").strip().lower()
    if text in ("", "0", "false", "no", "off", "none"):
        return 0
    if text in ("1", "all", "true", "yes", "on"):
        return ALL_CHECKS
    mask = 0
    for name in (t.strip() for t in text.split(",")):
        if name not in CHECKS:
            raise ValueError(f"KERNELS_EMU_SANITIZE: unknown check {name!r}; use all, or a comma list of "
                             f"{', '.join(CHECKS)}")
        mask |= CHECKS[name]
    return mask


def parse_schedule(text):
    """KERNELS_EMU_SCHEDULE's value -> (kind, seed or None): forward (default), reverse,
    random (a fresh seed per process) or random:SEED."""
    text = (text or "").strip().lower()
    if not text:
        return SCHEDULES["forward"], None
    name, _, seed = text.partition(":")
    if name not in SCHEDULES or (seed and name != "random"):
        raise ValueError(f"KERNELS_EMU_SCHEDULE={text!r}: use forward, reverse, random or random:SEED")
    if seed:
        try:
            return SCHEDULES["random"], int(seed)
        except ValueError:
            raise ValueError(f"KERNELS_EMU_SCHEDULE={text!r}: the seed must be an integer") from None
    return SCHEDULES[name], None


class _Local(threading.local):
    stack = ()   # the sanitize() masks and profile() blocks (_PROFILING) of this thread, innermost last


_PROFILING = "profile"   # what kernels.profile() puts on the stack


_local = _Local()
_parsed = {}
_configs = {}
_process_seed = None
_launches = 0

# Every launch reads two environment variables: os.environ's own mapping of bytes is ~30 times
# faster than os.environ.get (which encodes the key and decodes the value each time).
_ENVIRON = getattr(os.environ, "_data", None)
if not (os.name == "posix" and isinstance(_ENVIRON, dict)):
    _ENVIRON = None
_SANITIZE_KEY, _SCHEDULE_KEY = b"KERNELS_EMU_SANITIZE", b"KERNELS_EMU_SCHEDULE"


def _environment():
    if _ENVIRON is not None:
        return _ENVIRON.get(_SANITIZE_KEY, b""), _ENVIRON.get(_SCHEDULE_KEY, b"")
    return os.environ.get("KERNELS_EMU_SANITIZE", ""), os.environ.get("KERNELS_EMU_SCHEDULE", "")


class sanitize:
    """Context manager: the emulator launches inside run with these checks, whatever
    KERNELS_EMU_SANITIZE says.  checks: 'all', a comma list or sequence of names, or False.

        with kernels.sanitize("racecheck,memcheck"):
            k(grid, block, args)         # raises kernels.RacecheckError on a race
    """

    def __init__(self, checks="all"):
        if checks is False or checks is None:
            checks = ""
        if not isinstance(checks, str):
            checks = ",".join(checks)
        self.mask = parse_checks(checks)

    def __enter__(self):
        _local.stack = _local.stack + (self.mask,)
        return self

    def __exit__(self, *exc):
        _local.stack = _local.stack[:-1]
        return False


def _stacked(checks, stack):
    """The checks of the innermost sanitize() block (else the environment's), plus PROFILE while
    a profile() block is open."""
    profiling = 0
    for entry in stack:
        if entry is _PROFILING:
            profiling = PROFILE
        else:
            checks = entry
    return checks | profiling


def _parsed_environment():
    """(checks, (schedule kind, seed)) that KERNELS_EMU_SANITIZE / KERNELS_EMU_SCHEDULE say now."""
    key = _environment()
    parsed = _parsed.get(key)
    if parsed is None:
        text = [v.decode() if isinstance(v, bytes) else v for v in key]
        parsed = _parsed[key] = (parse_checks(text[0]), parse_schedule(text[1]))
    return parsed


def initchecking():
    """Whether the next emulator launch runs initcheck (KERNELS_EMU_SANITIZE or a sanitize() block)."""
    checks = _parsed_environment()[0]
    if _local.stack:
        checks = _stacked(checks, _local.stack)
    return bool(checks & CHECKS["initcheck"])


def launch_config():
    """(checks, schedule kind, seed for this launch, description) for the next launch."""
    global _process_seed, _launches
    checks, (kind, seed) = _parsed_environment()
    stack = _local.stack
    if stack:
        checks = _stacked(checks, stack)
    if kind != SCHEDULES["random"]:
        config = _configs.get((checks, kind))
        if config is None:   # one tuple per setting: the launch can tell "unchanged" by identity
            config = _configs[(checks, kind)] = (checks, kind, 0, "" if kind == 0 else "reverse")
        return config
    if seed is None:
        if _process_seed is None:
            _process_seed = int.from_bytes(os.urandom(4), "little")
        seed = _process_seed
    _launches += 1
    # every launch a different order, all of them fixed by the seed
    return checks, kind, (seed * 1000003 + _launches) & (2**64 - 1), f"random:{seed}"


# ---------------------------------------------------------------------------------- initcheck on global memory
_uninitialized = {}   # data pointer -> (weak reference, nbytes, flags: uint8 per byte)


def mark_uninitialized(*arrays):
    """Tell initcheck that these NumPy arrays hold nothing yet (as cupy.empty() memory does on a
    GPU): a kernel that reads bytes of them no launch has written is reported.  Bytes become
    initialised when a sanitized launch writes them, or when you call this again after filling
    the array on the host (pass initialized=...)."""
    for a in arrays:
        if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
            raise TypeError("mark_uninitialized takes C-contiguous NumPy arrays")
        ptr = a.__array_interface__["data"][0]
        _uninitialized[ptr] = (weakref.ref(a), a.nbytes, np.zeros(max(1, a.nbytes), np.uint8))
    return arrays[0] if len(arrays) == 1 else arrays


def init_flags(ptr, nbytes):
    """The per-byte 'initialised' flags for an argument at ptr, or None (all initialised)."""
    entry = _uninitialized.get(ptr)
    if entry is None:
        return None
    ref, size, flags = entry
    if ref() is None or size != nbytes:
        del _uninitialized[ptr]
        return None
    return flags


# ---------------------------------------------------------------------------------- module symbols
class ModuleSymbols:
    """What the compiled module's symbol table and line table say (one per sanitized .so)."""

    def __init__(self, path, runtime_address_of):
        self.path = str(path)
        self._runtime_address_of = runtime_address_of   # symbol name -> address in this process
        self._lines = {}
        self._base = None

    def base(self):
        """The address the module is loaded at (runtime address minus symbol-table address)."""
        if self._base is None:
            table = self._nm(["--defined-only"])
            addr = dict((name, value) for value, _, _, name in table).get("__emu_static_shared_range")
            runtime = self._runtime_address_of("__emu_static_shared_range")
            self._base = runtime - addr if addr is not None and runtime else 0
        return self._base

    def _nm(self, extra):
        tool = shutil.which("nm")
        if not tool:
            return []
        out = subprocess.run([tool, "-S", "-C", *extra, self.path], capture_output=True, text=True).stdout
        table = []
        for line in out.splitlines():
            parts = line.split(None, 3)
            if len(parts) == 4:
                try:
                    table.append((int(parts[0], 16), int(parts[1], 16), parts[2], parts[3]))
                except ValueError:
                    pass
        return table

    def shared_variables(self, section_lo, section_hi):
        """[(address, size, display name)] of the __shared__ variables: those in the section
        [section_lo, section_hi), and those g++ left outside it.  g++ (before version 14) ignores
        the section attribute of a static local of a function template, so a __shared__ array
        declared inside a template lands in .bss; in sanitized and debug builds cuda_emu.h puts a
        128-byte pad variable right before every __shared__ declaration, and the variables that
        follow a pad in its own function are these."""
        base = self.base()
        table = sorted((base + value, size, name) for value, size, kind, name in self._nm(["--defined-only"])
                       if size and kind in "bBdD")
        out, scope = [], None   # scope: the function of the last pad outside the section
        for a, size, name in table:
            inside = section_lo <= a < section_hi
            if "__emu_shared_pad_" in name:
                scope = None if inside else name.rpartition("::")[0]
            elif inside:
                out.append((a, size, _display_variable(name)))
            elif scope is not None and name.rpartition("::")[0] == scope:
                # (`__shared__ float a[8], b[8];` pads only a: b follows in the same function)
                out.append((a, size, _display_variable(name)))
            else:
                scope = None
        return sorted(out)

    def lines(self, pcs):
        """{pc: (file, line, function)} for return addresses pc in this module (the call or
        access just before pc); unknown ones map to None."""
        base = self.base()
        todo = [pc for pc in set(pcs) if pc and pc not in self._lines]
        tool = shutil.which("addr2line")
        if todo and tool:
            args = [tool, "-e", self.path, "-f", "-i", "-C", "-a"] + [hex(pc - 1 - base) for pc in todo]
            out = subprocess.run(args, capture_output=True, text=True).stdout.splitlines()
            frames, current = {}, None
            i = 0
            while i < len(out):
                if out[i].startswith("0x") and (i + 1 >= len(out) or not out[i].endswith(":")):
                    current = int(out[i], 16)
                    frames[current] = []
                    i += 1
                    continue
                if current is not None and i + 1 < len(out):
                    frames[current].append((out[i], out[i + 1]))
                i += 2
            for pc in todo:
                self._lines[pc] = _pick_frame(frames.get(pc - 1 - base, []))
        return {pc: self._lines.get(pc) for pc in pcs}


def _display_variable(name):
    """'k1::tile' -> "'tile' (in k1)"; 'tile_loop<float, 16>(int)::As' -> "'As' (in tile_loop)";
    'glob' -> "'glob'"."""
    head, sep, var = name.rpartition("::")
    if not sep:
        return f"'{name}'"
    for bracket in "<(":   # a template's arguments, a function's parameters
        head = head.split(bracket, 1)[0] or head
    return f"'{var}' (in {head})"


_REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep
_HEADER_FILES = re.compile(r"(^|/)(emu/include/|<emulator entry points>)")


def _pick_frame(frames):
    """The innermost inline frame that is the kernel's own code, not the emulator's headers."""
    for function, location in frames:
        file, _, line = location.rpartition(":")
        line = line.split()[0] if line else ""
        if not file or file == "??" or not line.isdigit() or _HEADER_FILES.search(file):
            continue
        while file.startswith("./"):   # compiled with -fdebug-prefix-map=<cwd>=.
            file = file[2:]
        if file.startswith(_REPOSITORY):   # KERNELS_EMU_DEBUG=gdb builds name files absolutely
            file = file[len(_REPOSITORY):]
        return file, int(line), function
    return None


# ---------------------------------------------------------------------------------- messages
_KINDS = {_OUT_OF_BOUNDS: "out-of-bounds", _MISALIGNED: "misaligned", _OTHER_LOCAL: "another thread's local memory",
          _RAW: "read-after-write", _WAR: "write-after-read", _WAW: "write-after-write",
          _ASYNC_PENDING: "async copy not waited for", _UNINITIALIZED: "uninitialized",
          _BARRIER_EXITED: "barrier after exit", _MASK_EXITED: "mask names an exited lane",
          _MASK_ABSENT: "mask names an absent lane", _BAD_ASYNC_COPY: "invalid async copy"}
_CLASSES = {1: MemcheckError, 2: RacecheckError, 4: InitcheckError, 8: SynccheckError}
_VERBS = {_READ: "reads", _WRITE: "writes", _ATOMIC: "atomically updates", _ASYNC: "async-copies into"}
_NOUNS = {_READ: "read", _WRITE: "write", _ATOMIC: "atomic update", _ASYNC: "async copy"}


def _triple(v):
    return tuple(int(x) for x in v)


def _who(access, same_block_as=None):
    t = _triple(access.thread)
    if same_block_as is not None and _triple(access.block) == _triple(same_block_as.block):
        return f"thread {t}"
    return f"block {_triple(access.block)} thread {t}"


def _at(site):
    return f"{site[0]}:{site[1]}" if site else "an unknown line (build with binutils for lines)"


class RegionInfo:
    """What the message calls one region of a launch."""

    def __init__(self, kind, name, array=None, begin=0, size=0):
        self.kind, self.name, self.array, self.begin, self.size = kind, name, array, begin, size

    def where(self, offset, width=1):
        """'N bytes past the end of <name>' / 'byte N of <name>' ..."""
        a = self.array
        if offset < 0:
            return f"{-offset} byte(s) before the start of {self.name}"
        if offset >= self.size:
            past = f"{offset - self.size} byte(s) past the end of {self.name}"
            if a is not None:
                past += f" (element {offset // a.itemsize} of {a.size})"
            return past
        if a is not None:
            return f"{self.name}, byte {offset} (element {offset // a.itemsize})"
        return f"{self.name}, byte {offset}"


def make_error(kernel, finding, regions, lines, schedule, block_dims):
    """The SanitizerError for one emu_finding.  regions: [RegionInfo] parallel to the launch's
    regions; lines(pcs) -> {pc: (file, line, function)}; schedule: '' or its description;
    block_dims: the launch's (x, y, z) block, for warps and lanes."""

    def linear(access):
        t = access.thread
        return int(t[0]) + block_dims[0] * (int(t[1]) + block_dims[1] * int(t[2]))

    what, check = finding.what, finding.check
    acc, other = finding.access, finding.other
    pcs = [acc.pc] + ([other.pc] if finding.has_other else [])
    sites = lines(pcs) if check != 8 else {}
    site = sites.get(acc.pc)
    other_site = sites.get(other.pc) if finding.has_other else None
    region = regions[finding.region] if 0 <= finding.region < len(regions) else None
    target = region.where(finding.offset, acc.size) if region else f"address 0x{finding.address:x}"
    kind = _KINDS.get(what, "finding")
    who = _who(acc)
    details = dict(kernel=kernel, kind=kind, block=_triple(acc.block), thread=_triple(acc.thread),
                   target=region.name if region else None, offset=int(finding.offset) if region else None)
    if site:
        details.update(file=site[0], line=site[1])
    if finding.has_other:
        details.update(other_block=_triple(other.block), other_thread=_triple(other.thread))
        if other_site:
            details.update(other_file=other_site[0], other_line=other_site[1])
    noun = _NOUNS.get(acc.kind, "access")

    if what == _OUT_OF_BOUNDS and finding.address < _NULL_PAGE:
        details.update(target=None, offset=None)
        text = (f"memcheck: {noun} of {acc.size} byte(s) in kernel '{kernel}' at {_at(site)}, {who}: address "
                f"0x{finding.address:x} is a null pointer (or an offset from one)")
    elif what == _OUT_OF_BOUNDS:
        text = (f"memcheck: out-of-bounds {noun} of {acc.size} byte(s) in kernel '{kernel}' at {_at(site)}, {who}: "
                f"{target}" if region else
                f"memcheck: {noun} of {acc.size} byte(s) in kernel '{kernel}' at {_at(site)}, {who}: address "
                f"0x{finding.address:x} is in no argument array, __shared__ variable or local memory")
    elif what == _MISALIGNED:
        text = (f"memcheck: misaligned {acc.size}-byte {noun} in kernel '{kernel}' at {_at(site)}, {who}: address "
                f"0x{finding.address:x} ({target}) is {finding.address % acc.size} byte(s) past a {acc.size}-byte "
                f"boundary; a GPU stops the kernel with 'misaligned address'")
    elif what == _OTHER_LOCAL:
        text = (f"memcheck: {noun} of another thread's local memory in kernel '{kernel}' at {_at(site)}, {who}: "
                f"local variables (and arrays) are private to their thread on a GPU")
    elif what == _BAD_ASYNC_COPY:
        text = (f"memcheck: invalid __pipeline_memcpy_async in kernel '{kernel}' at {_at(site)}, {who}: it copies "
                f"4, 8 or 16 bytes from global to shared memory, both addresses aligned to the size (here "
                f"{acc.size} bytes to address 0x{finding.address:x})")
    elif what in (_RAW, _WAR, _WAW):
        theirs = _who(other, acc)
        if what == _RAW:
            deed = f"{who} reads {acc.size} byte(s) at {_at(site)} that {theirs} wrote at {_at(other_site)}"
        elif what == _WAR:
            deed = (f"{who} {_VERBS.get(acc.kind, 'writes')} {acc.size} byte(s) at {_at(site)} that {theirs} read "
                    f"at {_at(other_site)}")
        else:
            deed = (f"{who} {_VERBS.get(acc.kind, 'writes')} {acc.size} byte(s) at {_at(site)} that {theirs} also "
                    f"wrote at {_at(other_site)}")
        if _triple(acc.block) != _triple(other.block):
            why = ("threads of different blocks are ordered only through atomics (the writer: __threadfence() "
                   "then an atomic; the reader: an atomic first), so use an atomic or a second launch")
        elif linear(acc) // 32 == linear(other) // 32:
            why = "lanes of one warp are not in step since Volta: put a __syncwarp() (or __syncthreads()) between"
        else:
            why = "put a __syncthreads() between them"
        text = f"racecheck: {kind} hazard in kernel '{kernel}' on {target}: {deed}; {why}"
    elif what == _ASYNC_PENDING:
        text = (f"racecheck: {who} {_VERBS.get(acc.kind, 'reads')} {acc.size} byte(s) of {target} at {_at(site)} "
                f"before the async copy {_who(other, acc)} issued at {_at(other_site)} has landed: "
                f"__pipeline_commit() and __pipeline_wait_prior() in the copying thread must cover it first, "
                f"and a __syncthreads() after that if another thread reads it (kernel '{kernel}')")
    elif what == _UNINITIALIZED:
        shared = region is not None and region.kind != _REGION_ARGUMENT
        why = ("no thread of this block wrote them first, and shared memory starts undefined on a GPU" if shared
               else "no thread wrote them in this launch, and the array was never initialised (mark_uninitialized)")
        text = (f"initcheck: {who} reads {acc.size} uninitialised byte(s) at {_at(site)} in kernel '{kernel}': "
                f"{target}; {why}")
    else:
        file = finding.file.decode(errors="replace") if finding.file else "?"
        details.update(file=file, line=int(finding.line))
        at = f"{file}:{finding.line}"
        if what == _BARRIER_EXITED:
            text = (f"synccheck: the __syncthreads() at {at} in kernel '{kernel}' releases {who} and the other "
                    f"waiting threads of block {_triple(acc.block)} while thread {_triple(other.thread)} has "
                    f"already returned: every thread of a block must reach every barrier (return after it)")
        else:
            lane = linear(other) % 32 if finding.has_other else -1
            state = "has already returned" if what == _MASK_EXITED else "does not exist (the block is smaller)"
            text = (f"synccheck: the warp collective at {at} in kernel '{kernel}', {who}, has mask "
                    f"0x{finding.mask:08x}, but lane {lane} of it {state}: name only the lanes that take part")
    if schedule:
        text += f" [KERNELS_EMU_SCHEDULE={schedule}]"
    return _CLASSES.get(check, MemcheckError)(text, **details)
