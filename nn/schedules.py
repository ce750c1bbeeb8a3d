"""Learning-rate schedules, evaluated per iteration: `schedule(step) -> lr` (step counts from 0).

Use in a training loop:  `opt.lr = schedule(step)` before `opt.step()`.

    WarmupPiecewise  linear warm-up from 0, then piecewise-constant decay (MLPerf v0.5 default:
                     lr = 0.128 * batch / 256, 5 warm-up epochs, x0.1 at epochs 30, 60, 80 and 90)
    Polynomial       linear warm-up, then (base - end) * (1 - t/T)^power + end (power 2, end 1e-4:
                     the MLPerf LARS recipe)
    Cosine           linear warm-up, then end + (base - end) * (1 + cos(pi * t/T)) / 2
Each is a small object holding its settings; calling it is a pure function of the step, so a
restarted run only needs the step number (saved in the checkpoint).
"""

import math

__all__ = ["mlperf_base_lr", "WarmupPiecewise", "Polynomial", "Cosine"]


def mlperf_base_lr(batch_size, base=0.128, per=256):
    """Linear scaling rule: lr = base * batch_size / per (MLPerf v0.5: 0.128 per 256 images)."""
    return base * batch_size / per


def _warmup(step, base_lr, warmup_steps):
    # the reference: lr = base * step / warmup_steps (0 at step 0, base at the end of warm-up)
    return base_lr * step / warmup_steps


def _check(base_lr, steps_per_epoch=1, warmup=0):
    if base_lr < 0 or steps_per_epoch <= 0 or warmup < 0:
        raise ValueError(f"schedule: need base_lr >= 0, steps_per_epoch > 0, warm-up >= 0; got "
                         f"{base_lr}, {steps_per_epoch}, {warmup}")


class WarmupPiecewise:
    """lr(step) = base_lr * step / warmup_steps during warm-up, then
    base_lr * decay ** (number of boundaries passed).

    base_lr: peak learning rate; steps_per_epoch: iterations per epoch;
    warmup_epochs: 5; boundaries: epochs where the rate is multiplied by `decay` (0.1).
    Epoch boundaries become steps as round(epoch * steps_per_epoch)."""

    def __init__(self, base_lr, steps_per_epoch, warmup_epochs=5, boundaries=(30, 60, 80, 90), decay=0.1):
        _check(base_lr, steps_per_epoch, warmup_epochs)
        self.base_lr, self.decay = base_lr, decay
        self.warmup_steps = round(warmup_epochs * steps_per_epoch)
        self.boundary_steps = [round(e * steps_per_epoch) for e in boundaries]

    def __call__(self, step):
        if step < self.warmup_steps:
            return _warmup(step, self.base_lr, self.warmup_steps)
        passed = sum(step >= b for b in self.boundary_steps)
        return self.base_lr * self.decay ** passed


class Polynomial:
    """Warm-up, then lr(step) = (base_lr - end_lr) * (1 - t / T) ** power + end_lr, with
    t = step - warmup_steps and T = total_steps - warmup_steps; end_lr after total_steps."""

    def __init__(self, base_lr, total_steps, warmup_steps=0, power=2.0, end_lr=1e-4):
        _check(base_lr, total_steps, warmup_steps)
        if warmup_steps >= total_steps:
            raise ValueError(f"schedule: warmup_steps ({warmup_steps}) must be < total_steps ({total_steps})")
        self.base_lr, self.total_steps, self.warmup_steps = base_lr, total_steps, warmup_steps
        self.power, self.end_lr = power, end_lr

    def __call__(self, step):
        if step < self.warmup_steps:
            return _warmup(step, self.base_lr, self.warmup_steps)
        decay_steps = self.total_steps - self.warmup_steps
        frac = min(step - self.warmup_steps, decay_steps) / decay_steps
        return (self.base_lr - self.end_lr) * (1.0 - frac) ** self.power + self.end_lr


class Cosine:
    """Warm-up, then lr(step) = end_lr + (base_lr - end_lr) * (1 + cos(pi * t / T)) / 2, with
    t = step - warmup_steps and T = total_steps - warmup_steps; end_lr after total_steps."""

    def __init__(self, base_lr, total_steps, warmup_steps=0, end_lr=0.0):
        _check(base_lr, total_steps, warmup_steps)
        if warmup_steps >= total_steps:
            raise ValueError(f"schedule: warmup_steps ({warmup_steps}) must be < total_steps ({total_steps})")
        self.base_lr, self.total_steps, self.warmup_steps, self.end_lr = base_lr, total_steps, warmup_steps, end_lr

    def __call__(self, step):
        if step < self.warmup_steps:
            return _warmup(step, self.base_lr, self.warmup_steps)
        decay_steps = self.total_steps - self.warmup_steps
        frac = min(step - self.warmup_steps, decay_steps) / decay_steps
        return self.end_lr + (self.base_lr - self.end_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
