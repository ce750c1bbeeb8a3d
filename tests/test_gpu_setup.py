"""A first run on a GPU machine, tested without one: where CuPy finds NVRTC and the CUDA headers
(kernels/runtime/cuda_env.py), NCCL missing, the GPU each rank takes, why --device auto chose the CPU,
bf16 refused up front, and the memory arithmetic behind the out-of-memory advice (nn/memory.py).

CuPy is replaced by small stand-in modules where a test needs one.
"""

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
    assert cuda_env.kernel_headers() == ["cuda_bf16.h", "cuda_fp16.h", "cuda_pipeline.h", "mma.h"]
    assert cuda_env.needed_headers() == ["cuda_bf16.h", "cuda_fp16.h", "cuda_pipeline.h", "mma.h", "crt/mma.h",
                                         "crt/mma.hpp"]


def _headers(folder, names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("// header\n")
    return str(folder)


@pytest.mark.parametrize("layout", ["cuda12-wheels", "toolkit", "unknown"])
def test_extra_include_dirs_add_only_what_cupy_misses(monkeypatch, tmp_path, layout):
    runtime = _headers(tmp_path / "cuda_runtime" / "include", ["cuda_fp16.h", "cuda_bf16.h", "mma.h"])
    nvcc = _headers(tmp_path / "cuda_nvcc" / "include", ["crt/mma.h", "crt/mma.hpp"])
    toolkit = _headers(tmp_path / "toolkit" / "include", ["cuda_fp16.h", "cuda_bf16.h", "mma.h", "crt/mma.h",
                                                          "crt/mma.hpp"])
    cupy_dirs = {"cuda12-wheels": [str(tmp_path / "cupy"), runtime], "toolkit": [toolkit], "unknown": None}[layout]
    monkeypatch.setattr(cuda_env, "_extra_cache", {})
    monkeypatch.setattr(cuda_env, "cupy_include_dirs", lambda options=(): cupy_dirs)
    monkeypatch.setattr(cuda_env, "nvrtc_major", lambda: 12)
    monkeypatch.setattr(cuda_env, "wheel_include_dirs", lambda major: [runtime, nvcc] if major == 12 else [])
    want = {"cuda12-wheels": [nvcc], "toolkit": [], "unknown": []}[layout]
    assert cuda_env.extra_include_dirs() == want
    assert cuda_env.extra_include_options() == tuple(f"-I{d}" for d in want)


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


def test_install_hints_name_the_extra(monkeypatch):
    monkeypatch.setattr(cuda_env, "cupy_wheel_cuda_major", lambda: 13)
    hint = cuda_env.install_hint(RuntimeError('Failure finding "libnvrtc.so": libnvrtc.so: cannot open shared '
                                              'object file: No such file or directory'))
    assert "NVRTC" in hint and 'pip install -e ".[gpu-cuda13]"' in hint
    hint = cuda_env.install_hint(Exception('kernels/gemm.cu(47): catastrophic error: cannot open source file '
                                           '"crt/mma.h"'))
    assert "crt/mma.h" in hint and "gpu-cuda13" in hint
    assert cuda_env.install_hint(ValueError("something else")) is None
    with pytest.raises(cuda_env.CudaSetupError, match=r'kernels/gemm.cu: the CUDA header cuda_bf16.h .*\[gpu-cuda13\]'):
        cuda_env.raise_with_install_hint(Exception('cannot open source file "cuda_bf16.h"'), "kernels/gemm.cu")
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
