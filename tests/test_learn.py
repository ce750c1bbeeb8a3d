"""The checks of LEARN.md's exercises, one test per exercise, all on the CPU emulator.

A learner solves an exercise in a scratch copy of a kernel file and runs its check on the copy:

    LEARN_SCRATCH=scratch python -m pytest tests/test_learn.py -k exercise_4

Without LEARN_SCRATCH (or without the file in it) a check runs the project's own file, the
reference solution: that is how CI runs every check, once.
"""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nn
from kernels import batchnorm as bn
from kernels import lesson, optimizer, reference, versions
from nn import functional as F
from tests._tiny_training import train_tiny

ROOT = Path(__file__).resolve().parents[1]


def scratch(name):
    """The learner's copy LEARN_SCRATCH/<name> if there is one, else None (the project's file)."""
    folder = os.environ.get("LEARN_SCRATCH")
    if folder and (Path(folder) / name).is_file():
        return str((Path(folder) / name).resolve())
    return None


def choice(family, name, version):
    """What nn.device.use_kernels takes to run `version` of the copy (or of the project's file)."""
    source = scratch(name)
    return {family: f"{source}:{version}" if source else version}


def check_versions(family, name, version, shapes=(None,)):
    """`python -m kernels.<family> --emulator --source <copy> --version N`, at each shape."""
    for shape in shapes:
        out = io.StringIO()
        ok = lesson.run(family, version, shape, repeat=1, emulator=True, source=scratch(name), out=out)
        assert ok, out.getvalue()


def test_exercise_1_add_relu():
    """A first kernel: add_relu_forward (elementwise.cu), float and half."""
    check_versions("elementwise", "elementwise.cu", 1, [None, (1,), (1000,)])


def test_exercise_2_block_reduction():
    """Reductions: sum_block_warp's block reduction written with warp shuffles (reduce.cu, version 3)."""
    check_versions("reduce", "reduce.cu", 3, [None, (1,), (33,), (257,)])


def test_exercise_3_tiled_gemm():
    """GEMM: the loop of gemm_tiled_f32 (gemm.cu, version 2), every transpose, ragged edges."""
    check_versions("gemm", "gemm.cu", 2, [None, (33, 17, 65, 1, 1), (1, 1, 1, 0, 1), (16, 32, 48, 1, 0)])


def test_exercise_4_convolution_backward_data():
    """Convolution: conv2d_bwd_data_naive_f32 (conv.cu, version 1), where stride and padding meet."""
    check_versions("conv", "conv.cu", 1, [None, (2, 9, 9, 5, 7, 3, 2, 2), (1, 7, 7, 3, 4, 7, 2, 3),
                                          (2, 5, 6, 4, 3, 1, 2, 0), (1, 3, 4, 2, 2, 3, 3, 4)])
    losses, t = train_tiny(**choice("conv", "conv.cu", 1))          # and it trains as the default does
    np.testing.assert_allclose(losses, train_tiny()[0], rtol=1e-5)
    assert "conv2d_bwd_data_naive_f32" in t.by_kernel()


def test_exercise_5_chan_merge():
    """Batch norm numerics: welford_merge, Chan's formula (batchnorm.cu, version 2), accurate where
    E[x^2] - E[x]^2 is noise: mean 1000, std 0.1."""
    check_versions("batchnorm", "batchnorm.cu", 2, [None, (3, 1, 1, 64), (37, 1, 1, 3)])
    rng = np.random.default_rng(4)
    x = (1000.0 + 0.1 * rng.standard_normal((4096, 3))).astype(np.float32)
    want = x.astype(np.float64).var(axis=0)
    with nn.device.use_kernels(**choice("batchnorm", "batchnorm.cu", 2)):
        _, var = bn.batchnorm_batch_stats(x)
    assert np.max(np.abs(var - want) / want) < 1e-4


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (4, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_exercise_6_max_pool_backward_through_autograd(k, s, p):
    """Autograd: the kernel behind F.max_pool2d's backward, maxpool_backward_gather (pool.cu,
    version 2), against central finite differences of the forward."""
    rng = np.random.default_rng(k * 10 + s)
    x = (rng.permutation(2 * 7 * 7 * 3).reshape(2, 3, 7, 7) / 50.0).astype(np.float32)   # distinct values
    R = rng.standard_normal(F.max_pool2d(nn.Tensor(x), k, s, p).shape)
    with nn.device.use_kernels(**choice("pool", "pool.cu", 2)):
        xt = nn.Tensor(x, requires_grad=True, device="emu")
        F.max_pool2d(xt, k, s, p).backward(nn.device.emu.asarray(R.astype(np.float32)))
        grad = nn.device.to_numpy(xt.grad).astype(np.float64)
    h, numeric, x64 = 1e-3, np.zeros(x.shape), x.astype(np.float64)
    for i in np.ndindex(x.shape):                 # the values are 1/50 apart: +-h never reorders them
        for sign in (1, -1):
            xp = x64.copy()
            xp[i] += sign * h
            numeric[i] += sign * np.sum(F.max_pool2d(nn.Tensor(xp), k, s, p).data * R) / (2 * h)
    np.testing.assert_allclose(grad, numeric, atol=1e-6)


def test_exercise_7_sgd_step():
    """The training step: sgd_step (optimizer.cu), Nesterov included, then three training steps."""
    check_versions("optimizer", "optimizer.cu", None)
    rng = np.random.default_rng(7)
    with nn.device.use_kernels(**choice("optimizer", "optimizer.cu", 2)):
        for nesterov in (False, True):
            w, g, v = (rng.standard_normal(1000).astype(np.float32) for _ in range(3))
            w64, v64 = w.astype(np.float64), v.astype(np.float64)
            optimizer.sgd_momentum_update(w, g, v, 0.1, 0.9, 1e-4, nesterov)
            reference.sgd_momentum_update(w64, g.astype(np.float64), v64, 0.1, 0.9, 1e-4, nesterov)
            np.testing.assert_allclose(w, w64, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(v, v64, rtol=1e-6, atol=1e-7)
    losses, _ = train_tiny(**choice("optimizer", "optimizer.cu", 2))
    np.testing.assert_allclose(losses, train_tiny()[0], rtol=1e-5)


def test_exercise_8_input_tail():
    """The loader's last step, on the device: the pixels version 2 of input.cu leaves to its tail."""
    check_versions("input", "input.cu", 2, [None, (1, 3, 5), (1, 1, 3), (3, 5, 7)])


@pytest.mark.slow
def test_exercise_9_an_mlperf_run_with_your_kernels(tmp_path, monkeypatch):
    """One full MLPerf run, run_and_time.sh, on the emulator with the kernels of exercises 4 and 5."""
    sys.path.insert(0, str(ROOT))
    import train
    monkeypatch.setenv("MLPERF_RESNET_CACHE", str(tmp_path / "cache"))
    data = train.prepare_synthetic("tiny", progress=False)
    conv, norm = scratch("conv.cu"), scratch("batchnorm.cu")
    spec = f"conv={conv + ':1' if conv else 1},batchnorm={norm + ':2' if norm else 2}"
    args = (f"--device emu --kernels {spec} --workers 0 --no-progress --batch-size 16 --width 0.0625 "
            f"--image-size 32 --epochs 2 --target-accuracy 0.05")
    env = {k: v for k, v in os.environ.items() if k not in ("SEED", "TRAIN_ARGS", "RUN_DIR", "DATA_DIR")}
    env.update(PYTHON=sys.executable, DATA_DIR=str(data), RUN_DIR=str(tmp_path / "run"), TRAIN_ARGS=args)
    proc = subprocess.run(["bash", str(ROOT / "run_and_time.sh"), "1"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].startswith("RESULT,IMAGE_CLASSIFICATION,1,")
    log = tmp_path / "run" / "mlperf.log"
    checker = subprocess.run([sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training",
                              "--ruleset", "1.0.0", "--log_output", str(tmp_path / "checker.log"), str(log)],
                             capture_output=True, text=True, timeout=120)
    assert checker.returncode == 0 and "SUCCESS" in checker.stdout + checker.stderr
    assert '"key": "kernels"' in log.read_text() and '"conv": {"version": 1' in log.read_text()
    for copy in (scratch("conv.cu"), scratch("batchnorm.cu")):
        if copy:
            assert copy in log.read_text()


def test_a_check_shows_the_compilers_message_for_the_copy(tmp_path, monkeypatch):
    """An exercise check on a copy that does not compile fails with the compiler's message:
    the copy's file:line:col, the compiler's text and the line of source it means."""
    src = (ROOT / "kernels" / "conv.cu").read_text()
    at = src.index("float acc = 0.0f;", src.index("void conv2d_bwd_data_naive_f32("))
    line = src.count("\n", 0, at) + 1
    (tmp_path / "conv.cu").write_text(src[:at] + "float acc = 0.0f +;" + src[at + len("float acc = 0.0f;"):])
    monkeypatch.setenv("LEARN_SCRATCH", str(tmp_path))
    with pytest.raises(AssertionError) as info:
        check_versions("conv", "conv.cu", 1)
    shown = str(info.value)
    copy = str((tmp_path / "conv.cu").resolve())
    assert re.search(rf"{re.escape(copy)}:{line}:\d+: error: \S", shown), shown
    assert re.search(rf"^ +{line} \| +float acc = 0\.0f \+;", shown, re.M), shown


# Each exercise is well posed: with the function LEARN.md names emptied (what the learner starts
# from), its check fails; LEARN.md names it.  (exercise, family, file, version, where the body starts)
EMPTIED = [
    (1, "elementwise", "elementwise.cu", 1, "__device__ void add_relu_forward("),
    (2, "reduce", "reduce.cu", 3, 'extern "C" __global__ void sum_block_warp('),
    (3, "gemm", "gemm.cu", 2, "    for (int k0 = 0; k0 < K; k0 += TILE)"),
    (4, "conv", "conv.cu", 1, 'extern "C" __global__ void conv2d_bwd_data_naive_f32('),
    (5, "batchnorm", "batchnorm.cu", 2, "__device__ __forceinline__ void welford_merge("),
    (6, "pool", "pool.cu", 2, "__device__ void maxpool_backward_gather("),
    (7, "optimizer", "optimizer.cu", 2, "__device__ __forceinline__ void sgd_step("),
    (8, "input", "input.cu", 2, "    if (blockIdx.x == 0)\n        for (long long i = tail_start"),
]


def _emptied(text, start):
    """`text` with the block that follows `start` (a function's or a loop's body, or for the input
    tail the statement itself) replaced by an empty one."""
    i = text.index(start)
    if not start.rstrip().endswith(("(", ")")):       # a statement without braces: up to its ';'
        return text[:i] + "    /* your code */" + text[text.index(";", i) + 1:]
    j = text.index("{", i)
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[:j] + "{ /* your code */ }" + text[k + 1:]
    raise AssertionError(f"no end of the block after {start!r}")


@pytest.mark.slow
# (ids "step_N", never "exercise_N": `-k exercise_N` selects the check of exercise N alone)
@pytest.mark.parametrize("number,family,name,version,start", EMPTIED, ids=[f"step_{e[0]}" for e in EMPTIED])
def test_each_check_fails_with_its_function_emptied(tmp_path, number, family, name, version, start):
    from kernels.runtime.raw import KERNEL_DIR
    text = (KERNEL_DIR / name).read_text()
    copy = tmp_path / name
    copy.write_text(_emptied(text, start))
    shape = {"input": (1, 3, 5)}.get(family)       # a tail to compute
    assert not lesson.run(family, version, shape, repeat=1, emulator=True, source=str(copy), out=io.StringIO())
    learn = (ROOT / "LEARN.md").read_text()
    section = learn.split(f"**Exercise {number}:", 1)[1].split("**Exercise", 1)[0]
    named = start.split("(")[0].split()[-1] if "(" in start and "for" not in start else None
    assert f"exercise_{number}" in section and (named is None or f"`{named}`" in section), named


def test_k_exercise_n_selects_that_check_alone():
    """LEARN.md's `-k exercise_N` runs exercise N's check and nothing else (pytest's -k matches a
    substring of any test's name or parameter id, case-insensitively)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(Path(__file__).relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(ids) > 9, proc.stdout + proc.stderr
    for n in range(1, 10):
        chosen = {i.split("::")[1].split("[")[0] for i in ids if f"exercise_{n}" in i.lower()}
        assert len(chosen) == 1 and chosen.pop().startswith(f"test_exercise_{n}_"), (n, ids)
