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
 *              R*S-times copy is never written nor read.  Details below.  The default for float32.
 *   version 4  conv2d_*_wmma_f16, the implicit GEMM on tensor cores: float16 activations and
 *              weights, float32 accumulation, each warp multiplying 16 x 16 x 16 fragments in one
 *              instruction (WMMA, sm_70+) instead of 4096 FMAs.  Tiles move as 16-byte vectors,
 *              indices are decoded by multiply-shift, tiles are laid out without bank conflicts.
 *              Details below.
 *   version 5  conv2d_*_wmma_async_f16: version 4 with the next tiles copied while the current ones
 *              are multiplied (asynchronous copies, sm_80+), and backward data as one
 *              sub-convolution per stride phase, so stride 2 no longer multiplies the 3 in 4 taps
 *              that reach no output pixel.  The default for float16.
 * Versions 3 to 5 have a second forward kernel, *_stats (conv2d_fwd_igemm_stats_f32,
 * conv2d_fwd_wmma_stats_f16, conv2d_fwd_wmma_async_stats_f16), that also writes the batch-norm
 * statistics of its output from the tile it already holds: batch norm version 3 then reads the
 * activation once instead of twice ("Batch-norm statistics in the epilogue", at the end).
 * Their backward-data kernels have a twin, *_relu_bn (conv2d_bwd_data_igemm_relu_bn_f32,
 * conv2d_bwd_data_wmma_relu_bn_f16, conv2d_bwd_data_wmma_async_relu_bn_f16), for a convolution whose
 * input is relu(batchnorm(.)): it applies the ReLU's mask to the gradient it holds and writes the
 * batch norm's backward partial sums beside it ("The batch norm's backward in the backward-data
 * epilogue", at the end).
 *
 * On a GPU, at ResNet-50's shape (stage 1's 3x3, 256x56x56x64 -> 64; `python -m kernels.conv` prints the
 * performance model's prediction for every pass, kernels/emu/perfmodel.py; not yet measured:
 * conv.cu did not compile on the first GPU run), on an H100:
 *     version   forward   backward data   backward weight   what limits the forward
 *     1         100 ms    100 ms          133 ms            L2: every operand from global memory
 *     2         5.4 ms    3.6 ms          67 ms             instruction issue (im2col + GEMM)
 *     3         2.2 ms    3.2 ms          3.7 ms            shared-memory loads (L1)
 *     4         0.28 ms   0.33 ms         0.64 ms           shared-memory loads (L1)
 *     5         0.43 ms   0.55 ms         0.61 ms           instruction issue
 * The model does not give version 5 the gain its design aims at (below): with 5 blocks of 4
 * warps on each SM, version 4's waits for its loads are already hidden by the other blocks, and
 * version 5 issues more instructions per tile (each 16-byte asynchronous copy takes a 64-bit
 * shared address and a zero-fill choice; the pipeline's stage arithmetic), so it counts version
 * 5 the slower one except in backward weight.  The counts are PTX's, not the machine code's;
 * a GPU run will tell (bench/NOTES.md, "Predicted beside measured").
 * Version 3 in detail.  Each pass IS a matrix multiply whose operands are never materialised: the
 * tile loader computes, for each (row, column) of the virtual matrix, the address it stands for.
 *
 *       pass             GEMM  M x N  (reduction K)            A[m, kk]                 B[kk, n]
 *       forward          (N*P*Q) x K      (R*S*C)               x patch, kk = (r, s, c)  w in KRSC
 *       backward data    (N*H*W) x C      (R*S*K)               dy "patch", kk=(r, s, k) w in KRSC
 *       backward weight  K x (R*S*C)      (N*P*Q)               dy^T                     x patch
 *
 *     The reduction index always runs channel-fastest, so in NHWC a run of consecutive kk is a run
 *     of consecutive addresses (for C = 3 the whole S*C run of a filter row is contiguous).  Both
 *     weight operands read the weights in KRSC order ([K][R][S][C]: every B row, a run of channels,
 *     is contiguous): a training step reorders each weight once (conv_weight, permute4_f32 below;
 *     one read and one write of at most 2.4 M floats in ResNet-50, nothing for a 1x1 filter, whose
 *     OIHW and KRSC are the same memory), and forward and backward data read that copy.
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
 *     1 in stride^2 taps lands on an output pixel; the others load zeros.  (Version 5 splits the
 *     problem per stride phase instead, as cuDNN does.)  The loaders divide by C, S, P*Q, Q and
 *     stride at every element (versions 4 and 5 decode rows once and divide by multiply-shift).
 *
 * Index arithmetic is 32-bit where sizes are known to fit (the launcher checks) and 64-bit for
 * element offsets of whole tensors.
 *
 * Version 4 in detail: the same three GEMMs, on tensor cores.
 *
 *     A tensor core multiplies small matrices: one warp-wide instruction (wmma::mma_sync) computes
 *     D = A B + C for a 16 x 16 tile of C from a 16 x 16 piece of A and one of B, 4096
 *     multiply-adds that CUDA cores would need 4096 FMA instructions (128 per lane) for.  The
 *     inputs are halves; their products are exact in float and are summed in float (fp32
 *     accumulation): a sum of thousands of products rounded to half at every step would lose
 *     its small terms (half has 11 significant bits: 2048 + 1 == 2048), so only the result is
 *     rounded to half, once, when it is stored.
 *
 *     Tiles: a block of 128 threads (4 warps, 2 x 2) computes a 64 x 64 tile of C; each warp a
 *     32 x 32 piece, 2 x 2 fragments.  The reduction walks in steps of 64: each step the block
 *     fills a 64 x 64 tile of A and one of B in shared memory (zero where the virtual element is
 *     padding or past an edge), then each warp does 4 x 4 mma_sync (4 k-slices of 16 times its 2 x 2
 *     fragments).  A fragment wholly past the edge of C or the end of the reduction is skipped.
 *     Compiled for sm_60 (no tensor cores), the same tiles are multiplied with float FMAs, 32
 *     outputs per thread: float16 storage, float32 math, and still no float32 copy of anything.
 *
 *     Gathering a tile of the implicit im2col matrix: 8 threads per 64-element row of a tile, each
 *     moving 8 consecutive reduction indices, one 16-byte vector.  Those are 8 consecutive channels
 *     of one pixel (channels run fastest in NHWC and in the reduction order (r, s, c)), so the vector
 *     is one aligned load whenever C % 8 == 0 (every layer of ResNet-50 but the stem) and the
 *     pointers are 16-byte aligned.  Otherwise (the stem's 3 channels) the forward pass loads one
 *     element per lane, the 32 lanes of a warp on 32 consecutive kk of a row, which lie S*C halves
 *     in a run in x, so a warp's 2-byte loads share a few sectors; the backward passes gather each
 *     thread's 8 elements one by one in registers, walking (r, s, c), and store them to shared
 *     memory as one 16-byte vector.  The rows of a tile (output pixels) never change, so their
 *     (n, p, q) are decoded once, before the loop (the forward keeps them in shared memory, one
 *     entry per row); a reduction index kk changes every step and is split into (r, s, c) by
 *     multiply-shift (FastDiv, common.cuh): no division in the loop.
 *       forward          A[m, kk] = x[n, p*stride - pad + r, q*stride - pad + s, c]   As[m][kk]
 *                        B[kk, k] = wk[k][kk]                                         Bs[k][kk]
 *       backward data    A[m, kk] = dy[n, p, q, k] where tap (r, s) carries (h, w) to (p, q)
 *                        B[kk, c] = wk[k][r][s][c]                                    Bs[kk][c]
 *       backward weight  A[k, j]  = dy[j][k]                                          As[j][k]
 *                        B[j, kk] = x patch of pixel j                                Bs[j][kk]
 *     where wk is the weight in KRSC order ([K][R][S][C]: the layout in which both weight operands
 *     are contiguous rows).  The launcher gets it from conv_weight (one cast-and-transpose per
 *     training step for a float32 master weight), or makes it from an OIHW float16 weight.
 *
 *     Bank conflicts.  Shared memory has 32 banks of 4 bytes; a quarter-warp's 16-byte accesses
 *     are served together, and conflict when two of them fall in the same banks (the same
 *     16-byte unit modulo 8).  The loaders store 8 consecutive units of one row (never a
 *     conflict); WMMA loads a fragment as 16-byte pieces of 8 different rows at the same column.
 *     With rows of 64 halves (8 units) those 8 pieces would all hit the same banks; rows padded to
 *     72 halves (9 units, an odd number) put them in 8 different ones.  The float tile the results
 *     go through (to be rounded and stored as rows of the output) is padded to 68 floats (17 units)
 *     for the same reason.
 *
 *     Backward weight is split over gridDim.z as in version 3; with one split the kernel writes dw
 *     itself (OIHW, float16, or float32 for a float32 master weight), with several the slices go
 *     through a float32 workspace and conv2d_bwd_weight_reduce_oihw_* sums them, moving each 32
 *     channels x R*S taps of a row through a shared tile (rows of an odd number of floats: no bank
 *     conflict either way) so that it reads the workspace and writes dw in consecutive addresses
 *     (version 3's reduce reads the workspace C floats apart).
 *
 * Version 5 in detail: keeping the tensor cores fed.
 *
 *     In version 4 a step loads its tiles (global -> registers -> shared memory), waits at a
 *     barrier, multiplies, waits again: while the loads travel (hundreds of cycles from DRAM) the
 *     tensor cores idle, unless other blocks on the SM happen to have work.  sm_80 copies global
 *     to shared memory asynchronously (cp.async: __pipeline_memcpy_async / __pipeline_commit /
 *     __pipeline_wait_prior, <cuda_pipeline.h>), without registers, while the thread goes on.
 *     Two stages of tiles (36 KiB): at step t the block issues the copies of step t + 1 into the
 *     other stage, then multiplies stage t; the copies land while it does:
 *         issue tiles 0 -> stage 0; commit
 *         for t = 0, 1, ...:  wait until my copies of tile t have landed (__pipeline_wait_prior)
 *                             __syncthreads()   everyone's have; stage (t - 1) % 2 is free again
 *                             issue tile t + 1 -> stage (t + 1) % 2; commit
 *                             multiply stage t % 2
 *     A padding element is a copy with zfill: 16 bytes of zeros, nothing read.  The gather of the
 *     stem's 3 channels (no 16-byte vectors) stores its elements itself, into the same stages.  On
 *     sm_70 the same code loads synchronously (no cp.async there); a third stage, 55 KiB, needs
 *     dynamic shared memory over the 48 KiB static limit (an exercise).
 *
 *     Backward data per stride phase.  Input pixel (h, w) receives dy[p, q] through tap (r, s) only
 *     when h + pad - r = p * stride: r is (h + pad) mod stride plus a multiple of stride.  So the
 *     pixels of one phase (ph, pw) = (h mod stride, w mod stride) all use the same taps
 *     r = r0 + rr * stride (r0 = (ph + pad) mod stride), s likewise, and with h = hh * stride + ph
 *     the output row is p = hh + dp - rr (dp = (ph + pad - r0) / stride): a dense sub-convolution
 *     over ceil((R - r0) / stride) x ceil((S - s0) / stride) taps, without a division or a zero
 *     tap.  blockIdx.z is the phase.  At stride 2 a 3x3 filter becomes four sub-convolutions of
 *     2x2, 2x1, 1x2 and 1x1 taps: an input pixel visits 2.25 taps on average instead of 9; a 1x1
 *     filter reaches only phase (0, 0), and the other three phases' tiles are the zeros they should be.
 *
 * Batch-norm statistics in the epilogue (the *_stats kernels of versions 3 to 5).
 *
 *     In training every convolution of ResNet-50 is followed by batch norm, which needs the mean
 *     and variance of each output channel over the batch before it can normalise: done separately,
 *     that is a whole read of y for the statistics, then the normalising read.  But the forward
 *     kernel holds each 64 x 64 tile of y (64 output pixels, 64 channels) before it writes it, so
 *     it can summarise each channel's 64 values on the spot: one partial per (row tile p, channel k),
 *     four floats, stats[q][p][k] for q = count, shift, offset, M2:
 *         n_p       the tile's rows that exist (64, fewer in the last tile)
 *         a_p       the channel's value in the tile's first row: the shift
 *         d_p       mean over the tile of (v - a_p): the tile's mean is a_p + d_p
 *         M2_p      sum over the tile of (v - a_p - d_p)^2, the squared deviations from that mean
 *     where v is y as stored (rounded to half by the float16 kernels).  Two passes over the tile in
 *     shared memory (v4/5: two threads per column, 32 rows each, from the float tile Cs; v3: the
 *     4 x 4 register blocks, column sums through the freed As/Bs tiles, 16 threads per column).
 *     Deterministic: fixed orders, no atomics.  Batch norm merges the partials (batchnorm.cu,
 *     version 3: in double, Chan's formula for P parts about block 0's mean).
 *
 *     Why a shift per tile: E[y^2] - E[y]^2 in float32 loses everything when |mean| >> std
 *     (batchnorm.cu, "Numerics"); sums of v - a_p are as large as the channel's spread, not its
 *     mean, and keeping a_p beside d_p lets the merge see each tile's mean exactly (a float32 mean
 *     alone would carry an error of u |mean|, which the merge turns into u |mean| R of variance).
 *     The bound, proved by the usual rounding-error analysis to first order in u = 2^-24, for a
 *     channel of M values with exact (float64) mean mu, biased variance s2 and spread R =
 *     max |v - mu|, of the mean and variance batch norm computes from these partials:
 *         |mean - mu| <= u |mu| + 73 u R        (each d_p: at most 34 roundings of numbers below
 *                                                2R, and its division; then mean's own rounding)
 *         |var - s2|  <= 36 u s2 + 162 u R^2    (each M2_p: 35 roundings of its sum, each deviation
 *                                                off by at most 4uR; the tiles' mean errors, 73uR
 *                                                each, through the merge; var's own rounding)
 *     (the merge in double adds less than 2^-30 of these).
 *     It does not grow with |mu| / std: at a mean 3000 times the spread the variance is still within
 *     it, where float32 sum and sum of squares are off by far more (tests/test_kernels_conv.py,
 *     test_bn_stats_bound_holds_at_a_large_mean_offset; measured, the errors of both signs cancel to
 *     within u (var + R^2)).  R^2 <= M var always, and R is a few standard deviations for the
 *     activations of a network.
 *
 *     What it saves, per batch-norm layer with M = N*P*Q rows of K channels of `b`-byte values:
 *         before:  batch norm reads y for its statistics (b M K), then reads it again to normalise
 *         after:   the convolution writes 16 bytes per (tile, channel), 16 ceil(M / 64) K, and batch
 *                  norm reads them once: one read of y fewer, for 32 ceil(M / 64) K bytes of partials
 *         saved:   b M K - 32 ceil(M / 64) K  =  (b - 0.5) M K bytes  (M a multiple of 64)
 *     ResNet-50 v1.5 at batch 256, 224 px: 53 batch norms, sum of M K = 2.85e9 values: float16
 *     saves 5.69 GB - 1.42 GB = 4.27 GB of memory traffic per training step (about 1.4 ms at the
 *     3 TB/s an H100 copies at), float32 11.4 - 1.4 = 10.0 GB.  The convolution's own cost: the
 *     epilogue's two passes over a tile it already holds, and 16 bytes per 64 values of y written
 *     (1/8 more than y's 128 bytes in float16); no more registers or shared memory (ptxas: the
 *     same occupancy on sm_70 to sm_90).  Versions 1 and 2, and cuDNN, have no such epilogue: there
 *     batchnorm.cu's batchnorm_chan_partials reads y for the same partials (kernels/conv.py).
 *
 * The batch norm's backward in the backward-data epilogue (the *_relu_bn kernels of versions 3 to 5).
 *
 *     In ResNet-50's bottleneck the 3x3 and the last 1x1 convolution each take a = relu(bn(x)), a
 *     training-mode batch norm and a ReLU.  Their backward data computes da; the ReLU's backward is
 *     g = da where a > 0 (else 0), and the batch norm's backward needs two sums per channel over the
 *     batch before its elementwise pass: sum g and sum g (x - mean).  The kernel holds each 64-pixel
 *     x 64-channel tile of da before writing it, so it reads a and x (bn_x) at the same addresses,
 *     writes g instead of da, and sums each column of the tile:
 *         part[0][b][c] = sum over tile b's pixels of g,  part[1][b][c] = sum of g * (bn_x - bn_mean[c])
 *     float32 [2][B][C], from g as stored (rounded to half by the float16 kernels), in a fixed order,
 *     no atomics: v3, each thread over its 4 rows of the register block, then the 16 threads of a
 *     column through the freed As/Bs tiles; v4/5, 4 columns per thread over every 8th row of the
 *     float tile Cs as the store visits them (8-byte vectors of a, bn_x and g where C % 4 == 0 and
 *     the arrays are aligned), then the 8 threads of a column through Cs.  Block b is blockIdx.x
 *     (versions 3 and 4: pixels 64 b .. 64 b + 63 in NHWC order); version 5's per-phase tiles are
 *     b = blockIdx.z * gridDim.x + blockIdx.x (phase-major), and a tile past its phase's pixels (or a
 *     phase with none: stride 2 on a 1-pixel image) writes zero partials before it leaves.  Columns
 *     past C are not written.  batchnorm.cu adds the B partials of each channel in double (part[q][b][c]
 *     at (q * B + b) * C + c, its layout: batchnorm_backward_reduce_finalize; past 512 partials first
 *     in groups of 64 by batchnorm_backward_partials_fold, each group's sum rounded once to float32),
 *     and the batch norm's last pass reads g and x once for dx.
 *
 *     Where a has a second consumer, its gradient has a second part, dz: through an identity shortcut
 *     (ResNet-50's 12 blocks whose input, the block before's add + ReLU output, feeds both the first
 *     1x1 convolution and the shortcut; the block's last batch norm hands it over instead of returning
 *     it to autograd: nn/functional.py, residual_grad_to_link), or from the other convolution of a
 *     block with a projection (stages 2-4: the reduce and the projection take the same input; the one
 *     whose backward runs first hands its da over: share_grad_partials).  The epilogue adds it before
 *     the mask, as stored: g = a > 0 ? round(round(da) + dz) : 0 (the rounding of da + dz in float16,
 *     as autograd's add of the two gradients did), one more read (dz) in the same pass; dz = null: none.
 *
 *     Error: each term g (x - mean) is rounded at most twice (the difference, the product) and then
 *     through at most 3 + 15 additions (v3) or 7 + 7 (v4/5), so to first order in u = 2^-24
 *         |part[q][b][c] - exact| <= 20 u sum over the tile of |term|
 *     (better than the 63 u of a plain 64-term sum); the merge in double adds at most B 2^-53 of the
 *     sum of |part| (under 2^-39 at ResNet-50's B <= 12544 tiles), then rounds once to float32 (the
 *     fold: once per group of 64 partials more, u of the group's sum).
 *     tests/test_conv_relu_bn.py checks every block against this bound on float64 sums.
 *
 *     The epilogue's cost, per layer of M = N*H*W pixels and C channels of `b`-byte values: reads of
 *     a and bn_x (and dz, with a shortcut), 2 b M C bytes (3 b M C), in a pass whose multiply-adds (2 R S K per element of g, 512 to 9216
 *     in ResNet-50) keep it compute-bound, and 8 bytes of partials per (tile, column), 8 ceil(M / 64) C
 *     (1/16 of g's bytes in float16); no more shared memory (the sums reuse the tiles) and the same
 *     occupancy (ptxas, sm_70 to sm_90: registers within 3 of the plain kernels', no spills).  ResNet-50 at
 *     batch 256: 32 such layers, sum of M C = 0.84e9 values: 3.37 GB of reads (float16) and 0.11 GB of
 *     partials per step, and 15 with dz (12 1x1 reduce layers, C = 4 K, and 3 projections: 1.39e9
 *     values, 8.3 GB of reads; bench/NOTES.md, "Every byte once", has the predicted times).  What the
 *     batch norm's side saves in return: batchnorm.cu's header.  Versions 1 and 2, and cuDNN, have no such epilogue: there batch norm's batchnorm_relu_grad_partials
 *     (kernels/batchnorm.py) reads da, a and x once more for the same g and partials.
 */

#include <cuda_fp16.h>
#include <mma.h>
#if __CUDA_ARCH__ >= 800
#include <cuda_pipeline.h>   // __pipeline_memcpy_async (version 5)
#endif
#include "common.cuh"   // GRID_STRIDE_LOOP, unravel4, load_float4, FastDiv, to_float / from_float

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

// The statistics of a 64 x 64 tile of y, one (count, shift, offset, M2) per column (see "Batch-norm
// statistics" in the header): stats[q][p][k] for q = 0..3, p = blockIdx.x (the tile's row block,
// P = gridDim.x of them), k = n0 + column.  Written for the columns k < K only.
__device__ __forceinline__ void store_tile_partial(float* __restrict__ stats, int K, int k, float count, float shift,
                                                   float offset, float m2) {
    const long long slice = (long long)gridDim.x * K, i = (long long)blockIdx.x * K + k;
    stats[i] = count;
    stats[slice + i] = shift;
    stats[2 * slice + i] = offset;
    stats[3 * slice + i] = m2;
}

// Version 3's statistics epilogue: the tile is in registers, thread (ty, tx) holding rows ty*4..
// and columns tx*4.. (acc, as igemm_tile returns it); rows / cols: how many of the tile's rows and
// columns exist.  The shared tiles As and Bs are free again (igemm_tile ended with a barrier):
// As[0] holds each column's shift (its value in row 0), As[1] its offset, Bs[ty] the 16 threads'
// partial sums of a column, added in a fixed order by the column's one thread among the first 64.
__device__ __forceinline__ void igemm_column_stats(const float acc[4][4], int rows, int cols, int n0, int K,
                                                   TileA* As, TileB* Bs, float* __restrict__ stats) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16, c = threadIdx.x;   // c: a column, for threads < 64
    if (ty == 0) store_float4(&As[0][tx * 4], acc[0]);
    __syncthreads();
    float shift[4], offset[4], part[4];
    load_float4(&As[0][tx * 4], shift);
#pragma unroll
    for (int j = 0; j < 4; ++j) {   // pass 1: sum of (v - shift) over this thread's rows
        part[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (ty * 4 + i < rows) part[j] += acc[i][j] - shift[j];
    }
    store_float4(&Bs[ty][tx * 4], part);
    __syncthreads();
    if (c < IG_BN) {
        float s = 0.0f;
        for (int r = 0; r < 16; ++r) s += Bs[r][c];
        As[1][c] = s / (float)rows;   // the column's mean, less its shift
    }
    __syncthreads();
    load_float4(&As[1][tx * 4], offset);
#pragma unroll
    for (int j = 0; j < 4; ++j) {   // pass 2: sum of squared deviations from the column's mean
        part[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float e = (acc[i][j] - shift[j]) - offset[j];
            if (ty * 4 + i < rows) part[j] += e * e;
        }
    }
    store_float4(&Bs[ty][tx * 4], part);   // every read of pass 1's sums was before the last barrier
    __syncthreads();
    if (c < cols) {
        float m2 = 0.0f;
        for (int r = 0; r < 16; ++r) m2 += Bs[r][c];
        store_tile_partial(stats, K, n0 + c, (float)rows, As[0][c], As[1][c], m2);
    }
}

// Forward.  grid (ceil(N*P*Q / 64), ceil(K / 64)), block 256.  wt is the weight in KRSC order.
// STATS: also the batch-norm partials of y (stats [4][gridDim.x][K]; conv2d_fwd_igemm_stats_f32).
template <bool STATS>
__device__ __forceinline__ void fwd_igemm_f32(const float* __restrict__ x, const float* __restrict__ wt,
                                              float* __restrict__ y, float* __restrict__ stats, int N, int H, int W,
                                              int C, int K, int R, int S, int P, int Q, int stride, int pad,
                                              TileA* As, TileB* Bs) {
    const int M = N * P * Q, Kd = R * S * C;
    const int m0 = blockIdx.x * IG_BM, n0 = blockIdx.y * IG_BN;
    // A loader: thread reads column kk = tid % 16 of rows tid / 16 + 16 i (consecutive threads,
    // consecutive channels).  Row m is output pixel (n, p, q): its window starts at
    // (p * stride - pad, q * stride - pad) of image n.
    const int lk = threadIdx.x % IG_BK, lr = threadIdx.x / IG_BK;
    const TileRows a = decode_tile_rows(m0, lr, M, P, Q, (long long)H * W * C, stride, -pad);   // y, x: window corner

    float acc[4][4] = {};
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
    if (STATS) igemm_column_stats(acc, min(IG_BM, M - m0), min(IG_BN, K - n0), n0, K, As, Bs, stats);
}

extern "C" __global__ void __launch_bounds__(256)
conv2d_fwd_igemm_f32(const float* __restrict__ x, const float* __restrict__ wt, float* __restrict__ y,
                     int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];   // the tiles of igemm_tile (declared here, not
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];   // in the template)
    fwd_igemm_f32<false>(x, wt, y, nullptr, N, H, W, C, K, R, S, P, Q, stride, pad, As, Bs);
}

extern "C" __global__ void __launch_bounds__(256)
conv2d_fwd_igemm_stats_f32(const float* __restrict__ x, const float* __restrict__ wt, float* __restrict__ y,
                           float* __restrict__ stats, int N, int H, int W, int C, int K, int R, int S, int P, int Q,
                           int stride, int pad) {
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];
    fwd_igemm_f32<true>(x, wt, y, stats, N, H, W, C, K, R, S, P, Q, stride, pad, As, Bs);
}

// The ReLU's backward and the batch norm's backward partial sums in version 3's backward-data
// epilogue ("The batch norm's backward in the backward-data epilogue", header): the tile is in
// registers as igemm_tile returns it (thread (ty, tx): rows ty*4.., columns tx*4..).  Each element:
// g = da (+ dz, when dz is not null) where a > 0, else 0, written to dx instead of da; per column, sum g and
// sum g * (bn_x - bn_mean) over the tile's rows: each thread over its 4 rows, then the 16 threads'
// sums of a column, in order, by one thread (As and Bs are free: igemm_tile ended with a barrier).
// part[q][b][c] for q = 0, 1, b = blockIdx.x of gridDim.x, c < C (columns past C are not written).
__device__ __forceinline__ void igemm_relu_bn_epilogue(const float acc[4][4], int m0, int n0, int M, int C,
                                                       const float* __restrict__ a, const float* __restrict__ bn_x,
                                                       const float* __restrict__ dz,
                                                       const float* __restrict__ bn_mean, float* __restrict__ dx,
                                                       float* __restrict__ part, TileA* As, TileB* Bs) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16, row0 = m0 + ty * 4, col0 = n0 + tx * 4;
    float mean[4], sum_g[4], sum_gx[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        mean[j] = col0 + j < C ? bn_mean[col0 + j] : 0.0f;
        sum_g[j] = sum_gx[j] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = row0 + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (col0 + j >= C) continue;
            const long long e = (long long)m * C + col0 + j;
            const float g = a[e] > 0.0f ? (dz ? acc[i][j] + dz[e] : acc[i][j]) : 0.0f;
            dx[e] = g;
            sum_g[j] += g;
            sum_gx[j] += g * (bn_x[e] - mean[j]);
        }
    }
    store_float4(&Bs[ty][tx * 4], sum_g);
    store_float4(&As[ty][tx * 4], sum_gx);
    __syncthreads();
    const int c = threadIdx.x % IG_BN, q = threadIdx.x / IG_BN;   // threads 0-63: sum g, 64-127: sum g (x - mean)
    if (q < 2 && n0 + c < C) {
        const TileB* sums = q == 0 ? Bs : As;
        float s = 0.0f;
        for (int r = 0; r < 16; ++r) s += sums[r][c];
        part[((long long)q * gridDim.x + blockIdx.x) * C + n0 + c] = s;
    }
}

// Backward data.  grid (ceil(N*H*W / 64), ceil(C / 64)), block 256.  wt is the weight in KRSC order,
// the forward pass's copy.  RELU_BN: dx = g, the masked gradient, and the batch norm's backward
// partials (conv2d_bwd_data_igemm_relu_bn_f32; a, bn_x, dz, bn_mean, part as igemm_relu_bn_epilogue).
template <bool RELU_BN>
__device__ __forceinline__ void bwd_data_igemm_f32(const float* __restrict__ dy, const float* __restrict__ wt,
                                                   float* __restrict__ dx, const float* __restrict__ a,
                                                   const float* __restrict__ bn_x,
                                                   const float* __restrict__ dz, const float* __restrict__ bn_mean,
                                                   float* __restrict__ part, int N, int H, int W, int C, int K, int R,
                                                   int S, int P, int Q, int stride, int pad, TileA* As, TileB* Bs) {
    const int M = N * H * W, Kd = R * S * K;
    const int m0 = blockIdx.x * IG_BM, n0 = blockIdx.y * IG_BN;
    // A[m, kk] = dy[n, p, q, k] with m = (n, h, w), kk = (r, s, k), p = (h + pad - r) / stride when exact.
    const int lk = threadIdx.x % IG_BK, lr = threadIdx.x / IG_BK;
    const TileRows ta = decode_tile_rows(m0, lr, M, H, W, (long long)P * Q * K, 1, pad);   // y, x: h + pad, w + pad
    // B[kk, c] = w[k, c, r, s] = wt[(k * R*S + r*S + s) * C + c] for kk = (r*S + s) * K + k: here
    // consecutive threads take consecutive c (a row of B is contiguous in KRSC as well)
    const int bc = threadIdx.x % IG_BN, bk = threadIdx.x / IG_BN, RS = R * S;

    float acc[4][4] = {};
    igemm_tile(0, Kd, As, Bs, [&](int k0, TileA* As, TileB* Bs) {
        const int kk = k0 + lk;
        const int k = kk % K, rs = kk / K, s = rs % S, r = rs / S;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int p, q;
            As[lk][lr + 16 * i] = (kk < Kd && output_of_tap(ta.y[i] - r, stride, P, p) &&
                                   output_of_tap(ta.x[i] - s, stride, Q, q))
                                      ? dy[ta.base[i] + ((long long)p * Q + q) * K + k] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int kr = bk + 4 * i, kb = k0 + kr, c = n0 + bc;
            Bs[kr][bc] = (kb < Kd && c < C) ? wt[((long long)(kb % K) * RS + kb / K) * C + c] : 0.0f;
        }
    }, acc);
    if (RELU_BN) igemm_relu_bn_epilogue(acc, m0, n0, M, C, a, bn_x, dz, bn_mean, dx, part, As, Bs);
    else store_block_4x4(dx, acc, m0 + threadIdx.x / 16 * 4, n0 + threadIdx.x % 16 * 4, M, C);
}

extern "C" __global__ void __launch_bounds__(256)
conv2d_bwd_data_igemm_f32(const float* __restrict__ dy, const float* __restrict__ wt, float* __restrict__ dx,
                          int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];   // the tiles of igemm_tile
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];
    bwd_data_igemm_f32<false>(dy, wt, dx, nullptr, nullptr, nullptr, nullptr, nullptr, N, H, W, C, K, R, S, P, Q, stride, pad,
                              As, Bs);
}

// dx = g = da where a > 0, else 0, and part [2][gridDim.x][C] (batch norm's backward partials).
extern "C" __global__ void __launch_bounds__(256)
conv2d_bwd_data_igemm_relu_bn_f32(const float* __restrict__ dy, const float* __restrict__ wt, float* __restrict__ dx,
                                  const float* __restrict__ a, const float* __restrict__ bn_x,
                                  const float* __restrict__ dz,
                                  const float* __restrict__ bn_mean, float* __restrict__ part, int N, int H, int W,
                                  int C, int K, int R, int S, int P, int Q, int stride, int pad) {
    __shared__ __align__(16) float As[IG_BK][IG_BM + IG_PAD];
    __shared__ __align__(16) float Bs[IG_BK][IG_BN + IG_PAD];
    bwd_data_igemm_f32<true>(dy, wt, dx, a, bn_x, dz, bn_mean, part, N, H, W, C, K, R, S, P, Q, stride, pad, As, Bs);
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

/* ------------------------------------------------------------------ version 4: tensor cores */
#define TC_BM 64          // tile rows (output pixels; output channels for backward weight)
#define TC_BN 64          // tile columns
#define TC_BK 64          // reduction step, in elements (halves)
#define TC_LD (TC_BK + 8)   // leading dimension of the half tiles: 144-byte rows, 9 16-byte units
#define TC_LDC (TC_BN + 4)  // of the float result tile: 272-byte rows, 17 units
#define TC_THREADS 128    // 4 warps, 2 x 2, each a 32 x 32 piece of the tile
#if __CUDA_ARCH__ >= 800
#define TC_MIN_BLOCKS 5   // blocks per SM ptxas must make room for: at most 96 registers a thread
#else
#define TC_MIN_BLOCKS 1   // sm_60 / sm_70 need more registers (the scalar tile product, no cp.async)
#endif
#define TC_TILE (TC_BM * TC_LD)   // halves in one operand tile (all three layouts are 64 x 72)
#define TC_SMEM_BYTES (2 * TC_TILE * 2 > TC_BM * TC_LDC * 4 ? 2 * TC_TILE * 2 : TC_BM * TC_LDC * 4)

// How an operand tile sits in shared memory: element (row, col) of the tile's matrix at
// tile[row * TC_LD + col] (RowMajor) or tile[col * TC_LD + row] (ColMajor).  The loaders write
// whichever makes their global reads contiguous; WMMA reads either.
struct RowMajor {};
struct ColMajor {};
template <class L> __device__ __forceinline__ int tile_offset(int row, int col);
template <> __device__ __forceinline__ int tile_offset<RowMajor>(int row, int col) { return row * TC_LD + col; }
template <> __device__ __forceinline__ int tile_offset<ColMajor>(int row, int col) { return col * TC_LD + row; }

#if __CUDA_ARCH__ >= 700
template <class L> struct WmmaLayout;
template <> struct WmmaLayout<RowMajor> { typedef nvcuda::wmma::row_major type; };
template <> struct WmmaLayout<ColMajor> { typedef nvcuda::wmma::col_major type; };
#endif

// 8 halves (16 bytes) from global to shared memory as one vector, or 8 zeros where !valid.
// ASYNC (version 5) on sm_80+: an asynchronous copy (cp.async: global -> shared without passing
// through registers; zfill writes the zeros), which lands at the __pipeline_wait_prior that covers
// it, so src must be a valid 16-byte-aligned address even where nothing is copied.  Otherwise
// (version 4, and version 5 below sm_80) an ordinary 16-byte load and store.
template <bool ASYNC>
__device__ __forceinline__ void tile_copy8(__half* dst, const __half* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    if (ASYNC) {
        __pipeline_memcpy_async(dst, src, 16, valid ? 0 : 16);
        return;
    }
#endif
    if (valid) *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
}

// 8 halves gathered one by one in registers, stored as one 16-byte vector: one shared-memory store
// instruction per thread, and a quarter-warp's 8 vectors fill 8 different units of a tile row.
__device__ __forceinline__ void store_halves8(__half* dst, const __half* v) {
    uint4 raw;
    memcpy(&raw, v, sizeof(raw));
    *reinterpret_cast<uint4*>(dst) = raw;
}

__device__ __forceinline__ void pipeline_commit() {
#if __CUDA_ARCH__ >= 800
    __pipeline_commit();
#endif
}

template <int PRIOR>
__device__ __forceinline__ void pipeline_wait_prior() {
#if __CUDA_ARCH__ >= 800
    __pipeline_wait_prior(PRIOR);
#endif
}

// One thread's share of the accumulators of a 64 x 64 tile: the 2 x 2 fragments of its warp's
// 32 x 32 piece on tensor cores; 32 floats (elements threadIdx.x + 128 q) without them (sm_60).
struct TcAcc {
#if __CUDA_ARCH__ >= 700
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f[2][2];
#else
    float f[TC_BM * TC_BN / TC_THREADS];
#endif
};

__device__ __forceinline__ void tc_zero(TcAcc& acc) {
#if __CUDA_ARCH__ >= 700
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc.f[i][j], 0.0f);
#else
#pragma unroll
    for (int q = 0; q < TC_BM * TC_BN / TC_THREADS; ++q) acc.f[q] = 0.0f;
#endif
}

// acc += As Bs over the first `depth` (at most TC_BK) reduction indices of the tiles.  rows_left /
// cols_left: how many rows / columns of the tile exist; a 16 x 16 fragment wholly past them, or
// past the end of the reduction, is not multiplied (the test is the same for the 32 lanes of a
// warp, as WMMA requires).  Compiled for sm_60 (no tensor cores) the same tiles are multiplied
// with float FMAs, 32 outputs per thread: float16 storage, float32 math.
template <class LA, class LB>
__device__ __forceinline__ void tc_multiply(TcAcc& acc, const __half* As, const __half* Bs, int depth, int rows_left,
                                            int cols_left) {
#if __CUDA_ARCH__ >= 700
    using namespace nvcuda;
    const int warp = threadIdx.x / WARP_SIZE, wm = warp / 2 * 32, wn = warp % 2 * 32;   // this warp's 32 x 32
#pragma unroll
    for (int kk = 0; kk < TC_BK; kk += 16) {
        if (kk >= depth) break;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, typename WmmaLayout<LA>::type> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, typename WmmaLayout<LB>::type> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
            if (wm + 16 * i < rows_left) wmma::load_matrix_sync(fa[i], As + tile_offset<LA>(wm + 16 * i, kk), TC_LD);
#pragma unroll
        for (int j = 0; j < 2; ++j)
            if (wn + 16 * j < cols_left) wmma::load_matrix_sync(fb[j], Bs + tile_offset<LB>(kk, wn + 16 * j), TC_LD);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j)
                if (wm + 16 * i < rows_left && wn + 16 * j < cols_left) wmma::mma_sync(acc.f[i][j], fa[i], fb[j], acc.f[i][j]);
    }
#else
#pragma unroll
    for (int q = 0; q < TC_BM * TC_BN / TC_THREADS; ++q) {
        const int e = threadIdx.x + TC_THREADS * q, row = e / TC_BN, col = e % TC_BN;
        float s = acc.f[q];
        for (int kk = 0; kk < TC_BK; ++kk)
            s = fmaf(__half2float(As[tile_offset<LA>(row, kk)]), __half2float(Bs[tile_offset<LB>(kk, col)]), s);
        acc.f[q] = s;
    }
#endif
}

// Cs (row-major, leading dimension TC_LDC) = the tile in acc.
__device__ __forceinline__ void tc_store(const TcAcc& acc, float* Cs, int rows_left, int cols_left) {
#if __CUDA_ARCH__ >= 700
    const int warp = threadIdx.x / WARP_SIZE, wm = warp / 2 * 32, wn = warp % 2 * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            if (wm + 16 * i < rows_left && wn + 16 * j < cols_left)
                nvcuda::wmma::store_matrix_sync(Cs + (wm + 16 * i) * TC_LDC + wn + 16 * j, acc.f[i][j], TC_LDC,
                                                nvcuda::wmma::mem_row_major);
#else
#pragma unroll
    for (int q = 0; q < TC_BM * TC_BN / TC_THREADS; ++q) {
        const int e = threadIdx.x + TC_THREADS * q;
        Cs[e / TC_BN * TC_LDC + e % TC_BN] = acc.f[q];
    }
#endif
}

#define TC_STAGES 2                    // version 5: tiles in shared memory at once
#define TC_STAGE (2 * TC_TILE)         // halves per stage: the A tile, then the B tile
#define TC_SMEM_V4 TC_SMEM_BYTES
#define TC_SMEM_V5 (TC_STAGES * TC_STAGE * 2)

// The GEMM of every pass on tensor cores: the TC_BM x TC_BN tile of C at the block's origin, summed
// over the reduction range [k_begin, k_end) in steps of TC_BK.  At each step load_tiles(k0, As, Bs)
// fills As (TC_BM x TC_BK of A, layout LA) and Bs (TC_BK x TC_BN of B, layout LB), zero where the
// virtual element is padding or past an edge: the one part that differs between the passes.
//   !ASYNC (version 4): load, barrier, multiply, barrier; one stage of tiles.
//   ASYNC (version 5): TC_STAGES stages; the copies of step t + 1 are issued before step t is
//     multiplied, so on sm_80+ they travel while the tensor cores work (one barrier per step: it
//     both publishes step t's tiles and tells that everybody has finished reading step t - 1's,
//     whose stage the new copies overwrite).
// On return `tiles` holds the result as floats (Cs, row-major, leading dimension TC_LDC), visible to
// every thread of the block.
template <bool ASYNC, class LA, class LB, class LoadTiles>
__device__ __forceinline__ void tc_gemm(int k_begin, int k_end, int rows_left, int cols_left, __half* tiles,
                                        const LoadTiles& load_tiles) {
    TcAcc acc;
    tc_zero(acc);
    const int steps = k_end > k_begin ? (k_end - k_begin + TC_BK - 1) / TC_BK : 0;
    if (!ASYNC) {
        for (int t = 0; t < steps; ++t) {
            const int k0 = k_begin + t * TC_BK;
            load_tiles(k0, tiles, tiles + TC_TILE);
            __syncthreads();
            tc_multiply<LA, LB>(acc, tiles, tiles + TC_TILE, k_end - k0, rows_left, cols_left);
            __syncthreads();   // nobody refills a tile another warp is still reading
        }
    } else {
        for (int t = 0; t < TC_STAGES - 1; ++t) {   // prologue: the first stages on their way
            if (t < steps) load_tiles(k_begin + t * TC_BK, tiles + t * TC_STAGE, tiles + t * TC_STAGE + TC_TILE);
            pipeline_commit();
        }
        for (int t = 0; t < steps; ++t) {
            pipeline_wait_prior<TC_STAGES - 2>();   // my copies of step t have landed ...
            __syncthreads();                        // ... and everyone's; step t - 1's stage is free
            const int next = t + TC_STAGES - 1;
            if (next < steps) {
                __half* stage = tiles + next % TC_STAGES * TC_STAGE;
                load_tiles(k_begin + next * TC_BK, stage, stage + TC_TILE);
            }
            pipeline_commit();                      // (an empty batch near the end: the count stays right)
            const __half* stage = tiles + t % TC_STAGES * TC_STAGE;
            tc_multiply<LA, LB>(acc, stage, stage + TC_TILE, k_end - (k_begin + t * TC_BK), rows_left, cols_left);
        }
        pipeline_wait_prior<0>();
        __syncthreads();   // every warp is done with the tiles that Cs overwrites
    }
    tc_store(acc, reinterpret_cast<float*>(tiles), rows_left, cols_left);
    __syncthreads();
}

// out[row(m), n] = Cs[m - m0][n - n0] rounded to half, for the tile's rows m < M and columns n < ncols,
// where row(m) is the row of the [*, ncols] row-major output that GEMM row m stands for.  4 consecutive
// columns per thread: one 16-byte read of Cs (8 threads of a quarter-warp read 8 different 16-byte
// units of a row: no bank conflict) and one 8-byte store where vec says the row allows it.
template <class RowOf>
__device__ __forceinline__ void tc_store_tile_f16(__half* __restrict__ out, const float* Cs, int m0, int n0, int M,
                                                  int ncols, bool vec, const RowOf& row_of) {
    for (int e = threadIdx.x; e < TC_BM * TC_BN / 4; e += TC_THREADS) {
        const int row = e / (TC_BN / 4), col = e % (TC_BN / 4) * 4, m = m0 + row, n = n0 + col;
        if (m >= M || n >= ncols) continue;
        const float4 v = *reinterpret_cast<const float4*>(Cs + row * TC_LDC + col);
        __half* dst = out + (long long)row_of(m) * ncols + n;
        if (vec && n + 3 < ncols) {
            __align__(8) __half2 pair[2] = {__floats2half2_rn(v.x, v.y), __floats2half2_rn(v.z, v.w)};
            *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(pair);
        } else {
            const float f[4] = {v.x, v.y, v.z, v.w};
            for (int j = 0; j < 4 && n + j < ncols; ++j) dst[j] = __float2half_rn(f[j]);
        }
    }
}

// The statistics epilogue of the tensor-core forward (the *_stats_f16 kernels): Cs (the float tile
// as tc_gemm leaves it) has rows of TC_LDC floats, of which the first `rows` and `cols` exist.  Each
// value counts as it is stored, rounded to half.  Two threads per column, each over 32 rows (a
// warp's 32 lanes read 32 consecutive words of one row: no bank conflict); scratch: 2 * TC_BN
// floats of shared memory for the two halves' sums.  Partials as store_tile_partial.
__device__ __forceinline__ float as_stored_half(float v) { return __half2float(__float2half_rn(v)); }

__device__ __forceinline__ void tc_column_stats(const float* Cs, int rows, int cols, int n0, int K, float* scratch,
                                                float* __restrict__ stats) {
    static_assert(TC_THREADS == 2 * TC_BN, "two threads per column of the tile");
    const int col = threadIdx.x % TC_BN, half = threadIdx.x / TC_BN;
    const int r_begin = half * (TC_BM / 2), r_end = min(r_begin + TC_BM / 2, rows);
    const bool mine = col < cols;
    const float shift = mine ? as_stored_half(Cs[col]) : 0.0f;   // the column's value in row 0
    float s = 0.0f;
    if (mine)
        for (int r = r_begin; r < r_end; ++r) s += as_stored_half(Cs[r * TC_LDC + col]) - shift;
    scratch[half * TC_BN + col] = s;
    __syncthreads();
    const float offset = (scratch[col] + scratch[TC_BN + col]) / (float)rows;   // the column's mean, less its shift
    float m2 = 0.0f;
    if (mine)
        for (int r = r_begin; r < r_end; ++r) {
            const float e = (as_stored_half(Cs[r * TC_LDC + col]) - shift) - offset;
            m2 += e * e;
        }
    __syncthreads();   // both halves have read the sums
    scratch[half * TC_BN + col] = m2;
    __syncthreads();
    if (half == 0 && mine)
        store_tile_partial(stats, K, n0 + col, (float)rows, shift, offset, scratch[col] + scratch[TC_BN + col]);
}

// The ReLU's backward and the batch norm's backward partial sums in the tensor-core backward-data
// epilogue (the *_relu_bn_f16 kernels; "The batch norm's backward in the backward-data epilogue",
// header).  Like tc_store_tile_f16, 4 consecutive columns per thread, but each element is
//     h = da rounded to half (with dz not null: h + dz rounded to half);  g = a > 0 ? h : 0, stored
//     instead of da;  per column: sum g and sum g * (bn_x - bn_mean) (float32, g as stored)
// with a, bn_x (and dz) read at g's address (8-byte vectors where vec says the row allows them).  With
// TC_THREADS a multiple of 16, a thread's 4 columns are the same in every row it visits (rows
// threadIdx.x / 16 + 8 i): it sums its 8 rows in registers, then the 8 threads' sums of a column are
// added in order through the freed float tile by one thread per (column, sum).
// part[q][block][c] for q = 0, 1 of `blocks` blocks, c = n0 + column < ncols (no others written).
template <class RowOf>
__device__ __forceinline__ void tc_store_tile_relu_bn_f16(__half* __restrict__ out, float* Cs, int m0, int n0, int M,
                                                          int ncols, bool vec, const RowOf& row_of,
                                                          const __half* __restrict__ a,
                                                          const __half* __restrict__ bn_x,
                                                          const __half* __restrict__ dz,
                                                          const float* __restrict__ bn_mean,
                                                          float* __restrict__ part, int block, int blocks) {
    static_assert(TC_THREADS % (TC_BN / 4) == 0, "a thread's columns stay the same from row to row");
    constexpr int GROUPS = TC_THREADS / (TC_BN / 4);   // threads per column (8), each every 8th row
    const int col = threadIdx.x % (TC_BN / 4) * 4, n = n0 + col, group = threadIdx.x / (TC_BN / 4);
    float mean[4], sum_g[4], sum_gx[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        mean[j] = n + j < ncols ? bn_mean[n + j] : 0.0f;
        sum_g[j] = sum_gx[j] = 0.0f;
    }
    for (int row = group; row < TC_BM; row += GROUPS) {
        const int m = m0 + row;
        if (m >= M || n >= ncols) continue;
        const float4 v = *reinterpret_cast<const float4*>(Cs + row * TC_LDC + col);
        const float f[4] = {v.x, v.y, v.z, v.w};
        const long long e = (long long)row_of(m) * ncols + n;
        if (vec && n + 3 < ncols) {
            const uint2 a_raw = __ldg(reinterpret_cast<const uint2*>(a + e));
            const uint2 x_raw = __ldg(reinterpret_cast<const uint2*>(bn_x + e));
            const uint2 z_raw = dz ? __ldg(reinterpret_cast<const uint2*>(dz + e)) : make_uint2(0u, 0u);
            __align__(8) __half2 ah[2], xh[2], zh[2], gh[2];
            memcpy(ah, &a_raw, sizeof(a_raw));
            memcpy(xh, &x_raw, sizeof(x_raw));
            memcpy(zh, &z_raw, sizeof(z_raw));
            float g[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float aj = j % 2 ? __high2float(ah[j / 2]) : __low2float(ah[j / 2]);
                const float xj = j % 2 ? __high2float(xh[j / 2]) : __low2float(xh[j / 2]);
                const float zj = j % 2 ? __high2float(zh[j / 2]) : __low2float(zh[j / 2]);
                // da as stored, then (with dz) the sum as stored: what da + dz in float16 gives
                const float h = dz ? as_stored_half(as_stored_half(f[j]) + zj) : as_stored_half(f[j]);
                g[j] = aj > 0.0f ? h : 0.0f;
                sum_g[j] += g[j];
                sum_gx[j] += g[j] * (xj - mean[j]);
            }
            gh[0] = __floats2half2_rn(g[0], g[1]);   // exact: g[j] is a half already
            gh[1] = __floats2half2_rn(g[2], g[3]);
            *reinterpret_cast<uint2*>(out + e) = *reinterpret_cast<const uint2*>(gh);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (n + j >= ncols) break;
                const float h = dz ? as_stored_half(as_stored_half(f[j]) + __half2float(dz[e + j]))
                                   : as_stored_half(f[j]);
                const float g = __half2float(a[e + j]) > 0.0f ? h : 0.0f;
                out[e + j] = __float2half_rn(g);
                sum_g[j] += g;
                sum_gx[j] += g * (__half2float(bn_x[e + j]) - mean[j]);
            }
        }
    }
    __syncthreads();   // every thread has read its rows of Cs: its first 2 * GROUPS rows take the sums
    float* sums = Cs;   // sums[q][group][column], q = 0 (sum g), 1 (sum g (x - mean))
    store_float4(sums + group * TC_BN + col, sum_g);
    store_float4(sums + (GROUPS + group) * TC_BN + col, sum_gx);
    __syncthreads();
    static_assert(TC_THREADS == 2 * TC_BN, "one thread per (column, sum)");
    const int c = threadIdx.x % TC_BN, q = threadIdx.x / TC_BN;
    if (n0 + c < ncols) {
        float s = 0.0f;
        for (int r = 0; r < GROUPS; ++r) s += sums[(q * GROUPS + r) * TC_BN + c];
        part[((long long)q * blocks + block) * ncols + n0 + c] = s;
    }
}

// Zero partials of a block with no rows (version 5: a phase with fewer pixels than others, or none),
// so that the sums over every block of part stay right.
__device__ __forceinline__ void tc_zero_relu_bn_partials(float* __restrict__ part, int n0, int ncols, int block,
                                                         int blocks) {
    const int c = threadIdx.x % TC_BN, q = threadIdx.x / TC_BN;
    if (n0 + c < ncols) part[((long long)q * blocks + block) * ncols + n0 + c] = 0.0f;
}

// The loaders' thread mapping, the same in every pass: 8 threads per 64-element row of a tile, each
// one group of 8 consecutive elements (one 16-byte vector, g8 = 0, 8, ..., 56); rows
// row0 + 16 i, i < 4.  A quarter-warp stores 8 consecutive units of one row: no bank conflict;
// WMMA's fragment loads read 8 rows of one unit: 9-unit rows put them in 8 different banks.
#define TC_G8 (threadIdx.x % 8 * 8)
#define TC_ROW0 (threadIdx.x / 8)

// Backward data: the output pixel (p, q) that filter tap (r, s) carries input pixel (h, w) to, as in
// output_of_tap, with the division by stride done by multiply-shift.
__device__ __forceinline__ bool tap_output(int h_pad_r, const FastDiv& div_stride, int P, int& p) {
    if (h_pad_r < 0) return false;
    p = fast_div(h_pad_r, div_stride);
    return p * div_stride.d == h_pad_r && p < P;
}

// Forward, versions 4 (!ASYNC) and 5.  grid (ceil(N*P*Q / 64), ceil(K / 64)), block 128.  wk: the
// weight in KRSC order.  aligned: 1 when x, wk and y start on 16-byte boundaries; channels move as
// 16-byte vectors when also C % 8 == 0, element by element otherwise (the stem's 3 channels).
// STATS: also the batch-norm partials of y (the *_stats_f16 kernels; stats [4][gridDim.x][K]).
template <bool ASYNC, bool STATS>
__device__ __forceinline__ void conv_fwd_f16(const __half* __restrict__ x, const __half* __restrict__ wk,
                                             __half* __restrict__ y, float* __restrict__ stats, int N, int H, int W,
                                             int C, int K, int R, int S, int P, int Q, int stride, int pad,
                                             int aligned, __half* tiles, int* pixels) {
    const int M = N * P * Q, Kd = R * S * C;
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const bool vec = aligned && C % 8 == 0;
    const FastDiv div_c = make_fastdiv(C), div_s = make_fastdiv(S);
    const int g8 = TC_G8, row0 = TC_ROW0;
    // The tile's 64 rows of A are output pixels (n, p, q), the same at every step: decoded once, by
    // 64 threads, into the image's offset and the corner of the filter window (p*stride - pad,
    // q*stride - pad), kept in shared memory (pixels[0, 64, 128 + row]) for every thread's loads.
    {
        const FastDiv div_pq = make_fastdiv(P * Q), div_q = make_fastdiv(Q);
        for (int row = threadIdx.x; row < TC_BM; row += TC_THREADS) {
            const int m = m0 + row;
            int x_base = 0, h_0 = IG_FAR, w_0 = IG_FAR;
            if (m < M) {
                int n, pq, p, q;
                fast_divmod(m, div_pq, n, pq);
                fast_divmod(pq, div_q, p, q);
                x_base = n * H * W * C;
                h_0 = p * stride - pad;
                w_0 = q * stride - pad;
            }
            pixels[row] = x_base;   // three arrays of 64: consecutive threads, consecutive words
            pixels[TC_BM + row] = h_0;
            pixels[2 * TC_BM + row] = w_0;
        }
        __syncthreads();
    }
    tc_gemm<ASYNC, RowMajor, ColMajor>(0, Kd, M - m0, K - n0, tiles, [&](int k0, __half* As, __half* Bs) {
        if (vec) {
            // 8 threads per row, 8 consecutive kk each: 8 channels of one tap, one 16-byte vector
            const int kk = k0 + g8;   // kk = (r * S + s) * C + c
            int rs, c, r, s;
            fast_divmod(kk, div_c, rs, c);
            fast_divmod(rs, div_s, r, s);
#pragma unroll
            for (int i = 0; i < 4; ++i) {   // A[m, kk] = x[n, h_0 + r, w_0 + s, c]: As[m][kk]
                const int row = row0 + 16 * i, h = pixels[TC_BM + row] + r, w = pixels[2 * TC_BM + row] + s;
                const bool in = kk < Kd && h >= 0 && h < H && w >= 0 && w < W;
                tile_copy8<ASYNC>(As + tile_offset<RowMajor>(row, g8), in ? x + pixels[row] + (h * W + w) * C + c : x, in);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {   // B[kk, k] = wk[k][kk]: Bs[k][kk] (column-major B), the same kk
                const int k = n0 + row0 + 16 * i;
                const bool in = k < K && kk < Kd;
                tile_copy8<ASYNC>(Bs + tile_offset<ColMajor>(g8, row0 + 16 * i), in ? wk + k * Kd + kk : wk, in);
            }
        } else {
            // No 16-byte vectors (the stem's 3 channels): one element per thread per load, the 32
            // lanes of a warp on 32 consecutive kk of one row.  Within a filter row those are
            // consecutive addresses of x (S*C halves in a run) and of wk, so a warp's load touches
            // a few sectors; each lane decodes its own kk.
            for (int e = threadIdx.x; e < TC_BM * TC_BK; e += TC_THREADS) {
                const int row = e / TC_BK, col = e % TC_BK, kk = k0 + col;
                int rs, c, r, s;
                fast_divmod(kk, div_c, rs, c);
                fast_divmod(rs, div_s, r, s);
                const int h = pixels[TC_BM + row] + r, w = pixels[2 * TC_BM + row] + s;
                As[tile_offset<RowMajor>(row, col)] =
                    kk < Kd && h >= 0 && h < H && w >= 0 && w < W ? x[pixels[row] + (h * W + w) * C + c] : __float2half(0.0f);
                const int k = n0 + row;   // B: the same (row, col) of the k-major tile
                Bs[tile_offset<ColMajor>(col, row)] = k < K && kk < Kd ? wk[k * Kd + kk] : __float2half(0.0f);
            }
        }
    });
    // y[n, p, q, k]: row m of [M, K]
    tc_store_tile_f16(y, reinterpret_cast<const float*>(tiles), m0, n0, M, K, aligned && K % 4 == 0,
                      [](int m) { return m; });
    // The pixel table is not read after the GEMM (tc_gemm ended with a barrier): its 768 bytes hold
    // the column sums of the statistics.
    if (STATS)
        tc_column_stats(reinterpret_cast<const float*>(tiles), min(TC_BM, M - m0), min(TC_BN, K - n0), n0, K,
                        reinterpret_cast<float*>(pixels), stats);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_fwd_wmma_f16(const __half* __restrict__ x, const __half* __restrict__ wk, __half* __restrict__ y, int N, int H,
                    int W, int C, int K, int R, int S, int P, int Q, int stride, int pad, int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V4 / 2];   // declared here, not in the template
    __shared__ int pixels[3 * TC_BM];   // the tile's output pixels: image offset, window corner
    conv_fwd_f16<false, false>(x, wk, y, nullptr, N, H, W, C, K, R, S, P, Q, stride, pad, aligned, tiles, pixels);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_fwd_wmma_async_f16(const __half* __restrict__ x, const __half* __restrict__ wk, __half* __restrict__ y, int N,
                          int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad, int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V5 / 2];
    __shared__ int pixels[3 * TC_BM];   // the tile's output pixels: image offset, window corner
    conv_fwd_f16<true, false>(x, wk, y, nullptr, N, H, W, C, K, R, S, P, Q, stride, pad, aligned, tiles, pixels);
}

// Versions 4 and 5 with the batch-norm partials of y in the epilogue (stats [4][gridDim.x][K]).
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_fwd_wmma_stats_f16(const __half* __restrict__ x, const __half* __restrict__ wk, __half* __restrict__ y,
                          float* __restrict__ stats, int N, int H, int W, int C, int K, int R, int S, int P, int Q,
                          int stride, int pad, int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V4 / 2];
    __shared__ int pixels[3 * TC_BM];   // the tile's output pixels, then the statistics' column sums
    conv_fwd_f16<false, true>(x, wk, y, stats, N, H, W, C, K, R, S, P, Q, stride, pad, aligned, tiles, pixels);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_fwd_wmma_async_stats_f16(const __half* __restrict__ x, const __half* __restrict__ wk, __half* __restrict__ y,
                                float* __restrict__ stats, int N, int H, int W, int C, int K, int R, int S, int P,
                                int Q, int stride, int pad, int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V5 / 2];
    __shared__ int pixels[3 * TC_BM];   // the tile's output pixels, then the statistics' column sums
    conv_fwd_f16<true, true>(x, wk, y, stats, N, H, W, C, K, R, S, P, Q, stride, pad, aligned, tiles, pixels);
}

// Backward data, version 4.  grid (ceil(N*H*W / 64), ceil(C / 64)), block 128.  wk: the weight in
// KRSC order.  The reduction runs over kk = (r * S + s) * K + k: 8 consecutive kk are 8 consecutive
// channels of dy (one vector when K % 8 == 0), and a row kk of B, wk[k][r][s][c0 ..], is contiguous in c.
// Every tap (r, s) is visited for every input pixel; with stride 2, 3 in 4 of them reach no output
// pixel and load zeros (version 5 does not visit them).
// RELU_BN: dx = g and the batch norm's backward partials (conv2d_bwd_data_wmma_relu_bn_f16; a, bn_x,
// dz, bn_mean, part as tc_store_tile_relu_bn_f16, block b = blockIdx.x of gridDim.x).
template <bool RELU_BN>
__device__ __forceinline__ void bwd_data_wmma_f16(const __half* __restrict__ dy, const __half* __restrict__ wk,
                                                  __half* __restrict__ dx, const __half* __restrict__ a,
                                                  const __half* __restrict__ bn_x,
                                                  const __half* __restrict__ dz, const float* __restrict__ bn_mean,
                                                  float* __restrict__ part, int N, int H, int W, int C, int K, int R,
                                                  int S, int P, int Q, int stride, int pad, int aligned,
                                                  __half* tiles) {
    const int M = N * H * W, Kd = R * S * K, RS = R * S;
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const bool vec_a = aligned && K % 8 == 0, vec_b = aligned && C % 8 == 0;
    const FastDiv div_k = make_fastdiv(K), div_s = make_fastdiv(S), div_stride = make_fastdiv(stride);
    const int g8 = TC_G8, row0 = TC_ROW0;
    // rows of A: input pixels (n, h, w), decoded once: dy's image offset and (h + pad, w + pad)
    int dy_base[4], h_pad[4], w_pad[4];
    {
        const FastDiv div_hw = make_fastdiv(H * W), div_w = make_fastdiv(W);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = m0 + row0 + 16 * i;
            dy_base[i] = 0;
            h_pad[i] = w_pad[i] = -1;   // no tap reaches a row past M
            if (m < M) {
                int n, hw, h, w;
                fast_divmod(m, div_hw, n, hw);
                fast_divmod(hw, div_w, h, w);
                dy_base[i] = n * P * Q * K;
                h_pad[i] = h + pad;
                w_pad[i] = w + pad;
            }
        }
    }
    tc_gemm<false, RowMajor, RowMajor>(0, Kd, M - m0, C - n0, tiles, [&](int k0, __half* As, __half* Bs) {
        {
            const int kk = k0 + g8;
            int rs, k, r, s;
            fast_divmod(kk, div_k, rs, k);
            fast_divmod(rs, div_s, r, s);
#pragma unroll
            for (int i = 0; i < 4; ++i) {   // A[m, kk] = dy[n, p, q, k] where tap (r, s) carries (h, w) to (p, q)
                __half* dst = As + tile_offset<RowMajor>(row0 + 16 * i, g8);
                if (vec_a) {
                    int p, q;
                    const bool in = kk < Kd && tap_output(h_pad[i] - r, div_stride, P, p) &&
                                    tap_output(w_pad[i] - s, div_stride, Q, q);
                    tile_copy8<false>(dst, in ? dy + dy_base[i] + (p * Q + q) * K + k : dy, in);
                } else {
                    int re = r, se = s, ke = k;
                    __half v8[8];   // gathered one by one, stored as one 16-byte vector
                    for (int e = 0; e < 8; ++e) {
                        int p, q;
                        v8[e] = kk + e < Kd && tap_output(h_pad[i] - re, div_stride, P, p) &&
                                        tap_output(w_pad[i] - se, div_stride, Q, q)
                                    ? dy[dy_base[i] + (p * Q + q) * K + ke] : __float2half(0.0f);
                        if (++ke == K) {
                            ke = 0;
                            if (++se == S) se = 0, ++re;
                        }
                    }
                    store_halves8(dst, v8);
                }
            }
        }
        const int c = n0 + g8;
#pragma unroll
        for (int i = 0; i < 4; ++i) {   // B[kk, c] = wk[k][r][s][c]: Bs[kk][c] (row-major B)
            const int kk = k0 + row0 + 16 * i;
            int rs, k;
            fast_divmod(kk, div_k, rs, k);
            __half* dst = Bs + tile_offset<RowMajor>(row0 + 16 * i, g8);
            if (vec_b) {
                const bool in = kk < Kd && c < C;
                tile_copy8<false>(dst, in ? wk + (k * RS + rs) * C + c : wk, in);
            } else {
                __half v8[8];   // gathered one by one, stored as one 16-byte vector
                for (int e = 0; e < 8; ++e)
                    v8[e] = kk < Kd && c + e < C ? wk[(k * RS + rs) * C + c + e] : __float2half(0.0f);
                store_halves8(dst, v8);
            }
        }
    });
    // dx[n, h, w, c]: row m of [M, C]
    if (RELU_BN)
        tc_store_tile_relu_bn_f16(dx, reinterpret_cast<float*>(tiles), m0, n0, M, C, aligned && C % 4 == 0,
                                  [](int m) { return m; }, a, bn_x, dz, bn_mean, part, blockIdx.x, gridDim.x);
    else
        tc_store_tile_f16(dx, reinterpret_cast<const float*>(tiles), m0, n0, M, C, aligned && C % 4 == 0,
                          [](int m) { return m; });
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_bwd_data_wmma_f16(const __half* __restrict__ dy, const __half* __restrict__ wk, __half* __restrict__ dx, int N,
                         int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad, int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V4 / 2];   // declared here, not in the template
    bwd_data_wmma_f16<false>(dy, wk, dx, nullptr, nullptr, nullptr, nullptr, nullptr, N, H, W, C, K, R, S, P, Q, stride, pad,
                             aligned, tiles);
}

// dx = g = da where a > 0, else 0, and part [2][gridDim.x][C] (batch norm's backward partials).
// aligned: 1 when dy, wk, dx, a and bn_x start on 16-byte boundaries.
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_bwd_data_wmma_relu_bn_f16(const __half* __restrict__ dy, const __half* __restrict__ wk, __half* __restrict__ dx,
                                 const __half* __restrict__ a, const __half* __restrict__ bn_x,
                                 const __half* __restrict__ dz,
                                 const float* __restrict__ bn_mean, float* __restrict__ part, int N, int H, int W,
                                 int C, int K, int R, int S, int P, int Q, int stride, int pad, int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V4 / 2];
    bwd_data_wmma_f16<true>(dy, wk, dx, a, bn_x, dz, bn_mean, part, N, H, W, C, K, R, S, P, Q, stride, pad, aligned,
                            tiles);
}

// Backward data, version 5: one sub-convolution per stride phase.  Input pixel (h, w) receives
// dy[p, q] through tap (r, s) only when h + pad - r = p * stride, i.e. r = (h + pad) mod stride
// (+ stride, + 2 stride, ...): the pixels of one phase (ph, pw) = (h mod stride, w mod stride) all
// use the same taps r = r0 + rr * stride (r0 = (ph + pad) mod stride), s likewise, and with
// h = hh * stride + ph the output row is p = hh + dp - rr, dp = (ph + pad - r0) / stride: no
// division, no zero taps.  blockIdx.z is the phase; its GEMM is (N * Hp * Wp) x C with reduction
// (rr, ss, k) over Rp * Sp * K (Hp = ceil((H - ph) / stride) rows of the phase, Rp = ceil((R - r0) /
// stride) taps).  A phase that no tap reaches (a 1x1 filter with stride 2 reaches only phase (0, 0))
// has an empty reduction, and its tile of zeros is the gradient there.
// grid (ceil(N * ceil(H/stride) * ceil(W/stride) / 64), ceil(C / 64), stride^2), block 128.
// RELU_BN: dx = g and the batch norm's backward partials (conv2d_bwd_data_wmma_async_relu_bn_f16), block
// b = blockIdx.z * gridDim.x + blockIdx.x of gridDim.x * gridDim.z (phase-major); a block with no
// rows of its phase writes zero partials.
template <bool RELU_BN>
__device__ __forceinline__ void bwd_data_wmma_async_f16(const __half* __restrict__ dy, const __half* __restrict__ wk,
                                                        __half* __restrict__ dx, const __half* __restrict__ a,
                                                        const __half* __restrict__ bn_x, const __half* __restrict__ dz,
                                                        const float* __restrict__ bn_mean, float* __restrict__ part,
                                                        int N, int H, int W, int C, int K, int R, int S, int P, int Q,
                                                        int stride, int pad, int aligned, __half* tiles) {
    const int ph = blockIdx.z / stride, pw = blockIdx.z % stride;
    const int Hp = (H - ph + stride - 1) / stride, Wp = (W - pw + stride - 1) / stride;   // this phase's pixels
    const int M = N * Hp * Wp;
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int block = blockIdx.z * gridDim.x + blockIdx.x, blocks = gridDim.x * gridDim.z;
    if (Hp <= 0 || Wp <= 0 || m0 >= M) {   // the whole block leaves, before any barrier
        if (RELU_BN) tc_zero_relu_bn_partials(part, n0, C, block, blocks);
        return;
    }
    const int r0 = (ph + pad) % stride, s0 = (pw + pad) % stride;
    const int Rp = r0 < R ? (R - r0 + stride - 1) / stride : 0, Sp = s0 < S ? (S - s0 + stride - 1) / stride : 0;
    const int dp = (ph + pad - r0) / stride, dq = (pw + pad - s0) / stride;
    const int Kd = Rp * Sp * K, RS = R * S;
    const bool vec_a = aligned && K % 8 == 0, vec_b = aligned && C % 8 == 0;
    const FastDiv div_k = make_fastdiv(K), div_sp = make_fastdiv(Sp > 0 ? Sp : 1);
    const int g8 = TC_G8, row0 = TC_ROW0;
    // rows of A: this phase's pixels (n, hh, ww); p = p_0 - rr, q = q_0 - ss
    int dy_base[4], p_0[4], q_0[4];
    {
        const FastDiv div_hw = make_fastdiv(Hp * Wp), div_w = make_fastdiv(Wp);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = m0 + row0 + 16 * i;
            dy_base[i] = 0;
            p_0[i] = q_0[i] = IG_FAR;   // every p, q out of range: a row past M loads zeros
            if (m < M) {
                int n, hw, hh, ww;
                fast_divmod(m, div_hw, n, hw);
                fast_divmod(hw, div_w, hh, ww);
                dy_base[i] = n * P * Q * K;
                p_0[i] = hh + dp;
                q_0[i] = ww + dq;
            }
        }
    }
    tc_gemm<true, RowMajor, RowMajor>(0, Kd, M - m0, C - n0, tiles, [&](int k0, __half* As, __half* Bs) {
        {
            const int kk = k0 + g8;   // kk = (rr * Sp + ss) * K + k
            int t, k, rr, ss;
            fast_divmod(kk, div_k, t, k);
            fast_divmod(t, div_sp, rr, ss);
#pragma unroll
            for (int i = 0; i < 4; ++i) {   // A[m, kk] = dy[n, p_0 - rr, q_0 - ss, k]
                __half* dst = As + tile_offset<RowMajor>(row0 + 16 * i, g8);
                if (vec_a) {
                    const int p = p_0[i] - rr, q = q_0[i] - ss;
                    const bool in = kk < Kd && p >= 0 && p < P && q >= 0 && q < Q;
                    tile_copy8<true>(dst, in ? dy + dy_base[i] + (p * Q + q) * K + k : dy, in);
                } else {
                    int re = rr, se = ss, ke = k;
                    __half v8[8];   // gathered one by one, stored as one 16-byte vector
                    for (int e = 0; e < 8; ++e) {
                        const int p = p_0[i] - re, q = q_0[i] - se;
                        v8[e] = kk + e < Kd && p >= 0 && p < P && q >= 0 && q < Q ? dy[dy_base[i] + (p * Q + q) * K + ke]
                                                                                   : __float2half(0.0f);
                        if (++ke == K) {
                            ke = 0;
                            if (++se == Sp) se = 0, ++re;
                        }
                    }
                    store_halves8(dst, v8);
                }
            }
        }
        const int c = n0 + g8;
#pragma unroll
        for (int i = 0; i < 4; ++i) {   // B[kk, c] = wk[k][r0 + rr * stride][s0 + ss * stride][c]
            const int kk = k0 + row0 + 16 * i;
            int t, k, rr, ss;
            fast_divmod(kk, div_k, t, k);
            fast_divmod(t, div_sp, rr, ss);
            const int tap = (r0 + rr * stride) * S + s0 + ss * stride;
            __half* dst = Bs + tile_offset<RowMajor>(row0 + 16 * i, g8);
            if (vec_b) {
                const bool in = kk < Kd && c < C;
                tile_copy8<true>(dst, in ? wk + (k * RS + tap) * C + c : wk, in);
            } else {
                __half v8[8];   // gathered one by one, stored as one 16-byte vector
                for (int e = 0; e < 8; ++e)
                    v8[e] = kk < Kd && c + e < C ? wk[(k * RS + tap) * C + c + e] : __float2half(0.0f);
                store_halves8(dst, v8);
            }
        }
    });
    // GEMM row m = (n, hh, ww) is input pixel (n, hh * stride + ph, ww * stride + pw)
    const FastDiv div_hw = make_fastdiv(Hp * Wp), div_w = make_fastdiv(Wp);
    const auto pixel_of = [&](int m) {
        int n, hw, hh, ww;
        fast_divmod(m, div_hw, n, hw);
        fast_divmod(hw, div_w, hh, ww);
        return (n * H + hh * stride + ph) * W + ww * stride + pw;
    };
    if (RELU_BN)
        tc_store_tile_relu_bn_f16(dx, reinterpret_cast<float*>(tiles), m0, n0, M, C, aligned && C % 4 == 0, pixel_of,
                                  a, bn_x, dz, bn_mean, part, block, blocks);
    else
        tc_store_tile_f16(dx, reinterpret_cast<const float*>(tiles), m0, n0, M, C, aligned && C % 4 == 0, pixel_of);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_bwd_data_wmma_async_f16(const __half* __restrict__ dy, const __half* __restrict__ wk, __half* __restrict__ dx,
                               int N, int H, int W, int C, int K, int R, int S, int P, int Q, int stride, int pad,
                               int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V5 / 2];   // declared here, not in the template
    bwd_data_wmma_async_f16<false>(dy, wk, dx, nullptr, nullptr, nullptr, nullptr, nullptr, N, H, W, C, K, R, S, P, Q, stride,
                                   pad, aligned, tiles);
}

// dx = g = da where a > 0, else 0, and part [2][gridDim.x * stride^2][C] (batch norm's backward
// partials, block b = phase * gridDim.x + blockIdx.x).  aligned: as version 4's.
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_bwd_data_wmma_async_relu_bn_f16(const __half* __restrict__ dy, const __half* __restrict__ wk,
                                       __half* __restrict__ dx, const __half* __restrict__ a,
                                       const __half* __restrict__ bn_x,
                                       const __half* __restrict__ dz, const float* __restrict__ bn_mean,
                                       float* __restrict__ part, int N, int H, int W, int C, int K, int R, int S, int P,
                                       int Q, int stride, int pad, int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V5 / 2];
    bwd_data_wmma_async_f16<true>(dy, wk, dx, a, bn_x, dz, bn_mean, part, N, H, W, C, K, R, S, P, Q, stride, pad,
                                  aligned, tiles);
}

// Backward weight, split-K, versions 4 (!ASYNC) and 5.  grid (ceil(K / 64), ceil(R*S*C / 64), splits),
// block 128.  Split z reduces n*P*Q indices [z * chunk, min((z + 1) * chunk, N*P*Q)) (chunk a multiple
// of 64).  One split writes dw (OIHW, type TW) itself; several write ws[z][k][(r, s, c)] (float) for
// conv2d_bwd_weight_reduce_oihw_*.
template <bool ASYNC, typename TW>
__device__ __forceinline__ void bwd_weight_f16(const __half* __restrict__ x, const __half* __restrict__ dy,
                                               float* __restrict__ ws, TW* __restrict__ dw, int N, int H, int W,
                                               int C, int K, int R, int S, int P, int Q, int stride, int pad,
                                               int chunk, int aligned, __half* tiles) {
    const int M = K, ncols = R * S * C, Kd = N * P * Q, RS = R * S;
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int k_begin = blockIdx.z * chunk, k_end = min(Kd, k_begin + chunk);
    const bool vec_a = aligned && K % 8 == 0, vec_b = aligned && C % 8 == 0;
    const FastDiv div_c = make_fastdiv(C), div_pq = make_fastdiv(P * Q), div_q = make_fastdiv(Q);
    const int g8 = TC_G8, row0 = TC_ROW0;
    // This thread's 8 columns of B, col .. col + 7 = (r, s, c ..), never change: decoded once.
    const int col = n0 + g8;
    int b_r = IG_FAR, b_s = IG_FAR, b_c = 0;
    if (col < ncols) {
        int rs;
        fast_divmod(col, div_c, rs, b_c);
        fast_divmod(rs, make_fastdiv(S), b_r, b_s);
    }
    tc_gemm<ASYNC, ColMajor, RowMajor>(k_begin, k_end, M - m0, ncols - n0, tiles, [&](int k0, __half* As, __half* Bs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int jr = row0 + 16 * i, j = k0 + jr;   // reduction index j = (n, p, q): a pixel of dy
            const bool in = j < k_end;
            int n = 0, p = 0, q = 0;
            if (in) {
                int pq;
                fast_divmod(j, div_pq, n, pq);
                fast_divmod(pq, div_q, p, q);
            }
            // A[k, j] = dy[j][k]: As[j][k] (column-major A), 8 consecutive output channels
            const int k = m0 + g8;
            __half* dst = As + tile_offset<ColMajor>(g8, jr);
            if (vec_a) {
                const bool ok = in && k < K;
                tile_copy8<ASYNC>(dst, ok ? dy + j * K + k : dy, ok);
            } else {
                __half v8[8];   // gathered one by one, stored as one 16-byte vector
                for (int e = 0; e < 8; ++e) v8[e] = in && k + e < K ? dy[j * K + k + e] : __float2half(0.0f);
                store_halves8(dst, v8);
            }
            // B[j, (r, s, c)] = x[n, p*stride - pad + r, q*stride - pad + s, c]: Bs[j][col]
            dst = Bs + tile_offset<RowMajor>(jr, g8);
            const int h0 = p * stride - pad, w0 = q * stride - pad, x_base = n * H * W * C;
            if (vec_b) {
                const int h = h0 + b_r, w = w0 + b_s;
                const bool ok = in && h >= 0 && h < H && w >= 0 && w < W;
                tile_copy8<ASYNC>(dst, ok ? x + x_base + (h * W + w) * C + b_c : x, ok);
            } else {
                int re = b_r, se = b_s, ce = b_c;
                __half v8[8];   // gathered one by one, stored as one 16-byte vector
                for (int e = 0; e < 8; ++e) {
                    const int h = h0 + re, w = w0 + se;
                    v8[e] = in && col + e < ncols && h >= 0 && h < H && w >= 0 && w < W ? x[x_base + (h * W + w) * C + ce]
                                                                                        : __float2half(0.0f);
                    if (++ce == C) {
                        ce = 0;
                        if (++se == S) se = 0, ++re;
                    }
                }
                store_halves8(dst, v8);
            }
        }
    });
    // Cs[k - m0][col - n0]: dw[k][c][r][s] when this is the only split, else this split's slice of ws
    const float* Cs = reinterpret_cast<const float*>(tiles);
    for (int e = threadIdx.x; e < TC_BM * TC_BN; e += TC_THREADS) {
        const int row = e / TC_BN, k = m0 + row, cl = n0 + e % TC_BN;
        if (k >= K || cl >= ncols) continue;
        const float v = Cs[row * TC_LDC + e % TC_BN];
        if (gridDim.z == 1) {
            int rs, c;
            fast_divmod(cl, div_c, rs, c);
            dw[(k * C + c) * RS + rs] = from_float<TW>(v);
        } else {
            ws[((long long)blockIdx.z * K + k) * ncols + cl] = v;   // consecutive threads, consecutive columns
        }
    }
}

// Version 4: dw in half.
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_bwd_weight_wmma_f16(const __half* __restrict__ x, const __half* __restrict__ dy, float* __restrict__ ws,
                           __half* __restrict__ dw, int N, int H, int W, int C, int K, int R, int S, int P, int Q,
                           int stride, int pad, int chunk, int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V4 / 2];   // declared here, not in the template
    bwd_weight_f16<false>(x, dy, ws, dw, N, H, W, C, K, R, S, P, Q, stride, pad, chunk, aligned, tiles);
}

// Version 4 with dw in float: the gradient of a float32 master weight, never rounded to half.
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_bwd_weight_wmma_f16_dw_f32(const __half* __restrict__ x, const __half* __restrict__ dy, float* __restrict__ ws,
                                  float* __restrict__ dw, int N, int H, int W, int C, int K, int R, int S, int P, int Q,
                                  int stride, int pad, int chunk, int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V4 / 2];   // declared here, not in the template
    bwd_weight_f16<false>(x, dy, ws, dw, N, H, W, C, K, R, S, P, Q, stride, pad, chunk, aligned, tiles);
}

// Version 5 (async copies): dw in half.
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_bwd_weight_wmma_async_f16(const __half* __restrict__ x, const __half* __restrict__ dy, float* __restrict__ ws,
                                 __half* __restrict__ dw, int N, int H, int W, int C, int K, int R, int S, int P, int Q,
                                 int stride, int pad, int chunk, int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V5 / 2];   // declared here, not in the template
    bwd_weight_f16<true>(x, dy, ws, dw, N, H, W, C, K, R, S, P, Q, stride, pad, chunk, aligned, tiles);
}

// Version 5 with dw in float.
extern "C" __global__ void __launch_bounds__(TC_THREADS, TC_MIN_BLOCKS)
conv2d_bwd_weight_wmma_async_f16_dw_f32(const __half* __restrict__ x, const __half* __restrict__ dy, float* __restrict__ ws,
                                        float* __restrict__ dw, int N, int H, int W, int C, int K, int R, int S, int P, int Q,
                                        int stride, int pad, int chunk, int aligned) {
    __shared__ __align__(128) __half tiles[TC_SMEM_V5 / 2];   // declared here, not in the template
    bwd_weight_f16<true>(x, dy, ws, dw, N, H, W, C, K, R, S, P, Q, stride, pad, chunk, aligned, tiles);
}

// dw[k, c, r, s] (OIHW) = sum over splits z of ws[z][k][(r * S + s) * C + c].  grid (K, ceil(C / 32)),
// block 256, dynamic shared memory 32 * (R*S | 1) floats.  Block (k, c0) moves the 32 channels c0 ..
// of all R*S taps of row k through shared memory: it reads them tap by tap (32 consecutive floats of
// ws: coalesced) and writes them channel by channel (32 * R*S consecutive elements of dw:
// coalesced).  The staging tile holds channel cl's taps at staged[cl * RSo + t], RSo = R*S made odd:
// the tap-by-tap pass writes 32 channels RSo words apart (an odd stride: 32 different banks), the
// channel-by-channel pass reads consecutive words.  (Reading ws in dw's order instead would stride
// C floats per thread.)
template <typename TW>
__device__ __forceinline__ void bwd_weight_reduce_oihw(const float* __restrict__ ws, TW* __restrict__ dw, int splits,
                                                       int K, int C, int R, int S, float* staged) {
    const int k = blockIdx.x, c0 = blockIdx.y * 32, RS = R * S, RSo = RS | 1, cn = min(32, C - c0);
    const long long slice = (long long)K * RS * C;
    for (int i = threadIdx.x; i < RS * 32; i += blockDim.x) {
        const int t = i / 32, cl = i % 32;
        if (cl >= cn) continue;
        const float* src = ws + ((long long)k * RS + t) * C + c0 + cl;
        float acc = 0.0f;
        for (int z = 0; z < splits; ++z) acc += src[z * slice];
        staged[cl * RSo + t] = acc;
    }
    __syncthreads();
    const FastDiv div_rs = make_fastdiv(RS);
    for (int i = threadIdx.x; i < cn * RS; i += blockDim.x) {
        int cl, t;
        fast_divmod(i, div_rs, cl, t);
        dw[((long long)k * C + c0) * RS + i] = from_float<TW>(staged[cl * RSo + t]);
    }
}

extern "C" __global__ void conv2d_bwd_weight_reduce_oihw_f16(const float* __restrict__ ws, __half* __restrict__ dw,
                                                             int splits, int K, int C, int R, int S) {
    extern __shared__ float staged[];
    bwd_weight_reduce_oihw(ws, dw, splits, K, C, R, S, staged);
}

extern "C" __global__ void conv2d_bwd_weight_reduce_oihw_f32(const float* __restrict__ ws, float* __restrict__ dw,
                                                             int splits, int K, int C, int R, int S) {
    extern __shared__ float staged[];
    bwd_weight_reduce_oihw(ws, dw, splits, K, C, R, S, staged);
}

// wk[k][r][s][c] (KRSC, half) = w[k][c][r][s] (OIHW, float or half): the layout versions 4 and 5
// read.  grid (K, ceil(C / 32)), block 256, dynamic shared memory 32 * (R*S | 1) floats: the
// transpose of conv2d_bwd_weight_reduce_oihw, through the same staging tile (read channel by
// channel, written tap by tap).
template <typename TW>
__device__ __forceinline__ void weight_to_krsc(const TW* __restrict__ w, __half* __restrict__ wk, int K, int C, int R,
                                               int S, float* staged) {
    const int k = blockIdx.x, c0 = blockIdx.y * 32, RS = R * S, RSo = RS | 1, cn = min(32, C - c0);
    const FastDiv div_rs = make_fastdiv(RS);
    for (int i = threadIdx.x; i < cn * RS; i += blockDim.x) {
        int cl, t;
        fast_divmod(i, div_rs, cl, t);
        staged[cl * RSo + t] = to_float(w[((long long)k * C + c0) * RS + i]);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < RS * 32; i += blockDim.x) {
        const int t = i / 32, cl = i % 32;
        if (cl < cn) wk[((long long)k * RS + t) * C + c0 + cl] = __float2half_rn(staged[cl * RSo + t]);
    }
}

extern "C" __global__ void conv_weight_f32_to_krsc_f16(const float* __restrict__ w, __half* __restrict__ wk, int K,
                                                       int C, int R, int S) {
    extern __shared__ float staged[];
    weight_to_krsc(w, wk, K, C, R, S, staged);
}

extern "C" __global__ void conv_weight_f16_to_krsc_f16(const __half* __restrict__ w, __half* __restrict__ wk, int K,
                                                       int C, int R, int S) {
    extern __shared__ float staged[];
    weight_to_krsc(w, wk, K, C, R, S, staged);
}
