"""Checkpoints: model + optimizer (+ anything else) in one .npz, written atomically.

Keys in the file:
    model/<state_dict key>        e.g. model/layer1.0.conv1.weight   (torchvision names)
    optim/<optimizer key>         e.g. optim/lr, optim/momentum_buffer.fc.weight
    extra/<name>                  step, epoch, seeds, a JSON config string, ...
The file is first written to a temporary name in the same folder, flushed and fsync'ed, then
renamed over the target with os.replace: a crash leaves either the old or the new checkpoint,
never half of one.

Two guarantees for training runs:
- `save(..., require_finite=True)` refuses (NonFiniteError, nothing written) when a weight,
  batch-norm statistic or optimizer buffer holds NaN or inf, so a diverged run never replaces
  the last good checkpoint with a broken one.
- `read` turns every way a file can be damaged (truncated, not a zip, pickled objects, missing
  keys) into one CheckpointError with a one-line reason.
"""

import os
import tempfile
import zipfile

import numpy as np

from nn.device import to_numpy

__all__ = ["save", "load", "read", "restore", "nonfinite_keys", "CheckpointError", "NonFiniteError"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, damaged or not written by save()."""


class NonFiniteError(ValueError):
    """save(require_finite=True) found NaN/inf in the state; `keys` names the arrays."""

    def __init__(self, keys):
        self.keys = list(keys)
        more = f" and {len(self.keys) - 1} more" if len(self.keys) > 1 else ""
        super().__init__(f"NaN/inf in {self.keys[0]}{more}")


def nonfinite_keys(arrays):
    """The keys of the float arrays (model/ and optim/ entries) holding a NaN or inf."""
    return [k for k, v in arrays.items()
            if k.startswith(("model/", "optim/")) and np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]


def save(path, model, optimizer=None, require_finite=False, **extra):
    """Write model.state_dict(), optimizer.state_dict() and `extra` (numbers, strings, arrays) to
    `path` (.npz) atomically. With require_finite, raise NonFiniteError and write nothing when a
    model or optimizer array holds NaN/inf."""
    arrays = {}
    for k, v in model.state_dict().items():
        arrays[f"model/{k}"] = to_numpy(v)
    if optimizer is not None:
        for k, v in optimizer.state_dict().items():
            arrays[f"optim/{k}"] = to_numpy(v) if hasattr(v, "shape") else np.asarray(v)
    if require_finite:
        bad = nonfinite_keys(arrays)
        if bad:
            raise NonFiniteError(bad)
    for k, v in extra.items():
        arrays[f"extra/{k}"] = to_numpy(v) if hasattr(v, "shape") else np.asarray(v)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:   # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def read(path):
    """Every array of a checkpoint file as a dict {key: numpy array}, fully read and checked.
    Raises CheckpointError (one line: what is wrong) for a missing, truncated or damaged file."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise CheckpointError(f"{path} is a single array, not a checkpoint")
            data = {k: f[k] for k in f.files}
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except ValueError as e:
        # np.load's "Cannot load file containing pickled data" for random bytes or object arrays:
        # never a checkpoint of ours, and allow_pickle would run arbitrary code.
        why = "not a checkpoint (unreadable bytes)" if "pickle" in str(e) else f"damaged ({e})"
        raise CheckpointError(f"{path} is {why}") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise CheckpointError(f"{path} is truncated or damaged ({type(e).__name__}: {e})") from None
    if not any(k.startswith("model/") for k in data):
        raise CheckpointError(f"{path} holds no model weights (not a checkpoint written by nn.checkpoint.save)")
    return data


def restore(data, model, optimizer=None, strict=True, path="checkpoint"):
    """Load the arrays of `read()` into `model` (and `optimizer`); returns the extras as a dict
    (0-d arrays become Python scalars/strings)."""
    model_state = {k[len("model/"):]: v for k, v in data.items() if k.startswith("model/")}
    model.load_state_dict(model_state, strict=strict)
    if optimizer is not None:
        optim_state = {k[len("optim/"):]: v for k, v in data.items() if k.startswith("optim/")}
        if not optim_state:
            raise ValueError(f"{path} holds no optimizer state")
        optimizer.load_state_dict({k: (v.item() if v.ndim == 0 else v) for k, v in optim_state.items()})
    return {k[len("extra/"):]: (v.item() if v.ndim == 0 else v) for k, v in data.items() if k.startswith("extra/")}


def load(path, model, optimizer=None, strict=True):
    """Load a checkpoint written by save() into `model` (and `optimizer`); returns the extras as
    a dict (0-d arrays become Python scalars/strings)."""
    return restore(read(path), model, optimizer, strict=strict, path=path)
