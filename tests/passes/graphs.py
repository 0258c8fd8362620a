"""Builders shared by the pass tests (tests/passes/test_*.py import this module by name:
pytest puts a test file's folder on sys.path, as it does tests/ for conftest).

A pass test states the graph before and the graph expected with ``build`` and the same
``GraphBuilder`` calls a frontend would make, runs one pass with ``run_pass``, then
compares structure (``conftest.assert_structural_equal``) and numbers
(``conftest.assert_same_outputs``).
"""
from __future__ import annotations

import dataclasses

from kiln.options import CompileOptions
from kiln.ir import DType, Graph, GraphBuilder, Layout, Node, Value
from kiln.passes.pipeline import run_pipeline


def build(fn, *shapes, name: str = "g", dtypes: dict | None = None) -> Graph:
    """The graph ``fn(builder, *inputs)`` returns (one output value or a tuple of them); input
    ``i`` has shape ``shapes[i]`` and dtype ``dtypes.get(i, float32)``."""
    b = GraphBuilder(name)
    xs = [b.input(f"x{i}", s, (dtypes or {}).get(i, DType.FLOAT32)) for i, s in enumerate(shapes)]
    out = fn(b, *xs)
    return b.build(out if isinstance(out, tuple) else (out,))


def run_pass(name: str, graph: Graph, **options) -> Graph:
    """``graph`` after the one pass (or phase) ``name``, the IR verified after it; ``options``
    are the compile options that decide whether a pass runs (``precision="bf16"``,
    ``target="cuda"``, ...)."""
    return run_pipeline(graph, CompileOptions.parse(**options), select=[name], verify_each=True).graph


def stored_as(graph: Graph, layout: Layout, where) -> Graph:
    """``graph`` with the outputs of every node ``where(node)`` accepts stored in ``layout``.

    The builder infers row-major outputs (an op's meaning does not depend on storage); the
    layout pass's expected graphs state which values it keeps in another layout."""
    new: dict[Value, Value] = {}
    nodes = []
    for n in graph.nodes:
        ins = tuple(None if v is None else new.get(v, v) for v in n.inputs)
        outs = n.outputs
        if where(n):
            outs = tuple(Value(dataclasses.replace(o.type, layout=layout), o.name) for o in outs)
            new.update(zip(n.outputs, outs))
        nodes.append(Node(n.op, ins, n.attrs, outs, n.scope))
    return graph.replace(nodes=tuple(nodes), outputs=tuple(new.get(v, v) for v in graph.outputs))
