"""Triton renderer: a fused elementwise/reduction kernel group as a Triton kernel.

The walk is codegen.walk's, the text emitter codegen.render's; this file is the Triton
syntax and the per-op table. An
injective kernel runs one lane per output element (``BLOCK`` lanes per program); a
reduction kernel runs ``XBLOCK`` output rows per program with the reduced extent in
``RBLOCK`` lanes (persistent: the row stays in registers), everything 2-D
([XBLOCK, 1] for per-row values, [XBLOCK, RBLOCK] along the row). Generated source is
written to a file under the cache directory (Triton compiles from source files) and
imported; identical kernels share one file by content hash.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import sys

import triton

from kiln.codegen.autotune import Space
from kiln.ir import DType, OpKind
from kiln.ir import attrs as A

from .render import INFIX_OPS, E, KernelSpec, Rendered, TextEmitter, reduce_extent, split_group
from .walk import Unsupported, numel, storage_offset, unflatten

TL_TYPES = {DType.FLOAT32: "tl.float32", DType.FLOAT16: "tl.float16", DType.BFLOAT16: "tl.bfloat16",
            DType.FLOAT64: "tl.float64", DType.INT64: "tl.int64", DType.INT32: "tl.int32", DType.INT16: "tl.int16",
            DType.INT8: "tl.int8", DType.UINT8: "tl.uint8", DType.BOOL: "tl.int1"}


def _dt(n):
    return n.outputs[0].type.dtype


def _f(x: str) -> str:
    return f"({x}).to(tl.float32)"


def _tanh(x: str) -> str:
    return f"(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)"


def _div(r, n, a, b):
    if n.attrs.rounding is not A.Rounding.NONE and not _dt(n).is_float:
        raise Unsupported("integer division with rounding")
    q = f"({_f(a)} / {_f(b)})"
    if n.attrs.rounding is A.Rounding.FLOOR:
        return f"tl.floor({q})"
    if n.attrs.rounding is A.Rounding.TRUNC:
        return f"tl.where({q} < 0, tl.ceil({q}), tl.floor({q}))"
    return q


def _gelu(r, n, x):
    if n.attrs.approximate is A.GeluApprox.TANH:
        return f"0.5 * {x} * (1.0 + {_tanh(f'0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})')})"
    return f"0.5 * {x} * (1.0 + tl.math.erf({x} * 0.7071067811865476))"


def _clamp(r, n, x):
    out = x
    if n.attrs.min is not None:
        out = f"tl.maximum({out}, {r.literal(n.attrs.min, _dt(n))})"
    if n.attrs.max is not None:
        out = f"tl.minimum({out}, {r.literal(n.attrs.max, _dt(n))})"
    return out


TRITON_OPS = {
    **INFIX_OPS,
    OpKind.NEG: lambda r, n, x: f"-{x}",
    OpKind.ABS: lambda r, n, x: f"tl.abs({x})",
    OpKind.EXP: lambda r, n, x: f"tl.exp({_f(x)})",
    OpKind.LOG: lambda r, n, x: f"tl.log({_f(x)})",
    OpKind.SQRT: lambda r, n, x: f"tl.sqrt({_f(x)})",
    OpKind.RSQRT: lambda r, n, x: f"(1.0 / tl.sqrt({_f(x)}))",
    OpKind.RECIPROCAL: lambda r, n, x: f"(1.0 / {_f(x)})",
    OpKind.RELU: lambda r, n, x: f"tl.where({x} > 0, {x}, 0)",
    OpKind.SIGMOID: lambda r, n, x: f"tl.sigmoid({_f(x)})",
    OpKind.TANH: lambda r, n, x: _tanh(_f(x)),
    OpKind.ERF: lambda r, n, x: f"tl.math.erf({_f(x)})",
    OpKind.SILU: lambda r, n, x: f"({x} * tl.sigmoid({_f(x)}))",
    OpKind.GELU: _gelu,
    OpKind.LEAKY_RELU: lambda r, n, x: f"tl.where({x} >= 0, {x}, {x} * {n.attrs.alpha!r})",
    OpKind.CLAMP: _clamp,
    OpKind.NOT: lambda r, n, x: f"({x} == 0)",
    OpKind.SIN: lambda r, n, x: f"tl.sin({_f(x)})",
    OpKind.COS: lambda r, n, x: f"tl.cos({_f(x)})",
    OpKind.FLOOR: lambda r, n, x: f"tl.floor({x})" if _dt(n).is_float else x,
    OpKind.CEIL: lambda r, n, x: f"tl.ceil({x})" if _dt(n).is_float else x,
    OpKind.SIGN: lambda r, n, x: f"tl.where({x} > 0, 1, tl.where({x} < 0, -1, 0)).to({TL_TYPES[_dt(n)]})",
    # tl has no inverse trigonometry: CUDA's libdevice (GPU only; the interpreter cannot run it)
    **{k: (lambda r, n, x, f=k.value: f"libdevice.{f}({_f(x)})")
       for k in (OpKind.ACOS, OpKind.ASIN, OpKind.ATAN, OpKind.ACOSH, OpKind.ASINH, OpKind.ATANH)},
    OpKind.ATAN2: lambda r, n, a, b: f"libdevice.atan2({_f(a)}, {_f(b)})",
    # rint rounds half to even, as torch.round does (libdevice.round rounds half away from zero)
    OpKind.ROUND: lambda r, n, x: f"libdevice.rint({_f(x)})" if _dt(n).is_float else x,
    OpKind.CAST: lambda r, n, x: r.cast(f"({x} != 0)" if n.attrs.dtype is DType.BOOL else x, n.attrs.dtype),
    OpKind.ISNAN: lambda r, n, x: f"({x} != {x})",
    OpKind.DIV: _div,
    OpKind.MAXIMUM: lambda r, n, a, b: f"tl.maximum({a}, {b})",
    OpKind.MINIMUM: lambda r, n, a, b: f"tl.minimum({a}, {b})",
    OpKind.AND: lambda r, n, a, b: f"(({a} != 0) & ({b} != 0))",
    OpKind.OR: lambda r, n, a, b: f"(({a} != 0) | ({b} != 0))",
    OpKind.WHERE: lambda r, n, c, a, b: f"tl.where({c} != 0, {a}, {b})",
}


class TritonEmitter(TextEmitter):
    OPS = TRITON_OPS
    target = "triton"

    def __init__(self, spec: KernelSpec):
        super().__init__(spec)
        self.reduction = spec.anchor is not None

    def floordiv_code(self, a, b):
        return f"{a} // {b}"

    def mod_code(self, a, b):
        return f"{a} % {b}"

    def imin(self, a, b):
        return f"tl.minimum({a}, {b})"

    def imax(self, a, b):
        return f"tl.maximum({a}, {b})"

    def select_code(self, c, a, b):
        return f"tl.where({c}, {a}, {b})"

    def cast(self, code, dtype):
        return f"({code}).to({TL_TYPES[dtype]})"

    def literal(self, x, dtype):
        if isinstance(x, float) and not math.isfinite(x):
            return f'float("{x}")'
        return repr(float(x)) if dtype.is_float else repr(int(x))

    def sqrt(self, code):
        return f"tl.sqrt({code})"

    def exp_code(self, code):
        return f"tl.exp({code})"

    def log_code(self, code):
        return f"tl.log({code})"

    def r_index(self):
        return E("roffs", True)

    def load_code(self, arg, offset, v):
        if v.type.dtype not in TL_TYPES:
            raise Unsupported(f"dtype {v.type.dtype.value}")
        if re.fullmatch(r"[\d\s+*()]*", offset.code):  # the same element on every lane: a scalar load
            return f"tl.load(in{arg} + {offset.code})"
        mask = "xmask & rmask" if (self.reduction and offset.r) else "xmask"
        return f"tl.load(in{arg} + {offset.code}, mask={mask}, other=0)"

    def reduce_code(self, kind, e):
        fill = {OpKind.SUM: "0.0", OpKind.MAX: "float('-inf')", OpKind.MIN: "float('inf')"}.get(kind)
        if fill is None:
            raise Unsupported(f"reduction {kind.value}")
        return f"tl.{kind.value}(tl.where(xmask & rmask, {e.code}, {fill}), 1)[:, None]"

    def render(self, name: str) -> Rendered:
        spec = self.spec
        r_extent = reduce_extent(spec)
        lin = E("xoffs") if self.reduction else E("offs")
        coords = unflatten(self, lin, spec.shape)
        stores = []
        for k, out in enumerate(spec.outputs):
            if out.type.dtype not in TL_TYPES:
                raise Unsupported(f"dtype {out.type.dtype.value}")
            val = self.walker.value_at(out, coords)
            off = storage_offset(self, out, coords)
            stores.append(f"tl.store(out{k} + {off.code}, tl.where(xmask, {val.code}, {val.code})"
                          f".to(out{k}.dtype.element_ty), mask=xmask)")
        args = [f"in{i}" for i in range(len(self.inputs))] + [f"out{i}" for i in range(len(spec.outputs))]
        if self.reduction:
            head = [f"def {name}({', '.join(args)}, XN, XBLOCK: tl.constexpr, RBLOCK: tl.constexpr):",
                    "    xoffs = (tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK))[:, None]",
                    "    xmask = xoffs < XN",
                    "    roffs = tl.arange(0, RBLOCK)[None, :]",
                    f"    rmask = roffs < {r_extent}"]
        else:
            head = [f"def {name}({', '.join(args)}, XN, BLOCK: tl.constexpr):",
                    "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
                    "    xmask = offs < XN"]
        body = head + ["    " + ln for ln in self.lines + stores]
        src = "\n".join(body) + "\n"
        return Rendered(name, src, list(self.inputs), list(spec.outputs), numel(spec.shape), r_extent, "triton")


HEADER = ("import triton\nimport triton.language as tl\nfrom triton.language.extra import libdevice\n\n\n"
          "@triton.jit\n")


def render_group(group) -> list[Rendered]:
    """Every kernel for ``group`` (raises Unsupported when one cannot be generated)."""
    out = []
    for spec in split_group(group):
        r = TritonEmitter(spec).render("KILN_KERNEL")
        # named by content, so identical kernels (the same layer repeated) are one kernel
        r.name = f"kiln_{'red' if r.reduce_extent else 'ew'}_{hashlib.sha256(r.source.encode()).hexdigest()[:12]}"
        r.source = r.source.replace("KILN_KERNEL", r.name, 1)
        out.append(r)
    return out


def space_for(r: Rendered) -> Space:
    """The tuning space of a generated kernel; the first configuration is the default."""
    if r.reduce_extent:
        rblock = triton.next_power_of_2(r.reduce_extent)
        xs = [x for x in (1, 2, 4, 8, 16, 32) if x * rblock <= 8192] or [1]
        return Space.of(XBLOCK=[xs[min(2, len(xs) - 1)]] + [x for x in xs if x != xs[min(2, len(xs) - 1)]],
                        num_warps=[4, 2, 8])
    return Space.of(BLOCK=[1024, 256, 512, 2048], num_warps=[4, 8, 2])


_LOADED: dict[str, object] = {}


def load(r: Rendered):
    """Compile-ready JIT function for a rendered kernel (its source is written to a file)."""
    src = HEADER + r.source
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    key = f"{r.name}_{digest}"
    if key in _LOADED:
        return _LOADED[key]
    from kiln.options import cache_subdir

    d = cache_subdir("triton_gen")
    path = os.path.join(d, f"{key}.py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(src)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"kiln_triton_gen.{key}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    fn = getattr(mod, r.name)
    _LOADED[key] = fn
    return fn
