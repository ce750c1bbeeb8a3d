"""Launchers of kernels/cross_entropy.cu: fused softmax cross-entropy (forward, backward) and
top-k accuracy counts, all computed on the device of the logits.

    loss, probs = softmax_cross_entropy_forward(logits, labels, label_smoothing=0.1)
    dlogits = softmax_cross_entropy_backward(probs, labels, label_smoothing=0.1)
    top1, top5, nonfinite = topk_correct(logits, labels, ks=(1, 5))

logits: float32 [N, K] (C-contiguous); labels: int32 [N] with values in [0, K).  Labels of
another integer dtype are refused (convert once in the loader, not every step).

Versions of the forward (the header of cross_entropy.cu; `python -m kernels.cross_entropy` checks
and times them): 1 one thread per row, 2 (the default) one block per row with an online softmax.
"""

import numpy as np

from . import versions
from .runtime.launch import array_module, check_array, empty, empty_like, is_cupy, module

__all__ = ["softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "topk_correct", "accumulate_loss"]

_BLOCK = 256


def _kernel(name):
    return module("cross_entropy.cu").get_function(name)


def _row_blocks(N, xp):
    # One block per row on the GPU; the emulator runs blocks in turn, so a few blocks walk all rows.
    return max(1, min(N, 65535 if xp is not np else 8))


def _check(op, logits, labels, K_name="logits"):
    check_array(op, K_name, logits, dtype=np.float32, ndim=2)
    N, K = logits.shape
    check_array(op, "labels", labels, dtype=np.int32, shape=(N,))
    array_module(logits, labels)
    if K < 1:
        raise ValueError(f"{op}: {K_name} must have at least one class, got shape {tuple(logits.shape)}")
    if N and not is_cupy(labels):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"{op}: labels must lie in [0, {K}), got values from {lo} to {hi}")
    return N, K


def _check_smoothing(op, label_smoothing):
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {label_smoothing}")


def softmax_cross_entropy_forward(logits, labels, label_smoothing=0.0, version=None):
    """Mean softmax cross-entropy over the batch and the softmax, in one fused kernel.

    logits: float32 [N, K]; labels: int32 [N] in [0, K); label_smoothing eps in [0, 1): the target
    is (1 - eps) * onehot + eps / K.  version: 2 (one block per row, online softmax), 1 (one thread
    per row) or None: the version in use (2 unless chosen otherwise).
    -> (loss: float32 array of shape () on the device, probs: float32 [N, K]).
    On CuPy arrays labels are not range-checked (that would need a device sync); a row with a
    label outside [0, K) gets a NaN loss, so the mean loss is NaN.
    """
    op = "softmax_cross_entropy_forward"
    N, K = _check(op, logits, labels)
    _check_smoothing(op, label_smoothing)
    version = versions.version("cross_entropy", version, op)
    if N == 0:
        raise ValueError(f"{op}: the batch is empty (logits shape {tuple(logits.shape)})")
    xp = array_module(logits)
    probs = empty_like(logits)
    losses = empty(xp, N, dtype=np.float32)
    args = (logits, labels, probs, losses, np.int32(N), np.int32(K), np.float32(label_smoothing))
    if version == 1:
        _kernel("softmax_cross_entropy_forward_naive")((-(-N // 128),), (128,), args)
    else:
        _kernel("softmax_cross_entropy_forward")((_row_blocks(N, xp),), (_BLOCK,), args)
    loss = empty(xp, (), dtype=np.float32)
    _kernel("mean_of_vector")((1,), (_BLOCK,), (losses, np.int32(N), loss.reshape(1)))
    return loss, probs


def softmax_cross_entropy_backward(probs, labels, label_smoothing=0.0, grad_scale=1.0):
    """dlogits = grad_scale * (probs - target) / N, target as in the forward.

    probs: float32 [N, K] (from the forward); labels: int32 [N]; grad_scale: the upstream
    gradient of the mean loss (e.g. the loss scale of mixed precision), a number or a
    one-element float32 device array (read by the kernel: no host round trip).  -> float32 [N, K].
    """
    op = "softmax_cross_entropy_backward"
    N, K = _check(op, probs, labels, "probs")
    _check_smoothing(op, label_smoothing)
    scale_ptr, scale = None, 1.0
    if hasattr(grad_scale, "shape"):
        if grad_scale.size != 1 or grad_scale.dtype != np.float32:
            raise TypeError(f"{op}: grad_scale must be a number or a one-element float32 array, got "
                            f"{grad_scale.dtype} of shape {tuple(grad_scale.shape)}")
        array_module(probs, grad_scale)
        scale_ptr = grad_scale.reshape(1)
    else:
        scale = float(grad_scale)
        if not np.isfinite(scale):
            raise ValueError(f"{op}: grad_scale must be finite, got {grad_scale}")
    xp = array_module(probs)
    dlogits = empty_like(probs)
    if N:
        _kernel("softmax_cross_entropy_backward")(
            (_row_blocks(N, xp),), (_BLOCK,),
            (probs, labels, dlogits, np.int32(N), np.int32(K), np.float32(label_smoothing), np.float32(scale),
             scale_ptr))
    return dlogits


def accumulate_loss(loss, totals):
    """Add a step's loss to running totals on the device, IN PLACE (one thread, no host read):
    totals[0] += loss, totals[1] += 1 when the loss is finite; totals[2] += 1 when it is NaN/inf.

    loss: float32 with one element (the mean loss of a step); totals: float64 [3].  Returns None."""
    op = "accumulate_loss"
    if not hasattr(loss, "shape") or loss.size != 1 or loss.dtype != np.float32:
        raise TypeError(f"{op}: loss must be a one-element float32 array, got {type(loss).__name__}")
    check_array(op, "totals", totals, dtype=np.float64, shape=(3,))
    array_module(loss, totals)
    _kernel("accumulate_loss")((1,), (32,), (loss.reshape(1), totals))


def topk_correct(logits, labels, ks=(1, 5)):
    """For each k in ks, how many rows have their label among the k largest logits (ties broken
    towards the lower class index); then how many rows hold a NaN or inf logit (those rows are
    never counted correct: a diverged model must not score).

    logits: float32 [N, K]; labels: int32 [N]; ks: positive ints.
    -> int64 array [len(ks) + 1] on the device of logits: the counts for ks, then the non-finite rows.
    """
    op = "topk_correct"
    N, K = _check(op, logits, labels)
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"{op}: ks must be a non-empty sequence of positive ints, got {ks}")
    xp = array_module(logits)
    counts = xp.zeros(len(ks) + 1, dtype=np.int64)
    if N == 0:
        return counts
    rank = empty(xp, N, dtype=np.int32)
    _kernel("topk_rank")((_row_blocks(N, xp),), (_BLOCK,), (logits, labels, rank, np.int32(N), np.int32(K)))
    ks_dev = xp.asarray(np.array([min(int(k), 2**31 - 1) for k in ks], dtype=np.int32))
    _kernel("topk_count")((1,), (_BLOCK,), (rank, np.int32(N), ks_dev, np.int32(len(ks)), counts))
    return counts


if __name__ == "__main__":   # `python -m kernels.cross_entropy ARGS` is `python -m kernels cross_entropy ARGS` (the lesson)
    import runpy
    import sys
    sys.argv[1:1] = ["cross_entropy"]
    runpy.run_module("kernels", run_name="__main__")
