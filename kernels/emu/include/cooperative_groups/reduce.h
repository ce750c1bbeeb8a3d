/*
 * The emulator's <cooperative_groups/reduce.h>: cg::reduce(tile, value, op) combines one value
 * per thread of a tile and returns the result to every thread of it.
 *
 *   op: cg::plus<T>, cg::less<T> (the minimum), cg::greater<T> (the maximum), cg::bit_and<T>,
 *       cg::bit_or<T>, cg::bit_xor<T>, or any functor T(T, T) of your own.
 *
 * A full tile combines by butterfly (shfl_xor over log2(N) steps); a partial tile (the last
 * one of a block whose size is not a multiple of N) gathers the values of the threads that
 * exist in rank order.  For floats the order of the additions (and so the last bits) may differ
 * from NVIDIA's implementation, as it may between GPUs.
 */
#ifndef KERNELS_EMU_COOPERATIVE_GROUPS_REDUCE_H
#define KERNELS_EMU_COOPERATIVE_GROUPS_REDUCE_H

#include "../cooperative_groups.h"

namespace cooperative_groups {

template <class T> struct plus { T operator()(T a, T b) const { return a + b; } };
template <class T> struct less { T operator()(T a, T b) const { return b < a ? b : a; } };
template <class T> struct greater { T operator()(T a, T b) const { return a < b ? b : a; } };
template <class T> struct bit_and { T operator()(T a, T b) const { return a & b; } };
template <class T> struct bit_or { T operator()(T a, T b) const { return a | b; } };
template <class T> struct bit_xor { T operator()(T a, T b) const { return a ^ b; } };

template <unsigned N, class T, class Op>
static inline T reduce(const thread_block_tile<N>& g, T value, Op op, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    const unsigned lanes = g.lanes();
    if (__builtin_popcount(lanes) == (int)N) {
        for (unsigned offset = N / 2; offset > 0; offset /= 2) value = op(value, g.shfl_xor(value, offset, file, line));
        return value;
    }
    const unsigned present = (unsigned)__builtin_popcount(lanes);   // a partial last tile
    T result = g.shfl(value, 0, file, line);
    for (unsigned r = 1; r < present; ++r) result = op(result, g.shfl(value, (int)r, file, line));
    return result;
}

}  // namespace cooperative_groups

#endif /* KERNELS_EMU_COOPERATIVE_GROUPS_REDUCE_H */
