/*
 * common.cuh: the device helpers the kernels of this folder share, written once.  A .cu file
 * that needs them says #include "common.cuh" (kernels.load_module puts this folder on the
 * include path, for NVRTC and for the emulator).  reduce.cu derives the reductions step by step;
 * here they are in the form every other kernel uses.
 *
 * Loops
 *   GRID_STRIDE_LOOP(i, n)      thread t of a grid of T threads visits t, t + T, t + 2T, ... < n,
 *                               with 64-bit indices, so any grid size is correct
 *   GRID_STRIDE_LOOP_Y(r, n)    the same along y: rows of the 2-D (channels x rows) blocks of
 *                               batch norm and of column sums
 * Indices
 *   unravel4(i, d1, d2, d3, a, b, c, d)   the coordinates of element i of a C-order array of shape
 *                               (d0, d1, d2, d3): i = ((a * d1 + b) * d2 + c) * d3 + d
 *   FastDiv f = make_fastdiv(d); fast_div(n, f), fast_divmod(n, f, q, r)   n / d and n % d for
 *                               0 <= n < 2^31 by a divisor fixed for the whole kernel, as one
 *                               multiply-high and a shift instead of a division (below)
 * Types
 *   to_float(v), from_float<T>(f)   float <-> the storage type (float or __half); half-precision
 *                               kernels compute in float and round once, on the store
 *   load_float4(p, r), store_float4(p, r)   4 consecutive floats moved as one 16-byte vector
 *                               (p 16-byte aligned) to or from 4 registers r[0..3]: one memory
 *                               instruction instead of four
 *   load_half8(p, f), store_half8(p, f)   8 consecutive halves (one 16-byte vector, p 16-byte
 *                               aligned) to or from 8 floats f[0..7]: one instruction instead of 8
 *   VEC16(T), load_vec16(p, f), store_vec16(p, f)   the same for either storage type: one 16-byte
 *                               vector is VEC16(T) = 4 floats or 8 halves (overloaded on T)
 *   Lanes<V>::load / store / load_floats / load_ints   V values as one 16-byte vector, or one value
 *                               (V = 1): for a thread that owns V channels
 * Reductions (1-D blocks whose size is a multiple of 32; every thread of the block must call them,
 * since they hold barriers)
 *   warp_sum(v)                 sum over the 32 lanes of a warp by __shfl_down_sync; valid in lane 0
 *   block_sum(v, scratch)       sum over the block: warp_sum in every warp, the warps' sums
 *                               through `scratch` (32 values of shared memory), warp_sum again in
 *                               warp 0; valid in thread 0; scratch is free again on return
 *   block_sum_of<S>(x, n, scratch)   sum of x[0..n) by one block, accumulated in type S (every
 *                               thread strides through x, then block_sum); valid in thread 0
 *   column_sum(v, tile)         2-D blocks (threadIdx.x a column, threadIdx.y a row): the sum of v
 *                               over the rows of each column, through `tile` (shared memory, one
 *                               value per thread); valid where threadIdx.y == 0
 *   rows_block_partials<V, THREADS>(sh, s0, s1, part, C)   2-D blocks of channel vectors x rows:
 *                               two sums per channel added over the block's rows into one row of
 *                               part [2][gridDim.y][C] (below)
 * Entry points
 *   KERNEL_ENTRY(name, template<arguments>)   see below
 */
#ifndef KERNELS_COMMON_CUH
#define KERNELS_COMMON_CUH

#include <cuda_fp16.h>

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu  /* every lane of the warp takes part in a shuffle or vote */

/* ------------------------------------------------------------------------------------ loops */
#define GRID_STRIDE_LOOP(i, n)                                                               \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);            \
         i += (long long)blockDim.x * gridDim.x)

#define GRID_STRIDE_LOOP_Y(r, n)                                                             \
    for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < (n);            \
         r += (long long)blockDim.y * gridDim.y)

/* ---------------------------------------------------------------------------------- indices */
__device__ __forceinline__ void unravel4(long long i, int d1, int d2, int d3, int& a, int& b, int& c, int& d) {
    d = (int)(i % d3);
    i /= d3;
    c = (int)(i % d2);
    i /= d2;
    b = (int)(i % d1);
    a = (int)(i / d1);
}

/* Integer division has no instruction on a GPU: n / d compiles to a sequence of some twenty
 * instructions, which an index computation in a tile loader pays for every element.  When d is
 * the same for the whole kernel (a channel count, an image width), the quotient is a multiply and
 * a shift (Granlund & Montgomery 1994): with l = ceil(log2 d), p = 31 + l and m = ceil(2^p / d),
 *     n / d == (n * m) >> p      for every 0 <= n < 2^31,
 * where m < 2^32, so n * m >> 32 is __umulhi(n, m) and the rest a shift by p - 32 = l - 1.
 * make_fastdiv does the one real division, once per thread, before any loop. */
struct FastDiv {
    int d;
    unsigned m, shift;   // m == 0: d == 1, the quotient is n itself
};

__device__ __forceinline__ FastDiv make_fastdiv(int d) {
    FastDiv f;
    f.d = d;
    f.m = 0;
    f.shift = 0;
    if (d > 1) {
        unsigned l = 0;
        while ((1u << l) < (unsigned)d) ++l;   // ceil(log2 d) >= 1
        f.m = (unsigned)(((1ull << (31 + l)) + (unsigned)d - 1) / (unsigned)d);
        f.shift = l - 1;
    }
    return f;
}

__device__ __forceinline__ int fast_div(int n, const FastDiv& f) {
    return f.m ? (int)(__umulhi((unsigned)n, f.m) >> f.shift) : n;
}

__device__ __forceinline__ void fast_divmod(int n, const FastDiv& f, int& q, int& r) {
    q = fast_div(n, f);
    r = n - q * f.d;
}

/* ------------------------------------------------------------------------------------ types */
template <typename T>
__device__ __forceinline__ float to_float(T v) { return (float)v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return (T)v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ void load_float4(const float* p, float* r) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    r[0] = v.x;
    r[1] = v.y;
    r[2] = v.z;
    r[3] = v.w;
}

__device__ __forceinline__ void store_float4(float* p, const float* r) {
    *reinterpret_cast<float4*>(p) = make_float4(r[0], r[1], r[2], r[3]);
}

// The 16 bytes travel as one uint4; memcpy reinterprets them as 4 __half2 without breaking C++'s
// aliasing rules (on a GPU it compiles to nothing: the bytes are already in registers).
__device__ __forceinline__ void load_half8(const __half* p, float* f) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    __half2 h[4];
    memcpy(h, &raw, sizeof(raw));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 t = __half22float2(h[j]);
        f[2 * j] = t.x;
        f[2 * j + 1] = t.y;
    }
}

__device__ __forceinline__ void store_half8(__half* p, const float* f) {
    __half2 h[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(f[2 * j], f[2 * j + 1]);
    uint4 raw;
    memcpy(&raw, h, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
}

/* One 16-byte vector of the storage type T: 4 floats or 8 halves, to or from VEC16<T> floats. */
template <typename T>
struct Vec16Size { static constexpr int value = 16 / (int)sizeof(T); };
#define VEC16(T) (Vec16Size<T>::value)

__device__ __forceinline__ void load_vec16(const float* p, float* f) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    f[0] = v.x;
    f[1] = v.y;
    f[2] = v.z;
    f[3] = v.w;
}
__device__ __forceinline__ void load_vec16(const __half* p, float* f) { load_half8(p, f); }
__device__ __forceinline__ void store_vec16(float* p, const float* f) { store_float4(p, f); }
__device__ __forceinline__ void store_vec16(__half* p, const float* f) { store_half8(p, f); }

/* V consecutive values of the storage type T, to or from floats: one 16-byte vector (V = VEC16(T): 4
 * floats, 8 halves) or, V = 1, one value; and V float32 or int32 companions (a channel's constants, an
 * argmax) as V / 4 16-byte vectors.  For kernels whose thread owns V channels (batchnorm.cu version 4,
 * pool.cu version 3), which take V = 1 where the channels or the arrays do not allow vectors. */
template <int V>
struct Lanes {
    template <typename T>
    static __device__ __forceinline__ void load(const T* p, float* f) { load_vec16(p, f); }
    template <typename T>
    static __device__ __forceinline__ void store(T* p, const float* f) { store_vec16(p, f); }
    static __device__ __forceinline__ void load_floats(const float* p, float* f) {
#pragma unroll
        for (int j = 0; j < V; j += 4) load_vec16(p + j, f + j);
    }
    static __device__ __forceinline__ void load_ints(const int* p, int* a) {
#pragma unroll
        for (int j = 0; j < V; j += 4) {
            const int4 v = __ldg(reinterpret_cast<const int4*>(p + j));
            a[j] = v.x;
            a[j + 1] = v.y;
            a[j + 2] = v.z;
            a[j + 3] = v.w;
        }
    }
};
template <>
struct Lanes<1> {
    template <typename T>
    static __device__ __forceinline__ void load(const T* p, float* f) { f[0] = to_float(*p); }
    template <typename T>
    static __device__ __forceinline__ void store(T* p, const float* f) { *p = from_float<T>(f[0]); }
    static __device__ __forceinline__ void load_floats(const float* p, float* f) { f[0] = *p; }
    static __device__ __forceinline__ void load_ints(const int* p, int* a) { a[0] = *p; }
};

/* ------------------------------------------------------------------------------- reductions */
/* Five shuffle steps: lane l adds lane l + 16, then l + 8, ... l + 1; lane 0 ends with the sum. */
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) v += __shfl_down_sync(FULL_MASK, v, offset);
    return v;
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();  // every warp's sum is in scratch before warp 0 reads them
    if (warp == 0) v = warp_sum(lane < (int)(blockDim.x / WARP_SIZE) ? scratch[lane] : (T)0);
    __syncthreads();  // warp 0 has read scratch: the caller may use it again
    return v;
}

template <typename S, typename T>
__device__ __forceinline__ S block_sum_of(const T* __restrict__ x, int n, S* scratch) {
    S s = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    return block_sum(s, scratch);
}

template <int COLS>
__device__ __forceinline__ float column_sum(float v, float (*tile)[COLS]) {
    tile[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    float s = 0.0f;
    if (threadIdx.y == 0)
        for (int r = 0; r < (int)blockDim.y; ++r) s += tile[r][threadIdx.x];  // rows in a fixed order
    __syncthreads();  // the tile may be used again
    return s;
}

/* The end of a pass that sums over rows, in the layout of batch norm's version 4 and the pools' *_relu_bn
 * kernels: thread (tx, ty) owns channels (blockIdx.x * blockDim.x + tx) * V .. + V - 1 and holds the sums
 * s0, s1 of them over its rows; the block's blockDim.y sums per channel are added in order of ty through
 * shared memory sh [2 V][THREADS + 1] (+ 1: a thread's V sums in different banks; deterministic), by
 * threads that each own one (sum, channel) of the block, consecutive threads on consecutive channels, into
 * part[s][blockIdx.y][c] of part [2][gridDim.y][C].  blockDim.x * blockDim.y <= THREADS. */
template <int V, int THREADS>
__device__ __forceinline__ void rows_block_partials(float (*sh)[THREADS + 1], const float* s0, const float* s1,
                                                    float* __restrict__ part, int C) {
    const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        sh[j][t] = s0[j];
        sh[V + j][t] = s1[j];
    }
    __syncthreads();
    const int cols = blockDim.x * V;   // this block's channels (the last block's may run past C)
    for (int o = t; o < 2 * cols; o += blockDim.x * blockDim.y) {
        const int s = o / cols, local = o % cols, c = blockIdx.x * cols + local;
        if (c >= C) continue;
        const int tx = local / V, j = local % V;
        float v = 0.0f;
        for (int ty = 0; ty < (int)blockDim.y; ++ty) v += sh[s * V + j][ty * blockDim.x + tx];
        part[((long long)s * gridDim.y + blockIdx.y) * C + c] = v;
    }
}

/* ----------------------------------------------------------------------------- entry points */
/*
 * A kernel written once as a template __device__ function is exported for each type by one line
 * of an instantiation list:
 *
 *     template <typename T>
 *     __device__ void relu_forward(const T* __restrict__ x, T* __restrict__ y, long long n) { ... }
 *
 *     KERNEL_ENTRY(relu_forward_f32, relu_forward<float>)
 *     KERNEL_ENTRY(relu_forward_f16, relu_forward<__half>)
 *
 * The kernel loader (kernels.load_module, RawModule; kernels/emu/signature.py expand_entry_points)
 * writes each such line out, on the same line, as the extern "C" kernel it stands for:
 *
 *     extern "C" __global__ void relu_forward_f32(const float* __restrict__ x, float* __restrict__ y,
 *                                                 long long n) { relu_forward<float>(x, y, n); }
 *
 * the template's parameter list with the template arguments put in.  So the launcher finds an
 * ordinary extern "C" kernel (CuPy cannot launch a template by name), argument checking reads its
 * parameters, and no per-type wrapper is written by hand.  A compiler that sees the line itself
 * (the file compiled without the loader) stops with this message:
 */
#define KERNEL_ENTRY(...) \
    static_assert(false, "KERNEL_ENTRY lines are written out by kernels.load_module (kernels/emu/signature.py)");

#endif /* KERNELS_COMMON_CUH */
