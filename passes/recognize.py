"""Normalization and activation recognition: GELU (erf and tanh forms), layer norm and
softmax written out as elementwise ops and reductions become the single fused op.

Exporters and hand-written models spell these many ways; the matchers here look through
products (``0.5 * x * (1 + erf(x / sqrt 2))`` in any association and order) rather than
one fixed tree. Each rewrite computes the same function; results agree up to rounding.
"""
from __future__ import annotations

import math

from kiln.ir import OpKind, Value
from kiln.ir import attrs as A

from .pattern import true_div
from .pattern import Const, P, scalar_of

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _scalar(rw, v: Value | None) -> float | None:
    t = rw.constant(v)
    return None if t is None else scalar_of(t)


def _close(a: float | None, b: float, rel: float = 1e-4) -> bool:
    return a is not None and abs(a - b) <= rel * abs(b)


def _factors(rw, v: Value, root: bool = True) -> list[Value]:
    """Leaves of a product tree of MULs (interior products must have no other users)."""
    n = rw.producer(v)
    if n is None or n.op is not OpKind.MUL or (not root and rw.uses(v) != 1):
        return [v]
    return _factors(rw, n.inputs[0], False) + _factors(rw, n.inputs[1], False)


def _op(rw, v, op):
    n = rw.producer(v)
    return n if n is not None and n.op is op else None


def _is_x_over_sqrt2(rw, z: Value, x: Value) -> bool:
    n = rw.producer(z)
    if n is None:
        return False
    if n.op is OpKind.DIV and n.inputs[0] is x and true_div(n):
        return _close(_scalar(rw, n.inputs[1]), SQRT2)
    if n.op is OpKind.MUL:
        a, b = n.inputs
        return (a is x and _close(_scalar(rw, b), 1 / SQRT2)) or (b is x and _close(_scalar(rw, a), 1 / SQRT2))
    return False


def _one_plus(rw, v: Value, op: OpKind):
    """If v = 1 + op(z) (either order), return z."""
    add = _op(rw, v, OpKind.ADD)
    if add is None:
        return None
    for a, b in (add.inputs, reversed(add.inputs)):
        inner = _op(rw, a, op)
        if inner is not None and _close(_scalar(rw, b), 1.0):
            return inner.inputs[0]
    return None


def _is_cube(rw, v: Value, x: Value) -> bool:
    n = rw.producer(v)
    if n is None:
        return False
    if n.op is OpKind.POW:
        return n.inputs[0] is x and _close(_scalar(rw, n.inputs[1]), 3.0)
    if n.op is OpKind.MUL:
        fs = _factors(rw, v)
        return len(fs) == 3 and all(f is x for f in fs)
    return False


def _is_tanh_arg(rw, z: Value, x: Value) -> bool:
    """z = sqrt(2/pi) * (x + 0.044715 * x^3), in either order."""
    fs = _factors(rw, z)
    if len(fs) != 2:
        return False
    for c, inner in (fs, reversed(fs)):
        if not _close(_scalar(rw, c), SQRT_2_OVER_PI):
            continue
        add = _op(rw, inner, OpKind.ADD)
        if add is None:
            continue
        for a, b in (add.inputs, reversed(add.inputs)):
            cf = _factors(rw, b)
            if a is x and len(cf) == 2:
                for k, cube in (cf, reversed(cf)):
                    if _close(_scalar(rw, k), 0.044715) and _is_cube(rw, cube, x):
                        return True
    return False


def _gelu(m, rw):
    fs = _factors(rw, m.root.outputs[0])
    if len(fs) != 3:
        return None
    for half in fs:
        if not _close(_scalar(rw, half), 0.5):
            continue
        rest = [f for f in fs if f is not half]
        for x, poly in (rest, reversed(rest)):
            if not x.dtype.is_float:
                continue
            z = _one_plus(rw, poly, OpKind.ERF)
            if z is not None and _is_x_over_sqrt2(rw, z, x):
                return rw.add(OpKind.GELU, x, attrs=A.GeluAttrs(A.GeluApprox.NONE))
            z = _one_plus(rw, poly, OpKind.TANH)
            if z is not None and _is_tanh_arg(rw, z, x):
                return rw.add(OpKind.GELU, x, attrs=A.GeluAttrs(A.GeluApprox.TANH))
    return None


def _last_axes(n, rank: int) -> int | None:
    """How many trailing axes a keepdim reduction covers (None if not a trailing block)."""
    a = n.attrs
    if not a.keepdim or not a.axes or list(a.axes) != list(range(rank - len(a.axes), rank)):
        return None
    return len(a.axes)


def _layer_norm(m, rw):
    """(x - mean(x)) / sqrt(mean((x - mean)^2) + eps), also with * rsqrt(...)."""
    root = m.root
    d = root.inputs[0]
    denom = root.inputs[1]
    sub = _op(rw, d, OpKind.SUB)
    if sub is None:
        return None
    x, mean = sub.inputs
    mean_n = _op(rw, mean, OpKind.MEAN)
    if mean_n is None or mean_n.inputs[0] is not x:
        return None
    k = _last_axes(mean_n, x.type.rank)
    if k is None:
        return None
    if root.op is OpKind.DIV:
        if not true_div(root):
            return None
        s = _op(rw, denom, OpKind.SQRT)
    else:
        s = _op(rw, denom, OpKind.RSQRT)
    if s is None:
        return None
    add = _op(rw, s.inputs[0], OpKind.ADD)
    if add is None:
        return None
    for var, eps_v in (add.inputs, reversed(add.inputs)):
        eps = _scalar(rw, eps_v)
        var_n = _op(rw, var, OpKind.MEAN)
        if eps is None or var_n is None or _last_axes(var_n, x.type.rank) != k:
            continue
        sq = rw.producer(var_n.inputs[0])
        if sq is None:
            continue
        squares_d = (sq.op is OpKind.POW and sq.inputs[0] is d and _close(_scalar(rw, sq.inputs[1]), 2.0)) or \
                    (sq.op is OpKind.MUL and sq.inputs[0] is d and sq.inputs[1] is d)
        if squares_d:
            return rw.add(OpKind.LAYER_NORM, x, attrs=A.LayerNormAttrs(k, float(eps)))
    return None


def _ln_affine(m, rw):
    ln = m.node("ln")
    param = m["p"]
    norm_shape = tuple(ln.inputs[0].shape[ln.inputs[0].type.rank - ln.attrs.normalized_ndim:])
    t = rw.constant(param)
    if t.dim() > len(norm_shape):
        if any(s != 1 for s in t.shape[:t.dim() - len(norm_shape)]):
            return None
        t = t.reshape(t.shape[t.dim() - len(norm_shape):])
    if tuple(t.shape) != norm_shape or t.dtype != ln.inputs[0].dtype.to_torch():
        return None
    ins = list(ln.inputs) + [None] * (3 - len(ln.inputs))
    if m.root.op is OpKind.MUL:
        if ins[1] is not None or ins[2] is not None:
            return None
        ins[1] = rw.const(t, "ln_w")
    else:
        if ins[2] is not None:
            return None
        ins[2] = rw.const(t, "ln_b")
    while ins and ins[-1] is None:
        ins.pop()
    return rw.add(OpKind.LAYER_NORM, *ins, attrs=ln.attrs)


def _softmax(m, rw):
    """exp(x - max(x)) / sum(exp(x - max(x))) over one axis (the max may be absent)."""
    e, s = m.root.inputs
    exp_n, sum_n = _op(rw, e, OpKind.EXP), _op(rw, s, OpKind.SUM)
    if exp_n is None or sum_n is None or sum_n.inputs[0] is not e:
        return None
    a = sum_n.attrs
    if len(a.axes) != 1 or not a.keepdim:
        return None
    axis = a.axes[0]
    x = exp_n.inputs[0]
    sub = _op(rw, x, OpKind.SUB)
    if sub is not None:
        mx = _op(rw, sub.inputs[1], OpKind.MAX)
        if mx is not None and mx.inputs[0] is sub.inputs[0] and mx.attrs.axes == (axis,) and mx.attrs.keepdim:
            x = sub.inputs[0]
    if not x.dtype.is_float:
        return None
    return rw.add(OpKind.SOFTMAX, x, attrs=A.AxisAttrs(axis))


RULES = [
    (P(OpKind.MUL), _gelu),
    (P((OpKind.DIV, OpKind.MUL)), _layer_norm),
    (P(OpKind.MUL, P(OpKind.LAYER_NORM, name="ln", single_use=True), Const("p"), commutative=True), _ln_affine),
    (P(OpKind.ADD, P(OpKind.LAYER_NORM, name="ln", single_use=True), Const("p"), commutative=True), _ln_affine),
    (P(OpKind.DIV, where=true_div), _softmax),
]
