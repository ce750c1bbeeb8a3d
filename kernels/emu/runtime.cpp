/*
 * runtime.cpp: the CPU emulator's runtime.  It runs a CUDA grid on one CPU thread.
 *
 * How a launch runs
 *   Blocks run one after another (blockIdx.x fastest).  Inside a block every CUDA thread gets a
 *   fiber: its own stack and saved registers.  A fiber runs the kernel until it reaches something
 *   that needs the other threads (a __syncthreads(), a warp shuffle/vote) or returns; then it
 *   switches back to the scheduler, which resumes the next ready thread.  So barriers have real
 *   semantics, and a block of 256 threads with a few barriers costs a few thousand register
 *   switches: microseconds.
 *
 *   Threads never run at the same time, so atomics are plain read-modify-writes and a racy
 *   kernel runs in one particular serial order: it may pass here and fail on a GPU.  The order
 *   is the schedule's (KERNELS_EMU_SCHEDULE): forward (thread 0 first), reverse, or random;
 *   racecheck (emu/sanitizer.cpp, KERNELS_EMU_SANITIZE) finds the races whatever the order.
 *
 * What it checks, as a GPU would (or better)
 *   - threads of one block waiting at different __syncthreads() calls: an error naming the
 *     lines, instead of a hang (threads that have returned do not block a barrier); each call
 *     site is one barrier, two on one line included;
 *   - a warp collective that can never complete (a lane named in the mask has returned) or whose
 *     lanes disagree on the operation or the mask: an error;
 *   - SIGSEGV / SIGBUS / SIGFPE inside a kernel: caught (siglongjmp back to the launch), reported
 *     with the faulting address, block and thread; Python then names the argument array that was
 *     overrun when the debug mode put guard pages around every array;
 *   - assert(), __trap(), exit() and abort() in kernel code stop the launch with an error;
 *   - synccheck (KERNELS_EMU_SANITIZE): a barrier released while threads of the block have
 *     returned; a collective whose mask names a lane that returned or does not exist;
 *   - the guard bytes: the 8 bytes just before and just after every array argument are copied
 *     before the launch and compared after it, so a write just past either end (the classic
 *     off-by-one) is reported, naming the argument, instead of corrupting the heap silently.
 *
 * Ctrl-C
 *   The kernel runs inside Python's ctypes call, where Python's own SIGINT handler cannot act,
 *   so during a launch the runtime handles SIGINT itself.  The handler looks at where the
 *   signal interrupted the thread: inside the kernel module's own machine code (a spinning
 *   `while (1);` included) it jumps straight back to the launch (siglongjmp, as for a fault:
 *   kernel code holds no locks).  Anywhere else (inside printf, expf, the runtime) it only sets
 *   a flag, which the scheduler checks at every switch, and re-arms a 20 ms timer that repeats
 *   the check, until the thread is caught in kernel code or at a switch.
 *
 * Floating point as CuPy compiles it
 *   CuPy always compiles with -ftz=true: float32 operations flush denormal inputs and results
 *   to zero.  The launch sets the CPU's FTZ and DAZ modes (MXCSR on x86-64) for the kernel and
 *   restores them after.  They apply to double arithmetic too, which a GPU never flushes.
 *
 * Fibers: a few lines of x86-64 assembly switch stacks (the callee-saved registers of the SysV
 * ABI; kernels never change the floating-point control registers, so those are not switched).
 * Elsewhere ucontext is used.  A thread that blocks hands over directly to the next ready
 * thread; only when none is ready does control go back to the scheduler (to release a barrier
 * or to report a deadlock).
 */
#include "emu_abi.h"

#include <cerrno>
#include <csetjmp>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include <dlfcn.h>
#include <link.h>
#if defined(__GLIBC__)
#include <stdio_ext.h>
#endif
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#if !defined(__x86_64__) || defined(EMU_USE_UCONTEXT)
#define EMU_UCONTEXT 1
#include <ucontext.h>
#endif

/* ------------------------------------------------------------------ the CUDA built-ins */
extern "C" {
__attribute__((visibility("default"))) uint3 threadIdx;
__attribute__((visibility("default"))) uint3 blockIdx;
__attribute__((visibility("default"))) dim3 blockDim;
__attribute__((visibility("default"))) dim3 gridDim;
}

namespace {

/* ------------------------------------------------------------------ context switching */
#ifndef EMU_UCONTEXT
extern "C" void emu_ctx_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl emu_ctx_switch
    .hidden emu_ctx_switch
    .type emu_ctx_switch, @function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch
)");

struct Context { void* sp = nullptr; };

void context_init(Context* c, char* stack_top, void (*fn)()) {
    uintptr_t* sp = reinterpret_cast<uintptr_t*>(stack_top);  // 16-byte aligned
    *--sp = 0;                                     // fake return address for debuggers
    *--sp = reinterpret_cast<uintptr_t>(fn);       // `ret` lands here with rsp % 16 == 8
    for (int i = 0; i < 6; ++i) *--sp = 0;         // rbp rbx r12 r13 r14 r15
    c->sp = sp;
}
inline void context_switch(Context* from, Context* to) { emu_ctx_switch(&from->sp, to->sp); }
#else
struct Context { ucontext_t uc; };
void context_init(Context* c, char* stack_top, void (*fn)(), size_t stack_size) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack_top - stack_size;
    c->uc.uc_stack.ss_size = stack_size;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, fn, 0);
}
inline void context_switch(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
#endif

/* ------------------------------------------------------------------ scheduler state */
constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;   // per CUDA thread (fiber)
constexpr size_t kStackGuard = 16 * 1024;    // PROT_NONE below each stack: overflow -> error

enum ThreadState : uint8_t { READY, WAIT_BARRIER, WAIT_WARP, DONE };

struct AsyncCopy {
    unsigned char* dst;
    const unsigned char* src;
    unsigned size, zfill, batch;
    uintptr_t pc;
};

struct Thread {
    Context ctx;
    uint3 tid;
    ThreadState state;
    // barrier
    const char* bar_file;
    int bar_line;
    int bar_site;    // the call site among those of the line (cuda_emu.h: __COUNTER__)
    int bar_pred;
    // warp collective
    int w_kind;
    unsigned w_mask;
    unsigned long long w_value;
    unsigned long long w_result;
    int w_arg;
    int w_width;
    const char* w_file;
    int w_line;
    // cuda_pipeline: copies issued and not yet waited for (in g_copies), commits so far
    unsigned ncopies;
    unsigned committed;
};

struct Warp {
    unsigned arrived;    // lanes waiting at a warp collective
    unsigned existing;   // lanes that exist (the last warp of a block may be partial)
    unsigned done;       // lanes that have returned
};

struct Scheduler {
    const emu_launch_params* p = nullptr;
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    std::vector<int> ready;   // ring buffer of thread indices, a power of two long
    size_t ready_head = 0, ready_count = 0, ready_mask = 0;
    int nthreads = 0;
    int live = 0;
    int bar_waiting = 0;
    int bar_count = 0, bar_all = 0, bar_any = 0;   // __syncthreads_count/_and/_or results
    int current = -1;
    Context sched_ctx;
    bool aborted = false;
    int error_code = EMU_OK;

    char* stacks = nullptr;      // nthreads_capacity * (guard + stack)
    size_t stacks_capacity = 0;  // in threads

    // KERNELS_EMU_SCHEDULE: the order ready threads (and blocks) are taken in
    int schedule = EMU_SCHEDULE_FORWARD;
    uint64_t rng = 0;
    std::vector<int> order;      // scratch for one permutation
} S;

/* The sanitizer (emu/sanitizer.cpp, compiled into this unit after this file) */
void san_launch_begin(const emu_launch_params* p);
void san_launch_end();
void san_block_begin(unsigned linear_block);
void san_barrier_released();
void san_warp_synced(int warp, unsigned lanes);
void san_async_issued(const AsyncCopy& c);
void san_async_landed(int thread, const AsyncCopy& c);
void san_sync_finding(int what, int thread, int other, unsigned mask, const char* file, int line);
bool san_checking(int check) { return S.p && (S.p->sanitize & check); }

/* xorshift64*: the random schedule's generator (seeded per launch from Python) */
uint64_t next_random() {
    S.rng ^= S.rng >> 12;
    S.rng ^= S.rng << 25;
    S.rng ^= S.rng >> 27;
    return S.rng * 0x2545F4914F6CDD1Dull;
}

/* The k-th of `n` indices in the order of the schedule: forward, reverse, or the random
 * permutation that schedule_permutation(n) drew last. */
inline int scheduled(int k, int n) {
    const int kind = S.schedule;
    return kind == EMU_SCHEDULE_FORWARD ? k : kind == EMU_SCHEDULE_REVERSE ? n - 1 - k : S.order[k];
}
void schedule_permutation(int n) {
    if (S.schedule != EMU_SCHEDULE_RANDOM) return;
    int* order = S.order.data();   // reserved for 1024 at each launch
    for (int i = 0; i < n; ++i) order[i] = i;
    for (int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random() % (unsigned)(i + 1)]);
}

char g_error[4096];
emu_fault_info g_fault;
sigjmp_buf g_jmp;
volatile sig_atomic_t g_in_launch = 0;
struct sigaction g_old_segv, g_old_bus, g_old_fpe, g_old_ill, g_old_int;
// Ctrl-C during a launch (see "Ctrl-C" above)
volatile sig_atomic_t g_stop_requested = 0;   // the kernel must stop at the next chance
volatile sig_atomic_t g_sigint_count = 0;     // SIGINTs from the user during this launch
int g_sigint_mode = EMU_SIGINT_LEAVE;
pthread_t g_launch_thread;

void set_error(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    S.error_code = code;
    S.aborted = true;
}

/* "block (1,0,0) thread (37,0,0)" */
std::string where(int t) {
    char buf[128];
    const uint3& tid = S.threads[t].tid;
    snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y,
             blockIdx.z, tid.x, tid.y, tid.z);
    return buf;
}

__attribute__((always_inline)) inline void push_ready(int t) {
    S.ready[(S.ready_head + S.ready_count) & S.ready_mask] = t;
    ++S.ready_count;
}
__attribute__((always_inline)) inline int pop_ready() {
    int t = S.ready[S.ready_head];
    S.ready_head = (S.ready_head + 1) & S.ready_mask;
    --S.ready_count;
    return t;
}

/* The running fiber blocks: hand over to the next ready thread, or to the scheduler if none. */
__attribute__((cold, noinline)) void poll_interrupt();

__attribute__((always_inline)) inline void yield_to_scheduler() {
    if (__builtin_expect(g_stop_requested, 0)) poll_interrupt();
    Thread& t = S.threads[S.current];
    if (S.ready_count > 0 && !S.aborted) {
        int next = pop_ready();
        if (next == S.current) return;   // it queued itself first (a collective's last lane)
        S.current = next;
        threadIdx = S.threads[next].tid;
        context_switch(&t.ctx, &S.threads[next].ctx);
    } else {
        context_switch(&t.ctx, &S.sched_ctx);
    }
}

/* cuda_pipeline: copies in flight, kMaxCopies per thread, in pages of their own: nothing is
 * taken from the C heap while a kernel runs (the guard bytes of arrays may sit next to the
 * heap's own bookkeeping, which must not change during a launch). */
constexpr unsigned kMaxCopies = 64;
AsyncCopy* g_copies = nullptr;

AsyncCopy* copies_of(int thread) {
    if (!g_copies) {
        void* m = mmap(nullptr, sizeof(AsyncCopy) * kMaxCopies * 1024, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        g_copies = m == MAP_FAILED ? nullptr : static_cast<AsyncCopy*>(m);
    }
    return g_copies ? g_copies + (size_t)thread * kMaxCopies : nullptr;
}

/* The copies of `thread` issued before batch `below_batch` land now (a copy is done when waited
 * for, so that a read before the wait sees the old bytes, as it may on a GPU).
 * `waited`: by __pipeline_wait_prior, which orders them for racecheck; at exit they only land. */
void complete_copies(int thread, unsigned below_batch, bool waited = false) {
    Thread& t = S.threads[thread];
    if (!t.ncopies) return;
    AsyncCopy* copies = copies_of(thread);
    unsigned kept = 0;
    for (unsigned i = 0; i < t.ncopies; ++i) {
        const AsyncCopy c = copies[i];
        if (c.batch >= below_batch) {
            copies[kept++] = c;
            continue;
        }
        memcpy(c.dst, c.src, c.size - c.zfill);
        memset(c.dst + (c.size - c.zfill), 0, c.zfill);
        if (waited && S.p->sanitize) san_async_landed(thread, c);
    }
    t.ncopies = kept;
}

void fiber_main() {
    Thread& t = S.threads[S.current];
    S.p->entry(S.p->args);
    // Copies never waited for still land (a GPU finishes them), but stay "not waited for"
    // for racecheck: nothing orders them with the readers.
    if (t.ncopies) complete_copies(S.current, ~0u);
    t.state = DONE;
    --S.live;
    int linear = S.current;
    Warp& wp = S.warps[linear / kWarpSize];
    wp.done |= 1u << (linear % kWarpSize);
    if (wp.arrived && san_checking(EMU_CHECK_SYNCCHECK)) {
        // a lane of my warp waits in a collective whose mask names me: it would wait forever
        for (unsigned a = wp.arrived; a; a &= a - 1) {
            const int waiter = (linear & ~(kWarpSize - 1)) + __builtin_ctz(a);
            const Thread& w = S.threads[waiter];
            if (w.w_mask >> (linear % kWarpSize) & 1) {
                san_sync_finding(EMU_SAN_MASK_EXITED, waiter, linear, w.w_mask, w.w_file, w.w_line);
                break;
            }
        }
    }
    yield_to_scheduler();
    // never resumed
    abort();
}

bool ensure_stacks(size_t n) {
    if (S.stacks_capacity >= n) return true;
    if (S.stacks) munmap(S.stacks, S.stacks_capacity * (kStackBytes + kStackGuard));
    size_t bytes = n * (kStackBytes + kStackGuard);
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) {
        S.stacks = nullptr;
        S.stacks_capacity = 0;
        return false;
    }
    S.stacks = static_cast<char*>(m);
    for (size_t i = 0; i < n; ++i) mprotect(S.stacks + i * (kStackBytes + kStackGuard), kStackGuard, PROT_NONE);
    S.stacks_capacity = n;
    return true;
}

/* ------------------------------------------------------------------ barriers */
void release_barrier() {
    // Every live thread waits at a barrier: they must all be at the same one.
    int first = -1;
    for (int i = 0; i < S.nthreads; ++i) {
        Thread& t = S.threads[i];
        if (t.state != WAIT_BARRIER) continue;
        if (first < 0) {
            first = i;
            continue;
        }
        Thread& f = S.threads[first];
        const bool same_line = t.bar_line == f.bar_line && strcmp(t.bar_file, f.bar_file) == 0;
        if (!same_line || t.bar_site != f.bar_site) {
            set_error(EMU_ERR_BARRIER,
                      "divergent __syncthreads() in kernel '%s': %s waits at %s:%d while %s waits at %s"
                      "%s:%d; every thread of a block must reach the same __syncthreads() (or return)",
                      S.p->kernel_name, where(first).c_str(), f.bar_file, f.bar_line, where(i).c_str(),
                      same_line ? "another __syncthreads() of the same line, " : "", t.bar_file, t.bar_line);
            return;
        }
    }
    if (S.live < S.nthreads && san_checking(EMU_CHECK_SYNCCHECK)) {
        int exited = -1;
        for (int i = 0; i < S.nthreads && exited < 0; ++i)
            if (S.threads[i].state == DONE) exited = i;
        Thread& f = S.threads[first];
        san_sync_finding(EMU_SAN_BARRIER_EXITED, first, exited, 0, f.bar_file, f.bar_line);
        return;
    }
    // __syncthreads_count/_and/_or: reduce the predicates of the waiting threads.
    int count = 0, all = 1, any = 0;
    for (int i = 0; i < S.nthreads; ++i) {
        Thread& t = S.threads[i];
        if (t.state != WAIT_BARRIER) continue;
        count += t.bar_pred != 0;
        all &= t.bar_pred != 0;
        any |= t.bar_pred != 0;
    }
    S.bar_count = count;
    S.bar_all = all;
    S.bar_any = any;
    schedule_permutation(S.nthreads);
    for (int k = 0; k < S.nthreads; ++k) {
        const int i = scheduled(k, S.nthreads);
        Thread& t = S.threads[i];
        if (t.state != WAIT_BARRIER) continue;
        t.state = READY;
        push_ready(i);
    }
    S.bar_waiting = 0;
    if (S.p->sanitize) san_barrier_released();
}

void report_deadlock() {
    // No thread can run, and not every live thread is at the barrier.
    std::string msg;
    char buf[512];
    for (int w = 0; w < (int)S.warps.size(); ++w) {
        Warp& wp = S.warps[w];
        for (int lane = 0; lane < kWarpSize; ++lane) {
            if (!(wp.arrived >> lane & 1)) continue;
            Thread& t = S.threads[w * kWarpSize + lane];
            unsigned need = t.w_mask & wp.existing;
            unsigned missing = need & ~wp.arrived;
            int m = missing ? __builtin_ctz(missing) : -1;
            const char* why = "is waiting elsewhere";
            if (m >= 0 && (wp.done >> m & 1)) why = "has already returned";
            else if (m >= 0 && S.threads[w * kWarpSize + m].state == WAIT_BARRIER) why = "waits at __syncthreads()";
            snprintf(buf, sizeof buf,
                     "%s waits in a warp collective at %s:%d with mask 0x%08x, but lane %d of its warp %s",
                     where(w * kWarpSize + lane).c_str(), t.w_file, t.w_line, t.w_mask, m, why);
            msg = buf;
            break;
        }
        if (!msg.empty()) break;
    }
    if (msg.empty()) msg = "no thread can make progress";
    set_error(EMU_ERR_DEADLOCK, "deadlock in kernel '%s': %s", S.p->kernel_name, msg.c_str());
}

/* ------------------------------------------------------------------ one block */
void run_block() {
    const int n = S.nthreads;
    const unsigned bx = S.p->block[0], by = S.p->block[1];
    for (int i = 0; i < n; ++i) {
        Thread& t = S.threads[i];
        t.tid = uint3{(unsigned)(i % bx), (unsigned)((i / bx) % by), (unsigned)(i / (bx * by))};
        t.state = READY;
        t.ncopies = 0;
        t.committed = 0;
        // Stagger the stack tops (cache colouring): equal offsets would share cache sets.
        char* top = S.stacks + (size_t)i * (kStackBytes + kStackGuard) + kStackGuard + kStackBytes - (i % 64) * 64;
#ifndef EMU_UCONTEXT
        context_init(&t.ctx, top, fiber_main);
#else
        context_init(&t.ctx, top, fiber_main, kStackBytes);
#endif
    }
    for (size_t w = 0; w < S.warps.size(); ++w) {
        int lanes = n - (int)w * kWarpSize;
        S.warps[w].existing = lanes >= kWarpSize ? 0xffffffffu : ((1u << lanes) - 1u);
        S.warps[w].arrived = 0;
        S.warps[w].done = 0;
    }
    S.ready_head = 0;
    S.ready_count = 0;
    schedule_permutation(n);
    for (int k = 0; k < n; ++k) push_ready(scheduled(k, n));
    S.live = n;
    S.bar_waiting = 0;

    if (S.p->debug) {
        // Shared memory starts undefined on a GPU; make reads before writes visible (NaN, -1).
        if (S.p->dynamic_shared && S.p->shared_mem) memset(S.p->dynamic_shared, 0xff, S.p->shared_mem);
        if (S.p->static_shared_begin && S.p->static_shared_end > S.p->static_shared_begin)
            memset(S.p->static_shared_begin, 0xff, S.p->static_shared_end - S.p->static_shared_begin);
        // __shared__ variables g++ left outside the section (static locals of templates: cuda_emu.h)
        const uintptr_t lo = (uintptr_t)S.p->static_shared_begin, hi = (uintptr_t)S.p->static_shared_end;
        for (int i = 0; i < S.p->nregions; ++i) {
            const emu_region& r = S.p->regions[i];
            if (r.kind == EMU_REGION_SHARED && r.end > r.begin && (r.begin >= hi || r.end <= lo))
                memset(reinterpret_cast<void*>(r.begin), 0xff, r.end - r.begin);
        }
    }

    while (S.live > 0) {
        if (g_stop_requested) {
            poll_interrupt();
            return;
        }
        if (S.ready_count > 0) {
            int t = pop_ready();
            S.current = t;
            threadIdx = S.threads[t].tid;
            context_switch(&S.sched_ctx, &S.threads[t].ctx);
            if (S.aborted) return;
        } else if (S.bar_waiting == S.live) {
            release_barrier();
            if (S.aborted) return;
        } else {
            report_deadlock();
            return;
        }
    }
}

/* ------------------------------------------------------------------ signals */
void on_fault(int sig, siginfo_t* info, void* uctx) {
    if (!g_in_launch) {
        // Not ours: restore whatever was installed before and let it run again.
        struct sigaction* old = sig == SIGSEGV ? &g_old_segv : sig == SIGBUS ? &g_old_bus
                              : sig == SIGFPE ? &g_old_fpe : &g_old_ill;
        sigaction(sig, old, nullptr);
        return;
    }
    g_fault.signal = sig;
    g_fault.address = reinterpret_cast<unsigned long long>(info->si_addr);
    g_fault.is_write = -1;
#if defined(__x86_64__) && defined(REG_ERR)
    if (sig == SIGSEGV && uctx) {
        auto* uc = static_cast<ucontext_t*>(uctx);
        g_fault.is_write = (uc->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
    }
#else
    (void)uctx;
#endif
    g_fault.in_stack_guard = 0;
    if (S.stacks && sig == SIGSEGV) {
        char* a = static_cast<char*>(info->si_addr);
        if (a >= S.stacks && a < S.stacks + S.stacks_capacity * (kStackBytes + kStackGuard)) {
            size_t off = (size_t)(a - S.stacks) % (kStackBytes + kStackGuard);
            g_fault.in_stack_guard = off < kStackGuard;
        }
    }
    g_fault.block[0] = blockIdx.x;
    g_fault.block[1] = blockIdx.y;
    g_fault.block[2] = blockIdx.z;
    if (S.current >= 0) {
        g_fault.thread[0] = S.threads[S.current].tid.x;
        g_fault.thread[1] = S.threads[S.current].tid.y;
        g_fault.thread[2] = S.threads[S.current].tid.z;
    }
    siglongjmp(g_jmp, 1);
}

thread_local char* t_altstack = nullptr;

void install_handlers() {
    if (!t_altstack) {
        size_t sz = 64 * 1024;
        t_altstack = static_cast<char*>(malloc(sz));
        stack_t ss;
        ss.ss_sp = t_altstack;
        ss.ss_size = sz;
        ss.ss_flags = 0;
        sigaltstack(&ss, nullptr);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
    sigaction(SIGFPE, &sa, &g_old_fpe);
    sigaction(SIGILL, &sa, &g_old_ill);
}

void restore_handlers() {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaction(SIGFPE, &g_old_fpe, nullptr);
    sigaction(SIGILL, &g_old_ill, nullptr);
}

/* ---- Ctrl-C */
__attribute__((cold, noinline)) void poll_interrupt() {
    if (S.aborted) return;
    if (S.current >= 0)
        set_error(EMU_ERR_INTERRUPTED, "kernel '%s' interrupted (Ctrl-C) in %s", S.p->kernel_name,
                  where(S.current).c_str());
    else
        set_error(EMU_ERR_INTERRUPTED, "kernel '%s' interrupted (Ctrl-C) before block (%u,%u,%u)",
                  S.p->kernel_name, blockIdx.x, blockIdx.y, blockIdx.z);
}

/* The code range of the loaded object (kernel module) that holds `address`. */
struct CodeRangeQuery { uintptr_t address, begin, end; };

int find_code_range(struct dl_phdr_info* info, size_t, void* data) {
    auto* q = static_cast<CodeRangeQuery*>(data);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD || !(ph.p_flags & PF_X)) continue;
        uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
        if (q->address >= lo && q->address < hi) {
            q->begin = lo;
            q->end = hi;
            return 1;
        }
    }
    return 0;
}

bool interrupted_in_kernel_code(void* uctx) {
    uintptr_t pc = 0;
#if defined(__x86_64__) && defined(REG_RIP)
    pc = static_cast<uintptr_t>(static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_RIP]);
#elif defined(__aarch64__)
    pc = static_cast<uintptr_t>(static_cast<ucontext_t*>(uctx)->uc_mcontext.pc);
#else
    (void)uctx;
#endif
    return pc && S.p && pc >= (uintptr_t)S.p->code_begin && pc < (uintptr_t)S.p->code_end;
}

/* One POSIX timer per process, aimed at the launching (main) thread, that re-sends SIGINT
 * every 20 ms while a stop is pending and the thread was found outside kernel code. */
#ifdef SIGEV_THREAD_ID
timer_t g_retry_timer;
bool g_retry_timer_created = false;   // timers do not survive fork(): reset in the child
bool g_retry_timer_ok = false;
volatile sig_atomic_t g_retry_armed = 0;

void forget_retry_timer() { g_retry_timer_created = g_retry_timer_ok = false; }

void ensure_retry_timer() {
    if (g_retry_timer_created) return;
    static bool atfork = pthread_atfork(nullptr, nullptr, forget_retry_timer) == 0;
    (void)atfork;
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGINT;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    g_retry_timer_ok = timer_create(CLOCK_MONOTONIC, &sev, &g_retry_timer) == 0;
    g_retry_timer_created = true;
}

void arm_retry_timer(bool on) {
    if (!g_retry_timer_ok) return;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    if (on) its.it_value.tv_nsec = 20 * 1000 * 1000;
    timer_settime(g_retry_timer, 0, &its, nullptr);   // async-signal-safe
    g_retry_armed = on;
}
#else
void ensure_retry_timer() {}
void arm_retry_timer(bool) {}
volatile sig_atomic_t g_retry_armed = 0;
#endif

void forward_sigint(int sig, siginfo_t* info, void* uctx) {
    if (g_old_int.sa_flags & SA_SIGINFO) {
        if (g_old_int.sa_sigaction) g_old_int.sa_sigaction(sig, info, uctx);
    } else if (g_old_int.sa_handler == SIG_DFL) {
        sigaction(SIGINT, &g_old_int, nullptr);   // the default action: the process ends
        raise(SIGINT);
    } else if (g_old_int.sa_handler != SIG_IGN) {
        g_old_int.sa_handler(sig);
    }
}

void on_sigint(int sig, siginfo_t* info, void* uctx) {
    const int saved_errno = errno;
    const bool retry = info && info->si_code == SI_TIMER;
    if (!g_in_launch) {
        if (!retry) forward_sigint(sig, info, uctx);   // between launches: Python's business
    } else if (!pthread_equal(pthread_self(), g_launch_thread)) {
        if (!retry) pthread_kill(g_launch_thread, SIGINT);   // the launching thread must act
    } else {
        bool stop = true;
        if (!retry) {
            ++g_sigint_count;
            if (g_sigint_mode == EMU_SIGINT_FORWARD) {
                forward_sigint(sig, info, uctx);   // the program's handler runs after the launch
                stop = g_sigint_count >= 2;        // ... unless the user insists
            }
        }
        if (stop) {
            g_stop_requested = 1;
            if (interrupted_in_kernel_code(uctx)) siglongjmp(g_jmp, 2);
            arm_retry_timer(true);
        }
    }
    errno = saved_errno;
}

/* After the launch: no retry timer left running, no retry signal left pending.  A user's
 * SIGINT found pending is handed on (to the program's handler) when asked to. */
void settle_sigint(bool hand_on) {
    if (g_retry_armed) arm_retry_timer(false);
    sigset_t pending;
    sigemptyset(&pending);
    if (sigpending(&pending) != 0 || !sigismember(&pending, SIGINT)) return;
    sigset_t only, old;
    sigemptyset(&only);
    sigaddset(&only, SIGINT);
    pthread_sigmask(SIG_BLOCK, &only, &old);
    siginfo_t si;
    struct timespec zero = {0, 0};
    bool user = false;
    while (sigtimedwait(&only, &si, &zero) == SIGINT)
        if (si.si_code != SI_TIMER) user = true;
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    if (user && hand_on) forward_sigint(SIGINT, &si, nullptr);
}

/* ---- float32 denormals: FTZ (results) and DAZ (inputs) */
struct FloatMode {
#if defined(__x86_64__) || defined(__i386__)
    unsigned saved = 0;
    void enter(bool ftz) {
        saved = _mm_getcsr();
        _mm_setcsr(ftz ? (saved | 0x8040u) : (saved & ~0x8040u));   // bit 15 FTZ, bit 6 DAZ
    }
    void leave() { _mm_setcsr(saved); }
#elif defined(__aarch64__)
    unsigned long saved = 0;
    void enter(bool ftz) {
        __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved));
        unsigned long v = ftz ? (saved | (1ul << 24)) : (saved & ~(1ul << 24));   // FZ
        __asm__ __volatile__("msr fpcr, %0" : : "r"(v));
    }
    void leave() { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved)); }
#else
    void enter(bool) {}
    void leave() {}
#endif
};

/* ---- guard bytes around the array arguments
 * Nothing may use the C heap between the snapshot and the check: the bytes next to an array
 * can be the heap's own bookkeeping.  So a kernel's first printf() must not be where stdio
 * allocates stdout's buffer: the runtime gives it one when it is loaded, if it has none. */
#if defined(__GLIBC__)
__attribute__((constructor)) void give_stdout_a_buffer() {
    static char buffer[BUFSIZ];
    if (__fbufsize(stdout) == 0) setvbuf(stdout, buffer, isatty(1) ? _IOLBF : _IOFBF, sizeof buffer);
}
#endif

constexpr unsigned kGuardBytes = 8;   // catches any write that starts within 8 bytes of an end
constexpr uintptr_t kPage = 4096;     // never read across a 4 KiB boundary: it may be unmapped

struct GuardBytes {
    uintptr_t at[2];                  // before the begin, after the end
    unsigned len[2];
    unsigned char saved[2][kGuardBytes];
};
std::vector<GuardBytes> g_guards;

/* [lo, hi) minus every other argument's bytes: keep the part next to the array (`from_low`:
 * the guard starts at lo and grows up; otherwise it ends at hi and grows down). */
unsigned clip_guard(const emu_launch_params* p, int self, uintptr_t lo, uintptr_t hi, bool from_low) {
    for (int j = 0; j < p->narrays && lo < hi; ++j) {
        if (j == self) continue;
        uintptr_t b = p->arrays[j].begin, e = p->arrays[j].end;
        if (e <= b || e <= lo || b >= hi) continue;
        if (from_low) hi = b > lo ? b : lo;
        else lo = e < hi ? e : hi;
    }
    return (unsigned)(hi - lo);
}

void snapshot_guards(const emu_launch_params* p) {
    g_guards.resize(p->narrays);
    for (int i = 0; i < p->narrays; ++i) {
        GuardBytes& g = g_guards[i];
        const uintptr_t b = p->arrays[i].begin, e = p->arrays[i].end;
        g.len[0] = g.len[1] = 0;
        if (e < b) continue;   // (a 0-byte array has guard bytes too: any write to it is outside)
        uintptr_t room = b % kPage;   // bytes before b on its page
        uintptr_t n = room < kGuardBytes ? room : kGuardBytes;
        g.len[0] = clip_guard(p, i, b - n, b, false);
        g.at[0] = b - g.len[0];
        room = kPage - e % kPage;     // bytes after e on the page of e (e itself may start one)
        if (e % kPage == 0) room = 0;
        n = room < kGuardBytes ? room : kGuardBytes;
        g.len[1] = clip_guard(p, i, e, e + n, true);
        g.at[1] = e;
        for (int side = 0; side < 2; ++side)
            if (g.len[side]) memcpy(g.saved[side], reinterpret_cast<const void*>(g.at[side]), g.len[side]);
    }
}

bool check_guards(const emu_launch_params* p) {
    for (int i = 0; i < p->narrays; ++i) {
        const GuardBytes& g = g_guards[i];
        for (int side = 1; side >= 0; --side) {
            const unsigned char* now = reinterpret_cast<const unsigned char*>(g.at[side]);
            for (unsigned k = 0; k < g.len[side]; ++k) {
                if (now[k] == g.saved[side][k]) continue;
                g_fault.guard_array = i;
                g_fault.guard_offset = side ? (long long)k : -(long long)(g.len[side] - k);
                return false;
            }
        }
    }
    return true;
}

const char* signal_name(int sig) {
    switch (sig) {
        case SIGSEGV: return "segmentation fault (invalid memory access)";
        case SIGBUS: return "bus error (misaligned or invalid memory access)";
        case SIGFPE: return "arithmetic exception (integer division by zero?)";
        case SIGILL: return "illegal instruction";
        default: return "signal";
    }
}

}  // namespace

/* ------------------------------------------------------------------ called by kernels */
extern "C" {

__attribute__((visibility("default"))) void __emu_syncthreads(const char* file, int line, int site) {
    Thread& t = S.threads[S.current];
    t.state = WAIT_BARRIER;
    t.bar_file = file;
    t.bar_line = line;
    t.bar_site = site;
    t.bar_pred = 0;
    ++S.bar_waiting;
    yield_to_scheduler();
}

__attribute__((visibility("default"))) int __emu_syncthreads_reduce(int op, int predicate, const char* file,
                                                                   int line, int site) {
    Thread& t = S.threads[S.current];
    t.state = WAIT_BARRIER;
    t.bar_file = file;
    t.bar_line = line;
    t.bar_site = site;
    t.bar_pred = predicate != 0;
    ++S.bar_waiting;
    yield_to_scheduler();
    // The results stay valid until the next release, which needs this thread again.
    switch (op) {
        case EMU_BAR_COUNT: return S.bar_count;
        case EMU_BAR_AND: return S.bar_all;
        default: return S.bar_any;
    }
}

/* <cuda_pipeline.h>: __pipeline_memcpy_async / __pipeline_commit / __pipeline_wait_prior */
__attribute__((visibility("default"))) void __emu_pipeline_copy(void* dst, const void* src, unsigned size,
                                                               unsigned zfill) {
    AsyncCopy c{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), size, zfill,
                S.threads[S.current].committed, reinterpret_cast<uintptr_t>(__builtin_return_address(0))};
    if (S.p->sanitize) san_async_issued(c);
    if ((size != 4 && size != 8 && size != 16) || zfill > size || (uintptr_t)dst % size || (uintptr_t)src % size) {
        set_error(EMU_ERR_ASSERT,
                  "__pipeline_memcpy_async in kernel '%s' (%s): copies 4, 8 or 16 bytes between addresses "
                  "aligned to that size, got %u bytes (zfill %u) from %p to %p",
                  S.p->kernel_name, where(S.current).c_str(), size, zfill, src, dst);
        yield_to_scheduler();
    }
    Thread& t = S.threads[S.current];
    AsyncCopy* copies = copies_of(S.current);
    if (!copies || t.ncopies == kMaxCopies) {
        set_error(EMU_ERR_CONFIG, "kernel '%s' (%s): more than %u __pipeline_memcpy_async copies in flight in one "
                  "thread; the emulator keeps at most that many (wait for some with __pipeline_wait_prior)",
                  S.p->kernel_name, where(S.current).c_str(), kMaxCopies);
        yield_to_scheduler();
    }
    copies[t.ncopies++] = c;
}

__attribute__((visibility("default"))) void __emu_pipeline_commit(void) { ++S.threads[S.current].committed; }

__attribute__((visibility("default"))) void __emu_pipeline_wait_prior(unsigned prior) {
    // all but the `prior` most recent committed batches are complete afterwards
    const unsigned committed = S.threads[S.current].committed;
    complete_copies(S.current, committed > prior ? committed - prior : 0, true);
}

__attribute__((visibility("default"))) unsigned int __emu_activemask(void) {
    int w = S.current / kWarpSize;
    return S.warps[w].existing & ~S.warps[w].done;
}

__attribute__((visibility("default"))) void __emu_kernel_fail(const char* what, const char* file, int line,
                                                             const char* func) {
    set_error(EMU_ERR_ASSERT, "%s:%d: %s in kernel '%s' (function %s), %s", file, line, what,
              S.p->kernel_name, func, where(S.current).c_str());
    yield_to_scheduler();  // the scheduler sees `aborted` and unwinds the launch
    abort();
}

__attribute__((visibility("default"))) void __emu_kernel_stop(const char* call, const char* file, int line,
                                                             const char* func) {
    if (!S.p || S.current < 0) {   // not from a kernel's thread (a static initialiser?): nothing to stop
        fprintf(stderr, "%s:%d: %s called outside a kernel launch\n", file, line, call);
        abort();
    }
    const bool trap = call[0] == '_';
    set_error(EMU_ERR_STOPPED, "%s:%d: %s called in kernel '%s' (function %s), %s; %s", file, line, call,
              S.p->kernel_name, func, where(S.current).c_str(),
              trap ? "the launch fails, as on a GPU"
                   : "device code has no exit() or abort(): a thread ends with return, a kernel that must "
                     "stop the launch calls __trap() (or assert())");
    yield_to_scheduler();  // the scheduler sees `aborted` and unwinds the launch
    abort();
}

__attribute__((visibility("default"))) void __emu_kernel_exit(int status, const char* file, int line,
                                                             const char* func) {
    char call[32];
    snprintf(call, sizeof call, "exit(%d)", status);
    __emu_kernel_stop(call, file, line, func);
}

/* A warp-wide operation: every lane named in `mask` (that exists) must call it with the same
 * kind and mask.  The last lane to arrive computes every participant's result and queues them
 * all, itself included, in lane order, so they continue roughly in step, as on a GPU. */
__attribute__((visibility("default"))) unsigned long long __emu_warp_collective(
    int kind, unsigned int mask, unsigned long long value, int arg, int width, const char* file, int line) {
    const int self = S.current;
    const int w = self / kWarpSize, lane = self % kWarpSize;
    Warp& wp = S.warps[w];
    Thread& t = S.threads[self];
    if (!(mask >> lane & 1)) {
        set_error(EMU_ERR_WARP, "%s:%d: lane %d calls a warp collective with mask 0x%08x that does not include it (%s)",
                  file, line, lane, mask, where(self).c_str());
        yield_to_scheduler();
    }
    if (kind <= EMU_WARP_SHFL_XOR && (width <= 0 || width > kWarpSize || (width & (width - 1)))) {
        set_error(EMU_ERR_WARP, "%s:%d: shuffle width %d is not a power of two in [1, 32] (%s)", file, line, width,
                  where(self).c_str());
        yield_to_scheduler();
    }
    if (__builtin_expect(S.p->sanitize & EMU_CHECK_SYNCCHECK, 0)) {
        // A lane named in the mask that does not exist or has returned would be waited for
        // forever: undefined on a GPU (a hang, or garbage for the missing lanes).
        const unsigned absent = mask & ~wp.existing, exited = mask & wp.done;
        if (absent || exited) {
            san_sync_finding(absent ? EMU_SAN_MASK_ABSENT : EMU_SAN_MASK_EXITED, self,
                             w * kWarpSize + __builtin_ctz(absent ? absent : exited), mask, file, line);
            yield_to_scheduler();   // aborted: never resumed
        }
    }
    t.w_kind = kind;
    t.w_mask = mask;
    t.w_value = value;
    t.w_arg = arg;
    t.w_width = width;
    t.w_file = file;
    t.w_line = line;
    wp.arrived |= 1u << lane;
    const unsigned need = mask & wp.existing;
    if ((wp.arrived & need) != need) {
        t.state = WAIT_WARP;
        yield_to_scheduler();
        return t.w_result;
    }
    // Last to arrive: check agreement, then compute everybody's result.
    const int base = w * kWarpSize;
    for (int l = 0; l < kWarpSize; ++l) {
        if (!(need >> l & 1)) continue;
        Thread& o = S.threads[base + l];
        if (o.w_kind != kind || o.w_mask != mask) {
            set_error(EMU_ERR_WARP,
                      "warp collective mismatch in kernel '%s': %s is at %s:%d (mask 0x%08x) while %s is at "
                      "%s:%d (mask 0x%08x); all lanes in the mask must execute the same collective",
                      S.p->kernel_name, where(self).c_str(), file, line, mask, where(base + l).c_str(), o.w_file,
                      o.w_line, o.w_mask);
            yield_to_scheduler();
        }
    }
    unsigned long long ballot = 0;
    for (int l = 0; l < kWarpSize; ++l)
        if ((need >> l & 1) && S.threads[base + l].w_value) ballot |= 1ull << l;
    unsigned long long reduced = 0;
    if (kind >= EMU_WARP_REDUCE_ADD) {
        bool first = true;
        for (int l = 0; l < kWarpSize; ++l) {
            if (!(need >> l & 1)) continue;
            unsigned long long v = S.threads[base + l].w_value & 0xffffffffull;
            if (first) { reduced = v; first = false; continue; }
            unsigned a = (unsigned)reduced, b = (unsigned)v;
            switch (kind) {
                case EMU_WARP_REDUCE_ADD: reduced = (unsigned)(a + b); break;
                case EMU_WARP_REDUCE_MIN: reduced = a < b ? a : b; break;
                case EMU_WARP_REDUCE_MAX: reduced = a > b ? a : b; break;
                case EMU_WARP_REDUCE_MIN_SIGNED: reduced = (unsigned)((int)a < (int)b ? (int)a : (int)b); break;
                case EMU_WARP_REDUCE_MAX_SIGNED: reduced = (unsigned)((int)a > (int)b ? (int)a : (int)b); break;
                case EMU_WARP_REDUCE_AND: reduced = a & b; break;
                case EMU_WARP_REDUCE_OR: reduced = a | b; break;
                default: reduced = a ^ b; break;
            }
        }
    }
    for (int l = 0; l < kWarpSize; ++l) {
        if (!(need >> l & 1)) continue;
        Thread& o = S.threads[base + l];
        int src = l;
        const int seg = l & ~(o.w_width - 1);
        switch (kind) {
            case EMU_WARP_SHFL_IDX: src = seg + (o.w_arg & (o.w_width - 1)); break;
            case EMU_WARP_SHFL_UP: src = l - o.w_arg; if (src < seg) src = l; break;
            case EMU_WARP_SHFL_DOWN: src = l + o.w_arg; if (src >= seg + o.w_width) src = l; break;
            case EMU_WARP_SHFL_XOR: src = l ^ o.w_arg; if (src >= seg + o.w_width || src < 0) src = l; break;
            default: break;
        }
        switch (kind) {
            case EMU_WARP_SHFL_IDX:
            case EMU_WARP_SHFL_UP:
            case EMU_WARP_SHFL_DOWN:
            case EMU_WARP_SHFL_XOR:
                if (src < 0 || src >= kWarpSize || !(need >> src & 1)) {
                    // Reading a lane outside the mask (or past the end of a partial warp) is
                    // undefined on a GPU; in debug mode we say so, otherwise return own value.
                    if (S.p->debug) {
                        set_error(EMU_ERR_WARP,
                                  "%s:%d: lane %d shuffles from lane %d, which is not in mask 0x%08x or does not "
                                  "exist (block of %d threads): undefined on a GPU (%s)",
                                  o.w_file, o.w_line, l, src, mask, S.nthreads, where(base + l).c_str());
                        yield_to_scheduler();
                    }
                    src = l;
                }
                o.w_result = S.threads[base + src].w_value;
                break;
            case EMU_WARP_BALLOT: o.w_result = ballot; break;
            case EMU_WARP_ANY: o.w_result = ballot != 0; break;
            case EMU_WARP_ALL: o.w_result = ballot == (unsigned long long)need; break;
            case EMU_WARP_SYNC: o.w_result = 0; break;
            default: o.w_result = reduced; break;
        }
        if (S.schedule == EMU_SCHEDULE_FORWARD) {
            o.state = READY;
            push_ready(base + l);
        }
    }
    // Every lane (the caller too) continues: in lane order, or as the schedule says.
    if (S.schedule != EMU_SCHEDULE_FORWARD) {
        schedule_permutation(kWarpSize);
        for (int k = 0; k < kWarpSize; ++k) {
            const int l = scheduled(k, kWarpSize);
            if (!(need >> l & 1)) continue;
            S.threads[base + l].state = READY;
            push_ready(base + l);
        }
    }
    wp.arrived &= ~need;
    if (S.p->sanitize) san_warp_synced(w, need);
    yield_to_scheduler();
    return t.w_result;
}

/* ------------------------------------------------------------------ called by Python */
__attribute__((visibility("default"))) const char* emu_last_error(void) { return g_error; }

__attribute__((visibility("default"))) void emu_last_fault(emu_fault_info* out) { *out = g_fault; }

__attribute__((visibility("default"))) int emu_runtime_version(void) { return EMU_RUNTIME_VERSION; }

__attribute__((visibility("default"))) int emu_launch(const emu_launch_params* p) {
    g_error[0] = 0;
    memset(&g_fault, 0, sizeof g_fault);
    S.p = p;
    S.aborted = false;
    S.error_code = EMU_OK;
    S.current = -1;
    const unsigned long long n = (unsigned long long)p->block[0] * p->block[1] * p->block[2];
    if (n == 0 || n > 1024 || p->grid[0] == 0 || p->grid[1] == 0 || p->grid[2] == 0) {
        snprintf(g_error, sizeof g_error, "invalid launch configuration for kernel '%s'", p->kernel_name);
        return EMU_ERR_CONFIG;
    }
    if (!ensure_stacks(n)) {
        snprintf(g_error, sizeof g_error, "could not allocate %llu fiber stacks", n);
        return EMU_ERR_CONFIG;
    }
    S.nthreads = (int)n;
    S.threads.resize(n);
    S.warps.resize((n + kWarpSize - 1) / kWarpSize);
    size_t ring = 1;
    while (ring < n) ring *= 2;
    S.ready.resize(ring);
    S.ready_mask = ring - 1;
    blockDim = dim3(p->block[0], p->block[1], p->block[2]);
    gridDim = dim3(p->grid[0], p->grid[1], p->grid[2]);
    if (S.order.size() < 1024) S.order.resize(1024);
    S.schedule = p->schedule;
    S.rng = p->seed * 0x9E3779B97F4A7C15ull + 1;   // never 0: xorshift would stay there
    if (p->sanitize) san_launch_begin(p);
    // Last: from here until the guard bytes are checked, nothing may use the C heap.
    snapshot_guards(p);

    g_stop_requested = 0;
    g_sigint_count = 0;
    g_sigint_mode = p->sigint;
    g_launch_thread = pthread_self();
    install_handlers();
    if (g_sigint_mode != EMU_SIGINT_LEAVE) {
        ensure_retry_timer();
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigint;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, &g_old_int);
    }
    static FloatMode float_mode;   // static: still valid after a siglongjmp
    float_mode.enter(p->ftz != 0);
    const int jumped = sigsetjmp(g_jmp, 1);
    int rc = EMU_OK;
    if (jumped == 0) {
        g_in_launch = 1;
        // Blocks in linear order (x fastest), its reverse, or a random bijection of it
        const unsigned long long nblocks = (unsigned long long)p->grid[0] * p->grid[1] * p->grid[2];
        unsigned long long step = 1, b = 0;
        if (S.schedule == EMU_SCHEDULE_REVERSE) {
            step = nblocks - 1;   // -1 modulo nblocks
            b = nblocks - 1;
        } else if (S.schedule == EMU_SCHEDULE_RANDOM && nblocks > 1) {
            do step = next_random() % nblocks; while (step == 0 || std::gcd(step, nblocks) != 1);
            b = next_random() % nblocks;
        }
        for (unsigned long long k = 0; k < nblocks; ++k, b = (b + step) % nblocks) {
            blockIdx = uint3{(unsigned)(b % p->grid[0]), (unsigned)(b / p->grid[0] % p->grid[1]),
                             (unsigned)(b / ((unsigned long long)p->grid[0] * p->grid[1]))};
            if (p->sanitize) san_block_begin((unsigned)b);
            run_block();
            if (S.aborted) {
                rc = S.error_code;
                break;
            }
        }
        if (rc == EMU_OK && g_stop_requested) {   // finished before it could be stopped
            rc = EMU_ERR_INTERRUPTED;
            snprintf(g_error, sizeof g_error, "kernel '%s' interrupted (Ctrl-C) as it finished", p->kernel_name);
        }
    }
    g_in_launch = 0;
    float_mode.leave();
    if (p->sanitize) san_launch_end();
    if (g_sigint_mode != EMU_SIGINT_LEAVE) {
        settle_sigint(g_sigint_mode == EMU_SIGINT_FORWARD && jumped == 0 && rc != EMU_ERR_INTERRUPTED);
        sigaction(SIGINT, &g_old_int, nullptr);
    }
    restore_handlers();
    if (jumped == 1) {
        const char* what = signal_name(g_fault.signal);
        if (g_fault.in_stack_guard)
            what = "stack overflow (each emulated thread has a 256 KiB stack: large local arrays?)";
        snprintf(g_error, sizeof g_error, "%s in kernel '%s' at address 0x%llx%s, block (%u,%u,%u) thread (%u,%u,%u)",
                 what, p->kernel_name, g_fault.address,
                 g_fault.signal == SIGSEGV && g_fault.address < kPage ? " (a null pointer)" : "",
                 g_fault.block[0], g_fault.block[1], g_fault.block[2],
                 g_fault.thread[0], g_fault.thread[1], g_fault.thread[2]);
        rc = EMU_ERR_SIGNAL;
    } else if (jumped == 2) {
        snprintf(g_error, sizeof g_error, "kernel '%s' interrupted (Ctrl-C) in %s", p->kernel_name,
                 S.current >= 0 ? where(S.current).c_str() : "its first block");
        rc = EMU_ERR_INTERRUPTED;
    } else if (rc == EMU_OK && !check_guards(p)) {
        snprintf(g_error, sizeof g_error, "kernel '%s' changed the bytes just %s array argument %d",
                 p->kernel_name, g_fault.guard_offset >= 0 ? "after" : "before", g_fault.guard_array);
        rc = EMU_ERR_GUARD;
    }
    fflush(stdout);  // kernel printf() output appears right after the launch
    return rc;
}

/* The machine code of the loaded object holding `address` (a kernel entry point): where a
 * Ctrl-C may stop a kernel at once.  Returns 0 when not found. */
__attribute__((visibility("default"))) int emu_code_range(const void* address, const void** begin,
                                                         const void** end) {
    CodeRangeQuery q{(uintptr_t)address, 0, 0};
    if (!dl_iterate_phdr(find_code_range, &q)) return 0;
    *begin = reinterpret_cast<const void*>(q.begin);
    *end = reinterpret_cast<const void*>(q.end);
    return 1;
}

/* Debug mode: a copy of an argument array lives in `data_bytes` of read-write pages with
 * `guard_bytes` of inaccessible pages on each side, so any access past either end faults. */
__attribute__((visibility("default"))) void* emu_map_guarded(unsigned long long data_bytes,
                                                            unsigned long long guard_bytes) {
    size_t total = data_bytes + 2 * guard_bytes;
    void* m = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    char* data = static_cast<char*>(m) + guard_bytes;
    if (data_bytes && mprotect(data, data_bytes, PROT_READ | PROT_WRITE) != 0) {
        munmap(m, total);
        return nullptr;
    }
    return data;
}

__attribute__((visibility("default"))) int emu_unmap_guarded(void* data, unsigned long long data_bytes,
                                                            unsigned long long guard_bytes) {
    return munmap(static_cast<char*>(data) - guard_bytes, data_bytes + 2 * guard_bytes);
}

}  // extern "C"
