/*
 * common.cuh: small helpers shared by the kernels of this folder (#include "common.cuh";
 * kernels.load_module puts kernels/ on the include path for NVRTC and for the emulator).
 *
 *   GRID_STRIDE_LOOP(i, n)   thread t of a grid of T threads visits t, t + T, t + 2T, ... < n,
 *                            with 64-bit indices, so any grid size is correct
 *   to_float(v), from_float<T>(f)   float <-> the storage type (float or __half); half-precision
 *                            kernels compute in float and round once, on the store
 */
#ifndef KERNELS_COMMON_CUH
#define KERNELS_COMMON_CUH

#include <cuda_fp16.h>

#define GRID_STRIDE_LOOP(i, n)                                                               \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);            \
         i += (long long)blockDim.x * gridDim.x)

template <typename T>
__device__ __forceinline__ float to_float(T v) { return (float)v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return (T)v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

#endif /* KERNELS_COMMON_CUH */
