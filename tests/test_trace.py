"""The launch trace (kernels/runtime/trace.py): every launch with its kernel, geometry, arguments and time;
one summary per training step; from Python or through KERNELS_TRACE."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import kernels
from kernels import ops, trace

ROOT = Path(__file__).resolve().parent.parent


def test_collect_records_every_launch_with_what_it_was_given():
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    before = kernels.launch_count()
    with trace.collect() as t:
        y = ops.relu_forward(x)
        ops.relu_backward(np.ones_like(x), y)
        ops.relu_forward(x)
        trace.mark_step()
    assert not trace.enabled()
    assert len(t.launches) == kernels.launch_count() - before == 3
    first = t.launches[0]
    assert first["kernel"].startswith("relu_forward") and first["file"] == "kernels/elementwise.cu"
    assert first["args"][0] == "float32[1000]" and first["backend"] == "emu" and first["ms"] > 0
    assert first["block"][0] >= 32 and first["grid"][0] >= 1
    assert sum(t.by_kernel().values()) == 3 and t.by_kernel()[first["kernel"]] == 2
    assert t.steps == [t.by_kernel()]


def test_nested_traces_see_the_same_launches():
    x = np.ones(10, np.float32)
    with trace.collect() as outer:
        ops.relu_forward(x)
        with trace.collect() as inner:
            ops.relu_forward(x)
        ops.relu_forward(x)
    assert len(outer.launches) == 3 and len(inner.launches) == 1


def test_kernels_trace_environment_prints_launches_and_step_summaries(tmp_path):
    out = tmp_path / "trace.jsonl"
    code = ("import numpy as np, nn\n"
            "from nn import functional as F\n"
            "m = nn.resnet18(num_classes=3, width=1/16, seed=0).to('emu')\n"
            "opt = nn.optim.SGD(m.named_parameters(), lr=0.1)\n"
            "x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)\n"
            "for _ in range(2):\n"
            "    loss = F.cross_entropy(m(x), np.array([0, 2]))\n"
            "    opt.zero_grad(); loss.backward(); opt.step(); nn.emu.mark_step()\n")
    for value, check in (("1", "stderr"), (str(out), "file")):
        env = dict(os.environ, KERNELS_TRACE=value, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        if check == "stderr":
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[trace]")]
            steps = [ln for ln in lines if " step " in ln]
            # (training: each convolution also gives the batch norm after it its statistics)
            assert len(steps) == 2 and "conv2d_fwd_igemm_stats_f32 x" in steps[0]
            n = int(steps[0].split(": ")[1].split(" launches")[0])
            assert n == len(lines) // 2 - 1 and "kernels/conv.cu:conv2d_fwd_igemm_stats_f32 grid=" in proc.stderr
        else:
            records = [json.loads(ln) for ln in out.read_text().splitlines()]
            steps = [r for r in records if "step" in r]
            launches = [r["launch"] for r in records if "launch" in r]
            assert [s["step"] for s in steps] == [1, 2] and sum(s["launches"] for s in steps) == len(launches)
            assert steps[0]["kernels"] == steps[1]["kernels"]     # the same kernels every step
