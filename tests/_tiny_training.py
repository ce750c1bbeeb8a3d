"""A few training steps of the tiny ResNet-50 with chosen kernel versions: what
tests/test_kernel_choice.py, tests/test_conv_bn_fusion.py, tests/test_kernels_bandwidth_versions.py
and the exercises' checks (tests/test_learn.py) compare."""

from types import SimpleNamespace

import numpy as np

import nn
from kernels.runtime import trace
from nn import functional as F


def run_tiny(steps=3, device="emu", dtype=None, lars=False, uint8_images=False, **choice):
    """`steps` SGD steps of the tiny ResNet-50 (width 1/16, 10 classes) on one fixed batch of 8
    random 32x32 images, on `device` with nn.device.use_kernels(**choice), activations in `dtype`
    (None: float32).  zero_init_residual: the tiny model's default initialisation is so
    ill-conditioned that rounding-level differences grow to 1e-3 in a step; this one trains
    smoothly, so any two correct versions agree to float32 rounding (rtol 1e-5).
    lars: LARS steps instead (its trust ratios use the norm kernels); uint8_images: random uint8
    images normalised on the device (F.normalize_images, the input kernel).  (choice's keywords are
    kernel families: `optimizer=3` is the optimizer kernels' version.)
    Returns .losses (array), .trace (the launches), .model and its batch .x."""
    with nn.device.use_kernels(**choice), trace.collect() as t:
        model = nn.resnet50(num_classes=10, width=0.0625, seed=0, zero_init_residual=True,
                            activation_dtype=dtype).to(device)
        if lars:
            opt = nn.optim.LARS(model.named_parameters(), lr=2.0, momentum=0.9, weight_decay=5e-5)
        else:
            opt = nn.optim.SGD(model.named_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)
        rng = np.random.default_rng(0)
        dev = nn.device.get_device(device)
        if uint8_images:
            x = F.normalize_images(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), device,
                                   std=(58.4, 57.1, 57.4), dtype=dtype or np.float32)
        else:
            x = dev.asarray(rng.standard_normal((8, 32, 32, 3), dtype=np.float32))
        y = dev.asarray(rng.integers(0, 10, 8).astype(np.int32))
        losses = []
        for _ in range(steps):
            loss = F.cross_entropy(model(x, layout="NHWC"), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(nn.device.to_numpy(loss.data)))
    return SimpleNamespace(losses=np.array(losses), trace=t, model=model, x=x)


def train_tiny(steps=3, **choice):
    """(losses, trace) of run_tiny on the emulator."""
    run = run_tiny(steps, **choice)
    return run.losses, run.trace
