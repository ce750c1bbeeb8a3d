"""Optimisers: SGD with momentum (optionally Nesterov) and LARS.

Both keep fp32 master weights (the Parameters themselves) and one momentum buffer per parameter.
Parameters, gradients and momenta live in flat buffers (nn/flat.py: each `p.data`, `p.grad` is a
view), so a step is ONE kernel launch for all 161 tensors of ResNet-50 (LARS: three), and
`zero_grad()` one memset. The arithmetic is the device's `momentum_update_flat` op, the same
kernel on emu and cuda and the same NumPy on cpu:
    SGD:   g = grad + wd * w;  v = momentum * v + g;  w -= lr * v
           (Nesterov: w -= lr * (g + momentum * v)). The learning rate is outside the momentum
           (PyTorch's convention and the MLPerf reference's).
    LARS:  trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)   (1 where a norm is 0)
           v = momentum * v + lr * trust * (g + wd * w);  w -= v
           (the learning rate inside the momentum, as the MLPerf LARS reference; the trust
           ratios are computed on the device, lars_trust_ratio_flat).

Weight decay and LARS skip batch-norm parameters and biases by default. They are recognised as
the parameters with at most one dimension (BN gamma/beta and biases are vectors; every conv and
fc weight has 2 or 4 dimensions). Pass `exclude_bn_and_bias=False` to decay everything, or
`exclude=lambda name, p: ...` for your own rule (names come from `model.named_parameters()`).

Nothing in a step waits for the host: the learning rate lives in a one-element device buffer
(`opt.lr = x` writes it, with a kernel, not a copy from the host), and under mixed precision the
loss scaler hands `step()` the device arrays holding 1/scale and the overflow flag. Create the
optimizer after `model.to(device)`; gradients are zeroed, not dropped, by zero_grad (a parameter
that got no gradient in a step is updated with a zero one: momentum and weight decay go on).
"""

import numpy as np

from nn.flat import FlatParameters
from nn.tensor import Parameter

__all__ = ["SGD", "LARS"]


def _is_bn_or_bias(name, p):
    return p.data.ndim <= 1


class _Optimizer:
    """Shared parts: the parameter list (with names), zero_grad, momentum buffers, state_dict."""

    def __init__(self, params, lr, momentum, weight_decay, exclude_bn_and_bias, exclude):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        named = []
        for i, item in enumerate(params):
            name, p = item if isinstance(item, tuple) else (str(i), item)
            if not isinstance(p, Parameter):
                raise TypeError(f"optimizer: parameter '{name}' must be an nn.Parameter, got {type(p).__name__}")
            named.append((name, p))
        if len({n for n, _ in named}) != len(named):
            raise ValueError("optimizer: parameter names must be unique")
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"optimizer: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0; got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        self.named_params = named
        self._lr_value = float(lr)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        rule = exclude if exclude is not None else (_is_bn_or_bias if exclude_bn_and_bias else None)
        self.excluded = {name for name, p in named if rule is not None and rule(name, p)}
        self.flat = FlatParameters(named)          # p.data and p.grad become views of flat buffers
        self.device = self.flat.device
        xp = self.device.xp
        self.momenta = [xp.zeros_like(group.data) for group in self.flat.groups]
        self._build_layouts()
        self._lr = xp.full(1, self.lr, dtype=np.float32)     # read by the update kernel
        self._momentum_started = False                       # state_dict reports buffers once stepped
        self.step_count = 0

    def _build_layouts(self):
        """The segment tables of the flat buffers: per tensor its weight decay (0 when excluded)
        and whether LARS scales it."""
        ops, xp = self.device.ops, self.device.xp
        self.layouts = []
        for group in self.flat.groups:
            decay = [0.0 if n in self.excluded else self.weight_decay for n in group.names]
            trust = [n not in self.excluded for n in group.names]
            self.layouts.append(ops.ParamSegments(group.sizes, decay, xp=xp, use_trust=trust))

    @property
    def lr(self):
        """The learning rate (a Python float; the kernels read its copy in a device buffer)."""
        return self._lr_value

    @lr.setter
    def lr(self, value):
        self._lr_value = float(value)
        if hasattr(self, "_lr"):
            self._lr.fill(self._lr_value)   # a fill kernel on the device: no host round trip

    @property
    def params(self):
        return [p for _, p in self.named_params]

    @property
    def momentum_buffers(self):
        """name -> the momentum buffer of that parameter (a view of the flat momentum), once stepped."""
        if not self._momentum_started:
            return {}
        out = {}
        for group, mom in zip(self.flat.groups, self.momenta):
            for name, view in zip(group.names, group.split(mom)):
                out[name] = view
        return out

    def zero_grad(self):
        """Every gradient to zero: one memset per flat buffer (the views stay in place)."""
        self.flat.zero_grad()

    def step(self, grad_scale=None, skip=None):
        """One update of every parameter. grad_scale: None or a one-element device array that
        multiplies every gradient first (1 / loss scale); skip: None or an int32 [1] device
        array: when nonzero the update changes nothing (an overflowed fp16 step). Both are read
        by the kernels: no host round trip."""
        self.flat.check()                  # re-adopt arrays replaced since (model.to, p.grad = ...)
        for group, layout, mom in zip(self.flat.groups, self.layouts, self.momenta):
            self._update(group, layout, mom, grad_scale, skip)
        self._momentum_started = True
        self.step_count += 1

    def _update(self, group, layout, mom, grad_scale, skip):
        raise NotImplementedError

    def state_dict(self):
        """{'lr', 'momentum', 'weight_decay', 'step_count', ... as floats/ints,
        'momentum_buffer.<param name>': array} (flat, ready for np.savez)."""
        state = {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                 "step_count": self.step_count}
        state.update(self._extra_hyper())
        for name, buf in self.momentum_buffers.items():
            state[f"momentum_buffer.{name}"] = buf
        return state

    def load_state_dict(self, state):
        """Restore from state_dict(); buffers are copied into the flat momentum on the device.
        Unknown parameter names or mis-shaped buffers raise ValueError naming them."""
        where = {}
        for group, mom in zip(self.flat.groups, self.momenta):
            for name, view in zip(group.names, group.split(mom)):
                where[name] = view
        values = {}
        for key, value in state.items():
            if not key.startswith("momentum_buffer."):
                continue
            name = key[len("momentum_buffer."):]
            if name not in where:
                raise ValueError(f"optimizer load_state_dict: '{key}' names no parameter of this optimizer")
            if tuple(value.shape) != tuple(where[name].shape):
                raise ValueError(f"optimizer load_state_dict: '{key}' has shape {tuple(value.shape)}, "
                                 f"the parameter has {tuple(where[name].shape)}")
            values[name] = value
        for mom in self.momenta:
            mom.fill(0)
        for name, value in values.items():
            where[name][...] = self.device.asarray(value, dtype=where[name].dtype)
        self.lr = float(state.get("lr", self.lr))
        self.momentum = float(state.get("momentum", self.momentum))
        weight_decay = float(state.get("weight_decay", self.weight_decay))
        if weight_decay != self.weight_decay:
            self.weight_decay = weight_decay
            self._build_layouts()
        self.step_count = int(state.get("step_count", self.step_count))
        self._load_extra_hyper(state)
        self._momentum_started = bool(values)
        return self

    def _extra_hyper(self):
        return {}

    def _load_extra_hyper(self, state):
        pass


class SGD(_Optimizer):
    """SGD with momentum (PyTorch-shaped).

    Args:
        params: iterable of Parameters, or of (name, Parameter) pairs (model.named_parameters()).
        lr: learning rate (assign opt.lr to change it).
        momentum: 0.9 by default.  weight_decay: L2 coefficient (gradient wd*w), 0 by default.
        nesterov: Nesterov momentum.
        exclude_bn_and_bias: no weight decay for parameters with <= 1 dimension (BN, biases).
        exclude: optional rule (name, param) -> bool replacing the one above.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, nesterov=False,
                 exclude_bn_and_bias=True, exclude=None):
        super().__init__(params, lr, momentum, weight_decay, exclude_bn_and_bias, exclude)
        self.nesterov = bool(nesterov)

    def _update(self, group, layout, mom, grad_scale, skip):
        self.device.ops.momentum_update_flat(group.data, group.grad, mom, layout, self._lr, self.momentum,
                                             nesterov=self.nesterov, grad_scale=grad_scale, skip=skip)

    def _extra_hyper(self):
        return {"nesterov": int(self.nesterov)}

    def _load_extra_hyper(self, state):
        self.nesterov = bool(int(state.get("nesterov", self.nesterov)))


class LARS(_Optimizer):
    """LARS (You et al. 2017) as in the MLPerf ResNet-50 references: a per-layer trust ratio
    scales the learning rate; BN parameters and biases skip both the trust ratio and weight decay
    (plain momentum SGD, learning rate inside the momentum). Three launches a step: the per-chunk
    norms, the per-tensor ratios, the update.

    Args as SGD, plus eta (trust coefficient, 0.001) and eps (1e-9).
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, eps=1e-9,
                 exclude_bn_and_bias=True, exclude=None):
        super().__init__(params, lr, momentum, weight_decay, exclude_bn_and_bias, exclude)
        self.eta, self.eps = float(eta), float(eps)

    def _update(self, group, layout, mom, grad_scale, skip):
        ops = self.device.ops
        ratios = ops.lars_trust_ratio_flat(group.data, group.grad, layout, self.eta, self.eps, grad_scale=grad_scale)
        ops.momentum_update_flat(group.data, group.grad, mom, layout, self._lr, self.momentum, lr_in_momentum=True,
                                 lr_scale=ratios, grad_scale=grad_scale, skip=skip)

    def _extra_hyper(self):
        return {"eta": self.eta, "eps": self.eps}

    def _load_extra_hyper(self, state):
        self.eta = float(state.get("eta", self.eta))
        self.eps = float(state.get("eps", self.eps))
