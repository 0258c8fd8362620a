"""A first-order cost model: FLOPs and bytes moved per node (static shapes only).

Used by ``kiln dump --stats`` and the kernel microbenchmarks (GFLOP/s, GB/s, roofline).
FLOPs count multiply-adds as two; bytes are operands read plus results written once.
"""
from __future__ import annotations

import math

from .graph import Node
from .ops import Category, OpKind, opdef


def _numel(v) -> int:
    if v is None or not v.type.is_static:
        return 0
    return v.type.numel()


def node_bytes(n: Node) -> int:
    if n.op in (OpKind.TAKE, OpKind.GATHER, OpKind.INDEX):
        # a gather reads only the rows it selects, not the whole table
        idx = sum(v.type.nbytes() for v in n.inputs[1:] if v is not None and v.type.is_static)
        return idx + 2 * sum(o.type.nbytes() for o in n.outputs if o.type.is_static)
    total = 0
    for v in list(n.inputs) + list(n.outputs):
        if v is not None and v.type.is_static:
            total += v.type.nbytes()
    return total


def node_flops(n: Node) -> int:
    out = n.outputs[0]
    if not out.type.is_static or any(v is not None and not v.type.is_static for v in n.inputs):
        return 0
    op, cat = n.op, opdef(n.op).category
    if op is OpKind.LINEAR:
        k = n.inputs[1].shape[1]
        return 2 * _numel(out) * k + _numel(out) * (len(n.inputs) - 2)
    if op is OpKind.MATMUL:
        k = n.inputs[0].shape[-1]
        return 2 * _numel(out) * k
    if op is OpKind.CONV2D:
        w = n.inputs[1].shape
        return 2 * _numel(out) * w[1] * w[2] * w[3] + _numel(out) * (len(n.inputs) - 2)
    if op is OpKind.ATTENTION:
        q, k, v = n.inputs[:3]
        batch = _numel(out) // (q.shape[-2] * v.shape[-1])
        sq, sk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        return batch * (2 * sq * sk * d + 2 * sq * sk * dv + 5 * sq * sk)
    if op in (OpKind.LSTM, OpKind.GRU):
        a = n.attrs
        gates = 4 if op is OpKind.LSTM else 3
        x = n.inputs[0].shape
        b, t = (x[0], x[1]) if a.batch_first else (x[1], x[0])
        h = a.hidden_size
        per_step = 2 * b * h * gates * h + 10 * b * h * gates
        proj = 0 if a.proj_hoisted else 2 * b * t * x[2] * gates * h
        return a.num_layers * (t * per_step) + proj
    if op in (OpKind.MAX_POOL2D, OpKind.AVG_POOL2D):
        return _numel(out) * math.prod(n.attrs.kernel)
    if cat in (Category.REDUCTION, Category.NORMALIZATION):
        per = {OpKind.LAYER_NORM: 8, OpKind.SOFTMAX: 5, OpKind.LOG_SOFTMAX: 6, OpKind.BATCH_NORM: 2}.get(op, 1)
        return _numel(n.inputs[0]) * per
    if cat is Category.ELEMENTWISE:
        per = {OpKind.GELU: 8, OpKind.ERF: 8, OpKind.EXP: 4, OpKind.TANH: 6, OpKind.SIGMOID: 4, OpKind.SILU: 5,
               OpKind.LOG: 4, OpKind.SQRT: 2, OpKind.RSQRT: 2, OpKind.POW: 8}.get(op, 1)
        return _numel(out) * per
    return 0  # data movement: bytes only
