"""The op contract, launched as our CUDA kernels: the `emu` and `cuda` devices of nn/.

Every function here has the name, signature and semantics of kernels/contract.py, as its NumPy
twin in kernels/reference.py (the `cpu` device and the reference the kernels are tested against).
Called with NumPy arrays the kernels run on the CPU emulator; with CuPy arrays, on the GPU.
Each launcher lives beside its kernel source (kernels/<op>.py next to kernels/<op>.cu); this
module gathers them.  Which version of each kernel runs is the version in use of its family
(kernels/versions.py: the fastest unless chosen otherwise), and one more switch says which
engine runs the convolutions:

    with kernels.versions.use(conv=1, batchnorm=1): ...   # naive convolutions and batch norm
    set_conv_engine("cudnn")   # convolutions through NVIDIA cuDNN (GPU only), see cudnn_engine.py
    set_conv_engine("ours")    # our kernels (the default)
"""

import numpy as np

from . import conv as _conv
from .batchnorm import (batchnorm_add_relu_backward, batchnorm_add_relu_forward_train, batchnorm_backward,
                        batchnorm_backward_elemt, batchnorm_backward_reduce, batchnorm_forward_inference,
                        batchnorm_forward_train, batchnorm_partial_stats, batchnorm_relu_backward,
                        batchnorm_relu_forward_train)
from . import cross_entropy as _ce
from .cross_entropy import accumulate_loss, softmax_cross_entropy_backward, topk_correct
from .elementwise import add, add_relu_forward, relu_backward, relu_forward
from .elementwise import cast as _cast
from . import gemm as _gemm
from . import input as _input
from .optimizer import (ParamSegments, global_grad_norm, lars_trust_ratio, lars_trust_ratio_flat, loss_scale_update,
                        momentum_update_flat, nonfinite_flag, sgd_momentum_update)
from . import pool as _pool
from .pool import global_avgpool_backward, global_avgpool_forward, maxpool2d_forward

__all__ = ["conv2d_forward", "conv2d_backward_data", "conv2d_backward_weight", "linear_forward", "linear_backward",
           "batchnorm_forward_train", "batchnorm_forward_inference", "batchnorm_backward",
           "batchnorm_relu_forward_train", "batchnorm_relu_backward", "batchnorm_add_relu_forward_train",
           "batchnorm_add_relu_backward", "batchnorm_partial_stats", "batchnorm_backward_reduce",
           "batchnorm_backward_elemt", "relu_forward", "relu_backward", "add", "add_relu_forward",
           "maxpool2d_forward", "maxpool2d_backward", "global_avgpool_forward", "global_avgpool_backward",
           "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "topk_correct", "accumulate_loss",
           "sgd_momentum_update", "lars_trust_ratio", "global_grad_norm", "ParamSegments", "momentum_update_flat",
           "lars_trust_ratio_flat", "nonfinite_flag", "loss_scale_update", "input_normalize", "cast",
           "set_conv_engine", "conv_engine"]

_ENGINES = ("ours", "cudnn")
_engine = "ours"


def set_conv_engine(name):
    """Run convolutions on CuPy arrays with 'ours' (our kernels) or 'cudnn'. NumPy arrays (the
    emulator) always use ours: cuDNN needs a GPU."""
    global _engine
    if name not in _ENGINES:
        raise ValueError(f"conv engine must be one of {_ENGINES}, got {name!r}")
    if name == "cudnn":
        from . import cudnn_engine
        ok, reason = cudnn_engine.cudnn_available()
        if not ok:
            raise RuntimeError(f"the cuDNN engine is not available: {reason}")
    _engine = name


def conv_engine():
    """The engine now in use for CuPy arrays: 'ours' or 'cudnn'."""
    return _engine


def _impl(x):
    if _engine == "cudnn" and type(x).__module__.split(".")[0] == "cupy":
        from . import cudnn_engine
        return cudnn_engine
    return _conv


# Mixed precision on our kernels: the convolution and GEMM kernels take float32 (the float16
# tensor-core GEMM exists, gemm.gemm_f16, but the convolutions do not use it yet). With float16
# activations they run on widened copies and the result is rounded back to float16 once: the
# numerics of fp16 storage with fp32 accumulation, without the tensor-core speed (bench/NOTES.md).
_F16 = np.dtype(np.float16)


def _widened(fn, *arrays):
    """fn(*arrays) with float16 arrays widened to float32; the result rounded back to float16."""
    if not any(getattr(a, "dtype", None) == _F16 for a in arrays):
        return fn(*arrays)
    wide = [_cast(a, np.float32) if getattr(a, "dtype", None) == _F16 else a for a in arrays]
    out = fn(*wide)
    if isinstance(out, tuple):
        return tuple(None if o is None else _cast(o, np.float16) for o in out)
    return _cast(out, np.float16)


def conv2d_forward(x, w, stride, padding):
    """y[N, P, Q, K] = conv(x[N, H, W, C], w[K, C, R, S]) (NHWC activations, OIHW weights)."""
    impl = _impl(x)
    if impl is not _conv:
        return impl.conv2d_forward(x, w, stride, padding)  # cuDNN: fp16 on tensor cores
    return _widened(lambda x_, w_: _conv.conv2d_forward(x_, w_, stride, padding), x, w)


def conv2d_backward_data(dy, w, x_shape, stride, padding):
    """dx (shape x_shape) of conv2d_forward, from dy[N, P, Q, K]."""
    impl = _impl(dy)
    if impl is not _conv:
        return impl.conv2d_backward_data(dy, w, x_shape, stride, padding)
    return _widened(lambda dy_, w_: _conv.conv2d_backward_data(dy_, w_, x_shape, stride, padding), dy, w)


def conv2d_backward_weight(x, dy, w_shape, stride, padding):
    """dw (shape w_shape, OIHW) of conv2d_forward, from x and dy."""
    impl = _impl(x)
    if impl is not _conv:
        return impl.conv2d_backward_weight(x, dy, w_shape, stride, padding)
    return _widened(lambda x_, dy_: _conv.conv2d_backward_weight(x_, dy_, w_shape, stride, padding), x, dy)


def linear_forward(x, w, b=None):
    """y[N, Cout] = x[N, Cin] @ w[Cout, Cin]^T + b."""
    return _widened(lambda x_, w_, b_: _gemm.linear_forward(x_, w_, b_), x, w, b)


def linear_backward(dy, x, w, need_bias_grad=True):
    """(dx, dw, db or None) of linear_forward."""
    return _widened(lambda dy_, x_, w_: _gemm.linear_backward(dy_, x_, w_, need_bias_grad), dy, x, w)


def maxpool2d_backward(dy, argmax, x_shape, kernel_size, stride, padding):
    """dx of maxpool2d_forward (version 2 of pool.cu unless chosen otherwise: one thread per input
    pixel gathers, deterministic)."""
    return _pool.maxpool2d_backward(dy, argmax, x_shape, kernel_size, stride, padding)


def softmax_cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """(mean loss, probs) of the fused softmax cross-entropy (version 2 unless chosen otherwise: one
    block per row)."""
    return _ce.softmax_cross_entropy_forward(logits, labels, label_smoothing)


def input_normalize(images_uint8, mean=(123.68, 116.78, 103.94), std=None, dtype=np.float32):
    """uint8 NHWC images -> normalised float (version 2 unless chosen otherwise: 4 pixels a thread)."""
    return _input.input_normalize(images_uint8, mean, std, dtype)


def cast(x, dtype):
    """x converted to dtype (float32 <-> float16 by our kernel, round to nearest even); other
    conversions (for example to float64 for a check) use the array library."""
    src, dst = np.dtype(x.dtype), np.dtype(dtype)
    if src == dst:
        return x.copy()
    if {src, dst} == {np.dtype(np.float32), np.dtype(np.float16)}:
        return _cast(x, dst)
    return x.astype(dst)
