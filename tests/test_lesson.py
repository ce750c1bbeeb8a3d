"""`python -m kernels.<op>`: every op's command checks every version against the reference on the
emulator at its smallest (default) shape, and versions are numbered 1..N the same way in the
kernel file's header, the launchers, the command and bench/."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels import cases, lesson, versions
from kernels.runtime.raw import KERNEL_DIR

REPO = Path(__file__).resolve().parents[1]
FAMILIES = list(versions.FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_command_checks_every_version_on_the_emulator(family):
    proc = subprocess.run([sys.executable, "-m", f"kernels.{family}", "--emulator", "--repeat", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "CPU emulator" in out and "not a GPU's" in out          # emulator times are not GPU times
    listed = [int(n) for n in re.findall(r"^  version (\d+)  ", out, re.M)]
    assert listed == list(versions.numbers(family))
    case = cases.make(family, np)
    for n in listed:
        for op in case.ops(n):
            assert re.search(rf"^    {re.escape(op)} +ok +error", out, re.M), (n, op)
    assert "FAIL" not in out and "ERROR" not in out
    assert out.rstrip().endswith("all versions match the reference")


def test_every_header_lists_its_versions_as_the_registry_numbers_them():
    for family, f in versions.FAMILIES.items():
        summaries = versions.describe(family)
        assert list(summaries) == list(versions.numbers(family)), family
        assert all(len(text) > 20 and not text.endswith(",") for text in summaries.values()), summaries
        assert f.default in summaries and set(f.training) <= set(summaries)
        assert f.not_in_training or set(f.training) == set(summaries), family
    for path in KERNEL_DIR.glob("*.cu"):      # kernels outside the families list theirs the same way
        assert re.search(r"^ \*   version 1  \S", path.read_text(), re.M), path.name


def test_launchers_take_the_same_numbers_and_refuse_others():
    from kernels import conv, gemm, reduce
    x = np.ones((1, 3, 3, 2), np.float32)
    w = np.ones((2, 2, 1, 1), np.float32)
    for n in versions.numbers("conv"):
        half = n in conv.F16_VERSIONS        # the tensor-core versions take float16
        y = conv.conv2d_forward(x.astype(np.float16) if half else x, w.astype(np.float16) if half else w, 1, 0,
                                version=n)
        np.testing.assert_array_equal(y, np.full((1, 3, 3, 2), 2.0))
    with pytest.raises(ValueError, match=r"version must be one of 1, 2, 3, 4.* \(python -m kernels.conv --list\)"):
        conv.conv2d_forward(x, w, 1, 0, version="naive")
    with pytest.raises(TypeError, match=r"version 4 of conv computes on float16.*float32 runs version 1 or 2 or 3"):
        conv.conv2d_forward(x, w, 1, 0, version=4)
    with pytest.raises(ValueError, match="version must be one of 1, 2, 3, 4"):
        reduce.sum(np.ones(4, np.float32), version=5)
    with pytest.raises(ValueError, match="gemm_f16"):
        gemm.gemm(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), version=4)


def test_one_version_a_changed_shape_and_the_list(capsys):
    assert lesson.main("pool", ["--emulator", "--version", "1", "--shape", "C=3,kernel=2,padding=0",
                                "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "N=2 H=9 W=9 C=3 kernel=2 stride=2 padding=0" in out
    assert re.findall(r"^  version (\d)", out, re.M) == ["1"]
    assert "the same in every version" in out and "maxpool2d_forward" in out
    assert lesson.main("gemm", ["--list"]) == 0
    out = capsys.readouterr().out
    assert "version 4  gemm_wmma_f16: tensor cores" in out and "not used by training" in out
    assert "shape: M,N,K,trans_a,trans_b" in out
    for argv, message in ((["--version", "9"], "invalid choice"), (["--shape", "1,2,3"], "give 2 numbers"),
                          (["--shape", "Q=3"], "no shape parameter 'Q'"), (["--repeat", "0"], ">= 1")):
        with pytest.raises(SystemExit) as info:
            lesson.main("cross_entropy", argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_a_wrong_copy_of_a_kernel_fails_its_check(tmp_path, capsys):
    # a learner's copy of reduce.cu whose version 2 forgets the last element of every block's slice
    src = (KERNEL_DIR / "reduce.cu").read_text()
    broken = src.replace("buf[threadIdx.x] = thread_partial_sum(x, n);", "buf[threadIdx.x] = thread_partial_sum(x, n - 1);")
    assert broken != src
    copy = tmp_path / "my_reduce.cu"
    copy.write_text(broken)
    assert lesson.main("reduce", ["--emulator", "--source", str(copy), "--repeat", "1"]) == 1
    out = capsys.readouterr().out
    assert f"from your copy {copy}" in out
    assert re.search(r"version 2 .*\n    sum +FAIL", out) and re.search(r"version 3 .*\n    sum +ok", out)
    assert out.rstrip().endswith("FAILED: a version does not match the reference")
    (tmp_path / "other.cu").write_text('extern "C" __global__ void k(float* x) {}\n')
    with pytest.raises(SystemExit):
        lesson.main("reduce", ["--source", str(tmp_path / "other.cu")])
    assert "cannot replace kernels/reduce.cu: it has no extern \"C\" kernel sum_atomic" in capsys.readouterr().err


def test_a_nan_or_a_wrong_shape_never_passes():
    want = [np.array([1.0, 2.0])]
    assert cases.max_rel_error([np.array([1.0, 2.0 + 2e-6])], want) == pytest.approx(1e-6)
    assert cases.max_rel_error([np.array([np.nan, 2.0])], want) == float("inf")    # garbage left in memory
    assert cases.max_rel_error([np.array([1.0, 2.0, 3.0])], want) == float("inf")
    assert cases.max_rel_error([np.zeros(0)], [np.zeros(0)]) == 0.0


@pytest.mark.gpu
def test_the_command_on_the_gpu_checks_and_times_with_events(capsys):
    """The GPU side of `python -m kernels.<op>`: CuPy arrays, the device's name, CUDA-event timing."""
    assert lesson.main("pool", ["--shape", "N=2,H=9,W=9,C=8", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "on the GPU (" in out and "CUDA events" in out and "all versions match the reference" in out
