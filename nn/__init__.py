"""nn: our own autograd, layers, ResNet-50 v1.5, optimisers and schedules, PyTorch-shaped.

    import nn
    model = nn.resnet50(num_classes=1000, width=1.0)      # torchvision's state_dict layout
    opt = nn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    logits = model(x)                                    # x: float32 [N, 3, H, W] (NCHW)
    loss = nn.functional.cross_entropy(logits, labels)
    opt.zero_grad(); loss.backward(); opt.step()

See nn/README.md for how it works.
"""

from nn import amp, checkpoint, functional, memory, metrics, optim, schedules
from nn.device import Device, cpu, cuda, emu, get_device
from nn.layers import (BatchNorm2d, Conv2d, GlobalAvgPool, Linear, MaxPool2d, Module, ReLU, Sequential,
                       manual_seed)
from nn.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from nn.tensor import Parameter, Tensor, is_grad_enabled, no_grad

__all__ = ["Tensor", "Parameter", "no_grad", "is_grad_enabled", "Device", "get_device", "cpu", "emu", "cuda",
           "Module", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "GlobalAvgPool", "Linear", "Sequential",
           "manual_seed", "Bottleneck", "BasicBlock", "ResNet", "resnet50", "resnet34", "resnet18",
           "functional", "optim", "schedules", "metrics", "amp", "checkpoint", "memory"]
