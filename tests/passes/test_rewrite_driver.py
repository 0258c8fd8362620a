"""The rewrite driver and the pattern language."""
import torch

from kiln.ir import GraphBuilder, OpKind
from kiln.passes.pattern import Const, Match, Opt, P
from kiln.passes.rewrite import Rewriter, dead_code_elimination, rewrite

from conftest import assert_same_outputs, assert_structural_equal


def _graph():
    b = GraphBuilder("g")
    x = b.input("x", (2, 4))
    w = b.const(torch.randn(3, 4), "w")
    y = b.add(OpKind.LINEAR, x, w)
    z = b.add(OpKind.ADD, b.const(torch.randn(3), "b"), y)
    return b.build([b.add(OpKind.RELU, z)]), x


def test_pattern_captures_commutes_and_names_nodes():
    g, x = _graph()
    rw = Rewriter(g)
    for n in g.nodes:
        rw.emit(n)
    add = g.nodes[1].outputs[0]
    m = Match()
    pat = P(OpKind.ADD, P(OpKind.LINEAR, "x", Const("w"), Opt(Const("bias")), name="lin"), Const("b"),
            commutative=True)
    assert pat.match(add, rw, m)
    assert m["x"] is x and m.node("lin") is g.nodes[0] and m.get("bias") is None
    assert not P(OpKind.ADD, P(OpKind.LINEAR, "x", Const("w")), Const("b")).match(add, rw, Match())  # order
    assert not P(OpKind.ADD, "a", "a").match(add, rw, Match())  # a name binds one value


def test_single_use_and_where_predicates():
    b = GraphBuilder()
    x = b.input("x", (4,))
    e = b.add(OpKind.EXP, x)
    g = b.build([b.add(OpKind.ADD, e, e)])
    rw = Rewriter(g)
    for n in g.nodes:
        rw.emit(n)
    root = g.nodes[1].outputs[0]
    assert not P(OpKind.ADD, P(OpKind.EXP, "x", single_use=True), "y").match(root, rw, Match())
    assert P(OpKind.ADD, P(OpKind.EXP, "x"), "y").match(root, rw, Match())
    assert not P(OpKind.ADD, where=lambda n: False).match(root, rw, Match())


def test_rewrite_reaches_a_fixed_point_and_declines_cleanly():
    b = GraphBuilder("chain")
    x = b.input("x", (3,))
    y = x
    for _ in range(5):
        y = b.add(OpKind.NEG, y)
    g = b.build([y])

    def cancel(m, rw):
        return m["x"]

    declined = []

    def decline(m, rw):
        rw.add(OpKind.EXP, m["x"])  # emitted, then dropped because the rule declines
        declined.append(1)
        return None

    out = rewrite(g, [(P(OpKind.RELU, "x"), decline)] + [(P(OpKind.NEG, P(OpKind.NEG, "x")), cancel)], name="t")
    b2 = GraphBuilder("chain")
    e = b2.build([b2.add(OpKind.NEG, b2.input("x", (3,)))])
    assert_structural_equal(out, e)
    assert_same_outputs(g, out)
    assert not declined  # no RELU: the declining rule never ran


def test_declining_rule_leaves_nothing_behind():
    g, _ = _graph()

    def decline(m, rw):
        rw.add(OpKind.EXP, m["x"])
        return None

    out = rewrite(g, [(P(OpKind.RELU, "x"), decline)])
    assert out.op_counts() == g.op_counts()


def test_dce_drops_unused_nodes_and_constants():
    b = GraphBuilder()
    x = b.input("x", (3,))
    b.add(OpKind.MUL, x, b.const(torch.ones(3)))
    g = b.build([b.add(OpKind.RELU, x)])
    out = dead_code_elimination(g)
    assert out.op_counts() == {"relu": 1} and not out.constants
