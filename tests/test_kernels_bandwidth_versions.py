"""The memory-bound kernels' newer versions (elementwise 2, batch norm 4 and 5, pool 3, input 3,
optimizer 3: 16-byte vectors, more work in flight, batch norm's backward sums from the next
convolution) train the tiny ResNet-50 on the emulator to the same losses as
the versions before them, in float32 and float16, with LARS (whose trust ratios use the norms) and the
input normalised on the device.  Each kernel's own tests are in tests/test_kernels_<op>.py."""

import numpy as np
import pytest

import nn
from kernels.runtime import trace
from nn import functional as F
from tests._tiny_training import run_tiny

OLD = {"elementwise": 1, "batchnorm": 3, "pool": 2, "input": 2, "optimizer": 2}
NEW = {"elementwise": 2, "batchnorm": 5, "pool": 3, "input": 3, "optimizer": 3}


def train(dtype, choice, steps=3):
    """Losses of `steps` LARS steps of the tiny ResNet-50 (tests/_tiny_training.py) on one batch of 8
    random uint8 32x32 images normalised on the device, activations in `dtype`; the kernels it ran."""
    run = run_tiny(steps, "emu", dtype, lars=True, uint8_images=True, **choice)
    return run.losses, set(run.trace.by_kernel())


@pytest.mark.parametrize("dtype", [None, np.float16], ids=["fp32", "fp16"])
def test_new_versions_train_to_the_same_losses(dtype):
    old, ran_old = train(dtype, OLD)
    new, ran_new = train(dtype, NEW)
    assert new[-1] < new[0] - 0.1                                     # it trains
    sfx = "f32" if dtype is None else "f16"
    vector = "f32x4" if dtype is None else "f16x8"
    want = {f"batchnorm_backward_dx_rows_pair_{vector}", f"batchnorm_backward_dx_rows_{vector}",
            "batchnorm_backward_reduce_finalize", f"global_avgpool_backward_relu_bn_{vector}", f"input_normalize_tiles_{sfx}",
            "chunk_sum_squares_vec_f32",
            # the stem's 4 channels (width 1/16) are half a 16-byte vector of halves: one channel a thread;
            # with its batch norm's mask and partial sums (batch norm 5)
            f"maxpool2d_backward_blocks_relu_bn_{sfx}x{4 if dtype is None else 1}"}
    assert want <= ran_new, want - ran_new
    assert not want & ran_old
    assert not {k for k in ran_new if k.startswith("batchnorm_") and k.endswith(("backward_partial_" + sfx,
                                                                                  "backward_finalize"))}
    # float32: other summation orders and 1/std for /std move the last bits; float16: such a change
    # moves some activations by one float16 ulp (2^-11), as the fusion of batch norm's statistics does
    np.testing.assert_allclose(new, old, rtol=1e-5 if dtype is None else 5e-4)


def test_the_step_table_counts_what_a_step_runs():
    """bench/kernel_cases/step_fp16.py lists every memory-bound kernel of a float16 ResNet-50 step
    with how often a step runs it: the tiny model (the same 53 batch norms, pools and classifier,
    1/16 of the width) runs exactly those launches in one SGD step with the input normalised on the
    device."""
    from bench.kernel_cases import step_fp16
    from kernels.runtime import plan
    with nn.device.use_kernels(**NEW), trace.collect() as t:
        model = nn.resnet50(num_classes=10, width=0.0625, seed=0, activation_dtype=np.float16).to("emu")
        opt = nn.optim.SGD(model.named_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)
        rng = np.random.default_rng(0)
        x = F.normalize_images(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), "emu", dtype=np.float16)
        y = nn.device.emu.asarray(rng.integers(0, 10, 2).astype(np.int32))
        loss = F.cross_entropy(model(x, layout="NHWC"), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ran = t.by_kernel()

    def count(prefix):
        return sum(n for k, n in ran.items() if k.startswith(prefix))

    bns = {mode: sum(n for _shape, n in layers) for mode, layers in step_fp16.BATCH_NORMS.items()}
    assert bns == {"relu": 33, "add_relu": 16, "plain": 4}
    assert count("batchnorm_relu_apply_rows_") == bns["relu"]
    assert count("batchnorm_add_relu_apply_rows_") == bns["add_relu"]
    assert count("batchnorm_apply_rows_") == bns["plain"]
    # batch norm 5: the backward of 32 + 15 of them from the next convolution's partials (4 of the 15 in
    # the pair form, summing for their projection's plain batch norm too), the stem's from the max pool's,
    # the last block's add + ReLU from the average pool's, the 4 plain ones from their pair's
    after = {c.name: c.notes["step"] for c in step_fp16.cases(plan.cupy, "resnet50")}
    fused = sum(s["count"] for n, s in after.items() if "from conv partials" in n and s["when"] == "after")
    pair = sum(s["count"] for n, s in after.items() if "partials pair" in n and s["when"] == "after")
    layers = step_fp16.conv_backward_data_layers()
    assert fused - 2 - bns["plain"] == sum(n for _s, n, _k in layers) == 47 and pair == bns["plain"] == 4
    assert count("conv2d_bwd_data_wmma_async_relu_bn_f16") == 47
    assert count("maxpool2d_backward_blocks_relu_bn_") == count("global_avgpool_backward_relu_bn_") == 1
    assert count("batchnorm_backward_dx_rows_pair_") == pair
    assert count("batchnorm_relu_backward_reduce_") == 0
    assert count("batchnorm_add_relu_backward_reduce_") == 0
    assert count("batchnorm_backward_reduce_f16") + count("batchnorm_backward_reduce_f32") == 0
    assert count("batchnorm_partials_reduce") == count("batchnorm_backward_reduce_finalize") == sum(bns.values())
    cases = {c.name: c.notes["step"] for c in step_fp16.cases(np, "tiny")}   # a few shapes: the others alike
    per_step = {}
    for name, step in cases.items():
        op = name.split(" [")[0].removeprefix("step: ")
        per_step[op] = step["count"]
    assert count("maxpool2d_backward_blocks_") == per_step["maxpool2d_backward relu_bn f16"] == 1
    assert count("global_avgpool_backward_") == per_step["global_avgpool_backward relu_bn f16"] == 1
    assert count("input_normalize_tiles_f16") == per_step["input_normalize u8->f16"] == 1
    assert count("cast_f32_to_f16") == 2 and count("cast_f16_to_f32") == 1   # fc weight and bias; the logits
    assert count("momentum_update_flat_f32") == per_step["momentum_update_flat"] == 1
