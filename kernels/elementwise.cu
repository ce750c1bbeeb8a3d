/*
 * elementwise.cu: the simplest kernels of the network, one output element per loop iteration.
 *
 *   relu_forward      y  = max(x, 0)
 *   relu_backward     dx = dy * (y > 0)           (from the output y: it is what forward keeps)
 *   add               c  = a + b                  (the residual connection)
 *   add_relu_forward  y  = max(a + b, 0)          (the end of a bottleneck, fused: one pass)
 *   scale             y  = alpha * x
 *   axpy              y  = alpha * x + y          (in place on y)
 *   fill              y  = value
 *   cast_*            float32 <-> float16 / bfloat16, round to nearest even
 *
 * Memory-access plan: every kernel reads its inputs once and writes its output once, with
 * consecutive threads touching consecutive elements (coalesced).  They are memory bound: the
 * only speed that matters is bytes moved per second, compared in bench/ with a device copy.
 *
 * The loop is a grid-stride loop: thread t of a grid of T threads handles t, t + T, t + 2T, ...
 * so any grid size is correct.  The launcher picks enough blocks to fill the GPU (or few on the
 * emulator, which runs blocks one after another).  Indices are 64-bit: n may exceed 2^31.
 *
 * float and __half kernels come from one template each, exported by the instantiation list of
 * KERNEL_ENTRY lines below (common.cuh); the extern "C" names carry the type.  Half-precision
 * math is done in float and rounded once on the store.
 *
 * Versions (`python -m kernels.elementwise` checks and times them; the launchers are kernels/elementwise.py):
 *   version 1  a grid-stride loop, one element per iteration: every byte is read and written once.
 *   version 2  16-byte vectors: each iteration moves 8 halves (or 4 floats) per load and per store,
 *              and the n % 8 (or n % 4) elements after the last whole vector go one per thread.
 *              Version 1's float16 loop keeps one 2-byte load per thread in flight, so a warp
 *              waits a whole DRAM latency for 64 bytes; a 16-byte vector per thread puts 512 bytes
 *              in flight per warp, eight times as many with the same warps, and one instruction
 *              loads what took eight.  Needs every array to start on a 16-byte boundary (the
 *              launchers check, and run version 1 otherwise).  ReLU forward/backward, add, add +
 *              ReLU and the float32 <-> float16 casts (these 4 values a thread: a float4 and 8
 *              bytes of halves); scale, axpy, fill and the bfloat16 casts are version 1's in both.
 *              The same numbers as version 1, bit for bit.
 *
 * On a GPU, at ResNet-50's shape (256x56x56x256, `python -m kernels.elementwise` prints the
 * performance model's prediction; measured on an H100 by bench.kernels, bench/NOTES.md):
 *   float32 ReLU 576 us predicted, 591 us measured (93 % of a device copy's bandwidth): LLVM
 *   unrolls the float loop 4 times, so each warp has 4 loads in flight and DRAM is the limit.
 *   float16 ReLU 502 us predicted, 468 us measured (59 %): the half conversions are inline
 *   assembly (cuda_fp16.hpp), which the unroller does not copy, so each warp has ONE 64-byte load
 *   in flight; 64 warps x 132 SMs x 64 bytes / ~600 ns of DRAM latency is what the memory system
 *   gets (Little's law), well under its bandwidth.  Two halves per thread (__half2) or 16-byte
 *   vectors would put more bytes in flight.
 *   version 2 (predicted, not measured): float16 ReLU 301 us (92 %), ReLU backward, add, add +
 *   ReLU and the casts 423 us (98 %; version 1: 499-986 us, 42-83 %): DRAM is the limit.  Its
 *   float32 kernels take what version 1's unrolled loop already took (96-101 %).
 */
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "common.cuh"   // GRID_STRIDE_LOOP, to_float, from_float, KERNEL_ENTRY

template <typename T>
__device__ void relu_forward(const T* __restrict__ x, T* __restrict__ y, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        float v = to_float(x[i]);
        y[i] = from_float<T>(v > 0.0f ? v : 0.0f);
    }
}

template <typename T>
__device__ void relu_backward(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                              long long n) {
    GRID_STRIDE_LOOP(i, n) { dx[i] = to_float(y[i]) > 0.0f ? dy[i] : from_float<T>(0.0f); }
}

template <typename T>
__device__ void add(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c, long long n) {
    GRID_STRIDE_LOOP(i, n) { c[i] = from_float<T>(to_float(a[i]) + to_float(b[i])); }
}

template <typename T>
__device__ void add_relu_forward(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                                 long long n) {
    GRID_STRIDE_LOOP(i, n) {
        float v = to_float(a[i]) + to_float(b[i]);
        y[i] = from_float<T>(v > 0.0f ? v : 0.0f);
    }
}

KERNEL_ENTRY(relu_forward_f32, relu_forward<float>)
KERNEL_ENTRY(relu_forward_f16, relu_forward<__half>)
KERNEL_ENTRY(relu_backward_f32, relu_backward<float>)
KERNEL_ENTRY(relu_backward_f16, relu_backward<__half>)
KERNEL_ENTRY(add_f32, add<float>)
KERNEL_ENTRY(add_f16, add<__half>)
KERNEL_ENTRY(add_relu_forward_f32, add_relu_forward<float>)
KERNEL_ENTRY(add_relu_forward_f16, add_relu_forward<__half>)

extern "C" __global__ void scale_f32(const float* __restrict__ x, float* __restrict__ y, float alpha, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = alpha * x[i]; }
}

extern "C" __global__ void axpy_f32(const float* __restrict__ x, float* __restrict__ y, float alpha, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = fmaf(alpha, x[i], y[i]); }
}

extern "C" __global__ void fill_f32(float* y, float value, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = value; }
}

extern "C" __global__ void cast_f32_to_f16(const float* __restrict__ x, __half* __restrict__ y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = __float2half_rn(x[i]); }
}

extern "C" __global__ void cast_f16_to_f32(const __half* __restrict__ x, float* __restrict__ y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = __half2float(x[i]); }
}

/* bfloat16 travels as its 16-bit pattern (NumPy has no bfloat16 type: uint16 arrays). */
extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = __float2bfloat16_rn(x[i]); }
}

extern "C" __global__ void cast_bf16_to_f32(const __nv_bfloat16* __restrict__ x, float* __restrict__ y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = __bfloat162float(x[i]); }
}

/* ============================================================== version 2: 16-byte vectors */
/* V = VEC16(T) elements per vector (4 floats, 8 halves).  Vector v holds elements v*V .. v*V + V-1;
 * the tail loop takes the elements after the last whole vector, one per thread. */
template <typename T>
__device__ void relu_forward_vec(const T* __restrict__ x, T* __restrict__ y, long long n) {
    constexpr int V = VEC16(T);
    const long long vectors = n / V;
    GRID_STRIDE_LOOP(v, vectors) {
        float f[V];
        load_vec16(x + v * V, f);
#pragma unroll
        for (int j = 0; j < V; ++j) f[j] = f[j] > 0.0f ? f[j] : 0.0f;
        store_vec16(y + v * V, f);
    }
    GRID_STRIDE_LOOP(t, n - vectors * V) {
        const long long i = vectors * V + t;
        const float f = to_float(x[i]);
        y[i] = from_float<T>(f > 0.0f ? f : 0.0f);
    }
}

// c = op(a, b) elementwise, in floats: whole vectors, then the tail one element per thread.
template <typename T, class Op>
__device__ __forceinline__ void map2_vec(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c,
                                         long long n, Op op) {
    constexpr int V = VEC16(T);
    const long long vectors = n / V;
    GRID_STRIDE_LOOP(v, vectors) {
        float fa[V], fb[V];
        load_vec16(a + v * V, fa);
        load_vec16(b + v * V, fb);
#pragma unroll
        for (int j = 0; j < V; ++j) fa[j] = op(fa[j], fb[j]);
        store_vec16(c + v * V, fa);
    }
    GRID_STRIDE_LOOP(t, n - vectors * V) {
        const long long i = vectors * V + t;
        c[i] = from_float<T>(op(to_float(a[i]), to_float(b[i])));
    }
}

template <typename T>
__device__ void relu_backward_vec(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                                  long long n) {
    // a half survives the float round trip: dx is dy's bits where y > 0
    map2_vec(dy, y, dx, n, [](float g, float out) { return out > 0.0f ? g : 0.0f; });
}

template <typename T, bool RELU>
__device__ void add_vec(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c, long long n) {
    map2_vec(a, b, c, n, [](float x, float y) {
        const float s = x + y;
        return RELU ? (s > 0.0f ? s : 0.0f) : s;
    });
}

KERNEL_ENTRY(relu_forward_vec_f32, relu_forward_vec<float>)
KERNEL_ENTRY(relu_forward_vec_f16, relu_forward_vec<__half>)
KERNEL_ENTRY(relu_backward_vec_f32, relu_backward_vec<float>)
KERNEL_ENTRY(relu_backward_vec_f16, relu_backward_vec<__half>)
KERNEL_ENTRY(add_vec_f32, add_vec<float, false>)
KERNEL_ENTRY(add_vec_f16, add_vec<__half, false>)
KERNEL_ENTRY(add_relu_forward_vec_f32, add_vec<float, true>)
KERNEL_ENTRY(add_relu_forward_vec_f16, add_vec<__half, true>)

/* The casts move 4 values per iteration: a float4 (16 bytes) on the float32 side, 4 halves (8 bytes) on
 * the float16 side, so that every warp instruction on either side covers whole sectors (a float16
 * vector of 8 would put each lane's two float4 32 bytes apart: half of each request's sectors). */
__device__ __forceinline__ void store_half4(__half* p, const float* f) {
    __half2 h[2] = {__floats2half2_rn(f[0], f[1]), __floats2half2_rn(f[2], f[3])};
    uint2 raw;
    memcpy(&raw, h, sizeof(raw));
    *reinterpret_cast<uint2*>(p) = raw;
}

__device__ __forceinline__ void load_half4(const __half* p, float* f) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    __half2 h[2];
    memcpy(h, &raw, sizeof(raw));
    const float2 a = __half22float2(h[0]), b = __half22float2(h[1]);
    f[0] = a.x;
    f[1] = a.y;
    f[2] = b.x;
    f[3] = b.y;
}

extern "C" __global__ void cast_f32_to_f16_vec(const float* __restrict__ x, __half* __restrict__ y, long long n) {
    const long long vectors = n / 4;
    GRID_STRIDE_LOOP(v, vectors) {
        float f[4];
        load_vec16(x + v * 4, f);
        store_half4(y + v * 4, f);   // __floats2half2_rn: round to nearest even, as __float2half_rn
    }
    GRID_STRIDE_LOOP(t, n - vectors * 4) { y[vectors * 4 + t] = __float2half_rn(x[vectors * 4 + t]); }
}

extern "C" __global__ void cast_f16_to_f32_vec(const __half* __restrict__ x, float* __restrict__ y, long long n) {
    const long long vectors = n / 4;
    GRID_STRIDE_LOOP(v, vectors) {
        float f[4];
        load_half4(x + v * 4, f);
        store_vec16(y + v * 4, f);
    }
    GRID_STRIDE_LOOP(t, n - vectors * 4) { y[vectors * 4 + t] = __half2float(x[vectors * 4 + t]); }
}
