/*
 * cuda_emu.h: what a CUDA C kernel sees when the CPU emulator compiles it with the system C++
 * compiler.  It is force-included (g++ -include cuda_emu.h) before your unchanged .cu source.
 *
 * It maps the CUDA C dialect onto C++:
 *   __global__ / __device__ / __host__       -> ordinary functions
 *   __shared__                              -> a static variable: blocks run one at a time, so a
 *                                              static is exactly "one copy per block"
 *   extern __shared__ T name[]              -> the module's dynamic shared-memory buffer
 *   threadIdx, blockIdx, blockDim, gridDim  -> globals the runtime sets before resuming a thread
 *   __syncthreads(), warp shuffles/votes    -> calls into the runtime, which switches fibers
 *   atomics                                 -> plain read-modify-write (threads never overlap)
 *   math intrinsics, vector types           -> C++ equivalents
 * Half precision lives in cuda_fp16.h / cuda_bf16.h beside this file.
 */
#ifndef KERNELS_CUDA_EMU_H
#define KERNELS_CUDA_EMU_H

#include <stdint.h>
#include <stddef.h>
#include <math.h>
#include <float.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <cmath>
#include <chrono>
#include <string>
#include <type_traits>
#include <utility>

#include "emu_abi.h"

/* ------------------------------------------------------------------ qualifiers */
#define __global__
#define __device__
#define __host__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __inline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static
#define __managed__
#define __grid_constant__
/* Static shared memory: one copy per module, reused by each block in turn.  The section lets
 * the runtime poison it between blocks in debug mode, as a GPU leaves it undefined.  Sanitized
 * and debug builds (KERNELS_EMU_SANITIZE, KERNELS_EMU_DEBUG; compiled with -fno-toplevel-reorder,
 * which keeps the order) put 128 unused bytes before every variable, so that an overrun of one
 * __shared__ array lands in no variable and memcheck can name it.  The pads also mark the
 * __shared__ variables g++ leaves out of the section: it ignores the section attribute of a
 * static local in a function template (before g++ 14), which then lands in .bss right after its
 * pad (kernels/emu/sanitizer.py, ModuleSymbols.shared_variables, finds them there). */
#if defined(__KERNELS_EMU_SANITIZE__) || defined(__KERNELS_EMU_DEBUG__)
#define EMU_CAT2(a, b) a##b
#define EMU_CAT(a, b) EMU_CAT2(a, b)
#define __shared__                                                                                \
    static __attribute__((section("emu_shared"), used, aligned(16))) unsigned char EMU_CAT(__emu_shared_pad_, \
                                                                                     __COUNTER__)[128]; \
    static __attribute__((section("emu_shared")))
#else
#define __shared__ static __attribute__((section("emu_shared")))
#endif
/* `extern __shared__` is rewritten to `extern __emu_dynamic_shared__` before compiling (the one
 * textual change the emulator makes; static and extern cannot share a macro), and every such
 * name is linked to the module's dynamic shared-memory buffer. */
#define __emu_dynamic_shared__
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif

/* ------------------------------------------------------------------ built-in variables */
static constexpr int warpSize = 32;

/* ------------------------------------------------------------------ barriers and fences */
/* Each call site is one barrier: __COUNTER__ numbers them, so that the two of
 * `if (c) { __syncthreads(); } else { __syncthreads(); }` differ though they share a line (and
 * the compiler cannot merge them into one call), and threads waiting at both are reported. */
#define __syncthreads() __emu_syncthreads(__FILE__, __LINE__, __COUNTER__)
#define __syncthreads_count(p) __emu_syncthreads_reduce(EMU_BAR_COUNT, (p), __FILE__, __LINE__, __COUNTER__)
#define __syncthreads_and(p) __emu_syncthreads_reduce(EMU_BAR_AND, (p), __FILE__, __LINE__, __COUNTER__)
#define __syncthreads_or(p) __emu_syncthreads_reduce(EMU_BAR_OR, (p), __FILE__, __LINE__, __COUNTER__)
/* Fences order nothing here (threads never overlap); racecheck counts __threadfence() as the
 * "release" half of the fence-then-atomic pattern between blocks. */
#ifdef __KERNELS_EMU_SANITIZE__
static inline void __threadfence(void) { __emu_san_fence(); }
static inline void __threadfence_system(void) { __emu_san_fence(); }
#else
static inline void __threadfence(void) {}
static inline void __threadfence_system(void) {}
#endif
static inline void __threadfence_block(void) {}
static inline void __nanosleep(unsigned int) {}
static inline long long clock64(void) {
    return (long long)std::chrono::steady_clock::now().time_since_epoch().count();
}

/* ------------------------------------------------------------------ warp collectives */
namespace emu {
template <class T>
static inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
    unsigned long long b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
static inline T from_bits(unsigned long long b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}
template <class T>
static inline T shuffle(int kind, const char* file, int line, unsigned mask, T var, int arg, int width = 32) {
    return from_bits<T>(__emu_warp_collective(kind, mask, to_bits(var), arg, width, file, line));
}
}  // namespace emu

#define __shfl_sync(...) ::emu::shuffle(EMU_WARP_SHFL_IDX, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shuffle(EMU_WARP_SHFL_UP, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shuffle(EMU_WARP_SHFL_DOWN, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shuffle(EMU_WARP_SHFL_XOR, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, pred) \
    ((unsigned)__emu_warp_collective(EMU_WARP_BALLOT, (mask), (pred) != 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, pred) \
    ((int)__emu_warp_collective(EMU_WARP_ANY, (mask), (pred) != 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, pred) \
    ((int)__emu_warp_collective(EMU_WARP_ALL, (mask), (pred) != 0, 0, 32, __FILE__, __LINE__))
/* __syncwarp() and __syncwarp(mask): a call site object, so that the mask can be omitted */
#define __syncwarp(...) ::emu::syncwarp_site{__FILE__, __LINE__}(__VA_ARGS__)
#define __activemask() __emu_activemask()
#define __reduce_add_sync(mask, v) ::emu::reduce_sync(EMU_WARP_REDUCE_ADD, EMU_WARP_REDUCE_ADD, (mask), (v), __FILE__, __LINE__)
#define __reduce_min_sync(mask, v) ::emu::reduce_sync(EMU_WARP_REDUCE_MIN, EMU_WARP_REDUCE_MIN_SIGNED, (mask), (v), __FILE__, __LINE__)
#define __reduce_max_sync(mask, v) ::emu::reduce_sync(EMU_WARP_REDUCE_MAX, EMU_WARP_REDUCE_MAX_SIGNED, (mask), (v), __FILE__, __LINE__)
#define __reduce_and_sync(mask, v) ::emu::reduce_sync(EMU_WARP_REDUCE_AND, EMU_WARP_REDUCE_AND, (mask), (v), __FILE__, __LINE__)
#define __reduce_or_sync(mask, v) ::emu::reduce_sync(EMU_WARP_REDUCE_OR, EMU_WARP_REDUCE_OR, (mask), (v), __FILE__, __LINE__)
#define __reduce_xor_sync(mask, v) ::emu::reduce_sync(EMU_WARP_REDUCE_XOR, EMU_WARP_REDUCE_XOR, (mask), (v), __FILE__, __LINE__)

namespace emu {
struct syncwarp_site {
    const char* file;
    int line;
    void operator()(unsigned mask = 0xffffffffu) const {
        __emu_warp_collective(EMU_WARP_SYNC, mask, 0, 0, 32, file, line);
    }
};
template <class T>
static inline T reduce_sync(int kind_unsigned, int kind_signed, unsigned mask, T v, const char* file, int line) {
    static_assert(sizeof(T) == 4 && std::is_integral<T>::value, "__reduce_*_sync takes int or unsigned");
    int kind = std::is_signed<T>::value ? kind_signed : kind_unsigned;
    return (T)(unsigned)__emu_warp_collective(kind, mask, (unsigned)v, 0, 32, file, line);
}
}  // namespace emu

/* ------------------------------------------------------------------ assert, __trap, exit, abort */
#include "emu_assert.h"
/* __trap() stops the kernel on a GPU (the launch fails); exit() and abort() do not exist in
 * device code, and here they would end the whole Python process without a word.  All of them
 * stop the launch with a KernelFault naming the call, the line, the kernel and the thread.
 * <stdlib.h> is read first, so that its declarations of exit and abort are left alone;
 * `std::exit(1)` finds the runtime's function through the using-declaration. */
#include <stdlib.h>
#include <cstdlib>
#define __trap() __emu_kernel_stop("__trap()", __FILE__, __LINE__, __func__)
#define __brkpt() __emu_kernel_stop("__brkpt()", __FILE__, __LINE__, __func__)
#define abort() __emu_kernel_stop("abort()", __FILE__, __LINE__, __func__)
#define exit(status) __emu_kernel_exit((int)(status), __FILE__, __LINE__, __func__)
namespace std {
using ::__emu_kernel_exit;
using ::__emu_kernel_stop;
}  // namespace std

/* ------------------------------------------------------------------ vector types */
#define EMU_VEC2(T, N, A) struct __attribute__((aligned(A))) N##2 { T x, y; }; \
    static inline N##2 make_##N##2(T x, T y) { N##2 v; v.x = x; v.y = y; return v; }
#define EMU_VEC3(T, N) struct N##3 { T x, y, z; }; \
    static inline N##3 make_##N##3(T x, T y, T z) { N##3 v; v.x = x; v.y = y; v.z = z; return v; }
#define EMU_VEC4(T, N, A) struct __attribute__((aligned(A))) N##4 { T x, y, z, w; }; \
    static inline N##4 make_##N##4(T x, T y, T z, T w) { N##4 v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }
#define EMU_VEC1(T, N) struct N##1 { T x; }; static inline N##1 make_##N##1(T x) { N##1 v; v.x = x; return v; }

EMU_VEC1(char, char) EMU_VEC2(char, char, 2) EMU_VEC3(char, char) EMU_VEC4(char, char, 4)
EMU_VEC1(unsigned char, uchar) EMU_VEC2(unsigned char, uchar, 2) EMU_VEC3(unsigned char, uchar) EMU_VEC4(unsigned char, uchar, 4)
EMU_VEC1(short, short) EMU_VEC2(short, short, 4) EMU_VEC3(short, short) EMU_VEC4(short, short, 8)
EMU_VEC1(unsigned short, ushort) EMU_VEC2(unsigned short, ushort, 4) EMU_VEC3(unsigned short, ushort) EMU_VEC4(unsigned short, ushort, 8)
EMU_VEC1(int, int) EMU_VEC2(int, int, 8) EMU_VEC3(int, int) EMU_VEC4(int, int, 16)
EMU_VEC1(unsigned int, uint) EMU_VEC2(unsigned int, uint, 8) EMU_VEC4(unsigned int, uint, 16)
EMU_VEC1(long long, longlong) EMU_VEC2(long long, longlong, 16)
EMU_VEC1(unsigned long long, ulonglong) EMU_VEC2(unsigned long long, ulonglong, 16)
EMU_VEC1(float, float) EMU_VEC2(float, float, 8) EMU_VEC3(float, float) EMU_VEC4(float, float, 16)
EMU_VEC1(double, double) EMU_VEC2(double, double, 16) EMU_VEC3(double, double) EMU_VEC4(double, double, 16)
static inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { uint3 v; v.x = x; v.y = y; v.z = z; return v; }
#undef EMU_VEC1
#undef EMU_VEC2
#undef EMU_VEC3
#undef EMU_VEC4

/* ------------------------------------------------------------------ min / max as CUDA has them */
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }
static inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
static inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }
/* Mixed arguments (int with unsigned, float with double, ...) use the usual conversions. */
template <class A, class B, class = typename std::enable_if<!std::is_same<A, B>::value &&
                                                             std::is_arithmetic<A>::value &&
                                                             std::is_arithmetic<B>::value>::type>
static inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return min((C)a, (C)b);
}
template <class A, class B, class = typename std::enable_if<!std::is_same<A, B>::value &&
                                                             std::is_arithmetic<A>::value &&
                                                             std::is_arithmetic<B>::value>::type>
static inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return max((C)a, (C)b);
}

/* ------------------------------------------------------------------ math intrinsics */
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
/* Fast-math intrinsics.  glibc declares (but does not export) functions of the same names, so
 * ours are renamed by macros defined after the system headers were read. */
static inline float __emu__expf(float x) { return expf(x); }
static inline float __emu__exp10f(float x) { return powf(10.0f, x); }
static inline float __emu__logf(float x) { return logf(x); }
static inline float __emu__log2f(float x) { return log2f(x); }
static inline float __emu__log10f(float x) { return log10f(x); }
static inline float __emu__powf(float x, float y) { return powf(x, y); }
static inline float __emu__sinf(float x) { return sinf(x); }
static inline float __emu__cosf(float x) { return cosf(x); }
static inline float __emu__tanf(float x) { return tanf(x); }
static inline void __emu__sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
static inline float __emu__tanhf(float x) { return tanhf(x); }
#define __expf __emu__expf
#define __exp10f __emu__exp10f
#define __logf __emu__logf
#define __log2f __emu__log2f
#define __log10f __emu__log10f
#define __powf __emu__powf
#define __sinf __emu__sinf
#define __cosf __emu__cosf
#define __tanf __emu__tanf
#define __sincosf __emu__sincosf
#define __tanhf __emu__tanhf
static inline float __fdividef(float x, float y) { return x / y; }
static inline float fdividef(float x, float y) { return x / y; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x != x ? 0.0f : x)); }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
static inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
static inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
static inline float __int2float_rn(int x) { return (float)x; }
static inline float __uint2float_rn(unsigned x) { return (float)x; }
static inline float __ll2float_rn(long long x) { return (float)x; }
static inline double __int2double_rn(int x) { return (double)x; }
static inline int __double2int_rn(double x) { return (int)nearbyint(x); }
static inline float __double2float_rn(double x) { return (float)x; }
static inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
static inline unsigned __float_as_uint(float x) { unsigned i; memcpy(&i, &x, 4); return i; }
static inline float __int_as_float(int i) { float x; memcpy(&x, &i, 4); return x; }
static inline float __uint_as_float(unsigned i) { float x; memcpy(&x, &i, 4); return x; }
static inline long long __double_as_longlong(double x) { long long i; memcpy(&i, &x, 8); return i; }
static inline double __longlong_as_double(long long i) { double x; memcpy(&x, &i, 8); return x; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
static inline int __mul24(int a, int b) { return ((a << 8) >> 8) * ((b << 8) >> 8); }
static inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
static inline unsigned __sad(int a, int b, unsigned c) { return c + (unsigned)(a > b ? a - b : b - a); }

/* Read-only / streaming loads and stores: plain memory accesses here. */
template <class T> static inline T __ldg(const T* p) { return *p; }
template <class T> static inline T __ldcg(const T* p) { return *p; }
template <class T> static inline T __ldca(const T* p) { return *p; }
template <class T> static inline T __ldcs(const T* p) { return *p; }
template <class T> static inline T __ldlu(const T* p) { return *p; }
template <class T> static inline T __ldcv(const T* p) { return *p; }
template <class T> static inline void __stwb(T* p, T v) { *p = v; }
template <class T> static inline void __stcg(T* p, T v) { *p = v; }
template <class T> static inline void __stcs(T* p, T v) { *p = v; }
template <class T> static inline void __stwt(T* p, T v) { *p = v; }

/* ------------------------------------------------------------------ atomics */
/* Emulated threads never run at the same time, so a read-modify-write is atomic as it is.
 * In sanitized builds an atomic is a function of its own, not instrumented, that tells the
 * sanitizer "atomic access here" with its caller's address (the kernel line). */
#ifdef __KERNELS_EMU_SANITIZE__
#define EMU_ATOMIC_FN __attribute__((no_sanitize_thread, noinline, unused)) static
#define EMU_ATOMIC_SEEN(address) __emu_san_atomic((void*)(address), sizeof(*(address)), __builtin_return_address(0))
#else
#define EMU_ATOMIC_FN static inline
#define EMU_ATOMIC_SEEN(address) ((void)0)
#endif
#define EMU_ATOMIC_RMW1(NAME, T, EXPR) \
    EMU_ATOMIC_FN T NAME(T* address, T val) { EMU_ATOMIC_SEEN(address); T old = *address; *address = (EXPR); return old; }
#define EMU_ATOMIC_RMW(NAME, T, EXPR) EMU_ATOMIC_RMW1(NAME, T, EXPR) EMU_ATOMIC_RMW1(NAME##_block, T, EXPR) \
    EMU_ATOMIC_RMW1(NAME##_system, T, EXPR)
EMU_ATOMIC_RMW(atomicAdd, int, old + val)
EMU_ATOMIC_RMW(atomicAdd, unsigned int, old + val)
EMU_ATOMIC_RMW(atomicAdd, unsigned long long, old + val)
EMU_ATOMIC_RMW(atomicAdd, float, old + val)
EMU_ATOMIC_RMW(atomicAdd, double, old + val)
EMU_ATOMIC_RMW(atomicSub, int, old - val)
EMU_ATOMIC_RMW(atomicSub, unsigned int, old - val)
EMU_ATOMIC_RMW(atomicExch, int, val)
EMU_ATOMIC_RMW(atomicExch, unsigned int, val)
EMU_ATOMIC_RMW(atomicExch, unsigned long long, val)
EMU_ATOMIC_RMW(atomicExch, float, val)
EMU_ATOMIC_RMW(atomicMin, int, old < val ? old : val)
EMU_ATOMIC_RMW(atomicMin, unsigned int, old < val ? old : val)
EMU_ATOMIC_RMW(atomicMin, long long, old < val ? old : val)
EMU_ATOMIC_RMW(atomicMin, unsigned long long, old < val ? old : val)
EMU_ATOMIC_RMW(atomicMax, int, old > val ? old : val)
EMU_ATOMIC_RMW(atomicMax, unsigned int, old > val ? old : val)
EMU_ATOMIC_RMW(atomicMax, long long, old > val ? old : val)
EMU_ATOMIC_RMW(atomicMax, unsigned long long, old > val ? old : val)
EMU_ATOMIC_RMW(atomicAnd, int, old & val)
EMU_ATOMIC_RMW(atomicAnd, unsigned int, old & val)
EMU_ATOMIC_RMW(atomicAnd, unsigned long long, old & val)
EMU_ATOMIC_RMW(atomicOr, int, old | val)
EMU_ATOMIC_RMW(atomicOr, unsigned int, old | val)
EMU_ATOMIC_RMW(atomicOr, unsigned long long, old | val)
EMU_ATOMIC_RMW(atomicXor, int, old ^ val)
EMU_ATOMIC_RMW(atomicXor, unsigned int, old ^ val)
EMU_ATOMIC_RMW(atomicXor, unsigned long long, old ^ val)
EMU_ATOMIC_RMW(atomicInc, unsigned int, (old >= val) ? 0u : old + 1u)
EMU_ATOMIC_RMW(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
#undef EMU_ATOMIC_RMW
#undef EMU_ATOMIC_RMW1
#define EMU_ATOMIC_CAS1(NAME, T) \
    EMU_ATOMIC_FN T NAME(T* address, T compare, T val) { \
        EMU_ATOMIC_SEEN(address); T old = *address; if (old == compare) *address = val; return old; }
#define EMU_ATOMIC_CAS(T) EMU_ATOMIC_CAS1(atomicCAS, T) EMU_ATOMIC_CAS1(atomicCAS_block, T) \
    EMU_ATOMIC_CAS1(atomicCAS_system, T)
EMU_ATOMIC_CAS(int)
EMU_ATOMIC_CAS(unsigned int)
EMU_ATOMIC_CAS(unsigned long long)
EMU_ATOMIC_CAS(unsigned short)
#undef EMU_ATOMIC_CAS
#undef EMU_ATOMIC_CAS1

#endif /* KERNELS_CUDA_EMU_H */
