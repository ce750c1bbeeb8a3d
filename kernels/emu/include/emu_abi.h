/*
 * emu_abi.h: the binary interface between the CPU emulator's runtime (emu/runtime.cpp, built
 * once into a shared library) and each compiled kernel module (your .cu file compiled with g++
 * against cuda_emu.h).  Python talks to both through ctypes; see kernels/emu/emulator.py.
 *
 * A kernel module exports, for every extern "C" __global__ function NAME:
 *   void        __emu_entry_NAME(void** args)   runs NAME for the current emulated thread,
 *                                               unpacking args exactly as cuLaunchKernel does;
 *   const char* __emu_sig_NAME(void)            the parameter list as the C++ compiler sees it.
 * The runtime owns the grid loop, the per-thread fibers, barriers, warp collectives and the
 * error reporting.
 */
#ifndef KERNELS_EMU_ABI_H
#define KERNELS_EMU_ABI_H

#ifdef __cplusplus
extern "C" {
#endif

struct uint3 { unsigned int x, y, z; };

#ifdef __cplusplus
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};
#else
typedef struct uint3 dim3;
#endif

typedef void (*emu_entry_fn)(void** args);

/* The bytes [begin, end) of one array argument.  The runtime keeps a copy of the few bytes just
 * before and just after it (the guard bytes) and compares them after the launch. */
struct emu_array_span {
    unsigned long long begin;
    unsigned long long end;
};

/* What Python passes to emu_launch().  Keep in sync with _LaunchParams in kernels/emu/emulator.py. */
struct emu_launch_params {
    unsigned int grid[3];
    unsigned int block[3];
    unsigned long long shared_mem;        /* dynamic shared memory bytes asked for        */
    const char* kernel_name;
    emu_entry_fn entry;
    void** args;
    int debug;                            /* poison shared memory, stricter warp checks    */
    unsigned char* dynamic_shared;        /* the module's dynamic shared buffer           */
    unsigned char* static_shared_begin;   /* the module's __shared__ variables (section)  */
    unsigned char* static_shared_end;
    int ftz;                              /* flush float denormals (FTZ/DAZ) as -ftz=true  */
    int sigint;                           /* EMU_SIGINT_*: what Ctrl-C does meanwhile      */
    const void* code_begin;               /* the kernel module's machine code: a Ctrl-C    */
    const void* code_end;                 /* landing there stops the kernel at once        */
    const struct emu_array_span* arrays;  /* array arguments, for the guard-byte check     */
    int narrays;
    int schedule;                         /* EMU_SCHEDULE_*: the order of threads and blocks */
    unsigned long long seed;              /* ... and the random one's seed                 */
    int sanitize;                         /* EMU_CHECK_* bits (KERNELS_EMU_SANITIZE)        */
    const struct emu_region* regions;     /* what the sanitizer knows by name              */
    int nregions;
    unsigned long long dynamic_shared_capacity;   /* bytes of the module's dynamic buffer  */
};

enum { EMU_SCHEDULE_FORWARD = 0, EMU_SCHEDULE_REVERSE = 1, EMU_SCHEDULE_RANDOM = 2 };

/* ------------------------------------------------------------------ the sanitizer
 * KERNELS_EMU_SANITIZE=memcheck,racecheck,initcheck,synccheck (or all): the module is compiled
 * with -fsanitize=thread, whose instrumentation calls __tsan_read4(addr), __tsan_write16(addr),
 * ... before every load and store of kernel code; the runtime implements those calls itself
 * (emu/sanitizer.cpp, no libtsan) and checks each access. */
enum { EMU_CHECK_MEMCHECK = 1, EMU_CHECK_RACECHECK = 2, EMU_CHECK_INITCHECK = 4, EMU_CHECK_SYNCCHECK = 8 };
/* Not a check, but the same instrumented module and the same access stream: kernels.profile()
 * (emu/profiler.cpp) counts requests, sectors and shared-memory wavefronts per warp. */
enum { EMU_PROFILE = 16 };

/* Memory the sanitizer can name in a message; Python lists every array argument, every static
 * __shared__ variable of the module and the dynamic shared memory of the launch. */
struct emu_region {
    unsigned long long begin, end;
    int kind;                     /* EMU_REGION_*                                              */
    int index;                    /* argument index, or __shared__ variable index              */
    unsigned char* init;          /* an argument: one "initialised" byte per byte, for arrays
                                     the host never wrote (initcheck); NULL: all initialised  */
    unsigned long long origin;    /* an argument: where its allocation starts (the array it is
                                     a view of); the profiler counts sectors from there, as a
                                     GPU allocation starts 256-byte aligned                  */
};
enum { EMU_REGION_ARGUMENT = 0, EMU_REGION_SHARED = 1, EMU_REGION_DYNAMIC_SHARED = 2 };

/* One access, as a finding reports it. */
struct emu_access {
    unsigned long long pc;        /* where in the kernel's machine code (a return address)     */
    unsigned int block[3];
    unsigned int thread[3];
    int size;                     /* bytes                                                    */
    int kind;                     /* EMU_ACCESS_*                                              */
};
enum { EMU_ACCESS_READ = 0, EMU_ACCESS_WRITE = 1, EMU_ACCESS_ATOMIC = 2, EMU_ACCESS_ASYNC_COPY = 3 };

/* What a finding is about (emu_finding.what) */
enum {
    EMU_SAN_OUT_OF_BOUNDS = 1,    /* memcheck: outside every argument / __shared__ variable     */
    EMU_SAN_MISALIGNED = 2,       /* memcheck: an N-byte access at an address not a multiple of N */
    EMU_SAN_OTHER_LOCAL = 3,      /* memcheck: another thread's local (stack) memory            */
    EMU_SAN_RAW = 4,              /* racecheck: read after another thread's unordered write     */
    EMU_SAN_WAR = 5,              /* racecheck: write after another thread's unordered read     */
    EMU_SAN_WAW = 6,              /* racecheck: write after another thread's unordered write    */
    EMU_SAN_ASYNC_PENDING = 7,    /* racecheck: an async copy's bytes used before its wait      */
    EMU_SAN_UNINITIALIZED = 8,    /* initcheck                                                  */
    EMU_SAN_BARRIER_EXITED = 9,   /* synccheck: a barrier while threads of the block exited     */
    EMU_SAN_MASK_EXITED = 10,     /* synccheck: a collective's mask names a returned lane       */
    EMU_SAN_MASK_ABSENT = 11,     /* synccheck: a collective's mask names a lane that does not exist */
    EMU_SAN_BAD_ASYNC_COPY = 12   /* memcheck: __pipeline_memcpy_async size/alignment/space     */
};

struct emu_finding {
    int check;                    /* EMU_CHECK_*                                               */
    int what;                     /* EMU_SAN_*                                                 */
    unsigned long long address;
    int region;                   /* index into params->regions, or -1                        */
    long long offset;             /* address - regions[region].begin                          */
    struct emu_access access;     /* the access (or thread) found at fault                    */
    struct emu_access other;      /* a race's earlier access; synccheck: the other thread     */
    int has_other;
    unsigned int mask;            /* synccheck: the collective's mask                         */
    const char* file;             /* synccheck: the barrier's or collective's source line     */
    int line;
};

/* ------------------------------------------------------------------ the profiler
 * What one launch did to memory, counted per warp-level request (emu/profiler.cpp).  Index
 * [k] of the arrays: EMU_ACCESS_READ (ld), EMU_ACCESS_WRITE (st), EMU_ACCESS_ATOMIC (atom). */
struct emu_profile {
    unsigned long long global_requests[3];    /* warp-level instructions                        */
    unsigned long long global_sectors[3];     /* 32-byte sectors they touch                     */
    unsigned long long global_bytes[3];       /* distinct bytes the lanes asked for, per request */
    unsigned long long shared_requests[3];
    unsigned long long shared_wavefronts[3];  /* passes through the 32 banks                    */
    unsigned long long shared_ideal[3];       /* the wavefronts without bank conflicts           */
    unsigned long long shared_bytes[3];
    unsigned long long dram_sectors_read;     /* distinct sectors of the argument arrays read    */
    unsigned long long dram_sectors_written;  /* ... and written, over the whole launch          */
    unsigned long long outside_arguments;     /* global accesses outside every argument array   */
    unsigned long long cut_phases;            /* phases too long to group whole (see profiler.cpp) */
    int nsites;                               /* entries of emu_profile_sites()                  */
};

/* One static load/store/atomic of the kernel (a site: its pc) in one memory space. */
struct emu_profile_site {
    unsigned long long pc;
    int space;                    /* 0 global, 1 shared                                        */
    int kind;                     /* EMU_ACCESS_*                                               */
    int size;                     /* bytes per lane (the largest seen)                          */
    int pad;
    unsigned long long requests, units;   /* units: sectors (global) or wavefronts (shared)    */
    unsigned long long ideal;     /* shared: wavefronts without conflicts                      */
    unsigned long long bytes;     /* distinct bytes asked for, summed over requests            */
    unsigned long long lanes;     /* active lanes, summed over requests                        */
    unsigned long long warps;     /* distinct warps (of all blocks) that made a request         */
};

/* SIGINT (Ctrl-C) during a launch, as Python's handler for it would have it: */
enum {
    EMU_SIGINT_LEAVE = 0,     /* not the main thread, or SIG_DFL/SIG_IGN: leave SIGINT alone   */
    EMU_SIGINT_STOP = 1,      /* Python's default handler: stop the kernel, KeyboardInterrupt  */
    EMU_SIGINT_FORWARD = 2    /* a handler of the program's own: it runs after the launch; a
                                 second Ctrl-C during the same launch stops the kernel too     */
};

/* Error codes returned by emu_launch(); the message is in emu_last_error(). */
enum {
    EMU_OK = 0,
    EMU_ERR_CONFIG = 1,       /* bad launch configuration                                 */
    EMU_ERR_BARRIER = 2,      /* threads of a block wait at different __syncthreads()     */
    EMU_ERR_DEADLOCK = 3,     /* no thread can make progress (warp collective misuse ...) */
    EMU_ERR_SIGNAL = 4,       /* SIGSEGV / SIGBUS / SIGFPE inside the kernel              */
    EMU_ERR_ASSERT = 5,       /* assert() in the kernel                                   */
    EMU_ERR_WARP = 6,         /* inconsistent warp collective                             */
    EMU_ERR_INTERRUPTED = 7,  /* Ctrl-C stopped the kernel                                */
    EMU_ERR_GUARD = 8,        /* bytes just outside an array argument changed             */
    EMU_ERR_SANITIZER = 9,    /* a sanitizer finding: emu_last_finding()                  */
    EMU_ERR_STOPPED = 10      /* __trap(), abort() or exit() in the kernel                */
};

/* Details of the last EMU_ERR_SIGNAL (or EMU_ERR_GUARD), for Python to name the array. */
struct emu_fault_info {
    int signal;
    int is_write;             /* 1 write, 0 read, -1 unknown                              */
    int in_stack_guard;       /* the address hit a fiber's stack guard: stack overflow    */
    unsigned long long address;
    unsigned int block[3];
    unsigned int thread[3];
    int guard_array;          /* EMU_ERR_GUARD: index into params->arrays                 */
    long long guard_offset;   /* first changed byte, from the array's end (>= 0) or its
                                 begin (< 0)                                              */
};

int emu_launch(const struct emu_launch_params* params);
const char* emu_last_error(void);
void emu_last_fault(struct emu_fault_info* out);
void* emu_map_guarded(unsigned long long data_bytes, unsigned long long guard_bytes);
int emu_unmap_guarded(void* data, unsigned long long data_bytes, unsigned long long guard_bytes);
int emu_runtime_version(void);
int emu_code_range(const void* address, const void** begin, const void** end);
void emu_last_finding(struct emu_finding* out);
void emu_last_profile(struct emu_profile* out);
int emu_profile_sites(struct emu_profile_site* out, int capacity);
int emu_profile_spans(unsigned long long* out, int capacity);   /* (lo, hi, sectors read, written) */
void emu_profile_atomics(unsigned long long* out);              /* lane atomics, addresses, most on one */

/* Called by kernel code (through the macros of cuda_emu.h). */
/* A barrier is one call site: `site` tells apart the call sites of one line (cuda_emu.h passes
 * __COUNTER__; -1: the line is the site). */
void __emu_syncthreads(const char* file, int line, int site);
int __emu_syncthreads_reduce(int op, int predicate, const char* file, int line, int site);
unsigned long long __emu_warp_collective(int kind, unsigned int mask, unsigned long long value,
                                         int arg, int width, const char* file, int line);
unsigned int __emu_activemask(void);
void __emu_kernel_fail(const char* what, const char* file, int line, const char* func);
/* __trap(), abort(), exit(status) in kernel code: the launch stops with EMU_ERR_STOPPED */
__attribute__((noreturn)) void __emu_kernel_stop(const char* call, const char* file, int line, const char* func);
__attribute__((noreturn)) void __emu_kernel_exit(int status, const char* file, int line, const char* func);
void __emu_pipeline_copy(void* dst, const void* src, unsigned size, unsigned zfill);
void __emu_pipeline_commit(void);
void __emu_pipeline_wait_prior(unsigned prior);
void __emu_san_atomic(void* address, unsigned size, void* pc);   /* sanitized: before an atomic */
void __emu_san_fence(void);                                       /* sanitized: __threadfence() */

extern struct uint3 threadIdx;
extern struct uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

enum { EMU_BAR_COUNT = 0, EMU_BAR_AND = 1, EMU_BAR_OR = 2 };
enum {
    EMU_WARP_SHFL_IDX = 0, EMU_WARP_SHFL_UP = 1, EMU_WARP_SHFL_DOWN = 2, EMU_WARP_SHFL_XOR = 3,
    EMU_WARP_BALLOT = 4, EMU_WARP_ANY = 5, EMU_WARP_ALL = 6, EMU_WARP_SYNC = 7,
    EMU_WARP_REDUCE_ADD = 8, EMU_WARP_REDUCE_MIN = 9, EMU_WARP_REDUCE_MAX = 10,
    EMU_WARP_REDUCE_MIN_SIGNED = 11, EMU_WARP_REDUCE_MAX_SIGNED = 12,
    EMU_WARP_REDUCE_AND = 13, EMU_WARP_REDUCE_OR = 14, EMU_WARP_REDUCE_XOR = 15
};

#define EMU_RUNTIME_VERSION 5

#ifdef __cplusplus
}
#endif
#endif /* KERNELS_EMU_ABI_H */
