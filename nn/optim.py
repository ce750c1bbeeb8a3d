"""Optimisers: SGD with momentum (optionally Nesterov) and LARS.

Both keep fp32 master weights (the Parameters themselves) and one momentum buffer per parameter,
and call the device's `sgd_momentum_update` op, so the arithmetic is the same kernel on every
device:
    SGD:   g = grad + wd * w;  v = momentum * v + g;  w -= lr * v
           (Nesterov: w -= lr * (g + momentum * v)). The learning rate is outside the momentum
           (PyTorch's convention and the MLPerf reference's).
    LARS:  trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)   (1 where a norm is 0)
           v = momentum * v + lr * trust * (g + wd * w);  w -= v
           (the learning rate inside the momentum, as the MLPerf LARS reference).

Weight decay and LARS skip batch-norm parameters and biases by default. They are recognised as
the parameters with at most one dimension (BN gamma/beta and biases are vectors; every conv and
fc weight has 2 or 4 dimensions). Pass `exclude_bn_and_bias=False` to decay everything, or
`exclude=lambda name, p: ...` for your own rule (names come from `model.named_parameters()`).

Change the learning rate by assigning `opt.lr` (schedules in nn/schedules.py do it per step).
"""

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
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        rule = exclude if exclude is not None else (_is_bn_or_bias if exclude_bn_and_bias else None)
        self.excluded = {name for name, p in named if rule is not None and rule(name, p)}
        self.momentum_buffers = {}        # name -> array like the parameter, created on first step
        self.step_count = 0

    @property
    def params(self):
        return [p for _, p in self.named_params]

    def zero_grad(self):
        """Drop every parameter's gradient (set to None; the next backward writes fresh ones)."""
        for _, p in self.named_params:
            p.grad = None

    def _buffer(self, name, p):
        buf = self.momentum_buffers.get(name)
        if buf is None:
            buf = self.momentum_buffers[name] = p.device.xp.zeros_like(p.data)
        return buf

    def _check(self, name, p):
        if type(p.grad).__module__.split(".")[0] != type(p.data).__module__.split(".")[0]:
            raise ValueError(f"optimizer: parameter '{name}' is a {type(p.data).__module__} array but its "
                             f"gradient is a {type(p.grad).__module__} array (different devices)")
        if p.grad.shape != p.data.shape:
            raise ValueError(f"optimizer: parameter '{name}' has shape {p.data.shape} but its gradient "
                             f"{p.grad.shape}")

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
        """Restore from state_dict(); buffers are copied to each parameter's device. Unknown
        parameter names or mis-shaped buffers raise ValueError naming them."""
        names = {n: p for n, p in self.named_params}
        buffers = {}
        for key, value in state.items():
            if not key.startswith("momentum_buffer."):
                continue
            name = key[len("momentum_buffer."):]
            if name not in names:
                raise ValueError(f"optimizer load_state_dict: '{key}' names no parameter of this optimizer")
            p = names[name]
            if tuple(value.shape) != tuple(p.data.shape):
                raise ValueError(f"optimizer load_state_dict: '{key}' has shape {tuple(value.shape)}, "
                                 f"the parameter has {tuple(p.data.shape)}")
            buffers[name] = p.device.asarray(value, dtype=p.data.dtype).copy()
        self.lr = float(state.get("lr", self.lr))
        self.momentum = float(state.get("momentum", self.momentum))
        self.weight_decay = float(state.get("weight_decay", self.weight_decay))
        self.step_count = int(state.get("step_count", self.step_count))
        self._load_extra_hyper(state)
        self.momentum_buffers = buffers
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

    def step(self):
        """One update of every parameter that has a gradient."""
        for name, p in self.named_params:
            if p.grad is None:
                continue
            self._check(name, p)
            wd = 0.0 if name in self.excluded else self.weight_decay
            p.device.ops.sgd_momentum_update(p.data, p.grad, self._buffer(name, p), self.lr,
                                             self.momentum, wd, self.nesterov)
        self.step_count += 1

    def _extra_hyper(self):
        return {"nesterov": int(self.nesterov)}

    def _load_extra_hyper(self, state):
        self.nesterov = bool(int(state.get("nesterov", self.nesterov)))


class LARS(_Optimizer):
    """LARS (You et al. 2017) as in the MLPerf ResNet-50 references: a per-layer trust ratio
    scales the learning rate; BN parameters and biases skip both the trust ratio and weight decay
    (plain momentum SGD, learning rate inside the momentum).

    Args as SGD, plus eta (trust coefficient, 0.001) and eps (1e-9).
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, eps=1e-9,
                 exclude_bn_and_bias=True, exclude=None):
        super().__init__(params, lr, momentum, weight_decay, exclude_bn_and_bias, exclude)
        self.eta, self.eps = float(eta), float(eps)

    def step(self):
        """One update of every parameter that has a gradient."""
        for name, p in self.named_params:
            if p.grad is None:
                continue
            self._check(name, p)
            ops = p.device.ops
            if name in self.excluded:
                scaled_lr, wd = self.lr, 0.0
            else:
                trust = ops.lars_trust_ratio(p.data, p.grad, self.weight_decay, self.eta, self.eps)
                scaled_lr, wd = self.lr * trust, self.weight_decay
            # v = m*v + scaled_lr*(g + wd*w); w -= v   written with the shared SGD op:
            # grad' = scaled_lr*g, wd' = scaled_lr*wd, lr' = 1
            scaled_grad = p.grad * p.grad.dtype.type(scaled_lr)   # a scalar of the grad dtype: stays fp32
            ops.sgd_momentum_update(p.data, scaled_grad, self._buffer(name, p), 1.0, self.momentum,
                                    scaled_lr * wd, False)
        self.step_count += 1

    def _extra_hyper(self):
        return {"eta": self.eta, "eps": self.eps}

    def _load_extra_hyper(self, state):
        self.eta = float(state.get("eta", self.eta))
        self.eps = float(state.get("eps", self.eps))
