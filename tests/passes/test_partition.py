"""Partition into kernel groups: fusion decisions and group boundaries."""
import torch

from kiln.ir import GraphBuilder, OpKind
from kiln.ir import attrs as A
from kiln.passes.partition import GroupKind, partition, verify_partition


def _kinds(p):
    return [(g.kind, g.ops) for g in p.groups]


def test_elementwise_chain_is_one_group_with_reduction_anchor():
    b = GraphBuilder()
    x = b.input("x", (4, 8))
    y = b.add(OpKind.EXP, b.add(OpKind.MUL, x, b.const(torch.tensor(2.0))))
    s = b.add(OpKind.SUM, y, attrs=A.ReduceAttrs((1,), True))
    z = b.add(OpKind.DIV, y, s)
    t = b.add(OpKind.MAX, z, attrs=A.ReduceAttrs((1,)))  # a second reduction starts a new group
    p = partition(b.build([b.add(OpKind.RELU, t)]))
    verify_partition(p)
    assert _kinds(p) == [(GroupKind.REDUCTION, ["mul", "exp", "sum", "div"]), (GroupKind.REDUCTION, ["max", "relu"])]
    assert p.groups[0].outputs == [z.__class__ and p.groups[0].nodes[-1].outputs[0]]


def test_compute_takes_epilogue_but_not_prologue():
    b = GraphBuilder()
    x = b.input("x", (4, 8))
    h = b.add(OpKind.NEG, x)
    y = b.add(OpKind.LINEAR, h, b.const(torch.randn(6, 8)))
    p = partition(b.build([b.add(OpKind.TANH, b.add(OpKind.MUL, y, y))]))
    verify_partition(p)
    assert _kinds(p) == [(GroupKind.INJECTIVE, ["neg"]), (GroupKind.COMPUTE, ["linear", "mul", "tanh"])]


def test_structured_and_fallback_ops_are_their_own_groups():
    b = GraphBuilder()
    q = b.input("q", (1, 2, 4, 8))
    a = b.add(OpKind.ATTENTION, q, q, q)
    fb = A.FallbackAttrs("aten.cumsum.default", (("$", 0), 3), (), (a.type,))
    c = b.add(OpKind.FALLBACK, a, attrs=fb)
    p = partition(b.build([b.add(OpKind.RELU, c)]))
    verify_partition(p)
    assert _kinds(p) == [(GroupKind.ATTENTION, ["attention"]), (GroupKind.FALLBACK, ["fallback"]),
                         (GroupKind.INJECTIVE, ["relu"])]


def test_no_cycles_between_groups():
    # x -> exp -> (a) ; a -> linear -> (l) ; add(a, l): add may not join exp's group,
    # because that group would then both feed and consume the linear's group
    b = GraphBuilder()
    x = b.input("x", (4, 8))
    a = b.add(OpKind.EXP, x)
    lin = b.add(OpKind.LINEAR, a, b.const(torch.randn(8, 8)))
    p = partition(b.build([b.add(OpKind.ADD, a, lin)]))
    verify_partition(p)
    groups = {g.ops[0]: g for g in p.groups}
    assert "add" in groups["linear"].ops  # joins the linear's group (its epilogue) instead
    assert [o.name for o in groups["exp"].outputs] == [a.name]


def test_values_used_outside_are_group_outputs():
    b = GraphBuilder()
    x = b.input("x", (3,))
    e = b.add(OpKind.EXP, x)
    n = b.add(OpKind.NEG, e)
    p = partition(b.build([n, e]))
    verify_partition(p)
    assert len(p.groups) == 1 and set(p.groups[0].outputs) == {e, n}
