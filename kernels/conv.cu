/*
 * conv.cu: 2-D convolution, forward and both backward passes, three ways.
 *
 * Layouts: activations NHWC (x[N][H][W][C], y[N][P][Q][K]), weights OIHW (w[K][C][R][S]).
 * Stride `stride`, zero padding `pad` on every side, dilation 1, one group.
 *   P = (H + 2 pad - R) / stride + 1,  Q = (W + 2 pad - S) / stride + 1
 *
 *   forward          y[n,p,q,k]  = sum_{r,s,c} x[n, p*stride + r - pad, q*stride + s - pad, c] * w[k,c,r,s]
 *   backward data    dx[n,h,w,c] = sum_{r,s,k} dy[n,p,q,k] * w[k,c,r,s]
 *                                  over the (r, s) with h + pad - r = p*stride, w + pad - s = q*stride,
 *                                  0 <= p < P, 0 <= q < Q
 *   backward weight  dw[k,c,r,s] = sum_{n,p,q} dy[n,p,q,k] * x[n, p*stride + r - pad, q*stride + s - pad, c]
 *   (x is zero outside the image.)
 *
 * (a) naive: one thread per output element, every operand read from global memory.
 *
 * (b) implicit GEMM.  Each pass IS a matrix multiply whose operands are never materialised: the
 *     tile loader computes, for each (row, column) of the virtual matrix, the address it stands for.
 *
 *       pass             GEMM  M x N  (reduction K)            A[m, kk]                 B[kk, n]
 *       forward          (N*P*Q) x K      (R*S*C)               x patch, kk = (r, s, c)  w in KRSC
 *       backward data    (N*H*W) x C      (R*S*K)               dy "patch", kk=(r, s, k) w in RSKC
 *       backward weight  K x (R*S*C)      (N*P*Q)               dy^T                     x patch
 *
 *     The reduction index always runs channel-fastest, so in NHWC a run of consecutive kk is a run
 *     of consecutive addresses (for C = 3 the whole S*C run of a filter row is contiguous).  The
 *     launcher reorders the weights once per call into the layout the GEMM wants (KRSC for the
 *     forward pass, RSKC for backward data; permute4_f32 below): one read and one write of the
 *     weights, at most 2.4 M floats in ResNet-50, small next to the convolution itself.
 *
 *     Tiling: a block of 256 threads computes a 64 x 64 tile of the GEMM, walking the reduction
 *     in steps of 16.  Each step, every thread copies 4 elements of the A tile and 4 of the B tile
 *     into shared memory (zero where the virtual element is padding or past an edge), then each
 *     thread does a 4 x 4 outer product per k from shared memory: register blocking, 8 shared
 *     loads per 16 FMAs.  Loader mappings are chosen so that consecutive threads read consecutive
 *     addresses (coalesced); a thread's rows (or columns) never change across the k loop, so their
 *     (n, p, q) is decoded once, before it.
 *
 *     Backward weight reduces over N*P*Q (802816 at batch 256, 56x56) into a small K x RSC matrix:
 *     only a few dozen tiles.  It is split over gridDim.z ("split-K"): split z sums its own range
 *     into its own slice of a float32 workspace, and conv2d_bwd_weight_reduce_f32 adds the slices
 *     (deterministic, unlike atomics) while writing dw in OIHW order.
 *
 *     Backward data with stride 2 visits every (r, s) for every input pixel although only about
 *     1 in stride^2 taps lands on an output pixel; the others load zeros.  (cuDNN avoids that by
 *     splitting the problem per stride phase; left as an exercise.)
 *
 * (c) im2col / col2im + GEMM (kernels/gemm.cu), the textbook path:
 *       cols[N*P*Q, R*S*C] = im2col(x);    y = cols @ w_krsc^T
 *       dcols = dy @ w_krsc;               dx = col2im(dcols)   (a gather: no atomics)
 *       dw_krsc = dy^T @ cols;             dw = permute(dw_krsc) to OIHW
 *     Simple, and it reuses the fast GEMM, but cols is R*S times the size of x (1.85 GB for a
 *     3x3 layer of ResNet-50 at batch 256): memory traffic the implicit GEMM never pays.
 *
 * Index arithmetic is 32-bit where sizes are known to fit (the launcher checks) and 64-bit for
 * element offsets of whole tensors.
 */

#include "common.cuh"   // GRID_STRIDE_LOOP

/* ------------------------------------------------------------------ weight layouts */
// dst = src.transpose(perm) for 4-D arrays: dst has dims d0..d3 (C order); src_stride_i is the
// stride, in elements, of src along the axis that becomes dst axis i.
extern "C" __global__ void permute4_f32(const float* __restrict__ src, float* __restrict__ dst, int d0, int d1,
                                        int d2, int d3, int s0, int s1, int s2, int s3) {
    const long long total = (long long)d0 * d1 * d2 * d3;
    GRID_STRIDE_LOOP(i, total) {
        long long t = i;
        const int i3 = (int)(t % d3); t /= d3;
        const int i2 = (int)(t % d2); t /= d2;
        const int i1 = (int)(t % d1);
        const int i0 = (int)(t / d1);
        dst[i] = src[(long long)i0 * s0 + (long long)i1 * s1 + (long long)i2 * s2 + (long long)i3 * s3];
    }
}

/* ------------------------------------------------------------------ (a) naive */
extern "C" __global__ void conv2d_fwd_naive_f32(const float* __restrict__ x, const float* __restrict__ w,
                                                float* __restrict__ y, int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    const long long total = (long long)N * P * Q * K;
    GRID_STRIDE_LOOP(i, total) {
        const int k = (int)(i % K);
        long long t = i / K;
        const int q = (int)(t % Q); t /= Q;
        const int p = (int)(t % P);
        const int n = (int)(t / P);
        float acc = 0.0f;
        for (int r = 0; r < R; ++r) {
            const int h = p * stride + r - pad;
            if (h < 0 || h >= H) continue;
            for (int s = 0; s < S; ++s) {
                const int wc = q * stride + s - pad;
                if (wc < 0 || wc >= W) continue;
                const float* xp = x + (((long long)n * H + h) * W + wc) * C;
                for (int c = 0; c < C; ++c) acc += xp[c] * w[(((long long)k * C + c) * R + r) * S + s];
            }
        }
        y[i] = acc;
    }
}

extern "C" __global__ void conv2d_bwd_data_naive_f32(const float* __restrict__ dy, const float* __restrict__ w,
                                                     float* __restrict__ dx, int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    const long long total = (long long)N * H * W * C;
    GRID_STRIDE_LOOP(i, total) {
        const int c = (int)(i % C);
        long long t = i / C;
        const int wc = (int)(t % W); t /= W;
        const int h = (int)(t % H);
        const int n = (int)(t / H);
        float acc = 0.0f;
        for (int r = 0; r < R; ++r) {
            const int ph = h + pad - r;   // = p * stride for the output pixel this tap came from
            if (ph < 0 || ph % stride != 0 || ph / stride >= P) continue;
            const int p = ph / stride;
            for (int s = 0; s < S; ++s) {
                const int qw = wc + pad - s;
                if (qw < 0 || qw % stride != 0 || qw / stride >= Q) continue;
                const int q = qw / stride;
                const float* dyp = dy + (((long long)n * P + p) * Q + q) * K;
                for (int k = 0; k < K; ++k) acc += dyp[k] * w[(((long long)k * C + c) * R + r) * S + s];
            }
        }
        dx[i] = acc;
    }
}

extern "C" __global__ void conv2d_bwd_weight_naive_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                                       float* __restrict__ dw, int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    const long long total = (long long)K * C * R * S;   // dw in OIHW order
    GRID_STRIDE_LOOP(i, total) {
        const int s = (int)(i % S);
        long long t = i / S;
        const int r = (int)(t % R); t /= R;
        const int c = (int)(t % C);
        const int k = (int)(t / C);
        float acc = 0.0f;
        for (int n = 0; n < N; ++n)
            for (int p = 0; p < P; ++p) {
                const int h = p * stride + r - pad;
                if (h < 0 || h >= H) continue;
                for (int q = 0; q < Q; ++q) {
                    const int wc = q * stride + s - pad;
                    if (wc < 0 || wc >= W) continue;
                    acc += dy[(((long long)n * P + p) * Q + q) * K + k] * x[(((long long)n * H + h) * W + wc) * C + c];
                }
            }
        dw[i] = acc;
    }
}

/* ------------------------------------------------------------------ (b) implicit GEMM */
#define IG_BM 64
#define IG_BN 64
#define IG_BK 16
#define IG_PAD 4     // keeps rows of the shared tiles 16-byte aligned for the float4 reads
#define IG_FAR (-(1 << 28))   // a row/column "position" that fails every bounds test (rows past M)

// acc += As^T Bs for this thread's 4 x 4 block: rows ty*4.., columns tx*4..
__device__ __forceinline__ void tile_product_4x4(const float (*As)[IG_BM + IG_PAD], const float (*Bs)[IG_BN + IG_PAD],
                                                 float acc[4][4], int ty, int tx) {
#pragma unroll
    for (int k = 0; k < IG_BK; ++k) {
        const float4 a = *reinterpret_cast<const float4*>(&As[k][ty * 4]);
        const float4 b = *reinterpret_cast<const float4*>(&Bs[k][tx * 4]);
        const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

// Forward.  grid (ceil(N*P*Q / 64), ceil(K / 64)), block 256.  wt is the weight in KRSC order.
extern "C" __global__ void __launch_bounds__(256)
conv2d_fwd_igemm_f32(const float* __restrict__ x, const float* __restrict__ wt, float* __restrict__ y,
                     int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int M = N * P * Q, Kd = R * S * C;
    const int m0 = blockIdx.x * IG_BM, n0 = blockIdx.y * IG_BN;

    // A loader: thread reads column kk = tid % 16 of rows tid / 16 + 16 i (consecutive threads,
    // consecutive channels).  Decode each row's output pixel once.
    const int lk = tid % IG_BK, lr = tid / IG_BK;
    long long a_base[4];
    int a_h0[4], a_w0[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + lr + 16 * i;
        a_base[i] = 0;
        a_h0[i] = a_w0[i] = IG_FAR;
        if (m < M) {
            const int n = m / (P * Q), pq = m % (P * Q);
            a_base[i] = (long long)n * H * W * C;
            a_h0[i] = (pq / Q) * stride - pad;
            a_w0[i] = (pq % Q) * stride - pad;
        }
    }

    float acc[4][4] = {};
    for (int k0 = 0; k0 < Kd; k0 += IG_BK) {
        const int kk = k0 + lk;
        const int c = kk % C, rs = kk / C, s = rs % S, r = rs / S;   // kk = (r * S + s) * C + c
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int h = a_h0[i] + r, wc = a_w0[i] + s;
            As[lk][lr + 16 * i] = (kk < Kd && h >= 0 && h < H && wc >= 0 && wc < W)
                                      ? x[a_base[i] + ((long long)h * W + wc) * C + c] : 0.0f;
        }
        // B loader: B[kk, k] = wt[k * Kd + kk]; again consecutive threads, consecutive kk
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int k = n0 + lr + 16 * i;
            Bs[lk][lr + 16 * i] = (kk < Kd && k < K) ? wt[(long long)k * Kd + kk] : 0.0f;
        }
        __syncthreads();
        tile_product_4x4(As, Bs, acc, ty, tx);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty * 4 + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int k = n0 + tx * 4 + j;
            if (k < K) y[(long long)m * K + k] = acc[i][j];   // y[n, p, q, k] is row m of a [M, K] matrix
        }
    }
}

// Backward data.  grid (ceil(N*H*W / 64), ceil(C / 64)), block 256.  wr is the weight in RSKC order.
extern "C" __global__ void __launch_bounds__(256)
conv2d_bwd_data_igemm_f32(const float* __restrict__ dy, const float* __restrict__ wr, float* __restrict__ dx,
                          int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int M = N * H * W, Kd = R * S * K;
    const int m0 = blockIdx.x * IG_BM, n0 = blockIdx.y * IG_BN;

    // A[m, kk] = dy[n, p, q, k] with m = (n, h, w), kk = (r, s, k), p = (h + pad - r) / stride when exact.
    const int lk = tid % IG_BK, lr = tid / IG_BK;
    long long a_base[4];
    int a_hp[4], a_wp[4];   // h + pad, w + pad
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + lr + 16 * i;
        a_base[i] = 0;
        a_hp[i] = a_wp[i] = IG_FAR;
        if (m < M) {
            const int n = m / (H * W), hw = m % (H * W);
            a_base[i] = (long long)n * P * Q * K;
            a_hp[i] = hw / W + pad;
            a_wp[i] = hw % W + pad;
        }
    }
    // B[kk, c] = wr[kk * C + c]: here consecutive threads take consecutive c (row-major B)
    const int bc = tid % IG_BN, bk = tid / IG_BN;

    float acc[4][4] = {};
    for (int k0 = 0; k0 < Kd; k0 += IG_BK) {
        const int kk = k0 + lk;
        const int k = kk % K, rs = kk / K, s = rs % S, r = rs / S;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int ph = a_hp[i] - r, qw = a_wp[i] - s;
            float v = 0.0f;
            if (kk < Kd && ph >= 0 && qw >= 0 && ph % stride == 0 && qw % stride == 0) {
                const int p = ph / stride, q = qw / stride;
                if (p < P && q < Q) v = dy[a_base[i] + ((long long)p * Q + q) * K + k];
            }
            As[lk][lr + 16 * i] = v;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int kr = bk + 4 * i, kb = k0 + kr, c = n0 + bc;
            Bs[kr][bc] = (kb < Kd && c < C) ? wr[(long long)kb * C + c] : 0.0f;
        }
        __syncthreads();
        tile_product_4x4(As, Bs, acc, ty, tx);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty * 4 + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = n0 + tx * 4 + j;
            if (c < C) dx[(long long)m * C + c] = acc[i][j];
        }
    }
}

// Backward weight, split-K.  grid (ceil(K / 64), ceil(R*S*C / 64), splits), block 256.
// Split z reduces n*P*Q indices [z * chunk, min((z + 1) * chunk, N*P*Q)) into ws[z][k][(r, s, c)].
// chunk is a multiple of 16.
extern "C" __global__ void __launch_bounds__(256)
conv2d_bwd_weight_igemm_f32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ ws,
                            int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad, int chunk) {
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int M = K, Ncols = R * S * C, Kd = N * P * Q;
    const int m0 = blockIdx.x * IG_BM, n0 = blockIdx.y * IG_BN;
    const int kbegin = blockIdx.z * chunk, kend = min(Kd, kbegin + chunk);

    // A[k, j] = dy[j * K + k] (dy^T): consecutive threads take consecutive k.
    // B[j, (r, s, c)] = x patch: consecutive threads take consecutive (r, s, c), i.e. mostly
    // consecutive channels.  Both loaders cover a 16 x 64 slab: element (row j, column tid % 64).
    const int lc = tid % 64, lj = tid / 64;
    const int col = n0 + lc;
    int b_c = 0, b_r = IG_FAR, b_s = IG_FAR;   // this thread's B column never changes: decode it once
    if (col < Ncols) {
        b_c = col % C;
        b_s = (col / C) % S;
        b_r = col / (C * S);
    }

    float acc[4][4] = {};
    for (int k0 = kbegin; k0 < kend; k0 += IG_BK) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int jr = lj + 4 * i, j = k0 + jr, k = m0 + lc;
            As[jr][lc] = (j < kend && k < K) ? dy[(long long)j * K + k] : 0.0f;
            float v = 0.0f;
            if (j < kend) {
                const int n = j / (P * Q), pq = j % (P * Q);
                const int h = (pq / Q) * stride + b_r - pad, wc = (pq % Q) * stride + b_s - pad;
                if (h >= 0 && h < H && wc >= 0 && wc < W) v = x[(((long long)n * H + h) * W + wc) * C + b_c];
            }
            Bs[jr][lc] = v;
        }
        __syncthreads();
        tile_product_4x4(As, Bs, acc, ty, tx);
        __syncthreads();
    }
    float* out = ws + (long long)blockIdx.z * M * Ncols;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int k = m0 + ty * 4 + i;
        if (k >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int cc = n0 + tx * 4 + j;
            if (cc < Ncols) out[(long long)k * Ncols + cc] = acc[i][j];
        }
    }
}

// dw[k, c, r, s] (OIHW) = sum over splits z of ws[z][k][(r * S + s) * C + c].
extern "C" __global__ void conv2d_bwd_weight_reduce_f32(const float* __restrict__ ws, float* __restrict__ dw,
                                                        int splits, int K, int C, int R, int S) {
    const long long total = (long long)K * C * R * S;
    GRID_STRIDE_LOOP(i, total) {
        const int s = (int)(i % S);
        long long t = i / S;
        const int r = (int)(t % R); t /= R;
        const int c = (int)(t % C);
        const int k = (int)(t / C);
        const long long src = (long long)k * R * S * C + ((long long)r * S + s) * C + c;
        float acc = 0.0f;
        for (int z = 0; z < splits; ++z) acc += ws[(long long)z * total + src];
        dw[i] = acc;
    }
}

/* ------------------------------------------------------------------ (c) im2col / col2im */
// cols[(n, p, q), (r, s, c)] = x[n, p*stride + r - pad, q*stride + s - pad, c] or 0 (padding)
extern "C" __global__ void im2col_f32(const float* __restrict__ x, float* __restrict__ cols, int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    const long long RSC = (long long)R * S * C;
    const long long total = (long long)N * P * Q * RSC;
    GRID_STRIDE_LOOP(i, total) {
        const long long row = i / RSC;
        const int kk = (int)(i % RSC);
        const int c = kk % C, s = (kk / C) % S, r = kk / (C * S);
        const int q = (int)(row % Q), p = (int)((row / Q) % P), n = (int)(row / ((long long)P * Q));
        const int h = p * stride + r - pad, wc = q * stride + s - pad;
        cols[i] = (h >= 0 && h < H && wc >= 0 && wc < W) ? x[(((long long)n * H + h) * W + wc) * C + c] : 0.0f;
    }
}

// dx[n, h, w, c] = sum of the dcols entries that im2col copied from x[n, h, w, c].  Each thread
// gathers its own pixel's contributions, so no two threads write the same address (no atomics).
extern "C" __global__ void col2im_f32(const float* __restrict__ dcols, float* __restrict__ dx, int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    const long long RSC = (long long)R * S * C;
    const long long total = (long long)N * H * W * C;
    GRID_STRIDE_LOOP(i, total) {
        const int c = (int)(i % C);
        long long t = i / C;
        const int wc = (int)(t % W); t /= W;
        const int h = (int)(t % H);
        const int n = (int)(t / H);
        float acc = 0.0f;
        for (int r = 0; r < R; ++r) {
            const int ph = h + pad - r;
            if (ph < 0 || ph % stride != 0 || ph / stride >= P) continue;
            for (int s = 0; s < S; ++s) {
                const int qw = wc + pad - s;
                if (qw < 0 || qw % stride != 0 || qw / stride >= Q) continue;
                const long long row = ((long long)n * P + ph / stride) * Q + qw / stride;
                acc += dcols[row * RSC + ((long long)r * S + s) * C + c];
            }
        }
        dx[i] = acc;
    }
}
