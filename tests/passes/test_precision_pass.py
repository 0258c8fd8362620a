"""The bf16 precision phase (passes/precision.py), graph by graph: ``RULES`` put GEMMs,
convs, matmuls and attention in bfloat16 between casts (constant weights converted at
compile time), ``ROUND_TRIPS`` remove exact bf16 -> f32 -> view -> bf16 round trips, and
``RNN_RULES`` make LSTM / GRU layers bf16. Whole models in bf16: tests/passes/test_precision.py."""
import torch

from kiln.ir import DType, GraphBuilder, OpKind
from kiln.ir import attrs as A
from kiln.passes import precision
from kiln.passes.rewrite import rewrite

from conftest import assert_same_outputs, assert_structural_equal, random_inputs
from graphs import build, run_pass

F32, BF16 = DType.FLOAT32, DType.BFLOAT16
BF16_TOL = 3e-2  # bf16 keeps 8 bits of mantissa: within 3% of max(1, |fp32 output|max)


def _cast(b, v, dtype):
    return b.add(OpKind.CAST, v, attrs=A.CastAttrs(dtype))


def _bf16_const(b, t):
    return b.const(t.to(torch.bfloat16))


def test_linear_keeps_bias_and_activation_inside_the_bf16_gemm():
    w, bias = torch.randn(16, 8), torch.randn(16)
    gelu = A.LinearAttrs(A.Activation.GELU)

    def before(b, x):
        return b.add(OpKind.LINEAR, x, b.const(w), b.const(bias), attrs=gelu)

    def expected(b, x):
        y = b.add(OpKind.LINEAR, _cast(b, x, BF16), _bf16_const(b, w), _bf16_const(b, bias), attrs=gelu)
        return _cast(b, y, F32)

    g = build(before, (2, 3, 8))
    out = run_pass("bf16", g, precision="bf16")
    assert_structural_equal(out, build(expected, (2, 3, 8)))
    assert all(t.dtype == torch.bfloat16 for t in out.constants.values())  # converted at compile time
    assert_same_outputs(g, out, rel=BF16_TOL)


def test_linear_residual_and_activation_move_after_the_cast_in_f32():
    w, bias = torch.randn(8, 8), torch.randn(8)

    def before(b, x):
        return b.add(OpKind.LINEAR, x, b.const(w), b.const(bias), x, attrs=A.LinearAttrs(A.Activation.RELU))

    def expected(b, x):
        y = _cast(b, b.add(OpKind.LINEAR, _cast(b, x, BF16), _bf16_const(b, w), _bf16_const(b, bias)), F32)
        return b.add(OpKind.RELU, b.add(OpKind.ADD, y, x))

    g = build(before, (4, 8))
    out = run_pass("bf16", g, precision="bf16")
    assert_structural_equal(out, build(expected, (4, 8)))
    assert_same_outputs(g, out, rel=BF16_TOL)


def test_conv_keeps_its_whole_epilogue_in_bf16():
    w, bias = torch.randn(4, 4, 3, 3), torch.randn(4)
    conv = A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU)

    def before(b, x):
        return b.add(OpKind.CONV2D, x, b.const(w), b.const(bias), x, attrs=conv)

    def expected(b, x):
        xb = _cast(b, x, BF16)
        return _cast(b, b.add(OpKind.CONV2D, xb, _bf16_const(b, w), _bf16_const(b, bias), xb, attrs=conv), F32)

    g = build(before, (1, 4, 6, 6))
    out = run_pass("bf16", g, precision="bf16")
    assert_structural_equal(out, build(expected, (1, 4, 6, 6)))
    assert_same_outputs(g, out, rel=BF16_TOL)


def test_matmul_and_attention_take_bf16_operands_and_a_bool_mask_as_it_is():
    def before(b, q, k, v, mask):
        s = b.add(OpKind.MATMUL, q, b.add(OpKind.PERMUTE, k, attrs=A.PermuteAttrs((0, 1, 3, 2))))
        return s, b.add(OpKind.ATTENTION, q, k, v, mask, attrs=A.AttentionAttrs())

    def expected(b, q, k, v, mask):
        kt = b.add(OpKind.PERMUTE, k, attrs=A.PermuteAttrs((0, 1, 3, 2)))
        s = _cast(b, b.add(OpKind.MATMUL, _cast(b, q, BF16), _cast(b, kt, BF16)), F32)
        qb, kb, vb = (_cast(b, t, BF16) for t in (q, k, v))
        return s, _cast(b, b.add(OpKind.ATTENTION, qb, kb, vb, mask, attrs=A.AttentionAttrs()), F32)

    shapes, dtypes = [(1, 2, 5, 8)] * 3 + [(1, 1, 5, 5)], {3: DType.BOOL}
    g = build(before, *shapes, dtypes=dtypes)
    out = run_pass("bf16", g, precision="bf16")
    assert_structural_equal(out, build(expected, *shapes, dtypes=dtypes))
    inputs = random_inputs(g)
    inputs[3] = inputs[3] | torch.eye(5, dtype=torch.bool)  # no fully masked rows
    assert_same_outputs(g, out, inputs, rel=BF16_TOL)


def test_bf16_declines_ops_not_in_f32_and_runs_only_for_precision_bf16():
    def bf16_linear(b, x):
        return b.add(OpKind.LINEAR, x, b.const(torch.randn(4, 8).bfloat16()))

    g = build(bf16_linear, (2, 8), dtypes={0: BF16})
    assert_structural_equal(run_pass("bf16", g, precision="bf16"), g)  # already bf16

    g = build(lambda b, x: b.add(OpKind.LINEAR, x, b.const(torch.randn(4, 8))), (2, 8))
    for options in ({}, {"precision": "fp32"}):
        out = run_pass("precision", g, **options)
        assert out.count(OpKind.CAST) == 0
        assert_structural_equal(out, g)


def test_round_trip_through_views_is_removed():
    def before(b, x):
        y = _cast(b, x, BF16)
        y = b.add(OpKind.RESHAPE, _cast(b, y, F32), attrs=A.ShapeAttrs((2, 4, 3)))
        y = b.add(OpKind.PERMUTE, y, attrs=A.PermuteAttrs((0, 2, 1)))
        return _cast(b, y, BF16)

    def expected(b, x):
        y = b.add(OpKind.RESHAPE, _cast(b, x, BF16), attrs=A.ShapeAttrs((2, 4, 3)))
        return b.add(OpKind.PERMUTE, y, attrs=A.PermuteAttrs((0, 2, 1)))

    g = build(before, (2, 12))
    out = run_pass("bf16_round_trips", g, precision="bf16")
    assert_structural_equal(out, build(expected, (2, 12)))
    assert_same_outputs(g, out, rel=0)  # exact: only bf16 values move


def test_round_trip_through_a_pad_and_max_pool_is_removed():
    # BiT's stem between two bf16 convs: padding (with -inf, or a constant bf16 rounds the
    # same either way) and max pooling move bf16 values exactly
    pool = A.Pool2dAttrs((3, 3), (2, 2))
    for value in (float("-inf"), 0.1):
        pad = A.PadAttrs((0, 0, 0, 0, 1, 1, 1, 1), value=value)

        def before(b, x):
            y = b.add(OpKind.PAD, _cast(b, _cast(b, x, BF16), F32), attrs=pad)
            return _cast(b, b.add(OpKind.MAX_POOL2D, y, attrs=pool), BF16)

        def expected(b, x):
            return b.add(OpKind.MAX_POOL2D, b.add(OpKind.PAD, _cast(b, x, BF16), attrs=pad), attrs=pool)

        g = build(before, (1, 4, 9, 9))
        out = run_pass("bf16_round_trips", g, precision="bf16")
        assert_structural_equal(out, build(expected, (1, 4, 9, 9)))
        assert_same_outputs(g, out, rel=0)  # exact


def test_round_trip_stays_where_a_view_has_other_readers_or_an_op_computes():
    def view_read_twice(b, x):  # the f32 reshape is also an output: it must stay f32
        y = b.add(OpKind.RESHAPE, _cast(b, _cast(b, x, BF16), F32), attrs=A.ShapeAttrs((24,)))
        return _cast(b, y, BF16), y

    def through_relu(b, x):  # an op that computes is not a view: it stays in f32
        return _cast(b, b.add(OpKind.RELU, _cast(b, _cast(b, x, BF16), F32)), BF16)

    for fn in (view_read_twice, through_relu):
        g = build(fn, (2, 12))
        out = run_pass("bf16_round_trips", g, precision="bf16")
        assert_structural_equal(out, g)


def test_round_trip_goes_where_the_f32_cast_has_other_readers():
    """The cast to f32 stays for its other reader; the bf16 reader moves the bf16 data."""
    def before(b, x):
        y = _cast(b, _cast(b, x, BF16), F32)
        return _cast(b, b.add(OpKind.RESHAPE, y, attrs=A.ShapeAttrs((24,))), BF16), y

    def expected(b, x):
        xb = _cast(b, x, BF16)
        return b.add(OpKind.RESHAPE, xb, attrs=A.ShapeAttrs((24,))), _cast(b, xb, F32)

    g = build(before, (2, 12))
    out = run_pass("bf16_round_trips", g, precision="bf16")
    assert_structural_equal(out, build(expected, (2, 12)))
    assert_same_outputs(g, out, rel=0)


def test_precision_phase_passes_bf16_between_consecutive_gemms():
    """linear -> linear: the first GEMM's bf16 result feeds the second with no cast to f32
    and back (the round-trip rule after the GEMM rules), the interface stays f32."""
    w1, w2 = torch.randn(16, 8), torch.randn(4, 16)
    relu = A.LinearAttrs(A.Activation.RELU)

    def before(b, x):
        return b.add(OpKind.LINEAR, b.add(OpKind.LINEAR, x, b.const(w1), attrs=relu), b.const(w2))

    def expected(b, x):
        y = b.add(OpKind.LINEAR, _cast(b, x, BF16), _bf16_const(b, w1), attrs=relu)
        return _cast(b, b.add(OpKind.LINEAR, y, _bf16_const(b, w2)), F32)

    g = build(before, (3, 8))
    out = run_pass("precision", g, precision="bf16")
    assert_structural_equal(out, build(expected, (3, 8)))
    assert out.count(OpKind.CAST) == 2
    assert_same_outputs(g, out, rel=BF16_TOL)


def test_bf16_max_pool_between_convs_stays_bf16_when_read_twice():
    """ResNet's stem: conv -> max-pool -> (conv, residual). The pooled value has two bf16
    readers, so two casts until CSE merges them; the round trip must still go."""
    b = GraphBuilder("stem")
    x = b.input("x", (1, 4, 8, 8))
    w1, w2 = b.const(torch.randn(4, 4, 3, 3)), b.const(torch.randn(4, 4, 3, 3))
    y = b.add(OpKind.CONV2D, x, w1, attrs=A.Conv2dAttrs(padding=(1, 1)))
    p = b.add(OpKind.MAX_POOL2D, y, attrs=A.Pool2dAttrs(kernel=(2, 2), stride=(2, 2)))
    z = b.add(OpKind.CONV2D, p, w2, None, p, attrs=A.Conv2dAttrs(padding=(1, 1)))
    g = b.build((z,))
    out = run_pass("precision", g, precision="bf16")
    pool = [n for n in out.nodes if n.op is OpKind.MAX_POOL2D]
    assert len(pool) == 1 and pool[0].outputs[0].dtype is DType.BFLOAT16
    assert sum(n.op is OpKind.CAST for n in out.nodes) == 2  # x in, result out

    def expected(b, x):
        y = b.add(OpKind.CONV2D, _cast(b, x, BF16), b.const(torch.zeros(4, 4, 3, 3).bfloat16()),
                  attrs=A.Conv2dAttrs(padding=(1, 1)))
        p = b.add(OpKind.MAX_POOL2D, y, attrs=A.Pool2dAttrs(kernel=(2, 2), stride=(2, 2)))
        w2 = b.const(torch.zeros(4, 4, 3, 3).bfloat16())
        return _cast(b, b.add(OpKind.CONV2D, p, w2, None, p, attrs=A.Conv2dAttrs(padding=(1, 1))), F32)

    assert_structural_equal(out, build(expected, (1, 4, 8, 8)))
    assert_same_outputs(g, out, rel=BF16_TOL)


def test_bf16_attention_takes_qkv_sliced_from_the_bf16_gemm():
    """BERT's fused QKV GEMM: its bf16 output is sliced into Q, K, V and the heads split
    (slice -> reshape -> permute). Casting to f32 and back around those views is exact, so
    no cast remains between the GEMM and the attention, and the result still matches."""
    b = GraphBuilder("qkv")
    x = b.input("x", (1, 8, 16))
    qkv = b.add(OpKind.LINEAR, x, b.const(torch.randn(48, 16)))
    heads = []
    for i in range(3):
        s = b.add(OpKind.SLICE, qkv, attrs=A.SliceAttrs(axis=2, start=16 * i, end=16 * (i + 1)))
        r = b.add(OpKind.RESHAPE, s, attrs=A.ShapeAttrs((1, 8, 2, 8)))
        heads.append(b.add(OpKind.PERMUTE, r, attrs=A.PermuteAttrs((0, 2, 1, 3))))
    y = b.add(OpKind.ATTENTION, *heads, attrs=A.AttentionAttrs())
    g = b.build((y,))
    out = run_pass("precision", g, precision="bf16")
    attn = next(n for n in out.nodes if n.op is OpKind.ATTENTION)
    producer = out.producers()
    for v in attn.inputs:  # each operand is a view chain straight off the bf16 GEMM
        n = producer[v]
        while n.op is not OpKind.LINEAR:
            assert n.op in (OpKind.PERMUTE, OpKind.RESHAPE, OpKind.SLICE), n.op
            n = producer[n.inputs[0]]
    assert n.outputs[0].dtype is DType.BFLOAT16
    assert sum(n.op is OpKind.CAST for n in out.nodes) == 2  # x in, result out

    def expected(b, x):
        qkv = b.add(OpKind.LINEAR, _cast(b, x, BF16), b.const(torch.zeros(48, 16).bfloat16()))
        heads = []
        for i in range(3):
            s = b.add(OpKind.SLICE, qkv, attrs=A.SliceAttrs(axis=2, start=16 * i, end=16 * (i + 1)))
            r = b.add(OpKind.RESHAPE, s, attrs=A.ShapeAttrs((1, 8, 2, 8)))
            heads.append(b.add(OpKind.PERMUTE, r, attrs=A.PermuteAttrs((0, 2, 1, 3))))
        return _cast(b, b.add(OpKind.ATTENTION, *heads, attrs=A.AttentionAttrs()), F32)

    assert_structural_equal(out, build(expected, (1, 8, 16)))
    assert_same_outputs(g, out, rel=BF16_TOL)


def _rnn_graph(op, weights_const=True, bidirectional=False):
    """One LSTM / GRU layer (batch first) and the weights it was built with."""
    gates = 4 if op is OpKind.LSTM else 3
    ws = [torch.randn(gates * 16, 8) * 0.3, torch.randn(gates * 16, 16) * 0.3, torch.randn(gates * 16) * 0.1,
          torch.randn(gates * 16) * 0.1] * (2 if bidirectional else 1)  # (the reverse direction's: the same)
    b = GraphBuilder("rnn")
    x = b.input("x", (2, 5, 8))
    states = [b.input(f"s{i}", (2 if bidirectional else 1, 2, 16)) for i in range(2 if op is OpKind.LSTM else 1)]
    wv = [b.const(w) if weights_const else b.input(f"w{i}", tuple(w.shape)) for i, w in enumerate(ws)]
    outs = b.add(op, x, *states, *wv, attrs=A.RNNAttrs(16, 1, bidirectional, True, True))
    return b.build(list(outs)), ws


def test_rnn_rules_make_lstm_and_gru_layers_bf16_between_casts():
    for op in (OpKind.LSTM, OpKind.GRU):
        g, ws = _rnn_graph(op)
        nstate = 2 if op is OpKind.LSTM else 1

        def expected(b, x, *states):
            ins = [_cast(b, v, BF16) for v in (x, *states)] + [_bf16_const(b, w) for w in ws]
            outs = b.add(op, *ins, attrs=A.RNNAttrs(16, 1, False, True, True))
            return tuple(_cast(b, v, F32) for v in outs)

        out = rewrite(g, precision.RNN_RULES, name="bf16_rnn")
        want = build(expected, (2, 5, 8), *[(1, 2, 16)] * nstate)
        assert_structural_equal(out, want)
        assert_same_outputs(g, out, rel=BF16_TOL)


def test_rnn_rules_decline_run_time_weights_and_bidirectional_layers():
    for g, _ in (_rnn_graph(OpKind.LSTM, weights_const=False), _rnn_graph(OpKind.GRU, bidirectional=True)):
        assert_structural_equal(rewrite(g, precision.RNN_RULES, name="bf16_rnn"), g)


def test_bf16_rnn_runs_only_for_cpu_compiles():
    # elsewhere (cuda) the bf16 layers' AMX kernels do not exist: the layer stays f32
    g, _ = _rnn_graph(OpKind.LSTM)
    out = run_pass("bf16_rnn", g, precision="bf16", target="cuda")
    assert_structural_equal(out, g)


def test_round_trip_around_a_group_norm_is_the_norm_on_bf16():
    # BiT's norms between its bf16 convs: GROUP_NORM computes in f32 and rounds to its input's
    # dtype, so bf16 -> f32 -> group_norm(+relu) -> bf16 is the norm on the bf16 value
    w, bias = torch.randn(8), torch.randn(8)
    gn = A.GroupNormAttrs(4, activation=A.Activation.RELU)

    def before(b, x):
        y = _cast(b, _cast(b, x, BF16), F32)
        return _cast(b, b.add(OpKind.GROUP_NORM, y, b.const(w), b.const(bias), attrs=gn), BF16)

    def expected(b, x):
        return b.add(OpKind.GROUP_NORM, _cast(b, x, BF16), b.const(w), b.const(bias), attrs=gn)

    g = build(before, (2, 8, 5, 5))
    out = run_pass("bf16_round_trips", g, precision="bf16")
    assert_structural_equal(out, build(expected, (2, 8, 5, 5)))
    assert_same_outputs(g, out, rel=0)  # exact: the same f32 math and one rounding

    def f32_reader(b, x):  # the norm's f32 result is also read: it stays f32
        y = b.add(OpKind.GROUP_NORM, _cast(b, _cast(b, x, BF16), F32), attrs=gn)
        return _cast(b, y, BF16), y

    g = build(f32_reader, (2, 8, 5, 5))
    assert_structural_equal(run_pass("bf16_round_trips", g, precision="bf16"), g)
