/*
 * planted_bugs.cu: one kernel per classic GPU bug, each beside its corrected twin (_fixed).
 * tests/test_emulator_sanitizer.py runs every pair with KERNELS_EMU_SANITIZE under the three
 * schedules: the bug must be reported by the right check at the lines marked BUG(<case>), the
 * twin must run clean and compute the right result.  All of it is valid CUDA: the NVRTC
 * compile check builds this file for sm_70, sm_80 and sm_90 (tests/test_compile.py).
 */
#include <cuda_pipeline.h>

/* ---------------------------------------------------------------- racecheck */

// Reversing through shared memory: another warp's element is read before it is written.
// block: 128 threads
extern "C" __global__ void reverse(const float* x, float* y) {
    __shared__ float tile[128];
    tile[threadIdx.x] = x[threadIdx.x];                        // BUG(shared_no_barrier)
    y[threadIdx.x] = tile[127 - threadIdx.x];                  // BUG(shared_no_barrier)
}
extern "C" __global__ void reverse_fixed(const float* x, float* y) {
    __shared__ float tile[128];
    tile[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = tile[127 - threadIdx.x];
}

// Warp-synchronous reduction of the pre-Volta era: lanes of a warp were assumed to run in
// lock step, so no __syncwarp() between the steps.  block: 32 threads; x: 64 floats
extern "C" __global__ void warp_sum(const float* x, float* out) {
    __shared__ float s[32];
    const int t = threadIdx.x;
    s[t] = x[t] + x[t + 32];
    __syncwarp();
    if (t < 16) s[t] += s[t + 16];                             // BUG(warp_synchronous)
    if (t < 8) s[t] += s[t + 8];                               // BUG(warp_synchronous)
    if (t < 4) s[t] += s[t + 4];                               // BUG(warp_synchronous)
    if (t < 2) s[t] += s[t + 2];                               // BUG(warp_synchronous)
    if (t < 1) s[t] += s[t + 1];                               // BUG(warp_synchronous)
    if (t == 0) out[0] = s[0];
}
extern "C" __global__ void warp_sum_fixed(const float* x, float* out) {
    __shared__ float s[32];
    const int t = threadIdx.x;
    s[t] = x[t] + x[t + 32];
    __syncwarp();
    for (int offset = 16; offset > 0; offset /= 2) {
        const float v = t < offset ? s[t + offset] : 0.0f;
        __syncwarp();   // every read of this step before any write
        if (t < offset) s[t] += v;
        __syncwarp();   // every write of this step before the next step's reads
    }
    if (t == 0) out[0] = s[0];
}

// Tree reduction in shared memory with the barrier inside the loop forgotten.
// block: 128 threads; partial[gridDim.x]
extern "C" __global__ void tree_sum(const float* x, float* partial) {
    __shared__ float s[128];
    const int t = threadIdx.x;
    s[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) s[t] += s[t + stride];                 // BUG(tree_missing_barrier)
    }
    if (t == 0) partial[blockIdx.x] = s[0];
}
extern "C" __global__ void tree_sum_fixed(const float* x, float* partial) {
    __shared__ float s[128];
    const int t = threadIdx.x;
    s[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) s[t] += s[t + stride];
        __syncthreads();
    }
    if (t == 0) partial[blockIdx.x] = s[0];
}

// Blocks adding their results into one global value without an atomic.
// block: 32 threads; out: 1 float (0 before the launch)
extern "C" __global__ void accumulate(const float* x, float* out) {
    if (threadIdx.x == 0) out[0] += x[blockIdx.x];             // BUG(global_accumulate)
}
extern "C" __global__ void accumulate_fixed(const float* x, float* out) {
    if (threadIdx.x == 0) atomicAdd(out, x[blockIdx.x]);
}

// "The last block sums the partial sums": only a __threadfence() before the atomic makes the
// partial sums visible to the block that counts last.  block: 32 threads; count, out: 0
extern "C" __global__ void last_block_sum(const float* x, float* partial, unsigned* count, float* out, int n) {
    __shared__ int last;
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int i = blockIdx.x; i < n; i += gridDim.x) s += x[i];
        partial[blockIdx.x] = s;                               // BUG(last_block_no_fence)
        last = atomicInc(count, gridDim.x) == gridDim.x - 1;
    }
    __syncthreads();
    if (last && threadIdx.x == 0) {
        float total = 0.0f;
        for (int b = 0; b < gridDim.x; ++b) total += partial[b];   // BUG(last_block_no_fence)
        out[0] = total;
    }
}
extern "C" __global__ void last_block_sum_fixed(const float* x, float* partial, unsigned* count, float* out, int n) {
    __shared__ int last;
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int i = blockIdx.x; i < n; i += gridDim.x) s += x[i];
        partial[blockIdx.x] = s;
        __threadfence();   // the partial sum is visible everywhere before the count says so
        last = atomicInc(count, gridDim.x) == gridDim.x - 1;
    }
    __syncthreads();
    if (last && threadIdx.x == 0) {
        float total = 0.0f;
        for (int b = 0; b < gridDim.x; ++b) total += partial[b];
        out[0] = total;
    }
}

// An async copy's destination read before the wait that covers it.  block: 64 threads
extern "C" __global__ void async_scale(const float4* x, float4* y) {
    __shared__ float4 tile[64];
    __pipeline_memcpy_async(&tile[threadIdx.x], &x[threadIdx.x], sizeof(float4));   // BUG(async_no_wait)
    __pipeline_commit();
    const float4 v = tile[threadIdx.x];                                              // BUG(async_no_wait)
    y[threadIdx.x] = make_float4(2.0f * v.x, 2.0f * v.y, 2.0f * v.z, 2.0f * v.w);
}
extern "C" __global__ void async_scale_fixed(const float4* x, float4* y) {
    __shared__ float4 tile[64];
    __pipeline_memcpy_async(&tile[threadIdx.x], &x[threadIdx.x], sizeof(float4));
    __pipeline_commit();
    __pipeline_wait_prior(0);
    const float4 v = tile[threadIdx.x];
    y[threadIdx.x] = make_float4(2.0f * v.x, 2.0f * v.y, 2.0f * v.z, 2.0f * v.w);
}

/* ---------------------------------------------------------------- memcheck */

// The off-by-one bound.  block: 128 threads; x, y: n floats
extern "C" __global__ void copy_n(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = x[i];                                   // BUG(global_off_by_one)
}
extern "C" __global__ void copy_n_fixed(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}

// A shift by one inside a static __shared__ array: the last thread writes one past its end,
// into whatever the compiler put next (here `other`), silently on a GPU.  block: 64 threads
extern "C" __global__ void shift_right(const float* x, float* y) {
    __shared__ float tile[64];
    __shared__ float other[64];
    other[threadIdx.x] = 1.0f;
    tile[threadIdx.x + 1] = x[threadIdx.x];                    // BUG(shared_overrun)
    __syncthreads();
    y[threadIdx.x] = other[threadIdx.x] * (threadIdx.x ? tile[threadIdx.x] : 0.0f);
}
extern "C" __global__ void shift_right_fixed(const float* x, float* y) {
    __shared__ float tile[65];
    __shared__ float other[64];
    other[threadIdx.x] = 1.0f;
    tile[threadIdx.x + 1] = x[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = other[threadIdx.x] * (threadIdx.x ? tile[threadIdx.x] : 0.0f);
}

// Dynamic shared memory sized one float too small by the launch (the test passes the size).
extern "C" __global__ void stage_dynamic(const float* x, float* y) {
    extern __shared__ float staged[];
    staged[threadIdx.x] = x[threadIdx.x];                      // BUG(dynamic_shared_overrun)
    __syncthreads();
    y[threadIdx.x] = staged[blockDim.x - 1 - threadIdx.x];
}

// A float4 load from an address that is a multiple of 4 but not of 16: fine on a CPU, a
// "misaligned address" fault on every GPU.  block: 16 threads; x: 68 floats
extern "C" __global__ void sum4(const float* x, float* y) {
    const float4 v = reinterpret_cast<const float4*>(x + 1)[threadIdx.x];   // BUG(misaligned_float4)
    y[threadIdx.x] = v.x + v.y + v.z + v.w;
}
extern "C" __global__ void sum4_fixed(const float* x, float* y) {
    const float* p = x + 1 + 4 * threadIdx.x;
    y[threadIdx.x] = p[0] + p[1] + p[2] + p[3];
}

/* ---------------------------------------------------------------- initcheck */

// A tree over 128 shared entries in a block of 100 threads: 28 entries nobody wrote (zero here
// by luck, garbage on a GPU).  block: 100 threads
extern "C" __global__ void tree_sum_100(const float* x, float* out) {
    __shared__ float s[128];
    const int t = threadIdx.x;
    s[t] = x[t];
    __syncthreads();
    for (int stride = 64; stride > 0; stride /= 2) {
        if (t < stride) s[t] += s[t + stride];                 // BUG(shared_uninitialized)
        __syncthreads();
    }
    if (t == 0) out[0] = s[0];
}
extern "C" __global__ void tree_sum_100_fixed(const float* x, float* out) {
    __shared__ float s[128];
    const int t = threadIdx.x;
    for (int i = t; i < 128; i += blockDim.x) s[i] = i < (int)blockDim.x ? x[i] : 0.0f;
    __syncthreads();
    for (int stride = 64; stride > 0; stride /= 2) {
        if (t < stride) s[t] += s[t + stride];
        __syncthreads();
    }
    if (t == 0) out[0] = s[0];
}

// Accumulating into an output the host allocated but never filled (cupy.empty).
extern "C" __global__ void add_into(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];                                   // BUG(global_uninitialized)
}
extern "C" __global__ void add_into_fixed(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}

/* ---------------------------------------------------------------- synccheck */

// __syncthreads() inside a branch that only the first warp takes; the others return.
// block: 64 threads
extern "C" __global__ void first_warp_reverse(const float* x, float* y) {
    __shared__ float s[32];
    if (threadIdx.x < 32) {
        s[threadIdx.x] = x[threadIdx.x];
        __syncthreads();                                       // BUG(barrier_in_branch)
        y[threadIdx.x] = s[31 - threadIdx.x];
    }
}
extern "C" __global__ void first_warp_reverse_fixed(const float* x, float* y) {
    __shared__ float s[32];
    if (threadIdx.x < 32) s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    if (threadIdx.x < 32) y[threadIdx.x] = s[31 - threadIdx.x];
}

// The guard `if (i >= n) return;` before a barrier.  block: 64 threads
extern "C" __global__ void reverse_n(const float* x, float* y, int n) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    if (t >= n) return;
    s[t] = x[t];
    __syncthreads();                                           // BUG(return_before_barrier)
    y[t] = s[n - 1 - t];
}
extern "C" __global__ void reverse_n_fixed(const float* x, float* y, int n) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    if (t < n) s[t] = x[t];
    __syncthreads();
    if (t < n) y[t] = s[n - 1 - t];
}

// A full-mask shuffle after some lanes returned.  block: 32 threads
extern "C" __global__ void neighbour_sum(const float* x, float* y, int n) {
    const int t = threadIdx.x;
    if (t >= n) return;
    const float v = x[t];
    y[t] = v + __shfl_down_sync(0xffffffffu, v, 1);            // BUG(shuffle_after_return)
}
extern "C" __global__ void neighbour_sum_fixed(const float* x, float* y, int n) {
    const int t = threadIdx.x;
    const unsigned mask = __ballot_sync(0xffffffffu, t < n);   // the lanes that stay
    if (t >= n) return;
    const float v = x[t];
    const float next = __shfl_down_sync(mask, v, 1);
    y[t] = v + (t + 1 < n ? next : 0.0f);
}

// A full mask in the last warp of a block of 48 threads, which has only 16 lanes.
extern "C" __global__ void pair_swap(const float* x, float* y) {
    const float v = x[threadIdx.x];
    y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 1);       // BUG(mask_absent_lanes)
}
extern "C" __global__ void pair_swap_fixed(const float* x, float* y) {
    const unsigned lanes = blockDim.x - (threadIdx.x & ~31u);   // lanes in my warp
    const unsigned mask = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1u;
    const float v = x[threadIdx.x];
    y[threadIdx.x] = __shfl_xor_sync(mask, v, 1);
}
