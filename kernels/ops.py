"""The op contract, launched as our CUDA kernels: the `emu` and `cuda` devices of nn/.

Every function here has the name, signature and semantics of its NumPy twin in
kernels/reference.py (the `cpu` device and the reference the kernels are tested against).
Called with NumPy arrays the kernels run on the CPU emulator; with CuPy arrays, on the GPU.
Each launcher lives beside its kernel source (kernels/<op>.py next to kernels/<op>.cu); this
module gathers them and adds one switch: which engine runs the convolutions.

    set_conv_engine("cudnn")   # convolutions through NVIDIA cuDNN (GPU only), see cudnn_engine.py
    set_conv_engine("ours")    # our implicit-GEMM kernels (the default)
"""

import numpy as np

from . import conv as _conv
from .batchnorm import (batchnorm_add_relu_backward, batchnorm_add_relu_forward_train, batchnorm_backward,
                        batchnorm_forward_inference, batchnorm_forward_train, batchnorm_relu_backward,
                        batchnorm_relu_forward_train)
from .cross_entropy import softmax_cross_entropy_backward, softmax_cross_entropy_forward, topk_correct
from .elementwise import add, add_relu_forward, relu_backward, relu_forward
from .elementwise import cast as _cast
from .gemm import linear_backward, linear_forward
from .input import input_normalize
from .optimizer import global_grad_norm, lars_trust_ratio, sgd_momentum_update
from .pool import global_avgpool_backward, global_avgpool_forward, maxpool2d_backward, maxpool2d_forward

__all__ = ["conv2d_forward", "conv2d_backward_data", "conv2d_backward_weight", "linear_forward", "linear_backward",
           "batchnorm_forward_train", "batchnorm_forward_inference", "batchnorm_backward",
           "batchnorm_relu_forward_train", "batchnorm_relu_backward", "batchnorm_add_relu_forward_train",
           "batchnorm_add_relu_backward", "relu_forward", "relu_backward", "add", "add_relu_forward",
           "maxpool2d_forward", "maxpool2d_backward", "global_avgpool_forward", "global_avgpool_backward",
           "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "topk_correct",
           "sgd_momentum_update", "lars_trust_ratio", "global_grad_norm", "input_normalize", "cast",
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


def conv2d_forward(x, w, stride, padding):
    """y[N, P, Q, K] = conv(x[N, H, W, C], w[K, C, R, S]) (NHWC activations, OIHW weights)."""
    return _impl(x).conv2d_forward(x, w, stride, padding)


def conv2d_backward_data(dy, w, x_shape, stride, padding):
    """dx (shape x_shape) of conv2d_forward, from dy[N, P, Q, K]."""
    return _impl(dy).conv2d_backward_data(dy, w, x_shape, stride, padding)


def conv2d_backward_weight(x, dy, w_shape, stride, padding):
    """dw (shape w_shape, OIHW) of conv2d_forward, from x and dy."""
    return _impl(x).conv2d_backward_weight(x, dy, w_shape, stride, padding)


def cast(x, dtype):
    """x converted to dtype (float32 <-> float16 by our kernel, round to nearest even); other
    conversions (for example to float64 for a check) use the array library."""
    src, dst = np.dtype(x.dtype), np.dtype(dtype)
    if src == dst:
        return x.copy()
    if {src, dst} == {np.dtype(np.float32), np.dtype(np.float16)}:
        return _cast(x, dst)
    return x.astype(dst)
