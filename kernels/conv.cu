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
 * Versions (`python -m kernels.conv` checks and times each; the launchers are kernels/conv.py):
 *   version 1  conv2d_*_naive_f32: one thread per output element, every operand read from global
 *              memory: R*S*C multiply-adds per output, each with two loads.
 *   version 2  im2col_f32 / col2im_f32 + the GEMM of gemm.cu: the multiply-adds run in the tiled,
 *              register-blocked GEMM, which reuses every loaded value many times from shared memory
 *              and registers.  The textbook path:
 *                  cols[N*P*Q, R*S*C] = im2col(x);    y = cols @ w_krsc^T
 *                  dcols = dy @ w_krsc;               dx = col2im(dcols)   (a gather: no atomics)
 *                  dw_krsc = dy^T @ cols;             dw = permute(dw_krsc) to OIHW
 *              Its price: cols is R*S times the size of x (1.85 GB for a 3x3 layer of ResNet-50 at
 *              batch 256), written once and read again.
 *   version 3  conv2d_*_igemm_f32, implicit GEMM: the GEMM's tile loader computes the address of
 *              each element of the patch matrix instead of reading a materialised cols, so the
 *              R*S-times copy is never written nor read.  Details below.  The default.
 *
 * Version 3 in detail.  Each pass IS a matrix multiply whose operands are never materialised: the
 * tile loader computes, for each (row, column) of the virtual matrix, the address it stands for.
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
 * Index arithmetic is 32-bit where sizes are known to fit (the launcher checks) and 64-bit for
 * element offsets of whole tensors.
 */

#include "common.cuh"   // GRID_STRIDE_LOOP, unravel4, load_float4

/* ------------------------------------------------------------------ shared by the versions */
// dst = src.transpose(perm) for 4-D arrays: dst has dims d0..d3 (C order); src_stride_i is the
// stride, in elements, of src along the axis that becomes dst axis i.
extern "C" __global__ void permute4_f32(const float* __restrict__ src, float* __restrict__ dst, int d0, int d1,
                                        int d2, int d3, int s0, int s1, int s2, int s3) {
    const long long total = (long long)d0 * d1 * d2 * d3;
    GRID_STRIDE_LOOP(i, total) {
        int i0, i1, i2, i3;
        unravel4(i, d1, d2, d3, i0, i1, i2, i3);
        dst[i] = src[(long long)i0 * s0 + (long long)i1 * s1 + (long long)i2 * s2 + (long long)i3 * s3];
    }
}

// Backward data: input row h meets filter row r in the output row p with h + pad - r = p * stride
// (h_pad_r = h + pad - r), when that p exists (0 <= p < P); the same for columns.
__device__ __forceinline__ bool output_of_tap(int h_pad_r, int stride, int P, int& p) {
    if (h_pad_r < 0 || h_pad_r % stride != 0) return false;
    p = h_pad_r / stride;
    return p < P;
}

// visit(r, s, p, q) for every filter tap (r, s) that carries input pixel (h, w) into an output
// pixel (p, q): the terms of dx[n, h, w, c].
template <class Visit>
__device__ __forceinline__ void for_each_tap_of_input(int h, int w, int R, int S, int P, int Q, int stride, int pad,
                                                      const Visit& visit) {
    for (int r = 0; r < R; ++r) {
        int p;
        if (!output_of_tap(h + pad - r, stride, P, p)) continue;
        for (int s = 0; s < S; ++s) {
            int q;
            if (output_of_tap(w + pad - s, stride, Q, q)) visit(r, s, p, q);
        }
    }
}

/* ------------------------------------------------------------------ version 1: naive */
extern "C" __global__ void conv2d_fwd_naive_f32(const float* __restrict__ x, const float* __restrict__ w,
                                                float* __restrict__ y, int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    const long long total = (long long)N * P * Q * K;
    GRID_STRIDE_LOOP(i, total) {
        int n, p, q, k;
        unravel4(i, P, Q, K, n, p, q, k);   // y[n, p, q, k]
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
        int n, h, wc, c;
        unravel4(i, H, W, C, n, h, wc, c);   // dx[n, h, wc, c]
        float acc = 0.0f;
        for_each_tap_of_input(h, wc, R, S, P, Q, stride, pad, [&](int r, int s, int p, int q) {
            const float* dyp = dy + (((long long)n * P + p) * Q + q) * K;
            for (int k = 0; k < K; ++k) acc += dyp[k] * w[(((long long)k * C + c) * R + r) * S + s];
        });
        dx[i] = acc;
    }
}

extern "C" __global__ void conv2d_bwd_weight_naive_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                                       float* __restrict__ dw, int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    const long long total = (long long)K * C * R * S;   // dw in OIHW order
    GRID_STRIDE_LOOP(i, total) {
        int k, c, r, s;
        unravel4(i, C, R, S, k, c, r, s);   // dw[k, c, r, s]
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

/* ------------------------------------------------------------------ version 2: im2col / col2im */
// cols[(n, p, q), (r, s, c)] = x[n, p*stride + r - pad, q*stride + s - pad, c] or 0 (padding)
extern "C" __global__ void im2col_f32(const float* __restrict__ x, float* __restrict__ cols, int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    const long long RSC = (long long)R * S * C;
    const long long total = (long long)N * P * Q * RSC;
    GRID_STRIDE_LOOP(i, total) {
        int n, p, q, kk;
        unravel4(i, P, Q, (int)RSC, n, p, q, kk);   // row (n, p, q) of cols, column kk
        const int c = kk % C, s = (kk / C) % S, r = kk / (C * S);   // kk = (r * S + s) * C + c
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
        int n, h, wc, c;
        unravel4(i, H, W, C, n, h, wc, c);   // dx[n, h, wc, c]
        float acc = 0.0f;
        for_each_tap_of_input(h, wc, R, S, P, Q, stride, pad, [&](int r, int s, int p, int q) {
            const long long row = ((long long)n * P + p) * Q + q;   // the row of cols that copied the pixel
            acc += dcols[row * RSC + ((long long)r * S + s) * C + c];
        });
        dx[i] = acc;
    }
}

/* ------------------------------------------------------------------ version 3: implicit GEMM */
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
        float av[4], bv[4];
        load_float4(&As[k][ty * 4], av);
        load_float4(&Bs[k][tx * 4], bv);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

// The 4 rows m = m0 + lr + 16 i of the A tile that a thread loads, as pixels (image, row, col) of
// images of rows x cols pixels: base[i] = image * image_elems, y[i] = row * scale + offset,
// x[i] = col * scale + offset (IG_FAR for m >= M: every bounds test then fails).  Decoded once,
// before the reduction loop: a thread's rows never change.
struct TileRows {
    long long base[4];
    int y[4], x[4];
};

__device__ __forceinline__ TileRows decode_tile_rows(int m0, int lr, int M, int rows, int cols, long long image_elems,
                                                     int scale, int offset) {
    TileRows t;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + lr + 16 * i;
        t.base[i] = 0;
        t.y[i] = t.x[i] = IG_FAR;
        if (m < M) {
            const int image = m / (rows * cols), pixel = m % (rows * cols);
            t.base[i] = image * image_elems;
            t.y[i] = (pixel / cols) * scale + offset;
            t.x[i] = (pixel % cols) * scale + offset;
        }
    }
    return t;
}

// out[m, n] = acc for this thread's 4 x 4 block at (row0, col0) of an [M, N] row-major matrix,
// except what lies past its edges.
__device__ __forceinline__ void store_block_4x4(float* __restrict__ out, const float acc[4][4], int row0, int col0,
                                                int M, int N) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = row0 + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (col0 + j < N) out[(long long)m * N + col0 + j] = acc[i][j];
    }
}

typedef float TileA[IG_BM + IG_PAD];   // a row of the shared A tile (As[k][m])
typedef float TileB[IG_BN + IG_PAD];   // a row of the shared B tile (Bs[k][n])

// The GEMM of every pass: the 64 x 64 tile of C at (blockIdx.x * 64, blockIdx.y * 64) summed over
// the reduction range [k_begin, k_end) in steps of 16.  At each step load_tiles(k0, As, Bs) fills
// the shared tiles As[16][64 + pad], Bs[16][64 + pad] (declared by the kernel) -- the one part that
// differs between the passes, where the implicit GEMM computes its addresses -- then every thread
// multiplies its 4 x 4 block from shared memory.
// Returns (in acc) this thread's block, rows ty * 4.., columns tx * 4.. of the tile.
template <class LoadTiles>
__device__ __forceinline__ void igemm_tile(int k_begin, int k_end, TileA* As, TileB* Bs, const LoadTiles& load_tiles,
                                           float acc[4][4]) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int k0 = k_begin; k0 < k_end; k0 += IG_BK) {
        load_tiles(k0, As, Bs);
        __syncthreads();
        tile_product_4x4(As, Bs, acc, ty, tx);
        __syncthreads();   // nobody refills a tile another thread is still reading
    }
}

// Forward.  grid (ceil(N*P*Q / 64), ceil(K / 64)), block 256.  wt is the weight in KRSC order.
extern "C" __global__ void __launch_bounds__(256)
conv2d_fwd_igemm_f32(const float* __restrict__ x, const float* __restrict__ wt, float* __restrict__ y,
                     int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    const int M = N * P * Q, Kd = R * S * C;
    const int m0 = blockIdx.x * IG_BM, n0 = blockIdx.y * IG_BN;
    // A loader: thread reads column kk = tid % 16 of rows tid / 16 + 16 i (consecutive threads,
    // consecutive channels).  Row m is output pixel (n, p, q): its window starts at
    // (p * stride - pad, q * stride - pad) of image n.
    const int lk = threadIdx.x % IG_BK, lr = threadIdx.x / IG_BK;
    const TileRows a = decode_tile_rows(m0, lr, M, P, Q, (long long)H * W * C, stride, -pad);   // y, x: window corner

    float acc[4][4] = {};
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];   // the tiles of igemm_tile
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];
    igemm_tile(0, Kd, As, Bs, [&](int k0, TileA* As, TileB* Bs) {
        const int kk = k0 + lk;
        const int c = kk % C, rs = kk / C, s = rs % S, r = rs / S;   // kk = (r * S + s) * C + c
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int h = a.y[i] + r, wc = a.x[i] + s;
            As[lk][lr + 16 * i] = (kk < Kd && h >= 0 && h < H && wc >= 0 && wc < W)
                                      ? x[a.base[i] + ((long long)h * W + wc) * C + c] : 0.0f;
        }
        // B loader: B[kk, k] = wt[k * Kd + kk]; again consecutive threads, consecutive kk
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int k = n0 + lr + 16 * i;
            Bs[lk][lr + 16 * i] = (kk < Kd && k < K) ? wt[(long long)k * Kd + kk] : 0.0f;
        }
    }, acc);
    // y[n, p, q, k] is row m of a [M, K] matrix
    store_block_4x4(y, acc, m0 + threadIdx.x / 16 * 4, n0 + threadIdx.x % 16 * 4, M, K);
}

// Backward data.  grid (ceil(N*H*W / 64), ceil(C / 64)), block 256.  wr is the weight in RSKC order.
extern "C" __global__ void __launch_bounds__(256)
conv2d_bwd_data_igemm_f32(const float* __restrict__ dy, const float* __restrict__ wr, float* __restrict__ dx,
                          int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    const int M = N * H * W, Kd = R * S * K;
    const int m0 = blockIdx.x * IG_BM, n0 = blockIdx.y * IG_BN;
    // A[m, kk] = dy[n, p, q, k] with m = (n, h, w), kk = (r, s, k), p = (h + pad - r) / stride when exact.
    const int lk = threadIdx.x % IG_BK, lr = threadIdx.x / IG_BK;
    const TileRows a = decode_tile_rows(m0, lr, M, H, W, (long long)P * Q * K, 1, pad);   // y, x: h + pad, w + pad
    // B[kk, c] = wr[kk * C + c]: here consecutive threads take consecutive c (row-major B)
    const int bc = threadIdx.x % IG_BN, bk = threadIdx.x / IG_BN;

    float acc[4][4] = {};
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];   // the tiles of igemm_tile
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];
    igemm_tile(0, Kd, As, Bs, [&](int k0, TileA* As, TileB* Bs) {
        const int kk = k0 + lk;
        const int k = kk % K, rs = kk / K, s = rs % S, r = rs / S;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int p, q;
            As[lk][lr + 16 * i] = (kk < Kd && output_of_tap(a.y[i] - r, stride, P, p) &&
                                   output_of_tap(a.x[i] - s, stride, Q, q))
                                      ? dy[a.base[i] + ((long long)p * Q + q) * K + k] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int kr = bk + 4 * i, kb = k0 + kr, c = n0 + bc;
            Bs[kr][bc] = (kb < Kd && c < C) ? wr[(long long)kb * C + c] : 0.0f;
        }
    }, acc);
    store_block_4x4(dx, acc, m0 + threadIdx.x / 16 * 4, n0 + threadIdx.x % 16 * 4, M, C);
}

// Backward weight, split-K.  grid (ceil(K / 64), ceil(R*S*C / 64), splits), block 256.
// Split z reduces n*P*Q indices [z * chunk, min((z + 1) * chunk, N*P*Q)) into ws[z][k][(r, s, c)].
// chunk is a multiple of 16.
extern "C" __global__ void __launch_bounds__(256)
conv2d_bwd_weight_igemm_f32(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ ws,
                            int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad, int chunk) {
    const int M = K, Ncols = R * S * C, Kd = N * P * Q;
    const int m0 = blockIdx.x * IG_BM, n0 = blockIdx.y * IG_BN;
    const int kbegin = blockIdx.z * chunk, kend = min(Kd, kbegin + chunk);
    // A[k, j] = dy[j * K + k] (dy^T): consecutive threads take consecutive k.
    // B[j, (r, s, c)] = x patch: consecutive threads take consecutive (r, s, c), i.e. mostly
    // consecutive channels.  Both loaders cover a 16 x 64 slab: element (row j, column tid % 64).
    const int lc = threadIdx.x % 64, lj = threadIdx.x / 64;
    const int col = n0 + lc;
    int b_c = 0, b_r = IG_FAR, b_s = IG_FAR;   // this thread's B column never changes: decode it once
    if (col < Ncols) {
        b_c = col % C;
        b_s = (col / C) % S;
        b_r = col / (C * S);
    }

    float acc[4][4] = {};
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];   // the tiles of igemm_tile
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];
    igemm_tile(kbegin, kend, As, Bs, [&](int k0, TileA* As, TileB* Bs) {
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
    }, acc);
    store_block_4x4(ws + (long long)blockIdx.z * M * Ncols, acc, m0 + threadIdx.x / 16 * 4, n0 + threadIdx.x % 16 * 4,
                    M, Ncols);
}

// dw[k, c, r, s] (OIHW) = sum over splits z of ws[z][k][(r * S + s) * C + c].
extern "C" __global__ void conv2d_bwd_weight_reduce_f32(const float* __restrict__ ws, float* __restrict__ dw,
                                                        int splits, int K, int C, int R, int S) {
    const long long total = (long long)K * C * R * S;
    GRID_STRIDE_LOOP(i, total) {
        int k, c, r, s;
        unravel4(i, C, R, S, k, c, r, s);   // dw[k, c, r, s]
        const long long src = (long long)k * R * S * C + ((long long)r * S + s) * C + c;
        float acc = 0.0f;
        for (int z = 0; z < splits; ++z) acc += ws[(long long)z * total + src];
        dw[i] = acc;
    }
}
