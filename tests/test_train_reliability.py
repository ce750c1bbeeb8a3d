"""train.py when things go wrong: no false success, nothing lost.

A diverging run must never report the target reached (NaN logits used to rank every label
first) nor overwrite a finite checkpoint with NaN/inf; a run folder belongs to one run; SIGTERM
is handled like Ctrl-C; --resume survives a damaged checkpoint, a moved run folder and a moved
dataset; destinations that cannot be written give one line and exit 2. A run folder or
checkpoint from elsewhere is data: nothing it names is compiled, and its arrays are checked
against the model before they are read (a decompression bomb stays unread). fp16 that never
trains is divergence; a kernel that breaks during training, or a failed setup, ends in one line.
On the CPU (the emulator where a kernel must run), on the tiny synthetic dataset."""

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import nn  # noqa: E402
import train  # noqa: E402

TINY = ["--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "8", "--width", "0.0625",
        "--image-size", "32", "--warmup-epochs", "1"]
STEPS_PER_EPOCH = 96 // 8


def main(*args):
    return train.main([str(a) for a in args])


def start(args, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                            env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def mlperf_events(run_dir, name="mlperf.log"):
    lines = (Path(run_dir) / name).read_text().splitlines()
    return [json.loads(x.split(":::MLLOG ", 1)[1]) for x in lines if ":::MLLOG" in x]


def all_finite(path):
    with np.load(path) as f:
        return all(np.isfinite(f[k]).all() for k in f.files
                   if k.startswith(("model/", "optim/")) and np.issubdtype(f[k].dtype, np.floating))


def state(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k.startswith(("model/", "optim/"))}


@pytest.fixture(scope="module")
def two_epochs(tiny_data, tmp_path_factory):
    """A finished two-epoch run: checkpoints, metrics, mlperf.log to start other cases from."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main("--data", tiny_data, *TINY, "--epochs", 2, "--target-accuracy", 1.0, "--out", out) == 1
    return out


# ----------------------------------------------------------------------------- divergence
def test_nan_logits_in_evaluation_stop_the_run_instead_of_reaching_the_target(tiny_data, tmp_path, monkeypatch,
                                                                                capsys):
    # A model whose evaluation logits are NaN, with a target any real evaluation would reach:
    # before, every NaN row counted as correct (top-1 1.0, "success"); now the run is diverged.
    real = nn.metrics.topk_counts

    def nan_logits(logits, labels, ks):
        return real(logits.data * np.float32(np.nan), labels, ks)

    monkeypatch.setattr(nn.metrics, "topk_counts", nan_logits)
    out = tmp_path / "run"
    assert main("--data", tiny_data, *TINY, "--epochs", 2, "--target-accuracy", 0.01, "--out", out) == 3
    msg = capsys.readouterr()
    text = msg.out + msg.err
    assert "NaN/inf logits for 32 of 32 validation images" in text
    assert "no checkpoint was written" in text and "--lr" in text
    events = mlperf_events(out)
    assert not [e for e in events if e["key"] == "eval_accuracy"]
    assert events[-1]["key"] == "run_stop" and events[-1]["metadata"]["status"] == "aborted"
    assert not (out / "checkpoint_last.npz").exists() and not (out / "checkpoint_best.npz").exists()


def test_the_evaluation_counts_nan_rows_as_wrong(tiny_data):
    model = nn.resnet50(num_classes=4, width=1 / 16, seed=0)
    model.fc.weight.data[0, 0] = np.nan   # logits of every image hold a NaN
    device = nn.get_device("cpu")
    import data.loader
    with data.loader.Loader(Path(tiny_data) / "val.lmdb", 16, train=False, image_size=32, workers=0) as loader:
        c1, c5, bad, total = train.evaluate(model, loader, device, np.float32, True, with_nonfinite=True)
    assert (c1, c5, bad, total) == (0, 0, 32, 32)


def test_nan_weights_are_never_checkpointed_and_the_message_says_where_to_resume(tiny_data, tmp_path, monkeypatch,
                                                                                  capsys):
    # NaN reaches a weight in the last step of epoch 2 (after that step's loss was computed, so no
    # loss check sees it) and no evaluation is due: the end-of-epoch checkpoint must refuse it.
    real_step = nn.optim.SGD.step

    def step(self):
        real_step(self)
        if self.step_count == 2 * STEPS_PER_EPOCH:
            self.params[3].data[...] = np.nan

    monkeypatch.setattr(nn.optim.SGD, "step", step)
    out = tmp_path / "run"
    assert main("--data", tiny_data, *TINY, "--epochs", 3, "--eval-every", 100, "--lr", 0.5, "--out", out) == 3
    text = capsys.readouterr().out
    assert "the weights hold NaN/inf at epoch 2" in text
    assert f"{out / 'checkpoint_last.npz'} holds the last finite weights (epoch 1 done, step 12)" in text
    assert f"python train.py --resume {out} --lr 0.05" in text
    with np.load(out / "checkpoint_last.npz") as f:
        assert int(f["extra/epoch"]) == 1
    assert all_finite(out / "checkpoint_last.npz")
    # what the message advises works: continue from the finite checkpoint with a lower --lr
    monkeypatch.setattr(nn.optim.SGD, "step", real_step)
    assert main("--resume", out, "--lr", 0.05) == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["base_lr"] == 0.05 and cfg["epochs"] == 3
    with np.load(out / "checkpoint_last.npz") as f:
        assert int(f["extra/epoch"]) == 3


def test_checkpoint_save_refuses_nonfinite_state_and_keeps_the_old_file(tmp_path):
    model = nn.resnet50(num_classes=3, width=1 / 16, seed=0)
    opt = nn.optim.SGD(model.named_parameters(), lr=0.1)
    path = tmp_path / "c.npz"
    nn.checkpoint.save(str(path), model, opt, require_finite=True, step=1)
    before = path.read_bytes()
    model.bn1.running_var[:] = np.inf
    with pytest.raises(nn.checkpoint.NonFiniteError, match="bn1.running_var"):
        nn.checkpoint.save(str(path), model, opt, require_finite=True, step=2)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c.npz"]


# ----------------------------------------------------------------------------- run folders
def test_resume_writes_into_the_folder_given_wherever_it_was_copied(tiny_data, tmp_path):
    a = tmp_path / "a"
    assert main("--data", tiny_data, *TINY, "--epochs", 2, "--max-steps", 5, "--out", a) == 0
    b = tmp_path / "moved" / "b"
    shutil.copytree(a, b)
    snapshot = {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()}
    assert main("--resume", b) == 1
    assert {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()} == snapshot   # the original untouched
    with np.load(b / "checkpoint_last.npz") as f:
        assert int(f["extra/epoch"]) == 2
    assert json.loads((b / "config.json").read_text())["out"] == str(b)
    assert len((b / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_second_run_on_a_busy_folder_is_refused(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = train.RunFolder(out)
    holder.claim(new_run=True)
    try:
        assert main("--data", tiny_data, *TINY, "--epochs", 1, "--out", out) == 2
        err = capsys.readouterr().err
        assert "is in use by another train.py" in err and f"pid {os.getpid()}" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        holder.release()
    assert not (out / "mlperf.log").exists()


def test_the_lock_of_a_killed_process_is_not_stale(tiny_data, tmp_path):
    out = tmp_path / "run"
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); import train; "
            "train.RunFolder(sys.argv[2]).claim(new_run=True); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(out)], timeout=60)
    assert proc.returncode == -signal.SIGKILL and (out / ".lock").exists()
    assert main("--data", tiny_data, *TINY, "--epochs", 1, "--target-accuracy", 0.01, "--out", out) in (0, 1)
    assert (out / "checkpoint_last.npz").exists()


def test_two_runs_started_together_on_one_folder_one_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = ["--data", tiny_data, *TINY, "--epochs", 2, "--target-accuracy", 1.0, "--out", out]
    procs = [start(args), start(args)]
    results = [p.communicate(timeout=180) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [1, 2], [r[1][-1500:] for r in results]
    refused = next(r for p, r in zip(procs, results) if p.returncode == 2)
    assert "in use by another train.py" in refused[1] or "already holds a run" in refused[1]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert [e["key"] for e in mlperf_events(out)].count("run_start") == 1


def test_out_holding_another_runs_files_needs_overwrite(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mlperf.log").write_text("someone else's log\n")
    (out / "notes.txt").write_text("mine\n")
    assert main("--data", tiny_data, *TINY, "--epochs", 1, "--out", out) == 2
    err = capsys.readouterr().err
    assert "holds files a run would overwrite (mlperf.log)" in err and "--overwrite" in err
    assert (out / "mlperf.log").read_text() == "someone else's log\n"
    assert main("--data", tiny_data, *TINY, "--epochs", 1, "--target-accuracy", 0.01, "--out", out,
                "--overwrite") in (0, 1)
    assert ":::MLLOG" in (out / "mlperf.log").read_text() and (out / "notes.txt").read_text() == "mine\n"


def test_a_finished_run_is_replaced_only_with_overwrite(two_epochs, tiny_data, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(two_epochs, out)
    assert main("--data", tiny_data, *TINY, "--epochs", 1, "--out", out) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main("--data", tiny_data, *TINY, "--epochs", 1, "--target-accuracy", 1.0, "--out", out,
                "--overwrite") == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not list(out.glob("mlperf-resumed-*.log"))


# ----------------------------------------------------------------------------- signals
def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_data, two_epochs, tmp_path):
    out = tmp_path / "run"
    proc = start(["--data", tiny_data, *TINY, "--epochs", 2, "--target-accuracy", 1.0, "--out", out])
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 1:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143, stderr[-2000:]
    assert "sigterm: checkpoint saved to" in stdout and "--resume" in stdout
    assert main("--resume", out) == 1
    for k, v in state(two_epochs / "checkpoint_last.npz").items():
        np.testing.assert_array_equal(v, state(out / "checkpoint_last.npz")[k], err_msg=k)


def test_sigterm_before_training_exits_143_with_a_line(tmp_path):
    # The synthetic dataset is being generated when the signal arrives (a fresh cache).
    proc = start(["--synthetic", "tiny", *TINY, "--out", tmp_path / "run"],
                 env={"MLPERF_RESNET_CACHE": str(tmp_path / "cache")})
    assert proc.stdout.readline().startswith("preparing the synthetic dataset")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM) before training started" in stdout
    assert "Traceback" not in stderr


# ----------------------------------------------------------------------------- resume
def test_a_truncated_last_checkpoint_falls_back_to_the_best_one(two_epochs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    last = out / "checkpoint_last.npz"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with np.load(out / "checkpoint_best.npz") as f:
        best_epoch = int(f["extra/epoch"])
    assert main("--resume", out, "--epochs", 3) == 1
    text = capsys.readouterr().out
    assert "checkpoint_last.npz is truncated or damaged" in text
    assert f"resuming from checkpoint_best.npz instead (epoch {best_epoch}" in text
    with np.load(last) as f:
        assert int(f["extra/epoch"]) == 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_damaged_checkpoints_give_one_line_and_exit_2(two_epochs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    rng = np.random.default_rng(0)
    for name in ("checkpoint_last.npz", "checkpoint_best.npz"):
        (out / name).write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert main("--resume", out) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no intact checkpoint" in err
    assert "allow_pickle" not in err and "not a checkpoint" in err


def test_resume_accepts_the_runs_own_flags_and_the_dataset_at_a_new_place(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data", tiny_data, *TINY, "--epochs", 2, "--target-accuracy", 1.0, "--out", out]
    assert main(*args, "--max-steps", 3) == 0
    moved = tmp_path / "moved-data"
    shutil.copytree(tiny_data, moved)
    args[1] = moved
    assert main("--resume", out, *args, "--max-steps", 6) == 0        # the same flags repeated: fine
    assert json.loads((out / "config.json").read_text())["data"] == str(moved)
    assert main("--resume", out, "--batch-size", 16) == 2             # a changed flag is refused
    assert "cannot change: --batch-size" in capsys.readouterr().err


def test_resume_refuses_another_dataset(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main("--data", tiny_data, *TINY, "--epochs", 2, "--max-steps", 3, "--out", out) == 0
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    shutil.rmtree(other / "val.lmdb")
    shutil.copytree(Path(tiny_data) / "train.lmdb", other / "val.lmdb")  # another split as val
    assert main("--resume", out, "--data", other) == 2
    assert "is not the dataset this run trained on" in capsys.readouterr().err


def test_resume_when_the_dataset_moved_says_to_pass_data(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    out = tmp_path / "run"
    assert main("--data", data, *TINY, "--epochs", 2, "--max-steps", 3, "--out", out) == 0
    data.rename(tmp_path / "elsewhere")
    assert main("--resume", out) == 2
    assert "no longer at" in capsys.readouterr().err
    assert main("--resume", out, "--data", tmp_path / "elsewhere") == 1


# ----------------------------------------------------------------------------- unwritable places
def test_out_under_a_file_is_one_line_and_exit_2(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main("--data", tiny_data, *TINY, "--out", blocker / "run") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot create the run folder" in err and str(blocker) in err


def test_an_unwritable_cache_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--synthetic", "tiny", *TINY, "--out",
                           tmp_path / "run"], env=dict(os.environ, MLPERF_RESNET_CACHE=str(blocker / "cache")),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot write the dataset cache" in proc.stderr and "MLPERF_RESNET_CACHE" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main("--data", tiny_data, *TINY, "--epochs", 3, "--max-steps", STEPS_PER_EPOCH, "--out", out) == 0
    before = (out / "checkpoint_last.npz").read_bytes()
    real_save = nn.checkpoint.save

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nn.checkpoint, "save", full_disk)
    assert main("--resume", out) == 2
    text = capsys.readouterr().out
    assert "No space left on device" in text and "free there" in text and "previous checkpoint is intact" in text
    assert (out / "checkpoint_last.npz").read_bytes() == before
    monkeypatch.setattr(nn.checkpoint, "save", real_save)
    assert main("--resume", out) == 1


# ----------------------------------------------------------------------------- finished runs
def test_resuming_a_finished_run_does_nothing_and_says_so(two_epochs, tiny_data, tmp_path, capsys):
    """A run at the end of its epochs, or past its target, has nothing to resume: one line, its
    exit code, no file touched (it used to train one more epoch and log a second success)."""
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main("--resume", out) == 1
    assert "finished its 2 epochs without reaching top-1 1.0" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    reached = tmp_path / "reached"
    assert main("--data", tiny_data, *TINY, "--epochs", 3, "--target-accuracy", 0.01, "--out", reached) == 0
    with np.load(reached / "checkpoint_last.npz") as f:
        assert int(f["extra/epoch"]) == 1 and float(f["extra/best_top1"]) >= 0.01
    files = sorted(p.name for p in reached.iterdir())
    capsys.readouterr()
    assert main("--resume", reached) == 0
    assert "already reached its target" in capsys.readouterr().out
    assert sorted(p.name for p in reached.iterdir()) == files
    # a higher target continues it
    assert main("--resume", reached, "--target-accuracy", 1.0) == 1
    with np.load(reached / "checkpoint_last.npz") as f:
        assert int(f["extra/epoch"]) == 3
    assert len(list(reached.glob("mlperf-resumed-*.log"))) == 1


# ----------------------------------------------------------------------------- untrusted run folders
# A run folder or checkpoint may come from anyone: --resume treats it as data (issue 27).
@pytest.fixture(scope="module")
def stopped_run(tiny_data, tmp_path_factory):
    """A run stopped after 3 steps by --max-steps: checkpoint_last.npz only, mid-epoch."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert main("--data", tiny_data, *TINY, "--epochs", 2, "--max-steps", 3, "--out", out) == 0
    return out


def rewrite_checkpoint(path, config=None, drop=(), **arrays):
    """Rewrite the checkpoint at `path` with its saved configuration updated by `config`, the keys
    `drop` left out and `arrays` ({key with '/' as '__'}: array) added or replaced."""
    with np.load(path) as f:
        data = {k: f[k] for k in f.files if k not in drop}
    if config is not None:
        data["extra/config"] = np.asarray(json.dumps(dict(json.loads(str(data["extra/config"])), **config)))
    data.update({k.replace("__", "/"): v for k, v in arrays.items()})
    np.savez(path, **data)


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_never_compiles_a_kernel_file_the_run_folder_names(stopped_run, tmp_path):
    """The crafted config of issue 27: extra/config names a kernel file in the run folder whose
    kernel would run a command. --resume refuses it, one line and exit 2, before anything is
    compiled: with no sha256, with the file's own sha256 but not named on the command line, and
    named with other contents."""
    out = tmp_path / "evilrun"
    shutil.copytree(stopped_run, out)
    marker = tmp_path / "PWNED"
    evil = out / "evil.cu"
    payload = f'#include <cstdlib>\nstatic int pwned = std::system("touch {marker}");\n'
    evil.write_text(payload + (ROOT / "kernels" / "conv.cu").read_text())
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    other = tmp_path / "mine.cu"
    shutil.copy(ROOT / "kernels" / "conv.cu", other)
    cache = tmp_path / "emu-cache"
    env = {"KERNELS_EMU_CACHE": str(cache), "MLPERF_RESNET_CACHE": str(tmp_path / "cache")}
    cases = [({"file": "evilrun/evil.cu", "version": 1}, [], "without its sha256"),   # resolved from the cwd
             ({"file": str(evil), "version": 1}, [], "without its sha256"),
             ({"file": str(evil), "version": 1, "sha256": sha}, [], f"pass --kernels conv=FILE.cu:1 with that file"),
             ({"file": str(evil), "version": 1, "sha256": sha}, ["--kernels", f"conv={other}:1", "--device", "emu"],
              "is not the file this run trained with")]
    for entry, flags, message in cases:
        table = nn.device.kernel_table("conv=1")
        table["conv"] = entry
        rewrite_checkpoint(out / "checkpoint_last.npz", config={"device": "emu", "kernels": table})
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(out), *flags],
                              cwd=tmp_path, env=dict(os.environ, **env), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in one_line(proc.stderr)
        assert not marker.exists()
        assert not cache.exists() or not any(cache.rglob("*")), list(cache.rglob("*"))   # nothing compiled
    assert not list(out.glob("mlperf-resumed-*.log"))


def test_resume_refuses_a_saved_configuration_train_py_would_not_write(stopped_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    for config, message in (({"batch_size": "8"}, "batch_size = '8'"),
                            ({"width": 1e6}, "width 1000000.0"),
                            ({"device": "gpu0"}, "device = 'gpu0'"),
                            ({"kernels": "conv=evil.cu"}, "saved kernel choice is not what train.py records"),
                            ({"lr_per": 0}, "--lr-per >= 1")):
        shutil.copy(stopped_run / "checkpoint_last.npz", out / "checkpoint_last.npz")
        rewrite_checkpoint(out / "checkpoint_last.npz", config=config)
        assert main("--resume", out) == 2, config
        assert message in one_line(capsys.readouterr().err), config
    for extra in (dict(extra__history=np.asarray('[{"epoch": "one"}]')), dict(extra__scaler=np.asarray('{"s": 1}')),
                  dict(extra__config=np.asarray("not json")), dict(extra__step=np.asarray(-1))):
        shutil.copy(stopped_run / "checkpoint_last.npz", out / "checkpoint_last.npz")
        rewrite_checkpoint(out / "checkpoint_last.npz", **extra)
        assert main("--resume", out) == 2, extra
        assert "no intact checkpoint" in one_line(capsys.readouterr().err), extra


def test_checkpoint_arrays_are_checked_before_they_are_read(stopped_run, tmp_path, capsys):
    """Unknown keys, shapes or dtypes that are not the model's, and a member larger than its own
    header declares: refused from the zip directory and the .npy headers, one line, exit 2."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    ckpt = out / "checkpoint_last.npz"
    with np.load(stopped_run / "checkpoint_last.npz") as f:
        fc = f["model/fc.weight"]
    cases = [(dict(model__junk=np.zeros(3, np.float32)), "holds model/junk, an array this model has no use for"),
             (dict(extra__junk=np.asarray(1)), "holds extra/junk, an extra entry it has no use for"),
             (dict(model__fc__weight=np.zeros((fc.shape[0] + 1, fc.shape[1]), np.float32)),
              f"model/fc.weight has shape {(fc.shape[0] + 1, fc.shape[1])} (float32), this model needs {fc.shape}"),
             (dict(model__fc__weight=fc.astype(np.float64)), "(float64), this model needs"),
             (dict(optim__momentum_buffer__fc__weight=np.zeros(10**6, np.float32)), "this model needs")]
    for arrays, message in cases:
        shutil.copy(stopped_run / "checkpoint_last.npz", ckpt)
        rewrite_checkpoint(ckpt, **{k.replace("fc__", "fc.").replace("buffer__", "buffer."): v
                                    for k, v in arrays.items()})
        assert main("--resume", out) == 2
        line = one_line(capsys.readouterr().err)
        assert "no intact checkpoint" in line and message in line, line
    # a member whose header declares 4 GiB but which stores 16 bytes: refused without reading it
    shutil.copy(stopped_run / "checkpoint_last.npz", ckpt)
    with zipfile.ZipFile(ckpt) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist() if i.filename != "model/fc.weight.npy"}
    lying = io.BytesIO()
    np.lib.format.write_array_header_1_0(lying, {"descr": "<f4", "fortran_order": False, "shape": (2 ** 30,)})
    with zipfile.ZipFile(ckpt, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
        zf.writestr("model/fc.weight.npy", lying.getvalue() + bytes(16))
    assert main("--resume", out) == 2
    assert "declares a float32 array of shape (1073741824,)" in one_line(capsys.readouterr().err)


def test_a_decompression_bomb_in_a_checkpoint_is_refused_unread(stopped_run, tmp_path):
    """Issue 27: a small checkpoint holding a deflated 512 MiB array under an unknown key used to
    be read whole (and accepted). It is refused from its header: one line, exit 2, quickly, and
    the process's peak memory grows by far less than the array."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    ckpt = out / "checkpoint_last.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2 ** 27,)})
    with zipfile.ZipFile(ckpt, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("model/junk.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            zeros = bytes(1 << 20)
            for _ in range(512):
                member.write(zeros)
    assert ckpt.stat().st_size < 8 << 20
    script = ("import resource, sys, time; sys.path.insert(0, sys.argv[1]); import train; "
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; t = time.time(); "
              "code = train.main(['--resume', sys.argv[2]]); "
              "print('RESULT', code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, time.time() - t)")
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT), str(out)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    code, grew_kib, seconds = proc.stdout.split("RESULT ")[1].split()
    assert int(code) == 2, proc.stderr[-2000:]
    assert "model/junk, an array this model has no use for" in one_line(proc.stderr)
    assert int(grew_kib) < 64 << 10 and float(seconds) < 10, (grew_kib, seconds)   # 512 MiB if it were read


def test_the_checkpoint_layout_of_the_configuration_is_that_of_the_built_model():
    # train.checkpoint_layout works the layout out from the architecture (nothing allocated): it
    # must be exactly what the model and optimizer give
    for width, classes, optimizer in ((1 / 16, 4, "sgd"), (0.1, 7, "lars"), (1.0, 1000, "sgd")):
        model = nn.resnet50(num_classes=classes, width=width)
        Opt = nn.optim.SGD if optimizer == "sgd" else nn.optim.LARS
        expected = nn.checkpoint.layout(model, Opt(model.named_parameters(), lr=0.1))
        assert train.checkpoint_layout(width, classes, optimizer) == expected


def test_a_stale_temporary_checkpoint_is_removed_on_resume(stopped_run, tmp_path):
    # a SIGKILL while a checkpoint was being written leaves a 0-byte .tmp-XXXXXXXX.npz; the next
    # run on the folder removes it, and only names of exactly that form
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    for name in (".tmp-k3j_h5g6.npz", "config.json.tmp", ".tmp-mine.npz", "notes.tmp-abcdefgh.npz"):
        (out / name).write_bytes(b"")
    assert main("--resume", out, "--max-steps", 4) == 0
    names = {p.name for p in out.iterdir()}
    assert ".tmp-k3j_h5g6.npz" not in names and "config.json.tmp" not in names
    assert {".tmp-mine.npz", "notes.tmp-abcdefgh.npz"} <= names


# ----------------------------------------------------------------------------- setup and save failures
def test_a_run_that_fails_during_setup_leaves_nothing_in_the_way(tiny_data, tmp_path, monkeypatch, capsys):
    # /dev/shm too small for the loaders' batch slots: refused before a worker starts, and neither
    # mlperf.log nor config.json stays to block the same --out
    real = os.statvfs

    def small_shm(path):
        st = real(path)
        if str(path) != "/dev/shm":
            return st
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 10, 10, *st[5:]))

    monkeypatch.setattr(os, "statvfs", small_shm)
    kept, fresh = tmp_path / "kept", tmp_path / "fresh"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine\n")
    for out in (kept, fresh):
        assert main("--data", tiny_data, *TINY, "--epochs", 1, "--out", out) == 2
        line = one_line(capsys.readouterr().err)
        assert "batch slots need" in line and "--batch-size" in line and "--shm-size" in line, line
    assert sorted(p.name for p in kept.iterdir()) == [".lock", "notes.txt"] and not fresh.exists()
    monkeypatch.setattr(os, "statvfs", real)
    assert main("--data", tiny_data, *TINY, "--epochs", 1, "--max-steps", 2, "--out", kept) == 0


def test_when_the_first_checkpoint_cannot_be_written_no_previous_one_is_promised(tiny_data, tmp_path, monkeypatch,
                                                                                capsys):
    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nn.checkpoint, "save", full_disk)
    assert main("--data", tiny_data, *TINY, "--epochs", 1, "--max-steps", 2, "--out", tmp_path / "run") == 2
    text = capsys.readouterr().out
    assert "No space left on device" in text and "no checkpoint was written yet" in text
    assert "previous checkpoint is intact" not in text


# ----------------------------------------------------------------------------- numerics and kernels
@pytest.mark.parametrize("scale", ["inf", "1e30"])
def test_fp16_with_every_step_skipped_stops_as_diverged(tiny_data, tmp_path, monkeypatch, capsys, scale):
    """--loss-scale inf (or 1e30) overflows every fp16 gradient: every step is skipped, nothing
    trains. The run stops as diverged, exit 3, one line, after MAX_NONFINITE_FP16_STEPS skipped
    steps in a row (here 4, read every 2 steps; README says the real number)."""
    assert f"{train.MAX_NONFINITE_FP16_STEPS} in a row is divergence" in (ROOT / "README.md").read_text()
    monkeypatch.setattr(train, "MAX_NONFINITE_FP16_STEPS", 4)
    args = [a if a != "cpu" else "emu" for a in TINY]
    assert main("--data", tiny_data, *args, "--precision", "fp16", "--loss-scale", scale, "--log-every", 2,
                "--max-steps", 8, "--out", tmp_path / "run") == 3
    errors = [x for x in capsys.readouterr().out.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "skipped all of the last 4 steps, up to step 4" in errors[0], errors
    assert "--loss-scale dynamic" in errors[0]


def test_a_kernel_that_writes_out_of_bounds_ends_the_run_in_one_line(tiny_data, tmp_path, capsys):
    # a learner's copy of kernels/optimizer.cu whose update writes one element past the weights:
    # the emulator's guard bytes catch it; the run ends with exit 2 and a line naming the kernel
    source = (ROOT / "kernels" / "optimizer.cu").read_text()
    end = "            param[i] = w;\n            momentum_buf[i] = v;\n        }\n    }\n"
    assert source.count(end) == 1
    bad = tmp_path / "my_optimizer.cu"
    bad.write_text(source.replace(end, end + "    if (blockIdx.x == 0 && threadIdx.x == 0) "
                                             "param[chunk_start[num_chunks]] = 1.0f;\n"))
    args = [a if a != "cpu" else "emu" for a in TINY]
    assert main("--data", tiny_data, *args, "--kernels", f"optimizer={bad}", "--max-steps", 2,
                "--out", tmp_path / "run") == 2
    said = capsys.readouterr()
    errors = [x for x in said.out.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in said.err, said.err[-2000:]
    assert "kernel 'momentum_update_flat_f32' wrote outside argument 0 'param'" in errors[0]
    assert f"optimizer={bad}" in errors[0]
