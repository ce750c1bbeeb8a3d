"""train.py end to end on the CPU, on the tiny synthetic dataset: outputs, exact resume after an
interruption or a crash, the MLPerf log against mlperf-logging's checker, and the guardrails
(corrupt image, diverging learning rate, missing dataset, bad flags)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

TINY = ["--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "8", "--width", "0.0625",
        "--image-size", "32", "--warmup-epochs", "1"]


def run_main(args):
    return train.main([str(a) for a in args])


def run_proc(args, env=None, timeout=180):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=e, timeout=timeout)


def weights(run_dir, name="checkpoint_last.npz"):
    with np.load(Path(run_dir) / name) as f:
        return {k: f[k] for k in f.files if k.startswith(("model/", "optim/"))}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    """Three epochs without interruption: what every resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "run"
    code = run_main(["--data", tiny_data, *TINY, "--epochs", 3, "--target-accuracy", 1.0, "--out", out])
    assert code == train.EXIT_NOT_REACHED
    return out


def test_outputs_of_a_run(reference_run):
    lines = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    assert all(0 <= r["top1"] <= 1 and r["top5"] >= r["top1"] and np.isfinite(r["train_loss"]) for r in lines)
    assert (reference_run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (reference_run / "checkpoint_best.npz").exists()
    cfg = json.loads((reference_run / "config.json").read_text())
    assert cfg["epochs"] == 3 and cfg["batch_size"] == 8 and cfg["device"] == "cpu"
    log = (reference_run / "mlperf.log").read_text().splitlines()
    events = [json.loads(x.split(":::MLLOG ", 1)[1]) for x in log if ":::MLLOG" in x]
    keys = [e["key"] for e in events]
    for key in ("init_start", "init_stop", "run_start", "run_stop", "seed", "global_batch_size", "train_samples",
                "eval_samples", "opt_base_learning_rate", "opt_learning_rate_warmup_epochs", "opt_weight_decay"):
        assert key in keys, key
    acc = [e for e in events if e["key"] == "eval_accuracy"]
    assert [e["metadata"]["epoch_num"] for e in acc] == [1, 2, 3]
    assert [e["value"] for e in acc] == pytest.approx([r["top1"] for r in lines])
    assert events[-1]["key"] == "run_stop" and events[-1]["metadata"]["status"] == "aborted"


def test_mlperf_log_passes_the_compliance_checker(reference_run, tmp_path):
    # The structural rules of mlperf-logging's checker (training ruleset 1.0.0, open division):
    # keys present exactly once or at least once, intervals in order, metadata present.
    proc = subprocess.run([sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training",
                           "--ruleset", "1.0.0", "--log_output", str(tmp_path / "checker.log"),
                           str(reference_run / "mlperf.log")], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "SUCCESS" in out, out
    assert "WARNING" not in out and "Required" not in out, out


@pytest.mark.parametrize("seed", [0, 1])
def test_step_limit_then_resume_gives_identical_weights(tiny_data, reference_run, tmp_path, seed):
    # stop at a random step (mid-epoch or on an epoch boundary), resume: same weights bit for bit
    steps_per_epoch = 96 // 8
    stop_at = int(np.random.default_rng(seed).integers(1, 3 * steps_per_epoch))
    out = tmp_path / "run"
    code = run_main(["--data", tiny_data, *TINY, "--epochs", 3, "--target-accuracy", 1.0, "--out", out,
                     "--max-steps", stop_at])
    assert code == train.EXIT_OK
    with np.load(out / "checkpoint_last.npz") as f:
        assert int(f["extra/step"]) == stop_at
    assert run_main(["--resume", out]) == train.EXIT_NOT_REACHED
    assert_identical(weights(out), weights(reference_run))
    # the resumed run's metrics continue the same history; the interrupted epoch's training loss
    # covers all its steps, those before the stop too (the checkpoint keeps its running sum)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in records] == pytest.approx([r["train_loss"] for r in reference], rel=1e-9)


def test_killed_run_resumes_to_identical_weights(tiny_data, reference_run, tmp_path):
    # killed like `kill -9` in the middle of epoch 2: the checkpoint of epoch 1 is intact and
    # the resumed run replays epoch 2 from its start
    out = tmp_path / "run"
    proc = run_proc(["--data", tiny_data, *TINY, "--epochs", 3, "--target-accuracy", 1.0, "--out", out],
                    env={"MLPERF_RESNET_CRASH_AT_STEP": "17"})
    assert proc.returncode == 137, proc.stderr[-2000:]
    with np.load(out / "checkpoint_last.npz") as f:
        assert int(f["extra/epoch"]) == 1 and int(f["extra/batch"]) == 0
    assert run_main(["--resume", out]) == train.EXIT_NOT_REACHED
    assert_identical(weights(out), weights(reference_run))


def _interrupt_after_the_first_epoch(args, out, whole_group=False):
    """Start train.py, send SIGINT once an epoch has ended (to the process, or to its whole process
    group as a terminal's Ctrl-C does), and return (stdout, stderr) of a run that stopped with
    exit 130; skips when the run finished before the signal arrived."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=whole_group)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if whole_group:
        os.killpg(proc.pid, signal.SIGINT)   # what the terminal does: every process of the group
    else:
        proc.send_signal(signal.SIGINT)      # during epoch 2 (or later): wherever it lands
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == train.EXIT_NOT_REACHED:
        pytest.skip("the run finished before the interrupt arrived")
    assert proc.returncode == train.EXIT_INTERRUPTED, stderr[-2000:]
    return stdout, stderr


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(tiny_data, reference_run, tmp_path):
    out = tmp_path / "run"
    stdout, stderr = _interrupt_after_the_first_epoch(
        ["--data", tiny_data, *TINY, "--epochs", 3, "--target-accuracy", 1.0, "--out", out], out)
    assert "checkpoint saved" in stdout + stderr and "--resume" in stdout + stderr
    assert run_main(["--resume", out]) == train.EXIT_NOT_REACHED
    assert_identical(weights(out), weights(reference_run))


def test_ctrl_c_in_a_terminal_with_loader_workers(tiny_data, reference_run, tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group, loader workers included:
    the workers ignore it, the run finishes its step, checkpoints, exits 130 without a traceback,
    and resumes exactly (a worker used to die with KeyboardInterrupt and fail the run with exit 1)."""
    out = tmp_path / "run"
    stdout, stderr = _interrupt_after_the_first_epoch(
        ["--data", tiny_data, *TINY, "--workers", "2", "--epochs", 3, "--target-accuracy", 1.0, "--out", out], out,
        whole_group=True)
    assert "Traceback" not in stderr, stderr[-2000:]
    assert "checkpoint saved" in stdout and "--resume" in stdout
    assert run_main(["--resume", out]) == train.EXIT_NOT_REACHED
    assert_identical(weights(out), weights(reference_run))


def _children(pid):
    """The pids of the processes `pid` started, from /proc."""
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _wait_until_idle(pid, quiet=0.5, limit=60):
    """Until process `pid` has used no CPU time for `quiet` seconds (it waits for something)."""
    def cpu():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])      # utime + stime, in clock ticks
    deadline, last, since = time.time() + limit, cpu(), time.time()
    while time.time() < deadline:
        time.sleep(0.1)
        now = cpu()
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet:
            return
    raise AssertionError(f"process {pid} kept running for {limit} s")


def _interrupt_with_workers_stopped(tiny_data, out, pick_workers, quiet=0.5):
    """Start a 3-epoch tiny run with one loader worker per loader, wait for its first metrics line,
    SIGSTOP the workers pick_workers(all loader workers) returns, wait until the run waits for them,
    send one SIGINT, and return (the process, stdout, stderr); the workers are continued, the run
    killed if it still lives.  Skips when the run finished before its workers could be stopped."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                             *map(str, ["--data", tiny_data, *TINY, "--workers", "1", "--epochs", 3,
                                        "--target-accuracy", 1.0, "--out", out])],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = []
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        # the workers: the children of the forkserver, itself a child of the run
        stopped = pick_workers(sorted(w for server in _children(proc.pid) for w in _children(server)))
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        if proc.poll() is not None:
            pytest.skip("the run finished before its workers could be stopped")
        _wait_until_idle(proc.pid, quiet=quiet)
        proc.send_signal(signal.SIGINT)      # once
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    return proc, stdout, stderr


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_one_ctrl_c_ends_the_wait_for_a_worker_that_never_answers(tiny_data, reference_run, tmp_path):
    """Loader workers that are alive but never answer (stopped here; a hung file system alike):
    the first SIGINT ends the wait for its batch at once, the run checkpoints before the step it
    could not take and exits 130, and the resumed run is the uninterrupted one bit for bit (the
    first signal used to wait for the step to finish, so the run waited for the batch forever)."""
    out = tmp_path / "run"

    def every_worker(workers):
        assert workers, "no loader worker found"
        return workers

    # the batches made before the stop are used up: it waits for the next
    proc, stdout, stderr = _interrupt_with_workers_stopped(tiny_data, out, every_worker)
    if proc.returncode == train.EXIT_NOT_REACHED:
        pytest.skip("the run finished before the interrupt arrived")
    assert proc.returncode == train.EXIT_INTERRUPTED, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert "checkpoint saved" in stdout
    assert run_main(["--resume", out]) == train.EXIT_NOT_REACHED
    assert_identical(weights(out), weights(reference_run))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_one_ctrl_c_stops_an_evaluation_and_the_resumed_run_evaluates_first(tiny_data, reference_run, tmp_path):
    """A signal during an evaluation (here: its loader worker stopped, so it waits forever) ends it
    at once; the checkpoint holds the trained, unevaluated epoch, and the resumed run evaluates it
    first and goes on as the uninterrupted run did, bit for bit, one metrics line per epoch."""
    out = tmp_path / "run"

    def the_validation_worker(workers):
        # started after the training loader's, at the first evaluation
        assert len(workers) == 2, workers
        return workers[-1:]

    # epoch 2 trained; its evaluation waits
    proc, stdout, stderr = _interrupt_with_workers_stopped(tiny_data, out, the_validation_worker, quiet=1.0)
    assert proc.returncode == train.EXIT_INTERRUPTED, stderr[-2000:]
    with np.load(out / "checkpoint_last.npz") as ck:
        assert (int(ck["extra/epoch"]), int(ck["extra/batch"]), int(ck["extra/step"])) == (1, 12, 24)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert run_main(["--resume", out]) == train.EXIT_NOT_REACHED
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert_identical(weights(out), weights(reference_run))


def test_corrupt_record_is_logged_replaced_and_the_run_goes_on(tiny_data, tmp_path):
    import lmdb
    import shutil

    from data.records import decode_record, encode_record, record_key
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    env = lmdb.open(str(data / "train.lmdb"), subdir=True, lock=True)
    with env.begin(write=True) as txn:
        jpeg, label, boxes, flags = decode_record(txn.get(record_key(5)))
        broken = bytes(jpeg[:200]) + b"\x00" * 64  # a truncated, garbled JPEG
        txn.put(record_key(5), encode_record(broken, label, boxes, flags))
    env.close()
    proc = run_proc(["--data", data, *TINY, "--epochs", 1, "--target-accuracy", 0.01, "--out", tmp_path / "run"])
    assert proc.returncode == train.EXIT_OK, proc.stderr[-2000:]
    assert "record 5 is corrupt" in proc.stderr


def test_diverging_learning_rate_stops_with_a_clear_message(tiny_data, tmp_path):
    proc = run_proc(["--data", tiny_data, *TINY, "--epochs", 2, "--lr", 1e8, "--warmup-epochs", 0,
                     "--out", tmp_path / "run"])
    assert proc.returncode == train.EXIT_DIVERGED, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the loss is nan" in proc.stdout.lower() + proc.stderr.lower() or "the loss is inf" in (
        proc.stdout.lower() + proc.stderr.lower())


def test_missing_dataset_says_how_to_build_one(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_proc(["--data", empty, "--device", "cpu", "--out", tmp_path / "run"])
    assert proc.returncode == train.EXIT_USAGE
    assert "python -m data.pack" in proc.stderr and str(empty) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,message", [
    (["--precision", "fp16", "--device", "cpu"], "needs --device cuda"),
    (["--conv-engine", "cudnn", "--device", "cpu"], "needs --device cuda"),
    (["--data", "x", "--synthetic"], "exclusive"),
    (["--batch-size", "0", "--device", "cpu"], "--batch-size must be >= 1"),
    (["--target-accuracy", "1.5", "--device", "cpu"], "--target-accuracy"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
    # an unset variable in a script must not mean the built-in synthetic set
    (["--data", "", "--device", "cpu"], "--data is empty (an unset variable in a script?)"),
    (["--out", " ", "--device", "cpu"], "--out is empty"),
    (["--resume", ""], "--resume is empty"),
    (["--seed", "-1", "--device", "cpu"], "--seed must be a number in 0..2**63-1, got -1"),
    (["--warmup-epochs", "inf", "--device", "cpu"], "--warmup-epochs must be a finite number >= 0, got inf"),
    (["--lr", "inf", "--device", "cpu"], "--lr must be a finite number > 0"),
    (["--lr", "nan", "--device", "cpu"], "--lr must be a finite number > 0"),
    (["--weight-decay", "inf", "--device", "cpu"], "--weight-decay must be a finite number"),
    (["--image-size", "100000", "--device", "cpu"], "--image-size must be in 16..1024, got 100000 (one batch of 32 "
                                                    "such images is 894.1 GiB of shared memory)"),
    (["--width", "1000", "--device", "cpu"], "--width must be in (0, 8]"),
    (["--batch-size", "1", "--image-size", "32", "--device", "cpu"],
     "--batch-size 1 at --image-size 32: batch norm in the last stage would see one value per channel"),
])
def test_bad_flag_combinations_are_refused_up_front(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MLPERF_RESNET_CACHE", str(tmp_path / "cache"))   # nothing is prepared
    assert run_main(flags) == train.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache").exists()


def test_a_finished_run_directory_is_not_overwritten(reference_run, tiny_data, capsys):
    assert run_main(["--data", tiny_data, *TINY, "--epochs", 1, "--out", reference_run]) == train.EXIT_USAGE
    assert "--resume" in capsys.readouterr().err


def test_dry_run_builds_everything_and_trains_nothing(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert run_main(["--data", tiny_data, *TINY, "--dry-run", "--out", out]) == train.EXIT_OK
    assert not (out / "checkpoint_last.npz").exists() and (out / "config.json").exists()


def test_two_mpi_ranks_run_train_py_as_one_job(tiny_data, tmp_path, mpiexec):
    out = tmp_path / "run"
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(ROOT / "train.py"), "--data", str(tiny_data),
                           *map(str, TINY), "--batch-size", "16", "--epochs", "2", "--target-accuracy", "1.0",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert proc.returncode == train.EXIT_NOT_REACHED, proc.stdout[-2000:] + proc.stderr[-2000:]
    # one run directory, written by rank 0 only: one line per epoch, one summary line per epoch
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert proc.stdout.count("epoch   1:") == 1 and (out / "checkpoint_last.npz").exists()
    log = (out / "mlperf.log").read_text()
    assert '"key": "submission_platform", "value": "2x' in log
    # every rank loaded 8 of the 16 images of a step: the whole epoch was seen once
    with np.load(out / "checkpoint_last.npz") as f:
        assert int(f["extra/step"]) == 2 * (96 // 16)


@pytest.mark.gpu
def test_cuda_graph_run_trains_like_the_eager_run(tiny_data, tmp_path):
    """train.py --cuda-graph: 3 eager steps, the capture, replays; after 10 steps the weights are
    those of the eager run (same kernels, same order: equal up to the nondeterminism of atomics)."""
    args = ["--data", tiny_data, "--device", "cuda", "--workers", "0", "--no-progress", "--batch-size", "8",
            "--width", "0.0625", "--image-size", "32", "--epochs", "2", "--max-steps", "10"]
    assert run_main([*args, "--out", tmp_path / "eager"]) == train.EXIT_OK
    assert run_main([*args, "--out", tmp_path / "graph", "--cuda-graph"]) == train.EXIT_OK
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "graph")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.gpu
def test_synthetic_tiny_on_the_gpu_and_a_few_graphed_steps(tiny_data, tmp_path):
    """The GPU's own commands, as a user types them: `train.py --device cuda --synthetic tiny
    --epochs 1` (exit 0 or 1, one epoch logged) and the same with --cuda-graph for a few steps
    (3 eager, the capture, replays). Under the simulated GPU the defaults are the CPU's shapes."""
    cache = {"MLPERF_RESNET_CACHE": str(Path(tiny_data).parents[2])}     # the session's packed tiny set
    base = ["--device", "cuda", "--synthetic", "tiny", "--no-progress", "--workers", "0"]
    proc = run_proc([*base, "--epochs", "1", "--out", tmp_path / "eager"], env=cache, timeout=600)
    assert proc.returncode in (train.EXIT_OK, train.EXIT_NOT_REACHED), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len((tmp_path / "eager" / "metrics.jsonl").read_text().splitlines()) == 1
    proc = run_proc([*base, "--epochs", "1", "--batch-size", "16", "--cuda-graph", "--max-steps", "5",
                     "--out", tmp_path / "graph"], env=cache, timeout=600)
    assert proc.returncode == train.EXIT_OK, proc.stdout[-2000:] + proc.stderr[-2000:]
    with np.load(tmp_path / "graph" / "checkpoint_last.npz") as f:
        assert int(f["optim/step_count"]) == int(f["extra/step"]) == 5    # replays counted too


@pytest.mark.gpu
def test_conv_engine_cudnn_without_cudnn_is_one_line(tiny_data, tmp_path):
    """--conv-engine cudnn where the cuDNN engine cannot run (not installed, or the GPU is simulated):
    exit 2 and one line saying why, no traceback."""
    from kernels import cudnn_engine
    ok, _ = cudnn_engine.cudnn_available()
    if ok:
        pytest.skip("cuDNN is available here: the engine runs")
    proc = run_proc(["--data", tiny_data, "--device", "cuda", "--conv-engine", "cudnn", "--workers", "0",
                     "--no-progress", "--epochs", "1", "--out", tmp_path / "run"])
    assert proc.returncode == train.EXIT_USAGE, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "--conv-engine cudnn: the cuDNN engine is not available" in proc.stderr


@pytest.mark.gpu
def test_out_of_gpu_memory_is_exit_4_with_a_batch_size_that_fits(tiny_data, tmp_path):
    """CuPy's pool limited to 2 MB (CUPY_GPU_MEMORY_LIMIT, which the simulated GPU honours too): the
    model and its optimizer (~1 MB at width 1/16) fit, a step at batch 64 (8 MiB of activations)
    does not. Exit 4 and one line naming a smaller --batch-size, no traceback."""
    proc = run_proc(["--data", tiny_data, "--device", "cuda", "--workers", "0", "--no-progress", "--batch-size", "64",
                     "--width", "0.0625", "--image-size", "32", "--max-steps", "1", "--out", tmp_path / "run"],
                    env={"CUPY_GPU_MEMORY_LIMIT": "2000000"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == train.EXIT_OOM, out[-3000:]
    assert "out of GPU memory at batch size 64" in out and "try --batch-size 32" in out and "Traceback" not in out
