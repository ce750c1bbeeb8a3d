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
 * Versions (all four transpose combinations, any M, N, K >= 0, including 1 and odd sizes):
 *
 *   v1 gemm_naive_f32 / _f16   one thread per output element: K multiply-adds, each reading
 *                              one element of A and one of B from global memory.  2 loads per
 *                              FMA: memory bound, a few % of peak.
 *   v2 gemm_tiled_f32          16 x 16 threads compute a 16 x 16 tile of C.  The block walks
 *                              K in steps of 16; each step every thread copies one element of
 *                              A and one of B into shared memory, then each thread does 16 FMAs
 *                              from shared memory.  Global traffic / 16; shared memory is now
 *                              the limit (2 shared loads per FMA).
 *   v3 gemm_regblock_f32       128 x 128 tile of C per block of 256 threads, K in steps of 8;
 *                              each thread owns an 8 x 8 block of C in registers.  Per k it
 *                              reads 8 values of A and 8 of B from shared memory (as float4)
 *                              and does 64 FMAs: 16 loads per 64 FMAs.  Tiles are loaded with
 *                              float4 (16-byte) global loads where the row stride and the base
 *                              pointer allow (the launcher checks, flags vec_a / vec_b), with a
 *                              scalar, bounds-checked fallback for the edges of the matrix.
 *   tc gemm_wmma_f16           tensor cores (sm_70+): __half inputs, float accumulation and
 *                              output.  64 x 64 tile per block of 4 warps, each warp a 32 x 32
 *                              piece as 2 x 2 WMMA 16x16x16 fragments.  Tiles go through
 *                              shared memory (zero-padded at the edges, transposes resolved
 *                              there), so any M, N, K works.  Compiled for sm_60 the same kernel
 *                              does the tile product with scalar FMAs instead (#if below).
 *
 * Thread layout of v3 (the classic one, see e.g. any SGEMM tutorial's "2-D blocktiling"):
 *   thread (ty, tx) = (tid / 16, tid % 16) owns rows {ty*4 + i, 64 + ty*4 + i} and columns
 *   {tx*4 + j, 64 + tx*4 + j}, i, j < 4.  Splitting each thread's 8 rows into two groups of 4,
 *   64 apart, keeps its shared-memory reads 16-byte vectors and free of bank conflicts.
 *   As is stored k-major (As[k][m], the A tile transposed) so that those reads are contiguous.
 *
 * Helpers at the end: bias_add_rows_f32 (y[m, n] += b[n], the linear layer's bias) and
 * column_sum_f32 (db[n] = sum_m dy[m, n], its gradient).
 */
#include <cuda_fp16.h>
#include <mma.h>

__device__ __forceinline__ long long op_index(int row, int col, int ld, int trans) {
    // element (row, col) of op(X) where X is row-major with leading dimension ld
    return trans ? (long long)col * ld + row : (long long)row * ld + col;
}

__device__ __forceinline__ float load_as_float(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_as_float(const __half* p, long long i) { return __half2float(p[i]); }

__device__ __forceinline__ void store_c(float* C, long long i, float acc, float alpha, float beta) {
    C[i] = beta == 0.0f ? alpha * acc : alpha * acc + beta * C[i];
}

/* ------------------------------------------------------------------ v1: naive */
template <typename T>
__device__ void gemm_naive(const T* __restrict__ A, const T* __restrict__ B, float* C, int M, int N, int K,
                           int lda, int ldb, int ldc, int trans_a, int trans_b, float alpha, float beta) {
    // grid-stride over the M*N outputs; consecutive threads take consecutive columns of C
    const long long total = (long long)M * N;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const int m = (int)(i / N), n = (int)(i % N);
        float acc = 0.0f;
        for (int k = 0; k < K; ++k)
            acc += load_as_float(A, op_index(m, k, lda, trans_a)) * load_as_float(B, op_index(k, n, ldb, trans_b));
        store_c(C, (long long)m * ldc + n, acc, alpha, beta);
    }
}

extern "C" __global__ void gemm_naive_f32(const float* A, const float* B, float* C, int M, int N, int K,
                                          int lda, int ldb, int ldc, int trans_a, int trans_b,
                                          float alpha, float beta) {
    gemm_naive(A, B, C, M, N, K, lda, ldb, ldc, trans_a, trans_b, alpha, beta);
}

extern "C" __global__ void gemm_naive_f16(const __half* A, const __half* B, float* C, int M, int N, int K,
                                          int lda, int ldb, int ldc, int trans_a, int trans_b,
                                          float alpha, float beta) {
    gemm_naive(A, B, C, M, N, K, lda, ldb, ldc, trans_a, trans_b, alpha, beta);
}

/* ------------------------------------------------------------------ v2: shared-memory tiles */
#define TILE 16

// block (16, 16); grid (ceil(M / 16), ceil(N / 16)): x walks rows of C (no 65535 limit on x)
extern "C" __global__ void gemm_tiled_f32(const float* __restrict__ A, const float* __restrict__ B, float* C,
                                          int M, int N, int K, int lda, int ldb, int ldc,
                                          int trans_a, int trans_b, float alpha, float beta) {
    __shared__ float As[TILE][TILE];       // As[row][k]
    __shared__ float Bs[TILE][TILE + 1];   // Bs[k][col]; +1 breaks bank conflicts of the transposed fill
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

/* ------------------------------------------------------------------ v3: register blocking */
#define RB_BM 128
#define RB_BN 128
#define RB_BK 8

// Copy the RB_BM x RB_BK tile of op(A) starting at (m0, k0) into As[k][m].  256 threads, 4 values each.
__device__ __forceinline__ void load_tile_a(const float* __restrict__ A, float (*As)[RB_BM], int M, int K,
                                            int lda, int trans_a, int vec, int m0, int k0, int tid) {
    if (!trans_a) {
        // A[m][k]: each row of the tile is 8 consecutive floats; two threads per row, 4 floats each
        const int r = tid >> 1, kq = (tid & 1) * 4;
        const int m = m0 + r, k = k0 + kq;
        if (vec && m < M && k + 3 < K) {
            const float4 v = *reinterpret_cast<const float4*>(A + (long long)m * lda + k);
            As[kq + 0][r] = v.x; As[kq + 1][r] = v.y; As[kq + 2][r] = v.z; As[kq + 3][r] = v.w;
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j)
                As[kq + j][r] = (m < M && k + j < K) ? A[(long long)m * lda + k + j] : 0.0f;
        }
    } else {
        // A stored [K][M]: a row k of the tile is 128 consecutive floats; 32 threads per row
        const int kr = tid >> 5, mq = (tid & 31) * 4;
        const int k = k0 + kr, m = m0 + mq;
        if (vec && k < K && m + 3 < M) {
            *reinterpret_cast<float4*>(&As[kr][mq]) = *reinterpret_cast<const float4*>(A + (long long)k * lda + m);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j)
                As[kr][mq + j] = (k < K && m + j < M) ? A[(long long)k * lda + m + j] : 0.0f;
        }
    }
}

// Copy the RB_BK x RB_BN tile of op(B) starting at (k0, n0) into Bs[k][n].
__device__ __forceinline__ void load_tile_b(const float* __restrict__ B, float (*Bs)[RB_BN], int N, int K,
                                            int ldb, int trans_b, int vec, int n0, int k0, int tid) {
    if (!trans_b) {
        const int kr = tid >> 5, nq = (tid & 31) * 4;
        const int k = k0 + kr, n = n0 + nq;
        if (vec && k < K && n + 3 < N) {
            *reinterpret_cast<float4*>(&Bs[kr][nq]) = *reinterpret_cast<const float4*>(B + (long long)k * ldb + n);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j)
                Bs[kr][nq + j] = (k < K && n + j < N) ? B[(long long)k * ldb + n + j] : 0.0f;
        }
    } else {
        // B stored [N][K]: two threads per row n, 4 consecutive k each, stored transposed
        const int r = tid >> 1, kq = (tid & 1) * 4;
        const int n = n0 + r, k = k0 + kq;
        if (vec && n < N && k + 3 < K) {
            const float4 v = *reinterpret_cast<const float4*>(B + (long long)n * ldb + k);
            Bs[kq + 0][r] = v.x; Bs[kq + 1][r] = v.y; Bs[kq + 2][r] = v.z; Bs[kq + 3][r] = v.w;
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j)
                Bs[kq + j][r] = (n < N && k + j < K) ? B[(long long)n * ldb + k + j] : 0.0f;
        }
    }
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
        load_tile_a(A, As, M, K, lda, trans_a, vec_a, m0, k0, tid);
        load_tile_b(B, Bs, N, K, ldb, trans_b, vec_b, n0, k0, tid);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < RB_BK; ++k) {
            float a[8], b[8];
            const float4 a_lo = *reinterpret_cast<const float4*>(&As[k][ty * 4]);
            const float4 a_hi = *reinterpret_cast<const float4*>(&As[k][64 + ty * 4]);
            const float4 b_lo = *reinterpret_cast<const float4*>(&Bs[k][tx * 4]);
            const float4 b_hi = *reinterpret_cast<const float4*>(&Bs[k][64 + tx * 4]);
            a[0] = a_lo.x; a[1] = a_lo.y; a[2] = a_lo.z; a[3] = a_lo.w;
            a[4] = a_hi.x; a[5] = a_hi.y; a[6] = a_hi.z; a[7] = a_hi.w;
            b[0] = b_lo.x; b[1] = b_lo.y; b[2] = b_lo.z; b[3] = b_lo.w;
            b[4] = b_hi.x; b[5] = b_hi.y; b[6] = b_hi.z; b[7] = b_hi.w;
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

/* ------------------------------------------------------------------ tensor cores (WMMA) */
#define WM_BM 64
#define WM_BN 64
#define WM_BK 32
#define WM_LDA (WM_BK + 8)   // padded leading dimensions: multiples of 8 halves / 4 floats, as
#define WM_LDB (WM_BN + 8)   // load_matrix_sync requires, and rows 32-byte aligned
#define WM_LDC (WM_BN + 4)

// block 128 threads (4 warps, 2 x 2); grid (ceil(M / 64), ceil(N / 64)).
extern "C" __global__ void __launch_bounds__(128)
gemm_wmma_f16(const __half* __restrict__ A, const __half* __restrict__ B, float* C, int M, int N, int K,
              int lda, int ldb, int ldc, int trans_a, int trans_b, float alpha, float beta) {
    __shared__ __align__(32) __half As[WM_BM][WM_LDA];   // op(A) tile, row-major [m][k]
    __shared__ __align__(32) __half Bs[WM_BK][WM_LDB];   // op(B) tile, row-major [k][n]
    __shared__ __align__(32) float Cs[WM_BM][WM_LDC];    // the block's results before the epilogue
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

/* ------------------------------------------------------------------ linear-layer helpers */
// y[m, n] += b[n] for y [M, N] row-major; grid-stride, coalesced.
extern "C" __global__ void bias_add_rows_f32(float* __restrict__ y, const float* __restrict__ b, int M, int N) {
    const long long total = (long long)M * N;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x)
        y[i] += b[i % N];
}

// out[n] = sum_m x[m, n].  block (32, 8): 32 columns per block; the 8 rows of threads each sum every
// 8th row (consecutive threads read consecutive columns: coalesced), then combine in shared memory.
extern "C" __global__ void column_sum_f32(const float* __restrict__ x, float* __restrict__ out, int M, int N) {
    __shared__ float partial[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int n = blockIdx.x * 32 + tx;
    float s = 0.0f;
    if (n < N)
        for (int m = ty; m < M; m += 8) s += x[(long long)m * N + n];
    partial[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && n < N) {
        float t = 0.0f;
#pragma unroll
        for (int r = 0; r < 8; ++r) t += partial[r][tx];
        out[n] = t;
    }
}
