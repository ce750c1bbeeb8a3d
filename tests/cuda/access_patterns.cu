/*
 * access_patterns.cu: small kernels whose memory behaviour is known exactly, one per classic
 * pattern.  tests/test_profiler.py profiles each (kernels.profile()) and checks the counts
 * Nsight Compute would show against the numbers worked out by hand in the test:
 *
 *   global memory, 32-byte sectors per warp-level request
 *     copy_f32              lane i reads x[i]: 32 lanes x 4 bytes = 128 bytes = 4 sectors
 *     copy_strided_f32      lane i reads x[i * stride]: stride 8 floats puts every lane in
 *                           its own sector (32 sectors, 12.5 % of the bytes used)
 *     copy_f32x4            lane i reads one float4: 512 bytes = 16 sectors, all used
 *     copy_rows_f32         a 16 x 2 block: one warp reads two rows of 16 floats (2 x 2 sectors)
 *     copy_grid_stride_f32  a grid-stride loop: the last iteration has fewer lanes
 *     atomic_count          every lane atomically adds 1 to one counter
 *   shared memory, wavefronts per request (32 banks of 4 bytes)
 *     shared_stride_f32     lane i touches word i * stride: 1 -> no conflict, 2 -> 2-way,
 *                           32 -> 32-way, 33 -> none again (33 words apart = 1 bank apart)
 *     shared_stride_template_f32   the same with the __shared__ array declared in a function
 *                           template (g++ keeps such arrays out of the emulator's shared-memory
 *                           section: the emulator must still know them as shared memory)
 *     shared_broadcast_f32  every lane reads the same word: one wavefront (a broadcast)
 *     shared_f32x2, shared_f32x4   8- and 16-byte accesses (half- and quarter-warps)
 *     wmma_tile_ldm16, wmma_tile_ldm24   one warp multiplies a 16x16 float16 tile from shared
 *                           memory: load_matrix_sync moves 16-byte row pieces, 8 lanes (8 rows) at a
 *                           time; rows 32 bytes apart (ldm 16) put rows r and r + 4 in the same
 *                           banks (2-way), rows 48 bytes apart (ldm 24, padded) do not
 */
#include <mma.h>

extern "C" __global__ void copy_f32(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}

extern "C" __global__ void copy_strided_f32(const float* x, float* y, int n, int stride) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[(long long)i * stride];
}

extern "C" __global__ void copy_f32x4(const float4* x, float4* y, int n4) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n4) y[i] = x[i];
}

// block (16, 2): threads (tx, ty) with tx fastest, so warp 0 is rows 0 and 1 of the block
extern "C" __global__ void copy_rows_f32(const float* x, float* y, int width) {
    const int i = (blockIdx.y * blockDim.y + threadIdx.y) * width + blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = x[i];
}

extern "C" __global__ void copy_grid_stride_f32(const float* x, float* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) y[i] = x[i];
}

extern "C" __global__ void atomic_count(int* counter) { atomicAdd(counter, 1); }

// one warp; words: 32 * 33 floats of shared memory
extern "C" __global__ void shared_stride_f32(float* y, int stride) {
    __shared__ float words[32 * 33];
    const int t = threadIdx.x;
    words[t * stride] = (float)t;
    __syncthreads();
    y[t] = words[t * stride];
}

template <int WORDS>
__device__ void stride_through_shared(float* y, int stride) {
    __shared__ float words[WORDS];
    const int t = threadIdx.x;
    words[t * stride] = (float)t;
    __syncthreads();
    y[t] = words[t * stride];
}
extern "C" __global__ void shared_stride_template_f32(float* y, int stride) { stride_through_shared<32 * 33>(y, stride); }

extern "C" __global__ void shared_broadcast_f32(const float* x, float* y) {
    __shared__ float value[32];
    if (threadIdx.x == 0) value[0] = x[0];
    __syncthreads();
    y[threadIdx.x] = value[0];
}

extern "C" __global__ void shared_f32x2(float* y) {
    __shared__ float2 pairs[32];
    const int t = threadIdx.x;
    pairs[t] = make_float2((float)t, 1.0f);
    __syncthreads();
    const float2 v = pairs[31 - t];
    y[t] = v.x + v.y;
}

extern "C" __global__ void shared_f32x4(float* y) {
    __shared__ float4 quads[32];
    const int t = threadIdx.x;
    quads[t] = make_float4((float)t, 1.0f, 2.0f, 3.0f);
    __syncthreads();
    const float4 v = quads[31 - t];
    y[t] = v.x + v.y + v.z + v.w;
}

template <int LDM>
__device__ void wmma_square(const __half* a, float* c) {
    __shared__ __align__(32) __half tile[16 * LDM];
    for (int e = threadIdx.x; e < 256; e += 32) tile[(e / 16) * LDM + e % 16] = a[e];
    __syncthreads();
#if __CUDA_ARCH__ >= 700
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half, nvcuda::wmma::row_major> fb;
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> fc;
    nvcuda::wmma::load_matrix_sync(fa, tile, LDM);
    nvcuda::wmma::load_matrix_sync(fb, tile, LDM);
    nvcuda::wmma::fill_fragment(fc, 0.0f);
    nvcuda::wmma::mma_sync(fc, fa, fb, fc);
    nvcuda::wmma::store_matrix_sync(c, fc, 16, nvcuda::wmma::mem_row_major);   // c = a @ a
#endif
}
extern "C" __global__ void wmma_tile_ldm16(const __half* a, float* c) { wmma_square<16>(a, c); }
extern "C" __global__ void wmma_tile_ldm24(const __half* a, float* c) { wmma_square<24>(a, c); }
