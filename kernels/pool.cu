/*
 * pool.cu: max pooling (the stem's 3x3 stride 2 pad 1; any kernel size, stride and padding) and
 * global average pooling (the head), forward and backward, on NHWC activations.
 *
 * Max pool forward, x[N, H, W, C] -> y[N, P, Q, C], P = (H + 2*pad - k) / stride + 1 (Q alike):
 *     y[n, p, q, c] = max over the k x k window at (p*stride - pad, q*stride - pad), padding
 *                     excluded (it never wins)
 *     argmax[n, p, q, c] = h*W + w of the winning pixel in its (n, c) plane; ties go to the first
 *                     pixel in row-major window order (strict > while scanning)
 * Max pool backward: dx[n, h, w, c] = sum of dy[n, p, q, c] over the outputs whose argmax is (h, w).
 * Global average pool: y[n, c] = (1 / HW) sum_{h, w} x[n, h, w, c];  dx[n, h, w, c] = dy[n, c] / HW.
 *
 * Memory-access plan: channels are the fastest axis in NHWC, so consecutive threads take
 * consecutive channels of the same pixel: every load and store of a warp is one contiguous run
 * (coalesced).  Max pool reads each input about (k / stride)^2 = 2.25 times (from cache) and
 * writes y and argmax once; the average pool reads x once and writes N*C values.
 * Loops are grid-stride with 64-bit indices.  float and __half activations, from one template per
 * kernel and the KERNEL_ENTRY instantiation lists (common.cuh).
 *
 * Versions of the max-pool backward (`python -m kernels.pool` checks and times each; the forward
 * and the average pool are the same in both; the launchers are kernels/pool.py):
 *   version 1  maxpool2d_backward_scatter: one thread per OUTPUT adds its dy into dx[argmax] with
 *              atomicAdd (dx zeroed first): the default, 2.1x faster than version 2 on an H100.
 *              Windows overlap (stride < k), so several threads may add into one pixel: atomics
 *              make that safe, and the order of the float adds -- hence the last bits -- changes
 *              from run to run on a GPU.  Its cost is the zeroing pass and the bytes; the atomics
 *              hit distinct addresses (at most 4 adds on one pixel) and do not serialise.  float32
 *              only (atomicAdd on __half needs sm_70): float16 gradients run version 2.
 *   version 2  maxpool2d_backward_gather: one thread per INPUT pixel gathers its gradient: no
 *              atomics, no zeroing pass, every pixel written once, the same bits every run
 *              (deterministic: choose it for runs that must repeat bit for bit).  It visits the few
 *              outputs whose window covers it (p from ceil((h + pad - k + 1) / stride) to
 *              floor((h + pad) / stride), q alike) and adds dy where their argmax names it.  Finding
 *              them costs seven integer divisions and some 300 instructions per pixel, four times as
 *              many pixels as version 1 has outputs: the GPU is busy issuing instructions, not
 *              moving bytes (ResNet-50's stem, 256x112x112x64, H100: 2.39 ms against 1.14 ms).
 * The performance model (`python -m kernels.pool` prints it; bench/NOTES.md) predicts 0.80 ms for
 * version 1 (the zeroing pass and the bytes: DRAM; 0.70x the measured 1.14 ms: what 51 M
 * atomic adds to scattered addresses cost in the L2 is not in it) and 2.08 ms for version 2
 * (instruction issue), and 1.20 ms for the forward (1.12 ms measured: also issue, its index
 * arithmetic in 64 bits).
 */
#include <cuda_fp16.h>
#include "common.cuh"   // GRID_STRIDE_LOOP, unravel4, to_float, from_float, KERNEL_ENTRY

/* ------------------------------------------------------------ max pool forward */
template <typename T>
__device__ void maxpool_forward(const T* __restrict__ x, T* __restrict__ y, int* __restrict__ argmax, int N, int H,
                                int W, int C, int P, int Q, int k, int stride, int pad) {
    const long long total = (long long)N * P * Q * C;
    GRID_STRIDE_LOOP(i, total) {
        int n, p, q, c;
        unravel4(i, P, Q, C, n, p, q, c);  // y[n, p, q, c]
        const int h0 = p * stride - pad, w0 = q * stride - pad;
        const T* plane = x + (long long)n * H * W * C + c;
        float best = 0.0f;
        int best_index = -1;
        for (int dh = 0; dh < k; ++dh) {
            const int h = h0 + dh;
            if (h < 0 || h >= H) continue;
            for (int dw = 0; dw < k; ++dw) {
                const int w = w0 + dw;
                if (w < 0 || w >= W) continue;
                const float v = to_float(plane[((long long)h * W + w) * C]);
                if (best_index < 0 || v > best) {  // first real pixel, then strictly larger
                    best = v;
                    best_index = h * W + w;
                }
            }
        }
        y[i] = from_float<T>(best);
        argmax[i] = best_index;
    }
}

KERNEL_ENTRY(maxpool2d_forward_f32, maxpool_forward<float>)
KERNEL_ENTRY(maxpool2d_forward_f16, maxpool_forward<__half>)

/* ------------------------------------------------------------ max pool backward, version 1 */
/* float only (atomicAdd on __half needs sm_70).  dx must be zero on entry. */
extern "C" __global__ void maxpool2d_backward_scatter_f32(const float* __restrict__ dy, const int* __restrict__ argmax,
                                                          float* dx, int N, int H, int W, int C, int P, int Q) {
    const long long total = (long long)N * P * Q * C;
    GRID_STRIDE_LOOP(i, total) {
        const int c = (int)(i % C);
        const long long n = i / ((long long)P * Q * C);
        atomicAdd(&dx[(n * H * W + argmax[i]) * C + c], dy[i]);
    }
}

/* ------------------------------------------------------------ max pool backward, version 2 */
template <typename T>
__device__ void maxpool_backward_gather(const T* __restrict__ dy, const int* __restrict__ argmax, T* __restrict__ dx,
                                        int N, int H, int W, int C, int P, int Q, int k, int stride, int pad) {
    const long long total = (long long)N * H * W * C;
    GRID_STRIDE_LOOP(i, total) {
        int n, h, w, c;
        unravel4(i, H, W, C, n, h, w, c);  // dx[n, h, w, c]
        const int me = h * W + w;
        // outputs p with p*stride - pad <= h <= p*stride - pad + k - 1
        const int p_lo = max(0, (h + pad - k + stride) / stride), p_hi = min(P - 1, (h + pad) / stride);
        const int q_lo = max(0, (w + pad - k + stride) / stride), q_hi = min(Q - 1, (w + pad) / stride);
        float sum = 0.0f;
        for (int p = p_lo; p <= p_hi; ++p)
            for (int q = q_lo; q <= q_hi; ++q) {
                const long long o = (((long long)n * P + p) * Q + q) * C + c;
                if (argmax[o] == me) sum += to_float(dy[o]);
            }
        dx[i] = from_float<T>(sum);
    }
}

KERNEL_ENTRY(maxpool2d_backward_gather_f32, maxpool_backward_gather<float>)
KERNEL_ENTRY(maxpool2d_backward_gather_f16, maxpool_backward_gather<__half>)

/* ------------------------------------------------------------ global average pool */
/* One thread per (n, c): walks the HW pixels of its plane with stride C (a warp reads 32
 * consecutive channels of one pixel at a time). */
template <typename T>
__device__ void avgpool_forward(const T* __restrict__ x, T* __restrict__ y, int N, int HW, int C) {
    const long long total = (long long)N * C;
    GRID_STRIDE_LOOP(i, total) {
        const int c = (int)(i % C);
        const long long n = i / C;
        const T* plane = x + n * HW * C + c;
        float sum = 0.0f;
        for (int j = 0; j < HW; ++j) sum += to_float(plane[(long long)j * C]);
        y[i] = from_float<T>(sum / (float)HW);
    }
}

template <typename T>
__device__ void avgpool_backward(const T* __restrict__ dy, T* __restrict__ dx, int N, int HW, int C) {
    const long long total = (long long)N * HW * C;
    GRID_STRIDE_LOOP(i, total) {
        const int c = (int)(i % C);
        const long long n = i / ((long long)HW * C);
        dx[i] = from_float<T>(to_float(dy[n * C + c]) / (float)HW);
    }
}

KERNEL_ENTRY(global_avgpool_forward_f32, avgpool_forward<float>)
KERNEL_ENTRY(global_avgpool_forward_f16, avgpool_forward<__half>)
KERNEL_ENTRY(global_avgpool_backward_f32, avgpool_backward<float>)
KERNEL_ENTRY(global_avgpool_backward_f16, avgpool_backward<__half>)
