"""bench/ncu_probe.py without a GPU: ncu's raw CSV parsed, the command line it runs, the paths
where ncu is missing or refused, the whole runner against a stand-in ncu, and the driver running
every case on the simulated GPU."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ncu_probe

ROOT = Path(__file__).resolve().parent.parent

# ncu --csv --page raw: the application's and ncu's own lines first, then a header row (identity
# columns, then one column per metric), a row of units under the metrics, one row per kernel.
# Values as ncu prints them: thousands separators, "n/a"; two columns in scaled units (as without
# --print-units base) to check the conversion.
RAW_CSV = """\
[ncu_probe] driver: 3 cases on a GPU, size resnet50
==PROF== Connected to process 4242 (/usr/bin/python3.12)
==PROF== Profiling "input_normalize_f32" - 0: 0%....50%....100% - 3 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","launch__grid_size","lts__t_sectors_op_read.sum","lts__t_sectors_op_write.sum","sm__warps_active.avg.pct_of_peak_sustained_active"
"","","","","","","","","","","","byte","Mbyte","usecond","","sector","sector","%"
"0","4242","python3.12","h","input_normalize_f32","1","7","(256, 1, 1)","(150528, 1, 1)","0","9.0","38,600,000","154.2","152.5","150,528","1,210,000","4,820,000","81.5"
"1","4242","python3.12","h","input_normalize_vec4_f32","1","7","(256, 1, 1)","(37632, 1, 1)","0","9.0","193,000,000","154.1","178.0","37,632","6,030,000","9,640,000","n/a"
"2","4242","python3.12","h","relu_forward_f16","1","7","(256, 1, 1)","(802816, 1, 1)","0","9.0","411,000,000","411.0","470.0","802,816","12,800,000","12,800,000","90.0"
"3","4242","python3.12","h","relu_forward_f16","1","7","(256, 1, 1)","(802816, 1, 1)","0","9.0","1,000","0.001","2.0","802,816","10","10","90.0"
==PROF== Disconnected from process 4242
"""


def _nvtx_csv(names):
    """The same report exported with --print-nvtx-rename kernel: each kernel named after its range."""
    lines = RAW_CSV.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    out = lines[:start + 2]
    for line, name in zip(lines[start + 2:], names):
        cells = line.split('","')
        cells[4] = name
        out.append('","'.join(cells))
    return "\n".join(out) + "\n"


PROBES = ncu_probe.select(["input_normalize u8->f32 v1", "input_normalize u8->f32 v2", "relu_forward f16 v1"])


def test_the_raw_csv_parses_into_base_units():
    rows, units = ncu_probe.parse_raw_csv(RAW_CSV)
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert [r["kernel"] for r in rows] == ["input_normalize_f32", "input_normalize_vec4_f32", "relu_forward_f16",
                                           "relu_forward_f16"]
    v2 = rows[1]["metrics"]
    assert v2["dram__bytes_read.sum"] == 193_000_000               # thousands separators gone
    assert v2["dram__bytes_write.sum"] == pytest.approx(154.1e6)   # Mbyte -> byte
    assert v2["gpu__time_duration.sum"] == pytest.approx(178_000)  # usecond -> nsecond
    assert v2["launch__grid_size"] == 37632
    assert v2["lts__t_sectors_op_write.sum"] == 9_640_000
    assert v2["sm__warps_active.avg.pct_of_peak_sustained_active"] is None     # n/a
    assert rows[0]["metrics"]["sm__warps_active.avg.pct_of_peak_sustained_active"] == 81.5
    assert units["dram__bytes_write.sum"] == "byte" and units["gpu__time_duration.sum"] == "nsecond"
    assert units["lts__t_sectors_op_read.sum"] == "sector"
    assert ncu_probe.parse_raw_csv("==ERROR== ERR_NVGPUCTRPERM\n") == ([], {})


def test_kernels_go_to_the_case_whose_nvtx_range_they_ran_in():
    raw, _ = ncu_probe.parse_raw_csv(RAW_CSV)
    # what --print-nvtx-rename kernel names them (a domain before the range is allowed)
    nvtx, _ = ncu_probe.parse_raw_csv(_nvtx_csv(["input_normalize_u8_f32_v1", "<default>@input_normalize_u8_f32_v2",
                                                 "relu_forward_f16_v1", "relu_forward_f16_v1"]))
    cases = ncu_probe.attribute(raw, nvtx, PROBES)
    assert list(cases) == ["input_normalize u8->f32 v1", "input_normalize u8->f32 v2", "relu_forward f16 v1"]
    assert list(cases["input_normalize u8->f32 v2"]) == ["input_normalize_vec4_f32"]
    assert cases["input_normalize u8->f32 v2"]["input_normalize_vec4_f32"]["dram__bytes_read.sum"] == 193e6
    assert list(cases["relu_forward f16 v1"]) == ["relu_forward_f16", "relu_forward_f16 #2"]   # launched twice
    totals = ncu_probe.measured_totals(cases["relu_forward f16 v1"])
    assert totals["dram_read_bytes"] == 411_001_000 and totals["seconds"] == pytest.approx(472e-9 * 1e3)
    assert totals["l2_sectors"] == 2 * 12_800_000 + 20
    # a range name that is only a part of another's is not taken for it
    nvtx, _ = ncu_probe.parse_raw_csv(_nvtx_csv(["input_normalize_u8_f32_v10", "x", "y", "z"]))
    assert list(ncu_probe.attribute(raw, nvtx, PROBES)) == ["(unattributed)"]
    # without the renamed export: in launch order, by the driver's manifest
    manifest = {"input_normalize u8->f32 v1": ["input_normalize_f32"], "input_normalize u8->f32 v2": ["x"],
                "relu_forward f16 v1": ["relu_forward_f16", "relu_forward_f16"]}
    by_order = ncu_probe.attribute(raw, [], PROBES, manifest)
    assert {k: list(v) for k, v in by_order.items()} == {k: list(v) for k, v in cases.items()}


def test_the_command_profiles_only_the_ranges_and_leaves_the_clocks_alone(tmp_path):
    argv = ncu_probe.ncu_command("/x/ncu", tmp_path / "rep", PROBES, python="/py")
    assert argv[0] == "/x/ncu"
    assert argv[argv.index("--clock-control") + 1] == "none"
    assert "--nvtx" in argv
    includes = [argv[i + 1] for i, a in enumerate(argv) if a == "--nvtx-include"]
    assert includes == ["input_normalize_u8_f32_v1/", "input_normalize_u8_f32_v2/", "relu_forward_f16_v1/"]
    assert argv[argv.index("--metrics") + 1].split(",") == ncu_probe.METRICS
    assert argv[argv.index("--export") + 1] == str(tmp_path / "rep")
    driver = argv[argv.index("/py"):]
    assert driver[:4] == ["/py", "-m", "bench.ncu_probe", "--driver"]
    assert driver[driver.index("--cases") + 1:] == [p.range for p in PROBES]
    export = ncu_probe.export_command("/x/ncu", tmp_path / "rep", nvtx_names=True)
    assert export[export.index("--import") + 1] == f"{tmp_path / 'rep'}.ncu-rep"
    assert {"--csv", "--page", "raw", "--print-units", "base", "--print-nvtx-rename"} <= set(export)
    # every range is letters, digits and underscores, and names one case
    ranges = [p.range for p in ncu_probe.PROBES]
    assert len(set(ranges)) == len(ranges) and all(r.replace("_", "").isalnum() for r in ranges)


def test_the_cases_and_metrics_are_the_ones_asked_for():
    names = {p.name for p in ncu_probe.PROBES}
    for want in ("input_normalize u8->f32 v1", "input_normalize u8->f32 v2", "input_normalize u8->f32 v3",
                 "input_normalize u8->f16 v1", "input_normalize u8->f16 v3", "maxpool2d_backward v1",
                 "maxpool2d_backward v2", "maxpool2d_backward v3", "maxpool2d_backward f16 v2",
                 "maxpool2d_backward f16 v3", "relu_forward f16 v1", "relu_forward f16 v2",
                 "global_avgpool_backward f16 v2", "global_avgpool_backward f16 v3"):
        assert want in names
    assert {p.version for p in ncu_probe.PROBES if p.family == "batchnorm"} == {4, 5}
    assert {"dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_sectors_op_write.sum",
            "gpu__time_duration.sum"} <= set(ncu_probe.METRICS)
    with pytest.raises(ValueError, match="unknown case"):
        ncu_probe.select(["no such case"])


def _fake_ncu(folder, body):
    """An executable `ncu` in `folder` running the Python `body` (sys.argv as ncu's)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ncu"
    path.write_text(f"#!{sys.executable}\nimport sys, os, json\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def no_ncu(monkeypatch, tmp_path):
    """PATH without ncu, no fallback places, not on the simulated GPU."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(ncu_probe, "NCU_PLACES", [str(tmp_path / "nowhere" / "*" / "ncu")])
    monkeypatch.delenv("KERNELS_CUDASIM", raising=False)
    return empty


def test_no_ncu_is_one_line_and_a_skipped_status(no_ncu, tmp_path, capsys):
    assert ncu_probe.find_ncu() is None
    assert ncu_probe.main(["--out", str(tmp_path / "o"), "--no-predict"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("ncu_probe: skipped: no ncu")
    result = json.loads((tmp_path / "o" / "ncu.json").read_text())
    assert result["status"] == "skipped" and result["reason"] == "ncu not found" and result["cases"] == {}


def test_ncu_is_found_in_the_fallback_places_newest_first(no_ncu, tmp_path, monkeypatch):
    for version in ("2023.3.1", "2025.2.1"):
        _fake_ncu(tmp_path / "nsight" / version, "")
    monkeypatch.setattr(ncu_probe, "NCU_PLACES", [str(tmp_path / "cuda" / "ncu"), str(tmp_path / "nsight" / "*" / "ncu")])
    assert ncu_probe.find_ncu() == str(tmp_path / "nsight" / "2025.2.1" / "ncu")
    _fake_ncu(no_ncu, "")
    assert ncu_probe.find_ncu() == str(no_ncu / "ncu")        # PATH first


@pytest.mark.parametrize("error", [
    # ncu's own line when the driver keeps the counters to administrators
    "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance Counters on "
    "the target device 0. For instructions on enabling permissions and to get more information see "
    "https://developer.nvidia.com/ERR_NVGPUCTRPERM",
    # ncu's profiling library not loaded (matched by this token)
    "==ERROR== Failed to initialize the profiler: LibraryNotLoaded",
])
def test_counters_refused_is_a_skip_not_a_failure(no_ncu, tmp_path, capsys, error):
    _fake_ncu(no_ncu, f"if '--version' in sys.argv: print('Version 2025.2.1'); sys.exit(0)\n"
                      f"print('==PROF== Connected to process 1 (python)')\nprint({error!r}, file=sys.stderr)\n"
                      f"sys.exit(1)")
    assert ncu_probe.main(["--out", str(tmp_path / "o"), "--no-predict"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"ncu_probe: skipped: ncu cannot read the GPU's counters: {error}"
    result = json.loads((tmp_path / "o" / "ncu.json").read_text())
    assert result["status"] == "skipped" and result["reason"] == error
    assert error in (tmp_path / "o" / "ncu.log").read_text()


def test_the_runner_end_to_end_with_a_stand_in_ncu(no_ncu, tmp_path, capsys):
    """A stand-in ncu that knows no launch__grid_size (the runner drops it and runs again), writes
    a report, and exports the raw page (renamed by NVTX range when asked)."""
    raw = tmp_path / "raw.csv"
    raw.write_text(RAW_CSV)
    renamed = tmp_path / "nvtx.csv"
    renamed.write_text(_nvtx_csv(["input_normalize_u8_f32_v1", "input_normalize_u8_f32_v2", "relu_forward_f16_v1",
                                  "relu_forward_f16_v1"]))
    calls = tmp_path / "calls.jsonl"
    _fake_ncu(no_ncu, f"""
with open({str(calls)!r}, 'a') as f: f.write(json.dumps(sys.argv[1:]) + '\\n')
if '--version' in sys.argv: print('NVIDIA (R) Nsight Compute Command Line Profiler\\nVersion 2025.2.1.0'); sys.exit(0)
if '--import' in sys.argv:
    print(open({str(renamed)!r} if '--print-nvtx-rename' in sys.argv else {str(raw)!r}).read(), end='')
    sys.exit(0)
metrics = sys.argv[sys.argv.index('--metrics') + 1]
if 'launch__grid_size' in metrics:
    print('==ERROR== Failed to find metric regex:^launch__grid_size$'); sys.exit(1)
open(sys.argv[sys.argv.index('--export') + 1] + '.ncu-rep', 'w').write('report')
""")
    out_dir = tmp_path / "o"
    assert ncu_probe.main(["--out", str(out_dir), "--no-predict", "--cases", *[p.range for p in PROBES]]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out_dir / "ncu.json").read_text())
    assert result["status"] == "ok" and result["ncu_version"] == "Version 2025.2.1.0"
    assert result["dropped_metrics"] == ["launch__grid_size"] and "launch__grid_size" not in result["metrics"]
    assert result["cases"]["input_normalize u8->f32 v1"]["input_normalize_f32"]["dram__bytes_read.sum"] == 38.6e6
    assert result["units"]["gpu__time_duration.sum"] == "nsecond"
    assert (out_dir / "ncu_raw.csv").read_text() == RAW_CSV and (out_dir / "ncu_raw_nvtx.csv").exists()
    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    profiled = [a for a in runs if "--metrics" in a]
    assert len(profiled) == 2 and all(a[a.index("--clock-control") + 1] == "none" for a in profiled)
    assert sum("--print-nvtx-rename" in a for a in runs if "--import" in a) == 1
    # the table: one row per case, the measured figures (no predictions asked)
    rows = [line for line in printed.splitlines() if line.startswith(("input_normalize", "relu_forward"))]
    assert len(rows) == 3 and "193.0" in rows[1] and "178.0" in rows[1]


def test_the_table_puts_the_model_beside_the_measurement():
    raw, _ = ncu_probe.parse_raw_csv(RAW_CSV)
    result = {"cases": {"input_normalize u8->f32 v2": {"input_normalize_vec4_f32": raw[1]["metrics"]}},
              "predicted": {"input_normalize u8->f32 v2": {"kernel_seconds": 89e-6, "dram_read_bytes": 38.6e6,
                                                           "dram_written_bytes": 154.1e6, "l2_sectors": 7.83e6}}}
    lines = []
    ncu_probe.print_table(result, say=lines.append)
    row = next(line for line in lines if line.startswith("input_normalize u8->f32 v2"))
    assert row.split()[3:] == ["1", "178.0", "89.0", "2.00", "193.0", "38.6", "5.00", "154.1", "154.1", "1.00",
                               "15.67", "7.83", "2.00"]


def test_the_driver_runs_every_case_on_the_simulated_gpu(tmp_path):
    """`--driver --check` under KERNELS_CUDASIM=1: every case at the small shape, each result checked
    against the float64 reference, each case's kernels recorded (ranges are no-ops there)."""
    manifest = tmp_path / "driver.json"
    proc = subprocess.run([sys.executable, "-m", "bench.ncu_probe", "--driver", "--check", "--manifest", str(manifest)],
                          cwd=ROOT, env=dict(os.environ, KERNELS_CUDASIM="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = json.loads(manifest.read_text())
    assert ran["device"] == "the simulated GPU" and ran["size"] == "emu"
    assert list(ran["cases"]) == [p.name for p in ncu_probe.PROBES]
    assert all(ran["cases"].values()), ran["cases"]            # every case launched a kernel of its own
    assert ran["cases"]["input_normalize u8->f32 v2"] == ["input_normalize_vec4_f32"]
    assert proc.stdout.count("; ok error") == len(ncu_probe.PROBES)
    assert proc.stdout.rstrip().endswith(f"{len(ncu_probe.PROBES)} cases ran on the simulated GPU")


def test_the_runner_says_the_simulated_gpu_has_nothing_for_ncu(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KERNELS_CUDASIM", "1")
    assert ncu_probe.main(["--out", str(tmp_path), "--no-predict"]) == 0
    assert json.loads((tmp_path / "ncu.json").read_text())["status"] == "skipped"
    assert "simulated" in capsys.readouterr().out
