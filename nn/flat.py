"""Flat buffers: every parameter, and its gradient, as a view of one contiguous buffer per dtype.

ResNet-50 has 161 parameter tensors, from 2,048,000 values (fc.weight) down to 64 (a BN gamma).
Updated one by one, the optimizer would be 161 kernel launches of mostly tiny work; with every
parameter living in one buffer, one launch updates them all (kernels/optimizer.cu), zeroing every
gradient is one memset, and data-parallel all-reduces can send slices of the gradient buffer
without copying. Nothing else changes for the model code: `p.data` and `p.grad` are ordinary
arrays of the parameter's shape, they just happen to be views.

    flat = FlatParameters(model.named_parameters())   # moves the values in, makes the views
    flat.groups[0].data, flat.groups[0].grad           # the two buffers (float32 [total])
    flat.zero_grad()                                   # one memset per buffer

The optimizers in nn/optim.py build one; a model moved or re-created after that (`model.to()`
replaces the arrays) is re-adopted by `FlatParameters.check()`, which the optimizer calls each
step: it costs one identity test per parameter and keeps the views right whatever the user did.
"""

import numpy as np

__all__ = ["FlatParameters", "FlatGroup"]


class FlatGroup:
    """The parameters of one dtype: `data` and `grad` (1-D buffers), `offsets` (host int64
    [S + 1]), `names`, `params`; parameter i is data[offsets[i]:offsets[i + 1]]."""

    def __init__(self, named_params, xp):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        dtype = self.params[0].data.dtype
        sizes = [int(p.data.size) for p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.dtype = np.dtype(dtype)
        self.xp = xp
        self.data = xp.empty(int(self.offsets[-1]), dtype=dtype)
        self.grad = xp.zeros(int(self.offsets[-1]), dtype=dtype)
        self.data_views, self.grad_views = [], []
        for i, p in enumerate(self.params):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            self.data_views.append(self.data[a:b].reshape(p.data.shape))
            self.grad_views.append(self.grad[a:b].reshape(p.data.shape))
            self._adopt(i)

    def split(self, flat):
        """Views of another buffer laid out like this group (e.g. the optimizer's momenta), one
        per parameter, in its shape."""
        return [flat[a:b].reshape(p.data.shape) for a, b, p in zip(self.offsets[:-1], self.offsets[1:], self.params)]

    @property
    def sizes(self):
        return [int(b - a) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def _adopt(self, i):
        """Copy parameter i's values (and gradient, if any) into the buffers; make it use the views."""
        p, view, gview = self.params[i], self.data_views[i], self.grad_views[i]
        if p.data is not view:
            view[...] = p.data
            p.data = view
        if p.grad is not gview:
            if p.grad is None:
                gview[...] = 0
            else:
                gview[...] = p.grad
            p.grad = gview
        p._grad_in_place = True
        p._flat_slot = (self, i)      # where it lives (nn.distributed buckets slice the gradient buffer)

    def check(self):
        """Re-adopt parameters whose arrays were replaced since (model.to(), `p.grad = array`,
        `p.grad = None`, which now means a zero gradient)."""
        for i, p in enumerate(self.params):
            if p.data is not self.data_views[i] or p.grad is not self.grad_views[i]:
                if type(p.data).__module__.split(".")[0] != type(self.data).__module__.split(".")[0]:
                    raise RuntimeError(f"parameter '{self.names[i]}' moved to another device after its optimizer "
                                       f"was made; create the optimizer after model.to(device)")
                if tuple(p.data.shape) != tuple(self.data_views[i].shape):
                    raise RuntimeError(f"parameter '{self.names[i]}' changed shape after its optimizer was made")
                if p.grad is not None and p.grad is not self.grad_views[i]:
                    if type(p.grad).__module__.split(".")[0] != type(self.data).__module__.split(".")[0]:
                        raise ValueError(f"optimizer: parameter '{self.names[i]}' is a {type(self.data).__module__} "
                                         f"array but its gradient is a {type(p.grad).__module__} array (different "
                                         f"devices)")
                    if tuple(p.grad.shape) != tuple(p.data.shape):
                        raise ValueError(f"optimizer: parameter '{self.names[i]}' has shape {tuple(p.data.shape)} but "
                                         f"its gradient {tuple(p.grad.shape)}")
                self._adopt(i)


class FlatParameters:
    """Parameters (name, Parameter) grouped by dtype into FlatGroups; all on one device."""

    def __init__(self, named_params):
        named = list(named_params)
        if not named:
            raise ValueError("FlatParameters: no parameters")
        device = named[0][1].device
        for name, p in named:
            if p.device != device:
                raise ValueError(f"FlatParameters: parameter '{name}' is on {p.device.name}, the first on "
                                 f"{device.name}: all parameters must be on one device")
        self.device = device
        by_dtype = {}
        for name, p in named:
            by_dtype.setdefault(np.dtype(p.data.dtype), []).append((name, p))
        self.groups = [FlatGroup(items, device.xp) for items in by_dtype.values()]

    def zero_grad(self):
        """Every gradient to zero: one memset per buffer."""
        for g in self.groups:
            g.grad.fill(0)

    def check(self):
        for g in self.groups:
            g.check()
