/*
 * optimizer.cu: the parameter update, fused into one pass over memory, and the norms that LARS
 * and gradient clipping / overflow checks need.
 *
 * SGD with momentum and weight decay (the PyTorch convention, as kernels/reference.py):
 *     g = grad + wd * w
 *     v = momentum * v + g
 *     w = w - lr * (nesterov ? g + momentum * v : v)
 * Unfused, that is four elementwise kernels (axpy, scale, add, axpy) reading and writing w, v
 * several times; fused, each element is read once (w, grad, v) and written once (w, v):
 * 20 bytes per parameter, about 0.5 GB per step for ResNet-50's 25.6 M parameters.
 *
 * Multi-tensor ("flat") version, the one nn.optim uses.  ResNet-50 has 161 parameter tensors, many tiny (BN's gamma and
 * beta of 64 values).  One launch per tensor costs ~161 launches of a few microseconds each,
 * longer than the work.  So all parameters live in ONE flat buffer (and grads and momenta in
 * two more, laid out alike), tensor s occupying [offset_s, offset_{s+1}).  A segment table,
 * built once on the host, cuts every tensor into chunks of at most chunk_size elements:
 *     chunk_start[j] .. chunk_start[j + 1]   the elements of chunk j (chunks cover the buffer in
 *                                            order and never straddle two tensors)
 *     chunk_segment[j]                       the tensor chunk j belongs to
 * Block b handles chunks b, b + gridDim.x, ...: it reads its tensor's weight decay (0 for BN
 * parameters and biases, as MLPerf requires) and optional learning-rate scale (the LARS trust
 * ratio) once, then streams the chunk.  One launch updates every parameter.  The learning rate,
 * the 1/loss-scale of mixed precision and the "skip this step" flag are read from device memory,
 * so that a step never waits for the host and can be captured as a CUDA graph.
 *
 * LARS (the MLPerf reference): the learning rate goes inside the momentum,
 *     v = momentum * v + lr * trust_s * (g + wd * w);   w = w - v
 * (lr_in_momentum = 1 in momentum_update_flat_f32).
 *
 * LARS trust ratio per tensor s:  eta * ||w_s|| / (||g_s|| + wd_s * ||w_s|| + eps), 1 where
 * either norm is 0.  The norms come from a two-stage reduction: stage 1 gives one partial sum of
 * squares per chunk (a block reduction: warp shuffles, then shared memory), stage 2 gives one
 * thread per tensor that adds its chunks' partials in double, in order (deterministic).
 * Global gradient norm: sqrt of the sum of squares over every gradient; partials per block of
 * each gradient array, then one block adds all partials in double.
 *
 * Mixed precision on the device: nonfinite_flag_f32 sets a flag when a gradient holds NaN/inf
 * (exact, unlike testing the norm, which a large finite gradient can overflow); the update reads
 * the flag and skips the step; loss_scale_update adapts the scale and clears the flag.
 *
 * Versions of the update (`python -m kernels.optimizer` checks and times each; the launchers are
 * kernels/optimizer.py; the norms are the same in versions 1 and 2, the loss scaler in all three):
 *   version 1  sgd_momentum_update_f32: one tensor per launch, every element read once and
 *              written once (fused).  ResNet-50's 161 tensors take 161 launches.
 *   version 2  momentum_update_flat_f32: every tensor in one launch over the flat buffers (the
 *              multi-tensor update), so the cost of 160 launches is gone; the learning rate and the
 *              loss scale are read from device memory, so a step never waits for the host.
 *   version 3  version 2's update; the norms (LARS trust ratios, the global gradient norm) load
 *              float4 vectors, four loads in flight per thread, where the scalar loops had one: the
 *              memory system, not the wait for each load, limits them.  The global norm's partial
 *              sums are one per block of a grid of at most 1024 (25,000 before, which one block then
 *              added), and no launch zeroes them first (every block writes its own).
 * On a GPU, at ResNet-50's 25.6 M parameters (`python -m kernels.optimizer` prints the performance
 * model's prediction; measured on an H100 by bench.kernels): version 1 4.0 ms predicted, 4.65 ms
 * measured: 161 launches of ~25 us of host time each, the kernels themselves idle in between;
 * version 2 193 us predicted (DRAM), 264 us measured (65 % of copy bandwidth): the model is 0.73x.
 * Each block's chunk is a loop of one element at a time per thread, three loads in flight per
 * warp; with ~31 warps an SM that is just enough for the bandwidth by Little's law at the idle
 * DRAM latency, and a loaded memory system answers later than idle: latency, not bandwidth,
 * is the likelier limit on the GPU (two elements per thread would put twice the bytes in flight).
 * Version 3's norms (predicted, not measured): LARS trust ratios 90 us (76 % of copy bandwidth:
 * 61 us of DRAM-bound kernel and two launches' host time), against 184 us predicted and 165 us
 * measured for versions 1-2; the global gradient norm 77 us (34 us of kernels; its two launches and
 * the read of the result are host time in the model: 45 %), against 144 predicted and 119 measured.
 */
#include "common.cuh"   // GRID_STRIDE_LOOP, FULL_MASK, block_sum, block_sum_of

__device__ __forceinline__ void sgd_step(float& w, float grad, float& v, float lr, float momentum,
                                         float weight_decay, bool nesterov) {
    float g = grad + weight_decay * w;
    v = momentum * v + g;
    w -= lr * (nesterov ? g + momentum * v : v);
}

/* ------------------------------------------------------------ version 1: one tensor */
extern "C" __global__ void sgd_momentum_update_f32(float* __restrict__ param, const float* __restrict__ grad,
                                                   float* __restrict__ momentum_buf, long long n, float lr,
                                                   float momentum, float weight_decay, int nesterov) {
    GRID_STRIDE_LOOP(i, n) {
        float w = param[i], v = momentum_buf[i];
        sgd_step(w, grad[i], v, lr, momentum, weight_decay, nesterov != 0);
        param[i] = w;
        momentum_buf[i] = v;
    }
}

/* ------------------------------------------------------------ version 2: all tensors, one flat buffer */
/* Every value that changes from step to step is read from DEVICE memory, not passed as a kernel
 * argument: a CUDA graph bakes arguments in at capture, so a captured step replays with the
 * current learning rate, loss scale and overflow flag only if they live in buffers.
 *   lr[0]            the learning rate (the schedule writes it before each step)
 *   grad_scale       null, or [1]: every gradient is multiplied by it first (1 / loss scale)
 *   skip             null, or [1]: when nonzero nothing changes (an fp16 step that overflowed)
 *   segment_lr_scale null, or [S]: a per-tensor multiplier of lr (the LARS trust ratios)
 *   lr_in_momentum   0: v = m*v + g;       w -= lr_s * (nesterov ? g + m*v : v)   (SGD, PyTorch)
 *                    1: v = m*v + lr_s*g;  w -= v                               (LARS, MLPerf)
 * with g = grad * grad_scale + wd_s * w and lr_s = lr * lr_scale_s. */
extern "C" __global__ void momentum_update_flat_f32(float* __restrict__ param, const float* __restrict__ grad,
                                                    float* __restrict__ momentum_buf,
                                                    const long long* __restrict__ chunk_start,
                                                    const int* __restrict__ chunk_segment, int num_chunks,
                                                    const float* __restrict__ segment_weight_decay,
                                                    const float* __restrict__ segment_lr_scale,
                                                    const float* __restrict__ lr, const float* __restrict__ grad_scale,
                                                    const int* __restrict__ skip, float momentum, int nesterov,
                                                    int lr_in_momentum) {
    if (skip && skip[0]) return;  /* the same for every thread: no divergence */
    const float base_lr = lr[0];
    for (int chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
        const int seg = chunk_segment[chunk];
        const float wd = segment_weight_decay[seg];
        const float seg_lr = segment_lr_scale ? base_lr * segment_lr_scale[seg] : base_lr;
        const long long end = chunk_start[chunk + 1];
        for (long long i = chunk_start[chunk] + threadIdx.x; i < end; i += blockDim.x) {
            float w = param[i], v = momentum_buf[i];
            const float gi = grad_scale ? grad[i] * grad_scale[0] : grad[i];
            if (lr_in_momentum) {
                v = momentum * v + seg_lr * (gi + wd * w);
                w -= v;
            } else {
                sgd_step(w, gi, v, seg_lr, momentum, wd, nesterov != 0);
            }
            param[i] = w;
            momentum_buf[i] = v;
        }
    }
}

/* ------------------------------------------------------------ mixed precision on the device */
/* flag[0] = 1 if any x[i] is NaN or inf (left as it is otherwise): the overflow check of dynamic
 * loss scaling, without a trip to the host.  atomicOr: many blocks may find one. */
extern "C" __global__ void nonfinite_flag_f32(const float* __restrict__ x, long long n, int* __restrict__ flag) {
    int found = 0;
    GRID_STRIDE_LOOP(i, n) found |= !isfinite(x[i]);
    if (__any_sync(FULL_MASK, found) && threadIdx.x % 32 == 0) atomicOr(flag, 1);
}

/* The loss scaler's step, by one thread.  scale_state = [S, 1/S]; counts = [found_inf, good_steps,
 * skipped_steps].  An overflow (found_inf) counts a skipped step and, when dynamic, halves S
 * (backoff) down to min_scale; growth_interval clean steps in a row multiply S by growth.
 * found_inf is consumed: reset to 0 for the next step. */
extern "C" __global__ void loss_scale_update(float* __restrict__ scale_state, int* __restrict__ counts, int dynamic,
                                             float growth_factor, float backoff_factor, int growth_interval,
                                             float min_scale) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    float scale = scale_state[0];
    if (counts[0]) {
        counts[2] += 1;
        if (dynamic) {
            scale = fmaxf(scale * backoff_factor, min_scale);
            counts[1] = 0;
        }
    } else if (dynamic) {
        counts[1] += 1;
        if (counts[1] >= growth_interval) {
            scale *= growth_factor;
            counts[1] = 0;
        }
    }
    scale_state[0] = scale;
    scale_state[1] = 1.0f / scale;
    counts[0] = 0;
}

/* ------------------------------------------------------------ norms (block_sum: common.cuh) */
/* Stage 1: partial_a[j] = sum of a^2 over chunk j (and partial_b from b, when b is not null). */
extern "C" __global__ void chunk_sum_squares_f32(const float* __restrict__ a, const float* __restrict__ b,
                                                 const long long* __restrict__ chunk_start, int num_chunks,
                                                 float* __restrict__ partial_a, float* __restrict__ partial_b) {
    __shared__ float shared[32];
    for (int chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
        const long long end = chunk_start[chunk + 1];
        float sa = 0.0f, sb = 0.0f;
        for (long long i = chunk_start[chunk] + threadIdx.x; i < end; i += blockDim.x) {
            sa += a[i] * a[i];
            if (b) sb += b[i] * b[i];
        }
        sa = block_sum(sa, shared);
        if (b) sb = block_sum(sb, shared);  // b is the same for the whole block: no divergent barrier
        if (threadIdx.x == 0) {
            partial_a[chunk] = sa;
            if (b) partial_b[chunk] = sb;
        }
    }
}

/* Stage 2: one thread per tensor: its norms from its chunks' partials, and its trust ratio.
 * segment_use_trust: null (every tensor) or [S]: 0 gives ratio 1 (BN parameters and biases skip
 * LARS).  grad_scale: null or [1], the factor of the gradients (1 / loss scale): ||g|| is scaled. */
extern "C" __global__ void lars_segment_ratios(const float* __restrict__ partial_w, const float* __restrict__ partial_g,
                                               const int* __restrict__ segment_first_chunk, int num_segments,
                                               const float* __restrict__ segment_weight_decay,
                                               const int* __restrict__ segment_use_trust,
                                               const float* __restrict__ grad_scale, float eta, float eps,
                                               float* __restrict__ ratios, float* __restrict__ w_norms,
                                               float* __restrict__ g_norms) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= num_segments) return;
    double sw = 0.0, sg = 0.0;
    for (int j = segment_first_chunk[s]; j < segment_first_chunk[s + 1]; ++j) {
        sw += partial_w[j];
        sg += partial_g[j];
    }
    const double w_norm = sqrt(sw), g_norm = sqrt(sg) * (grad_scale ? (double)grad_scale[0] : 1.0);
    if (segment_use_trust && !segment_use_trust[s]) {
        ratios[s] = 1.0f;
        if (w_norms) w_norms[s] = (float)w_norm;
        if (g_norms) g_norms[s] = (float)g_norm;
        return;
    }
    const double wd = segment_weight_decay[s];
    ratios[s] = (w_norm == 0.0 || g_norm == 0.0) ? 1.0f : (float)(eta * w_norm / (g_norm + wd * w_norm + eps));
    if (w_norms) w_norms[s] = (float)w_norm;
    if (g_norms) g_norms[s] = (float)g_norm;
}

/* ------------------------------------------------------------ global gradient norm */
/* partial[blockIdx.x] = sum of x^2 over this block's grid-stride share of x. */
extern "C" __global__ void sum_squares_blocks_f32(const float* __restrict__ x, long long n, float* __restrict__ partial) {
    __shared__ float shared[32];
    float s = 0.0f;
    GRID_STRIDE_LOOP(i, n) s += x[i] * x[i];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/* out[0] = sqrt(sum of partial[0..n)), added in double by one block. */
extern "C" __global__ void sqrt_of_sum_f32(const float* __restrict__ partial, int n, float* __restrict__ out) {
    __shared__ double shared[32];
    const double s = block_sum_of<double>(partial, n, shared);
    if (threadIdx.x == 0) out[0] = (float)sqrt(s);
}

/* ------------------------------------------------------------ version 3: the norms in 16-byte vectors */
/* Versions 1 and 2 read one float per thread per loop trip: a warp waits a DRAM latency for 128 bytes,
 * and the reductions ran at a third of the bandwidth.  Here each trip loads float4 vectors, and the loops
 * are unrolled four times with independent loads, so a warp has 2 KB in flight (4 KB for LARS's two
 * arrays).  The arrays must start on a 16-byte boundary (the launchers check, and run the scalar kernels
 * otherwise); a chunk that does not start or end on a multiple of 4 floats has its few odd floats added
 * one per thread.  Same two-level, fixed-order reductions as before: deterministic. */

/* The sum of squares of the 4 floats at p (16-byte aligned). */
__device__ __forceinline__ float sum_squares4(const float* p) {
    float v[4];
    load_vec16(p, v);
    return v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3];
}

/* Stage 1 of the LARS norms: partial_a[j], partial_b[j] = sums of squares of a and b over chunk j. */
extern "C" __global__ void chunk_sum_squares_vec_f32(const float* __restrict__ a, const float* __restrict__ b,
                                                     const long long* __restrict__ chunk_start, int num_chunks,
                                                     float* __restrict__ partial_a, float* __restrict__ partial_b) {
    __shared__ float shared[32];
    for (int chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
        const long long start = chunk_start[chunk], end = chunk_start[chunk + 1];
        // whole vectors [first, last) of 4 floats; the floats before and after them one per thread
        const long long first = min(end, (start + 3) & ~3LL), last = max(first, end & ~3LL);
        float sa = 0.0f, sb = 0.0f;
        const long long odd = threadIdx.x < first - start ? start + threadIdx.x
                              : (threadIdx.x - (first - start) < end - last ? last + threadIdx.x - (first - start) : -1);
        if (odd >= 0) {
            sa = a[odd] * a[odd];
            sb = b[odd] * b[odd];
        }
#pragma unroll 4
        for (long long v = first / 4 + threadIdx.x; v < last / 4; v += blockDim.x) {
            sa += sum_squares4(a + 4 * v);
            sb += sum_squares4(b + 4 * v);
        }
        sa = block_sum(sa, shared);
        sb = block_sum(sb, shared);
        if (threadIdx.x == 0) {
            partial_a[chunk] = sa;
            partial_b[chunk] = sb;
        }
    }
}

/* The global gradient norm's stage 1: partial[blockIdx.x] = sum of x^2 over this block's share of x, in
 * float4 vectors four at a time (x 16-byte aligned); the n % 4 floats at the end by the first threads. */
extern "C" __global__ void sum_squares_vec_f32(const float* __restrict__ x, long long n, float* __restrict__ partial) {
    __shared__ float shared[32];
    const long long vectors = n / 4, stride = (long long)blockDim.x * gridDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;   // four independent sums: four loads in flight
    long long v = first;
    for (; v + 3 * stride < vectors; v += 4 * stride) {
        s0 += sum_squares4(x + 4 * v);
        s1 += sum_squares4(x + 4 * (v + stride));
        s2 += sum_squares4(x + 4 * (v + 2 * stride));
        s3 += sum_squares4(x + 4 * (v + 3 * stride));
    }
    for (; v < vectors; v += stride) s0 += sum_squares4(x + 4 * v);
    if (first < n - 4 * vectors) s1 += x[4 * vectors + first] * x[4 * vectors + first];
    const float s = block_sum((s0 + s1) + (s2 + s3), shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
