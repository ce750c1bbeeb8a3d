"""train.py when things go wrong: no false success, nothing lost.

A diverging run must never report the target reached (NaN logits used to rank every label
first) nor overwrite a finite checkpoint with NaN/inf; a run folder belongs to one run; SIGTERM
is handled like Ctrl-C; --resume survives a damaged checkpoint, a moved run folder and a moved
dataset; destinations that cannot be written give one line and exit 2. All on the CPU, on the
tiny synthetic dataset."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
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
