"""Checkpoints: model + optimizer (+ anything else) in one .npz, written atomically.

Keys in the file:
    model/<state_dict key>        e.g. model/layer1.0.conv1.weight   (torchvision names)
    optim/<optimizer key>         e.g. optim/lr, optim/momentum_buffer.fc.weight
    extra/<name>                  step, epoch, seeds, a JSON config string, ...
The file is first written to a temporary name in the same folder, flushed and fsync'ed, then
renamed over the target with os.replace: a crash leaves either the old or the new checkpoint,
never half of one.
"""

import os
import tempfile

import numpy as np

from nn.device import to_numpy

__all__ = ["save", "load"]


def save(path, model, optimizer=None, **extra):
    """Write model.state_dict(), optimizer.state_dict() and `extra` (numbers, strings, arrays) to
    `path` (.npz) atomically."""
    arrays = {}
    for k, v in model.state_dict().items():
        arrays[f"model/{k}"] = to_numpy(v)
    if optimizer is not None:
        for k, v in optimizer.state_dict().items():
            arrays[f"optim/{k}"] = to_numpy(v) if hasattr(v, "shape") else np.asarray(v)
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


def load(path, model, optimizer=None, strict=True):
    """Load a checkpoint written by save() into `model` (and `optimizer`); returns the extras as
    a dict (0-d arrays become Python scalars/strings)."""
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    model_state = {k[len("model/"):]: v for k, v in data.items() if k.startswith("model/")}
    model.load_state_dict(model_state, strict=strict)
    if optimizer is not None:
        optim_state = {k[len("optim/"):]: v for k, v in data.items() if k.startswith("optim/")}
        if not optim_state:
            raise ValueError(f"checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict({k: (v.item() if v.ndim == 0 else v) for k, v in optim_state.items()})
    return {k[len("extra/"):]: (v.item() if v.ndim == 0 else v) for k, v in data.items() if k.startswith("extra/")}
