"""Mixed precision: loss scaling, with fp32 master weights, kept on the device.

On cuda (and emu) the model can run its activations in float16
(`resnet50(activation_dtype=np.float16)`): every conv/fc casts its fp32 master weight to fp16 once
per step for the multiply (conv: ops.conv_weight, channels last), the weight gradients are summed
in fp32 and land in the fp32 Parameters, the logits and the loss are fp32. Small fp16 gradients underflow to zero, so the
loss is multiplied by a scale S before backward (every gradient is then S times too large) and
the gradients are divided by S in the optimiser step:

    scaler = LossScaler(dynamic=True)         # or LossScaler(128.0) = the reference's static scale
    loss = cross_entropy(model(x), y)
    scaler.backward(loss)                     # loss.backward() seeded with S instead of 1
    scaler.step(opt)                          # check for inf/nan, step (or skip), adapt S

Dynamic scaling: if any gradient is inf/nan the step is skipped and S is halved; after
`growth_interval` good steps in a row S is doubled.

All of it happens on the device, so a step never waits for the host (and can be captured as a
CUDA graph): S and 1/S live in a device array that the cross-entropy backward kernel reads as its
seed; `nonfinite_flag` sets a device flag when a gradient is NaN/inf; the optimizer's update
kernel multiplies the gradients by 1/S and does nothing when the flag is set; `loss_scale_update`
adapts S and clears the flag. Reading `scale`, `good_steps` or `skipped_steps` is a trip to the
host (through nn.device.to_numpy): for logs and checkpoints, not every step.
The emu device runs the same float16 kernels (tensor-core convolutions included) on the CPU
emulator; on cpu the model stays fp32 (NumPy float16 is slow and nothing needs it). The scaler's
logic is the same everywhere.
"""

import numpy as np

from nn.device import to_numpy

__all__ = ["LossScaler"]


class LossScaler:
    """Static or dynamic loss scaling, its state on the device.

    Args:
        init_scale: S at the start (static: the fixed scale; the MLPerf reference used 128).
        dynamic: adapt S (halve on overflow, double after growth_interval clean steps).
        growth_factor, backoff_factor, growth_interval: the adaptation rule (2, 0.5, 2000).
        min_scale: S never drops below this.
    """

    def __init__(self, init_scale=128.0, dynamic=False, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, min_scale=1.0):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("LossScaler: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, "
                             "growth_interval >= 1")
        self.dynamic = bool(dynamic)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.min_scale = int(growth_interval), float(min_scale)
        self.device = None
        # host copies until the state first goes to a device (and what load_state_dict restores)
        self._host_state = np.array([init_scale, 1.0 / init_scale], dtype=np.float32)
        self._host_counts = np.zeros(3, dtype=np.int32)       # found_inf, good_steps, skipped_steps
        self.state = self.counts = None

    def _on(self, device):
        """Move the state to `device` on first use: state = [S, 1/S] float32, counts int32 [3]."""
        if self.device is None or self.device != device:
            if self.state is not None:
                self._host_state, self._host_counts = to_numpy(self.state), to_numpy(self.counts)
            self.device = device
            self.state = device.asarray(self._host_state.copy())
            self.counts = device.asarray(self._host_counts.copy())

    def backward(self, loss):
        """loss.backward() with the gradient seeded by S (a device array: no upload per step)."""
        self._on(loss.device)
        loss.backward(self.state[0:1])

    def step(self, optimizer):
        """Check the gradients for NaN/inf, step the optimizer with them divided by S (or skip the
        step if they overflowed), adapt S. All on the device; returns None."""
        self._on(optimizer.device)
        ops = optimizer.device.ops
        found_inf = self.counts[0:1]
        optimizer.flat.check()          # gradients assigned by hand join the flat buffers first
        for group in optimizer.flat.groups:
            ops.nonfinite_flag(group.grad, found_inf)
        optimizer.step(grad_scale=self.state[1:2], skip=found_inf)
        ops.loss_scale_update(self.state, self.counts, self.dynamic, self.growth_factor, self.backoff_factor,
                              self.growth_interval, self.min_scale)

    def _read(self):
        if self.state is None:
            return self._host_state, self._host_counts
        return to_numpy(self.state), to_numpy(self.counts)

    @property
    def scale(self):
        """S now (a read from the device)."""
        return float(self._read()[0][0])

    @property
    def good_steps(self):
        return int(self._read()[1][1])

    @property
    def skipped_steps(self):
        return int(self._read()[1][2])

    def state_dict(self):
        state, counts = self._read()
        return {"scale": float(state[0]), "good_steps": int(counts[1]), "skipped_steps": int(counts[2])}

    def load_state_dict(self, state):
        scale = float(state["scale"])
        self._host_state = np.array([scale, 1.0 / scale], dtype=np.float32)
        self._host_counts = np.array([0, int(state.get("good_steps", 0)), int(state.get("skipped_steps", 0))],
                                     dtype=np.int32)
        if self.device is not None:
            self.state[...] = self.device.asarray(self._host_state)
            self.counts[...] = self.device.asarray(self._host_counts)
        return self
