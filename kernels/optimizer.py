"""Launchers of kernels/optimizer.cu: fused SGD with momentum (per tensor and over one flat buffer
holding every parameter), LARS trust ratios and the global gradient norm.

Per tensor (the op contract):
    sgd_momentum_update(param, grad, momentum_buf, lr, momentum=0.9, weight_decay=0.0, nesterov=False)
    ratio = lars_trust_ratio(param, grad, weight_decay)           # Python float
    norm = global_grad_norm([g1, g2, ...])                         # Python float (the host waits)
    global_grad_norm([g1, g2, ...], out=norm1)                     # into a device array: no wait

All parameters at once (what nn.optim does): keep params, grads and momenta in three flat float32
buffers laid out alike, describe the layout once with a `ParamSegments` table, and update
everything in one launch:
    segments = ParamSegments([p.size for p in params], weight_decay=[5e-5 if p.ndim > 1 else 0.0 ...])
    momentum_update_flat(params_flat, grads_flat, momentum_flat, segments, lr, 0.9)      # SGD
    ratios = lars_trust_ratio_flat(params_flat, grads_flat, segments)   # float32 [S] on the device
    momentum_update_flat(..., segments, lr, 0.9, lr_in_momentum=True, lr_scale=ratios)   # LARS
Per-segment weight decay is how BN parameters and biases are excluded from decay (wd 0), and the
per-segment `use_trust` mask how they skip LARS. `lr`, `grad_scale` (1 / loss scale) and `skip`
(the overflow flag) may be one-element device arrays, read by the kernel: nothing waits for the
host, and a CUDA graph replays the step with their current values.

Mixed precision on the device:
    nonfinite_flag(grads_flat, counts[0:1])     # counts[0] = 1 if a gradient is NaN/inf
    momentum_update_flat(..., grad_scale=scale_state[1:2], skip=counts[0:1])
    loss_scale_update(scale_state, counts, dynamic=True)    # adapt the scale, clear the flag
"""

import numpy as np

from . import versions
from .runtime.launch import array_module, blocks_for, check_array, empty, is_cupy, module

__all__ = ["sgd_momentum_update", "momentum_update_flat", "ParamSegments", "lars_trust_ratio",
           "lars_trust_ratio_flat", "global_grad_norm", "nonfinite_flag", "loss_scale_update"]

_BLOCK = 256


def _kernel(name):
    return module("optimizer.cu").get_function(name)


def _aligned(*arrays):
    """Every array starts on a 16-byte boundary (version 3's float4 loads)."""
    return all((int(a.data.ptr) if is_cupy(a) else int(a.__array_interface__["data"][0])) % 16 == 0 for a in arrays)


def _finite(op, name, value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not np.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return v


def _check_update_arrays(op, param, grad, momentum_buf):
    check_array(op, "param", param, dtype=np.float32)
    check_array(op, "grad", grad, dtype=np.float32, shape=param.shape)
    check_array(op, "momentum_buf", momentum_buf, dtype=np.float32, shape=param.shape)
    array_module(param, grad, momentum_buf)
    for name, a in (("param", param), ("momentum_buf", momentum_buf)):
        if not getattr(a.flags, "writeable", True):
            raise ValueError(f"{op}: {name} is updated in place but the array is read-only")
    if param is momentum_buf or param is grad or grad is momentum_buf:
        raise ValueError(f"{op}: param, grad and momentum_buf must be three different arrays")


def sgd_momentum_update(param, grad, momentum_buf, lr, momentum=0.9, weight_decay=0.0, nesterov=False):
    """SGD with momentum and weight decay, fused, IN PLACE on param and momentum_buf:

        g = grad + weight_decay * param;  v = momentum * v + g;
        param -= lr * (g + momentum * v if nesterov else v)

    param, grad, momentum_buf: float32, same shape, C-contiguous.  Returns None.
    """
    op = "sgd_momentum_update"
    _check_update_arrays(op, param, grad, momentum_buf)
    lr, momentum, weight_decay = (_finite(op, n, v) for n, v in
                                  (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)))
    xp = array_module(param)
    n = param.size
    if n:
        _kernel("sgd_momentum_update_f32")((blocks_for(n, _BLOCK, xp),), (_BLOCK,),
                                           (param, grad, momentum_buf, np.int64(n), np.float32(lr),
                                            np.float32(momentum), np.float32(weight_decay),
                                            np.int32(1 if nesterov else 0)))


class ParamSegments:
    """The layout of a flat parameter buffer: tensor s occupies [offsets[s], offsets[s + 1]).

    sizes: element count of each tensor, in buffer order.  weight_decay: one float for all, or
    one per tensor (0 for BN parameters and biases).  use_trust: None (every tensor) or one bool
    per tensor: whether LARS scales its step by a trust ratio (False for BN parameters and
    biases).  xp: numpy (emulator) or cupy (GPU) -- where the tables live.  chunk_size: most
    elements one block handles in one go (default 65536 on the GPU, 4096 on the emulator).

    Attributes: sizes, offsets (host int64 [S + 1]), total, num_segments, weight_decay (host
    float32 [S]), use_trust (host bool [S]), num_chunks, and the device tables chunk_start (int64
    [num_chunks + 1]), chunk_segment (int32 [num_chunks]), segment_first_chunk (int32 [S + 1]),
    segment_weight_decay (float32 [S]), segment_use_trust (int32 [S]).
    """

    def __init__(self, sizes, weight_decay=0.0, xp=np, chunk_size=None, use_trust=None):
        sizes = [int(s) for s in sizes]
        if not sizes or min(sizes) < 0:
            raise ValueError(f"ParamSegments: sizes must be a non-empty list of counts >= 0, got {sizes[:8]}")
        if np.ndim(weight_decay) == 0:
            wd = np.full(len(sizes), float(weight_decay), dtype=np.float32)
        else:
            wd = np.asarray(weight_decay, dtype=np.float32)
            if wd.shape != (len(sizes),):
                raise ValueError(f"ParamSegments: weight_decay must be one number or one per tensor "
                                 f"({len(sizes)}), got shape {wd.shape}")
        if not np.all(np.isfinite(wd)):
            raise ValueError("ParamSegments: weight_decay must be finite")
        trust = np.ones(len(sizes), dtype=bool) if use_trust is None else np.asarray(use_trust, dtype=bool)
        if trust.shape != (len(sizes),):
            raise ValueError(f"ParamSegments: use_trust must be one bool per tensor ({len(sizes)}), got shape "
                             f"{trust.shape}")
        if chunk_size is None:
            chunk_size = 4096 if xp is np else 65536
        if int(chunk_size) < 1:
            raise ValueError(f"ParamSegments: chunk_size must be >= 1, got {chunk_size}")
        chunk_size = int(chunk_size)
        self.xp = xp
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.num_segments = len(sizes)
        self.weight_decay = wd
        self.use_trust = trust
        starts, owners, first = [], [], [0]
        for s, (offset, size) in enumerate(zip(self.offsets[:-1], sizes)):
            for begin in range(0, size, chunk_size):
                starts.append(int(offset) + begin)
                owners.append(s)
            first.append(len(starts))
        starts.append(self.total)
        self.num_chunks = len(owners)
        self.chunk_start = xp.asarray(np.array(starts, dtype=np.int64))
        self.chunk_segment = xp.asarray(np.array(owners if owners else [0], dtype=np.int32))
        self.segment_first_chunk = xp.asarray(np.array(first, dtype=np.int32))
        self.segment_weight_decay = xp.asarray(wd)
        self.segment_use_trust = xp.asarray(trust.astype(np.int32))

    def split(self, flat, shapes=None):
        """Views of `flat` (a 1-D buffer of `total` elements), one per tensor, reshaped to
        `shapes` when given."""
        if flat.ndim != 1 or flat.shape[0] != self.total:
            raise ValueError(f"ParamSegments.split: flat must have shape ({self.total},), got {tuple(flat.shape)}")
        views = [flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        if shapes is not None:
            views = [v.reshape(s) for v, s in zip(views, shapes)]
        return views

    def _check(self, op, name, flat):
        check_array(op, name, flat, dtype=np.float32, ndim=1, shape=(self.total,))
        if is_cupy(flat) != (self.xp is not np):
            raise TypeError(f"{op}: {name} is a {'CuPy' if is_cupy(flat) else 'NumPy'} array but the segments' tables "
                            f"live in {self.xp.__name__}; build ParamSegments with xp matching the arrays")

    def _grid(self):
        cap = 8 if self.xp is np else 4096
        return (max(1, min(self.num_chunks, cap)),)


def _scalar_on_device(op, name, value, xp, dtype=np.float32):
    """A one-element device array: `value` itself when it is one (checked), else a new array
    holding the number (an upload: fine for a single call; nn.optim keeps its buffers)."""
    if hasattr(value, "shape"):
        check_array(op, name, value, dtype=dtype, shape=(1,))
        if is_cupy(value) != (xp is not np):
            raise TypeError(f"{op}: {name} must live on the same device as the flat buffers")
        return value
    v = _finite(op, name, value)
    return xp.asarray(np.array([v], dtype=dtype))


def momentum_update_flat(params_flat, grads_flat, momentum_flat, segments, lr, momentum=0.9, nesterov=False,
                         lr_in_momentum=False, lr_scale=None, grad_scale=None, skip=None):
    """Momentum SGD (or LARS) over every tensor of a flat buffer in ONE launch, IN PLACE.

    params_flat, grads_flat, momentum_flat: float32 [segments.total]; segments: ParamSegments
    (per-tensor weight decay wd_s).  lr, grad_scale: a number or a float32 [1] device array (read
    by the kernel: keep them in device buffers to avoid host round trips); grad_scale None = 1.
    lr_scale: None or float32 [S] (LARS trust ratios).  skip: None or int32 [1]: when nonzero the
    launch changes nothing (an fp16 step whose gradients overflowed).  For tensor s, with
    g = grad * grad_scale + wd_s * w and lr_s = lr * lr_scale_s:
        lr_in_momentum False (SGD):  v = momentum * v + g;  w -= lr_s * (g + momentum * v if nesterov else v)
        lr_in_momentum True (LARS):  v = momentum * v + lr_s * g;  w -= v
    Returns None.
    """
    op = "momentum_update_flat"
    if not isinstance(segments, ParamSegments):
        raise TypeError(f"{op}: segments must be a ParamSegments, got {type(segments).__name__}")
    _check_update_arrays(op, params_flat, grads_flat, momentum_flat)
    for name, a in (("params_flat", params_flat), ("grads_flat", grads_flat), ("momentum_flat", momentum_flat)):
        segments._check(op, name, a)
    if lr_scale is not None:
        check_array(op, "lr_scale", lr_scale, dtype=np.float32, shape=(segments.num_segments,))
        array_module(params_flat, lr_scale)
    if nesterov and lr_in_momentum:
        raise ValueError(f"{op}: nesterov is defined for lr outside the momentum (SGD) only")
    xp = segments.xp
    lr = _scalar_on_device(op, "lr", lr, xp)
    if grad_scale is not None:
        grad_scale = _scalar_on_device(op, "grad_scale", grad_scale, xp)
    if skip is not None:
        check_array(op, "skip", skip, dtype=np.int32, shape=(1,))
        array_module(params_flat, skip)
    momentum = _finite(op, "momentum", momentum)
    if segments.num_chunks == 0:
        return
    _kernel("momentum_update_flat_f32")(
        segments._grid(), (_BLOCK,),
        (params_flat, grads_flat, momentum_flat, segments.chunk_start, segments.chunk_segment,
         np.int32(segments.num_chunks), segments.segment_weight_decay, lr_scale, lr, grad_scale, skip,
         np.float32(momentum), np.int32(1 if nesterov else 0), np.int32(1 if lr_in_momentum else 0)))


def nonfinite_flag(x, flag):
    """flag[0] = 1 when any element of x is NaN or inf (otherwise flag is left as it is), IN PLACE
    on the device: the overflow check of dynamic loss scaling without a host round trip.
    x: float32, C-contiguous, any shape; flag: int32 [1] on the same device.  Returns None."""
    op = "nonfinite_flag"
    check_array(op, "x", x, dtype=np.float32)
    check_array(op, "flag", flag, dtype=np.int32, shape=(1,))
    xp = array_module(x, flag)
    if x.size:
        _kernel("nonfinite_flag_f32")((blocks_for(x.size, _BLOCK, xp, per_thread=4),), (_BLOCK,),
                                      (x.reshape(-1), np.int64(x.size), flag))


def loss_scale_update(scale_state, counts, dynamic, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                      min_scale=1.0):
    """The loss scaler's bookkeeping after a step, on the device, IN PLACE.

    scale_state: float32 [2] = [S, 1/S]; counts: int32 [3] = [found_inf, good_steps, skipped_steps].
    found_inf set: skipped_steps += 1 and, if dynamic, S = max(S * backoff_factor, min_scale),
    good_steps = 0.  Otherwise, if dynamic, good_steps += 1 and after growth_interval of them
    S *= growth_factor, good_steps = 0.  Then 1/S is refreshed and found_inf cleared.  Returns None."""
    op = "loss_scale_update"
    check_array(op, "scale_state", scale_state, dtype=np.float32, shape=(2,))
    check_array(op, "counts", counts, dtype=np.int32, shape=(3,))
    array_module(scale_state, counts)
    _kernel("loss_scale_update")((1,), (32,),
                                 (scale_state, counts, np.int32(1 if dynamic else 0), np.float32(growth_factor),
                                  np.float32(backoff_factor), np.int32(growth_interval), np.float32(min_scale)))


def lars_trust_ratio_flat(params_flat, grads_flat, segments, eta=0.001, eps=1e-9, return_norms=False,
                          grad_scale=None):
    """LARS trust ratio of every tensor of a flat buffer, computed on the device:

        ratio_s = eta * ||w_s|| / (||g_s|| + wd_s * ||w_s|| + eps), or 1 where either norm is 0
        or segments.use_trust[s] is False

    params_flat, grads_flat: float32 [segments.total]; wd_s from segments; grad_scale: None, a
    number or a float32 [1] device array multiplying the gradients (1 / loss scale).
    -> ratios float32 [S] on the device (and (w_norms, g_norms) float32 [S] with return_norms).
    The norms come from a two-stage reduction: per-chunk sums of squares, then per tensor.
    """
    op = "lars_trust_ratio_flat"
    if not isinstance(segments, ParamSegments):
        raise TypeError(f"{op}: segments must be a ParamSegments, got {type(segments).__name__}")
    segments._check(op, "params_flat", params_flat)
    segments._check(op, "grads_flat", grads_flat)
    eta, eps = _finite(op, "eta", eta), _finite(op, "eps", eps)
    xp = segments.xp
    if grad_scale is not None:
        grad_scale = _scalar_on_device(op, "grad_scale", grad_scale, xp)
    S = segments.num_segments
    if versions.version("optimizer") >= 3 and _aligned(params_flat, grads_flat):   # float4 vectors
        partial = empty(xp, (2, max(segments.num_chunks, 1)), dtype=np.float32)     # every chunk writes its own
        kernel = "chunk_sum_squares_vec_f32"
    else:
        partial = xp.zeros((2, max(segments.num_chunks, 1)), dtype=np.float32)
        kernel = "chunk_sum_squares_f32"
    if segments.num_chunks:
        _kernel(kernel)(segments._grid(), (_BLOCK,),
                        (params_flat, grads_flat, segments.chunk_start, np.int32(segments.num_chunks), partial[0],
                         partial[1]))
    ratios = empty(xp, S, dtype=np.float32)
    norms = empty(xp, (2, S), dtype=np.float32) if return_norms else None
    _kernel("lars_segment_ratios")((-(-S // 128),), (128,),
                                   (partial[0], partial[1], segments.segment_first_chunk, np.int32(S),
                                    segments.segment_weight_decay, segments.segment_use_trust, grad_scale,
                                    np.float32(eta), np.float32(eps), ratios,
                                    None if norms is None else norms[0], None if norms is None else norms[1]))
    if return_norms:
        return ratios, norms[0], norms[1]
    return ratios


def lars_trust_ratio(param, grad, weight_decay, eta=0.001, eps=1e-9):
    """LARS trust ratio of one tensor: eta * ||w|| / (||g|| + weight_decay * ||w|| + eps), 1.0
    where either norm is 0.  param, grad: float32, same shape.  -> Python float (a device sync;
    use lars_trust_ratio_flat to keep all ratios on the device)."""
    op = "lars_trust_ratio"
    check_array(op, "param", param, dtype=np.float32)
    check_array(op, "grad", grad, dtype=np.float32, shape=param.shape)
    array_module(param, grad)
    xp = array_module(param)
    segments = ParamSegments([param.size], _finite(op, "weight_decay", weight_decay), xp=xp)
    ratios = lars_trust_ratio_flat(param.reshape(-1), grad.reshape(-1), segments, eta, eps)
    return float(ratios[0])


def global_grad_norm(list_of_grads, out=None):
    """sqrt(sum over all arrays and elements of g^2) -> Python float (inf/NaN if any gradient holds
    one).  list_of_grads: float32 arrays of any shapes, all on one device.

    out: a one-element float32 array on that device: the norm is written there and `out` returned,
    without reading it on the host (a float makes the host wait for the GPU: a training step that
    clips or logs by the norm every step would lose its lead over the GPU)."""
    op = "global_grad_norm"
    grads = list(list_of_grads)
    for i, g in enumerate(grads):
        check_array(op, f"list_of_grads[{i}]", g, dtype=np.float32)
    if out is not None:
        check_array(op, "out", out, dtype=np.float32, shape=(1,))
        array_module(out, *grads)
    if not grads:
        if out is None:
            return 0.0
        out[...] = 0
        return out
    xp = array_module(*grads)
    if versions.version("optimizer") >= 3:   # float4 vectors, at most 1024 partial sums an array
        blocks = [min(blocks_for(g.size, _BLOCK, xp, per_thread=16), 1024) if g.size else 0 for g in grads]
        partial = empty(xp, max(1, sum(blocks)), dtype=np.float32)
        if not sum(blocks):
            partial[...] = 0
    else:
        blocks = [blocks_for(g.size, _BLOCK, xp, per_thread=4) if g.size else 0 for g in grads]
        partial = xp.zeros(max(1, sum(blocks)), dtype=np.float32)
    start = 0
    for g, nb in zip(grads, blocks):
        if nb:
            kernel = "sum_squares_vec_f32" if versions.version("optimizer") >= 3 and _aligned(g) else \
                "sum_squares_blocks_f32"
            _kernel(kernel)((nb,), (_BLOCK,), (g.reshape(-1), np.int64(g.size), partial[start:start + nb]))
        start += nb
    result = empty(xp, 1, dtype=np.float32) if out is None else out
    _kernel("sqrt_of_sum_f32")((1,), (_BLOCK,), (partial, np.int32(partial.size), result))
    return float(result[0]) if out is None else out


if __name__ == "__main__":   # `python -m kernels.optimizer ARGS` is `python -m kernels optimizer ARGS` (the lesson)
    import runpy
    import sys
    sys.argv[1:1] = ["optimizer"]
    runpy.run_module("kernels", run_name="__main__")
