"""Separable batches (passes/separable.py): graphs whose every op computes each sample of the
leading symbolic size on its own, and the ops, axes and shapes that make a graph inseparable."""
import torch

from kiln.ir import OpKind, Sym
from kiln.ir import attrs as A
from kiln.passes.separable import separable_batch

from graphs import build

B = Sym("batch")
W, BIAS, FC = torch.randn(8, 3, 3, 3), torch.randn(8), torch.randn(5, 8)


def _cnn(b, x):
    """conv + relu -> max pool -> global mean -> reshape -> linear -> softmax over classes."""
    h = b.add(OpKind.CONV2D, x, b.const(W), b.const(BIAS), attrs=A.Conv2dAttrs(padding=(1, 1)))
    h = b.add(OpKind.RELU, h)
    h = b.add(OpKind.MAX_POOL2D, h, attrs=A.Pool2dAttrs(kernel=(2, 2), stride=(2, 2)))
    h = b.add(OpKind.MEAN, h, attrs=A.ReduceAttrs((2, 3), keepdim=True))
    h = b.add(OpKind.RESHAPE, h, attrs=A.ShapeAttrs((B, 8)))
    return b.add(OpKind.SOFTMAX, b.add(OpKind.LINEAR, h, b.const(FC)), attrs=A.AxisAttrs(1))


def test_a_cnn_classifier_is_separable_along_its_batch():
    assert separable_batch(build(_cnn, (B, 3, 8, 8))).size == "batch"


def test_an_operand_without_the_batch_is_shared_by_every_sample():
    def fn(b, x, y):  # y [1, 4] broadcasts along the batch; a [4] bias too
        return b.add(OpKind.ADD, b.add(OpKind.MUL, x, y), b.const(torch.randn(4)))

    assert separable_batch(build(fn, (B, 4), (1, 4))).size == "batch"


def _why(fn, *shapes):
    got = separable_batch(build(fn, *shapes))
    assert got.size is None
    return got.why


def test_ops_along_the_batch_axis_make_it_inseparable():
    assert "batch" in _why(lambda b, x: b.add(OpKind.SOFTMAX, x, attrs=A.AxisAttrs(0)), (B, 4))
    assert "lead with" in _why(
        lambda b, x: b.add(OpKind.SUM, x, attrs=A.ReduceAttrs((0,))), (B, 4))
    assert "permute" in _why(lambda b, x: b.add(OpKind.PERMUTE, x, attrs=A.PermuteAttrs((1, 0))),
                                          (B, 4))
    assert "concat" in _why(lambda b, x: b.add(OpKind.CONCAT, x, x, attrs=A.AxisAttrs(0)), (B, 4))
    # a reshape folding the batch into another dim
    assert "lead with" in _why(
        lambda b, x: b.add(OpKind.RESHAPE, x, attrs=A.ShapeAttrs((B * 4,))), (B, 4))


def test_unknown_ops_and_other_sizes_make_it_inseparable():
    lstm = torch.nn.LSTM(3, 6, batch_first=True)
    ws = [p.detach() for p in lstm.parameters()]

    def rnn(b, x, h0, c0):
        return b.add(OpKind.LSTM, x, h0, c0, *(b.const(w) for w in ws), attrs=A.RNNAttrs(6, 1, batch_first=True))[0]

    assert "lstm" in _why(rnn, (B, 5, 3), (1, B, 6), (1, B, 6))
    assert "other symbolic sizes (seq)" in _why(lambda b, x: b.add(OpKind.RELU, x), (B, Sym("seq")))
    assert "not a symbolic size" in _why(lambda b, x: b.add(OpKind.RELU, x), (2, 4))



def test_ops_over_trailing_axes_need_the_batch_before_them():
    def norm_all(b, x):  # normalizes over both axes: the batch's too
        return b.add(OpKind.LAYER_NORM, x, attrs=A.LayerNormAttrs(normalized_ndim=2))

    def attend(b, q):  # a 2-D query's rows are the sequence attention mixes
        return b.add(OpKind.ATTENTION, q, q, q, attrs=A.AttentionAttrs())

    assert "normalizes over the batch" in _why(norm_all, (B, 4))
    assert "axis it works along" in _why(attend, (B, 8))
    assert separable_batch(build(attend, (B, 2, 5, 8))).size == "batch"
