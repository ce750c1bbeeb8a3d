/*
 * reduce.cu: the sum of a float array, four ways.  Reductions are how batch norm gets its
 * statistics, how the loss becomes one number and how LARS gets its norms, so they are worth
 * learning in their simplest form first.
 *
 * Versions (`python -m kernels.reduce` checks and times each; the launcher is kernels/reduce.py):
 *   version 1  sum_atomic: every thread atomicAdd()s each of its elements into one float.
 *              Correct, but every add goes to one address, so the adds are serialised.
 *   version 2  sum_block_shared: adds in registers, then a tree in shared memory: one write per
 *              block instead of one atomic per element.  Each thread sums a strided slice into a register,
 *              the block combines its threads' sums with a tree in shared memory (halving the
 *              active threads every step, __syncthreads() between steps) and writes one partial
 *              sum per block; a second launch of one block sums the partials (deterministic).
 *   version 3  sum_block_warp: the first five tree steps become warp shuffles: no shared memory
 *              and no barrier for them.  Inside a warp, __shfl_down_sync reads another lane's
 *              register directly; only one value per warp goes through shared memory.  This is
 *              block_sum of common.cuh, which the other kernels of this folder use.
 *   version 4  sum_grid_atomic: one launch instead of two: each block atomicAdd()s its sum into
 *              the result.  One atomic per block costs nothing, but the order of the adds (and so
 *              the last bits of the result) varies from run to run on a GPU.
 *
 * On a GPU, at ResNet-50's shape (205,520,896 floats, 822 MB; `python -m kernels.reduce` prints the
 * performance model's prediction, kernels/emu/perfmodel.py; measured: bench.kernels on an H100,
 * 2026-12-06; bench/NOTES.md, "Predicted beside measured"):
 *     version  predicted (H100)  measured (H100)  what limits it
 *     1        104 ms            (not run)        205 M atomic adds on one address, one per clock
 *     2        335 us            319 us           DRAM, then a one-block second pass: 256 partial
 *     3        335 us            316 us             sums a thread, each a DRAM round trip (the
 *                                                   first pass streamed them out of L2): ~40 us
 *     4        296 us            277 us           DRAM: no second pass
 *   Versions 2 and 3 differ in the tree only, once per block: a fraction of a microsecond, the
 *   same within the measurement's noise.  What made version 4 the fastest is the second launch it
 *   does not make, not the atomics it saves.
 *
 * Each thread first accumulates many elements in a register (grid-stride loop): that is where
 * almost all the work happens, at full memory bandwidth.  The tree only combines blockDim.x
 * values.  Dynamic shared memory: version 2 needs blockDim.x floats, versions 3 and 4 one float
 * per warp.  blockDim.x must be a power of two (version 2) or a multiple of 32 (versions 3, 4).
 */
#include "common.cuh"   // GRID_STRIDE_LOOP, warp_sum, block_sum

__device__ __forceinline__ float thread_partial_sum(const float* __restrict__ x, long long n) {
    float s = 0.0f;
    GRID_STRIDE_LOOP(i, n) s += x[i];
    return s;
}

/* version 1 */
extern "C" __global__ void sum_atomic(const float* __restrict__ x, float* out, long long n) {
    GRID_STRIDE_LOOP(i, n) atomicAdd(out, x[i]);
}

/* version 2: partial[blockIdx.x] = sum of this block's slice */
extern "C" __global__ void sum_block_shared(const float* __restrict__ x, float* __restrict__ partial, long long n) {
    extern __shared__ float buf[];  // blockDim.x floats
    buf[threadIdx.x] = thread_partial_sum(x, n);
    __syncthreads();
    for (unsigned int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
        __syncthreads();  // everyone must see this step's sums before the next step reads them
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = buf[0];
}

/* version 3.  block_sum (common.cuh) is
 *     v = warp_sum(v);                        // lane 0 of every warp: the warp's sum
 *     if (lane == 0) scratch[warp] = v;       // one float per warp through shared memory
 *     __syncthreads();
 *     if (warp == 0) v = warp_sum(lane < nwarps ? scratch[lane] : 0);   // thread 0: the block's sum
 * and warp_sum is five steps of  v += __shfl_down_sync(FULL_MASK, v, offset)  for offset 16, 8, 4, 2, 1. */
extern "C" __global__ void sum_block_warp(const float* __restrict__ x, float* __restrict__ partial, long long n) {
    extern __shared__ float warp_sums[];  // blockDim.x / 32 floats
    float s = block_sum(thread_partial_sum(x, n), warp_sums);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/* version 4: one pass over the grid: each block adds its partial sum into *out (which starts at 0) */
extern "C" __global__ void sum_grid_atomic(const float* __restrict__ x, float* out, long long n) {
    extern __shared__ float warp_sums[];
    float s = block_sum(thread_partial_sum(x, n), warp_sums);
    if (threadIdx.x == 0) atomicAdd(out, s);
}
