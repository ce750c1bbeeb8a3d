/*
 * cg_block_reduce.cu: the sum of an array, one partial sum per block, with cooperative groups.
 *
 * Each thread adds a grid-stride slice in a register; each warp-sized tile combines its 32
 * values with cg::reduce (cg::plus); tile leaders put one value per tile in shared memory;
 * after block.sync() the first tile reduces those and thread 0 writes the block's partial sum.
 * The same structure as reduce.cu's sum_block_warp, with groups instead of lane arithmetic.
 * Also: the maximum and the bitwise OR of an int array, to show the other operators.
 */
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>

namespace cg = cooperative_groups;

template <class T, class Op>
__device__ T block_reduce(T v, T identity, Op op, T* tile_values) {
    cg::thread_block block = cg::this_thread_block();
    cg::thread_block_tile<32> tile = cg::tiled_partition<32>(block);
    v = cg::reduce(tile, v, op);
    if (tile.thread_rank() == 0) tile_values[tile.meta_group_rank()] = v;
    block.sync();
    if (tile.meta_group_rank() == 0) {
        v = tile.thread_rank() < tile.meta_group_size() ? tile_values[tile.thread_rank()] : identity;
        v = cg::reduce(tile, v, op);
    }
    return v;
}

// block: up to 1024 threads (a last partial tile reduces only the threads it has); partial[gridDim.x]
extern "C" __global__ void sum_partials(const float* __restrict__ x, float* __restrict__ partial, int n) {
    __shared__ float tile_sums[32];
    float s = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) s += x[i];
    s = block_reduce(s, 0.0f, cg::plus<float>(), tile_sums);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[0]: maximum, out[1]: bitwise OR, per block: out[2 * blockIdx.x + ...]
extern "C" __global__ void max_and_or(const int* __restrict__ x, int* __restrict__ out, int n) {
    __shared__ int tile_values[32];
    int m = INT_MIN, o = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        m = max(m, x[i]);
        o |= x[i];
    }
    m = block_reduce(m, INT_MIN, cg::greater<int>(), tile_values);
    cg::this_thread_block().sync();   // tile_values is reused: everyone has read it
    o = block_reduce(o, 0, cg::bit_or<int>(), tile_values);
    if (threadIdx.x == 0) {
        out[2 * blockIdx.x] = m;
        out[2 * blockIdx.x + 1] = o;
    }
}
