"""The op contract (kernels/contract.py) is what both implementations provide: kernels/reference.py
(the cpu device) and kernels/ops.py (emu and cuda) define every op with the contract's exact
signature; and every argument travels through it, so non-default geometries give the same
results on every device as an independent loop reference."""

import inspect

import numpy as np
import pytest

import nn
from kernels import contract, ops, reference
from nn import functional as F


def _same_default(a, b):
    if a is inspect.Parameter.empty or b is inspect.Parameter.empty:
        return a is b
    try:
        return np.dtype(a) == np.dtype(b)
    except TypeError:
        return a == b


@pytest.mark.parametrize("module", [reference, ops], ids=["reference", "ops"])
def test_every_op_of_the_contract_has_its_exact_signature(module):
    assert len(contract.OPS) >= 30
    for name in contract.OPS:
        want = inspect.signature(getattr(contract, name))
        impl = getattr(module, name, None)
        assert impl is not None, f"{module.__name__} lacks {name}"
        got = inspect.signature(impl)
        assert list(got.parameters) == list(want.parameters), f"{module.__name__}.{name}{got} != {name}{want}"
        for p in want.parameters.values():
            assert _same_default(got.parameters[p.name].default, p.default), f"{module.__name__}.{name}: {p.name}"
        assert name in module.__all__, f"{name} not exported by {module.__name__}"


def test_the_contract_is_what_nn_uses():
    # every `ops.<name>(...)` / `device.ops.<name>(...)` call in nn/ is a contract op, so the two
    # implementations cover everything nn does
    import ast
    from pathlib import Path
    used = set()
    for path in Path(nn.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if (isinstance(owner, ast.Name) and owner.id == "ops") or (
                        isinstance(owner, ast.Attribute) and owner.attr == "ops"):
                    used.add(node.func.attr)
    assert len(used) > 20 and used <= set(contract.OPS) | {"ParamSegments"}, used - set(contract.OPS)


def _loop_maxpool(x, k, s, p):
    N, H, W, C = x.shape
    P, Q = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    y = np.full((N, P, Q, C), -np.inf)
    win = np.zeros((N, P, Q, C, 2), dtype=int)
    for n, i, j, c in np.ndindex(N, P, Q, C):
        for r in range(k):
            for t in range(k):
                h, w = i * s + r - p, j * s + t - p
                if 0 <= h < H and 0 <= w < W and x[n, h, w, c] > y[n, i, j, c]:
                    y[n, i, j, c] = x[n, h, w, c]
                    win[n, i, j, c] = (h, w)
    return y, win


@pytest.mark.parametrize("k,s,p", [(4, 2, 1), (2, 2, 0), (3, 1, 1), (5, 3, 2), (3, 2, 1)])
@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_max_pool_of_any_geometry_on_every_device(device, k, s, p):
    rng = np.random.default_rng(k * 10 + s)
    x = rng.permutation(2 * 8 * 8 * 3).reshape(2, 8, 8, 3).astype(np.float32) / 7     # distinct values
    want_y, win = _loop_maxpool(x, k, s, p)
    dy = rng.standard_normal(want_y.shape).astype(np.float32)
    want_dx = np.zeros_like(x, dtype=np.float64)
    for n, i, j, c in np.ndindex(*want_y.shape):
        h, w = win[n, i, j, c]
        want_dx[n, h, w, c] += dy[n, i, j, c]
    t = nn.Tensor(x, device=device, requires_grad=True)
    y = F.max_pool2d(t, k, s, p)
    np.testing.assert_array_equal(nn.device.to_numpy(y.data), want_y)
    y.backward(dy)
    np.testing.assert_allclose(nn.device.to_numpy(t.grad), want_dx, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,s,p", [(4, 2, 1), (2, 2, 0), (3, 1, 1), (5, 3, 2), (3, 2, 1)])
@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_max_pool_of_any_geometry_matches_pytorch(device, k, s, p):
    """The same geometries against PyTorch's max_pool2d (NCHW there), value and gradient, where
    PyTorch is installed (`pip install torch`; CI has it not, the loop reference above runs there)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(k * 10 + s + 1)
    x = rng.permutation(2 * 9 * 8 * 3).reshape(2, 9, 8, 3).astype(np.float32) / 7   # distinct values
    xt = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, k, s, p)
    dy = rng.standard_normal(tuple(yt.shape)).astype(np.float32)       # NCHW
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    t = nn.Tensor(x, device=device, requires_grad=True)
    y = F.max_pool2d(t, k, s, p)
    np.testing.assert_array_equal(nn.device.to_numpy(y.data), yt.detach().numpy().transpose(0, 2, 3, 1))
    y.backward(np.ascontiguousarray(dy.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(nn.device.to_numpy(t.grad), xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
