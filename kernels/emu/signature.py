"""Kernel signatures: which extern "C" __global__ functions a CUDA source defines, and what
each parameter is, so that a launch can check its arguments before they reach the kernel.

CuPy passes arguments to cuLaunchKernel by their in-memory bytes: a Python int goes in as 64
bits and a float64 array where the kernel wants `float*` is simply misread.  Both are silent
garbage on a GPU.  Parsing the parameter list lets `kernels.RawKernel` refuse them with a clear
message on both backends.  (On the emulator the C++ compiler also reports every parameter's
size, and the two are cross-checked.)

Type codes: 'f16' 'bf16' 'f32' 'f64' 'i8' 'u8' 'i16' 'u16' 'i32' 'u32' 'i64' 'u64' 'bool',
vector types like 'f32x4', 'void', and '?' for a type this parser does not know (a typedef or a
struct): such a parameter is passed unchecked (on the emulator, its size is still checked).

Entry points from templates.  A kernel written once as a `template <...> __device__ void f(...)`
is exported per type by an instantiation list of lines `KERNEL_ENTRY(f_f32, f<float>)`
(kernels/common.cuh).  `expand_entry_points` replaces each such line by the extern "C" __global__
function it stands for, the template's own parameter list with the template arguments put in:
    extern "C" __global__ void f_f32(const float* __restrict__ x, ...) { f<float>(x, ...); }
so both compilers, the argument check and a reader of `RawModule.code` see ordinary kernels.
`RawModule` (and kernels/runtime/nvrtc.py's `compile_file`) do it before compiling.

Two checks, one verdict.  `check_args` is the reference: it walks the parameters and, on a
mismatch, says what to pass.  A launch is on the hot path (a training step is ~800 of them), so
`compiled_check(sig, array_class)` turns a signature into a small Python function, once per
kernel signature and array class, that tests the same conditions with `type(a) is ...` and set
look-ups and no messages.  When it says "no", `check_args` runs and raises the clear error (or
normalises a Python int into the scalar type the kernel takes), so both give the same verdict.
"""

import re
from dataclasses import dataclass

import numpy as np

__all__ = ["Param", "KernelSignature", "find_kernels", "expand_entry_points", "check_args", "compiled_check",
           "dtype_code", "code_size"]


@dataclass(frozen=True)
class Param:
    name: str          # parameter name ('' when the declaration has none)
    decl: str          # the declaration as written, whitespace-normalised
    is_pointer: bool
    code: str          # type code of the scalar, or of the pointee for pointers
    const: bool        # pointer to const (the kernel does not write through it)


@dataclass(frozen=True)
class KernelSignature:
    name: str
    params: tuple
    line: int          # 1-based line of the definition in the source

    def describe(self):
        return f"{self.name}({', '.join(p.decl for p in self.params)})"


_SCALAR_CODES = {
    "float": "f32", "double": "f64", "__half": "f16", "half": "f16",
    "__nv_bfloat16": "bf16", "nv_bfloat16": "bf16", "bool": "bool",
    "char": "i8", "signed char": "i8", "unsigned char": "u8", "int8_t": "i8", "uint8_t": "u8",
    "short": "i16", "short int": "i16", "signed short": "i16", "unsigned short": "u16",
    "unsigned short int": "u16", "int16_t": "i16", "uint16_t": "u16",
    "int": "i32", "signed": "i32", "signed int": "i32", "unsigned": "u32", "unsigned int": "u32",
    "int32_t": "i32", "uint32_t": "u32",
    "long": "i64", "long int": "i64", "unsigned long": "u64", "unsigned long int": "u64",
    "long long": "i64", "long long int": "i64", "unsigned long long": "u64",
    "unsigned long long int": "u64", "int64_t": "i64", "uint64_t": "u64", "size_t": "u64",
    "ptrdiff_t": "i64", "intptr_t": "i64", "uintptr_t": "u64",
    "void": "void",
    "float2": "f32x2", "float3": "f32x3", "float4": "f32x4", "double2": "f64x2",
    "int2": "i32x2", "int4": "i32x4", "uint2": "u32x2", "uint4": "u32x4",
    "__half2": "f16x2", "half2": "f16x2", "__nv_bfloat162": "bf16x2",
    "char4": "i8x4", "uchar4": "u8x4", "short2": "i16x2", "ushort2": "u16x2",
}
_CODE_SIZES = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "i8": 1, "u8": 1, "i16": 2, "u16": 2,
               "i32": 4, "u32": 4, "i64": 8, "u64": 8, "bool": 1}
_QUALIFIERS = {"const", "volatile", "__restrict__", "__restrict", "restrict", "struct",
               "__grid_constant__"}

_DTYPE_CODES = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32",
                np.dtype(np.float64): "f64", np.dtype(np.int8): "i8", np.dtype(np.uint8): "u8",
                np.dtype(np.int16): "i16", np.dtype(np.uint16): "u16", np.dtype(np.int32): "i32",
                np.dtype(np.uint32): "u32", np.dtype(np.int64): "i64", np.dtype(np.uint64): "u64",
                np.dtype(np.bool_): "bool"}


def code_size(code):
    """Bytes of one value of type code `code` ('f32' -> 4, 'f32x4' -> 16), or None if unknown."""
    if "x" in code:
        base, n = code.split("x", 1)
        return _CODE_SIZES[base] * int(n) if base in _CODE_SIZES and n.isdigit() else None
    return _CODE_SIZES.get(code)


def dtype_code(dtype):
    """Type code of a NumPy/CuPy dtype ('bf16' for a dtype named bfloat16), or None."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return "bf16"
    return _DTYPE_CODES.get(dtype)


def _strip_comments(src):
    """Replace comments and string/char literals' contents by spaces, keeping line numbers."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == '"' or c == "'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j = min(j + 1, n)
            # keep the literal itself: extern "C" must stay visible
            out.append(src[i:j])
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _match_close(text, i, open_ch, close_ch):
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_ch:
            depth += 1
        elif text[j] == close_ch:
            depth -= 1
            if depth == 0:
                return j
    return -1


def _extern_c_blocks(text):
    """(start, end) spans of `extern "C" { ... }` blocks."""
    spans = []
    for m in re.finditer(r'extern\s+"C"\s*\{', text):
        end = _match_close(text, m.end() - 1, "{", "}")
        spans.append((m.end(), end if end > 0 else len(text)))
    return spans


def _split_params(plist):
    parts, depth, cur = [], 0, []
    for ch in plist:
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [" ".join(p.split()) for p in parts]


def _parse_param(decl):
    d = re.sub(r"__attribute__\s*\(\(.*?\)\)", " ", decl)
    d = re.sub(r"=.*$", "", d)                         # default arguments
    d = d.replace("&", " & ")
    nstars = d.count("*")
    words = re.findall(r"[A-Za-z_]\w*(?:::\w+)*", d.replace("*", " "))
    const = False
    if nstars:
        # `const float* p` or `float const* p`: const before the first star applies to the pointee
        const = bool(re.search(r"\bconst\b", d.split("*")[0]))
    words = [w for w in words if w not in _QUALIFIERS]
    name = ""
    if len(words) >= 2:
        name = words[-1]
        words = words[:-1]
    base = " ".join(words)
    code = _SCALAR_CODES.get(base, "?")
    if nstars > 1:
        code = "void"  # pointer to pointer: opaque
    return Param(name=name, decl=decl, is_pointer=nstars > 0, code=code, const=const)


_GLOBAL_RE = re.compile(
    r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+"
    r"(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\(")


_ENTRY_RE = re.compile(r"^[ \t]*KERNEL_ENTRY\s*\(", re.M)
_TEMPLATE_RE = re.compile(r"\btemplate\s*<")
_TEMPLATE_FUNCTION_RE = re.compile(r"\s*((?:__device__|__global__|__forceinline__|__noinline__|static|inline)\s+)*"
                                   r"void\s+([A-Za-z_]\w*)\s*\(")


def _templates(text):
    """{name: (template parameter names, parameter list text, is __device__)} of the function
    templates in comment-free `text`."""
    found = {}
    for m in _TEMPLATE_RE.finditer(text):
        close = _match_close(text, m.end() - 1, "<", ">")
        if close < 0:
            continue
        f = _TEMPLATE_FUNCTION_RE.match(text, close + 1)
        if f is None:
            continue
        open_paren = f.end() - 1
        end = _match_close(text, open_paren, "(", ")")
        if end < 0:
            continue
        names = [re.findall(r"[A-Za-z_]\w*", p.split("=")[0])[-1]
                 for p in _split_params(text[m.end():close]) if p.strip()]
        found[f.group(2)] = (names, text[open_paren + 1:end], "__device__" in (f.group(0) or ""))
    return found


def _entry_error(message, filename, line):
    from .errors import CompileError
    return CompileError(f"{filename}:{line}: {message}", filename=filename, line=line)


def expand_entry_points(source, filename="<kernel source>"):
    """`source` with every `KERNEL_ENTRY(name, template<args>)` line replaced by the extern "C"
    __global__ kernel `name`, which calls the __device__ function template with those template
    arguments and takes the template's parameters with the template arguments substituted.

    The replacement keeps the line count, so compiler messages, `#line` and gdb still point at
    the right lines (a generated kernel stands on its KERNEL_ENTRY line).  Raises
    kernels.CompileError naming the file and line when the template is not found, is not
    __device__, or takes another number of template arguments.
    """
    if "KERNEL_ENTRY" not in source:
        return source
    text = _strip_comments(source)
    starts = list(_ENTRY_RE.finditer(text))
    if not starts:
        return source
    templates = _templates(text)
    out, pos = [], 0
    for m in starts:
        open_paren = m.end() - 1
        close = _match_close(text, open_paren, "(", ")")
        line = text.count("\n", 0, m.start()) + 1
        if close < 0:
            raise _entry_error("KERNEL_ENTRY( is never closed", filename, line)
        end = close + 1
        semicolon = re.match(r"[ \t]*;", text[end:])
        if semicolon:
            end += semicolon.end()
        parts = [" ".join(p.split()) for p in _split_entry_args(text[open_paren + 1:close])]
        target = re.fullmatch(r"([A-Za-z_]\w*)\s*<(.*)>", parts[1]) if len(parts) == 2 else None
        if len(parts) != 2 or not re.fullmatch(r"[A-Za-z_]\w*", parts[0]) or target is None:
            raise _entry_error(f"expected KERNEL_ENTRY(kernel_name, template_name<arguments>), got "
                               f"KERNEL_ENTRY({', '.join(parts)})", filename, line)
        name, template, args = parts[0], target.group(1), [a.strip() for a in _split_params(target.group(2))]
        if template not in templates:
            raise _entry_error(f"KERNEL_ENTRY({name}, ...): no function template '{template}' defined before "
                               f"it", filename, line)
        params, plist, is_device = templates[template]
        if not is_device:
            raise _entry_error(f"KERNEL_ENTRY({name}, ...): template '{template}' must be a __device__ function "
                               f"(the entry point is the __global__ one)", filename, line)
        if len(args) != len(params):
            raise _entry_error(f"KERNEL_ENTRY({name}, ...): template '{template}' takes {len(params)} template "
                               f"arguments ({', '.join(params)}), got {len(args)}", filename, line)
        for p, a in zip(params, args):
            plist = re.sub(rf"\b{re.escape(p)}\b", a, plist)
        decls = [p for p in _split_params(plist) if p.strip() and p.strip() != "void"]
        names = [_parse_param(d).name for d in decls]
        if not all(names):
            raise _entry_error(f"KERNEL_ENTRY({name}, ...): every parameter of '{template}' needs a name",
                               filename, line)
        kernel = (f'extern "C" __global__ void {name}({", ".join(decls)}) '
                  f'{{ {template}<{", ".join(args)}>({", ".join(names)}); }}')
        out.append(source[pos:m.start()])
        out.append(kernel + "\n" * source.count("\n", m.start(), end))
        pos = end
    out.append(source[pos:])
    return "".join(out)


def _split_entry_args(text):
    """KERNEL_ENTRY's two arguments: split at the first comma outside brackets (the template
    arguments have commas of their own)."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        elif ch == "," and depth == 0:
            return [text[:i], text[i + 1:]]
    return [text]


def find_kernels(source):
    """The extern "C" __global__ functions defined in `source`: {name: KernelSignature}.

    A kernel is exported when its definition starts with `extern "C"` (the CuPy idiom) or lies
    inside an `extern "C" { ... }` block.  Template kernels are reached through such entry points,
    written out or as `KERNEL_ENTRY` lines (expanded first: see expand_entry_points).
    """
    text = _strip_comments(expand_entry_points(source))
    blocks = _extern_c_blocks(text)
    kernels = {}
    for m in _GLOBAL_RE.finditer(text):
        start = m.start()
        before = text[max(0, start - 200):start]
        exported = bool(re.search(r'extern\s+"C"\s*$', before)) or any(a <= start < b for a, b in blocks)
        if not exported:
            continue
        open_paren = m.end() - 1
        close = _match_close(text, open_paren, "(", ")")
        if close < 0:
            continue
        # a declaration (ending in ';') is not a definition, but still names the signature
        params = tuple(_parse_param(p) for p in _split_params(text[open_paren + 1:close])
                       if p.strip() and p.strip() != "void")
        line = text.count("\n", 0, start) + 1
        kernels[m.group(1)] = KernelSignature(name=m.group(1), params=params, line=line)
    return kernels


def _array_module(x):
    return type(x).__module__.split(".")[0]


def check_args(sig, args, array_type):
    """Validate `args` against `sig`; return a list of normalised arguments.

    array_type is 'numpy' or 'cupy': the kind of array the launch is for.  Pointers take arrays
    of that kind (or None for a null pointer); scalars take NumPy scalars of the declared type,
    exactly as CuPy expects.  A Python int or float is accepted only where it cannot be
    misread: a 64-bit integer parameter (int) or a double (float).
    Raises TypeError/ValueError naming the kernel, the argument and what to pass instead.
    Arrays must be C-contiguous (a kernel reads raw memory); a strided view is a TypeError.
    """
    if array_type == "numpy":
        values = compiled_check(sig, np.ndarray)(args)
        if values is not None:
            return list(values)
    return _check_args_slowly(sig, args, array_type)


def _check_args_slowly(sig, args, array_type):
    """check_args, parameter by parameter, with the messages."""
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"kernel '{sig.name}': args must be a tuple or list, got {type(args).__name__}")
    if len(args) != len(sig.params):
        raise TypeError(f"kernel '{sig.name}' takes {len(sig.params)} arguments "
                        f"({sig.describe()}), got {len(args)}")
    out = []
    for i, (p, a) in enumerate(zip(sig.params, args)):
        label = f"kernel '{sig.name}' argument {i} '{p.name or p.decl}' (declared `{p.decl}`)"
        if p.is_pointer:
            if a is None:
                out.append(None)
                continue
            if _array_module(a) not in ("numpy", "cupy") or not hasattr(a, "dtype") or isinstance(a, np.generic):
                raise TypeError(f"{label}: expected a {array_type} array, got {type(a).__name__}")
            if _array_module(a) != array_type:
                raise TypeError(f"{label}: got a {_array_module(a)} array, but this launch is on "
                                f"{'the GPU' if array_type == 'cupy' else 'the CPU emulator'}; "
                                f"do not mix NumPy and CuPy arrays in one launch")
            code = dtype_code(a.dtype)
            want = p.code
            if want not in ("void", "?", "i8", "u8") and not _pointee_accepts(want, code):
                raise TypeError(f"{label}: got a {a.dtype} array; the kernel reads it as "
                                f"{_pretty(want)} (pass an array of dtype {_dtype_for(want)})")
            if not a.flags.c_contiguous:
                raise TypeError(f"{label}: the array is not C-contiguous (shape {tuple(a.shape)}, strides "
                                f"{tuple(a.strides)}); a kernel reads the raw memory as one dense block, so a "
                                f"strided view would be misread. Pass xp.ascontiguousarray(...) of it")
            if not p.const and not getattr(a.flags, "writeable", True):
                raise ValueError(f"{label}: the array is read-only but the kernel may write through it")
            out.append(a)
        else:
            out.append(_check_scalar(label, p, a))
    return out


def _pointee_accepts(want, code):
    if code is None:
        return False
    if want == code:
        return True
    base = want.split("x")[0]  # vector types read arrays of their element type
    if base == code:
        return True
    if want == "bf16" and code == "u16":  # NumPy has no bfloat16: its bit patterns travel as uint16
        return True
    return False


def _pretty(code):
    return {"f16": "half (float16)", "bf16": "bfloat16", "f32": "float (float32)",
            "f64": "double (float64)", "i32": "int (int32)", "u32": "unsigned (uint32)",
            "i64": "64-bit int (int64)", "u64": "64-bit unsigned (uint64)", "bool": "bool",
            "i8": "char", "u8": "unsigned char", "i16": "short", "u16": "unsigned short"}.get(code, code)


def _a(noun):
    """'a float', 'an int': the article for a type name in a message."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _dtype_for(code):
    base = code.split("x")[0]
    return {"f16": "float16", "bf16": "uint16 (bfloat16 bits)", "f32": "float32", "f64": "float64",
            "i8": "int8", "u8": "uint8", "i16": "int16", "u16": "uint16", "i32": "int32",
            "u32": "uint32", "i64": "int64", "u64": "uint64", "bool": "bool"}.get(base, base)


def _check_scalar(label, p, a):
    want = p.code
    if isinstance(a, (bool, np.bool_)) and want == "bool":
        return np.bool_(a)
    if isinstance(a, np.generic):
        code = dtype_code(a.dtype)
        if want == "?":
            return a
        if want == "bf16" and code == "u16":
            return a
        if code != want:
            raise TypeError(f"{label}: got np.{a.dtype.name}; pass np.{_dtype_for(want).split()[0]}(...) "
                            f"so that the kernel reads {_CODE_SIZES.get(want, '?')} bytes of {_pretty(want)}")
        return a
    if isinstance(a, bool):
        raise TypeError(f"{label}: got a Python bool; pass np.{_dtype_for(want).split()[0]}(...)")
    if isinstance(a, int):
        if want == "i64":
            return np.int64(a)
        if want == "u64" and a >= 0:
            return np.uint64(a)
        raise TypeError(f"{label}: got a Python int; pass np.{_dtype_for(want).split()[0]}({a}) — "
                        f"CuPy would pass a Python int as 64 bits, which {_a(_pretty(want))} parameter misreads")
    if isinstance(a, float):
        if want == "f64":
            return np.float64(a)
        raise TypeError(f"{label}: got a Python float; pass np.{_dtype_for(want).split()[0]}({a!r}) — "
                        f"CuPy would pass a Python float as a double, which {_a(_pretty(want))} parameter misreads")
    if hasattr(a, "dtype") and getattr(a, "ndim", None) == 0:
        raise TypeError(f"{label}: got a 0-d array; pass a NumPy scalar, e.g. np.{_dtype_for(want).split()[0]}(x)")
    raise TypeError(f"{label}: got {type(a).__name__}; pass a NumPy scalar of type {_dtype_for(want)}")


# ---- the compiled check: the same conditions, without the messages ----------------------------

_SCALAR_TYPES = {"f16": np.float16, "f32": np.float32, "f64": np.float64, "i8": np.int8, "u8": np.uint8,
                 "i16": np.int16, "u16": np.uint16, "i32": np.int32, "u32": np.uint32, "i64": np.int64,
                 "u64": np.uint64, "bf16": np.uint16}
# Python numbers that check_args accepts for a parameter (it cannot misread them there)
_PYTHON_NUMBERS = {"i64": ("int", ""), "u64": ("int", " and {a} >= 0"), "f64": ("float", "")}

_compiled = {}   # (id(signature), array class) -> (signature, check); the signature is kept alive


def compiled_check(sig, array_class):
    """The argument check of kernel signature `sig` for arrays of `array_class` (numpy.ndarray or
    cupy.ndarray), built once: `check(args)` returns the tuple of values to launch with, or None
    when `check_args` must look (a mismatch, which it reports, or a Python number to convert).

    On the CuPy path a null pointer (None) becomes np.uint64(0), as CuPy wants; on the emulator it
    stays None.  The generated source is kept as `check.source`, for the curious.
    """
    key = (id(sig), array_class)
    entry = _compiled.get(key)
    if entry is None or entry[0] is not sig:
        entry = (sig, _build_check(sig, array_class))
        _compiled[key] = entry
    return entry[1]


def _build_check(sig, array_class):
    on_gpu = array_class.__module__.split(".")[0] == "cupy"
    env = {"ARRAY": array_class, "np": np, "NULL": np.uint64(0), "getattr": getattr, "isinstance": isinstance,
           "type": type, "len": len, "tuple": tuple, "list": list, "int": int, "float": float, "bool": bool}
    n = len(sig.params)
    names = [f"a{i}" for i in range(n)]
    body = [f"if type(args) is not tuple and type(args) is not list or len(args) != {n}: return None"]
    if n:
        body.append(f"{', '.join(names)}, = args")
    for i, (p, a) in enumerate(zip(sig.params, names)):
        if p.is_pointer:
            body.append(f"if {a} is None: {a} = NULL" if on_gpu else f"if {a} is None: pass")
            body.append("else:")
            body.append(f"    if type({a}) is not ARRAY: return None")
            if p.code not in ("void", "?", "i8", "u8"):
                env[f"D{i}"] = frozenset(d for d, c in _DTYPE_CODES.items() if _pointee_accepts(p.code, c))
                body.append(f"    if {a}.dtype not in D{i}: return None")
            flags = f"{a}.flags"
            if p.const:
                body.append(f"    if not {flags}.c_contiguous: return None")
            else:
                writeable = "f.writeable" if not on_gpu else 'getattr(f, "writeable", True)'
                body.append(f"    f = {flags}")
                body.append(f"    if not (f.c_contiguous and {writeable}): return None")
        elif p.code == "?":
            body.append(f"if not isinstance({a}, np.generic): return None")
        elif p.code == "bool":
            body.append(f"if type({a}) is bool or type({a}) is np.bool_: {a} = np.bool_({a})")
            body.append("else: return None")
        elif p.code in _SCALAR_TYPES:
            env[f"T{i}"] = _SCALAR_TYPES[p.code]
            body.append(f"if type({a}) is not T{i}:")
            if p.code in _PYTHON_NUMBERS:
                py, extra = _PYTHON_NUMBERS[p.code]
                body.append(f"    if type({a}) is {py}{extra.format(a=a)}: {a} = T{i}({a})")
                body.append("    else: return None")
            else:
                body.append("    return None")
        else:   # a vector type passed by value, say: check_args decides
            body.append("return None")
            break
    else:
        body.append(f"return ({', '.join(names)}{',' if n == 1 else ''})")
    source = "def check(args):\n" + "".join(f"    {line}\n" for line in body)
    namespace = dict(env)
    exec(compile(source, f"<argument check of {sig.name}>", "exec"), namespace)
    check = namespace["check"]
    check.source = source
    return check
