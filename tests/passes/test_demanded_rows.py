"""The demanded-rows pass (passes/rows.py): before/expected graphs, the cases it must leave
alone, and a BERT-style classifier end to end."""
import torch

import kiln
from kiln.ir import DType, OpKind
from kiln.ir import attrs as A

from conftest import assert_same_outputs, assert_structural_equal
from graphs import build, run_pass as run_named_pass


def run_pass(g):
    return run_named_pass("demanded_rows", g)


def _slice(b, v, axis, start, end):
    return b.add(OpKind.SLICE, v, attrs=A.SliceAttrs(axis, start, end))


W1, B1, W2, G, BETA = torch.randn(32, 16), torch.randn(32), torch.randn(16, 32), torch.randn(16), torch.randn(16)


def _block(b, x):
    """linear -> gelu -> linear (+ residual) -> layer_norm: every op row-wise along axis 1."""
    h = b.add(OpKind.GELU, b.add(OpKind.LINEAR, x, b.const(W1), b.const(B1)))
    y = b.add(OpKind.ADD, x, b.add(OpKind.LINEAR, h, b.const(W2)))
    return b.add(OpKind.LAYER_NORM, y, b.const(G), b.const(BETA), attrs=A.LayerNormAttrs())


def test_a_slice_moves_above_the_row_wise_ops_that_feed_it():
    g = build(lambda b, x: _slice(b, _block(b, x), 1, 2, 3), (2, 8, 16))
    out = run_pass(g)
    assert_structural_equal(out, build(lambda b, x: _block(b, _slice(b, x, 1, 2, 3)), (2, 8, 16)))
    assert_same_outputs(g, out)


def test_query_rows_of_attention_and_its_mask():
    def before(b, q, k, v, m):
        return _slice(b, b.add(OpKind.ATTENTION, q, k, v, m, attrs=A.AttentionAttrs()), 2, 3, 5)

    def expected(b, q, k, v, m):
        return b.add(OpKind.ATTENTION, _slice(b, q, 2, 3, 5), k, v, _slice(b, m, 2, 3, 5), attrs=A.AttentionAttrs())

    shapes = [(1, 2, 8, 4)] * 3 + [(1, 1, 8, 8)]
    g = build(before, *shapes)
    out = run_pass(g)
    assert_structural_equal(out, build(expected, *shapes))
    assert_same_outputs(g, out)


def test_matmul_rows_through_permute_and_reshape_with_a_broadcast_operand():
    def before(b, x, y, s):
        t = b.add(OpKind.PERMUTE, b.add(OpKind.RESHAPE, x, attrs=A.ShapeAttrs((2, 6, 2, 4))), attrs=A.PermuteAttrs((0, 2, 1, 3)))
        z = b.add(OpKind.MUL, b.add(OpKind.MATMUL, t, y), s)  # s (5,) broadcasts over the rows
        return _slice(b, z, 2, 0, 1)

    def expected(b, x, y, s):
        x1 = _slice(b, x, 1, 0, 1)
        t = b.add(OpKind.PERMUTE, b.add(OpKind.RESHAPE, x1, attrs=A.ShapeAttrs((2, 1, 2, 4))), attrs=A.PermuteAttrs((0, 2, 1, 3)))
        return b.add(OpKind.MUL, b.add(OpKind.MATMUL, t, y), s)

    shapes = [(2, 6, 8), (2, 2, 4, 5), (5,)]
    g = build(before, *shapes)
    out = run_pass(g)
    assert_structural_equal(out, build(expected, *shapes))
    assert_same_outputs(g, out)


def test_declines_where_rows_mix_or_the_value_is_needed_whole():
    causal = A.AttentionAttrs(causal=True)
    cases = [
        # the softmax normalizes along the sliced axis
        (lambda b, x: _slice(b, b.add(OpKind.SOFTMAX, x, attrs=A.AxisAttrs(1)), 1, 0, 2), [(2, 8, 16)]),
        # a concat along the sliced axis (not an op the pass knows)
        (lambda b, x: _slice(b, b.add(OpKind.CONCAT, x, x, attrs=A.AxisAttrs(1)), 1, 0, 1), [(2, 8, 16)]),
        # causal attention: a query row's visible keys depend on its position
        (lambda b, q, k, v: _slice(b, b.add(OpKind.ATTENTION, q, k, v, attrs=causal), 2, 3, 5), [(1, 2, 8, 4)] * 3),
        # the linear's output is also a graph output, whole
        (lambda b, x: (lambda y: (_slice(b, y, 1, 0, 1), y))(b.add(OpKind.LINEAR, x, b.const(W1))), [(2, 8, 16)]),
        # two readers want different rows
        (lambda b, x: (lambda y: b.add(OpKind.ADD, _slice(b, y, 1, 0, 1), _slice(b, y, 1, 1, 2)))(
            b.add(OpKind.RELU, x)), [(2, 8, 16)]),
    ]
    for fn, shapes in cases:
        g = build(fn, *shapes)
        out = run_pass(g)
        assert out.op_counts() == g.op_counts(), out.op_counts()
        assert_same_outputs(g, out)


def test_bert_classifier_runs_its_last_layer_on_the_pooled_token():
    model, (ids, mask) = kiln.models.bert(layers=2, seq=16, hidden=64, heads=4, ffn=96, vocab=100)
    compiled = kiln.compile(model, (ids, mask))
    graph = compiled.compiled[0].graph
    ffn = [n for n in graph.nodes if n.op is OpKind.LINEAR and n.outputs[0].shape[-1] == 96]
    assert sorted(n.outputs[0].shape[-2] for n in ffn) == [1, 16]  # last layer: one token
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask), model(ids, mask), atol=1e-4, rtol=1e-4)


def test_a_constant_index_take_is_a_row_slice():
    # ONNX spells x[:, 0] as Gather(axis=1) of a scalar index: a TAKE
    def before(b, x):
        return b.add(OpKind.TAKE, b.add(OpKind.RELU, x), b.const(torch.tensor(-1)), attrs=A.AxisAttrs(1))

    def expected(b, x):
        return b.add(OpKind.RESHAPE, b.add(OpKind.RELU, _slice(b, x, 1, 7, 8)), attrs=A.ShapeAttrs((2, 16)))

    g = build(before, (2, 8, 16))
    out = run_pass(g)
    assert_structural_equal(out, build(expected, (2, 8, 16)))
    assert_same_outputs(g, out)


def test_reductions_over_other_axes_keep_the_rows():
    # a layer norm as ONNX opset 14 spells it: means over the last axis, with and without keepdim
    def chain(b, x):
        mu = b.add(OpKind.MEAN, x, attrs=A.ReduceAttrs((2,), keepdim=True))
        c = b.add(OpKind.SUB, x, mu)
        var = b.add(OpKind.MEAN, b.add(OpKind.MUL, c, c), attrs=A.ReduceAttrs((2,), keepdim=False))
        return b.add(OpKind.DIV, c, b.add(OpKind.RESHAPE, b.add(OpKind.SQRT, var), attrs=A.ShapeAttrs((2, 8, 1))))

    def before(b, x):
        return _slice(b, chain(b, x), 1, 0, 1)

    def expected(b, x):
        x1 = _slice(b, x, 1, 0, 1)
        mu = b.add(OpKind.MEAN, x1, attrs=A.ReduceAttrs((2,), keepdim=True))
        c = b.add(OpKind.SUB, x1, mu)
        var = b.add(OpKind.MEAN, b.add(OpKind.MUL, c, c), attrs=A.ReduceAttrs((2,), keepdim=False))
        return b.add(OpKind.DIV, c, b.add(OpKind.RESHAPE, b.add(OpKind.SQRT, var), attrs=A.ShapeAttrs((2, 1, 1))))

    g = build(before, (2, 8, 16))
    out = run_pass(g)
    assert_structural_equal(out, build(expected, (2, 8, 16)))
    assert_same_outputs(g, out)


def test_a_dynamic_bert_runs_its_last_layer_on_the_pooled_token_at_every_length():
    from kiln.ir import Sym

    model, (ids, mask) = kiln.models.bert(layers=2, seq=16, hidden=64, heads=4, ffn=96, vocab=100)
    compiled = kiln.compile(model, (ids, mask), dynamic=True)
    graph = compiled.compiled[0].graph
    ffn = [n for n in graph.nodes if n.op is OpKind.LINEAR and n.outputs[0].shape[-1] == 96]
    assert sorted(str(n.outputs[0].shape[-2]) for n in ffn) == ["1", "seq"]  # last layer: one token
    assert any(Sym("seq") in n.outputs[0].shape for n in ffn)
    with torch.no_grad():
        for seq in (1, 7, 33):
            a = (torch.randint(0, 100, (2, seq)), torch.ones(2, seq, dtype=mask.dtype))
            torch.testing.assert_close(compiled(*a), model(*a), atol=1e-4, rtol=1e-4)


def _index(b, v, *indices):
    return b.add(OpKind.INDEX, v, *indices)


def test_rows_a_runtime_index_picks_move_above_the_row_wise_ops():
    # a decoder classifier's pooled logits at batch 1: logits[arange(1), last_token]
    def before(b, x, idx):
        return _index(b, b.add(OpKind.LINEAR, _block(b, x), b.const(W2.T.contiguous())), b.const(torch.tensor([0])), idx)

    def expected(b, x, idx):
        y = b.add(OpKind.LINEAR, _block(b, b.add(OpKind.TAKE, x, idx, attrs=A.AxisAttrs(1))), b.const(W2.T.contiguous()))
        return b.add(OpKind.RESHAPE, y, attrs=A.ShapeAttrs((1, 32)))

    dtypes = {1: DType.INT64}
    g = build(before, (1, 8, 16), (1,), dtypes=dtypes)
    out = run_pass(g)
    assert_structural_equal(out, build(expected, (1, 8, 16), (1,), dtypes=dtypes))
    for last in (0, 5, 7, -1):
        assert_same_outputs(g, out, inputs=[torch.randn(1, 8, 16), torch.tensor([last])])


def test_a_picked_index_computed_after_the_layers_moves_before_its_first_reader():
    # as Hugging Face writes it: the last real token is found after the layers have run
    def last_token(b, ids):
        return b.add(OpKind.ARGMAX, b.add(OpKind.MUL, ids, b.const(torch.arange(8))), attrs=A.ArgReduceAttrs(1))

    def before(b, x, ids):
        y = _block(b, x)
        return _index(b, y, b.const(torch.tensor([0])), last_token(b, ids))

    def expected(b, x, ids):
        idx = last_token(b, ids)
        return b.add(OpKind.RESHAPE, _block(b, b.add(OpKind.TAKE, x, idx, attrs=A.AxisAttrs(1))),
                     attrs=A.ShapeAttrs((1, 16)))

    dtypes = {1: DType.INT64}
    g = build(before, (1, 8, 16), (1, 8), dtypes=dtypes)
    out = run_pass(g)
    assert_structural_equal(out, build(expected, (1, 8, 16), (1, 8), dtypes=dtypes))
    for ones in (8, 3, 1):
        assert_same_outputs(g, out, inputs=[torch.randn(1, 8, 16), (torch.arange(8) < ones).long()[None]])


def test_runtime_picks_decline_where_the_index_is_not_one_row_per_axis():
    cases = [
        # batch 2: x[0, idx] reads from one sample of two (not a pick of every sample's rows)
        (lambda b, x, i: _index(b, b.add(OpKind.RELU, x), b.const(torch.tensor([0])), i), [(2, 8, 16), (1,)]),
        # two runtime indices
        (lambda b, x, i: _index(b, b.add(OpKind.RELU, x), i, i), [(1, 8, 16), (1,)]),
        # a 2-D index (its shape would need broadcasting)
        (lambda b, x, i: _index(b, b.add(OpKind.RELU, x), b.const(torch.tensor([0])), i), [(1, 8, 16), (1, 1)]),
    ]
    for fn, shapes in cases:
        g = build(fn, *shapes, dtypes={1: DType.INT64})
        out = run_pass(g)
        assert out.op_counts() == g.op_counts(), out.op_counts()
        assert_same_outputs(g, out, inputs=[torch.randn(*shapes[0]), torch.zeros(shapes[1], dtype=torch.int64)])


def test_a_decoder_classifier_runs_its_last_layer_on_the_classified_token():
    from kiln.bench.suite_models import build as build_model

    model, (ids,) = build_model("opt", quick=True)
    compiled = kiln.compile(model, (ids,))
    graph = compiled.compiled[0].graph
    fc2 = [n for n in graph.nodes if n.op is OpKind.LINEAR and n.inputs[0].shape[-1] == 128]
    assert sorted(n.outputs[0].shape[-2] for n in fc2) == [1, 32]  # the last layer: one token
    padded = ids.clone()
    padded[0, 20:] = model.config.pad_token_id  # the classified token is the last one before the padding
    with torch.no_grad():
        for x in (ids, padded):
            torch.testing.assert_close(compiled(x)[0], model(x).logits, atol=1e-4, rtol=1e-4)
