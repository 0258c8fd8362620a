"""ONNX shape arithmetic over sizes that vary per call (``dim_param`` inputs compiled dynamic).

An exported model computes shapes at run time: ``Shape -> Gather -> Unsqueeze -> Concat ->
Reshape``, ``ConstantOfShape``, ``Range`` over the sequence length, ``Expand`` of a mask.
With static inputs those chains fold to literals at import. With symbolic dims they fold
to a ``SymValue``: a small integer tensor whose elements are sizes (ints or ``Sym``
expressions such as ``batch*seq``), evaluated once at import so the graph still carries
no shape plumbing; the ops that consume it (``Reshape``, ``Expand``, ``Slice``...) get
symbolic attributes the plan resolves per call.

What cannot stay symbolic is a ``KilnError`` naming the node and the op: a size used as
tensor data (cast to float, an output), a comparison whose answer depends on the call's
sizes (``Equal(seq, 1)``), a slice bound that may or may not clip.
"""
from __future__ import annotations

import functools
import operator

import numpy as np
import torch
from onnx import helper, numpy_helper

from kiln.errors import KilnError
from kiln.ir import OpKind
from kiln.ir import attrs as A
from kiln.ir.types import Sym

_TO_END = 2 ** 62  # a Slice end at least this large means "to the end" (exporters write INT64_MAX)
_INT_TYPES = {6, 7, 12, 13}  # ONNX INT32, INT64, UINT32, UINT64


class SymValue:
    """An integer tensor known as sizes: ``values`` is a numpy object array of ints and Syms."""

    def __init__(self, values: np.ndarray, dtype: torch.dtype = torch.int64):
        self.values = values
        self.dtype = dtype

    @property
    def symbols(self) -> list[str]:
        out = set()
        for v in self.values.reshape(-1):
            if isinstance(v, Sym):
                out |= v.symbols
        return sorted(out)


def shape_value(dims, start: int = 0, end: int | None = None):
    """``Shape`` of a tensor whose shape has symbolic dims."""
    return np.array(list(dims)[start:end], dtype=object).reshape(-1)


def _refuse(node, why: str):
    raise KilnError(f"ONNX node {node.name or node.op_type} ({node.op_type}): {why}; Kiln cannot keep this "
                    f"size symbolic (compile with dynamic=False for a plan per input shape)")


def ints(c, name: str, value):
    """The object array of ``value`` (a SymValue or an integer literal), else None."""
    if isinstance(value, SymValue):
        return value.values
    a = c.lit(name)
    if a is None or a.dtype.kind not in "iub":
        return None
    return np.vectorize(int, otypes=[object])(a) if a.size else a.astype(object)


def wrap(c, values: np.ndarray, dtype=torch.int64):
    """Literal when every element is known, else a SymValue."""
    values = np.asarray(values, dtype=object)
    if not any(isinstance(v, Sym) for v in values.reshape(-1)):
        return c.b.literal(torch.tensor(values.astype(np.int64) if values.size else np.zeros(values.shape, np.int64),
                                        dtype=dtype))
    return SymValue(values, dtype)


def materialize(c, node, sv: SymValue):
    """A tensor holding ``sv``'s sizes at run time (a size used as data: a flat index
    ``batch_index * seq``): each size is the element at that position of a literal range as
    long as the size can be, sliced per call."""
    b = c.b
    parts = []
    for e in sv.values.reshape(-1):
        if isinstance(e, int):
            parts.append(b.literal(torch.tensor([e], dtype=sv.dtype)))
            continue
        top = b.bound(e)
        if top > MAX_TABLE:
            _refuse(node, f"the size {e} is used as tensor data and can reach {top}")
        table = b.literal(torch.arange(top + 1, dtype=sv.dtype))
        parts.append(b.add(OpKind.SLICE, table, attrs=A.SliceAttrs(0, e, e + 1)))
    x = parts[0] if len(parts) == 1 else b.add(OpKind.CONCAT, *parts, attrs=A.AxisAttrs(0))
    return b.reshape(x, sv.values.shape)


MAX_TABLE = 1 << 16  # the longest range a size used as data is read from


def _equal(a, b, node):
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, Sym) and isinstance(b, Sym):
        if a == b:
            return True
    elif isinstance(a, Sym) != isinstance(b, Sym):
        k = b if isinstance(a, Sym) else a
        if k <= 0:  # a size is at least 1
            return False
    _refuse(node, f"whether {a} equals {b} depends on the call's sizes")


def clamp(c, node, v, size, axis: int):
    """ONNX's clamping of a Slice bound ``v`` to ``[0, size]`` where either may be symbolic."""
    if isinstance(v, int) and isinstance(size, int):
        return max(0, min(size, v + size if v < 0 else v))
    if isinstance(v, int):
        if v >= _TO_END:
            return size
        if v == 0:
            return 0
        if v == -1:  # every size is at least 1
            return size - 1
        _refuse(node, f"a slice bound {v} on axis {axis} of size {size} may or may not be clipped")
    if isinstance(size, int) or v != size:
        names = v.symbols
        if len(names) == 1 and v == Sym(next(iter(names))):
            # slicing a fixed table to a size (position ids [:seq]): the size is bounded by the table
            name = next(iter(names))
            bound = size if isinstance(size, int) else None
            if bound is not None:
                c.limits[name] = min(c.limits.get(name, bound), bound)
                return v
        _refuse(node, f"a slice bound {v} on axis {axis} of size {size} may or may not be clipped")
    return v


def convert(c, node, ins, at):
    """Outputs of ``node``, some of whose operands are SymValues."""
    op = node.op_type
    b = c.b
    vals = [ints(c, n, v) if n else None for n, v in zip(node.input, ins)]

    def need(i, what):
        if vals[i] is None:
            _refuse(node, f"{what} is computed from tensor data")
        return vals[i]

    if op == "Identity":
        return [ins[0]]
    if op in ("Shape", "Size") and isinstance(ins[0], SymValue):  # the shape of a tensor of sizes: static
        shape = list(ins[0].values.shape)
        if op == "Size":
            return [wrap(c, np.array(product(shape), dtype=object))]
        return [wrap(c, np.array(shape[at.get("start", 0):at.get("end")], dtype=object).reshape(-1))]
    if op == "Expand" and isinstance(ins[0], SymValue):
        shape = [int(x) for x in need(1, "Expand's shape")]
        return [wrap(c, np.broadcast_to(vals[0], np.broadcast_shapes(vals[0].shape, tuple(shape))))]
    if op == "Cast" and at["to"] in _INT_TYPES:
        dtype = numpy_to_dtype(np.zeros(0, helper.tensor_dtype_to_np_dtype(at["to"])))
        return [SymValue(ins[0].values, dtype) if isinstance(ins[0], SymValue) else ins[0]]
    if op == "Gather" and isinstance(ins[0], SymValue):
        idx = need(1, "Gather's indices")
        return [wrap(c, np.take(vals[0], idx.astype(np.int64), axis=at.get("axis", 0)))]
    if op == "Concat":
        parts = [need(i, f"Concat operand {i}") for i in range(len(ins)) if node.input[i]]
        return [wrap(c, np.concatenate([p.reshape(-1) if p.ndim == 0 else p for p in parts], axis=at.get("axis", 0)))]
    if op in ("Unsqueeze", "Squeeze") and isinstance(ins[0], SymValue):
        a = vals[0]
        axes = [int(x) for x in need(1, f"{op} axes").reshape(-1)] if len(node.input) > 1 and node.input[1] \
            else list(at.get("axes", []))
        if op == "Unsqueeze":
            r = a.ndim + len(axes)
            for ax in sorted(x % r for x in axes):
                a = np.expand_dims(a, ax)
        else:
            a = np.squeeze(a, axis=tuple(x % a.ndim for x in axes)) if axes else np.squeeze(a)
        return [wrap(c, a)]
    if op == "Reshape" and isinstance(ins[0], SymValue):
        shape = [int(x) for x in need(1, "Reshape's shape")]
        return [wrap(c, vals[0].reshape([vals[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]))]
    if op == "Slice" and isinstance(ins[0], SymValue):
        a = vals[0]
        starts, ends = need(1, "Slice starts"), need(2, "Slice ends")
        axes = need(3, "Slice axes") if len(node.input) > 3 and node.input[3] else range(len(starts))
        steps = need(4, "Slice steps") if len(node.input) > 4 and node.input[4] else [1] * len(starts)
        index = [slice(None)] * a.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            if not all(isinstance(x, int) for x in (s, e, st)):
                _refuse(node, "a slice of sizes with symbolic bounds")
            index[int(ax) % a.ndim] = slice(s, min(e, _TO_END), st)
        return [wrap(c, a[tuple(index)])]
    arith = op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Where")
    if arith and any(v is None for v in vals[1 if op == "Where" else 0:]):
        return _as_data(c, node, ins, at)  # sizes combined with tensor data
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
        x, y = need(0, f"{op}'s operand"), need(1, f"{op}'s operand")
        if op in ("Max", "Min"):
            fn = max if op == "Max" else min

            def pick(p, q):
                if isinstance(p, int) and isinstance(q, int):
                    return fn(p, q)
                if p == q:
                    return p
                if isinstance(p, int) != isinstance(q, int):
                    k, sz = (p, q) if isinstance(p, int) else (q, p)
                    if k <= 1:  # a size is at least 1
                        return sz if op == "Max" else k
                _refuse(node, f"{op.lower()}({p}, {q}) depends on the call's sizes")
            return [wrap(c, np.frompyfunc(pick, 2, 1)(x, y))]
        f = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.floordiv}[op]
        return [wrap(c, np.frompyfunc(f, 2, 1)(x, y))]
    if op == "Equal":
        x, y = need(0, "Equal's operand"), need(1, "Equal's operand")
        r = np.frompyfunc(lambda p, q: _equal(p, q, node), 2, 1)(x, y)
        return [b.literal(torch.tensor(np.asarray(r, dtype=bool)))]
    if op == "Where":
        cond = c.lit(node.input[0])
        if cond is None:
            _refuse(node, "the condition depends on tensor data")
        x, y = need(1, "Where's operand"), need(2, "Where's operand")
        return [wrap(c, np.where(cond.astype(bool), x, y))]
    if op == "ConstantOfShape":
        shape = tuple(need(0, "ConstantOfShape's shape").reshape(-1))
        fill = numpy_helper.to_array(at["value"]) if "value" in at else np.zeros(1, np.float32)
        from .onnx_import import numpy_to_torch

        scalar = numpy_to_torch(fill.reshape(()))
        return [b.add(OpKind.EXPAND, b.literal(scalar), attrs=A.ShapeAttrs(shape))]
    if op == "Range":
        start, limit, delta = (need(i, "Range's operands").reshape(()).item() for i in range(3))
        if not isinstance(start, int) or not isinstance(delta, int) or delta < 1:
            _refuse(node, "a range with a symbolic start or step")
        dtype = torch.int64 if c.lit(node.input[0]) is None else numpy_to_dtype(c.lit(node.input[0]))
        full = b.literal(torch.arange(start, b.bound(limit), delta, dtype=dtype))
        length = (limit - start + delta - 1) // delta
        return [b.add(OpKind.SLICE, full, attrs=A.SliceAttrs(0, 0, length))]
    if op == "Reshape":
        x = ins[0]
        shape = list(need(1, "Reshape's shape"))
        if not at.get("allowzero", 0):
            shape = [x.shape[i] if isinstance(s, int) and s == 0 else s for i, s in enumerate(shape)]
        return [b.reshape(x, shape)]
    if op == "Expand":
        from kiln.ir import broadcast_shapes

        x = ins[0]
        shape = broadcast_shapes(x.shape, tuple(need(1, "Expand's shape")))
        if tuple(shape) == tuple(x.shape):
            return [x]
        return [b.add(OpKind.EXPAND, x, attrs=A.ShapeAttrs(tuple(shape)))]
    if op == "Slice":
        x = ins[0]
        starts, ends = need(1, "Slice starts"), need(2, "Slice ends")
        axes = need(3, "Slice axes") if len(node.input) > 3 and node.input[3] else range(len(starts))
        steps = need(4, "Slice steps") if len(node.input) > 4 and node.input[4] else [1] * len(starts)
        for s, e, ax, st in zip(starts, ends, axes, steps):
            ax = int(ax) % x.type.rank
            size = x.shape[ax]
            if not isinstance(st, int) or st <= 0:
                _refuse(node, "a slice with a symbolic or non-positive step")
            s, e = clamp(c, node, s, size, ax), clamp(c, node, e, size, ax)
            if (s, e, st) != (0, size, 1):
                x = b.add(OpKind.SLICE, x, attrs=A.SliceAttrs(ax, s, e, st))
        return [x]
    if op == "Tile":
        reps = need(1, "Tile's repeats")
        if any(isinstance(r, Sym) for r in reps):
            _refuse(node, "a symbolic repeat count")
    return _as_data(c, node, ins, at)


def _as_data(c, node, ins, at):
    """``node`` converted as usual, its SymValue operands materialized as tensors."""
    from .onnx_import import CONVERTERS, VALUE_OPERANDS

    shape_operands = VALUE_OPERANDS.get(node.op_type, ())
    bad = [n for i, (n, v) in enumerate(zip(node.input, ins)) if isinstance(v, SymValue) and i in shape_operands]
    if node.op_type not in CONVERTERS or bad:
        syms = sorted({s for v in ins if isinstance(v, SymValue) for s in v.symbols})
        _refuse(node, f"operand(s) {', '.join(repr(n) for n in node.input if n)} mix sizes known only per call "
                      f"({', '.join(syms)}) with tensor data")
    ins = [materialize(c, node, v) if isinstance(v, SymValue) else v for v in ins]
    return CONVERTERS[node.op_type](c, ins, at, node)


def numpy_to_dtype(a: np.ndarray) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=a.dtype)).dtype


def product(dims):
    return functools.reduce(operator.mul, dims, 1)
