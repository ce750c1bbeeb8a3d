/*
 * The emulator's <cuda_pipeline.h>: the asynchronous copy primitives of sm_80+ (cp.async), which
 * move 4, 8 or 16 bytes from global to shared memory without passing through registers, so
 * that a block loads its next tile while it computes on the current one.
 *
 *   __pipeline_memcpy_async(dst_shared, src_global, size, zfill = 0)   issue one copy; the last
 *                                                      `zfill` bytes of dst are zeroed instead
 *   __pipeline_commit()                                close the current batch of copies
 *   __pipeline_wait_prior(n)                           wait until at most the n most recent
 *                                                      committed batches are still in flight
 *
 * Emulated per thread: a copy lands when a wait covers it (or when the thread returns), so a
 * read of the destination before the wait sees the old bytes, as it may on a GPU; racecheck
 * reports such a read, and a read by another thread needs a __syncthreads() after the wait.
 */
#ifndef KERNELS_EMU_CUDA_PIPELINE_H
#define KERNELS_EMU_CUDA_PIPELINE_H

#include "cuda_emu.h"

static inline __attribute__((always_inline)) void __pipeline_memcpy_async(void* __restrict__ dst_shared,
                                                                          const void* __restrict__ src_global,
                                                                          size_t size_and_align, size_t zfill = 0) {
    __emu_pipeline_copy(dst_shared, src_global, (unsigned)size_and_align, (unsigned)zfill);
}
static inline __attribute__((always_inline)) void __pipeline_commit(void) { __emu_pipeline_commit(); }
static inline __attribute__((always_inline)) void __pipeline_wait_prior(size_t prior) {
    __emu_pipeline_wait_prior((unsigned)prior);
}

#endif /* KERNELS_EMU_CUDA_PIPELINE_H */
