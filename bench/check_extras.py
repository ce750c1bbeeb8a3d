"""Do our kernels compile where users run CuPy? Checked without a GPU: `python -m bench.check_extras`.

A machine with only the NVIDIA driver needs, besides CuPy, NVRTC (CuPy compiles our kernels at run
time), the CUDA headers our kernels include (<cuda_fp16.h>, <cuda_bf16.h>, <cuda_pipeline.h>,
<mma.h> and its "crt/mma.h") and, for several GPUs, NCCL. The extras of setup.cfg bring them as pip
wheels; many users already have CuPy beside other CUDA packages instead. For each extra and each
named environment below this script makes a fresh virtual environment, installs it and then,
inside it and with no GPU (none of this needs one):

  1. imports CuPy;
  2. loads NVRTC the way CuPy does (for an extra: from the environment, not a system toolkit);
  3. resolves every header our kernels need on CuPy's include path plus what
     kernels/runtime/cuda_env.py adds, and says where each came from;
  4. compiles every kernels/*.cu with CuPy's own NVRTC program and CuPy's options (-ftz=true,
     its include path, our additions) for two GPU architectures; a failure that is a setup
     problem is reported as the CudaSetupError our runtime raises;
  5. loads NCCL through CuPy (`cupy.cuda.nccl.available`, its version): extras only.

The extras (everything from the extra itself; NVRTC and headers from the environment):
    gpu            CUDA 12        gpu-cuda13     CUDA 13
    gpu-cuda11     CUDA 11: CuPy 13 and NCCL load; NVRTC and headers come from a toolkit (reported)
The named environments (what users have; the toolkit folders are laid out from NVIDIA's wheels:
a <root>/include holding crt/ and a cuda_runtime_api.h with its CUDART_VERSION):
    torch-cu13     cupy-cuda13x 14.2 + cuda-toolkit[cudart,nvrtc]==13.0.2 (what PyTorch 2.11
                   pins; no crt), with a CUDA 13 toolkit found through $CUDA_PATH, $CUDA_HOME,
                   $CONDA_PREFIX, the OS loader (LD_LIBRARY_PATH) and /usr/local/cuda-13.x; and
                   with only a CUDA 12 toolkit: the one CudaSetupError naming
                   pip install "cuda-toolkit[crt]==13.0.2"
    cupy13-ctk     cupy-cuda13x[ctk] (no crt) beside a CUDA 13 toolkit in /usr/local/cuda-13.x
    cupy12-ctk     cupy-cuda12x[ctk] (no nvcc wheel) beside a CUDA 12 toolkit in /usr/local/cuda-12.x
    conda          CuPy's CUDA headers in $CONDA_PREFIX/targets/x86_64-linux/include without crt/,
                   libcudart in $CONDA_PREFIX/lib, crt/ from a CUDA 13 toolkit in /usr/local/cuda
    runtime-only   CuPy and the CUDA libraries (LD_LIBRARY_PATH), no header anywhere: every
                   compile is the one CudaSetupError naming the runtime and crt wheels
Each probe runs with no $CUDA_PATH, $CUDA_HOME or $CONDA_PREFIX but its own, /usr/local replaced
by a folder of its own ($KERNELS_SYSTEM_CUDA_ROOT) and an LD_LIBRARY_PATH of its own first, so
that a toolkit on the machine that runs the check cannot answer for the layout under test.

    python -m bench.check_extras                      # gpu, gpu-cuda13 and the named environments
    python -m bench.check_extras torch-cu13 conda     # some of them
    python -m bench.check_extras gpu-cuda13 --full    # exactly `pip install -e ".[gpu-cuda13]"`
    python -m bench.check_extras --where              # this environment: where each header comes from

Light install (the default): resolves the requirements exactly as pip does (a dry run) and then
installs, at the resolved versions, only the packages the checks touch (CuPy, cuda-pathfinder,
NumPy, the NVRTC, runtime-header, crt/nvcc and NCCL wheels); --full installs the extra as a user
does (with cuBLAS, cuFFT, ... and cuDNN: 4.5-5.5 GB). Light also compiles every kernel only in the
first layout of an environment and gemm.cu (which includes <mma.h>) in the others. Wheels are
kept in ~/.cache/mlperf-resnet-cupy/wheels ($MLPERF_WHEEL_CACHE) and each resolution for a day,
so a second run installs with no download. Exit code 0 when every required check passes, 1
otherwise, 2 on bad usage; 3 when PyPI cannot be reached. --where: 0 every header found, 2 one
missing (the fix is printed), 1 CuPy not importable.
"""

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXTRAS = ("gpu", "gpu-cuda13", "gpu-cuda11")
# Where NVRTC and the headers must come from the extra itself. The CUDA 11 wheel (CuPy 13) loads
# NVRTC only through the system loader and takes the headers from a toolkit: documented, reported.
SELF_CONTAINED = {"gpu": True, "gpu-cuda13": True, "gpu-cuda11": False}
# Packages the checks touch (prefixes of distribution names), for the light install.
_LIGHT = ("cupy-cuda", "cuda-pathfinder", "numpy", "fastrlock", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime",
          "nvidia-cuda-crt", "nvidia-cuda-nvcc", "nvidia-nccl", "cuda-toolkit")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OFFLINE = 0, 1, 2, 3
RESOLUTION_MAX_AGE_S = 24 * 3600

# The wheels the layouts are made of (the versions cuda-toolkit 13.0.2 pins; CUDA 12.9 for CUDA 12).
LAYOUT_WHEELS = {
    13: {"crt": ("nvidia-cuda-crt==13.0.88", "nvidia/cu13/include/crt/"),
         "runtime": ("nvidia-cuda-runtime==13.0.96", "nvidia/cu13/include/"),
         "cudart": ("nvidia-cuda-runtime==13.0.96", "nvidia/cu13/lib/libcudart.so.13"),
         "nvrtc": ("nvidia-cuda-nvrtc==13.0.88", "nvidia/cu13/lib/libnvrtc")},
    12: {"crt": ("nvidia-cuda-nvcc-cu12==12.9.86", "nvidia/cuda_nvcc/include/crt/"),
         "runtime": ("nvidia-cuda-runtime-cu12==12.9.79", "nvidia/cuda_runtime/include/"),
         "cudart": ("nvidia-cuda-runtime-cu12==12.9.79", "nvidia/cuda_runtime/lib/libcudart.so.12"),
         "nvrtc": ("nvidia-cuda-nvrtc-cu12==12.9.86", "nvidia/cuda_nvrtc/lib/libnvrtc")},
}


class Layout:
    """One way a toolkit folder is found (or none is): `build(workdir) -> {env var: value}`.
    expect: None (every kernel compiles) or the fix the one CudaSetupError must name."""

    def __init__(self, name, major, build, expect=None, compile_all=False):
        self.name, self.major, self.build, self.expect, self.compile_all = name, major, build, expect, compile_all


class Environment:
    """A named environment: pip requirements (resolved as pip does; `without`: distributions left
    out, as a user who never installed them), its CUDA major and its layouts, first one first."""

    def __init__(self, name, requirements, major, layouts, without=(), doc=""):
        self.name, self.requirements, self.major, self.layouts = name, list(requirements), major, layouts
        self.without, self.doc = tuple(without), doc


# ---- laid-out folders (built from NVIDIA's wheels, outside the venv) ----------------------------------------

def wheel_cache():
    """Where downloaded wheels and resolutions are kept between runs."""
    return Path(os.environ.get("MLPERF_WHEEL_CACHE") or Path.home() / ".cache" / "mlperf-resnet-cupy" / "wheels")


def _wheel_file(pin):
    """The cached wheel of `pin` (name==version), downloaded once."""
    cache = wheel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    name, version = pin.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    for f in cache.glob("*.whl"):
        if f.name.lower().startswith(stem.lower()):
            return f
    r = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(cache), pin],
             env=_clean_env())
    if r.returncode != 0:
        raise RuntimeError(f"pip download {pin} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return _wheel_file(pin)


def _extract(major, part, dest):
    """Copy the member(s) of a layout wheel (LAYOUT_WHEELS[major][part]) into folder `dest`:
    a folder prefix keeps its tree below the prefix, a file prefix lands in dest by its name."""
    pin, prefix = LAYOUT_WHEELS[major][part]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(_wheel_file(pin)) as z:
        for member in z.namelist():
            if not member.startswith(prefix) or member.endswith("/"):
                continue
            rel = member[len(prefix):] if prefix.endswith("/") else os.path.basename(member)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


def lay_out_toolkit(root, major, include="include", libs=False):
    """A toolkit folder as the search needs one: <root>/<include>/crt/ (the crt or nvcc wheel's) and
    <root>/<include>/cuda_runtime_api.h (its CUDART_VERSION); libs: <root>/lib/libcudart.so.<major>."""
    inc = Path(root) / include
    _extract(major, "crt", inc / "crt")
    src = _extract(major, "runtime", Path(root) / ".runtime-headers")
    shutil.copy(src / "cuda_runtime_api.h", inc / "cuda_runtime_api.h")
    shutil.rmtree(src)
    if libs:
        _extract(major, "cudart", Path(root) / "lib")
    return str(root)


def shadow_libraries(major):
    """A folder with libcudart.so.<major> and NVRTC and no headers near them (kept in the wheel
    cache): first on LD_LIBRARY_PATH, it answers the OS loader instead of a toolkit of the machine."""
    lib = wheel_cache() / f"libraries-only-{major}" / "lib"
    if not (lib / f"libcudart.so.{major}").exists():
        tmp = Path(tempfile.mkdtemp(prefix="lib-", dir=wheel_cache()))
        _extract(major, "cudart", tmp)
        _extract(major, "nvrtc", tmp)
        lib.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(lib, ignore_errors=True)
        os.replace(tmp, lib)
    return str(lib)


def _torch_layouts():
    def via(var):
        def build(work):
            root = lay_out_toolkit(Path(work) / "toolkit", 13)
            return {var: root}
        return build

    def conda(work):
        prefix = Path(work) / "conda"
        lay_out_toolkit(prefix, 13, include="targets/x86_64-linux/include")
        return {"CONDA_PREFIX": str(prefix)}

    def loader(work):
        root = lay_out_toolkit(Path(work) / "toolkit", 13, libs=True)
        return {"LD_LIBRARY_PATH": str(Path(root) / "lib")}

    def system(work):
        lay_out_toolkit(Path(work) / "usr_local" / "cuda-13.0", 13)
        return {"KERNELS_SYSTEM_CUDA_ROOT": str(Path(work) / "usr_local")}

    def cuda12_only(work):
        return {"CUDA_PATH": lay_out_toolkit(Path(work) / "cuda-12.9", 12)}

    return [Layout("CUDA_PATH", 13, via("CUDA_PATH"), compile_all=True), Layout("CUDA_HOME", 13, via("CUDA_HOME")),
            Layout("CONDA_PREFIX", 13, conda), Layout("loader", 13, loader), Layout("usr-local", 13, system),
            Layout("cuda12-toolkit-only", 13, cuda12_only, expect='pip install "cuda-toolkit[crt]==13.0.2"')]


def _system_layout(major, version):
    def build(work):
        lay_out_toolkit(Path(work) / "usr_local" / f"cuda-{version}", major)
        return {"KERNELS_SYSTEM_CUDA_ROOT": str(Path(work) / "usr_local")}
    return [Layout(f"usr-local-cuda-{version}", major, build, compile_all=True)]


def _conda_layout():
    def build(work):
        prefix = Path(work) / "conda"
        _extract(13, "runtime", prefix / "targets" / "x86_64-linux" / "include")     # headers, no crt/
        _extract(13, "cudart", prefix / "lib")
        lay_out_toolkit(Path(work) / "usr_local" / "cuda", 13)
        return {"CONDA_PREFIX": str(prefix), "KERNELS_SYSTEM_CUDA_ROOT": str(Path(work) / "usr_local")}
    return [Layout("conda+usr-local-cuda", 13, build, compile_all=True)]


def _runtime_only_layout():
    def build(work):
        return {"LD_LIBRARY_PATH": shadow_libraries(13)}
    return [Layout("libraries-only", 13, build, compile_all=True,
                   expect='pip install "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.*"')]


ENVIRONMENTS = {
    "torch-cu13": Environment("torch-cu13", ["cupy-cuda13x==14.2.*", "cuda-toolkit[cudart,nvrtc]==13.0.2"], 13,
                              _torch_layouts(), doc="CuPy beside PyTorch 2.11's CUDA 13 wheels"),
    "cupy13-ctk": Environment("cupy13-ctk", ["cupy-cuda13x[ctk]"], 13, _system_layout(13, "13.0"),
                              without=("nvidia-cuda-crt",), doc="CuPy's ctk extra in a CUDA 13 -devel container"),
    "cupy12-ctk": Environment("cupy12-ctk", ["cupy-cuda12x[ctk]"], 12, _system_layout(12, "12.9"),
                              without=("nvidia-cuda-nvcc-cu12",), doc="CuPy's ctk extra in a CUDA 12 -devel container"),
    "conda": Environment("conda", ["cupy-cuda13x==14.2.*", "nvidia-cuda-nvrtc==13.0.88"], 13, _conda_layout(),
                         doc="a conda-like prefix holding the CUDA headers without crt/"),
    "runtime-only": Environment("runtime-only", ["cupy-cuda13x==14.2.*"], 13, _runtime_only_layout(),
                                doc="a -runtime container: CUDA libraries, no headers"),
}
DEFAULT = ("gpu", "gpu-cuda13") + tuple(ENVIRONMENTS)


# ---- inside the environment ---------------------------------------------------------------------------

def _archs(nvrtc_major):
    """Two architectures this NVRTC compiles for: the oldest the project supports with it and Hopper."""
    return {11: ("60", "80"), 12: ("60", "90")}.get(nvrtc_major, ("75", "90"))


def _setup_detail(exc, filename):
    """(False, detail, setup_error) of a failed compile: the CudaSetupError our runtime raises for
    it, where it is a setup problem, else the compiler's first line."""
    from kernels.runtime import cuda_env
    try:
        cuda_env.raise_with_install_hint(exc, filename)
    except cuda_env.CudaSetupError as setup:
        return False, f"CudaSetupError: {setup}", True
    return False, str(exc).strip().splitlines()[0][:300], False


def _compile_job(job):
    """One NVRTC compile with CuPy's program: -> ((filename, arch), (ok, detail, setup_error))."""
    from cupy.cuda import compiler
    filename, arch, source, options = job
    t0 = time.perf_counter()
    try:
        compiler._NVRTCProgram(source, os.path.basename(filename)).compile(options)
        return (filename, arch), (True, f"{time.perf_counter() - t0:.1f} s", False)
    except Exception as exc:
        return (filename, arch), _setup_detail(exc, filename)


def _compile_all(jobs, workers):
    """{(filename, arch): (ok, detail, setup_error)} of every job, `workers` processes at a time."""
    if workers <= 1 or len(jobs) <= 1:
        return dict(map(_compile_job, jobs))
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(pool.map(_compile_job, jobs))


def probe(kernels=None, say=None, workers=None):
    """Run the checks in this interpreter's environment. kernels: file names of kernels/*.cu to
    compile (default: all). say: called with a line as each compile is queued. workers: compiling
    processes (default: the CPU count, at most 2). -> dict (JSON-able) with a 'checks' list of
    {name, ok, detail} and 'report' (kernels.runtime.cuda_env.report())."""
    workers = workers or min(2, os.cpu_count() or 1)
    sys.path.insert(0, str(REPO))
    from kernels.runtime import cuda_env
    from kernels.runtime.raw import load_module

    prefix = os.path.realpath(sys.prefix)
    inside = lambda path: bool(path) and os.path.realpath(path).startswith(prefix + os.sep)
    rep = cuda_env.report()
    checks = []

    def check(name, ok, detail, **kw):
        checks.append({"name": name, "ok": bool(ok), "detail": detail, **kw})

    check("cupy imports", rep["cupy"] is not None, rep.get("cupy_error") or f"CuPy {rep['cupy']}")
    if rep["cupy"] is None:
        return {"checks": checks, "report": rep}
    check("NVRTC loads", rep["nvrtc"] is not None,
          rep.get("nvrtc_error") or f"NVRTC {rep['nvrtc']} from {rep['nvrtc_library']}")
    check("NVRTC is the environment's", inside(rep["nvrtc_library"]), str(rep["nvrtc_library"]))
    for header, folder in rep["headers"].items():
        where = (f"not on CuPy's include path {rep['include_dirs']} nor in: {'; '.join(rep['searched'])}"
                 if rep["include_dirs"] is not None else f"CuPy has no include path: {rep.get('include_error')}")
        check(f"<{header}> resolves", folder is not None,
              f"{folder} [{rep['header_sources'][header]}]" if folder else where)
        check(f"<{header}> is the environment's", inside(folder), str(folder))
    nccl = rep["nccl"]
    check("NCCL loads", nccl["available"] and nccl["version"],
          nccl["error"] or f"NCCL {nccl['version']} from {nccl['library']}")
    check("NCCL is the environment's", inside(nccl["library"]), str(nccl["library"]))

    if rep["nvrtc"] is not None:
        try:
            from cupy._core import core
            from cupy.cuda import compiler
            compiler._NVRTCProgram             # CuPy's own NVRTC program (no GPU needed)
        except Exception as exc:
            check("kernels compile", False, f"CuPy's compiler internals are not where expected ({exc!r})")
        else:
            major = int(rep["nvrtc"].split(".")[0])
            paths = sorted(glob.glob(str(REPO / "kernels" / "*.cu")))
            if kernels:
                paths = [p for p in paths if os.path.basename(p) in kernels]
            jobs, done = [], {}
            for path in paths:
                mod = load_module(path)
                source = f'#line 1 "{mod.filename}"\n{mod.code}'
                for arch in _archs(major):
                    try:
                        # what RawModule does: our -I additions after the module's options, CuPy's around them
                        options = core.assemble_cupy_compiler_options(tuple(mod.options) +
                                                                      cuda_env.extra_include_options())
                    except Exception as exc:     # CuPy finds no CUDA headers: NVRTC is not even started
                        done[(mod.filename, arch)] = _setup_detail(exc, mod.filename)
                        continue
                    jobs.append((mod.filename, arch, source, options + ("-ftz=true", f"-arch=sm_{arch}")))
            # the slowest first (conv.cu), in parallel processes: NVRTC holds the GIL
            jobs.sort(key=lambda j: -len(j[2]))
            if say:
                for filename, arch, *_ in jobs:
                    say(f"compiling {filename} for sm_{arch}")
            done.update(_compile_all(jobs, workers))
            for path in paths:
                filename = f"kernels/{os.path.basename(path)}"
                for arch in _archs(major):
                    ok, detail, setup_error = done[(filename, arch)]
                    check(f"{filename} compiles for sm_{arch}", ok, detail, setup_error=setup_error)
    return {"checks": checks, "report": rep}


def where(say=print):
    """Print where NVRTC and each CUDA header come from in this environment. -> exit code: 0 every
    header found, 2 one missing (the fix is printed), 1 CuPy not importable."""
    sys.path.insert(0, str(REPO))
    from kernels.runtime import cuda_env
    rep = cuda_env.report()
    for line in cuda_env.format_report(rep):
        say(line)
    if rep["cupy"] is None:
        return EXIT_FAILED
    return EXIT_OK if rep["headers"] and all(rep["headers"].values()) else EXIT_USAGE


# ---- outside: fresh environments -------------------------------------------------------------------------

def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _clean_env():
    """The environment for the fresh venv: no CUDA toolkit pointers, no PYTHONPATH of ours."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_PATH", "CUDA_HOME", "CONDA_PREFIX", "PYTHONPATH", "LD_LIBRARY_PATH",
                        "KERNELS_NVRTC_LIBRARY", "KERNELS_SYSTEM_CUDA_ROOT", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def pypi_reachable(python=sys.executable):
    """True when pip can fetch a tiny package (so that a failure later is the extra's fault)."""
    with tempfile.TemporaryDirectory() as d:
        r = _run([python, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", "-d", d,
                  "cuda-pathfinder"], env=_clean_env(), timeout=300)
        return r.returncode == 0


def _resolve(py, spec, env, key, root):
    """pip's resolution of `spec` (install arguments) as [name==version], kept for a day in the
    wheel cache under `key`. -> (pins, error)."""
    folder = wheel_cache() / "resolved"
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps([key, spec, sys.version_info[:2]]).encode()).hexdigest()[:16]
    kept = folder / f"{digest}.json"
    if kept.exists() and time.time() - kept.stat().st_mtime < RESOLUTION_MAX_AGE_S:
        return json.loads(kept.read_text()), None
    report = Path(root) / "resolved.json"
    r = _run([str(py), "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report)] + spec,
             env=env)
    if r.returncode != 0:
        return None, f"pip could not resolve {spec}: {(r.stderr or r.stdout).strip()[-2000:]}"
    pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}"
                  for i in json.loads(report.read_text())["install"])
    tmp = kept.with_suffix(".tmp")
    tmp.write_text(json.dumps(pins))
    os.replace(tmp, kept)
    return pins, None


def _install(py, pins, env):
    """pip install `pins` (no dependencies: they are resolved) from the wheel cache, downloading
    only what it lacks. -> CompletedProcess."""
    cache = wheel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    offline = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--find-links", str(cache)]
    r = _run(offline + pins, env=env)
    if r.returncode == 0:
        return r
    r = _run([str(py), "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(cache)] + pins,
             env=env)
    if r.returncode != 0:
        return r
    return _run(offline + pins, env=env)


def _light(pins, without=()):
    return [p for p in pins if p.split("==")[0].lower().startswith(_LIGHT)
            and p.split("==")[0].lower() not in without]


def check_extra(extra, full=False, workdir=None, keep=False, say=print):
    """Fresh venv + the extra or named environment + the probe (one per layout of a named one).
    -> dict: extra, mode, ok, seconds {venv, install, probe, total}, installed (name==version
    list), size_bytes, checks, report, layouts [{name, ok, expect, seconds, checks, report}], error."""
    named = ENVIRONMENTS.get(extra)
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
        t0 = time.perf_counter()
        if named is None:
            spec, key = ["-e", f"{REPO}[{extra}]"], (extra, _extras_text())
        else:
            spec, key = named.requirements, named.name
        if full and named is None:
            r = _run([str(py), "-m", "pip", "install", "-q"] + spec, env=env)
        else:
            pins, error = _resolve(py, spec, env, key, root)
            if error:
                result["error"] = error
                return result
            result["resolved"] = pins
            wanted = [p for p in pins if not p.lower().startswith("mlperf-resnet-cupy==")]
            if named is not None:
                wanted = [p for p in wanted if p.split("==")[0].lower() not in named.without]
            r = _install(py, wanted if full else _light(wanted, named.without if named else ()), env)
        result["seconds"]["install"] = time.perf_counter() - t0
        if r.returncode != 0:
            result["error"] = f"pip install failed: {(r.stderr or r.stdout).strip()[-2000:]}"
            return result
        listed = _run([str(py), "-m", "pip", "list", "--format", "json"], env=env)
        result["installed"] = [f"{p['name']}=={p['version']}" for p in json.loads(listed.stdout or "[]")]
        result["size_bytes"] = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
        t0 = time.perf_counter()
        if named is None:
            probed, error = _probe_in(py, env, root / "probe.json")
            if error:
                result["error"] = error
                return result
            result.update(checks=probed["checks"], report=probed["report"])
            required = [c for c in probed["checks"]
                        if SELF_CONTAINED.get(extra, True) or c["name"] in ("cupy imports", "NCCL loads")]
            result["ok"] = bool(required) and all(c["ok"] for c in required)
        else:
            result["layouts"] = []
            for layout in named.layouts:
                result["layouts"].append(_check_layout(py, env, root, named, layout, full, say))
            first = result["layouts"][0]
            result.update(checks=first.get("checks", []), report=first.get("report"))
            result["ok"] = all(lay["ok"] for lay in result["layouts"])
        result["seconds"]["probe"] = time.perf_counter() - t0
        return result
    finally:
        result["seconds"]["total"] = time.perf_counter() - t_start
        if keep:
            result["venv"] = str(venv)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _extras_text():
    """setup.cfg's extras section (a resolution is kept only while it is unchanged)."""
    text = (REPO / "setup.cfg").read_text()
    return text[text.find("[options.extras_require]"):]


def _probe_in(py, env, out, kernels=None):
    """Run the probe with `py` under `env`; -> (its JSON, None) or (None, error)."""
    cmd = [str(py), "-m", "bench.check_extras", "--probe", "--json", str(out)]
    if kernels:
        cmd += ["--kernels", *kernels]
    r = _run(cmd, env=env, cwd=str(REPO))
    if not Path(out).exists():
        return None, f"the probe failed: {(r.stderr or r.stdout).strip()[-2000:]}"
    return json.loads(Path(out).read_text()), None


def _check_layout(py, env, root, named, layout, full, say):
    """One layout of a named environment: build it, probe under it, judge. -> dict."""
    t0 = time.perf_counter()
    res = {"name": layout.name, "expect": layout.expect, "ok": False}
    work = Path(tempfile.mkdtemp(prefix=f"layout-{layout.name}-", dir=root))
    try:
        # the machine's own toolkit must not answer: /usr/local replaced, the loader shadowed
        empty = work / "no_usr_local"
        empty.mkdir()
        lenv = dict(env, KERNELS_SYSTEM_CUDA_ROOT=str(empty))
        shadow = shadow_libraries(layout.major)
        added = layout.build(work)
        lenv.update(added)
        lenv["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (added.get("LD_LIBRARY_PATH"), shadow) if p)
        res["variables"] = {k: v for k, v in added.items()}
        kernels = None if (full or layout.compile_all) else ["gemm.cu"]
        probed, error = _probe_in(py, lenv, work / "probe.json", kernels)
        if error:
            res["error"] = error
            return res
        res.update(checks=probed["checks"], report=probed["report"])
        res["ok"], res["verdict"] = judge(probed["checks"], layout.expect, named.name)
        return res
    except Exception as exc:            # a wheel that cannot be fetched, a folder that cannot be made
        res["error"] = f"{type(exc).__name__}: {exc}"
        return res
    finally:
        res["seconds"] = time.perf_counter() - t0
        shutil.rmtree(work, ignore_errors=True)


def judge(checks, expect, name=""):
    """(ok, why) for a named environment's probe. expect None: CuPy imports, NVRTC loads, every
    header resolves and every kernel compiles. expect a fix: CuPy imports, NVRTC loads, and every
    kernel that fails, fails with the one CudaSetupError naming that fix (conv.cu and gemm.cu,
    which need crt/, among them)."""
    by = {c["name"]: c for c in checks}
    for need in ("cupy imports", "NVRTC loads"):
        if not by.get(need, {}).get("ok"):
            return False, f"{need}: {by.get(need, {}).get('detail', 'not checked')}"
    compiled = [c for c in checks if " compiles for " in c["name"]]
    if not compiled:
        return False, "no kernel was compiled"
    if expect is None:
        bad = [c for c in checks if not c["ok"] and (c["name"].endswith(" resolves") or c in compiled)]
        return (not bad), ("every header resolves, every kernel compiles" if not bad else
                           f"{bad[0]['name']}: {bad[0]['detail']}")
    failed = [c for c in compiled if not c["ok"]]
    wrong = [c for c in failed if not c.get("setup_error") or expect not in c["detail"]]
    if wrong:
        return False, f"{wrong[0]['name']}: not the CudaSetupError naming {expect}: {wrong[0]['detail']}"
    if not {"kernels/conv.cu", "kernels/gemm.cu"} & {c["name"].split(" compiles")[0] for c in failed}:
        return False, "no kernel failed, although a header should be missing"
    return True, f"{len(failed)} of {len(compiled)} compilations: the one CudaSetupError naming {expect}"


def print_result(res, say=print):
    s = res["seconds"]
    size = f", {res['size_bytes'] / 1e9:.2f} GB installed" if res.get("size_bytes") else ""
    say(f"[{res['extra']}] {'OK' if res['ok'] else 'FAILED'} ({res['mode']} install): venv {s.get('venv', 0):.0f} s, "
        f"install {s.get('install', 0):.0f} s, checks {s.get('probe', 0):.0f} s, total {s.get('total', 0):.0f} s{size}")
    if res.get("error"):
        say(f"  error: {res['error']}")
    if "layouts" in res:
        for lay in res["layouts"]:
            say(f"  {'ok  ' if lay['ok'] else 'FAIL'} layout {lay['name']} ({lay.get('seconds', 0):.0f} s): "
                f"{lay.get('error') or lay.get('verdict')}")
            rep = lay.get("report") or {}
            for h in ("crt/mma.h",):
                if rep.get("header_sources", {}).get(h):
                    say(f"       <{h}> from {rep['header_sources'][h]}")
        return
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
    names = EXTRAS + tuple(ENVIRONMENTS)
    p.add_argument("extras", nargs="*", help=f"what to check (default: {' '.join(DEFAULT)}); one of {names}")
    p.add_argument("--full", action="store_true", help="install the whole extra, as a user does; compile every "
                                                       "kernel in every layout")
    p.add_argument("--workdir", help="where the temporary environments go (default: the system's temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the environments (their paths are printed)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--where", action="store_true", help="say where NVRTC and each CUDA header come from here")
    p.add_argument("--probe", action="store_true", help="run the checks in this environment, print JSON")
    p.add_argument("--kernels", nargs="+", help="with --probe: compile only these kernels/*.cu")
    p.add_argument("--jobs", type=int, help="with --probe: compiling processes (default: CPU count, at most 2)")
    args = p.parse_args(argv)
    if args.where:
        return where()
    if args.probe:
        out = probe(args.kernels, workers=args.jobs)
        text = json.dumps(out, indent=2)
        if args.json:
            Path(args.json).write_text(text)
        else:
            print(text)
        return EXIT_OK
    extras = args.extras or list(DEFAULT)
    bad = [e for e in extras if e not in names]
    if bad:
        p.error(f"unknown extra(s) or environment(s) {bad}; choose from {names}")
        return EXIT_USAGE
    if not pypi_reachable():
        print("check_extras: PyPI cannot be reached from here (pip download failed): nothing checked", file=sys.stderr)
        return EXIT_OFFLINE
    results = []
    for extra in extras:
        print(f"[{extra}] building a fresh environment ...", flush=True)
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
