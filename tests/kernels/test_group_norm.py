"""Group norm over channels-last images (kernels/norm_cpu.py, csrc/group_norm.cpp) and the
GROUP_NORM reference, against a float64 definition — including activations whose mean is
large beside their spread, where a one-pass variance loses digits."""
import pytest
import torch
import torch.nn.functional as F

from kiln.ir import DType, GraphBuilder, Layout, LayoutKind, OpKind
from kiln.ir import attrs as A
import kiln.ir.reference_library  # noqa: F401  (registers GROUP_NORM's reference)
from kiln.ir.reference import evaluate
from kiln.kernels.registry import candidates

NHWC = Layout(LayoutKind.CHANNELS_LAST)


def _node(shape, groups, affine, layout=NHWC, constant=True, dtype=DType.FLOAT32, act=A.Activation.NONE):
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    if layout is NHWC:
        x = b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(NHWC))
    ins = [x]
    c = shape[1]
    if affine:
        ins += [b.const(torch.randn(c)), b.const(torch.randn(c))] if constant else \
            [b.input("w", (c,), DType.FLOAT32), b.input("b", (c,), DType.FLOAT32)]
    g = b.build([b.add(OpKind.GROUP_NORM, *ins, attrs=A.GroupNormAttrs(groups, 1e-5, act))])
    return g, g.nodes[-1]


def _want(x, groups, w=None, b=None, eps=1e-5):
    g = x.double().reshape(x.shape[0], groups, -1)
    y = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + eps).sqrt()).reshape(x.shape)
    if w is not None:
        y = y * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
    return y


def _run(kernel_name, node, graph, x, params, constant, threads=1):
    k = next(k for k in candidates(node, "cpu") if k.name == kernel_name)
    consts = [None] + ([graph.constants[v] for v in node.inputs[1:]] if constant and params else [])
    fn = k.bind(node, consts)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return fn([x] + ([None, None] if constant and params else list(params)), node.attrs)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("shape,groups", [((1, 64, 7, 7), 32), ((2, 12, 5, 3), 3), ((1, 16, 9, 9), 1)])
@pytest.mark.parametrize("affine,constant", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("threads", [1, 2])
def test_channels_last_kernel_is_the_float64_definition(shape, groups, affine, constant, offset, threads):
    graph, node = _node(shape, groups, affine, constant=constant)
    assert "cpu.group_norm_nhwc" in [k.name for k in candidates(node, "cpu")]
    x = (torch.randn(shape) * 0.5 + offset).contiguous(memory_format=torch.channels_last)
    params = (torch.randn(shape[1]), torch.randn(shape[1])) if affine else ()
    if affine and constant:
        params = tuple(graph.constants[v] for v in node.inputs[1:])
    got = _run("cpu.group_norm_nhwc", node, graph, x, params, constant, threads)
    want = _want(x, groups, *params)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float32
    scale = float(want.abs().max())
    assert (got.double() - want).abs().max().item() <= 1e-5 * scale


def test_reference_is_exact_on_channels_last_images_with_a_large_mean():
    # torch's channels-last group norm takes a one-pass variance: 1e-3 off at a mean of 10
    # standard deviations; the reference (the oracle every kernel is checked against) is not
    graph, node = _node((1, 64, 14, 14), 32, False)
    x = (torch.randn(1, 64, 14, 14) * 0.5 + 20.0).contiguous(memory_format=torch.channels_last)
    got = evaluate(node, [x])
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got.double() - _want(x, 32)).abs().max().item() < 1e-4


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_images_in_and_out_with_a_fused_relu(relu, threads):
    # the norm between two bf16 convolutions: bf16 read as the values it holds, fp32 math,
    # the result (after the ReLU) rounded once to bf16
    shape, groups = (2, 32, 6, 5), 8
    act = A.Activation.RELU if relu else A.Activation.NONE
    graph, node = _node(shape, groups, True, dtype=DType.BFLOAT16, act=act)
    assert "cpu.group_norm_nhwc" in [k.name for k in candidates(node, "cpu")]
    x = (torch.randn(shape) * 2 + 3).bfloat16().contiguous(memory_format=torch.channels_last)
    params = tuple(graph.constants[v] for v in node.inputs[1:])
    got = _run("cpu.group_norm_nhwc", node, graph, x, params, True, threads)
    want = _want(x, groups, *params)
    want = want.relu() if relu else want
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert bool(((got.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-6).all())  # one rounding
    # the reference's definition: float32 math, one rounding
    ref = evaluate(node, [x, *params])
    assert ref.dtype == torch.bfloat16
    torch.testing.assert_close(ref, (F.group_norm(x.float(), groups, *params).relu() if relu else
                                     F.group_norm(x.float(), groups, *params)).bfloat16(), atol=0, rtol=0)
    assert (got.float() - ref.float()).abs().max().item() <= 2 ** -7 * ref.float().abs().max().item()


def test_only_channels_last_fp32_and_bf16_images_are_taken():
    _, row_major = _node((1, 8, 4, 4), 2, False, layout=Layout())
    assert "cpu.group_norm_nhwc" not in [k.name for k in candidates(row_major, "cpu")]
    _, gelu = _node((1, 8, 4, 4), 2, False, act=A.Activation.GELU)  # an activation it does not apply
    assert "cpu.group_norm_nhwc" not in [k.name for k in candidates(gelu, "cpu")]
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(evaluate(row_major, [x]), F.group_norm(x, 2))
