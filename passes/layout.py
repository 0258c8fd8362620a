"""Layout: run conv chains in channels-last (NHWC) and prepack their weights.

A *conv chain* is a connected set of 4-D nodes that work in any layout (conv, batch
norm, pooling, padding, elementwise, spatial mean) containing at least one conv. Values inside a
chain are stored NHWC; one TO_LAYOUT enters each chain input and one leaves each value a
non-chain node (or the graph output) reads — the fewest conversions for that partition.
Conv weights are converted once, at compile time. The logical shapes stay NCHW, so
every op's meaning is unchanged; only storage moves.
"""
from __future__ import annotations

import torch

from kiln.ir import Category, Graph, Layout, LayoutKind, Node, OpKind, TensorType, Value, opdef
from kiln.ir import attrs as A

CHANNELS_LAST = Layout(LayoutKind.CHANNELS_LAST)
ROW = Layout()
# PAD: its attributes index logical axes, and its kernels (torch's, generated) keep the
# storage order (BiT's stem pads between its conv and its max pool). GROUP_NORM: its
# kernels take and return channels-last images (BiT's norms between its convolutions)
_FRIENDLY = {OpKind.CONV2D, OpKind.BATCH_NORM, OpKind.MAX_POOL2D, OpKind.AVG_POOL2D, OpKind.ADAPTIVE_AVG_POOL2D,
             OpKind.PAD, OpKind.GROUP_NORM}


def _friendly(n: Node, consts) -> bool:
    if any(o.type.rank != 4 for o in n.outputs):
        return False
    if n.op in _FRIENDLY:
        return True
    if n.op is OpKind.MEAN:
        return n.attrs.axes == (2, 3) and n.attrs.keepdim
    if opdef(n.op).category is Category.ELEMENTWISE and n.op is not OpKind.TO_LAYOUT:
        # every tensor operand is the same 4-D shape (no broadcasting across layouts)
        return all(v in consts or (v.type.rank == 4 and v.type.shape == n.outputs[0].type.shape)
                   for v in n.inputs if v is not None)
    return False


def channels_last(graph: Graph) -> Graph:
    consts = graph.constants
    if not any(n.op is OpKind.CONV2D for n in graph.nodes):
        return graph
    producer = {o: n for n in graph.nodes for o in n.outputs}
    friendly = {n for n in graph.nodes if _friendly(n, consts)}
    # union-find over friendly nodes connected by values
    parent = {n: n for n in friendly}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in friendly:
        for v in n.inputs:
            p = producer.get(v)
            if p in friendly:
                parent[find(p)] = find(n)
    groups: dict[Node, set[Node]] = {}
    for n in friendly:
        groups.setdefault(find(n), set()).add(n)
    chain = set().union(*[g for g in groups.values() if any(n.op is OpKind.CONV2D for n in g)]) if groups else set()
    if not chain:
        return graph

    new_consts = dict(consts)
    env: dict[Value, Value] = {}  # old value -> NHWC value (inside chains)
    to_cl: dict[Value, Value] = {}  # source value -> its NHWC copy
    to_row: dict[Value, Value] = {}  # NHWC value -> its NCHW copy
    prepacked: dict[Value, Value] = {}
    nodes: list[Node] = []

    def emit_layout(v: Value, layout: Layout) -> Value:
        out = Value(TensorType(v.type.dtype, v.type.shape, layout, v.type.quant), f"{v.name}_{layout.kind.value}")
        nodes.append(Node(OpKind.TO_LAYOUT, (v,), A.LayoutAttrs(layout), (out,), "layout"))
        return out

    def row_major(v: Value) -> Value:
        """The value as the rest of the graph expects it (NCHW)."""
        if v in env:
            cl = env[v]
            if cl not in to_row:
                to_row[cl] = emit_layout(cl, ROW)
            return to_row[cl]
        return v

    for n in graph.nodes:
        if n not in chain:
            ins = tuple(None if v is None else row_major(v) for v in n.inputs)
            nodes.append(n if ins == n.inputs else Node(n.op, ins, n.attrs, n.outputs, n.scope))
            continue
        ins = []
        for i, v in enumerate(n.inputs):
            if v is None:
                ins.append(None)
            elif v in env:
                ins.append(env[v])
            elif v in consts:
                if n.op is OpKind.CONV2D and i == 1 and v.type.rank == 4:  # prepack the weight
                    if v not in prepacked:
                        pv = Value(TensorType(v.type.dtype, v.type.shape, CHANNELS_LAST), f"{v.name}_nhwc")
                        new_consts[pv] = consts[v].contiguous(memory_format=torch.channels_last)
                        prepacked[v] = pv
                    ins.append(prepacked[v])
                else:
                    ins.append(v)
            elif v.type.rank != 4:
                ins.append(v)  # a conv bias that is a graph input (weights lifted by torch.compile): no layout
            else:
                if v not in to_cl:
                    to_cl[v] = emit_layout(v, CHANNELS_LAST)
                ins.append(to_cl[v])
        outs = tuple(Value(TensorType(o.type.dtype, o.type.shape, CHANNELS_LAST, o.type.quant), o.name)
                     for o in n.outputs)
        for o, no in zip(n.outputs, outs):
            env[o] = no
        nodes.append(Node(n.op, tuple(ins), n.attrs, outs, n.scope))
    outputs = tuple(row_major(v) for v in graph.outputs)
    g = graph.replace(nodes=tuple(nodes), outputs=outputs, constants=new_consts)
    from .rewrite import dead_code_elimination

    return dead_code_elimination(g)
