"""The performance model (kernels/emu/perfmodel.py, kernels/runtime/predict.py) held to a real GPU run.

tests/data/h100-2026-12-06-kernels.json is what `python -m bench.kernels --json` measured on an
H100 80GB HBM3 on 2026-12-06 (../shared/gpu-runs/2026-12-06-h100/kernels.json: the cases at the
112x112, 56x56 and 14x14 shapes and the whole-model ones; the 28x28 and 7x7 cases were kept
back).  Every number in it was available while the model was built, so this is a check that the
model explains the run, not a blind test; what guards against fitting is that every parameter of
the model is a published figure or a measured ceiling (kernels/emu/perfmodel.py says which).

The rest checks the pieces by hand: the PTX reading, the plan of a real shape, the profiler's
per-argument and per-address counts, the model's arithmetic (waves, Little's law, the host).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kernels.emu import perfmodel

H100_RUN = Path(__file__).resolve().parent / "data" / "h100-2026-12-06-kernels.json"

# Version pairs the model orders differently from the GPU, and why (bench/NOTES.md, "Predicted
# beside measured").  The test fails when this set changes either way.
WRONG_ORDER = {}


@pytest.fixture(scope="module")
def h100_prediction():
    pytest.importorskip("kernels.runtime.nvrtc")
    from kernels.runtime import nvrtc
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is needed to read the kernels' PTX (the model's instruction counts)")
    from bench import kernels as bk
    return bk.run_profile(None, "sm_90", "H100", measured=str(H100_RUN), only_measured=True, quiet=True)


def test_the_model_explains_the_h100_run(h100_prediction):
    s = h100_prediction["summary"]
    measured = json.loads(H100_RUN.read_text())
    timed = [c for c in measured["cases"] if c.get("seconds")]
    assert s["count"] == len(timed) + 1      # every timed case, and max-pool backward v1 (a baseline there)
    assert 0.8 <= s["median"] <= 1.25, s["median"]
    assert s["within"] >= 0.75 * s["count"], (s["within"], s["count"])
    wrong = {(p["a"], p["b"]) for p in s["pairs_list"] if not p["agrees"]}
    assert wrong == set(WRONG_ORDER), wrong
    names = {(p["a"], p["b"]) for p in s["pairs_list"]}
    pairs = {tuple(n.split(" [")[0] for n in pair) for pair in names}
    assert {("sum v2", "sum v3"), ("sum v2", "sum v4"), ("sum v3", "sum v4"),
            ("maxpool2d_backward v1 scatter + atomicAdd", "maxpool2d_backward v2 gather"),
            ("input_normalize u8->f32 v2 vec4", "input_normalize u8->f32 v1 scalar")} <= pairs


def test_every_prediction_carries_its_share_of_the_copy_bandwidth(h100_prediction):
    g = perfmodel.GPUS["H100"]
    for c in h100_prediction["cases"]:
        assert "error" not in c, c
        assert c["predicted_s"] > 0 and c["limit"]
        if c["bytes"]:
            assert c["predicted_pct_copy_bw"] == pytest.approx(100 * c["bytes"] / c["predicted_s"] / g.copy_bytes_per_s)
