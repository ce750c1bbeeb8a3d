/*
 * The emulator's <cuda_fp16.h>: IEEE binary16 (__half) and pairs of them (__half2).
 *
 * Storage is the 16-bit pattern, exactly as on a GPU, so arrays of __half are NumPy float16
 * arrays.  Conversions from float round to nearest even (bit-exact with the GPU and NumPy);
 * arithmetic is done in float and rounded back to half, which matches the GPU's correctly
 * rounded half arithmetic except, very rarely, through double rounding in fma.
 */
#ifndef KERNELS_EMU_CUDA_FP16_H
#define KERNELS_EMU_CUDA_FP16_H

#include "cuda_emu.h"

namespace emu {
/* float -> binary16, round to nearest even; NaN stays NaN (quiet), overflow -> inf. */
static inline unsigned short float_to_half_bits(float f) {
    unsigned int x;
    memcpy(&x, &f, 4);
    const unsigned int sign = (x >> 16) & 0x8000u;
    const unsigned int ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)  // inf or NaN
        return (unsigned short)(sign | (ax > 0x7f800000u ? (0x7e00u | ((ax >> 13) & 0x3ffu)) : 0x7c00u));
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (ax >= 0x38800000u) {                                          // normal half
        unsigned int r = ax - 0x38000000u;                            // rebias exponent 127 -> 15
        r += 0x0fffu + ((r >> 13) & 1u);                              // round to nearest even
        return (unsigned short)(sign | (r >> 13));
    }
    if (ax < 0x33000000u) return (unsigned short)sign;  // below half the smallest subnormal: zero
    // Subnormal half: value / 2^-24 rounded to nearest even.
    const unsigned int e = ax >> 23;
    const unsigned int mant = (ax & 0x7fffffu) | 0x800000u;
    const unsigned int shift = 126u - e;                 // 14..24
    unsigned int q = mant >> shift;
    const unsigned int rem = mant & ((1u << shift) - 1u);
    const unsigned int halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return (unsigned short)(sign | q);
}
static inline float half_bits_to_float(unsigned short h) {
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    const unsigned int exp = (h >> 10) & 0x1fu;
    unsigned int mant = h & 0x3ffu;
    unsigned int x;
    if (exp == 0x1fu) {
        x = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        x = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {
        x = sign;
    } else {  // subnormal: normalise
        int e = -1;
        do { ++e; mant <<= 1; } while (!(mant & 0x400u));
        x = sign | ((unsigned int)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}
}  // namespace emu

struct __attribute__((aligned(2))) __half {
    unsigned short __x;
    __half() = default;
    __half(float f) : __x(emu::float_to_half_bits(f)) {}
    __half(double d) : __x(emu::float_to_half_bits((float)d)) {}
    __half(int i) : __x(emu::float_to_half_bits((float)i)) {}
    __half(unsigned int i) : __x(emu::float_to_half_bits((float)i)) {}
    __half(long long i) : __x(emu::float_to_half_bits((float)i)) {}
    operator float() const { return emu::half_bits_to_float(__x); }
    __half& operator+=(const __half& o) { *this = __half(float(*this) + float(o)); return *this; }
    __half& operator-=(const __half& o) { *this = __half(float(*this) - float(o)); return *this; }
    __half& operator*=(const __half& o) { *this = __half(float(*this) * float(o)); return *this; }
    __half& operator/=(const __half& o) { *this = __half(float(*this) / float(o)); return *this; }
};
typedef __half half;
struct __attribute__((aligned(4))) __half2 {
    __half x, y;
};
typedef __half2 half2;
struct __half_raw { unsigned short x; };

static inline __half operator+(__half a, __half b) { return __half(float(a) + float(b)); }
static inline __half operator-(__half a, __half b) { return __half(float(a) - float(b)); }
static inline __half operator*(__half a, __half b) { return __half(float(a) * float(b)); }
static inline __half operator/(__half a, __half b) { return __half(float(a) / float(b)); }
static inline __half operator-(__half a) { __half r; r.__x = (unsigned short)(a.__x ^ 0x8000u); return r; }
static inline bool operator==(__half a, __half b) { return float(a) == float(b); }
static inline bool operator!=(__half a, __half b) { return float(a) != float(b); }
static inline bool operator<(__half a, __half b) { return float(a) < float(b); }
static inline bool operator<=(__half a, __half b) { return float(a) <= float(b); }
static inline bool operator>(__half a, __half b) { return float(a) > float(b); }
static inline bool operator>=(__half a, __half b) { return float(a) >= float(b); }

static inline __half __float2half(float f) { return __half(f); }
static inline __half __float2half_rn(float f) { return __half(f); }
static inline __half __double2half(double d) { return __half((float)d); }
static inline float __half2float(__half h) { return float(h); }
static inline __half __int2half_rn(int i) { return __half((float)i); }
static inline int __half2int_rn(__half h) { return (int)nearbyintf(float(h)); }
static inline int __half2int_rz(__half h) { return (int)float(h); }
static inline unsigned short __half_as_ushort(__half h) { return h.__x; }
static inline short __half_as_short(__half h) { return (short)h.__x; }
static inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
static inline __half __short_as_half(short s) { __half h; h.__x = (unsigned short)s; return h; }
static inline __half __hadd(__half a, __half b) { return a + b; }
static inline __half __hsub(__half a, __half b) { return a - b; }
static inline __half __hmul(__half a, __half b) { return a * b; }
static inline __half __hdiv(__half a, __half b) { return a / b; }
static inline __half __hfma(__half a, __half b, __half c) { return __half(fmaf(float(a), float(b), float(c))); }
static inline __half __hneg(__half a) { return -a; }
static inline __half __habs(__half a) { __half r; r.__x = (unsigned short)(a.__x & 0x7fffu); return r; }
static inline __half __hmax(__half a, __half b) { return __half(fmaxf(float(a), float(b))); }
static inline __half __hmin(__half a, __half b) { return __half(fminf(float(a), float(b))); }
static inline bool __heq(__half a, __half b) { return a == b; }
static inline bool __hne(__half a, __half b) { return a != b; }
static inline bool __hlt(__half a, __half b) { return a < b; }
static inline bool __hle(__half a, __half b) { return a <= b; }
static inline bool __hgt(__half a, __half b) { return a > b; }
static inline bool __hge(__half a, __half b) { return a >= b; }
static inline bool __hisnan(__half a) { return (a.__x & 0x7fffu) > 0x7c00u; }
static inline int __hisinf(__half a) { return (a.__x & 0x7fffu) == 0x7c00u ? ((a.__x & 0x8000u) ? -1 : 1) : 0; }
static inline __half hexp(__half a) { return __half(expf(float(a))); }
static inline __half hlog(__half a) { return __half(logf(float(a))); }
static inline __half hsqrt(__half a) { return __half(sqrtf(float(a))); }
static inline __half hrsqrt(__half a) { return __half(1.0f / sqrtf(float(a))); }
static inline __half hrcp(__half a) { return __half(1.0f / float(a)); }

static inline __half2 __halves2half2(__half a, __half b) { __half2 r; r.x = a; r.y = b; return r; }
static inline __half2 make_half2(__half a, __half b) { return __halves2half2(a, b); }
static inline __half2 __half2half2(__half a) { return __halves2half2(a, a); }
static inline __half2 __float2half2_rn(float f) { return __half2half2(__half(f)); }
static inline __half2 __floats2half2_rn(float a, float b) { return __halves2half2(__half(a), __half(b)); }
static inline float2 __half22float2(__half2 h) { return make_float2(float(h.x), float(h.y)); }
static inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
static inline float __low2float(__half2 h) { return float(h.x); }
static inline float __high2float(__half2 h) { return float(h.y); }
static inline __half __low2half(__half2 h) { return h.x; }
static inline __half __high2half(__half2 h) { return h.y; }
static inline __half2 __hadd2(__half2 a, __half2 b) { return __halves2half2(a.x + b.x, a.y + b.y); }
static inline __half2 __hsub2(__half2 a, __half2 b) { return __halves2half2(a.x - b.x, a.y - b.y); }
static inline __half2 __hmul2(__half2 a, __half2 b) { return __halves2half2(a.x * b.x, a.y * b.y); }
static inline __half2 __h2div(__half2 a, __half2 b) { return __halves2half2(a.x / b.x, a.y / b.y); }
static inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    return __halves2half2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
static inline __half2 __hmax2(__half2 a, __half2 b) { return __halves2half2(__hmax(a.x, b.x), __hmax(a.y, b.y)); }
static inline __half2 __hmin2(__half2 a, __half2 b) { return __halves2half2(__hmin(a.x, b.x), __hmin(a.y, b.y)); }
static inline __half2 operator+(__half2 a, __half2 b) { return __hadd2(a, b); }
static inline __half2 operator-(__half2 a, __half2 b) { return __hsub2(a, b); }
static inline __half2 operator*(__half2 a, __half2 b) { return __hmul2(a, b); }

/* atomicAdd on half (sm_70+) */
EMU_ATOMIC_FN __half atomicAdd(__half* address, __half val) {
    EMU_ATOMIC_SEEN(address);
    __half old = *address;
    *address = old + val;
    return old;
}
EMU_ATOMIC_FN __half2 atomicAdd(__half2* address, __half2 val) {
    EMU_ATOMIC_SEEN(address);
    __half2 old = *address;
    *address = old + val;
    return old;
}

#endif /* KERNELS_EMU_CUDA_FP16_H */
