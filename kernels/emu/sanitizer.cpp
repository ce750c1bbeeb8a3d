/*
 * sanitizer.cpp: the four checks of KERNELS_EMU_SANITIZE, NVIDIA compute-sanitizer's tools
 * under the same names.  Compiled into the runtime's translation unit right after runtime.cpp
 * (kernels/emu/emulator.py joins the two files), so it sees the scheduler's state.
 *
 * Where the accesses come from
 *   A sanitized module is compiled with g++ -fsanitize=thread, but linked without libtsan: the
 *   compiler's instrumentation calls __tsan_read4(addr), __tsan_write16(addr), ... before every
 *   load and store of kernel code that may touch memory other than the thread's own registers,
 *   and this file defines those functions.  Atomics and __threadfence() call in explicitly
 *   (cuda_emu.h), as do async copies (cuda_pipeline.h) and barriers (runtime.cpp).  Every access
 *   goes through on_access(address, size, kind, pc), where the pc names the static site and
 *   the scheduler knows the block and thread; besides the checks, the profiler
 *   (emu/profiler.cpp, kernels.profile()) takes the same stream from there.
 *
 * Shadow memory
 *   Every byte of an argument array, of the static __shared__ section and of the dynamic shared
 *   buffer has a shadow Cell (64 bytes, mapped per launch and touched only where used) holding
 *   the last write (and, when atomics of several threads pile up unordered, the one before),
 *   and the last two reads by different threads: who (block and thread), when (the
 *   sanitizer's clock, which ticks at every barrier, warp collective, atomic and fence) and
 *   where (the pc).  A record from another block in shared memory belongs to that block's
 *   copy of it and counts as absent.
 *
 * When two accesses by different threads are ordered (racecheck)
 *   same block:  a __syncthreads() between them (every thread passes barriers together, so one
 *                "last barrier" time per block suffices), or, within one warp, a __syncwarp() or
 *                *_sync collective whose mask holds both lanes (lanes of a warp are NOT ordered
 *                by themselves: Volta's independent thread scheduling);
 *   two blocks:  only through atomics: the earlier block ran __threadfence() and then an atomic
 *                after its access (release), and the later thread, or its block before the last
 *                barrier, ran an atomic before its access (acquire): the "last block" pattern.
 *   Two atomics never race; two reads never race.
 */

namespace {

struct Record {        // one access to one byte
    uint32_t who;      // ((linear block << 10) | thread in block) + 1; 0: none
    uint32_t time;     // the sanitizer's clock
    uint32_t site;     // pc - code base
    uint32_t kind;     // EMU_ACCESS_*; kPending: an async copy not yet waited for
};
constexpr uint32_t kPending = 16;
struct Cell {
    Record w;          // the last write
    Record w2;         // an earlier atomic write of another thread that w's atomic did not order
    Record r1, r2;     // the last two reads by different threads since w
};

struct Span {          // memory with shadow cells
    uintptr_t lo, hi;
    Cell* cells;
    size_t mapped;
    int kind;          // EMU_REGION_*
    unsigned char* init;   // an argument the host never wrote: its "initialised" flags
};

struct WarpSync {
    uint32_t full;         // the last collective of the whole (existing) warp
    uint32_t pair[32][32]; // the last collective that held both lanes (partial masks)
};

struct Sanitizer {
    int checks = 0;
    const emu_launch_params* p = nullptr;
    std::vector<Span> spans;                   // sorted by lo, disjoint
    std::vector<int> shared_vars;              // region indices of __shared__ variables, by address
    std::vector<std::pair<uintptr_t, uintptr_t>> ignore;   // the module's and runtime's own segments
    uintptr_t code_base = 0;
    uintptr_t static_lo = 0, static_hi = 0, dyn_lo = 0, dyn_used = 0, dyn_cap = 0;
    uintptr_t stacks_lo = 0, stacks_hi = 0;
    uint32_t now = 0;
    unsigned block = 0;                        // linear index of the running block
    uint32_t last_barrier = 0;
    std::vector<WarpSync> warps;               // entries older than last_barrier are void
    std::vector<uint32_t> block_release;       // per block: its latest fence-then-atomic
    std::vector<uint32_t> thread_fence, thread_acquire;   // per thread of the running block
    uint32_t acquired_before_barrier = 0;
} Z;

emu_finding g_finding;

/* The profiler (emu/profiler.cpp, compiled into this unit after this file) */
void prof_launch_begin(const emu_launch_params* p);
void prof_access(const Span* sp, uintptr_t a, unsigned size, int kind, uintptr_t pc);
void prof_flush();
void prof_launch_end();

/* ---------------------------------------------------------------- segments never checked */
struct SegmentQuery {
    uintptr_t address;
    std::vector<std::pair<uintptr_t, uintptr_t>>* out;
};

int collect_segments(struct dl_phdr_info* info, size_t, void* data) {
    auto* q = static_cast<SegmentQuery*>(data);
    bool mine = false;
    for (int i = 0; i < info->dlpi_phnum && !mine; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
        mine = ph.p_type == PT_LOAD && q->address >= lo && q->address < lo + ph.p_memsz;
    }
    if (!mine) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD) continue;
        uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
        q->out->push_back({lo, lo + ph.p_memsz});
    }
    return 1;
}

/* The loaded segments (code, constants, variables) of the kernel module and of this runtime:
 * a kernel reads its own tables and threadIdx there.  Cached per module. */
void find_ignored_segments(const void* code) {
    static std::vector<std::pair<const void*, std::vector<std::pair<uintptr_t, uintptr_t>>>> cache;
    for (auto& c : cache)
        if (c.first == code) {
            Z.ignore = c.second;
            return;
        }
    std::vector<std::pair<uintptr_t, uintptr_t>> segs;
    SegmentQuery q{(uintptr_t)code, &segs};
    dl_iterate_phdr(collect_segments, &q);
    q.address = (uintptr_t)&threadIdx;
    dl_iterate_phdr(collect_segments, &q);
    cache.push_back({code, segs});
    Z.ignore = segs;
}

/* ---------------------------------------------------------------- findings */
void describe(emu_access& out, uint32_t who, uintptr_t pc, int size, int kind) {
    const unsigned b = (who - 1) >> 10, t = (who - 1) & 1023;
    const unsigned gx = Z.p->grid[0], gy = Z.p->grid[1], bx = Z.p->block[0], by = Z.p->block[1];
    out.pc = pc;
    out.block[0] = b % gx;
    out.block[1] = b / gx % gy;
    out.block[2] = b / (gx * gy);
    out.thread[0] = t % bx;
    out.thread[1] = t / bx % by;
    out.thread[2] = t / (bx * by);
    out.size = size;
    out.kind = kind;
}

uint32_t me() { return ((Z.block << 10) | (unsigned)S.current) + 1; }

int region_at(uintptr_t a) {
    for (int i = 0; i < Z.p->nregions; ++i)
        if (a >= Z.p->regions[i].begin && a < Z.p->regions[i].end) return i;
    return -1;
}

/* The region nearest to `a` among those of `kind` (for an access that hit none). */
int nearest_region(uintptr_t a, int kind) {
    int best = -1;
    uintptr_t best_d = ~(uintptr_t)0;
    for (int i = 0; i < Z.p->nregions; ++i) {
        const emu_region& r = Z.p->regions[i];
        if (r.kind != kind) continue;
        uintptr_t d = a < r.begin ? r.begin - a : a >= r.end ? a - r.end + 1 : 0;
        if (d < best_d) best = i, best_d = d;
    }
    return best;
}

/* Record a finding and stop the kernel: the fiber is abandoned, the launch returns. */
[[noreturn]] void report(int check, int what, uintptr_t a, int region, unsigned size, int kind, uintptr_t pc,
                         const Record* other) {
    memset(&g_finding, 0, sizeof g_finding);
    g_finding.check = check;
    g_finding.what = what;
    g_finding.address = a;
    g_finding.region = region;
    g_finding.offset = region >= 0 ? (long long)(a - Z.p->regions[region].begin) : 0;
    describe(g_finding.access, me(), pc, (int)size, kind);
    if (other) {
        describe(g_finding.other, other->who, Z.code_base + other->site, 0, (int)(other->kind & ~kPending));
        g_finding.has_other = 1;
    }
    set_error(EMU_ERR_SANITIZER, "sanitizer finding %d in kernel '%s' (%s)", what, Z.p->kernel_name,
              where(S.current).c_str());
    yield_to_scheduler();
    abort();   // never resumed
}

/* synccheck, called by the scheduler (runtime.cpp); the caller unwinds */
void san_sync_finding(int what, int thread, int other, unsigned mask, const char* file, int line) {
    memset(&g_finding, 0, sizeof g_finding);
    g_finding.check = EMU_CHECK_SYNCCHECK;
    g_finding.what = what;
    g_finding.region = -1;
    const uint32_t base = Z.block << 10;
    describe(g_finding.access, base + (unsigned)thread + 1, 0, 0, 0);
    if (other >= 0) {
        describe(g_finding.other, base + (unsigned)other + 1, 0, 0, 0);
        g_finding.has_other = 1;
    }
    g_finding.mask = mask;
    g_finding.file = file;
    g_finding.line = line;
    set_error(EMU_ERR_SANITIZER, "synccheck finding %d in kernel '%s' at %s:%d", what, S.p->kernel_name, file, line);
}

/* ---------------------------------------------------------------- ordering (racecheck) */
bool ordered(const Record& r, uint32_t self) {
    if (r.who == self) return true;
    const unsigned rb = (r.who - 1) >> 10, rt = (r.who - 1) & 1023, mt = (self - 1) & 1023;
    if (rb == Z.block) {
        if (r.time < Z.last_barrier) return true;
        if ((rt >> 5) != (mt >> 5)) return false;
        const WarpSync& ws = Z.warps[rt >> 5];
        return ws.full > r.time || ws.pair[rt & 31][mt & 31] > r.time;
    }
    const uint32_t release = rb < Z.block_release.size() ? Z.block_release[rb] : 0;
    if (release <= r.time) return false;
    return std::max(Z.thread_acquire[mt], Z.acquired_before_barrier) > release;
}

bool both_atomic(const Record& r, int kind) { return kind == EMU_ACCESS_ATOMIC && r.kind == EMU_ACCESS_ATOMIC; }

/* The shadow work of one access: initcheck, racecheck, and the new record. */
void track(Span& sp, uintptr_t a, unsigned size, int kind, uintptr_t pc) {
    const uint32_t self = me();
    const bool shared = sp.kind != EMU_REGION_ARGUMENT;
    const bool race = Z.checks & EMU_CHECK_RACECHECK, init = Z.checks & EMU_CHECK_INITCHECK;
    const Record rec{self, Z.now, (uint32_t)(pc - Z.code_base), (uint32_t)kind | (kind == EMU_ACCESS_ASYNC_COPY ? kPending : 0)};
    Cell* c = sp.cells + (a - sp.lo);
    auto current = [&](const Record& r) { return r.who && (!shared || ((r.who - 1) >> 10) == Z.block); };
    auto at = [&](uintptr_t byte) { return region_at(byte); };
    for (unsigned i = 0; i < size; ++i, ++c) {
        const uintptr_t byte = a + i;
        const Record& w = c->w;
        const bool written = current(w);
        if (kind != EMU_ACCESS_WRITE && kind != EMU_ACCESS_ASYNC_COPY) {   // reads the byte
            if (init && !written && (shared || (sp.init && !sp.init[byte - sp.lo])))
                report(EMU_CHECK_INITCHECK, EMU_SAN_UNINITIALIZED, byte, at(byte), size, kind, pc, nullptr);
            if (race && written) {
                if (w.kind & kPending)
                    report(EMU_CHECK_RACECHECK, EMU_SAN_ASYNC_PENDING, byte, at(byte), size, kind, pc, &w);
                if (!both_atomic(w, kind) && !ordered(w, self))
                    report(EMU_CHECK_RACECHECK, EMU_SAN_RAW, byte, at(byte), size, kind, pc, &w);
                // a plain read of a counter others still update atomically (mine came last)
                if (current(c->w2) && kind != EMU_ACCESS_ATOMIC && !ordered(c->w2, self))
                    report(EMU_CHECK_RACECHECK, EMU_SAN_RAW, byte, at(byte), size, kind, pc, &c->w2);
            }
        }
        if (kind == EMU_ACCESS_READ) {
            if (race) {   // the two most recent readers that are different threads
                if (c->r1.who != self) c->r2 = c->r1;
                c->r1 = rec;
            }
            continue;
        }
        if (race) {
            if (written && (w.kind & kPending))
                report(EMU_CHECK_RACECHECK, EMU_SAN_ASYNC_PENDING, byte, at(byte), size, kind, pc, &w);
            if (written && !both_atomic(w, kind) && !ordered(w, self))
                report(EMU_CHECK_RACECHECK, EMU_SAN_WAW, byte, at(byte), size, kind, pc, &w);
            if (current(c->w2) && kind != EMU_ACCESS_ATOMIC && !ordered(c->w2, self))
                report(EMU_CHECK_RACECHECK, EMU_SAN_WAW, byte, at(byte), size, kind, pc, &c->w2);
            for (const Record* r : {&c->r1, &c->r2})
                if (current(*r) && r->who != self && !both_atomic(*r, kind) && !ordered(*r, self))
                    report(EMU_CHECK_RACECHECK, EMU_SAN_WAR, byte, at(byte), size, kind, pc, r);
            // Atomics of several threads do not order each other: keep one that this atomic
            // write does not order, so that a later plain access can still be checked against it.
            if (kind == EMU_ACCESS_ATOMIC) {
                if (written && w.who != self && w.kind == EMU_ACCESS_ATOMIC && !ordered(w, self)) c->w2 = w;
                else if (!(current(c->w2) && c->w2.who != self && !ordered(c->w2, self))) c->w2 = Record{0, 0, 0, 0};
            } else {
                c->w2 = Record{0, 0, 0, 0};
            }
        }
        c->w = rec;
        c->r1 = c->r2 = Record{0, 0, 0, 0};
        if (sp.init) sp.init[byte - sp.lo] = 1;
    }
}

Span* find_span(uintptr_t a) {
    size_t lo = 0, hi = Z.spans.size();
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (a < Z.spans[mid].lo) hi = mid;
        else if (a >= Z.spans[mid].hi) lo = mid + 1;
        else return &Z.spans[mid];
    }
    return nullptr;
}

/* The __shared__ variable holding [a, a + size), or -1; *near: the one to blame otherwise. */
int shared_variable(uintptr_t a, unsigned size, int* near) {
    int best = -1;
    for (int r : Z.shared_vars) {
        const emu_region& v = Z.p->regions[r];
        if (a >= v.begin && a + size <= v.end) return r;
        if (v.begin <= a) best = r;   // sorted: the last one starting at or below a
    }
    *near = best >= 0 ? best : (Z.shared_vars.empty() ? -1 : Z.shared_vars.front());
    return -1;
}

void on_access(uintptr_t a, unsigned size, int kind, uintptr_t pc, bool aligned) {
    if (!Z.checks || S.current < 0) return;
    if (g_stop_requested) {   // Ctrl-C: the kernel spends its time here, so look here
        poll_interrupt();
        yield_to_scheduler();
    }
    const bool memcheck = Z.checks & EMU_CHECK_MEMCHECK;
    if (a >= Z.stacks_lo && a < Z.stacks_hi) {   // local memory (a fiber's stack)
        const size_t slot = kStackBytes + kStackGuard;
        if (memcheck && (a - Z.stacks_lo) / slot != (size_t)S.current)
            report(EMU_CHECK_MEMCHECK, EMU_SAN_OTHER_LOCAL, a, -1, size, kind, pc, nullptr);
        return;
    }
    Span* sp = find_span(a);
    if (Z.checks & EMU_PROFILE) prof_access(sp, a, size, kind, pc);
    if (!sp) {
        if (!memcheck) return;
        int near = -1;
        if (Z.static_hi > Z.static_lo && a + 256 >= Z.static_lo && a < Z.static_hi + 256) {
            shared_variable(a, size, &near);
            report(EMU_CHECK_MEMCHECK, EMU_SAN_OUT_OF_BOUNDS, a, near, size, kind, pc, nullptr);
        }
        if (a + 256 >= Z.dyn_lo && a < Z.dyn_cap + 256)
            report(EMU_CHECK_MEMCHECK, EMU_SAN_OUT_OF_BOUNDS, a, nearest_region(a, EMU_REGION_DYNAMIC_SHARED), size,
                   kind, pc, nullptr);
        for (int r : Z.shared_vars) {   // just past a __shared__ variable outside the section
            const emu_region& v = Z.p->regions[r];
            if (a >= v.end && a < v.end + 256 && (v.begin >= Z.static_hi || v.end <= Z.static_lo))
                report(EMU_CHECK_MEMCHECK, EMU_SAN_OUT_OF_BOUNDS, a, r, size, kind, pc, nullptr);
        }
        for (const auto& seg : Z.ignore)
            if (a >= seg.first && a < seg.second) return;
        report(EMU_CHECK_MEMCHECK, EMU_SAN_OUT_OF_BOUNDS, a, nearest_region(a, EMU_REGION_ARGUMENT), size, kind, pc,
               nullptr);
    }
    if (memcheck) {
        if (aligned && size > 1 && (a & (size - 1)))
            report(EMU_CHECK_MEMCHECK, EMU_SAN_MISALIGNED, a, region_at(a), size, kind, pc, nullptr);
        if (sp->kind == EMU_REGION_SHARED) {
            int near = -1;
            if (shared_variable(a, size, &near) < 0)
                report(EMU_CHECK_MEMCHECK, EMU_SAN_OUT_OF_BOUNDS, a, near, size, kind, pc, nullptr);
        } else if (a + size > (sp->kind == EMU_REGION_DYNAMIC_SHARED ? Z.dyn_used : sp->hi)) {
            const int blame = region_at(a);
            report(EMU_CHECK_MEMCHECK, EMU_SAN_OUT_OF_BOUNDS, a,
                   blame >= 0 ? blame : nearest_region(a, sp->kind), size, kind, pc, nullptr);
        }
    }
    if (Z.checks & (EMU_CHECK_RACECHECK | EMU_CHECK_INITCHECK)) track(*sp, a, size, kind, pc);
}

Span make_span(uintptr_t lo, uintptr_t hi, int kind, unsigned char* init) {
    Span s{lo, hi, nullptr, 0, kind, init};
    if (hi > lo && (Z.checks & (EMU_CHECK_RACECHECK | EMU_CHECK_INITCHECK))) {
        s.mapped = (hi - lo) * sizeof(Cell);
        void* m = mmap(nullptr, s.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        s.cells = m == MAP_FAILED ? nullptr : static_cast<Cell*>(m);
        if (!s.cells) s.mapped = 0;
    }
    return s;
}

/* ---------------------------------------------------------------- the scheduler's hooks */
void san_launch_begin(const emu_launch_params* p) {
    Z.checks = p->sanitize & (EMU_CHECK_MEMCHECK | EMU_CHECK_RACECHECK | EMU_CHECK_INITCHECK | EMU_PROFILE);
    Z.p = p;
    Z.code_base = (uintptr_t)p->code_begin;
    Z.now = 1;
    Z.static_lo = (uintptr_t)p->static_shared_begin;
    Z.static_hi = (uintptr_t)p->static_shared_end;
    Z.dyn_lo = (uintptr_t)p->dynamic_shared;
    Z.dyn_used = Z.dyn_lo + p->shared_mem;
    Z.dyn_cap = Z.dyn_lo + p->dynamic_shared_capacity;
    Z.stacks_lo = (uintptr_t)S.stacks;
    Z.stacks_hi = Z.stacks_lo + S.stacks_capacity * (kStackBytes + kStackGuard);
    find_ignored_segments(p->entry ? (const void*)p->entry : p->code_begin);
    // argument arrays (views of one buffer merged into one span), then shared memory
    std::vector<std::pair<uintptr_t, uintptr_t>> args;
    for (int i = 0; i < p->nregions; ++i)
        if (p->regions[i].kind == EMU_REGION_ARGUMENT && p->regions[i].end > p->regions[i].begin)
            args.push_back({p->regions[i].begin, p->regions[i].end});
    std::sort(args.begin(), args.end());
    Z.spans.clear();
    for (size_t i = 0; i < args.size();) {
        uintptr_t lo = args[i].first, hi = args[i].second;
        size_t j = i + 1;
        for (; j < args.size() && args[j].first < hi; ++j) hi = std::max(hi, args[j].second);
        unsigned char* init = nullptr;
        if (j == i + 1)
            for (int r = 0; r < p->nregions; ++r)
                if (p->regions[r].kind == EMU_REGION_ARGUMENT && p->regions[r].begin == lo && p->regions[r].end == hi)
                    init = p->regions[r].init;
        Z.spans.push_back(make_span(lo, hi, EMU_REGION_ARGUMENT, init));
        i = j;
    }
    if (Z.static_hi > Z.static_lo) Z.spans.push_back(make_span(Z.static_lo, Z.static_hi, EMU_REGION_SHARED, nullptr));
    // __shared__ variables g++ left outside the section (static locals of function templates,
    // see cuda_emu.h), each with the 128-byte pad before it; neighbours merged
    std::vector<std::pair<uintptr_t, uintptr_t>> outside;
    for (int i = 0; i < p->nregions; ++i) {
        const emu_region& r = p->regions[i];
        if (r.kind == EMU_REGION_SHARED && r.end > r.begin && (r.begin >= Z.static_hi || r.end <= Z.static_lo))
            outside.push_back({r.begin - 128, r.end});
    }
    std::sort(outside.begin(), outside.end());
    for (size_t i = 0; i < outside.size();) {
        uintptr_t lo = outside[i].first, hi = outside[i].second;
        size_t j = i + 1;
        for (; j < outside.size() && outside[j].first <= hi; ++j) hi = std::max(hi, outside[j].second);
        Z.spans.push_back(make_span(lo, hi, EMU_REGION_SHARED, nullptr));
        i = j;
    }
    if (Z.dyn_cap > Z.dyn_lo) Z.spans.push_back(make_span(Z.dyn_lo, Z.dyn_cap, EMU_REGION_DYNAMIC_SHARED, nullptr));
    std::sort(Z.spans.begin(), Z.spans.end(), [](const Span& x, const Span& y) { return x.lo < y.lo; });
    // an argument inside the module's own memory (it cannot be): keep the spans disjoint
    for (size_t i = 1; i < Z.spans.size(); ++i)
        if (Z.spans[i].lo < Z.spans[i - 1].hi) Z.spans[i].lo = std::min(Z.spans[i - 1].hi, Z.spans[i].hi);
    Z.shared_vars.clear();
    for (int i = 0; i < p->nregions; ++i)
        if (p->regions[i].kind == EMU_REGION_SHARED) Z.shared_vars.push_back(i);
    std::sort(Z.shared_vars.begin(), Z.shared_vars.end(),
              [p](int x, int y) { return p->regions[x].begin < p->regions[y].begin; });
    const unsigned long long nblocks = (unsigned long long)p->grid[0] * p->grid[1] * p->grid[2];
    Z.block_release.assign(nblocks < (1ull << 22) ? nblocks : (1ull << 22), 0);
    Z.warps.assign((S.nthreads + kWarpSize - 1) / kWarpSize, WarpSync());
    Z.thread_fence.assign(S.nthreads, 0);
    Z.thread_acquire.assign(S.nthreads, 0);
    if (Z.checks & EMU_PROFILE) prof_launch_begin(p);
}

void san_launch_end() {
    if (Z.checks & EMU_PROFILE) prof_launch_end();
    for (Span& s : Z.spans)
        if (s.cells) munmap(s.cells, s.mapped);
    Z.spans.clear();
    Z.checks = 0;
}

void san_block_begin(unsigned linear_block) {
    if (Z.checks & EMU_PROFILE) prof_flush();   // the previous block's last phase
    Z.block = linear_block & ((1u << 22) - 1);
    Z.last_barrier = ++Z.now;   // voids every warp's sync times too
    std::fill(Z.thread_fence.begin(), Z.thread_fence.end(), 0);
    std::fill(Z.thread_acquire.begin(), Z.thread_acquire.end(), 0);
    Z.acquired_before_barrier = 0;
}

void san_barrier_released() {
    if (Z.checks & EMU_PROFILE) prof_flush();
    Z.last_barrier = ++Z.now;
    for (uint32_t t : Z.thread_acquire) Z.acquired_before_barrier = std::max(Z.acquired_before_barrier, t);
}

void san_warp_synced(int warp, unsigned lanes) {
    WarpSync& w = Z.warps[warp];
    const uint32_t t = ++Z.now;
    if (lanes == S.warps[warp].existing) {
        w.full = t;
        return;
    }
    for (unsigned a = lanes; a; a &= a - 1)
        for (unsigned b = lanes; b; b &= b - 1) w.pair[__builtin_ctz(a)][__builtin_ctz(b)] = t;
}

void san_async_issued(const AsyncCopy& c) {
    const uintptr_t dst = (uintptr_t)c.dst, src = (uintptr_t)c.src;
    if (Z.checks & EMU_CHECK_MEMCHECK) {
        Span* d = find_span(dst);
        Span* s = find_span(src);
        const bool size_ok = c.size == 4 || c.size == 8 || c.size == 16;
        if (!size_ok || c.zfill > c.size || dst % c.size || src % c.size || !d || d->kind == EMU_REGION_ARGUMENT ||
            (s && s->kind != EMU_REGION_ARGUMENT))
            report(EMU_CHECK_MEMCHECK, EMU_SAN_BAD_ASYNC_COPY, dst, region_at(dst), c.size, EMU_ACCESS_ASYNC_COPY,
                   c.pc, nullptr);
    }
    if (c.size > c.zfill) on_access(src, c.size - c.zfill, EMU_ACCESS_READ, c.pc, false);
    on_access(dst, c.size, EMU_ACCESS_ASYNC_COPY, c.pc, false);
}

void san_async_landed(int thread, const AsyncCopy& c) {
    if (!(Z.checks & (EMU_CHECK_RACECHECK | EMU_CHECK_INITCHECK))) return;
    Span* sp = find_span((uintptr_t)c.dst);
    if (!sp || !sp->cells || (uintptr_t)c.dst + c.size > sp->hi) return;
    const Record rec{((Z.block << 10) | (unsigned)thread) + 1, ++Z.now, (uint32_t)(c.pc - Z.code_base),
                     EMU_ACCESS_WRITE};
    Cell* cell = sp->cells + ((uintptr_t)c.dst - sp->lo);
    for (unsigned i = 0; i < c.size; ++i) cell[i].w = rec;
}

}  // namespace

/* ---------------------------------------------------------------- called by kernel code */
extern "C" {

#define EMU_EXPORT __attribute__((visibility("default")))
#define EMU_PC ((uintptr_t)__builtin_return_address(0))
#define EMU_TSAN(op, size, kind, aligned) \
    EMU_EXPORT void __tsan_##op(void* a) { on_access((uintptr_t)a, size, kind, EMU_PC, aligned); }

EMU_TSAN(read1, 1, EMU_ACCESS_READ, true)
EMU_TSAN(read2, 2, EMU_ACCESS_READ, true)
EMU_TSAN(read4, 4, EMU_ACCESS_READ, true)
EMU_TSAN(read8, 8, EMU_ACCESS_READ, true)
EMU_TSAN(read16, 16, EMU_ACCESS_READ, true)
EMU_TSAN(write1, 1, EMU_ACCESS_WRITE, true)
EMU_TSAN(write2, 2, EMU_ACCESS_WRITE, true)
EMU_TSAN(write4, 4, EMU_ACCESS_WRITE, true)
EMU_TSAN(write8, 8, EMU_ACCESS_WRITE, true)
EMU_TSAN(write16, 16, EMU_ACCESS_WRITE, true)
// the compiler could not prove natural alignment (packed data, merged or vectorised accesses)
EMU_TSAN(unaligned_read2, 2, EMU_ACCESS_READ, false)
EMU_TSAN(unaligned_read4, 4, EMU_ACCESS_READ, false)
EMU_TSAN(unaligned_read8, 8, EMU_ACCESS_READ, false)
EMU_TSAN(unaligned_read16, 16, EMU_ACCESS_READ, false)
EMU_TSAN(unaligned_write2, 2, EMU_ACCESS_WRITE, false)
EMU_TSAN(unaligned_write4, 4, EMU_ACCESS_WRITE, false)
EMU_TSAN(unaligned_write8, 8, EMU_ACCESS_WRITE, false)
EMU_TSAN(unaligned_write16, 16, EMU_ACCESS_WRITE, false)
EMU_TSAN(volatile_read1, 1, EMU_ACCESS_READ, true)
EMU_TSAN(volatile_read2, 2, EMU_ACCESS_READ, true)
EMU_TSAN(volatile_read4, 4, EMU_ACCESS_READ, true)
EMU_TSAN(volatile_read8, 8, EMU_ACCESS_READ, true)
EMU_TSAN(volatile_read16, 16, EMU_ACCESS_READ, true)
EMU_TSAN(volatile_write1, 1, EMU_ACCESS_WRITE, true)
EMU_TSAN(volatile_write2, 2, EMU_ACCESS_WRITE, true)
EMU_TSAN(volatile_write4, 4, EMU_ACCESS_WRITE, true)
EMU_TSAN(volatile_write8, 8, EMU_ACCESS_WRITE, true)
EMU_TSAN(volatile_write16, 16, EMU_ACCESS_WRITE, true)
#undef EMU_TSAN

EMU_EXPORT void __tsan_read_range(void* a, unsigned long size) {
    if (size) on_access((uintptr_t)a, (unsigned)size, EMU_ACCESS_READ, EMU_PC, false);
}
EMU_EXPORT void __tsan_write_range(void* a, unsigned long size) {
    if (size) on_access((uintptr_t)a, (unsigned)size, EMU_ACCESS_WRITE, EMU_PC, false);
}
// No call stacks are kept (modules are built without entry/exit calls); defined for safety.
EMU_EXPORT void __tsan_func_entry(void*) {}
EMU_EXPORT void __tsan_func_exit(void) {}
EMU_EXPORT void __tsan_init(void) {}
EMU_EXPORT void __tsan_vptr_update(void**, void*) {}
EMU_EXPORT void __tsan_vptr_read(void**) {}

/* C++ atomics in module code: in practice only the guard of a function-local static that needs
 * a constructor (a __shared__ array of __half, say).  Module data is not checked: plain atomics. */
#define EMU_TSAN_ATOMICS(bits, T)                                                                       \
    EMU_EXPORT T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
    EMU_EXPORT void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
    EMU_EXPORT T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                               \
        return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                             \
    }                                                                                                   \
    EMU_EXPORT T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                              \
        return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                              \
    }                                                                                                   \
    EMU_EXPORT T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) {                              \
        return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                              \
    }                                                                                                   \
    EMU_EXPORT T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) {                              \
        return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                              \
    }                                                                                                   \
    EMU_EXPORT T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) {                               \
        return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                               \
    }                                                                                                   \
    EMU_EXPORT T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) {                              \
        return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                              \
    }                                                                                                   \
    EMU_EXPORT int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {  \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);         \
    }                                                                                                   \
    EMU_EXPORT int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {    \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);         \
    }                                                                                                   \
    EMU_EXPORT T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {        \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);               \
        return c;                                                                                       \
    }
EMU_TSAN_ATOMICS(8, unsigned char)
EMU_TSAN_ATOMICS(16, unsigned short)
EMU_TSAN_ATOMICS(32, unsigned int)
EMU_TSAN_ATOMICS(64, unsigned long long)
#undef EMU_TSAN_ATOMICS
EMU_EXPORT void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
EMU_EXPORT void __tsan_atomic_signal_fence(int) {}

/* An atomic read-modify-write of `size` bytes (cuda_emu.h calls it first, from a function the
 * compiler does not instrument, and passes its caller's pc). */
EMU_EXPORT void __emu_san_atomic(void* address, unsigned size, void* pc) {
    if (!Z.checks || S.current < 0) return;
    const uint32_t t = ++Z.now;
    Z.thread_acquire[S.current] = t;
    if (Z.thread_fence[S.current] && Z.block < Z.block_release.size()) Z.block_release[Z.block] = t;
    on_access((uintptr_t)address, size, EMU_ACCESS_ATOMIC, (uintptr_t)pc, true);
}

EMU_EXPORT void __emu_san_fence(void) {
    if (Z.checks && S.current >= 0) Z.thread_fence[S.current] = ++Z.now;
}

EMU_EXPORT void emu_last_finding(emu_finding* out) { *out = g_finding; }

#undef EMU_PC
#undef EMU_EXPORT
}  // extern "C"
