/*
 * pipeline_tile_copy.cu: y = a * x, streamed through shared memory in tiles with asynchronous
 * copies (cp.async, sm_80+; older GPUs copy synchronously through the same API), double
 * buffered: while the block works on tile t in one buffer, tile t + 1 is already on its way
 * into the other.
 *
 *   issue copy of tile 0 -> buffer 0; commit
 *   for k = 0, 1, ... (the block's k-th tile):
 *       issue copy of tile k + 1 -> buffer (k + 1) % 2; commit      (none left: an empty batch)
 *       __pipeline_wait_prior(1)     every batch but the newest has landed: tile k is here
 *       __syncthreads()              ... for every thread's copies, not only my own
 *       y[tile k] = a * buffer[k % 2]
 *       __syncthreads()              everyone has read buffer k % 2 before it is refilled
 *
 * Each thread copies 16 bytes (4 floats) per tile; a thread past the end of the array copies
 * nothing and zero-fills its 16 bytes (n must be a multiple of 4, x and y 16-byte aligned).  Dynamic shared memory: 2 tiles of
 * 4 * blockDim.x floats.
 */
#include <cuda_pipeline.h>

extern "C" __global__ void scale_tiles_async(const float* __restrict__ x, float* __restrict__ y, float a, int n) {
    extern __shared__ float4 tiles[];   // [2][blockDim.x]
    const int tile_floats = 4 * blockDim.x;
    const int ntiles = (n + tile_floats - 1) / tile_floats;
    // this block's tiles: blockIdx.x + k * gridDim.x for k = 0, 1, ...; tile k goes to buffer k % 2
    auto issue = [&](int k) {
        const int t = blockIdx.x + k * gridDim.x;
        if (t >= ntiles) return;   // an empty batch: nothing to copy
        const int first = t * tile_floats + 4 * threadIdx.x;   // my 4 floats of tile t
        const int have = first < n ? 4 : 0;
        float4* dst = &tiles[(k % 2) * blockDim.x + threadIdx.x];
        const float* src = have ? x + first : x;              // a valid address even when nothing is copied
        __pipeline_memcpy_async(dst, src, sizeof(float4), (4 - have) * sizeof(float));
    };
    issue(0);
    __pipeline_commit();
    for (int k = 0; blockIdx.x + k * gridDim.x < ntiles; ++k) {
        issue(k + 1);
        __pipeline_commit();
        __pipeline_wait_prior(1);
        __syncthreads();
        const float4 v = tiles[(k % 2) * blockDim.x + threadIdx.x];
        const int first = (blockIdx.x + k * gridDim.x) * tile_floats + 4 * threadIdx.x;
        if (first < n) reinterpret_cast<float4*>(y)[first / 4] = make_float4(a * v.x, a * v.y, a * v.z, a * v.w);
        __syncthreads();
    }
}
