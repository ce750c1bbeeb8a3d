"""Kernel versions: each op family's implementations, numbered 1..N, and which one runs.

Every kernel file teaches its op in versions, from the simplest to the fastest, and its header
lists them, one entry each, starting `version N  what changed and why it is faster`.  The same
numbers are used by the launchers (`version=N`), by `python -m kernels.<op>` (which checks and
times every version) and by bench/.

    python -m kernels.conv --list               the versions, read from the header of conv.cu
    conv.conv2d_forward(x, w, 1, 1, version=1)   one call with version 1

What the model's ops run (the op contract, kernels/ops.py) is the version *in use* of each family,
the fastest unless told otherwise:

    with kernels.versions.use(conv=1, batchnorm=1):     # naive convolutions and batch norm
        ...
    with kernels.versions.use("conv=my_conv.cu:1"):     # version 1 from a learner's copy of conv.cu
        ...
    train.py --kernels conv=1,batchnorm=my_bn.cu         # the same for a training run

A learner's copy (`FILE.cu`, optionally `:N` for the version) replaces the project's file for
every launch of that family: it must define every extern "C" kernel of the project's file with
the same parameter types (checked when chosen).  `#include "common.cuh"` finds the file's own
folder first, then kernels/.

A family whose later versions compute on float16 activations (conv: versions 4 and 5, tensor
cores) keeps two versions in use: one for float32 activations and one for float16 ones.  Choosing a
version sets the one of its dtype (`use(conv=1)` the float32 convolution, `use(conv=4)` the float16
one); the launchers pick by the dtype of their arrays (`version(family, None, op, dtype)`).
"""

import contextlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runtime import launch as _launch
from .runtime.raw import KERNEL_DIR, load_module

__all__ = ["Family", "FAMILIES", "TRAINING", "numbers", "version", "describe", "parse", "select", "restore", "use",
           "running", "in_use", "in_use_f16", "table", "check_source", "check_precision", "BN_FROM_CONV",
           "BN_BACKWARD_FROM_CONV", "bn_backward_from_conv",
           "bn_statistics_from_conv"]


@dataclass(frozen=True)
class Family:
    """One op family: its kernel file, how many versions it has and which of them the model's ops
    can run.  `not_in_training` says why the others cannot."""

    name: str                  # "conv": also the launcher module kernels/<name>.py
    source: str                # "conv.cu"
    count: int                 # versions 1..count
    default: int               # the version in use unless chosen otherwise
    training: tuple            # versions the op contract (and so a training run) can use
    not_in_training: str = ""
    f16: tuple = ()            # versions that take float16 activations (the others float32), when they differ
    default_f16: int = 0       # the float16 version in use unless chosen otherwise

    def dtype_of(self, number):
        """'float16' or 'float32': what version `number` computes on (for families with f16 versions)."""
        return "float16" if number in self.f16 else "float32"


FAMILIES = {f.name: f for f in (
    Family("reduce", "reduce.cu", 4, 3, (),
           "nothing in training sums an array with reduce.cu: its versions are the lesson behind the reductions "
           "of the other kernels (python -m kernels.reduce)"),
    Family("elementwise", "elementwise.cu", 2, 2, (1, 2)),   # 2: predicted 92-98 % of copy bandwidth, v1's float16 55 %
    Family("gemm", "gemm.cu", 4, 3, (1, 2, 3),
           "version 4 multiplies float16 matrices on tensor cores; the linear layer and the im2col convolution "
           "multiply float32 ones"),
    Family("conv", "conv.cu", 5, 3, (1, 2, 3, 4, 5), f16=(4, 5), default_f16=5),
    # 4: predicted 3-6x faster in float16 (bench/NOTES.md); 5: the backward behind a ReLU 1.6x faster again
    Family("batchnorm", "batchnorm.cu", 5, 5, (1, 2, 3, 4, 5)),
    # version 1 (atomics) measured 2.1x faster than 2 on an H100; 3 predicted 1.9x faster than 1 (and
    # 7x than 2 in float16), deterministic
    Family("pool", "pool.cu", 3, 3, (1, 2, 3)),
    Family("cross_entropy", "cross_entropy.cu", 2, 2, (1, 2)),
    Family("optimizer", "optimizer.cu", 3, 3, (2, 3),   # 3: the same update, the norms predicted 1.9x faster
           "version 1 is one launch per tensor with the learning rate as a kernel argument; nn.optim keeps every "
           "parameter in one flat buffer and the learning rate in device memory, which versions 2 and 3 update"),
    # version 1 measured faster than 2 on an H100 (the model ordered them otherwise); 3 predicted 1.5x
    # (float32) and 1.9x (float16) faster than 1, unmeasured
    Family("input", "input.cu", 3, 3, (1, 2, 3)),
)}

TRAINING = tuple(name for name, f in FAMILIES.items() if f.training)
"""The families a training run can choose versions of (the others are lessons only)."""

_in_use = {name: f.default for name, f in FAMILIES.items()}
_in_use_f16 = {name: f.default_f16 for name, f in FAMILIES.items() if f.f16}   # families with float16 versions
_custom = {}   # family -> Path of a learner's copy of its .cu file
_F16 = np.dtype(np.float16)


def numbers(family):
    """The version numbers of a family: (1, 2, ..., N)."""
    return tuple(range(1, FAMILIES[family].count + 1))


def version(family, requested=None, op=None, dtype=None):
    """The version a launcher of `family` runs: `requested` (checked: an int in 1..count) or, when
    None, the version in use.  `op` names the caller in the error message.  dtype: the dtype of the
    activations, for families whose versions differ by dtype (conv): None picks the float32 one."""
    f = FAMILIES[family]
    half = bool(f.f16) and dtype is not None and np.dtype(dtype) == _F16
    if requested is None:
        return _in_use_f16[family] if half else _in_use[family]
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= f.count:
        raise ValueError(f"{op or family}: version must be one of {', '.join(map(str, range(1, f.count + 1)))} "
                         f"(python -m kernels.{family} --list), got {requested!r}")
    if f.f16 and dtype is not None and half != (requested in f.f16):
        wanted = "float16" if half else "float32"
        fitting = f.f16 if half else tuple(n for n in numbers(family) if n not in f.f16)
        raise TypeError(f"{op or family}: version {requested} of {family} computes on {f.dtype_of(requested)}, "
                        f"these arrays are {wanted}: {wanted} runs version {' or '.join(map(str, fitting))}")
    return requested


# ---- the versions of a family, from the header of its .cu file ------------------------------------

_VERSION_LINE = re.compile(r"^(\s*\*?\s*)version (\d+)  +(.*)$")


def describe(family, source=None):
    """{N: the header's one-sentence summary of version N} of the family's .cu file (or of
    `source`, a path).  An entry of the header starts `version N  ` (two spaces after the number)
    and may go on over lines indented at least as far as its text; the summary is its first
    sentence."""
    path = Path(source) if source is not None else KERNEL_DIR / FAMILIES[family].source
    text = path.read_text()
    header = text[text.find("/*"):text.find("*/")] if "/*" in text else ""
    entries, current, column = {}, None, 0
    for line in header.splitlines():
        m = _VERSION_LINE.match(line)
        if m:
            current, column = int(m.group(2)), m.start(3)
            entries[current] = [m.group(3).strip()]
            continue
        body = line.lstrip(" *")
        if current is not None and body and len(line) - len(body) >= column:
            entries[current].append(body.strip())
        else:
            current = None
    return {n: _first_sentence(" ".join(parts)) for n, parts in entries.items()}


def _first_sentence(text):
    m = re.search(r"(?<=[.!?])\s+(?=[A-Z0-9(])", text)
    return text[:m.start()] if m else text


# ---- choosing versions ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Choice:
    version: int
    source: object = None      # Path of a learner's copy, or None
    sha256: str = None         # the copy's hash when it was recorded (None: not recorded)
    f16_version: int = None    # families with float16 versions: the one float16 activations run (None: default)
    given: int = None          # the number as chosen (a float16 one lands in f16_version)


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_source(family, path):
    """Raise ValueError unless the .cu file at `path` can replace the family's file: it exists and
    defines every extern "C" kernel of the project's file with the same parameter types.
    Returns the resolved Path."""
    f = FAMILIES[family]
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix != ".cu":
        raise ValueError(f"{path}: a kernel source must be a .cu file (a copy of kernels/{f.source})")
    path = path.resolve()
    theirs = load_module(str(path)).signatures
    ours = load_module(f.source).signatures
    for name, sig in ours.items():
        if name not in theirs:
            raise ValueError(f"{path} cannot replace kernels/{f.source}: it has no extern \"C\" kernel "
                             f"{sig.describe()}")
        want = [(p.is_pointer, p.code) for p in sig.params]
        got = [(p.is_pointer, p.code) for p in theirs[name].params]
        if want != got:
            raise ValueError(f"{path} cannot replace kernels/{f.source}: its kernel "
                             f"{theirs[name].describe()} takes other parameter types than {sig.describe()}")
    return path


def _choice(family, value, training):
    """One family's choice from an int, 'N', 'FILE.cu', 'FILE.cu:N', a Path, or a recorded
    {'version': N, 'file': ..., 'sha256': ...}."""
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; the families are {', '.join(FAMILIES)}")
    f = FAMILIES[family]
    source, sha, f16_number = None, None, None
    if isinstance(value, dict):
        number, source, sha = value.get("version"), value.get("file"), value.get("sha256")
        f16_number = value.get("f16_version")
        if f16_number is not None and f16_number not in f.f16:
            raise ValueError(f"{family}: f16_version must be one of {', '.join(map(str, f.f16)) or '(none)'}, "
                             f"got {f16_number!r}")
    elif isinstance(value, Path) or (isinstance(value, str) and not value.strip().isdigit()):
        text = str(value).strip()
        m = re.fullmatch(r"(.+\.cu)(?::(\d+))?", text)
        if m is None:
            raise ValueError(f"{family}={text}: give a version number (1..{f.count}) or a .cu file, "
                             f"optionally with a version: {family}=my_{family}.cu:1")
        source, number = m.group(1), (int(m.group(2)) if m.group(2) else None)
    else:
        number = value
    if isinstance(number, str) and number.strip().isdigit():
        number = int(number)
    if number is None:
        number = f.default
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= f.count:
        raise ValueError(f"{family}: version must be one of 1..{f.count} (python -m kernels.{family} --list), "
                         f"got {number!r}")
    if training and number not in f.training:
        if not f.training:
            raise ValueError(f"{family}: {f.not_in_training}")
        raise ValueError(f"{family}={number}: the model's ops can run versions {', '.join(map(str, f.training))} "
                         f"of {family}: {f.not_in_training}")
    if source is not None:
        source = check_source(family, source)
        now = _sha256(source)
        if sha is not None and sha != now:
            raise ValueError(f"{family}={source} changed since it was recorded (sha256 {sha[:12]}..., now "
                             f"{now[:12]}...): restore it, or choose it again in a new run")
        sha = now
    if number in f.f16:     # a float16 version: the float32 one stays the default
        return _Choice(f.default, source, sha, number, number)
    return _Choice(number, source, sha, f16_number, number)


def parse(spec, training=True):
    """{family: choice} from 'conv=1,batchnorm=my_bn.cu:2' (a str), or a dict of family -> int,
    'N', 'FILE.cu[:N]' or a recorded entry (see `table`).  Raises ValueError with the reason.
    training=True (the default) refuses versions the model's ops cannot run."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        items = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"kernel choice {part!r}: write FAMILY=VERSION or FAMILY=FILE.cu[:VERSION], "
                                 f"e.g. conv=1,batchnorm=2")
            family, value = (t.strip() for t in part.split("=", 1))
            if family in items:
                raise ValueError(f"kernel family {family!r} is chosen twice")
            items[family] = value
        spec = items
    return {family: _choice(family, value, training) for family, value in dict(spec).items()}


def check_precision(spec, dtype):
    """Raise ValueError when `spec` (see `parse`) chooses a version that activations of `dtype`
    ('float32' or 'float16') never run: conv=4 in a float32 run, conv=1 in a float16 one, where
    the choice would silently change nothing."""
    dtype = np.dtype(dtype).name
    for family, c in parse(spec).items():
        f = FAMILIES[family]
        if f.f16 and c.given is not None and f.dtype_of(c.given) != dtype:
            fitting = f.f16 if dtype == "float16" else tuple(n for n in numbers(family) if n not in f.f16)
            raise ValueError(f"{family}={c.given}: version {c.given} of {family} computes on {f.dtype_of(c.given)}, "
                             f"but this run's activations are {dtype}: choose version "
                             f"{' or '.join(map(str, fitting))}")


def select(spec, compile_for=None):
    """Make `spec` (see `parse`) the versions in use, for every launch from now on; the families
    it does not name go back to their defaults.  compile_for: 'emu' or 'cuda' compiles each
    learner's copy now, so that a compile error shows before any work.  Returns the previous
    state, for `restore`."""
    choices = parse(spec)
    previous = (dict(_in_use), dict(_custom), dict(_in_use_f16))
    if compile_for is not None:
        for c in choices.values():
            if c.source is not None:
                load_module(str(c.source)).compile(compile_for)
    new_in_use = {name: f.default for name, f in FAMILIES.items()}
    new_in_use_f16 = {name: f.default_f16 for name, f in FAMILIES.items() if f.f16}
    new_custom = {}
    for family, c in choices.items():
        new_in_use[family] = c.version
        if c.f16_version is not None:
            new_in_use_f16[family] = c.f16_version
        if c.source is not None:
            new_custom[family] = c.source
    _apply(new_in_use, new_custom, new_in_use_f16)
    return previous


def restore(previous):
    """Undo a `select`: `previous` is what it returned."""
    _apply(*previous)


def _apply(in_use, custom, in_use_f16=None):
    for family, f in FAMILIES.items():
        if custom.get(family) != _custom.get(family):
            _launch.replace_source(f.source, custom.get(family))
    _in_use.clear()
    _in_use.update(in_use)
    if in_use_f16 is not None:
        _in_use_f16.clear()
        _in_use_f16.update(in_use_f16)
    _custom.clear()
    _custom.update(custom)


@contextlib.contextmanager
def use(spec=None, **choices):
    """Within the block, the model's ops run the chosen versions (the others their defaults):
    use(conv=1), use("conv=1,batchnorm=2"), use(conv="my_conv.cu:1").  Restored on exit."""
    if spec is not None and choices:
        raise TypeError("use(): give a spec string or keyword choices, not both")
    previous = select(spec if spec is not None else choices)
    try:
        yield in_use()
    finally:
        restore(previous)


@contextlib.contextmanager
def running(family, number):
    """Within the block, `family` runs version `number`, any of its versions: what the lesson
    command and bench/ use to run every version through the op's own functions.  (A training run
    chooses with `use`, which refuses versions the model's ops cannot run.)"""
    number = version(family, number)
    slot = _in_use_f16 if number in FAMILIES[family].f16 else _in_use
    previous = slot[family]
    slot[family] = number
    try:
        yield
    finally:
        slot[family] = previous


BN_FROM_CONV = 3
"""The batch-norm version whose statistics come from the convolution before it (conv.cu's epilogue)."""


def bn_statistics_from_conv():
    """True when the batch norm in use takes its training statistics from the convolution that
    produced its input (version 3): the layer code (nn.layers.conv_bn) then runs a convolution and
    the batch norm after it as conv2d_forward_bn_stats + batchnorm_forward_train_from_stats.  On
    the cpu device too, where both ways give the same numbers."""
    return _in_use["batchnorm"] >= BN_FROM_CONV


BN_BACKWARD_FROM_CONV = 5
"""The batch-norm version whose backward (behind a ReLU) takes its sums from the convolution after it."""


def bn_backward_from_conv():
    """True when the batch norm in use finishes its training backward from partial sums that the
    convolution after its ReLU computed in its backward-data pass (version 5): the layer code
    (nn.layers.BatchNorm2d) then asks F.batch_norm for grad_partials, conv2d's backward runs
    conv2d_backward_data_relu_bn and batch norm batchnorm_backward_from_partials."""
    return _in_use["batchnorm"] >= BN_BACKWARD_FROM_CONV


def in_use():
    """The versions in use now, {family: N} (training families and lessons alike); for a family with
    float16 versions, the float32 one (see in_use_f16)."""
    return dict(_in_use)


def in_use_f16():
    """The float16 versions in use now, {family: N}, for the families that have them (conv)."""
    return dict(_in_use_f16)


def table(spec=None):
    """What a run records (config.json, the MLPerf log): for every family training can choose,
    {'version': N}, for a family with float16 versions also {'f16_version': M}, and, for a learner's
    copy, 'file' (absolute path) and 'sha256'.  From `spec` (see `parse`) with defaults filled in,
    or, without one, from what is in use now."""
    if spec is None:
        choices = {family: _Choice(_in_use[family], _custom.get(family),
                                   _sha256(_custom[family]) if family in _custom else None, _in_use_f16.get(family))
                   for family in TRAINING}
    else:
        choices = parse(spec)
    out = {}
    for family in TRAINING:
        f = FAMILIES[family]
        c = choices.get(family) or _Choice(f.default)
        entry = {"version": c.version}
        if f.f16:
            entry["f16_version"] = c.f16_version if c.f16_version is not None else f.default_f16
        if c.source is not None:
            entry.update(file=str(c.source), sha256=c.sha256)
        out[family] = entry
    return out
