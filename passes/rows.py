"""Demanded rows: compute only the part of a value along one axis that its readers use.

A BERT classifier reads one token of its last encoder layer (the pooler takes
``hidden[:, 0]``), yet as written every op of that layer runs on all 128 tokens. This pass
walks the graph backwards and records, for each value, which rows of one axis its readers
need: all of it, or one contiguous range ``Rows(axis, start, end)``. Where every reader of a
value wants the same range and the producing op computes each row of that axis from the
same rows of its inputs (elementwise ops; reductions, normalizations and linears over other
axes; the row side of a matmul, the query side of attention, permutes and reshapes that keep the
axis), the op is rebuilt on the sliced inputs; the demand then moves on to those inputs.
The slice reads end up where a value is also needed whole (for BERT: the last layer's
input, which the key and value projections read in full), and the last layer's query
projection, attention rows, output projection, layer norms and feed-forward run on one
token instead of 128: 6.9% of BERT-base's FLOPs (`kiln dump bert --stats`, total MFLOP
20,842 against 22,393 with `--passes=-demanded_rows`).

A decoder classifier reads one token too, but which one is known only at run time: Hugging
Face's ``*ForSequenceClassification`` heads score every position, then index the scores at
each sequence's last non-pad token (``logits[arange(batch), last]``, ``last`` an argmax over
the input ids). At batch 1 that index is a pick of rows along the sequence axis,
``Picked(axis, index, count)``: the same walk moves it up through the same ops, and where a
value is also needed whole a TAKE of the picked rows reads them (the index, computed from the
input ids after the layers in the order the model was written, moves up to before its first
reader). The last layer's query rows, attention rows, output projection, norms and MLP then
run on one token: the keys and values stay whole (the layer's cache outputs need them anyway).

Exact by construction: a rebuilt op computes the same values for the rows it keeps (no
reduction, normalization or contraction runs along the sliced axis), up to the summation
order a GEMM kernel picks for the smaller shape. Ops it does not know take their inputs
whole, and the slice stays where it was.
"""
from __future__ import annotations

import heapq
import math

from kiln.ir import Graph, LayoutKind, Node, OpKind, Value, opdef
from kiln.ir import attrs as A
from kiln.ir.ops import Category
from kiln.ir.record import record

from .rewrite import Rewriter, dead_code_elimination


@record(slots=False)
class Rows:
    """Rows ``start:end`` of ``axis``."""
    axis: int
    start: int
    end: int

    def on(self, axis: int) -> "Rows":
        """The same rows of another axis (of an input the op reads them from)."""
        return Rows(axis, self.start, self.end)

    @property
    def size(self) -> int:
        return self.end - self.start

    def whole(self, v: Value) -> bool:
        return self.start == 0 and self.end == v.shape[self.axis]


@record(slots=False)
class Picked:
    """The rows of ``axis`` that a runtime index picks (``index``: ``count`` int32/int64
    positions, computed by the graph — a decoder classifier's last real token)."""
    axis: int
    index: Value
    count: int

    def on(self, axis: int) -> "Picked":
        return Picked(axis, self.index, self.count)

    @property
    def size(self) -> int:
        return self.count

    def whole(self, v: Value) -> bool:
        return False


FULL = None  # the whole value is needed

# elementwise ops whose attributes say nothing about shape (quantize/dequantize may carry a
# per-channel axis)
_ELEMENTWISE_ATTRS = (A.NoAttrs, A.GeluAttrs, A.LeakyReluAttrs, A.ClampAttrs, A.CastAttrs, A.DivAttrs)


def _plain(v: Value) -> bool:
    """Plain row-major layout, not quantized (per-axis scales would need slicing). Symbolic
    dims are fine: the pass compares sizes only for equality (``Sym``s are canonical, so equal
    expressions compare equal), and a size it cannot prove equal it treats as different."""
    return v.type.layout.kind is LayoutKind.ROW_MAJOR and v.type.quant is None


def _broadcast_input(v: Value | None, out: Value, d: Rows):
    """The demand on an elementwise operand: the same rows of its aligned axis, or all of it
    when it broadcasts along that axis (size 1 or no such axis)."""
    if v is None:
        return FULL
    ax = d.axis - (out.type.rank - v.type.rank)
    if ax < 0 or v.shape[ax] == 1:
        return FULL
    if v.shape[ax] != out.shape[d.axis]:
        return False
    return d.on(ax)


def _reshape_axis(src: tuple, dst: tuple, axis: int) -> int | None:
    """The axis of ``src`` that is ``dst``'s ``axis`` (same size, same product before it)."""
    before = math.prod(dst[:axis])
    for i, size in enumerate(src):
        if math.prod(src[:i]) == before and size == dst[axis]:
            return i
    return None


def input_demands(node: Node, d: Rows) -> list | None:
    """Demands on ``node``'s inputs when its readers need rows ``d`` of its one output, or
    None when the op cannot compute just those rows."""
    out = node.outputs[0]
    r, ax, op = out.type.rank, d.axis, node.op
    cat = opdef(op).category
    if cat is Category.ELEMENTWISE and isinstance(node.attrs, _ELEMENTWISE_ATTRS):
        ds = [_broadcast_input(v, out, d) for v in node.inputs]
        return None if any(x is False for x in ds) else ds
    if op is OpKind.LAYER_NORM and ax < r - node.attrs.normalized_ndim:
        return [d] + [FULL] * (len(node.inputs) - 1)
    if op in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX) and ax != node.attrs.axis % r:
        return [d]
    if op in (OpKind.SUM, OpKind.MEAN, OpKind.MAX, OpKind.MIN):  # reductions over other axes
        kept = [i for i in range(node.inputs[0].type.rank) if i not in node.attrs.axes]
        i = ax if node.attrs.keepdim else kept[ax]
        return None if i in node.attrs.axes else [d.on(i)]
    if op is OpKind.LINEAR and ax < r - 1:
        ds = [d, FULL, FULL]
        if len(node.inputs) > 3:
            res = _broadcast_input(node.inputs[3], out, d)
            if res is False:
                return None
            ds.append(res)
        return ds[:len(node.inputs)]
    if op is OpKind.MATMUL and r >= 2 and ax == r - 2:
        a = node.inputs[0]
        if a.type.rank < 2 or a.shape[-2] != out.shape[ax]:
            return None
        return [d.on(a.type.rank - 2), FULL]
    if op is OpKind.ATTENTION and ax == r - 2 and not node.attrs.causal:  # causal rows see keys by position
        q = node.inputs[0]
        if q.type.rank != r or q.shape[-2] != out.shape[ax]:
            return None
        ds = [d, FULL, FULL]
        if len(node.inputs) > 3:
            m = _broadcast_input(node.inputs[3], out, d)  # mask [..., Sq or 1, Sk]
            if m is False:
                return None
            ds.append(m)
        return ds[:len(node.inputs)]
    if op is OpKind.PERMUTE:
        return [d.on(node.attrs.perm[ax])]
    if op is OpKind.RESHAPE:
        i = _reshape_axis(tuple(node.inputs[0].shape), tuple(out.shape), ax)
        return None if i is None else [d.on(i)]
    return None


def _attrs_for(node: Node, d: Rows):
    if node.op is OpKind.RESHAPE:
        shape = list(node.attrs.shape)
        shape[d.axis] = d.size
        return A.ShapeAttrs(tuple(shape))
    return node.attrs


def _own_rows(node: Node, constants: dict) -> Rows | None:
    """A step-1 SLICE, or a TAKE of one constant index (ONNX's ``Gather`` of ``x[:, 0]``),
    as a demand on its input."""
    a = node.attrs
    if node.op is OpKind.SLICE:
        return Rows(a.axis, a.start, a.end) if a.step == 1 else None
    if node.op is OpKind.TAKE:
        idx = constants.get(node.inputs[1])
        size = node.inputs[0].shape[a.axis]
        if idx is None or idx.numel() != 1:
            return None
        i = int(idx)
        if isinstance(size, int) and -size <= i < size:
            i %= size
        elif isinstance(size, int) or i != 0:  # a symbolic size is at least 1: only index 0 is surely in range
            return None
        return Rows(a.axis, i, i + 1)
    if node.op is OpKind.INDEX:
        return _picked(node, constants)
    return None


def _picked(node: Node, constants: dict) -> Picked | None:
    """``x[0, idx]`` (an INDEX whose index tensors are all constant zeros on size-1 axes but
    one, a runtime 1-D index): the rows ``idx`` picks along that axis. The index of a
    decoder classifier's pooled logits: ``logits[arange(1), last_token]`` at batch 1."""
    x, idx = node.inputs[0], node.inputs[1:]
    picked = None
    for axis, t in enumerate(idx):
        if t is None:
            return None
        c = constants.get(t)
        if c is not None and c.numel() == 1 and x.shape[axis] == 1 and int(c.reshape(())) == 0:
            continue
        if picked is not None or c is not None or t.type.rank != 1 or not isinstance(t.shape[0], int):
            return None  # two runtime indices, a constant to push (left to constant folding), or a shape to broadcast
        picked = Picked(axis, t, t.shape[0])
    if picked is None or tuple(node.outputs[0].shape[:1]) != (picked.count,):
        return None
    return picked


def _whole(v: Value, d) -> bool:
    return d is FULL or d.whole(v)


def _in_order(nodes: list) -> list | None:
    """``nodes`` in a topological order, as close to the given one as it allows: a picked
    row's index (computed from the inputs after the layers it now reads rows of, in the order
    the model was written) moves up to before its first reader. None if there is no such
    order (an index computed from the rows it picks: the walk's FULL demands rule that out,
    and the pass then leaves the graph as it was rather than trust it)."""
    position = {n: i for i, n in enumerate(nodes)}
    producer = {v: n for n in nodes for v in n.outputs}
    waiting = {n: 0 for n in nodes}
    readers: dict[Node, list] = {}
    for n in nodes:
        for v in set(n.inputs) & producer.keys():  # graph inputs and constants are ready
            readers.setdefault(producer[v], []).append(n)
            waiting[n] += 1
    ready = [position[n] for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        n = nodes[heapq.heappop(ready)]
        out.append(n)
        for r in readers.get(n, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, position[r])
    return out if len(out) == len(nodes) else None


def push_row_slices(graph: Graph) -> Graph:
    # -- backwards: what each value's readers need ----------------------------------
    demand: dict[Value, object] = {v: FULL for v in graph.outputs}
    unset = object()
    plans: dict[Node, list] = {}  # nodes rebuilt on sliced inputs -> their input demands

    def need(v: Value | None, d) -> None:
        if v is None:
            return
        if d is not FULL and _whole(v, d):
            d = FULL
        cur = demand.get(v, unset)
        demand[v] = d if cur is unset or cur == d else FULL

    for node in reversed(graph.nodes):
        single = len(node.outputs) == 1 and _plain(node.outputs[0])
        d = demand.get(node.outputs[0], FULL) if single else FULL
        ins = None
        if d is not FULL and all(v is None or _plain(v) for v in node.inputs):
            ins = input_demands(node, d)
        if ins is not None:
            plans[node] = ins
        elif d is FULL and (own := _own_rows(node, graph.constants)) is not None:
            ins = [own] + [FULL] * (len(node.inputs) - 1)  # the slice itself: its input needs only these rows
        for i, v in enumerate(node.inputs):
            need(v, ins[i] if ins is not None else FULL)
    if not plans:
        return graph
    picks = any(isinstance(d, Picked) for d in demand.values())

    # -- forwards: rebuild the planned nodes on sliced inputs ------------------------
    rw = Rewriter(graph)
    sliced: dict[tuple, Value] = {}  # (value, rows) -> the value holding just those rows
    replace: dict[Value, Value] = {}

    def rows_of(v: Value, d) -> Value:
        got = sliced.get((v, d))
        if got is None:  # computed whole: read the rows with a slice (or the picked ones with a take)
            if isinstance(d, Picked):
                got = rw.add(OpKind.TAKE, replace.get(v, v), replace.get(d.index, d.index), attrs=A.AxisAttrs(d.axis))
            else:
                got = rw.add(OpKind.SLICE, replace.get(v, v), attrs=A.SliceAttrs(d.axis, d.start, d.end))
            sliced[(v, d)] = got
        return got

    for node in graph.nodes:
        rw.scope = node.scope
        own = _own_rows(node, graph.constants)
        if node in plans:
            ins = [None if v is None else rows_of(v, dv) if dv is not FULL else replace.get(v, v)
                   for v, dv in zip(node.inputs, plans[node])]
            d = demand[node.outputs[0]]
            sliced[(node.outputs[0], d)] = rw.add(node.op, *ins, attrs=_attrs_for(node, d))
        elif own is not None and demand.get(node.inputs[0], FULL) == own and not _whole(node.inputs[0], own):
            rows = rows_of(node.inputs[0], own)  # the rows are already there
            out = node.outputs[0]
            if node.op in (OpKind.TAKE, OpKind.INDEX):  # a scalar index drops the axis, x[0, idx] the size-1 ones
                rows = rw.add(OpKind.RESHAPE, rows, attrs=A.ShapeAttrs(tuple(out.shape)))
            replace[out] = rows
        else:
            rw.emit(Node(node.op, tuple(None if v is None else replace.get(v, v) for v in node.inputs), node.attrs,
                         node.outputs, node.scope))
    outputs = tuple(replace.get(v, v) for v in graph.outputs)
    nodes = _in_order(rw.nodes) if picks else rw.nodes
    if nodes is None:
        return graph
    return dead_code_elimination(Graph(graph.inputs, tuple(nodes), outputs, rw.constants, graph.name))
