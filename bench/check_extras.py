"""Do the GPU extras make a bare-driver machine work? Checked without a GPU: `python -m bench.check_extras`.

A machine with only the NVIDIA driver needs, besides CuPy, NVRTC (CuPy compiles our kernels at run
time), the CUDA headers our kernels include (<cuda_fp16.h>, <cuda_bf16.h>, <mma.h> and its
"crt/mma.h") and, for several GPUs, NCCL. The extras of setup.cfg bring them as pip wheels. For
each extra this script makes a fresh virtual environment, installs the extra, and then, inside it
and with no GPU (none of this needs one):

  1. imports CuPy;
  2. loads NVRTC the way CuPy does, and checks it came from the environment, not a system toolkit;
  3. resolves every header our kernels need on CuPy's include path (plus what kernels/runtime/cuda_env.py
     adds), each inside the environment;
  4. compiles every kernels/*.cu with CuPy's own NVRTC program and CuPy's options (-ftz=true,
     its include path) for two GPU architectures;
  5. loads NCCL through CuPy (`cupy.cuda.nccl.available`, its version).

    python -m bench.check_extras                      # gpu and gpu-cuda13, light install
    python -m bench.check_extras gpu-cuda13 --full    # exactly `pip install -e ".[gpu-cuda13]"`
    python -m bench.check_extras gpu-cuda11           # CUDA 11: reports (NVRTC/headers come from a toolkit)

--full installs the extra as a user does (with cuBLAS, cuFFT, ... and cuDNN: 2.3 GB for CUDA 13,
3.3 GB for CUDA 12). The default light install resolves the extra exactly as pip does (a dry run
of `pip install -e ".[extra]"`) and then installs, at the resolved versions, only the packages the
checks above touch (CuPy, cuda-pathfinder, NumPy, the NVRTC, runtime-header, crt/nvcc and NCCL
wheels: ~0.5 GB). Exit code 0 when every required check passes, 1 otherwise, 2 on bad usage;
3 when PyPI cannot be reached (nothing was checked).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXTRAS = ("gpu", "gpu-cuda13", "gpu-cuda11")
DEFAULT_EXTRAS = ("gpu", "gpu-cuda13")
# Where NVRTC and the headers must come from the extra itself. The CUDA 11 wheel (CuPy 13) loads
# NVRTC only through the system loader and takes the headers from a toolkit: documented, reported.
SELF_CONTAINED = {"gpu": True, "gpu-cuda13": True, "gpu-cuda11": False}
# Packages the checks touch (prefixes of distribution names), for the light install.
_LIGHT = ("cupy-cuda", "cuda-pathfinder", "numpy", "fastrlock", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime",
          "nvidia-cuda-crt", "nvidia-cuda-nvcc", "nvidia-nccl")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OFFLINE = 0, 1, 2, 3


# ---- inside the environment ---------------------------------------------------------------------------

def _archs(nvrtc_major):
    """Two architectures this NVRTC compiles for: the oldest the project supports with it and Hopper."""
    return {11: ("60", "80"), 12: ("60", "90")}.get(nvrtc_major, ("75", "90"))


def probe():
    """Run the checks in this interpreter's environment. -> dict (JSON-able) with a 'checks' list of
    {name, ok, detail} and 'report' (kernels.runtime.cuda_env.report())."""
    sys.path.insert(0, str(REPO))
    from kernels.runtime import cuda_env
    from kernels.runtime.raw import load_module

    prefix = os.path.realpath(sys.prefix)
    inside = lambda path: bool(path) and os.path.realpath(path).startswith(prefix + os.sep)
    rep = cuda_env.report()
    checks = []

    def check(name, ok, detail):
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    check("cupy imports", rep["cupy"] is not None, rep.get("cupy_error") or f"CuPy {rep['cupy']}")
    if rep["cupy"] is None:
        return {"checks": checks, "report": rep}
    check("NVRTC loads", rep["nvrtc"] is not None,
          rep.get("nvrtc_error") or f"NVRTC {rep['nvrtc']} from {rep['nvrtc_library']}")
    check("NVRTC is the environment's", inside(rep["nvrtc_library"]), str(rep["nvrtc_library"]))
    for header, folder in rep["headers"].items():
        where = (f"not on CuPy's include path {rep['include_dirs']}" if rep["include_dirs"] is not None
                 else "CuPy's include path is unknown (it needs NVRTC to say)")
        check(f"<{header}> resolves", folder is not None, folder or where)
        check(f"<{header}> is the environment's", inside(folder), str(folder))
    nccl = rep["nccl"]
    check("NCCL loads", nccl["available"] and nccl["version"],
          nccl["error"] or f"NCCL {nccl['version']} from {nccl['library']}")
    check("NCCL is the environment's", inside(nccl["library"]), str(nccl["library"]))

    if rep["nvrtc"] is not None:
        try:
            from cupy._core import core
            from cupy.cuda import compiler
            program = compiler._NVRTCProgram       # CuPy's own NVRTC program (no GPU needed)
        except Exception as exc:
            check("kernels compile", False, f"CuPy's compiler internals are not where expected ({exc!r})")
        else:
            major = int(rep["nvrtc"].split(".")[0])
            for path in sorted(glob.glob(str(REPO / "kernels" / "*.cu"))):
                mod = load_module(path)
                source = f'#line 1 "{mod.filename}"\n{mod.code}'
                options = core.assemble_cupy_compiler_options(tuple(mod.options) + cuda_env.extra_include_options())
                for arch in _archs(major):
                    t0 = time.perf_counter()
                    try:
                        program(source, os.path.basename(path)).compile(options + ("-ftz=true", f"-arch=sm_{arch}"))
                        ok, detail = True, f"{time.perf_counter() - t0:.1f} s"
                    except Exception as exc:
                        ok, detail = False, str(exc).strip().splitlines()[0][:300]
                    check(f"{mod.filename} compiles for sm_{arch}", ok, detail)
    return {"checks": checks, "report": rep}


# ---- outside: fresh environments -------------------------------------------------------------------------

def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _clean_env():
    """The environment for the fresh venv: no CUDA toolkit pointers, no PYTHONPATH of ours."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_PATH", "CUDA_HOME", "PYTHONPATH", "LD_LIBRARY_PATH", "KERNELS_NVRTC_LIBRARY",
                        "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def pypi_reachable(python=sys.executable):
    """True when pip can fetch a tiny package (so that a failure later is the extra's fault)."""
    with tempfile.TemporaryDirectory() as d:
        r = _run([python, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", "-d", d,
                  "cuda-pathfinder"], env=_clean_env(), timeout=300)
        return r.returncode == 0


def check_extra(extra, full=False, workdir=None, keep=False, say=print):
    """Fresh venv + the extra + probe(). -> dict: extra, mode, ok, seconds {venv, install, probe, total},
    installed (name==version list), size_bytes, checks, report, error."""
    result = {"extra": extra, "mode": "full" if full else "light", "ok": False, "seconds": {}, "error": None}
    root = Path(tempfile.mkdtemp(prefix=f"extras-{extra}-", dir=workdir))
    venv, py = root / "venv", root / "venv" / "bin" / "python"
    env = _clean_env()
    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        r = _run([sys.executable, "-m", "venv", str(venv)], env=env)
        if r.returncode != 0:
            result["error"] = f"python -m venv failed: {r.stderr.strip()[-500:]}"
            return result
        result["seconds"]["venv"] = time.perf_counter() - t0
        spec = f"{REPO}[{extra}]"
        t0 = time.perf_counter()
        pip = [str(py), "-m", "pip", "install", "--no-cache-dir", "-q"]
        if full:
            r = _run(pip + ["-e", spec], env=env)
        else:
            report = root / "resolved.json"
            r = _run(pip + ["--dry-run", "--ignore-installed", "--report", str(report), "-e", spec], env=env)
            if r.returncode == 0:
                resolved = json.loads(report.read_text())["install"]
                pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in resolved
                              if i["metadata"]["name"].lower().startswith(_LIGHT))
                result["resolved"] = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in resolved)
                r = _run(pip + ["--no-deps"] + pins, env=env)
        result["seconds"]["install"] = time.perf_counter() - t0
        if r.returncode != 0:
            result["error"] = f"pip install failed: {(r.stderr or r.stdout).strip()[-2000:]}"
            return result
        listed = _run([str(py), "-m", "pip", "list", "--format", "json"], env=env)
        result["installed"] = [f"{p['name']}=={p['version']}" for p in json.loads(listed.stdout or "[]")]
        result["size_bytes"] = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
        t0 = time.perf_counter()
        out = root / "probe.json"
        r = _run([str(py), "-m", "bench.check_extras", "--probe", "--json", str(out)], env=env, cwd=str(REPO))
        result["seconds"]["probe"] = time.perf_counter() - t0
        if not out.exists():
            result["error"] = f"the probe failed: {(r.stderr or r.stdout).strip()[-2000:]}"
            return result
        probed = json.loads(out.read_text())
        result.update(checks=probed["checks"], report=probed["report"])
        required = [c for c in probed["checks"]
                    if SELF_CONTAINED.get(extra, True) or c["name"] in ("cupy imports", "NCCL loads")]
        result["ok"] = bool(required) and all(c["ok"] for c in required)
        return result
    finally:
        result["seconds"]["total"] = time.perf_counter() - t_start
        if keep:
            result["venv"] = str(venv)
        else:
            shutil.rmtree(root, ignore_errors=True)


def print_result(res, say=print):
    s = res["seconds"]
    size = f", {res['size_bytes'] / 1e9:.2f} GB installed" if res.get("size_bytes") else ""
    say(f"[{res['extra']}] {'OK' if res['ok'] else 'FAILED'} ({res['mode']} install): venv {s.get('venv', 0):.0f} s, "
        f"install {s.get('install', 0):.0f} s, checks {s.get('probe', 0):.0f} s, total {s.get('total', 0):.0f} s{size}")
    if res.get("error"):
        say(f"  error: {res['error']}")
    required = SELF_CONTAINED.get(res["extra"], True)
    for c in res.get("checks", []):
        if c["ok"] and "compiles" in c["name"]:
            continue
        mark = "ok  " if c["ok"] else ("FAIL" if required or c["name"] in ("cupy imports", "NCCL loads") else "info")
        say(f"  {mark} {c['name']}: {c['detail']}")
    compiled = [c for c in res.get("checks", []) if "compiles" in c["name"]]
    if compiled:
        say(f"  {'ok  ' if all(c['ok'] for c in compiled) else 'FAIL'} {sum(c['ok'] for c in compiled)} of "
            f"{len(compiled)} kernel compilations (every kernels/*.cu, two architectures)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("extras", nargs="*", help=f"extras to check (default: {' '.join(DEFAULT_EXTRAS)}); one of {EXTRAS}")
    p.add_argument("--full", action="store_true", help="install the whole extra, as a user does")
    p.add_argument("--workdir", help="where the temporary environments go (default: the system's temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the environments (their paths are printed)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)   # the part that runs inside
    args = p.parse_args(argv)
    if args.probe:
        out = probe()
        text = json.dumps(out, indent=2)
        if args.json:
            Path(args.json).write_text(text)
        else:
            print(text)
        return EXIT_OK
    extras = args.extras or list(DEFAULT_EXTRAS)
    bad = [e for e in extras if e not in EXTRAS]
    if bad:
        p.error(f"unknown extra(s) {bad}; choose from {EXTRAS}")
        return EXIT_USAGE
    if not pypi_reachable():
        print("check_extras: PyPI cannot be reached from here (pip download failed): nothing checked", file=sys.stderr)
        return EXIT_OFFLINE
    results = []
    for extra in extras:
        res = check_extra(extra, full=args.full, workdir=args.workdir, keep=args.keep)
        print_result(res)
        if res.get("venv"):
            print(f"  kept: {res['venv']}")
        results.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
