"""The memory-bound kernels' newer versions (elementwise 2, batch norm 4, pool 3, input 3, optimizer 3:
16-byte vectors, more work in flight) train the tiny ResNet-50 on the emulator to the same losses as
the versions before them, in float32 and float16, with LARS (whose trust ratios use the norms) and the
input normalised on the device.  Each kernel's own tests are in tests/test_kernels_<op>.py."""

import numpy as np
import pytest

import nn
from kernels.runtime import trace
from nn import functional as F

OLD = {"elementwise": 1, "batchnorm": 3, "pool": 2, "input": 2, "optimizer": 2}
NEW = {"elementwise": 2, "batchnorm": 4, "pool": 3, "input": 3, "optimizer": 3}


def train(dtype, choice, steps=3):
    """Losses of `steps` LARS steps of the tiny ResNet-50 (width 1/16, 10 classes, zero_init_residual:
    see tests/_tiny_training.py) on one batch of 8 random uint8 32x32 images normalised on the device,
    activations in `dtype`; the kernels it ran."""
    with nn.device.use_kernels(**choice), trace.collect() as t:
        model = nn.resnet50(num_classes=10, width=0.0625, seed=0, zero_init_residual=True,
                            activation_dtype=dtype).to("emu")
        opt = nn.optim.LARS(model.named_parameters(), lr=2.0, momentum=0.9, weight_decay=5e-5)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        x = F.normalize_images(images, "emu", std=(58.4, 57.1, 57.4), dtype=dtype or np.float32)
        y = nn.device.emu.asarray(rng.integers(0, 10, 8).astype(np.int32))
        losses = []
        for _ in range(steps):
            loss = F.cross_entropy(model(x, layout="NHWC"), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(nn.device.to_numpy(loss.data)))
    return np.array(losses), set(t.by_kernel())


@pytest.mark.parametrize("dtype", [None, np.float16], ids=["fp32", "fp16"])
def test_new_versions_train_to_the_same_losses(dtype):
    old, ran_old = train(dtype, OLD)
    new, ran_new = train(dtype, NEW)
    assert new[-1] < new[0] - 0.1                                     # it trains
    sfx = "f32" if dtype is None else "f16"
    vector = "f32x4" if dtype is None else "f16x8"
    want = {f"batchnorm_add_relu_backward_reduce_{vector}", f"batchnorm_relu_backward_dx_rows_{vector}",
            "batchnorm_backward_reduce_finalize", f"global_avgpool_backward_{vector}", f"input_normalize_tiles_{sfx}",
            "chunk_sum_squares_vec_f32",
            # the stem's 4 channels (width 1/16) are half a 16-byte vector of halves: one channel a thread
            f"maxpool2d_backward_blocks_{sfx}x{4 if dtype is None else 1}"}
    assert want <= ran_new, want - ran_new
    assert not want & ran_old
    assert not {k for k in ran_new if k.startswith("batchnorm_") and k.endswith(("backward_partial_" + sfx,
                                                                                  "backward_finalize"))}
    # float32: other summation orders and 1/std for /std move the last bits; float16: such a change
    # moves some activations by one float16 ulp (2^-11), as the fusion of batch norm's statistics does
    np.testing.assert_allclose(new, old, rtol=1e-5 if dtype is None else 5e-4)
