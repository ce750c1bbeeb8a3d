/*
 * gemm.cu: general matrix multiply, the work horse behind the fully connected layer and the
 * im2col path of the convolution.
 *
 *   C = alpha * op(A) @ op(B) + beta * C        op(X) = X or X^T, every matrix row-major
 *
 *   op(A) is M x K:  trans_a = 0: A is stored [M, lda] and op(A)[m, k] = A[m * lda + k]
 *                    trans_a = 1: A is stored [K, lda] and op(A)[m, k] = A[k * lda + m]
 *   op(B) is K x N:  trans_b = 0: B is stored [K, ldb] and op(B)[k, n] = B[k * ldb + n]
 *                    trans_b = 1: B is stored [N, ldb] and op(B)[k, n] = B[n * ldb + k]
 *   C is stored [M, ldc].  beta == 0 never reads C (it may hold garbage, as in BLAS).
 *
 * Versions (all four transpose combinations, any M, N, K >= 0, including 1 and odd sizes;
 * `python -m kernels.gemm` checks and times each; the launchers are kernels/gemm.py):
 *
 *   version 1  gemm_naive_f32 / _f16: one thread per output element: K multiply-adds, each
 *              reading one element of A and one of B from global memory.  2 loads per FMA:
 *              memory bound, a few % of peak.
 *   version 2  gemm_tiled_f32: 16 x 16 tiles in shared memory, so every element loaded from
 *              global memory serves 16 multiply-adds: global traffic / 16.  16 x 16 threads
 *              compute a 16 x 16 tile of C; the block walks K in steps of 16; each step every
 *              thread copies one element of A and one of B into shared memory, then does 16 FMAs
 *              from it.  Shared memory is now the limit (2 shared loads per FMA).
 *   version 3  gemm_regblock_f32: each thread keeps an 8 x 8 block of C in registers, so 16
 *              shared-memory loads feed 64 FMAs instead of 128.  128 x 128 tile of C per block
 *              of 256 threads, K in steps of 8; per k a thread reads 8 values of A and 8 of B from
 *              shared memory (as float4).  Tiles are loaded with float4 (16-byte) global loads
 *              where the row stride and the base pointer allow (the launcher checks, flags vec_a
 *              / vec_b), with a scalar, bounds-checked fallback for the edges of the matrix.
 *   version 4  gemm_wmma_f16: tensor cores (sm_70+), which do a 16x16x16 matrix product per warp
 *              instruction: __half inputs, float accumulation and output.  64 x 64 tile per block
 *              of 4 warps, each warp a 32 x 32 piece as 2 x 2 WMMA 16x16x16 fragments.  Tiles go
 *              through shared memory (zero-padded at the edges, transposes resolved there), so
 *              any M, N, K works.  Compiled for sm_60 the same kernel does the tile product with
 *              scalar FMAs instead (#if below).  gemm_wmma_f16_out_f16 rounds C to half once, after
 *              the float accumulation (the float16 linear layer).
 *
 * On a GPU, at ResNet-50's shape (the classifier, 256x2048 @ 2048x1000; `python -m kernels.gemm` prints
 * the performance model's prediction; not yet measured: gemm.cu did not compile on the first GPU
 * run), on an H100: version 1 1.95 ms (each lane's B column is a sector of its own: L2 traffic),
 * version 2 190 us, version 3 205 us, version 4 166 us.  Version 3's 128 x 128 tiles cut a
 * 256 x 1000 output into 16 blocks: 16 of an H100's 132 SMs work, each issuing its block's 33 M
 * FMAs alone, where version 2's 16 x 16 tiles make 1008 blocks.  On large matrices (4096^3)
 * version 3 leads: 3.1 ms, version 2 19 ms, version 4 4.5 ms (its tiles are filled one half at
 * a time, each with its index arithmetic: the issue slots that takes outweigh the FMAs the
 * tensor cores save).
 *
 * Thread layout of version 3 (the classic one, see e.g. any SGEMM tutorial's "2-D blocktiling"):
 *   thread (ty, tx) = (tid / 16, tid % 16) owns rows {ty*4 + i, 64 + ty*4 + i} and columns
 *   {tx*4 + j, 64 + tx*4 + j}, i, j < 4.  Splitting each thread's 8 rows into two groups of 4,
 *   64 apart, keeps its shared-memory reads 16-byte vectors and free of bank conflicts.
 *   As is stored k-major (As[k][m], the A tile transposed) so that those reads are contiguous.
 *
 * Helpers at the end: bias_add_rows_f32 / _f16 (y[m, n] += b[n], the linear layer's bias) and
 * column_sum_f32 / _f16 (db[n] = sum_m dy[m, n], its gradient, summed in float).
 */
#include <cuda_fp16.h>
#include <mma.h>
#include "common.cuh"   // GRID_STRIDE_LOOP(_Y), to_float, load/store_float4, column_sum, KERNEL_ENTRY

__device__ __forceinline__ long long op_index(int row, int col, int ld, int trans) {
    // element (row, col) of op(X) where X is row-major with leading dimension ld
    return trans ? (long long)col * ld + row : (long long)row * ld + col;
}

template <typename TC>
__device__ __forceinline__ void store_c(TC* C, long long i, float acc, float alpha, float beta) {
    C[i] = from_float<TC>(beta == 0.0f ? alpha * acc : alpha * acc + beta * to_float(C[i]));
}

/* ------------------------------------------------------------------ version 1: naive */
template <typename T>
__device__ void gemm_naive(const T* __restrict__ A, const T* __restrict__ B, float* C, int M, int N, int K,
                           int lda, int ldb, int ldc, int trans_a, int trans_b, float alpha, float beta) {
    // grid-stride over the M*N outputs; consecutive threads take consecutive columns of C
    GRID_STRIDE_LOOP(i, (long long)M * N) {
        const int m = (int)(i / N), n = (int)(i % N);
        float acc = 0.0f;
        for (int k = 0; k < K; ++k)
            acc += to_float(A[op_index(m, k, lda, trans_a)]) * to_float(B[op_index(k, n, ldb, trans_b)]);
        store_c(C, (long long)m * ldc + n, acc, alpha, beta);
    }
}

KERNEL_ENTRY(gemm_naive_f32, gemm_naive<float>)
KERNEL_ENTRY(gemm_naive_f16, gemm_naive<__half>)

/* ------------------------------------------------------------------ version 2: shared-memory tiles */
#define TILE 16

// block (16, 16); grid (ceil(M / 16), ceil(N / 16)): x walks rows of C (no 65535 limit on x)
extern "C" __global__ void gemm_tiled_f32(const float* __restrict__ A, const float* __restrict__ B, float* C,
                                          int M, int N, int K, int lda, int ldb, int ldc,
                                          int trans_a, int trans_b, float alpha, float beta) {
    // No padding: a warp (rows ty and ty + 1 of the block) writes As[ty][0..15], As[ty + 1][0..15],
    // 32 consecutive floats, one per bank, and Bs alike; its reads are broadcasts (As[ty][k]) or
    // 16 consecutive floats (Bs[k][tx]).  Padding Bs to [TILE][TILE + 1] would shift row ty + 1 by
    // one bank, so that its last lane meets the first lane of row ty: a 2-way conflict in every
    // fill of Bs (kernels.profile(): 4,096 store-conflict wavefronts at 128 x 128 x 128, 0 without).
    __shared__ float As[TILE][TILE];   // As[row][k]
    __shared__ float Bs[TILE][TILE];   // Bs[k][col]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.x * TILE + ty, col = blockIdx.y * TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TILE) {
        // each thread copies one element of each tile, zero outside the matrices
        int ka = k0 + tx;
        As[ty][tx] = (row < M && ka < K) ? A[op_index(row, ka, lda, trans_a)] : 0.0f;
        int kb = k0 + ty;
        Bs[ty][tx] = (kb < K && col < N) ? B[op_index(kb, col, ldb, trans_b)] : 0.0f;
        __syncthreads();
#pragma unroll
        for (int k = 0; k < TILE; ++k) acc += As[ty][k] * Bs[k][tx];
        __syncthreads();   // nobody overwrites a tile another thread is still reading
    }
    if (row < M && col < N) store_c(C, (long long)row * ldc + col, acc, alpha, beta);
}

/* ------------------------------------------------------------------ version 3: register blocking */
#define RB_BM 128
#define RB_BN 128
#define RB_BK 8

// The two ways a 128 x 8 slab of a matrix X reaches a k-major shared tile, tile[k][j] = op(X)[j0 + j][k0 + k]
// (As[k][m] from op(A), Bs[k][n] from op(B)^T), zero outside the J x K matrix.  256 threads, 4 values each;
// float4 (16-byte) loads when `vec` says the rows allow them, else a bounds-checked scalar fallback.
//
// X stored [J][ld], k contiguous (op(A) = A, or op(B) = B^T): two threads per row j, 4 consecutive k
// each, written transposed into the tile.
__device__ __forceinline__ void load_tile_transposing(const float* __restrict__ X, float (*tile)[128], int J, int K,
                                                      int ld, int vec, int j0, int k0, int tid) {
    const int r = tid >> 1, kq = (tid & 1) * 4;
    const int j = j0 + r, k = k0 + kq;
    float v[4];
    if (vec && j < J && k + 3 < K) {
        load_float4(X + (long long)j * ld + k, v);
    } else {
#pragma unroll
        for (int t = 0; t < 4; ++t) v[t] = (j < J && k + t < K) ? X[(long long)j * ld + k + t] : 0.0f;
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) tile[kq + t][r] = v[t];
}

// X stored [K][ld], j contiguous (op(A) = A^T stored as [K][M], or op(B) = B): a row k of the tile is
// 128 consecutive floats; 32 threads per row, 4 floats each, stored as they are.
__device__ __forceinline__ void load_tile_direct(const float* __restrict__ X, float (*tile)[128], int J, int K,
                                                 int ld, int vec, int j0, int k0, int tid) {
    const int kr = tid >> 5, jq = (tid & 31) * 4;
    const int k = k0 + kr, j = j0 + jq;
    float v[4];
    if (vec && k < K && j + 3 < J) {
        load_float4(X + (long long)k * ld + j, v);
    } else {
#pragma unroll
        for (int t = 0; t < 4; ++t) v[t] = (k < K && j + t < J) ? X[(long long)k * ld + j + t] : 0.0f;
    }
    store_float4(&tile[kr][jq], v);
}

// block 256 threads; grid (ceil(M / 128), ceil(N / 128)).  vec_a / vec_b: 1 when the matrix's base
// pointer is 16-byte aligned and its leading dimension a multiple of 4 (float4 loads are legal).
extern "C" __global__ void __launch_bounds__(256)
gemm_regblock_f32(const float* __restrict__ A, const float* __restrict__ B, float* C, int M, int N, int K,
                  int lda, int ldb, int ldc, int trans_a, int trans_b, float alpha, float beta,
                  int vec_a, int vec_b) {
    __shared__ __align__(16) float As[RB_BK][RB_BM];
    __shared__ __align__(16) float Bs[RB_BK][RB_BN];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int m0 = blockIdx.x * RB_BM, n0 = blockIdx.y * RB_BN;

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += RB_BK) {
        if (trans_a) load_tile_direct(A, As, M, K, lda, vec_a, m0, k0, tid);      // A stored [K][M]
        else load_tile_transposing(A, As, M, K, lda, vec_a, m0, k0, tid);         // A stored [M][K]
        if (trans_b) load_tile_transposing(B, Bs, N, K, ldb, vec_b, n0, k0, tid);  // B stored [N][K]
        else load_tile_direct(B, Bs, N, K, ldb, vec_b, n0, k0, tid);               // B stored [K][N]
        __syncthreads();
#pragma unroll
        for (int k = 0; k < RB_BK; ++k) {
            float a[8], b[8];   // rows ty*4.. and 64 + ty*4.. of the A tile, columns alike of B
            load_float4(&As[k][ty * 4], a);
            load_float4(&As[k][64 + ty * 4], a + 4);
            load_float4(&Bs[k][tx * 4], b);
            load_float4(&Bs[k][64 + tx * 4], b + 4);
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int m = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int n = n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
            if (n < N) store_c(C, (long long)m * ldc + n, acc[i][j], alpha, beta);
        }
    }
}

/* ------------------------------------------------------------------ version 4: tensor cores (WMMA) */
#define WM_BM 64
#define WM_BN 64
#define WM_BK 32
#define WM_LDA (WM_BK + 8)   // padded leading dimensions: multiples of 8 halves / 4 floats, as
#define WM_LDB (WM_BN + 8)   // load_matrix_sync requires, and rows 32-byte aligned
#define WM_LDC (WM_BN + 4)

// C of type TC (float, or __half for a float16 layer's output: accumulated in float, rounded once).
// The shared tiles are the kernel's (declared by the entry points below), passed in.
template <typename TC>
__device__ __forceinline__ void gemm_wmma(const __half* __restrict__ A, const __half* __restrict__ B, TC* C, int M,
                                          int N, int K, int lda, int ldb, int ldc, int trans_a, int trans_b,
                                          float alpha, float beta, __half (*As)[WM_LDA], __half (*Bs)[WM_LDB],
                                          float (*Cs)[WM_LDC]) {
    const int tid = threadIdx.x;
    const int m0 = blockIdx.x * WM_BM, n0 = blockIdx.y * WM_BN;
    const __half zero = __float2half(0.0f);

#if __CUDA_ARCH__ >= 700
    using namespace nvcuda;
    const int warp = tid / 32, wy = warp / 2, wx = warp % 2;   // this warp's 32 x 32 piece
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
#else
    float acc_s[WM_BM * WM_BN / 128];   // sm_60: 32 outputs per thread, element e = tid + 128 * q
    for (int q = 0; q < WM_BM * WM_BN / 128; ++q) acc_s[q] = 0.0f;
#endif

    for (int k0 = 0; k0 < K; k0 += WM_BK) {
        // Fill the tiles, zero outside the matrices; consecutive threads read consecutive addresses
        for (int e = tid; e < WM_BM * WM_BK; e += 128) {
            const int r = trans_a ? e % WM_BM : e / WM_BK, c = trans_a ? e / WM_BM : e % WM_BK;
            const int m = m0 + r, k = k0 + c;
            As[r][c] = (m < M && k < K) ? A[op_index(m, k, lda, trans_a)] : zero;
        }
        for (int e = tid; e < WM_BK * WM_BN; e += 128) {
            const int r = trans_b ? e % WM_BK : e / WM_BN, c = trans_b ? e / WM_BK : e % WM_BN;
            const int k = k0 + r, n = n0 + c;
            Bs[r][c] = (k < K && n < N) ? B[op_index(k, n, ldb, trans_b)] : zero;
        }
        __syncthreads();
#if __CUDA_ARCH__ >= 700
#pragma unroll
        for (int kk = 0; kk < WM_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[wy * 32 + i * 16][kk], WM_LDA);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[kk][wx * 32 + j * 16], WM_LDB);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
#else
        for (int q = 0; q < WM_BM * WM_BN / 128; ++q) {
            const int e = tid + 128 * q, r = e / WM_BN, c = e % WM_BN;
            float s = acc_s[q];
            for (int kk = 0; kk < WM_BK; ++kk) s += __half2float(As[r][kk]) * __half2float(Bs[kk][c]);
            acc_s[q] = s;
        }
#endif
        __syncthreads();
    }

#if __CUDA_ARCH__ >= 700
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&Cs[wy * 32 + i * 16][wx * 32 + j * 16], acc[i][j], WM_LDC, wmma::mem_row_major);
#else
    for (int q = 0; q < WM_BM * WM_BN / 128; ++q) {
        const int e = tid + 128 * q;
        Cs[e / WM_BN][e % WM_BN] = acc_s[q];
    }
#endif
    __syncthreads();
    // The fragment's element-to-thread mapping is opaque, so the epilogue (alpha, beta, edges)
    // reads the tile back from shared memory, where the layout is ours.
    for (int e = tid; e < WM_BM * WM_BN; e += 128) {
        const int r = e / WM_BN, c = e % WM_BN, m = m0 + r, n = n0 + c;
        if (m < M && n < N) store_c(C, (long long)m * ldc + n, Cs[r][c], alpha, beta);
    }
}

// block 128 threads (4 warps, 2 x 2); grid (ceil(M / 64), ceil(N / 64)).
extern "C" __global__ void __launch_bounds__(128)
gemm_wmma_f16(const __half* __restrict__ A, const __half* __restrict__ B, float* C, int M, int N, int K,
              int lda, int ldb, int ldc, int trans_a, int trans_b, float alpha, float beta) {
    __shared__ __align__(32) __half As[WM_BM][WM_LDA];   // op(A) tile, row-major [m][k]
    __shared__ __align__(32) __half Bs[WM_BK][WM_LDB];   // op(B) tile, row-major [k][n]
    __shared__ __align__(32) float Cs[WM_BM][WM_LDC];    // the block's results before the epilogue
    gemm_wmma(A, B, C, M, N, K, lda, ldb, ldc, trans_a, trans_b, alpha, beta, As, Bs, Cs);
}

// The same with a half C: the float16 linear layer's output and input gradient.
extern "C" __global__ void __launch_bounds__(128)
gemm_wmma_f16_out_f16(const __half* __restrict__ A, const __half* __restrict__ B, __half* C, int M, int N, int K,
                      int lda, int ldb, int ldc, int trans_a, int trans_b, float alpha, float beta) {
    __shared__ __align__(32) __half As[WM_BM][WM_LDA];
    __shared__ __align__(32) __half Bs[WM_BK][WM_LDB];
    __shared__ __align__(32) float Cs[WM_BM][WM_LDC];
    gemm_wmma(A, B, C, M, N, K, lda, ldb, ldc, trans_a, trans_b, alpha, beta, As, Bs, Cs);
}

/* ------------------------------------------------------------------ linear-layer helpers */
// y[m, n] += b[n] for y [M, N] row-major (float, or half rounded once after the float add); b is
// float (a float32 master bias); grid-stride, coalesced.
template <typename T>
__device__ void bias_add_rows(T* __restrict__ y, const float* __restrict__ b, int M, int N) {
    GRID_STRIDE_LOOP(i, (long long)M * N) y[i] = from_float<T>(to_float(y[i]) + b[i % N]);
}

KERNEL_ENTRY(bias_add_rows_f32, bias_add_rows<float>)
KERNEL_ENTRY(bias_add_rows_f16, bias_add_rows<__half>)

// out[n] = sum_m x[m, n] (float sums, also of half x).  block (32, 8), grid (ceil(N / 32), 1): 32
// columns per block; the 8 rows of threads each sum every 8th row (consecutive threads read
// consecutive columns: coalesced), then column_sum adds the 8 partial sums of each column.
template <typename T>
__device__ __forceinline__ void column_sums(const T* __restrict__ x, float* __restrict__ out, int M, int N,
                                            float (*tile)[32]) {
    const int n = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (n < N)
        GRID_STRIDE_LOOP_Y(m, M) s += to_float(x[m * N + n]);
    s = column_sum(s, tile);
    if (threadIdx.y == 0 && n < N) out[n] = s;
}

extern "C" __global__ void column_sum_f32(const float* __restrict__ x, float* __restrict__ out, int M, int N) {
    __shared__ float tile[8][32];
    column_sums(x, out, M, N, tile);
}

extern "C" __global__ void column_sum_f16(const __half* __restrict__ x, float* __restrict__ out, int M, int N) {
    __shared__ float tile[8][32];
    column_sums(x, out, M, N, tile);
}
