"""Tensor and the autograd core. Short on purpose: read it in one sitting.

A Tensor wraps an array (`.data`, NumPy or CuPy) and knows its `device`. When an op from
nn/functional.py runs on tensors that require gradients, it returns a Tensor that remembers
  - `_parents`:  the input tensors, and
  - `_backward`: a function  grad_of_output -> tuple of grads for the parents,
                 which closes over exactly the arrays the op saved for its backward pass.
That pair is one node of the graph. `loss.backward()` then
  1. orders the graph topologically (every node after all nodes that used its output),
  2. walks it in reverse, calling each node's `_backward` with the gradient of its output,
  3. adds up gradients where branches meet (a residual block's input feeds two paths),
  4. stores the result in `.grad` of leaf tensors that require gradients (the parameters;
     added in place when `.grad` is a view of an optimizer's flat buffer, nn/flat.py), and calls
     their gradient hooks, if any (data parallelism starts all-reduces there),
  5. drops every node's `_backward` and `_parents` as soon as it has run, so the saved
     activations are freed during the backward pass, not after it.
Inside `with no_grad():` ops record nothing (evaluation: no graph, no saved arrays).
"""

import contextlib

import numpy as np

from nn.device import default_device_for, get_device, is_array, to_numpy

__all__ = ["Tensor", "Parameter", "no_grad", "is_grad_enabled"]

_grad_enabled = True


def is_grad_enabled():
    """False inside a `no_grad()` block."""
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Context manager: ops inside it record no graph and keep no arrays for backward."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


class Tensor:
    """An array plus what autograd needs.

    Attributes:
        data:          the array (numpy.ndarray on cpu/emu, cupy.ndarray on cuda).
        grad:          array like `data` or None; filled by backward() on leaf tensors that
                       require gradients, accumulated (+=) over backward() calls.
        requires_grad: bool.
        device:        nn.device.Device.
    """

    def __init__(self, data, requires_grad=False, device=None):
        if isinstance(data, Tensor):
            data = data.data
        if not is_array(data):
            data = np.asarray(data)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.device = get_device(device) if device is not None else default_device_for(data)
        self._parents = ()
        self._backward = None
        self._grad_hooks = ()     # leaves only: see Parameter.register_grad_hook
        self._grad_in_place = False   # .grad is a view of a flat buffer: accumulate into it (nn/flat.py)

    # ---- graph recording (called by nn/functional.py) ---------------------------------------

    @classmethod
    def _from_op(cls, data, parents, backward):
        """The output of an op. Records (parents, backward) when some parent needs a gradient and
        grad mode is on; otherwise the result is a plain tensor and `backward` (with the arrays
        it closes over) is dropped at once."""
        out = cls(data, device=parents[0].device)
        if _grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._parents = tuple(parents)
            out._backward = backward
        return out

    @property
    def is_leaf(self):
        """True for tensors not made by a recorded op (parameters, inputs)."""
        return self._backward is None

    # ---- backward ----------------------------------------------------------------------------

    def backward(self, grad=None):
        """Backpropagate from this tensor through the recorded graph.

        grad: the gradient of the final objective with respect to this tensor (array like
        `data`); may be omitted for a scalar (size 1) tensor, meaning 1. Pass e.g. the loss scale
        for mixed precision: a number, or a one-element device array (nn.amp keeps its scale on
        the device). Fills `.grad` of the leaf tensors with requires_grad.

        An op whose backward takes the seed as it is (a Python number or a one-element device
        array, e.g. cross_entropy's, which hands it to the kernel) gets it unchanged: no upload
        and no read back to the host per step. Other ops get an array like `data`.
        """
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require grad (no recorded graph; "
                               "was it computed under no_grad(), or from inputs without requires_grad?)")
        xp = self.device.xp
        if grad is None and self.data.size != 1:
            raise RuntimeError(f"backward(): grad must be given for a non-scalar tensor of shape {self.shape}")
        seed = 1.0 if grad is None else grad
        if getattr(self._backward, "takes_scalar_seed", False) and (
                isinstance(seed, (int, float)) or getattr(seed, "size", 0) == 1):
            grad = seed
        elif isinstance(seed, (int, float)):
            grad = xp.full(self.data.shape, seed, dtype=self.data.dtype)
        else:
            grad = xp.asarray(seed, dtype=self.data.dtype)
            if grad.shape != self.data.shape:
                grad = xp.broadcast_to(grad.reshape(()) if grad.size == 1 else grad, self.data.shape)

        grads = {id(self): grad}          # gradient waiting at each node, keyed by id
        for node in reversed(self._topological_order()):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None:    # a leaf: deliver
                if node.requires_grad:
                    if node.grad is None:
                        node.grad = g.copy()
                    elif node._grad_in_place:
                        node.grad += g        # the view of a flat buffer: accumulate where it lives
                    else:
                        node.grad = node.grad + g
                    for hook in node._grad_hooks:   # e.g. start this gradient's all-reduce now
                        hook(node)
                continue
            parent_grads = node._backward(g)
            for parent, pg in zip(node._parents, parent_grads):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                # branches meet: sum (a new array: pg may be shared with another parent).  A float16
                # sum may overflow to inf under loss scaling: intended, the scaler skips that step,
                # so NumPy's overflow warning is silenced.
                if key not in grads:
                    grads[key] = pg
                else:
                    with np.errstate(over="ignore"):
                        grads[key] = grads[key] + pg
            node._backward = None         # free the arrays the op saved
            node._parents = ()

    def _topological_order(self):
        """Nodes reachable from self, each after all of its parents (iterative depth-first search,
        so deep graphs do not hit Python's recursion limit)."""
        order, visited = [], set()
        stack = [(self, False)]
        while stack:
            node, parents_done = stack.pop()
            if parents_done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            for p in node._parents:
                if id(p) not in visited:
                    stack.append((p, False))
        return order

    # ---- conveniences ------------------------------------------------------------------------

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    def numpy(self):
        """The data as a NumPy array (copied from the GPU on cuda)."""
        return to_numpy(self.data)

    def item(self):
        """The value of a one-element tensor as a Python number."""
        return self.data.item()

    def detach(self):
        """A new leaf tensor sharing the data, outside the graph."""
        return Tensor(self.data, device=self.device)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"device='{self.device.name}'{grad})")


class Parameter(Tensor):
    """A leaf tensor that requires a gradient: a learnable weight (float32 master copy)."""

    def __init__(self, data, device=None):
        super().__init__(data, requires_grad=True, device=device)

    def register_grad_hook(self, hook):
        """Call hook(param) each time backward() has delivered this parameter's gradient (its
        `.grad` is final for that pass). Data-parallel training uses it to start all-reducing a
        bucket of gradients while backward goes on. Returns a function that removes the hook."""
        self._grad_hooks = self._grad_hooks + (hook,)

        def remove():
            self._grad_hooks = tuple(h for h in self._grad_hooks if h is not hook)
        return remove
