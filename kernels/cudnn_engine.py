"""Convolution through NVIDIA cuDNN, as a yardstick for our own kernels (GPU only).

The three functions here have exactly the signatures of the convolution ops in
kernels/reference.py and kernels/ops.py (see OPS_CONTRACT), so a caller can select cuDNN in
place of the hand-written kernels and the tests and benchmarks can compare the two:

    conv2d_forward(x, w, stride, padding)                    -> y  [N, P, Q, K]
    conv2d_backward_data(dy, w, x_shape, stride, padding)    -> dx [N, H, W, C]
    conv2d_backward_weight(x, dy, w_shape, stride, padding)  -> dw [K, C, R, S]

Arrays are CuPy arrays, C-contiguous, activations NHWC and weights OIHW ([K, C, R, S]), all of
one dtype: float32, float16 or bfloat16 (an `ml_dtypes.bfloat16` array). Results have that
dtype; cuDNN accumulates in float32 in every case. For float32 inputs, TF32 tensor-core plans
are excluded unless `allow_tf32` below is set True, so float32 results are true float32.

How it talks to cuDNN: through NVIDIA's `nvidia-cudnn-frontend` Python package (`import
cudnn`), which wraps cuDNN's graph API. For each distinct problem (op, shapes, dtype, stride,
padding, device) we build one graph once and keep it:
    graph = cudnn.pygraph(io_data_type, intermediate_data_type=FLOAT, compute_data_type=FLOAT,
                          handle)
    tensors: graph.tensor(name, dim, stride, data_type); dims are ALWAYS given in NCHW order
             (N, C, H, W) and the strides say where each lives, so NHWC is stride
             (H*W*C, 1, W*C, C)
    op:      graph.conv_fprop(image, weight, ...), graph.conv_dgrad(loss, filter, ...) or
             graph.conv_wgrad(image, loss, ...), with padding/stride/dilation per spatial dim
    output:  .set_output(True).set_dim(...).set_stride(...).set_data_type(...)
    graph.validate(); graph.build_operation_graph();
    graph.create_execution_plans([heur_mode.A, heur_mode.FALLBACK]);
    (float32: graph.deselect_numeric_notes([TENSOR_CORE, DOWN_CONVERT_INPUTS]));
    graph.check_support(); graph.build_plans(); graph.get_workspace_size()
and every call then only runs `graph.execute({tensor: array, ...}, workspace, handle=handle)`
on CuPy's current stream, with the workspace taken from CuPy's memory pool.

The weights are handed to cuDNN in KRSC order (OHWI, "channels last" like the activations),
because cuDNN's fast NHWC kernels want every tensor channels-last: forward and backward-data
make a transposed copy of w (none when w is already channels-last memory viewed as OIHW, what
kernels.conv.conv_weight gives a mixed-precision step), backward-weight computes dw in KRSC and
transposes it back to OIHW. These copies are small (at most 2.4 M elements in ResNet-50) next to
the convolutions.

Importing this module needs neither a GPU, nor CuPy, nor cuDNN: they are imported at the first
call. Without them the ops raise CudnnUnavailableError saying what to install:
    pip install cupy-cuda12x nvidia-cudnn-frontend nvidia-cudnn-cu12   (the `gpu` extra)
"""

import threading
from collections import namedtuple

import numpy as np

__all__ = [
    "CudnnError",
    "CudnnUnavailableError",
    "allow_tf32",
    "cache_size",
    "clear_cache",
    "conv2d_backward_data",
    "conv2d_backward_weight",
    "conv2d_forward",
    "conv_geometry",
    "cudnn_available",
    "nhwc_strides",
    "plan_key",
]

# Let cuDNN use TF32 tensor cores for float32 convolutions (10-bit mantissa inputs: faster,
# but results differ from float32 at about 1e-3 relative). Part of every plan's cache key.
allow_tf32 = False

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
_INSTALL_HINT = ("install the `gpu` extra (pip install -e \".[gpu]\"), which brings CuPy, "
                 "nvidia-cudnn-frontend and the cuDNN library (nvidia-cudnn-cu12)")


class CudnnUnavailableError(RuntimeError):
    """CuPy, a GPU, the cudnn-frontend package or the cuDNN library is missing."""


class CudnnError(RuntimeError):
    """cuDNN could not plan or run a convolution (e.g. no engine supports the problem)."""


# ----------------------------------------------------------------------------- pure geometry

ConvGeometry = namedtuple("ConvGeometry", "N C H W K R S P Q stride padding")
ConvGeometry.__doc__ = """Sizes of one convolution: x [N, H, W, C], w [K, C, R, S], y [N, P, Q, K]."""


def _check_int(name, value, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_shape(name, shape, layout):
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a 4-tuple {layout}, got {shape!r}") from None
    if len(shape) != 4:
        raise ValueError(f"{name} must have 4 dimensions {layout}, got shape {shape}")
    for d in shape:
        _check_int(f"every dimension of {name} {layout}", d, 1)
    return tuple(int(d) for d in shape)


def conv_geometry(x_shape, w_shape, stride, padding):
    """Check a convolution's sizes and return them as a ConvGeometry.

    x_shape: (N, H, W, C) NHWC; w_shape: (K, C, R, S) OIHW; stride >= 1 and padding >= 0 are
    ints (the same for height and width). Output P = (H + 2*padding - R)//stride + 1, Q likewise.
    Raises TypeError/ValueError naming the bad argument (channel mismatch, empty output, ...).
    """
    N, H, W, C = _check_shape("x", x_shape, "[N, H, W, C]")
    K, Cw, R, S = _check_shape("w", w_shape, "[K, C, R, S]")
    stride = _check_int("stride", stride, 1)
    padding = _check_int("padding", padding, 0)
    if Cw != C:
        raise ValueError(f"w has {Cw} input channels (w.shape[1]) but x has {C} (x.shape[3])")
    P = (H + 2 * padding - R) // stride + 1
    Q = (W + 2 * padding - S) // stride + 1
    if P < 1 or Q < 1 or H + 2 * padding < R or W + 2 * padding < S:
        raise ValueError(f"the {R}x{S} kernel does not fit the {H}x{W} image padded by {padding}: "
                         f"output would be {P}x{Q}")
    return ConvGeometry(N, C, H, W, K, R, S, P, Q, stride, padding)


def nhwc_strides(n, c, h, w):
    """Strides, in elements and in cuDNN's NCHW dim order, of a C-contiguous [n, h, w, c] array.

    cuDNN always takes dims as (N, C, H, W); the layout is in the strides: channels-last
    memory gives (h*w*c, 1, w*c, c). The same function serves KRSC weights with
    (n, c, h, w) = (K, C, R, S).
    """
    return [h * w * c, 1, w * c, c]


def plan_key(op, geometry, dtype_name, device_id=0, tf32=None):
    """Hashable key of one cached cuDNN plan: everything that changes the compiled graph."""
    if op not in ("fprop", "dgrad", "wgrad"):
        raise ValueError(f"op must be 'fprop', 'dgrad' or 'wgrad', got {op!r}")
    tf32 = allow_tf32 if tf32 is None else tf32
    return (op, tuple(geometry), str(dtype_name), int(device_id), bool(tf32 and dtype_name == "float32"))


def _dtype_name(name, array):
    dtype = getattr(array, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be a CuPy array, got {type(array).__name__}")
    dname = np.dtype(dtype).name
    if dname not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {dname}; the cuDNN engine takes {', '.join(SUPPORTED_DTYPES)}")
    return dname


def _check_arrays(named_arrays):
    """Same dtype, C-contiguous, on the GPU as CuPy arrays; returns the common dtype name."""
    names = [_dtype_name(name, a) for name, a in named_arrays]
    if len(set(names)) != 1:
        listing = ", ".join(f"{n} is {d}" for (n, _), d in zip(named_arrays, names))
        raise TypeError(f"all arrays must have one dtype, but {listing}")
    for name, a in named_arrays:
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (use cupy.ascontiguousarray({name}))")
    for name, a in named_arrays:
        # by module name, so that a NumPy array gets this message even where CuPy is missing
        if type(a).__module__.split(".")[0] != "cupy":
            raise TypeError(f"{name} must be a CuPy array on the GPU, got {type(a).__module__}.{type(a).__name__}; "
                            "the cuDNN engine runs only on the GPU")
    cupy = _import_cupy()
    device = cupy.cuda.Device().id
    for name, a in named_arrays:
        if a.device.id != device:
            raise ValueError(f"{name} is on GPU {a.device.id} but the current device is GPU {device}")
    return names[0]


def _expect_shape(name, actual, expected, layout):
    if tuple(actual) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(actual)} but this convolution needs {tuple(expected)} {layout}")


# ----------------------------------------------------------------------------- the libraries

def _import_cupy():
    try:
        import cupy
    except Exception as exc:
        raise CudnnUnavailableError(f"CuPy is not importable ({exc}); {_INSTALL_HINT}") from exc
    return cupy


def _import_cudnn():
    from .emu import cudasim
    if cudasim.active():      # the simulated GPU's "device pointers" are host memory: cuDNN must not see them
        raise CudnnUnavailableError(str(cudasim.not_simulated("the cuDNN engine")))
    try:
        import cudnn
    except Exception as exc:
        raise CudnnUnavailableError(f"the cudnn-frontend package is not importable ({exc}); {_INSTALL_HINT}") from exc
    return cudnn


def cudnn_available():
    """(True, "cuDNN <version> ...") if the engine can run here, else (False, the reason)."""
    try:
        cupy = _import_cupy()
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:
            return False, f"CuPy finds no usable GPU ({exc})"
        if count < 1:
            return False, "CuPy finds no GPU"
        cudnn = _import_cudnn()
        try:
            version = cudnn.backend_version()
        except Exception as exc:
            return False, f"the cuDNN library could not be loaded ({exc}); {_INSTALL_HINT}"
    except CudnnUnavailableError as exc:
        return False, str(exc)
    return True, f"cuDNN {version} through cudnn-frontend {getattr(cudnn, '__version__', '?')}"


_lock = threading.Lock()
_handles = {}  # device id -> cuDNN handle (one per device; a handle is bound to its device)
_handle_streams = {}  # device id -> the stream its handle was last set to
_plans = {}    # plan_key(...) -> _Plan


class _Plan:
    """A built cuDNN graph and its named tensors; `workspace_size` bytes of scratch per run."""

    def __init__(self, graph, tensors, workspace_size):
        self.graph = graph
        self.tensors = tensors
        self.workspace_size = workspace_size


def clear_cache():
    """Forget every built plan (they are rebuilt on demand)."""
    with _lock:
        _plans.clear()


def cache_size():
    """Number of cached cuDNN plans."""
    return len(_plans)


def _handle(cudnn, device_id):
    handle = _handles.get(device_id)
    if handle is None:
        try:
            handle = cudnn.create_handle()  # binds to the current device, which is device_id
        except Exception as exc:
            raise CudnnUnavailableError(f"could not create a cuDNN handle on GPU {device_id} ({exc}); "
                                        f"{_INSTALL_HINT}") from exc
        _handles[device_id] = handle
    return handle


def _cudnn_dtype(cudnn, dtype_name):
    return {"float32": cudnn.data_type.FLOAT, "float16": cudnn.data_type.HALF,
            "bfloat16": cudnn.data_type.BFLOAT16}[dtype_name]


def _build(cudnn, handle, op, g, dtype_name, tf32):
    """Build the cuDNN graph of one convolution; see the module docstring for the steps."""
    io = _cudnn_dtype(cudnn, dtype_name)
    f32 = cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    x_dim, y_dim, w_dim = [g.N, g.C, g.H, g.W], [g.N, g.K, g.P, g.Q], [g.K, g.C, g.R, g.S]
    x_stride, y_stride, w_stride = nhwc_strides(*x_dim), nhwc_strides(*y_dim), nhwc_strides(*w_dim)
    conv = dict(padding=[g.padding, g.padding], stride=[g.stride, g.stride], dilation=[1, 1], compute_data_type=f32)
    if op == "fprop":
        x = graph.tensor(name="x", dim=x_dim, stride=x_stride, data_type=io)
        w = graph.tensor(name="w", dim=w_dim, stride=w_stride, data_type=io)
        out = graph.conv_fprop(image=x, weight=w, name="fprop", **conv)
        out.set_output(True).set_dim(y_dim).set_stride(y_stride).set_data_type(io)
        tensors = {"x": x, "w": w, "y": out}
    elif op == "dgrad":
        dy = graph.tensor(name="dy", dim=y_dim, stride=y_stride, data_type=io)
        w = graph.tensor(name="w", dim=w_dim, stride=w_stride, data_type=io)
        out = graph.conv_dgrad(loss=dy, filter=w, name="dgrad", **conv)
        out.set_output(True).set_dim(x_dim).set_stride(x_stride).set_data_type(io)
        tensors = {"dy": dy, "w": w, "dx": out}
    else:
        x = graph.tensor(name="x", dim=x_dim, stride=x_stride, data_type=io)
        dy = graph.tensor(name="dy", dim=y_dim, stride=y_stride, data_type=io)
        out = graph.conv_wgrad(image=x, loss=dy, name="wgrad", **conv)
        out.set_output(True).set_dim(w_dim).set_stride(w_stride).set_data_type(io)
        tensors = {"x": x, "dy": dy, "dw": out}

    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    if dtype_name == "float32" and not tf32:
        # TF32 plans carry these notes; excluding them keeps float32 results float32
        graph.deselect_numeric_notes([cudnn.numerical_note.TENSOR_CORE, cudnn.numerical_note.DOWN_CONVERT_INPUTS])
    graph.check_support()
    graph.build_plans()
    return _Plan(graph, tensors, int(graph.get_workspace_size()))


def _run(op, g, dtype_name, bindings):
    """Get (or build) the plan for this problem and run it on CuPy's current stream."""
    cupy = _import_cupy()
    cudnn = _import_cudnn()
    device_id = cupy.cuda.Device().id
    key = plan_key(op, g, dtype_name, device_id)
    with _lock:
        handle = _handle(cudnn, device_id)
        plan = _plans.get(key)
        if plan is None:
            try:
                plan = _build(cudnn, handle, op, g, dtype_name, key[-1])
            except Exception as exc:
                raise CudnnError(f"cuDNN cannot run conv {op} for x [N,H,W,C]=[{g.N},{g.H},{g.W},{g.C}], "
                                 f"w [K,C,R,S]=[{g.K},{g.C},{g.R},{g.S}], stride {g.stride}, padding {g.padding}, "
                                 f"{dtype_name}: {type(exc).__name__}: {exc}") from exc
            _plans[key] = plan
    stream_ptr = cupy.cuda.get_current_stream().ptr
    if _handle_streams.get(device_id) != stream_ptr:  # cudnnSetStream costs microseconds
        cudnn.set_stream(handle=handle, stream=stream_ptr)
        _handle_streams[device_id] = stream_ptr
    # CuPy's pool is stream-ordered: once execute() has queued its work on `stream`, dropping
    # the workspace here is safe, because the pool only reuses it for later work on that stream.
    workspace = cupy.empty(max(plan.workspace_size, 1), dtype=cupy.uint8)
    pack = {plan.tensors[role]: array for role, array in bindings.items()}
    try:
        plan.graph.execute(pack, workspace, handle=handle)
    except Exception as exc:
        raise CudnnError(f"cuDNN conv {op} failed to execute: {type(exc).__name__}: {exc}") from exc


def _krsc_view(w):
    """w's own memory as a C-contiguous [K, R, S, C] array when w [K, C, R, S] is channels-last
    memory viewed as OIHW (kernels.conv.conv_weight gives that; a 1x1 filter always is), else None."""
    if getattr(w, "ndim", 0) != 4 or not hasattr(w, "transpose"):
        return None
    wk = w.transpose(0, 2, 3, 1)
    return wk if wk.flags.c_contiguous else None


def _to_krsc(cupy, w):
    return cupy.ascontiguousarray(w.transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- the ops

def conv2d_forward(x, w, stride, padding):
    """y = conv(x, w) by cuDNN. x [N, H, W, C], w [K, C, R, S] -> y [N, P, Q, K], CuPy, dtype of x.

    P = (H + 2*padding - R)//stride + 1, Q likewise; dilation 1, groups 1, no bias.
    """
    g = conv_geometry(getattr(x, "shape", None), getattr(w, "shape", None), stride, padding)
    wk = _krsc_view(w)
    dtype_name = _check_arrays([("x", x), ("w", w if wk is None else wk)])
    cupy = _import_cupy()
    y = cupy.empty((g.N, g.P, g.Q, g.K), dtype=x.dtype)
    _run("fprop", g, dtype_name, {"x": x, "w": _to_krsc(cupy, w) if wk is None else wk, "y": y})
    return y


def conv2d_backward_data(dy, w, x_shape, stride, padding):
    """dx = d(conv)/dx by cuDNN. dy [N, P, Q, K], w [K, C, R, S] -> dx of shape x_shape (NHWC)."""
    g = conv_geometry(x_shape, getattr(w, "shape", None), stride, padding)
    _expect_shape("dy", getattr(dy, "shape", ()), (g.N, g.P, g.Q, g.K), "[N, P, Q, K]")
    wk = _krsc_view(w)
    dtype_name = _check_arrays([("dy", dy), ("w", w if wk is None else wk)])
    cupy = _import_cupy()
    dx = cupy.empty((g.N, g.H, g.W, g.C), dtype=dy.dtype)
    _run("dgrad", g, dtype_name, {"dy": dy, "w": _to_krsc(cupy, w) if wk is None else wk, "dx": dx})
    return dx


def conv2d_backward_weight(x, dy, w_shape, stride, padding, dtype=None):
    """dw = d(conv)/dw by cuDNN. x [N, H, W, C], dy [N, P, Q, K] -> dw of shape w_shape (OIHW), in
    dtype (None: x's; a float32 dw of float16 inputs is cast from cuDNN's float16 result)."""
    g = conv_geometry(getattr(x, "shape", None), w_shape, stride, padding)
    _expect_shape("dy", getattr(dy, "shape", ()), (g.N, g.P, g.Q, g.K), "[N, P, Q, K]")
    dtype_name = _check_arrays([("x", x), ("dy", dy)])
    cupy = _import_cupy()
    dw_krsc = cupy.empty((g.K, g.R, g.S, g.C), dtype=x.dtype)
    _run("wgrad", g, dtype_name, {"x": x, "dy": dy, "dw": dw_krsc})
    dw = cupy.ascontiguousarray(dw_krsc.transpose(0, 3, 1, 2))
    return dw if dtype is None or dw.dtype == np.dtype(dtype) else dw.astype(dtype)
