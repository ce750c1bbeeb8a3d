"""Training with chosen kernel versions: nn.device.use_kernels (kernels/versions.py) and
train.py --kernels.  The tiny model trains a few steps on the emulator with non-default versions
to the default's losses within float32 rounding; a copy of a project .cu file is swapped in (and a
changed copy changes the result); a run records its choice in config.json and the MLPerf log, and
resume keeps it (a learner's copy only when the command line names it again, unchanged)."""

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import nn
from kernels import versions
from kernels.runtime.raw import KERNEL_DIR
from tests._tiny_training import train_tiny as _train_tiny

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


@pytest.fixture(scope="module")
def default_run():
    return _train_tiny()


@pytest.mark.slow
def test_non_default_versions_train_to_the_same_losses(default_run):
    default, t_default = default_run
    assert default[-1] < default[0] - 0.3                     # it trains
    naive, t_naive = _train_tiny(conv=1, batchnorm=1, pool=2, cross_entropy=1, gemm=1)
    np.testing.assert_allclose(naive, default, rtol=1e-5)
    ran, ran_default = set(t_naive.by_kernel()), set(t_default.by_kernel())
    non_default = {"conv2d_fwd_naive_f32", "conv2d_bwd_data_naive_f32", "conv2d_bwd_weight_naive_f32",
                 "batchnorm_stats_naive_f32", "batchnorm_relu_backward_sums_naive_f32",
                 "maxpool2d_backward_gather_f32", "softmax_cross_entropy_forward_naive", "gemm_naive_f32"}
    assert non_default <= ran and not non_default & ran_default
    assert "conv2d_fwd_igemm_stats_f32" in ran_default
    assert not {"conv2d_fwd_igemm_f32", "conv2d_fwd_igemm_stats_f32"} & ran
    assert versions.in_use() == {name: f.default for name, f in versions.FAMILIES.items()}   # restored
    im2col, t_im2col = _train_tiny(conv=2)
    np.testing.assert_allclose(im2col, default, rtol=1e-5)
    assert "im2col_f32" in t_im2col.by_kernel()


@pytest.mark.slow
def test_a_copy_of_a_project_kernel_file_is_swapped_in(default_run, tmp_path):
    default, _ = default_run
    copy = tmp_path / "my_conv.cu"          # includes "common.cuh": found in kernels/
    shutil.copy(KERNEL_DIR / "conv.cu", copy)
    same, t = _train_tiny(conv=str(copy))
    np.testing.assert_array_equal(same, default)              # the same code, the same bits
    conv_files = {r["file"] for r in t.launches if "conv2d" in r["kernel"]}
    assert conv_files == {str(copy)}
    # a changed copy changes the training: version 3 multiplies |A| (batch norm would undo a mere scale)
    changed = tmp_path / "changed_conv.cu"
    text = copy.read_text().replace("acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);",
                                    "acc[i][j] = fmaf(fabsf(av[i]), bv[j], acc[i][j]);")
    assert text != copy.read_text()
    changed.write_text(text)
    wrong, _ = _train_tiny(steps=1, conv=f"{changed}:3")
    assert abs(wrong[0] - default[0]) > 1e-3 * default[0]
    naive_of_changed, _ = _train_tiny(steps=1, conv=f"{changed}:1")   # version 1 of the copy is untouched
    np.testing.assert_allclose(naive_of_changed, default[:1], rtol=1e-5)


def test_choices_training_cannot_run_are_refused(tmp_path):
    before = versions.in_use()
    lacking = tmp_path / "lacking.cu"
    lacking.write_text((KERNEL_DIR / "pool.cu").read_text().replace("maxpool2d_backward_scatter_f32",
                                                                      "maxpool2d_backward_scatter_renamed"))
    cases = [({"reduce": 1}, "nothing in training sums an array"),
             ({"gemm": 4}, "float16 matrices on tensor cores"),
             ({"optimizer": 1}, "one launch per tensor"),
             ({"conv": 9}, r"version must be one of 1\.\.\d"),
             ({"conv": str(tmp_path / "nowhere.cu")}, "no such file"),
             ({"conv": "conv.txt"}, "give a version number"),
             ({"pool": str(lacking)}, "has no extern \"C\" kernel maxpool2d_backward_scatter_f32"),
             ({"winograd": 1}, "unknown kernel family 'winograd'")]
    for choice, message in cases:
        with pytest.raises(ValueError, match=message):
            with nn.device.use_kernels(**choice):
                pass
    for spec, message in (("conv", "write FAMILY=VERSION"), ("conv=1,conv=2", "chosen twice")):
        with pytest.raises(ValueError, match=message):
            nn.device.kernel_table(spec)
    assert versions.in_use() == before
    broken = tmp_path / "broken_bn.cu"
    broken.write_text((KERNEL_DIR / "batchnorm.cu").read_text().replace("s2 += v * v;", "s2 += v * w;"))
    with pytest.raises(ValueError) as err:
        nn.device.select_kernels(f"batchnorm={broken}:1", "emu")
    # the compiler's own message, at the line of the learner's copy that is wrong
    wrong = 1 + next(i for i, text in enumerate(broken.read_text().splitlines()) if "s2 += v * w;" in text)
    assert re.search(rf"broken_bn\.cu:{wrong}:\d+: error: .*\bw\b", str(err.value)), str(err.value)
    assert re.search(rf"^ +{wrong} \| .*s2 \+= v \* w;", str(err.value), re.M), "the compiler's excerpt of the line"
    assert versions.in_use() == before


@pytest.mark.slow
def test_train_py_records_the_choice_and_resume_keeps_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLPERF_RESNET_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "my_bn.cu"
    shutil.copy(KERNEL_DIR / "batchnorm.cu", copy)
    out = tmp_path / "run"
    args = ["--device", "emu", "--synthetic", "tiny", "--workers", "0", "--no-progress", "--batch-size", "8",
            "--width", "0.0625", "--image-size", "32", "--out", str(out)]
    spec = f"conv=1,batchnorm={copy}:1"
    assert train.main(args + ["--kernels", spec, "--max-steps", "1"]) == train.EXIT_OK
    said = capsys.readouterr()
    assert f"kernels: conv version 1, batchnorm version 1 of {copy}" in said.out + said.err
    table = json.loads((out / "config.json").read_text())["kernels"]
    assert table["conv"] == {"version": 1, "f16_version": versions.FAMILIES["conv"].default_f16}
    assert table["gemm"] == {"version": 3}
    assert table["batchnorm"]["version"] == 1 and table["batchnorm"]["file"] == str(copy)
    assert len(table["batchnorm"]["sha256"]) == 64 and set(table) == set(versions.TRAINING)

    def logged(path):
        events = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in path.read_text().splitlines()
                  if ":::MLLOG" in line]
        return [e["value"] for e in events if e["key"] == "kernels"]

    assert logged(out / "mlperf.log") == [table]
    assert versions.in_use()["conv"] == 3                      # the run put the defaults back
    # resume: the saved choice, repeated flags accepted, a different one refused; a run folder is
    # data, so the learner's copy is compiled again only when the command line names it again
    assert train.main(["--resume", str(out), "--max-steps", "2", "--no-progress"]) == train.EXIT_USAGE
    assert "pass --kernels batchnorm=FILE.cu:1 with that file" in capsys.readouterr().err
    assert train.main(["--resume", str(out), "--max-steps", "2", "--no-progress", "--kernels", spec]) == train.EXIT_OK
    assert json.loads((out / "config.json").read_text())["kernels"] == table
    (resumed_log,) = out.glob("mlperf-resumed-*.log")
    assert logged(resumed_log) == [table]
    assert train.main(["--resume", str(out), "--max-steps", "3", "--no-progress", "--device", "emu",
                       "--kernels", spec]) == train.EXIT_OK
    capsys.readouterr()
    assert train.main(["--resume", str(out), "--max-steps", "4", "--device", "emu", "--kernels", "conv=2"]) == 2
    assert "--kernels" in capsys.readouterr().err
    copy.write_text(copy.read_text() + "\n// changed after the run started\n")
    assert train.main(["--resume", str(out), "--max-steps", "4", "--no-progress", "--kernels",
                       spec]) == train.EXIT_USAGE
    assert "changed since it was recorded" in capsys.readouterr().err
    # bad choices: one line, exit 2
    for extra, message in ((["--kernels", "conv=1", "--device", "cpu"], "--device emu"),
                           (["--kernels", "conv=9"], "version must be one of 1..5"),
                           (["--kernels", "conv=5"], "computes on float16, but this run's activations are float32"),
                           (["--kernels", "conv=1", "--precision", "fp16"], "choose version 4 or 5"),
                           (["--kernels", "conv=1", "--conv-engine", "cudnn", "--device", "emu"], "give one of them")):
        argv = [a for a in args if a not in ("--device", "emu")] + extra + ["--out", str(tmp_path / "other")]
        if "--device" not in extra:
            argv += ["--device", "emu"]
        assert train.main(argv) == train.EXIT_USAGE
        assert message in capsys.readouterr().err


def test_conv_keeps_one_version_per_dtype():
    # versions 1-3 compute on float32, 4-5 on float16: a choice sets the one of its dtype
    f = versions.FAMILIES["conv"]
    assert f.f16 == (4, 5) and f.default == 3 and f.default_f16 == 5
    table = nn.device.kernel_table("conv=4,batchnorm=1")
    assert table["conv"] == {"version": 3, "f16_version": 4} and table["batchnorm"] == {"version": 1}
    assert train._chosen_kernels(table) == "conv float16 version 4, batchnorm version 1"
    assert nn.device.kernel_table(table) == table                      # what resume reads back
    with nn.device.use_kernels(conv=4):
        assert versions.in_use()["conv"] == 3 and versions.in_use_f16()["conv"] == 4
        assert versions.version("conv", None, dtype=np.float16) == 4
        assert versions.version("conv", None, dtype=np.float32) == 3
    with nn.device.use_kernels(conv=1):
        assert versions.in_use()["conv"] == 1 and versions.in_use_f16()["conv"] == 5
    assert versions.in_use_f16()["conv"] == 5
    nn.device.check_kernel_precision("conv=4", "float16")
    with pytest.raises(ValueError, match="version 4 of conv computes on float16.*choose version 1 or 2 or 3"):
        nn.device.check_kernel_precision("conv=4,batchnorm=1", "float32")
