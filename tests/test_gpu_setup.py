"""A first run on a GPU machine, tested without one: where CuPy finds NVRTC and the CUDA headers
(kernels/runtime/cuda_env.py), NCCL missing, the GPU each rank takes, why --device auto chose the CPU,
bf16 refused up front, the memory arithmetic behind the out-of-memory advice (nn/memory.py), and
the benchmarks and bench.gpu_check stopping at once, with its one line, on a CudaSetupError.

CuPy is replaced by small stand-in modules where a test needs one.
"""

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import nn
from nn import distributed
from nn import functional as F
from nn import memory
from nn.resnet import Bottleneck, ResNet
from kernels.runtime import cuda_env

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def install_fake_cupy(monkeypatch, device_count=1, count_error=None, nccl_available=True, bus_ids=None):
    """sys.modules['cupy'] (+ cupy.cuda, cupy.cuda.nccl) stand-ins; returns a record of what was used."""
    record = types.SimpleNamespace(used=[], communicators=[])
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "14.2.0"
    cuda = types.ModuleType("cupy.cuda")

    def get_device_count():
        if count_error is not None:
            raise count_error
        return device_count

    cuda.runtime = types.SimpleNamespace(getDeviceCount=get_device_count)

    class Device:
        def __init__(self, i=0):
            self.id = i

        def use(self):
            record.used.append(self.id)

        @property
        def pci_bus_id(self):
            return (bus_ids or [f"0000:{i:02x}:00.0" for i in range(device_count)])[self.id]

    cuda.Device = Device
    cuda.Stream = lambda non_blocking=False: types.SimpleNamespace(ptr=0)
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = nccl_available
    if nccl_available:
        nccl.get_unique_id = lambda: (1, 2, 3)
        nccl.NcclCommunicator = lambda n, uid, rank: record.communicators.append((n, uid, rank)) or object()
        for i, name in enumerate(("NCCL_SUM", "NCCL_MAX", "NCCL_MIN", "NCCL_PROD", "NCCL_FLOAT32", "NCCL_FLOAT64",
                                  "NCCL_FLOAT16", "NCCL_INT32", "NCCL_INT64")):
            setattr(nccl, name, i)
    cuda.nccl = nccl
    cupy.cuda = cuda
    for name, mod in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.nccl", nccl)):
        monkeypatch.setitem(sys.modules, name, mod)
    return record


# ---- kernels/runtime/cuda_env.py: the headers CuPy must find -----------------------------------------------

def test_the_headers_our_kernels_need():
    assert cuda_env.kernel_headers(cuda_env.KERNEL_DIR) == ["cuda_bf16.h", "cuda_fp16.h", "cuda_pipeline.h", "mma.h"]
    assert cuda_env.needed_headers(cuda_env.KERNEL_DIR) == ["cuda_bf16.h", "cuda_fp16.h", "cuda_pipeline.h", "mma.h",
                                                            "crt/mma.h", "crt/mma.hpp"]
    # the repository's test kernels are compiled on a GPU too: their headers are looked for as well
    assert {"cooperative_groups.h", "crt/mma.h"} <= set(cuda_env.needed_headers())


def _headers(folder, names, cudart=None):
    """Header files under `folder` (created); cudart: a CUDART_VERSION for its cuda_runtime_api.h."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("// header\n")
    if cudart is not None:
        (folder / "cuda_runtime_api.h").write_text(f"#pragma once\n#define CUDART_VERSION  {cudart}\n")
    return str(folder)


CRT = ["crt/mma.h", "crt/mma.hpp"]


@pytest.fixture
def bare_env(monkeypatch, tmp_path):
    """CuPy's path = a CUDA 13 wheel folder without crt/; no conda, CUDA_PATH, CUDA_HOME; the
    loader finds nothing; /usr/local is an empty folder; NVRTC 13.0; no cuda-toolkit installed."""
    wheel = _headers(tmp_path / "site" / "nvidia" / "cu13" / "include", ["cuda_fp16.h", "cuda_bf16.h",
                     "cuda_pipeline.h", "mma.h", "cooperative_groups.h", "cooperative_groups/reduce.h"], 13000)
    for var in ("CONDA_PREFIX", "CUDA_PATH", "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "usr_local").mkdir()
    monkeypatch.setenv(cuda_env.SYSTEM_ROOT_VARIABLE, str(tmp_path / "usr_local"))
    monkeypatch.setattr(cuda_env, "_extra_cache", {})
    monkeypatch.setattr(cuda_env, "cupy_include_dirs", lambda options=(): [str(tmp_path / "cupy"), wheel])
    monkeypatch.setattr(cuda_env, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setattr(cuda_env, "_wheel_places", lambda major: [])
    asked = []
    monkeypatch.setattr(cuda_env, "loader_resolved_libraries", lambda names: asked.extend(names) or {n: None for n in names})
    monkeypatch.setattr(cuda_env, "_distribution_version", lambda name: None)
    return types.SimpleNamespace(root=tmp_path, wheel=wheel, asked=asked)


def _lay_out(where, env, monkeypatch, cudart=13000):
    """A toolkit folder holding crt/ laid out for the search place `where`; -> the folder expected."""
    root = env.root
    if where == "conda-targets":
        monkeypatch.setenv("CONDA_PREFIX", str(root / "conda"))
        return _headers(root / "conda" / "targets" / "x86_64-linux" / "include", CRT, cudart)
    if where == "conda-include":      # crt/ in include/, the version in the targets folder of the same prefix
        monkeypatch.setenv("CONDA_PREFIX", str(root / "conda"))
        _headers(root / "conda" / "targets" / "x86_64-linux" / "include", [], cudart)
        return _headers(root / "conda" / "include", CRT)
    if where in ("CUDA_PATH", "CUDA_HOME"):
        monkeypatch.setenv(where, str(root / where.lower()))
        return _headers(root / where.lower() / "include", CRT, cudart)
    if where in ("loader-cudart", "loader-nvrtc", "loader-targets"):
        lib = {"loader-targets": root / "tk" / "targets" / "x86_64-linux" / "lib"}.get(where, root / "tk" / "lib64")
        name = "libnvrtc.so.13" if where == "loader-nvrtc" else "libcudart.so.13"
        monkeypatch.setattr(cuda_env, "loader_resolved_libraries", lambda names: env.asked.extend(names) or
                            {n: str(lib / n) if n == name else None for n in names})
        return _headers(root / "tk" / "include", CRT, cudart)
    if where == "usr-local-cuda":
        return _headers(root / "usr_local" / "cuda" / "include", CRT, cudart)
    if where == "usr-local-cuda-13.x":
        _headers(root / "usr_local" / "cuda-13.0" / "include", CRT, cudart)
        return _headers(root / "usr_local" / "cuda-13.2" / "include", CRT, cudart)     # the newest first
    raise ValueError(where)


PLACES = ["conda-targets", "conda-include", "CUDA_PATH", "CUDA_HOME", "loader-cudart", "loader-nvrtc",
          "loader-targets", "usr-local-cuda", "usr-local-cuda-13.x"]


@pytest.mark.parametrize("where", PLACES)
def test_crt_is_found_in_each_search_place_and_appended_after_cupys_path(bare_env, monkeypatch, where):
    want = _lay_out(where, bare_env, monkeypatch)
    assert cuda_env.extra_include_dirs() == [want]
    assert cuda_env.extra_include_options() == (f"-I{want}",)
    found, searched = cuda_env.locate_headers(["crt/mma.h"], 13)
    assert found["crt/mma.h"]["folder"] == want and found["crt/mma.h"]["accepted"]
    assert searched[-1] is found["crt/mma.h"]          # the search stops at the first place that has it
    # the loader's child process is asked only when nothing before it had the header
    assert bool(bare_env.asked) == (where not in ("conda-targets", "conda-include", "CUDA_PATH", "CUDA_HOME"))


def test_nothing_is_searched_when_cupys_path_has_every_header(bare_env, monkeypatch):
    _headers(Path(bare_env.wheel), CRT)
    _lay_out("CUDA_PATH", bare_env, monkeypatch)
    assert cuda_env.extra_include_dirs() == [] and bare_env.asked == []


def test_the_wheels_come_first_then_the_places_in_order(bare_env, monkeypatch):
    crt_wheel = _headers(bare_env.root / "crt_wheel" / "nvidia" / "cu13" / "include", CRT)
    _lay_out("CUDA_PATH", bare_env, monkeypatch)
    system = _lay_out("usr-local-cuda", bare_env, monkeypatch)
    cuda_path = str(bare_env.root / "cuda_path" / "include")
    assert cuda_env.extra_include_dirs() == [cuda_path]               # $CUDA_PATH before /usr/local/cuda
    monkeypatch.setattr(cuda_env, "_extra_cache", {})
    monkeypatch.delenv("CUDA_PATH")
    assert cuda_env.extra_include_dirs() == [system]
    monkeypatch.setattr(cuda_env, "_extra_cache", {})
    monkeypatch.setattr(cuda_env, "_wheel_places", lambda major: [
        {"label": "wheel nvidia-cuda-crt 13.0.88", "folder": crt_wheel, "accepted": True}])
    assert cuda_env.extra_include_dirs() == [crt_wheel]


@pytest.mark.parametrize("cudart, accepted", [(12080, False), (13000, True), (13020, True), (None, False)])
def test_a_toolkit_of_another_major_is_refused(bare_env, monkeypatch, cudart, accepted):
    """NVRTC 13 with a CUDA 12.8 toolkit (or one whose version cannot be read) at $CUDA_PATH:
    its crt/ is not taken; mixed headers of two majors compile wrong."""
    folder = _lay_out("CUDA_PATH", bare_env, monkeypatch, cudart=cudart)
    assert cuda_env.toolkit_version(folder) == cudart
    assert cuda_env.extra_include_dirs() == ([folder] if accepted else [])
    if not accepted:
        _, searched = cuda_env.locate_headers(["crt/mma.h"], 13)
        place = next(p for p in searched if p["label"].startswith("$CUDA_PATH"))
        assert not place["accepted"]
        assert place["note"] == ("CUDA 12.8, NVRTC is 13.x" if cudart else
                                 "no cuda_runtime_api.h with CUDART_VERSION: version unknown")


def test_a_refused_toolkit_does_not_stop_the_search(bare_env, monkeypatch):
    _lay_out("CUDA_HOME", bare_env, monkeypatch, cudart=12080)
    want = _lay_out("usr-local-cuda-13.x", bare_env, monkeypatch)
    assert cuda_env.extra_include_dirs() == [want]


@pytest.mark.parametrize("toolkit, nvrtc, fix", [
    ("13.0.2", (13, 0), 'pip install "cuda-toolkit[crt]==13.0.2"'),
    (None, (13, 0), 'pip install "nvidia-cuda-crt==13.*"'),
    ("12.9.1", (13, 2), 'pip install "nvidia-cuda-crt==13.*"'),             # a cuda-toolkit of another major
    ("12.9.1", (12, 9), 'pip install "cuda-toolkit[nvcc]==12.9.1"'),
    (None, (12, 4), 'pip install "nvidia-cuda-nvcc-cu12==12.*"'),
])
def test_a_header_found_nowhere_is_one_error_naming_the_fix_and_every_place(bare_env, monkeypatch, toolkit, nvrtc,
                                                                           fix):
    monkeypatch.setattr(cuda_env, "_distribution_version", lambda name: toolkit if name == "cuda-toolkit" else None)
    monkeypatch.setattr(cuda_env, "nvrtc_version", lambda: nvrtc)
    monkeypatch.setenv("CUDA_PATH", str(bare_env.root / "cuda12"))
    _headers(bare_env.root / "cuda12" / "include", CRT, 12080 if nvrtc[0] == 13 else 11080)
    nvrtc_said = (f'{bare_env.wheel}/mma.h(55): catastrophic error: cannot open source file "crt/mma.h"\n'
                  '  #include "crt/mma.h"\n')
    with pytest.raises(cuda_env.CudaSetupError) as info:
        cuda_env.raise_with_install_hint(RuntimeError(nvrtc_said), "kernels/gemm.cu")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("kernels/gemm.cu: the CUDA header crt/mma.h (which <mma.h> includes)")
    assert f"fix: {fix} (or set CUDA_PATH to a CUDA {nvrtc[0]}.x toolkit)" in msg
    usr_local = bare_env.root / "usr_local"
    for place in ("CuPy's include path", bare_env.wheel, "$CONDA_PREFIX (not set)", "$CUDA_HOME (not set)",
                  f"$CUDA_PATH {bare_env.root / 'cuda12' / 'include'} (CUDA {'12.8' if nvrtc[0] == 13 else '11.8'}, "
                  f"NVRTC is {nvrtc[0]}.x)", f"toolkit of libcudart.so.{nvrtc[0]} (the OS loader finds none)",
                  f"toolkit of libnvrtc.so.{nvrtc[0]} (the OS loader finds none)",
                  f"{usr_local / 'cuda' / 'include'} (no such folder)", f"{usr_local}/cuda-{nvrtc[0]}.*/include (none)",
                  "CuPy said: "):
        assert place in msg, place


def test_cupy_14_finding_no_cuda_headers_is_a_setup_error(bare_env, monkeypatch):
    """A runtime-only layout (libraries, no headers): CuPy 14 raises its own RuntimeError before
    NVRTC runs; it becomes the one CudaSetupError naming the runtime headers and crt/."""
    monkeypatch.setattr(cuda_env, "nvrtc_version", lambda: (13, 0))
    cupy14 = RuntimeError("Failed to find CUDA headers. Please install CUDA toolkit headers (e.g., pip install "
                          "cupy-cuda12x[ctk]) or specify CUDA_PATH environment variable.")
    with pytest.raises(cuda_env.CudaSetupError, match=r'^kernels/conv.cu: CuPy finds no CUDA headers .*fix: pip install '
                       r'"nvidia-cuda-runtime==13\.0\.\*" "nvidia-cuda-crt==13\.\*" .*CuPy said: Failed to find CUDA '
                       r'headers'):
        cuda_env.raise_with_install_hint(cupy14, "kernels/conv.cu")
    monkeypatch.setattr(cuda_env, "_distribution_version", lambda name: "13.0.2" if name == "cuda-toolkit" else None)
    with pytest.raises(cuda_env.CudaSetupError, match=r'fix: pip install "cuda-toolkit\[cudart,crt\]==13\.0\.2"'):
        cuda_env.raise_with_install_hint(cupy14, "kernels/conv.cu")
    cupy13 = RuntimeError("Failed to auto-detect CUDA root directory. Please specify `CUDA_PATH` environment variable")
    monkeypatch.setattr(cuda_env, "nvrtc_version", lambda: (11, 8))
    with pytest.raises(cuda_env.CudaSetupError, match="install a CUDA 11.x toolkit and set CUDA_PATH"):
        cuda_env.raise_with_install_hint(cupy13, "kernels/conv.cu")


def test_report_says_where_each_header_came_from(bare_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(__version__="14.2.0"))
    monkeypatch.setitem(sys.modules, "cupy.cuda", None)        # NVRTC's version and NCCL: not importable here
    want = _lay_out("loader-cudart", bare_env, monkeypatch)
    rep = cuda_env.report()
    assert rep["headers"]["cuda_fp16.h"] == bare_env.wheel and rep["header_sources"]["cuda_fp16.h"] == "CuPy's include path"
    assert rep["headers"]["crt/mma.h"] == want
    assert rep["header_sources"]["crt/mma.h"].startswith(f"toolkit of libcudart.so.13 ({bare_env.root}/tk/lib64/")
    assert rep["extra_include_dirs"] == [want] and "fix" not in rep
    assert any(line.startswith("  <crt/mma.h>: " + want) for line in cuda_env.format_report(rep))
    monkeypatch.setattr(cuda_env, "loader_resolved_libraries", lambda names: {n: None for n in names})
    monkeypatch.setattr(cuda_env, "_extra_cache", {})
    rep = cuda_env.report()
    assert rep["headers"]["crt/mma.h"] is None and rep["fix"].startswith('pip install "nvidia-cuda-crt==13.*"')
    assert "  <crt/mma.h>: NOT FOUND" in cuda_env.format_report(rep)


def test_the_loader_is_asked_in_a_child_process():
    found = cuda_env.loader_resolved_libraries(["libc.so.6", "libnot-a-library-anywhere.so.1"])
    assert found["libnot-a-library-anywhere.so.1"] is None
    assert os.path.isabs(found["libc.so.6"]) and os.path.basename(found["libc.so.6"]).startswith("libc")
    assert cuda_env.toolkit_root("/usr/local/cuda-13.0/lib64/libcudart.so.13") == "/usr/local/cuda-13.0"
    assert cuda_env.toolkit_root("/opt/conda/targets/x86_64-linux/lib/libcudart.so.13") == "/opt/conda"
    assert cuda_env.toolkit_root("/site-packages/nvidia/cu13/lib/libcudart.so.13") == "/site-packages/nvidia/cu13"
    assert cuda_env.toolkit_root("/weird/place/libcudart.so.13") is None


def test_wheel_include_dirs_take_only_the_same_cuda_major():
    from importlib import metadata
    try:
        version = metadata.version("nvidia-cuda-runtime-cu12")
    except metadata.PackageNotFoundError:
        pytest.skip("the nvidia-cuda-runtime-cu12 wheel (test extra) is not installed")
    assert version.startswith("12.")
    dirs = cuda_env.wheel_include_dirs(12)
    assert cuda_env.find_header("cuda_fp16.h", dirs) is not None
    assert cuda_env.wheel_include_dirs(11) == [] and cuda_env.wheel_include_dirs(None) == []
    places = cuda_env._wheel_places(13)
    assert [p["label"] for p in places if not p["accepted"]] == [p["label"] for p in places]


def test_install_hints(bare_env, monkeypatch):
    monkeypatch.setattr(cuda_env, "cupy_wheel_cuda_major", lambda: 13)
    hint = cuda_env.install_hint(RuntimeError('Failure finding "libnvrtc.so": libnvrtc.so: cannot open shared '
                                              'object file: No such file or directory'))
    assert "NVRTC" in hint and 'pip install -e ".[gpu-cuda13]"' in hint
    hint = cuda_env.install_hint(Exception('kernels/gemm.cu(47): catastrophic error: cannot open source file '
                                           '"cuda_bf16.h"'))
    assert hint.startswith("the CUDA header cuda_bf16.h is in none of the places searched for NVRTC 13.0; fix: "
                           'pip install "nvidia-cuda-runtime==13.0.*"')
    assert cuda_env.install_hint(ValueError("something else")) is None
    cuda_env.raise_with_install_hint(ValueError("a compile error in our code"), "kernels/gemm.cu")  # no hint: returns
    assert [cuda_env.gpu_extra_for(m) for m in (11, 12, 13)] == ["gpu-cuda11", "gpu", "gpu-cuda13"]


# ---- NCCL and the GPU of each rank ------------------------------------------------------------------

@pytest.mark.parametrize("local_rank, count, want", [(0, 1, 0), (3, 1, 0), (3, 4, 3), (5, 4, 1), (7, 8, 7)])
def test_choose_gpu(local_rank, count, want):
    assert distributed.choose_gpu(local_rank, count) == want


def test_choose_gpu_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="sees no GPU"):
        distributed.choose_gpu(0, 0)


def test_shared_gpus():
    assert distributed.shared_gpus([("a", "bus0"), ("a", "bus1"), ("b", "bus0")]) == []
    assert distributed.shared_gpus([("a", "bus0"), ("a", "bus1"), ("a", "bus0"), ("a", None), ("a", None)]) == [
        ("a", "bus0", [0, 2])]


def test_nccl_missing_is_one_clear_error(monkeypatch):
    install_fake_cupy(monkeypatch, nccl_available=False)
    with pytest.raises(RuntimeError, match=r"needs the NCCL library.*pip install nvidia-nccl-cu1"):
        distributed.nccl_module()

    def no_mpi(*a, **k):
        raise AssertionError("MPI was started although NCCL is missing")

    monkeypatch.setattr(distributed.MpiCommunicator, "__init__", no_mpi)
    with pytest.raises(RuntimeError, match="NCCL"):
        distributed.NcclCommunicator()


def test_nccl_hint_names_the_package_of_the_installed_cupy(monkeypatch):
    from importlib import metadata
    real = metadata.distribution

    def distribution(name):
        if name == "cupy-cuda13x":
            return object()
        if name.startswith("cupy-cuda"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    install_fake_cupy(monkeypatch, nccl_available=False)
    with pytest.raises(RuntimeError, match=r'pip install nvidia-nccl-cu13 \(the gpu-cuda13 extra'):
        distributed.nccl_module()


def _fake_mpi(monkeypatch, rank, local_rank, local_size, world, placements):
    """MpiCommunicator.__init__ replaced: this process is `rank`; allgather_object returns the other
    ranks' (host, GPU) placements around this one's."""
    def init(self, *a, **k):
        distributed.Communicator.__init__(self)
        self.rank, self.world_size, self.local_rank, self.local_size = rank, world, local_rank, local_size
        self.host = "node0"
        self.comm = types.SimpleNamespace(bcast=lambda obj, root=0: (1, 2, 3))   # rank 0's unique id

    monkeypatch.setattr(distributed.MpiCommunicator, "__init__", init)
    monkeypatch.setattr(distributed.MpiCommunicator, "allgather_object",
                        lambda self, obj: placements[:rank] + [obj] + placements[rank + 1:])


def test_each_rank_takes_local_rank_modulo_the_visible_gpus(monkeypatch):
    # Slurm-style: every rank sees one GPU (its own), so rank 3 of the node uses its device 0
    record = install_fake_cupy(monkeypatch, device_count=1, bus_ids=["0000:1b:00.0"])
    others = [("node0", f"0000:{i:02x}:00.0") for i in range(4)]
    _fake_mpi(monkeypatch, rank=3, local_rank=3, local_size=4, world=4, placements=others)
    comm = distributed.NcclCommunicator()
    assert record.used == [0] and comm.gpu == 0 and record.communicators == [(4, (1, 2, 3), 3)]
    # mpirun-style: every rank sees the node's 4 GPUs: rank 3 uses GPU 3
    record = install_fake_cupy(monkeypatch, device_count=4)
    _fake_mpi(monkeypatch, rank=3, local_rank=3, local_size=4, world=4, placements=others)
    assert distributed.NcclCommunicator().gpu == 3 and record.used == [3]


def test_two_ranks_on_one_gpu_are_refused(monkeypatch):
    install_fake_cupy(monkeypatch, device_count=4)
    placements = [("node0", f"0000:{i % 4:02x}:00.0") for i in range(8)]   # 8 ranks, 4 GPUs
    _fake_mpi(monkeypatch, rank=7, local_rank=7, local_size=8, world=8, placements=placements)
    with pytest.raises(RuntimeError, match=r"ranks \[0, 4\] on host node0 would share the GPU"):
        distributed.NcclCommunicator()


# ---- --device auto says why not the GPU ---------------------------------------------------------------

class CUDARuntimeError(RuntimeError):
    pass


def test_auto_device_explains_an_unusable_cupy_once(monkeypatch):
    monkeypatch.setattr(nn.device, "_cuda_probe", {})
    monkeypatch.setattr(nn.device, "_reasons_said", set())
    install_fake_cupy(monkeypatch, count_error=CUDARuntimeError(
        "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"))
    said = []
    assert nn.device.auto_device(say=said.append) == "cpu"
    assert nn.device.auto_device(say=said.append) == "cpu"
    assert len(said) == 1
    assert said[0].startswith("--device auto: training on the CPU")
    assert "CuPy 14.2.0" in said[0] and "cudaErrorInsufficientDriver" in said[0] and "\n" not in said[0]


@pytest.mark.parametrize("count, want", [(0, "cpu"), (2, "cuda")])
def test_auto_device_with_no_visible_gpu_or_with_gpus(monkeypatch, count, want):
    monkeypatch.setattr(nn.device, "_cuda_probe", {})
    monkeypatch.setattr(nn.device, "_reasons_said", set())
    install_fake_cupy(monkeypatch, device_count=count)
    said = []
    assert nn.device.auto_device(say=said.append) == want
    assert said == ([] if count else ["--device auto: training on the CPU, not the GPU: CuPy 14.2.0 is installed "
                                      "but sees no GPU"])


def test_auto_device_is_silent_without_cupy(monkeypatch):
    monkeypatch.setattr(nn.device, "_cuda_probe", {})
    monkeypatch.setitem(sys.modules, "cupy", None)       # `import cupy` fails as if not installed
    said = []
    assert nn.device.auto_device(say=said.append) == "cpu" and said == []
    assert nn.device.cuda_unavailable_reason() == ""


def test_train_auto_device_prints_the_reason_and_cuda_refuses_with_it(monkeypatch, capsys):
    monkeypatch.setattr(nn.device, "_cuda_probe", {})
    monkeypatch.setattr(nn.device, "_reasons_said", set())
    install_fake_cupy(monkeypatch, count_error=CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device"))
    cfg = train.resolve_config(train.build_parser().parse_args(["--synthetic", "tiny"]))
    assert cfg["device"] == "cpu"
    assert "training on the CPU, not the GPU: CuPy 14.2.0 is installed but cannot use the GPU" in capsys.readouterr().out
    with pytest.raises(train.UsageError, match="--device cuda: CuPy 14.2.0 .*cudaErrorNoDevice"):
        train.resolve_config(train.build_parser().parse_args(["--synthetic", "tiny", "--device", "cuda"]))


# ---- bf16: refused up front -----------------------------------------------------------------------------

def test_bf16_is_refused_with_exit_2(capsys):
    code = train.main(["--precision", "bf16", "--device", "cpu", "--synthetic", "tiny", "--dry-run"])
    assert code == train.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--precision bf16 is not supported" in err and "--precision fp16" in err and "Traceback" not in err


def test_resnet_refuses_bfloat16_activations():
    with pytest.raises(ValueError, match="bfloat16"):
        nn.resnet50(width=0.0625, activation_dtype="bfloat16")
    nn.resnet50(width=0.0625, activation_dtype=np.float16)    # float16 stays accepted


# ---- nn/memory.py: activations kept for backward ---------------------------------------------------------

def test_activation_bytes_against_a_hand_count():
    """ResNet with one bottleneck per stage, width 1/16 (stem 4 channels), 32 px, 10 classes, batch 2,
    fp32, counted by hand from the layer shapes (values per image):
      input 32x32x3 = 3072; conv1 7x7/2 -> 16x16x4 = 1024; maxpool 3x3/2 -> 8x8x4 = 256 (+ int32 argmax);
      layer1 (4 -> 16, stride 1): 8x8x4 + 8x8x4 + 8x8x16 + downsample 8x8x16 = 2560;
      layer2 (8, stride 2): 8x8x8 + 4x4x8 + 4x4x32 + 4x4x32 = 1664;
      layer3 (16): 4x4x16 + 2x2x16 + 2x2x64 + 2x2x64 = 832;  layer4 (32): 2x2x32 + 1x1x32 + 128 + 128 = 416;
      convolution outputs 1024 + 2560 + 1664 + 832 + 416 = 6496, and as many batch-norm outputs;
      batch-norm channels 4 + 40 + 80 + 160 + 320 = 604 (mean and 1/std, float32, not per image);
      head: pooled 128, logits 10, softmax 10.
    """
    parts = memory.activation_bytes(2, image_size=32, width=0.0625, num_classes=10, layers=(1, 1, 1, 1),
                                    device="cpu")
    assert parts["input"] == 2 * 3072 * 4
    assert parts["conv_outputs"] == parts["bn_outputs"] == 2 * 6496 * 4
    assert parts["bn_stats"] == 2 * 604 * 4
    assert parts["maxpool"] == 2 * 256 * (4 + 4)
    assert parts["head"] == 2 * (128 + 10 + 10) * 4
    assert parts["weight_copies"] == 0
    assert parts["total"] == 138624
    # on emu and cuda the filters larger than 1x1 are kept channels-last: the stem's 4x3x7x7 and the
    # 3x3 convolutions of the four stages, (4*4 + 8*8 + 16*16 + 32*32) x 9 values, float32
    cuda = memory.activation_bytes(2, image_size=32, width=0.0625, num_classes=10, layers=(1, 1, 1, 1))
    assert cuda["weight_copies"] == (4 * 3 * 49 + (16 + 64 + 256 + 1024) * 9) * 4
    assert cuda["total"] == 138624 + cuda["weight_copies"]


def kept_for_backward(loss, model):
    """Bytes of the distinct arrays the graph under `loss` holds for backward (each recorded node's
    parents' data and every array its backward closures hold), parameters and buffers excluded."""
    exclude = {id(p.data) for p in model.parameters()} | {id(b) for _, b in model.named_buffers()}
    found = {}

    def add(a):
        if isinstance(a, np.ndarray):
            while isinstance(a.base, np.ndarray):
                a = a.base
            if id(a) not in exclude:
                found[id(a)] = a

    def scan(fn, seen):
        if id(fn) in seen:
            return
        seen.add(id(fn))
        for cell in fn.__closure__ or ():
            v = cell.cell_contents
            for item in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(item, types.FunctionType):
                    scan(item, seen)
                else:
                    add(item.data if isinstance(item, nn.Tensor) else item)

    for node in loss._topological_order():
        if node._backward is not None:
            for p in node._parents:
                add(p.data)
            scan(node._backward, set())
    return sum(a.nbytes for a in found.values())


@pytest.mark.parametrize("device, precision, layers, size", [
    ("cpu", "fp32", (1, 1, 1, 1), 32), ("cpu", "fp32", (3, 4, 6, 3), 33), ("emu", "fp32", (1, 1, 1, 1), 32),
    ("emu", "fp16", (3, 4, 6, 3), 32)])
def test_activation_bytes_equal_what_a_forward_pass_keeps(device, precision, layers, size):
    """The count from the layer shapes equals the bytes a real training forward pass leaves in the
    graph (our kernels on the emulator included, fp16 with its float32 statistics and weight copies)."""
    dtype = np.float16 if precision == "fp16" else None
    model = ResNet(Bottleneck, list(layers), num_classes=10, width=0.0625, activation_dtype=dtype).to(device)
    batch = 2
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(dtype or np.float32)
    labels = nn.get_device(device).asarray(np.arange(batch, dtype=np.int32) % 10)
    loss = F.cross_entropy(model(nn.Tensor(x, device=device), layout="NHWC"), labels)
    kept = kept_for_backward(loss, model) - labels.nbytes            # the labels are an input, not kept state
    want = memory.activation_bytes(batch, size, 0.0625, 10, precision, layers, device=device)["total"]
    assert kept == want


def test_resnet50_figures():
    assert memory.resnet_parameter_count() == 25_557_032
    assert memory.resnet_parameter_count(width=0.25, num_classes=7) == nn.resnet50(num_classes=7, width=0.25).num_parameters()
    convs = [s for kind, _, s, _ in memory.resnet_layer_shapes() if kind == "conv"]
    assert len(convs) == 53 and sum(h * w * c for h, w, c in convs) == 11_113_984
    fp32 = memory.activation_bytes(256)["total"] / memory.GiB
    fp16 = memory.activation_bytes(256, precision="fp16")["total"] / memory.GiB
    assert 21.5 < fp32 < 22.0 and 10.8 < fp16 < 11.2


@pytest.mark.parametrize("free_gib, precision", [(15.5, "fp32"), (15.5, "fp16"), (3.0, "fp32"), (80, "fp16")])
def test_max_batch_size_is_the_largest_that_fits(free_gib, precision):
    free = free_gib * memory.GiB
    b = memory.max_batch_size(free, precision=precision)
    assert b >= 1
    assert memory.step_bytes(b, precision=precision) <= 0.9 * free < memory.step_bytes(b + 1, precision=precision)
    assert memory.max_batch_size(free, precision=precision, multiple=8) == b // 8 * 8
    assert memory.max_batch_size(0.05 * memory.GiB) == 0


def test_oom_message_names_a_batch_that_fits():
    free = 15.2 * memory.GiB
    msg = memory.oom_message(None, 256, 1, 224, 1.0, 1000, "fp32", free_bytes=free)
    fit = memory.max_batch_size(free)
    assert f"--batch-size {fit // 8 * 8} " in msg and "21.8 GiB" in msg and "15.2 GiB free" in msg
    assert "--precision fp16" in msg and "\n" not in msg
    msg = memory.oom_message(None, 512, 8, 224, 1.0, 1000, "fp16", free_bytes=free)   # 64 per GPU
    suggestion = int(msg.split("--batch-size ")[1].split()[0])
    assert suggestion % 8 == 0 and suggestion // 8 <= memory.max_batch_size(free, precision="fp16")
    assert suggestion < 512 or memory.max_batch_size(free, precision="fp16") < 64
    assert "not even one image fits" in memory.oom_message(None, 256, 1, 224, 1.0, 1000, "fp32",
                                                           free_bytes=0.01 * memory.GiB)
    assert "--batch-size 128" in memory.oom_message(None, 256, 1, 224, 1.0, 1000, "fp32", free_bytes=None)


def test_train_out_of_memory_exits_4_with_a_batch_size(monkeypatch, tmp_path, capsys):
    """train.py's exit-4 path end to end on the CPU: a step that runs out of memory (a stand-in
    CuPy OutOfMemoryError) gives one line naming a --batch-size, from the free memory."""
    monkeypatch.setenv("MLPERF_RESNET_CACHE", str(tmp_path / "cache"))

    class OutOfMemoryError(MemoryError):
        pass

    def out_of_memory(*args, **kwargs):
        raise OutOfMemoryError("Out of memory allocating 822,083,584 bytes (allocated so far: 15,032,385,536 bytes).")

    monkeypatch.setattr(nn.functional, "cross_entropy", out_of_memory)
    monkeypatch.setattr(nn.device, "free_device_memory", lambda: (int(0.004 * memory.GiB), 16 * memory.GiB))
    code = train.main(["--synthetic", "tiny", "--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "64",
                       "--width", "0.0625", "--image-size", "32", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == train.EXIT_OOM
    line = next(x for x in out.splitlines() if "out of GPU memory" in x)
    fit = memory.max_batch_size(0.004 * memory.GiB, 32, 0.0625, 7)
    assert 1 <= fit < 64 and f"try --batch-size {fit} " in line and "0.0 GiB free" not in line


# ---- fail fast: a CudaSetupError ends a benchmark and bench.gpu_check at once, with its one line -------------

SETUP = cuda_env.CudaSetupError('kernels/conv.cu: the CUDA header crt/mma.h (which <mma.h> includes) is in none of '
                                'the places searched for NVRTC 13.0; fix: pip install "nvidia-cuda-crt==13.*" (or '
                                'set CUDA_PATH to a CUDA 13.x toolkit). Searched: ...')


def test_bench_train_stops_at_the_first_setup_error_with_its_line(monkeypatch, capsys, tmp_path):
    import bench
    from bench import train as bt
    tried = []

    def build_setup(*args, **kwargs):
        tried.append(args[0])
        raise SETUP

    monkeypatch.setattr(bt, "build_setup", build_setup)
    code = bench.stop_on_setup_error("bench.train", bt.main, ["--device", "cpu", "--size", "tiny",
                                                               "--json", str(tmp_path / "train.json")])
    out, err = capsys.readouterr()
    assert code == bench.EXIT_SETUP == 2 and tried == ["fp32"]        # the other configurations are not tried
    assert "[bench.train] cpu fp32-ours: starting" in out
    assert err.splitlines() == [f"bench.train: stopped: CudaSetupError: {SETUP}"]


def test_bench_train_writes_each_row_as_it_goes(monkeypatch, tmp_path):
    from bench import train as bt
    seen = []
    real = bt.measure

    def measure(name, *args, **kwargs):
        if name == "amp-ours":     # the third configuration: the JSON holds the first two already
            seen.append([r["config"] for r in json.loads((tmp_path / "t.json").read_text())["rows"]])
        return real(name, *args, **kwargs) if name != "amp-ours" else {"config": name, "device": "cpu",
                                                                         "cuda_graph": False, "optimizer": "sgd",
                                                                         "skipped": "not measured here"}

    monkeypatch.setattr(bt, "measure", measure)
    monkeypatch.setattr(bt, "build_setup", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not built here")))
    bt.run(["cpu"], ["fp32-ours", "fp32-cudnn", "amp-ours"], "tiny", out=str(tmp_path / "t.json"), quiet=True)
    assert seen == [["fp32-ours", "fp32-cudnn"]]
    assert [r["config"] for r in json.loads((tmp_path / "t.json").read_text())["rows"]] == ["fp32-ours", "fp32-cudnn",
                                                                                            "amp-ours"]


def test_bench_kernels_stops_at_the_first_setup_error(monkeypatch, capsys):
    import bench
    from bench import kernels as bk
    timed = []
    monkeypatch.setattr(bk, "measure_ceilings", lambda xp, repeat, size="resnet50": {
        "copy_bytes_per_s": 1.0, "matmul_flops_per_s": 1.0, "matmul_fp16_flops_per_s": None})

    def time_it(fn, xp, repeat, warmup=2):
        timed.append(fn)
        raise SETUP

    monkeypatch.setattr(bk, "_timing", time_it)
    code = bench.stop_on_setup_error("bench.kernels", bk.main, ["--size", "tiny", "--groups", "elementwise", "reduce",
                                                                 "--repeat", "1"])
    out, err = capsys.readouterr()
    assert code == 2 and len(timed) == 1
    assert "[bench.kernels] group elementwise: starting" in out and "group reduce" not in out
    assert err.splitlines() == [f"bench.kernels: stopped: CudaSetupError: {SETUP}"]


def test_bench_compare_torch_stops_at_the_first_setup_error(monkeypatch, capsys):
    pytest.importorskip("torch")
    import bench
    from bench import compare_torch as ct
    monkeypatch.setattr(ct.bt, "build_setup", lambda *a, **k: (_ for _ in ()).throw(SETUP))
    monkeypatch.setattr(ct, "check_same_loss", lambda *a, **k: (_ for _ in ()).throw(SETUP))
    code = bench.stop_on_setup_error("bench.compare_torch", ct.main, ["--device", "cpu", "--size", "tiny"])
    out, err = capsys.readouterr()
    assert code == 2 and "[bench.compare_torch] loss check, engine ours: starting" in out
    assert err.splitlines() == [f"bench.compare_torch: stopped: CudaSetupError: {SETUP}"]


_FAILING_STAGE = (
    "import sys\n"
    "from bench import stop_on_setup_error\n"
    "from kernels.runtime.cuda_env import CudaSetupError\n"
    "def main(argv):\n"
    "    print('[bench.standin] cuda fp32-ours: starting', flush=True)\n"
    "    raise CudaSetupError('kernels/conv.cu: crt/mma.h is missing; fix: pip install \"nvidia-cuda-crt==13.*\"')\n"
    "sys.exit(stop_on_setup_error('bench.standin', main))\n")


@pytest.mark.parametrize("keep_going", [False, True])
def test_gpu_check_stops_at_a_setup_error_and_says_its_line(tmp_path, keep_going):
    """A stage whose benchmark stops on a CudaSetupError (a stand-in that raises it through the real
    wrapper): gpu_check shows its progress line and the error's line as they come, and runs nothing
    after it (no 110 s of silence in a stage that cannot work); exit code 2."""
    from bench import gpu_check
    ran = tmp_path / "ran"
    plan = [("first", [sys.executable, "-c", _FAILING_STAGE], 60, None),
            ("second", [sys.executable, "-c", f"open({str(ran)!r}, 'w').close()"], 60, None)]
    said = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    results, code = gpu_check.run_plan(plan, tmp_path, env, budget=120, keep_going=keep_going, say=said.append)
    assert code == 2
    assert "    [bench.standin] cuda fp32-ours: starting" in said
    stop = 'bench.standin: stopped: CudaSetupError: kernels/conv.cu: crt/mma.h is missing; fix: pip install "nvidia-cuda-crt==13.*"'
    assert f"    {stop}" in said
    assert '[gpu_check] first: stopped: CudaSetupError: kernels/conv.cu: crt/mma.h is missing; fix: pip install ' \
           '"nvidia-cuda-crt==13.*"' in said
    assert results[0]["status"] == "failed" and results[0]["rc"] == 2 and results[0]["setup_error"] == stop
    assert results[0]["summary"].startswith("stopped: CudaSetupError: kernels/conv.cu")
    assert stop in (tmp_path / "first.log").read_text()
    if keep_going:
        assert results[1]["status"] == "ok" and ran.exists()
    else:
        assert results[1]["status"] == "skipped" and "first stage stopped on a CudaSetupError" in results[1]["detail"]
        assert not ran.exists()


def test_gpu_check_compile_stage_stops_at_a_setup_error(monkeypatch, tmp_path):
    """The compile stage's children run the real wrapper; one that stops on a CudaSetupError ends
    the stage with its line and exit code 2 (the others are killed)."""
    from bench import gpu_check
    real_py = gpu_check._py
    child = _FAILING_STAGE.replace("print('[bench.standin] cuda fp32-ours: starting', flush=True)\n", "")
    monkeypatch.setattr(gpu_check, "_py", lambda *args: real_py("-c", child) if "--compile-one" in args else
                        real_py(*args))
    said = []
    assert gpu_check.compile_kernels("cuda", 2, say=said.append) == 2
    assert said[0].startswith("[compile] kernels/") and said[0].endswith("(cuda): starting")
    assert said[-1] == ('bench.gpu_check compile: stopped: CudaSetupError: kernels/conv.cu: crt/mma.h is missing; '
                        'fix: pip install "nvidia-cuda-crt==13.*"')


def test_gpu_check_plans_compile_then_tests_then_the_timed_stages(monkeypatch, tmp_path):
    from bench import gpu_check
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: object())   # xdist, pytest-timeout there
    plan = gpu_check.stage_plan(False, tmp_path, ["tests"], jobs=8)
    names = [p[0] for p in plan]
    assert names[:3] == ["env", "compile", "pytest"]
    assert set(names[3:]) == {"train", "kernels", "ncu", "compare", "graph", "converge", "launch"}
    assert names.index("ncu") == names.index("kernels") + 1
    pytest_argv = plan[2][1]
    assert pytest_argv[pytest_argv.index("-n") + 1] == "8" and "--timeout=120" in pytest_argv
    assert plan[1][1][-4:] == ["--compile-kernels", "cuda", "--jobs", "8"]
    # ncu under Nsight Compute (bench/ncu_probe.py), stopping itself before the stage's limit
    ncu_name, ncu_argv, ncu_limit, ncu_json = plan[names.index("ncu")]
    assert ncu_argv[1:4] == ["-m", "bench.ncu_probe", "--out"] and ncu_json == "ncu/ncu.json"
    assert float(ncu_argv[ncu_argv.index("--timeout") + 1]) < ncu_limit <= 90
    # the limits; the budget (--budget, 500 s in bench/gpu_session.sh) caps the sum; the stages
    # up to ncu must fit in it with ncu's limit whole (bench/NOTES.md, "A GPU session")
    assert sum(p[2] for p in plan) <= 9 * 60 + 300
    assert sum(p[2] for p in plan[:names.index("ncu") + 1]) <= 500
    cpu = gpu_check.stage_plan(True, tmp_path, ["tests"], jobs=2)
    assert [p[0] for p in cpu] == names
    assert "--driver" in cpu[names.index("ncu")][1]       # the simulated GPU: the driver, no ncu
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    assert "-n" not in gpu_check.stage_plan(False, tmp_path, ["tests"])[2][1]


def test_train_exits_2_with_the_setup_errors_one_line(monkeypatch, tmp_path, capsys):
    """A CudaSetupError in the first step (CuPy cannot compile a kernel: a stand-in raises it where
    the loss is computed) ends train.py with exit code 2 and the error's one line, no traceback;
    so does one raised before training starts (--kernels compiles the chosen versions up front)."""
    monkeypatch.setenv("MLPERF_RESNET_CACHE", str(tmp_path / "cache"))

    def setup_error(*args, **kwargs):
        raise SETUP

    monkeypatch.setattr(nn.functional, "cross_entropy", setup_error)
    code = train.main(["--synthetic", "tiny", "--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "8",
                       "--width", "0.0625", "--image-size", "32", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == train.EXIT_USAGE == 2
    assert any(line.endswith(f"error: {SETUP}") for line in (out + err).splitlines()) and "Traceback" not in out + err


def test_train_exits_2_on_a_setup_error_before_training(monkeypatch, capsys):
    def setup_error(*args, **kwargs):
        raise SETUP

    monkeypatch.setattr(train, "run", setup_error)
    code = train.main(["--synthetic", "tiny", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [f"train.py: error: {SETUP}"]


def test_gpu_check_summarizes_the_ncu_stage(tmp_path):
    """The ncu stage's line: input v1/v2's DRAM reads when ncu measured, the reason when skipped,
    the driver's cases in CPU mode."""
    from bench import gpu_check
    stage = {"stage": "ncu", "status": "ok", "log": str(tmp_path / "ncu.log")}
    assert gpu_check.summarize(stage, tmp_path) == "no ncu/ncu.json"
    (tmp_path / "ncu").mkdir()
    result = {"status": "skipped", "reason": "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission",
              "cases": {}}
    (tmp_path / "ncu" / "ncu.json").write_text(json.dumps(result))
    assert gpu_check.summarize(stage, tmp_path) == "skipped: ==ERROR== ERR_NVGPUCTRPERM - The user does not have " \
                                                   "permission"
    read = {1: 38.6e6, 2: 192.9e6}
    result = {"status": "ok", "cases": {
        f"input_normalize u8->f32 v{n}": {"k": {"dram__bytes_read.sum": read[n], "gpu__time_duration.sum": 1.5e5}}
        for n in (1, 2)} | {"relu_forward f16 v1": {"a": {}, "b": {}}}}
    (tmp_path / "ncu" / "ncu.json").write_text(json.dumps(result))
    assert gpu_check.summarize(stage, tmp_path) == ("3 cases, 4 kernels profiled; input u8->f32 DRAM read v1 39 MB, "
                                                    "v2 193 MB (38.5 MB: the images only)")
    (tmp_path / "ncu_driver.json").write_text(json.dumps({"device": "the simulated GPU", "cases": {"a": ["k"]}}))
    assert gpu_check.summarize(stage, tmp_path) == "driver: 1 cases on the simulated GPU (no ncu there)"
