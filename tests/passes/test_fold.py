"""The fold phase (passes/fold.py): constant folding of weight-only subgraphs (without
bloating), batch norm folded into the conv before it, and zero padding into the conv after it."""
import pytest
import torch

from kiln.ir import OpKind
from kiln.ir import attrs as A

from conftest import assert_same_outputs, assert_structural_equal
from graphs import build, run_pass


def test_constant_fold_weight_only_subgraph():
    w = torch.randn(4, 6)

    def before(b, x):
        wt = b.add(OpKind.PERMUTE, b.const(w, "w"), attrs=A.PermuteAttrs((1, 0)))  # a parameter transpose
        s = b.add(OpKind.MUL, wt, b.const(torch.tensor(0.5)))
        return b.add(OpKind.MATMUL, x, s)

    def expected(b, x):
        return b.add(OpKind.MATMUL, x, b.const(w.T * 0.5))

    g = build(before, (2, 6))
    out = run_pass("constant_fold", g)
    assert_structural_equal(out, build(expected, (2, 6)))
    assert_same_outputs(g, out)


def test_constant_fold_does_not_bloat():
    # expanding a (1, 256) constant to (1024, 256) at compile time would store 1024x the bytes
    def before(b, x):
        return b.add(OpKind.ADD, x, b.add(OpKind.EXPAND, b.const(torch.randn(1, 256)), attrs=A.ShapeAttrs((1024, 256))))

    g = build(before, (1024, 256))
    out = run_pass("constant_fold", g)
    assert out.op_counts() == {"add": 1, "expand": 1}
    assert_structural_equal(out, build(before, (1024, 256)))
    assert_same_outputs(g, out)


def test_fold_conv_batch_norm():
    w, bias = torch.randn(8, 3, 3, 3), torch.randn(8)
    mean, var = torch.randn(8) * 0.1, torch.rand(8) + 0.5
    gamma, beta = torch.rand(8) + 0.5, torch.randn(8)

    def before(b, x):
        y = b.add(OpKind.CONV2D, x, b.const(w), b.const(bias), attrs=A.Conv2dAttrs(padding=(1, 1)))
        return b.add(OpKind.BATCH_NORM, y, *(b.const(t) for t in (mean, var, gamma, beta)),
                     attrs=A.BatchNormAttrs(1e-5))

    def expected(b, x):
        return b.add(OpKind.CONV2D, x, b.const(w), b.const(bias), attrs=A.Conv2dAttrs(padding=(1, 1)))

    g = build(before, (2, 3, 8, 8))
    out = run_pass("fold_bn", g)
    assert_structural_equal(out, build(expected, (2, 3, 8, 8)))
    assert_same_outputs(g, out)


def test_fold_bn_declines_when_conv_output_is_used_twice():
    def before(b, x):
        y = b.add(OpKind.CONV2D, x, b.const(torch.randn(4, 3, 1, 1)))
        z = b.add(OpKind.BATCH_NORM, y, b.const(torch.zeros(4)), b.const(torch.ones(4)), attrs=A.BatchNormAttrs())
        return b.add(OpKind.ADD, y, z)

    g = build(before, (1, 3, 4, 4))
    out = run_pass("fold_bn", g)
    assert out.count(OpKind.BATCH_NORM) == 1
    assert_structural_equal(out, build(before, (1, 3, 4, 4)))
    assert_same_outputs(g, out)


def test_fold_symmetric_zero_padding_into_the_conv():
    # TF-style "same" padding ahead of a strided depthwise conv: the pad's H and W amounts
    # join the conv's own padding
    w, bias = torch.randn(6, 1, 3, 3), torch.randn(6)

    def before(b, x):
        p = b.add(OpKind.PAD, x, attrs=A.PadAttrs((0, 0, 0, 0, 1, 1, 2, 2)))
        return b.add(OpKind.CONV2D, p, b.const(w), b.const(bias), attrs=A.Conv2dAttrs((2, 2), (0, 1), groups=6))

    def expected(b, x):
        return b.add(OpKind.CONV2D, x, b.const(w), b.const(bias), attrs=A.Conv2dAttrs((2, 2), (1, 3), groups=6))

    g = build(before, (1, 6, 9, 10))
    out = run_pass("fold_pad", g)
    assert_structural_equal(out, build(expected, (1, 6, 9, 10)))
    assert_same_outputs(g, out)


@pytest.mark.parametrize("pad", [
    A.PadAttrs((0, 0, 0, 0, 0, 1, 0, 1)),  # asymmetric (a stride-2 layer's "same")
    A.PadAttrs((0, 0, 0, 0, 1, 1, 1, 1), value=1.0),  # not zeros
    A.PadAttrs((0, 0, 1, 0, 1, 1, 1, 1)),  # a channel too
    A.PadAttrs((0, 0, 0, 0, 1, 1, 1, 1), A.PadMode.REFLECT),
])
def test_fold_pad_declines_what_the_conv_cannot_pad(pad):
    def before(b, x):
        p = b.add(OpKind.PAD, x, attrs=pad)
        cin = 3 + pad.pads[2] + pad.pads[3]
        return b.add(OpKind.CONV2D, p, b.const(torch.randn(4, cin, 3, 3), "w"), attrs=A.Conv2dAttrs())

    g = build(before, (1, 3, 8, 8))
    out = run_pass("fold_pad", g)
    assert out.count(OpKind.PAD) == 1
    assert_structural_equal(out, build(before, (1, 3, 8, 8)))
    assert_same_outputs(g, out)
