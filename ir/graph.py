"""The SSA graph: values, immutable nodes, and a builder.

A ``Graph`` owns its inputs, constants (weights), nodes in topological order, and outputs.
Nodes are never mutated; a rewrite builds new nodes and a new graph.
"""
from __future__ import annotations

import itertools
from dataclasses import field
from typing import Iterable, Sequence

import torch

from .record import record

from .dtypes import DType
from .ops import OpKind, infer_types, opdef
from .types import ROW_MAJOR, Layout, TensorType

_ids = itertools.count()


@record(eq=False)
class Value:
    """One SSA value. Identity is the object itself (``eq=False``)."""

    type: TensorType
    name: str = ""
    id: int = field(default_factory=lambda: next(_ids))

    def __repr__(self) -> str:
        return f"%{self.name or self.id}: {self.type!r}"

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def shape(self):
        return self.type.shape


@record(eq=False)
class Node:
    """One op applied to input values, producing output values."""
    op: OpKind
    inputs: tuple[Value | None, ...]  # None marks an absent optional operand
    attrs: object
    outputs: tuple[Value, ...]
    scope: str = ""  # source module path (``layer1.0.conv1``) for dumps and error messages

    def __repr__(self) -> str:
        return f"Node({self.op.value}, {len(self.inputs)} in, {len(self.outputs)} out)"

    def at_sizes(self, sizes: dict) -> "Node":
        """This node with every symbolic size given its value in ``sizes`` (name -> int): a
        stand-in of static shapes, to measure or prepare kernels at representative sizes.
        Its values are new (same names); the node itself is unchanged."""
        from .types import resolve_symbols

        def at(v):
            return None if v is None else Value(v.type.concrete(sizes), v.name)

        return Node(self.op, tuple(at(v) for v in self.inputs), resolve_symbols(self.attrs, sizes),
                    tuple(at(v) for v in self.outputs), self.scope)


@record(frozen=False, eq=False, slots=False)
class Graph:
    """A function: inputs, nodes in execution order, outputs, and constant tensors."""
    inputs: tuple[Value, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Value, ...]
    constants: dict[Value, torch.Tensor]
    name: str = "graph"

    def __post_init__(self):
        self.inputs, self.nodes, self.outputs = tuple(self.inputs), tuple(self.nodes), tuple(self.outputs)

    # -- queries -------------------------------------------------------------------
    def producers(self) -> dict[Value, Node]:
        return {v: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    out.setdefault(v, []).append(n)
        return out

    def count(self, op: OpKind) -> int:
        return sum(1 for n in self.nodes if n.op is op)

    def op_counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for n in self.nodes:
            c[n.op.value] = c.get(n.op.value, 0) + 1
        return dict(sorted(c.items()))

    def is_constant(self, v: Value) -> bool:
        return v in self.constants

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.constants.values())

    def replace(self, **kw) -> "Graph":
        d = dict(inputs=self.inputs, nodes=self.nodes, outputs=self.outputs, constants=self.constants,
                 name=self.name)
        d.update(kw)
        return Graph(**d)

    def __repr__(self) -> str:
        from .printer import format_graph

        return format_graph(self)


class GraphBuilder:
    """Builds a graph node by node, inferring each output type from the op definition.

    ``b.add(OpKind.RELU, x)`` returns the output value (or a tuple for multi-output ops).
    """

    def __init__(self, name: str = "graph"):
        self.name = name
        self._inputs: list[Value] = []
        self._nodes: list[Node] = []
        self._constants: dict[Value, torch.Tensor] = {}
        self._names: set[str] = set()
        self.scope = ""

    def _unique(self, base: str) -> str:
        base = base or "v"
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def input(self, name: str, shape: Sequence, dtype: DType = DType.FLOAT32) -> Value:
        v = Value(TensorType(dtype, tuple(shape)), self._unique(name))
        self._inputs.append(v)
        return v

    def const(self, tensor: torch.Tensor, name: str = "c", layout: Layout = ROW_MAJOR) -> Value:
        """``layout`` tags how the tensor is stored (the parts of a sparse weight carry theirs)."""
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor)
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        v = Value(TensorType(DType.from_torch(tensor.dtype), tuple(tensor.shape), layout), self._unique(name))
        self._constants[v] = tensor.contiguous()
        return v

    def add(self, op: OpKind, *inputs: Value | None, attrs=None, name: str = "", scope: str | None = None):
        attrs = opdef(op).attrs() if attrs is None else attrs
        types = infer_types(op, [None if v is None else v.type for v in inputs], attrs)
        base = name or op.value
        outs = tuple(Value(t, self._unique(base if len(types) == 1 else f"{base}.{i}")) for i, t in enumerate(types))
        self._nodes.append(Node(op, tuple(inputs), attrs, outs, self.scope if scope is None else scope))
        return outs[0] if len(outs) == 1 else outs

    def build(self, outputs: Iterable[Value]) -> Graph:
        return Graph(tuple(self._inputs), tuple(self._nodes), tuple(outputs), dict(self._constants), self.name)


