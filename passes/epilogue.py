"""Epilogue grouping for LINEAR and CONV2D: bias, residual add and activation (and a ReLU
into the GROUP_NORM before it).

``act(op(x) + bias + residual)`` is one op with a fused epilogue (as oneDNN post-ops or
a generated kernel's epilogue compute it). Rules fire only on single-use producers, a
residual of exactly the output's shape and dtype, and in the order the epilogue applies
(bias, then residual, then activation), so the arithmetic is unchanged.
"""
from __future__ import annotations

import dataclasses

from kiln.ir import OpKind
from kiln.ir import attrs as A

from .pattern import Const, Opt, P

_ACTS = {OpKind.RELU: A.Activation.RELU, OpKind.TANH: A.Activation.TANH, OpKind.SIGMOID: A.Activation.SIGMOID,
         OpKind.SILU: A.Activation.SILU}
COMPUTE = (OpKind.LINEAR, OpKind.CONV2D)


def _bare(n) -> bool:
    return n.attrs.activation is A.Activation.NONE and len(n.inputs) <= 3


def _with(rw, n, inputs, **changes):
    return rw.add(n.op, *inputs, attrs=dataclasses.replace(n.attrs, **changes) if changes else n.attrs)


def _bias(m, rw):
    n = m.node("op")
    if not _bare(n) or len(n.inputs) > 2:
        return None
    t = rw.constant(m["b"])
    out = n.outputs[0]
    c = out.shape[-1] if n.op is OpKind.LINEAR else out.shape[1]
    if t.numel() != c or t.dtype != out.dtype.to_torch():
        return None
    want_shape = (c,) if n.op is OpKind.LINEAR else (c, 1, 1)
    squeezed = [s for s in t.shape]
    while len(squeezed) > len(want_shape) and squeezed[0] == 1:
        squeezed.pop(0)
    if tuple(squeezed) != want_shape:
        return None  # a bias that broadcasts along another axis is not a per-channel bias
    if rw.uses(m["b"]) < 0:
        return None
    return _with(rw, n, [n.inputs[0], n.inputs[1], rw.const(t.reshape(c), "bias")])


def _residual(m, rw):
    n = m.node("op")
    r = m["r"]
    if not _bare(n) or r.type.shape != n.outputs[0].type.shape or r.dtype != n.outputs[0].dtype:
        return None
    if r.type.layout != n.outputs[0].type.layout:
        return None
    ins = list(n.inputs) + [None] * (3 - len(n.inputs))
    return _with(rw, n, ins + [r])


def _activation(m, rw):
    n = m.node("op")
    if n.attrs.activation is not A.Activation.NONE:
        return None
    if m.root.op is OpKind.GELU:
        act = A.Activation.GELU if m.root.attrs.approximate is A.GeluApprox.NONE else A.Activation.GELU_TANH
    else:
        act = _ACTS[m.root.op]
    return _with(rw, n, list(n.inputs), activation=act)


def _matmul_to_linear(m, rw):
    """x @ W with a constant 2-D W is LINEAR(x, W^T): the transpose happens once, at compile time."""
    w = rw.constant(m["w"])
    x = m["x"]
    if w.dim() != 2 or x.type.rank < 2 or w.dtype != x.dtype.to_torch():
        return None
    return rw.add(OpKind.LINEAR, x, rw.const(w.t().contiguous(), "w_t"))


_OP = dict(name="op", single_use=True)


def _norm_relu(m, rw):
    """RELU(GROUP_NORM(x)) -> GROUP_NORM(x){activation=relu}: the norm's kernel applies it as it
    stores (pre-activation ResNets such as BiT put a ReLU after every group norm)."""
    n = m.node("op")
    if n.attrs.activation is not A.Activation.NONE:
        return None
    return _with(rw, n, list(n.inputs), activation=A.Activation.RELU)


RULES = [
    (P(OpKind.MATMUL, "x", Const("w")), _matmul_to_linear),
    (P(OpKind.ADD, P(COMPUTE, **_OP), Const("b"), commutative=True), _bias),
    (P(OpKind.ADD, P(COMPUTE, **_OP), "r", commutative=True), _residual),
    (P(tuple(_ACTS) + (OpKind.GELU,), P(COMPUTE, **_OP)), _activation),
    (P(OpKind.RELU, P(OpKind.GROUP_NORM, **_OP)), _norm_relu),
]


def _relu6(m, rw):
    n = m.node("op")
    if n.attrs.activation is not A.Activation.NONE or not n.outputs[0].dtype.is_float:
        return None
    return _with(rw, n, list(n.inputs), activation=A.Activation.RELU6)


# clamp(conv(x), 0, 6), MobileNet's ReLU6, as the conv's own activation: CPU float compiles
# only (oneDNN's clip post-op and the reference take it; the quantized, sparse and GPU
# convolutions do not)
CONV_RELU6 = [
    (P(OpKind.CLAMP, P(OpKind.CONV2D, **_OP), where=lambda n: (n.attrs.min, n.attrs.max) == (0.0, 6.0)), _relu6),
]


def _residual_to_norm(m, rw):
    """LAYER_NORM(LINEAR(x, w, b, r)) -> LAYER_NORM(ADD(LINEAR(x, w, b), r)) on CPU.

    No CPU GEMM kernel adds a residual inside the GEMM (MKL has no post-ops; oneDNN's sum
    post-op order differs), so a folded residual is a separate pass over the output anyway;
    as an ADD it runs inside the normalization's generated kernel (the plan joins a GEMM's
    injective tail to the one reduction that reads it), one memory round trip fewer.
    Same arithmetic: the residual was added after bias, before any (here absent) activation."""
    n = m.node("op")
    if len(n.inputs) < 4 or n.inputs[3] is None or n.attrs.activation is not A.Activation.NONE:
        return None
    y = rw.add(OpKind.LINEAR, *n.inputs[:3], attrs=n.attrs)
    ln = m.root
    return rw.add(OpKind.LAYER_NORM, rw.add(OpKind.ADD, y, n.inputs[3]), *ln.inputs[1:], attrs=ln.attrs)


RESIDUAL_TO_NORM = [
    (P(OpKind.LAYER_NORM, P(OpKind.LINEAR, "x", "w", Opt("b"), "r", name="op", single_use=True), Opt("g"), Opt("beta")),
     _residual_to_norm),
]
