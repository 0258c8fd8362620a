"""Each graph pass: a before graph, the expected graph, and a numerical check."""
import math

import torch

from kiln.options import CompileOptions
from kiln.ir import DType, GraphBuilder, LayoutKind, OpKind
from kiln.ir import attrs as A
from kiln.passes.cse import cse
from kiln.passes.pipeline import run_pipeline

from conftest import assert_same_outputs, assert_structural_equal


def run_pass(name, g):
    return run_pipeline(g, select=[name], verify_each=True).graph


def build(fn, *shapes, name="g", dtypes=None):
    b = GraphBuilder(name)
    xs = [b.input(f"x{i}", s, (dtypes or {}).get(i, DType.FLOAT32)) for i, s in enumerate(shapes)]
    out = fn(b, *xs)
    return b.build(out if isinstance(out, tuple) else (out,))


# ----------------------------------------------------------------------------- canonicalize
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
        return b.add(OpKind.DIV, y, b.const(torch.tensor(1.0)))

    def expected(b, x):
        return b.add(OpKind.RESHAPE, x, attrs=A.ShapeAttrs((4, 12)))

    g = build(before, (4, 3, 4))
    out = run_pass("simplify", g)
    assert_structural_equal(out, build(expected, (4, 3, 4)))
    assert_same_outputs(g, out)


def test_simplify_keeps_broadcasting_identities():
    # x + zeros(2, 4) broadcasts x from (4,) to (2, 4): not an identity
    g = build(lambda b, x: b.add(OpKind.ADD, x, b.const(torch.zeros(2, 4))), (4,))
    assert run_pass("simplify", g).op_counts() == {"add": 1}


def test_cse_merges_identical_nodes_and_small_constants():
    def before(b, x):
        a = b.add(OpKind.MUL, b.add(OpKind.EXP, x), b.const(torch.tensor(2.0)))
        c = b.add(OpKind.MUL, b.add(OpKind.EXP, x), b.const(torch.tensor(2.0)))
        return b.add(OpKind.ADD, a, c)

    def expected(b, x):
        a = b.add(OpKind.MUL, b.add(OpKind.EXP, x), b.const(torch.tensor(2.0)))
        return b.add(OpKind.ADD, a, a)

    g = build(before, (3,))
    out = cse(g)
    assert_structural_equal(out, build(expected, (3,)))
    assert_same_outputs(g, out)


# ----------------------------------------------------------------------------- fold
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
    g = build(lambda b, x: b.add(OpKind.ADD, x, b.add(OpKind.EXPAND, b.const(torch.randn(1, 256)),
                                                      attrs=A.ShapeAttrs((1024, 256)))), (1024, 256))
    assert run_pass("constant_fold", g).op_counts() == {"add": 1, "expand": 1}


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
    assert run_pass("fold_bn", g).count(OpKind.BATCH_NORM) == 1


# ----------------------------------------------------------------------------- recognize
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


# ----------------------------------------------------------------------------- attention
def _heads(b, x, perm=(0, 2, 1, 3)):
    return b.add(OpKind.PERMUTE, b.add(OpKind.RESHAPE, x, attrs=A.ShapeAttrs((2, 5, 2, 4))), attrs=A.PermuteAttrs(perm))


def _attn_before(mask_kind):
    def fn(b, q, k, v, *m):
        kt = _heads(b, k, (0, 2, 3, 1))  # head split + transpose in one permute, as exporters write it
        s = b.add(OpKind.MATMUL, _heads(b, q), kt)
        s = b.add(OpKind.DIV, s, b.const(torch.tensor(2.0)))
        if mask_kind == "add":
            s = b.add(OpKind.ADD, s, m[0])
        elif mask_kind == "bool":
            s = b.add(OpKind.WHERE, m[0], s, b.const(torch.tensor(float("-inf"))))
        elif mask_kind == "causal":
            s = b.add(OpKind.ADD, s, b.const(torch.full((5, 5), float("-inf")).triu(1)))
        p = b.add(OpKind.SOFTMAX, s, attrs=A.AxisAttrs(3))
        o = b.add(OpKind.MATMUL, p, _heads(b, v))
        return b.add(OpKind.RESHAPE, b.add(OpKind.PERMUTE, o, attrs=A.PermuteAttrs((0, 2, 1, 3))),
                     attrs=A.ShapeAttrs((2, 5, 8)))
    return fn


def _attn_expected(mask_kind):
    def fn(b, q, k, v, *m):
        ins = [_heads(b, q), _heads(b, k), _heads(b, v)] + ([m[0]] if mask_kind in ("add", "bool") else [])
        o = b.add(OpKind.ATTENTION, *ins, attrs=A.AttentionAttrs(None, mask_kind == "causal"))
        return b.add(OpKind.RESHAPE, b.add(OpKind.PERMUTE, o, attrs=A.PermuteAttrs((0, 2, 1, 3))),
                     attrs=A.ShapeAttrs((2, 5, 8)))
    return fn


def test_attention_fusion_masks_and_causal():
    for kind, extra, dt in (("none", [], None), ("add", [(2, 1, 1, 5)], None), ("bool", [(2, 1, 5, 5)], DType.BOOL),
                            ("causal", [], None)):
        shapes = [(2, 5, 8)] * 3 + extra
        dtypes = {3: dt} if dt else None
        g = build(_attn_before(kind), *shapes, dtypes=dtypes)
        out = run_pipeline(g, select=["canonicalize", "attention", "simplify"], verify_each=True).graph
        assert_structural_equal(out, build(_attn_expected(kind), *shapes, dtypes=dtypes))
        inputs = None
        if kind == "bool":
            from conftest import random_inputs
            inputs = random_inputs(g)
            inputs[3] = inputs[3] | torch.eye(5, dtype=torch.bool)  # no fully masked rows
        assert_same_outputs(g, out, inputs)


def test_attention_declines_when_probabilities_are_also_returned():
    def fn(b, q, k, v):
        s = b.add(OpKind.MATMUL, _heads(b, q), _heads(b, k, (0, 2, 3, 1)))
        p = b.add(OpKind.SOFTMAX, s, attrs=A.AxisAttrs(3))
        return b.add(OpKind.MATMUL, p, _heads(b, v)), p

    g = build(fn, (2, 5, 8), (2, 5, 8), (2, 5, 8))
    assert run_pass("attention", g).count(OpKind.ATTENTION) == 0


# ----------------------------------------------------------------------------- rnn
def _two_layer_lstm():
    lstm = torch.nn.LSTM(3, 6, num_layers=2, batch_first=True)
    ws = [p.detach() for p in lstm._flat_weights]

    def before(b, x, h0, c0):
        return b.add(OpKind.LSTM, x, h0, c0, *(b.const(w) for w in ws), attrs=A.RNNAttrs(6, 2, batch_first=True))

    return ws, before, ((4, 7, 3), (2, 4, 6), (2, 4, 6))


def _layers_expected(ws, hoisted):
    def expected(b, x, h0, c0):
        y, hs, cs = x, [], []
        for layer in range(2):
            w_ih, w_hh, b_ih, b_hh = ws[4 * layer: 4 * layer + 4]
            st = [b.add(OpKind.SLICE, s, attrs=A.SliceAttrs(0, layer, layer + 1)) for s in (h0, c0)]
            if hoisted:
                xp = b.add(OpKind.LINEAR, y, b.const(w_ih), b.const(b_ih + b_hh))
                y, h, c = b.add(OpKind.LSTM, xp, *st, b.const(w_hh),
                                attrs=A.RNNAttrs(6, 1, batch_first=True, proj_hoisted=True))
            else:
                y, h, c = b.add(OpKind.LSTM, y, *st, *(b.const(w) for w in (w_ih, w_hh, b_ih, b_hh)),
                                attrs=A.RNNAttrs(6, 1, batch_first=True))
            hs.append(h)
            cs.append(c)
        cat = A.AxisAttrs(0)
        return y, b.add(OpKind.CONCAT, *hs, attrs=cat), b.add(OpKind.CONCAT, *cs, attrs=cat)
    return expected


def test_rnn_splits_layers_keeping_the_projection_inside():
    ws, before, shapes = _two_layer_lstm()
    g = build(before, *shapes)
    out = run_pass("rnn", g)
    assert_structural_equal(out, build(_layers_expected(ws, hoisted=False), *shapes))
    assert_same_outputs(g, out)


def test_rnn_hoist_makes_one_projection_gemm_per_layer_for_cuda():
    ws, before, shapes = _two_layer_lstm()
    g = build(before, *shapes)
    assert run_pipeline(g, select=["rnn", "rnn_hoist"]).graph.count(OpKind.LINEAR) == 0  # cpu: not hoisted
    out = run_pipeline(g, select=["rnn", "rnn_hoist"], verify_each=True, options=CompileOptions.parse(target="cuda")).graph
    assert_structural_equal(out, build(_layers_expected(ws, hoisted=True), *shapes))
    assert_same_outputs(g, out)


# ----------------------------------------------------------------------------- epilogue
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


def test_horizontal_declines_residuals_mixed_bias_and_different_activations():
    w1, w2, bias = torch.randn(8, 8), torch.randn(8, 8), torch.randn(8)

    def residual(b, x):  # a residual differs per sibling
        return (b.add(OpKind.LINEAR, x, b.const(w1), b.const(bias), x), b.add(OpKind.LINEAR, x, b.const(w2)))

    def mixed(b, x):
        return (b.add(OpKind.LINEAR, x, b.const(w1), b.const(bias)), b.add(OpKind.LINEAR, x, b.const(w2)))

    def acts(b, x):
        return (b.add(OpKind.LINEAR, x, b.const(w1), attrs=A.LinearAttrs(A.Activation.RELU)),
                b.add(OpKind.LINEAR, x, b.const(w2)))

    def weight_is_input(b, x, w):  # only constant weights are concatenated
        return (b.add(OpKind.LINEAR, x, w), b.add(OpKind.LINEAR, x, b.const(w2)))

    for fn, shapes in ((residual, [(3, 8)]), (mixed, [(3, 8)]), (acts, [(3, 8)]), (weight_is_input, [(3, 8), (8, 8)])):
        g = build(fn, *shapes)
        out = run_pass("horizontal", g)
        assert [n.op for n in out.nodes] == [n.op for n in g.nodes], fn.__name__


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
    g2 = build(lambda b, x: b.add(OpKind.ADD, b.add(OpKind.RELU, b.add(OpKind.CONV2D, x, b.const(w), attrs=conv)), x),
               (1, 4, 6, 6))
    out2 = run_pass("epilogue", g2)
    assert out2.op_counts() == {"add": 1, "conv2d": 1}
    assert_same_outputs(g2, out2)


# ----------------------------------------------------------------------------- layout
def test_channels_last_for_conv_chain_with_fewest_conversions():
    w1, w2 = torch.randn(8, 3, 3, 3), torch.randn(8, 8, 3, 3)

    def before(b, x):
        y = b.add(OpKind.CONV2D, x, b.const(w1), attrs=A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU))
        z = b.add(OpKind.CONV2D, y, b.const(w2), None, y, attrs=A.Conv2dAttrs(padding=(1, 1)))
        z = b.add(OpKind.MAX_POOL2D, z, attrs=A.Pool2dAttrs((2, 2), (2, 2)))
        return b.add(OpKind.RESHAPE, z, attrs=A.ShapeAttrs((2, 8 * 4 * 4)))

    g = build(before, (2, 3, 8, 8))
    out = run_pass("channels_last", g)
    assert out.count(OpKind.TO_LAYOUT) == 2  # into the chain once, out of it once
    for n in out.nodes:
        if n.op is OpKind.CONV2D:
            assert n.outputs[0].type.layout.kind is LayoutKind.CHANNELS_LAST
            assert n.inputs[1].type.layout.kind is LayoutKind.CHANNELS_LAST  # prepacked weight
            assert out.constants[n.inputs[1]].is_contiguous(memory_format=torch.channels_last)
    assert_same_outputs(g, out)
