"""Accuracy metrics: top-1 / top-5 (ties broken towards the lower class index, as the kernel).

A row with a NaN or inf logit is never correct: a diverged model scores 0, not 100 %.
`topk_counts` also says how many such rows there were, so that an evaluation can stop a
diverged run instead of reporting an accuracy."""

from nn.device import default_device_for, to_numpy
from nn.functional import as_labels
from nn.tensor import Tensor

__all__ = ["topk_counts", "topk_correct", "accuracy"]


def topk_counts(logits, labels, ks=(1, 5)):
    """(correct, nonfinite): the number of rows whose label is among the k largest logits, for
    each k (a list of ints), and the number of rows holding a NaN or inf logit (an int; those
    rows are counted correct for no k).

    logits: Tensor or array [N, K]; labels: int array or Tensor [N] on the same device."""
    if isinstance(logits, Tensor):
        device, logits = logits.device, logits.data
    else:
        device = default_device_for(logits)
    counts = [int(c) for c in to_numpy(device.ops.topk_correct(logits, as_labels(labels, device), ks)).tolist()]
    return counts[:-1], counts[-1]


def topk_correct(logits, labels, ks=(1, 5)):
    """Number of rows whose label is among the k largest logits, for each k: a list of ints."""
    return topk_counts(logits, labels, ks)[0]


def accuracy(logits, labels, ks=(1, 5)):
    """Fraction of rows correct in the top-k, for each k: a list of floats in [0, 1]."""
    n = logits.shape[0]
    if n == 0:
        raise ValueError("accuracy: empty batch")
    return [c / n for c in topk_correct(logits, labels, ks)]
