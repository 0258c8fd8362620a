"""Attention fusion: softmax(q @ k^T * scale + mask) @ v becomes one ATTENTION op.

Recognized spellings: the scale as a division or multiplication of the scores by a
scalar constant (or none); an additive float mask; a boolean mask through
``where(mask, scores, -inf)``; a constant upper-triangular -inf mask (causal). Head
split/merge reshapes and permutes around q, k, v stay outside the op; ``k^T`` is undone
with a permute that the canonicalizer folds into k's own head-split permute.
"""
from __future__ import annotations

import math

import torch

from kiln.ir import DType, OpKind
from kiln.ir import attrs as A

from .pattern import true_div
from .pattern import P, scalar_of


def _op(rw, v, op):
    n = rw.producer(v)
    return n if n is not None and n.op is op else None


def _single(rw, v) -> bool:
    return rw.uses(v) == 1


def _causal_const(t: torch.Tensor) -> bool:
    """True when t (2-D or with leading 1s) masks exactly the strict upper triangle."""
    while t.dim() > 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        return False
    upper = torch.ones_like(t, dtype=torch.bool).triu(1)
    if t.dtype == torch.bool:  # True = keep
        return bool(torch.equal(t, ~upper))
    return bool(torch.isneginf(t[upper]).all() and (t[~upper] == 0).all())


def _neg_inf(t: torch.Tensor | None) -> bool:
    return t is not None and t.numel() == 1 and bool(torch.isneginf(t.reshape(-1)[0]))


def _scores(rw, s):
    """Parse s = (q @ kt) [/ c | * c] -> (q, kt, scale), or None."""
    scale = 1.0
    for op in (OpKind.DIV, OpKind.MUL):
        n = _op(rw, s, op)
        if n is not None and _single(rw, s):
            if op is OpKind.DIV and not true_div(n):
                return None
            c = rw.constant(n.inputs[1])
            c = None if c is None else scalar_of(c)
            if c is None or c == 0:
                return None
            scale = 1.0 / c if op is OpKind.DIV else c
            s = n.inputs[0]
            break
    mm = _op(rw, s, OpKind.MATMUL)
    if mm is None or not _single(rw, s):
        return None
    return mm.inputs[0], mm.inputs[1], scale


def _attention(m, rw):
    root = m.root  # probs @ v
    probs, v = root.inputs
    sm = _op(rw, probs, OpKind.SOFTMAX)
    if sm is None or not _single(rw, probs) or sm.attrs.axis != probs.type.rank - 1:
        return None
    s = sm.inputs[0]
    mask, causal, core = None, False, _scores(rw, s)
    if core is None and _single(rw, s):
        add, where = _op(rw, s, OpKind.ADD), _op(rw, s, OpKind.WHERE)
        if add is not None:
            for scores, mk in (add.inputs, tuple(reversed(add.inputs))):
                core = _scores(rw, scores)
                if core is not None:
                    mask = mk
                    break
        elif where is not None:
            cond, a, b = where.inputs
            if _neg_inf(rw.constant(b)):
                core, mask = _scores(rw, a), cond
            elif _neg_inf(rw.constant(a)) and _scores(rw, b) is not None:
                core, mask = _scores(rw, b), rw.add(OpKind.NOT, cond)
    if core is None:
        return None
    q, kt, scale = core
    if q.type.rank < 3 or kt.type.rank != q.type.rank or v.type.rank != q.type.rank or not q.dtype.is_float:
        return None
    if mask is not None:
        mt = rw.constant(mask)
        if mt is not None and _causal_const(mt) and q.shape[-2] == kt.shape[-1]:
            mask, causal = None, True
        elif mask.dtype is not DType.BOOL and mask.dtype != q.dtype:
            return None
        elif mask.type.rank < 2:  # SDPA takes masks of rank >= 2; broadcasting is unchanged
            shape = (1,) * (2 - mask.type.rank) + tuple(mask.shape)
            mask = rw.add(OpKind.RESHAPE, mask, attrs=A.ShapeAttrs(shape))
    r = q.type.rank
    perm = tuple(range(r - 2)) + (r - 1, r - 2)
    k = rw.add(OpKind.PERMUTE, kt, attrs=A.PermuteAttrs(perm))
    scale_attr = None if abs(scale - 1.0 / math.sqrt(q.shape[-1])) <= 1e-7 * scale else float(scale)
    ins = [q, k, v] + ([mask] if mask is not None else [])
    try:
        out = rw.add(OpKind.ATTENTION, *ins, attrs=A.AttentionAttrs(scale_attr, causal))
    except Exception:
        return None  # shapes the fused op cannot take: leave the pattern alone
    if out.type.shape != root.outputs[0].type.shape:
        return None
    return out


RULES = [(P(OpKind.MATMUL), _attention)]
