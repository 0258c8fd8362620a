"""channels_last (passes/layout.py): conv chains run in NHWC with prepacked weights, one
conversion into each chain input and one out of each value the rest of the graph reads;
graphs without a conv are left alone."""
import torch

from kiln.ir import Layout, LayoutKind, OpKind
from kiln.ir import attrs as A

from conftest import assert_same_outputs, assert_structural_equal
from graphs import build, run_pass, stored_as

NHWC, ROW = Layout(LayoutKind.CHANNELS_LAST), Layout()


def _to(b, v, layout):
    return b.add(OpKind.TO_LAYOUT, v, attrs=A.LayoutAttrs(layout))


def _in_chain(*ops):
    """The expected graph's chain nodes (by op) store their outputs NHWC."""
    return lambda n: n.op in ops


def test_channels_last_for_conv_chain_with_fewest_conversions():
    w1, w2 = torch.randn(8, 3, 3, 3), torch.randn(8, 8, 3, 3)
    conv1 = A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU)
    conv2 = A.Conv2dAttrs(padding=(1, 1))
    pool = A.Pool2dAttrs((2, 2), (2, 2))

    def before(b, x):
        y = b.add(OpKind.CONV2D, x, b.const(w1), attrs=conv1)
        z = b.add(OpKind.CONV2D, y, b.const(w2), None, y, attrs=conv2)
        z = b.add(OpKind.MAX_POOL2D, z, attrs=pool)
        return b.add(OpKind.RESHAPE, z, attrs=A.ShapeAttrs((2, 8 * 4 * 4)))

    def expected(b, x):
        y = b.add(OpKind.CONV2D, _to(b, x, NHWC), b.const(w1, layout=NHWC), attrs=conv1)
        z = b.add(OpKind.CONV2D, y, b.const(w2, layout=NHWC), None, y, attrs=conv2)
        z = b.add(OpKind.MAX_POOL2D, z, attrs=pool)
        return b.add(OpKind.RESHAPE, _to(b, z, ROW), attrs=A.ShapeAttrs((2, 8 * 4 * 4)))

    g = build(before, (2, 3, 8, 8))
    out = run_pass("channels_last", g)
    assert_structural_equal(out, stored_as(build(expected, (2, 3, 8, 8)), NHWC,
                                           _in_chain(OpKind.CONV2D, OpKind.MAX_POOL2D)))
    assert out.count(OpKind.TO_LAYOUT) == 2  # into the chain once, out of it once
    for n in out.nodes:
        if n.op is OpKind.CONV2D:
            assert n.outputs[0].type.layout.kind is LayoutKind.CHANNELS_LAST
            assert n.inputs[1].type.layout.kind is LayoutKind.CHANNELS_LAST  # prepacked weight
            assert out.constants[n.inputs[1]].is_contiguous(memory_format=torch.channels_last)
    assert_same_outputs(g, out)


def test_a_chain_value_read_outside_the_chain_leaves_it_once():
    """Elementwise ops with same-shape operands join the chain; the conv output that a
    reshape (not chain-friendly) and the graph output both read converts back once."""
    w = torch.randn(4, 4, 1, 1)

    def before(b, x):
        y = b.add(OpKind.CONV2D, x, b.const(w))
        s = b.add(OpKind.SIGMOID, y)
        return b.add(OpKind.MUL, y, s), b.add(OpKind.RESHAPE, y, attrs=A.ShapeAttrs((1, 64))), y

    def expected(b, x):
        y = b.add(OpKind.CONV2D, _to(b, x, NHWC), b.const(w, layout=NHWC))
        out = _to(b, b.add(OpKind.MUL, y, b.add(OpKind.SIGMOID, y)), ROW)
        y_row = _to(b, y, ROW)
        return out, b.add(OpKind.RESHAPE, y_row, attrs=A.ShapeAttrs((1, 64))), y_row

    g = build(before, (1, 4, 4, 4))
    out = run_pass("channels_last", g)
    assert_structural_equal(out, stored_as(build(expected, (1, 4, 4, 4)), NHWC,
                                           _in_chain(OpKind.CONV2D, OpKind.SIGMOID, OpKind.MUL)))
    assert out.count(OpKind.TO_LAYOUT) == 3  # x in; the product and the conv output out, once each
    assert_same_outputs(g, out)


def test_graphs_without_a_conv_are_left_alone():
    def before(b, x):
        return b.add(OpKind.RELU, b.add(OpKind.MAX_POOL2D, x, attrs=A.Pool2dAttrs((2, 2), (2, 2))))

    g = build(before, (1, 4, 8, 8))
    out = run_pass("channels_last", g)
    assert out.count(OpKind.TO_LAYOUT) == 0
    assert_structural_equal(out, g)
    assert_same_outputs(g, out)


def test_a_pad_between_conv_and_pool_stays_in_the_chain():
    # BiT's stem: conv, pad, max pool, conv; the pad indexes logical axes, so it runs NHWC
    # like its neighbours (no conversion out of the chain and back around it)
    w1, w2 = torch.randn(8, 3, 3, 3), torch.randn(8, 8, 1, 1)
    pad = A.PadAttrs((0, 0, 0, 0, 1, 1, 1, 1), value=float("-inf"))
    pool = A.Pool2dAttrs((3, 3), (2, 2))

    def before(b, x):
        y = b.add(OpKind.CONV2D, x, b.const(w1), attrs=A.Conv2dAttrs(padding=(1, 1)))
        y = b.add(OpKind.MAX_POOL2D, b.add(OpKind.PAD, y, attrs=pad), attrs=pool)
        return b.add(OpKind.CONV2D, y, b.const(w2))

    def expected(b, x):
        y = b.add(OpKind.CONV2D, _to(b, x, NHWC), b.const(w1, layout=NHWC), attrs=A.Conv2dAttrs(padding=(1, 1)))
        y = b.add(OpKind.MAX_POOL2D, b.add(OpKind.PAD, y, attrs=pad), attrs=pool)
        return _to(b, b.add(OpKind.CONV2D, y, b.const(w2, layout=NHWC)), ROW)

    g = build(before, (1, 3, 10, 10))
    out = run_pass("channels_last", g)
    assert_structural_equal(out, stored_as(build(expected, (1, 3, 10, 10)), NHWC,
                                           _in_chain(OpKind.CONV2D, OpKind.PAD, OpKind.MAX_POOL2D)))
    assert out.count(OpKind.TO_LAYOUT) == 2
    assert_same_outputs(g, out)


def test_a_group_norm_between_convs_stays_in_the_chain():
    # BiT's pre-activation blocks: conv, group norm, ReLU, conv; torch's group norm reads and
    # writes channels-last images, so the chain has no conversion around the norm
    w1, w2 = torch.randn(8, 3, 3, 3), torch.randn(8, 8, 1, 1)
    gamma, beta = torch.randn(8), torch.randn(8)
    gn = A.GroupNormAttrs(4)

    def before(b, x):
        y = b.add(OpKind.CONV2D, x, b.const(w1), attrs=A.Conv2dAttrs(padding=(1, 1)))
        y = b.add(OpKind.RELU, b.add(OpKind.GROUP_NORM, y, b.const(gamma), b.const(beta), attrs=gn))
        return b.add(OpKind.CONV2D, y, b.const(w2))

    def expected(b, x):
        y = b.add(OpKind.CONV2D, _to(b, x, NHWC), b.const(w1, layout=NHWC), attrs=A.Conv2dAttrs(padding=(1, 1)))
        y = b.add(OpKind.RELU, b.add(OpKind.GROUP_NORM, y, b.const(gamma), b.const(beta), attrs=gn))
        return _to(b, b.add(OpKind.CONV2D, y, b.const(w2, layout=NHWC)), ROW)

    g = build(before, (1, 3, 10, 10))
    out = run_pass("channels_last", g)
    assert_structural_equal(out, stored_as(build(expected, (1, 3, 10, 10)), NHWC,
                                           _in_chain(OpKind.CONV2D, OpKind.GROUP_NORM, OpKind.RELU)))
    assert out.count(OpKind.TO_LAYOUT) == 2
    assert_same_outputs(g, out)
