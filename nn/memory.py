"""GPU memory of a training step, counted from the layer shapes, and the batch size that fits.

What fills a GPU during training is not the weights (ResNet-50: 25.6 M parameters, ~0.3 GB with
their gradients and momentum) but the activations the forward pass keeps for the backward pass.
With our autograd (nn/tensor.py, nn/functional.py) a training forward pass of ResNet keeps:

  - the input images;
  - for each convolution, its output (the input batch norm needs for its gradient) and the batch
    norm's output (the input of the next convolution, and the mask of the fused ReLU), plus the
    batch norm's per-channel mean and 1/std (float32);
  - the max pool's output and its argmax (int32);
  - the pooled features, the logits (and their float32 copy under fp16) and the softmax (float32);
  - the copy of a convolution's weight its backward-data pass reads (ops.conv_weight): under fp16
    the float16 cast of every float32 master (channels last on emu and cuda); in fp32 on emu and
    cuda the channels-last copy of every filter larger than 1x1 (a 1x1 filter is channels-last
    memory as it is, and the cpu device reads the weight itself); under fp16 also the fc weight's
    float16 cast (its bias stays float32).

Every convolution is followed by a batch norm, so that is two arrays per convolution: ResNet-50 at
224 px has 53 convolutions producing 11.1 M values per image, hence ~89 MB per image in fp32 and
~23 GiB at batch 256, more than a 16 GB P100 or V100 holds. `activation_bytes` counts it exactly
for our implementation (tests/test_gpu_setup.py compares it with a hand count and with the arrays
a real forward pass leaves in the graph); `max_batch_size` turns free memory into a batch size,
and `oom_message` is what train.py prints when the GPU runs out (exit code 4).
"""

import gc

__all__ = ["conv_output_size", "resnet_layer_shapes", "activation_bytes", "resnet_parameter_count",
           "step_bytes", "max_batch_size", "oom_message", "GiB"]

GiB = 1 << 30
_LAYERS = {"resnet50": (3, 4, 6, 3)}
_ACT_BYTES = {"fp32": 4, "fp16": 2}
_HEADROOM = 0.9          # plan for 90% of the free memory: the allocator's rounding and fragmentation


def conv_output_size(size, kernel, stride, padding):
    """Output height (or width) of a convolution or pooling window: (size + 2p - k) // s + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def resnet_layer_shapes(image_size=224, width=1.0, num_classes=1000, layers=(3, 4, 6, 3)):
    """The layers of a bottleneck ResNet (nn.resnet.ResNet) with their output shapes for ONE image.

    -> list of (kind, name, shape, extra): kind 'input' | 'conv' | 'maxpool' | 'avgpool' | 'fc';
    shape (H, W, C) or (C,); extra = the weight shape (K, C, R, S) for 'conv', (K, C) for 'fc'.
    """
    scaled = lambda c: max(1, int(round(c * width)))
    out = [("input", "input", (image_size, image_size, 3), None)]
    stem = scaled(64)
    h = conv_output_size(image_size, 7, 2, 3)
    out.append(("conv", "conv1", (h, h, stem), (stem, 3, 7, 7)))
    h = conv_output_size(h, 3, 2, 1)
    out.append(("maxpool", "maxpool", (h, h, stem), None))
    c = stem
    for i, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
        planes = scaled(64 * 2 ** i)
        for b in range(blocks):
            s = stride if b == 0 else 1
            name = f"layer{i + 1}.{b}"
            h2 = conv_output_size(h, 3, s, 1)
            out.append(("conv", f"{name}.conv1", (h, h, planes), (planes, c, 1, 1)))
            out.append(("conv", f"{name}.conv2", (h2, h2, planes), (planes, planes, 3, 3)))
            out.append(("conv", f"{name}.conv3", (h2, h2, 4 * planes), (4 * planes, planes, 1, 1)))
            if b == 0 and (s != 1 or c != 4 * planes):
                hd = conv_output_size(h, 1, s, 0)
                out.append(("conv", f"{name}.downsample.0", (hd, hd, 4 * planes), (4 * planes, c, 1, 1)))
            h, c = h2, 4 * planes
    out.append(("avgpool", "avgpool", (c,), None))
    out.append(("fc", "fc", (num_classes,), (num_classes, c)))
    return out


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def activation_bytes(batch, image_size=224, width=1.0, num_classes=1000, precision="fp32", layers=(3, 4, 6, 3),
                     device="cuda"):
    """Bytes the training forward pass of nn.resnet (bottleneck blocks) keeps for backward.

    precision: 'fp32' or 'fp16' (float16 activations, float32 statistics, softmax and masters).
    device: 'cuda' or 'emu' (our kernels or cuDNN: channels-last weight copies), or 'cpu'.
    -> dict of bytes: input, conv_outputs, bn_outputs, bn_stats, maxpool, head, weight_copies, total.
    """
    if precision not in _ACT_BYTES:
        raise ValueError(f"precision must be one of {sorted(_ACT_BYTES)}, got {precision!r}")
    if device not in ("cuda", "emu", "cpu"):
        raise ValueError(f"device must be 'cuda', 'emu' or 'cpu', got {device!r}")
    act = _ACT_BYTES[precision]
    n = int(batch)
    parts = dict.fromkeys(("input", "conv_outputs", "bn_outputs", "bn_stats", "maxpool", "head", "weight_copies"), 0)
    for kind, _, shape, weight in resnet_layer_shapes(image_size, width, num_classes, layers):
        values = n * _prod(shape)
        if kind == "input":
            parts["input"] += values * act
        elif kind == "conv":
            parts["conv_outputs"] += values * act           # = the batch norm's input
            parts["bn_outputs"] += values * act             # = the next layer's input, the ReLU mask
            parts["bn_stats"] += 2 * shape[-1] * 4          # mean and 1/std, float32
            if act != 4 or (device != "cpu" and weight[2] * weight[3] > 1):
                parts["weight_copies"] += _prod(weight) * act
        elif kind == "maxpool":
            parts["maxpool"] += values * act + values * 4   # output and int32 argmax
        elif kind == "avgpool":
            parts["head"] += values * act                   # the pooled features (fc's input)
        elif kind == "fc":
            parts["head"] += values * act + values * 4      # logits and the float32 softmax
            if act != 4:
                parts["head"] += values * 4                 # the logits' float32 copy
                parts["weight_copies"] += _prod(weight) * act   # the float32 bias is added as it is
    parts["total"] = sum(parts.values())
    return parts


def resnet_parameter_count(width=1.0, num_classes=1000, layers=(3, 4, 6, 3)):
    """Parameters of nn.resnet's bottleneck ResNet: conv weights, BN gamma and beta, fc weight and
    bias (resnet50 at width 1 with 1000 classes: 25,557,032)."""
    total = 0
    for kind, _, shape, weight in resnet_layer_shapes(32, width, num_classes, layers):
        if kind == "conv":
            total += _prod(weight) + 2 * weight[0]
        elif kind == "fc":
            total += _prod(weight) + weight[0]
    return total


def step_bytes(batch, image_size=224, width=1.0, num_classes=1000, precision="fp32", layers=(3, 4, 6, 3)):
    """Bytes a training step needs beyond what exists before it: the kept activations, the
    gradients in flight during backward (the incoming and outgoing gradient of the largest layer
    and a waiting shortcut gradient: 3 of the largest activation), and the parameters' gradients
    and momentum (float32, allocated by the first backward and optimizer step)."""
    act = _ACT_BYTES[precision]
    largest = max(_prod(s) for kind, _, s, _ in resnet_layer_shapes(image_size, width, num_classes, layers)
                  if kind in ("conv", "maxpool", "input"))
    in_flight = 3 * int(batch) * largest * act
    params = resnet_parameter_count(width, num_classes, layers)
    return activation_bytes(batch, image_size, width, num_classes, precision, layers)["total"] + in_flight + 8 * params


def max_batch_size(free_bytes, image_size=224, width=1.0, num_classes=1000, precision="fp32", multiple=1,
                   layers=(3, 4, 6, 3)):
    """The largest batch (per GPU, a multiple of `multiple`) whose step_bytes fit in 90% of
    `free_bytes` (the allocator's rounding and fragmentation take the rest); 0 if none fits."""
    budget = _HEADROOM * free_bytes
    fits = lambda b: step_bytes(b, image_size, width, num_classes, precision, layers) <= budget
    lo, hi = 0, 1
    while fits(hi * multiple):
        lo, hi = hi, hi * 2
        if hi > 1 << 24:
            break
    while hi - lo > 1:        # the largest k with fits(k * multiple), between lo (fits) and hi (does not)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * multiple) else (lo, mid)
    return lo * multiple


def _size(nbytes):
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 2 ** 20:.0f} MiB"


def oom_message(exc, batch_size, world_size, image_size, width, num_classes, precision, free_bytes=None):
    """The line train.py prints when the GPU runs out of memory (exit code 4): how much the step
    keeps at this batch, how much is free, and a --batch-size (the global batch, a multiple of the
    ranks) that fits.

    exc: the out-of-memory exception, or None. Its traceback is dropped and the garbage collected
    first, so that the failed step's arrays are released before the free memory is measured.
    free_bytes: measure on the current GPU when None.
    """
    if exc is not None:
        exc.__traceback__ = None
    if free_bytes is None:
        gc.collect()
        from nn.device import free_device_memory
        free_bytes, _ = free_device_memory()
    local = max(1, batch_size // max(1, world_size))
    kept = activation_bytes(local, image_size, width, num_classes, precision)["total"]
    per = f" per GPU ({world_size} ranks)" if world_size > 1 else ""
    what = (f"out of GPU memory at batch size {batch_size}: a training step keeps {_size(kept)} of "
            f"activations for backward at {local} images{per} ({precision}, {image_size} px, "
            f"{_size(kept / local)} per image)")
    alternative = " (or --precision fp16, which halves the activations)" if precision == "fp32" else ""
    if free_bytes is None:
        return f"{what}; try --batch-size {max(world_size, batch_size // 2)}{alternative}"
    fit = max_batch_size(free_bytes, image_size, width, num_classes, precision)
    if fit < 1:
        return (f"{what}, and with {_size(free_bytes)} free not even one image fits: free the GPU "
                f"(nvidia-smi shows who holds it), or try --image-size {image_size // 2}")
    if fit >= local:          # the count says it fits: something else holds memory (another process?)
        fit = max(1, local // 2)
    if fit >= 64:             # a multiple of 8 when that costs little
        fit = fit // 8 * 8
    suggestion = fit * world_size
    return (f"{what}, and the GPU has {_size(free_bytes)} free besides the model: try --batch-size "
            f"{suggestion}{alternative}")
