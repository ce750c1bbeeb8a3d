"""What `python -m kernels.<op>` checks and times, and bench/kernel_cases times: for each op family,
its inputs at one shape, the calls each version makes, what the float64 reference
(kernels/reference.py) says they must return, and the work they do.

    case = cases.make("conv", np)                       # the emulator's default shape
    case = cases.make("conv", cupy, (16, 56, 56, 64, 64, 3, 1, 1))
    for op in case.ops(version):                        # the ops whose kernels differ by version
        state = case.prepare(op)                        # fresh copies of what the op updates in place
        got = case.run(op, version, state)              # a tuple of arrays (or numbers)
        error, tolerance = case.check(op, version, got)
    case.shared_ops()                                   # ops with one kernel in every version

Inputs are made where they are used (NumPy's or CuPy's generator, fixed seeds) and kept there
only; the expected results are computed in float64 from host copies when a check asks for them.
A tolerance bounds `max |got - want| / max |want|` over each output: float32 rounding passes it,
a wrong index or a lost block does not.
"""

import numpy as np

from . import batchnorm as bn
from . import conv as cv
from . import cross_entropy as ce
from . import elementwise as ew
from . import gemm as gm
from . import input as inp
from . import optimizer as opt
from . import pool
from . import reduce as rd
from . import reference as ref
from . import versions
from .runtime import plan

__all__ = ["OpCase", "CASES", "make", "resnet50_param_sizes"]

F32 = 4


def _f64(a):
    with np.errstate(invalid="ignore"):   # a broken kernel's garbage (signalling NaNs) compares as NaN
        return np.asarray(a, dtype=np.float64)


def max_rel_error(got, want):
    """max |got - want| / max |want| over the outputs of one call (0 when both are all zero; inf
    for a NaN where the reference has a number, or a wrong shape)."""
    worst = 0.0
    for g, w in zip(got, want):
        g, w = _f64(g), _f64(w)
        if g.shape != w.shape:
            return float("inf")
        if not g.size:
            continue
        scale = max(float(np.max(np.abs(w))), 1e-30)
        with np.errstate(invalid="ignore"):   # inf - inf of a broken kernel: NaN, caught below
            error = float(np.max(np.abs(g - w))) / scale
        if error != error:        # NaN: Python's max() would pass over it
            return float("inf")
        worst = max(worst, error)
    return worst


class OpCase:
    """One op family at one shape.  Subclasses set `family`, `title`, `SHAPE` (the names of the
    shape parameters, in --shape order), `SHAPES` ({"emu": ..., "gpu": ...} defaults, "resnet50":
    the ResNet-50 layer the lesson predicts a GPU time for, "twin": the small shape the emulator
    counts for that prediction: its inner dimensions the layer's, and whole tiles of the matrix
    kernels, so that the layer's blocks each do a twin block's work) and define
    build/ops/run/expect/work."""

    family = ""
    title = ""
    SHAPE = ()
    SHAPES = {}
    TOLERANCE = 1e-5
    OTHER_LAYERS = ()      # ops that ResNet-50 runs at another shape than SHAPES["resnet50"] (not predicted)

    def __init__(self, xp, shape=None, device="emu"):
        values = tuple(self.SHAPES[device] if shape is None else shape)
        if len(values) != len(self.SHAPE):
            raise ValueError(f"{self.family}: a shape is {len(self.SHAPE)} numbers ({', '.join(self.SHAPE)}), got "
                             f"{len(values)}")
        self.xp = xp
        self.shape = dict(zip(self.SHAPE, (int(v) for v in values)))
        self.rng = np.random.default_rng(0)
        self._seed = 0
        self._expected = {}
        self.build(**self.shape)

    def describe_shape(self):
        return " ".join(f"{k}={v}" for k, v in self.shape.items())

    def randn(self, shape, scale=1.0, dtype=np.float32):
        """Standard normal numbers times `scale`, made on the device."""
        if self.xp is np:
            return (self.rng.standard_normal(shape) * scale).astype(dtype)
        self._seed += 1
        self.xp.random.seed(self._seed)
        return (self.xp.random.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(dtype)

    def ints(self, low, high, shape, dtype):
        """Integers in [low, high), made on the device."""
        if self.xp is np:
            return self.rng.integers(low, high, shape).astype(dtype)
        self._seed += 1
        self.xp.random.seed(self._seed)
        return self.xp.random.randint(low, high, shape).astype(dtype)

    @staticmethod
    def host(a, dtype=np.float64):
        """A host copy of a device array, as `dtype` (float64 for the reference)."""
        return np.asarray(_to_host(a), dtype=dtype)

    # what subclasses define
    def build(self, **shape):
        raise NotImplementedError

    def ops(self, version):
        """The ops whose kernel is version `version`'s own."""
        return []

    def shared_ops(self):
        """The ops that run the same kernel in every version (checked once)."""
        return []

    def prepare(self, op):
        """Fresh copies of the arrays `op` updates in place (timed calls reuse one set)."""
        return {}

    def run(self, op, version, state):
        raise NotImplementedError

    def expect(self, op):
        raise NotImplementedError

    def tolerance(self, op, version):
        return self.TOLERANCE

    def work(self, op):
        """(bytes, flops): the fewest bytes the op must move (inputs read once, outputs written
        once) and its floating-point operations (2 per multiply-add)."""
        return 0, 0

    # the same for every family
    def expected(self, op):
        if op not in self._expected:
            self._expected[op] = tuple(self.expect(op))
        return self._expected[op]

    def check(self, op, version, got):
        """(max relative error, tolerance) of one call's outputs."""
        host = [g if isinstance(g, (int, float)) else _to_host(g) for g in got]
        return max_rel_error(host, self.expected(op)), self.tolerance(op, version)


def _to_host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def partials_error(part, g, x, mean):
    """max_rel_error of the batch-norm backward partials part [2, B, C] (any split of the rows into
    blocks, summed here in float64) against [sum g, sum g * (x - mean)] per channel, from host arrays."""
    rows, centred = g.reshape(-1, g.shape[-1]), (x - mean).reshape(-1, g.shape[-1])
    want = (rows.sum(axis=0), np.einsum("mc,mc->c", rows, centred))
    got = tuple(np.asarray(part, dtype=np.float64).sum(axis=1)) if part.ndim == 3 else ()
    return max_rel_error(got, want)


# ---------------------------------------------------------------------------------- the families

class ReduceCase(OpCase):
    family, title = "reduce", "the sum of an array"
    SHAPE = ("n",)
    SHAPES = {"emu": (50_000,), "gpu": (1 << 22,), "resnet50": (256 * 56 * 56 * 256,), "twin": (1 << 20,)}

    def build(self, n):
        # small integers: every partial sum below 2^24 is exact in float32, so every version must
        # give the exact sum whatever the order of its adds
        self.x = self.ints(0, 4, n, np.float32)

    def ops(self, version):
        return ["sum"]

    def run(self, op, version, state):
        return (rd.sum(self.x, version=version),)

    def expect(self, op):
        return (np.array(self.host(self.x).sum()),)

    def tolerance(self, op, version):
        return 0.0 if 3 * self.shape["n"] < 2 ** 24 else 1e-5

    def work(self, op):
        return F32 * self.shape["n"], self.shape["n"]


class ElementwiseCase(OpCase):
    family, title = "elementwise", "ReLU, add, add + ReLU, casts"
    SHAPE = ("n",)
    # the emulator's n: not a whole number of 16-byte vectors
    SHAPES = {"emu": (20_003,), "gpu": (1 << 24,), "resnet50": (256 * 56 * 56 * 256,), "twin": (56 * 56 * 256,)}
    TOLERANCE = 1e-7     # one float32 rounding of the result
    OPS = ["relu_forward", "relu_backward", "add", "add_relu_forward", "relu_forward f16", "relu_backward f16",
           "add f16", "add_relu_forward f16", "cast f32->f16", "cast f16->f32"]

    def build(self, n):
        self.a, self.b = self.randn(n), self.randn(n)
        self.a16, self.b16 = self.a.astype(np.float16), self.b.astype(np.float16)

    def ops(self, version):
        return self.OPS

    def _call(self, lib, op, a, b, a16, b16, a32):
        f16 = op.endswith(" f16")
        x, y = (a16, b16) if f16 else (a, b)
        name = op.removesuffix(" f16")
        if name == "relu_forward":
            return lib.relu_forward(x)
        if name == "relu_backward":
            return lib.relu_backward(y, x)
        if name in ("add", "add_relu_forward"):
            return getattr(lib, name)(x, y)
        return lib.cast(a32, np.float16) if op == "cast f32->f16" else lib.cast(a16, np.float32)

    def run(self, op, version, state):
        with versions.running("elementwise", version or versions.FAMILIES["elementwise"].default):
            return (self._call(ew, op, self.a, self.b, self.a16, self.b16, self.a),)

    def expect(self, op):
        a, b, a16, b16 = self.host(self.a), self.host(self.b), self.host(self.a16), self.host(self.b16)
        if op == "cast f16->f32":
            return (a16,)
        return (self._call(ref, op, a, b, a16, b16, self.host(self.a, np.float32)),)

    def tolerance(self, op, version):
        # float16 results are exact (a max, a select, or a sum rounded once to the nearest float16,
        # which the float64 reference rounded to float16 gives) but the reference's sum is not
        # rounded: one float16 rounding (2^-11) for the adds; the casts round to nearest even
        if op in ("add f16", "add_relu_forward f16"):
            return 2 ** -11
        return 0.0 if op.endswith("f16") or op.startswith("cast") else self.TOLERANCE

    def work(self, op):
        n = self.shape["n"]
        return {"relu_forward": 8, "relu_backward": 12, "add": 12, "add_relu_forward": 12, "relu_forward f16": 4,
                "relu_backward f16": 6, "add f16": 6, "add_relu_forward f16": 6, "cast f32->f16": 6,
                "cast f16->f32": 6}[op] * n, 0


class GemmCase(OpCase):
    family, title = "gemm", "C = op(A) @ op(B), op(X) = X or X^T"
    SHAPE = ("M", "N", "K", "trans_a", "trans_b")
    SHAPES = {"emu": (67, 45, 129, 0, 0), "gpu": (4096, 4096, 4096, 0, 0),
              "resnet50": (256, 1000, 2048, 0, 1), "twin": (128, 128, 2048, 0, 1)}   # the classifier: x @ w^T

    def build(self, M, N, K, trans_a, trans_b):
        if trans_a not in (0, 1) or trans_b not in (0, 1):
            raise ValueError("gemm: trans_a and trans_b are 0 or 1")
        self.a = self.randn((K, M) if trans_a else (M, K))
        self.b = self.randn((N, K) if trans_b else (K, N))
        self.a16, self.b16 = self.a.astype(np.float16), self.b.astype(np.float16)
        self.trans = (bool(trans_a), bool(trans_b))

    def ops(self, version):
        return {1: ["gemm", "gemm_f16"], 2: ["gemm"], 3: ["gemm"], 4: ["gemm_f16"]}[version]

    def prepare(self, op):
        return {"c": self.xp.empty((self.shape["M"], self.shape["N"]), dtype=np.float32)}

    def run(self, op, version, state):
        if op == "gemm":
            return (gm.gemm(self.a, self.b, *self.trans, c=state["c"], version=version),)
        return (gm.gemm_f16(self.a16, self.b16, *self.trans, c=state["c"], version=version),)

    def expect(self, op):
        a, b = (self.host(self.a), self.host(self.b)) if op == "gemm" else (self.host(self.a16), self.host(self.b16))
        # float16 inputs: their products are the only rounding allowed beyond float32 sums
        return ((a.T if self.trans[0] else a) @ (b.T if self.trans[1] else b),)

    def work(self, op):
        M, N, K = self.shape["M"], self.shape["N"], self.shape["K"]
        item = 2 if op == "gemm_f16" else 4
        return (M * K + K * N) * item + 4 * M * N, 2 * M * N * K


class ConvCase(OpCase):
    family, title = "conv", "2-D convolution, forward and backward"
    SHAPE = ("N", "H", "W", "C", "K", "R", "stride", "padding")
    SHAPES = {"emu": (2, 9, 9, 8, 16, 3, 1, 1), "gpu": (16, 56, 56, 64, 64, 3, 1, 1),
              "resnet50": (256, 56, 56, 64, 64, 3, 1, 1), "twin": (1, 16, 16, 64, 64, 3, 1, 1)}
    # "+ bn stats": the forward that also gives batch norm the partial statistics of y
    # (conv2d_forward_bn_stats), checked by the mean and variance they merge to (float64, on the host)
    STATS = "conv2d_forward + bn stats"
    OPS = ["conv2d_forward", STATS, "conv2d_backward_data", "conv2d_backward_weight"]
    # float16 versions: activations and weights in float16, the weight gradient in float32 (as a
    # mixed-precision step asks for its float32 master weight); the weight arrives as conv_weight
    # gives it (channels-last memory), made once, outside the timed calls
    OPS_F16 = ["conv2d_forward f16", STATS + " f16", "conv2d_backward_data f16", "conv2d_backward_weight f16->f32"]
    # "+ relu bn": the backward data of a convolution whose input is relu(batchnorm(bn_x)), with the
    # ReLU's mask and the batch norm's backward partial sums in its epilogue (conv2d_backward_data_relu_bn),
    # checked by g and the partials summed over the blocks.  Not in OPS: the benchmark asks for it at
    # the layers whose input follows a batch norm and a ReLU (bench/kernel_cases/gemm_conv.py)
    RELU_BN = "conv2d_backward_data + relu bn"
    # "+ shortcut": the same, with dz, a's gradient from an identity shortcut, added before the mask
    # (the 1x1 reduce of a bottleneck whose input is the block before's add + ReLU output)
    RELU_BN_DZ = "conv2d_backward_data + shortcut + relu bn"

    def build(self, N, H, W, C, K, R, stride, padding):
        P, Q = cv.conv_output_size(H, R, stride, padding), cv.conv_output_size(W, R, stride, padding)
        if P < 1 or Q < 1:
            raise ValueError(f"conv: a {R}x{R} filter with stride {stride} and padding {padding} on a {H}x{W} "
                             f"image gives an empty output")
        self.x = self.randn((N, H, W, C))
        self.w = self.randn((K, C, R, R), scale=0.1)
        self.dy = self.randn((N, P, Q, K))
        self.x16, self.dy16 = self.x.astype(np.float16), self.dy.astype(np.float16)
        self._wk16 = None
        self.P, self.Q = P, Q

    def wk16(self):
        """The float16 weight as the float16 versions read it (conv_weight of the float32 one)."""
        if self._wk16 is None:
            self._wk16 = cv.conv_weight(self.w, np.float16)
        return self._wk16

    def ops(self, version):
        return self.OPS_F16 if version in cv.F16_VERSIONS else self.OPS

    def relu_bn_ops(self, version, shortcut=False):
        """The backward data with the ReLU's and batch norm's backward in its epilogue, by version
        (shortcut: with an identity shortcut's gradient added, RELU_BN_DZ)."""
        return [(self.RELU_BN_DZ if shortcut else self.RELU_BN) + (" f16" if version in cv.F16_VERSIONS else "")]

    def relu_bn_inputs(self, f16=False):
        """(a, bn_x, bn_mean, dz) of the "+ relu bn" ops: a = relu of normal numbers (about half of
        the gradient masked), bn_x normal about 0.5 (float16 for f16), bn_mean float32 [C] near 0.5,
        dz normal (the shortcut's gradient); made once, on first use (prepare), outside the timed calls."""
        if not hasattr(self, "_relu_bn"):
            shape = (self.shape["N"], self.shape["H"], self.shape["W"], self.shape["C"])
            a = self.xp.maximum(self.randn(shape), np.float32(0))
            bn_x = self.randn(shape) + np.float32(0.5)
            mean = self.randn((self.shape["C"],), scale=0.1) + np.float32(0.5)
            dz = self.randn(shape)
            self._relu_bn = {False: (a, bn_x, mean, dz),
                             True: (a.astype(np.float16), bn_x.astype(np.float16), mean, dz.astype(np.float16))}
        return self._relu_bn[bool(f16)]

    def _relu_bn_op(self, op):
        return op.startswith(self.RELU_BN) or op.startswith(self.RELU_BN_DZ)

    def prepare(self, op):
        return {"relu_bn": self.relu_bn_inputs(op.endswith("f16"))} if self._relu_bn_op(op) else {}

    def run(self, op, version, state):
        s, p = self.shape["stride"], self.shape["padding"]
        if op.endswith("f16") or op.endswith("f32"):
            x, w, dy = self.x16, self.wk16(), self.dy16
        else:
            x, w, dy = self.x, self.w, self.dy
        if self._relu_bn_op(op):
            a, bn_x, mean, dz = state["relu_bn"]
            dz = dz if op.startswith(self.RELU_BN_DZ) else None
            return cv.conv2d_backward_data_relu_bn(dy, w, x.shape, s, p, a, bn_x, mean, dz, version=version)  # (g, part)
        if op.startswith(self.STATS):
            return cv.conv2d_forward_bn_stats(x, w, s, p, version=version)   # (y, stats)
        if op.startswith("conv2d_forward"):
            return (cv.conv2d_forward(x, w, s, p, version=version),)
        if op.startswith("conv2d_backward_data"):
            return (cv.conv2d_backward_data(dy, w, x.shape, s, p, version=version),)
        dtype = np.float32 if op.endswith("f32") else None
        return (cv.conv2d_backward_weight(x, dy, w.shape, s, p, version=version, dtype=dtype),)

    def check(self, op, version, got):
        if op.startswith(self.STATS):   # (y, stats) -> (y, mean, variance): any split into blocks merges alike
            y, stats = got
            _, mean, var = ref.merge_bn_partials(_to_host(stats))
            got = (y, mean, var)
        if self._relu_bn_op(op):   # g against the reference; the partials against g's own sums
            g, part = (_to_host(a) for a in got)
            err = max_rel_error((g,), self.expected(op))
            _, bn_x, mean, _ = (self.host(a) for a in self.relu_bn_inputs(op.endswith("f16")))
            return max(err, partials_error(part, self.host(g), bn_x, mean)), self.tolerance(op, version)
        return super().check(op, version, got)

    def expect(self, op):
        s, p = self.shape["stride"], self.shape["padding"]
        half = op.endswith("f16") or op.endswith("f32")
        x, dy = (self.host(self.x16), self.host(self.dy16)) if half else (self.host(self.x), self.host(self.dy))
        w = self.host(self.host(self.w, np.float32).astype(np.float16)) if half else self.host(self.w)
        if op.startswith(self.STATS):
            y = ref.conv2d_forward(x, w, s, p)
            rows = y.reshape(-1, y.shape[-1])
            return y, rows.mean(axis=0), rows.var(axis=0)
        if self._relu_bn_op(op):
            a, _, _, dz = (self.host(v) for v in self.relu_bn_inputs(half))
            da = ref.conv2d_backward_data(dy, w, x.shape, s, p)
            return (np.where(a > 0, da + dz if op.startswith(self.RELU_BN_DZ) else da, 0.0),)
        if op.startswith("conv2d_forward"):
            return (ref.conv2d_forward(x, w, s, p),)
        if op.startswith("conv2d_backward_data"):
            return (ref.conv2d_backward_data(dy, w, x.shape, s, p),)
        return (ref.conv2d_backward_weight(x, dy, w.shape, s, p),)

    def tolerance(self, op, version):
        # a float16 result is rounded once: 2^-11 of its size; float32 sums of float16 products: 1e-5
        return 2e-3 if op.endswith("f16") else self.TOLERANCE

    def work(self, op):
        N, C, K, R = self.shape["N"], self.shape["C"], self.shape["K"], self.shape["R"]
        item = 2 if op.endswith("f16") or op.endswith("f32") else F32
        partials = 4 * F32 * -(-(N * self.P * self.Q) // 64) * K if op.startswith(self.STATS) else 0
        if self._relu_bn_op(op):   # also reads a and bn_x (and dz); 2 floats per (64-pixel tile, channel)
            partials = (3 if op.startswith(self.RELU_BN_DZ) else 2) * self.x.size * item + \
                2 * F32 * -(-self.x.size // C // 64) * C
        return item * (self.x.size + self.w.size + self.dy.size) + partials, 2 * N * self.P * self.Q * K * C * R * R


class BatchnormCase(OpCase):
    family, title = "batchnorm", "batch normalisation (plain, + ReLU, + add + ReLU), training and inference"
    SHAPE = ("N", "H", "W", "C")
    SHAPES = {"emu": (4, 7, 7, 40), "gpu": (32, 56, 56, 256), "resnet50": (256, 56, 56, 256), "twin": (1, 16, 16, 256)}
    FORWARD = ["batchnorm_forward_train", "batchnorm_relu_forward_train", "batchnorm_add_relu_forward_train"]
    BACKWARD = ["batchnorm_backward", "batchnorm_relu_backward", "batchnorm_add_relu_backward"]
    # version 3: the same forwards with the statistics from the convolution's partials (made once,
    # on the host, as conv.cu's epilogue writes them: one block per 64 rows); its backward is version
    # 2's; version 4: version 3's statistics, its own normalising passes and backward
    FROM_STATS = [f + " from conv stats" for f in FORWARD]
    # " f16": the same on float16 activations (a mixed-precision step's), statistics in float32
    BACKWARD_F16 = [b + " f16" for b in BACKWARD]
    FROM_STATS_F16 = [f + " f16" for f in FROM_STATS]
    # version 5: the ReLU form's backward from g = dy * (y > 0) and the partial sums the next
    # convolution's backward-data epilogue writes (made once, on the host, per 64-row block as it does)
    FROM_PARTIALS = ["batchnorm_relu_backward from conv partials", "batchnorm_relu_backward from conv partials f16"]
    # and the pair form (a projection block's add + ReLU batch norm): its dx pass also sums g over the
    # projection's batch norm's input (the residual stands for it, with mean2 its batch mean)
    PAIR = ["batchnorm_relu_backward from conv partials pair", "batchnorm_relu_backward from conv partials pair f16"]

    def build(self, N, H, W, C):
        shape = (N, H, W, C)
        if N * H * W < 2:
            raise ValueError("batchnorm: the statistics need at least 2 values per channel (N*H*W >= 2)")
        # a mean per channel beside a spread of 2: version 1's E[x^2] - E[x]^2 loses a few digits here
        self.x = self.randn(shape, scale=2.0) + self.randn(C)
        self.residual, self.dy = self.randn(shape), self.randn(shape)
        self.gamma, self.beta = self.randn(C, scale=0.5) + np.float32(1.0), self.randn(C)
        self.rm, self.rv = self.randn(C), self.ints(0, 1000, C, np.float32) / np.float32(1000) + np.float32(0.5)
        self._f16 = None
        self._saved = {}
        self._stats = {}
        self._partials = {}

    def activations(self, op):
        """(x, residual, dy) in the dtype of `op`: float32, or float16 for an op ending in " f16"."""
        if not op.endswith(" f16"):
            return self.x, self.residual, self.dy
        if self._f16 is None:
            self._f16 = tuple(a.astype(np.float16) for a in (self.x, self.residual, self.dy))
        return self._f16

    def conv_stats(self, f16=False):
        """Batch-norm partials of x [4, ceil(M / 64), C] as a convolution's epilogue gives them:
        per 64-row block the count, its first row as the shift, the mean's offset from it, and M2.
        (On plan.cupy, which holds no numbers: an array of that shape.)"""
        if f16 not in self._stats:
            x = self.activations(" f16" if f16 else "")[0]
            C = self.shape["C"]
            if self.xp is plan.cupy:
                self._stats[f16] = self.xp.empty((4, -(-(x.size // C) // 64), C), dtype=np.float32)
                return self._stats[f16]
            rows = self.host(x).reshape(-1, C)
            blocks = [rows[i:i + 64] for i in range(0, rows.shape[0], 64)]
            stats = np.empty((4, len(blocks), rows.shape[1]))
            for p, b in enumerate(blocks):
                shift = self.host(self.host(b[0], np.float32))
                stats[0, p], stats[1, p] = len(b), shift
                stats[2, p], stats[3, p] = (b - shift).mean(axis=0), ((b - b.mean(axis=0)) ** 2).sum(axis=0)
            self._stats[f16] = self.xp.asarray(stats.astype(np.float32))
        return self._stats[f16]

    def conv_partials(self, op):
        """(g, part) for the backward `op` from conv partials: g = dy where y > 0 (in op's dtype) and
        part float32 [2, ceil(M / 64), C] = per 64-row block, [sum g, sum g * (x - mean)] from g and x
        as stored, as conv.cu's backward-data epilogue writes them.  (On plan.cupy: arrays of
        those shapes.)"""
        if op not in self._partials:
            x, _, dy = self.activations(op)
            y, mean, _ = self.saved(op)
            C = self.shape["C"]
            B = -(-(x.size // C) // 64)
            if self.xp is plan.cupy:
                self._partials[op] = (self.xp.empty(x.shape, dtype=x.dtype), self.xp.empty((2, B, C), dtype=np.float32))
                return self._partials[op]
            g = np.where(self.host(y) > 0, self.host(dy, x.dtype), 0).astype(x.dtype)
            rows, xc = self.host(g).reshape(-1, C), self.host(x).reshape(-1, C) - self.host(mean)
            part = np.stack([np.add.reduceat(rows, range(0, rows.shape[0], 64)),
                             np.add.reduceat(rows * xc, range(0, rows.shape[0], 64))]).astype(np.float32)
            self._partials[op] = (self.xp.asarray(g), self.xp.asarray(part))
        return self._partials[op]

    def ops(self, version):
        if version == versions.BN_BACKWARD_FROM_CONV:   # version 4's kernels, but for the backward from partials
            return self.FROM_PARTIALS + self.PAIR
        # the inference pass: versions 1 to 3 share it, version 4 has its own
        if version == versions.BN_FROM_CONV:
            return self.FROM_STATS + self.FROM_STATS_F16 + ["batchnorm_forward_inference"]
        if version == 4:   # version 3's statistics, its own normalising passes and backward
            return self.FROM_STATS + self.FROM_STATS_F16 + self.BACKWARD + self.BACKWARD_F16 + \
                ["batchnorm_forward_inference"]
        f16 = self.BACKWARD_F16 if version == 2 else []   # (what versions 3 and 4 replace; not version 1's lesson)
        return self.FORWARD + self.BACKWARD + f16 + ["batchnorm_forward_inference"]

    def prepare(self, op):
        forward = op.removesuffix(" f16") in self.FORWARD + self.FROM_STATS
        return {"rm": self.rm.copy(), "rv": self.rv.copy()} if forward else {}

    def _forward(self, op, rm, rv):
        x, residual, _ = self.activations(op)
        base = op.removesuffix(" f16")
        if base in self.FROM_STATS:
            mode = self.FORWARD[self.FROM_STATS.index(base)]
            residual = residual if mode == "batchnorm_add_relu_forward_train" else None
            return bn.batchnorm_forward_train_from_stats(x, self.conv_stats(op.endswith(" f16")), self.gamma,
                                                         self.beta, rm, rv, relu=mode != "batchnorm_forward_train",
                                                         residual=residual)
        if base == "batchnorm_add_relu_forward_train":
            return bn.batchnorm_add_relu_forward_train(x, residual, self.gamma, self.beta, rm, rv)
        return getattr(bn, base)(x, self.gamma, self.beta, rm, rv)

    def saved(self, op):
        """What the backward `op` gets from its forward: (y, saved_mean, saved_invstd) of the default
        version, the same for every version checked (and for the reference)."""
        if op not in self._saved:
            base = op.removesuffix(" f16").removesuffix(" pair").removesuffix(" from conv partials")
            fwd = self.FORWARD[self.BACKWARD.index(base)] + (" f16" if op.endswith(" f16") else "")
            with versions.running("batchnorm", versions.FAMILIES["batchnorm"].default):
                self._saved[op] = self._forward(fwd, self.rm.copy(), self.rv.copy())
        return self._saved[op]

    def run(self, op, version, state):
        with versions.running("batchnorm", version or versions.FAMILIES["batchnorm"].default):
            if op == "batchnorm_forward_inference":
                return (bn.batchnorm_forward_inference(self.x, self.gamma, self.beta, self.rm, self.rv),)
            base = op.removesuffix(" f16")
            if base in self.FORWARD + self.FROM_STATS:
                return self._forward(op, state["rm"], state["rv"]) + (state["rm"], state["rv"])
            x, _, dy = self.activations(op)
            y, mean, invstd = self.saved(op)
            if op in self.FROM_PARTIALS:
                g, part = self.conv_partials(op)
                return bn.batchnorm_backward_from_partials(g, x, self.gamma, mean, invstd, part)
            if op in self.PAIR:
                g, part = self.conv_partials(op)
                return bn.batchnorm_backward_from_partials_pair(g, x, self.gamma, mean, invstd, part,
                                                                *self.pair_input(op))
            if base == "batchnorm_backward":
                return bn.batchnorm_backward(dy, x, self.gamma, mean, invstd)
            return getattr(bn, base)(dy, y, x, self.gamma, mean, invstd)

    def pair_input(self, op):
        """(x2, mean2) of the pair form: the residual (in op's dtype) as the second batch norm's input,
        its batch mean made once (float32)."""
        x2 = self.activations(op)[1]
        if "mean2" not in self._partials:
            self._partials["mean2"] = self.randn(self.shape["C"], scale=0.1)
        return x2, self._partials["mean2"]

    def check(self, op, version, got):
        if op in self.PAIR:   # dx, dgamma, dbeta as the ReLU form's; part2 against g's own sums over x2
            dx, dgamma, dbeta, part2 = (_to_host(a) for a in got)
            err = max_rel_error((dx, dgamma, dbeta), self.expected(op))
            g = self.host(_to_host(self.conv_partials(op)[0]))
            x2, mean2 = (self.host(a) for a in self.pair_input(op))
            return max(err, partials_error(part2, g, x2, mean2)), self.tolerance(op, version)
        return super().check(op, version, got)

    def expect(self, op):
        x, residual, dy = (self.host(a) for a in self.activations(op))
        g, b, rm, rv = (self.host(a) for a in (self.gamma, self.beta, self.rm, self.rv))
        if op == "batchnorm_forward_inference":
            return (ref.batchnorm_forward_inference(x, g, b, rm, rv),)
        base = op.removesuffix(" f16")
        if base in self.FROM_STATS:    # the same numbers as the forward with its own statistics
            base = self.FORWARD[self.FROM_STATS.index(base)]
        if base in self.FORWARD:       # the reference updates rm, rv (host copies) in place
            if base == "batchnorm_add_relu_forward_train":
                out = ref.batchnorm_add_relu_forward_train(x, residual, g, b, rm, rv)
            else:
                out = getattr(ref, base)(x, g, b, rm, rv)
            return tuple(out) + (rm, rv)
        y, mean, invstd = (self.host(a) for a in self.saved(op))
        base = base.removesuffix(" pair").removesuffix(" from conv partials")   # the ReLU form's numbers
        if base == "batchnorm_backward":
            return ref.batchnorm_backward(dy, x, g, mean, invstd)
        return getattr(ref, base)(dy, y, x, g, mean, invstd)

    def tolerance(self, op, version):
        if op.endswith(" f16"):
            return 2e-3     # float16 activations: each rounded once (2^-11); statistics and sums in float32
        return 1e-4 if version == 1 else 1e-5   # version 1: E[x^2] - E[x]^2 and long float32 sums

    def work(self, op):
        item = 2 if op.endswith(" f16") else F32
        op = op.removesuffix(" f16")
        partials = 0
        if op == self.FROM_PARTIALS[0]:   # g and x read, dx written; the partials read once
            return 3 * item * self.x.size + 2 * F32 * -(-(self.x.size // self.shape["C"]) // 64) * self.shape["C"], 0
        if op == self.PAIR[0]:   # and x2 read (the sums written are a few KB)
            return 4 * item * self.x.size + 2 * F32 * -(-(self.x.size // self.shape["C"]) // 64) * self.shape["C"], 0
        if op in self.FROM_STATS:      # the same passes, and the partials read once
            op = self.FORWARD[self.FROM_STATS.index(op)]
            partials = 4 * F32 * -(-(self.x.size // self.shape["C"]) // 64) * self.shape["C"]
        passes = {"batchnorm_forward_train": 2, "batchnorm_relu_forward_train": 2,
                  "batchnorm_add_relu_forward_train": 3, "batchnorm_forward_inference": 2,
                  "batchnorm_backward": 3, "batchnorm_relu_backward": 4, "batchnorm_add_relu_backward": 5}[op]
        return passes * item * self.x.size + partials, 0


class PoolCase(OpCase):
    family, title = "pool", "max pooling and global average pooling"
    SHAPE = ("N", "H", "W", "C", "kernel", "stride", "padding")
    SHAPES = {"emu": (2, 9, 9, 16, 3, 2, 1), "gpu": (64, 112, 112, 64, 3, 2, 1),
              "resnet50": (256, 112, 112, 64, 3, 2, 1), "twin": (1, 112, 112, 64, 3, 2, 1)}
    OTHER_LAYERS = ("global_avgpool_forward", "global_avgpool_backward", "global_avgpool_backward f16",
                    "global_avgpool_backward relu_bn", "global_avgpool_backward relu_bn f16")   # the head's, at 7x7x2048
    TOLERANCE = 1e-6

    def build(self, N, H, W, C, kernel, stride, padding):
        P, Q = (H + 2 * padding - kernel) // stride + 1, (W + 2 * padding - kernel) // stride + 1
        if kernel < 1 or stride < 1 or not 0 <= padding < kernel or P < 1 or Q < 1:
            raise ValueError(f"pool: a {kernel}x{kernel} window, stride {stride}, padding {padding} does not fit a "
                             f"{H}x{W} image")
        self.x = self.randn((N, H, W, C))
        self.dy = self.randn((N, P, Q, C))
        self.dyavg = self.randn((N, C))
        self.x16, self.dy16, self.dyavg16 = (a.astype(np.float16) for a in (self.x, self.dy, self.dyavg))
        self._argmax = {}

    RELU_BN = "maxpool2d_backward relu_bn"   # + the stem's ReLU mask and batch-norm partials (version 3's epilogue)
    AVG_RELU_BN = "global_avgpool_backward relu_bn"   # + the last block's (the head's average pool)

    def ops(self, version):
        # float16: version 1 adds with float32 atomics only
        f16 = ["maxpool2d_backward f16"] if version >= 2 else []
        relu_bn = [self.RELU_BN, self.RELU_BN + " f16"] if version >= 3 else []
        avg = [self.AVG_RELU_BN, self.AVG_RELU_BN + " f16"] if version >= 3 else []
        return ["maxpool2d_backward"] + f16 + relu_bn + ["global_avgpool_backward", "global_avgpool_backward f16"] + avg

    def bn_inputs(self, f16=False):
        """(a, bn_x, bn_mean) of the relu_bn ops: bn_x normal about 0.5 (float16 for f16), bn_mean
        float32 [C] near 0.5, a = relu(bn_x - bn_mean) (about half the pixels masked); made once, on
        first use (as the argmax of the other ops: a prediction plans its call twice and keeps the
        second), outside the timed calls."""
        if not hasattr(self, "_bn_inputs"):
            self._bn_inputs = {}
        if bool(f16) not in self._bn_inputs:
            dtype = np.float16 if f16 else np.float32
            bn_x = (self.x + np.float32(0.5)).astype(dtype)
            mean = self.randn((self.shape["C"],), scale=0.1) + np.float32(0.5)
            a = self.xp.maximum(bn_x.astype(np.float32) - mean, np.float32(0)).astype(dtype)
            self._bn_inputs[bool(f16)] = (a, bn_x, mean)
        return self._bn_inputs[bool(f16)]

    def relu_bn_inputs(self, f16=False):
        """bn_inputs and y, argmax: the max pool's forward of a (the stem's op)."""
        if not hasattr(self, "_relu_bn"):
            self._relu_bn = {}
        if bool(f16) not in self._relu_bn:
            a, bn_x, mean = self.bn_inputs(f16)
            y, argmax = pool.maxpool2d_forward(a, *self._geometry())
            self._relu_bn[bool(f16)] = (a, bn_x, mean, y, argmax)
        return self._relu_bn[bool(f16)]

    def shared_ops(self):
        return ["maxpool2d_forward", "global_avgpool_forward"]

    def _geometry(self):
        return self.shape["kernel"], self.shape["stride"], self.shape["padding"]

    def argmax(self, f16=False):
        """The forward's argmax, which every backward (and the reference's) receives."""
        if f16 not in self._argmax:
            self._argmax[f16] = pool.maxpool2d_forward(self.x16 if f16 else self.x, *self._geometry())[1]
        return self._argmax[f16]

    def run(self, op, version, state):
        f16 = op.endswith(" f16")
        if op == "maxpool2d_forward":
            return pool.maxpool2d_forward(self.x, *self._geometry())
        if op.startswith(self.AVG_RELU_BN):
            a, bn_x, mean = self.bn_inputs(f16)
            return pool.global_avgpool_backward_relu_bn(self.dyavg16 if f16 else self.dyavg, a, bn_x, mean)
        if op.startswith(self.RELU_BN):
            a, bn_x, mean, y, argmax = self.relu_bn_inputs(f16)
            return pool.maxpool2d_backward_relu_bn(self.dy16 if f16 else self.dy, argmax, y, a, bn_x, mean,
                                                   *self._geometry(), version=version)   # (g, part)
        if op.startswith("maxpool2d_backward"):
            return (pool.maxpool2d_backward(self.dy16 if f16 else self.dy, self.argmax(f16), self.x.shape,
                                            *self._geometry(), version=version),)
        if op == "global_avgpool_forward":
            return (pool.global_avgpool_forward(self.x),)
        with versions.running("pool", version or versions.FAMILIES["pool"].default):
            return (pool.global_avgpool_backward(self.dyavg16 if f16 else self.dyavg, self.x.shape),)

    def expect(self, op):
        f16 = op.endswith(" f16")
        if op == "maxpool2d_forward":
            return ref.maxpool2d_forward(self.host(self.x), *self._geometry())
        if op.startswith(self.AVG_RELU_BN):
            a = self.host(self.bn_inputs(f16)[0])
            return (np.where(a > 0, ref.global_avgpool_backward(self.host(self.dyavg16 if f16 else self.dyavg),
                                                                self.x.shape), 0.0),)
        if op.startswith(self.RELU_BN):
            a, _, _, _, argmax = (self.host(v) for v in self.relu_bn_inputs(f16))
            dy = self.host(self.dy16 if f16 else self.dy)
            da = ref.maxpool2d_backward(dy, argmax.astype(np.int64), self.x.shape, *self._geometry())
            return (np.where(a > 0, da, 0.0),)
        if op.startswith("maxpool2d_backward"):
            argmax = self.host(self.argmax(f16), np.int64)
            dy = self.host(self.dy16 if f16 else self.dy)
            return (ref.maxpool2d_backward(dy, argmax, self.x.shape, *self._geometry()),)
        if op == "global_avgpool_forward":
            return (ref.global_avgpool_forward(self.host(self.x)),)
        return (ref.global_avgpool_backward(self.host(self.dyavg16 if f16 else self.dyavg), self.x.shape),)

    def check(self, op, version, got):
        if op.startswith(self.RELU_BN) or op.startswith(self.AVG_RELU_BN):   # g, then the partials against g's sums
            g, part = (_to_host(a) for a in got)
            err = max_rel_error((g,), self.expected(op))
            _, bn_x, mean = (self.host(a) for a in self.bn_inputs(op.endswith(" f16")))
            return max(err, partials_error(part, self.host(g), bn_x, mean)), self.tolerance(op, version)
        return super().check(op, version, got)

    def tolerance(self, op, version):
        # float16: a few adds rounded to float16, or one division (2^-11 each)
        return 2e-3 if op.endswith(" f16") else self.TOLERANCE

    def work(self, op):
        nx, ny, nc = self.x.size, self.dy.size, self.dyavg.size
        item = 2 if op.endswith(" f16") else 4
        # relu_bn: dy, y and argmax read at the outputs, bn_x read and g written at the input, and a
        # float pair per channel of each block of 256 threads (2x2 pixels and 16 bytes of channels each)
        partials = 2 * 4 * self.shape["C"] * -(-nx // (4 * 256 * (16 // item)))
        return {"maxpool2d_forward": 4 * nx + 8 * ny, "maxpool2d_backward": (item + 4) * ny + item * nx,
                self.RELU_BN: (2 * item + 4) * ny + 2 * item * nx + partials,
                # the head's: a and bn_x read, g written, dy read; a float pair per (image, channel)
                self.AVG_RELU_BN: 3 * item * nx + item * nc + 2 * 4 * nc,
                "global_avgpool_forward": 4 * nx + 4 * nc, "global_avgpool_backward": item * (nx + nc)}[
                    op.removesuffix(" f16")], 0


class CrossEntropyCase(OpCase):
    family, title = "cross_entropy", "softmax cross-entropy with label smoothing, top-k accuracy"
    SHAPE = ("N", "K")
    SHAPES = {"emu": (8, 1000), "gpu": (256, 1000), "resnet50": (256, 1000), "twin": (256, 1000)}
    SMOOTHING = 0.1

    def build(self, N, K):
        self.logits = self.randn((N, K), scale=3.0)
        self.labels = self.ints(0, K, N, np.int32)
        self._probs = None

    def probs(self):
        """What the backward gets from the forward: the default version's probabilities."""
        if self._probs is None:
            self._probs = ce.softmax_cross_entropy_forward(self.logits, self.labels, self.SMOOTHING, version=2)[1]
        return self._probs

    def ops(self, version):
        return ["softmax_cross_entropy_forward"]

    def shared_ops(self):
        return ["softmax_cross_entropy_backward", "topk_correct"]

    def run(self, op, version, state):
        if op == "softmax_cross_entropy_forward":
            return ce.softmax_cross_entropy_forward(self.logits, self.labels, self.SMOOTHING, version=version)
        if op == "softmax_cross_entropy_backward":
            return (ce.softmax_cross_entropy_backward(self.probs(), self.labels, self.SMOOTHING),)
        return (ce.topk_correct(self.logits, self.labels, (1, 5)),)

    def expect(self, op):
        logits, labels = self.host(self.logits), self.host(self.labels, np.int64)
        if op == "softmax_cross_entropy_forward":
            return ref.softmax_cross_entropy_forward(logits, labels, self.SMOOTHING)
        if op == "softmax_cross_entropy_backward":
            return (ref.softmax_cross_entropy_backward(self.host(self.probs()), labels, self.SMOOTHING),)
        return (ref.topk_correct(logits, labels, (1, 5)),)

    def tolerance(self, op, version):
        return 0.0 if op == "topk_correct" else self.TOLERANCE

    def work(self, op):
        b = F32 * self.logits.size
        return {"softmax_cross_entropy_forward": 2 * b, "softmax_cross_entropy_backward": 2 * b,
                "topk_correct": b}[op], 0


def resnet50_param_sizes():
    """(element count, gets weight decay) of each of ResNet-50 v1.5's 161 parameter tensors, in
    torchvision order: convolutions and the fc weight decay, BN gamma/beta and the fc bias do not."""
    sizes = [(64 * 3 * 7 * 7, True), (64, False), (64, False)]
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            for k, c_out in ((1, width), (3, width), (1, 4 * width)):
                c = c_in if k == 1 and c_out == width else width
                sizes += [(c_out * c * k * k, True), (c_out, False), (c_out, False)]
            if b == 0:   # the projection shortcut
                sizes += [(4 * width * c_in, True), (4 * width, False), (4 * width, False)]
            c_in = 4 * width
    sizes += [(1000 * 2048, True), (1000, False)]
    return sizes


class OptimizerCase(OpCase):
    family, title = "optimizer", "SGD with momentum over every parameter, LARS ratios, the gradient norm"
    SHAPE = ("tensors", "divide")
    SHAPES = {"emu": (12, 64), "gpu": (161, 1), "resnet50": (161, 1), "twin": (161, 16)}
    LR, MOMENTUM, WD = 0.1, 0.9, 5e-5
    TOLERANCE = 1e-6

    def build(self, tensors, divide):
        table = resnet50_param_sizes()
        if not 1 <= tensors <= len(table) or divide < 1:
            raise ValueError(f"optimizer: tensors must be 1..{len(table)} (ResNet-50's, in order) and divide >= 1")
        table = [(max(1, s // divide), d) for s, d in table[:tensors]]
        self.sizes = [s for s, _ in table]
        self.wd = [self.WD if d else 0.0 for _, d in table]
        self.segments = opt.ParamSegments(self.sizes, self.wd, xp=self.xp)
        n = self.segments.total
        self.p, self.g, self.v = self.randn(n), self.randn(n, scale=0.01), self.randn(n, scale=0.01)
        self.lr = self.xp.asarray(np.array([self.LR], np.float32))   # in device memory, as nn.optim keeps it

    def ops(self, version):
        # the norms: 1 and 2 alike; "global_grad_norm out": into a device array, nothing read on the host
        return ["momentum update", "lars_trust_ratio_flat", "global_grad_norm", "global_grad_norm out"]

    def prepare(self, op):
        if op == "global_grad_norm out":
            return {"out": self.xp.empty(1, dtype=np.float32)}
        return {"p": self.p.copy(), "v": self.v.copy()} if op == "momentum update" else {}

    def run(self, op, version, state):
        with versions.running("optimizer", version or versions.FAMILIES["optimizer"].default):
            if op == "lars_trust_ratio_flat":
                return (opt.lars_trust_ratio_flat(self.p, self.g, self.segments),)
            if op == "global_grad_norm":
                return (opt.global_grad_norm([self.g]),)
            if op == "global_grad_norm out":
                return (opt.global_grad_norm([self.g], out=state["out"]),)
        p, v = state["p"], state["v"]
        if version == 1:      # one launch per tensor
            for ps, gs, vs, wd in zip(self.segments.split(p), self.segments.split(self.g), self.segments.split(v),
                                      self.wd):
                opt.sgd_momentum_update(ps, gs, vs, self.LR, self.MOMENTUM, wd)
        else:                 # one launch for all
            opt.momentum_update_flat(p, self.g, v, self.segments, self.lr, self.MOMENTUM)
        return p, v

    def expect(self, op):
        p, g = self.host(self.p), self.host(self.g)
        parts = [slice(int(a), int(b)) for a, b in zip(self.segments.offsets[:-1], self.segments.offsets[1:])]
        if op == "lars_trust_ratio_flat":
            return (np.array([ref.lars_trust_ratio(p[s], g[s], wd) for s, wd in zip(parts, self.wd)]),)
        if op == "global_grad_norm":
            return (np.array(ref.global_grad_norm([g])),)
        if op == "global_grad_norm out":
            return (ref.global_grad_norm([g], out=np.empty(1)),)
        p, v = p.copy(), self.host(self.v)
        for s, wd in zip(parts, self.wd):
            ref.sgd_momentum_update(p[s], g[s], v[s], self.LR, self.MOMENTUM, wd)   # in place, per tensor
        return p, v

    def tolerance(self, op, version):
        return 1e-5 if op != "momentum update" else self.TOLERANCE

    def work(self, op):
        n = self.segments.total
        return {"momentum update": 20 * n, "lars_trust_ratio_flat": 8 * n, "global_grad_norm": 4 * n,
                "global_grad_norm out": 4 * n}[op], 0


class InputCase(OpCase):
    family, title = "input", "uint8 images -> normalised float, on the device"
    SHAPE = ("N", "H", "W")
    # emu: one 4096-byte tile of version 3 and a tail
    SHAPES = {"emu": (2, 24, 30), "gpu": (256, 224, 224), "resnet50": (256, 224, 224), "twin": (2, 224, 224)}
    MEAN = (123.68, 116.78, 103.94)
    TOLERANCE = 1e-6

    def build(self, N, H, W):
        self.images = self.ints(0, 256, (N, H, W, 3), np.uint8)

    def ops(self, version):
        # version 2 is float32 only (float16 runs version 1's kernel)
        return ["input_normalize u8->f32"] + (["input_normalize u8->f16"] if version != 2 else [])

    def run(self, op, version, state):
        dtype = np.float32 if op.endswith("f32") else np.float16
        return (inp.input_normalize(self.images, dtype=dtype, version=version),)

    def expect(self, op):
        return (ref.input_normalize(self.host(self.images, np.uint8), self.MEAN, None, np.float64),)

    def tolerance(self, op, version):
        return self.TOLERANCE if op.endswith("f32") else 1e-3   # float16 keeps 11 bits

    def work(self, op):
        n = self.images.size
        return (5 if op.endswith("f32") else 3) * n, 0


CASES = {c.family: c for c in (ReduceCase, ElementwiseCase, GemmCase, ConvCase, BatchnormCase, PoolCase,
                               CrossEntropyCase, OptimizerCase, InputCase)}


def make(family, xp=np, shape=None, device=None):
    """The case of `family` on arrays of `xp` (numpy: the emulator; cupy: the GPU; or the
    stand-in kernels.runtime.plan.cupy) at `shape` (a tuple in the order of its SHAPE, or None for
    the default of the device: "emu", "gpu", or one of the other SHAPES)."""
    return CASES[family](xp, shape, device or ("emu" if xp is np else "gpu"))
