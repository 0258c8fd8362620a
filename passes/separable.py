"""Separable batches: whether a graph computes each row of its leading axis on its own.

A dynamic vision model's batch is such an axis: every convolution, pooling, norm, linear and
elementwise op computes sample ``i`` of its output from sample ``i`` of its inputs alone, so
the batch can run in chunks of rows through the whole graph (``runtime.chunks``) and give
the same rows. What a chunk buys is memory: the activations of 16 images instead of 32, and
oneDNN's per-shape primitives and caches for at most the chunk's batch sizes instead of every
batch a stream brings.

The analysis is conservative and by op kind: an op it does not know to be row-wise (a
recurrence, a fallback, a library op), an axis argument that touches the leading axis (a
reduction, softmax, concat, slice or pad over it; a permute or reshape that moves it), or a
value that carries the batch anywhere but its leading axis makes the whole graph
inseparable, with the reason. Values that do not carry the batch (weights, values computed
from them) are shared by every chunk.
"""
from __future__ import annotations

from kiln.ir import Graph, LayoutKind, Node, OpKind, Value, opdef
from kiln.ir.ops import Category
from kiln.ir.record import record
from kiln.ir.types import Sym

# every sample of the output from the same sample of each input that carries the batch;
# inputs that do not are parameters (weights, biases, running statistics)
_PER_SAMPLE = {OpKind.CONV2D, OpKind.QCONV2D, OpKind.SPARSE_CONV2D, OpKind.MAX_POOL2D, OpKind.AVG_POOL2D,
               OpKind.ADAPTIVE_AVG_POOL2D, OpKind.GROUP_NORM, OpKind.BATCH_NORM, OpKind.LINEAR, OpKind.QLINEAR,
               OpKind.QLINEAR_DYNAMIC, OpKind.LINEAR_WEIGHT_ONLY, OpKind.SPARSE_LINEAR, OpKind.LAYER_NORM,
               OpKind.MAX_POOL3D, OpKind.AVG_POOL3D, OpKind.ADAPTIVE_AVG_POOL3D}
# ops over axes given in their attributes: separable when none of those axes is the batch's
_AXES = {OpKind.SUM, OpKind.MEAN, OpKind.MAX, OpKind.MIN, OpKind.PROD, OpKind.ARGMAX, OpKind.CUMSUM,
         OpKind.SOFTMAX, OpKind.LOG_SOFTMAX, OpKind.CONCAT, OpKind.SLICE}


@record(slots=False)
class Separable:
    """The verdict: ``size`` (the batch's name) when the graph is separable along it, else
    None and ``why`` says what stops it."""
    size: str | None
    why: str = ""


def _carries(v: Value | None, batch: Sym) -> bool:
    """Whether the value's shape depends on the batch (its data then does too)."""
    return v is not None and batch.name in v.type.symbols


def _leading(v: Value, batch: Sym) -> bool:
    """The batch is the value's leading dim, and no other dim depends on it."""
    shape = v.type.shape
    return bool(shape) and shape[0] == batch and not any(isinstance(d, Sym) for d in shape[1:])


def _axes_ok(node: Node, rank: int) -> bool:
    a = node.attrs
    if node.op in (OpKind.SUM, OpKind.MEAN, OpKind.MAX, OpKind.MIN, OpKind.PROD):
        return 0 not in tuple(x % rank for x in a.axes)
    return a.axis % rank != 0


def _why_not(node: Node, batch: Sym) -> str | None:
    """Why ``node`` does not compute each sample on its own (None: it does)."""
    ins = [v for v in node.inputs if _carries(v, batch)]
    if not ins and not any(_carries(o, batch) for o in node.outputs):
        return None  # computes from weights only: shared by every chunk
    for v in (*ins, *node.outputs):
        if not _leading(v, batch):
            return f"{v.name} does not lead with the batch (or has it elsewhere too)"
    op, cat = node.op, opdef(node.op).category
    if not ins:  # makes a batch from nothing: only a broadcast to it copies one row per sample
        return None if op is OpKind.EXPAND else "its output has a batch its inputs do not"
    if op in _PER_SAMPLE or op is OpKind.ATTENTION:
        # the op contracts, pools or normalizes trailing axes: the batch must not be one of them
        low = 3 if op is OpKind.ATTENTION else 2  # attention mixes the rows of axis -2
        if any(v.type.rank < low for v in ins):
            return "the batch is an axis it works along"
        if op is OpKind.LAYER_NORM and node.attrs.normalized_ndim >= ins[0].type.rank:
            return "it normalizes over the batch axis"
        if op in _PER_SAMPLE:
            return None
    if op is OpKind.ATTENTION or cat is Category.ELEMENTWISE:
        out = node.outputs[0]
        for v in node.inputs:  # an operand without the batch must broadcast along it
            if v is not None and not _carries(v, batch) and v.type.rank == out.type.rank and v.shape[0] != 1:
                return f"{v.name} is aligned with the batch axis without carrying it"
        return None
    if op in _AXES:
        return None if _axes_ok(node, node.inputs[0].type.rank) else "it works along the batch axis"
    if op is OpKind.TO_LAYOUT:  # every layout keeps the samples outermost
        return None
    if op is OpKind.PERMUTE:
        return None if node.attrs.perm[0] == 0 else "it moves the batch axis"
    if op in (OpKind.RESHAPE, OpKind.EXPAND):
        if op is OpKind.RESHAPE and node.inputs[0].type.layout.kind is not LayoutKind.ROW_MAJOR:
            return "a reshape of a non-row-major layout"
        return None  # both sides lead with the batch: each sample's elements stay its own
    if op is OpKind.PAD:
        return None if node.attrs.pads[:2] == (0, 0) else "it pads the batch axis"
    if op is OpKind.MATMUL:
        a, b = node.inputs[0], node.inputs[1]
        if _carries(b, batch) and (b.type.rank < 3 or not _carries(a, batch) or a.type.rank < 3):
            return "the batch is a contracted or broadcast matmul axis"
        return None
    return f"{op.value} is not known to compute each sample on its own"


def separable_batch(graph: Graph) -> Separable:
    """Whether ``graph`` runs in chunks of its leading axis: every input leads with one
    symbolic size (or does not carry it) and is its only symbolic size, every output leads
    with it, and every node computes each sample from the same sample of its operands."""
    if not graph.inputs:
        return Separable(None, "the graph has no inputs")
    lead = graph.inputs[0].type.shape[:1]
    if not lead or not isinstance(lead[0], Sym) or lead[0].symbols != {lead[0].name}:
        return Separable(None, "its first input's leading dim is not a symbolic size")
    batch = lead[0]
    for v in (*graph.inputs, *(n for node in graph.nodes for n in node.outputs)):
        others = v.type.symbols - {batch.name}
        if others:
            return Separable(None, f"{v.name} has other symbolic sizes ({', '.join(sorted(others))})")
    for node in graph.nodes:
        why = _why_not(node, batch)
        if why is not None:
            where = f" ({node.scope})" if node.scope else ""
            return Separable(None, f"{node.op.value}{where}: {why}")
    for v in graph.outputs:
        if not _carries(v, batch) or not _leading(v, batch):
            return Separable(None, f"output {v.name} does not lead with {batch.name}")
    return Separable(batch.name)
