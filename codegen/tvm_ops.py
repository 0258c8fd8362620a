"""The TensorIR per-op table: each elementwise op as a TIR expression of its operands.

``TIR_OPS[kind](emitter, node, *operands)`` takes the operands' values in their compute
dtypes (``codegen.tvm.compute_dtype``) and gives the node's value in its output's compute
dtype. ``emitter.math(name, v, dtype)`` is ``tirx.<name>`` or its vectorizable float32 form
(``codegen.tvm_math``), as the emitter decided for the group. Nothing here imports TVM at
import time.
"""
from __future__ import annotations

import functools
import math

from kiln.ir import OpKind, TensorType
from kiln.ir import attrs as A

from .walk import Unsupported

_DTYPES = {"float32": "float32", "float64": "float64", "bfloat16": "bfloat16", "float16": "float16",
           "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64", "uint8": "uint8",
           "bool": "bool"}
LOW_PRECISION = ("bfloat16", "float16")


def tvm_dtype(t: TensorType) -> str:
    name = str(t.dtype.to_torch()).replace("torch.", "")
    if t.quant is not None or name not in _DTYPES:
        raise Unsupported(f"dtype {t.dtype}")
    return _DTYPES[name]


def compute_dtype(dtype: str) -> str:
    """The dtype arithmetic runs in: fp32 for the 16-bit floats, else the dtype itself."""
    return "float32" if dtype in LOW_PRECISION else dtype


def is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def cast(v, dtype: str):
    """``v`` as ``dtype`` (to bool: v != 0). A 16-bit float widened to float32 and narrowed
    back is itself again: the pair is dropped."""
    from tvm import tirx

    have = str(v.ty)
    if have == dtype:
        return v
    if dtype == "bool":
        return tirx.NE(v, tirx.const(0, have))
    if dtype in LOW_PRECISION and have == "float32" and isinstance(v, tirx.Cast) and str(v.value.ty) == dtype:
        return v.value
    return tirx.Cast(dtype, v)


def const(value, dtype: str):
    from tvm import tirx

    return tirx.const(value, dtype)


def _out_cd(n) -> str:
    return compute_dtype(tvm_dtype(n.outputs[0].type))


TIR_OPS: dict = {}


def _unary(*kinds):
    """An entry ``f(em, v, attrs, cd)`` with ``v`` cast to the output's compute dtype ``cd``."""
    def deco(f):
        def entry(em, n, x, f=f):
            cd = _out_cd(n)
            return f(em, cast(x, cd), n.attrs, cd)
        for k in kinds:
            TIR_OPS[k] = entry
        return f
    return deco


def _binary(*kinds):
    """An entry ``f(a, b, attrs, cd)`` with both operands cast to the compute dtype: the
    output's, or for comparisons and logic (bool outputs) the operands' promoted dtype."""
    def deco(f):
        def entry(em, n, a, b, f=f):
            from kiln.ir.ops import promote_types

            cd = _out_cd(n)
            if cd == "bool":
                cd = compute_dtype(tvm_dtype(TensorType(promote_types(*(i.type for i in n.inputs)), ())))
            return f(cast(a, cd), cast(b, cd), n.attrs, cd)
        for k in kinds:
            TIR_OPS[k] = entry
        return f
    return deco


def _math(name):
    return lambda em, v, a, cd: em.math(name, v, cd)


for _k, _n in {OpKind.EXP: "exp", OpKind.LOG: "log", OpKind.SQRT: "sqrt", OpKind.RSQRT: "rsqrt",
               OpKind.TANH: "tanh", OpKind.ERF: "erf", OpKind.SIN: "sin", OpKind.COS: "cos",
               OpKind.FLOOR: "floor", OpKind.CEIL: "ceil", OpKind.SIGMOID: "sigmoid", OpKind.ACOS: "acos",
               OpKind.ASIN: "asin", OpKind.ATAN: "atan", OpKind.ACOSH: "acosh", OpKind.ASINH: "asinh",
               OpKind.ATANH: "atanh"}.items():
    _unary(_k)(_math(_n))


@_unary(OpKind.ROUND)
def _round(em, v, a, cd):
    from tvm import tirx

    # nearbyint rounds half to even (the default rounding mode), as torch.round does;
    # tirx.round rounds half away from zero
    return tirx.nearbyint(v) if is_float(cd) else v

_unary(OpKind.IDENTITY)(lambda em, v, a, cd: v)
_unary(OpKind.NEG)(lambda em, v, a, cd: -v)
_unary(OpKind.RECIPROCAL)(lambda em, v, a, cd: const(1, cd) / v)


@_binary(OpKind.ATAN2)
def _atan2(a, b, attrs, cd):
    from tvm import tirx

    return tirx.atan2(a, b)


@_unary(OpKind.NOT)
def _not(em, v, a, cd):
    from tvm import tirx

    return tirx.Not(cast(v, "bool"))


@_unary(OpKind.ABS)
def _abs(em, v, a, cd):
    from tvm import tirx

    return v if cd in ("bool", "uint8") else tirx.abs(v)


@_unary(OpKind.RELU)
def _relu(em, v, a, cd):
    from tvm import tirx

    if cd == "bool":
        return v
    # max(x, 0) would turn NaN into 0; torch keeps NaN
    return tirx.Select(v < const(0, cd), const(0, cd), v) if is_float(cd) else tirx.max(v, const(0, cd))


@_unary(OpKind.SIGN)
def _sign(em, v, a, cd):
    from tvm import tirx

    if cd == "bool":
        return v
    one, zero = const(1, cd), const(0, cd)
    return tirx.Select(v > zero, one, tirx.Select(v < zero, -one if cd != "uint8" else zero, v))


@_unary(OpKind.SILU)
def _silu(em, v, a, cd):
    return v * em.math("sigmoid", v, cd)


@functools.cache
def torch_gelu_at_inf() -> tuple[float, float]:
    """torch's float32 exact GELU at +inf and -inf on this CPU (asked once, on a vector long
    enough to take its vectorized path)."""
    import torch

    y = torch.nn.functional.gelu(torch.tensor([float("inf"), float("-inf")] * 32))
    return float(y[0]), float(y[1])


@_unary(OpKind.GELU)
def _gelu(em, v, a: A.GeluAttrs, cd):
    from tvm import tirx

    half, one = const(0.5, cd), const(1.0, cd)
    if a.approximate is A.GeluApprox.NONE:
        exact = half * v * (one + em.math("erf", v * const(1 / math.sqrt(2), cd), cd))
        # at +-inf, give what torch's gelu gives on this CPU: its vectorized code differs
        # there by ISA (AVX-512: NaN at both; AVX2: inf at +inf, NaN at -inf)
        pos, neg = torch_gelu_at_inf()
        return tirx.Select(tirx.isinf(v), tirx.Select(v > const(0.0, cd), const(pos, cd), const(neg, cd)), exact)
    inner = const(math.sqrt(2 / math.pi), cd) * (v + const(0.044715, cd) * v * v * v)
    return half * v * (one + em.math("tanh", inner, cd))


@_unary(OpKind.LEAKY_RELU)
def _leaky(em, v, a: A.LeakyReluAttrs, cd):
    from tvm import tirx

    return tirx.Select(v > const(0, cd), v, v * const(a.alpha, cd))


@_unary(OpKind.CLAMP)
def _clamp(em, v, a: A.ClampAttrs, cd):
    from tvm import tirx

    bound = float if is_float(cd) else int
    if a.min is not None:
        lo = const(bound(a.min), cd)
        v = tirx.Select(v < lo, lo, v)  # NaN stays NaN, as in torch.clamp
    if a.max is not None:
        hi = const(bound(a.max), cd)
        v = tirx.Select(v > hi, hi, v)
    return v


def _isnan(em, n, x):
    from tvm import tirx

    return tirx.isnan(x) if is_float(str(x.ty)) else const(False, "bool")


def _cast_op(em, n, x):
    # a 16-bit float input rounds to its own dtype first (it is computed in float32)
    src = tvm_dtype(n.inputs[0].type)
    return cast(cast(x, src) if src in LOW_PRECISION else x, _out_cd(n))


def _where(em, n, c, x, y):
    from tvm import tirx

    cd = _out_cd(n)
    return tirx.Select(cast(c, "bool"), cast(x, cd), cast(y, cd))


TIR_OPS.update({OpKind.ISNAN: _isnan, OpKind.CAST: _cast_op, OpKind.WHERE: _where})

_binary(OpKind.ADD)(lambda a, b, at, cd: a + b)
_binary(OpKind.SUB)(lambda a, b, at, cd: a - b)
_binary(OpKind.MUL)(lambda a, b, at, cd: a * b)
_binary(OpKind.EQ)(lambda a, b, at, cd: _tirx().EQ(a, b))  # `==` on exprs builds a lazy EqualOp
_binary(OpKind.NE)(lambda a, b, at, cd: _tirx().NE(a, b))
_binary(OpKind.LT)(lambda a, b, at, cd: a < b)
_binary(OpKind.LE)(lambda a, b, at, cd: a <= b)
_binary(OpKind.GT)(lambda a, b, at, cd: a > b)
_binary(OpKind.GE)(lambda a, b, at, cd: a >= b)


def _tirx():
    from tvm import tirx

    return tirx


@_binary(OpKind.AND)
def _and(a, b, at, cd):
    return _tirx().And(cast(a, "bool"), cast(b, "bool"))


@_binary(OpKind.OR)
def _or(a, b, at, cd):
    return _tirx().Or(cast(a, "bool"), cast(b, "bool"))


@_binary(OpKind.DIV)
def _div(a, b, at: A.DivAttrs, cd):
    tirx = _tirx()
    if at.rounding is A.Rounding.NONE:
        return a / b
    if not is_float(cd):
        # torch raises on an integer division by zero; generated code would trap (SIGFPE)
        raise Unsupported("integer division")
    return (tirx.trunc if at.rounding is A.Rounding.TRUNC else tirx.floor)(a / b)


@_binary(OpKind.POW)
def _pow(a, b, at, cd):
    if not is_float(cd):
        raise Unsupported("integer pow")
    return _tirx().power(a, b)


def _extreme(pick_a):
    def f(a, b, at, cd):
        tirx = _tirx()
        m = tirx.Select(pick_a(a, b), a, b)
        if is_float(cd):  # torch.maximum/minimum propagate NaN from either side
            m = tirx.Select(tirx.isnan(a), a, tirx.Select(tirx.isnan(b), b, m))
        return m
    return f


_binary(OpKind.MAXIMUM)(_extreme(lambda a, b: a > b))
_binary(OpKind.MINIMUM)(_extreme(lambda a, b: a < b))
