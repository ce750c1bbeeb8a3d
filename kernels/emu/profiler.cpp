/*
 * profiler.cpp: kernels.profile(), the memory counts Nsight Compute shows for a kernel,
 * computed from the addresses the kernel touches.  Compiled into the runtime's translation
 * unit after sanitizer.cpp, whose on_access() hands it every load, store and atomic of an
 * instrumented module (the sanitizer's build; see sanitizer.cpp) when the launch asks for
 * EMU_PROFILE.  Plain launches never come here.
 *
 * Requests
 *   A GPU issues one load or store instruction for the 32 lanes of a warp together: one
 *   request, holding every active lane's address.  Here the lanes run one after another, so
 *   the accesses are grouped afterwards.  Each access is recorded as (warp, site, n, lane):
 *   the site is the instruction (its pc), n counts how often this thread has executed that
 *   site in the current phase (since the block's last __syncthreads()).  The accesses of equal
 *   (warp, site, n) are one request, the lanes that made them its active lanes.  A phase is
 *   grouped when it ends: when a barrier releases and when the block finishes.  (A phase of
 *   more than kMaxRecords accesses is grouped in pieces; cut_phases counts that, requests may
 *   then be split.)
 *
 *   A site the lanes of a warp execute different numbers of times is divergent: a load under
 *   `if (argmax[o] == me)` in a loop runs in different iterations in different lanes, so its
 *   n-th execution is not the same request in every lane.  Its accesses are grouped by the
 *   last access of a uniform site (one every executing lane runs equally often: the loop's
 *   unconditional load) that the thread made before it, and by how often the divergent site
 *   ran since: the lanes that took the branch in the same iteration make one request, as on a
 *   GPU.  With no uniform site before it (a grid-stride loop whose last iteration has fewer
 *   lanes), its own count is used.
 *
 * Global memory: sectors
 *   A request moves every 32-byte sector that one of its lanes touches.  Sectors are counted
 *   from the start of the argument's allocation (a GPU allocation starts 256-byte aligned; a
 *   NumPy array only 16 or 64), so that a float copy needs 4 sectors per request here as
 *   there.  Efficiency: the distinct bytes the lanes asked for over the bytes of those sectors
 *   (a broadcast asks for its 4 bytes once).
 *
 * Shared memory: wavefronts
 *   32 banks of 4-byte words, word w in bank w % 32.  A request needs as many passes
 *   (wavefronts) as the most-used bank has distinct words; lanes reading the same word share it
 *   (broadcast).  8-byte accesses are served per half-warp (16 lanes: 128 bytes, one pass when
 *   they are contiguous) and 16-byte accesses per quarter-warp, each group with its own passes:
 *   a contiguous float2 request needs 2 wavefronts, a float4 request 4, and that is its ideal.
 *   Bank conflicts = wavefronts - ideal wavefronts.
 *
 * DRAM estimate
 *   The distinct sectors of the argument arrays read and written over the whole launch: what a
 *   perfect L2 cache would fetch and write back (a lower bound; a GPU may move more).  The same
 *   per argument span (emu_profile_spans): what the performance model scales to a larger shape.
 *
 * Atomics on one address
 *   Every global atomic's address (one lane's) is counted in a table: how many lane-level
 *   atomics there were, on how many distinct addresses, and the most on any one of them
 *   (emu_profile_atomics).  A GPU applies the atomics of one address one after another in L2.
 *
 * An async copy (cp.async) counts twice: its global side as a load, its shared side as a shared
 * store (the banks see the same wavefronts as for a thread's st.shared).
 *
 * Not counted: local memory (each fiber's stack: what ptxas keeps in registers, the C++
 * compiler may keep on the stack), __constant__ and module variables.
 */

namespace {

constexpr unsigned kMaxSites = 4096;      // static sites per launch; more share the last one
constexpr unsigned kSiteHash = 8192;
constexpr size_t kMaxRecords = size_t(1) << 23;
constexpr int kGlobal = 0, kShared = 1;

struct ProfRecord {
    uint64_t key;      // warp << 59 | site << 47 | n << 5 | lane
    uint64_t addr;     // global: (span + 1) << 48 | offset from the allocation; shared: the address
    uint64_t group_hi, group_lo;   // the request (prof_flush), then the lane in the low 5 bits
    uint32_t size;
    uint8_t kind;      // EMU_ACCESS_READ / WRITE / ATOMIC
    uint8_t space;     // kGlobal / kShared
};

struct SiteCounter {   // executions of one site by one thread in one phase
    uint32_t phase, count;
};

struct Anchor {        // a thread's last access of a uniform site in the phase being grouped
    uint32_t phase = 0;
    bool valid = false;
    uint32_t site = 0;
    uint64_t n = 0, id = 0;
};

struct SinceAnchor {   // executions of a divergent site by a thread since its anchor
    uint32_t phase;
    uint32_t pad;
    uint64_t anchor, first_n;
};

struct ProfSpan {      // an argument span of the sanitizer (Z.spans): its allocation and sectors
    uintptr_t origin = 0;
    uint64_t first_sector = 0, nsectors = 0;
    unsigned char* marks = nullptr;   // per sector: 1 read, 2 written (in P.marks)
    uint64_t read = 0, written = 0;   // distinct sectors read / written (at the launch's end)
    uintptr_t lo = 0, hi = 0;         // the span's bytes (Z.spans is gone after the launch)
};

struct AtomicSlot {    // one address of the atomics table
    uint64_t addr, count;
};

struct Profiler {
    bool on = false;
    emu_profile totals;
    ProfRecord* records = nullptr;    // mmap'd, grown with mremap (no C heap during a launch)
    size_t nrecords = 0, capacity = 0;
    SiteCounter* counters = nullptr;  // [site][thread in block], mmap'd once
    SinceAnchor* since = nullptr;     // [site][thread in block], mmap'd once
    Anchor anchors[1024];
    uint32_t uniform_phase[32][kMaxSites];   // (warp, site) uniform in this phase?
    bool uniform_value[32][kMaxSites];
    uint32_t phase = 1;
    uint32_t hash_key[kSiteHash];     // pc offset + 1, 0: empty
    uint16_t hash_site[kSiteHash];
    emu_profile_site sites[kMaxSites][2];
    uint32_t site_block[kMaxSites][2];   // the block (+ 1) whose warps site_warps holds
    uint32_t site_warps[kMaxSites][2];   // a bit per warp of that block that used the site
    unsigned nsites = 0;
    std::vector<ProfSpan> spans;      // parallel to Z.spans
    unsigned char* marks = nullptr;
    size_t marks_bytes = 0;
    AtomicSlot* atomics = nullptr;    // open addressing, mmap'd, doubled when half full
    size_t atomics_capacity = 0, atomics_used = 0;
    uint64_t atomic_ops = 0, atomic_most = 0;
} P;

void* map_zeroed(size_t bytes) {
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return m == MAP_FAILED ? nullptr : m;
}

/* Called by san_launch_begin, after the spans are known (the C heap may still be used here). */
void prof_launch_begin(const emu_launch_params* p) {
    P.on = true;
    memset(&P.totals, 0, sizeof P.totals);
    memset(P.hash_key, 0, sizeof P.hash_key);
    P.nsites = 0;
    P.nrecords = 0;
    P.atomic_ops = P.atomic_most = 0;
    if (P.atomics && P.atomics_used) memset(P.atomics, 0, sizeof(AtomicSlot) * P.atomics_capacity);
    P.atomics_used = 0;
    if (++P.phase == 0) P.phase = 1;
    if (!P.counters) P.counters = static_cast<SiteCounter*>(map_zeroed(sizeof(SiteCounter) * kMaxSites * 1024));
    if (!P.since) P.since = static_cast<SinceAnchor*>(map_zeroed(sizeof(SinceAnchor) * kMaxSites * 1024));
    if (!P.records) {
        P.capacity = size_t(1) << 16;
        P.records = static_cast<ProfRecord*>(map_zeroed(sizeof(ProfRecord) * P.capacity));
        if (!P.records) P.capacity = 0;
    }
    // the sectors of every argument span, counted from its allocation's start
    P.spans.assign(Z.spans.size(), ProfSpan());
    size_t total = 0;
    for (size_t i = 0; i < Z.spans.size(); ++i) {
        const Span& s = Z.spans[i];
        if (s.kind != EMU_REGION_ARGUMENT || s.hi <= s.lo) continue;
        uintptr_t origin = s.lo;
        for (int r = 0; r < p->nregions; ++r) {
            const emu_region& g = p->regions[r];
            if (g.kind == EMU_REGION_ARGUMENT && g.begin >= s.lo && g.begin < s.hi && g.origin && g.origin <= s.lo)
                origin = std::min<uintptr_t>(origin, g.origin);
        }
        ProfSpan& ps = P.spans[i];
        ps.origin = origin;
        ps.lo = s.lo;
        ps.hi = s.hi;
        ps.first_sector = (s.lo - origin) >> 5;
        ps.nsectors = ((s.hi - 1 - origin) >> 5) - ps.first_sector + 1;
        total += ps.nsectors;
    }
    P.marks_bytes = total;
    P.marks = total ? static_cast<unsigned char*>(map_zeroed(total)) : nullptr;
    size_t at = 0;
    for (ProfSpan& ps : P.spans) {
        if (!ps.nsectors) continue;
        ps.marks = P.marks ? P.marks + at : nullptr;
        at += ps.nsectors;
    }
}

unsigned site_of(uintptr_t pc) {
    const uint32_t off = (uint32_t)(pc - Z.code_base);
    unsigned h = (off * 2654435761u) >> 19;   // 13 bits: kSiteHash
    while (P.hash_key[h] && P.hash_key[h] != off + 1) h = (h + 1) & (kSiteHash - 1);
    if (P.hash_key[h]) return P.hash_site[h];
    if (P.nsites == kMaxSites) return kMaxSites - 1;
    const unsigned s = P.nsites++;
    P.hash_key[h] = off + 1;
    P.hash_site[h] = (uint16_t)s;
    memset(P.sites[s], 0, sizeof P.sites[s]);
    memset(P.site_block[s], 0, sizeof P.site_block[s]);
    memset(P.site_warps[s], 0, sizeof P.site_warps[s]);
    for (int space = 0; space < 2; ++space) {
        P.sites[s][space].pc = pc;
        P.sites[s][space].space = space;
    }
    return s;
}

void prof_flush();

AtomicSlot* atomic_slot(AtomicSlot* table, size_t capacity, uint64_t addr) {
    size_t h = (size_t)((addr * 0x9E3779B97F4A7C15ull) >> 20) & (capacity - 1);
    while (table[h].count && table[h].addr != addr) h = (h + 1) & (capacity - 1);
    return &table[h];
}

/* One lane's global atomic at addr: the per-address counts (see the top of this file). */
void prof_atomic(uint64_t addr) {
    ++P.atomic_ops;
    if (P.atomics_used * 2 >= P.atomics_capacity) {   // grow: a new table, every address moved over
        const size_t capacity = P.atomics_capacity ? P.atomics_capacity * 2 : (size_t(1) << 12);
        AtomicSlot* grown = static_cast<AtomicSlot*>(map_zeroed(sizeof(AtomicSlot) * capacity));
        if (!grown) return;
        for (size_t i = 0; i < P.atomics_capacity; ++i)
            if (P.atomics[i].count) *atomic_slot(grown, capacity, P.atomics[i].addr) = P.atomics[i];
        if (P.atomics) munmap(P.atomics, sizeof(AtomicSlot) * P.atomics_capacity);
        P.atomics = grown;
        P.atomics_capacity = capacity;
    }
    AtomicSlot* slot = atomic_slot(P.atomics, P.atomics_capacity, addr);
    if (!slot->count) {
        slot->addr = addr;
        ++P.atomics_used;
    }
    P.atomic_most = std::max(P.atomic_most, ++slot->count);
}

/* One access of the running thread; sp: the sanitizer's span holding it (or none). */
void prof_access(const Span* sp, uintptr_t a, unsigned size, int kind, uintptr_t pc) {
    if (!size) return;
    // the shared side of an async copy (cp.async, LDGSTS) writes the banks as a store does: counted
    // as one (Nsight Compute reports it on the LDGSTS pipe; the wavefronts are the same)
    if (kind == EMU_ACCESS_ASYNC_COPY) kind = EMU_ACCESS_WRITE;
    uint64_t addr;
    uint8_t space;
    if (sp && sp->kind == EMU_REGION_ARGUMENT) {
        const size_t i = (size_t)(sp - Z.spans.data());
        ProfSpan& ps = P.spans[i];
        space = kGlobal;
        addr = ((uint64_t)(i + 1) << 48) | (uint64_t)(a - ps.origin);
        if (ps.marks) {   // the DRAM estimate: first touch of each sector, read and written
            const uint64_t last = std::min<uint64_t>((a + size - 1 - ps.origin) >> 5, ps.first_sector + ps.nsectors - 1);
            for (uint64_t s = (a - ps.origin) >> 5; s <= last; ++s) {
                unsigned char& m = ps.marks[s - ps.first_sector];
                const unsigned char bits = kind == EMU_ACCESS_READ ? 1 : kind == EMU_ACCESS_WRITE ? 2 : 3;
                if ((bits & 1) && !(m & 1)) ++P.totals.dram_sectors_read;
                if ((bits & 2) && !(m & 2)) ++P.totals.dram_sectors_written;
                m |= bits;
            }
        }
        if (kind == EMU_ACCESS_ATOMIC) prof_atomic(addr);
    } else if (sp) {
        space = kShared;
        addr = a;
    } else {
        for (const auto& seg : Z.ignore)   // the module's own variables, __constant__ data
            if (a >= seg.first && a < seg.second) return;
        space = kGlobal;
        addr = a;
        ++P.totals.outside_arguments;
    }
    const unsigned site = site_of(pc);
    const int t = S.current;
    SiteCounter& c = P.counters[(size_t)site * 1024 + (unsigned)t];
    if (c.phase != P.phase) {
        c.phase = P.phase;
        c.count = 0;
    }
    const uint64_t n = c.count++;
    if (P.nrecords == P.capacity) {
        if (P.capacity >= kMaxRecords || !P.records) {
            ++P.totals.cut_phases;
            prof_flush();
        } else {
            void* m = mremap(P.records, sizeof(ProfRecord) * P.capacity, sizeof(ProfRecord) * P.capacity * 2,
                             MREMAP_MAYMOVE);
            if (m == MAP_FAILED) {
                ++P.totals.cut_phases;
                prof_flush();
            } else {
                P.records = static_cast<ProfRecord*>(m);
                P.capacity *= 2;
            }
        }
        if (!P.records) return;
    }
    P.records[P.nrecords++] = ProfRecord{((uint64_t)(t >> 5) << 59) | ((uint64_t)site << 47) |
                                             ((n & ((uint64_t(1) << 42) - 1)) << 5) | (uint64_t)(t & 31),
                                         addr, 0, 0, size, (uint8_t)kind, space};
}

/* The length of the union of [lo[i], hi[i]) (small arrays, sorted here by insertion). */
uint64_t union_length(uint64_t* lo, uint64_t* hi, int n) {
    for (int i = 1; i < n; ++i)
        for (int j = i; j > 0 && lo[j] < lo[j - 1]; --j) {
            std::swap(lo[j], lo[j - 1]);
            std::swap(hi[j], hi[j - 1]);
        }
    uint64_t total = 0, end = 0;
    for (int i = 0; i < n; ++i) {
        const uint64_t b = std::max(lo[i], end);
        if (hi[i] > b) total += hi[i] - b;
        end = std::max(end, hi[i]);
    }
    return total;
}

/* One warp-level request: records r[0..n) (one per lane, sorted by lane), all in one space. */
void prof_request(const ProfRecord* const* r, int n) {
    const int k = r[0]->kind <= EMU_ACCESS_ATOMIC ? r[0]->kind : EMU_ACCESS_READ;
    const int space = r[0]->space;
    uint64_t lo[32], hi[32];
    unsigned size = 0;
    for (int i = 0; i < n; ++i) {
        lo[i] = r[i]->addr;
        hi[i] = r[i]->addr + r[i]->size;
        size = std::max(size, r[i]->size);
    }
    const uint64_t bytes = union_length(lo, hi, n);
    const unsigned site_index = (unsigned)((r[0]->key >> 47) & 0xfff);
    emu_profile_site& site = P.sites[site_index][space];
    if (P.site_block[site_index][space] != Z.block + 1) {   // blocks run one after another
        site.warps += (unsigned)__builtin_popcount(P.site_warps[site_index][space]);
        P.site_block[site_index][space] = Z.block + 1;
        P.site_warps[site_index][space] = 0;
    }
    P.site_warps[site_index][space] |= 1u << ((r[0]->key >> 59) & 31);
    site.kind = k;
    site.size = std::max<int>(site.size, (int)size);
    site.requests += 1;
    site.bytes += bytes;
    site.lanes += (unsigned)n;
    if (space == kGlobal) {
        for (int i = 0; i < n; ++i) {
            lo[i] = r[i]->addr >> 5;
            hi[i] = ((r[i]->addr + r[i]->size - 1) >> 5) + 1;
        }
        const uint64_t sectors = union_length(lo, hi, n);
        P.totals.global_requests[k] += 1;
        P.totals.global_sectors[k] += sectors;
        P.totals.global_bytes[k] += bytes;
        site.units += sectors;
        return;
    }
    // shared memory: lanes in groups (the whole warp; half-warps for 8 bytes; quarter-warps for 16)
    const int lanes_per_group = size >= 16 ? 8 : size >= 8 ? 16 : 32;
    uint64_t wavefronts = 0, ideal = 0;
    for (int i = 0; i < n;) {
        const int group = (int)(r[i]->key & 31) / lanes_per_group;
        uint64_t words[32 * 8];
        int nwords = 0;
        for (; i < n && (int)(r[i]->key & 31) / lanes_per_group == group; ++i) {
            const uint64_t w0 = r[i]->addr >> 2, w1 = (r[i]->addr + r[i]->size - 1) >> 2;
            for (uint64_t w = w0; w <= w1 && w < w0 + 8 && nwords < 32 * 8; ++w) words[nwords++] = w;
        }
        std::sort(words, words + nwords);
        int per_bank[32] = {0}, most = 0;
        for (int j = 0; j < nwords; ++j)
            if (j == 0 || words[j] != words[j - 1]) most = std::max(most, ++per_bank[words[j] & 31]);
        wavefronts += (uint64_t)most;
        ideal += 1;
    }
    P.totals.shared_requests[k] += 1;
    P.totals.shared_wavefronts[k] += wavefronts;
    P.totals.shared_ideal[k] += ideal;
    P.totals.shared_bytes[k] += bytes;
    site.units += wavefronts;
    site.ideal += ideal;
}

/* Did every lane of warp w that executed site s in this phase execute it equally often? */
bool uniform_site(unsigned w, unsigned s) {
    if (P.uniform_phase[w][s] == P.phase) return P.uniform_value[w][s];
    uint32_t seen = 0;
    bool same = true;
    for (int l = 0; l < 32 && (int)w * 32 + l < S.nthreads; ++l) {
        const SiteCounter& c = P.counters[(size_t)s * 1024 + w * 32 + l];
        if (c.phase != P.phase || !c.count) continue;
        if (!seen) seen = c.count;
        else if (c.count != seen) {
            same = false;
            break;
        }
    }
    P.uniform_phase[w][s] = P.phase;
    P.uniform_value[w][s] = same;
    return same;
}

/* The end of a phase: group its records into requests (see the top of this file) and count them. */
void prof_flush() {
    const size_t n = P.nrecords;
    P.nrecords = 0;
    ProfRecord* rec = P.records;
    // which request each access belongs to; records are in each thread's program order
    for (size_t i = 0; i < n; ++i) {
        ProfRecord& r = rec[i];
        const unsigned w = (unsigned)(r.key >> 59), s = (unsigned)(r.key >> 47) & 0xfff, lane = r.key & 31;
        const unsigned t = w * 32 + lane;
        const uint64_t count = (r.key >> 5) & ((uint64_t(1) << 42) - 1);
        Anchor& a = P.anchors[t];
        if (a.phase != P.phase) a = Anchor{P.phase, false, 0, 0, 0};
        uint64_t anchor_site = s, anchor_n = count, since = 0, divergent = 0;
        if (uniform_site(w, s)) {
            a.valid = true;
            a.site = s;
            a.n = count;
            a.id = i;
        } else if (a.valid) {
            SinceAnchor& b = P.since[(size_t)s * 1024 + t];
            if (b.phase != P.phase || b.anchor != a.id) b = SinceAnchor{P.phase, 0, a.id, count};
            anchor_site = a.site;
            anchor_n = a.n;
            since = std::min<uint64_t>(count - b.first_n, 0xffff);
            divergent = 1;
        }
        r.group_hi = ((uint64_t)w << 25) | ((uint64_t)s << 13) | (anchor_site << 1) | divergent;
        r.group_lo = (anchor_n << 21) | (since << 5) | lane;
    }
    if (++P.phase == 0) {   // after 4 billion phases: forget every count
        memset(P.counters, 0, sizeof(SiteCounter) * kMaxSites * 1024);
        memset(P.since, 0, sizeof(SinceAnchor) * kMaxSites * 1024);
        memset(P.uniform_phase, 0, sizeof P.uniform_phase);
        for (Anchor& a : P.anchors) a = Anchor();
        P.phase = 1;
    }
    if (!n) return;
    std::sort(rec, rec + n, [](const ProfRecord& x, const ProfRecord& y) {
        return x.group_hi != y.group_hi ? x.group_hi < y.group_hi : x.group_lo < y.group_lo;
    });
    const ProfRecord* part[2][32];
    for (size_t i = 0; i < n;) {
        const uint64_t hi = rec[i].group_hi, lo = rec[i].group_lo >> 5;
        int count[2] = {0, 0};
        for (; i < n && rec[i].group_hi == hi && rec[i].group_lo >> 5 == lo; ++i) {
            const int s = rec[i].space;
            if (count[s] < 32) part[s][count[s]++] = &rec[i];
        }
        for (int s = 0; s < 2; ++s)
            if (count[s]) prof_request(part[s], count[s]);
    }
}

void prof_launch_end() {
    if (!P.on) return;
    prof_flush();
    for (unsigned s = 0; s < P.nsites; ++s)
        for (int space = 0; space < 2; ++space) {
            P.sites[s][space].warps += (unsigned)__builtin_popcount(P.site_warps[s][space]);
            P.site_warps[s][space] = 0;
            P.site_block[s][space] = 0;
        }
    for (ProfSpan& ps : P.spans) {
        ps.read = ps.written = 0;
        for (uint64_t i = 0; ps.marks && i < ps.nsectors; ++i) {
            ps.read += ps.marks[i] & 1;
            ps.written += (ps.marks[i] >> 1) & 1;
        }
        ps.marks = nullptr;
    }
    if (P.marks) munmap(P.marks, P.marks_bytes);
    P.marks = nullptr;
    P.marks_bytes = 0;
    P.totals.nsites = (int)P.nsites;
    P.on = false;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) void emu_last_profile(emu_profile* out) { *out = P.totals; }

/* The sites of the last profiled launch with at least one request: up to `capacity` entries
 * (one per site and memory space) written to out; returns how many there are in all. */
__attribute__((visibility("default"))) int emu_profile_sites(emu_profile_site* out, int capacity) {
    int count = 0;
    for (unsigned s = 0; s < P.nsites; ++s)
        for (int space = 0; space < 2; ++space) {
            if (!P.sites[s][space].requests) continue;
            if (count < capacity) out[count] = P.sites[s][space];
            ++count;
        }
    return count;
}

/* The argument spans of the last profiled launch: up to `capacity` entries of (first byte, end,
 * distinct 32-byte sectors read, written) written to out; returns how many there are. */
__attribute__((visibility("default"))) int emu_profile_spans(unsigned long long* out, int capacity) {
    int count = 0;
    for (size_t i = 0; i < P.spans.size(); ++i) {
        if (!P.spans[i].nsectors) continue;
        if (count < capacity) {
            out[4 * count] = P.spans[i].lo;
            out[4 * count + 1] = P.spans[i].hi;
            out[4 * count + 2] = P.spans[i].read;
            out[4 * count + 3] = P.spans[i].written;
        }
        ++count;
    }
    return count;
}

/* The global atomics of the last profiled launch: out[0] lane-level atomics, out[1] distinct
 * addresses, out[2] the most atomics on one address. */
__attribute__((visibility("default"))) void emu_profile_atomics(unsigned long long* out) {
    out[0] = P.atomic_ops;
    out[1] = P.atomics_used;
    out[2] = P.atomic_most;
}

}  // extern "C"
