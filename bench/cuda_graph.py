"""Capture a whole training step as one CUDA graph and replay it (`python -m bench.train --cuda-graph`).

Why: a ResNet-50 training step is ~500 kernel launches (forward, backward, 161 optimizer updates,
the casts of mixed precision). Each launch from Python costs ~5-20 us of host time (argument
checks, CuPy's launch path, the CUDA driver). At batch 256 on an H200 a step of ~40-80 ms of GPU
work hides that, but at smaller batches, or once the kernels are fast, the host becomes the
limit. A CUDA graph records the launches once; replaying it is one `cudaGraphLaunch` (~10 us of
host time for the whole step) and the GPU runs the kernels back to back.

How (stream capture, as in PyTorch's torch.cuda.graphs):
  1. Inputs live in *static* device buffers (the graph bakes their addresses in); to train on new
     data, copy it into those buffers before each replay.
  2. Warm-up runs of the step on a side stream, so that everything done once is done before the
     capture: NVRTC compiles our kernels, cuDNN builds its plans, momentum buffers are created.
  3. The capture runs the step once more on the side stream between `begin_capture()` and
     `end_capture()`; nothing executes, every launch and async copy is recorded.
  4. All allocations of the warm-up and the capture come from a *private* CuPy memory pool. Arrays
     freed during the capture return their blocks to that pool, and later allocations of the same
     capture reuse them (safe: the graph replays in the recorded order). After the capture nobody
     else allocates from the private pool, so the blocks the graph writes on replay are never handed
     to other arrays. This is also "a memory pool with no allocation in the steady state": a replay
     allocates nothing.
  5. Replays: `step()` makes the capture stream wait for the caller's stream (new inputs copied
     there), launches the graph, and makes the caller's stream wait for the graph.

What the step may not do while it is being captured (each is an error or, worse, a silent bake):
  - synchronise with the host: `float(loss)`, `.item()`, `.get()`, `cupy.asnumpy`, a Python
    `if` on a device value (the loss scaler's inf/nan check), `stream.synchronize()`;
    synchronous copies from pageable host memory (`cupy.asarray(python_number)` inside the step);
  - depend on Python values that change between steps: the learning rate passed to a kernel as
    a scalar argument is baked into the graph at capture time (it must live in a device buffer
    that the kernel reads, and be updated by a copy before each replay);
  - create arrays that must survive the step without keeping them referenced (the returned
    outputs are kept alive by the CapturedStep).
bench/NOTES.md lists the places in nn/ that do these today and the changes that remove them.

Without a GPU this module imports and its docs can be read; `capture_train_step` needs CuPy and a
device (tests/test_bench.py checks the control flow with a stand-in for CuPy's stream API).
"""

__all__ = ["capture_train_step", "CapturedStep", "CaptureError"]


class CaptureError(RuntimeError):
    """The step could not be captured (it synchronised with the host, or CuPy/CUDA refused)."""


class CapturedStep:
    """A training step recorded as a CUDA graph. Call it to replay; it returns the outputs of the
    captured call (device arrays, updated in place by every replay).

    Attributes: graph (cupy.cuda.Graph), stream (the capture/replay stream), pool (the private
    cupy.cuda.MemoryPool holding every array the graph touches besides parameters and inputs),
    outputs, keep_alive (objects whose device memory the graph reads or writes), replays.
    """

    def __init__(self, cupy, graph, stream, pool, outputs, keep_alive=()):
        self._cupy = cupy
        self.graph, self.stream, self.pool = graph, stream, pool
        self.outputs = outputs
        self.keep_alive = tuple(keep_alive)
        self.replays = 0

    def __call__(self):
        caller = self._cupy.cuda.get_current_stream()
        self.stream.wait_event(caller.record())        # new inputs, copied on the caller's stream
        self.graph.launch(stream=self.stream)
        caller.wait_event(self.stream.record())        # the caller's next work sees the results
        self.replays += 1
        return self.outputs

    def pool_bytes(self):
        """Bytes held by the private pool (the graph's activations, gradients and scratch)."""
        return int(self.pool.total_bytes())


def capture_train_step(step_fn, warmup_steps=3, keep_alive=(), cupy=None):
    """Record `step_fn()` as a CUDA graph and return a CapturedStep that replays it.

    step_fn: a function of no arguments that launches one whole training step on CuPy's *current*
        stream, reading its inputs from static device buffers, without any host synchronisation
        (see the module docstring); whatever it returns (e.g. the loss array) becomes `outputs`.
    warmup_steps: eager runs before the capture (>= 1: compiles kernels, builds cuDNN plans,
        creates optimizer state). They are real training steps: parameters change.
    keep_alive: objects to hold for as long as the graph lives (the static input buffers).
    cupy: the cupy module (a stand-in in tests); imported when None.

    Raises CaptureError (with the cause) when the capture fails; the stream is left usable.
    """
    if cupy is None:
        import cupy
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"capture_train_step: warmup_steps must be an int >= 1, got {warmup_steps!r}")
    if not callable(step_fn):
        raise TypeError(f"capture_train_step: step_fn must be callable, got {type(step_fn).__name__}")
    pool = cupy.cuda.MemoryPool()
    stream = cupy.cuda.Stream(non_blocking=True)
    caller = cupy.cuda.get_current_stream()
    stream.wait_event(caller.record())                 # inputs prepared on the caller's stream are ready
    with cupy.cuda.using_allocator(pool.malloc):
        with stream:
            for _ in range(warmup_steps):
                step_fn()
            stream.synchronize()
            stream.begin_capture()
            try:
                outputs = step_fn()
            except Exception as exc:
                _abandon_capture(stream)
                raise CaptureError(f"the training step could not be captured: {type(exc).__name__}: {exc} "
                                   f"(a host synchronisation inside the step? see bench/cuda_graph.py)") from exc
            try:
                graph = stream.end_capture()
            except Exception as exc:
                raise CaptureError(f"ending the capture failed: {type(exc).__name__}: {exc} (the step did something "
                                   f"that invalidates a capture: a synchronous copy or a sync)") from exc
    caller.wait_event(stream.record())
    return CapturedStep(cupy, graph, stream, pool, outputs, keep_alive)


def _abandon_capture(stream):
    """End a capture that failed half-way, so that the stream can be used (or dropped) again."""
    try:
        if stream.is_capturing():
            stream.end_capture()
    except Exception:   # an invalidated capture raises when ended: it is over either way
        pass
