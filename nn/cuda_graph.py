"""A training step captured once as a CUDA graph and replayed (`train.py --cuda-graph`).

Why: a ResNet-50 training step is ~800 kernel launches (forward, backward, the optimizer, the
casts of mixed precision). Each launch from Python costs microseconds of host time (argument
checks, CuPy's launch path, the CUDA driver). At batch 256 on a fast GPU a step of ~40 ms of GPU
work hides that, but at smaller batches, or once the kernels are fast, the host becomes the
limit. A CUDA graph records the launches once; replaying it is one `cudaGraphLaunch` (~10 us of
host time for the whole step) and the GPU runs the kernels back to back.

How (stream capture, as PyTorch's torch.cuda.graphs does it):
  1. Inputs live in *static* device buffers (the graph bakes their addresses in); each step the
     caller copies the next batch into them before calling.
  2. The first `warmup` calls run the step eagerly, on a side stream: everything done once is
     done before the capture (NVRTC compiles our kernels, cuDNN builds its plans, the loss
     scaler's state goes to the device). They are real training steps.
  3. The next call captures the step between `begin_capture()` and `end_capture()` (nothing
     executes: every launch is recorded) and then replays the graph once, so that this call too
     performs exactly one step. Every later call only replays.
  4. Every allocation of the warm-up and the capture comes from a *private* CuPy memory pool.
     Arrays freed during the capture return their blocks to it, and later allocations of the
     same capture reuse them (safe: the graph replays in the recorded order). Outside calls of
     this object nobody allocates from the private pool, so the blocks the graph writes on replay
     are never handed to other arrays: a replay allocates nothing.
  5. A call makes the side stream wait for the caller's stream (the batch copied there, the
     learning rate written there), runs, and makes the caller's stream wait for it.

What the step may not do while it is captured (each is an error or, worse, a silent bake):
  - read a device value on the host: `float(loss)`, `.item()`, `.get()`, a Python `if` on a
    device value. nn/ routes every such read through nn.device.to_numpy, and a training step
    makes none (`python -m bench.train --sync-check` counts them);
  - depend on Python values that change between steps through kernel arguments: a kernel
    argument is baked in at capture. The learning rate, the loss scale and the overflow flag
    therefore live in device buffers that the kernels read (nn/optim.py, nn/amp.py);
  - create arrays that must outlive the step without keeping them referenced (the outputs of
    the captured call are kept by this object and updated in place by every replay).
Without a GPU this module imports and its docs can be read; the control flow is tested with a
stand-in for CuPy's stream API, and a GPU test checks that replays train exactly like eager steps.
"""

__all__ = ["GraphedStep", "CaptureError"]


class CaptureError(RuntimeError):
    """The step could not be captured (it synchronised with the host, or CuPy/CUDA refused)."""


class GraphedStep:
    """Call it to perform one training step: eagerly for the first `warmup` calls, then through a
    CUDA graph captured on the next call and replayed ever after.

    step_fn: a function of no arguments that launches one whole training step on CuPy's current
        stream, reading its inputs from static device buffers, without host synchronisation;
        what it returns (e.g. the loss array) is returned by every call.
    warmup: eager calls before the capture (>= 1).
    keep_alive: objects to hold for as long as the graph lives (the static input buffers).
    cupy: the cupy module (a stand-in in tests); imported when None.

    Attributes: graph (None until captured), stream, pool (the private cupy.cuda.MemoryPool),
    outputs, eager_steps, replays.
    """

    def __init__(self, step_fn, warmup=3, keep_alive=(), cupy=None):
        if cupy is None:
            import cupy
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"GraphedStep: warmup must be an int >= 1, got {warmup!r}")
        if not callable(step_fn):
            raise TypeError(f"GraphedStep: step_fn must be callable, got {type(step_fn).__name__}")
        self._cupy, self.step_fn, self.warmup = cupy, step_fn, warmup
        self.keep_alive = tuple(keep_alive)
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.graph, self.outputs = None, None
        self.eager_steps = self.replays = 0

    def __call__(self):
        cp = self._cupy
        caller = cp.cuda.get_current_stream()
        self.stream.wait_event(caller.record())          # the batch and learning rate are in place
        if self.graph is None:
            with cp.cuda.using_allocator(self.pool.malloc):
                with self.stream:
                    if self.eager_steps < self.warmup:
                        self.outputs = self.step_fn()
                        self.eager_steps += 1
                    else:
                        self._capture()
        if self.graph is not None:
            self.graph.launch(stream=self.stream)
            self.replays += 1
        caller.wait_event(self.stream.record())          # the caller's next work sees the results
        return self.outputs

    def _capture(self):
        stream = self.stream
        stream.synchronize()                             # the warm-up is done before recording
        stream.begin_capture()
        try:
            outputs = self.step_fn()
        except Exception as exc:
            _abandon_capture(stream)
            raise CaptureError(f"the training step could not be captured: {type(exc).__name__}: {exc} (a host "
                               f"synchronisation inside the step? see nn/cuda_graph.py)") from exc
        try:
            self.graph = stream.end_capture()
        except Exception as exc:
            raise CaptureError(f"ending the capture failed: {type(exc).__name__}: {exc} (the step did something "
                               f"that invalidates a capture: a synchronous copy or a sync)") from exc
        self.outputs = outputs

    def pool_bytes(self):
        """Bytes held by the private pool (the graph's activations, gradients and scratch)."""
        return int(self.pool.total_bytes())


def _abandon_capture(stream):
    """End a capture that failed half-way, so that the stream can be used (or dropped) again."""
    try:
        if stream.is_capturing():
            stream.end_capture()
    except Exception:   # an invalidated capture raises when ended: it is over either way
        pass
