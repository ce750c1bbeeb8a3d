"""What CuPy needs to compile our kernels, where it looks, and where we look for what it misses.

CuPy compiles every kernel at run time with NVRTC (the CUDA runtime compiler, a shared library),
and our kernels include CUDA headers: <cuda_fp16.h>, <cuda_bf16.h>, <cuda_pipeline.h>, <mma.h>
(and tests/cuda/ <cooperative_groups.h>). The driver brings none of these: the `gpu` extras of
setup.cfg bring them as pip wheels (README.md, "On a GPU"), a CUDA toolkit brings them too.

Where CuPy looks (read from CuPy 14.2's cupy/_core/core.pyx, `assemble_cupy_compiler_options`,
and cuda-pathfinder 1.9's cuda/pathfinder/_headers/find_nvidia_headers.py):
  - headers: CuPy's own folder and its bundled CCCL (libcu++: <cuda/std/...>, <nv/target>), then
    ONE CUDA folder, cuda-pathfinder's `find_nvidia_header_directory("cudart")`: the first folder
    holding cuda_runtime.h among site-packages nvidia/cu13/include, then nvidia/cuda_runtime/include
    (the runtime wheels); $CONDA_PREFIX/targets/*/include (when there is exactly one); $CUDA_PATH,
    else $CUDA_HOME (<root>/include); then the toolkit of the libcudart.so.<major> that the OS
    loader resolves, asked in a child process (<root>/include, <root> the folder above lib/ or
    lib64/, or above targets/<triple>/lib). None found: CuPy 14 raises "Failed to find CUDA
    headers" (a runtime-only layout: libraries, no headers).
  - NVRTC (CuPy 14): cuda-pathfinder's `load_nvidia_dynamic_lib("nvrtc")`: site-packages first
    (nvidia/cu13/lib, nvidia/cuda_nvrtc/lib), then conda, the system loader, $CUDA_PATH/$CUDA_HOME.
  - CuPy 13 (the CUDA 11 wheel): libnvrtc through the system loader only, headers from the toolkit
    ($CUDA_PATH, the nvcc on $PATH, /usr/local/cuda).
So with pip CUDA wheels installed, CuPy takes every CUDA header from the wheel folder, even when
a complete toolkit sits in /usr/local/cuda.

What that misses (measured: the include closure of our headers in a CUDA 13.0 toolkit against
the CUDA 13 and 12 runtime wheels): crt/mma.h and crt/mma.hpp, which <mma.h> (WMMA: the
tensor-core GEMM and convolutions) includes. The runtime wheels lack them (CUDA 13 keeps them in
the nvidia-cuda-crt wheel, CUDA 12 in the nvcc wheel); everything else <mma.h>, <cuda_fp16.h>,
<cuda_bf16.h>, <cuda_pipeline.h> and <cooperative_groups.h> pull in is in the runtime wheel,
CuPy's CCCL or NVRTC's built-in headers. `extra_include_dirs()` finds, for each header in
`needed_headers()` that CuPy's path lacks, the first of these places that holds it, and appends
that folder after CuPy's own -I (never before it, never instead of it):
  1. the installed NVIDIA wheels of NVRTC's major version (version from the package metadata);
  2. $CONDA_PREFIX/targets/*/include, $CONDA_PREFIX/include;
  3. $CUDA_PATH/include, $CUDA_HOME/include;
  4. the toolkit of the libcudart.so.<major> and the libnvrtc.so.<major> that the OS loader
     resolves, asked in a child process as cuda-pathfinder does (in this process, CuPy has loaded
     the wheels' copies already, so the answer would be theirs);
  5. /usr/local/cuda/include, /usr/local/cuda-<major>.*/include (newest first; the folder that
     stands for /usr/local is $KERNELS_SYSTEM_CUDA_ROOT where set, for tests).
A toolkit folder (2-5) is taken only when its cuda_runtime_api.h says CUDART_VERSION of NVRTC's
major: headers of another major version compile wrong. (crt/mma.h and crt/mma.hpp are
byte-identical in CUDA 12.8, 13.0, 13.2 and 13.5, so another minor of the same major is fine.)

When a header is in none of them, compiling a kernel that needs it raises one CudaSetupError that
names the exact fix for this environment (`fix_for`) and lists every place searched; CuPy 14's
"Failed to find CUDA headers" and CuPy 13's "Failed to auto-detect CUDA root" become one too.
`report()` says where each header came from; `python -m bench.check_extras --where` prints it.
bench/check_extras.py runs it in fresh environments, one per extra and per common layout.
"""

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

__all__ = ["KERNEL_DIR", "include_dirs", "kernel_headers", "needed_headers", "cupy_include_dirs", "nvrtc_major",
           "nvrtc_version", "wheel_include_dirs", "toolkit_version", "loader_resolved_libraries", "toolkit_root",
           "search_places", "locate_headers", "extra_include_dirs", "extra_include_options", "find_header", "fix_for",
           "missing_header_message", "install_hint", "raise_with_install_hint", "CudaSetupError", "gpu_extra_for",
           "cupy_wheel_cuda_major", "report", "format_report", "SYSTEM_ROOT_VARIABLE"]

KERNEL_DIR = Path(__file__).resolve().parent.parent
# the repository's test kernels (absent from an installed package): a GPU test run compiles them too
_TEST_KERNEL_DIR = KERNEL_DIR.parent / "tests" / "cuda"
SYSTEM_ROOT_VARIABLE = "KERNELS_SYSTEM_CUDA_ROOT"       # stands for /usr/local in tests

# Headers that a CUDA header includes and that may sit elsewhere than the header itself (measured:
# the module docstring). The rest of what our headers pull in comes with them.
_NESTED = {"mma.h": ("crt/mma.h", "crt/mma.hpp")}
_SYSTEM_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*<([^>]+)>', re.M)
_CUDART_VERSION = re.compile(r'^[ \t]*#[ \t]*define[ \t]+CUDART_VERSION[ \t]+(\d+)', re.M)

# CuPy wheel -> the extra of setup.cfg that installs it with NVRTC, the headers and NCCL
_EXTRAS = {11: "gpu-cuda11", 12: "gpu", 13: "gpu-cuda13"}


class CudaSetupError(RuntimeError):
    """CuPy cannot compile our kernels: NVRTC or a CUDA header is missing. Says what to install."""


def kernel_headers(folders=None):
    """The `#include <...>` headers of the kernels (*.cu, *.cuh of kernels/ and, where it exists,
    tests/cuda/), sorted. `folders`: a folder or a list of folders to scan instead."""
    if folders is None:
        folders = [KERNEL_DIR] + ([_TEST_KERNEL_DIR] if _TEST_KERNEL_DIR.is_dir() else [])
    elif isinstance(folders, (str, Path)):
        folders = [folders]
    found = set()
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "*.cu")) + glob.glob(os.path.join(folder, "*.cuh"))):
            with open(path, encoding="utf-8") as f:
                found.update(_SYSTEM_INCLUDE.findall(f.read()))
    return sorted(h for h in found if _is_cuda_header(h))


def _is_cuda_header(name):
    """A CUDA toolkit header (the C/C++ standard ones NVRTC or the emulator brings are not looked for)."""
    return name.startswith(("cuda", "cooperative_groups", "mma.h", "crt/", "sm_"))


def needed_headers(folders=None):
    """kernel_headers() plus the headers they include that may live in another wheel."""
    out = []
    for h in kernel_headers(folders):
        out.append(h)
        out.extend(_NESTED.get(h, ()))
    return out


def find_header(header, dirs):
    """The first folder of `dirs` that holds `header` (a relative path such as 'crt/mma.h'), or None."""
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, header)):
            return d
    return None


# ---- what CuPy does -----------------------------------------------------------------------------------

def include_dirs(options):
    """The folders of the -I / --include-path options of a compiler command line, in order."""
    dirs, it = [], iter(options)
    for opt in it:
        if opt in ("-I", "--include-path"):
            dirs.append(next(it, ""))
        elif opt.startswith("--include-path="):
            dirs.append(opt.split("=", 1)[1])
        elif opt.startswith("-I") and len(opt) > 2:
            dirs.append(opt[2:])
    return dirs


def cupy_include_dirs(options=()):
    """The -I folders CuPy passes to NVRTC (its own headers, CCCL, the CUDA headers), in order, or
    None when this CuPy does not say (no CUDA headers found: CuPy 14 raises; a CuPy without
    `assemble_cupy_compiler_options`; a stand-in). Needs no GPU."""
    try:
        from cupy._core import core
        opts = core.assemble_cupy_compiler_options(tuple(options))
    except Exception:
        return None
    return include_dirs(opts)


def _cupy_include_error():
    """CuPy's own message when it cannot assemble its include path (no CUDA headers), else None."""
    try:
        from cupy._core import core
        core.assemble_cupy_compiler_options(())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def nvrtc_version():
    """(major, minor) of the NVRTC that CuPy loads (loading it: no GPU needed), or None."""
    try:
        from cupy.cuda import nvrtc
        major, minor = nvrtc.getVersion()[:2]
        return int(major), int(minor)
    except Exception:
        return None


def nvrtc_major():
    """CUDA major version of the NVRTC that CuPy loads, or None."""
    v = nvrtc_version()
    return None if v is None else v[0]


# ---- the places we search -------------------------------------------------------------------------------

def _distribution_version(name):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _wheel_candidates(major):
    """[(distribution, include folder inside site-packages)] that may hold headers of CUDA `major`:
    CUDA 13+ put every header in nvidia/cu13/include; CUDA 11/12 spread them over
    nvidia/cuda_runtime/include and nvidia/cuda_nvcc/include (crt/)."""
    if major is None:
        return []
    if major >= 13:
        sub = f"nvidia/cu{major}/include"
        return [("nvidia-cuda-runtime", sub), ("nvidia-cuda-crt", sub), ("nvidia-cuda-nvcc", sub)]
    return [(f"nvidia-cuda-runtime-cu{major}", "nvidia/cuda_runtime/include"),
            (f"nvidia-cuda-nvcc-cu{major}", "nvidia/cuda_nvcc/include")]


def _wheel_places(major):
    """Place dicts of the NVIDIA wheels of CUDA `major` (version checked from the package metadata)."""
    from importlib import metadata
    places = []
    for name, sub in _wheel_candidates(major):
        place = {"label": f"wheel {name}", "folder": None, "accepted": False}
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            place["note"] = "not installed"
            places.append(place)
            continue
        place["label"] = f"wheel {name} {dist.version}"
        folder = Path(str(dist.locate_file(sub)))
        if str(dist.version).split(".")[0] != str(major):
            place["note"] = f"CUDA {dist.version}, NVRTC is {major}.x"
        elif not folder.is_dir():
            place["note"] = f"no folder {sub}"
        else:
            place.update(folder=str(folder), accepted=True)
        places.append(place)
    return places


def wheel_include_dirs(major):
    """Include folders of the installed NVIDIA wheels of CUDA `major`, in search order."""
    dirs = []
    for p in _wheel_places(major):
        if p["accepted"] and p["folder"] not in dirs:
            dirs.append(p["folder"])
    return dirs


def toolkit_version(folder):
    """CUDART_VERSION (e.g. 13000) from `folder`/cuda_runtime_api.h, or None when there is none."""
    try:
        with open(os.path.join(folder, "cuda_runtime_api.h"), encoding="utf-8", errors="replace") as f:
            m = _CUDART_VERSION.search(f.read())
    except OSError:
        return None
    return int(m.group(1)) if m else None


# What runs in the child: the OS loader resolves each library name (LD_LIBRARY_PATH, the ld.so
# cache, the interpreter's run path), and /proc/self/maps says which file it mapped.
_LOADER_CHILD = r"""
import ctypes, os, sys
for name in sys.argv[1:]:
    try:
        ctypes.CDLL(name)
    except OSError:
        print(name + "\t")
        continue
    path = ""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.rstrip("\n").split(None, 5)
            if len(parts) == 6 and os.path.basename(parts[5]).startswith(name):
                path = parts[5]
                break
    print(name + "\t" + path)
"""


def loader_resolved_libraries(names):
    """{name: absolute path or None} of the shared libraries `names` (e.g. 'libcudart.so.13') as the
    OS loader resolves them in a fresh Python process (isolated: no site-packages on its path, so
    no wheel that CuPy loaded here answers)."""
    out = {n: None for n in names}
    if not sys.platform.startswith("linux") or not names:
        return out
    try:
        r = subprocess.run([sys.executable, "-I", "-c", _LOADER_CHILD, *names], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return out
    for line in r.stdout.splitlines():
        name, _, path = line.partition("\t")
        if name in out and path:
            out[name] = path
    return out


def toolkit_root(library_path):
    """The toolkit folder of a library: <root>/lib*/libX.so -> <root>; <root>/targets/<triple>/lib*/
    libX.so -> <root>; None for any other layout."""
    lib_dir = os.path.dirname(library_path)
    if os.path.basename(lib_dir) not in ("lib", "lib64"):
        return None
    parent = os.path.dirname(lib_dir)
    if os.path.basename(os.path.dirname(parent)) == "targets":
        return os.path.dirname(os.path.dirname(parent))
    return parent


def _toolkit_place(label, folder, major, version_dirs=()):
    """A Place dict for a toolkit include folder: accepted when a cuda_runtime_api.h of its toolkit
    (its own, else one of `version_dirs` of the same toolkit) says CUDA `major`."""
    place = {"label": label, "folder": folder, "accepted": False}
    if not os.path.isdir(folder):
        place["note"] = "no such folder"
        return place
    version = None
    for d in (folder, *version_dirs):
        version = toolkit_version(d)
        if version is not None:
            break
    if version is None:
        place["note"] = "no cuda_runtime_api.h with CUDART_VERSION: version unknown"
    elif version // 1000 != major:
        place["note"] = f"CUDA {version // 1000}.{version % 1000 // 10}, NVRTC is {major}.x"
    else:
        place.update(accepted=True, note=f"CUDA {version // 1000}.{version % 1000 // 10}")
    return place


def _root_places(label, root, major):
    """The include folders of the toolkit at `root`: <root>/targets/*/include and <root>/include."""
    targets = sorted(glob.glob(os.path.join(root, "targets", "*", "include")))
    folders = targets + [os.path.join(root, "include")]
    return [_toolkit_place(f"{label}: {f}", f, major, version_dirs=[g for g in folders if g != f]) for f in folders]


def search_places(major):
    """Every place searched for a header of CUDA `major`, in order, lazily: dicts with label,
    folder (None when there is none), accepted (same major), note (why not, or the version)."""
    yield from _wheel_places(major)
    conda = os.environ.get("CONDA_PREFIX")
    if conda:
        targets = sorted(glob.glob(os.path.join(conda, "targets", "*", "include")))
        folders = targets + [os.path.join(conda, "include")]
        for f in folders:
            yield _toolkit_place(f"$CONDA_PREFIX {f}", f, major, version_dirs=[g for g in folders if g != f])
    else:
        yield {"label": "$CONDA_PREFIX", "folder": None, "accepted": False, "note": "not set"}
    for var in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(var)
        if root:
            yield _toolkit_place(f"${var} {os.path.join(root, 'include')}", os.path.join(root, "include"), major)
        else:
            yield {"label": f"${var}", "folder": None, "accepted": False, "note": "not set"}
    if major is not None:
        names = [f"libcudart.so.{major}", f"libnvrtc.so.{major}"]
        resolved = loader_resolved_libraries(names)
        roots = []
        for name in names:
            path = resolved[name]
            root = toolkit_root(path) if path else None
            if path is None:
                yield {"label": f"toolkit of {name}", "folder": None, "accepted": False,
                       "note": "the OS loader finds none"}
            elif root is None:
                yield {"label": f"toolkit of {name} ({path})", "folder": None, "accepted": False,
                       "note": "not in a toolkit layout (<root>/lib)"}
            elif root not in roots:
                roots.append(root)
                yield from _root_places(f"toolkit of {name} ({path})", root, major)
    system = os.environ.get(SYSTEM_ROOT_VARIABLE) or "/usr/local"
    yield _toolkit_place(os.path.join(system, "cuda", "include"), os.path.join(system, "cuda", "include"), major)
    if major is not None:
        pattern = os.path.join(system, f"cuda-{major}.*", "include")
        found = sorted(glob.glob(pattern), key=_version_key, reverse=True)
        for f in found:
            yield _toolkit_place(f, f, major)
        if not found:
            yield {"label": pattern, "folder": None, "accepted": False, "note": "none"}


def _version_key(path):
    return [int(x) if x.isdigit() else -1 for x in re.findall(r"\d+|\D+", path)]


def locate_headers(headers, major):
    """Search the places in order for each of `headers`. -> (found {header: place}, searched
    [place, ...]): the places looked at, the first that holds a header wins; the search stops
    once all are found (the loader's child process is started only when still needed)."""
    found, searched = {}, []
    todo = list(headers)
    if not todo:
        return found, searched
    for place in search_places(major):
        searched.append(place)
        if place["accepted"]:
            for h in list(todo):
                if find_header(h, [place["folder"]]):
                    found[h] = place
                    todo.remove(h)
        if not todo:
            break
    return found, searched


def extra_include_dirs():
    """Folders to append to CuPy's include path so that every header our kernels need resolves:
    for each one CuPy's path lacks, the folder of the first place that holds it. [] when CuPy's
    path is unknown (CuPy then fails on its own, and install_hint explains)."""
    cupy_mod = sys.modules.get("cupy")
    cached = _extra_cache.get(id(cupy_mod))
    if cached is not None and cached[0] is cupy_mod:
        return cached[1]
    dirs = cupy_include_dirs()
    extra = []
    if dirs is not None:
        missing = [h for h in needed_headers() if find_header(h, dirs) is None]
        found, _ = locate_headers(missing, nvrtc_major())
        for h in missing:
            if h in found and found[h]["folder"] not in extra:
                extra.append(found[h]["folder"])
    _extra_cache[id(cupy_mod)] = (cupy_mod, extra)
    return extra


_extra_cache = {}


def extra_include_options():
    """extra_include_dirs() as NVRTC options: ('-I<dir>', ...)."""
    return tuple(f"-I{d}" for d in extra_include_dirs())


# ---- when it fails ---------------------------------------------------------------------------------

def gpu_extra_for(cuda_major=None):
    """The pip extra for CUDA `cuda_major` (default: that of the installed CuPy wheel)."""
    if cuda_major is None:
        cuda_major = cupy_wheel_cuda_major()
    return _EXTRAS.get(cuda_major, "gpu")


def cupy_wheel_cuda_major():
    """CUDA major version the installed CuPy wheel was built for (cupy-cuda12x -> 12), or None."""
    from importlib import metadata
    for major in (13, 12, 11):
        try:
            metadata.distribution(f"cupy-cuda{major}x")
            return major
        except metadata.PackageNotFoundError:
            continue
    return None


def fix_for(headers, version=None):
    """The pip command that brings `headers` (relative paths; an empty list: every CUDA header) for
    NVRTC `version` ((major, minor); default: the one CuPy loads), for this environment: the
    `cuda-toolkit` metapackage's extra at its installed version when it is installed (so pip keeps
    what pinned it, e.g. PyTorch), else the wheel itself. For CUDA 11: a toolkit."""
    version = version or nvrtc_version() or (cupy_wheel_cuda_major(), None)
    major, minor = version
    if major is None or major < 12:
        return f"install a CUDA {major or '<major>'}.x toolkit and set CUDA_PATH to it (CuPy 13 reads the headers there)"
    crt = not headers or any(h.startswith("crt/") for h in headers)
    runtime = not headers or any(not h.startswith("crt/") for h in headers)
    same_minor = f"{major}.{minor}.*" if minor is not None else f"{major}.*"
    suffix = "" if major >= 13 else f"-cu{major}"
    names = []                    # (extra of cuda-toolkit, the wheel)
    if runtime:
        names.append(("cudart", f"nvidia-cuda-runtime{suffix}=={same_minor}"))
    if crt:                       # crt/ is byte-identical across minors: any of the major
        names.append(("crt", f"nvidia-cuda-crt=={major}.*") if major >= 13 else
                     ("nvcc", f"nvidia-cuda-nvcc{suffix}=={major}.*"))
    toolkit = _distribution_version("cuda-toolkit")
    if toolkit and toolkit.split(".")[0] == str(major):
        command = f'pip install "cuda-toolkit[{",".join(e for e, _ in names)}]=={toolkit}"'
    else:
        command = "pip install " + " ".join(f'"{w}"' for _, w in names)
    return f"{command} (or set CUDA_PATH to a CUDA {major}.x toolkit)"


def _describe(place):
    note = place.get("note")
    return f"{place['label']} ({note})" if note else place["label"]


def missing_header_message(header, filename=None):
    """One line: `header` is in no place searched; the fix for this environment; every place
    searched (CuPy's include path first)."""
    version = nvrtc_version()
    major = version[0] if version else None
    dirs = cupy_include_dirs()
    found, searched = locate_headers([header], major)
    where = [f"CuPy's include path {dirs}" if dirs is not None else "CuPy's include path (unknown)"]
    where += [_describe(p) for p in searched]
    if header in found:         # found after all (the environment changed since the compile): say where
        where.append(f"now found in {found[header]['folder']}: run again")
    parent = next((h for h, nested in _NESTED.items() if header in nested), None)
    what = f"the CUDA header {header}" + (f" (which <{parent}> includes)" if parent else "")
    nvrtc = f"NVRTC {version[0]}.{version[1]}" if version else "NVRTC"
    head = f"{filename}: " if filename else ""
    return (f"{head}{what} is in none of the places searched for {nvrtc}; fix: {fix_for([header], version)}. "
            f"Searched: {'; '.join(where)}")


def install_hint(exc, filename=None):
    """One sentence saying what to install when `exc` (raised by CuPy while compiling) is a missing
    NVRTC or CUDA header, else None."""
    text = str(exc)
    extra = gpu_extra_for()
    if re.search(r"nvrtc", text, re.I) and re.search(r"find|load|not found|cannot open shared", text, re.I) \
            and "cannot open source file" not in text:
        return (f'CuPy cannot load NVRTC, the CUDA runtime compiler our kernels need: pip install -e ".[{extra}]" '
                f'(README.md, "On a GPU": the extra brings NVRTC, the CUDA headers and NCCL as wheels)')
    m = re.search(r'cannot open source file "([^"]+)"', text)
    if m:
        return missing_header_message(m.group(1))
    if "Failed to find CUDA headers" in text or "Failed to auto-detect CUDA root" in text:
        # CuPy 14 (cuda-pathfinder found no cuda_runtime.h) / CuPy 13: no CUDA headers at all
        return f"CuPy finds no CUDA headers (libraries without headers); fix: {fix_for([])}"
    return None


def raise_with_install_hint(exc, filename):
    """Raise CudaSetupError (from exc) when exc is a missing NVRTC or header; else return."""
    hint = install_hint(exc)
    if hint is not None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CudaSetupError(f"{filename}: {hint}. CuPy said: {first}") from exc


# ---- the report ---------------------------------------------------------------------------------------------

def _loaded_library(fragment):
    """Path of a loaded shared library whose file name contains `fragment` (Linux), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip().split(" ")[-1]
                if fragment in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


def report():
    """Where CuPy finds each piece, without a GPU: a dict with cupy (version), nvrtc (version,
    library), include_dirs (CuPy's; None with include_error when it has none), extra_include_dirs
    (ours), headers ({header: folder or None}), header_sources ({header: 'CuPy's include path' or
    the label of the place searched that has it, or None}), searched (labels and notes of the
    places looked at), nccl (available, version, library). Raises nothing: failures are values."""
    out = {"cupy": None, "nvrtc": None, "nvrtc_library": None, "include_dirs": None, "extra_include_dirs": [],
           "headers": {}, "header_sources": {}, "searched": [],
           "nccl": {"available": False, "version": None, "library": None, "error": None}}
    try:
        import cupy
        out["cupy"] = cupy.__version__
    except Exception as exc:
        out["cupy_error"] = f"{type(exc).__name__}: {exc}"
        return out
    try:
        from cupy.cuda import nvrtc
        out["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
    except Exception as exc:
        out["nvrtc_error"] = f"{type(exc).__name__}: {exc}"
    out["nvrtc_library"] = _loaded_library("libnvrtc.so")
    out["include_dirs"] = cupy_include_dirs()
    if out["include_dirs"] is None:
        out["include_error"] = _cupy_include_error()
    out["extra_include_dirs"] = extra_include_dirs()
    cupy_dirs = out["include_dirs"] or []
    missing = [h for h in needed_headers() if find_header(h, cupy_dirs) is None]
    found, searched = locate_headers(missing, nvrtc_major()) if out["include_dirs"] is not None else ({}, [])
    out["searched"] = [_describe(p) for p in searched]
    for h in needed_headers():
        if h not in missing:
            out["headers"][h], out["header_sources"][h] = find_header(h, cupy_dirs), "CuPy's include path"
        elif h in found:
            out["headers"][h], out["header_sources"][h] = found[h]["folder"], found[h]["label"]
        else:
            out["headers"][h] = out["header_sources"][h] = None
    if any(v is None for v in out["headers"].values()):
        absent = [h for h, v in out["headers"].items() if v is None]
        out["fix"] = fix_for(absent if out["include_dirs"] is not None else [])
    try:
        from cupy.cuda import nccl
        out["nccl"]["available"] = bool(getattr(nccl, "available", False))
        if out["nccl"]["available"]:
            out["nccl"]["version"] = int(nccl.get_version())
    except Exception as exc:
        out["nccl"]["error"] = f"{type(exc).__name__}: {exc}"
    out["nccl"]["library"] = _loaded_library("libnccl.so")
    return out


def format_report(rep):
    """report() as lines of text: NVRTC, CuPy's include path, each header's folder and the place it
    came from, the places searched, the fix when a header is missing."""
    if rep["cupy"] is None:
        return [f"CuPy: not importable ({rep.get('cupy_error')})"]
    lines = [f"CuPy {rep['cupy']}; NVRTC {rep['nvrtc'] or rep.get('nvrtc_error')} from {rep['nvrtc_library']}",
             f"CuPy's include path: {rep['include_dirs'] if rep['include_dirs'] is not None else rep.get('include_error')}"]
    for h, folder in rep["headers"].items():
        lines.append(f"  <{h}>: " + (f"{folder}  [{rep['header_sources'][h]}]" if folder else "NOT FOUND"))
    if rep["searched"]:
        lines.append("searched for what CuPy's path lacks: " + "; ".join(rep["searched"]))
    if rep.get("fix"):
        lines.append(f"fix: {rep['fix']}")
    return lines
