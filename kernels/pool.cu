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
 * and the average pool are the same in all three, except version 3's average-pool backward; the
 * launchers are kernels/pool.py):
 *   version 1  maxpool2d_backward_scatter: one thread per OUTPUT adds its dy into dx[argmax] with
 *              atomicAdd (dx zeroed first): 2.1x faster than version 2 on an H100.
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
 *   version 3  maxpool2d_backward_blocks (stride 2, ResNet's): one thread per 2x2 block of input
 *              pixels and 16-byte vector of channels gathers from the outputs whose windows cover
 *              the block (2 x 2 of them for a 3x3 window), reading each one's argmax and dy once,
 *              as vectors, where version 2 read each output 9 times, one channel at a time; its
 *              index arithmetic is a few multiplications once per thread (FastDiv), where version
 *              2 spent seven integer divisions per pixel.  Version 2's order of adds: the same bits,
 *              deterministic, no atomics and no zeroing pass (version 1 writes dx twice, once to
 *              zero it and once by atomics).  Other strides run version 2.  The global-average-pool
 *              backward, a pure write stream, writes 16-byte vectors, each thread dividing its dy
 *              once for all its pixels.  Where C is not a multiple of 8 halves or 4 floats, or an
 *              array is not 16-byte aligned, one channel per thread.  Both backward passes have a
 *              twin with the ReLU's mask and the backward partial sums of the batch norm before them
 *              in the epilogue, as conv.cu's *_relu_bn kernels give them for a batch norm before a
 *              convolution (batch norm 5 then finishes from them): maxpool2d_backward_blocks_relu_bn
 *              for ResNet's stem (conv -> batch norm -> ReLU -> max pool), and
 *              global_avgpool_backward_relu_bn for its head (the last block's add + ReLU batch norm).
 * The performance model (`python -m kernels.pool` prints it; bench/NOTES.md) predicts 0.80 ms for
 * version 1 (the zeroing pass and the bytes: DRAM; 0.70x the measured 1.14 ms: what 51 M
 * atomic adds to scattered addresses cost in the L2 is not in it) and 2.08 ms for version 2
 * (instruction issue), and 1.20 ms for the forward (1.12 ms measured: also issue, its index
 * arithmetic in 64 bits).  Version 3 (predicted, not measured): 423 us (98 % of copy bandwidth,
 * DRAM), against version 1's 0.80 ms predicted and 1.14 ms measured; in float16 298 us (81 %,
 * instruction issue) where version 2 takes 2.14 ms; the average pool's float16 backward at
 * 256x7x7x2048 16 us of kernel (DRAM; 41 us with its launch's 25 us of host time, against 104 us).
 * It is the default: faster by the model than version 1, and deterministic.  The stem's twin with the
 * batch norm's sums (predicted, not measured): 522 us in float16 (80 %, instruction issue: the mask and
 * the sums' conversions come on top of version 3's compares), 770 us in float32 (DRAM), where version 3
 * and batch norm 4's reduction of dy, y and x took 298 + 385 us; the batch norm's backward from its
 * partials then reads g and x once (408 us against version 4's 823).  The head's twin: 52 us of kernel
 * (103 %, DRAM; 77 us with its launch's host time) where the average pool's backward and batch norm 4's
 * add + ReLU backward took 16 + 133 us, then 53 us from the partials.
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

/* ============================================================== version 3: blocks of pixels, 16-byte vectors */
/* Max-pool backward for stride 2 (ResNet's 3x3/2/1; any window k and padding pad < k).  One thread per
 * 2x2 block of input pixels (rows 2t, 2t+1, columns 2u, 2u+1; the last row or column alone where H or W is
 * odd) and V channels: the outputs whose window covers any of its four pixels are rows
 * p = ceil((2t + pad - k + 1) / 2) .. floor((2t + 1 + pad) / 2) and columns alike, 2 x 2 of them for a
 * 3x3 window (the gather of version 2 visits 1, 2 or 4 per pixel, 9 per output in all: here 4 per
 * output).  It reads each one's argmax and dy once, as vectors, and adds dy into the pixel its argmax
 * names, in order of p then q: version 2's order, so the same bits.  Index arithmetic once per thread,
 * by multiplications (FastDiv); every dx pixel written once, no atomics: deterministic.
 * Thread v = ((n * T2 + t) * U2 + u) * groups + g with T2 = ceil(H / 2), U2 = ceil(W / 2), groups = C / V:
 * a warp takes consecutive channel vectors of neighbouring blocks, so its stores are runs of whole rows
 * of channels.  The launcher keeps N * T2 * U2 * groups below 2^31 (else version 2 runs). */
/* Thread v's block of pixels and channel vector, and the gradient its four pixels gather. */
struct PixelBlock {
    int n, h0, w0, g;      // image, the block's top-left pixel, its channel vector (channels g*V ..)
    bool right, below;     // pixels (h0, w0 + 1) and (h0 + 1, w0) exist (not past an odd W or H)
};

/* acc[i][j]: the gradient of pixel i (0: (h0, w0), 1: + 1, 2: + W, 3: + W + 1) at channel g*V + j, from
 * the outputs whose windows cover the block, in order of p then q.  MASKED (the ReLU before the pool,
 * maxpool2d_backward_relu_bn): only the outputs whose y > 0 count. */
template <typename T, int V, bool MASKED>
__device__ __forceinline__ PixelBlock gather_block(int v, const T* __restrict__ dy, const int* __restrict__ argmax,
                                                   const T* __restrict__ y, int H, int W, int C, int P, int Q,
                                                   int k, int pad, const FastDiv& by_groups, const FastDiv& by_u2,
                                                   const FastDiv& by_t2, float (&acc)[4][V]) {
    PixelBlock b;
    int rest, u, t;
    fast_divmod(v, by_groups, rest, b.g);
    fast_divmod(rest, by_u2, rest, u);
    fast_divmod(rest, by_t2, b.n, t);
    b.h0 = 2 * t;
    b.w0 = 2 * u;
    // ceil(a / 2) = (a + 1) >> 1 also for a < 0 (an arithmetic shift rounds down)
    const int p_lo = max(0, (b.h0 + pad - k + 2) >> 1), p_hi = min(P - 1, (b.h0 + 1 + pad) >> 1);
    const int q_lo = max(0, (b.w0 + pad - k + 2) >> 1), q_hi = min(Q - 1, (b.w0 + 1 + pad) >> 1);
    b.right = b.w0 + 1 < W;
    b.below = b.h0 + 1 < H;
    const int base = b.h0 * W + b.w0;   // argmax of pixel (h0, w0); its neighbours: + 1, + W, + W + 1
#pragma unroll
    for (int j = 0; j < V; ++j) acc[0][j] = acc[1][j] = acc[2][j] = acc[3][j] = 0.0f;
    for (int p = p_lo; p <= p_hi; ++p)
        for (int q = q_lo; q <= q_hi; ++q) {
            const long long o = (((long long)b.n * P + p) * Q + q) * C + b.g * V;
            int a[V];
            float d[V];
            Lanes<V>::load_ints(argmax + o, a);
            Lanes<V>::load(dy + o, d);
            if (MASKED) {
                float out[V];
                Lanes<V>::load(y + o, out);
#pragma unroll
                for (int j = 0; j < V; ++j) d[j] = out[j] > 0.0f ? d[j] : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const int at = a[j] - base;
                acc[0][j] += at == 0 ? d[j] : 0.0f;
                acc[1][j] += (at == 1 && b.right) ? d[j] : 0.0f;
                acc[2][j] += (at == W && b.below) ? d[j] : 0.0f;
                acc[3][j] += (at == W + 1 && b.right && b.below) ? d[j] : 0.0f;
            }
        }
    return b;
}

template <typename T, int V>
__device__ void maxpool_backward_blocks(const T* __restrict__ dy, const int* __restrict__ argmax,
                                        T* __restrict__ dx, int N, int H, int W, int C, int P, int Q, int k,
                                        int pad) {
    const int groups = C / V, T2 = (H + 1) / 2, U2 = (W + 1) / 2;
    const FastDiv by_groups = make_fastdiv(groups), by_u2 = make_fastdiv(U2), by_t2 = make_fastdiv(T2);
    const int total = N * T2 * U2 * groups;
    for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < total; v += blockDim.x * gridDim.x) {
        float acc[4][V];
        const PixelBlock b = gather_block<T, V, false>(v, dy, argmax, (const T*)nullptr, H, W, C, P, Q, k, pad,
                                                       by_groups, by_u2, by_t2, acc);
        const long long pixel = ((long long)b.n * H + b.h0) * W + b.w0;   // dx's pixel (h0, w0)
        T* out = dx + pixel * C + b.g * V;
        Lanes<V>::store(out, acc[0]);
        if (b.right) Lanes<V>::store(out + C, acc[1]);
        if (b.below) Lanes<V>::store(out + (long long)W * C, acc[2]);
        if (b.right && b.below) Lanes<V>::store(out + (long long)(W + 1) * C, acc[3]);
    }
}

KERNEL_ENTRY(maxpool2d_backward_blocks_f32x1, maxpool_backward_blocks<float, 1>)
KERNEL_ENTRY(maxpool2d_backward_blocks_f16x1, maxpool_backward_blocks<__half, 1>)
KERNEL_ENTRY(maxpool2d_backward_blocks_f32x4, maxpool_backward_blocks<float, 4>)
KERNEL_ENTRY(maxpool2d_backward_blocks_f16x8, maxpool_backward_blocks<__half, 8>)

/* ----------------------------------------- version 3 with the batch norm's backward in its epilogue */
/* The stem, conv -> batch norm -> ReLU -> max pool: the batch norm's backward needs its output's gradient
 * after the ReLU's mask and two sums per channel over all pixels (as conv.cu's *_relu_bn kernels give it
 * for a batch norm before a convolution):
 *     g = maxpool_backward(dy) where a > 0, else 0        (a = relu(bn(bn_x)): the pool's input)
 *     part[0, b, c] = sum g,   part[1, b, c] = sum g * (bn_x - mean[c])   over the pixels of block b
 * A pixel gets a gradient only from the windows it won, and there the pool's output y equals a (a max is
 * exact), so the mask is taken on dy from y before the gather: g = maxpool_backward(dy where y > 0), the
 * same bits, reading y at the outputs (a quarter of a's pixels) instead of a.  Version 3's thread then
 * reads bn_x at its pixels, writes g and adds g and g * (bn_x - mean) -- g as stored, rounded to T -- into
 * its sums.  Its channels are the same at every trip of the grid-stride loop when the channel vectors per
 * pixel (groups) divide blockDim.x (the launcher's condition, with blockDim.x = POOL_BN_BLOCK), so at the
 * end the block adds its threads' sums per channel in shared memory, in thread order, into one partial
 * row per block: part[:, blockIdx.x, :] (B = gridDim.x; no atomics: the same bits every run).  Each term
 * passes through at most 4 * trips + POOL_BN_BLOCK / groups float roundings (trips: of the loop; 36 at
 * ResNet-50's stem on a GPU, one trip); batchnorm_backward_from_partials adds the B rows in double. */
#define POOL_BN_BLOCK 256

template <typename T, int V>
__device__ void maxpool_backward_blocks_relu_bn(const T* __restrict__ dy, const int* __restrict__ argmax,
                                                const T* __restrict__ y, const T* __restrict__ bn_x,
                                                const float* __restrict__ bn_mean, T* __restrict__ g_out,
                                                float* __restrict__ part, int N, int H, int W, int C, int P, int Q,
                                                int k, int pad) {
    __shared__ float sums[2][POOL_BN_BLOCK][V];
    const int groups = C / V, T2 = (H + 1) / 2, U2 = (W + 1) / 2;
    const FastDiv by_groups = make_fastdiv(groups), by_u2 = make_fastdiv(U2), by_t2 = make_fastdiv(T2);
    const int total = N * T2 * U2 * groups;
    const int first = blockIdx.x * blockDim.x + threadIdx.x, mine = threadIdx.x % groups;  // my channel vector
    float mean[V], s0[V], s1[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        mean[j] = bn_mean[mine * V + j];
        s0[j] = s1[j] = 0.0f;
    }
    for (int v = first; v < total; v += blockDim.x * gridDim.x) {
        float acc[4][V];
        const PixelBlock b = gather_block<T, V, true>(v, dy, argmax, y, H, W, C, P, Q, k, pad, by_groups, by_u2,
                                                      by_t2, acc);
        const long long pixel = ((long long)b.n * H + b.h0) * W + b.w0;
        const long long offset[4] = {pixel * C, (pixel + 1) * C, (pixel + W) * C, (pixel + W + 1) * C};
        const bool present[4] = {true, b.right, b.below, b.right && b.below};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (!present[i]) continue;
            float x[V];
            Lanes<V>::store(g_out + offset[i] + b.g * V, acc[i]);
            Lanes<V>::load(bn_x + offset[i] + b.g * V, x);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float stored = to_float(from_float<T>(acc[i][j]));   // g as stored
                s0[j] += stored;
                s1[j] += stored * (x[j] - mean[j]);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
        sums[0][threadIdx.x][j] = s0[j];
        sums[1][threadIdx.x][j] = s1[j];
    }
    __syncthreads();
    // threads mine, mine + groups, mine + 2 groups, ... hold channel vector `mine`: sum them in that order
    for (int o = threadIdx.x; o < 2 * C; o += blockDim.x) {
        const int s = o / C, c = o % C, vec = c / V, j = c % V;
        float total_of_block = 0.0f;
        for (int r = vec; r < (int)blockDim.x; r += groups) total_of_block += sums[s][r][j];
        part[((long long)s * gridDim.x + blockIdx.x) * C + c] = total_of_block;
    }
}

KERNEL_ENTRY(maxpool2d_backward_blocks_relu_bn_f32x1, maxpool_backward_blocks_relu_bn<float, 1>)
KERNEL_ENTRY(maxpool2d_backward_blocks_relu_bn_f16x1, maxpool_backward_blocks_relu_bn<__half, 1>)
KERNEL_ENTRY(maxpool2d_backward_blocks_relu_bn_f32x4, maxpool_backward_blocks_relu_bn<float, 4>)
KERNEL_ENTRY(maxpool2d_backward_blocks_relu_bn_f16x8, maxpool_backward_blocks_relu_bn<__half, 8>)

/* Global-average-pool backward, dx[n, h, w, c] = dy[n, c] / HW: a pure write stream.  Thread (tx, ty) of
 * block (blockIdx.x, n = blockIdx.y, blockIdx.z) owns channel group g = blockIdx.x * blockDim.x + tx of
 * image n: it divides its V values of dy once and writes them to pixels ty + blockDim.y * blockIdx.z,
 * then + blockDim.y * gridDim.z, ...  A warp stores 32 consecutive 16-byte vectors (or whole pixels, when
 * a pixel has fewer): 512 contiguous bytes. */
template <typename T, int V>
__device__ void avgpool_backward_vec(const T* __restrict__ dy, T* __restrict__ dx, int N, int HW, int C) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x, n = blockIdx.y;
    if (g * V >= C) return;   // no barriers in this kernel
    float d[V];
    Lanes<V>::load(dy + (long long)n * C + g * V, d);
#pragma unroll
    for (int j = 0; j < V; ++j) d[j] = d[j] / (float)HW;   // as version 1 divides: the same bits
    T* plane = dx + (long long)n * HW * C + g * V;
    for (int pixel = blockIdx.z * blockDim.y + threadIdx.y; pixel < HW; pixel += blockDim.y * gridDim.z)
        Lanes<V>::store(plane + (long long)pixel * C, d);
}

KERNEL_ENTRY(global_avgpool_backward_f32x1, avgpool_backward_vec<float, 1>)
KERNEL_ENTRY(global_avgpool_backward_f16x1, avgpool_backward_vec<__half, 1>)
KERNEL_ENTRY(global_avgpool_backward_f32x4, avgpool_backward_vec<float, 4>)
KERNEL_ENTRY(global_avgpool_backward_f16x8, avgpool_backward_vec<__half, 8>)

/* The head's twin with the batch norm's backward in its epilogue: the network's last add + ReLU batch norm
 * feeds the global average pool, so its output gradient after the ReLU's mask is
 *     g[n, h, w, c] = dy[n, c] / HW where a > 0, else 0        (a = relu(bn(bn_x) + r): the pool's input)
 * and its backward needs sum g and sum g * (bn_x - mean[c]) per channel (as for the stem,
 * maxpool2d_backward_blocks_relu_bn).  Thread (tx, ty) of block (blockIdx.x, n = blockIdx.y) owns channel
 * vector grp = blockIdx.x * blockDim.x + tx of image n: it divides its dy once, then at pixels ty,
 * ty + blockDim.y, ... reads a and bn_x, writes g and adds g and g * (bn_x - mean) -- g as stored -- into its
 * sums; the block adds its rows of threads in order of ty (common.cuh, rows_block_partials) into
 * part[:, n, :] (one partial row per image, B = N; the blocks of one image write its channels side by
 * side; no atomics: the same bits every run).  blockDim.x * blockDim.y = POOL_BN_BLOCK. */
template <typename T, int V>
__device__ void avgpool_backward_relu_bn(const T* __restrict__ dy, const T* __restrict__ a,
                                         const T* __restrict__ bn_x, const float* __restrict__ bn_mean,
                                         T* __restrict__ g_out, float* __restrict__ part, int N, int HW, int C) {
    __shared__ float sh[2 * V][POOL_BN_BLOCK + 1];
    const int grp = blockIdx.x * blockDim.x + threadIdx.x, n = blockIdx.y;
    float s0[V], s1[V];
#pragma unroll
    for (int j = 0; j < V; ++j) s0[j] = s1[j] = 0.0f;
    if (grp * V < C) {   // no early return: every thread reaches the barrier
        float d[V], mean[V];
        Lanes<V>::load(dy + (long long)n * C + grp * V, d);
#pragma unroll
        for (int j = 0; j < V; ++j) d[j] = d[j] / (float)HW;   // as version 1 divides: the same bits
        Lanes<V>::load_floats(bn_mean + grp * V, mean);
        const long long plane = (long long)n * HW * C + grp * V;
        for (int pixel = threadIdx.y; pixel < HW; pixel += blockDim.y) {
            const long long e = plane + (long long)pixel * C;
            float av[V], xv[V], gv[V];
            Lanes<V>::load(a + e, av);
            Lanes<V>::load(bn_x + e, xv);
#pragma unroll
            for (int j = 0; j < V; ++j) gv[j] = av[j] > 0.0f ? d[j] : 0.0f;
            Lanes<V>::store(g_out + e, gv);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float stored = to_float(from_float<T>(gv[j]));   // g as stored
                s0[j] += stored;
                s1[j] += stored * (xv[j] - mean[j]);
            }
        }
    }
    rows_block_partials<V, POOL_BN_BLOCK>(sh, s0, s1, part, C);   // part[:, n, :]: gridDim.y = N
}

KERNEL_ENTRY(global_avgpool_backward_relu_bn_f32x1, avgpool_backward_relu_bn<float, 1>)
KERNEL_ENTRY(global_avgpool_backward_relu_bn_f16x1, avgpool_backward_relu_bn<__half, 1>)
KERNEL_ENTRY(global_avgpool_backward_relu_bn_f32x4, avgpool_backward_relu_bn<float, 4>)
KERNEL_ENTRY(global_avgpool_backward_relu_bn_f16x8, avgpool_backward_relu_bn<__half, 8>)
