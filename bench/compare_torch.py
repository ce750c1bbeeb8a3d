"""Our training step beside PyTorch's, same batch, same GPU, same run: `python -m bench.compare_torch`.

PyTorch side: a ResNet-50 v1.5 written out below with torch.nn modules (the structure and
parameter names of torchvision.models.resnet50, without importing torchvision), channels_last
memory format, `torch.backends.cudnn.benchmark = True`, torch.optim.SGD (momentum 0.9), and
    fp32: TF32 OFF for convolutions and matmuls (torch enables it for cuDNN convolutions by
          default; our fp32 is true fp32, so TF32 would compare different arithmetic);
    amp:  torch.autocast(float16) + torch.amp.GradScaler (init scale 128).
Our side: bench.train's configurations (fp32-ours, fp32-cudnn, amp-ours, amp-cudnn).

Method: both sides train on a synthetic batch of the same shape, already on the device (ours:
uint8 NHWC images that train.py's Trainer.step normalises with its input kernel, one launch a
step; torch: a float NHWC batch seen as an NCHW tensor in channels_last strides). After a warm-up, rounds
alternate: ours N steps, torch N steps, ours, torch ... (so clock and thermal drift hit both);
throughput is the median over rounds. Peak memory is what each configuration adds at its peak:
CuPy's pool high-water (reserved) minus the bytes in use before the model was built, and
torch.cuda.max_memory_reserved minus torch's allocated bytes before; both pools are emptied first.

Correctness check first: our state_dict (torchvision key names) is loaded into the torch model
with strict=True, and one fp32 forward + backward of both on the same batch must give the same
loss (relative difference < 1e-4) and the same gradients of conv1.weight and fc.weight (relative
norm difference < 1e-2: float32 rounding through 53 batch norms, amplified where a BN normalises
few values, as at the tiny size; in float64 the two agree to 1e-12, measured on the cpu device).

    python -m bench.compare_torch                          # GPU, batch 256, 224 px
    python -m bench.compare_torch --size tiny --device cpu # CPU: torch on CPU vs our cpu device
    python -m bench.compare_torch --json out.json --rounds 3

Without PyTorch it prints "skipped" and exits 0. Exit 1 only when the loss check fails.
"""

import argparse
import json
import statistics
import sys
import time
import traceback

import numpy as np

from bench import train as bt
from bench import progress, stop_on_setup_error, write_json
from kernels.runtime.cuda_env import CudaSetupError

__all__ = ["torch_or_reason", "torch_resnet50", "check_same_loss", "run", "PAIRS", "TARGETS"]

# (ours config, torch precision): the comparisons the issue sets targets for
PAIRS = [("fp32-cudnn", "fp32"), ("amp-cudnn", "amp"), ("amp-ours", "amp"), ("fp32-ours", "fp32")]
TARGETS = {"fp32-cudnn": 0.95, "amp-cudnn": 0.9, "amp-ours": 0.5, "fp32-ours": None}
MEMORY_TARGET = {"amp-cudnn": 1.0}         # our peak / torch's peak at most this


def torch_or_reason():
    """(torch module, None) when PyTorch imports, else (None, why)."""
    try:
        import torch
        return torch, None
    except Exception as exc:
        return None, f"PyTorch is not importable ({type(exc).__name__}: {exc})"


# ---- the PyTorch model --------------------------------------------------------------------------


def torch_resnet50(torch, num_classes=1000, width=1.0):
    """ResNet-50 v1.5 as a torch.nn.Module with torchvision's module names and order; `width`
    scales channels exactly as nn.resnet50 does (max(1, round(c * width)))."""
    tnn = torch.nn
    scaled = lambda c: max(1, int(round(c * width)))

    class Bottleneck(tnn.Module):
        expansion = 4

        def __init__(self, cin, planes, stride, downsample):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)   # v1.5
            self.bn2 = tnn.BatchNorm2d(planes)
            self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(planes * 4)
            self.relu = tnn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            shortcut = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + shortcut)

    class ResNet(tnn.Module):
        def __init__(self):
            super().__init__()
            stem = scaled(64)
            self.conv1 = tnn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
            self.bn1 = tnn.BatchNorm2d(stem)
            self.relu = tnn.ReLU(inplace=True)
            self.maxpool = tnn.MaxPool2d(3, stride=2, padding=1)
            cin = stem
            for i, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2))):
                planes = scaled(64 * 2 ** i)
                stage = []
                for b in range(blocks):
                    s = stride if b == 0 else 1
                    down = None
                    if b == 0 and (s != 1 or cin != planes * 4):
                        down = tnn.Sequential(tnn.Conv2d(cin, planes * 4, 1, stride=s, bias=False),
                                              tnn.BatchNorm2d(planes * 4))
                    stage.append(Bottleneck(cin, planes, s, down))
                    cin = planes * 4
                setattr(self, f"layer{i + 1}", tnn.Sequential(*stage))
            self.avgpool = tnn.AdaptiveAvgPool2d(1)
            self.fc = tnn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet()


def _torch_device(device):
    return "cuda" if device == "cuda" else "cpu"


def _to_torch(torch, array, device):
    """A NumPy or CuPy array as a torch tensor on `device` (zero-copy from CuPy via DLPack)."""
    if type(array).__module__.split(".")[0] == "cupy":
        return torch.from_dlpack(array)
    return torch.from_numpy(np.ascontiguousarray(array)).to(_torch_device(device))


def _load_ours_into(torch, tmodel, model, device):
    import nn
    state = {k: torch.from_numpy(np.array(nn.device.to_numpy(v))) for k, v in model.state_dict().items()}
    tmodel.load_state_dict(state, strict=True)      # key names and shapes must match exactly
    return tmodel.to(_torch_device(device))


def _fp32_mode(torch):
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_same_loss(torch, device, size_name, engine="ours", seed=0):
    """Same weights, same batch, one fp32 forward + backward on both sides. Returns a dict with
    the two losses, relative differences, and 'passed'."""
    import nn
    from nn import functional as F
    size = bt.SIZES[size_name]
    _fp32_mode(torch)
    out = {"device": device, "engine": engine}
    try:
        nn.device.set_conv_engine(engine if device == "cuda" else "ours")
        model = nn.resnet50(num_classes=size["classes"], width=size["width"], seed=seed).to(device)
        tmodel = _load_ours_into(torch, torch_resnet50(torch, size["classes"], size["width"]), model, device)
        tmodel = tmodel.to(memory_format=torch.channels_last).train()
        rng = np.random.default_rng(seed + 1)
        x_host = rng.standard_normal((size["batch"], size["image"], size["image"], 3), dtype=np.float32)
        y_host = rng.integers(0, size["classes"], size["batch"]).astype(np.int32)
        dev = nn.device.get_device(device)
        x, y = dev.asarray(x_host), dev.asarray(y_host)
        loss = F.cross_entropy(model(x, layout="NHWC"), y)
        loss.backward()
        ours_loss = float(nn.device.to_numpy(loss.data))
        xt = _to_torch(torch, x, device).permute(0, 3, 1, 2)        # NCHW view, channels_last strides
        yt = _to_torch(torch, y, device).long()
        tloss = torch.nn.functional.cross_entropy(tmodel(xt), yt)
        tloss.backward()
        torch_loss = float(tloss.item())
        out.update(ours_loss=ours_loss, torch_loss=torch_loss,
                   loss_rel_diff=abs(ours_loss - torch_loss) / max(abs(torch_loss), 1e-30))
        params = dict(model.named_parameters())
        tparams = dict(tmodel.named_parameters())
        for name in ("conv1.weight", "fc.weight"):
            out[f"grad_rel_diff[{name}]"] = _rel(nn.device.to_numpy(params[name].grad),
                                                 tparams[name].grad.detach().cpu().numpy())
        grads_ok = all(v < 1e-2 for k, v in out.items() if k.startswith("grad_rel_diff"))
        out["passed"] = bool(out["loss_rel_diff"] < 1e-4 and grads_ok)
    except CudaSetupError:
        raise                       # every check and configuration would fail the same way
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        out["traceback"] = traceback.format_exc(limit=6)
        out["passed"] = False
    finally:
        nn.device.set_conv_engine("ours")
    return out


# ---- throughput, interleaved --------------------------------------------------------------------


class _Ours:
    """One of our configurations, built on first use, timed in chunks of steps."""

    def __init__(self, name, device, size):
        self.name, self.device, self.size = name, device, size
        self.setup, self.error, self.rates, self.peak_bytes = None, None, [], None

    def run(self, steps, warmup):
        import nn
        if self.error:
            return
        precision, engine = bt.CONFIGS[self.name]
        try:
            nn.device.set_conv_engine(engine)
            first = self.setup is None
            if first:
                base = _cupy_pool_reset() if self.device == "cuda" else 0
                self.setup = bt.build_setup(precision, self.device, self.size)
                for _ in range(warmup):
                    bt.eager_step(self.setup)
            bt._sync(self.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                bt.eager_step(self.setup)
            bt._sync(self.device)
            self.rates.append(self.size["batch"] * steps / (time.perf_counter() - t0))
            if first and self.device == "cuda":
                import cupy
                self.peak_bytes = int(cupy.get_default_memory_pool().total_bytes()) - base
        except CudaSetupError:
            raise
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.setup = None
        finally:
            nn.device.set_conv_engine("ours")


def _cupy_pool_reset():
    import cupy
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    return int(pool.used_bytes())


class _Torch:
    """PyTorch's training step in fp32 (TF32 off) or AMP (autocast fp16 + GradScaler)."""

    def __init__(self, torch, precision, device, size):
        self.torch, self.precision, self.device, self.size = torch, precision, device, size
        self.model, self.error, self.rates, self.peak_bytes = None, None, [], None

    def _build(self):
        torch, size = self.torch, self.size
        import nn
        tdev = _torch_device(self.device)
        ours = nn.resnet50(num_classes=size["classes"], width=size["width"], seed=0)      # same weights
        self.model = _load_ours_into(torch, torch_resnet50(torch, size["classes"], size["width"]), ours, "cpu")
        self.model = self.model.to(tdev, memory_format=torch.channels_last).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
        amp = self.precision == "amp"
        self.scaler = torch.amp.GradScaler(tdev, init_scale=bt.LOSS_SCALE) if amp else None
        rng = np.random.default_rng(0)
        x = rng.standard_normal((size["batch"], size["image"], size["image"], 3), dtype=np.float32)
        y = rng.integers(0, size["classes"], size["batch"]).astype(np.int64)
        self.x = torch.from_numpy(x.astype(np.float16) if amp else x).to(tdev).permute(0, 3, 1, 2)
        self.y = torch.from_numpy(y).to(tdev)

    def step(self):
        torch = self.torch
        amp = self.precision == "amp"
        with torch.autocast(_torch_device(self.device), dtype=torch.float16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        if amp:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(self, steps, warmup):
        torch = self.torch
        if self.error:
            return
        try:
            _fp32_mode(torch)
            first = self.model is None
            if first:
                base = 0
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                self._build()
                for _ in range(warmup):
                    self.step()
            self._sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                self.step()
            self._sync()
            self.rates.append(self.size["batch"] * steps / (time.perf_counter() - t0))
            if first and self.device == "cuda":
                self.peak_bytes = int(torch.cuda.max_memory_reserved()) - base
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.model = None


def run(device=None, size_name=None, rounds=2, steps=None, warmup=None, configs=None, out=None):
    """The loss check, then the interleaved throughput rounds; prints the tables; returns the
    result dict (with 'skipped' when PyTorch is missing)."""
    torch, reason = torch_or_reason()
    if torch is None:
        result = {"benchmark": "bench.compare_torch", "skipped": reason}
        print(f"bench.compare_torch: skipped: {reason}")
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=2)
        return result
    gpu = bt.gpu_available() and torch.cuda.is_available()
    device = device or ("cuda" if gpu else "cpu")
    if device == "cpu":
        # torch's OpenMP threads spin after each op and fight NumPy's BLAS threads for the cores
        # when the two alternate (measured: 100x slower steps on 2 cores); one thread each avoids it
        torch.set_num_threads(1)
    if device == "cuda" and not gpu:
        raise SystemExit("bench.compare_torch: --device cuda asked for, but CuPy or PyTorch sees no GPU")
    if device not in ("cuda", "cpu"):
        raise SystemExit(f"bench.compare_torch: --device must be cuda or cpu, got {device!r}")
    size_name = size_name or ("resnet50" if device == "cuda" else "tiny")
    size = dict(bt.SIZES[size_name])
    steps = steps or (10 if device == "cuda" else 2)
    warmup = warmup if warmup is not None else (3 if device == "cuda" else 1)
    result = {"benchmark": "bench.compare_torch", "environment": bt.environment(), "torch": torch.__version__,
              "device": device, "size": size_name, "sizes": {size_name: size}, "rounds": rounds, "steps": steps,
              "warmup": warmup, "tf32": False}
    # 1. the same loss from the same weights and batch
    engines = ["ours"] + (["cudnn"] if device == "cuda" and _cudnn_ok() else [])
    result["loss_checks"] = []
    for e in engines:
        progress("bench.compare_torch", f"loss check, engine {e}: starting")
        result["loss_checks"].append(check_same_loss(torch, device, size_name, e))
    # 2. throughput and memory, interleaved
    pairs = [(o, t) for o, t in PAIRS if configs is None or o in configs]
    if device != "cuda":
        pairs = [(o, t) for o, t in pairs if o == "fp32-ours"]    # cuDNN and fp16 need the GPU
    ours = {o: _Ours(o, device, size) for o, _ in pairs}
    theirs = {t: _Torch(torch, t, device, size) for _, t in pairs}
    for r in range(rounds):
        for o, t in pairs:
            progress("bench.compare_torch", f"round {r + 1}/{rounds}: ours {o}, then torch {t}")
            ours[o].run(steps, warmup)
            theirs[t].run(steps, warmup)
        result["pairs"] = _rows(pairs, ours, theirs)
        if out:         # the rounds so far: a run stopped at its time limit keeps them
            write_json(dict(result, partial=True), out, default=float, quiet=True)
    result["pairs"] = _rows(pairs, ours, theirs)
    print_tables(result)
    if out:
        write_json(result, out, default=float)
    return result


def _rows(pairs, ours, theirs):
    """One result row per (ours, torch) pair from the rounds measured so far."""
    rows = []
    for o, t in pairs:
        a, b = ours[o], theirs[t]
        row = {"ours": o, "torch": t, "target_throughput_ratio": TARGETS.get(o),
               "target_memory_ratio": MEMORY_TARGET.get(o)}
        if a.error or b.error:
            row["error"] = "; ".join(f"{who}: {e}" for who, e in (("ours", a.error), ("torch", b.error)) if e)
        if a.rates and b.rates and not row.get("error"):
            row["ours_images_per_s"] = statistics.median(a.rates)
            row["torch_images_per_s"] = statistics.median(b.rates)
            row["throughput_ratio"] = row["ours_images_per_s"] / row["torch_images_per_s"]
            row["ours_rates"], row["torch_rates"] = a.rates, b.rates
            if a.peak_bytes is not None and b.peak_bytes:
                row["ours_peak_bytes"], row["torch_peak_bytes"] = a.peak_bytes, b.peak_bytes
                row["memory_ratio"] = a.peak_bytes / b.peak_bytes
            met = []
            if row["target_throughput_ratio"] is not None:
                met.append(row["throughput_ratio"] >= row["target_throughput_ratio"])
            if row["target_memory_ratio"] is not None and "memory_ratio" in row:
                met.append(row["memory_ratio"] <= row["target_memory_ratio"])
            row["target_met"] = all(met) if met else None
        rows.append(row)
    return rows


def _cudnn_ok():
    try:
        from kernels import cudnn_engine
        return cudnn_engine.cudnn_available()[0]
    except Exception:
        return False


def print_tables(result):
    env = result["environment"]
    where = env.get("gpu") or "CPU, no GPU"
    print(f"\nbench.compare_torch on {where}: torch {result['torch']}, size={result['size']}, "
          f"{result['rounds']} interleaved rounds of {result['steps']} steps (TF32 off in fp32)")
    print("same weights, same batch, fp32 forward + backward:")
    for c in result["loss_checks"]:
        if "error" in c:
            print(f"  engine {c['engine']:<6} ERROR {c['error']}")
            continue
        grads = ", ".join(f"{k[len('grad_rel_diff['):-1]} {v:.1e}" for k, v in c.items() if k.startswith("grad_rel_diff"))
        print(f"  engine {c['engine']:<6} ours {c['ours_loss']:.6f}  torch {c['torch_loss']:.6f}  rel diff "
              f"{c['loss_rel_diff']:.1e}  grad rel diff: {grads}  {'PASS' if c['passed'] else 'FAIL'}")
    header = (f"{'ours':<12}{'torch':<7}{'ours img/s':>12}{'torch img/s':>13}{'ratio':>8}{'target':>8}"
              f"{'ours GB':>9}{'torch GB':>9}{'mem ratio':>10}  met")
    print(header)
    print("-" * len(header))
    for r in result["pairs"]:
        if "throughput_ratio" not in r:
            print(f"{r['ours']:<12}{r['torch']:<7}  ERROR {r.get('error', 'no measurement')}")
            continue
        tgt = "" if r["target_throughput_ratio"] is None else f">={r['target_throughput_ratio']:g}"
        gb = lambda b: "" if b is None else f"{b / 1e9:.2f}"
        mem = f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else ""
        met = {True: "yes", False: "NO", None: "-"}[r["target_met"]]
        print(f"{r['ours']:<12}{r['torch']:<7}{r['ours_images_per_s']:>12.1f}{r['torch_images_per_s']:>13.1f}"
              f"{r['throughput_ratio']:>8.2f}{tgt:>8}{gb(r.get('ours_peak_bytes')):>9}{gb(r.get('torch_peak_bytes')):>9}"
              f"{mem:>10}  {met}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if CuPy and torch see a GPU, else cpu")
    p.add_argument("--size", choices=sorted(bt.SIZES), help="default: resnet50 on cuda, tiny on cpu")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median reported)")
    p.add_argument("--steps", type=int, help="timed steps per round and side")
    p.add_argument("--warmup", type=int, help="warm-up steps per side (excluded)")
    p.add_argument("--configs", nargs="+", choices=[o for o, _ in PAIRS], help="our configurations to compare")
    p.add_argument("--json", dest="out", help="write the results here")
    args = p.parse_args(argv)
    if args.rounds < 1 or (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--rounds and --steps must be >= 1, --warmup >= 0")
    result = run(args.device, args.size, args.rounds, args.steps, args.warmup, args.configs, args.out)
    if "skipped" in result:
        return 0
    return 0 if all(c["passed"] for c in result["loss_checks"]) else 1


if __name__ == "__main__":
    sys.exit(stop_on_setup_error("bench.compare_torch", main))
