// A kernel that does nothing for a while: the timing harness's blocker (kernels/runtime/timing.py).
//
// Timed with CUDA events, a call of an op measures from the start event to the stop event on the
// GPU. If the GPU is idle when the host records the start event, the GPU then waits for the host
// to queue the op's launches, and the time measured is the host's launch time plus the kernels'.
// For a kernel of a few microseconds that is mostly the host: 25 us of Python and driver against
// a 10 us kernel reads as "29 % of bandwidth" whatever the kernel does.
//
// So the harness first queues this kernel, which holds the GPU for `cycles` SM clock cycles, then
// the start event, the op and the stop event. By the time the GPU is free again the host has
// queued everything behind it, and the events see the GPU's own time. (NVIDIA's nvbench does the
// same with a kernel that waits on a host flag; a fixed wait needs no pinned memory and cannot
// hang when the op reads a value on the host.) The harness checks afterwards that the host
// really did finish queueing before the wait ended.
//
// One thread of one block; `spun` receives the cycles it waited (>= cycles), for the tests.
// On the CPU emulator clock64() counts nanoseconds of the host's steady clock.

extern "C" __global__ void gpu_delay(long long cycles, long long* spun) {
    const long long start = clock64();
    long long now = start;
    while (now - start < cycles) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
        __nanosleep(256);   // leave the SM's issue slots to any other work (sm_70 and later)
#endif
        now = clock64();
    }
    *spun = now - start;
}
