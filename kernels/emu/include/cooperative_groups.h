/*
 * The emulator's <cooperative_groups.h>: groups of threads as objects, whose sync() and
 * collectives say which threads take part.
 *
 *   namespace cg = cooperative_groups;
 *   cg::thread_block block = cg::this_thread_block();        // the whole block
 *   block.sync();                                            // __syncthreads()
 *   cg::thread_block_tile<32> warp = cg::tiled_partition<32>(block);
 *   warp.thread_rank(), warp.size(), warp.meta_group_rank(), warp.meta_group_size()
 *   warp.shfl(v, 0), warp.shfl_down(v, 1), warp.shfl_up(v, 1), warp.shfl_xor(v, 4)
 *   warp.any(p), warp.all(p), warp.ballot(p), warp.sync()
 *   cg::reduce(warp, v, cg::plus<float>())                   // <cooperative_groups/reduce.h>
 *
 * Tiles have a static size N (a power of two up to 32) and map onto the warp collectives of
 * the runtime with the tile's lanes as the mask and N as the width, so they have the same
 * semantics (and checks) as __shfl_*_sync.  The last tile of a block whose size is not a
 * multiple of N holds only the threads that exist.  Each call reports the line it was called
 * from (default arguments __builtin_FILE()/__builtin_LINE()).
 * Not emulated: grid and multi-grid groups (cooperative launches), coalesced_threads(),
 * labeled/binary partitions, cg::memcpy_async.
 */
#ifndef KERNELS_EMU_COOPERATIVE_GROUPS_H
#define KERNELS_EMU_COOPERATIVE_GROUPS_H

#include "cuda_emu.h"

namespace cooperative_groups {
namespace details {
static inline unsigned block_rank() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
static inline unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }
/* The lanes of the caller's warp that exist (the last warp of a block may be partial). */
static inline unsigned warp_existing() {
    const unsigned base = block_rank() & ~31u, n = block_threads() - base;
    return n >= 32 ? 0xffffffffu : (1u << n) - 1u;
}
}  // namespace details

class thread_block {
public:
    /* (one barrier per line: a default argument cannot tell apart two calls on one line) */
    void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const { __emu_syncthreads(file, line, -1); }
    unsigned thread_rank() const { return details::block_rank(); }
    unsigned size() const { return details::block_threads(); }
    unsigned num_threads() const { return details::block_threads(); }
    dim3 group_index() const { return dim3(blockIdx.x, blockIdx.y, blockIdx.z); }
    dim3 thread_index() const { return dim3(threadIdx.x, threadIdx.y, threadIdx.z); }
    dim3 group_dim() const { return blockDim; }
    dim3 dim_threads() const { return blockDim; }
};

static inline thread_block this_thread_block() { return thread_block(); }

template <unsigned N>
class thread_block_tile {
    static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "thread_block_tile<N>: N must be a power of two <= 32");

public:
    /* The lanes of the caller's warp in the caller's tile. */
    unsigned lanes() const {
        const unsigned lane = details::block_rank() % 32;
        const unsigned tile = N == 32 ? 0xffffffffu : ((1u << N) - 1u) << (lane & ~(N - 1));
        return tile & details::warp_existing();
    }
    unsigned thread_rank() const { return details::block_rank() % N; }
    static constexpr unsigned size() { return N; }
    static constexpr unsigned num_threads() { return N; }
    unsigned meta_group_rank() const { return details::block_rank() / N; }
    unsigned meta_group_size() const { return (details::block_threads() + N - 1) / N; }
    void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
        __emu_warp_collective(EMU_WARP_SYNC, lanes(), 0, 0, 32, file, line);
    }
    template <class T>
    T shfl(T var, int src_rank, const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return ::emu::shuffle(EMU_WARP_SHFL_IDX, file, line, lanes(), var, src_rank, (int)N);
    }
    template <class T>
    T shfl_down(T var, unsigned delta, const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return ::emu::shuffle(EMU_WARP_SHFL_DOWN, file, line, lanes(), var, (int)delta, (int)N);
    }
    template <class T>
    T shfl_up(T var, unsigned delta, const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return ::emu::shuffle(EMU_WARP_SHFL_UP, file, line, lanes(), var, (int)delta, (int)N);
    }
    template <class T>
    T shfl_xor(T var, unsigned lane_mask, const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return ::emu::shuffle(EMU_WARP_SHFL_XOR, file, line, lanes(), var, (int)lane_mask, (int)N);
    }
    int any(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return (int)__emu_warp_collective(EMU_WARP_ANY, lanes(), predicate != 0, 0, 32, file, line);
    }
    int all(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return (int)__emu_warp_collective(EMU_WARP_ALL, lanes(), predicate != 0, 0, 32, file, line);
    }
    /* bit r: the predicate of the tile's thread of rank r */
    unsigned ballot(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
        const unsigned bits = (unsigned)__emu_warp_collective(EMU_WARP_BALLOT, lanes(), predicate != 0, 0, 32, file, line);
        const unsigned first = (details::block_rank() % 32) & ~(N - 1);
        return N == 32 ? bits : (bits >> first) & ((1u << N) - 1u);
    }
};

template <unsigned N>
static inline thread_block_tile<N> tiled_partition(const thread_block&) { return thread_block_tile<N>(); }
template <unsigned N, unsigned M>
static inline thread_block_tile<N> tiled_partition(const thread_block_tile<M>&) {
    static_assert(N <= M, "tiled_partition<N>(tile<M>): N must not exceed M");
    return thread_block_tile<N>();
}

template <class Group>
static inline void sync(const Group& g, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    g.sync(file, line);
}

}  // namespace cooperative_groups

#endif /* KERNELS_EMU_COOPERATIVE_GROUPS_H */
