/*
 * batchnorm_sync.cu: the pieces of synchronised batch norm (nn/distributed.py, --sync-bn), where
 * the statistics of a batch spread over several processes are summed across them by an
 * all-reduce between the per-process reductions and the elementwise work.
 *
 * x, dy are NHWC activations viewed as [M, C] (M = N*H*W rows, channel fastest).
 *
 *   partial statistics   s1_c = sum_m (x[m,c] - shift_c)       s2_c = sum_m (x[m,c] - shift_c)^2
 *                        (shift: a per-channel constant shared by every process, e.g. the running
 *                        mean; summed over processes, mean = shift + S1/COUNT and
 *                        var = S2/COUNT - (S1/COUNT)^2 without catastrophic cancellation)
 *   backward reductions  r0_c = sum_m dy[m,c]                  r1_c = sum_m dy[m,c] * xhat[m,c]
 *                        xhat = (x - mean) * invstd
 *   backward elementwise dx = gamma * invstd * (dy - R0/COUNT - xhat * R1/COUNT)
 *                        (R0, R1: the reductions summed over every process)
 *
 * Memory-access plan of the two reductions: a block is 32 channels (threadIdx.x, so a warp reads
 * 32 consecutive floats of a row: coalesced) by 8 rows (threadIdx.y); blockIdx.y splits the rows
 * into chunks; each thread accumulates its rows in registers, the block adds its 8 row-threads
 * (column_sum, common.cuh) and writes one partial per (chunk, quantity, channel). A second kernel
 * adds the chunks' partials in a fixed order: deterministic, no atomics.
 *
 * Versions (checked by tests/test_kernels_batchnorm_sync.py; the launchers are in kernels/batchnorm.py):
 *   version 1  the reductions of batchnorm.cu's version 2 without the merge across blocks, which
 *              is the all-reduce's job: per-chunk partial sums around a shift.
 */
#include <cuda_fp16.h>
#include "common.cuh"   // GRID_STRIDE_LOOP(_Y), to_float, from_float, column_sum, KERNEL_ENTRY

#define SYNC_TILE_C 32
#define SYNC_ROWS 8

/* MODE 0: (s1, s2) of x around a = shift.  MODE 1: (r0, r1) of dy, with a = mean, b = invstd.
 * grid = (ceil(C / 32), chunks), block = (32, 8). */
template <typename T, int MODE>
__device__ void channel_partials(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ a,
                                 const float* __restrict__ b, float* __restrict__ partial, long long M, int C) {
    __shared__ float tile[SYNC_ROWS][SYNC_TILE_C];
    const int c = blockIdx.x * SYNC_TILE_C + threadIdx.x;
    float q0 = 0.0f, q1 = 0.0f;
    if (c < C) {
        const float ac = a[c];
        const float bc = MODE == 1 ? b[c] : 0.0f;
        GRID_STRIDE_LOOP_Y(r, M) {
            const float d = to_float(x[r * C + c]) - ac;
            if (MODE == 0) {
                q0 += d;
                q1 += d * d;
            } else {
                const float g = to_float(dy[r * C + c]);
                q0 += g;
                q1 += g * d * bc;
            }
        }
    }
    q0 = column_sum(q0, tile);
    q1 = column_sum(q1, tile);
    if (threadIdx.y == 0 && c < C) {
        partial[((long long)blockIdx.y * 2 + 0) * C + c] = q0;
        partial[((long long)blockIdx.y * 2 + 1) * C + c] = q1;
    }
}

/* The statistics pass reads x only; the backward pass reads dy and x. */
template <typename T>
__device__ void partial_stats(const T* __restrict__ x, const float* __restrict__ shift, float* __restrict__ partial,
                              long long M, int C) {
    channel_partials<T, 0>(x, nullptr, shift, nullptr, partial, M, C);
}

template <typename T>
__device__ void backward_reduce(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
                                const float* __restrict__ invstd, float* __restrict__ partial, long long M, int C) {
    channel_partials<T, 1>(x, dy, mean, invstd, partial, M, C);
}

KERNEL_ENTRY(bn_sync_partial_stats_f32, partial_stats<float>)
KERNEL_ENTRY(bn_sync_partial_stats_f16, partial_stats<__half>)
KERNEL_ENTRY(bn_sync_backward_reduce_f32, backward_reduce<float>)
KERNEL_ENTRY(bn_sync_backward_reduce_f16, backward_reduce<__half>)

/* out[k, c] = sum over chunks g of partial[g, k, c], in chunk order. One thread per (k, c). */
extern "C" __global__ void bn_sync_sum_partials(const float* __restrict__ partial, float* __restrict__ out,
                                                int chunks, int C) {
    GRID_STRIDE_LOOP(i, 2LL * C) {
        float s = 0.0f;
        for (int g = 0; g < chunks; ++g) s += partial[(long long)g * 2 * C + i];
        out[i] = s;
    }
}

template <typename T>
__device__ void backward_elemt(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ gamma,
                               const float* __restrict__ mean, const float* __restrict__ invstd,
                               const float* __restrict__ sums, float inv_count, T* __restrict__ dx, long long M,
                               int C) {
    GRID_STRIDE_LOOP(i, M * C) {
        const int c = (int)(i % C);
        const float xhat = (to_float(x[i]) - mean[c]) * invstd[c];
        const float v = gamma[c] * invstd[c] * (to_float(dy[i]) - sums[c] * inv_count - xhat * sums[C + c] * inv_count);
        dx[i] = from_float<T>(v);
    }
}

KERNEL_ENTRY(bn_sync_backward_elemt_f32, backward_elemt<float>)
KERNEL_ENTRY(bn_sync_backward_elemt_f16, backward_elemt<__half>)
