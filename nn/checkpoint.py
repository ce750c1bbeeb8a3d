"""Checkpoints: model + optimizer (+ anything else) in one .npz, written atomically.

Keys in the file:
    model/<state_dict key>        e.g. model/layer1.0.conv1.weight   (torchvision names)
    optim/<optimizer key>         e.g. optim/lr, optim/momentum_buffer.fc.weight
    extra/<name>                  step, epoch, seeds, a JSON config string, ...
The file is first written to a temporary name (`.tmp-XXXXXXXX.npz`) in the same folder, flushed
and fsync'ed, then renamed over the target with os.replace: a crash leaves either the old or the
new checkpoint, never half of one (and at worst a temporary file, which
`remove_stale_temporaries` deletes).

Three guarantees for training runs:
- `save(..., require_finite=True)` refuses (NonFiniteError, nothing written) when a weight,
  batch-norm statistic or optimizer buffer holds NaN or inf, so a diverged run never replaces
  the last good checkpoint with a broken one.
- `read` turns every way a file can be damaged (truncated, not a zip, pickled objects, missing
  keys) into one CheckpointError with a one-line reason.
- A checkpoint is data, and may come from anyone: `read(path, layout, extras)` checks every
  array against the keys, dtypes and shapes the model needs (`layout`) from the zip directory
  and each array's .npy header alone, before it decompresses a byte of data, so an unknown key,
  a shape that is not the model's or a member larger than its header says is refused without
  being read. Nothing is unpickled.
"""

import os
import re
import tempfile
import zipfile

import numpy as np

from nn.device import to_numpy

__all__ = ["save", "load", "read", "restore", "layout", "nonfinite_keys", "remove_stale_temporaries",
           "CheckpointError", "NonFiniteError"]

TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".npz"
# the names tempfile.mkstemp gives our temporaries: the prefix, 8 characters of its alphabet, the suffix
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
MAX_EXTRA_BYTES = 16 << 20      # an extra/ entry is a number or a string (a configuration, a history)
_KINDS = "biuf"                  # the dtype kinds of model/optim arrays and numeric extras ('U': strings)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, damaged, not written by save(), or holding
    arrays the model it is read for does not have."""


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
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
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


def remove_stale_temporaries(folder):
    """Delete the temporary files an interrupted save() left in `folder` (a process killed while
    writing: `.tmp-XXXXXXXX.npz`, only names of that exact form). Call it only while no other
    process saves into `folder` (train.py holds the run folder's lock). Returns the names removed."""
    removed = []
    for entry in os.scandir(folder):
        if _TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.remove(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                pass
    return removed


def layout(model, optimizer=None):
    """What a checkpoint of `model` (and `optimizer`) holds: {key: (dtype, shape, required)} for
    every model/ and optim/ array (the momentum buffers are optional: an optimizer that has not
    stepped has none). This is what `read` checks a file against."""
    out = {f"model/{k}": (np.dtype(v.dtype), tuple(v.shape), True) for k, v in model.state_dict().items()}
    if optimizer is not None:
        for k, v in optimizer.state_dict().items():
            if not k.startswith("momentum_buffer."):
                out[f"optim/{k}"] = (np.asarray(v).dtype, (), True)
        for name, p in optimizer.named_params:
            out[f"optim/momentum_buffer.{name}"] = (np.dtype(p.data.dtype), tuple(p.data.shape), False)
    return out


def _directory(zf, path):
    """{key: (ZipInfo, dtype, shape)} from the zip directory and each member's .npy
    header (a few hundred bytes each), refusing members that are not plain arrays or whose stored
    size is not what their header declares."""
    members = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise CheckpointError(f"{path} holds {info.filename!r}, which is not an array (not a checkpoint)")
        key = info.filename[:-4]
        if key in members:
            raise CheckpointError(f"{path} holds {key} twice (not a checkpoint written by nn.checkpoint.save)")
        with zf.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            if version not in ((1, 0), (2, 0)):
                raise CheckpointError(f"{path}: {key} has .npy format {version}, not one np.savez writes")
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fp)
            header_bytes = fp.tell()
        if dtype.hasobject or dtype.kind not in _KINDS + "U" or dtype.fields is not None:
            raise CheckpointError(f"{path}: {key} is an array of {dtype}, not of numbers (not a checkpoint; "
                                  f"pickled data is never loaded)")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if info.file_size != header_bytes + nbytes:
            raise CheckpointError(f"{path}: {key} declares a {dtype} array of shape {shape} ({nbytes} bytes) but "
                                  f"stores {info.file_size - header_bytes} bytes (damaged or crafted)")
        members[key] = (info, dtype, tuple(shape))
    return members


def _read_member(zf, info):
    with zf.open(info) as fp:
        return np.lib.format.read_array(fp, allow_pickle=False)


def read(path, layout=None, extras=None):
    """Every array of a checkpoint file as a dict {key: numpy array}, checked before it is read.

    layout: None (any model/ and optim/ keys), a dict {key: (dtype, shape, required)} as `layout()`
        returns, or a callable taking the extra/ arrays (already read) and returning one (the model
        a file is for may depend on its saved configuration). Keys outside it are refused, and so
        are other dtypes and shapes, before any model/ or optim/ array is read.
    extras: None (any extra/ entries), or {name: dtype kinds} of the extra/ entries allowed, each
        then a 0-d array of one of those kinds ('i' int, 'f' float, 'U' string...) of at most
        MAX_EXTRA_BYTES; others are refused before any array is read.
    Raises CheckpointError (one line: what is wrong) for a missing, truncated, damaged or
    mismatched file."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():    # the names first: from the zip directory alone
                prefix, _, name = info.filename.removesuffix(".npy").partition("/")
                if prefix not in ("model", "optim", "extra") or not name:
                    raise CheckpointError(f"{path} holds {info.filename!r}, which is no model/, optim/ or extra/ "
                                          f"array (not a checkpoint written by nn.checkpoint.save)")
                if prefix == "extra" and extras is not None and name not in extras:
                    raise CheckpointError(f"{path} holds extra/{name}, an extra entry it has no use for")
            members = _directory(zf, path)
            for key, (info, dtype, shape) in members.items():
                if key.startswith("extra/") and extras is not None:
                    if dtype.kind not in extras[key[len("extra/"):]]:
                        raise CheckpointError(f"{path} holds {key} of dtype {dtype}")
                    if shape != () or info.file_size > MAX_EXTRA_BYTES:
                        raise CheckpointError(f"{path}: {key} is not a single number or string (shape {shape}, "
                                              f"{info.file_size} bytes)")
            if not any(k.startswith("model/") for k in members):
                raise CheckpointError(f"{path} holds no model weights (not a checkpoint written by "
                                      f"nn.checkpoint.save)")
            data = {k: _read_member(zf, m[0]) for k, m in members.items() if k.startswith("extra/")}
            if layout is not None:
                _check_layout(path, members, layout(data) if callable(layout) else layout)
            for key, (info, dtype, shape) in members.items():
                if not key.startswith("extra/"):
                    data[key] = _read_member(zf, info)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint") from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path} is {_not_a_zip(path, e)}") from None
    except (ValueError, EOFError, OSError, KeyError, NotImplementedError, RuntimeError) as e:
        # a bad .npy header, a member cut short, a CRC mismatch at the end of one, an unknown compression
        raise CheckpointError(f"{path} is truncated or damaged ({type(e).__name__}: {e})") from None
    return data


def _not_a_zip(path, e):
    """Why a file that zipfile cannot open is no checkpoint: cut short, or never one."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        head = b""
    if head.startswith(b"PK"):
        return f"truncated or damaged (BadZipFile: {e})"
    if head == b"\x93NUMPY":
        return "a single array, not a checkpoint"
    return "not a checkpoint (unreadable bytes)"


def _check_layout(path, members, expected):
    """Refuse members outside `expected` ({key: (dtype, shape, required)}), of another dtype or
    shape, and required keys that are missing: from the headers alone."""
    for key, (info, dtype, shape) in members.items():
        if key.startswith("extra/"):
            continue
        if key not in expected:
            raise CheckpointError(f"{path} holds {key}, an array this model has no use for ({dtype}, shape {shape})")
        want_dtype, want_shape, _ = expected[key]
        if dtype != want_dtype or shape != tuple(want_shape):
            raise CheckpointError(f"{path}: {key} has shape {shape} ({dtype}), this model needs "
                                  f"{tuple(want_shape)} ({want_dtype})")
    missing = [k for k, (_, _, required) in expected.items() if required and k not in members]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path} has no {missing[0]}{more} (a checkpoint of another model)")


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
    """Load a checkpoint written by save() into `model` (and `optimizer`), each array checked
    against them before it is read (with strict=False the model's keys are not required, but keys
    it does not have are still refused); returns the extras as a dict (0-d arrays become Python scalars/strings)."""
    expected = layout(model, optimizer)
    if not strict:
        expected = {k: (d, s, False) for k, (d, s, _) in expected.items()}
    return restore(read(path, layout=expected), model, optimizer, strict=strict, path=path)
