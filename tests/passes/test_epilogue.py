"""epilogue and residual_to_norm (passes/epilogue.py): bias, residual and activation fold
into the GEMM or conv that feeds them; on float CPU compiles a residual read by a LayerNorm
stays an add (the norm's kernel takes it)."""
import torch

from kiln.options import CompileOptions
from kiln.ir import OpKind
from kiln.ir import attrs as A
from kiln.passes.pipeline import run_pipeline

from conftest import assert_same_outputs, assert_structural_equal
from graphs import build, run_pass


def test_epilogue_linear_bias_residual_gelu():
    w, bias = torch.randn(8, 8), torch.randn(8)

    def before(b, x):
        y = b.add(OpKind.ADD, b.add(OpKind.LINEAR, x, b.const(w)), b.const(bias))
        y = b.add(OpKind.ADD, x, y)
        return b.add(OpKind.GELU, y, attrs=A.GeluAttrs())

    def expected(b, x):
        return b.add(OpKind.LINEAR, x, b.const(w), b.const(bias), x, attrs=A.LinearAttrs(A.Activation.GELU))

    g = build(before, (2, 3, 8))
    out = run_pass("epilogue", g)
    assert_structural_equal(out, build(expected, (2, 3, 8)))
    assert_same_outputs(g, out)


def test_epilogue_conv_residual_relu_and_order():
    w = torch.randn(4, 4, 3, 3)
    conv = A.Conv2dAttrs(padding=(1, 1))

    def before(b, x):
        y = b.add(OpKind.CONV2D, x, b.const(w), attrs=conv)
        return b.add(OpKind.RELU, b.add(OpKind.ADD, y, x))

    def expected(b, x):
        return b.add(OpKind.CONV2D, x, b.const(w), None, x, attrs=A.Conv2dAttrs(padding=(1, 1),
                                                                                 activation=A.Activation.RELU))

    g = build(before, (1, 4, 6, 6))
    out = run_pass("epilogue", g)
    assert_structural_equal(out, build(expected, (1, 4, 6, 6)))
    assert_same_outputs(g, out)

    # relu(conv) + x: the add comes after the activation, so only the activation fuses
    def relu_then_add(b, x):
        return b.add(OpKind.ADD, b.add(OpKind.RELU, b.add(OpKind.CONV2D, x, b.const(w), attrs=conv)), x)

    def relu_fused(b, x):
        relu = A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU)
        return b.add(OpKind.ADD, b.add(OpKind.CONV2D, x, b.const(w), attrs=relu), x)

    g2 = build(relu_then_add, (1, 4, 6, 6))
    out2 = run_pass("epilogue", g2)
    assert out2.op_counts() == {"add": 1, "conv2d": 1}
    assert_structural_equal(out2, build(relu_fused, (1, 4, 6, 6)))
    assert_same_outputs(g2, out2)


def test_residual_before_layer_norm_stays_an_add_on_cpu():
    # no CPU GEMM kernel adds a residual inside the GEMM: the add goes to the LayerNorm's kernel
    w, bias, gamma, beta = torch.randn(8, 8), torch.randn(8), torch.randn(8), torch.randn(8)

    def before(b, x):
        y = b.add(OpKind.ADD, b.add(OpKind.ADD, b.add(OpKind.LINEAR, x, b.const(w)), b.const(bias)), x)
        return b.add(OpKind.LAYER_NORM, y, b.const(gamma), b.const(beta), attrs=A.LayerNormAttrs())

    def expected(b, x):
        y = b.add(OpKind.ADD, b.add(OpKind.LINEAR, x, b.const(w), b.const(bias)), x)
        return b.add(OpKind.LAYER_NORM, y, b.const(gamma), b.const(beta), attrs=A.LayerNormAttrs())

    def folded(b, x):
        y = b.add(OpKind.LINEAR, x, b.const(w), b.const(bias), x)
        return b.add(OpKind.LAYER_NORM, y, b.const(gamma), b.const(beta), attrs=A.LayerNormAttrs())

    g = build(before, (2, 3, 8))
    out = run_pipeline(g, select=["epilogue", "residual_to_norm"], verify_each=True, options=CompileOptions.parse(target="cpu")).graph
    assert_structural_equal(out, build(expected, (2, 3, 8)))
    assert_same_outputs(g, out)
    # a GPU GEMM adds it in its epilogue, and so does a quantized CPU GEMM: both keep it folded
    for options in ({"target": "cuda"}, {"target": "cpu", "quantize": "int8-dynamic"}):
        out = run_pipeline(g, select=["epilogue", "residual_to_norm"], options=CompileOptions.parse(**options)).graph
        assert_structural_equal(out, build(folded, (2, 3, 8)))


def _conv_clamp(lo, hi):
    w, bias = torch.randn(4, 1, 3, 3), torch.randn(4)

    def before(b, x):
        y = b.add(OpKind.CONV2D, x, b.const(w, "w"), b.const(bias, "b"), attrs=A.Conv2dAttrs(padding=(1, 1), groups=4))
        return b.add(OpKind.CLAMP, y, attrs=A.ClampAttrs(lo, hi))

    def expected(b, x):
        return b.add(OpKind.CONV2D, x, b.const(w, "w"), b.const(bias, "b"),
                     attrs=A.Conv2dAttrs(padding=(1, 1), groups=4, activation=A.Activation.RELU6))
    return before, expected


def test_conv_relu6_becomes_the_convs_activation_on_cpu_float_compiles():
    # MobileNet's ReLU6 (clamp to [0, 6]) after a depthwise conv: oneDNN applies it as a clip
    # post-op; on a quantized or GPU compile it stays a clamp
    before, expected = _conv_clamp(0.0, 6.0)
    g = build(before, (1, 4, 6, 6))
    out = run_pass("conv_relu6", g)
    assert_structural_equal(out, build(expected, (1, 4, 6, 6)))
    assert_same_outputs(g, out)
    assert run_pass("conv_relu6", g, target="cuda").count(OpKind.CLAMP) == 1
    assert run_pass("conv_relu6", g, quantize="int8-dynamic").count(OpKind.CLAMP) == 1
    other, _ = _conv_clamp(0.0, 5.0)  # not ReLU6
    assert run_pass("conv_relu6", build(other, (1, 4, 6, 6))).count(OpKind.CLAMP) == 1


def test_a_relu_after_a_group_norm_becomes_its_activation():
    w, bias = torch.randn(8), torch.randn(8)
    gn = A.GroupNormAttrs(4)

    def before(b, x):
        return b.add(OpKind.RELU, b.add(OpKind.GROUP_NORM, x, b.const(w), b.const(bias), attrs=gn))

    def expected(b, x):
        return b.add(OpKind.GROUP_NORM, x, b.const(w), b.const(bias), attrs=A.GroupNormAttrs(4, activation=A.Activation.RELU))

    g = build(before, (2, 8, 5, 5))
    out = run_pass("epilogue", g)
    assert_structural_equal(out, build(expected, (2, 8, 5, 5)))
    assert_same_outputs(g, out)

    def read_twice(b, x):  # the norm's own output is also read: it stays as it is
        y = b.add(OpKind.GROUP_NORM, x, attrs=gn)
        return b.add(OpKind.RELU, y), y

    g = build(read_twice, (2, 8, 5, 5))
    assert_structural_equal(run_pass("epilogue", g), g)
