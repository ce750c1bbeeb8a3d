/*
 * reduce.cu: the sum of a float array, four ways.  Reductions are how batch norm gets its
 * statistics, how the loss becomes one number and how LARS gets its norms, so they are worth
 * learning in their simplest form first.
 *
 *   version 1  sum_atomic        every thread atomicAdd()s its elements into one float.
 *                                Correct, but every add goes to one address: serialised.
 *   version 2  sum_block_shared  each thread sums a strided slice into a register, the block
 *                                combines its threads' sums with a tree in shared memory
 *                                (halving the active threads every step, __syncthreads() between
 *                                steps) and writes one partial sum per block.
 *   version 3  sum_block_warp    as version 2, but the first five tree steps happen inside each
 *                                warp with __shfl_down_sync (no shared memory, no barrier); only
 *                                one value per warp goes through shared memory.
 *   grid level                   a second launch of one block reduces the per-block partial sums
 *                                (two passes, deterministic), or sum_grid_atomic lets each block
 *                                atomicAdd its partial into the result (one pass; the order of the
 *                                adds, and so the last bits, vary from run to run on a GPU).
 *
 * Each thread first accumulates many elements in a register (grid-stride loop): that is where
 * almost all the work happens, at full memory bandwidth.  The tree only combines blockDim.x
 * values.  Dynamic shared memory: version 2 needs blockDim.x floats, version 3 one float per warp.
 * blockDim.x must be a power of two (version 2) or a multiple of 32 (version 3).
 */

__device__ __forceinline__ float thread_partial_sum(const float* __restrict__ x, long long n) {
    float s = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x)
        s += x[i];
    return s;
}

/* version 1 */
extern "C" __global__ void sum_atomic(const float* __restrict__ x, float* out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x)
        atomicAdd(out, x[i]);
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

/* Sum of v over the 32 lanes of a warp; the result is valid in lane 0. */
__device__ __forceinline__ float warp_reduce_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

/* Sum of v over the block; the result is valid in thread 0.  warp_sums: one float per warp. */
__device__ __forceinline__ float block_reduce_sum(float v, float* warp_sums) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = warp_reduce_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? warp_sums[lane] : 0.0f;
        v = warp_reduce_sum(v);
    }
    return v;
}

/* version 3 */
extern "C" __global__ void sum_block_warp(const float* __restrict__ x, float* __restrict__ partial, long long n) {
    extern __shared__ float warp_sums[];  // blockDim.x / 32 floats
    float s = block_reduce_sum(thread_partial_sum(x, n), warp_sums);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/* one pass over the grid: each block adds its partial sum into *out (which starts at 0) */
extern "C" __global__ void sum_grid_atomic(const float* __restrict__ x, float* out, long long n) {
    extern __shared__ float warp_sums[];
    float s = block_reduce_sum(thread_partial_sum(x, n), warp_sums);
    if (threadIdx.x == 0) atomicAdd(out, s);
}
