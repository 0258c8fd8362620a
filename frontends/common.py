"""What both frontends share: a builder that folds literal-only ops at import time.

A *literal* is a constant that does not come from the model's weights: ``arange``,
shape arithmetic, ONNX ``Constant`` nodes. Ops whose operands are all literals (position
ids, masks built from ``arange``, ``Shape -> Gather -> Concat`` chains) are evaluated
right away with the ops' reference meaning (kiln.ir.reference), so the graph never carries shape plumbing.
Weights are never folded here; that is the constant-folding pass's job.
"""
from __future__ import annotations

import torch

from kiln.ir import DType, Graph, GraphBuilder, Node, OpKind, Value, opdef
from kiln.ir import attrs as A
from kiln.ir.ops import infer_types
from kiln.ir.reference import evaluate as evaluate_node
from kiln.ir.types import Sym, has_symbols


IMPLIED_MAX = 8192  # the bound() of a size the user left unbounded


class ImportError_(Exception):
    """A model cannot be imported; the message says what and where."""


class FrontendBuilder(GraphBuilder):
    def __init__(self, name: str):
        super().__init__(name)
        self.literals: dict[Value, torch.Tensor] = {}
        self.symbols = None  # the torch frontend's SymbolicDims when sizes vary per call
        self.size_max: dict[str, int | None] = {}  # a symbolic size's largest value (None: unbounded)
        self.implied_max: dict[str, int] = {}  # the bounds the import had to assume (bound())

    def literal(self, tensor, name: str = "lit") -> Value:
        v = self.const(torch.as_tensor(tensor), name)
        self.literals[v] = self._constants[v]
        return v

    def weight(self, tensor: torch.Tensor, name: str) -> Value:
        return self.const(tensor, name)

    def value_of(self, v: Value) -> torch.Tensor | None:
        """The tensor behind a literal (or weight) constant, else None."""
        return self._constants.get(v)

    def evaluate(self, v: Value) -> torch.Tensor | None:
        """The tensor ``v`` holds if it depends only on constants (weights included), else None.

        Used where an importer must restructure weights (ONNX RNN gate reordering) that the
        exporter wrote as a small weight-only subgraph.
        """
        if v in self._constants:
            return self._constants[v]
        producer = {o: n for n in self._nodes for o in n.outputs}
        memo: dict[Value, torch.Tensor] = dict(self._constants)

        def go(x: Value):
            if x in memo:
                return memo[x]
            n = producer.get(x)
            if n is None:
                return None
            args = []
            for i in n.inputs:
                t = None if i is None else go(i)
                if i is not None and t is None:
                    return None
                args.append(t)
            r = evaluate_node(n, args)
            for o, t in zip(n.outputs, r if isinstance(r, tuple) else (r,)):
                memo[o] = t
            return memo[x]

        return go(v)

    def add(self, op: OpKind, *inputs, attrs=None, name: str = "", scope: str | None = None):
        attrs = opdef(op).attrs() if attrs is None else attrs
        present = [v for v in inputs if v is not None]
        if present and op is not OpKind.FALLBACK and all(v in self.literals for v in present) \
                and not has_symbols(attrs):  # a size known only at run time: the node stays
            types = infer_types(op, [None if v is None else v.type for v in inputs], attrs)
            node = Node(op, tuple(inputs), attrs, (), "")
            r = evaluate_node(node, [None if v is None else self.literals[v] for v in inputs])
            rs = r if isinstance(r, tuple) else (r,)
            outs = tuple(self.literal(t.contiguous(), name or op.value) for t in rs)
            for t, v in zip(types, outs):
                assert (t.dtype, t.shape) == (v.type.dtype, v.type.shape), (op, t, v.type)
            return outs[0] if len(outs) == 1 else outs
        return super().add(op, *inputs, attrs=attrs, name=name, scope=scope)

    def bound(self, d) -> int:
        """The largest value dim ``d`` can take: a literal sized for every call (an
        ``arange(seq)``) is built that long. A size without a maximum gets
        ``IMPLIED_MAX``, recorded in ``implied_max``: calls beyond it are refused."""
        if isinstance(d, int):
            return d
        values = {}
        for name in d.symbols:
            m = self.size_max.get(name)
            if m is None:
                m = self.implied_max.setdefault(name, IMPLIED_MAX)
            values[name] = m
        return d.evaluate(values)  # sizes grow with their symbols

    # -- small helpers the converters share ------------------------------------------
    def scalar(self, value, like: Value | None = None) -> Value:
        """A 0-d literal for a Python scalar, typed the way torch types scalar operands."""
        if isinstance(value, bool):
            return self.literal(torch.tensor(value))
        if isinstance(value, int):
            return self.literal(torch.tensor(value, dtype=torch.int64))
        dt = torch.float32
        if like is not None and like.dtype.is_float:
            dt = like.dtype.to_torch()
        return self.literal(torch.tensor(float(value), dtype=dt))

    def reshape(self, x: Value, shape) -> Value:
        shape = resolve_shape(x.shape, shape)
        if tuple(shape) == tuple(x.shape):
            return x
        return self.add(OpKind.RESHAPE, x, attrs=A.ShapeAttrs(tuple(shape)))

    def cast(self, x: Value, dtype: DType) -> Value:
        if x.dtype is dtype:
            return x
        return self.add(OpKind.CAST, x, attrs=A.CastAttrs(dtype))

    def finish(self, outputs) -> Graph:
        """Build, dropping constants no node or output uses."""
        live = set(outputs)
        nodes = []
        for n in reversed(self._nodes):  # drop nodes nothing uses (e.g. weight plumbing an importer folded)
            if any(o in live for o in n.outputs):
                nodes.append(n)
                live.update(v for v in n.inputs if v is not None)
        g = self.build(outputs).replace(nodes=tuple(reversed(nodes)))
        return g.replace(constants={v: t for v, t in g.constants.items() if v in live})


def resolve_shape(in_shape, shape) -> tuple:
    """``shape`` with its -1 resolved against ``in_shape`` (dims may be symbolic)."""
    shape = [s if isinstance(s, Sym) else int(s) for s in shape]
    holes = [i for i, s in enumerate(shape) if isinstance(s, int) and s == -1]
    if len(holes) > 1:
        raise ValueError(f"more than one -1 in shape {shape}")
    if holes:
        known = 1
        for i, s in enumerate(shape):
            if i != holes[0]:
                known = known * s
        total = 1
        for d in in_shape:
            total = total * d
        if isinstance(known, int) and isinstance(total, int) and (known == 0 or total % known):
            raise ValueError(f"cannot reshape {tuple(in_shape)} to {shape}")
        shape[holes[0]] = total // known
    return tuple(shape)
