"""Constant folding (weight-only subgraphs included), conv + batch-norm folding, and zero
padding folded into the convolution that reads it."""
from __future__ import annotations

import dataclasses

import torch

from kiln.ir import OpKind
from kiln.ir import attrs as A
from kiln.ir.reference import evaluate
from kiln.ir.types import has_symbols

from .pattern import Const, Opt, P

# Folding must not bloat the model: an op whose result is much larger than its inputs
# (expand, broadcasting arithmetic) stays in the graph.
GROWTH_LIMIT = 2.0
SLACK_BYTES = 1 << 16


def _fold(m, rw):
    n = m.root
    if n.op is OpKind.FALLBACK or not n.inputs:
        return None
    if has_symbols(n.attrs) or not all(o.type.is_static for o in n.outputs):
        return None  # its size is known only per call
    ins = [None if v is None else rw.constant(v) for v in n.inputs]
    if any(t is None for t, v in zip(ins, n.inputs) if v is not None):
        return None
    in_bytes = sum(t.numel() * t.element_size() for t in ins if t is not None)
    out_bytes = sum(o.type.nbytes() for o in n.outputs if o.type.is_static)
    if out_bytes > GROWTH_LIMIT * in_bytes + SLACK_BYTES:
        return None
    with torch.no_grad():
        r = evaluate(n, ins)
    rs = r if isinstance(r, tuple) else (r,)
    outs = tuple(rw.const(t.contiguous(), "folded") for t in rs)
    return outs if len(outs) > 1 else outs[0]


class _AllConstOperands(P):
    """Matches any node whose operands are all constants (the folding rule's root)."""

    def __init__(self):
        super().__init__(tuple(k for k in OpKind if k is not OpKind.FALLBACK))

    def match(self, v, ctx, m) -> bool:
        n = ctx.producer(v)
        if n is None or n.op is OpKind.FALLBACK:
            return False
        return all(x is None or ctx.constant(x) is not None for x in n.inputs) and bool(n.inputs)


CONSTANT_FOLD = [(_AllConstOperands(), _fold)]


def _conv_bn(m, rw):
    """bn(conv(x, w, b)) -> conv(x, w * s, (b - mean) * s + beta), s = gamma / sqrt(var + eps)."""
    conv, bn = m.node("conv"), m.root
    if conv.attrs.activation is not A.Activation.NONE or len(conv.inputs) > 3:
        return None
    w = rw.constant(m["w"])
    b = rw.constant(m.get("b")) if m.get("b") is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    mean, var = rw.constant(m["mean"]), rw.constant(m["var"])
    gamma = rw.constant(m.get("gamma")) if m.get("gamma") is not None else torch.ones_like(mean)
    beta = rw.constant(m.get("beta")) if m.get("beta") is not None else torch.zeros_like(mean)
    # fold in float64 so the folded weights round once
    s = gamma.double() / torch.sqrt(var.double() + bn.attrs.eps)
    w2 = (w.double() * s.reshape(-1, 1, 1, 1)).to(w.dtype)
    b2 = ((b.double() - mean.double()) * s + beta.double()).to(w.dtype)
    return rw.add(OpKind.CONV2D, m["x"], rw.const(w2, "w_bn"), rw.const(b2, "b_bn"), attrs=conv.attrs)


FOLD_BN = [
    (P(OpKind.BATCH_NORM, P(OpKind.CONV2D, "x", Const("w"), Opt(Const("b")), name="conv", single_use=True),
       Const("mean"), Const("var"), Opt(Const("gamma")), Opt(Const("beta"))), _conv_bn),
]


def _pad_into_conv(m, rw):
    """conv2d(pad(x)) -> conv2d(x) with the pad's amounts added to its own padding: the conv
    pads with zeros itself, so a pad of zeros on H and W only, the same amount on both sides
    of each (the conv's padding is symmetric), is the same function. Hugging Face's TF-style
    "same" padding (MobileNetV1, EfficientNet) pads before each convolution, which otherwise
    copies the whole activation per layer. Asymmetric amounts (a stride-2 layer's (0, 1))
    stay a pad."""
    a, conv = m.node("pad").attrs, m.root
    if a.mode is not A.PadMode.CONSTANT or a.value != 0.0 or len(a.pads) != 8:
        return None
    n0, n1, c0, c1, h0, h1, w0, w1 = a.pads
    if n0 or n1 or c0 or c1 or h0 != h1 or w0 != w1 or h0 < 0 or w0 < 0:
        return None
    ca = conv.attrs
    attrs = dataclasses.replace(ca, padding=(ca.padding[0] + h0, ca.padding[1] + w0))
    return rw.add(OpKind.CONV2D, m["x"], *conv.inputs[1:], attrs=attrs)


FOLD_PAD = [
    (P(OpKind.CONV2D, P(OpKind.PAD, "x", name="pad"), "w", Opt("b")), _pad_into_conv),
]
