"""What NVRTC's PTX says about a kernel's instructions, for the performance model.

The emulator counts memory accesses exactly, but it runs the kernel as C++ on the CPU: it cannot
say how many instructions a GPU executes, whether a loop was unrolled, or how many loads a warp
has in flight.  The PTX that NVRTC makes for the GPU says all three.  `kernel_code(kernel, arch)`
compiles the kernel's module (cached like kernels.resources) and reads, for every loop of the
kernel (and for the code outside loops):

  cost      issue slots per trip of the loop, split by the unit that executes them (UNITS; see
            instruction_cost): one PTX instruction is one machine instruction, except the few
            that expand (a 64-bit integer add is two, a 32-bit integer division about 14: "below
            20 instructions", NVIDIA's Nsight documentation on integer division; an IEEE float
            division or square root a reciprocal estimate, a few FMAs and a check that branches to
            a slow path).  A 64-bit division that LLVM guards with a 32-bit fast path (the
            `and.b64 x, -4294967296` test) is counted as the fast path: ResNet-50's indices fit.
  period    cycles one warp needs per trip when it runs alone (`trip_cycles(...)`): the
            instructions issue in order, one per cycle, each waiting for its operands (4 cycles
            per arithmetic result, a shared-memory load ~30, a global load the memory latency the
            caller gives); loads may issue ahead of earlier stalled instructions, as ptxas
            schedules them (a non-`.nc` global load not ahead of an earlier store).  So a loop
            body with four independent loads (an unrolled loop) waits one latency for all four,
            one whose loads feed each other waits twice.
  keys      the (file, line, space, op) of its memory instructions and how many requests of each
            one trip makes: how the loop's trips are counted from the emulator's per-line
            requests (kernels.profile(): `LaunchProfile.sites()`).  A CUDA header's function
            inlined into ours (wmma::load_matrix_sync, from crt/mma.hpp) counts at our line that
            called it (the PTX's `inlined_at`), as the emulator counts it.

Loops are the natural loops of the control-flow graph (an edge to a block that dominates its
source closes one; not the layout: LLVM lays a loop's cold blocks out before it, and their
branches back into the body are not loops).  The loops side by side that hold copies of the same
memory lines are one source loop as LLVM unrolled it (a main loop of k copies and a remainder
loop of one: `SourceLoop`).  Short forward branches, and both sides of a short if-else, are
predicated by ptxas: they cost no branch.  `KernelCode.live_part` leaves out of a loop's trip
the blocks a profiled launch never ran (a branch on a vector path, a stride), by their memory
lines the emulator never counted.
"""

import os
import re
import tempfile
import threading
from dataclasses import dataclass, field

from . import nvrtc
from .raw import display_path
from ..emu.occupancy_calculator import architecture

__all__ = ["kernel_code", "module_code", "KernelCode", "PtxLoop", "SourceLoop", "UNITS"]

UNITS = ("fp32", "imad", "alu", "mufu", "conv", "shfl", "mem", "tensor", "other")
ALU_LATENCY = 4           # cycles from issue to result of a dependent arithmetic instruction
SHARED_LATENCY = 30       # cycles of a shared-memory load
MUFU_LATENCY = 20         # special-function unit (reciprocal, square root estimate, exp2)
SHFL_LATENCY = 24         # a warp shuffle
BARRIER_CYCLES = 20       # __syncthreads() with every warp arriving together


# ------------------------------------------------------------------------------------- parsing
@dataclass
class Instr:
    text: str
    opcode: str                       # "ld.global.nc.f32"
    parts: tuple                      # ("ld", "global", "nc", "f32")
    dests: tuple
    srcs: tuple
    guard: str = ""                   # "%p1" of "@%p1 bra ..."
    target: str = ""                  # branch label
    loc: tuple = None                 # (file, line) or None
    slow_path: bool = False           # inside LLVM's 64-bit division slow path
    predicated: bool = False          # a branch over a few instructions: ptxas predicates them


@dataclass
class _Block:
    label: str
    instrs: list = field(default_factory=list)


_REG = re.compile(r"%[A-Za-z_][\w]*")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+")
_INLINED_AT = re.compile(r"inlined_at\s+(\d+)\s+(\d+)\s+\d+")
_LABEL = re.compile(r"^\s*(\$?[\w$]+):\s*$")
_ENTRY = re.compile(r"\.entry\s+([\w$]+)\s*\(")
_STORE_LIKE = {"st", "red", "bar", "cp", "membar", "fence", "wmma_store"}


def _split_operands(s):
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _parse_instr(text, loc):
    s = text.strip().rstrip(";").strip()
    guard = ""
    m = re.match(r"@(!?%\w+)\s+(.*)", s)
    if m:
        guard, s = m.group(1).lstrip("!"), m.group(2)
    head, _, rest = s.partition(" ")
    rest = rest.strip()
    parts = tuple(head.split("."))
    ops = _split_operands(rest) if rest else []
    base = parts[0]
    target = ""
    if base == "bra":
        target = ops[0] if ops else ""
        return Instr(text, head, parts, (), (guard,) if guard else (), guard, target, loc)
    stores = base in ("st", "red") or (base == "wmma" and len(parts) > 1 and parts[1] == "store") or \
        (base == "cp" and "async" in parts and "shared" in parts)
    no_dest = stores or base in ("bar", "ret", "exit", "membar", "fence") or \
        (base == "cp" and "async" in parts)
    if no_dest or not ops:
        dests, src_ops = (), ops
    else:
        dests = tuple(_REG.findall(ops[0].split("|")[0])) + tuple(
            r for extra in ops[0].split("|")[1:] for r in _REG.findall(extra))
        src_ops = ops[1:]
    srcs = tuple(r for op in src_ops for r in _REG.findall(op))
    if guard:
        srcs += (guard,)
    return Instr(text, head, parts, dests, srcs, guard, target, loc)


def _parse_module(ptx):
    """{entry name: [ _Block ]} of a PTX module; locations as (display path, line)."""
    files = {}
    for line in ptx.splitlines():
        m = _FILE.match(line)
        if m:
            files[m.group(1)] = display_path(m.group(2))
    entries = {}
    lines = ptx.splitlines()
    i = 0
    while i < len(lines):
        m = _ENTRY.search(lines[i])
        if not m:
            i += 1
            continue
        name = m.group(1)
        while i < len(lines) and lines[i].strip() != "{":
            i += 1
        i += 1
        blocks = [_Block("entry")]
        loc = None
        depth = 0
        while i < len(lines):
            raw_line = lines[i]
            line = raw_line.split("//")[0].rstrip()
            i += 1
            stripped = line.strip()
            if depth == 0 and stripped == "}":
                break
            if not stripped:
                continue
            lm = _LOC.match(line)
            if lm:
                f, ln = files.get(lm.group(1), lm.group(1)), int(lm.group(2))
                at = _INLINED_AT.search(raw_line)
                if at and os.path.isabs(f):
                    # a CUDA header's function (wmma::load_matrix_sync, __float2half) inlined
                    # into ours: the emulator counts its accesses at our line that called it
                    f, ln = files.get(at.group(1), at.group(1)), int(at.group(2))
                loc = (f, ln) if ln else None
                continue
            lab = _LABEL.match(line)
            if lab:
                blocks.append(_Block(lab.group(1)))
                continue
            if stripped.startswith("."):        # .reg, .shared, .pragma, ...
                continue
            # inline asm: "{  cvt.f32.f16 %f1, %rs1;}" or a braced group over lines
            body = stripped
            if body.startswith("{"):
                depth += 1
                body = body[1:]
            closing = body.endswith("}")
            if closing:
                depth = max(0, depth - 1)
                body = body[:-1]
            for piece in body.split(";"):
                piece = piece.strip()
                if not piece or piece.startswith(".reg") or piece.startswith("."):
                    continue
                ins = _parse_instr(piece, loc)
                blocks[-1].instrs.append(ins)
                if ins.parts[0] in ("bra", "ret", "exit"):
                    blocks.append(_Block(f"_after{len(blocks)}"))
        entries[name] = [b for b in blocks if b.instrs or not b.label.startswith("_after")]
    return entries


IF_CONVERSION_LIMIT = 7
"""A conditional branch over at most this many instructions becomes predicated instructions (no
branch): the CUDA C++ Programming Guide on branch predication ("only if the number of
instructions controlled by the branch condition is less or equal to a certain threshold")."""


def _mark_predicated_branches(blocks):
    """Mark the forward branches over at most IF_CONVERSION_LIMIT instructions: ptxas predicates
    what they skip and drops the branch (an if-else's two sides: a conditional branch over the
    `else`, whose unconditional branch over the `then` goes too)."""
    index = {b.label: k for k, b in enumerate(blocks)}

    def skipped(k, br):
        return [x for blk in blocks[k + 1:index[br.target]] for x in blk.instrs]

    for guarded in (False, True):
        for k, b in enumerate(blocks):
            if not b.instrs:
                continue
            br = b.instrs[-1]
            if br.parts[0] != "bra" or bool(br.guard) != guarded or br.target not in index or index[br.target] <= k:
                continue
            over = skipped(k, br)
            work = [x for x in over if not (x.parts[0] == "bra" and x.predicated)]
            if len(work) <= IF_CONVERSION_LIMIT and not any(
                    x.parts[0] in ("bra", "bar", "ret", "exit", "call") for x in work):
                br.predicated = True


def _mark_division_slow_paths(blocks):
    """LLVM guards a 64-bit division with `or; and.b64 x, -4294967296; setp.eq; @p bra FAST`: the
    block right after that branch is the 64-bit slow path, taken only for operands >= 2^32."""
    for k, b in enumerate(blocks):
        ins = b.instrs
        if len(ins) >= 3 and ins[-1].parts[0] == "bra" and ins[-1].guard and \
                any(x.parts[0] == "and" and x.text.rstrip(";").endswith("-4294967296") for x in ins[-4:]):
            if k + 1 < len(blocks):
                for x in blocks[k + 1].instrs:
                    x.slow_path = True


# --------------------------------------------------------------------------------- costs
def _type(parts):
    for p in reversed(parts):
        if p[:1] in "subf" and p[1:].isdigit() or p in ("pred", "f16x2", "bf16x2"):
            return p
    return ""


def _u(**units):
    return {k: v for k, v in units.items() if v}


# What one PTX instruction becomes in machine code, by unit: 'fp32' the FMA pipes (FP32 add,
# multiply, FMA), 'imad' integer multiply(-add) (on Volta to Hopper it runs on the FMA pipe
# that also does FP32: the "FMA heavy" pipe), 'alu' integer add, logic, shift, compare, select
# and moves, 'conv' conversions to and from integers (16 results per clock per SM), 'mufu' the
# special-function unit (reciprocal, square-root estimate, exp2), 'mem' loads and stores, 'shfl'
# shuffles, 'tensor' matrix products, 'other' branches and barriers.  (NVIDIA engineers on the
# developer forums describe the pipes: "FMA pipe executes FP32 instructions and IMAD", "ALU pipe
# executes INT32 (not IMAD), logical operations"; on GH100 "FMAheavy pipe handles IMAD, IDP, and
# FP32 operations, FMAlite handles FP32".)
_DIV32 = _u(mufu=1, conv=2, imad=5, alu=6)     # an integer division: "below 20 instructions"
_DIVF = _u(mufu=1, fp32=5, alu=1, other=1)     # IEEE x / y: reciprocal estimate, Newton, check + branch
_SQRTF = _u(mufu=1, fp32=5, alu=1, other=1)


def instruction_cost(ins):
    """({unit: issue slots}, result latency in cycles or None for a global load, kind, fence) of
    one PTX instruction.  kind: 'load-global', 'load-shared', 'store', 'barrier' or ''; fence:
    True when the machine code holds a conditional branch (an IEEE division's slow path): ptxas
    schedules within the basic blocks such a branch ends, so nothing after it moves above it."""
    p, base = ins.parts, ins.parts[0]
    t = _type(p)
    wide = t in ("s64", "u64", "b64")
    if ins.slow_path:
        return {}, 0, "", False
    if base == "ld":
        if "param" in p:
            return {}, 0, "", False          # a constant-bank operand in machine code
        if "shared" in p:
            return _u(mem=1), SHARED_LATENCY, "load-shared", False
        return _u(mem=1), None, "load-global", False
    if base in ("st", "red"):
        return _u(mem=1), 0, "store", False
    if base == "atom":
        return _u(mem=1), None, "load-global", False   # returns the old value: a round trip to L2
    if base == "cp":
        if "async" in p and len(p) > 2 and p[2] == "shared":
            return _u(mem=1), 0, "store", False
        return _u(mem=1), 0, "barrier" if ("wait_group" in p or "wait_all" in p) else "", False
    if base == "wmma":
        if "mma" in p:
            return _u(tensor=1), 16, "", False
        # a 16x16 tile of halves: one ldmatrix/stmatrix (.x4); of floats: four 8-byte accesses
        wide_tile = any(x in ("f32", "s32") for x in p)
        return _u(mem=4 if wide_tile else 1), SHARED_LATENCY, ("load-shared" if "load" in p else "store"), False
    if base == "mma":
        return _u(tensor=1), 16, "", False
    if base == "ldmatrix":
        return _u(mem=1), SHARED_LATENCY, "load-shared", False
    if base in ("bar", "barrier"):
        return _u(other=1), BARRIER_CYCLES, "barrier", False
    if base in ("membar", "fence"):
        return _u(other=1), 0, "barrier", False
    if base == "bra" and ins.predicated:
        return {}, 0, "", False              # if-converted: no branch in the machine code
    if base in ("bra", "ret", "exit"):
        return _u(other=1), 0, "", False
    if base == "mov":
        if any(x in ins.text for x in ("%tid", "%ctaid", "%ntid", "%nctaid", "%laneid", "%warpid", "%clock")):
            return _u(alu=1), 24, "", False   # S2R: a special register read
        return {}, 0, "", False               # register moves vanish in ptxas's allocation
    if base == "cvta":
        return {}, 0, "", False
    if base == "shfl":
        return _u(shfl=1), SHFL_LATENCY, "", False
    if base in ("vote", "activemask", "match", "redux"):
        return _u(alu=1), SHFL_LATENCY, "", False
    if base in ("div", "rem"):
        if t.startswith("f"):
            if "approx" in p or "full" in p:
                return _u(mufu=1, fp32=1), MUFU_LATENCY + ALU_LATENCY, "", False
            return dict(_DIVF), MUFU_LATENCY + 5 * ALU_LATENCY, "", True
        cost = dict(_DIV32) if not wide else {k: 3 * v for k, v in _DIV32.items()}
        return cost, 8 * ALU_LATENCY + MUFU_LATENCY, "", False
    if base in ("sqrt", "rcp", "rsqrt"):
        if "approx" in p:
            return _u(mufu=1), MUFU_LATENCY, "", False
        if t == "f64":
            return _u(other=20), 80, "", True
        return dict(_SQRTF), MUFU_LATENCY + 5 * ALU_LATENCY, "", True
    if base in ("ex2", "lg2", "sin", "cos", "tanh"):
        return _u(mufu=1), MUFU_LATENCY, "", False
    if base == "cvt":
        types = [x for x in p[1:] if x[:1] in "subf" and x[1:].isdigit()]
        if len(types) == 2 and all(x[0] != "f" for x in types):
            if int(types[0][1:]) < int(types[1][1:]):
                return {}, 0, "", False                   # narrowing: the low register of the pair
            return _u(alu=1), ALU_LATENCY, "", False      # widening: the high word
        if all(x in ("f16", "bf16", "f32") for x in types):
            return _u(alu=1), ALU_LATENCY, "", False      # float <-> half
        return _u(conv=1), ALU_LATENCY, "", False         # integer <-> float, 64-bit floats
    if t == "f64":
        return _u(other=1), 8, "", False
    if t.startswith("f") or t in ("f16x2", "bf16x2"):
        if base in ("selp", "mov"):
            return _u(alu=1), ALU_LATENCY, "", False
        return _u(fp32=1), ALU_LATENCY, "", False
    if base in ("mul", "mad"):
        if wide and ("lo" in p or base == "mad"):
            return _u(imad=3), 3 * ALU_LATENCY, "", False
        if wide and "hi" in p:
            return _u(imad=4), 4 * ALU_LATENCY, "", False
        return _u(imad=1), ALU_LATENCY, "", False
    if base in ("popc", "clz", "brev", "bfind"):
        return _u(conv=1), ALU_LATENCY, "", False
    if wide and base in ("add", "sub", "and", "or", "xor", "not", "neg", "shl", "shr", "min", "max", "setp",
                         "selp", "abs"):
        return _u(alu=2), 2 * ALU_LATENCY, "", False
    return _u(alu=1), ALU_LATENCY, "", False


# --------------------------------------------------------------------------------- loops
@dataclass
class PtxLoop:
    """One loop of the PTX: its blocks `body`, the first and last of them in layout order."""
    first: int
    last: int
    body: frozenset = frozenset()     # its blocks (indices in layout order)
    header: int = -1                  # the block its back edges go to
    latches: tuple = ()               # the blocks that branch back to the header
    own: list = field(default_factory=list)         # its blocks not in an inner loop
    parent: int = -1                  # index of the enclosing loop, -1: none
    cost: dict = field(default_factory=dict)        # unit -> issue slots per trip (own blocks)
    keys: dict = field(default_factory=dict)        # (file, line, space, op) -> copies per trip
    global_loads: int = 0             # global loads per trip (own blocks)
    instrs: list = field(default_factory=list)      # own instructions, in order


@dataclass
class BlockInfo:
    """One block of the PTX: where it can go next, its issue slots, its memory lines."""
    succ: list
    cost: dict = field(default_factory=dict)
    instrs: list = field(default_factory=list)
    keys: set = field(default_factory=set)


@dataclass
class SourceLoop:
    """The PTX loops that are copies of one source loop: `main` unrolled `unroll` times, and a
    remainder: a loop of one source iteration per trip (`remainder`), or up to unroll - 1
    iterations written out in the enclosing loop's body (`inline_remainder`: LLVM's remainder
    of a short inner loop; a 3-wide window never reaches the main loop).  `versions`: other
    loops of the family, specialised on a condition, that do not run (the costliest one is
    assumed to)."""
    main: int
    remainder: int = -1
    unroll: int = 1
    anchors: dict = field(default_factory=dict)   # (file, line, space, op) -> copies one source
                                                  # iteration executes: how its trips are counted
    inline_remainder: bool = False
    versions: tuple = ()


@dataclass
class KernelCode:
    """The static figures of one kernel's PTX (see the module docstring)."""
    kernel: str
    arch: str
    loops: list                       # [PtxLoop]
    source_loops: list                # [SourceLoop]
    outside: PtxLoop                  # the code outside every loop (cost, keys, instrs)
    remainder_keys: dict              # keys of straight-line remainder copies (outside loops)
    blocks: list = field(default_factory=list)      # [BlockInfo], in layout order

    def live_part(self, loop, counted):
        """(cost, instrs) of one trip of loop `loop` (an index of `loops`) without its blocks that
        did not run in the profiled launch: `counted(key)` says whether the emulator counted a
        memory line; a block of memory lines none of which it counted did not run, nor did the
        blocks that lead only to it or that only it leads to (the other side of an `if` whose
        condition is the same for the whole launch: a vector path, a stride).  All of it when
        the loop ran no counted line (its trips come from elsewhere, or there are none)."""
        l = self.loops[loop]
        everything = (l.cost, l.instrs)
        if not self.blocks or l.header < 0:
            return everything
        keyed = {b for b in l.body if self.blocks[b].keys}
        dead = {b for b in keyed if not any(counted(k) for k in self.blocks[b].keys)}
        if not dead or dead == keyed or l.header in dead:
            return everything
        ahead, work = {l.header}, [l.header]
        while work:
            for v in self.blocks[work.pop()].succ:
                if v in l.body and v not in dead and v not in ahead and v != l.header:
                    ahead.add(v)
                    work.append(v)
        pred = {b: [] for b in l.body}
        for u in l.body:
            for v in self.blocks[u].succ:
                if v in l.body and v != l.header:
                    pred[v].append(u)
        behind = {b for b in l.latches if b not in dead}
        work = list(behind)
        while work:
            for u in pred[work.pop()]:
                if u not in dead and u not in behind:
                    behind.add(u)
                    work.append(u)
        live = ahead & behind
        if not any(b in live for b in l.latches):
            return everything
        cost, instrs = {}, []
        for b in l.own:
            if b in live:
                for unit, n in self.blocks[b].cost.items():
                    cost[unit] = cost.get(unit, 0) + n
                instrs += self.blocks[b].instrs
        return cost, instrs

    def to_dict(self):
        return {"kernel": self.kernel, "arch": self.arch,
                "loops": [{"first": l.first, "last": l.last, "parent": l.parent, "cost": l.cost,
                           "keys": [list(k) + [v] for k, v in l.keys.items()], "global_loads": l.global_loads}
                          for l in self.loops],
                "outside_cost": self.outside.cost}


def _key(ins):
    p = ins.parts
    base = p[0]
    if base == "ld" and "param" in p:
        return None
    space = "shared" if "shared" in p else "global" if ("global" in p or base in ("red", "atom")) else None
    if base == "wmma":
        space = "shared" if "shared" in p else "global"
        op = "ld" if "load" in p else "st" if "store" in p else None
    elif base == "cp" and "async" in p and len(p) > 2 and p[2] == "shared":
        space, op = "global", "ld"     # the emulator counts an async copy's global side as a load
    else:
        op = {"ld": "ld", "st": "st", "atom": "atom", "red": "atom"}.get(base)
    if space is None or op is None or ins.loc is None:
        return None
    return (ins.loc[0], ins.loc[1], space, op)


def _requests(ins):
    """Requests the emulator counts for one execution of a memory instruction by a warp: one,
    but a 16x16 WMMA tile of 4-byte elements (1 KB) moves as 64 16-byte pieces, two per lane
    (kernels/emu/include/mma.h); a tile of halves is one piece per lane."""
    if ins.parts[0] == "wmma" and any(p in ("f32", "s32") for p in ins.parts):
        return 2
    return 1


def _analyze(name, arch, blocks):
    _mark_division_slow_paths(blocks)
    _mark_predicated_branches(blocks)
    found, succ = _natural_loops(blocks)
    loops = [PtxLoop(min(body), max(body), body=body, header=h,
                     latches=tuple(u for u in sorted(body) if h in succ[u])) for h, body in found]
    for i, l in enumerate(loops):       # the innermost enclosing loop
        best = -1
        for j, o in enumerate(loops):
            if j != i and l.body < o.body and (best < 0 or len(o.body) < len(loops[best].body)):
                best = j
        l.parent = best
    owner = []
    for k in range(len(blocks)):
        inner = -1
        for i, l in enumerate(loops):
            if k in l.body and (inner < 0 or len(l.body) < len(loops[inner].body)):
                inner = i
        owner.append(inner)
    outside = PtxLoop(0, len(blocks) - 1)
    infos = []
    for k, b in enumerate(blocks):
        region = loops[owner[k]] if owner[k] >= 0 else outside
        region.own.append(k)
        info = BlockInfo(succ[k])
        infos.append(info)
        for ins in b.instrs:
            units, _lat, kind, _fence = instruction_cost(ins)
            for unit, n in units.items():
                region.cost[unit] = region.cost.get(unit, 0) + n
                info.cost[unit] = info.cost.get(unit, 0) + n
            region.instrs.append(ins)
            info.instrs.append(ins)
            key = _key(ins)
            if key is not None and not ins.slow_path:
                region.keys[key] = region.keys.get(key, 0) + _requests(ins)
                if not (ins.parts[0] == "wmma" and "store" in ins.parts):   # the emulator names no line
                    info.keys.add(key)
                if ins.parts[0] == "cp":   # an async copy's shared side: the profiler counts a store
                    side = (key[0], key[1], "shared", "st")
                    region.keys[side] = region.keys.get(side, 0) + 1
            if kind == "load-global":
                region.global_loads += 1
    # Loops side by side (the same loop around them) holding copies of the same memory lines
    # are one source loop: LLVM's unrolled main loop and its remainder loop, or versions of one
    # loop specialised on a condition ("unswitched": one of them runs).  A main loop and its
    # remainder hold the same code per copy of a line; versions differ.
    weight = _subtree_weights(loops)
    family = list(range(len(loops)))

    def root(i):
        while family[i] != i:
            family[i] = family[family[i]]
            i = family[i]
        return i

    for i, a in enumerate(loops):
        for j in range(i + 1, len(loops)):
            if a.parent == loops[j].parent and set(a.keys) & set(loops[j].keys):
                family[root(j)] = root(i)
    groups = {}
    for i in range(len(loops)):
        groups.setdefault(root(i), []).append(i)
    source = []
    for members in groups.values():
        shared = set.intersection(*(set(loops[m].keys) for m in members)) or set(loops[members[0]].keys)
        copies = {m: max((loops[m].keys.get(k, 0) for k in shared), default=0) or 1 for m in members}
        # pair unrolled loops with the remainder holding the same code per copy
        pairs, paired = [], set()
        for m in sorted(members, key=lambda m: -copies[m]):
            if m in paired:
                continue
            match = [r for r in members if r not in paired and r != m and copies[r] < copies[m]
                     and not _children(loops, r) and not _children(loops, m)
                     and 0.5 <= (weight[m] / copies[m]) / (weight[r] / copies[r]) <= 2.0]
            if match:
                r = min(match, key=lambda r: copies[r])
                pairs.append((m, r))
                paired.update((m, r))
            else:
                pairs.append((m, -1))
                paired.add(m)
        # the version that runs: the most work per source iteration
        main, rem = max(pairs, key=lambda p: weight[p[0]] / copies[p[0]])
        per = loops[rem].keys if rem >= 0 else loops[main].keys
        # lines of an inner loop copied into this one (its peeled first iteration) count the
        # inner loop's iterations: the loop's own lines count its own
        inner = {k for d in _descendants(loops, main) for k in loops[d].keys}
        lines = (shared - inner) or (set(loops[main].keys) - inner) or shared
        anchors = {k: per.get(k) or loops[main].keys[k] for k in lines if per.get(k) or loops[main].keys.get(k)} \
            or dict(loops[main].keys)
        unroll = max(1, copies[main] // copies[rem]) if rem >= 0 else 1
        versions = tuple(x for p in pairs if p != (main, rem) for x in p if x >= 0)
        sl = SourceLoop(main, rem, unroll, anchors, versions=versions)
        if rem < 0 and loops[main].parent >= 0:
            _inline_remainder(sl, loops[main], loops[loops[main].parent])
        source.append(sl)
    loop_keys = {k for l in loops for k in l.keys}
    remainder_keys = {k: v for k, v in outside.keys.items() if k in loop_keys}
    return KernelCode(name, arch, loops, source, outside, remainder_keys, infos)


def _successors(blocks):
    """The control-flow graph: for each block, the blocks it can go to next."""
    index = {b.label: k for k, b in enumerate(blocks)}
    out = []
    for k, b in enumerate(blocks):
        last = b.instrs[-1] if b.instrs else None
        nxt = [k + 1] if k + 1 < len(blocks) else []
        if last is None:
            out.append(nxt)
        elif last.parts[0] in ("ret", "exit"):
            out.append([])
        elif last.parts[0] == "bra" and last.target in index:
            out.append([index[last.target]] + (nxt if last.guard else []))
        else:
            out.append(nxt)
    return out


def _natural_loops(blocks):
    """([(header, body)], successors) of the loops of the control-flow graph (a body: a
    frozenset of block indices): for
    every edge u -> h where h dominates u, h and the blocks that reach u without passing h
    (edges to one header make one loop).  Not the layout: LLVM places cold blocks of a loop's
    body before it, and they branch back into it without being loops."""
    succ = _successors(blocks)
    n = len(blocks)
    pred = [[] for _ in range(n)]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    order, seen, stack = [], {0}, [(0, iter(succ[0]))]       # reverse post-order from the entry
    while stack:
        node, it = stack[-1]
        for v in it:
            if v not in seen:
                seen.add(v)
                stack.append((v, iter(succ[v])))
                break
        else:
            order.append(node)
            stack.pop()
    order.reverse()
    rpo = {v: i for i, v in enumerate(order)}
    idom = {0: 0}                    # Cooper, Harvey and Kennedy's iterative dominators
    changed = True
    while changed:
        changed = False
        for v in order[1:]:
            ps = [p for p in pred[v] if p in idom]
            if not ps:
                continue
            new = ps[0]
            for p in ps[1:]:
                a, b = p, new
                while a != b:
                    while rpo[a] > rpo[b]:
                        a = idom[a]
                    while rpo[b] > rpo[a]:
                        b = idom[b]
                new = a
            if idom.get(v) != new:
                idom[v] = new
                changed = True

    def dominates(h, u):
        while True:
            if u == h:
                return True
            if u == 0:
                return False
            u = idom[u]

    bodies = {}
    for u in order:
        for h in succ[u]:
            if h in idom and dominates(h, u):
                body = bodies.setdefault(h, {h})
                work = [u]
                while work:
                    x = work.pop()
                    if x not in body:
                        body.add(x)
                        work.extend(p for p in pred[x] if p in idom)
    return [(h, frozenset(b)) for h, b in sorted(bodies.items())], succ


def _descendants(loops, i):
    out = []
    for j in _children(loops, i):
        out += [j] + _descendants(loops, j)
    return out


def _children(loops, i):
    return [j for j, l in enumerate(loops) if l.parent == i]


def _subtree_weights(loops):
    """Issue slots per trip of each loop with the loops inside it (one trip each)."""
    out = {}

    def w(i):
        if i not in out:
            out[i] = sum(loops[i].cost.values()) + sum(w(j) for j in _children(loops, i))
        return out[i]

    for i in range(len(loops)):
        w(i)
    return out


def _inline_remainder(sl, child, parent):
    """A child loop of c copies of a line whose parent's own body holds r copies of it: LLVM
    unrolled it u times and wrote its remainder (u - 1 iterations) into the parent, so one
    iteration holds p = c - r copies and u = c / p."""
    for key, c in child.keys.items():
        r = parent.keys.get(key, 0)
        p = c - r
        if r and p > 0 and c % p == 0 and c // p >= 2 and r == (c // p - 1) * p:
            sl.unroll = c // p
            sl.anchors = {k: max(1, v // sl.unroll) for k, v in child.keys.items()}
            sl.anchors[key] = p
            sl.inline_remainder = True
            return


def trip_cycles(instrs, global_latency):
    """Cycles one warp alone needs for `instrs` (one trip of a loop, or straight-line code), as
    ptxas schedules them: each instruction as early as its operands allow (4 cycles per
    arithmetic result, a load's latency for a loaded value), no earlier than a conditional branch
    before it (code after a branch cannot move above it), a plain (not `.nc`) global load no
    earlier than a store before it, everything after a barrier after the barrier; and at least one
    cycle per issue slot.  The warp's next trip waits for the last instruction of this one, so a
    value used in the same trip costs its load's full latency, and independent loads (an unrolled
    loop) wait for it together.  Async copies (cp.async) are waited for a trip after they were
    issued (the pipeline's next stage): a trip holding them lasts at least one latency, however
    little it computes.  `global_latency`: cycles of a global load."""
    ready = {}
    t_store = 0.0
    t_fence = 0.0        # conditional branches (not predicated ones) and barriers: nothing after
                         # them starts earlier
    pipelined = False    # async copies waited for a trip later (cp.async.wait_group): the trip
                         # lasts at least one latency, the copies of the next stage landing meanwhile
    end = 0.0
    slots = 0.0
    for ins in instrs:
        units, lat, kind, fence = instruction_cost(ins)
        n = sum(units.values())
        operands = max((ready.get(s, 0.0) for s in ins.srcs), default=0.0)
        if n == 0 and not lat:
            for d in ins.dests:
                ready[d] = operands
            continue
        if lat is None:
            lat = global_latency
        start = max(operands, t_fence)
        if kind == "load-global" and "nc" not in ins.parts:
            start = max(start, t_store)
        if kind == "store":
            t_store = max(t_store, start)
        if kind == "barrier":
            t_fence = max(t_fence, start + lat)
        if (ins.parts[0] == "bra" and ins.guard and not ins.predicated) or fence:
            t_fence = max(t_fence, start + (ALU_LATENCY if fence else 0))
        if ins.parts[0] == "cp" and "async" in ins.parts and "shared" in ins.parts:
            pipelined = True
        for d in ins.dests:
            ready[d] = start + (lat if lat else n)
        slots += n
        end = max(end, start + n)
    return max(end, slots, global_latency if pipelined else 0)


# --------------------------------------------------------------------------------- compile
_lock = threading.Lock()
_memory = {}


def _nvrtc_options(options):
    from .ptxas import _nvrtc_options as opts
    o, dirs = opts(options)
    return [x for x in o if x not in ("-Xptxas", "-v")] + ["-lineinfo"], dirs


def module_code(code, arch="sm_90", options=(), filename="kernel.cu"):
    """{kernel name: KernelCode} of every entry of a CUDA C source on `arch` (PTX by NVRTC;
    the PTX is cached on disk beside kernels.resources' reports)."""
    a = architecture(arch).name
    opts, dirs = _nvrtc_options(options)
    from ..emu.emulator import _digest, cache_dir
    # the PTX names each file by the absolute path this compile saw (the file's own, the includes'
    # under the working directory): a PTX cached by another checkout would name files outside this
    # one, which _parse_module takes for CUDA headers, so the key holds both
    key = _digest("ptx", code, opts, a, nvrtc.nvrtc_version(), os.path.abspath(filename), os.getcwd())
    with _lock:
        hit = _memory.get(key)
        if hit is not None:
            return hit
        folder = cache_dir() / "ptx"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key}.ptx"
        try:
            ptx = path.read_text()
        except OSError:
            result = nvrtc.compile_cuda(code, arch=a, options=opts, filename=filename, include_dirs=dirs)
            ptx = result.ptx.decode() if isinstance(result.ptx, bytes) else result.ptx
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(ptx)
            os.replace(tmp, path)
        found = {name: _analyze(name, a, blocks) for name, blocks in _parse_module(ptx).items()}
        _memory[key] = found
        return found


def kernel_code(kernel, arch="sm_90"):
    """KernelCode of one kernel (a kernels.RawKernel) on `arch`.  Raises
    kernels.runtime.nvrtc.NVRTCUnavailableError without libnvrtc."""
    module = getattr(kernel, "module", None)
    if module is None or not hasattr(kernel, "name"):
        raise TypeError(f"kernel_code: pass a kernel (kernels.RawKernel), got {type(kernel).__name__}")
    found = module_code(module.code, arch, module.options, module.filename)
    if kernel.name not in found:
        raise KeyError(f"kernel_code: no PTX entry '{kernel.name}' (found: {', '.join(sorted(found))})")
    return found[kernel.name]
