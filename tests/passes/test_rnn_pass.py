"""rnn and rnn_hoist (passes/rnn.py): a multi-layer LSTM splits into one op per layer; for
cuda (and quantized compiles) each layer's input projection becomes one GEMM ahead of the
recurrence."""
import torch

from kiln.options import CompileOptions
from kiln.ir import OpKind
from kiln.ir import attrs as A
from kiln.passes.pipeline import run_pipeline

from conftest import assert_same_outputs, assert_structural_equal
from graphs import build, run_pass


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
