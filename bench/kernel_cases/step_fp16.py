"""The memory-bound kernels of one ResNet-50 v1.5 training step (batch 256, 224 px, float16
activations, SGD), each at its shape, with how many times a step runs it: before and after the
versions of issue 25 (batch norm 3 -> 5, pool 1 (float16: 2) -> 3, input 1 -> 3, elementwise 1 -> 2).

    python -m bench.kernels --profile --gpu H100 --groups step_fp16 --json step.json
    python -m bench.kernel_cases.step_fp16 step.json        # the table: time per step by family

The convolutions, the GEMMs, the loss and the optimizer's update are the same before and after
(the update is listed, unchanged); the per-step counts come from a traced step of the model
(tests/test_kernels_bandwidth_versions.py checks them against the tiny model's trace): 53 batch
norms (33 + ReLU, 16 + add + ReLU, 4 plain on the projection shortcuts), forward and backward;
one max pool and one global average pool, forward and backward; the input normalisation; the
classifier's weight and bias cast to float16 and its logits back to float32.
"""

import sys

import numpy as np

from bench.kernel_cases import lesson_case
from kernels import cases as lesson

BEFORE = {"batchnorm": 3, "pool": 2, "input": 1, "elementwise": 1, "optimizer": 2}
"""The versions a float16 step ran before: batch norm 3 (its backward: version 2's kernels), pool 1,
which runs version 2 for float16 gradients (version 1 has no float16 kernel), input 1, elementwise 1."""
AFTER = {"batchnorm": 5, "pool": 3, "input": 3, "elementwise": 2, "optimizer": 2}
"""Batch norm 5 is version 4 with the backward of the 32 batch norms + ReLU whose output feeds a
convolution and of the 15 add + ReLU ones whose output feeds the next block (the last one's feeds
the average pool) finished from the partial sums of a convolution's backward-data epilogue
(conv_backward_data_layers: its cost is in the table too), the stem's and the last block's from those
of the max pool's and the average pool's backward (pool 3's *_relu_bn kernels, in the pool's row),
and the 4 plain ones of the projections from those their block's add + ReLU batch norm makes in its
dx pass (the pair form): all 53."""

# (H, W, C) of every batch norm of ResNet-50 v1.5 at 224 px, by mode, and how many: the stem; in
# each stage the first two of a bottleneck (+ ReLU; the first block's first one at the input's
# resolution, v1.5 strides the 3x3), the third (+ add + ReLU) and the first block's projection (plain)
BATCH_NORMS = {
    "relu": [((112, 112, 64), 1), ((56, 56, 64), 6), ((56, 56, 128), 1), ((28, 28, 128), 7),
             ((28, 28, 256), 1), ((14, 14, 256), 11), ((14, 14, 512), 1), ((7, 7, 512), 5)],
    "add_relu": [((56, 56, 256), 3), ((28, 28, 512), 4), ((14, 14, 1024), 6), ((7, 7, 2048), 3)],
    "plain": [((56, 56, 256), 1), ((28, 28, 512), 1), ((14, 14, 1024), 1), ((7, 7, 2048), 1)],
}
_FORWARD = {"plain": "batchnorm_forward_train", "relu": "batchnorm_relu_forward_train",
            "add_relu": "batchnorm_add_relu_forward_train"}
_BACKWARD = {"plain": "batchnorm_backward", "relu": "batchnorm_relu_backward", "add_relu": "batchnorm_add_relu_backward"}


def _from_partials(mode, shape, count):
    """(plain, pair): how many of `count` batch norms of `mode` at (H, W, C) `shape` finish their
    backward from partial sums in version 5, and how many of those in the pair form: every batch norm
    + ReLU (a convolution's backward-data epilogue sums them; the stem's, the max pool's backward), every
    add + ReLU one (the network's last: the average pool's backward), the first block's of each stage in
    the pair form (its dx pass also sums for the projection's batch norm), and the 4 plain ones of the
    projections (from those sums)."""
    if mode == "add_relu":
        pair = sum(n for s, n in BATCH_NORMS["plain"] if s == shape)   # a projection block per stage
        return count - pair, pair
    return count, 0


def _step_case(case, op, version, label, family, count, when, key=()):
    c = lesson_case(case, op, version, f"step: {label} v{version} x{count}", key=key)
    c.notes["step"] = {"family": family, "count": count, "when": when}
    return c


def conv_backward_data_layers():
    """[((H, W, C, K, R, stride, padding), count, kind)] of the backward-data passes that batch norm
    version 5 changes: a bottleneck's 3x3 (conv2) and 1x1 expand (conv3), whose inputs come from a
    batch norm + ReLU (kind "relu bn"), the 1x1 reduce (conv1) of a block with an identity shortcut,
    whose input is the block before's add + ReLU output (kind "shortcut + relu bn": it also adds the
    shortcut's gradient), and the projection of stages 2-4, whose input the block's reduce takes too
    (the projection's backward runs second and adds the reduce's da: the same kind).  32 + 12 + 3 of
    them; the others (the stem, the reduce beside a projection, stage 1's projection of the max
    pool's output) run plain before and after."""
    layers = {}
    size, cin = 56, 64
    for width, blocks, first_stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            stride = first_stride if b == 0 else 1
            out = (size - 1) // stride + 1
            fused = [((size, size, width, width, 3, stride, 1), "relu bn"), ((out, out, width, 4 * width, 1, 1, 0),
                                                                             "relu bn")]
            if b > 0:
                fused.append(((size, size, cin, width, 1, 1, 0), "shortcut + relu bn"))
            elif stride == 2:   # stages 2-4: the input is the stage before's last add + ReLU output
                fused.append(((size, size, cin, 4 * width, 1, 2, 0), "shortcut + relu bn"))
            for key in fused:
                layers[key] = layers.get(key, 0) + 1
            size, cin = out, 4 * width
    return [(shape, count, kind) for (shape, kind), count in layers.items()]


# the twins the model scales each layer's kernels from: 16x16 images, one per kind of filter
_CONV_TWINS = {(3, 1): (16, 16, 64, 64, 3, 1, 1), (3, 2): (16, 16, 64, 64, 3, 2, 1),
               (1, 1): (16, 16, 256, 64, 1, 1, 0), (1, 2): (16, 16, 64, 128, 1, 2, 0)}


def _conv_cases(xp, size):
    """The backward data of the layers of conv_backward_data_layers, float16 (conv.cu version 5):
    before, plain (and batch norm's own reduction reads g, a and x again); after, with the epilogue."""
    out = []
    if size == "profile":   # one twin per kind and op: the layers' keys find them
        for (R, stride), shape in _CONV_TWINS.items():
            c = lesson.make("conv", xp, (1,) + shape)
            for op in ("conv2d_backward_data f16", c.RELU_BN + " f16", c.RELU_BN_DZ + " f16"):
                out.append(_step_case(c, op, 5, f"{op} twin {R}x{R} s{stride}", "conv backward data", 1, "both",
                                      ("R", R, "stride", stride)))
        return out
    made = {}
    for (H, W, C, K, R, stride, pad), count, kind in conv_backward_data_layers():
        if size == "tiny" and (H < 56 or C > 64):
            continue
        n = 256 if size == "resnet50" else 2
        shape = (n, H, W, C, K, R, stride, pad) if size == "resnet50" else (n, 6, 6, C // 8, max(1, K // 8), R,
                                                                             stride, pad)
        c = made.setdefault(shape, lesson.make("conv", xp, shape))
        s = f"{R}x{R} s{stride} [{n},{H},{W},{C}]->{K}"
        key = ("R", R, "stride", stride)
        fused = (c.RELU_BN_DZ if kind.startswith("shortcut") else c.RELU_BN) + " f16"
        out.append(_step_case(c, "conv2d_backward_data f16", 5, f"conv2d_backward_data f16 {s}", "conv backward data",
                              count, "before", key))
        out.append(_step_case(c, fused, 5, f"{fused} {s}", "conv backward data", count, "after", key))
    return out


def _versions(family):
    """[(version, when)]: one case where both sides run the same version."""
    b, a = BEFORE[family], AFTER[family]
    return [(b, "both")] if a == b else [(b, "before"), (a, "after")]


def cases(xp, size):
    """size "resnet50": the step's shapes (batch 256); "profile": the twins the predictions scale
    from (batch norm at 1x16x16 per channel count, the pools and the input at a batch of 1 to 8, the
    optimizer's 161 tensors at 1/16); "tiny": a few of them at small shapes (the emulator)."""
    out = []
    batch = {"resnet50": 256, "profile": 1}.get(size, 2)
    bn_cases = {}
    for mode, layers in BATCH_NORMS.items():
        for (H, W, C), count in layers:
            if size == "tiny" and (C > 128 or H < 56):
                continue
            shape = {"resnet50": (batch, H, W, C), "profile": (1, 16, 16, C)}.get(size, (batch, 4, 4, C))
            if shape not in bn_cases:
                bn_cases[shape] = lesson.make("batchnorm", xp, shape)
            c = bn_cases[shape]
            s = "x".join(map(str, shape))
            for version, when in _versions("batchnorm"):
                v = min(version, 4)   # version 5's forward, and its backward elsewhere, are version 4's
                fwd = _FORWARD[mode] + " from conv stats f16"
                out.append(_step_case(c, fwd, v, f"{fwd} [{s}]", "batchnorm forward", count, when, ("C", C)))
                bwd = _BACKWARD[mode] + " f16"
                plain, pair = _from_partials(mode, (H, W, C), count) if version >= 5 else (0, 0)
                if plain:   # (the add + ReLU and plain forms': the same kernels)
                    op = "batchnorm_relu_backward from conv partials f16"
                    out.append(_step_case(c, op, version, f"{op} [{s}] ({mode})", "batchnorm backward", plain, when,
                                          ("C", C)))
                if pair:
                    op = "batchnorm_relu_backward from conv partials pair f16"
                    out.append(_step_case(c, op, version, f"{op} [{s}] ({mode})", "batchnorm backward", pair, when,
                                          ("C", C)))
                fused = plain + pair
                if count - fused:
                    out.append(_step_case(c, bwd, v, f"{bwd} [{s}]", "batchnorm backward", count - fused, when,
                                          ("C", C)))
    pool_shape = {"resnet50": (256, 112, 112, 64), "profile": (1, 112, 112, 64)}.get(size, (2, 9, 9, 16))
    avg_shape = {"resnet50": (256, 7, 7, 2048), "profile": (8, 7, 7, 2048)}.get(size, (2, 3, 3, 64))
    p = lesson.make("pool", xp, pool_shape + (3, 2, 1))
    a = lesson.make("pool", xp, avg_shape + (1, 1, 0))
    p_s, a_s = "x".join(map(str, pool_shape)), "x".join(map(str, avg_shape))
    for version, when in _versions("pool"):
        # after: batch norm 5 and pool 3, the stem's mask and batch-norm partials in the pool's backward
        op = "maxpool2d_backward relu_bn f16" if when == "after" else "maxpool2d_backward f16"
        out.append(_step_case(p, op, version, f"{op} [{p_s}]", "pool", 1, when))
        op = "global_avgpool_backward relu_bn f16" if when == "after" else "global_avgpool_backward f16"
        out.append(_step_case(a, op, version, f"{op} [{a_s}]", "pool", 1, when))
    image = {"resnet50": (256, 224, 224), "profile": (2, 224, 224)}.get(size, (2, 16, 16))
    i = lesson.make("input", xp, image)
    i_s = "x".join(map(str, image + (3,)))
    for version, when in _versions("input"):
        out.append(_step_case(i, "input_normalize u8->f16", version, f"input_normalize u8->f16 [{i_s}]", "input", 1,
                              when))
    # the classifier: its float32 weight [1000, 2048] and bias [1000] cast to float16, its logits
    # [256, 1000] back to float32 for the loss
    for n, op, count in ((2048 * 1000, "cast f32->f16", 1), (1000, "cast f32->f16", 1), (256 * 1000, "cast f16->f32", 1)):
        shown = n if size in ("resnet50", "profile") else min(n, 4099)
        e = lesson.make("elementwise", xp, (shown,))
        for version, when in _versions("elementwise"):
            out.append(_step_case(e, op, version, f"{op} [{shown}]", "elementwise", count, when, ("n", n)))
    out += _conv_cases(xp, size)
    o = lesson.make("optimizer", xp, {"resnet50": (161, 1), "profile": (161, 16)}.get(size, (12, 64)))
    for version, when in _versions("optimizer"):
        out.append(_step_case(o, "momentum update", version, "momentum_update_flat [25.6M params]", "optimizer", 1,
                              when))
    return out


def step_table(result):
    """{family: {"before": seconds, "after": seconds}} per step from a `bench.kernels --profile`
    result (the dict, or its JSON file): the sum of count x the predicted GPU time of each case (the
    kernels' own time; the host's launch time is left out, as in a step the host runs ahead of the
    GPU or a CUDA graph replays it), and the launches per step."""
    import json
    from pathlib import Path
    if not isinstance(result, dict):
        result = json.loads(Path(result).read_text())
    table, launches = {}, {"before": 0, "after": 0}
    for row in result["cases"]:
        if row.get("group") != "step_fp16":
            continue
        if "gpu_s" not in row:
            raise ValueError(f"{row['name']}: no prediction ({row.get('error')})")
        step = _parse(row["name"])
        family, count, when = step
        entry = table.setdefault(family, {"before": 0.0, "after": 0.0})
        for side in ("before", "after") if when == "both" else (when,):
            entry[side] += count * row["gpu_s"]
            launches[side] += count * sum(1 for lp in row["launches"] if lp["kernel"] not in ("memset", "copy to device"))
    return table, launches


def _parse(name):
    """(family, count, when) of a step case from the cases of this module (the JSON keeps names)."""
    for c in _CASE_INDEX():
        if c.name == name:
            s = c.notes["step"]
            return s["family"], s["count"], s["when"]
    raise ValueError(f"{name}: not a case of bench.kernel_cases.step_fp16")


_index = None


def _CASE_INDEX():
    global _index
    if _index is None:
        from kernels.runtime import plan
        _index = cases(plan.cupy, "resnet50")
    return _index


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.kernel_cases.step_fp16 RESULT.json  (from bench.kernels --profile --groups "
              "step_fp16 --json RESULT.json)", file=sys.stderr)
        return 2
    table, launches = step_table(argv[0])
    print("| family | before (ms/step) | after (ms/step) | saved (ms) |")
    print("|---|---:|---:|---:|")
    tb = ta = 0.0
    for family, e in table.items():
        tb, ta = tb + e["before"], ta + e["after"]
        print(f"| {family} | {1e3 * e['before']:.2f} | {1e3 * e['after']:.2f} | {1e3 * (e['before'] - e['after']):.2f} |")
    print(f"| **all of these** | **{1e3 * tb:.2f}** | **{1e3 * ta:.2f}** | **{1e3 * (tb - ta):.2f}** |")
    print(f"\nlaunches per step of these kernels: {launches['before']} before, {launches['after']} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
