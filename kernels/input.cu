/*
 * input.cu: the first thing the device does with a batch from the loader.
 *
 *     x[n, h, w, c] = (image[n, h, w, c] - mean[c]) / std[c]        c in {R, G, B}
 *
 * image is uint8 NHWC as the loader delivers it (no layout change: the model is NHWC too);
 * x is float32 or float16.  std = 1 when the recipe does no division (the MLPerf reference
 * subtracts the mean only).  Doing it on the device moves 1 byte per value over PCIe instead
 * of 4, and the kernel is a single pass: read 1 byte, write 4 (or 2).
 *
 * Versions (`python -m kernels.input` checks and times each; the launcher is kernels/input.py):
 *   version 1  input_normalize_f32/_f16: one thread per value; the channel is i % 3: measured
 *              faster than version 2 on an H100 (153 us against 178 us at 256x224x224).
 *              Each warp reads 32 bytes and writes 128, coalesced; i % 3 by a constant is a
 *              multiply-high, not a division.  The model says it is limited by instruction issue
 *              (about 30 instructions per value).
 *   version 2  input_normalize_vec4_f32: four pixels per thread, moved as three 4-byte loads and
 *              three 16-byte (float4) stores: a quarter of the memory instructions.  Four pixels
 *              = 12 bytes always start with channel R, so the channel pattern is fixed at compile
 *              time (no % 3).  Needs 4-byte aligned input and 16-byte aligned output (the launcher
 *              checks, and runs version 1 otherwise, and for float16); the last (n_pixels % 4)
 *              pixels are done one value at a time.  Fewer instructions did not make it faster on
 *              the H100: the performance model predicts it 1.6x faster than version 1 (85 us,
 *              limited by DRAM) and the GPU measured it 1.16x slower; the cause is not known
 *              (each warp's float4 stores write every second half of 32 sectors, its loads read
 *              12 sectors for 4 bytes a lane: bench/NOTES.md, "Predicted beside measured").
 *   version 3  input_normalize_tiles_f32/_f16: 16-byte loads and 16-byte stores, through shared
 *              memory.  A block stages 4096 image bytes in shared memory, loaded as 16-byte
 *              vectors (a warp: 512 contiguous bytes), and writes the output as
 *              16-byte vectors (4 floats or 8 halves; a warp: 512 contiguous bytes), so both sides
 *              move whole 32-byte sectors in every instruction, where version 2's lanes stored 48
 *              bytes apart and loaded 12 apart; and it multiplies by 1/std instead of dividing each
 *              value (an IEEE division is a call with a slow path: versions 1 and 2 pay it per
 *              value, std or not).  float32 and float16; 16-byte aligned buffers (otherwise version
 *              1 runs).  Predicted (not measured; the model ordered versions 1 and 2 wrongly,
 *              bench/NOTES.md): float32 85 us (76 % of copy bandwidth, DRAM), float16 62 us (37 us
 *              of kernel at DRAM speed and 25 us of host time for its launch), against version 1's
 *              132 and 119 us (153 and 126 measured).  The default: if the H100 disagrees, as with
 *              version 2, version 1 is one flag away (--kernels input=1).
 * mean and std arrive as kernel arguments (3 floats each): nothing to copy to the device.
 */
#include <cuda_fp16.h>
#include "common.cuh"   // GRID_STRIDE_LOOP, from_float, store_float4, KERNEL_ENTRY

__device__ __forceinline__ float normalize_value(unsigned char v, int c, float m0, float m1, float m2, float s0,
                                                 float s1, float s2) {
    const float mean = c == 0 ? m0 : (c == 1 ? m1 : m2);
    const float std = c == 0 ? s0 : (c == 1 ? s1 : s2);
    return ((float)v - mean) / std;
}

/* version 1: n = number of values (pixels * 3); T = float or __half */
template <typename T>
__device__ void input_normalize(const unsigned char* __restrict__ image, T* __restrict__ x, long long n, float m0,
                                float m1, float m2, float s0, float s1, float s2) {
    GRID_STRIDE_LOOP(i, n) { x[i] = from_float<T>(normalize_value(image[i], (int)(i % 3), m0, m1, m2, s0, s1, s2)); }
}

KERNEL_ENTRY(input_normalize_f32, input_normalize<float>)
KERNEL_ENTRY(input_normalize_f16, input_normalize<__half>)

/* version 2: n_pixels = N*H*W */
extern "C" __global__ void input_normalize_vec4_f32(const unsigned char* __restrict__ image, float* __restrict__ x,
                                                    long long n_pixels, float m0, float m1, float m2, float s0,
                                                    float s1, float s2) {
    const long long groups = n_pixels / 4;
    const unsigned int* in = (const unsigned int*)image;  // 12 bytes = 3 words per group
    GRID_STRIDE_LOOP(g, groups) {
        const unsigned int w[3] = {in[3 * g], in[3 * g + 1], in[3 * g + 2]};
        float v[12];
#pragma unroll
        for (int j = 0; j < 12; ++j) {
            // little-endian: byte j of the group is byte (j % 4) of word j / 4; channel j % 3
            const unsigned char byte = (unsigned char)(w[j / 4] >> (8 * (j % 4)));
            v[j] = normalize_value(byte, j % 3, m0, m1, m2, s0, s1, s2);
        }
#pragma unroll
        for (int j = 0; j < 12; j += 4) store_float4(x + 12 * g + j, v + j);  // 12 floats = 3 float4
    }
    // the leftover pixels (fewer than 4): one value per thread of the first block
    const long long tail_start = groups * 12, n = n_pixels * 3;
    if (blockIdx.x == 0)
        for (long long i = tail_start + threadIdx.x; i < n; i += blockDim.x)
            x[i] = normalize_value(image[i], (int)(i % 3), m0, m1, m2, s0, s1, s2);
}

/* version 3: 16-byte loads of the image staged in shared memory, 16-byte stores.  A block of 256
 * threads takes a tile of 4096 image bytes: thread t loads bytes 16t .. 16t + 15 (a warp: 512
 * contiguous bytes), then, after a barrier, makes output vectors o = t, t + 256, ... of the tile: 4 floats
 * or 8 halves (16 bytes; a warp stores 512 contiguous bytes) from the tile's bytes 4o or 8o onwards, read
 * from shared memory as 32-bit words.  Both sides move whole 32-byte sectors per warp instruction.  The
 * channel of value i is i % 3: the tile's first value's channel is start % 3 (4096 = 1 mod 3), and each
 * next value's the next one.  x = (v - mean) * (1 / std): three divisions per thread instead of one per
 * value (the same bits as version 1 without std, as MLPerf runs it; within one float rounding with it).
 * The values after the last whole tile are done one per thread.  blockDim must be 256; image and x
 * 16-byte aligned (the launcher checks, and runs version 1 otherwise). */
#define INPUT_TILE 4096

__device__ __forceinline__ float of_channel(int c, float v0, float v1, float v2) {
    return c == 0 ? v0 : (c == 1 ? v1 : v2);
}

template <typename T>
__device__ void input_normalize_tiles(const unsigned char* __restrict__ image, T* __restrict__ x, long long n,
                                      float m0, float m1, float m2, float s0, float s1, float s2) {
    __shared__ unsigned int words[INPUT_TILE / 4];
    constexpr int V = VEC16(T), WORDS = V / 4;   // values per output vector; its image bytes as 32-bit words
    const float r0 = 1.0f / s0, r1 = 1.0f / s1, r2 = 1.0f / s2;
    const long long tiles = n / INPUT_TILE;
    for (long long b = blockIdx.x; b < tiles; b += gridDim.x) {
        const long long start = b * INPUT_TILE;
        reinterpret_cast<uint4*>(words)[threadIdx.x] = __ldg(reinterpret_cast<const uint4*>(image + start) + threadIdx.x);
        __syncthreads();
        const int phase = (int)(start % 3);
        for (int o = threadIdx.x; o < INPUT_TILE / V; o += blockDim.x) {
            unsigned int w[WORDS];
#pragma unroll
            for (int k = 0; k < WORDS; ++k) w[k] = words[o * WORDS + k];
            int c = (phase + o * V) % 3;
            float f[V];
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float v = (float)((w[j / 4] >> (8 * (j % 4))) & 0xffu);   // little-endian: byte j
                f[j] = (v - of_channel(c, m0, m1, m2)) * of_channel(c, r0, r1, r2);
                c = c == 2 ? 0 : c + 1;
            }
            store_vec16(x + start + (long long)o * V, f);
        }
        __syncthreads();   // the tile is read: the next may overwrite it
    }
    GRID_STRIDE_LOOP(t, n - tiles * INPUT_TILE) {
        const long long i = tiles * INPUT_TILE + t;
        const int c = (int)(i % 3);
        x[i] = from_float<T>(((float)image[i] - of_channel(c, m0, m1, m2)) * of_channel(c, r0, r1, r2));
    }
}

KERNEL_ENTRY(input_normalize_tiles_f32, input_normalize_tiles<float>)
KERNEL_ENTRY(input_normalize_tiles_f16, input_normalize_tiles<__half>)
