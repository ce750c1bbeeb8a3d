"""The training step never waits for the host: counted on the emulator.

Every device-to-host read in nn/ and train.py goes through nn.device.to_numpy (the one door,
counted by nn.device.host_reads); kernel launches are counted by kernels.launch_count. On the emu
device the step runs the same code as on cuda, so a count of 0 reads here means 0 syncs there
(a CUDA-graph capture on a GPU would fail on any read that slipped past the door)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kernels
import nn
from bench import train as bt

ROOT = Path(__file__).resolve().parent.parent


def test_every_configuration_steps_without_a_host_read():
    rows = bt.sync_check("emu", "tiny", steps=2, warmup=1, quiet=True)
    by_label = {r["label"]: r for r in rows}
    assert set(by_label) == {"SGD fp32", "SGD fp16, dynamic loss scale", "LARS fp32"}
    for r in rows:
        assert r["host_syncs_per_step"] == 0, r
        assert np.isfinite(r["mean_loss"]), r
    sgd, lars = by_label["SGD fp32"], by_label["LARS fp32"]
    # one optimizer launch for all parameters (808 with one per tensor before); LARS adds its two
    # norm kernels; the per-step count is exact, the same every step
    assert sgd["launches_per_step"] == int(sgd["launches_per_step"]) < 700
    assert lars["launches_per_step"] == sgd["launches_per_step"] + 2
    # fp16 runs float16 kernels end to end: no float32 copies of activations around the
    # convolutions (1,246 launches a step when they were widened), so no more launches than fp32;
    # the only casts left are the fc weight's, the logits' (fp32 for the loss) and their gradient's
    fp16 = by_label["SGD fp16, dynamic loss scale"]
    assert fp16["launches_per_step"] <= sgd["launches_per_step"], fp16["kernels_per_step"]
    casts = {k: n for k, n in fp16["kernels_per_step"].items() if k.startswith("cast_")}
    assert sum(casts.values()) <= 3, casts
    # (in training each convolution also gives the batch norm after it its statistics: *_stats_*)
    per_step16, per_step32 = fp16["kernels_per_step"], sgd["kernels_per_step"]
    assert per_step16["conv2d_fwd_wmma_async_stats_f16"] == per_step32["conv2d_fwd_igemm_stats_f32"]


def test_the_door_counts_reads_and_the_counter_counts_launches():
    x = np.arange(5, dtype=np.float32)
    before = nn.device.host_reads()
    nn.device.to_numpy(x)
    assert nn.device.host_reads() == before + 1
    launches = kernels.launch_count()
    kernels.ops.relu_forward(x)
    assert kernels.launch_count() == launches + 1


def _plant_a_read(Trainer):
    """Trainer.step with a host read of the running loss planted in it (what train.py used to do
    with float(loss.data) every step)."""
    real = Trainer.step

    def reading_step(self, images, labels):
        real(self, images, labels)
        float(nn.device.to_numpy(self.loss_window)[0])

    return reading_step


def test_a_read_planted_in_train_py_step_is_counted(monkeypatch):
    # the check is not blind, and it checks train.py's own step (not a copy of it in bench/)
    import train
    monkeypatch.setattr(train.Trainer, "step", _plant_a_read(train.Trainer))
    rows = bt.sync_check("emu", "tiny", steps=2, warmup=1, quiet=True)
    assert len(rows) == 3 and all(r["host_syncs_per_step"] == 1 for r in rows), rows


def test_the_sync_check_command_fails_on_a_read_planted_in_train_py_step():
    # the command as a user runs it, with the read planted in train.py's step first
    plant = ("import sys, nn, train\n"
             "real = train.Trainer.step\n"
             "def reading_step(self, images, labels):\n"
             "    real(self, images, labels)\n"
             "    float(nn.device.to_numpy(self.loss_window)[0])\n"
             "train.Trainer.step = reading_step\n"
             "from bench import train as bt\n"
             "sys.exit(bt.main(['--size', 'tiny', '--device', 'emu', '--sync-check', '--check-steps', '1']))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", plant], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "host syncs per step:" in line]
    assert len(lines) == 3 and all("host syncs per step: 1 " in line for line in lines), proc.stdout


@pytest.mark.slow
def test_sync_bn_over_two_mpi_ranks_steps_without_a_host_read(tmp_path, mpiexec):
    out = tmp_path / "sync.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "bench.train", "--size", "tiny", "--device", "emu",
                           "--sync-check", "--check-steps", "2", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "sync BN over 2 ranks" in proc.stdout and "host syncs per step: 0" in proc.stdout
