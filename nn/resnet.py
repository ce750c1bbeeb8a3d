"""ResNet-50 v1.5 (and its ResNet-18/34 siblings), laid out exactly as torchvision.models.resnet*
so that state_dict keys, order and shapes are identical.

    stem:   conv1 7x7/2 (64) -> bn1 -> relu -> maxpool 3x3/2
    layer1..layer4: [3, 4, 6, 3] Bottleneck blocks, widths 64, 128, 256, 512 (x4 at the output),
            strides 1, 2, 2, 2
    head:   global average pool -> fc (2048 -> num_classes, with bias)

Bottleneck v1.5: 1x1 conv -> BN -> ReLU -> 3x3 conv (the block's stride is HERE; v1 had it on the
first 1x1) -> BN -> ReLU -> 1x1 conv (4x width) -> BN -> + shortcut -> ReLU. The shortcut is the
identity, except in each stage's first block: a projection (1x1 conv with the stride, then BN),
named `downsample` as in torchvision.

`width` scales every channel count (64*width, ...) for small CPU runs; width=1 is the real model
(25,557,032 parameters with 1000 classes).

Layout: the model takes NCHW input (PyTorch's convention: x[N, 3, H, W]) and transposes it once at
the stem; inside, every activation is NHWC, the layout of our kernels. Feed NHWC directly (no
transpose) with `model(x, layout="NHWC")`.
"""

import numpy as np

from nn import functional as F
from nn.layers import BatchNorm2d, Conv2d, GlobalAvgPool, Linear, MaxPool2d, Module, ReLU, Sequential, conv_bn
from nn.tensor import Tensor

__all__ = ["Bottleneck", "BasicBlock", "ResNet", "resnet50", "resnet18", "resnet34"]


def _projection(downsample, x):
    """The projection shortcut of x.  x then feeds two convolutions (the block's first and the
    projection's) and nothing else: the one whose backward runs first hands its part of x's
    gradient to the other's epilogue (F.share_grad_partials), so the batch norm + ReLU that produced
    x still finishes its backward from partials."""
    F.share_grad_partials(x, 2)
    return downsample(x)


class Bottleneck(Module):
    """ResNet v1.5 bottleneck block: in_channels -> planes -> planes (stride) -> 4*planes."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, downsample=None, rng=None):
        super().__init__()
        self.conv1 = Conv2d(in_channels, planes, 1, rng=rng)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, stride=stride, padding=1, rng=rng)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = Conv2d(planes, planes * self.expansion, 1, rng=rng)
        self.bn3 = BatchNorm2d(planes * self.expansion)
        self.relu = ReLU()
        self.downsample = downsample

    def forward(self, x):
        identity = self.downsample is None
        shortcut = x if identity else _projection(self.downsample, x)
        out = conv_bn(self.conv1, self.bn1, x, relu=True)
        out = conv_bn(self.conv2, self.bn2, out, relu=True)
        # relu(bn3(conv3(.)) + shortcut); an identity shortcut's gradient goes to conv1's backward
        # epilogue (which adds it to its own before the ReLU's mask: F.batch_norm, residual_grad_to_link)
        return conv_bn(self.conv3, self.bn3, out, residual=shortcut, residual_grad_to_link=identity)

    def last_bn(self):
        return self.bn3


class BasicBlock(Module):
    """ResNet-18/34 block: 3x3 conv (stride) -> BN -> ReLU -> 3x3 conv -> BN -> + shortcut -> ReLU."""

    expansion = 1

    def __init__(self, in_channels, planes, stride=1, downsample=None, rng=None):
        super().__init__()
        self.conv1 = Conv2d(in_channels, planes, 3, stride=stride, padding=1, rng=rng)
        self.bn1 = BatchNorm2d(planes)
        self.relu = ReLU()
        self.conv2 = Conv2d(planes, planes, 3, padding=1, rng=rng)
        self.bn2 = BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = self.downsample is None
        shortcut = x if identity else _projection(self.downsample, x)
        out = conv_bn(self.conv1, self.bn1, x, relu=True)
        return conv_bn(self.conv2, self.bn2, out, residual=shortcut, residual_grad_to_link=identity)

    def last_bn(self):
        return self.bn2


class ResNet(Module):
    """A ResNet for images: model(x) -> logits Tensor [N, num_classes] (float32).

    Args:
        block: Bottleneck or BasicBlock.   layers: blocks per stage, e.g. [3, 4, 6, 3].
        num_classes: outputs of fc.        width: channel multiplier (1.0 = the published model).
        zero_init_residual: start each block's last BN gamma at 0 (each block starts as identity).
        seed: initialisation seed (same seed -> same weights).
        activation_dtype: None (= the parameters' dtype, fp32) or np.float16 for mixed precision
            on cuda: inputs and activations in that dtype, fp32 master weights cast per use, logits
            returned in fp32. (bfloat16 is refused: several ops have no bfloat16 kernels.)
    """

    def __init__(self, block, layers, num_classes=1000, width=1.0, zero_init_residual=False, seed=0,
                 activation_dtype=None):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        _check_activation_dtype(activation_dtype)
        rng = np.random.default_rng(seed)
        scaled = lambda c: max(1, int(round(c * width)))
        self.width, self.activation_dtype = width, activation_dtype
        stem = scaled(64)
        self.conv1 = Conv2d(3, stem, 7, stride=2, padding=3, rng=rng)
        self.bn1 = BatchNorm2d(stem)
        self.relu = ReLU()
        self.maxpool = MaxPool2d(3, stride=2, padding=1)
        in_channels = stem
        for i, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = scaled(64 * 2 ** i)
            stage = []
            for b in range(blocks):
                s = stride if b == 0 else 1
                downsample = None
                if b == 0 and (s != 1 or in_channels != planes * block.expansion):
                    downsample = Sequential(Conv2d(in_channels, planes * block.expansion, 1, stride=s, rng=rng),
                                            BatchNorm2d(planes * block.expansion))
                stage.append(block(in_channels, planes, s, downsample, rng=rng))
                in_channels = planes * block.expansion
            setattr(self, f"layer{i + 1}", Sequential(*stage))
        self.avgpool = GlobalAvgPool()
        self.fc = Linear(in_channels, num_classes, rng=rng)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (Bottleneck, BasicBlock)):
                    m.last_bn().weight.data[...] = 0
        self.assign_paths()

    def forward(self, x, layout="NCHW"):
        """x: images as an array or Tensor, float, [N, 3, H, W] (layout='NCHW', the default) or
        [N, H, W, 3] (layout='NHWC', no transpose needed) -> logits Tensor [N, num_classes]."""
        x = self._prepare_input(x, layout)
        x = conv_bn(self.conv1, self.bn1, x, relu=True)
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits = self.fc(self.avgpool(x))
        return F.cast(logits, np.float32) if logits.dtype != np.float32 and logits.dtype != np.float64 else logits

    def _prepare_input(self, x, layout):
        """Validate x, put it on the model's device as a Tensor, NHWC, in the activation dtype."""
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        device = self.device
        if isinstance(x, Tensor):
            if x.device != device:
                raise ValueError(f"model(x): x is on device '{x.device.name}' but the model is on "
                                 f"'{device.name}'; use model.to('{x.device.name}') or move x")
        elif hasattr(x, "shape") and hasattr(x, "dtype"):
            x = Tensor(device.asarray(x), device=device)
        else:
            raise TypeError(f"model(x): x must be an array or nn.Tensor, got {type(x).__name__}")
        channel_axis = 1 if layout == "NCHW" else 3
        expect = "[N, 3, H, W]" if layout == "NCHW" else "[N, H, W, 3]"
        if x.ndim != 4 or x.shape[channel_axis] != self.conv1.in_channels:
            raise ValueError(f"model(x): x must have shape {expect} for layout='{layout}', got {tuple(x.shape)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"model(x): x must be a float array (normalised images), got dtype {x.dtype}; "
                            f"for uint8 images use nn.functional.normalize_images first")
        want = np.dtype(self.activation_dtype) if self.activation_dtype is not None else self.conv1.weight.dtype
        if self.activation_dtype is None and x.dtype != want:
            raise TypeError(f"model(x): x has dtype {x.dtype} but the model's parameters are {want}; "
                            f"convert x (e.g. x.astype(np.{want}))")
        if layout == "NCHW":
            x = F.transpose(x, (0, 2, 3, 1))
        return F.cast(x, want)


def _check_activation_dtype(value):
    if value is None:
        return
    try:
        dtype = np.dtype(value)
    except TypeError:       # 'bfloat16' without ml_dtypes: NumPy has no such dtype
        dtype = None
    if dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ValueError(f"activation_dtype must be None, np.float16 or np.float32, got {value!r}: batch norm, "
                         f"pooling, the elementwise ops and the input kernel have no bfloat16 versions; "
                         f"use np.float16 (with nn.amp.LossScaler)")


def resnet50(num_classes=1000, width=1.0, zero_init_residual=False, seed=0, activation_dtype=None):
    """ResNet-50 v1.5 (torchvision.models.resnet50 layout; 25,557,032 parameters at width 1)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width, zero_init_residual, seed, activation_dtype)


def resnet34(num_classes=1000, width=1.0, zero_init_residual=False, seed=0, activation_dtype=None):
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]; torchvision.models.resnet34 layout)."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, width, zero_init_residual, seed, activation_dtype)


def resnet18(num_classes=1000, width=1.0, zero_init_residual=False, seed=0, activation_dtype=None):
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]; torchvision.models.resnet18 layout)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width, zero_init_residual, seed, activation_dtype)
