/*
 * batchnorm.cu: batch normalisation over an NHWC activation, viewed as a matrix x[M, C]
 * (M = N*H*W rows, C channels; channel c of row m is x[m*C + c]).  Statistics are per channel.
 *
 * Training forward (statistics of this batch):
 *     mean_c   = (1/M) sum_m x[m, c]
 *     var_c    = (1/M) sum_m (x[m, c] - mean_c)^2          (biased: what y uses)
 *     invstd_c = 1 / sqrt(var_c + eps)
 *     y[m, c]  = (x[m, c] - mean_c) * invstd_c * gamma_c + beta_c
 *     running_mean = (1 - momentum) * running_mean + momentum * mean_c
 *     running_var  = (1 - momentum) * running_var  + momentum * var_c * M / (M - 1)   (unbiased)
 *   fused variants:  y = relu(bn(x))   and   y = relu(bn(x) + residual)   (end of a bottleneck)
 * Inference forward: the same y with running_mean / running_var in place of the batch statistics.
 * Backward (xhat = (x - mean) * invstd, dz = dy, or dy * (y > 0) behind a ReLU):
 *     dbeta_c  = sum_m dz[m, c]          dgamma_c = sum_m dz[m, c] * xhat[m, c]
 *     dx[m, c] = gamma_c * invstd_c * (dz - dbeta_c / M - xhat * dgamma_c / M)
 *     dresidual = dz                     (BN + add + ReLU only)
 *
 * Numerics: why not sum(x) and sum(x^2)?  var = E[x^2] - E[x]^2 subtracts two nearly equal
 * numbers when |mean| >> std.  With mean 1000 and std 0.1, E[x^2] = 1e6 has a float32 ulp of
 * 0.06 while the variance is 0.01: the answer is noise (version 1 shows it).  Version 2 uses
 *   1. a shift: every thread works on x - x[0, c] (one sample of the channel), so the numbers it
 *      adds are about as large as the spread of the channel, not its mean; and
 *   2. Welford's update per thread (running count n, mean and M2 = sum of squared deviations;
 *      each new value v: d = v - mean; mean += d / n; M2 += d * (v - mean)), which never
 *      forms E[x^2], and Chan's formula to merge two (n, mean, M2) summaries:
 *          n = na + nb;  d = mean_b - mean_a;  mean = mean_a + d * nb / n;
 *          M2 = M2a + M2b + d^2 * na * nb / n
 *      first across the threads of a block (a tree in shared memory), then across blocks.
 *
 * Memory-access plan of version 2 (below) and of the normalising passes of both versions: one
 * 2-D thread layout over the [M, C] matrix:
 * a block is 32 x 8 threads; threadIdx.x picks one of 32 consecutive channels (one warp reads
 * 32 consecutive floats of a row: coalesced), threadIdx.y one of 8 rows; blockIdx.x picks the
 * 32-channel tile and blockIdx.y a slice of rows, walked with a grid-stride loop.  So a thread
 * keeps ONE channel for its whole life: its per-channel constants sit in registers.
 *   statistics:  partial kernel (one pass over x) -> per-(row slice, channel) summaries
 *                [G, C] -> finalize kernel (one thread per channel merges the G summaries in a
 *                fixed order: deterministic, no atomics) -> mean, invstd, running stats.
 *   forward:     one pass: read x (and residual), write y.
 *   backward:    partial kernel (read dy, x, [y]) -> [G, C] sums -> finalize -> dgamma, dbeta;
 *                then a second elementwise pass (read dy, x, [y]; write dx, [dresidual]).
 * Total traffic of a training step of BN: forward 3 passes over M*C (x twice, y once), backward
 * 5 (dy, x twice each, dx once), plus one more read of y in each pass behind a ReLU.  Version 3's
 * forward: 2 passes (x once, y once) and the partials, 16 bytes per 64 rows and channel.
 *
 * Versions (`python -m kernels.batchnorm` checks and times each; the launchers are kernels/batchnorm.py):
 *   version 1  one thread per channel walks all M rows for every reduction: the statistics as
 *              sum(x) and sum(x^2) with var = E[x^2] - E[x]^2, and the backward's two sums.
 *              Simple and coalesced (consecutive threads read consecutive channels), but only C
 *              threads (64 to 2048 in ResNet-50) for M * C values, and the variance is noise when
 *              |mean| >> std (above): kept as the lesson of why not.
 *   version 2  32 x 8 threads per block over slices of rows, per-thread Welford summaries merged by
 *              Chan's formula: thousands of threads keep the GPU busy, and the variance is stable.
 *              The partial summaries are merged in a fixed order by a second kernel (above).
 *   version 3  the statistics come from the convolution that produced x, so the training forward
 *              reads x once instead of twice.  The convolution's epilogue already holds each
 *              64 x 64 output tile and writes per-(tile, channel) partials (count, shift, offset of
 *              the mean, M2; conv.cu, "Batch-norm statistics"); two tiny kernels merge them (in
 *              double, below) and the normalising pass follows.  The layer code chooses it for a
 *              convolution followed by batch norm in training (nn.layers.conv_bn); a batch norm
 *              with no convolution before it, and the backward, run version 2.
 *   version 4  16-byte vectors in every pass: version 3's statistics, and the normalising passes
 *              and the backward moving 8 halves or 4 floats per load and store, in one thread layout
 *              (a thread keeps its channels and walks rows; the last section of this file).  The
 *              backward's reduction is split over slices of rows, about 2048 blocks of 256 threads
 *              whatever C is, where version 2's gave each block one 32-channel column and 2-byte
 *              loads; its partial sums are added in double, in a fixed order, by a second small
 *              launch (deterministic).  Its add + ReLU form writes dresidual (= dz, which it returns
 *              anyway) during the reduction, and dx then reads dz instead of dy and y: 7 passes over
 *              the activation instead of 8; the ReLU form writes y > 0 there as one bit per value,
 *              and dx reads the bits instead of y: 6 1/8 passes instead of 7 (the plain form 5: the
 *              two reads the reduction needs before any dx can be known, then dx).  The normalising
 *              passes give each
 *              thread about 8 rows and load its per-channel numbers once, as vectors.  The same
 *              numbers as version 3 in the forward; the backward's sums in another order.
 *   version 5  the backward behind a ReLU takes its two sums from the convolution after it.  In a
 *              bottleneck the ReLU's output a is the next convolution's input, so that convolution's
 *              backward-data pass produces da, the ReLU's output gradient, tile by tile: its epilogue
 *              (conv.cu versions 3 to 5) masks it by a > 0, writes g = da * (a > 0) instead of da,
 *              and sums g and g * (x - mean) per (64-row tile, channel) from the tile it holds,
 *              reading x beside a -- extra reads in a pass limited by its multiply-adds.  What is
 *              left here is version 4's finalize over those partials (folded first in groups of 64 on
 *              many blocks when there are more than 512: batchnorm_backward_partials_fold) and its dx
 *              pass from g and x: one read of g and x, one write of dx, 3 passes over the activation
 *              where version 4's ReLU form makes 6 1/8 and its add + ReLU form 7 (then g is also the
 *              residual's gradient) (batchnorm_backward_from_partials; batchnorm_relu_grad_partials
 *              computes the same partials where the convolution has no such epilogue: versions 1
 *              and 2, cuDNN).  The layer code chooses it (nn.layers.BatchNorm2d, F.batch_norm's
 *              grad_partials) for a batch norm + ReLU, and for an add + ReLU whose output feeds the
 *              next block (its second consumer's gradient, the identity shortcut's or the other
 *              convolution's, is added by the epilogue: conv.cu); where the gradient arrives
 *              otherwise (a sum of several consumers') it runs version 4.  The stem's batch norm +
 *              ReLU feeds the max pool, whose backward sums for it the same way (pool.cu,
 *              maxpool2d_backward_blocks_relu_bn).  A plain batch norm whose output is an add + ReLU
 *              batch norm's residual (a projection shortcut: relu(bn3(c3) + bnp(cp))) has that one's
 *              output gradient g: the add + ReLU one, finishing from partials, sums g and
 *              g * (cp - mean_p) in its dx pass, which reads g anyway (the pair form,
 *              batchnorm_backward_dx_rows_pair_*: cp read once more there), and the plain one
 *              finishes from those (batchnorm_backward_from_partials_pair), where version 4 reads g
 *              and cp twice.  The last block's add + ReLU feeds the global average pool, whose backward
 *              sums for it (global_avgpool_backward_relu_bn).  So all 53 of ResNet-50's batch norms
 *              finish from partials in training.
 *              Predicted on an H100 (not measured): 433 us at 256x56x56x256 in float16, 89 % of copy
 *              bandwidth (the kernels alone 104 %), against version 4's 818 / 954 us (ReLU / add +
 *              ReLU form); the pair form 599 us (94 %; 678 us of version 4's plain backward saved
 *              for 125 us of reading cp); a float16 step's batch-norm backward 12.0 -> 6.0 ms, its
 *              convolutions' backward data +1.3 ms (bench/NOTES.md, "Every byte once").
 * Versions 1 to 3 share the normalising passes (*_apply_*, *_inference_*, *_backward_dx_*).
 *
 * On a GPU, at ResNet-50's shape (256x56x56x256; `python -m kernels.batchnorm` prints the performance
 * model's prediction, kernels/emu/perfmodel.py; measured on an H100 by bench.kernels for version
 * 2, bench/NOTES.md):
 *   version 1: 121 ms predicted for the training forward: one thread per channel, 256 threads on
 *   a GPU that holds 270,000, each walking 802,816 rows with one load in flight: it waits for
 *   DRAM 200,000 times.  Its launch shows it: grid (2) block (128).
 *   version 2: 1.59 ms predicted, 1.51 ms measured (training forward; backward 1.37 ms predicted,
 *   1.48 ms measured, 56 % of copy bandwidth).  The statistics pass is the slow part (~60 %):
 *   Welford's update divides by the count, and an IEEE division compiles to a branch to its slow
 *   path, so the next row's load cannot be issued before it: one DRAM latency per row and thread.
 *   At 14x14x256 the model is 0.72x the measured forward (143 us against 199): its latency
 *   chains (a DRAM latency per row behind the division; the finalize kernel's 128 dependent
 *   merges per channel) cost the GPU more per link than the model's one latency.
 *   version 3: 0.65 ms predicted for the training forward from the convolution's partials (not
 *   yet measured): the statistics pass is gone, what is left is the normalising pass, latency-
 *   and DRAM-bound.  In float16 (a mixed-precision step's) 2.07 ms predicted, 14 % of copy
 *   bandwidth, and the backward (version 2's kernels) 3.08 ms, 13 %: limited by the L2, as the
 *   model counts it, which is every sector a request moves; the *_f16x8 passes give a thread one
 *   or two vectors after 24 scalar loads of per-channel numbers whose lanes are 32 bytes apart
 *   (32 sectors a load), and the backward's sums read 2-byte values.  On a GPU the L1 would serve
 *   many of those constants (each SM reads the same few KB): the L1 side alone predicts 0.54 ms for
 *   the forward's pass; the true time is between.
 *   version 4 (predicted, not measured): float32 forward 0.63 ms (91 %, DRAM), backward 1.32 /
 *   1.60 / 1.87 ms (plain / ReLU / add + ReLU); float16 forward 351 us (83 % of copy bandwidth; its
 *   three launches' host time, 75 us in the model, included: the kernels alone 99 %), add + ReLU
 *   474 us (91 %), backward 678 / 818 / 954 us (61 / 67 / 72 %: at their bounds, 3/5, 4/6.125 and
 *   5/7 of the passes read and written, as the reductions need their two reads before any dx is
 *   known).  python -m bench.kernel_cases.step_fp16 adds them up over a whole step (bench/NOTES.md):
 *   batch norm from 80 to 17 ms per float16 step of batch 256.
 *
 * float (f32) and __half (f16) activations, from one template per kernel and the KERNEL_ENTRY
 * instantiation lists (common.cuh); statistics, gamma, beta and running statistics are always
 * float.  blockDim must be (32, 8) for the kernels that use BN_TILE_C and BN_ROWS.  For float16
 * with C % 8 == 0 the normalizing passes of versions 1-3 have a second form (*_f16x8): 8 channels
 * per thread moved as 16-byte vectors.  Version 4's kernels (*_rows_*, the backward's *_reduce_*)
 * are the last section.
 */
#include <cuda_fp16.h>
#include "common.cuh"   // GRID_STRIDE_LOOP_Y, to_float, from_float, column_sum, KERNEL_ENTRY

#define BN_TILE_C 32  // channels per block = blockDim.x
#define BN_ROWS 8     // rows per block step = blockDim.y

/* Running statistics after a batch with mean mu and unbiased variance var_unbiased. */
__device__ __forceinline__ void update_running(float* running_mean, float* running_var, int c, float mu,
                                               float var_unbiased, float momentum) {
    running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mu;
    running_var[c] = (1.0f - momentum) * running_var[c] + momentum * var_unbiased;
}

/* ============================================================== version 1: one thread per channel */
/* Statistics: sum and sum of squares in float, var = E[x^2] - E[x]^2.  Writes what version 2's
 * finalize writes: saved_mean, saved_invstd, batch_var (may be null), running statistics (updated
 * in place unless running_mean is null).  grid = ceil(C / blockDim.x). */
template <typename T>
__device__ void stats_naive(const T* __restrict__ x, long long M, int C, float eps, float momentum,
                            float* __restrict__ saved_mean, float* __restrict__ saved_invstd,
                            float* __restrict__ batch_var, float* __restrict__ running_mean,
                            float* __restrict__ running_var) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f, s2 = 0.0f;
    for (long long m = 0; m < M; ++m) {
        const float v = to_float(x[m * C + c]);
        s += v;
        s2 += v * v;
    }
    const float mu = s / (float)M;
    const float var = s2 / (float)M - mu * mu;  // the cancellation the header warns about
    saved_mean[c] = mu;
    saved_invstd[c] = 1.0f / sqrtf(var + eps);
    if (batch_var) batch_var[c] = var;
    if (running_mean) update_running(running_mean, running_var, c, mu, var * ((float)M / (float)(M - 1)), momentum);
}

KERNEL_ENTRY(batchnorm_stats_naive_f32, stats_naive<float>)
KERNEL_ENTRY(batchnorm_stats_naive_f16, stats_naive<__half>)

/* dz: the gradient reaching the BN output; behind a ReLU it is dy where y > 0. */
template <typename T, bool RELU>
__device__ __forceinline__ float grad_in(const T* __restrict__ dy, const T* __restrict__ y, long long i) {
    float g = to_float(dy[i]);
    if (RELU) g = to_float(y[i]) > 0.0f ? g : 0.0f;
    return g;
}

/* Backward sums: dbeta = sum dz, dgamma = invstd * sum dz * (x - mean), one thread per channel. */
template <typename T, bool RELU>
__device__ void backward_sums_naive(const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
                                    const float* __restrict__ saved_mean, const float* __restrict__ saved_invstd,
                                    float* __restrict__ dgamma, float* __restrict__ dbeta, long long M, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const float mean = saved_mean[c];
    float sum_dz = 0.0f, sum_dz_xc = 0.0f;
    for (long long m = 0; m < M; ++m) {
        const float g = grad_in<T, RELU>(dy, y, m * C + c);
        sum_dz += g;
        sum_dz_xc += g * (to_float(x[m * C + c]) - mean);
    }
    dbeta[c] = sum_dz;
    dgamma[c] = sum_dz_xc * saved_invstd[c];
}

KERNEL_ENTRY(batchnorm_backward_sums_naive_f32, backward_sums_naive<float, false>)
KERNEL_ENTRY(batchnorm_backward_sums_naive_f16, backward_sums_naive<__half, false>)
KERNEL_ENTRY(batchnorm_relu_backward_sums_naive_f32, backward_sums_naive<float, true>)
KERNEL_ENTRY(batchnorm_relu_backward_sums_naive_f16, backward_sums_naive<__half, true>)

/* ============================================================== version 2: Welford + Chan */
/* Merge summary b into summary a (Chan et al.).  Empty summaries (n == 0) are allowed. */
__device__ __forceinline__ void welford_merge(float& n, float& mean, float& m2, float nb, float mean_b, float m2b) {
    if (nb == 0.0f) return;
    float n_total = n + nb;
    float delta = mean_b - mean;
    float frac_b = nb / n_total;
    mean += delta * frac_b;
    m2 += m2b + delta * delta * n * frac_b;
    n = n_total;
}

/* The summary (count n, mean, M2) of (x - shift) over this block's rows of channel c, shift =
 * x[0, c], left in the thread with threadIdx.y == 0 (every thread of the block must call it: it
 * has barriers).  Returns the shift.  grid = (ceil(C / 32), G), block = (32, 8). */
template <typename T>
__device__ __forceinline__ float slice_summary(const T* __restrict__ x, long long M, int C, float& n, float& mean,
                                               float& m2) {
    __shared__ float sh_n[BN_ROWS][BN_TILE_C], sh_mean[BN_ROWS][BN_TILE_C], sh_m2[BN_ROWS][BN_TILE_C];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int c = blockIdx.x * BN_TILE_C + tx;
    float shift = 0.0f;
    n = 0.0f, mean = 0.0f, m2 = 0.0f;
    if (c < C) {  // no early return: every thread must reach the barriers below
        shift = to_float(x[c]);
        GRID_STRIDE_LOOP_Y(r, M) {
            float v = to_float(x[r * C + c]) - shift;
            n += 1.0f;
            float d = v - mean;
            mean += d / n;
            m2 += d * (v - mean);
        }
    }
    sh_n[ty][tx] = n;
    sh_mean[ty][tx] = mean;
    sh_m2[ty][tx] = m2;
    __syncthreads();
    // tree over the 8 rows of threads: 8 -> 4 -> 2 -> 1 summaries per channel
    for (int half = BN_ROWS / 2; half > 0; half /= 2) {
        if (ty < half) {
            welford_merge(n, mean, m2, sh_n[ty + half][tx], sh_mean[ty + half][tx], sh_m2[ty + half][tx]);
            sh_n[ty][tx] = n;
            sh_mean[ty][tx] = mean;
            sh_m2[ty][tx] = m2;
        }
        __syncthreads();
    }
    return shift;
}

/* Pass 1: summary (count, mean, M2) of (x - x[0, c]) over this block's rows, per channel.
 * Writes part_*[blockIdx.y * C + c].  grid = (ceil(C / 32), G), block = (32, 8). */
template <typename T>
__device__ void stats_partial(const T* __restrict__ x, float* __restrict__ part_n, float* __restrict__ part_mean,
                              float* __restrict__ part_m2, long long M, int C) {
    const int c = blockIdx.x * BN_TILE_C + threadIdx.x;
    float n, mean, m2;
    slice_summary(x, M, C, n, mean, m2);
    if (threadIdx.y == 0 && c < C) {
        part_n[(long long)blockIdx.y * C + c] = n;
        part_mean[(long long)blockIdx.y * C + c] = mean;
        part_m2[(long long)blockIdx.y * C + c] = m2;
    }
}

KERNEL_ENTRY(batchnorm_stats_partial_f32, stats_partial<float>)
KERNEL_ENTRY(batchnorm_stats_partial_f16, stats_partial<__half>)

/* Pass 2: one thread per channel merges the G summaries in order of blockIdx.y and writes
 * saved_mean, saved_invstd, the optional biased batch_var (may be null), and updates the running
 * statistics in place (skipped when running_mean is null: used by the statistics-only launch). */
template <typename T>
__device__ void stats_finalize(const T* __restrict__ x, const float* __restrict__ part_n,
                               const float* __restrict__ part_mean, const float* __restrict__ part_m2, int G,
                               long long M, int C, float eps, float momentum, float* __restrict__ saved_mean,
                               float* __restrict__ saved_invstd, float* __restrict__ batch_var,
                               float* __restrict__ running_mean, float* __restrict__ running_var) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (int g = 0; g < G; ++g) {
        long long i = (long long)g * C + c;
        welford_merge(n, mean, m2, part_n[i], part_mean[i], part_m2[i]);
    }
    float mu = to_float(x[c]) + mean;  // undo the shift
    float var = m2 / (float)M;
    saved_mean[c] = mu;
    saved_invstd[c] = 1.0f / sqrtf(var + eps);
    if (batch_var) batch_var[c] = var;
    if (running_mean) update_running(running_mean, running_var, c, mu, m2 / (float)(M - 1), momentum);
}

KERNEL_ENTRY(batchnorm_stats_finalize_f32, stats_finalize<float>)
KERNEL_ENTRY(batchnorm_stats_finalize_f16, stats_finalize<__half>)

/* ============================================================== version 3: statistics from the convolution */
/* Partials are float32 [4, P, C]: for each block p of rows and channel c, the count n_p, a shift
 * a_p, the offset d_p of the block's mean from it (mean_p = a_p + d_p) and M2_p, the sum of squared
 * deviations from mean_p.  conv.cu's *_stats kernels write them in their epilogue (a block is a
 * 64-row output tile, a_p its first row); chan_partials below writes them from x itself where no
 * convolution did (its blocks are version 2's row slices, a_p = x[0, c]).  Any split of the rows
 * into blocks, in any order, gives the same statistics. */
template <typename T>
__device__ void chan_partials(const T* __restrict__ x, float* __restrict__ stats, long long M, int C) {
    const int c = blockIdx.x * BN_TILE_C + threadIdx.x;
    float n, mean, m2;
    const float shift = slice_summary(x, M, C, n, mean, m2);
    if (threadIdx.y == 0 && c < C) {
        const long long slice = (long long)gridDim.y * C, i = (long long)blockIdx.y * C + c;
        stats[i] = n;
        stats[slice + i] = shift;
        stats[2 * slice + i] = mean;   // the mean of x - shift
        stats[3 * slice + i] = m2;
    }
}

KERNEL_ENTRY(batchnorm_chan_partials_f32, chan_partials<float>)
KERNEL_ENTRY(batchnorm_chan_partials_f16, chan_partials<__half>)

/* Step 1: the P partials of each channel merged over slices of them, in double: with the mean of
 * block 0 as the channel's common shift g = a_0 + d_0 and e_p = (a_p - a_0) + (d_p - d_0) = mean_p - g,
 *     N = sum n_p,   S = sum n_p e_p,   Q = sum (M2_p + n_p e_p^2)
 * (Chan's formula for many parts at once: sum (x - g)^2 = Q, so M2 = Q - S^2 / N).  Writes
 * sums[k][blockIdx.y][c] for k = N, S, Q.  grid = (ceil(C / 32), G), block = (32, 8): 32 channels
 * side by side (a warp reads 32 consecutive floats of a row of partials), 8 x G slices of blocks. */
extern "C" __global__ void batchnorm_partials_reduce(const float* __restrict__ stats, int P, int C,
                                                     double* __restrict__ sums) {
    __shared__ double sh[3][BN_ROWS][BN_TILE_C];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int c = blockIdx.x * BN_TILE_C + tx;
    const long long slice = (long long)P * C;
    double n = 0.0, s = 0.0, q = 0.0;
    if (c < C) {  // no early return: every thread reaches the barrier
        const double a0 = stats[slice + c], d0 = stats[2 * slice + c];
        GRID_STRIDE_LOOP_Y(p, P) {
            const long long i = p * C + c;
            const double np = stats[i], e = ((double)stats[slice + i] - a0) + ((double)stats[2 * slice + i] - d0);
            n += np;
            s += np * e;
            q += (double)stats[3 * slice + i] + np * e * e;
        }
    }
    sh[0][ty][tx] = n;
    sh[1][ty][tx] = s;
    sh[2][ty][tx] = q;
    __syncthreads();
    if (ty < 3 && c < C) {   // three threads per channel: one per sum, its 8 rows in order
        double v = 0.0;
        for (int r = 0; r < BN_ROWS; ++r) v += sh[ty][r][tx];
        sums[((long long)ty * gridDim.y + blockIdx.y) * C + c] = v;
    }
}

/* Step 2: one thread per channel adds the G slices' sums in order and writes what version 2's
 * finalize writes: saved_mean = g + S / N, saved_invstd = 1 / sqrt(var + eps) with the biased
 * var = M2 / N, and the running statistics (unbiased M2 / (N - 1)), in place.  grid = ceil(C / 128). */
extern "C" __global__ void batchnorm_partials_finalize(const float* __restrict__ stats, const double* __restrict__ sums,
                                                       int G, int P, int C, float eps, float momentum,
                                                       float* __restrict__ saved_mean, float* __restrict__ saved_invstd,
                                                       float* __restrict__ running_mean,
                                                       float* __restrict__ running_var) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double n = 0.0, s = 0.0, q = 0.0;
    for (int g = 0; g < G; ++g) {
        n += sums[(long long)g * C + c];
        s += sums[((long long)G + g) * C + c];
        q += sums[((long long)2 * G + g) * C + c];
    }
    const long long slice = (long long)P * C;
    const double shift = (double)stats[slice + c] + (double)stats[2 * slice + c];   // the mean of block 0
    const double d = s / n, m2 = fmax(q - s * d, 0.0);   // the rounding of a constant channel may leave -0
    const float mu = (float)(shift + d), var = (float)(m2 / n);
    saved_mean[c] = mu;
    saved_invstd[c] = 1.0f / sqrtf(var + eps);
    if (running_mean) update_running(running_mean, running_var, c, mu, (float)(m2 / (n - 1.0)), momentum);
}

/* Backward pass 1: per (row slice, channel) sums of dz and dz * (x - mean), added over the block's
 * 8 rows of threads by column_sum.  (invstd multiplies the second sum once, in the finalize,
 * instead of once per element.)  grid = (ceil(C / 32), G), block = (32, 8). */
template <typename T, bool RELU>
__device__ void backward_partial(const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
                                 const float* __restrict__ saved_mean, float* __restrict__ part_dbeta,
                                 float* __restrict__ part_dxc, long long M, int C) {
    __shared__ float tile[BN_ROWS][BN_TILE_C];
    const int c = blockIdx.x * BN_TILE_C + threadIdx.x;
    float sum_dz = 0.0f, sum_dz_xc = 0.0f;
    if (c < C) {
        const float mean = saved_mean[c];
        GRID_STRIDE_LOOP_Y(r, M) {
            long long i = r * C + c;
            float g = grad_in<T, RELU>(dy, y, i);
            sum_dz += g;
            sum_dz_xc += g * (to_float(x[i]) - mean);
        }
    }
    sum_dz = column_sum(sum_dz, tile);
    sum_dz_xc = column_sum(sum_dz_xc, tile);
    if (threadIdx.y == 0 && c < C) {
        part_dbeta[(long long)blockIdx.y * C + c] = sum_dz;
        part_dxc[(long long)blockIdx.y * C + c] = sum_dz_xc;
    }
}

KERNEL_ENTRY(batchnorm_backward_partial_f32, backward_partial<float, false>)
KERNEL_ENTRY(batchnorm_backward_partial_f16, backward_partial<__half, false>)
KERNEL_ENTRY(batchnorm_relu_backward_partial_f32, backward_partial<float, true>)
KERNEL_ENTRY(batchnorm_relu_backward_partial_f16, backward_partial<__half, true>)

/* Backward pass 2: one thread per channel adds the G partial sums in order: dbeta, dgamma. */
extern "C" __global__ void batchnorm_backward_finalize(const float* __restrict__ part_dbeta,
                                                       const float* __restrict__ part_dxc, int G, int C,
                                                       const float* __restrict__ saved_invstd,
                                                       float* __restrict__ dgamma, float* __restrict__ dbeta) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float a = 0.0f, b = 0.0f;
    for (int g = 0; g < G; ++g) {
        a += part_dbeta[(long long)g * C + c];
        b += part_dxc[(long long)g * C + c];
    }
    dbeta[c] = a;
    dgamma[c] = b * saved_invstd[c];
}

/* ============================================================== both versions: the elementwise passes */
/* y = (x - mean) * scale + beta [+ residual] [then ReLU], with scale = gamma * invstd.
 * (x - mean) first: x * scale + (beta - mean * scale) would cancel catastrophically when
 * |mean| >> std, exactly as the naive variance does.  grid = (ceil(C / 32), G'), block (32, 8). */
template <typename T, bool RELU, bool ADD>
__device__ void normalize_rows(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ y,
                               long long M, int C, float mean, float scale, float shift) {
    const int c = blockIdx.x * BN_TILE_C + threadIdx.x;
    GRID_STRIDE_LOOP_Y(r, M) {
        long long i = r * C + c;
        float v = (to_float(x[i]) - mean) * scale + shift;
        if (ADD) v += to_float(residual[i]);
        if (RELU) v = v > 0.0f ? v : 0.0f;
        y[i] = from_float<T>(v);
    }
}

/* Training forward, with the batch statistics: residual is read only by the fused BN + add + ReLU
 * (null otherwise). */
template <typename T, bool RELU, bool ADD>
__device__ void forward_train_apply(const T* x, const T* residual, T* y, const float* __restrict__ gamma,
                                    const float* __restrict__ beta, const float* __restrict__ saved_mean,
                                    const float* __restrict__ saved_invstd, long long M, int C) {
    const int c = blockIdx.x * BN_TILE_C + threadIdx.x;
    if (c >= C) return;  // no barriers in this kernel
    normalize_rows<T, RELU, ADD>(x, residual, y, M, C, saved_mean[c], gamma[c] * saved_invstd[c], beta[c]);
}

KERNEL_ENTRY(batchnorm_apply_f32, forward_train_apply<float, false, false>)
KERNEL_ENTRY(batchnorm_apply_f16, forward_train_apply<__half, false, false>)
KERNEL_ENTRY(batchnorm_relu_apply_f32, forward_train_apply<float, true, false>)
KERNEL_ENTRY(batchnorm_relu_apply_f16, forward_train_apply<__half, true, false>)
KERNEL_ENTRY(batchnorm_add_relu_apply_f32, forward_train_apply<float, true, true>)
KERNEL_ENTRY(batchnorm_add_relu_apply_f16, forward_train_apply<__half, true, true>)

/* Inference: the per-channel constants come from the running statistics (one pass, no reduction). */
template <typename T>
__device__ void forward_inference(const T* x, T* y, const float* __restrict__ gamma, const float* __restrict__ beta,
                                  const float* __restrict__ running_mean, const float* __restrict__ running_var,
                                  float eps, long long M, int C) {
    const int c = blockIdx.x * BN_TILE_C + threadIdx.x;
    if (c >= C) return;
    float scale = gamma[c] / sqrtf(running_var[c] + eps);
    normalize_rows<T, false, false>(x, nullptr, y, M, C, running_mean[c], scale, beta[c]);
}

KERNEL_ENTRY(batchnorm_inference_f32, forward_inference<float>)
KERNEL_ENTRY(batchnorm_inference_f16, forward_inference<__half>)

/* Backward, last pass: dx = gamma * invstd * (dz - dbeta / M - xhat * dgamma / M)  [and dresidual = dz]. */
template <typename T, bool RELU, bool ADD>
__device__ void backward_dx(const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
                            const float* __restrict__ gamma, const float* __restrict__ saved_mean,
                            const float* __restrict__ saved_invstd, const float* __restrict__ dgamma,
                            const float* __restrict__ dbeta, T* __restrict__ dx, T* __restrict__ dresidual,
                            long long M, int C) {
    const int c = blockIdx.x * BN_TILE_C + threadIdx.x;
    if (c >= C) return;
    const float mean = saved_mean[c], invstd = saved_invstd[c];
    const float k = gamma[c] * invstd;
    const float dbeta_mean = dbeta[c] / (float)M;
    const float dgamma_mean_invstd = dgamma[c] / (float)M * invstd;  // multiplies (x - mean)
    GRID_STRIDE_LOOP_Y(r, M) {
        long long i = r * C + c;
        float g = grad_in<T, RELU>(dy, y, i);
        if (ADD) dresidual[i] = from_float<T>(g);
        dx[i] = from_float<T>(k * (g - dbeta_mean - (to_float(x[i]) - mean) * dgamma_mean_invstd));
    }
}

KERNEL_ENTRY(batchnorm_backward_dx_f32, backward_dx<float, false, false>)
KERNEL_ENTRY(batchnorm_backward_dx_f16, backward_dx<__half, false, false>)
KERNEL_ENTRY(batchnorm_relu_backward_dx_f32, backward_dx<float, true, false>)
KERNEL_ENTRY(batchnorm_relu_backward_dx_f16, backward_dx<__half, true, false>)
KERNEL_ENTRY(batchnorm_add_relu_backward_dx_f32, backward_dx<float, true, true>)
KERNEL_ENTRY(batchnorm_add_relu_backward_dx_f16, backward_dx<__half, true, true>)

/* ============================================ float16, 8 channels per thread: 16-byte vectors */
/* The normalizing passes for float16 activations whose C is a multiple of 8 and whose arrays
 * start on 16-byte boundaries (every layer of ResNet-50 after the stem): a thread moves 8
 * consecutive channels of a row as one 16-byte vector, one load instruction instead of 8, and a
 * warp's 32 vectors are 512 contiguous bytes.  A 1-D grid of 256-thread blocks walks the vectors
 * v = (row, group of 8 channels), v = row * C/8 + group, in a grid-stride loop; when C/8 divides
 * 256 (the launcher checks) the stride is a multiple of C/8, so each thread always meets the same
 * 8 channels and loads their constants once, as the 32 x 8 kernels above keep one channel.
 * The statistics and backward sums stay in the 32 x 8 kernels above. */
template <bool RELU, bool ADD>
__device__ __forceinline__ void normalize_rows_x8(const __half* __restrict__ x, const __half* __restrict__ residual,
                                                  __half* __restrict__ y, long long vectors, long long first,
                                                  const float* mean, const float* scale, const float* shift) {
    for (long long v = first; v < vectors; v += (long long)blockDim.x * gridDim.x) {
        float f[8], r[8];
        load_half8(x + v * 8, f);
        if (ADD) load_half8(residual + v * 8, r);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            float o = (f[j] - mean[j]) * scale[j] + shift[j];
            if (ADD) o += r[j];
            if (RELU) o = o > 0.0f ? o : 0.0f;
            f[j] = o;
        }
        store_half8(y + v * 8, f);
    }
}

template <bool RELU, bool ADD>
__device__ void forward_train_apply_x8(const __half* x, const __half* residual, __half* y,
                                       const float* __restrict__ gamma, const float* __restrict__ beta,
                                       const float* __restrict__ saved_mean, const float* __restrict__ saved_invstd,
                                       long long M, int C) {
    const int groups = C / 8;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int c0 = (int)(first % groups) * 8;   // this thread's channels c0 .. c0 + 7, at every v it visits
    float mean[8], scale[8], shift[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        mean[j] = saved_mean[c0 + j];
        scale[j] = gamma[c0 + j] * saved_invstd[c0 + j];
        shift[j] = beta[c0 + j];
    }
    normalize_rows_x8<RELU, ADD>(x, residual, y, M * groups, first, mean, scale, shift);
}

KERNEL_ENTRY(batchnorm_apply_f16x8, forward_train_apply_x8<false, false>)
KERNEL_ENTRY(batchnorm_relu_apply_f16x8, forward_train_apply_x8<true, false>)
KERNEL_ENTRY(batchnorm_add_relu_apply_f16x8, forward_train_apply_x8<true, true>)

extern "C" __global__ void batchnorm_inference_f16x8(const __half* x, __half* y, const float* __restrict__ gamma,
                                                     const float* __restrict__ beta,
                                                     const float* __restrict__ running_mean,
                                                     const float* __restrict__ running_var, float eps, long long M,
                                                     int C) {
    const int groups = C / 8;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int c0 = (int)(first % groups) * 8;
    float mean[8], scale[8], shift[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        mean[j] = running_mean[c0 + j];
        scale[j] = gamma[c0 + j] / sqrtf(running_var[c0 + j] + eps);
        shift[j] = beta[c0 + j];
    }
    normalize_rows_x8<false, false>(x, nullptr, y, M * groups, first, mean, scale, shift);
}

template <bool RELU, bool ADD>
__device__ void backward_dx_x8(const __half* __restrict__ dy, const __half* __restrict__ y,
                               const __half* __restrict__ x, const float* __restrict__ gamma,
                               const float* __restrict__ saved_mean, const float* __restrict__ saved_invstd,
                               const float* __restrict__ dgamma, const float* __restrict__ dbeta,
                               __half* __restrict__ dx, __half* __restrict__ dresidual, long long M, int C) {
    const int groups = C / 8;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int c0 = (int)(first % groups) * 8;
    float mean[8], k[8], dbeta_mean[8], dgamma_mean_invstd[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const float invstd = saved_invstd[c0 + j];
        mean[j] = saved_mean[c0 + j];
        k[j] = gamma[c0 + j] * invstd;
        dbeta_mean[j] = dbeta[c0 + j] / (float)M;
        dgamma_mean_invstd[j] = dgamma[c0 + j] / (float)M * invstd;
    }
    for (long long v = first; v < M * groups; v += (long long)blockDim.x * gridDim.x) {
        float g[8], xv[8], yv[8];
        load_half8(dy + v * 8, g);
        load_half8(x + v * 8, xv);
        if (RELU) {
            load_half8(y + v * 8, yv);
#pragma unroll
            for (int j = 0; j < 8; ++j) g[j] = yv[j] > 0.0f ? g[j] : 0.0f;
        }
        if (ADD) store_half8(dresidual + v * 8, g);
#pragma unroll
        for (int j = 0; j < 8; ++j) xv[j] = k[j] * (g[j] - dbeta_mean[j] - (xv[j] - mean[j]) * dgamma_mean_invstd[j]);
        store_half8(dx + v * 8, xv);
    }
}

KERNEL_ENTRY(batchnorm_backward_dx_f16x8, backward_dx_x8<false, false>)
KERNEL_ENTRY(batchnorm_relu_backward_dx_f16x8, backward_dx_x8<true, false>)
KERNEL_ENTRY(batchnorm_add_relu_backward_dx_f16x8, backward_dx_x8<true, true>)

/* ============================================================== version 4: every pass at the bandwidth */
/* The normalising passes and the backward in 16-byte vectors, in one thread layout:
 *   forward    batchnorm_*apply_rows_* (training: version 3's statistics) and batchnorm_inference_rows_*:
 *              y from x (and the residual), one read and one write.
 *   backward   1. batchnorm_*backward_reduce_*: per (slice of rows, channel) partial sums of dz and
 *                 dz * (x - mean), one read of dy and x (and y behind a ReLU).  The add + ReLU form writes
 *                 dresidual = dz here, which it returns anyway, so that the last pass reads dz (one
 *                 array) instead of dy and y (two); the ReLU form writes the mask y > 0 as bits, so that
 *                 the last pass reads one byte instead of the 16 bytes of y.
 *              2. batchnorm_backward_reduce_finalize: the G partials of each channel added in order, in
 *                 double, by a block of 32 x 32 threads per 32 channels: dbeta, dgamma, and the per-channel
 *                 constants of pass 3.
 *              3. batchnorm_*backward_dx_rows_*: dx from dz (or dy and y) and x.
 * Thread layout: blockDim (GX, TY), GX * TY <= 256.  Thread (tx, ty) owns channel group
 * g = blockIdx.x * GX + tx, channels g*V .. g*V + V-1, for its whole life (its per-channel numbers stay in
 * registers), and walks rows ty + TY * blockIdx.y, then + TY * gridDim.y, ...  V = VEC16(T) (4 floats, 8
 * halves: one 16-byte vector) where C % V == 0 and the arrays are 16-byte aligned, else V = 1.  A warp
 * covers 32 consecutive groups: with GX >= 32, 32 vectors of one row (512 contiguous bytes); with
 * GX = C / V < 32, whole rows one after the other, contiguous too.  gridDim.y slices of rows make enough
 * blocks to fill every SM whatever C is (the version 2 reductions had one 32-channel tile per block
 * column and 2-byte loads), and the elementwise passes give each thread about 8 rows, so that its
 * per-channel numbers, loaded once as float4 vectors too, cost little beside the rows it streams (the
 * *_f16x8 passes of versions 1-3 give a thread one or two vectors, after 24 scalar loads of constants
 * whose lanes sit 32 bytes apart: 32 sectors per load). */
#define BN_VEC_THREADS 256

/* Forward, training: y = (x - mean) * (gamma * invstd) + beta [+ residual] [then ReLU], as
 * normalize_rows computes it. */
template <typename T, int V, bool RELU, bool ADD>
__device__ void apply_rows(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ y,
                           const float* __restrict__ gamma, const float* __restrict__ beta,
                           const float* __restrict__ saved_mean, const float* __restrict__ saved_invstd, long long M,
                           int C) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g * V >= C) return;   // no barriers in this kernel
    float mean[V], scale[V], shift[V], invstd[V];
    Lanes<V>::load_floats(saved_mean + g * V, mean);
    Lanes<V>::load_floats(gamma + g * V, scale);
    Lanes<V>::load_floats(saved_invstd + g * V, invstd);
    Lanes<V>::load_floats(beta + g * V, shift);
#pragma unroll
    for (int j = 0; j < V; ++j) scale[j] *= invstd[j];
    GRID_STRIDE_LOOP_Y(r, M) {
        const long long i = r * C + (long long)g * V;
        float f[V], res[V];
        Lanes<V>::load(x + i, f);
        if (ADD) Lanes<V>::load(residual + i, res);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            float o = (f[j] - mean[j]) * scale[j] + shift[j];
            if (ADD) o += res[j];
            if (RELU) o = o > 0.0f ? o : 0.0f;
            f[j] = o;
        }
        Lanes<V>::store(y + i, f);
    }
}

KERNEL_ENTRY(batchnorm_apply_rows_f32x1, apply_rows<float, 1, false, false>)
KERNEL_ENTRY(batchnorm_apply_rows_f16x1, apply_rows<__half, 1, false, false>)
KERNEL_ENTRY(batchnorm_apply_rows_f32x4, apply_rows<float, 4, false, false>)
KERNEL_ENTRY(batchnorm_apply_rows_f16x8, apply_rows<__half, 8, false, false>)
KERNEL_ENTRY(batchnorm_relu_apply_rows_f32x1, apply_rows<float, 1, true, false>)
KERNEL_ENTRY(batchnorm_relu_apply_rows_f16x1, apply_rows<__half, 1, true, false>)
KERNEL_ENTRY(batchnorm_relu_apply_rows_f32x4, apply_rows<float, 4, true, false>)
KERNEL_ENTRY(batchnorm_relu_apply_rows_f16x8, apply_rows<__half, 8, true, false>)
KERNEL_ENTRY(batchnorm_add_relu_apply_rows_f32x1, apply_rows<float, 1, true, true>)
KERNEL_ENTRY(batchnorm_add_relu_apply_rows_f16x1, apply_rows<__half, 1, true, true>)
KERNEL_ENTRY(batchnorm_add_relu_apply_rows_f32x4, apply_rows<float, 4, true, true>)
KERNEL_ENTRY(batchnorm_add_relu_apply_rows_f16x8, apply_rows<__half, 8, true, true>)

/* Inference: the constants from the running statistics. */
template <typename T, int V>
__device__ void inference_rows(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ gamma,
                               const float* __restrict__ beta, const float* __restrict__ running_mean,
                               const float* __restrict__ running_var, float eps, long long M, int C) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g * V >= C) return;
    float mean[V], scale[V], shift[V], var[V];
    Lanes<V>::load_floats(running_mean + g * V, mean);
    Lanes<V>::load_floats(gamma + g * V, scale);
    Lanes<V>::load_floats(running_var + g * V, var);
    Lanes<V>::load_floats(beta + g * V, shift);
#pragma unroll
    for (int j = 0; j < V; ++j) scale[j] = scale[j] / sqrtf(var[j] + eps);
    GRID_STRIDE_LOOP_Y(r, M) {
        const long long i = r * C + (long long)g * V;
        float f[V];
        Lanes<V>::load(x + i, f);
#pragma unroll
        for (int j = 0; j < V; ++j) f[j] = (f[j] - mean[j]) * scale[j] + shift[j];
        Lanes<V>::store(y + i, f);
    }
}

KERNEL_ENTRY(batchnorm_inference_rows_f32x1, inference_rows<float, 1>)
KERNEL_ENTRY(batchnorm_inference_rows_f16x1, inference_rows<__half, 1>)
KERNEL_ENTRY(batchnorm_inference_rows_f32x4, inference_rows<float, 4>)
KERNEL_ENTRY(batchnorm_inference_rows_f16x8, inference_rows<__half, 8>)

/* Backward pass 1.  part is float32 [2, gridDim.y, C]: part[0] = sum dz, part[1] = sum dz * (x - mean) over
 * this block's rows.  dz_out (add + ReLU only; null otherwise) receives dz = dy * (y > 0).  The ReLU form
 * with vectors writes mask[r * C / V + g], one byte per row and vector: bit j = (y > 0) of its channel j,
 * so that pass 3 reads 1 byte where it would read the 16 of y.  The block's TY partial sums per channel
 * are added in order of ty (common.cuh, rows_block_partials). */
template <typename T, int V, bool RELU, bool ADD>
__device__ void backward_reduce_rows(const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
                                     const float* __restrict__ saved_mean, T* __restrict__ dz_out,
                                     unsigned char* __restrict__ mask, float* __restrict__ part, long long M,
                                     int C) {
    __shared__ float sh[2 * V][BN_VEC_THREADS + 1];   // + 1: the V sums of one thread in different banks
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    float sum_dz[V], sum_dz_xc[V], mean[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sum_dz[j] = sum_dz_xc[j] = 0.0f;
    if (g * V < C) {   // no early return: every thread reaches the barrier
        Lanes<V>::load_floats(saved_mean + g * V, mean);
        GRID_STRIDE_LOOP_Y(r, M) {
            const long long i = r * C + (long long)g * V;
            float gv[V], xv[V];
            Lanes<V>::load(dy + i, gv);
            Lanes<V>::load(x + i, xv);
            if (RELU) {
                float yv[V];
                Lanes<V>::load(y + i, yv);
                unsigned int bits = 0;
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    gv[j] = yv[j] > 0.0f ? gv[j] : 0.0f;
                    bits |= (yv[j] > 0.0f ? 1u : 0u) << j;
                }
                if (!ADD && V > 1) mask[r * (C / V) + g] = (unsigned char)bits;
            }
            if (ADD) Lanes<V>::store(dz_out + i, gv);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                sum_dz[j] += gv[j];
                sum_dz_xc[j] += gv[j] * (xv[j] - mean[j]);
            }
        }
    }
    rows_block_partials<V, BN_VEC_THREADS>(sh, sum_dz, sum_dz_xc, part, C);
}

KERNEL_ENTRY(batchnorm_backward_reduce_f32x1, backward_reduce_rows<float, 1, false, false>)
KERNEL_ENTRY(batchnorm_backward_reduce_f16x1, backward_reduce_rows<__half, 1, false, false>)
KERNEL_ENTRY(batchnorm_backward_reduce_f32x4, backward_reduce_rows<float, 4, false, false>)
KERNEL_ENTRY(batchnorm_backward_reduce_f16x8, backward_reduce_rows<__half, 8, false, false>)
KERNEL_ENTRY(batchnorm_relu_backward_reduce_f32x1, backward_reduce_rows<float, 1, true, false>)
KERNEL_ENTRY(batchnorm_relu_backward_reduce_f16x1, backward_reduce_rows<__half, 1, true, false>)
KERNEL_ENTRY(batchnorm_relu_backward_reduce_f32x4, backward_reduce_rows<float, 4, true, false>)
KERNEL_ENTRY(batchnorm_relu_backward_reduce_f16x8, backward_reduce_rows<__half, 8, true, false>)
KERNEL_ENTRY(batchnorm_add_relu_backward_reduce_f32x1, backward_reduce_rows<float, 1, true, true>)
KERNEL_ENTRY(batchnorm_add_relu_backward_reduce_f16x1, backward_reduce_rows<__half, 1, true, true>)
KERNEL_ENTRY(batchnorm_add_relu_backward_reduce_f32x4, backward_reduce_rows<float, 4, true, true>)
KERNEL_ENTRY(batchnorm_add_relu_backward_reduce_f16x8, backward_reduce_rows<__half, 8, true, true>)

/* Backward pass 2.  dbeta[c] = sum_g part[0][g][c], dgamma[c] = invstd[c] * sum_g part[1][g][c]: 32 threads
 * down the G partials of each channel (a warp reads 32 consecutive channels of a row of partials), in
 * double, then the 32 in order of ty.  It also writes pass 3's per-channel constants, float32 [3, C]:
 * coef[0] = gamma * invstd, coef[1] = dbeta / M, coef[2] = dgamma / M * invstd (the float operations of
 * backward_dx).  grid = ceil(C / 32), block = (32, 32). */
#define BN_FIN_ROWS 32
extern "C" __global__ void batchnorm_backward_reduce_finalize(const float* __restrict__ part, int G, int C,
                                                              long long M, const float* __restrict__ gamma,
                                                              const float* __restrict__ saved_invstd,
                                                              float* __restrict__ dgamma, float* __restrict__ dbeta,
                                                              float* __restrict__ coef) {
    __shared__ double sh[2][BN_FIN_ROWS][BN_TILE_C];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int c = blockIdx.x * BN_TILE_C + tx;
    double a = 0.0, b = 0.0;
    if (c < C) {
        for (int g = ty; g < G; g += BN_FIN_ROWS) {
            a += part[(long long)g * C + c];
            b += part[((long long)G + g) * C + c];
        }
    }
    sh[0][ty][tx] = a;
    sh[1][ty][tx] = b;
    __syncthreads();
    if (ty == 0 && c < C) {   // one thread per channel adds the 32 rows of both sums in order
        double sum_dz = 0.0, sum_dz_xc = 0.0;
        for (int r = 0; r < BN_FIN_ROWS; ++r) {
            sum_dz += sh[0][r][tx];
            sum_dz_xc += sh[1][r][tx];
        }
        const float invstd = saved_invstd[c];
        const float db = (float)sum_dz, dg = (float)(sum_dz_xc * (double)invstd);
        dbeta[c] = db;
        dgamma[c] = dg;
        coef[c] = gamma[c] * invstd;
        coef[C + c] = db / (float)M;
        coef[2 * C + c] = dg / (float)M * invstd;
    }
}

/* Version 5: partials from a convolution's epilogue are one per 64-row tile, B = M / 64 of them per
 * channel (50,176 at 256x112x112x64): the finalize's 32 threads a channel would walk 1,568 each, and at
 * 64 channels only two blocks would run.  This fold first adds them in groups of `per` consecutive rows,
 * part [2, B, C] -> folded [2, ceil(B / per), C], on a grid (ceil(C / 32), ceil(B / per)) of 32 x 8
 * threads: thread (tx, ty) adds rows ty, ty + 8, ... of its group in double, then the 8 sums in order of
 * ty (deterministic), rounded once to float.  grid.y * blockDim.y loads in flight instead of 32. */
extern "C" __global__ void batchnorm_backward_partials_fold(const float* __restrict__ part, int B, int C, int per,
                                                            float* __restrict__ folded) {
    __shared__ double sh[2][BN_ROWS][BN_TILE_C];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int c = blockIdx.x * BN_TILE_C + tx;
    const int begin = blockIdx.y * per, end = min(B, begin + per);
    double a = 0.0, b = 0.0;
    if (c < C) {
        for (int r = begin + ty; r < end; r += BN_ROWS) {
            a += part[(long long)r * C + c];
            b += part[((long long)B + r) * C + c];
        }
    }
    sh[0][ty][tx] = a;
    sh[1][ty][tx] = b;
    __syncthreads();
    if (ty == 0 && c < C) {
        double sa = 0.0, sb = 0.0;
        for (int r = 0; r < BN_ROWS; ++r) {
            sa += sh[0][r][tx];
            sb += sh[1][r][tx];
        }
        folded[(long long)blockIdx.y * C + c] = (float)sa;
        folded[((long long)gridDim.y + blockIdx.y) * C + c] = (float)sb;
    }
}

/* Backward pass 3.  dx = gamma * invstd * (dz - dbeta / M - (x - mean) * invstd * dgamma / M), with dz = dy
 * (plain; the add + ReLU form passes its dresidual as dy) or dy * (y > 0) (RELU: y > 0 from pass 1's mask
 * bits with vectors, from y itself with V = 1); coef from pass 2.  Same layout as pass 1. */
template <typename T, int V, bool RELU>
__device__ void backward_dx_rows(const T* __restrict__ dy, const T* __restrict__ y,
                                 const unsigned char* __restrict__ mask, const T* __restrict__ x,
                                 const float* __restrict__ saved_mean, const float* __restrict__ coef,
                                 T* __restrict__ dx, long long M, int C) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g * V >= C) return;   // no barriers in this kernel
    float mean[V], k[V], dbeta_mean[V], dgamma_mean_invstd[V];
    Lanes<V>::load_floats(saved_mean + g * V, mean);
    Lanes<V>::load_floats(coef + g * V, k);
    Lanes<V>::load_floats(coef + C + g * V, dbeta_mean);
    Lanes<V>::load_floats(coef + 2 * C + g * V, dgamma_mean_invstd);
    GRID_STRIDE_LOOP_Y(r, M) {
        const long long i = r * C + (long long)g * V;
        float gv[V], xv[V];
        Lanes<V>::load(dy + i, gv);
        Lanes<V>::load(x + i, xv);
        if (RELU && V > 1) {
            const unsigned int bits = mask[r * (C / V) + g];
#pragma unroll
            for (int j = 0; j < V; ++j) gv[j] = (bits >> j) & 1u ? gv[j] : 0.0f;
        } else if (RELU) {
            float yv[V];
            Lanes<V>::load(y + i, yv);
#pragma unroll
            for (int j = 0; j < V; ++j) gv[j] = yv[j] > 0.0f ? gv[j] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < V; ++j) xv[j] = k[j] * (gv[j] - dbeta_mean[j] - (xv[j] - mean[j]) * dgamma_mean_invstd[j]);
        Lanes<V>::store(dx + i, xv);
    }
}

KERNEL_ENTRY(batchnorm_backward_dx_rows_f32x1, backward_dx_rows<float, 1, false>)
KERNEL_ENTRY(batchnorm_backward_dx_rows_f16x1, backward_dx_rows<__half, 1, false>)
KERNEL_ENTRY(batchnorm_backward_dx_rows_f32x4, backward_dx_rows<float, 4, false>)
KERNEL_ENTRY(batchnorm_backward_dx_rows_f16x8, backward_dx_rows<__half, 8, false>)
KERNEL_ENTRY(batchnorm_relu_backward_dx_rows_f32x1, backward_dx_rows<float, 1, true>)
KERNEL_ENTRY(batchnorm_relu_backward_dx_rows_f16x1, backward_dx_rows<__half, 1, true>)
KERNEL_ENTRY(batchnorm_relu_backward_dx_rows_f32x4, backward_dx_rows<float, 4, true>)
KERNEL_ENTRY(batchnorm_relu_backward_dx_rows_f16x8, backward_dx_rows<__half, 8, true>)

/* Version 5, a pair of batch norms whose outputs are added before a ReLU (ResNet's projection block:
 * relu(bn3(c3) + bnp(cp)), the main branch's last batch norm and the projection's).  Behind the add both
 * have the same output gradient g (the ReLU's mask applied once, by whoever made g), so the projection's
 * two sums, sum g and sum g (x2 - mean2) over its input x2 = cp, can be made in bn3's dx pass, which
 * reads g anyway: x2 is read once more there, where a reduction of its own would read g and x2.
 * backward_dx_rows (plain: dy = g) plus those sums, added per (row slice, channel) as pass 1 adds its own
 * (common.cuh, rows_block_partials): part2 [2][gridDim.y][C], for batchnorm_backward_from_partials of the projection's
 * batch norm.  Same layout and grid as pass 1 (a slice of rows per blockIdx.y). */
template <typename T, int V>
__device__ void backward_dx_rows_pair(const T* __restrict__ g_in, const T* __restrict__ x,
                                      const float* __restrict__ saved_mean, const float* __restrict__ coef,
                                      T* __restrict__ dx, const T* __restrict__ x2, const float* __restrict__ mean2_in,
                                      float* __restrict__ part2, long long M, int C) {
    __shared__ float sh[2 * V][BN_VEC_THREADS + 1];
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    float sum_g[V], sum_g_x2c[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sum_g[j] = sum_g_x2c[j] = 0.0f;
    if (g * V < C) {   // no early return: every thread reaches the barrier
        float mean[V], k[V], dbeta_mean[V], dgamma_mean_invstd[V], mean2[V];
        Lanes<V>::load_floats(saved_mean + g * V, mean);
        Lanes<V>::load_floats(coef + g * V, k);
        Lanes<V>::load_floats(coef + C + g * V, dbeta_mean);
        Lanes<V>::load_floats(coef + 2 * C + g * V, dgamma_mean_invstd);
        Lanes<V>::load_floats(mean2_in + g * V, mean2);
        GRID_STRIDE_LOOP_Y(r, M) {
            const long long i = r * C + (long long)g * V;
            float gv[V], xv[V], x2v[V];
            Lanes<V>::load(g_in + i, gv);
            Lanes<V>::load(x + i, xv);
            Lanes<V>::load(x2 + i, x2v);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                sum_g[j] += gv[j];
                sum_g_x2c[j] += gv[j] * (x2v[j] - mean2[j]);
                xv[j] = k[j] * (gv[j] - dbeta_mean[j] - (xv[j] - mean[j]) * dgamma_mean_invstd[j]);
            }
            Lanes<V>::store(dx + i, xv);
        }
    }
    rows_block_partials<V, BN_VEC_THREADS>(sh, sum_g, sum_g_x2c, part2, C);
}

KERNEL_ENTRY(batchnorm_backward_dx_rows_pair_f32x1, backward_dx_rows_pair<float, 1>)
KERNEL_ENTRY(batchnorm_backward_dx_rows_pair_f16x1, backward_dx_rows_pair<__half, 1>)
KERNEL_ENTRY(batchnorm_backward_dx_rows_pair_f32x4, backward_dx_rows_pair<float, 4>)
KERNEL_ENTRY(batchnorm_backward_dx_rows_pair_f16x8, backward_dx_rows_pair<__half, 8>)
