"""Data parallelism (nn/distributed.py): synchronised BN, bucketed all-reduce, exact evaluation
counts and the failure watchdog.

The multi-process tests start `mpiexec -n 2 python tests/_dist_worker.py ...` (MPICH + mpi4py from
the `test` extra) with timeouts, so nothing can hang the suite; they are skipped, with the reason,
where mpiexec or mpi4py is missing. The in-process tests need neither.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import nn
from kernels import reference as ref
from nn import data_parallel, distributed
from nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "_dist_worker.py")


# ------------------------------------------------------------------------------------------------
# in-process: the reference ops of synchronised BN, sync BN at world size 1, hooks, helpers


def test_partial_stats_and_backward_pieces_reassemble_the_full_batch():
    """Two 'ranks' each holding half the rows: summing their partial statistics and reductions
    must give the full batch's BN statistics and input gradient (float64 reference ops)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 4, 5)) * 3 + 7      # mean far from 0: the shift matters
    dy = rng.standard_normal(x.shape)
    gamma, beta = rng.standard_normal(5), rng.standard_normal(5)
    shift = rng.standard_normal(5) + 7
    _, mean, invstd = ref.batchnorm_forward_train(x, gamma, beta, np.zeros(5), np.ones(5))
    halves = (x[:3], x[3:])
    stats = sum(ref.batchnorm_partial_stats(h, shift) for h in halves)
    count = stats[0, 0]
    assert count == 6 * 3 * 4
    got_mean = shift + stats[1] / count
    got_var = stats[2] / count - (stats[1] / count) ** 2
    np.testing.assert_allclose(got_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(1 / np.sqrt(got_var + 1e-5), invstd, rtol=1e-10)

    dx_full, dgamma, dbeta = ref.batchnorm_backward(dy, x, gamma, mean, invstd)
    sums = [ref.batchnorm_backward_reduce(dy[s], x[s], mean, invstd) for s in (slice(0, 3), slice(3, 6))]
    total = sums[0] + sums[1]
    np.testing.assert_allclose(total[0], dbeta, rtol=1e-12)
    np.testing.assert_allclose(total[1], dgamma, rtol=1e-12)
    for s in (slice(0, 3), slice(3, 6)):
        dx = ref.batchnorm_backward_elemt(dy[s], x[s], gamma, mean, invstd, total, count)
        np.testing.assert_allclose(dx, dx_full[s], rtol=1e-10, atol=1e-12)


def test_backward_elemt_rejects_misshaped_sums():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="sums"):
        ref.batchnorm_backward_elemt(x, x, np.ones(3), np.zeros(3), np.ones(3), np.zeros((3, 3)), 4)


@pytest.mark.parametrize("variant", ["plain", "relu", "residual"])
def test_sync_batch_norm_with_one_rank_equals_local_batch_norm(variant):
    """The synchronised path with a world-size-1 communicator computes exactly what the local op
    does: outputs, running statistics and every gradient."""
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((4, 3, 3, 6)) + 2
    r0 = rng.standard_normal(x0.shape)
    dy = rng.standard_normal(x0.shape)
    results = []
    for sync in (None, distributed.Communicator()):
        x = nn.Tensor(x0.copy(), requires_grad=True)
        gamma = nn.Parameter(rng.standard_normal(6) if not results else results[0]["g0"])
        beta = nn.Parameter(np.full(6, 0.3))
        res = nn.Tensor(r0.copy(), requires_grad=True) if variant == "residual" else None
        rm, rv = np.full(6, 0.5), np.full(6, 2.0)
        g0 = gamma.data.copy()
        y = F.batch_norm(x, gamma, beta, rm, rv, training=True, relu=variant != "plain", residual=res, sync=sync)
        y.backward(dy)
        results.append(dict(g0=g0, y=y.data, rm=rm, rv=rv, dx=x.grad, dg=gamma.grad, db=beta.grad,
                            dr=None if res is None else res.grad))
    local, synced = results
    for key in ("y", "rm", "rv", "dx", "dg", "db") + (("dr",) if variant == "residual" else ()):
        np.testing.assert_allclose(synced[key], local[key], rtol=1e-10, atol=1e-12, err_msg=key)


def test_sync_batch_norm_names_the_missing_ops():
    ops = types.SimpleNamespace(__name__="kernels.ops")
    x = nn.Tensor(np.ones((4, 2)), requires_grad=True)
    w, b = nn.Parameter(np.ones(2)), nn.Parameter(np.zeros(2))
    with pytest.raises(NotImplementedError, match="batchnorm_partial_stats.*sync_bn=False"):
        F._batch_norm_synchronised(ops, x, w, b, np.zeros(2), np.ones(2), 1e-5, 0.1, False, None,
                                   distributed.Communicator())


def test_grad_hook_sees_the_final_gradient_once_per_backward():
    w = nn.Parameter(np.array([1.0, 2.0]))
    x = nn.Tensor(np.array([3.0, 4.0]))
    seen = []
    remove = w.register_grad_hook(lambda p: seen.append(p.grad.copy()))
    # w feeds two branches: the hook must fire once, after both contributions are summed
    out = F.add(F.relu(F.add(x, w)), w)                   # relu(x + w) + w, everything positive
    out.backward(np.array([1.0, 10.0]))
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], [2.0, 20.0])
    remove()
    w.grad = None
    F.add(w, w).backward(np.ones(2))
    assert len(seen) == 1


def test_single_communicator_and_helpers():
    comm = distributed.Communicator()
    a = np.arange(5.0)
    assert comm.allreduce_(a) is a and comm.bcast_(a) is a
    assert comm.allgather(a).shape == (1, 5)
    assert data_parallel.allreduce_counts([3, 4], comm) == [3, 4]
    assert data_parallel.allreduce_counts(np.array([2 ** 40]), None) == [2 ** 40]
    with pytest.raises(ValueError, match="op"):
        comm.allreduce_(a, op="mean")
    with pytest.raises(ValueError, match="root"):
        comm.bcast_(a, root=1)
    with pytest.raises(ValueError, match="backend"):
        distributed.init(backend="gloo")
    model = nn.resnet18(num_classes=3, width=1 / 16)
    ddp = data_parallel.DataParallel(model, comm)
    assert ddp.num_buckets == 0
    ddp.finish()                                       # world size 1: nothing to do
    with pytest.raises(ValueError, match="bucket_mb"):
        data_parallel.DataParallel(model, comm, bucket_mb=0)
    data_parallel.convert_sync_batchnorm(model, comm)    # world size 1: stays local
    assert all(m.sync is None for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_launched_world_size_reads_the_launcher_environment(monkeypatch):
    for var in distributed._LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.launched_world_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.launched_world_size() == 4


# ------------------------------------------------------------------------------------------------
# multi-process, through mpiexec


def _mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def _skip_without_mpi():
    if _mpiexec() is None:
        pytest.skip("no mpiexec (pip install -e '.[test]' brings the mpich wheel)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install -e '.[test]')")


def _run(args, ranks=2, timeout=90, launcher_flags=()):
    """Run the worker (under mpiexec when ranks > 0) -> (returncode, combined output, seconds)."""
    _skip_without_mpi()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, WORKER, *args]
    if ranks:
        cmd = [_mpiexec(), *launcher_flags, "-n", str(ranks), *cmd]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s:\n{e.stdout}\n{e.stderr}")
    return done.returncode, done.stdout + done.stderr, time.monotonic() - t0


def _relative_differences(a, b):
    keys = [k for k in a.files if k not in ("num_buckets", "world", "zero_copy")]
    assert keys and set(keys) == {k for k in b.files if k not in ("num_buckets", "world", "zero_copy")}
    return {k: float(np.linalg.norm(a[k].astype(np.float64) - b[k]) / (np.linalg.norm(a[k].astype(np.float64)) + 1e-300))
            for k in keys}


def test_two_ranks_with_sync_bn_train_like_one_rank_with_the_whole_batch(tmp_path):
    """2 ranks x batch 4 with synchronised BN == 1 rank x batch 8 (same data), weights and BN
    running statistics within 1e-5 relative after 3 SGD steps; local BN must differ (control).
    (Float64; the worst tensor differs by ~3e-8, the level a mere reordering of the batch gives:
    near-zero BN biases amplify rounding about 100x per step on this random-label problem.)"""
    common = ["train", "--steps", "3", "--global-batch", "8", "--size", "32"]
    one, two_sync, two_local = tmp_path / "one.npz", tmp_path / "sync.npz", tmp_path / "local.npz"
    two_flat = tmp_path / "flat.npz"      # the optimizer first: buckets are slices of its gradient buffer
    for ranks, out, extra in ((0, one, ["--sync-bn"]), (2, two_sync, ["--sync-bn"]), (2, two_local, []),
                              (2, two_flat, ["--sync-bn", "--optimizer-first"])):
        rc, output, _ = _run(common + ["--out", str(out)] + extra, ranks=ranks)
        assert rc == 0, output
    with np.load(one) as a, np.load(two_sync) as b, np.load(two_local) as c, np.load(two_flat) as d:
        assert int(b["world"]) == 2 and int(b["num_buckets"]) > 5      # many buckets were exercised
        assert int(b["zero_copy"]) == 0 and int(d["zero_copy"]) == int(d["num_buckets"])
        for run in (b, d):
            synced = _relative_differences(a, run)
            worst = max(synced, key=synced.get)
            assert synced[worst] < 1e-5, f"{worst}: relative difference {synced[worst]:.3g}"
        local = _relative_differences(a, c)
        assert max(local.values()) > 1e-3, "per-rank BN statistics should change the result"


def test_bucketed_allreduce_equals_plain_allreduce_and_the_mean(tmp_path):
    out = tmp_path / "buckets.json"
    rc, output, _ = _run(["buckets", "--out", str(out), "--bucket-mb", "0.01"])
    assert rc == 0, output
    r = json.loads(out.read_text())
    assert r["world"] == 2 and r["num_buckets"] > 5
    assert r["worst_bucketed"] < 1e-12 and r["worst_plain"] < 1e-12
    assert r["local_vs_mean"] > 1e-6          # the ranks' local gradients really differed


def test_evaluation_counts_are_exact_over_uneven_shards(tmp_path):
    out = tmp_path / "eval.json"
    samples, classes, seed = 101, 12, 3
    rc, output, _ = _run(["eval", "--out", str(out), "--samples", str(samples), "--classes", str(classes),
                          "--seed", str(seed), "--batch", "8"])
    assert rc == 0, output
    r = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT / "tests"))
    from _dist_worker import eval_data
    logits, labels = eval_data(samples, classes, seed)
    order = np.argsort(-logits, axis=1, kind="stable")
    rank_of_label = np.argmax(order == labels[:, None], axis=1)
    expected = [int((rank_of_label < 1).sum()), int((rank_of_label < 5).sum()), samples]
    assert r["total"] == expected
    assert [p[2] for p in r["per_rank"]] == [50, 51]          # uneven shards, every image once


@pytest.mark.slow
@pytest.mark.parametrize("mode, launcher_flags, message", [
    ("kill", ("-disable-auto-cleanup",), r"rank 1 \(pid \d+ on .*\) is gone"),
    ("freeze", (), r"rank 1 \(pid \d+ on .*\) sent no heartbeat"),
    ("hang", (), r"rank 1 \(pid \d+ on .*\) is stuck"),
    ("raise", (), r"rank 1/2: unhandled RuntimeError"),
])
def test_a_failed_rank_stops_the_job_with_a_message_naming_it(mode, launcher_flags, message):
    """rank 1 is killed (SIGKILL), frozen (SIGSTOP), hangs outside any collective, or raises: the
    other rank must stop within 60 s, the job exit non-zero, and a line name rank 1."""
    rc, output, seconds = _run(["fail", "--mode", mode], timeout=60, launcher_flags=launcher_flags)
    assert rc != 0, output
    assert seconds < 60
    assert re.search(message, output), output
    assert "failure went unnoticed" not in output


@pytest.mark.slow
def test_a_killed_rank_under_the_default_launcher_is_named():
    """With mpiexec's own clean-up on (the default) either our watchdog or the launcher reports
    first; both name rank 1: ours directly, the launcher by the pid our start-up line maps."""
    rc, output, seconds = _run(["fail", "--mode", "kill"], timeout=60)
    assert rc != 0 and seconds < 60, output
    pids = dict(re.findall(r"rank (\d+) pid (\d+)", output))
    named = re.search(r"rank 1 \(pid \d+ on .*\) is gone", output) or \
        re.search(rf"PID {pids.get('1', 'none')}\b", output)
    assert named, output
