"""Partition into kernel groups: fusion decisions and group boundaries."""
import torch

from kiln.ir import GraphBuilder, Layout, OpKind
from kiln.ir import attrs as A
from kiln.passes.partition import GroupKind, partition, verify_partition

from conftest import assert_same_outputs


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


def _residual_group_norm_graph():
    """A PoolFormer-like block after the layout pass: a channels-last residual stream
    (conv, then an add) read by the next residual add and, as NCHW, by a one-group group
    norm (reshape -> layer norm -> reshape), whose result goes back to channels-last."""
    from kiln.ir import Layout, LayoutKind

    cl, row = Layout(LayoutKind.CHANNELS_LAST), Layout()
    b = GraphBuilder("pool")
    x = b.input("x", (1, 8, 6, 6))
    xc = b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(cl))
    y = b.add(OpKind.CONV2D, xc, b.const(torch.randn(8, 8, 1, 1)), attrs=A.Conv2dAttrs())
    r = b.add(OpKind.ADD, y, xc)  # the residual stream, read twice
    t = b.add(OpKind.RESHAPE, b.add(OpKind.TO_LAYOUT, r, attrs=A.LayoutAttrs(row)), attrs=A.ShapeAttrs((1, 1, 288)))
    t = b.add(OpKind.RESHAPE, b.add(OpKind.LAYER_NORM, t, attrs=A.LayerNormAttrs(1, 1e-5)),
              attrs=A.ShapeAttrs((1, 8, 6, 6)))
    out = b.add(OpKind.ADD, r, b.add(OpKind.TO_LAYOUT, t, attrs=A.LayoutAttrs(cl)))
    return b.build([b.add(OpKind.TO_LAYOUT, out, attrs=A.LayoutAttrs(row))])


def test_layout_change_into_a_norm_joins_the_norm_not_its_producer():
    # the residual stream is stored once (channels-last); the norm reads it through the
    # layout change instead of the producer's group writing an NCHW copy beside it
    p = partition(_residual_group_norm_graph())
    verify_partition(p)
    assert _kinds(p)[:2] == [(GroupKind.INJECTIVE, ["to_layout"]), (GroupKind.COMPUTE, ["conv2d", "add"])]
    conv = p.groups[1]
    assert [o.name for o in conv.outputs] == [conv.nodes[-1].outputs[0].name]  # one output: no copy
    norm = next(g for g in p.groups if "layer_norm" in g.ops)
    assert norm.kind == GroupKind.REDUCTION and norm.ops[:3] == ["to_layout", "reshape", "layer_norm"]
    assert norm.inputs == conv.outputs


def test_layout_change_with_a_sole_reader_still_joins_its_producer():
    # nothing else reads the source: joining the producer writes one value, as before
    b = GraphBuilder()
    x = b.input("x", (1, 4, 3, 3))
    e = b.add(OpKind.EXP, x)
    t = b.add(OpKind.RESHAPE, b.add(OpKind.TO_LAYOUT, e, attrs=A.LayoutAttrs(Layout())), attrs=A.ShapeAttrs((1, 1, 36)))
    p = partition(b.build([b.add(OpKind.LAYER_NORM, t, attrs=A.LayerNormAttrs(1, 1e-5))]))
    verify_partition(p)
    assert _kinds(p) == [(GroupKind.REDUCTION, ["exp", "to_layout", "reshape", "layer_norm"])]


def test_residual_group_norm_block_matches_eager_with_generated_groups(monkeypatch):
    # numbers: the norm group reads the channels-last stream through the layout change
    import kiln

    monkeypatch.setenv("KILN_GROUP_CHOICE", "generated")
    monkeypatch.setenv("KILN_CACHE", "0")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(16, 16, 1)
            self.norm = torch.nn.GroupNorm(1, 16)
            self.mlp = torch.nn.Conv2d(16, 16, 1)

        def forward(self, x):
            r = x + self.conv(x)
            return r + self.mlp(self.norm(r))

    torch.manual_seed(0)
    m, x = Block().eval(), torch.randn(1, 16, 12, 12)
    c = kiln.compile(m, (x,))
    p = c.compiled[0].partition
    norm = next(g for g in p.groups if "layer_norm" in g.ops)
    assert norm.ops[0] == "to_layout"  # the partition this test is about
    kernels = dict(zip(c.compiled[0].graph.nodes, c.compiled[0].plan.node_kernels))
    assert all(kernels[n].startswith("tvm.group") for n in norm.nodes)  # ... run as one generated kernel
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)


def _grn_graph():
    """ConvNeXt V2's GRN after a bf16 GEMM: the GEMM's result widened to f32 feeds both the
    statistic (a sum of squares over the pixels) and the apply (x * scale + x)."""
    from kiln.ir import DType

    b = GraphBuilder("grn")
    x = b.input("x", (1, 16, 32), DType.BFLOAT16)
    lin = b.add(OpKind.LINEAR, x, b.const(torch.randn(32, 32).to(torch.bfloat16)))
    c = b.add(OpKind.CAST, lin, attrs=A.CastAttrs(DType.FLOAT32))
    s = b.add(OpKind.SQRT, b.add(OpKind.SUM, b.add(OpKind.MUL, c, c), attrs=A.ReduceAttrs((1,), True)))
    m = b.add(OpKind.MEAN, s, attrs=A.ReduceAttrs((2,), True))
    d = b.add(OpKind.DIV, s, b.add(OpKind.ADD, m, b.const(torch.tensor(1e-6))))
    return b.build([b.add(OpKind.ADD, b.add(OpKind.MUL, c, d), c)])


def test_a_cheap_tail_read_by_two_reductions_is_cloned_one_copy_each():
    g = _grn_graph()
    p = partition(g)
    verify_partition(p)
    casts = [n for n in p.graph.nodes if n.op is OpKind.CAST]
    assert len(casts) == 2 and len(g.nodes) + 1 == len(p.graph.nodes)
    owner = {n: grp for grp in p.groups for n in grp.nodes}
    readers = {c: {owner[r].id for r in p.graph.nodes if c.outputs[0] in r.inputs and r not in owner[c].nodes}
               for c in casts}
    # the statistic's copy is read through the GEMM's tail (the square), the apply's directly
    assert readers[casts[1]] and readers[casts[0]] == set()
    sq = next(n for n in p.graph.nodes if n.op is OpKind.MUL and n.inputs[0] is casts[0].outputs[0])
    assert owner[sq] is owner[casts[0]] is owner[casts[1]]  # the GEMM's epilogue, cut apart by the plan
    assert_same_outputs(g, p.graph)


def test_a_tail_read_by_a_compute_group_is_not_cloned():
    b = GraphBuilder()
    x = b.input("x", (4, 8))
    lin = b.add(OpKind.LINEAR, x, b.const(torch.randn(8, 8)))
    e = b.add(OpKind.RESHAPE, lin, attrs=A.ShapeAttrs((4, 8)))
    s = b.add(OpKind.SUM, e, attrs=A.ReduceAttrs((1,), True))
    g = b.build([s, b.add(OpKind.LINEAR, e, b.const(torch.randn(8, 8)))])
    assert partition(g).graph is g


def test_grn_after_a_bf16_gemm_matches_eager_with_the_plan_reading_the_gemm_output(monkeypatch):
    import kiln

    monkeypatch.setenv("KILN_GROUP_CHOICE", "generated")
    monkeypatch.setenv("KILN_CACHE", "0")

    class GRNBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 64)
            self.gamma = torch.nn.Parameter(torch.randn(64))

        def forward(self, x):  # x: (1, H, W, C), as ConvNeXt V2 after its permute
            h = self.fc(x)
            gx = torch.norm(h, p=2, dim=(1, 2), keepdim=True)
            nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
            return self.gamma * (h * nx) + h

    torch.manual_seed(0)
    m, x = GRNBlock().eval(), torch.randn(1, 12, 12, 32)
    c = kiln.compile(m, (x,), precision="bf16")
    graph, plan = c.compiled[0].graph, c.compiled[0].plan
    casts = [n for n in graph.nodes if n.op is OpKind.CAST and n.inputs[0].type.dtype.value == "bfloat16"
             and n.outputs[0].type.dtype.value == "float32" and n.inputs[0].type.rank == 4]
    assert len(casts) == 2  # one widening per reduction group ...
    kernels = dict(zip(graph.nodes, plan.node_kernels))
    assert all(kernels[n].startswith("tvm.group") for n in casts)
    assert kernels[casts[0]] != kernels[casts[1]]  # ... each run inside its own group's kernel
    with torch.no_grad():
        want = m(x)
        got = c(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
