"""horizontal (passes/horizontal.py): sibling LINEARs that read the same input become one
GEMM over the concatenated weights and a slice per sibling; it declines where the siblings'
epilogues differ or a weight is not a constant."""
import torch

from kiln.ir import OpKind
from kiln.ir import attrs as A

from conftest import assert_same_outputs, assert_structural_equal
from graphs import build, run_pass


def test_horizontal_fuses_sibling_linears_into_one_gemm_and_slices():
    ws = [torch.randn(8, 6), torch.randn(4, 6), torch.randn(8, 6)]
    bs = [torch.randn(8), torch.randn(4), torch.randn(8)]

    def before(b, x):
        q, k, v = (b.add(OpKind.LINEAR, x, b.const(w), b.const(c)) for w, c in zip(ws, bs))
        return b.add(OpKind.ADD, b.add(OpKind.MUL, q, v), b.add(OpKind.SUM, k, attrs=A.ReduceAttrs((2,), True)))

    def expected(b, x):
        y = b.add(OpKind.LINEAR, x, b.const(torch.cat(ws)), b.const(torch.cat(bs)))
        q, k, v = (b.add(OpKind.SLICE, y, attrs=A.SliceAttrs(2, s, e)) for s, e in ((0, 8), (8, 12), (12, 20)))
        return b.add(OpKind.ADD, b.add(OpKind.MUL, q, v), b.add(OpKind.SUM, k, attrs=A.ReduceAttrs((2,), True)))

    g = build(before, (2, 5, 6))
    out = run_pass("horizontal", g)
    assert_structural_equal(out, build(expected, (2, 5, 6)))
    assert_same_outputs(g, out)


def test_horizontal_fuses_siblings_with_and_without_bias():
    # Whisper's attention: query and value have a bias, key has none (it gets zeros)
    ws, bq, bv = [torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 6)], torch.randn(8), torch.randn(8)

    def before(b, x):
        q = b.add(OpKind.LINEAR, x, b.const(ws[0]), b.const(bq))
        k = b.add(OpKind.LINEAR, x, b.const(ws[1]))
        v = b.add(OpKind.LINEAR, x, b.const(ws[2]), b.const(bv))
        return b.add(OpKind.ADD, b.add(OpKind.MUL, q, k), v)

    def expected(b, x):
        y = b.add(OpKind.LINEAR, x, b.const(torch.cat(ws)), b.const(torch.cat([bq, torch.zeros(8), bv])))
        q, k, v = (b.add(OpKind.SLICE, y, attrs=A.SliceAttrs(2, s, e)) for s, e in ((0, 8), (8, 16), (16, 24)))
        return b.add(OpKind.ADD, b.add(OpKind.MUL, q, k), v)

    g = build(before, (2, 5, 6))
    out = run_pass("horizontal", g)
    assert_structural_equal(out, build(expected, (2, 5, 6)))
    fused = next(n for n in out.nodes if n.op is OpKind.LINEAR)
    assert torch.equal(out.constants[fused.inputs[2]][8:16], torch.zeros(8))
    assert_same_outputs(g, out)


def test_horizontal_declines_residuals_and_different_activations():
    w1, w2, bias = torch.randn(8, 8), torch.randn(8, 8), torch.randn(8)

    def residual(b, x):  # a residual differs per sibling
        return (b.add(OpKind.LINEAR, x, b.const(w1), b.const(bias), x), b.add(OpKind.LINEAR, x, b.const(w2)))

    def acts(b, x):
        return (b.add(OpKind.LINEAR, x, b.const(w1), attrs=A.LinearAttrs(A.Activation.RELU)),
                b.add(OpKind.LINEAR, x, b.const(w2)))

    def weight_is_input(b, x, w):  # only constant weights are concatenated
        return (b.add(OpKind.LINEAR, x, w), b.add(OpKind.LINEAR, x, b.const(w2)))

    for fn, shapes in ((residual, [(3, 8)]), (acts, [(3, 8)]), (weight_is_input, [(3, 8), (8, 8)])):
        g = build(fn, *shapes)
        out = run_pass("horizontal", g)
        assert [n.op for n in out.nodes] == [n.op for n in g.nodes], fn.__name__
        assert_structural_equal(out, g)
        assert_same_outputs(g, out)
