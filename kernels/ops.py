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
from . import batchnorm as _bn
from .batchnorm import (batchnorm_add_relu_backward, batchnorm_add_relu_forward_train, batchnorm_backward,
                        batchnorm_backward_elemt, batchnorm_backward_from_partials,
                        batchnorm_backward_from_partials_pair, batchnorm_backward_reduce,
                        batchnorm_forward_inference, batchnorm_forward_train, batchnorm_forward_train_from_stats,
                        batchnorm_partial_stats, batchnorm_relu_backward, batchnorm_relu_forward_train,
                        batchnorm_relu_grad_partials)
from . import cross_entropy as _ce
from .cross_entropy import accumulate_loss, softmax_cross_entropy_backward, topk_correct
from .elementwise import add, add_relu_forward, relu_backward, relu_forward
from .elementwise import cast as _cast
from . import gemm as _gemm
from . import input as _input
from .optimizer import (ParamSegments, global_grad_norm, lars_trust_ratio, lars_trust_ratio_flat, loss_scale_update,
                        momentum_update_flat, nonfinite_flag, sgd_momentum_update)
from . import pool as _pool
from .pool import global_avgpool_backward, global_avgpool_backward_relu_bn, global_avgpool_forward, maxpool2d_forward

__all__ = ["conv2d_forward", "conv2d_forward_bn_stats", "conv2d_backward_data", "conv2d_backward_data_relu_bn",
           "conv2d_backward_weight",
           "conv_weight", "linear_forward", "linear_backward",
           "batchnorm_forward_train", "batchnorm_forward_train_from_stats", "batchnorm_forward_inference",
           "batchnorm_backward",
           "batchnorm_relu_forward_train", "batchnorm_relu_backward", "batchnorm_add_relu_forward_train",
           "batchnorm_add_relu_backward", "batchnorm_partial_stats", "batchnorm_backward_reduce",
           "batchnorm_backward_elemt", "batchnorm_relu_grad_partials", "batchnorm_backward_from_partials",
           "batchnorm_backward_from_partials_pair",
           "relu_forward", "relu_backward", "add", "add_relu_forward",
           "maxpool2d_forward", "maxpool2d_backward", "maxpool2d_backward_relu_bn",
           "global_avgpool_backward_relu_bn", "global_avgpool_forward", "global_avgpool_backward",
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


# Mixed precision on our kernels: float16 activations run float16 kernels end to end.  The
# convolutions of float16 activations are versions 4 and up of conv.cu (tensor cores, float32
# accumulation), the linear layer gemm.cu's WMMA GEMM; a float32 master weight is cast once per step
# (conv_weight: cast and channels-last in one launch) and its gradient is summed in float32 and
# written in float32 (dtype=), never rounded to half.


def conv2d_forward(x, w, stride, padding):
    """y[N, P, Q, K] = conv(x[N, H, W, C], w[K, C, R, S]) (NHWC activations, OIHW weights)."""
    return _impl(x).conv2d_forward(x, w, stride, padding)   # cuDNN: fp16 on tensor cores


def conv2d_forward_bn_stats(x, w, stride, padding):
    """(y, the batch-norm partials of y [4, P, K]) for batchnorm_forward_train_from_stats: written by
    the forward kernel's epilogue (conv.cu versions 3 to 5); cuDNN's y (and versions 1 and 2) is read
    once more for them (batchnorm_chan_partials)."""
    impl = _impl(x)
    if impl is not _conv:
        y = impl.conv2d_forward(x, w, stride, padding)
        return y, _bn.batchnorm_chan_partials(y)
    return _conv.conv2d_forward_bn_stats(x, w, stride, padding)


def conv2d_backward_data(dy, w, x_shape, stride, padding):
    """dx (shape x_shape) of conv2d_forward, from dy[N, P, Q, K]."""
    return _impl(dy).conv2d_backward_data(dy, w, x_shape, stride, padding)


def conv2d_backward_data_relu_bn(dy, w, x_shape, stride, padding, a, bn_x, bn_mean, dz=None):
    """(g, part): dx of conv2d_forward masked by the ReLU whose output a is this convolution's
    input (g), and the partial sums [2, B, C] of the backward of the batch norm before that ReLU
    (input bn_x, batch mean bn_mean), for batchnorm_backward_from_partials.  Our convolutions write
    them in the backward-data epilogue (conv.cu versions 3 to 5); cuDNN's dx (and versions 1 and 2)
    is read once more for them (batchnorm_relu_grad_partials).  dz: a's gradient from its other
    consumer (a residual block's identity shortcut), added to dx before the mask."""
    impl = _impl(dy)
    if impl is _conv:
        return _conv.conv2d_backward_data_relu_bn(dy, w, x_shape, stride, padding, a, bn_x, bn_mean, dz)
    return _conv.relu_bn_from_dgrad(impl.conv2d_backward_data(dy, w, x_shape, stride, padding), a, bn_x, bn_mean, dz)


def conv2d_backward_weight(x, dy, w_shape, stride, padding, dtype=None):
    """dw (shape w_shape, OIHW, in dtype: None for x's) of conv2d_forward, from x and dy."""
    impl = _impl(x)
    if impl is not _conv:
        return impl.conv2d_backward_weight(x, dy, w_shape, stride, padding, dtype)
    return _conv.conv2d_backward_weight(x, dy, w_shape, stride, padding, dtype=dtype)


def conv_weight(w, dtype):
    """w as dtype for the convolutions of activations of that dtype: float16 is cast by one kernel
    into channels-last memory (returned as its [K, C, R, S] view), which both our tensor-core
    convolutions and cuDNN read without a copy of their own."""
    return _conv.conv_weight(w, dtype)


def linear_forward(x, w, b=None):
    """y[N, Cout] = x[N, Cin] @ w[Cout, Cin]^T + b (float16 x and w: tensor cores, y float16)."""
    return _gemm.linear_forward(x, w, b)


def linear_backward(dy, x, w, need_bias_grad=True, dtype=None):
    """(dx, dw, db or None) of linear_forward; dw and db in dtype (None: dy's)."""
    return _gemm.linear_backward(dy, x, w, need_bias_grad, dtype=dtype)


def maxpool2d_backward(dy, argmax, x_shape, kernel_size, stride, padding):
    """dx of maxpool2d_forward (version 3 of pool.cu unless chosen otherwise: one thread per 2x2 block
    of input pixels gathers, deterministic)."""
    return _pool.maxpool2d_backward(dy, argmax, x_shape, kernel_size, stride, padding)


def maxpool2d_backward_relu_bn(dy, argmax, y, a, bn_x, bn_mean, kernel_size, stride, padding):
    """(g, part): dx of maxpool2d_forward masked by the ReLU whose output a is the pool's input (g),
    and the partial sums [2, B, C] of the backward of the batch norm before that ReLU (input bn_x,
    batch mean bn_mean), for batchnorm_backward_from_partials: version 3 of pool.cu writes them in
    its epilogue (the mask from the pool's output y); other versions read g once more for them."""
    return _pool.maxpool2d_backward_relu_bn(dy, argmax, y, a, bn_x, bn_mean, kernel_size, stride, padding)


def softmax_cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """(mean loss, probs) of the fused softmax cross-entropy (version 2 unless chosen otherwise: one
    block per row)."""
    return _ce.softmax_cross_entropy_forward(logits, labels, label_smoothing)


def input_normalize(images_uint8, mean=(123.68, 116.78, 103.94), std=None, dtype=np.float32):
    """uint8 NHWC images -> normalised float (version 3 unless chosen otherwise: 16-byte loads and stores)."""
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
