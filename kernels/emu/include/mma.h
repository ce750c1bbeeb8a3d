/*
 * The emulator's <mma.h>: nvcuda::wmma, the warp-level matrix multiply-accumulate API of the
 * tensor cores (sm_70+), emulated on the CPU.
 *
 * What is emulated (the subset a WMMA GEMM needs):
 *   fragment<matrix_a,    M, N, K, T, row_major | col_major>   an M x K tile of A
 *   fragment<matrix_b,    M, N, K, T, row_major | col_major>   a  K x N tile of B
 *   fragment<accumulator, M, N, K, float | __half>             an M x N tile of C
 *     with (M, N, K) = (16, 16, 16), (32, 8, 16) or (8, 32, 16); T = __half (or any type that
 *     converts to float, e.g. __nv_bfloat16, signed char).
 *   fill_fragment(f, v), load_matrix_sync(f, p, ldm[, layout]), store_matrix_sync(p, f, ldm,
 *   mem_row_major | mem_col_major), mma_sync(d, a, b, c): d = a @ b + c.
 *
 * How: a fragment is spread over the warp's 32 lanes, as on the GPU: lane l holds the tile's
 * elements l, l + 32, l + 64, ... (counting row by row), num_elements = (tile size) / 32 of them.
 * mma_sync gathers the warp's pieces of A and B into a per-warp scratch area, __syncwarp(), and each
 * lane computes its own elements of D, every one as sum_k a(i, k) * b(k, j) added to c(i, j) in
 * order k = 0..K-1, in float (products of halves are exact in float; the hardware's order of the
 * float additions is unspecified, so last-bit differences from a GPU are possible).  Spreading the
 * work is also what makes it fast: a lane does 1/32 of the tile's multiply-adds, not all of them.
 *
 * Which lane holds which element is deliberately unspecified by CUDA and differs between GPU
 * generations (and from the layout here).  Code that touches frag.x[i] one element at a time may
 * only do things that are the same for every element (scale all, ReLU all, convert all); it must
 * never assume that x[i] is element (i / 16, i % 16) or any other: store the fragment to memory
 * with store_matrix_sync to see elements at known places.
 *
 * Memory traffic as the hardware moves it: a tile in memory is `lines` rows (row-major) or
 * columns (col-major) `ldm` elements apart, cut into 16-byte pieces, and lane l of the warp
 * moves pieces l, l + 32, ... (what ldmatrix/stmatrix do: one 16-byte row piece per lane).
 * store_matrix_sync writes exactly that: each lane its own pieces (taken from the warp's scratch
 * area, where every lane first puts its elements), then a __syncwarp(), so every byte has one
 * writer, as on the GPU.  load_matrix_sync copies each lane's elements uninstrumented; in
 * sanitized builds (KERNELS_EMU_SANITIZE, kernels.profile()) each lane also reads its own pieces,
 * 16 bytes at a time: those reads are what memcheck, racecheck, initcheck and the profiler's
 * sectors and bank conflicts see.
 *
 * Like the hardware, the emulation insists that: all 32 lanes of the warp take part (each call is
 * a __syncwarp(), so a divergent call is reported; a warp of fewer than 32 threads is refused), pointers are 32-byte aligned, ldm is a
 * multiple of 8 for 16-bit elements and of 4 for 32-bit ones.  Violations stop the kernel with a
 * message instead of silently "working" here and failing on the GPU.
 */
#ifndef KERNELS_EMU_MMA_H
#define KERNELS_EMU_MMA_H

#include "cuda_emu.h"
#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <class Use, int M, int N, int K> struct tile_shape;
template <int M, int N, int K> struct tile_shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct tile_shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct tile_shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <int M, int N, int K>
struct supported_shape {
    static constexpr bool value = (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
                                  (M == 8 && N == 32 && K == 16);
};

template <class T> static inline float to_float(const T& v) { return (float)v; }
template <class T> static inline T from_float(float v) { return (T)v; }

static inline unsigned thread_rank() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
static inline unsigned lane_id() { return thread_rank() % 32; }

/* Each warp's scratch area for mma_sync and store_matrix_sync: A and B of one product as floats
 * (at most 512 elements each), or one accumulator tile.  One launch runs at a time in a process,
 * and its blocks one after another, so one area per warp of a block is enough. */
struct alignas(16) warp_scratch { float a[512], b[512]; };
static warp_scratch g_scratch[32];

static inline warp_scratch& scratch() { return g_scratch[thread_rank() / 32]; }

/* Called first by every wmma function: the calling thread's warp has 32 lanes. */
static inline void require_full_warp(const char* what) {
    const unsigned threads = blockDim.x * blockDim.y * blockDim.z, rank = thread_rank();
    if (rank - rank % 32 + 32 > threads)
        __emu_kernel_fail("wmma: every warp taking part needs all 32 lanes (the block's size is not a multiple of 32)",
                          "<mma.h>", 0, what);
}

/* The 16-byte piece s of a tile of `lines` lines `line_bytes` long, `ldm_bytes` apart. */
static inline size_t piece_offset(int s, int lines, unsigned ldm_bytes) {
    return (size_t)(s % lines) * ldm_bytes + (size_t)(s / lines) * 16;
}

#ifdef __KERNELS_EMU_SANITIZE__
#define EMU_WMMA_COPY __attribute__((no_sanitize_thread, noinline))
/* The reads a warp's load_matrix_sync makes on a GPU, this lane's share (see the header). */
static inline void read_pieces(const void* p, int lines, int line_bytes, unsigned ldm_bytes) {
    for (int s = lane_id(); s < lines * (line_bytes / 16); s += 32)
        (void)*reinterpret_cast<const volatile __int128*>(static_cast<const char*>(p) + piece_offset(s, lines, ldm_bytes));
}
#else
#define EMU_WMMA_COPY
static inline void read_pieces(const void*, int, int, unsigned) {}
#endif

/* This lane's elements of the tile at p, row-major (element (i, j) at p[i * ldm + j]) or column-major
 * (at p[j * ldm + i]): x[e] = element t = e * 32 + lane, (i, j) = (t / cols, t % cols).  Unseen by
 * the checks (read_pieces makes the reads they see). */
template <class T>
EMU_WMMA_COPY static void copy_tile(T* x, const T* p, int rows, int cols, unsigned ldm, bool row) {
    const int lane = (int)lane_id();
    for (int t = lane, e = 0; t < rows * cols; t += 32, ++e) {
        const int i = t / cols, j = t % cols;
        x[e] = row ? p[(size_t)i * ldm + j] : p[(size_t)j * ldm + i];
    }
}

/* This lane's elements into the warp's scratch tile (as float, or as T for a store). */
template <class S, class T>
EMU_WMMA_COPY static void to_scratch(S* tile, const T* x, int size) {
    for (int t = (int)lane_id(), e = 0; t < size; t += 32, ++e) tile[t] = (S)x[e];
}

/* This lane's elements of d = a @ b + c, a (M x K) and b (K x N) in the warp's scratch. */
template <int M, int N, int K, class TC, class TD>
EMU_WMMA_COPY static void multiply(TD* d, const TC* c, const float* a, const float* b, bool satf) {
    for (int t = (int)lane_id(), e = 0; t < M * N; t += 32, ++e) {
        const int i = t / N, j = t % N;
        float s = to_float(c[e]);
        for (int k = 0; k < K; ++k) s += a[i * K + k] * b[k * N + j];
        if (satf) s = s != s ? 0.0f : (s > FLT_MAX ? FLT_MAX : (s < -FLT_MAX ? -FLT_MAX : s));
        d[e] = from_float<TD>(s);
    }
}

/* One 16-byte piece of a line of the scratch tile (rows x cols, row-major), for store_matrix_sync. */
template <class T>
EMU_WMMA_COPY static __int128 piece_of(const T* tile, int cols, int line, int first, bool row) {
    T piece[16 / sizeof(T)];
    for (int e = 0; e < (int)(16 / sizeof(T)); ++e)
        piece[e] = row ? tile[line * cols + first + e] : tile[(first + e) * cols + line];
    __int128 bits;
    memcpy(&bits, piece, 16);
    return bits;
}

static inline void check_pointer(const void* p, unsigned ldm, size_t elem_bytes, const char* what) {
    if (((uintptr_t)p) % 32 != 0)
        __emu_kernel_fail("wmma: the matrix pointer must be 32-byte (256-bit) aligned", "<mma.h>", 0, what);
    if ((ldm * elem_bytes) % 16 != 0)
        __emu_kernel_fail("wmma: ldm must be a multiple of 16 bytes (8 halves / 4 floats)", "<mma.h>", 0, what);
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
    static_assert(detail::supported_shape<M, N, K>::value, "wmma: supported shapes are 16x16x16, 32x8x16, 8x32x16");
    static_assert(std::is_same<Use, accumulator>::value || std::is_same<Layout, row_major>::value ||
                      std::is_same<Layout, col_major>::value,
                  "wmma: matrix_a / matrix_b fragments need a row_major or col_major layout");
    static_assert(!std::is_same<Use, accumulator>::value || std::is_same<Layout, void>::value,
                  "wmma: accumulator fragments take no layout (it is given to load/store instead)");

public:
    typedef T element_type;
    static constexpr int rows = detail::tile_shape<Use, M, N, K>::rows;
    static constexpr int cols = detail::tile_shape<Use, M, N, K>::cols;
    static_assert((rows * cols) % 32 == 0, "wmma: a tile spreads evenly over 32 lanes");
    static constexpr int num_elements = rows * cols / 32;   // this lane's share (see the header)
    T x[num_elements];
};

template <class Use, int M, int N, int K, class T, class L, class V>
static inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
    detail::require_full_warp("fill_fragment");
    __syncwarp();
    const T value = (T)v;
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = value;
}

// matrix_a / matrix_b: the layout is part of the fragment's type
template <class Use, int M, int N, int K, class T, class L>
static inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
    static_assert(!std::is_same<Use, accumulator>::value,
                  "wmma: load an accumulator with load_matrix_sync(f, p, ldm, mem_row_major | mem_col_major)");
    detail::require_full_warp("load_matrix_sync");
    __syncwarp();
    detail::check_pointer(p, ldm, sizeof(T), "load_matrix_sync");
    const bool row = std::is_same<L, row_major>::value;
    detail::read_pieces(p, row ? f.rows : f.cols, (row ? f.cols : f.rows) * (int)sizeof(T), ldm * sizeof(T));
    detail::copy_tile(f.x, p, f.rows, f.cols, ldm, row);
}

// accumulator: the memory layout is an argument
template <int M, int N, int K, class T>
static inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const T* p, unsigned ldm,
                                    layout_t layout) {
    detail::require_full_warp("load_matrix_sync");
    __syncwarp();
    detail::check_pointer(p, ldm, sizeof(T), "load_matrix_sync");
    const bool row = layout == mem_row_major;
    detail::read_pieces(p, row ? f.rows : f.cols, (row ? f.cols : f.rows) * (int)sizeof(T), ldm * sizeof(T));
    detail::copy_tile(f.x, p, f.rows, f.cols, ldm, row);
}

template <int M, int N, int K, class T>
static inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm,
                                     layout_t layout) {
    detail::require_full_warp("store_matrix_sync");
    __syncwarp();
    detail::check_pointer(p, ldm, sizeof(T), "store_matrix_sync");
    // every lane puts its elements into the warp's scratch tile, then writes its own 16-byte pieces
    // of the lines (see the header)
    T* tile = reinterpret_cast<T*>(detail::scratch().a);
    detail::to_scratch(tile, f.x, f.rows * f.cols);
    __syncwarp();
    const bool row = layout == mem_row_major;
    const int lines = row ? f.rows : f.cols, length = row ? f.cols : f.rows, per_piece = 16 / (int)sizeof(T);
    for (int s = (int)detail::lane_id(); s < lines * (length / per_piece); s += 32) {
        const __int128 bits = detail::piece_of(tile, f.cols, s % lines, (s / lines) * per_piece, row);
        *reinterpret_cast<__int128*>(reinterpret_cast<char*>(p) + detail::piece_offset(s, lines, ldm * sizeof(T))) = bits;
    }
    __syncwarp();
}

// d = a @ b + c, products and sums in float, rounded once to d's type (d may be c)
template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC, class TD>
static inline void mma_sync(fragment<accumulator, M, N, K, TD, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                            const fragment<matrix_b, M, N, K, TB, LB>& b,
                            const fragment<accumulator, M, N, K, TC, void>& c, bool satf = false) {
    detail::require_full_warp("mma_sync");
    __syncwarp();
    detail::warp_scratch& w = detail::scratch();
    detail::to_scratch(w.a, a.x, M * K);
    detail::to_scratch(w.b, b.x, K * N);
    __syncwarp();   // the warp's A and B are complete
    detail::multiply<M, N, K>(d.x, c.x, w.a, w.b, satf);
}

}  // namespace wmma
}  // namespace nvcuda

#endif /* KERNELS_EMU_MMA_H */
