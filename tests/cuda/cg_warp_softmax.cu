/*
 * cg_warp_softmax.cu: row-wise softmax with one warp per row, written with cooperative groups.
 *
 *   y[r, c] = exp(x[r, c] - m_r) / sum_c' exp(x[r, c'] - m_r),   m_r = max_c x[r, c]
 *
 * The block is split into tiles of 32 threads (cg::tiled_partition<32>); tile k of block b
 * owns row b * tiles_per_block + k.  Each lane strides over the row's columns (lane, lane + 32,
 * ...), keeping a running maximum, then cg::reduce combines the lanes' maxima (cg::greater) and,
 * after a second pass, their sums of exponentials (cg::plus); every lane gets the result.
 * Memory: each row is read twice and written once, 32 consecutive floats per warp access.
 */
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>

namespace cg = cooperative_groups;

extern "C" __global__ void softmax_rows_warp(const float* __restrict__ x, float* __restrict__ y, int rows, int cols) {
    cg::thread_block block = cg::this_thread_block();
    cg::thread_block_tile<32> warp = cg::tiled_partition<32>(block);
    const int row = blockIdx.x * warp.meta_group_size() + warp.meta_group_rank();
    if (row >= rows) return;   // a whole tile leaves together: no collective waits for it
    const float* xr = x + (long long)row * cols;
    float* yr = y + (long long)row * cols;
    float m = __int_as_float(0xff800000);   // -infinity (NVRTC has no <math.h> INFINITY)
    for (int c = warp.thread_rank(); c < cols; c += warp.size()) m = fmaxf(m, xr[c]);
    m = cg::reduce(warp, m, cg::greater<float>());
    float s = 0.0f;
    for (int c = warp.thread_rank(); c < cols; c += warp.size()) s += expf(xr[c] - m);
    s = cg::reduce(warp, s, cg::plus<float>());
    for (int c = warp.thread_rank(); c < cols; c += warp.size()) yr[c] = expf(xr[c] - m) / s;
}
