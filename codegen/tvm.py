"""TensorIR code generation for fused kernel groups on the CPU (TVM, lowered through LLVM).

A kernel group (``kiln.passes.partition.KernelGroup``) of injective ops, optionally around
one reduction or normalization, becomes one TensorIR function: every node is a
``te.compute`` stage built from the per-op table ``TE_OPS`` (OpKind -> expression builder),
``te.create_prim_func`` turns the stages into blocks, and the schedule template
``schedule_group`` inlines the injective blocks and parallelizes/vectorizes/unrolls what is
left (``kiln.codegen.schedules_cpu``). The template's knobs are the search space declared
beside it; ``build`` lowers one configuration to machine code for ``Target.arch`` (LLVM ``mcpu``).

Layouts: a channels-last operand or result is addressed in its physical NHWC order, so
the kernel reads and writes the tensors the plan holds without a relayout copy.
Numerics: bf16/fp16 values are computed in fp32 and rounded back at every node's output,
as torch does op by op; reductions accumulate in fp32 for them.

Only the structure lives here (rendering, scheduling, building); caching, tuning and
running the compiled modules are in ``kiln.kernels.generated``. Nothing in this module
imports TVM at import time: a warm compile loads exported modules without it.
"""
from __future__ import annotations

import contextvars
import hashlib
import math
from typing import Callable

from kiln.ir import ROW_MAJOR, LayoutKind, OpKind, TensorType
from kiln.ir import attrs as A


# Part of every compiled module's cache key: bump it when rendering or scheduling changes
# the code generated for the same group and configuration.
CODEGEN_VERSION = 6


class Unsupported(Exception):
    """The group (an op, dtype, layout or dynamic shape) is outside what the renderer emits."""


# ----------------------------------------------------------------------------- dtypes
_DTYPES = {"float32": "float32", "float64": "float64", "bfloat16": "bfloat16", "float16": "float16",
           "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64", "uint8": "uint8",
           "bool": "bool"}
_LOW_PRECISION = ("bfloat16", "float16")
# whether exp/tanh/erf/sigmoid render as tvm_math's vectorizable forms (set per group by render)
_VECTOR_MATH: contextvars.ContextVar[bool] = contextvars.ContextVar("kiln_vector_math", default=False)


def tvm_dtype(t: TensorType) -> str:
    name = str(t.dtype.to_torch()).replace("torch.", "")
    if t.quant is not None or name not in _DTYPES:
        raise Unsupported(f"dtype {t.dtype}")
    return _DTYPES[name]


def compute_dtype(dtype: str) -> str:
    """The dtype arithmetic runs in: fp32 for the 16-bit floats, else the dtype itself."""
    return "float32" if dtype in _LOW_PRECISION else dtype


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


# ----------------------------------------------------------------------------- tensors
class Operand:
    """A logical view of a rendered tensor: ``load(idx)`` gives its value (in its compute
    dtype) at a logical index; ``shape`` is the logical shape; ``dtype`` the stored dtype;
    ``ttype`` the IR type of the value it renders (for type promotion), when it is one."""

    def __init__(self, shape: tuple[int, ...], dtype: str, load: Callable, ttype: TensorType | None = None):
        self.shape, self.dtype, self._load, self.ttype = tuple(shape), dtype, load, ttype

    def __call__(self, idx):
        return self._load(list(idx))

    @property
    def cdtype(self) -> str:
        return compute_dtype(self.dtype)


def _physical(shape, layout) -> tuple[tuple[int, ...], Callable]:
    """(physical shape, logical index -> physical index) for a value's layout."""
    if layout.kind is LayoutKind.ROW_MAJOR:
        return tuple(shape), lambda idx: idx
    if layout.kind is LayoutKind.CHANNELS_LAST and len(shape) == 4:
        n, c, h, w = shape
        return (n, h, w, c), lambda idx: [idx[0], idx[2], idx[3], idx[1]]
    raise Unsupported(f"layout {layout!r}")


def _from_tensor(t, layout, ttype: TensorType | None = None) -> Operand:
    """An Operand over a te tensor stored in ``layout`` (physical order)."""
    from tvm import tirx

    phys_shape = tuple(int(d) for d in t.shape)
    shape = phys_shape if layout.kind is LayoutKind.ROW_MAJOR else \
        (phys_shape[0], phys_shape[3], phys_shape[1], phys_shape[2])
    _, to_phys = _physical(shape, layout)
    dtype = str(t.dtype)
    cd = compute_dtype(dtype)

    def load(idx):
        v = t(*to_phys(idx))
        return v if cd == dtype else tirx.Cast(cd, v)

    return Operand(shape, dtype, load, ttype)


def _broadcast(x: Operand, out_shape) -> Callable:
    """Value of ``x`` at an index of the (right-aligned) broadcast ``out_shape``."""
    off = len(out_shape) - len(x.shape)

    def at(idx):
        return x([0 if d == 1 and out_shape[off + i] != 1 else idx[off + i] for i, d in enumerate(x.shape)])

    return at


def _cast(v, dtype: str):
    from tvm import tirx

    have = str(v.ty)
    if have == dtype:
        return v
    if dtype == "bool":
        return tirx.NE(v, tirx.const(0, have))
    return tirx.Cast(dtype, v)


def _tirx():
    from tvm import tirx

    return tirx


def _const(value, dtype: str):
    from tvm import tirx

    return tirx.const(value, dtype)


# ----------------------------------------------------------------------------- the per-op table
# An entry builds ``expr(idx)`` — the node's value at a logical output index, in the output's
# compute dtype — from its operands (Operands), attributes and output type, and optionally
# declares extra te stages (reductions). ``Ctx.reduce`` makes a reduction stage.
class Ctx:
    def __init__(self, name: str):
        self.name, self.count = name, 0

    def fresh(self, what: str) -> str:
        self.count += 1
        return f"{self.name}_{what}{self.count}"

    def reduce(self, kind: str, x: Callable, in_shape, axes, cdtype: str) -> Operand:
        """A reduction stage over ``axes`` of ``x`` (an expression of a logical index):
        returns an Operand with the reduced axes kept as size 1."""
        from tvm import te

        axes = tuple(sorted(axes))
        if any(in_shape[a] == 0 for a in axes):
            raise Unsupported("reduction over an empty axis")
        out_shape = tuple(1 if i in axes else d for i, d in enumerate(in_shape))
        rv = {a: te.reduce_axis((0, in_shape[a]), name=f"k{a}") for a in axes}
        combiner = {"sum": te.sum, "max": te.max, "min": te.min}[kind]

        def body(*i):
            idx = [rv[d] if d in rv else i[d] for d in range(len(in_shape))]
            return combiner(x(idx), axis=[rv[a] for a in axes])

        t = te.compute(out_shape, body, name=self.fresh(kind))
        return Operand(out_shape, cdtype, lambda idx: t(*(0 if d in rv else idx[d] for d in range(len(idx)))))


OpBuilder = Callable[[Ctx, list, object, TensorType], Callable]
TE_OPS: dict[OpKind, OpBuilder] = {}


def _unary(*kinds):
    def deco(f):
        def build(ctx, ins, attrs, out, f=f):
            x = ins[0]
            cd = compute_dtype(tvm_dtype(out))
            return lambda idx: f(_cast(x(idx), cd), attrs, cd)
        for k in kinds:
            TE_OPS[k] = build
        return f
    return deco


def _math(name):
    def f(v, a, cd):
        return _fn(name, v, cd)
    return f


def _fn(name: str, v, cd: str):
    """``tirx.<name>(v)``, or its vectorizable form (``tvm_math``) in float32 arithmetic."""
    from tvm import tirx

    from . import tvm_math

    fast = tvm_math.FLOAT32.get(name) if cd == "float32" and _VECTOR_MATH.get() else None
    return fast(v) if fast is not None else getattr(tirx, name)(v)


for _k, _n in {OpKind.EXP: "exp", OpKind.LOG: "log", OpKind.SQRT: "sqrt", OpKind.RSQRT: "rsqrt",
               OpKind.TANH: "tanh", OpKind.ERF: "erf", OpKind.SIN: "sin", OpKind.COS: "cos",
               OpKind.FLOOR: "floor", OpKind.CEIL: "ceil", OpKind.SIGMOID: "sigmoid"}.items():
    _unary(_k)(_math(_n))

_unary(OpKind.IDENTITY)(lambda v, a, cd: v)
_unary(OpKind.NEG)(lambda v, a, cd: -v)
_unary(OpKind.RECIPROCAL)(lambda v, a, cd: _const(1, cd) / v)
_unary(OpKind.NOT)(lambda v, a, cd: _not(v))


def _not(v):
    from tvm import tirx

    return tirx.Not(_cast(v, "bool"))


@_unary(OpKind.ABS)
def _abs(v, a, cd):
    from tvm import tirx

    return v if cd in ("bool", "uint8") else tirx.abs(v)


@_unary(OpKind.RELU)
def _relu(v, a, cd):
    from tvm import tirx

    if cd == "bool":
        return v
    # max(x, 0) would turn NaN into 0; torch keeps NaN
    return tirx.Select(v < _const(0, cd), _const(0, cd), v) if _is_float(cd) else tirx.max(v, _const(0, cd))


@_unary(OpKind.SIGN)
def _sign(v, a, cd):
    from tvm import tirx

    if cd == "bool":
        return v
    one, zero = _const(1, cd), _const(0, cd)
    return tirx.Select(v > zero, one, tirx.Select(v < zero, -one if cd != "uint8" else zero, v))


@_unary(OpKind.SILU)
def _silu(v, a, cd):
    return v * _fn("sigmoid", v, cd)


@_unary(OpKind.GELU)
def _gelu(v, a: A.GeluAttrs, cd):
    from tvm import tirx

    half, one = _const(0.5, cd), _const(1.0, cd)
    if a.approximate is A.GeluApprox.NONE:
        exact = half * v * (one + _fn("erf", v * _const(1 / math.sqrt(2), cd), cd))
        # torch's gelu gives NaN at +-inf (the formula alone gives inf at +inf): match it
        return tirx.Select(tirx.isinf(v), _const(float("nan"), cd), exact)
    inner = _const(math.sqrt(2 / math.pi), cd) * (v + _const(0.044715, cd) * v * v * v)
    return half * v * (one + _fn("tanh", inner, cd))


@_unary(OpKind.LEAKY_RELU)
def _leaky(v, a: A.LeakyReluAttrs, cd):
    from tvm import tirx

    return tirx.Select(v > _const(0, cd), v, v * _const(a.alpha, cd))


@_unary(OpKind.CLAMP)
def _clamp(v, a: A.ClampAttrs, cd):
    from tvm import tirx

    cast = (lambda b: int(b)) if not _is_float(cd) else float
    if a.min is not None:
        lo = _const(cast(a.min), cd)
        v = tirx.Select(v < lo, lo, v)  # NaN stays NaN, as in torch.clamp
    if a.max is not None:
        hi = _const(cast(a.max), cd)
        v = tirx.Select(v > hi, hi, v)
    return v


def _isnan(ctx, ins, attrs, out):
    from tvm import tirx

    x = ins[0]
    return lambda idx: tirx.isnan(x(idx)) if _is_float(x.cdtype) else _const(False, "bool")


TE_OPS[OpKind.ISNAN] = _isnan


def _cast_op(ctx, ins, a: A.CastAttrs, out):
    x = ins[0]
    to = compute_dtype(tvm_dtype(out))
    return lambda idx: _cast(_cast(x(idx), x.dtype) if x.dtype in _LOW_PRECISION else x(idx), to)


TE_OPS[OpKind.CAST] = _cast_op


def _binary(*kinds):
    def deco(f):
        def build(ctx, ins, attrs, out, f=f):
            from kiln.ir.ops import promote_types

            shape = tuple(out.shape)
            cd = compute_dtype(tvm_dtype(out))
            if cd == "bool":  # comparisons and logic: compare in the operands' promoted dtype
                cd = compute_dtype(tvm_dtype(TensorType(promote_types(*(i.ttype for i in ins)), ())))
            xs = [_broadcast(i, shape) for i in ins]
            return lambda idx: f(*[_cast(x(idx), cd) for x in xs], attrs, cd)
        for k in kinds:
            TE_OPS[k] = build
        return f
    return deco


_binary(OpKind.ADD)(lambda a, b, at, cd: a + b)
_binary(OpKind.SUB)(lambda a, b, at, cd: a - b)
_binary(OpKind.MUL)(lambda a, b, at, cd: a * b)
_binary(OpKind.EQ)(lambda a, b, at, cd: _tirx().EQ(a, b))  # `==` on exprs builds a lazy EqualOp
_binary(OpKind.NE)(lambda a, b, at, cd: _tirx().NE(a, b))
_binary(OpKind.LT)(lambda a, b, at, cd: a < b)
_binary(OpKind.LE)(lambda a, b, at, cd: a <= b)
_binary(OpKind.GT)(lambda a, b, at, cd: a > b)
_binary(OpKind.GE)(lambda a, b, at, cd: a >= b)


@_binary(OpKind.AND)
def _and(a, b, at, cd):
    from tvm import tirx

    return tirx.And(_cast(a, "bool"), _cast(b, "bool"))


@_binary(OpKind.OR)
def _or(a, b, at, cd):
    from tvm import tirx

    return tirx.Or(_cast(a, "bool"), _cast(b, "bool"))


@_binary(OpKind.DIV)
def _div(a, b, at: A.DivAttrs, cd):
    from tvm import tirx

    if at.rounding is A.Rounding.NONE:
        return a / b
    if not _is_float(cd):
        # torch raises on an integer division by zero; generated code would trap (SIGFPE)
        raise Unsupported("integer division")
    return (tirx.trunc if at.rounding is A.Rounding.TRUNC else tirx.floor)(a / b)


@_binary(OpKind.POW)
def _pow(a, b, at, cd):
    from tvm import tirx

    if not _is_float(cd):
        raise Unsupported("integer pow")
    return tirx.power(a, b)


def _extreme(pick_a):
    def f(a, b, at, cd):
        from tvm import tirx

        m = tirx.Select(pick_a(a, b), a, b)
        if _is_float(cd):  # torch.maximum/minimum propagate NaN from either side
            m = tirx.Select(tirx.isnan(a), a, tirx.Select(tirx.isnan(b), b, m))
        return m
    return f


_binary(OpKind.MAXIMUM)(_extreme(lambda a, b: a > b))
_binary(OpKind.MINIMUM)(_extreme(lambda a, b: a < b))


def _where(ctx, ins, attrs, out):
    from tvm import tirx

    shape = tuple(out.shape)
    c, x, y = (_broadcast(i, shape) for i in ins)
    cd = compute_dtype(tvm_dtype(out))
    return lambda idx: tirx.Select(_cast(c(idx), "bool"), _cast(x(idx), cd), _cast(y(idx), cd))


TE_OPS[OpKind.WHERE] = _where


# -- data movement: pure index arithmetic
def _unflatten(flat, shape):
    from tvm import tirx

    idx = []
    for d in reversed(shape):
        idx.append(tirx.floormod(flat, d) if d != 1 else tirx.const(0, "int32"))
        flat = tirx.floordiv(flat, d)
    return list(reversed(idx))


def _flatten(idx, shape):
    flat = None
    for i, d in zip(idx, shape):
        flat = i if flat is None else flat * d + i
    return flat if flat is not None else 0


def _reshape(ctx, ins, a, out):
    x = ins[0]
    if math.prod(x.shape) >= 2 ** 31:
        raise Unsupported("reshape of a tensor with 2**31 or more elements")
    return lambda idx: x(_unflatten(_flatten(idx, out.shape), x.shape)) if x.shape else x([])


def _permute(ctx, ins, a: A.PermuteAttrs, out):
    x = ins[0]

    def at(idx):
        src = [None] * len(idx)
        for o, p in enumerate(a.perm):
            src[p] = idx[o]
        return x(src)

    return at


def _expand(ctx, ins, a, out):
    return _broadcast(ins[0], tuple(out.shape))


def _slice(ctx, ins, a: A.SliceAttrs, out):
    x = ins[0]
    return lambda idx: x([i * a.step + a.start if d == a.axis else i for d, i in enumerate(idx)])


def _concat(ctx, ins, a: A.AxisAttrs, out):
    from tvm import tirx

    cd = compute_dtype(tvm_dtype(out))
    offs = [0]
    for x in ins:
        offs.append(offs[-1] + x.shape[a.axis])

    def at(idx):
        v = None
        for i in reversed(range(len(ins))):
            x, n = ins[i], ins[i].shape[a.axis]
            # clamped, so the branch Select does not take still reads in bounds
            src = [tirx.max(tirx.min(j - offs[i], n - 1), 0) if d == a.axis else j for d, j in enumerate(idx)]
            val = _cast(x(src), cd)
            v = val if v is None else tirx.Select(idx[a.axis] < offs[i + 1], val, v)
        return v

    return at


def _pad(ctx, ins, a: A.PadAttrs, out):
    from tvm import tirx

    x = ins[0]
    if a.mode is not A.PadMode.CONSTANT:
        raise Unsupported(f"pad mode {a.mode.value}")
    cd = x.cdtype

    def at(idx):
        conds, src = [], []
        for d, i in enumerate(idx):
            before = a.pads[2 * d]
            src.append(i - before)
            if a.pads[2 * d] or a.pads[2 * d + 1]:
                conds += [i >= before, i < before + x.shape[d]]
        if not conds:
            return x(src)
        # clamp the address too, so the unselected branch never reads out of bounds
        safe = [tirx.max(tirx.min(s, n - 1), 0) for s, n in zip(src, x.shape)]
        return tirx.Select(tirx.all(*conds), x(safe), _const(a.value, cd))

    return at


def _to_layout(ctx, ins, a: A.LayoutAttrs, out):
    # values do not change; the output's physical order is handled where it is stored
    _physical(out.shape, a.layout)
    return ins[0]


TE_OPS.update({OpKind.RESHAPE: _reshape, OpKind.PERMUTE: _permute, OpKind.EXPAND: _expand,
               OpKind.SLICE: _slice, OpKind.CONCAT: _concat, OpKind.PAD: _pad, OpKind.TO_LAYOUT: _to_layout})


# -- reductions and normalizations
def _acc(x: Operand) -> str:
    if not _is_float(x.cdtype):
        raise Unsupported("integer reduction")
    return x.cdtype


def _reduce(kind, mean=False):
    def build(ctx, ins, a: A.ReduceAttrs, out):
        x = ins[0]
        if not a.axes:
            return x
        r = ctx.reduce(kind, lambda i: x(i), x.shape, a.axes, _acc(x))
        scale = 1.0 / math.prod(x.shape[i] for i in a.axes) if mean else None

        def at(idx):
            full = list(idx)
            if not a.keepdim:  # re-insert the reduced axes
                full = []
                it = iter(idx)
                for d in range(len(x.shape)):
                    full.append(0 if d in a.axes else next(it))
            v = r(full)
            return v * _const(scale, r.dtype) if scale is not None else v
        return at
    return build


TE_OPS.update({OpKind.SUM: _reduce("sum"), OpKind.MEAN: _reduce("sum", mean=True),
               OpKind.MAX: _reduce("max"), OpKind.MIN: _reduce("min")})


def _softmax(log: bool):
    def build(ctx, ins, a: A.AxisAttrs, out):
        from tvm import tirx

        x = ins[0]
        cd = _acc(x)
        m = ctx.reduce("max", x, x.shape, (a.axis,), cd)

        def keep(idx):
            return [0 if d == a.axis else i for d, i in enumerate(idx)]

        s = ctx.reduce("sum", lambda i: _fn("exp", x(i) - m(keep(i)), cd), x.shape, (a.axis,), cd)
        if log:
            return lambda idx: x(idx) - m(keep(idx)) - tirx.log(s(keep(idx)))
        return lambda idx: _fn("exp", x(idx) - m(keep(idx)), cd) / s(keep(idx))
    return build


def _layer_norm(ctx, ins, a: A.LayerNormAttrs, out):
    from tvm import tirx

    x = ins[0]
    w = ins[1] if len(ins) > 1 and ins[1] is not None else None
    b = ins[2] if len(ins) > 2 and ins[2] is not None else None
    cd = _acc(x)
    xd = x

    def x(i):
        return _cast(xd(i), cd)

    axes = tuple(range(len(xd.shape) - a.normalized_ndim, len(xd.shape)))
    inv_n = _const(1.0 / math.prod(xd.shape[i] for i in axes), cd)
    mean = ctx.reduce("sum", x, xd.shape, axes, cd)

    def keep(idx):
        return [0 if d in axes else i for d, i in enumerate(idx)]

    def centered(i):
        return x(i) - mean(keep(i)) * inv_n

    var = ctx.reduce("sum", lambda i: centered(i) * centered(i), xd.shape, axes, cd)
    off = len(xd.shape) - a.normalized_ndim

    def at(idx):
        s2 = var(keep(idx))
        v = centered(idx) * tirx.rsqrt(s2 * inv_n + _const(a.eps, cd))
        if w is not None:
            v = v * _cast(w(idx[off:]), cd)
        if b is not None:
            v = v + _cast(b(idx[off:]), cd)
        # a variance that overflows (inputs near 1e30) gives NaN in torch, not zeros
        return tirx.Select(tirx.isinf(s2), _const(float("nan"), cd), v)
    return at


def _batch_norm(ctx, ins, a: A.BatchNormAttrs, out):
    from tvm import tirx

    x, mean, var = ins[:3]
    w = ins[3] if len(ins) > 3 and ins[3] is not None else None
    b = ins[4] if len(ins) > 4 and ins[4] is not None else None
    cd = _acc(x)

    def at(idx):
        c = [idx[1]]
        v = (x(idx) - mean(c)) * tirx.rsqrt(var(c) + _const(a.eps, cd))
        if w is not None:
            v = v * w(c)
        if b is not None:
            v = v + b(c)
        return v
    return at


TE_OPS.update({OpKind.SOFTMAX: _softmax(False), OpKind.LOG_SOFTMAX: _softmax(True),
               OpKind.LAYER_NORM: _layer_norm, OpKind.BATCH_NORM: _batch_norm})


# ----------------------------------------------------------------------------- rendering
def supports(group) -> str | None:
    """None when the renderer can emit ``group``, else the reason it cannot."""
    for n in group.nodes:
        if n.op not in TE_OPS:
            return f"no TensorIR template for {n.op.value}"
    for v in list(group.inputs) + [o for n in group.nodes for o in n.outputs]:
        if v is None:
            continue
        if not v.type.is_static:
            return "dynamic shape"
        if v.type.numel() == 0:
            return "empty tensor"
        try:
            tvm_dtype(v.type)
            _physical(v.type.shape, v.type.layout)
        except Unsupported as e:
            return str(e)
    if not group.outputs:
        return "no outputs"
    return None


def signature(group) -> str:
    """A canonical string of the group's ops, attributes, wiring, shapes, dtypes and layouts:
    equal signatures render to the same code."""
    names = {v: f"in{i}" for i, v in enumerate(group.inputs)}
    lines = [f"in{i}:{v.type!r}" for i, v in enumerate(group.inputs)]
    for j, n in enumerate(group.nodes):
        for k, o in enumerate(n.outputs):
            names[o] = f"n{j}.{k}"
        args = ",".join("-" if v is None else names[v] for v in n.inputs)
        lines.append(f"{n.op.value}({args}){n.attrs!r}->{[repr(o.type) for o in n.outputs]}")
    lines.append("out:" + ",".join(names[v] for v in group.outputs))
    return "\n".join(lines)


def signature_hash(group) -> str:
    return hashlib.sha256(signature(group).encode()).hexdigest()[:24]


# ops rendered with tvm_math's forms (exp, tanh, erf, sigmoid inside)
_TRANSCENDENTAL = frozenset({OpKind.EXP, OpKind.TANH, OpKind.ERF, OpKind.SIGMOID, OpKind.SILU, OpKind.GELU,
                             OpKind.SOFTMAX, OpKind.LOG_SOFTMAX})
MAX_VECTOR_MATH_DEPTH = 2


def _vector_math_ok(group) -> bool:
    """Whether ``group`` renders exp/tanh/erf/sigmoid in tvm_math's vectorizable forms.

    Not with 16-bit floats: the forms hold TIR Lets, which TVM's vectorizer rejects in loops
    that store bf16/fp16. Not past ``MAX_VECTOR_MATH_DEPTH`` of them nested in one
    expression: compile time grew steeply with nesting (one-off: three nested GELUs 4 s,
    four nested tanh 47 s, against 0.6 s for two)."""
    values = list(group.inputs) + [o for n in group.nodes for o in n.outputs]
    if any(tvm_dtype(v.type) in _LOW_PRECISION for v in values):
        return False
    depth: dict = {}
    for n in group.nodes:
        d = max((depth.get(v, 0) for v in n.inputs if v is not None), default=0) + (n.op in _TRANSCENDENTAL)
        if d > MAX_VECTOR_MATH_DEPTH:
            return False
        for o in n.outputs:
            depth[o] = d
    return True


def render(group):
    """The group as TE: (placeholders in group-input order, output tensors in group-output order)."""
    why = supports(group)
    if why:
        raise Unsupported(why)
    token = _VECTOR_MATH.set(_vector_math_ok(group))
    try:
        return _render(group)
    finally:
        _VECTOR_MATH.reset(token)


def _render(group):
    from tvm import te

    ctx = Ctx("t")
    placeholders, env = [], {}
    for i, v in enumerate(group.inputs):
        phys, _ = _physical(v.type.shape, v.type.layout)
        p = te.placeholder(phys, tvm_dtype(v.type), name=f"in{i}")
        placeholders.append(p)
        env[v] = _from_tensor(p, v.type.layout, v.type)
    stage: dict = {}
    for j, n in enumerate(group.nodes):
        if len(n.outputs) != 1:
            raise Unsupported(f"{n.op.value} with {len(n.outputs)} outputs")
        out = n.outputs[0]
        ins = [None if v is None else env[v] for v in n.inputs]
        expr = TE_OPS[n.op](ctx, ins, n.attrs, out.type)
        dt = tvm_dtype(out.type)
        # intermediates are row-major stages (inlined by the schedule); outputs are stored
        # in their layout's physical order
        layout = out.type.layout if out in group.outputs else None
        op = _materialize(expr, tuple(out.type.shape), dt, layout, f"n{j}")
        stage[out] = op
        env[out] = Operand(op.shape, op.dtype, op._load, out.type) if isinstance(op, Operand) else \
            _from_tensor(op, out.type.layout if layout else ROW_MAJOR, out.type)
    outs = []
    for v in group.outputs:
        t = stage[v]
        if isinstance(t, Operand):  # an output that is a pure view of an input: copy it
            t = _materialize(t, tuple(v.type.shape), tvm_dtype(v.type), v.type.layout, "copy", force=True)
        outs.append(t)
    return placeholders, outs


def _materialize(expr, shape, dtype, layout, name, force=False):
    """A te stage holding ``expr`` (cast to ``dtype``), in ``layout``'s physical order."""
    from tvm import te

    if isinstance(expr, Operand) and not force and layout is None:
        return expr  # a pure view (to_layout of a row-major intermediate): nothing to compute
    phys, to_phys = _physical(shape, layout or ROW_MAJOR)
    if phys != tuple(shape):  # NHWC storage: physical (n, h, w, c) holds logical (n, c, h, w)
        return te.compute(phys, lambda n, h, w, c: _cast(expr([n, c, h, w]), dtype), name=name)
    if not shape:
        return te.compute((), lambda: _cast(expr([]), dtype), name=name)
    return te.compute(shape, lambda *i: _cast(expr(list(i)), dtype), name=name)


# ----------------------------------------------------------------------------- building
def llvm_target(target) -> dict:
    """The TVM target for a ``kiln.target.Target``: LLVM for its CPU, with its core count."""
    spec = {"kind": "llvm", "num-cores": max(1, int(target.cores))}
    if target.arch and target.arch not in ("generic",):
        spec["mcpu"] = target.arch
    return spec


def build(group, config: dict, target, threads: int):
    """Render, schedule with ``config`` and compile ``group`` for ``target``: returns the
    TVM executable (call ``export_library`` to keep it)."""
    import tvm
    from tvm import te
    import tvm.s_tir as s_tir

    from .schedules_cpu import schedule_group

    placeholders, outs = render(group)
    func = te.create_prim_func(placeholders + outs).with_attr("global_symbol", "main")
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    schedule_group(sch, [t.op.name for t in outs], config, threads)
    return tvm.compile(sch.mod, target=tvm.target.Target(llvm_target(target)))
