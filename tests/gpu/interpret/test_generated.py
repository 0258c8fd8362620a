"""Generated Triton kernels for fused groups, run by Triton's CPU interpreter, against the
reference executor; and whole models compiled for target cuda, run the same way."""
import os
import sys

import pytest
import torch
from torch import nn

import kiln
from kiln.ir import DType, GraphBuilder, Layout, LayoutKind, OpKind
from kiln.ir import attrs as A
from kiln.passes.partition import partition
from kiln.runtime.cuda_steps import build_gpu_plan
from kiln.target import cuda

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interpret_device import default_device, skip_unless_runnable  # noqa: E402,F401  (an autouse fixture)

skip_unless_runnable()


def random_inputs(graph):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(tuple(v.type.shape), generator=g, device="cpu").to(v.type.dtype.to_torch())
            .to(torch.get_default_device()) for v in graph.inputs]


def run_graph(graph, inputs):
    from kiln.runtime.plan import build_plan

    with torch.no_grad():
        return build_plan(graph, "reference").run(list(inputs))


def check(graph, inputs=None, expect_generated=True, rel=1e-4):
    inputs = inputs if inputs is not None else random_inputs(graph)
    plan = build_gpu_plan(graph, partition(graph), cuda("sm_90"), tune="none")
    if expect_generated:
        assert any(s.kernel.startswith("gen.") for s in plan.steps), plan.kernel_names
        assert not plan.torch_ops, plan.torch_ops
    out = plan.run(list(inputs))
    ref = run_graph(graph, inputs)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        if o.dtype.is_floating_point:
            err = (o.double() - r.double()).abs().max().item()
            assert err <= rel * max(1.0, r.abs().max().item()), err
        else:
            assert torch.equal(o, r)
    return plan


def test_broadcast_and_multiple_outputs():
    b = GraphBuilder()
    x = b.input("x", (4, 1, 8))
    y = b.input("y", (3, 8))
    s = b.add(OpKind.ADD, x, y)  # [4, 3, 8]
    r = b.add(OpKind.RELU, b.add(OpKind.MUL, s, b.const(torch.tensor(1.5))))
    e = b.add(OpKind.TANH, b.add(OpKind.SUB, r, b.const(torch.randn(8))))
    plan = check(b.build([r, e]))
    assert plan.kernel_names == {"gen.elementwise": 1}  # both outputs from one kernel


def test_masks_comparisons_and_casts():
    b = GraphBuilder()
    x = b.input("x", (5, 7))
    m = b.add(OpKind.GT, x, b.const(torch.tensor(0.2)))
    w = b.add(OpKind.WHERE, m, b.add(OpKind.EXP, x), b.add(OpKind.NEG, x))
    f = b.add(OpKind.CAST, m, attrs=A.CastAttrs(DType.FLOAT32))
    c = b.add(OpKind.CLAMP, b.add(OpKind.ADD, w, f), attrs=A.ClampAttrs(-0.5, 2.0))
    g = b.add(OpKind.GELU, c, attrs=A.GeluAttrs(A.GeluApprox.TANH))
    check(b.build([g, m]))


def test_reduction_over_last_axis_with_prologue_and_epilogue():
    b = GraphBuilder()
    x = b.input("x", (6, 40))
    y = b.add(OpKind.EXP, b.add(OpKind.MUL, x, b.const(torch.tensor(0.5))))
    s = b.add(OpKind.SUM, y, attrs=A.ReduceAttrs((1,), True))
    z = b.add(OpKind.DIV, y, s)
    t = b.add(OpKind.MAX, z, attrs=A.ReduceAttrs((1,)))
    plan = check(b.build([b.add(OpKind.RELU, t)]))
    assert plan.kernel_names == {"gen.reduction": 2}


@pytest.mark.parametrize("op", [OpKind.SUM, OpKind.MEAN, OpKind.MAX, OpKind.MIN])
@pytest.mark.parametrize("axes,keepdim", [((1,), False), ((0, 2), True), ((1, 2), False)])
def test_reductions_over_inner_axes(op, axes, keepdim):
    b = GraphBuilder()
    x = b.input("x", (3, 5, 7))
    r = b.add(op, b.add(OpKind.ABS, x), attrs=A.ReduceAttrs(axes, keepdim))
    check(b.build([b.add(OpKind.SQRT, r)]))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("op", [OpKind.SOFTMAX, OpKind.LOG_SOFTMAX])
def test_softmax_over_any_axis(op, axis):
    b = GraphBuilder()
    x = b.input("x", (3, 6, 5))
    y = b.add(op, b.add(OpKind.MUL, x, b.const(torch.tensor(2.0))), attrs=A.AxisAttrs(axis))
    check(b.build([b.add(OpKind.ADD, y, b.const(torch.tensor(1.0)))]))


def test_layer_norm_with_fused_prologue_and_two_output_shapes():
    b = GraphBuilder()
    x = b.input("x", (2, 9, 48))
    r = b.input("r", (2, 9, 48))
    s = b.add(OpKind.ADD, x, r)  # used outside too: a second (injective) kernel writes it
    y = b.add(OpKind.LAYER_NORM, s, b.const(torch.randn(48)), b.const(torch.randn(48)), attrs=A.LayerNormAttrs(1, 1e-5))
    pooled = b.add(OpKind.RESHAPE, b.add(OpKind.SLICE, y, attrs=A.SliceAttrs(1, 0, 1)), attrs=A.ShapeAttrs((2, 48)))
    plan = check(b.build([pooled, s]))
    assert plan.kernel_names == {"gen.elementwise": 1, "gen.reduction": 1}


def test_movement_ops():
    b = GraphBuilder()
    x = b.input("x", (2, 3, 4, 5))
    p = b.add(OpKind.PERMUTE, x, attrs=A.PermuteAttrs((0, 2, 1, 3)))  # [2, 4, 3, 5]
    r = b.add(OpKind.RESHAPE, p, attrs=A.ShapeAttrs((8, 15)))
    sl = b.add(OpKind.SLICE, r, attrs=A.SliceAttrs(1, 1, 13, 3))  # [8, 4]
    e = b.add(OpKind.EXPAND, b.input("y", (8, 1)), attrs=A.ShapeAttrs((8, 4)))
    c = b.add(OpKind.CONCAT, sl, e, b.add(OpKind.EXP, sl), attrs=A.AxisAttrs(1))  # [8, 12]
    pd = b.add(OpKind.PAD, c, attrs=A.PadAttrs((1, 0, 2, 3), A.PadMode.CONSTANT, -1.0))  # [9, 17]
    check(b.build([b.add(OpKind.RELU, pd)]))


def test_take_embedding_gather():
    b = GraphBuilder()
    table = b.const(torch.randn(10, 6))
    ids = b.input("ids", (2, 5), DType.INT64)
    e = b.add(OpKind.TAKE, table, ids, attrs=A.AxisAttrs(0))  # [2, 5, 6]
    y = b.add(OpKind.ADD, e, b.const(torch.randn(5, 6)))
    check(b.build([y]), [torch.tensor([[0, 9, 3, 3, 1], [2, -1, 4, 5, 7]])])


def test_channels_last_values():
    b = GraphBuilder()
    x = b.input("x", (2, 3, 4, 5))
    cl = b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(Layout(LayoutKind.CHANNELS_LAST)))
    y = b.add(OpKind.SIGMOID, cl)
    back = b.add(OpKind.TO_LAYOUT, b.add(OpKind.MUL, y, y), attrs=A.LayoutAttrs(Layout()))
    check(b.build([b.add(OpKind.PERMUTE, back, attrs=A.PermuteAttrs((0, 2, 3, 1)))]))


def test_uncovered_op_runs_in_torch_and_is_reported():
    b = GraphBuilder()
    x = b.input("x", (4, 6))
    y = b.add(OpKind.POW, b.add(OpKind.ABS, x), b.const(torch.tensor(1.5)))
    plan = check(b.build([b.add(OpKind.EXP, y)]), expect_generated=False)
    assert "pow" in plan.torch_ops and "no template" in plan.torch_ops["pow"]


class TinyCNN(nn.Module):
    """ResNet's group kinds (conv+bn+relu, residual, max pool, global mean, linear) at a size
    the interpreter runs in seconds."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 1, 2)
        self.conv3 = nn.Conv2d(8, 16, 3, 2, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        x = torch.relu(self.conv3(x) + self.down(x))
        return self.fc(x.mean((2, 3)))


def _models():
    from kiln.models import get

    cnn = TinyCNN().eval()
    for bn in (cnn.bn1, cnn.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    yield "tiny_cnn", cnn, (torch.randn(2, 3, 16, 16),)
    yield ("bert",) + tuple(get("bert", layers=1, hidden=32, heads=2, ffn=64, seq=12, vocab=50))
    yield ("lstm",) + tuple(get("lstm", batch=3, seq=5, hidden=16, layers=2))


@pytest.mark.parametrize("name,model,inputs", list(_models()), ids=lambda x: x if isinstance(x, str) else "")
def test_models_compiled_for_cuda_match_eager(name, model, inputs):
    device = torch.get_default_device()  # cpu under the interpreter, cuda on a GPU
    model, inputs = model.to(device), tuple(x.to(device) for x in inputs)
    cm = kiln.compile(model, inputs, target="cuda", tune="none")
    plan = cm.compiled[0].plan
    assert not plan.torch_ops, plan.torch_ops  # every op runs in a Triton kernel
    with torch.no_grad():
        out, ref = cm(*inputs), model(*inputs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err
