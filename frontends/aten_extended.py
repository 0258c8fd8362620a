"""More ATen -> Kiln IR converters (elementwise, reductions, normalizations): what the model
suite (``kiln bench suite``) and PyTorch's Core ATen opset need beyond ``aten_converters.py``.

Each converter is an exact decomposition into Kiln ops — the same arithmetic torch does, up
to rounding order — or declines (returns None), leaving a named FALLBACK. Registered in the
one ``CONVERTERS`` table; an overload-specific entry (``aten.min.other``) takes precedence
over the packet's (``aten.min``).
"""
from __future__ import annotations

import math
import operator

import torch

from kiln.ir import DType, OpKind, Value
from kiln.ir import attrs as A

from .aten_converters import CONVERTERS

aten = torch.ops.aten
conv = CONVERTERS.register


# ----------------------------------------------------------------------------- helpers
def _ax(d: int, rank: int) -> int:
    return d % max(rank, 1)


def _axes(dims, rank: int) -> tuple[int, ...]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted({_ax(d, rank) for d in dims}))


def _v(cx, x, like: Value | None = None) -> Value:
    """A Value for a tensor or a Python scalar (typed as torch types scalar operands)."""
    return x if isinstance(x, Value) else cx.scalar(x, like)


def _bin(cx, k: OpKind, a, b):
    if not isinstance(a, Value):
        a = cx.scalar(a, b if isinstance(b, Value) else None)
    return cx.add(k, a, _v(cx, b, a))


def _float(cx, x: Value) -> Value:
    return x if x.dtype.is_float else cx.cast(x, DType.FLOAT32)


def _reduce(cx, k: OpKind, x: Value, axes, keep: bool) -> Value:
    if x.type.rank == 0:
        return x  # reducing a 0-d tensor over "its" dim 0 / -1 is the tensor itself
    return cx.add(k, x, attrs=A.ReduceAttrs(tuple(axes), bool(keep)))


def _numel(shape, axes) -> int:
    return math.prod(int(shape[a]) for a in axes)


# ----------------------------------------------------------------------------- aliases
_ALIASES = {aten.multiply: aten.mul, aten.subtract: aten.sub, aten.divide: aten.div, aten.true_divide: aten.div,
            aten.greater: aten.gt, aten.greater_equal: aten.ge, aten.less: aten.lt, aten.less_equal: aten.le,
            aten.not_equal: aten.ne, aten.clip: aten.clamp, aten.absolute: aten.abs, aten.negative: aten.neg,
            aten.arccos: aten.acos, aten.arcsin: aten.asin, aten.arctan: aten.atan, aten.arccosh: aten.acosh,
            aten.arcsinh: aten.asinh, aten.arctanh: aten.atanh, aten.arctan2: aten.atan2}
for _alias, _of in _ALIASES.items():
    conv(_alias)(CONVERTERS.table[_of])


@conv(aten.min.other, aten.max.other, aten.fmin.default, aten.fmax.default)
def _min_max_other(cx, args, kw, n):
    name = str(n.target)
    if "fm" in name and any(isinstance(a, Value) and a.dtype.is_float for a in args):
        return None  # fmin/fmax ignore NaN where minimum/maximum propagate it
    return _bin(cx, OpKind.MINIMUM if "min" in name else OpKind.MAXIMUM, args[0], args[1])


# ----------------------------------------------------------------------------- elementwise composites
def _clamp(cx, x, lo, hi):
    return cx.add(OpKind.CLAMP, x, attrs=A.ClampAttrs(lo, hi))


@conv(aten.hardswish)
def _hardswish(cx, args, kw, n):
    x = args[0]  # x * min(max(x + 3, 0), 6) / 6, torch's own formula
    return _bin(cx, OpKind.DIV, _bin(cx, OpKind.MUL, x, _clamp(cx, _bin(cx, OpKind.ADD, x, 3.0), 0.0, 6.0)), 6.0)


@conv(aten.hardsigmoid)
def _hardsigmoid(cx, args, kw, n):
    return _bin(cx, OpKind.DIV, _clamp(cx, _bin(cx, OpKind.ADD, args[0], 3.0), 0.0, 6.0), 6.0)


@conv(aten.relu6)
def _relu6(cx, args, kw, n):
    return _clamp(cx, args[0], 0.0, 6.0)


def _softplus_value(cx, x, beta=1.0, threshold=20.0):
    bx = x if beta == 1 else _bin(cx, OpKind.MUL, x, beta)
    soft = cx.add(OpKind.LOG, _bin(cx, OpKind.ADD, cx.add(OpKind.EXP, bx), 1.0))
    if beta != 1:
        soft = _bin(cx, OpKind.DIV, soft, beta)
    return cx.add(OpKind.WHERE, _bin(cx, OpKind.GT, bx, threshold), x, soft)


@conv(aten.softplus)
def _softplus(cx, args, kw, n):
    beta = args[1] if len(args) > 1 else kw.get("beta", 1.0)
    threshold = args[2] if len(args) > 2 else kw.get("threshold", 20.0)
    if not args[0].dtype.is_float:
        return None
    return _softplus_value(cx, args[0], float(beta), float(threshold))


@conv(aten.mish)
def _mish(cx, args, kw, n):
    x = args[0]
    return _bin(cx, OpKind.MUL, x, cx.add(OpKind.TANH, _softplus_value(cx, x)))


@conv(aten.log_sigmoid_forward, aten.log_sigmoid)
def _log_sigmoid(cx, args, kw, n):
    x = args[0]  # min(x, 0) - log(1 + exp(-|x|))
    if not x.dtype.is_float:
        return None
    y = _bin(cx, OpKind.SUB, _bin(cx, OpKind.MINIMUM, x, 0.0),
             cx.add(OpKind.LOG, _bin(cx, OpKind.ADD, cx.add(OpKind.EXP, cx.add(OpKind.NEG, cx.add(OpKind.ABS, x))), 1.0)))
    if n.target.overloadpacket is aten.log_sigmoid_forward:
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in n.users):
            return None  # the backward buffer is read: let torch compute it
        return y, None
    return y


@conv(aten.elu)
def _elu(cx, args, kw, n):
    x = args[0]
    alpha, scale, in_scale = (list(args[1:4]) + [1.0, 1.0, 1.0])[:3]
    alpha, scale, in_scale = kw.get("alpha", alpha), kw.get("scale", scale), kw.get("input_scale", in_scale)
    neg = _bin(cx, OpKind.SUB, cx.add(OpKind.EXP, _bin(cx, OpKind.MUL, x, float(in_scale))), 1.0)
    neg = _bin(cx, OpKind.MUL, neg, float(alpha) * float(scale))
    return cx.add(OpKind.WHERE, _bin(cx, OpKind.GT, x, 0.0), _bin(cx, OpKind.MUL, x, float(scale)), neg)


@conv(aten.selu)
def _selu(cx, args, kw, n):
    return _elu(cx, [args[0], 1.6732632423543772848170429916717, 1.0507009873554804934193349852946], {}, n)


@conv(aten.celu)
def _celu(cx, args, kw, n):
    alpha = float(args[1] if len(args) > 1 else kw.get("alpha", 1.0))
    return _elu(cx, [args[0], alpha, 1.0, 1.0 / alpha], {}, n)


@conv(aten.rrelu)
def _rrelu(cx, args, kw, n):
    get = lambda i, name, default: args[i] if len(args) > i else kw.get(name, default)  # noqa: E731
    lower, upper, training = get(1, "lower", 1 / 8), get(2, "upper", 1 / 3), get(3, "training", False)
    if training:
        return None  # random slopes
    return cx.add(OpKind.LEAKY_RELU, args[0], attrs=A.LeakyReluAttrs((float(lower) + float(upper)) / 2))


@conv(aten.threshold)
def _threshold(cx, args, kw, n):
    x, th, value = args[:3]
    return cx.add(OpKind.WHERE, _bin(cx, OpKind.GT, x, th), x, cx.cast(_v(cx, value, x), x.dtype))


@conv(aten.hardshrink)
def _hardshrink(cx, args, kw, n):
    x, lambd = args[0], float(args[1]) if len(args) > 1 else 0.5
    keep = _bin(cx, OpKind.GT, cx.add(OpKind.ABS, x), lambd)
    return cx.add(OpKind.WHERE, keep, x, cx.cast(cx.scalar(0.0, x), x.dtype))


@conv(aten.softshrink)
def _softshrink(cx, args, kw, n):
    x, lambd = args[0], float(args[1]) if len(args) > 1 else 0.5
    zero = cx.cast(cx.scalar(0.0, x), x.dtype)
    low = cx.add(OpKind.WHERE, _bin(cx, OpKind.LT, x, -lambd), _bin(cx, OpKind.ADD, x, lambd), zero)
    return cx.add(OpKind.WHERE, _bin(cx, OpKind.GT, x, lambd), _bin(cx, OpKind.SUB, x, lambd), low)


@conv(aten._prelu_kernel, aten.prelu)
def _prelu(cx, args, kw, n):
    x, w = args[:2]
    if x.type.rank >= 2 and w.type.rank == 1 and w.shape[0] > 1:
        w = cx.reshape(w, [w.shape[0]] + [1] * (x.type.rank - 2))
    return cx.add(OpKind.WHERE, _bin(cx, OpKind.GT, x, 0.0), x, cx.add(OpKind.MUL, x, w))


@conv(aten.glu)
def _glu(cx, args, kw, n):
    x = args[0]
    d = _ax(args[1] if len(args) > 1 else kw.get("dim", -1), x.type.rank)
    h = x.shape[d] // 2
    a = cx.add(OpKind.SLICE, x, attrs=A.SliceAttrs(d, 0, h, 1))
    b = cx.add(OpKind.SLICE, x, attrs=A.SliceAttrs(d, h, 2 * h, 1))
    return cx.add(OpKind.MUL, a, cx.add(OpKind.SIGMOID, b))


def _unary_float(fn):
    def f(cx, args, kw, n):
        return fn(cx, _float(cx, args[0]))
    return f


_LN2, _LN10 = math.log(2.0), math.log(10.0)
for _t, _fn in {
    aten.expm1: lambda cx, x: _bin(cx, OpKind.SUB, cx.add(OpKind.EXP, x), 1.0),
    aten.log1p: lambda cx, x: cx.add(OpKind.LOG, _bin(cx, OpKind.ADD, x, 1.0)),
    aten.log2: lambda cx, x: _bin(cx, OpKind.DIV, cx.add(OpKind.LOG, x), _LN2),
    aten.log10: lambda cx, x: _bin(cx, OpKind.DIV, cx.add(OpKind.LOG, x), _LN10),
    aten.exp2: lambda cx, x: cx.add(OpKind.EXP, _bin(cx, OpKind.MUL, x, _LN2)),
    aten.tan: lambda cx, x: cx.add(OpKind.DIV, cx.add(OpKind.SIN, x), cx.add(OpKind.COS, x)),
    aten.erfc: lambda cx, x: _bin(cx, OpKind.SUB, 1.0, cx.add(OpKind.ERF, x)),
    aten.sinh: lambda cx, x: _bin(cx, OpKind.DIV, cx.add(OpKind.SUB, cx.add(OpKind.EXP, x),
                                                          cx.add(OpKind.EXP, cx.add(OpKind.NEG, x))), 2.0),
    aten.cosh: lambda cx, x: _bin(cx, OpKind.DIV, cx.add(OpKind.ADD, cx.add(OpKind.EXP, x),
                                                          cx.add(OpKind.EXP, cx.add(OpKind.NEG, x))), 2.0),
}.items():
    conv(_t)(_unary_float(_fn))


@conv(aten.square)
def _square(cx, args, kw, n):
    x = args[0]
    if x.dtype is DType.BOOL:
        return None  # torch squares booleans into int64
    return cx.add(OpKind.MUL, x, x)


@conv(aten.round.decimals)
def _round_decimals(cx, args, kw, n):
    x = args[0]
    d = int(kw.get("decimals", args[1] if len(args) > 1 else 0))
    if d == 0 or not x.dtype.is_float:
        return cx.add(OpKind.ROUND, x)
    if x.dtype not in (DType.FLOAT32, DType.FLOAT64):
        return None  # torch's 16-bit kernels scale in float32: not this arithmetic
    # torch's own formula: nearbyint(x * 10^d) / 10^d, or nearbyint(x / 10^-d) * 10^-d for d < 0,
    # with 10^|d| in the tensor's dtype
    p = float(10.0 ** abs(d))
    if d > 0:
        return _bin(cx, OpKind.DIV, cx.add(OpKind.ROUND, _bin(cx, OpKind.MUL, x, p)), p)
    return _bin(cx, OpKind.MUL, cx.add(OpKind.ROUND, _bin(cx, OpKind.DIV, x, p)), p)


@conv(aten.sgn)
def _sgn(cx, args, kw, n):
    return cx.add(OpKind.SIGN, args[0])


def _trunc_value(cx, x):
    if not x.dtype.is_float:
        return x
    return cx.add(OpKind.WHERE, _bin(cx, OpKind.LT, x, 0.0), cx.add(OpKind.CEIL, x), cx.add(OpKind.FLOOR, x))


@conv(aten.trunc)
def _trunc(cx, args, kw, n):
    return _trunc_value(cx, args[0])


@conv(aten.frac)
def _frac(cx, args, kw, n):
    return cx.add(OpKind.SUB, args[0], _trunc_value(cx, args[0]))


def _truth(cx, x):
    return x if x.dtype is DType.BOOL else _bin(cx, OpKind.NE, x, 0)


@conv(aten.logical_xor)
def _logical_xor(cx, args, kw, n):
    return cx.add(OpKind.NE, _truth(cx, args[0]), _truth(cx, _v(cx, args[1], args[0])))


@conv(aten.__xor__, aten.bitwise_xor)
def _bool_xor(cx, args, kw, n):
    if any(isinstance(v, Value) and v.dtype is not DType.BOOL for v in args[:2]):
        return None  # integer bitwise ops are not Kiln ops
    return cx.add(OpKind.NE, args[0], _v(cx, args[1], args[0]))


def _isinf_value(cx, x, sign=0):
    if not x.dtype.is_float:
        return cx.literal(torch.zeros(tuple(x.shape), dtype=torch.bool))
    if sign == 0:
        return _bin(cx, OpKind.EQ, cx.add(OpKind.ABS, x), math.inf)
    return _bin(cx, OpKind.EQ, x, math.inf * sign)


conv(aten.fix)(_trunc)
conv(aten.isinf)(lambda cx, args, kw, n: _isinf_value(cx, args[0]))
conv(aten.isposinf)(lambda cx, args, kw, n: _isinf_value(cx, args[0], 1))
conv(aten.isneginf)(lambda cx, args, kw, n: _isinf_value(cx, args[0], -1))


@conv(aten.isfinite)
def _isfinite(cx, args, kw, n):
    x = args[0]
    if not x.dtype.is_float:
        return cx.literal(torch.ones(tuple(x.shape), dtype=torch.bool))
    bad = cx.add(OpKind.OR, cx.add(OpKind.ISNAN, x), _isinf_value(cx, x))
    return cx.add(OpKind.NOT, bad)


@conv(aten.addcmul, aten.addcdiv)
def _addc(cx, args, kw, n):
    x, t1, t2 = args[:3]
    value = kw.get("value", args[3] if len(args) > 3 else 1)
    k = OpKind.MUL if n.target.overloadpacket is aten.addcmul else OpKind.DIV
    if k is OpKind.DIV and not (t1.dtype.is_float or t2.dtype.is_float):
        return None  # integer addcdiv is an error in torch
    prod = cx.add(k, t1, t2)
    if value != 1:
        prod = _bin(cx, OpKind.MUL, prod, value)
    return cx.add(OpKind.ADD, x, prod)


@conv(aten.lerp)
def _lerp(cx, args, kw, n):
    a, b, w = args[:3]  # a + w * (b - a)
    return cx.add(OpKind.ADD, a, _bin(cx, OpKind.MUL, w, cx.add(OpKind.SUB, b, a)))


@conv(aten.clamp.Tensor, aten.clamp_min, aten.clamp_max, aten.clip.Tensor)
def _clamp_tensor(cx, args, kw, n):
    x = args[0]
    packet = n.target.overloadpacket
    if packet is aten.clamp_min:
        lo, hi = args[1], None
    elif packet is aten.clamp_max:
        lo, hi = None, args[1]
    else:
        lo = args[1] if len(args) > 1 else kw.get("min")
        hi = args[2] if len(args) > 2 else kw.get("max")
    if not isinstance(lo, Value) and not isinstance(hi, Value):
        if not x.dtype.is_float and any(b is not None and float(b) != int(b) for b in (lo, hi)):
            return None  # a fractional bound promotes an integer tensor to float
        return _clamp(cx, x, None if lo is None else float(lo), None if hi is None else float(hi))
    y = x
    if lo is not None:
        y = _bin(cx, OpKind.MAXIMUM, y, lo)
    if hi is not None:
        y = _bin(cx, OpKind.MINIMUM, y, hi)
    return y


@conv(aten.remainder, aten.fmod)
def _remainder(cx, args, kw, n):
    a, b = args[:2]
    if any(isinstance(v, Value) and v.dtype.is_float for v in (a, b)) or isinstance(b, float):
        return None  # torch's float remainder rounds differently from a - b * floor(a / b)
    if isinstance(b, Value) is False and b == 0:
        return None
    mode = A.Rounding.FLOOR if n.target.overloadpacket is aten.remainder else A.Rounding.TRUNC
    a = _v(cx, a, b if isinstance(b, Value) else None)
    b = _v(cx, b, a)
    q = cx.add(OpKind.DIV, a, b, attrs=A.DivAttrs(mode))
    return cx.add(OpKind.SUB, a, cx.add(OpKind.MUL, q, b))


# ----------------------------------------------------------------------------- reductions
@conv(aten.cumsum)
def _cumsum(cx, args, kw, n):
    x = args[0]
    dim = args[1] if len(args) > 1 else kw["dim"]
    dtype = kw.get("dtype", args[2] if len(args) > 2 else None)
    if dtype is not None:
        x = cx.cast(x, DType.from_torch(dtype))
    return cx.add(OpKind.CUMSUM, x, attrs=A.AxisAttrs(_ax(dim, x.type.rank)))


def _reduce_args(args, kw, rank):
    dims = args[1] if len(args) > 1 else kw.get("dim")
    keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
    return _axes(dims, rank), bool(keep)


@conv(aten.amax, aten.amin)
def _amax(cx, args, kw, n):
    x = args[0]
    axes, keep = _reduce_args(args, kw, x.type.rank)
    return _reduce(cx, OpKind.MAX if n.target.overloadpacket is aten.amax else OpKind.MIN, x, axes, keep)


@conv(aten.max.default, aten.min.default)
def _max_all(cx, args, kw, n):
    x = args[0]
    return _reduce(cx, OpKind.MAX if "max" in str(n.target) else OpKind.MIN, x, range(x.type.rank), False)


@conv(aten.prod)
def _prod(cx, args, kw, n):
    x = args[0]
    dtype = kw.get("dtype")
    if n.target._overloadname == "default":
        axes, keep = tuple(range(x.type.rank)), False
    else:
        axes, keep = (_ax(args[1], x.type.rank),), bool(args[2] if len(args) > 2 else kw.get("keepdim", False))
    if dtype is not None:
        x = cx.cast(x, DType.from_torch(dtype))
    elif not x.dtype.is_float:
        x = cx.cast(x, DType.INT64)  # torch multiplies integers and booleans in int64
    return _reduce(cx, OpKind.PROD, x, axes, keep)


def _argmin_value(cx, x, axis, keep):
    if x.dtype.is_float:
        return cx.add(OpKind.ARGMAX, cx.add(OpKind.NEG, x), attrs=A.ArgReduceAttrs(axis, keep))
    # integers: the first position equal to the minimum (negating could overflow)
    hit = cx.cast(cx.add(OpKind.EQ, x, _reduce(cx, OpKind.MIN, x, (axis,), True)), DType.INT64)
    return cx.add(OpKind.ARGMAX, hit, attrs=A.ArgReduceAttrs(axis, keep))


@conv(aten.max.dim, aten.min.dim)
def _max_dim(cx, args, kw, n):
    x, dim = args[0], args[1]
    keep = bool(args[2] if len(args) > 2 else kw.get("keepdim", False))
    if x.type.rank == 0:
        return x, cx.literal(torch.tensor(0))
    axis = _ax(dim, x.type.rank)
    if x.dtype is DType.BOOL:
        return None
    if "max" in str(n.target):
        return (_reduce(cx, OpKind.MAX, x, (axis,), keep),
                cx.add(OpKind.ARGMAX, x, attrs=A.ArgReduceAttrs(axis, keep)))
    return _reduce(cx, OpKind.MIN, x, (axis,), keep), _argmin_value(cx, x, axis, keep)


@conv(aten.argmin)
def _argmin(cx, args, kw, n):
    x = args[0]
    dim = args[1] if len(args) > 1 else kw.get("dim")
    keep = bool(args[2] if len(args) > 2 else kw.get("keepdim", False))
    if x.dtype is DType.BOOL:
        return None
    if dim is None:
        x, dim, keep_shape = cx.reshape(x, (-1,)), 0, keep
        out = _argmin_value(cx, x, 0, False)
        return cx.reshape(out, [1] * len(args[0].shape)) if keep_shape else out
    if x.type.rank == 0:
        return cx.literal(torch.tensor(0))
    return _argmin_value(cx, x, _ax(dim, x.type.rank), keep)


def _var_value(cx, x, axes, correction, keep):
    x = _float(cx, x)
    if x.type.rank == 0:
        axes = ()
    mean = _reduce(cx, OpKind.MEAN, x, axes, True) if axes else x
    d = cx.add(OpKind.SUB, x, mean)
    s = _reduce(cx, OpKind.SUM, cx.add(OpKind.MUL, d, d), axes, keep) if axes else cx.add(OpKind.MUL, d, d)
    denom = max(0.0, float(_numel(x.shape, axes)) - float(correction))
    return _bin(cx, OpKind.DIV, s, denom), (mean if keep or not axes else _reduce(cx, OpKind.MEAN, x, axes, False))


def _var_args(args, kw, rank, overload: str):
    """(axes, correction, keepdim) of var/std[_mean].{default, dim, correction}."""
    if overload == "default":
        unbiased = args[1] if len(args) > 1 else kw.get("unbiased", True)
        return _axes(None, rank), (1 if unbiased else 0), False
    if overload == "dim":
        unbiased = args[2] if len(args) > 2 else kw.get("unbiased", True)
        keep = args[3] if len(args) > 3 else kw.get("keepdim", False)
        return _axes(args[1], rank), (1 if unbiased else 0), bool(keep)
    if overload == "correction":
        corr = kw.get("correction")
        return _axes(args[1] if len(args) > 1 else kw.get("dim"), rank), (1 if corr is None else corr), \
            bool(kw.get("keepdim", False))
    return None


@conv(aten.var, aten.std, aten.var_mean, aten.std_mean)
def _var(cx, args, kw, n):
    x = args[0]
    if not x.dtype.is_float:
        return None
    parsed = _var_args(args, kw, x.type.rank, n.target._overloadname)
    if parsed is None:
        return None
    axes, corr, keep = parsed
    var, mean = _var_value(cx, x, axes, corr, keep)
    packet = n.target.overloadpacket
    out = cx.add(OpKind.SQRT, var) if packet in (aten.std, aten.std_mean) else var
    return (out, mean) if packet in (aten.var_mean, aten.std_mean) else out


@conv(aten.any, aten.all)
def _any_all(cx, args, kw, n):
    x = args[0]
    dims = args[1] if len(args) > 1 else kw.get("dim")
    keep = bool(args[2] if len(args) > 2 else kw.get("keepdim", False))
    if x.type.rank == 0:
        dims = None
    axes = _axes(dims, x.type.rank)
    truth = _truth(cx, x)
    is_all = n.target.overloadpacket is aten.all
    if is_all:
        truth = cx.add(OpKind.NOT, truth)
    if x.type.rank == 0:
        hit = truth
    else:
        hit = _bin(cx, OpKind.GT, _reduce(cx, OpKind.SUM, cx.cast(truth, DType.INT64), axes, keep), 0)
    out = cx.add(OpKind.NOT, hit) if is_all else hit
    return cx.cast(out, DType.UINT8) if x.dtype is DType.UINT8 else out


@conv(aten.logsumexp)
def _logsumexp(cx, args, kw, n):
    x = _float(cx, args[0])
    axes, keep = _reduce_args(args, kw, x.type.rank)
    if x.type.rank == 0:
        return x
    m = _reduce(cx, OpKind.MAX, x, axes, True)
    m = cx.add(OpKind.WHERE, _isinf_value(cx, m), cx.cast(cx.scalar(0.0, m), m.dtype), m)  # all -inf rows
    s = cx.add(OpKind.LOG, _reduce(cx, OpKind.SUM, cx.add(OpKind.EXP, cx.add(OpKind.SUB, x, m)), axes, keep))
    return cx.add(OpKind.ADD, s, m if keep else cx.reshape(m, [d for i, d in enumerate(m.shape) if i not in axes]))


@conv(aten.linalg_vector_norm)
def _vector_norm(cx, args, kw, n):
    x = args[0]
    ord_ = args[1] if len(args) > 1 else kw.get("ord", 2)
    dims = args[2] if len(args) > 2 else kw.get("dim")
    keep = bool(args[3] if len(args) > 3 else kw.get("keepdim", False))
    dtype = kw.get("dtype")
    if dtype is not None:
        x = cx.cast(x, DType.from_torch(dtype))
    if not x.dtype.is_float:
        return None
    return _norm_value(cx, x, float(ord_), _axes(dims, x.type.rank) if x.type.rank else (), keep)


def _norm_value(cx, x, p: float, axes, keep):
    red = (lambda k, v: _reduce(cx, k, v, axes, keep)) if axes else (lambda k, v: v)
    if p == 2:
        return cx.add(OpKind.SQRT, red(OpKind.SUM, cx.add(OpKind.MUL, x, x)))
    a = cx.add(OpKind.ABS, x)
    if p == 1:
        return red(OpKind.SUM, a)
    if p == math.inf:
        return red(OpKind.MAX, a)
    if p == -math.inf:
        return red(OpKind.MIN, a)
    if p == 0:
        return red(OpKind.SUM, cx.cast(_bin(cx, OpKind.NE, x, 0.0), x.dtype))
    return _bin(cx, OpKind.POW, red(OpKind.SUM, _bin(cx, OpKind.POW, a, p)), 1.0 / p)


@conv(aten.native_dropout)
def _native_dropout(cx, args, kw, n):
    x, p, train = args[0], args[1], args[2] if len(args) > 2 else kw.get("train")
    if train and p > 0:
        return None  # random: not inference
    return x, cx.literal(torch.ones(tuple(x.shape), dtype=torch.bool))


# ----------------------------------------------------------------------------- normalizations
def _per_channel(cx, x: Value, c: Value | None) -> Value | None:
    if c is None:
        return None
    return cx.reshape(c, [c.shape[0]] + [1] * (x.type.rank - 2)) if x.type.rank > 2 else c


def _affine(cx, x, w, b):
    if w is not None:
        x = cx.add(OpKind.MUL, x, _per_channel(cx, x, w))
    if b is not None:
        x = cx.add(OpKind.ADD, x, _per_channel(cx, x, b))
    return x


def _group_norm_value(cx, x, groups: int, w, b, eps: float):
    n_, c = x.shape[0], x.shape[1]
    if x.type.rank == 4 and groups > 1 and isinstance(c, int) and c % groups == 0:
        # an image's group norm stays one op: Kiln's channels-last kernel (kernels/norm_cpu.py)
        # reads the image as it lies, where the layer norm below over each group's NCHW-ordered
        # elements would read it across the grain (few channels per group: one or two per
        # cache line). With one group it is a layer norm over (C, H, W), which the generated
        # kernels do well.
        ins = [x, w, b]
        while ins[-1] is None:
            ins.pop()
        return cx.add(OpKind.GROUP_NORM, *ins, attrs=A.GroupNormAttrs(groups, eps))
    y = cx.reshape(x, (n_, groups, -1))
    # normalizing each group's elements is a layer norm over the flattened group (biased variance)
    y = cx.add(OpKind.LAYER_NORM, y, attrs=A.LayerNormAttrs(1, float(eps)))
    return _affine(cx, cx.reshape(y, x.shape), w, b)


@conv(aten.group_norm)
def _group_norm(cx, args, kw, n):
    x, groups = args[0], int(args[1])
    w = args[2] if len(args) > 2 else kw.get("weight")
    b = args[3] if len(args) > 3 else kw.get("bias")
    eps = args[4] if len(args) > 4 else kw.get("eps", 1e-5)
    if x.type.rank < 2 or not x.dtype.is_float:
        return None
    return _group_norm_value(cx, x, groups, w, b, float(eps))


def _stats(cx, x, axes, eps):
    """(mean, 1/sqrt(biased var + eps)) over ``axes``, kept as size-1 dims."""
    mean = _reduce(cx, OpKind.MEAN, x, axes, True)
    d = cx.add(OpKind.SUB, x, mean)
    var = _reduce(cx, OpKind.MEAN, cx.add(OpKind.MUL, d, d), axes, True)
    return mean, cx.add(OpKind.RSQRT, _bin(cx, OpKind.ADD, var, float(eps))), d


@conv(aten.native_group_norm)
def _native_group_norm(cx, args, kw, n):
    x, w, b, n_, c, hw, groups, eps = args
    if not x.dtype.is_float:
        return None
    y = _group_norm_value(cx, x, int(groups), w, b, float(eps))
    g = cx.reshape(x, (int(n_), int(groups), -1))
    mean, rstd, _ = _stats(cx, g, (2,), eps)
    return y, cx.reshape(mean, (int(n_), int(groups))), cx.reshape(rstd, (int(n_), int(groups)))


@conv(aten.native_layer_norm)
def _native_layer_norm(cx, args, kw, n):
    x, shape, w, b, eps = args
    k = len(shape)
    ins = [x, w, b]
    while ins and ins[-1] is None:
        ins.pop()
    if w is None and b is not None:
        return None
    y = cx.add(OpKind.LAYER_NORM, *ins, attrs=A.LayerNormAttrs(k, float(eps)))
    axes = tuple(range(x.type.rank - k, x.type.rank))
    mean, rstd, _ = _stats(cx, x, axes, eps)
    return y, mean, rstd


def _batch_stats_norm(cx, x, w, b, eps):
    """Batch norm with the batch's own statistics (training=True): over every dim but 1."""
    axes = tuple(d for d in range(x.type.rank) if d != 1)
    mean, rstd, d = _stats(cx, x, axes, eps)
    y = _affine(cx, cx.add(OpKind.MUL, d, rstd), w, b)
    c = x.shape[1]
    return y, cx.reshape(mean, (c,)), cx.reshape(rstd, (c,))


@conv(aten._native_batch_norm_legit.no_stats)
def _bn_no_stats(cx, args, kw, n):
    x, w, b, training, _momentum, eps = args
    if not x.dtype.is_float:
        return None
    return _batch_stats_norm(cx, x, w, b, eps)


@conv(aten._native_batch_norm_legit.default, aten.native_batch_norm.default)
def _bn_legit(cx, args, kw, n):
    x, w, b, mean, var, training, _momentum, eps = args
    if not x.dtype.is_float:
        return None
    if training:
        if mean is not None:
            return None  # training updates the running statistics: a mutation, not inference
        return _batch_stats_norm(cx, x, w, b, eps)
    if mean is None:
        return None
    y = cx.add(OpKind.BATCH_NORM, x, mean, var, w, b, attrs=A.BatchNormAttrs(float(eps)))
    return (y,) + _meta_zeros(cx, n, 1)  # eval mode saves no statistics: torch returns empty tensors


def _meta_zeros(cx, n, start: int) -> tuple:
    """Literal zeros shaped as torch.export recorded outputs ``start..`` of ``n`` (the empty
    statistics tensors an eval-mode norm returns)."""
    vals = n.meta.get("val")
    out = []
    for v in list(vals)[start:]:
        out.append(cx.literal(torch.zeros(tuple(v.shape), dtype=v.dtype)) if isinstance(v, torch.Tensor) else None)
    return tuple(out)


@conv(aten._native_batch_norm_legit_no_training.default)
def _bn_no_training(cx, args, kw, n):
    x, w, b, mean, var, _momentum, eps = args
    y = cx.add(OpKind.BATCH_NORM, x, mean, var, w, b, attrs=A.BatchNormAttrs(float(eps)))
    return (y,) + _meta_zeros(cx, n, 1)


_bn_eval = CONVERTERS.table.get(aten.batch_norm)


@conv(aten.batch_norm.default)
def _batch_norm(cx, args, kw, n):
    x, w, b, mean, var, training, _m, eps = args[:8]
    if training and mean is None and x.dtype.is_float:
        return _batch_stats_norm(cx, x, w, b, eps)[0]
    return _bn_eval(cx, args, kw, n) if _bn_eval is not None else None


@conv(aten._weight_norm)
def _weight_norm(cx, args, kw, n):
    v, g = args[0], args[1]
    dim = args[2] if len(args) > 2 else kw.get("dim", 0)
    r = v.type.rank
    axes = tuple(range(r)) if dim == -1 else tuple(a for a in range(r) if a != _ax(dim, r))
    norm = _norm_value(cx, v, 2.0, axes, True) if axes else cx.add(OpKind.ABS, v)
    return cx.add(OpKind.MUL, v, cx.add(OpKind.DIV, g, norm))
