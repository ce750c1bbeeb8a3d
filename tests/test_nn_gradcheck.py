"""Gradient checks of every layer, the loss and a whole bottleneck block (stride 2, projection
shortcut) on cpu in float64, against central finite differences: relative error < 1e-6.

The objective is L = sum(output * R) for a fixed random R, so dL/doutput = R exercises every
output element. Analytic gradients come from our autograd; numeric ones from perturbing each
input/parameter entry by +-h and re-running the forward pass under no_grad."""

import numpy as np
import pytest

import nn
from nn import functional as F

TOL = 1e-6


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


def gradcheck(forward, arrays, seed=0, h=1e-6, max_entries=None):
    """forward(*tensors) -> Tensor. `arrays`: dict name -> (float64 array or Parameter) to check.
    Leaves are wrapped as Tensors with requires_grad; Parameters are used as they are.
    Returns {name: relative error}."""
    rng = np.random.default_rng(seed)
    tensors = {k: (v if isinstance(v, nn.Parameter) else nn.Tensor(v, requires_grad=True))
               for k, v in arrays.items()}
    out = forward(**tensors)
    R = rng.standard_normal(out.shape)
    for t in tensors.values():
        t.grad = None
    out.backward(R)
    errors = {}
    for name, t in tensors.items():
        assert t.grad is not None, f"no gradient reached {name}"
        data = t.data
        numeric = np.zeros_like(data)
        indices = list(np.ndindex(data.shape))
        if max_entries is not None and len(indices) > max_entries:
            pick = rng.choice(len(indices), max_entries, replace=False)
            indices = [indices[i] for i in pick]
        for i in indices:
            old = data[i]
            data[i] = old + h
            with nn.no_grad():
                fp = float(np.sum(forward(**tensors).data * R))
            data[i] = old - h
            with nn.no_grad():
                fm = float(np.sum(forward(**tensors).data * R))
            data[i] = old
            numeric[i] = (fp - fm) / (2 * h)
        analytic = t.grad
        if max_entries is not None and len(indices) < data.size:
            sel = tuple(np.array(indices).T)
            analytic, numeric = analytic[sel], numeric[sel]
        errors[name] = rel_err(analytic, numeric)
    return errors


def assert_small(errors):
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def rand(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("cin,cout,k,stride,padding,size", [
    (3, 4, 3, 1, 1, 5), (2, 3, 3, 2, 1, 6), (3, 2, 7, 2, 3, 8), (4, 3, 1, 1, 0, 4), (4, 3, 1, 2, 0, 5)])
def test_conv2d_layer(cin, cout, k, stride, padding, size):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, rng=np.random.default_rng(0)).to(dtype=np.float64)
    errors = gradcheck(lambda x, w: conv(x), {"x": rand((2, size, size, cin)), "w": conv.weight})
    assert_small(errors)


@pytest.mark.parametrize("relu,with_residual", [(False, False), (True, False), (True, True)])
def test_batchnorm_layer_train(relu, with_residual):
    bn = nn.BatchNorm2d(3).to(dtype=np.float64)
    bn.weight.data[...] = rand(3, 2)
    bn.bias.data[...] = rand(3, 3)
    arrays = {"x": rand((2, 3, 3, 3), 4) * 2 + 0.5, "gamma": bn.weight, "beta": bn.bias}
    if with_residual:
        arrays["r"] = rand((2, 3, 3, 3), 5)
    errors = gradcheck(lambda x, gamma, beta, r=None: bn(x, relu=relu, residual=r), arrays)
    assert_small(errors)


def test_batchnorm_layer_eval():
    bn = nn.BatchNorm2d(3).to(dtype=np.float64)
    bn.weight.data[...] = rand(3, 2)
    bn.bias.data[...] = rand(3, 3)
    bn.running_mean[...] = rand(3, 6)
    bn.running_var[...] = np.abs(rand(3, 7)) + 0.5
    bn.eval()
    for relu, res in [(False, None), (True, None), (True, rand((2, 3, 3, 3), 8))]:
        arrays = {"x": rand((2, 3, 3, 3), 4), "gamma": bn.weight, "beta": bn.bias}
        if res is not None:
            arrays["r"] = res
        assert_small(gradcheck(lambda x, gamma, beta, r=None: bn(x, relu=relu, residual=r), arrays))


def test_relu_maxpool_avgpool_linear_layers():
    assert_small(gradcheck(lambda x: nn.ReLU()(x), {"x": rand((2, 3, 3, 2))}))
    assert_small(gradcheck(lambda x: nn.MaxPool2d(3, 2, 1)(x), {"x": rand((2, 7, 7, 3))}))
    assert_small(gradcheck(lambda x: nn.GlobalAvgPool()(x), {"x": rand((2, 3, 4, 5))}))
    fc = nn.Linear(5, 4, rng=np.random.default_rng(0)).to(dtype=np.float64)
    fc.bias.data[...] = rand(4, 9)
    assert_small(gradcheck(lambda x, w, b: fc(x), {"x": rand((3, 5)), "w": fc.weight, "b": fc.bias}))


def test_add_and_transpose():
    assert_small(gradcheck(lambda a, b: F.add_relu(a, b) + a, {"a": rand((2, 3)), "b": rand((2, 3), 2)}))
    assert_small(gradcheck(lambda x: F.transpose(x, (0, 2, 3, 1)), {"x": rand((2, 3, 4, 5))}))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_loss(smoothing):
    labels = np.array([0, 3, 3, 1], dtype=np.int32)
    errors = gradcheck(lambda z: F.cross_entropy(z, labels, label_smoothing=smoothing),
                       {"z": rand((4, 5)) * 2})
    assert_small(errors)


def _block_params(block):
    return {name.replace(".", "_"): p for name, p in block.named_parameters()}


def test_bottleneck_block_stride2_projection():
    """The whole v1.5 bottleneck (1x1 -> 3x3 stride 2 -> 1x1, projection shortcut) in train mode:
    every parameter entry and the input, against finite differences."""
    planes, cin = 2, 4
    rng = np.random.default_rng(0)
    down = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride=2, rng=rng), nn.BatchNorm2d(planes * 4))
    block = nn.Bottleneck(cin, planes, stride=2, downsample=down, rng=rng).to(dtype=np.float64)
    for name, p in block.named_parameters():     # non-trivial gamma/beta
        if "bn" in name or "downsample.1" in name:
            p.data[...] = rand(p.shape, hash(name) % 1000) * 0.5 + (1.0 if name.endswith("weight") else 0.0)
    params = _block_params(block)
    assert len(params) == 12    # 4 convs + 4 BN x (gamma, beta)
    errors = gradcheck(lambda x, **_: block(x), {"x": rand((2, 6, 6, cin)), **params})
    assert set(errors) == {"x", *params}
    assert_small(errors)


def test_basic_block_and_small_resnet_end_to_end():
    """A BasicBlock with projection, and a whole (tiny) ResNet-50 from NCHW input to the loss
    (sampled entries of every parameter)."""
    rng = np.random.default_rng(1)
    down = nn.Sequential(nn.Conv2d(3, 4, 1, stride=2, rng=rng), nn.BatchNorm2d(4))
    block = nn.BasicBlock(3, 4, stride=2, downsample=down, rng=rng).to(dtype=np.float64)
    assert_small(gradcheck(lambda x, **_: block(x), {"x": rand((2, 5, 5, 3)), **_block_params(block)}))

    # Deep nets have many ReLU/max-pool kinks and BN over few values in the last stages: a
    # smaller step (1e-7) keeps the finite differences from straddling a kink.
    model = nn.resnet50(num_classes=5, width=1 / 16, seed=3).to(dtype=np.float64)
    labels = np.array([1, 4, 0, 2], dtype=np.int32)
    params = {"fc_weight": model.fc.weight, "conv1_weight": model.conv1.weight,
              "l4_bn3_weight": model.layer4[2].bn3.weight, "l2_down_weight": model.layer2[0].downsample[0].weight}
    errors = gradcheck(lambda x, **_: F.cross_entropy(model(x), labels),
                       {"x": rand((4, 3, 32, 32)), **params}, max_entries=12, h=1e-7)
    assert_small(errors)
