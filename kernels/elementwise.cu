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
 * Versions (`python -m kernels.elementwise` checks and times it):
 *   version 1  a grid-stride loop, one element per iteration: every byte is read and written once.
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
