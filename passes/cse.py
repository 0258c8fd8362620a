"""Common subexpression elimination: identical nodes (and small identical constants) merge."""
from __future__ import annotations

import hashlib

import torch

from kiln.ir import Graph, Node, Value
from kiln.ir.serialize import tensor_to_bytes

SMALL_CONSTANT_BYTES = 1 << 16  # weights are not hashed; literals and scalars are


def cse(graph: Graph) -> Graph:
    env: dict[Value, Value] = {}
    seen_consts: dict[tuple, Value] = {}
    constants: dict[Value, torch.Tensor] = {}
    for v, t in graph.constants.items():
        if t.numel() * t.element_size() <= SMALL_CONSTANT_BYTES:
            key = (str(t.dtype), tuple(t.shape), hashlib.sha1(tensor_to_bytes(t)).hexdigest(), v.type.layout)
            if key in seen_consts:
                env[v] = seen_consts[key]
                continue
            seen_consts[key] = v
        constants[v] = t
    seen: dict[tuple, Node] = {}
    nodes = []
    for n in graph.nodes:
        ins = tuple(None if v is None else env.get(v, v) for v in n.inputs)
        key = (n.op, ins, n.attrs, tuple((o.type.layout, o.type.quant) for o in n.outputs))
        try:
            prev = seen.get(key)
        except TypeError:  # unhashable attrs (never expected): keep the node
            prev = None
        if prev is not None:
            for a, b in zip(n.outputs, prev.outputs):
                env[a] = b
            continue
        node = n if ins == n.inputs else Node(n.op, ins, n.attrs, n.outputs, n.scope)
        try:
            seen[key] = node
        except TypeError:
            pass
        nodes.append(node)
    if not env:
        return graph
    return graph.replace(nodes=tuple(nodes), outputs=tuple(env.get(v, v) for v in graph.outputs), constants=constants)
