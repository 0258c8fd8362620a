"""simplify (passes/simplify.py, in every cleanup): algebraic identities and chains of
reshapes, permutes and casts collapse; broadcasting "identities" stay."""
import torch

from kiln.ir import DType, OpKind
from kiln.ir import attrs as A

from conftest import assert_same_outputs, assert_structural_equal
from graphs import build, run_pass


def test_simplify_identities_and_chains():
    def before(b, x):
        y = b.add(OpKind.MUL, x, b.const(torch.ones(())))
        y = b.add(OpKind.ADD, b.const(torch.zeros(4)), y)
        y = b.add(OpKind.IDENTITY, y)
        y = b.add(OpKind.RESHAPE, y, attrs=A.ShapeAttrs((2, 2, 3, 4)))
        y = b.add(OpKind.RESHAPE, y, attrs=A.ShapeAttrs((4, 12)))
        y = b.add(OpKind.PERMUTE, y, attrs=A.PermuteAttrs((1, 0)))
        y = b.add(OpKind.PERMUTE, y, attrs=A.PermuteAttrs((1, 0)))
        y = b.add(OpKind.CAST, y, attrs=A.CastAttrs(DType.FLOAT32))
        y = b.add(OpKind.PAD, y, attrs=A.PadAttrs((0, 0, 0, 0)))  # padding by nothing
        return b.add(OpKind.DIV, y, b.const(torch.tensor(1.0)))

    def expected(b, x):
        return b.add(OpKind.RESHAPE, x, attrs=A.ShapeAttrs((4, 12)))

    g = build(before, (4, 3, 4))
    out = run_pass("simplify", g)
    assert_structural_equal(out, build(expected, (4, 3, 4)))
    assert_same_outputs(g, out)


def test_simplify_keeps_broadcasting_identities():
    # x + zeros(2, 4) broadcasts x from (4,) to (2, 4): not an identity
    def before(b, x):
        return b.add(OpKind.ADD, x, b.const(torch.zeros(2, 4)))

    g = build(before, (4,))
    out = run_pass("simplify", g)
    assert out.op_counts() == {"add": 1}
    assert_structural_equal(out, build(before, (4,)))
    assert_same_outputs(g, out)


def test_simplify_square_becomes_a_multiply():
    # RMSNorm's x.pow(2): a multiply fuses and vectorizes in generated kernels
    def before(b, x):
        return b.add(OpKind.MEAN, b.add(OpKind.POW, x, b.const(torch.tensor(2))),
                     attrs=A.ReduceAttrs((1,), True))

    def expected(b, x):
        return b.add(OpKind.MEAN, b.add(OpKind.MUL, x, x), attrs=A.ReduceAttrs((1,), True))

    g = build(before, (4, 8))
    out = run_pass("simplify", g)
    assert_structural_equal(out, build(expected, (4, 8)))
    assert_same_outputs(g, out)


def test_simplify_keeps_other_powers_and_broadcasting_squares():
    def cube(b, x):
        return b.add(OpKind.POW, x, b.const(torch.tensor(3.0)))

    def broadcast(b, x):  # x ** full((2, 4), 2) broadcasts x from (4,): not x * x
        return b.add(OpKind.POW, x, b.const(torch.full((2, 4), 2.0)))

    for fn in (cube, broadcast):
        g = build(fn, (4,))
        out = run_pass("simplify", g)
        assert out.op_counts() == {"pow": 1}
        assert_same_outputs(g, out)
