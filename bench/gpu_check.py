"""One command that checks a GPU machine end to end: `python -m bench.gpu_check --out DIR`.

Stages, one at a time, each a subprocess with its own time limit (a stage that runs out is killed
with its children, reported as "timeout", and the next stage still runs); all within --budget
seconds (480 = 8 minutes by default), everything written under DIR:

    env         GPU, driver, CUDA, CuPy / NumPy / PyTorch versions, where each CUDA header
                comes from (kernels/runtime/cuda_env.py)                   env.json
    compile     every kernels/*.cu compiled once, in parallel processes (fills CuPy's kernel
                cache, so no later stage pays NVRTC; the emulator's cache in --cpu mode)
    pytest      the GPU test suite: pytest -m gpu (-n 8 with pytest-xdist, where installed;
                nothing is timed while it runs)                            pytest.log
    train       throughput + per-phase breakdown + peak memory (bench.train)   train.json
    kernels     per-kernel microbenchmarks: python -m bench.kernels        kernels.json
    ncu         Nsight Compute's DRAM bytes and L2 sectors of the cases the performance model
                orders wrongly, beside its predictions (bench.ncu_probe; "skipped" without ncu
                or without permission to read the counters)                ncu/ncu.json
    compare     our training step beside PyTorch's (bench.compare_torch)   compare_torch.json
    graph       the step captured as a CUDA graph                          train_graph.json
    converge    200 steps on synthetic textures; the loss must fall        converge.json
    launch      host time per kernel launch, ours beside CuPy's (bench.launch)   launch.json
and prints one summary table last (also in summary.json). Every stage's output is in
DIR/<stage>.log; the lines a benchmark prints as it starts each configuration ("[bench.train]
cuda fp32-ours: starting") are shown on the console as they come.

Fail fast: when a stage ends with a CudaSetupError (NVRTC or a CUDA header missing: the line
"...: stopped: CudaSetupError: ..." that every benchmark ends with, exit code 2), that line is
printed and the stages after it are not run (they would fail the same way); exit code 2.
--keep-going runs them anyway.

It installs nothing: it needs CuPy (for your CUDA version: pip install -e ".[gpu]" or
".[gpu-cuda13]"); PyTorch is optional (the compare stage then says "skipped").

    python -m bench.gpu_check --out gpu_check_out
    python -m bench.gpu_check --cpu --out /tmp/check       # no GPU: the same stages at tiny sizes on
                                                           # the simulated GPU (KERNELS_CUDASIM=1: the
                                                           # cuda code paths, kernels on the emulator),
                                                           # the emulator and the cpu device

Exit code 0 when every stage that ran passed (skipped stages do not count), 2 after a setup
error, 1 otherwise.
"""

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
from bench import EXIT_SETUP, SETUP_STOP, stop_on_setup_error

# The time limit of each stage on a GPU, in seconds (bench/NOTES.md, "A GPU session": where
# each figure comes from). The first GPU run (an H100) took: pytest -m gpu -n 8 22 s with
# conv/gemm failing fast; kernels under 80 s with 100 cases timed; compare over 110 s (killed;
# PyTorch's side alone); launch under 40 s. Compile: NVRTC, the slowest file (conv.cu) ~10 s
# per architecture on one core of a 2-core CPU. ncu: 19 cases at the ResNet-50 shapes, each kernel
# replayed for its metrics (not measured yet; ncu stops itself 10 s before, so that ncu.json says
# why). The stages up to ncu fit gpu_session.sh's --budget 500 with their whole limits (env and
# compile gave 25 s for it: both take seconds to tens of seconds), so the probe runs in full
# however long the tests and benchmarks before it take.
GPU_LIMITS = {"env": 20, "compile": 75, "pytest": 150, "train": 90, "kernels": 90, "ncu": 75, "compare": 130,
              "graph": 60, "converge": 60, "launch": 30}


def _py(*args):
    return [sys.executable, *args]


def _per_test_timeout():
    """--timeout=120 when pytest-timeout is installed (one stuck GPU test must not eat the stage)."""
    return ["--timeout=120"] if importlib.util.find_spec("pytest_timeout") else []


def _xdist(workers):
    """-n WORKERS when pytest-xdist is installed (the GPU tests in parallel processes), else nothing."""
    return ["-n", str(workers)] if importlib.util.find_spec("xdist") else []


def stage_plan(cpu, out, pytest_args, jobs=None):
    """[(name, argv, time limit in seconds, json file or None)] for GPU or CPU mode, in the order
    they run. jobs: processes for the compile stage (default: the CPU count, at most 8)."""
    j = lambda name: str(Path(out) / name)
    jobs = jobs or min(8, os.cpu_count() or 1)
    if cpu:
        return [
            ("env", _py("-m", "bench.gpu_check", "--print-env"), 30, "env.json"),
            ("compile", _py("-m", "bench.gpu_check", "--compile-kernels", "emu", "--jobs", str(jobs)), 240, None),
            ("pytest", _py("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *pytest_args), 300, None),
            ("train", _py("-m", "bench.train", "--size", "tiny", "--device", "cpu", "emu", "cuda", "--configs",
                          "fp32-ours", "amp-ours", "--json", j("train.json")), 90, "train.json"),
            ("kernels", _py("-m", "bench.kernels", "--size", "tiny", "--groups", "elementwise", "reduce",
                            "--repeat", "1", "--json", j("kernels.json")), 60, "kernels.json"),
            # no ncu on the simulated GPU: its driver runs every case there, checked against the reference
            ("ncu", _py("-m", "bench.ncu_probe", "--driver", "--check", "--manifest", j("ncu_driver.json")), 60,
             "ncu_driver.json"),
            ("compare", _py("-m", "bench.compare_torch", "--size", "tiny", "--device", "cpu", "--rounds", "2",
                            "--json", j("compare_torch.json")), 60, "compare_torch.json"),
            ("graph", _py("-m", "bench.train", "--size", "tiny", "--device", "cuda", "--configs", "fp32-ours",
                          "amp-ours", "--cuda-graph", "--json", j("train_graph.json")), 90, "train_graph.json"),
            ("converge", _py("-m", "bench.train", "--converge", "30", "--device", "cpu", "--size", "tiny",
                             "--json", j("converge.json")), 60, "converge.json"),
            ("launch", _py("-m", "bench.launch", "--no-gpu", "--count", "1000", "--repeat", "2", "--json",
                           j("launch.json")), 30, "launch.json"),
        ]
    L = GPU_LIMITS
    return [
        ("env", _py("-m", "bench.gpu_check", "--print-env"), L["env"], "env.json"),
        ("compile", _py("-m", "bench.gpu_check", "--compile-kernels", "cuda", "--jobs", str(jobs)), L["compile"], None),
        ("pytest", _py("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *_per_test_timeout(),
                       *_xdist(8), *pytest_args), L["pytest"], None),
        ("train", _py("-m", "bench.train", "--device", "cuda", "--steps", "8", "--warmup", "3", "--profile-steps", "3",
                      "--json", j("train.json")), L["train"], "train.json"),
        # the groups the performance model is checked on and issue 25's first; the convolutions last
        ("kernels", _py("-m", "bench.kernels", "--repeat", "10", "--groups", "elementwise", "reduce",
                        "norm_pool_loss_optim", "step_fp16", "gemm_conv", "--json", j("kernels.json")), L["kernels"],
         "kernels.json"),
        ("ncu", _py("-m", "bench.ncu_probe", "--out", j("ncu"), "--timeout", str(L["ncu"] - 10)), L["ncu"],
         "ncu/ncu.json"),
        ("compare", _py("-m", "bench.compare_torch", "--rounds", "2", "--steps", "8", "--warmup", "3",
                        "--json", j("compare_torch.json")), L["compare"], "compare_torch.json"),
        ("graph", _py("-m", "bench.train", "--device", "cuda", "--configs", "amp-cudnn", "fp32-cudnn", "--cuda-graph",
                      "--steps", "8", "--warmup", "3", "--json", j("train_graph.json")), L["graph"],
         "train_graph.json"),
        ("converge", _py("-m", "bench.train", "--converge", "200", "--device", "cuda", "--json", j("converge.json")),
         L["converge"], "converge.json"),
        ("launch", _py("-m", "bench.launch", "--count", "5000", "--repeat", "3", "--json", j("launch.json")),
         L["launch"], "launch.json"),
    ]


# ---- the compile stage ---------------------------------------------------------------------------------

def compile_kernels(backend, jobs, say=print):
    """Compile every kernels/*.cu once for `backend` ('cuda': NVRTC through CuPy, which caches the
    binary for this GPU; 'emu': the emulator's C++ build), `jobs` files at a time, each in its own
    process. The first CudaSetupError stops it: its line, the others killed, exit code 2."""
    paths = sorted(str(p.relative_to(REPO)) for p in (REPO / "kernels").glob("*.cu"))
    waiting, running, failed = list(paths), {}, []
    while waiting or running:
        while waiting and len(running) < max(1, jobs):
            path = waiting.pop(0)
            say(f"[compile] {path} ({backend}): starting")
            proc = subprocess.Popen(_py("-m", "bench.gpu_check", "--compile-one", path, backend), cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            running[proc] = (path, time.monotonic())
        time.sleep(0.05)
        for proc in [p for p in running if p.poll() is not None]:
            path, t0 = running.pop(proc)
            output = proc.stdout.read()
            proc.stdout.close()
            stop = next((line for line in output.splitlines() if SETUP_STOP in line), None)
            if stop is not None:
                for other in running:
                    other.kill()
                    other.wait()
                say(f"bench.gpu_check compile: {stop[stop.index(SETUP_STOP):]}")
                return EXIT_SETUP
            if proc.returncode == 0:
                say(f"[compile] {path}: ok in {time.monotonic() - t0:.1f} s")
            else:
                failed.append(path)
                say(f"[compile] {path}: FAILED (exit {proc.returncode}) in {time.monotonic() - t0:.1f} s\n"
                    + "\n".join(output.strip().splitlines()[-15:]))
    say(f"[compile] {len(paths) - len(failed)} of {len(paths)} kernel files compiled for {backend}")
    return 1 if failed else 0


def _compile_one(path, backend):
    from kernels.runtime.raw import load_module
    load_module(str(REPO / path)).compile(backend)
    return 0


def run_stage(name, argv, limit, out, env, say=print):
    """Run one stage with its output in out/<name>.log; kill its whole process group at `limit`.
    Lines that start with '[' (a benchmark starting a configuration) and a CudaSetupError's stop
    line are also passed to `say` as they come. Returns {'stage', 'status' ('ok', 'failed',
    'timeout', 'skipped'), 'rc', 'seconds', 'log', 'setup_error' (the stop line or None)}."""
    log_path = Path(out) / f"{name}.log"
    t0 = time.monotonic()
    if limit < 5:
        return {"stage": name, "status": "skipped", "detail": "no time left in the budget", "seconds": 0.0,
                "log": str(log_path), "setup_error": None}
    stop = []
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace")

        def copy():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if SETUP_STOP in line and not stop:
                    stop.append(line.strip())
                    say(f"    {line.rstrip()}")
                elif line.startswith("["):
                    say(f"    {line.rstrip()}")

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, "timeout"
        reader.join(timeout=10)
        if status == "timeout":
            log.write(f"\n[gpu_check] stage '{name}' killed after its limit of {limit:.0f} s\n")
    return {"stage": name, "status": status, "rc": rc, "seconds": time.monotonic() - t0, "limit_s": limit,
            "log": str(log_path), "setup_error": stop[0] if stop else None}


def run_plan(plan, out, env, budget, stage_limit=None, keep_going=False, say=print):
    """Run the stages of `plan` (stage_plan's list) one at a time within `budget` seconds.
    After a stage that stopped on a CudaSetupError the rest are skipped (unless keep_going).
    -> (results, exit code)."""
    t_start = time.monotonic()
    results, setup_error = [], None
    for name, argv_, limit, _json in plan:
        if setup_error and not keep_going:
            results.append({"stage": name, "status": "skipped", "seconds": 0.0, "rc": None,
                            "detail": f"not run: the {setup_error[0]} stage stopped on a CudaSetupError"})
            continue
        if stage_limit:
            limit = min(limit, stage_limit)
        left = budget - (time.monotonic() - t_start)
        say(f"[gpu_check] {name}: up to {min(limit, left):.0f} s ...")
        res = run_stage(name, argv_, min(limit, left), out, env, say=say)
        res["summary"] = summarize(res, out)
        results.append(res)
        say(f"[gpu_check] {name}: {res['status']} in {res['seconds']:.1f} s")
        if res.get("setup_error") and setup_error is None:
            setup_error = (name, res["setup_error"])
            say(f"[gpu_check] {name}: {res['setup_error'][res['setup_error'].index(SETUP_STOP):]}")
    if setup_error:
        return results, EXIT_SETUP
    return results, 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1


def _kill_group(proc):
    """SIGTERM the stage's process group, then SIGKILL what is left after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---- what each stage's output says --------------------------------------------------------------


def _load(out, name):
    try:
        with open(Path(out) / name) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summarize(stage, out):
    """One line of findings for the summary table (and a pass/fail verdict where one applies)."""
    name, log = stage["stage"], stage.get("log")
    if stage.get("setup_error"):
        return stage["setup_error"][stage["setup_error"].index(SETUP_STOP):][:300]
    if stage["status"] in ("timeout", "skipped"):
        return stage.get("detail", "")
    if name == "compile":
        done = re.findall(r"\[compile\] (\d+ of \d+ kernel files compiled for \w+)", _tail(log))
        return done[-1] if done else _tail(log)[-120:].strip()
    if name == "env":
        e = _load(out, "env.json") or {}
        return f"{e.get('gpu', 'no GPU')}; cupy {e.get('cupy')}; torch {e.get('torch')}; python {e.get('python')}"
    if name == "pytest":
        tail = _tail(log)
        m = re.findall(r"(\d+ (?:passed|failed|skipped|deselected|errors?|xfailed|xpassed))", tail)
        return ", ".join(m) if m else tail[-120:].strip()
    if name == "kernels":
        k = _load(out, "kernels.json")
        if not k:
            return "no kernels.json"
        cases = k["cases"]
        errors = sum(1 for c in cases if "error" in c)
        mem = [c["pct_copy_bw"] for c in cases if "pct_copy_bw" in c and not c.get("flops")]
        text = f"{len(cases)} cases, {errors} errors" + ("" if k.get("complete", True) else " (stopped before the end)")
        if mem:
            text += f"; memory-bound kernels at {min(mem):.0f}-{max(mem):.0f}% of copy bandwidth, the host hidden " \
                    f"({sum(p >= 70 for p in mem)}/{len(mem)} >= 70%)"
        per_call = sum(1 for c in cases if c.get("timing") == "per call")
        if per_call:
            text += f"; {per_call} timed per call (the host could not be hidden: timing_note)"
        return text
    if name == "ncu":
        return _ncu_summary(out)
    if name == "compare":
        c = _load(out, "compare_torch.json")
        if not c:
            return "no compare_torch.json"
        if "skipped" in c:
            return f"skipped: {c['skipped']}"
        checks = " ".join(f"loss[{x['engine']}] {'ok' if x['passed'] else 'MISMATCH'}" for x in c["loss_checks"])
        ratios = " ".join(f"{p['ours']}/{p['torch']} {p['throughput_ratio']:.2f}x" +
                          (f" mem {p['memory_ratio']:.2f}" if "memory_ratio" in p else "")
                          if "throughput_ratio" in p else f"{p['ours']} ERROR" for p in c["pairs"])
        return f"{checks}; {ratios}"
    if name == "converge":
        c = _load(out, "converge.json")
        if not c:
            return "no converge.json"
        return (f"{c['device']} {c['size']}: loss {c['first']:.3f} -> {c['last']:.3f} (x{c['ratio']:.2f}) in "
                f"{c['steps']} steps, {c['seconds']:.0f} s")
    if name in ("train", "graph"):
        t = _load(out, "train.json" if name == "train" else "train_graph.json")
        if not t:
            return "no JSON"
        parts = []
        for r in t["rows"]:
            label = f"{r['device']} {r['config']}" + ("+graph" if r.get("cuda_graph") else "")
            if "images_per_s" in r:
                mem = f" {r['peak_reserved_bytes'] / 1e9:.1f}GB" if r.get("peak_reserved_bytes") else ""
                parts.append(f"{label} {r['images_per_s']:.0f} img/s{mem}")
            elif "error" in r:
                parts.append(f"{label} ERROR")
        return "; ".join(parts)
    if name == "launch":
        t = _load(out, "launch.json")
        if not t:
            return "no launch.json"
        text = "our Python per launch (stand-in driver): " + ", ".join(
            f"{r['args']} args {r['ours_us']:.1f} us" for r in t["standin"])
        if t.get("gpu"):
            text += "; on the GPU ours/CuPy's: " + ", ".join(
                f"{r['args']} args {r['ours_us']:.1f}/{r['cupy_us']:.1f} us ({r['ratio']:.2f}x)" for r in t["gpu"])
        return text
    return ""


def _ncu_summary(out):
    """The ncu stage's line: the driver's cases (CPU mode), or what ncu measured of input v1 and v2
    (the pair the model orders wrongly) beside the model."""
    d = _load(out, "ncu_driver.json")
    if d is not None:
        return f"driver: {len(d['cases'])} cases on {d['device']} (no ncu there)"
    r = _load(out, "ncu/ncu.json")
    if r is None:
        return "no ncu/ncu.json"
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('reason', '')}"[:200]
    from bench.ncu_probe import measured_totals
    text = f"{len(r['cases'])} cases, {sum(len(k) for k in r['cases'].values())} kernels profiled"
    v = {n: measured_totals(r["cases"][f"input_normalize u8->f32 v{n}"]) for n in (1, 2)
         if f"input_normalize u8->f32 v{n}" in r["cases"]}
    if len(v) == 2 and v[1]["dram_read_bytes"] is not None and v[2]["dram_read_bytes"] is not None:
        text += (f"; input u8->f32 DRAM read v1 {v[1]['dram_read_bytes'] / 1e6:.0f} MB, v2 "
                 f"{v[2]['dram_read_bytes'] / 1e6:.0f} MB (38.5 MB: the images only)")
    return text


def _tail(path, n=2000):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def print_env():
    """Print (and write to the JSON path given in the stage plan's --out) the environment."""
    import platform
    import numpy
    env = {"python": sys.version.split()[0], "numpy": numpy.__version__, "platform": platform.platform()}
    try:
        import cupy
        env["cupy"] = cupy.__version__
        try:
            n = cupy.cuda.runtime.getDeviceCount()
            props = cupy.cuda.runtime.getDeviceProperties(0) if n else {}
            name = props.get("name", b"")
            env.update(gpu=name.decode() if isinstance(name, bytes) else str(name) or None, gpus=n,
                       cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                       cuda_driver=cupy.cuda.runtime.driverGetVersion(),
                       memory_bytes=int(props.get("totalGlobalMem", 0)) or None)
        except Exception as exc:
            env["gpu_error"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        env["cupy"] = f"not importable ({type(exc).__name__})"
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
    except Exception:
        env["torch"] = "not installed"
    try:
        from kernels.runtime import cuda_env
        rep = cuda_env.report()
        env["nvrtc"] = rep["nvrtc"]
        env["cuda_headers"] = {h: f"{folder} [{rep['header_sources'][h]}]" if folder else None
                               for h, folder in rep["headers"].items()}
        if rep.get("fix"):
            env["cuda_headers_fix"] = rep["fix"]
    except Exception as exc:
        env["cuda_headers"] = f"{type(exc).__name__}: {exc}"
    try:
        from kernels import cudnn_engine
        env["cudnn_engine"] = cudnn_engine.cudnn_available()[1] if not cudnn_engine.cudnn_available()[0] else "available"
    except Exception as exc:
        env["cudnn_engine"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(env, indent=2))
    target = os.environ.get("GPU_CHECK_ENV_JSON")
    if target:
        with open(target, "w") as f:
            json.dump(env, f, indent=2)
    return env


def _has_gpu():
    """Asked in a subprocess with a time limit: a broken driver must not hang the check."""
    code = "import cupy,sys; sys.exit(0 if cupy.cuda.runtime.getDeviceCount() > 0 else 1)"
    try:
        return subprocess.run(_py("-c", code), cwd=REPO, timeout=60, capture_output=True).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_out", help="folder for logs and JSON (created)")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the simulated GPU, the emulator and the "
                                                      "cpu device (automatic when no GPU is seen)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all stages together (480)")
    p.add_argument("--stages", nargs="+", help="run only these stages (env compile pytest train kernels ncu "
                                               "compare graph converge launch)")
    p.add_argument("--stage-limit", type=float, help="cap every stage's limit at this many seconds")
    p.add_argument("--keep-going", action="store_true", help="run the later stages after a CudaSetupError too")
    p.add_argument("--jobs", type=int, help="processes of the compile stage (default: the CPU count, at most 8)")
    p.add_argument("--pytest-args", nargs="*", default=["tests"], help="what pytest collects (default: tests)")
    p.add_argument("--print-env", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile-kernels", choices=["cuda", "emu"], help=argparse.SUPPRESS)   # the compile stage
    p.add_argument("--compile-one", nargs=2, metavar=("PATH", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.print_env:
        print_env()
        return 0
    if args.compile_kernels:
        return compile_kernels(args.compile_kernels, args.jobs or min(8, os.cpu_count() or 1))
    if args.compile_one:
        return stop_on_setup_error("bench.gpu_check compile", lambda _: _compile_one(*args.compile_one))
    if args.budget <= 0:
        p.error(f"--budget must be positive, got {args.budget}")
    t_start = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cpu = args.cpu
    if not cpu and not _has_gpu():
        print("gpu_check: CuPy sees no GPU (or is not installed: pip install -e \".[gpu]\" for CUDA 12, "
              "\".[gpu-cuda13]\" for CUDA 13); running the CPU mode at tiny sizes", flush=True)
        cpu = True
    env = dict(os.environ)
    if cpu:   # the GPU's stages on the simulated GPU: the same cuda code paths, checked before a GPU's minutes
        env["KERNELS_CUDASIM"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["GPU_CHECK_ENV_JSON"] = str(out / "env.json")
    env.setdefault("PYTHONUNBUFFERED", "1")
    plan = stage_plan(cpu, out, args.pytest_args, args.jobs)
    known = [name for name, *_ in plan]
    if args.stages:
        bad = [s for s in args.stages if s not in known]
        if bad:
            p.error(f"unknown stage(s) {bad}; stages are {known}")
        plan = [s for s in plan if s[0] in args.stages]
    say = lambda line: print(line, flush=True)
    results, code = run_plan(plan, out, env, args.budget, args.stage_limit, args.keep_going, say)
    total = time.monotonic() - t_start
    summary = {"mode": "cpu" if cpu else "gpu", "out": str(out), "seconds": total, "budget_s": args.budget,
               "stages": results}
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print_summary(summary)
    return code


def print_summary(summary):
    print(f"\ngpu_check ({summary['mode']} mode) in {summary['seconds']:.0f} s of {summary['budget_s']:.0f}; "
          f"logs and JSON in {summary['out']}")
    header = f"{'stage':<10}{'status':<10}{'seconds':>8}  findings"
    print(header)
    print("-" * 100)
    for r in summary["stages"]:
        status = r["status"] if r["status"] != "failed" else f"FAIL rc={r['rc']}"
        print(f"{r['stage']:<10}{status:<10}{r['seconds']:>8.1f}  {r.get('summary', '')}")


if __name__ == "__main__":
    sys.exit(main())
