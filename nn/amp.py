"""Mixed precision: loss scaling, with fp32 master weights.

On cuda the model can run its activations in float16 (`resnet50(activation_dtype=np.float16)`):
every conv/fc casts its fp32 master weight to fp16 for the multiply, gradients flow back to the
fp32 Parameters, the logits and the loss are fp32. Small fp16 gradients underflow to zero, so the
loss is multiplied by a scale S before backward (every gradient is then S times too large) and
the gradients are divided by S before the optimiser step:

    scaler = LossScaler(dynamic=True)         # or LossScaler(128.0) = the reference's static scale
    loss = cross_entropy(model(x), y)
    scaler.backward(loss)                     # loss.backward() seeded with S instead of 1
    stepped = scaler.step(opt)                # unscale, check for inf/nan, step (or skip), adapt S

Dynamic scaling: if any gradient is inf/nan the step is skipped and S is halved; after
`growth_interval` good steps in a row S is doubled. On cpu and emu the model stays fp32 (NumPy
float16 is slow and nothing needs it); the scaler's logic is the same everywhere.
"""

import math

__all__ = ["LossScaler"]


class LossScaler:
    """Static or dynamic loss scaling.

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
        self.scale = float(init_scale)
        self.dynamic = bool(dynamic)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.min_scale = int(growth_interval), float(min_scale)
        self.good_steps = 0          # clean steps since the last change of scale
        self.skipped_steps = 0

    def backward(self, loss):
        """loss.backward() with the gradient seeded by the scale S."""
        loss.backward(self.scale)

    def unscale(self, params):
        """Divide every gradient by S (in place); return True if all of them are finite."""
        params = [p for p in params if p.grad is not None]
        inv = 1.0 / self.scale
        for p in params:
            p.grad *= p.grad.dtype.type(inv)
        if not params:
            return True
        ops = params[0].device.ops
        return math.isfinite(ops.global_grad_norm([p.grad for p in params]))

    def update(self, finite):
        """Adapt S after a step whose gradients were `finite` (bool)."""
        if not finite:
            self.skipped_steps += 1
        if not self.dynamic:
            return
        if not finite:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0

    def step(self, optimizer):
        """Unscale the optimizer's gradients; step if they are finite, else skip; adapt S.
        Returns True when the optimizer stepped."""
        finite = self.unscale(optimizer.params)
        if finite:
            optimizer.step()
        self.update(finite)
        return finite

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        self.good_steps = int(state.get("good_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        return self
