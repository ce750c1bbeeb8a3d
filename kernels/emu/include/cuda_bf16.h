/*
 * The emulator's <cuda_bf16.h>: bfloat16 (__nv_bfloat16), the top 16 bits of a float.
 *
 * Storage is the 16-bit pattern: on the NumPy side a bfloat16 array is a uint16 array holding
 * those bits (NumPy has no bfloat16).  float -> bfloat16 rounds to nearest even, as the GPU does.
 */
#ifndef KERNELS_EMU_CUDA_BF16_H
#define KERNELS_EMU_CUDA_BF16_H

#include "cuda_emu.h"

namespace emu {
static inline unsigned short float_to_bf16_bits(float f) {
    unsigned int x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x0040u);  // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return (unsigned short)(x >> 16);
}
static inline float bf16_bits_to_float(unsigned short b) {
    unsigned int x = (unsigned int)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}
}  // namespace emu

struct __attribute__((aligned(2))) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(emu::float_to_bf16_bits(f)) {}
    __nv_bfloat16(double d) : __x(emu::float_to_bf16_bits((float)d)) {}
    __nv_bfloat16(int i) : __x(emu::float_to_bf16_bits((float)i)) {}
    operator float() const { return emu::bf16_bits_to_float(__x); }
    __nv_bfloat16& operator+=(const __nv_bfloat16& o) { *this = __nv_bfloat16(float(*this) + float(o)); return *this; }
    __nv_bfloat16& operator*=(const __nv_bfloat16& o) { *this = __nv_bfloat16(float(*this) * float(o)); return *this; }
};
typedef __nv_bfloat16 nv_bfloat16;
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __nv_bfloat162 nv_bfloat162;

static inline __nv_bfloat16 operator+(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) + float(b)); }
static inline __nv_bfloat16 operator-(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) - float(b)); }
static inline __nv_bfloat16 operator*(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) * float(b)); }
static inline __nv_bfloat16 operator/(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) / float(b)); }
static inline bool operator<(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) < float(b); }
static inline bool operator>(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) > float(b); }

static inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
static inline float __bfloat162float(__nv_bfloat16 b) { return float(b); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 b; b.__x = u; return b; }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    __nv_bfloat162 r; r.x = __nv_bfloat16(a); r.y = __nv_bfloat16(b); return r;
}
static inline float2 __bfloat1622float2(__nv_bfloat162 h) { return make_float2(float(h.x), float(h.y)); }
static inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
static inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
static inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
    return __nv_bfloat16(fmaf(float(a), float(b), float(c)));
}

#endif /* KERNELS_EMU_CUDA_BF16_H */
