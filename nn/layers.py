"""Layers: Module (the base class) and Conv2d, BatchNorm2d, ReLU, MaxPool2d, GlobalAvgPool,
Linear, Sequential.

A Module owns Parameters (learnable, get gradients), buffers (plain arrays such as BN running
statistics) and child Modules, all registered by attribute assignment in definition order. That
order is the order of `parameters()`, `named_parameters()` and `state_dict()`: for every module,
its own parameters, then its own buffers, then its children recursively, the same rule as
PyTorch, so a model built in torchvision's order has torchvision's state_dict keys.

Layers take and return NHWC activations (x[N, H, W, C]); conv weights are stored OIHW
([out, in, kh, kw], as torchvision).

Initialisation (deterministic: every constructor takes `rng`, a numpy Generator; without one it
draws from this module's generator, seeded by `manual_seed`, default seed 0):
  Conv2d:      He (Kaiming) normal, std = sqrt(2 / fan_out), fan_out = out_channels * kh * kw
               (mode 'fan_out' for ReLU, as torchvision's ResNet), no bias.
  BatchNorm2d: gamma 1, beta 0, running_mean 0, running_var 1.
  Linear:      weight normal(0, 0.01), bias 0.
"""

import importlib
from collections import OrderedDict

import numpy as np

from nn import functional as F
from nn.device import get_device, to_numpy
from nn.tensor import Parameter, Tensor

__all__ = ["Module", "Conv2d", "BatchNorm2d", "conv_bn", "ReLU", "MaxPool2d", "GlobalAvgPool", "Linear",
           "Sequential", "manual_seed"]

_default_rng = np.random.default_rng(0)


def manual_seed(seed):
    """Reseed the generator that layers created without an explicit `rng` draw from."""
    global _default_rng
    _default_rng = np.random.default_rng(seed)


def _rng(rng):
    return _default_rng if rng is None else rng


class Module:
    """Base class: registers Parameters, buffers and child Modules; train/eval; device moves;
    state_dict in PyTorch's naming and order.

    Subclasses set attributes in __init__ and define forward(); calling the module calls forward.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_path", "")
        self.training = True

    # ---- registration ------------------------------------------------------------------------

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() before assigning attributes")
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name, array):
        """A named array that is state (saved in state_dict) but not learned, e.g. running_mean."""
        self._buffers[name] = array

    def __getattr__(self, name):   # only called when normal lookup fails: buffers live here
        buffers = self.__dict__.get("_buffers", {})
        if name in buffers:
            return buffers[name]
        raise AttributeError(f"{type(self).__name__} has no attribute '{name}'")

    # ---- calling -----------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.forward is not defined")

    def _label(self):
        """How errors name this layer: its path in the model ('layer1.0.conv2') or its class."""
        return f"layer '{self._path}' ({type(self).__name__})" if self._path else type(self).__name__

    def _check_input(self, x, ndim=4, layout="[N, H, W, C] (NHWC)"):
        """Input must be a Tensor of the right rank on the device of this layer's parameters."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{self._label()}: input must be an nn.Tensor, got {type(x).__name__}")
        if x.ndim != ndim:
            raise ValueError(f"{self._label()}: input must be {ndim}-d {layout}, got shape {tuple(x.shape)}")
        for name, p in self._parameters.items():
            if p.device != x.device:
                raise ValueError(f"{self._label()}: parameter '{name}' is on device '{p.device.name}' but "
                                 f"the input is on '{x.device.name}'; move the model with .to('{x.device.name}')")

    # ---- walking the tree --------------------------------------------------------------------

    def named_modules(self, prefix=""):
        """Yield (path, module) for this module and every descendant, in registration order."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_parameters(self):
        """Yield (name, Parameter) in state_dict order, e.g. ('layer1.0.conv1.weight', p)."""
        for path, m in self.named_modules():
            for name, p in m._parameters.items():
                yield (f"{path}.{name}" if path else name), p

    def parameters(self):
        """Yield every Parameter (p.data, p.grad are arrays)."""
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self):
        for path, m in self.named_modules():
            for name, b in m._buffers.items():
                yield (f"{path}.{name}" if path else name), b

    def assign_paths(self):
        """Tell every descendant its path in this model, so errors can name the layer."""
        for path, m in self.named_modules():
            object.__setattr__(m, "_path", path)
        return self

    # ---- modes and devices -------------------------------------------------------------------

    def train(self, mode=True):
        """Training mode (BN uses batch statistics and updates running ones). Returns self."""
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        """Evaluation mode (BN uses running statistics). Returns self."""
        return self.train(False)

    def zero_grad(self):
        """Drop every parameter's gradient (set to None)."""
        for p in self.parameters():
            p.grad = None

    def to(self, device=None, dtype=None):
        """Move every parameter and buffer to `device` ('cpu', 'emu', 'cuda' or a Device) and/or
        cast floating ones to `dtype` (e.g. np.float64 for gradient checks). The Parameter
        objects stay the same (optimisers keep working); gradients are dropped. Returns self."""
        for m in self.modules():
            for p in m._parameters.values():
                dev = p.device if device is None else get_device(device)
                p.data = dev.asarray(p.data, dtype=dtype or p.data.dtype)
                p.device, p.grad = dev, None
            for name, b in list(m._buffers.items()):
                dev = self._device_of_buffers(m) if device is None else get_device(device)
                floating = np.issubdtype(b.dtype, np.floating)
                m._buffers[name] = dev.asarray(b, dtype=(dtype or b.dtype) if floating else b.dtype)
        return self

    def _device_of_buffers(self, m):
        for p in m._parameters.values():
            return p.device
        return get_device("cpu")

    @property
    def device(self):
        """The device of the first parameter (cpu for a module without parameters)."""
        for p in self.parameters():
            return p.device
        return get_device("cpu")

    # ---- state ---------------------------------------------------------------------------------

    def state_dict(self):
        """OrderedDict name -> array (parameters and buffers, the live arrays, not copies), with
        PyTorch's names and order, e.g. 'conv1.weight', 'bn1.running_mean'."""
        state = OrderedDict()
        for path, m in self.named_modules():
            for name, p in m._parameters.items():
                state[f"{path}.{name}" if path else name] = p.data
            for name, b in m._buffers.items():
                state[f"{path}.{name}" if path else name] = b
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays from `state_dict` (name -> NumPy/CuPy array, or anything with .numpy(), such
        as a torch tensor) into this model's parameters and buffers, cast to their dtype and
        device. With strict=True every key must match exactly: missing or unexpected keys and
        mismatched shapes raise ValueError naming them. Returns self."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        extra = [k for k in state_dict if k not in own]
        if strict and (missing or extra):
            raise ValueError(f"load_state_dict: missing keys {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                             f"unexpected keys {extra[:10]}{'...' if len(extra) > 10 else ''}")
        values = {}
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = _to_array(state_dict[key], key)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"load_state_dict: '{key}' has shape {tuple(value.shape)}, the model "
                                 f"expects {tuple(target.shape)}")
            values[key] = value
        # all checks passed: now copy (a failed load leaves the model untouched)
        for path, m in self.named_modules():
            for name, p in m._parameters.items():
                key = f"{path}.{name}" if path else name
                if key in values:
                    p.data[...] = p.device.asarray(values[key], dtype=p.data.dtype)
            for name, b in m._buffers.items():
                key = f"{path}.{name}" if path else name
                if key in values:
                    b[...] = self._device_of_buffers(m).asarray(values[key], dtype=b.dtype)
        return self

    def num_parameters(self):
        """Total number of learnable values."""
        return sum(int(p.data.size) for p in self.parameters())

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            lines.append("  (" + name + "): " + repr(child).replace("\n", "\n  "))
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"

    def extra_repr(self):
        return ""


def _to_array(value, key):
    if hasattr(value, "detach") and hasattr(value, "cpu"):          # a torch tensor
        value = value.detach().cpu().numpy()
    elif isinstance(value, Tensor):
        value = value.data
    if not hasattr(value, "shape"):
        value = np.asarray(value)
    if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
        raise TypeError(f"load_state_dict: '{key}' is not a numeric array (dtype {value.dtype})")
    return value


# ------------------------------------------------------------------------------------------------
# layers


class Conv2d(Module):
    """2-D convolution without bias: NHWC in, NHWC out; weight [out, in, k, k] (OIHW).
    He normal init with fan_out (see the module docstring)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, rng=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        fan_out = out_channels * kernel_size * kernel_size
        w = _rng(rng).standard_normal((out_channels, in_channels, kernel_size, kernel_size), dtype=np.float32)
        self.weight = Parameter(w * np.float32(np.sqrt(2.0 / fan_out)))

    def forward(self, x):
        self._check_channels(x)
        # fp16 activations: F.conv2d casts the fp32 master weight itself (once for forward and backward)
        return F.conv2d(x, self.weight, self.stride, self.padding)

    def forward_bn_stats(self, x):
        """(y, stats): forward(x) and the batch-norm partials of y (F.conv2d_bn_stats), for the
        BatchNorm2d after this layer (conv_bn)."""
        self._check_channels(x)
        return F.conv2d_bn_stats(x, self.weight, self.stride, self.padding)

    def _check_channels(self, x):
        self._check_input(x)
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"{self._label()}: input has {x.shape[-1]} channels (last axis, NHWC), "
                             f"expected {self.in_channels}")

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias=False")


class BatchNorm2d(Module):
    """Batch normalisation per channel (last axis). eps 1e-5, momentum 0.1 (running-average
    decay 0.9). Buffers: running_mean, running_var, num_batches_tracked (as PyTorch).

    forward(x, relu=False, residual=None): the ReLU and the residual add that follow BN in a
    ResNet can be fused into it (one kernel on the GPU): relu=True gives relu(bn(x));
    residual=r (with relu=True) gives relu(bn(x) + r).

    sync: None (batch statistics of this process), or a communicator (nn.distributed) for
    synchronised BN over all its ranks; nn.data_parallel.convert_sync_batchnorm sets it."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, dtype=np.float32))
        self.bias = Parameter(np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))
        self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        self.sync = None

    def forward(self, x, relu=False, residual=None, stats=None, residual_grad_to_link=False):
        """stats: the batch-norm partials of x from the convolution that produced it (conv_bn), used
        in training (without sync) instead of computing the statistics from x.  With relu (or a
        residual), in training without sync, when the batch norm in use finishes its backward from the
        next convolution's partial sums (kernels.versions.bn_backward_from_conv(): version 5, the
        default), a convolution (or the max pool) that takes the output computes them in its backward
        pass (F.batch_norm's grad_partials); without relu, the add + ReLU batch norm that takes the
        output as its residual (a projection shortcut) sums for it in its dx pass.  residual_grad_to_link: the residual is a block's identity
        shortcut whose input also feeds the block's first convolution (F.batch_norm)."""
        self._check_input(x, ndim=x.ndim if isinstance(x, Tensor) and x.ndim in (2, 4) else 4)
        if x.shape[-1] != self.num_features:
            raise ValueError(f"{self._label()}: input has {x.shape[-1]} channels, expected {self.num_features}")
        if residual is not None and tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"{self._label()}: residual shape {tuple(residual.shape)} differs from "
                             f"input shape {tuple(x.shape)}")
        if self.training:
            self._buffers["num_batches_tracked"] += 1
        fuse = self.training and self.sync is None and _fuse_bn_backward()
        return F.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                            self.training, self.eps, self.momentum, relu=relu or residual is not None,
                            residual=residual, sync=self.sync, stats=stats,
                            grad_partials=fuse,
                            residual_grad_to_link=fuse and residual_grad_to_link)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def conv_bn(conv, bn, x, relu=False, residual=None, residual_grad_to_link=False):
    """bn(conv(x), relu=relu, residual=residual): a convolution and the batch norm after it.

    In training (bn.training, no sync), when the batch norm in use takes its statistics from the
    convolution (kernels.versions.bn_statistics_from_conv(): batch norm versions 3 to 5, 5 the default),
    the convolution also returns the batch-norm partials of its output and batch norm normalises
    with them: one read of the activation fewer.  `--kernels batchnorm=2` (use_kernels(batchnorm=2))
    turns that off; evaluation and synchronised BN are the same either way.  The backward (version 5:
    BatchNorm2d.forward) and residual_grad_to_link: BatchNorm2d.forward."""
    if bn.training and bn.sync is None and _fuse_conv_bn():
        y, stats = conv.forward_bn_stats(x)
        return bn(y, relu=relu, residual=residual, stats=stats, residual_grad_to_link=residual_grad_to_link)
    return bn(conv(x), relu=relu, residual=residual, residual_grad_to_link=residual_grad_to_link)


def _fuse_conv_bn():
    return importlib.import_module("kernels.versions").bn_statistics_from_conv()


def _fuse_bn_backward():
    return importlib.import_module("kernels.versions").bn_backward_from_conv()


class ReLU(Module):
    """y = max(x, 0)."""

    def forward(self, x):
        return F.relu(x)


class MaxPool2d(Module):
    """Max pooling over k x k windows (NHWC); the ResNet stem uses k=3, stride 2, padding 1."""

    def __init__(self, kernel_size=3, stride=2, padding=1):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        self._check_input(x)
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class GlobalAvgPool(Module):
    """Mean over height and width: [N, H, W, C] -> [N, C] (torchvision: AdaptiveAvgPool2d(1) +
    flatten)."""

    def forward(self, x):
        self._check_input(x)
        return F.global_avg_pool(x)


class Linear(Module):
    """y = x @ weight^T + bias; weight [out, in] normal(0, 0.01), bias 0."""

    def __init__(self, in_features, out_features, bias=True, rng=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        w = _rng(rng).standard_normal((out_features, in_features), dtype=np.float32)
        self.weight = Parameter(w * np.float32(0.01))
        self.bias = Parameter(np.zeros(out_features, dtype=np.float32)) if bias else None

    def forward(self, x):
        self._check_input(x, ndim=2, layout="[N, in_features]")
        if x.shape[1] != self.in_features:
            raise ValueError(f"{self._label()}: input has {x.shape[1]} features, expected {self.in_features}")
        return F.linear(x, self.weight, self.bias)   # fp16 activations: F.linear casts the fp32 master weight

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Sequential(Module):
    """Children named '0', '1', ...; forward feeds each one's output to the next."""

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        """Each child's output to the next; a Conv2d followed by a BatchNorm2d runs as conv_bn."""
        children = list(self._modules.values())
        i = 0
        while i < len(children):
            m = children[i]
            if isinstance(m, Conv2d) and i + 1 < len(children) and isinstance(children[i + 1], BatchNorm2d):
                x = conv_bn(m, children[i + 1], x)
                i += 2
            else:
                x = m(x)
                i += 1
        return x


def to_numpy_state(state_dict):
    """A copy of a state_dict with every array as a NumPy array (for saving)."""
    return OrderedDict((k, np.array(to_numpy(v))) for k, v in state_dict.items())
