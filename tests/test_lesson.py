"""`python -m kernels.<op>`: every op's command checks every version against the reference on the
emulator at its smallest (default) shape, and versions are numbered 1..N the same way in the
kernel file's header, the launchers, the command and bench/."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kernels
from kernels import cases, lesson, versions
from kernels.emu.errors import MAX_ERRORS
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
    # then the performance model's time of every version at ResNet-50's shape on an H100
    assert "predicted on an H100" in out and "no prediction" not in out
    predicted = {int(n) for n in re.findall(r"^    version (\d+) +.* limited by ", out, re.M)}
    assert predicted == set(listed)


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


# ---- a compile error of a learner's copy: the compiler's whole message ----------------------------

def _conv_copy(folder, old, new, name="my_conv.cu"):
    """A copy of conv.cu with `old` (in conv2d_fwd_naive_f32) replaced by `new`; returns (path, line)."""
    src = (KERNEL_DIR / "conv.cu").read_text()
    start = src.index("void conv2d_fwd_naive_f32(")
    at = src.index(old, start)
    copy = folder / name
    copy.write_text(src[:at] + new + src[at + len(old):])
    return copy, src.count("\n", 0, at) + 1


def test_a_syntax_error_shows_the_copy_line_and_the_compilers_message(tmp_path):
    copy, line = _conv_copy(tmp_path, "float acc = 0.0f;", "float acc = 0.0f +;")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "kernels.conv", "--emulator", "--source", copy.name, "--version", "1",
                           "--repeat", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    # file:line:col as the learner typed the path, the compiler's words, the line of source it means
    assert re.search(rf"^ +my_conv\.cu:{line}:\d+: error: \S", out, re.M), out
    assert re.search(rf"^ +{line} \| +float acc = 0\.0f \+;", out, re.M), out
    assert f"{tmp_path}/my_conv.cu:" not in out          # not the resolved path, nor a cache file
    assert "In file included from" not in out and "<command-line>" not in out
    # once: the other ops of the version fail to compile the same way and say so
    others = len(cases.CASES["conv"].OPS) - 1
    assert out.count(f"my_conv.cu:{line}:") >= 1 and out.count("the same compile error as above") == others


def test_a_compile_error_leaves_out_the_emulators_machinery(tmp_path):
    # a shuffle with one argument too few: g++ reports it in the emulator's header that maps
    # __shfl_down_sync onto C++, through its macros, with a note at the learner's line
    copy, line = _conv_copy(tmp_path, "y[i] = acc;", "y[i] = __shfl_down_sync(0xffffffffu, acc);")
    out = io.StringIO()
    assert not lesson.run("conv", 1, None, repeat=1, emulator=True, source=str(copy), out=out)
    shown = out.getvalue()
    assert re.search(rf"{re.escape(str(copy))}:{line}:\d+: note: in expansion of macro .__shfl_down_sync", shown)
    assert "error: no matching function" in shown and "candidate expects" in shown
    assert "In file included from" not in shown and "in definition of macro" not in shown
    assert "/kernels/emu/include/" not in shown          # the emulator's headers by their short name
    with pytest.raises(kernels.CompileError) as info:
        kernels.load_module(str(copy)).compile("emu")
    assert "In file included from <command-line>" in info.value.log    # .log keeps every line
    assert "In file included from" not in str(info.value)


def test_a_cascade_of_errors_shows_the_first_ones(tmp_path):
    # a missing closing brace: every later definition is an error, and so are the emulator's
    # entry points appended after the file
    copy, line = _conv_copy(tmp_path, "        y[i] = acc;\n    }\n}\n", "        y[i] = acc;\n    }\n")
    out = io.StringIO()
    assert not lesson.run("conv", 1, None, repeat=1, emulator=True, source=str(copy), out=out)
    shown = out.getvalue()
    located = re.findall(rf"{re.escape(str(copy))}:\d+:\d+: error:", shown)
    assert 1 <= len(located) <= MAX_ERRORS
    assert re.search(r"\(and \d+ more errors, not shown: the first is usually the cause\)", shown)
    assert "emu_entry.h" not in shown and "<emulator entry points>" not in shown


def test_a_log_in_another_format_is_shown_as_the_compiler_wrote_it():
    from kernels.emu.errors import trim_log
    nvrtc_log = ('In file included from my_conv.cu(3):\ncommon.cuh(10): warning: x\n'
                 'my_conv.cu(212): error: expected a ";"\n\n1 error detected in the compilation of "my_conv.cu".\n')
    assert trim_log(nvrtc_log) == nvrtc_log.strip()
    assert trim_log("") == "" and trim_log(None) == ""
