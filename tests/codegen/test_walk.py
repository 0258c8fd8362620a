"""The renderer walk (``kiln.codegen.walk``) on its own, without a code-generation target: an
emitter that evaluates coordinates and values as Python numbers computes every output
element of a group, which must equal the torch reference. This checks the coordinate
rewrites (movement ops) and the normalization formulas that every target shares."""
import itertools
import math

import pytest
import torch

from kiln.codegen.walk import Emitter, Unsupported, Walker, static_shape
from kiln.ir import DType, GraphBuilder, OpKind
from kiln.ir import attrs as A

from conftest import random_inputs, run_graph

PY_OPS = {
    OpKind.ADD: lambda em, n, a, b: a + b,
    OpKind.MUL: lambda em, n, a, b: a * b,
    OpKind.EXP: lambda em, n, x: math.exp(x),
    OpKind.RELU: lambda em, n, x: max(x, 0.0),
    OpKind.TANH: lambda em, n, x: math.tanh(x),
}


class PyEmitter(Emitter):
    """Coordinates are ints, values floats; a load reads the (logical) input tensor."""

    OPS = PY_OPS
    target = "python"

    def __init__(self, env):
        self.env = env

    def index(self, k): return k
    def is_zero(self, c): return c == 0
    def affine(self, terms, offset=0): return sum(c * k for c, k in terms) + offset
    def floordiv(self, c, k): return c // k
    def mod(self, c, k): return c % k
    def clamp(self, c, lo, hi): return min(max(c, lo), hi)
    def less(self, c, k): return c < k
    def at_least(self, c, k): return c >= k
    def all_of(self, conds): return all(conds)
    def select(self, cond, a, b): return a if cond else b
    def constant(self, x, dtype): return float(x)

    def load(self, v, coords):
        x = self.env[v][tuple(coords)].item()
        return int(x) if isinstance(x, int) else float(x)

    def reduce(self, key, kind, body, shape, axes, row):
        vals = []
        for point in itertools.product(*(range(shape[d]) for d in axes)):
            at = dict(zip(axes, point))
            vals.append(body([at.get(d, k) for d, k in enumerate(row)]))
        return {OpKind.SUM: sum, OpKind.MAX: max, OpKind.MIN: min}[kind](vals)

    def add(self, a, b): return a + b
    def sub(self, a, b): return a - b
    def mul(self, a, b): return a * b
    def div(self, a, b): return a / b
    def exp(self, a): return math.exp(a)
    def log(self, a): return math.log(a)
    def mean(self, total, count): return total / count
    def normalize(self, centered, var, eps): return centered / math.sqrt(var + eps)


def walk_outputs(graph, inputs):
    env = dict(zip(graph.inputs, inputs))
    env.update(graph.constants)
    walker = Walker(list(graph.nodes), PyEmitter(env))
    outs = []
    for v in graph.outputs:
        shape = static_shape(v)
        out = torch.empty(shape, dtype=torch.float64)
        for idx in itertools.product(*(range(d) for d in shape)):
            out[idx] = walker.value_at(v, list(idx))
        outs.append(out)
    return outs


def _movement():
    b = GraphBuilder("movement")
    x = b.input("x", (2, 3, 4, 5))
    p = b.add(OpKind.PERMUTE, x, attrs=A.PermuteAttrs((0, 2, 1, 3)))  # [2, 4, 3, 5]
    r = b.add(OpKind.RESHAPE, p, attrs=A.ShapeAttrs((8, 15)))
    sl = b.add(OpKind.SLICE, r, attrs=A.SliceAttrs(1, 1, 13, 3))  # [8, 4]
    e = b.add(OpKind.EXPAND, b.input("y", (8, 1)), attrs=A.ShapeAttrs((8, 4)))
    c = b.add(OpKind.CONCAT, sl, e, b.add(OpKind.EXP, sl), attrs=A.AxisAttrs(1))  # [8, 12]
    pd = b.add(OpKind.PAD, c, attrs=A.PadAttrs((1, 0, 2, 3), A.PadMode.CONSTANT, -1.0))  # [9, 17]
    c3 = b.add(OpKind.RESHAPE, c, attrs=A.ShapeAttrs((2, 4, 12)))
    rp = b.add(OpKind.PAD, c3, attrs=A.PadAttrs((0, 0, 1, 2, 1, 1), A.PadMode.REPLICATE))  # [2, 7, 14]
    return b.build([b.add(OpKind.RELU, pd), rp])


def _take():
    b = GraphBuilder("take")
    table = b.const(torch.randn(10, 6))
    ids = b.input("ids", (2, 5), DType.INT64)
    return b.build([b.add(OpKind.ADD, b.add(OpKind.TAKE, table, ids, attrs=A.AxisAttrs(0)), b.const(torch.randn(5, 6)))])


def _normalizations():
    b = GraphBuilder("norms")
    x = b.input("x", (2, 3, 8))
    t = b.add(OpKind.TANH, x)
    ln = b.add(OpKind.LAYER_NORM, t, b.const(torch.randn(8)), b.const(torch.randn(8)), attrs=A.LayerNormAttrs(1, 1e-5))
    sm = b.add(OpKind.SOFTMAX, x, attrs=A.AxisAttrs(1))
    lsm = b.add(OpKind.LOG_SOFTMAX, x, attrs=A.AxisAttrs(2))
    mean = b.add(OpKind.MEAN, t, attrs=A.ReduceAttrs((0, 2), True))
    mx = b.add(OpKind.MAX, x, attrs=A.ReduceAttrs((1,), False))
    y = b.input("y", (2, 4, 3, 3))
    stats = [b.const(s) for s in (torch.randn(4), torch.rand(4) + 0.5, torch.randn(4), torch.randn(4))]
    bn = b.add(OpKind.BATCH_NORM, y, *stats, attrs=A.BatchNormAttrs(1e-5))
    return b.build([ln, sm, lsm, mean, mx, bn])


@pytest.mark.parametrize("make", [_movement, _take, _normalizations], ids=["movement", "take", "normalizations"])
def test_walk_computes_the_reference(make):
    graph = make()
    if make is _take:
        inputs = [torch.tensor([[0, 9, 3, 3, 1], [2, -1, 4, 5, 7]])]
    else:
        inputs = random_inputs(graph)
    for got, want in zip(walk_outputs(graph, inputs), run_graph(graph, inputs)):
        assert got.shape == want.shape
        assert torch.allclose(got, want.double(), rtol=1e-5, atol=1e-6), (got - want.double()).abs().max()


def test_an_op_outside_the_table_is_unsupported():
    b = GraphBuilder("sigmoid")
    graph = b.build([b.add(OpKind.SIGMOID, b.input("x", (3,)))])
    with pytest.raises(Unsupported, match="python has no template for sigmoid"):
        walk_outputs(graph, random_inputs(graph))
