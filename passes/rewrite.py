"""The one rewrite driver: ``rewrite(graph, rules, name=...)``.

A rule is ``(pattern, fn)``. The driver walks the graph in topological order; at each node
it tries every rule whose pattern's root op matches; ``fn(match, rw)`` builds replacement
nodes through ``rw`` and returns the value(s) that replace the root node's outputs, or
``None`` to decline. Sweeps repeat until nothing changes (bounded), then dead nodes and
unused constants are dropped. Rule lists combine with ``+``.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Sequence

import torch

from kiln.ir import Graph, Node, OpKind, Value, infer_types, opdef

from .pattern import Match, P, Pattern

Rule = tuple[Pattern, Callable]
MAX_SWEEPS = 20


class Rewriter:
    """What a rule's ``fn`` sees: graph queries plus a builder that emits new nodes."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.constants: dict[Value, torch.Tensor] = dict(graph.constants)
        self._producer: dict[Value, Node] = {}
        self._uses: dict[Value, int] = {}
        for n in graph.nodes:
            for v in n.inputs:
                if v is not None:
                    self._uses[v] = self._uses.get(v, 0) + 1
        for v in graph.outputs:
            self._uses[v] = self._uses.get(v, 0) + 1
        self.nodes: list[Node] = []
        self.scope = ""
        self._counter = itertools.count()

    # -- queries --------------------------------------------------------------------
    def producer(self, v: Value) -> Node | None:
        return self._producer.get(v)

    def constant(self, v: Value | None) -> torch.Tensor | None:
        return None if v is None else self.constants.get(v)

    def uses(self, v: Value) -> int:
        """Uses in the graph as it was at the start of this sweep (new values: unknown -> 2)."""
        return self._uses.get(v, 2)

    # -- building -------------------------------------------------------------------
    def emit(self, node: Node) -> Node:
        self.nodes.append(node)
        for o in node.outputs:
            self._producer[o] = node
        return node

    def add(self, op: OpKind, *inputs: Value | None, attrs=None, like: Value | None = None):
        """Emit a new node; ``like`` copies the layout of an existing value onto the output."""
        attrs = opdef(op).attrs() if attrs is None else attrs
        types = infer_types(op, [None if v is None else v.type for v in inputs], attrs)
        if like is not None and len(types) == 1:
            t = types[0]
            from kiln.ir import TensorType

            types = (TensorType(t.dtype, t.shape, like.type.layout, t.quant),)
        outs = tuple(Value(t, f"{op.value}_{next(self._counter)}") for t in types)
        self.emit(Node(op, tuple(inputs), attrs, outs, self.scope))
        return outs[0] if len(outs) == 1 else outs

    def const(self, tensor: torch.Tensor, name: str = "c") -> Value:
        from kiln.ir import DType, TensorType

        tensor = tensor.detach().contiguous()
        v = Value(TensorType(DType.from_torch(tensor.dtype), tuple(tensor.shape)), f"{name}_{next(self._counter)}")
        self.constants[v] = tensor
        return v


def _root_ops(pattern: Pattern) -> tuple[OpKind, ...] | None:
    return pattern.root_ops() if isinstance(pattern, P) else None


def _sweep(graph: Graph, rules: Sequence[Rule]) -> tuple[Graph, int]:
    rw = Rewriter(graph)
    env: dict[Value, Value] = {}
    by_op: dict[OpKind, list[Rule]] = {}
    generic: list[Rule] = []
    for r in rules:
        ops = _root_ops(r[0])
        if ops is None:
            generic.append(r)
        else:
            for o in ops:
                by_op.setdefault(o, []).append(r)
    fired = 0
    for n in graph.nodes:
        ins = tuple(None if v is None else env.get(v, v) for v in n.inputs)
        node = n if ins == n.inputs else Node(n.op, ins, n.attrs, n.outputs, n.scope)
        rw.emit(node)
        pos = len(rw.nodes) - 1
        replaced = None
        for pattern, fn in by_op.get(node.op, []) + generic:
            m = Match(root=node)
            if not pattern.match(node.outputs[0], rw, m):
                continue
            mark = len(rw.nodes)
            rw.scope = node.scope
            r = fn(m, rw)
            if r is None:
                del rw.nodes[mark:]  # a declining rule leaves nothing behind
                continue
            replaced = r if isinstance(r, tuple) else (r,)
            break
        if replaced is not None:
            if len(replaced) != len(node.outputs):
                raise RuntimeError(f"rule for {node.op.value} returned {len(replaced)} values for "
                                   f"{len(node.outputs)} outputs")
            del rw.nodes[pos]
            for old, new in zip(node.outputs, replaced):
                if (old.type.dtype, old.type.shape) != (new.type.dtype, new.type.shape):
                    raise RuntimeError(f"rewrite of {node.op.value} changed type {old.type!r} -> {new.type!r}")
                env[old] = new
            fired += 1
    outputs = tuple(env.get(v, v) for v in graph.outputs)
    return graph.replace(nodes=tuple(rw.nodes), outputs=outputs, constants=rw.constants), fired


def dead_code_elimination(graph: Graph) -> Graph:
    live = set(graph.outputs)
    keep = []
    for n in reversed(graph.nodes):
        if any(o in live for o in n.outputs):
            keep.append(n)
            live.update(v for v in n.inputs if v is not None)
    consts = {v: t for v, t in graph.constants.items() if v in live}
    if len(keep) == len(graph.nodes) and len(consts) == len(graph.constants):
        return graph
    return graph.replace(nodes=tuple(reversed(keep)), constants=consts)


def rewrite(graph: Graph, rules: Iterable[Rule], name: str = "rewrite", max_sweeps: int = MAX_SWEEPS) -> Graph:
    rules = list(rules)
    for _ in range(max_sweeps):
        graph, fired = _sweep(graph, rules)
        graph = dead_code_elimination(graph)
        if not fired:
            return graph
    return graph
