"""`kernels.profile()`: what Nsight Compute would say about a kernel's memory accesses, on the CPU.

    with kernels.profile() as prof:
        reduce.sum(x)                      # any emulator launches
    prof.table()                           # one row per launch
    p = prof.launches[0]                   # a LaunchProfile
    p.metrics["l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"]
    p.derived["global_ld_sectors_per_request"]
    p.source_table()                       # the same counts per source line

Every emulator launch inside the block runs the kernel's instrumented build (the sanitizer's,
see kernels/README.md) and counts, per warp-level request, the 32-byte sectors of global memory
and the wavefronts of shared memory it needs (kernels/emu/profiler.cpp says exactly how).  The
metrics carry Nsight Compute's names, so what you learn to read here reads the same on a GPU:

    smsp__inst_executed_op_global_ld.sum    warp-level global load instructions (requests)
    l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum   32-byte sectors those requests touch
    smsp__inst_executed_op_shared_ld.sum    warp-level shared-memory loads
    l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum   passes through the 32 banks they need
    l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum   wavefronts beyond the ideal
    dram__bytes_read.sum                    ESTIMATED: distinct sectors read x 32 (a perfect L2)
    (and the same for stores (_st), global atomics (_atom), dram__bytes_write.sum)

`derived` holds the ratios a learner reads first: sectors per request (4 for a coalesced float
load, 32 when every lane hits its own sector), global load/store efficiency (bytes the lanes
asked for / bytes in the sectors moved; 100 % is perfect) and shared wavefronts per request
(1 for a conflict-free float access, 32 for a 32-way conflict).

On a GPU (CuPy arrays) launches are not profiled here: use Nsight Compute there
(`ncu --metrics <the names above> python ...`).  Timing is not modelled: these are counts.
"""

import ctypes
import sys
import threading

import numpy as np

from . import sanitizer as _san

__all__ = ["profile", "Profile", "LaunchProfile", "METRICS", "ESTIMATED"]

_OPS = ("ld", "st", "atom")

# Nsight Compute's names, what each counts here
METRICS = {
    "smsp__inst_executed_op_global_ld.sum": "global load instructions, one per warp (requests)",
    "smsp__inst_executed_op_global_st.sum": "global store instructions, one per warp (requests)",
    "smsp__inst_executed_op_global_atom.sum": "global atomic instructions, one per warp (requests)",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum": "32-byte sectors the global loads touch",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum": "32-byte sectors the global stores touch",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_atom.sum": "32-byte sectors the global atomics touch",
    "smsp__inst_executed_op_shared_ld.sum": "shared-memory load instructions, one per warp",
    "smsp__inst_executed_op_shared_st.sum": "shared-memory store instructions, one per warp",
    "smsp__inst_executed_op_shared_atom.sum": "shared-memory atomic instructions, one per warp",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum": "passes through the 32 banks the shared loads need",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum": "passes through the 32 banks the shared stores need",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum": "shared-load wavefronts beyond the conflict-free ideal",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum": "shared-store wavefronts beyond the conflict-free ideal",
    "dram__bytes_read.sum": "ESTIMATED: 32 x the distinct sectors of the argument arrays read (a perfect L2)",
    "dram__bytes_write.sum": "ESTIMATED: 32 x the distinct sectors of the argument arrays written",
}
ESTIMATED = frozenset({"dram__bytes_read.sum", "dram__bytes_write.sum"})


class _Totals(ctypes.Structure):     # emu_profile in emu/include/emu_abi.h
    _fields_ = [("global_requests", ctypes.c_ulonglong * 3), ("global_sectors", ctypes.c_ulonglong * 3),
                ("global_bytes", ctypes.c_ulonglong * 3), ("shared_requests", ctypes.c_ulonglong * 3),
                ("shared_wavefronts", ctypes.c_ulonglong * 3), ("shared_ideal", ctypes.c_ulonglong * 3),
                ("shared_bytes", ctypes.c_ulonglong * 3), ("dram_sectors_read", ctypes.c_ulonglong),
                ("dram_sectors_written", ctypes.c_ulonglong), ("outside_arguments", ctypes.c_ulonglong),
                ("cut_phases", ctypes.c_ulonglong), ("nsites", ctypes.c_int)]


class _Site(ctypes.Structure):       # emu_profile_site
    _fields_ = [("pc", ctypes.c_ulonglong), ("space", ctypes.c_int), ("kind", ctypes.c_int), ("size", ctypes.c_int),
                ("pad", ctypes.c_int), ("requests", ctypes.c_ulonglong), ("units", ctypes.c_ulonglong),
                ("ideal", ctypes.c_ulonglong), ("bytes", ctypes.c_ulonglong), ("lanes", ctypes.c_ulonglong),
                ("warps", ctypes.c_ulonglong)]


def _ratio(a, b):
    return a / b if b else None


def _derive(m, requested):
    """The derived figures of a metrics dict; requested: {'ld': bytes, 'st': bytes} asked for."""
    d = {}
    for op in ("ld", "st"):
        req = m[f"smsp__inst_executed_op_global_{op}.sum"]
        sectors = m[f"l1tex__t_sectors_pipe_lsu_mem_global_op_{op}.sum"]
        d[f"global_{op}_sectors_per_request"] = _ratio(sectors, req)
        eff = _ratio(requested[op], 32 * sectors)
        d[f"global_{op}_efficiency"] = None if eff is None else 100.0 * eff
        d[f"shared_{op}_wavefronts_per_request"] = _ratio(m[f"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_{op}.sum"],
                                                          m[f"smsp__inst_executed_op_shared_{op}.sum"])
    return d


class LaunchProfile:
    """One profiled launch.

    kernel, file: the kernel's name and source; grid, block: 3-tuples; shared_mem: dynamic bytes.
    metrics:  {Nsight Compute metric name: int} (see METRICS; ESTIMATED ones are estimates).
    requested_bytes: {'ld': .., 'st': .., 'atom': ..} distinct bytes the lanes of each global
              request asked for, summed (the numerator of the efficiencies).
    derived:  sectors per request, efficiency in %, shared wavefronts per request (None: no such
              access).
    outside_arguments: global accesses to memory that is no argument array (not in the DRAM
              estimate; a kernel reading a host pointer it was not passed, say).
    function: the kernel launched (for kernels.resources(launch.function, arch)).
    arguments: one dict per array argument: index (in the launch's arguments), bytes (its
              size), read_bytes and written_bytes (32 x the distinct sectors of it the launch read
              and wrote; an argument sharing memory with another gets their span's figures).
    atomics:  {'ops': lane-level global atomics, 'addresses': distinct addresses they hit,
              'most': the most atomics on one address}: what serialises on a GPU.
    """

    def __init__(self, kernel, file, grid, block, shared_mem, totals, sites, symbols, function=None,
                 arguments=(), atomics=None):
        self.kernel, self.file, self.function = kernel, file, function
        self.grid, self.block, self.shared_mem = tuple(grid), tuple(block), int(shared_mem)
        t = totals
        m = {}
        for k, op in enumerate(_OPS):
            m[f"smsp__inst_executed_op_global_{op}.sum"] = int(t.global_requests[k])
            m[f"l1tex__t_sectors_pipe_lsu_mem_global_op_{op}.sum"] = int(t.global_sectors[k])
            m[f"smsp__inst_executed_op_shared_{op}.sum"] = int(t.shared_requests[k])
        for k, op in enumerate(_OPS[:2]):
            m[f"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_{op}.sum"] = int(t.shared_wavefronts[k])
            m[f"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_{op}.sum"] = int(t.shared_wavefronts[k] -
                                                                                 t.shared_ideal[k])
        m["dram__bytes_read.sum"] = 32 * int(t.dram_sectors_read)
        m["dram__bytes_write.sum"] = 32 * int(t.dram_sectors_written)
        self.metrics = {name: m[name] for name in METRICS}
        self.requested_bytes = {op: int(t.global_bytes[k]) for k, op in enumerate(_OPS)}
        self.derived = _derive(self.metrics, self.requested_bytes)
        self.outside_arguments = int(t.outside_arguments)
        self.cut_phases = int(t.cut_phases)
        self.arguments = list(arguments)
        self.atomics = dict(atomics or {"ops": 0, "addresses": 0, "most": 0})
        self._sites = sites
        self._symbols = symbols
        self._resolved = None

    def sites(self):
        """The counts per source line: one dict per (file, line, memory space, op) that ran,
        summing the machine instructions of that line (`buf[i] += buf[i + s]` loads twice):
        file, line, function, space ('global'/'shared'), op ('ld'/'st'/'atom'), size (bytes per
        lane, the largest), instructions (static sites), requests, lanes (active lanes, summed),
        warps (distinct warps of the launch that ran it; the most of the line's instructions),
        sectors (global) or wavefronts, ideal and conflicts (shared), bytes (distinct bytes
        asked for), per_request, efficiency (global, %).  Sorted by file and line."""
        if self._resolved is None:
            where = self._symbols.lines([s["pc"] for s in self._sites]) if self._symbols else {}
            merged = {}
            for s in self._sites:
                file, line, function = where.get(s["pc"]) or ("?", 0, "?")
                key = (file, line, s["space"], s["op"])
                m = merged.get(key)
                if m is None:
                    merged[key] = m = {"file": file, "line": line, "function": function, "space": s["space"],
                                       "op": s["op"], "size": 0, "instructions": 0}
                m["size"] = max(m["size"], s["size"])
                m["instructions"] += 1
                for k in ("requests", "lanes", "bytes", "sectors", "wavefronts", "ideal"):
                    if k in s:
                        m[k] = m.get(k, 0) + s[k]
                m["warps"] = max(m.get("warps", 0), s.get("warps", 0))
            out = [_site_figures(m) for m in merged.values()]
            out.sort(key=lambda s: (s["file"], s["line"], s["space"], s["op"]))
            self._resolved = out
        return self._resolved

    def source_table(self, file=None):
        """Print the per-site counts (Nsight Compute's source view, in text) to file (stdout)."""
        print(format_sites(self.sites()), file=file or sys.stdout)

    def __repr__(self):
        return f"<LaunchProfile {self.kernel} grid={self.grid} block={self.block}>"


def _site_dict(s):
    """One emu_profile_site as a dict (pc, space, op, size, requests, lanes, bytes, sectors or
    wavefronts and ideal)."""
    space = "global" if s.space == 0 else "shared"
    op = _OPS[s.kind] if 0 <= s.kind < 3 else "ld"
    d = {"pc": int(s.pc), "space": space, "op": op, "size": int(s.size), "requests": int(s.requests),
         "lanes": int(s.lanes), "bytes": int(s.bytes), "warps": int(s.warps)}
    if space == "global":
        d["sectors"] = int(s.units)
    else:
        d["wavefronts"] = int(s.units)
        d["ideal"] = int(s.ideal)
    return d


def _site_figures(d):
    """Add per_request, efficiency (global) or conflicts (shared) to a site's counts."""
    if d["space"] == "global":
        d["per_request"] = _ratio(d["sectors"], d["requests"])
        eff = _ratio(d["bytes"], 32 * d["sectors"])
        d["efficiency"] = None if eff is None else 100.0 * eff
    else:
        d["conflicts"] = d["wavefronts"] - d["ideal"]
        d["per_request"] = _ratio(d["wavefronts"], d["requests"])
    return d


def format_sites(sites):
    """The text of LaunchProfile.source_table()."""
    head = (f"{'source line':<34}{'space':<7}{'op':<5}{'B':>3}{'requests':>10}{'lanes/req':>10}"
            f"{'sect|wf':>10}{'per req':>8}{'eff %':>7}{'confl':>8}")
    lines = [head, "-" * len(head)]
    for s in sites:
        where = f"{s['file']}:{s['line']}"
        if len(where) > 33:
            where = "..." + where[-30:]
        units = s.get("sectors", s.get("wavefronts"))
        eff = f"{s['efficiency']:.0f}" if s.get("efficiency") is not None else ""
        confl = str(s["conflicts"]) if "conflicts" in s else ""
        lanes = s["lanes"] / s["requests"] if s["requests"] else 0
        lines.append(f"{where:<34}{s['space']:<7}{s['op']:<5}{s['size']:>3}{s['requests']:>10}{lanes:>10.1f}"
                     f"{units:>10}{s['per_request'] or 0:>8.2f}{eff:>7}{confl:>8}")
    return "\n".join(lines)


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _dims(t):
    """(64, 1, 1) -> '(64)'; (4, 8, 1) -> '(4,8)'."""
    t = list(t)
    while len(t) > 1 and t[-1] == 1:
        t.pop()
    return "(" + ",".join(map(str, t)) + ")"


def format_launches(launches):
    """The text of Profile.table(): one row per launch."""
    kw = max([6] + [min(len(p.kernel), 32) for p in launches]) + 1
    gw = max([4] + [len(_dims(p.grid)) for p in launches]) + 1
    bw = max([5] + [len(_dims(p.block)) for p in launches]) + 1
    head = (f"{'kernel':<{kw}}{'grid':>{gw}}{'block':>{bw}}{'smem':>6} | {'gld req':>8}{'sec/req':>8}{'eff%':>5}"
            f" | {'gst req':>8}{'sec/req':>8}{'eff%':>5} | {'atom req':>8} | {'sld req':>8}{'wf/req':>7}{'confl':>7}"
            f" | {'sst req':>8}{'wf/req':>7}{'confl':>7} | {'dram rd':>8}{'dram wr':>8}")
    lines = [head, "-" * len(head)]
    for p in launches:
        m, d = p.metrics, p.derived
        lines.append(
            f"{p.kernel[:kw - 1]:<{kw}}{_dims(p.grid):>{gw}}{_dims(p.block):>{bw}}{p.shared_mem:>6} | "
            f"{m['smsp__inst_executed_op_global_ld.sum']:>8}{_fmt(d['global_ld_sectors_per_request'], '.2f'):>8}"
            f"{_fmt(d['global_ld_efficiency'], '.0f'):>5} | "
            f"{m['smsp__inst_executed_op_global_st.sum']:>8}{_fmt(d['global_st_sectors_per_request'], '.2f'):>8}"
            f"{_fmt(d['global_st_efficiency'], '.0f'):>5} | "
            f"{m['smsp__inst_executed_op_global_atom.sum']:>8} | "
            f"{m['smsp__inst_executed_op_shared_ld.sum']:>8}{_fmt(d['shared_ld_wavefronts_per_request'], '.2f'):>7}"
            f"{m['l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum']:>7} | "
            f"{m['smsp__inst_executed_op_shared_st.sum']:>8}{_fmt(d['shared_st_wavefronts_per_request'], '.2f'):>7}"
            f"{m['l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum']:>7} | "
            f"{_bytes(m['dram__bytes_read.sum']):>8}{_bytes(m['dram__bytes_write.sum']):>8}")
    lines.append("(gld/gst/atom: global loads/stores/atomics, sld/sst: shared; req: warp-level requests; sec/req: "
                 "32-byte sectors per request;\n eff%: bytes asked for / bytes moved; wf/req: shared wavefronts per "
                 "request; confl: bank-conflict wavefronts; dram: estimated, distinct sectors)")
    return "\n".join(lines)


def _bytes(n):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


class Profile:
    """The launches recorded inside one `kernels.profile()` block (`launches`, in order)."""

    def __init__(self):
        self.launches = []

    def table(self, file=None):
        """Print one row per launch (to stdout, or file)."""
        print(format_launches(self.launches), file=file or sys.stdout)

    def by_kernel(self):
        """{kernel name: {metric: sum over its launches}} (metrics and requested bytes)."""
        out = {}
        for p in self.launches:
            acc = out.setdefault(p.kernel, dict.fromkeys(METRICS, 0) | {"launches": 0})
            acc["launches"] += 1
            for k, v in p.metrics.items():
                acc[k] += v
        return out

    def total(self):
        """(metrics summed over every launch, requested bytes summed, derived figures of the sums)."""
        m = dict.fromkeys(METRICS, 0)
        req = dict.fromkeys(_OPS, 0)
        for p in self.launches:
            for k, v in p.metrics.items():
                m[k] += v
            for k, v in p.requested_bytes.items():
                req[k] += v
        return m, req, _derive(m, req)


class _Local(threading.local):
    active = ()   # the Profile objects of the profile() blocks open in this thread


_local = _Local()


class profile:
    """Context manager: profile every emulator launch of this thread inside the block.

        with kernels.profile() as prof:
            k(grid, block, args)
        prof.table()

    Nested blocks each record the launches inside them.  Works with kernels.sanitize() and
    KERNELS_EMU_SANITIZE (both use the same instrumented build).
    """

    def __enter__(self):
        self.profile = Profile()
        _local.active = _local.active + (self.profile,)
        _san._local.stack = _san._local.stack + (_san._PROFILING,)
        return self.profile

    def __exit__(self, *exc):
        _local.active = tuple(p for p in _local.active if p is not self.profile)
        stack = list(_san._local.stack)
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _san._PROFILING:
                del stack[i]
                break
        _san._local.stack = tuple(stack)
        return False


def _arguments(rt, values, pointers):
    """The per-argument touched bytes of the last launch (LaunchProfile.arguments); pointers:
    where each argument's data was during the launch (a debug launch's guarded copy)."""
    if not hasattr(rt, "_profile_spans_bound"):
        rt.emu_profile_spans.argtypes = [ctypes.c_void_p, ctypes.c_int]
        rt.emu_profile_spans.restype = ctypes.c_int
        rt.emu_profile_atomics.argtypes = [ctypes.c_void_p]
        rt._profile_spans_bound = True
    n = rt.emu_profile_spans(None, 0)
    raw = (ctypes.c_ulonglong * max(4, 4 * n))()
    rt.emu_profile_spans(ctypes.byref(raw), n)
    spans = [tuple(raw[4 * i:4 * i + 4]) for i in range(n)]
    out = []
    for index, (v, ptr) in enumerate(zip(values or (), pointers or ())):
        if not isinstance(v, np.ndarray) or not v.nbytes or not ptr:
            continue
        span = next((s for s in spans if s[0] <= ptr < s[1]), None)
        read, written = (32 * span[2], 32 * span[3]) if span else (0, 0)
        out.append({"index": index, "bytes": int(v.nbytes), "read_bytes": int(read), "written_bytes": int(written)})
    return out


def _atomics(rt):
    raw = (ctypes.c_ulonglong * 3)()
    rt.emu_profile_atomics(ctypes.byref(raw))
    return {"ops": int(raw[0]), "addresses": int(raw[1]), "most": int(raw[2])}


def record(rt, fn, binding, grid, block, shared_mem, values=None, pointers=None):
    """Called by the emulator after a profiled launch: read the runtime's counts into every
    open profile() block of this thread."""
    active = _local.active
    if not active:
        return
    totals = _Totals()
    rt.emu_last_profile(ctypes.byref(totals))
    n = rt.emu_profile_sites(None, 0)
    raw = (_Site * max(1, n))()
    rt.emu_profile_sites(ctypes.byref(raw), n)
    sites = [_site_dict(raw[i]) for i in range(n)]
    launch = LaunchProfile(fn.name, fn.module.filename, grid, block, shared_mem, totals, sites, binding.symbols(),
                           function=fn, arguments=_arguments(rt, values, pointers), atomics=_atomics(rt))
    for p in active:
        p.launches.append(launch)
