"""recognize (passes/recognize.py): the decomposed forms exporters write become GELU (erf
and tanh forms), LayerNorm with its affine, and softmax."""
import math

import torch

from kiln.ir import OpKind
from kiln.ir import attrs as A

from conftest import assert_same_outputs, assert_structural_equal
from graphs import build, run_pass


def test_recognize_gelu_erf_and_tanh_forms():
    def erf_form(b, x):
        e = b.add(OpKind.ERF, b.add(OpKind.DIV, x, b.const(torch.tensor(math.sqrt(2)))))
        p = b.add(OpKind.ADD, e, b.const(torch.tensor(1.0)))
        return b.add(OpKind.MUL, b.add(OpKind.MUL, x, p), b.const(torch.tensor(0.5)))

    def tanh_form(b, x):
        cube = b.add(OpKind.POW, x, b.const(torch.tensor(3.0)))
        inner = b.add(OpKind.ADD, x, b.add(OpKind.MUL, b.const(torch.tensor(0.044715)), cube))
        t = b.add(OpKind.TANH, b.add(OpKind.MUL, inner, b.const(torch.tensor(math.sqrt(2 / math.pi)))))
        return b.add(OpKind.MUL, b.const(torch.tensor(0.5)), b.add(OpKind.MUL, x, b.add(OpKind.ADD, b.const(
            torch.tensor(1.0)), t)))

    for form, approx in ((erf_form, A.GeluApprox.NONE), (tanh_form, A.GeluApprox.TANH)):
        g = build(form, (4, 8))
        out = run_pass("recognize", g)
        assert_structural_equal(out, build(lambda b, x: b.add(OpKind.GELU, x, attrs=A.GeluAttrs(approx)), (4, 8)))
        assert_same_outputs(g, out)


def test_recognize_layer_norm_with_affine():
    w, bias = torch.randn(8), torch.randn(8)

    def before(b, x):
        mean = b.add(OpKind.MEAN, x, attrs=A.ReduceAttrs((2,), True))
        d = b.add(OpKind.SUB, x, mean)
        var = b.add(OpKind.MEAN, b.add(OpKind.POW, d, b.const(torch.tensor(2.0))), attrs=A.ReduceAttrs((2,), True))
        y = b.add(OpKind.DIV, d, b.add(OpKind.SQRT, b.add(OpKind.ADD, var, b.const(torch.tensor(1e-5)))))
        return b.add(OpKind.ADD, b.add(OpKind.MUL, y, b.const(w)), b.const(bias))

    def expected(b, x):
        eps = float(torch.tensor(1e-5))  # the recognized eps is the float32 constant's value
        return b.add(OpKind.LAYER_NORM, x, b.const(w), b.const(bias), attrs=A.LayerNormAttrs(1, eps))

    g = build(before, (2, 3, 8))
    out = run_pass("recognize", g)
    assert_structural_equal(out, build(expected, (2, 3, 8)))
    assert_same_outputs(g, out)


def test_recognize_softmax():
    def before(b, x):
        mx = b.add(OpKind.MAX, x, attrs=A.ReduceAttrs((1,), True))
        e = b.add(OpKind.EXP, b.add(OpKind.SUB, x, mx))
        return b.add(OpKind.DIV, e, b.add(OpKind.SUM, e, attrs=A.ReduceAttrs((1,), True)))

    g = build(before, (3, 7))
    out = run_pass("recognize", g)
    assert_structural_equal(out, build(lambda b, x: b.add(OpKind.SOFTMAX, x, attrs=A.AxisAttrs(1)), (3, 7)))
    assert_same_outputs(g, out)
