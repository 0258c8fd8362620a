"""Kiln's C++ int8/int4 GEMMs as kernel candidates for the quantized IR ops: each agrees
with the op's reference kernel on the node's own inputs (what kernel choice requires)."""
import pytest
import torch

from kiln.ir import GraphBuilder, OpKind
from kiln.ir import attrs as A
from kiln.ir import qformat
from kiln.kernels import int8_cpu
from kiln.kernels.choice import agrees
from kiln.kernels.registry import candidates

caps = int8_cpu.capabilities()


def _node(op, attrs, x_shape, consts):
    g = GraphBuilder("q")
    x = g.input("x", x_shape)
    vals = [g.const(c, f"c{i}") if c is not None else None for i, c in enumerate(consts)]
    y = g.add(op, x, *vals, attrs=attrs)
    graph = g.build([y])
    node = graph.nodes[-1]
    return node, [None] + [graph.constants.get(v) if v is not None else None for v in node.inputs[1:]]


def _check(node, consts, name, x, extra=()):
    ks = {k.name: k for k in candidates(node, "cpu")}
    assert name in ks, sorted(ks)
    ins = [x, *consts[1:], *extra]
    got = ks[name].bind(node, consts)(ins, node.attrs)
    ref = candidates(node, "reference")[0].fn(ins, node.attrs)
    assert agrees(got, ref), (got - ref).abs().max()


@pytest.mark.skipif(not caps.get("vnni"), reason="needs AVX512-VNNI")
@pytest.mark.parametrize("act", [A.Activation.NONE, A.Activation.GELU, A.Activation.TANH])
@pytest.mark.parametrize("m", [1, 37])
def test_qlinear_dynamic_native_matches_reference(act, m):
    torch.manual_seed(0)
    w = torch.randn(48, 80)
    wq, ws = qformat.quantize_weight_int8(w)
    node, consts = _node(OpKind.QLINEAR_DYNAMIC, A.QLinearDynamicAttrs(act), (2, m, 80), [wq, ws, torch.randn(48)])
    _check(node, consts, "cpu.kiln_qlinear_dynamic", torch.randn(2, m, 80))


@pytest.mark.skipif(not caps.get("int4"), reason="needs the int4 kernel")
@pytest.mark.parametrize("group", [32, 128])
def test_int4_weight_only_native_matches_reference(group):
    torch.manual_seed(1)
    w = torch.randn(32, 256)
    packed, scales = qformat.quantize_weight_int4(w, group)
    node, consts = _node(OpKind.LINEAR_WEIGHT_ONLY, A.WeightOnlyAttrs(4, group, A.Activation.RELU), (5, 256),
                         [packed, scales, None])
    _check(node, consts, "cpu.kiln_linear_int4", torch.randn(5, 256))
