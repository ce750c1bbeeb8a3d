/*
 * emu_abi.h: the binary interface between the CPU emulator's runtime (emu/runtime.cpp, built
 * once into a shared library) and each compiled kernel module (your .cu file compiled with g++
 * against cuda_emu.h).  Python talks to both through ctypes; see kernels/emulator.py.
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

/* What Python passes to emu_launch().  Keep in sync with _LaunchParams in kernels/emulator.py. */
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
    EMU_ERR_ASSERT = 5,       /* assert() or __trap() in the kernel                       */
    EMU_ERR_WARP = 6,         /* inconsistent warp collective                             */
    EMU_ERR_INTERRUPTED = 7,  /* Ctrl-C stopped the kernel                                */
    EMU_ERR_GUARD = 8         /* bytes just outside an array argument changed             */
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

/* Called by kernel code (through the macros of cuda_emu.h). */
void __emu_syncthreads(const char* file, int line);
int __emu_syncthreads_reduce(int op, int predicate, const char* file, int line);
unsigned long long __emu_warp_collective(int kind, unsigned int mask, unsigned long long value,
                                         int arg, int width, const char* file, int line);
unsigned int __emu_activemask(void);
void __emu_kernel_fail(const char* what, const char* file, int line, const char* func);

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

#define EMU_RUNTIME_VERSION 2

#ifdef __cplusplus
}
#endif
#endif /* KERNELS_EMU_ABI_H */
