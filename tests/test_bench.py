"""The benchmarks and the GPU check run end to end at tiny sizes (emulator and cpu device).

Speed is never asserted here (bench/ measures it); these tests check that every benchmark runs,
writes the JSON it promises, reports failures per configuration instead of crashing, and that
the pieces with arithmetic in them (the flat optimizer, the prefetcher, the PyTorch model used
for the comparison) compute the right thing against an independent reference.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


# ---- bench.kernels --------------------------------------------------------------------------------


def test_kernels_bench_tiny_on_emulator(tmp_path, capsys):
    from bench import kernels as bk
    out = tmp_path / "k.json"
    res = bk.run(groups=["elementwise", "reduce"], size="tiny", repeat=1, out=str(out))
    data = json.loads(out.read_text())
    assert data["size"] == "tiny" and len(data["cases"]) == len(res["cases"]) >= 5
    assert {c["group"] for c in data["cases"]} == {"elementwise", "reduce"}
    assert all("error" not in c for c in data["cases"]), [c for c in data["cases"] if "error" in c]
    assert all(c["seconds"] > 0 and c["bytes_per_s"] > 0 for c in data["cases"])
    # on the CPU one clock, so one time: per call and "hidden" are the same measurement
    for c in data["cases"]:
        assert c["timing"] == "host clock" and c["seconds_per_call"] == c["seconds"]
        assert c["pct_copy_bw_per_call"] == pytest.approx(c["pct_copy_bw"])
    assert "relu_forward f32" in capsys.readouterr().out


def test_kernels_bench_row_carries_both_timings_and_compares_like_with_like(monkeypatch):
    """A row: the hidden time and the per-call one with their shares of the copy rate; against a
    baseline timed the same way, the ratio of those times; when one of the two had to be timed per
    call (it reads on the host), the ratio of the per-call times, and it says so."""
    from bench import kernels as bk
    from bench.kernel_cases import Case
    from kernels.runtime.timing import HIDDEN, PER_CALL, Timing
    ours, base = object(), object()
    timings = {}
    monkeypatch.setattr(bk, "_timing", lambda fn, xp, repeat, warmup=2: timings[fn])
    case = Case(name="k", run=ours, bytes=3_000_000, baseline=base, group="g")
    ceilings = {"copy_bytes_per_s": 3e12}

    timings.update({ours: Timing(10e-6, HIDDEN, 35e-6), base: Timing(20e-6, HIDDEN, 50e-6)})
    row = bk._run_case(case, "xp", 5, ceilings)
    assert row["seconds"] == 10e-6 and row["seconds_per_call"] == 35e-6 and row["timing"] == HIDDEN
    assert row["pct_copy_bw"] == pytest.approx(10.0) and row["pct_copy_bw_per_call"] == pytest.approx(100 / 35)
    assert row["ours_over_baseline_time"] == pytest.approx(0.5) and "ours_over_baseline_timing" not in row

    timings[base] = Timing(60e-6, PER_CALL, 60e-6, "it reads on the host")
    row = bk._run_case(case, "xp", 5, ceilings)
    assert row["baseline_timing"] == PER_CALL and row["ours_over_baseline_timing"] == PER_CALL
    assert row["ours_over_baseline_time"] == pytest.approx(35 / 60)


def test_kernels_bench_keeps_what_it_measured_when_stopped(tmp_path, monkeypatch):
    """A GPU session's time limit can stop bench.kernels: the JSON holds every case measured so far,
    in the order of the groups asked for, marked incomplete; a finished run says complete."""
    from bench import kernels as bk
    out = tmp_path / "k.json"
    real, ran = bk._run_case, []

    def run_case(case, xp, repeat, ceilings):
        if len(ran) == 3:
            raise KeyboardInterrupt   # what a stage's time limit does to the run
        ran.append(case.name)
        return real(case, xp, repeat, ceilings)

    monkeypatch.setattr(bk, "_run_case", run_case)
    monkeypatch.setattr(bk, "PARTIAL_EVERY_S", 0.0)   # a rewrite after every case (a GPU run: every 2 s)
    with pytest.raises(KeyboardInterrupt):
        bk.run(groups=["reduce", "elementwise"], size="tiny", repeat=1, out=str(out))
    data = json.loads(out.read_text())
    assert data["complete"] is False and [c["name"] for c in data["cases"]] == ran
    assert [c["group"] for c in data["cases"]] == ["reduce"] * 3          # reduce first, as asked
    monkeypatch.setattr(bk, "_run_case", real)
    bk.run(groups=["reduce"], size="tiny", repeat=1, out=str(out))
    assert json.loads(out.read_text())["complete"] is True


def test_kernels_bench_profile_predicts_from_the_counts(tmp_path, capsys):
    # --profile with tiny twins: every twin profiled (counts, roofline bounds for every GPU of
    # bench/gpus.py), every ResNet-50 case of the groups predicted from its twin
    from bench import gpus
    from bench import kernels as bk
    from bench.kernel_cases import elementwise, reduce
    from kernels.runtime import plan
    out = tmp_path / "p.json"
    bk.main(["--profile", "--size", "tiny", "--groups", "elementwise", "reduce", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["arch"] == "sm_80" and data["gpu"] == "A100" and len(data["profiled"]) >= 5
    for c in data["profiled"]:
        assert "error" not in c, c
        m = c["metrics"]
        assert c["dram_bytes"] == m["dram__bytes_read.sum"] + m["dram__bytes_write.sum"] > 0
        assert c["derived"]["global_ld_efficiency"] == pytest.approx(100.0)   # all of these read coalesced
        for name, gpu in gpus.GPUS.items():
            p = c["predictions"][name]
            assert p["dram_s"] == pytest.approx(c["dram_bytes"] / gpu.dram_bytes_per_s)
            assert p["l1_s"] == pytest.approx(c["l1_cycles"] / (gpu.sms * gpu.boost_clock_hz))
            assert p["bound_s"] == max(p["dram_s"], p["l1_s"], p["compute_s"]) and p["limit"] in ("dram", "l1", "compute")
            assert p["bound_s"] >= p["ideal_s"] * (1 - 1e-9)     # no kernel beats its op's roofline
        assert all("registers" in e or "resources_error" in e for e in c["launches"])
    real = [c.name for m in (elementwise, reduce) for c in m.cases(plan.cupy, "resnet50")]
    assert [c["name"] for c in data["cases"]] == real
    a100 = gpus.GPUS["A100"]
    for c in data["cases"]:
        assert "error" not in c, c
        assert c["predicted_s"] > 0 and c["launches"] and c["twin"]
        assert c["predicted_pct_copy_bw"] == pytest.approx(100 * c["bytes"] / c["predicted_s"] / a100.copy_bytes_per_s)
    table = capsys.readouterr().out
    assert "relu_forward f32" in table and "x ideal" in table and "A100" in table and "predicted us" in table


def test_kernels_bench_profile_beside_measured_times(tmp_path, capsys):
    # --measured: the cases of a GPU run's kernels.json beside their predictions, and the last line
    from bench import kernels as bk
    run = {"device": "a GPU", "cases": [
        {"group": "reduce", "name": "sum v2 [205520896]", "seconds": 320e-6},
        {"group": "reduce", "name": "sum v4 [205520896]", "seconds": 280e-6, "timing": "host hidden",
         "baseline_name": "our v3", "baseline_seconds": 310e-6, "baseline_timing": "host hidden"},
        {"group": "reduce", "name": "sum v9 [1]", "seconds": 1e-6}]}        # no such case: left out
    measured = tmp_path / "kernels.json"
    measured.write_text(json.dumps(run))
    out = tmp_path / "p.json"
    bk.main(["--profile", "--gpu", "H100", "--groups", "reduce", "--measured", str(measured), "--json", str(out)])
    data = json.loads(out.read_text())
    rows = {c["name"]: c for c in data["cases"]}
    # the baseline "our v3 ..." of the v4 row is version 3's time, under the name its own row has
    assert set(rows) == {"sum v2 [205520896]", "sum v3 [205520896]", "sum v4 [205520896]"}
    assert rows["sum v3 [205520896]"]["measured_s"] == 310e-6
    # a row without "timing" was timed per call (a file from before the host was hidden): beside it
    # the per-call prediction; a row timed with the host hidden, beside the kernels' own time
    v2 = rows["sum v2 [205520896]"]
    assert v2["measured_timing"] == "per call"
    assert v2["ratio"] == pytest.approx(v2["predicted_per_call_s"] / v2["measured_s"])
    for name in ("sum v3 [205520896]", "sum v4 [205520896]"):
        r = rows[name]
        assert r["measured_timing"] == "host hidden"
        assert r["ratio"] == pytest.approx(r["predicted_s"] / r["measured_s"])
        assert r["predicted_s"] < r["predicted_per_call_s"]
    s = data["summary"]
    assert s["count"] == 3 and s["pairs"] == 3
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1] == f"wrote {out}"
    assert lines[-2] == (f"predicted/measured: median {s['median']:.2f}, {s['within']} of 3 within 1.5x; "
                         f"version order agrees in {s['pairs_agree']} of 3 pairs")


def test_gpu_bounds_by_hand():
    from bench import gpus
    a100 = gpus.GPUS["A100"]
    # 2.039 GB at 2039 GB/s: 1 ms; 108 SMs x 1.41 GHz = 152.28e9 SM-cycles per second
    t = gpus.bound(a100, 2.039e9, 152.28e9 / 2, 19.5e12 / 4)
    assert t["dram_s"] == pytest.approx(1e-3) and t["l1_s"] == pytest.approx(0.5) and t["compute_s"] == pytest.approx(0.25)
    assert t["limit"] == "l1" and t["bound_s"] == t["l1_s"]
    assert gpus.ideal(a100, 2.039e9 / 2, 312e9, tensor_cores=True) == pytest.approx(1e-3)   # the FLOPs limit
    assert gpus.ideal(a100, 0, 0) is None
    m = dict.fromkeys(["l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum", "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
                       "l1tex__t_sectors_pipe_lsu_mem_global_op_atom.sum", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
                       "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum", "smsp__inst_executed_op_shared_atom.sum"], 0)
    m["l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"] = 400      # 100 cycles of 4 sectors
    m["l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum"] = 7  # 7 cycles
    assert gpus.l1_cycles(m) == 107
    assert {g.arch for g in gpus.GPUS.values()} == {"sm_60", "sm_70", "sm_80", "sm_90"}


# ---- bench.train ----------------------------------------------------------------------------------


def test_train_bench_tiny_cpu_and_emu(tmp_path, capsys):
    from bench import train as bt
    out = tmp_path / "t.json"
    res = bt.run(["cpu", "emu"], None, "tiny", out=str(out), steps=2, warmup=1, profile_steps=1, quiet=True)
    rows = {(r["device"], r["config"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 8 == len(res["rows"])
    for device in ("cpu", "emu"):
        r = rows[(device, "fp32-ours")]
        assert "error" not in r, r.get("traceback")
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and np.isfinite(r["loss"])
        assert r["images_per_s"] == pytest.approx(1e3 * r["batch"] / r["step_ms"])
        assert set(r["phases_ms"]) == {"forward", "backward", "optimizer"}
        assert all(v > 0 for v in r["phases_ms"].values())
        for cfg in ("fp32-cudnn", "amp-cudnn"):      # cuDNN needs the GPU: skipped, with the reason
            assert "cuda" in rows[(device, cfg)]["skipped"]
        amp = rows[(device, "amp-ours")]              # runs, or fails with its error in the table
        assert ("images_per_s" in amp) != ("error" in amp)
    table = capsys.readouterr().out
    assert "fp32-ours" in table and "skipped" in table


def test_train_bench_reports_a_failing_config_and_goes_on(monkeypatch):
    from bench import train as bt

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(bt, "build_setup", broken)
    row = bt.measure("fp32-ours", "cpu", "tiny", steps=1, warmup=0, profile_steps=1)
    assert row["error"] == "RuntimeError: simulated kernel failure"
    assert "images_per_s" not in row


def test_train_bench_tiny_same_loss_on_cpu_and_emu():
    """The cpu device (NumPy reference) and emu (our CUDA kernels, emulated) compute the same
    first loss from the same weights and batch. (Only the first: the tiny model is chaotic, a
    1e-7 relative change of the input moves some float64 gradients by 13%, so losses after a few
    steps legitimately differ.)"""
    from bench import train as bt
    a = bt.measure("fp32-ours", "cpu", "tiny", steps=1, warmup=0, profile_steps=1)
    b = bt.measure("fp32-ours", "emu", "tiny", steps=1, warmup=0, profile_steps=1)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert a["loss"] == pytest.approx(np.log(10), rel=0.3)     # 10 classes, fresh weights: near ln 10


@pytest.mark.slow
def test_converge_tiny_loss_falls():
    from bench import train as bt
    res = bt.converge("cpu", steps=20, size="tiny")
    assert len(res["losses"]) == 20 and all(np.isfinite(res["losses"]))
    assert res["ratio"] < 0.75, res["losses"]


# ---- data.device_prefetch -------------------------------------------------------------------------


def _batches(n, batch=3, last=None):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        b = last if (last and i == n - 1) else batch
        out.append((rng.integers(0, 256, (b, 4, 5, 3), dtype=np.uint8), np.full(b, i, np.int32)))
    return out


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_prefetcher_passes_host_batches_through_in_order(device):
    from data.device_prefetch import DevicePrefetcher
    batches = _batches(5, last=2)
    got = list(DevicePrefetcher(iter(batches), device))
    assert len(got) == 5
    for (xi, yi), (xo, yo) in zip(batches, got):
        assert xo is xi and yo is yi                  # the same objects: nothing copied
    assert [int(y[0]) for _, y in got] == [0, 1, 2, 3, 4]


def test_prefetcher_rejects_bad_arguments():
    from data.device_prefetch import DevicePrefetcher
    with pytest.raises(ValueError, match="device"):
        DevicePrefetcher([], "gpu")
    with pytest.raises(ValueError, match="slots"):
        DevicePrefetcher([], "cpu", slots=1)


@pytest.mark.gpu
@pytest.mark.parametrize("slots", [2, 3])
def test_prefetcher_copies_every_batch_exactly_on_gpu(slots):
    import cupy
    from data.device_prefetch import DevicePrefetcher
    batches = _batches(7, batch=8, last=5)
    sums = []
    for images, labels in DevicePrefetcher(iter(batches), "cuda", slots=slots):
        assert isinstance(images, cupy.ndarray) and images.dtype == np.uint8
        # keep the GPU busy so that the next copy really overlaps a running "step"
        _ = cupy.matmul(cupy.ones((2048, 2048), np.float32), cupy.ones((2048, 2048), np.float32))
        sums.append((int(images.astype(np.int64).sum()), labels.get().tolist(), images.shape))
    expect = [(int(x.astype(np.int64).sum()), y.tolist(), x.shape) for x, y in batches]
    assert sums == expect


# ---- bench.compare_torch --------------------------------------------------------------------------


def test_compare_torch_skips_cleanly_without_torch(tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"        # makes `import torch` raise ImportError
            "from bench import compare_torch\n"
            f"sys.exit(compare_torch.main(['--json', {str(tmp_path / 'c.json')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout and "PyTorch is not importable" in proc.stdout
    assert "skipped" in json.loads((tmp_path / "c.json").read_text())


def test_compare_torch_tiny_on_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    from bench import compare_torch as ct
    res = ct.run("cpu", "tiny", rounds=2, steps=1, warmup=1, out=str(tmp_path / "c.json"))
    check = res["loss_checks"][0]
    assert check["passed"], check
    assert check["loss_rel_diff"] < 1e-4
    (pair,) = res["pairs"]
    assert pair["ours"] == "fp32-ours" and pair["throughput_ratio"] > 0
    assert len(pair["ours_rates"]) == len(pair["torch_rates"]) == 2


def test_torch_model_has_torchvision_names_and_matches_in_float64():
    """The comparison's PyTorch ResNet-50 takes our state_dict strictly and computes our loss and
    gradients (float64: any difference is a real one, not rounding)."""
    torch = pytest.importorskip("torch")
    import nn
    from nn import functional as F
    from bench.compare_torch import _load_ours_into, torch_resnet50
    ours = nn.resnet50(num_classes=7, width=1 / 16, seed=2).to("cpu", dtype=np.float64)
    tm = _load_ours_into(torch, torch_resnet50(torch, 7, 1 / 16), ours, "cpu").double().train()
    assert list(tm.state_dict()) == list(ours.state_dict())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 24, 24, 3))
    y = rng.integers(0, 7, 3).astype(np.int32)
    loss = F.cross_entropy(ours(x, layout="NHWC"), y)
    loss.backward()
    tloss = torch.nn.functional.cross_entropy(tm(torch.from_numpy(x).permute(0, 3, 1, 2)), torch.from_numpy(y).long())
    tloss.backward()
    assert float(loss.data) == pytest.approx(tloss.item(), rel=1e-10)
    grads = dict(tm.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad, grads[name].grad.numpy(), rtol=1e-7, atol=1e-10, err_msg=name)


# ---- bench.gpu_check ------------------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_check_cpu_mode_end_to_end(tmp_path):
    from bench import ncu_probe
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu", "--out", str(out), "--budget", "170",
                           "--pytest-args", "tests/test_bench.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["env", "compile", "pytest", "train", "kernels", "ncu", "compare", "graph", "converge",
                            "launch"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    assert stages["ncu"]["summary"].startswith(f"driver: {len(ncu_probe.PROBES)} cases on the simulated GPU")
    for name in ("env.json", "kernels.json", "compare_torch.json", "converge.json", "train.json", "pytest.log",
                 "launch.json", "ncu_driver.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "converge.json").read_text())["passed"]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("launch")    # the summary table comes last
    # the GPU's stages ran on the simulated GPU: the cuda device, eager and captured as a graph
    assert "(simulated)" in stages["env"]["summary"]
    assert "cuda fp32-ours" in stages["train"]["summary"] and "cuda fp32-ours+graph" in stages["graph"]["summary"]
    assert " passed" in stages["pytest"]["summary"]


@pytest.mark.slow
def test_gpu_check_kills_a_stage_at_its_limit(tmp_path):
    from bench import gpu_check
    res = gpu_check.run_stage("sleepy", [sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(60)"],
                              5, tmp_path, None)
    assert res["status"] == "timeout" and res["rc"] is None
    assert 4.5 < res["seconds"] < 20
    assert "killed after its limit" in (tmp_path / "sleepy.log").read_text()
    ok = gpu_check.run_stage("quick", [sys.executable, "-c", "raise SystemExit(3)"], 30, tmp_path, None)
    assert ok["status"] == "failed" and ok["rc"] == 3


@pytest.mark.gpu
def test_train_bench_on_the_gpu_accounts_memory_eager_and_graphed():
    """bench.train's cuda path: the memory pool's high-water marks (the default pool, plus a graph's
    private pool) and a graphed configuration, at the tiny size."""
    from bench import train as bt
    eager = bt.measure("fp32-ours", "cuda", "tiny", steps=2, warmup=1, profile_steps=1)
    graphed = bt.measure("amp-ours", "cuda", "tiny", cuda_graph=True, steps=2, warmup=1)
    for row in (eager, graphed):
        assert "error" not in row, row.get("traceback", row)
        assert row["peak_reserved_bytes"] >= row["peak_used_bytes_sampled"] > 0 and row["device_used_bytes"] > 0
        assert np.isfinite(row["loss"]) and row["images_per_s"] > 0
    assert set(eager["phases_ms"]) == {"forward", "backward", "optimizer"} and graphed["phases_ms"] is None
    assert graphed["cuda_graph"] and graphed["loss_scale"] > 0
