"""ResNet-50 v1.5: torchvision-identical state_dict, parameter count, initialisation, input
layouts, bad-input errors, and fitting a fixed batch."""

import numpy as np
import pytest

import nn
from nn import functional as F


# ---------------------------------------------------------------------------------------------
# The expected torchvision layout, written from the published layer plan (He et al. 2015 with
# the v1.5 stride placement, torchvision naming), NOT from our model code.


def _bn_entries(name, c):
    return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,)), (f"{name}.running_mean", (c,)),
            (f"{name}.running_var", (c,)), (f"{name}.num_batches_tracked", ())]


def torchvision_state_shapes(kind="resnet50", num_classes=1000):
    blocks = {"resnet50": [3, 4, 6, 3], "resnet34": [3, 4, 6, 3], "resnet18": [2, 2, 2, 2]}[kind]
    bottleneck = kind == "resnet50"
    entries = [("conv1.weight", (64, 3, 7, 7))] + _bn_entries("bn1", 64)
    inplanes = 64
    for stage, (n, planes) in enumerate(zip(blocks, [64, 128, 256, 512]), start=1):
        out = planes * (4 if bottleneck else 1)
        for b in range(n):
            p = f"layer{stage}.{b}"
            if bottleneck:
                entries += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1))] + _bn_entries(f"{p}.bn1", planes)
                entries += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn_entries(f"{p}.bn2", planes)
                entries += [(f"{p}.conv3.weight", (out, planes, 1, 1))] + _bn_entries(f"{p}.bn3", out)
            else:
                entries += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3))] + _bn_entries(f"{p}.bn1", planes)
                entries += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn_entries(f"{p}.bn2", planes)
            if b == 0 and (stage > 1 or inplanes != out):
                entries += [(f"{p}.downsample.0.weight", (out, inplanes, 1, 1))] + _bn_entries(f"{p}.downsample.1", out)
            inplanes = out
    entries += [("fc.weight", (num_classes, inplanes)), ("fc.bias", (num_classes,))]
    return entries


@pytest.fixture(scope="module")
def full_resnet50():
    return nn.resnet50()


def test_resnet50_state_dict_matches_torchvision_key_for_key(full_resnet50):
    expected = torchvision_state_shapes("resnet50")
    ours = [(k, tuple(v.shape)) for k, v in full_resnet50.state_dict().items()]
    assert len(expected) == 320                      # torchvision's resnet50 has 320 entries
    assert ours == expected                          # same keys, same order, same shapes
    sd = full_resnet50.state_dict()
    assert sd["bn1.num_batches_tracked"].dtype == np.int64
    assert all(v.dtype == np.float32 for k, v in sd.items() if not k.endswith("num_batches_tracked"))


def test_resnet50_parameter_count(full_resnet50):
    assert full_resnet50.num_parameters() == 25_557_032
    expected = sum(int(np.prod(s)) for k, s in torchvision_state_shapes("resnet50")
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert expected == 25_557_032
    assert [n for n, _ in full_resnet50.named_parameters()] == [
        k for k, _ in torchvision_state_shapes("resnet50")
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]


@pytest.mark.parametrize("kind,count", [("resnet18", 11_689_512), ("resnet34", 21_797_672)])
def test_resnet18_34_match_torchvision(kind, count):
    model = getattr(nn, kind)()
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == torchvision_state_shapes(kind)
    assert model.num_parameters() == count


def test_initialisation(full_resnet50):
    m = full_resnet50
    w = m.layer3[0].conv2.weight.data                  # [256, 256, 3, 3]: fan_out = 256*9
    assert abs(w.std() / np.sqrt(2 / (256 * 9)) - 1) < 0.01 and abs(w.mean()) < 1e-3
    assert abs(m.conv1.weight.data.std() / np.sqrt(2 / (64 * 49)) - 1) < 0.02
    assert abs(m.fc.weight.data.std() / 0.01 - 1) < 0.01 and not m.fc.bias.data.any()
    assert np.all(m.bn1.weight.data == 1) and not m.bn1.bias.data.any()
    assert np.all(m.layer1[0].bn3.running_var == 1) and not m.layer1[0].bn3.running_mean.any()


def test_init_is_deterministic_and_zero_init_residual():
    a = nn.resnet50(num_classes=10, width=1 / 16, seed=5)
    b = nn.resnet50(num_classes=10, width=1 / 16, seed=5)
    c = nn.resnet50(num_classes=10, width=1 / 16, seed=6)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert np.array_equal(va, vb), k
    assert not np.array_equal(a.conv1.weight.data, c.conv1.weight.data)
    z = nn.resnet50(num_classes=10, width=1 / 16, zero_init_residual=True)
    assert all(not blk.bn3.weight.data.any() for stage in (z.layer1, z.layer2, z.layer3, z.layer4) for blk in stage)
    assert np.all(z.layer1[0].bn2.weight.data == 1)


def test_width_scales_channels():
    m = nn.resnet50(num_classes=7, width=1 / 16)
    assert m.conv1.weight.shape == (4, 3, 7, 7)
    assert m.layer4[2].conv3.weight.shape == (128, 32, 1, 1)
    assert m.fc.weight.shape == (7, 128)


def test_nchw_and_nhwc_inputs_agree_and_eval_runs_without_graph():
    m = nn.resnet50(num_classes=10, width=1 / 16, seed=1)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    m.eval()
    with nn.no_grad():
        a = m(x)
        b = m(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), layout="NHWC")
        c = m(nn.Tensor(x))
    assert a.shape == (2, 10) and a.dtype == np.float32 and not a.requires_grad
    assert np.array_equal(a.data, b.data) and np.array_equal(a.data, c.data)


def test_input_gradient_flows_back_through_the_nchw_transpose():
    m = nn.resnet50(num_classes=3, width=1 / 16, seed=2)
    x = nn.Tensor(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32), requires_grad=True)
    F.cross_entropy(m(x), np.array([0, 2])).backward()
    assert x.grad.shape == (2, 3, 32, 32) and np.abs(x.grad).sum() > 0


def test_fp16_activations_keep_fp32_master_weights():
    """The mixed-precision path (meant for cuda) runs on cpu too: fp16 activations, fp32 logits,
    fp32 gradients on the fp32 parameters, logits close to the fp32 model's (compared in eval
    mode: batch statistics of a batch of 2 at 1x1 resolution amplify any rounding)."""
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    m32 = nn.resnet50(num_classes=5, width=1 / 16, seed=4).eval()
    m16 = nn.resnet50(num_classes=5, width=1 / 16, seed=4, activation_dtype=np.float16).eval()
    y32, y16 = m32(x), m16(x)
    assert y16.dtype == np.float32
    assert np.abs(y16.data - y32.data).max() < 1e-2 * np.abs(y32.data).max()
    m16.train()
    F.cross_entropy(m16(x), np.array([1, 3])).backward()
    assert all(p.grad is not None and p.grad.dtype == np.float32 for p in m16.parameters())


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_model_inputs_raise_clear_errors():
    m = nn.resnet50(num_classes=10, width=1 / 16)
    good = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\].*\(2, 32, 32, 3\)"):
        m(good.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="shape"):
        m(good[0])
    with pytest.raises(TypeError, match="float64.*float32"):
        m(good.astype(np.float64))
    with pytest.raises(TypeError, match="uint8"):
        m(good.astype(np.uint8))
    with pytest.raises(ValueError, match="layout"):
        m(good, layout="CHWN")
    with pytest.raises(TypeError, match="array or nn.Tensor"):
        m([[1.0]])
    with pytest.raises(ValueError, match="x is on device 'emu'"):
        m(nn.Tensor(good, device="emu"))


def test_parameter_on_another_device_is_named():
    m = nn.resnet50(num_classes=10, width=1 / 16)
    m.layer2[1].to("emu")             # NumPy arrays either way, so no kernels are needed for this
    with pytest.raises(ValueError, match=r"layer 'layer2\.1\.conv1'.*'weight' is on device 'emu'"):
        m(np.zeros((2, 3, 32, 32), np.float32))


def test_bad_state_dicts_raise_naming_the_key():
    m = nn.resnet50(num_classes=10, width=1 / 16)
    sd = {k: np.array(v) for k, v in m.state_dict().items()}
    before = m.fc.weight.data.copy()
    missing = dict(sd)
    del missing["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match="missing keys.*layer3.1.bn2.running_var"):
        m.load_state_dict(missing)
    extra = dict(sd, **{"fc.extra": np.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys.*fc.extra"):
        m.load_state_dict(extra)
    bad_shape = dict(sd, **{"fc.weight": np.zeros((10, 64), np.float32)})
    bad_shape["conv1.weight"] = sd["conv1.weight"] + 1
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(10, 64\).*\(10, 128\)"):
        m.load_state_dict(bad_shape)
    assert np.array_equal(m.fc.weight.data, before)          # a failed load changes nothing
    assert np.array_equal(m.conv1.weight.data, sd["conv1.weight"])


def test_state_dict_round_trip_into_a_fresh_model():
    a = nn.resnet50(num_classes=10, width=1 / 16, seed=1)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    a(x)                                                      # moves running stats
    b = nn.resnet50(num_classes=10, width=1 / 16, seed=2)
    b.load_state_dict({k: np.array(v, dtype=np.float64) for k, v in a.state_dict().items()})
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert np.array_equal(va, vb) and va.dtype == vb.dtype, k
    a.eval(), b.eval()
    with nn.no_grad():
        assert np.array_equal(a(x).data, b(x).data)


# ---------------------------------------------------------------------------------------------
# learning


def test_small_resnet_fits_a_fixed_batch():
    """16 random images, 10 random labels: 100% training accuracy within 60 SGD steps."""
    model = nn.resnet50(num_classes=10, width=1 / 16, seed=0)
    opt = nn.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    first_loss = None
    for step in range(60):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        first_loss = first_loss or loss.item()
        if nn.metrics.accuracy(logits, y, ks=(1,))[0] == 1.0:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert nn.metrics.accuracy(logits, y, ks=(1,))[0] == 1.0, f"not fitted after {step + 1} steps"
    assert loss.item() < 0.5 * first_loss
