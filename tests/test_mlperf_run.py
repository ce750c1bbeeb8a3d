"""Running the benchmark the way MLPerf runs it: run_and_time.sh, the Dockerfile, the summariser.

- bench/mlperf_result.py on hand-written MLPerf logs: time to train, epochs to converge, status,
  junk lines between and inside MLLOG lines, several runs per file, and the MLPerf score (drop
  the fastest and the slowest) checked against an independent computation.
- The Dockerfile without a Docker engine: every instruction known, continuation lines
  well-formed, the CUDA_MAJOR build argument declared and used, one base stage per CUDA major,
  and its pip command the README's (one source of truth for the install).
- run_and_time.sh: bash syntax, usage errors, a failing run (no dataset), and end to end on the
  CPU against a tiny packed synthetic dataset: the RESULT line and the summariser reading the log.
"""

import configparser
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench import mlperf_result as mr

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_and_time.sh"
RESULT_RE = re.compile(r"^RESULT,IMAGE_CLASSIFICATION,(\d+),(\d+(?:\.\d+)?),([^,]+),(\d{4}-\d\d-\d\d .+)$")


# -- hand-written logs ----------------------------------------------------------------------

def mllog(key, time_ms, value=None, event_type="POINT_IN_TIME", **metadata):
    """One line as mlperf_logging.mllog writes it."""
    meta = {"file": "train.py", "lineno": 1, **metadata}
    return ":::MLLOG " + json.dumps({"namespace": "", "time_ms": time_ms, "event_type": event_type,
                                     "key": key, "value": value, "metadata": meta})


def run_lines(t0, seed, duration_ms, accuracies, status, init_ms=2000, batch=256):
    """The MLLOG lines of one run: init, run_start at t0 + init_ms, one eval per epoch, run_stop."""
    lines = [mllog("cache_clear", t0, True), mllog("init_start", t0, event_type="INTERVAL_START"),
             mllog("submission_benchmark", t0, "resnet"), mllog("seed", t0 + 1, seed),
             mllog("global_batch_size", t0 + 1, batch), mllog("init_stop", t0 + init_ms, event_type="INTERVAL_END"),
             mllog("run_start", t0 + init_ms, event_type="INTERVAL_START")]
    step = duration_ms // (len(accuracies) + 1)
    for epoch, acc in enumerate(accuracies, start=1):
        t = t0 + init_ms + epoch * step
        lines += [mllog("epoch_start", t - step + 1, event_type="INTERVAL_START", epoch_num=epoch),
                  mllog("epoch_stop", t, event_type="INTERVAL_END", epoch_num=epoch),
                  mllog("eval_accuracy", t + 1, acc, epoch_num=epoch)]
    if status is not None:
        lines.append(mllog("run_stop", t0 + init_ms + duration_ms, event_type="INTERVAL_END", status=status))
    return lines


def write_log(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_one_run_with_junk_lines(tmp_path):
    lines = run_lines(1_700_000_000_000, 7, 123_456, [0.31, 0.62, 0.7512], "success")
    junk = ["Warning: something unrelated", "", "epoch 1/3:  40%|####      | 4/10 [00:01<00:02]",
            ":::MLLOG {\"namespace\": \"\", \"time_ms\": 17000",       # cut short: skipped
            "+ set -x", "ENDING TIMING RUN AT 2026-01-01 01:00:00 PM"]
    mixed = []
    for i, line in enumerate(lines):
        mixed.append(junk[i % len(junk)])
        # a progress bar redrawn with \r right before the tag, on the same line
        mixed.append(("eval  50%|#####     | 1/2\r" + line) if i % 3 == 0 else line)
    r = mr.parse_log(write_log(tmp_path / "a.log", mixed))
    assert r["status"] == "success" and r["converged"] is True
    assert r["time_to_train_s"] == pytest.approx(123.456, abs=1e-9)
    assert r["init_s"] == pytest.approx(2.0)
    assert r["seed"] == 7 and r["global_batch_size"] == 256
    assert r["epochs_to_converge"] == 3 and r["last_epoch"] == 3 and r["evals"] == 3
    assert r["final_accuracy"] == pytest.approx(0.7512) and r["best_accuracy"] == pytest.approx(0.7512)
    assert r["skipped_lines"] == sum(1 for i in range(len(lines)) if junk[i % len(junk)].startswith(":::MLLOG"))
    assert r["warnings"] == []


def test_target_picks_the_first_eval_that_reaches_it(tmp_path):
    path = write_log(tmp_path / "a.log", run_lines(0, 1, 90_000, [0.2, 0.5, 0.4, 0.8], "success"))
    assert mr.parse_log(path, target=0.45)["epochs_to_converge"] == 2
    assert mr.parse_log(path, target=0.75)["epochs_to_converge"] == 4
    r = mr.parse_log(path, target=0.9)  # the log says success, but no eval reached 0.9
    assert r["epochs_to_converge"] is None and any("0.9" in w for w in r["warnings"])
    with pytest.raises(ValueError, match="target"):
        mr.parse_log(path, target=1.5)


def test_aborted_and_incomplete_runs(tmp_path):
    aborted = mr.parse_log(write_log(tmp_path / "ab.log", run_lines(0, 3, 50_000, [0.1, 0.2], "aborted")))
    assert aborted["status"] == "aborted" and aborted["converged"] is False
    assert aborted["time_to_train_s"] == pytest.approx(50.0)
    assert aborted["epochs_to_converge"] is None and aborted["last_epoch"] == 2
    assert aborted["final_accuracy"] == pytest.approx(0.2)

    killed = mr.parse_log(write_log(tmp_path / "k.log", run_lines(0, 4, 50_000, [0.1], None)))
    assert killed["status"] == "incomplete" and killed["time_to_train_s"] is None
    assert any("run_stop" in w for w in killed["warnings"])


def test_several_runs_in_one_file_are_split(tmp_path):
    lines = (run_lines(0, 1, 10_000, [0.3], "aborted") + ["some output"]
             + run_lines(100_000, 2, 20_000, [0.5, 0.8], "success"))
    runs = mr.parse_runs(write_log(tmp_path / "two.log", lines))
    assert [r["seed"] for r in runs] == [1, 2]
    assert [r["run_in_file"] for r in runs] == [1, 2]
    assert [r["time_to_train_s"] for r in runs] == pytest.approx([10.0, 20.0])
    assert mr.parse_log(tmp_path / "two.log")["seed"] == 2


def test_unreadable_logs_give_clear_errors(tmp_path):
    empty = tmp_path / "plain.log"
    empty.write_text("no mlperf lines here\n")
    with pytest.raises(ValueError, match="plain.log.*no ':::MLLOG"):
        mr.parse_log(empty)
    with pytest.raises(ValueError, match="missing.log.*cannot read"):
        mr.parse_log(tmp_path / "missing.log")


def _olympic_reference(times):
    """MLPerf's rule, written independently: inf for a failed run; drop min and max; mean."""
    ordered = sorted(times)
    kept = ordered[1:-1] if len(ordered) >= 3 else ordered
    return None if any(math.isinf(t) for t in kept) else math.fsum(kept) / len(kept)


@pytest.mark.parametrize("n, failed", [(5, 0), (5, 1), (5, 2), (7, 0), (3, 1), (2, 0), (1, 0), (2, 1)])
def test_score_matches_an_independent_computation(n, failed):
    rng = random.Random(n * 10 + failed)
    times = [rng.uniform(3000.0, 9000.0) for _ in range(n)]
    runs = [{"time_to_train_s": t, "converged": True} for t in times]
    for i in rng.sample(range(n), failed):
        runs[i]["converged"] = False
        times[i] = math.inf
    s = mr.score(runs)
    expected = _olympic_reference(times)
    if expected is None:
        assert s["score_s"] is None and any("did not converge" in note for note in s["notes"])
    else:
        assert s["score_s"] == pytest.approx(expected, rel=1e-12)
    assert s["runs"] == n and s["converged"] == n - failed
    if n >= 3:
        assert len(s["dropped"]) == 2 and len(s["used"]) == n - 2
        assert {times[i] for i in s["dropped"]} == {min(times), max(times)}
    else:
        assert s["dropped"] == [] and any("fewer than 3" in note for note in s["notes"])
    assert sorted(s["used"] + s["dropped"]) == list(range(n))


def test_score_refuses_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        mr.score([])
    with pytest.raises(ValueError, match=r"results\[1\]"):
        mr.score([{"time_to_train_s": 1.0, "converged": True}, {"seconds": 2.0}])


def test_cli_table_json_and_single_figures(tmp_path, capsys):
    rng = random.Random(5)
    logs, times = [], []
    for seed in range(1, 6):
        ms = rng.randrange(4_000_000, 6_000_000)
        times.append(ms / 1000)
        logs.append(str(write_log(tmp_path / f"seed{seed}.log",
                                  run_lines(seed * 10**7, seed, ms, [0.5, 0.7, 0.75], "success"))))
    out_json = tmp_path / "result.json"
    assert mr.main(logs + ["--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    for log in logs:
        assert log in table
    expected = _olympic_reference(times)
    assert f"score: {expected:.1f} s" in table
    data = json.loads(out_json.read_text())
    assert data["score"]["score_s"] == pytest.approx(expected)
    assert [r["seed"] for r in data["runs"]] == [1, 2, 3, 4, 5]

    assert mr.main(["--time-to-train", logs[0]]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(times[0], abs=1e-3)
    assert mr.main(["--status", logs[0]]) == 0
    assert capsys.readouterr().out.strip() == "success"

    killed = write_log(tmp_path / "killed.log", run_lines(0, 9, 1000, [0.1], None))
    assert mr.main(["--time-to-train", str(killed)]) == 1
    assert "no time to train" in capsys.readouterr().err
    assert mr.main([str(tmp_path / "nope.log")]) == 2
    assert "cannot read" in capsys.readouterr().err


# -- the Dockerfile, without Docker ---------------------------------------------------------

DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                       "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse_dockerfile(text):
    """[(INSTRUCTION, arguments with continuations joined, first line number)]; comment lines
    and blank lines are skipped, also inside a continuation (as Docker does).
    Raises AssertionError on a malformed file."""
    instructions, pending, start = [], None, 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert not re.search(r"\\[ \t]+$", raw), f"line {number}: whitespace after a line-continuation backslash"
        continued = line.endswith("\\")
        body = line[:-1].rstrip() if continued else line
        if pending is None:
            pending, start = body, number
        else:
            pending += " " + body
        if not continued:
            word, _, args = pending.partition(" ")
            instructions.append((word, args.strip(), start))
            pending = None
    assert pending is None, f"line {start}: the file ends inside a continued instruction"
    return instructions


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def readme_gpu_installs():
    """{CUDA major: the pip command} from README.md's table of GPU installs."""
    table = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"^\|\s*(\d+)\.x\b[^|]*\|\s*`(pip install [^`]+)`", line)
        if m:
            table[int(m.group(1))] = m.group(2)
    return table


def test_parser_catches_malformed_files():
    assert parse_dockerfile("FROM x\n# c\nRUN a \\\n  # inner comment\n  b\n") == [("FROM", "x", 1), ("RUN", "a b", 3)]
    with pytest.raises(AssertionError, match="ends inside"):
        parse_dockerfile("FROM x\nRUN a \\\n")
    with pytest.raises(AssertionError, match="whitespace after"):
        parse_dockerfile("FROM x\nRUN a \\ \n b\n")


def test_dockerfile_instructions_are_known(dockerfile):
    assert dockerfile, "empty Dockerfile"
    for word, args, line in dockerfile:
        assert word in DOCKER_INSTRUCTIONS, f"Dockerfile line {line}: unknown instruction {word!r}"
        assert word.isupper(), f"Dockerfile line {line}: write instructions in upper case ({word})"
        assert args, f"Dockerfile line {line}: {word} without arguments"
    assert dockerfile[0][0] in ("ARG", "FROM"), "a Dockerfile starts with ARG or FROM"
    cmd = [args for word, args, _ in dockerfile if word == "CMD"]
    assert len(cmd) == 1 and json.loads(cmd[0]) == ["./run_and_time.sh"]
    assert any(word == "WORKDIR" for word, _, _ in dockerfile)
    assert ("COPY", ". .", ) in [(w, a) for w, a, _ in dockerfile]


def test_cuda_major_selects_base_image_and_extra(dockerfile):
    first_from = next(i for i, (word, _, _) in enumerate(dockerfile) if word == "FROM")
    global_args = dict(a.partition("=")[::2] for w, a, _ in dockerfile[:first_from] if w == "ARG")
    assert global_args.get("CUDA_MAJOR") == "12", "ARG CUDA_MAJOR=12 must come before the first FROM"

    stages = {}
    for word, args, line in dockerfile:
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, f"Dockerfile line {line}: FROM {args}"
            image = re.sub(r"\$\{(\w+)\}", lambda v: global_args.get(v.group(1), v.group(0)), m.group(1))
            stages[m.group(2)] = image
    final_from = [a for w, a, _ in dockerfile if w == "FROM"][-1]
    assert "${CUDA_MAJOR}" in final_from, "the last FROM must pick the stage by CUDA_MAJOR"
    final_index = max(i for i, (w, _, _) in enumerate(dockerfile) if w == "FROM")
    assert ("ARG", "CUDA_MAJOR") in [(w, a) for w, a, _ in dockerfile[final_index:]], \
        "re-declare ARG CUDA_MAJOR after the last FROM, or RUN cannot see it"

    run_text = " ".join(a for w, a, _ in dockerfile if w == "RUN")
    mapping = {int(m.group(1)): m.group(2) for m in re.finditer(r"\b(\d+)\)\s*echo\s+([\w-]+)\s*;;", run_text)}
    assert "$CUDA_MAJOR" in run_text
    extras = configparser.ConfigParser()
    extras.read(ROOT / "setup.cfg")
    known_extras = set(extras["options.extras_require"])
    assert set(mapping) == {11, 12, 13}
    for major, extra in mapping.items():
        stage = re.sub(r"\$\{CUDA_MAJOR\}", str(major), final_from.split()[0])
        assert stage in stages, f"CUDA_MAJOR={major}: no stage named {stage}"
        image = stages[stage]
        assert re.fullmatch(rf"nvidia/cuda:{major}\.\d+\.\d+-[\w-]*devel[\w-]*-ubuntu\d\d\.\d\d", image), \
            f"CUDA_MAJOR={major}: base image {image} is not an nvidia/cuda {major}.x devel image"
        assert extra in known_extras, f"CUDA_MAJOR={major}: extra {extra!r} is not in setup.cfg"


def test_dockerfile_installs_exactly_as_readme(dockerfile):
    readme = readme_gpu_installs()
    assert set(readme) == {11, 12, 13}, f"README.md's GPU install table changed: {readme}"
    run_text = " ".join(a for w, a, _ in dockerfile if w == "RUN")
    mapping = {int(m.group(1)): m.group(2) for m in re.finditer(r"\b(\d+)\)\s*echo\s+([\w-]+)\s*;;", run_text)}
    # every pip install but pip's own upgrade must be the README's command
    installs = [cmd.strip() for w, a, _ in dockerfile if w == "RUN" for cmd in re.split(r"&&|;", a)
                if "pip install" in cmd and not re.search(r"install\s+(-U|--upgrade)\s+pip\s*$", cmd)]
    assert installs, "the Dockerfile installs nothing with pip"
    for command in installs:
        for major, extra in mapping.items():
            resolved = command.replace("$GPU_EXTRA", extra).replace("${GPU_EXTRA}", extra)
            assert shlex.split(resolved) == shlex.split(readme[major]), \
                f"CUDA_MAJOR={major}: Dockerfile runs `{resolved}`, README.md says `{readme[major]}`"


def test_dockerignore_keeps_what_the_build_needs():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert ".git" in patterns and "runs" in patterns
    needed = ["setup.cfg", "pyproject.toml", "README.md", "train.py", "run_and_time.sh", "kernels", "nn", "data",
              "bench"]
    for name in needed:
        assert not any(Path(name).match(p.rstrip("/")) or p in ("*", "**") for p in patterns), \
            f".dockerignore would leave {name} out of the image"


# -- run_and_time.sh ------------------------------------------------------------------------

def run_script(args, env_extra=None, timeout=120, cwd=None):
    """run_and_time.sh ARGS with this interpreter, from `cwd` (default: a folder outside the project)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SEED", "TRAIN_ARGS", "RUN_DIR", "DATA_DIR")}
    env.update(PYTHON=sys.executable, **(env_extra or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=cwd or "/")


def test_script_syntax_and_usage(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert os.access(SCRIPT, os.X_OK), "run_and_time.sh must be executable"
    for args in ([], ["abc"], ["1", "2"], ["-3"]):
        proc = run_script(args, {"RUN_DIR": str(tmp_path / "never")})
        assert proc.returncode == 2, (args, proc.stderr)
        assert "usage:" in proc.stderr and "RESULT" not in proc.stdout
    assert not (tmp_path / "never").exists()
    text = SCRIPT.read_text()
    code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert code[-1].startswith('main "$@"'), \
        "run_and_time.sh must run from one function, so that editing it during a run cannot break the run"
    for fetch in ("pip install", "curl ", "wget "):
        assert fetch not in text, f"run_and_time.sh must not fetch anything at run time ({fetch.strip()})"


def _check_timing_lines(stdout, seed):
    lines = stdout.splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith("STARTING TIMING RUN AT ")]
    end = [i for i, line in enumerate(lines) if line.startswith("ENDING TIMING RUN AT ")]
    results = [line for line in lines if line.startswith("RESULT,")]
    assert len(start) == 1 and len(end) == 1 and start[0] < end[0], stdout[-2000:]
    assert len(results) == 1 and lines[-1] == results[0], "the RESULT line must come last"
    m = RESULT_RE.match(results[0])
    assert m, f"malformed RESULT line: {results[0]!r}"
    assert int(m.group(1)) == seed
    assert m.group(4) == lines[start[0]][len("STARTING TIMING RUN AT "):], "RESULT's date is the start date"
    return float(m.group(2))


@pytest.mark.slow
def test_script_fails_cleanly_without_data(tmp_path):
    proc = run_script(["4"], {"DATA_DIR": str(tmp_path / "no-such-dir"), "RUN_DIR": str(tmp_path / "run")})
    assert proc.returncode == 2, proc.stderr[-2000:]  # train.py's exit status for a missing dataset
    seconds = _check_timing_lines(proc.stdout, 4)
    assert seconds >= 0
    assert "target not reached" in proc.stderr


@pytest.fixture(scope="module")
def tiny_dataset(tiny_data):
    """A tiny packed synthetic dataset (train.lmdb, val.lmdb): train.py's own 'tiny' one (conftest)."""
    return tiny_data


# A very small ResNet-50 v1.5 (1/16 of the width) on 32x32 crops of 4 classes, on 1 CPU process.
TINY_ARGS = "--device cpu --workers 0 --no-progress --batch-size 16 --width 0.0625 --image-size 32"


@pytest.mark.slow
def test_end_to_end_on_the_cpu(tiny_dataset, tmp_path):
    # Target 0.1 on 4 balanced classes: reached unless nearly every validation image is wrong.
    # RUN_DIR relative to the caller's directory, as a user would give it
    run_dir = tmp_path / "runs" / "seed1"
    proc = run_script(["1"], {"DATA_DIR": str(tiny_dataset), "RUN_DIR": "runs/seed1",
                              "TRAIN_ARGS": TINY_ARGS + " --epochs 3 --target-accuracy 0.1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seconds = _check_timing_lines(proc.stdout, 1)
    run = mr.parse_log(run_dir / "mlperf.log")
    assert run["status"] == "success" and run["seed"] == 1
    assert seconds == pytest.approx(run["time_to_train_s"], abs=1e-3), "RESULT must give the log's time to train"
    assert 0 < seconds < 60
    assert run["epochs_to_converge"] in (1, 2, 3) and run["final_accuracy"] >= 0.1
    # the console log (what `| tee benchmark-$NOW.log` keeps) reads the same as mlperf.log
    console = tmp_path / "benchmark.log"
    console.write_text(proc.stdout)
    assert mr.parse_log(console)["time_to_train_s"] == run["time_to_train_s"]
    cli = subprocess.run([sys.executable, "-m", "bench.mlperf_result", str(run_dir / "mlperf.log")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert cli.returncode == 0 and "success" in cli.stdout and "fewer than 3 runs" in cli.stdout


@pytest.mark.slow
def test_end_to_end_target_not_reached(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script(["2"], {"DATA_DIR": str(tiny_dataset), "RUN_DIR": str(run_dir),
                              "TRAIN_ARGS": TINY_ARGS + " --epochs 1 --target-accuracy 1.0"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    seconds = _check_timing_lines(proc.stdout, 2)
    run = mr.parse_log(run_dir / "mlperf.log")
    assert run["status"] == "aborted" and run["epochs_to_converge"] is None and run["last_epoch"] == 1
    assert seconds == pytest.approx(run["time_to_train_s"], abs=1e-3)
    assert "target not reached" in proc.stderr
