"""Algebraic simplification: identities and movement-op chains.

Every rule here is exact: the rewritten graph computes bit-identical results. Rules that
would change a value's dtype or shape (``x + zeros`` that broadcasts) decline.
"""
from __future__ import annotations

from kiln.ir import OpKind
from kiln.ir import attrs as A

from .pattern import true_div
from .pattern import Const, P, is_scalar_const


def _same_type(m, rw, keep: str):
    """Replace the root by ``m[keep]`` when that is type-identical to the root's output."""
    v, root = m[keep], m.root.outputs[0]
    if (v.type.dtype, v.type.shape) != (root.type.dtype, root.type.shape):
        return None
    return v


def _compose_permutes(m, rw):
    inner, outer = m.node("inner").attrs.perm, m.root.attrs.perm
    perm = tuple(inner[p] for p in outer)
    if perm == tuple(range(len(perm))):
        return m["x"]
    return rw.add(OpKind.PERMUTE, m["x"], attrs=A.PermuteAttrs(perm))


def _reshape_chain(m, rw):
    target = m.root.attrs.shape
    if tuple(target) == tuple(m["x"].shape):
        return m["x"]
    return rw.add(OpKind.RESHAPE, m["x"], attrs=A.ShapeAttrs(target))


def _identity_slice(n):
    a = n.attrs
    return a.start == 0 and a.step == 1 and a.end == n.inputs[0].shape[a.axis]


def _square(m, rw):
    """pow(x, 2) -> x * x for float x: torch squares by one multiply too (both are the
    correctly rounded square), and a multiply fuses and vectorizes where a generated kernel
    would call the scalar libm ``powf`` per element (RMSNorm's ``x.pow(2).mean(-1)``)."""
    x, out = m["x"], m.root.outputs[0]
    if not x.dtype.is_float or (x.type.dtype, x.type.shape) != (out.type.dtype, out.type.shape):
        return None
    return rw.add(OpKind.MUL, x, x)


zero, one, two = is_scalar_const(0.0), is_scalar_const(1.0), is_scalar_const(2.0)

RULES = [
    (P(OpKind.IDENTITY, "x"), lambda m, rw: m["x"]),
    (P(OpKind.ADD, "x", Const(where=zero), commutative=True), lambda m, rw: _same_type(m, rw, "x")),
    (P(OpKind.SUB, "x", Const(where=zero)), lambda m, rw: _same_type(m, rw, "x")),
    (P(OpKind.MUL, "x", Const(where=one), commutative=True), lambda m, rw: _same_type(m, rw, "x")),
    (P(OpKind.DIV, "x", Const(where=one), where=true_div), lambda m, rw: _same_type(m, rw, "x")),
    (P(OpKind.POW, "x", Const(where=two)), _square),
    (P(OpKind.RESHAPE, "x", where=lambda n: tuple(n.attrs.shape) == tuple(n.inputs[0].shape)), lambda m, rw: m["x"]),
    (P(OpKind.RESHAPE, P(OpKind.RESHAPE, "x")), _reshape_chain),
    (P(OpKind.PERMUTE, "x", where=lambda n: n.attrs.perm == tuple(range(len(n.attrs.perm)))), lambda m, rw: m["x"]),
    (P(OpKind.PERMUTE, P(OpKind.PERMUTE, "x", name="inner")), _compose_permutes),
    (P(OpKind.CAST, "x", where=lambda n: n.inputs[0].dtype is n.attrs.dtype), lambda m, rw: m["x"]),
    (P(OpKind.EXPAND, "x", where=lambda n: tuple(n.attrs.shape) == tuple(n.inputs[0].shape)), lambda m, rw: m["x"]),
    (P(OpKind.SLICE, "x", where=_identity_slice), lambda m, rw: m["x"]),
    (P(OpKind.TO_LAYOUT, "x", where=lambda n: n.inputs[0].type.layout == n.attrs.layout), lambda m, rw: m["x"]),
    # padding by nothing (Hugging Face's TF-style "same" padding computes amounts per layer,
    # zero for every 1x1 convolution of MobileNetV1): a copy
    (P(OpKind.PAD, "x", where=lambda n: not any(n.attrs.pads)), lambda m, rw: _same_type(m, rw, "x")),
]
