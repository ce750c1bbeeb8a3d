/*
 * cross_entropy.cu: the loss of the network and its accuracy, on logits z[N, K] (row-major,
 * K = 1000 classes for ImageNet) and integer labels[N].
 *
 * Forward (one row n; eps = label smoothing):
 *     m   = max_k z[k]                              (subtracted so that exp never overflows)
 *     s   = sum_k exp(z[k] - m)
 *     lse = m + log(s)                              (log-sum-exp)
 *     p[k] = exp(z[k] - lse) = exp(z[k] - m) / s    (softmax, kept for the backward)
 *     log p[k] = z[k] - lse
 *     target = (1 - eps) * onehot(label) + eps / K
 *     loss_n = -sum_k target[k] log p[k] = (1 - eps) * (lse - z[label]) + eps * (lse - mean_k z[k])
 *     loss   = (1/N) sum_n loss_n                   (reduced on the device: no host round trip)
 * Backward:  dz[n, k] = grad_scale * (p[k] - target[k]) / N
 * Top-k:     rank_n = #{k : z[k] > z[label]} + #{k < label : z[k] == z[label]}  (ties go to the
 *            lower class index); the row counts as correct for k when rank_n < k.  A row with a
 *            NaN or inf logit is never correct (rank INT_MAX): NaN compares false with
 *            everything, so without this rule a diverged model, all of whose logits are NaN,
 *            would rank every label first and score 100 %.
 *
 * Versions of the forward (`python -m kernels.cross_entropy` checks and times each; the backward
 * and top-k kernels are the same in both; the launchers are kernels/cross_entropy.py):
 *   version 1  softmax_cross_entropy_forward_naive: one thread per row, three passes over the row
 *              (max, sum, write).  Only N threads: fine for N = 256 on a CPU, a waste of a GPU.
 *   version 2  softmax_cross_entropy_forward: one block per row, and one pass to find both the
 *              maximum and the sum: N * 256 threads, each reading its share of the row once.  Each
 *              thread walks its strided share of the row keeping a running maximum m and a sum s
 *              rescaled whenever the maximum grows ("online softmax": s = s * exp(m_old - m_new)
 *              + exp(z - m_new)).  The blockDim (m, s) pairs are merged with the same rule, first
 *              inside each warp with shuffles, then across warps through shared memory.  A second
 *              sweep over the row (now in L1/L2) writes p.
 * On a GPU, at ResNet-50's [256, 1000] (`python -m kernels.cross_entropy` prints the performance
 * model's prediction): version 1 194 us (256 threads walking 1000 logits three times, a load at a
 * time), version 2 50 us predicted, 49 us measured on an H100 -- of which the kernels are a few:
 * every launch costs ~25 us of host time (our launcher, CuPy, the driver), and version 2's two
 * launches are what a tiny op costs.
 * Rounding: the row is large logits (|z| ~ 1e4 has a float32 ulp of 1e-3) as often as small ones,
 * so every formula first forms exact differences of nearby floats and only then adds small terms:
 *     p[k]   = exp(z[k] - m) / s                      (not exp(z[k] - lse): lse is rounded to ulp(m))
 *     loss_n = (m - z[label]) + log(s)   [+ smoothing: (m - z[0]) - sum_k (z[k] - z[0]) / K + log(s)]
 * (the smoothing term sums z[k] - z[0], differences, instead of z[k] itself, for the same reason).
 * Memory-access plan: consecutive threads read consecutive logits (coalesced), the row is read
 * twice (the second time from cache) and p written once: about 3 * N * K * 4 bytes in all.
 *
 * A label outside [0, K) cannot be read as an index: that row's loss becomes NaN (the launcher
 * refuses such labels up front for NumPy arrays; for CuPy arrays checking would cost a sync).
 */
#include "common.cuh"   // FULL_MASK, WARP_SIZE, block_sum, block_sum_of

/* Spelled out: NVRTC has no <math.h>/<float.h> macros. */
#define QUIET_NAN __int_as_float(0x7fffffff)
/* Start of a running maximum: finite, so that a first element of -inf gives exp(-inf) = 0,
 * not exp(-inf - -inf) = NaN. */
#define LOWEST_FLOAT (-3.402823466e38f)

/* ------------------------------------------------------------ block reductions */
__device__ __forceinline__ void online_merge(float& m, float& s, float m_other, float s_other) {
    if (s_other == 0.0f) return;  // the other side saw no element (m_other is meaningless)
    if (s == 0.0f) {
        m = m_other;
        s = s_other;
        return;
    }
    float m_new = fmaxf(m, m_other);
    s = s * expf(m - m_new) + s_other * expf(m_other - m_new);
    m = m_new;
}

/* warp_sum for the triple (m, s, t): (m, s) merged by online_merge, t added; valid in lane 0. */
__device__ __forceinline__ void warp_merge(float& m, float& s, float& t) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        float m_other = __shfl_down_sync(FULL_MASK, m, offset);
        float s_other = __shfl_down_sync(FULL_MASK, s, offset);
        t += __shfl_down_sync(FULL_MASK, t, offset);
        online_merge(m, s, m_other, s_other);
    }
}

/* block_sum for (m, s, t): merged over the block; every thread gets the results.
 * shared: 3 * 32 floats.  blockDim.x must be a multiple of 32. */
__device__ void block_merge(float& m, float& s, float& t, float* shared) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, nwarps = blockDim.x / WARP_SIZE;
    warp_merge(m, s, t);
    if (lane == 0) {
        shared[warp] = m;
        shared[32 + warp] = s;
        shared[64 + warp] = t;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nwarps ? shared[lane] : LOWEST_FLOAT;
        s = lane < nwarps ? shared[32 + lane] : 0.0f;
        t = lane < nwarps ? shared[64 + lane] : 0.0f;
        warp_merge(m, s, t);
        if (lane == 0) {
            shared[0] = m;
            shared[32] = s;
            shared[64] = t;
        }
    }
    __syncthreads();
    m = shared[0];
    s = shared[32];
    t = shared[64];
    __syncthreads();  // the shared slots are reused by the next row
}

/* loss of one row from its maximum m, log(s), z[label], z[0] and sum_k (z[k] - z[0]) */
__device__ __forceinline__ float row_loss(float m, float log_s, float z_label, float z0, float sum_dz, int K,
                                          float smoothing) {
    float nll = (m - z_label) + log_s;
    if (smoothing == 0.0f) return nll;
    float mean_neg_logp = ((m - z0) - sum_dz / (float)K) + log_s;  // -(1/K) sum_k log p[k]
    return (1.0f - smoothing) * nll + smoothing * mean_neg_logp;
}

/* ------------------------------------------------------------ version 1 */
extern "C" __global__ void softmax_cross_entropy_forward_naive(const float* __restrict__ logits,
                                                               const int* __restrict__ labels,
                                                               float* __restrict__ probs,
                                                               float* __restrict__ losses, int N, int K,
                                                               float smoothing) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* z = logits + (long long)n * K;
    const float z0 = z[0];
    float m = LOWEST_FLOAT, sum_dz = 0.0f;
    for (int k = 0; k < K; ++k) {
        m = fmaxf(m, z[k]);
        sum_dz += z[k] - z0;
    }
    float s = 0.0f;
    for (int k = 0; k < K; ++k) s += expf(z[k] - m);
    const float inv_s = 1.0f / s;
    for (int k = 0; k < K; ++k) probs[(long long)n * K + k] = expf(z[k] - m) * inv_s;
    int label = labels[n];
    losses[n] = (label >= 0 && label < K) ? row_loss(m, logf(s), z[label], z0, sum_dz, K, smoothing) : QUIET_NAN;
}

/* ------------------------------------------------------------ version 2 */
/* grid: any number of blocks (rows are walked with a grid-stride loop); block: a multiple of 32. */
extern "C" __global__ void softmax_cross_entropy_forward(const float* __restrict__ logits,
                                                         const int* __restrict__ labels, float* __restrict__ probs,
                                                         float* __restrict__ losses, int N, int K,
                                                         float smoothing) {
    __shared__ float shared[3 * 32];
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const float* z = logits + (long long)n * K;
        const float z0 = z[0];
        float m = LOWEST_FLOAT, s = 0.0f, sum_dz = 0.0f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            float v = z[k];
            if (v > m) {  // rescale the running sum to the new maximum
                s = s * expf(m - v) + 1.0f;
                m = v;
            } else {
                s += expf(v - m);
            }
            sum_dz += v - z0;
        }
        block_merge(m, s, sum_dz, shared);
        const float inv_s = 1.0f / s;
        float* p = probs + (long long)n * K;
        for (int k = threadIdx.x; k < K; k += blockDim.x) p[k] = expf(z[k] - m) * inv_s;
        if (threadIdx.x == 0) {
            int label = labels[n];
            losses[n] = (label >= 0 && label < K) ? row_loss(m, logf(s), z[label], z0, sum_dz, K, smoothing)
                                                  : QUIET_NAN;
        }
    }
}

/* out[0] = (sum_i x[i]) / n, by one block (deterministic).  blockDim.x: a multiple of 32. */
extern "C" __global__ void mean_of_vector(const float* __restrict__ x, int n, float* __restrict__ out) {
    __shared__ float warp_sums[32];
    const float t = block_sum_of<float>(x, n, warp_sums);
    if (threadIdx.x == 0) out[0] = t / (float)n;
}

/* ------------------------------------------------------------ backward */
/* dz = scale * (p - eps/K - (1 - eps) * [k == label]), scale = grad_scale / N.  One block per row
 * (grid-stride over rows), threads along the row: no division to find (row, column).
 * grad_scale (the gradient arriving at the loss: 1, or the loss scale of mixed precision) is
 * read from device memory when grad_scale_ptr is not null (the loss scaler keeps it there, so the
 * step needs no trip to the host), else taken from the argument. */
extern "C" __global__ void softmax_cross_entropy_backward(const float* __restrict__ probs,
                                                          const int* __restrict__ labels,
                                                          float* __restrict__ dlogits, int N, int K,
                                                          float smoothing, float grad_scale,
                                                          const float* __restrict__ grad_scale_ptr) {
    const float off = smoothing / (float)K, on = 1.0f - smoothing;
    const float scale = (grad_scale_ptr ? grad_scale_ptr[0] : grad_scale) / (float)N;
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const int label = labels[n];
        const long long row = (long long)n * K;
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            float target = off + (k == label ? on : 0.0f);
            dlogits[row + k] = scale * (probs[row + k] - target);
        }
    }
}

/* ------------------------------------------------------------ the running loss of an epoch */
/* totals[0] += loss and totals[1] += 1 when loss is finite, else totals[2] += 1 (one thread).
 * The training loop adds every step's loss here, on the device, and reads the totals back only
 * every few steps: no step waits for the host to see its loss. */
extern "C" __global__ void accumulate_loss(const float* __restrict__ loss, double* __restrict__ totals) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const float v = loss[0];
    if (isfinite(v)) {
        totals[0] += (double)v;
        totals[1] += 1.0;
    } else {
        totals[2] += 1.0;
    }
}

/* ------------------------------------------------------------ top-k accuracy */
#define RANK_NONFINITE 0x7fffffff  /* INT_MAX: the rank of a row with a NaN/inf logit */

/* rank[n] as defined above, one block per row.  A bad label gives rank K (never correct), a row
 * with a non-finite logit rank RANK_NONFINITE (never correct, and counted apart by topk_count).
 * The "any logit of the row non-finite" flag is one __syncthreads_or over the block. */
extern "C" __global__ void topk_rank(const float* __restrict__ logits, const int* __restrict__ labels,
                                     int* __restrict__ rank, int N, int K) {
    __shared__ int warp_counts[32];
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const int label = labels[n];
        const bool valid = label >= 0 && label < K;
        const float* z = logits + (long long)n * K;
        const float zl = valid ? z[label] : 0.0f;
        int count = 0, nonfinite = 0;
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            const float v = z[k];
            nonfinite |= !isfinite(v);
            if (valid) count += (v > zl) || (v == zl && k < label);
        }
        count = block_sum(count, warp_counts);
        nonfinite = __syncthreads_or(nonfinite);
        if (threadIdx.x == 0) rank[n] = nonfinite ? RANK_NONFINITE : (valid ? count : K);
    }
}

/* counts[j] = #{n : rank[n] < ks[j]} for j < nk, and counts[nk] = #{n : rank[n] == RANK_NONFINITE}
 * (the rows with a NaN/inf logit), by one block of blockDim.x (multiple of 32). */
extern "C" __global__ void topk_count(const int* __restrict__ rank, int N, const int* __restrict__ ks, int nk,
                                      long long* __restrict__ counts) {
    __shared__ int warp_counts[32];
    for (int j = 0; j <= nk; ++j) {
        int count = 0;
        if (j < nk) {
            const int k = ks[j];
            for (int n = threadIdx.x; n < N; n += blockDim.x) count += rank[n] < k;
        } else {
            for (int n = threadIdx.x; n < N; n += blockDim.x) count += rank[n] == RANK_NONFINITE;
        }
        count = block_sum(count, warp_counts);
        if (threadIdx.x == 0) counts[j] = count;
    }
}
