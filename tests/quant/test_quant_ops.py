"""Quantized op kinds: formats, type inference, serialization, and every CPU kernel
against its torch reference."""
import pytest
import torch
from conftest import assert_structural_equal
from kiln.ir import DType, GraphBuilder, IRTypeError, OpKind, from_json, to_json, verify
from kiln.ir import attrs as A
from kiln.ir import qformat
from kiln.kernels.choice import agrees
from kiln.kernels.registry import candidates


def test_int8_weight_format():
    w = torch.randn(6, 10)
    q, s = qformat.quantize_weight_int8(w)
    assert q.dtype == torch.int8 and s.shape == (6,) and int(q.abs().max()) <= 127
    assert torch.equal(q.abs().amax(1), torch.full((6,), 127, dtype=torch.int8))  # each row uses its range
    assert float((qformat.dequantize_weight_int8(q, s) - w).abs().max()) <= float(s.max()) / 2 + 1e-6


def test_int4_pack_layout_and_round_trip():
    q = torch.tensor([[-8, 7, 1, -1, 0, 3, -2, 5]], dtype=torch.int8)
    p = qformat.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (1, 4)
    assert int(p[0, 0]) == (0x8 | (0x7 << 4))  # k=0 in the low nibble, k=1 in the high nibble
    assert torch.equal(qformat.unpack_int4(p), q)
    w = torch.randn(16, 128)
    packed, s = qformat.quantize_weight_int4(w, 32)
    assert packed.shape == (16, 64) and s.shape == (16, 4)
    err = (qformat.dequantize_weight_int4(packed, s, 32) - w).abs()
    assert float((err / s.repeat_interleave(32, 1)).max()) <= 0.5 + 1e-5  # half a step


def test_quantize_rows_zero_is_exact():
    x = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    q, s, zp = qformat.quantize_rows(x)
    back = (q.float() - zp) * s
    assert float(back[0, 1]) == 0.0 and torch.equal(back[1], torch.zeros(3))
    assert float((back - x).abs().max()) <= float(s.max()) / 2 + 1e-6


def test_type_inference_and_errors():
    b = GraphBuilder()
    x = b.input("x", (4, 32))
    wq, ws = b.const(torch.zeros(8, 32, dtype=torch.int8)), b.const(torch.ones(8))
    y = b.add(OpKind.QLINEAR_DYNAMIC, x, wq, ws)
    assert y.type.dtype is DType.FLOAT32 and y.type.shape == (4, 8)
    q = b.add(OpKind.QUANTIZE, x, attrs=A.QuantizeAttrs(0.1, 3))
    assert q.type.dtype is DType.UINT8 and q.type.quant.scale == 0.1 and q.type.quant.zero_point == 3
    with pytest.raises(IRTypeError):
        b.add(OpKind.QLINEAR_DYNAMIC, q, wq, ws)  # needs float input
    with pytest.raises(IRTypeError):
        b.add(OpKind.QLINEAR, x, wq, ws, attrs=A.QLinearAttrs(0.1, 0))  # needs uint8 input
    with pytest.raises(IRTypeError):  # int4: K must be a multiple of the group size
        b.add(OpKind.LINEAR_WEIGHT_ONLY, x, b.const(torch.zeros(8, 16, dtype=torch.uint8)), b.const(torch.ones(8, 1)),
              attrs=A.WeightOnlyAttrs(4, 64))
    out = b.add(OpKind.QLINEAR, q, wq, ws, attrs=A.QLinearAttrs(0.1, 3, 0.2, 5, A.Activation.RELU))
    assert out.type.dtype is DType.UINT8 and out.type.quant.scale == 0.2


def _qconv_graph(u8_residual: bool):
    b = GraphBuilder()
    x = b.input("x", (1, 8, 6, 6))
    r = b.input("r", (1, 8, 6, 6))
    wq, ws = qformat.quantize_weight_int8(torch.randn(8, 8, 3, 3))
    xq = b.add(OpKind.QUANTIZE, x, attrs=A.QuantizeAttrs(0.02, 128))
    res = b.add(OpKind.QUANTIZE, r, attrs=A.QuantizeAttrs(0.03, 100)) if u8_residual else r
    attrs = A.QConv2dAttrs(0.02, 128, padding=(1, 1), out_scale=0.05 if u8_residual else None,
                           out_zero_point=0, activation=A.Activation.RELU,
                           residual_scale=0.03 if u8_residual else None, residual_zero_point=100)
    y = b.add(OpKind.QCONV2D, xq, b.const(wq), b.const(ws * 0.1), b.const(torch.randn(8)), res, attrs=attrs)
    if u8_residual:
        y = b.add(OpKind.DEQUANTIZE, y, attrs=A.QuantizeAttrs(0.05, 0))
    return b.build([y])


def test_serialize_round_trip():
    g = _qconv_graph(True)
    verify(g)
    g2 = from_json(to_json(g))
    assert_structural_equal(g, g2)
    assert "qconv2d" in repr(g2) and "uint8" in repr(g2)


def _check_kernels(graph, inputs, expect: str):
    """Every CPU candidate of the graph's quantized node agrees with the reference."""
    from kiln.kernels.registry import kernel_named
    from kiln.target import host_cpu

    needs = kernel_named(expect).requires - host_cpu().features
    if needs:
        pytest.skip(f"{expect} needs {', '.join(sorted(needs))}, which this CPU lacks")
    env = dict(graph.constants)
    env.update(zip(graph.inputs, inputs))
    seen = set()
    for n in graph.nodes:
        ins = [None if v is None else env[v] for v in n.inputs]
        consts = [None if v is None else graph.constants.get(v) for v in n.inputs]
        ks = candidates(n, "cpu")
        ref = ks[-1].fn(ins, n.attrs)
        for k in ks[:-1]:
            seen.add(k.name)
            out = k.bind(n, consts)(ins, n.attrs)
            assert agrees(out, ref, n.outputs[0].type.quant is not None), k.name
        env[n.outputs[0]] = ref
    assert expect in seen


@pytest.mark.parametrize("u8", [False, True])
def test_qconv2d_kernel(u8):
    g = _qconv_graph(u8)
    _check_kernels(g, [torch.randn(1, 8, 6, 6), torch.randn(1, 8, 6, 6)], "cpu.onednn_qconv2d")


@pytest.mark.parametrize("act", [A.Activation.NONE, A.Activation.GELU])
def test_qlinear_dynamic_kernel(act):
    b = GraphBuilder()
    x = b.input("x", (2, 5, 48))
    wq, ws = qformat.quantize_weight_int8(torch.randn(32, 48))
    y = b.add(OpKind.QLINEAR_DYNAMIC, x, b.const(wq), b.const(ws), b.const(torch.randn(32)), b.input("r", (2, 5, 32)),
              attrs=A.QLinearDynamicAttrs(act))
    _check_kernels(b.build([y]), [torch.randn(2, 5, 48) * 3, torch.randn(2, 5, 32)], "cpu.onednn_qlinear_dynamic")


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernel(group):
    b = GraphBuilder()
    x = b.input("x", (2, 3, 256))
    p, s = qformat.quantize_weight_int4(torch.randn(48, 256), group)
    y = b.add(OpKind.LINEAR_WEIGHT_ONLY, x, b.const(p), b.const(s), b.const(torch.randn(48)),
              attrs=A.WeightOnlyAttrs(4, group, A.Activation.RELU))
    _check_kernels(b.build([y]), [torch.randn(2, 3, 256)], "cpu.int4pack_linear")


def test_static_linear_kernel():
    b = GraphBuilder()
    x = b.input("x", (4, 64))
    wq, ws = qformat.quantize_weight_int8(torch.randn(16, 64))
    xq = b.add(OpKind.QUANTIZE, x, attrs=A.QuantizeAttrs(0.05, 120))
    y = b.add(OpKind.QLINEAR, xq, b.const(wq), b.const(ws), b.const(torch.randn(16)),
              attrs=A.QLinearAttrs(0.05, 120, 0.1, 7, A.Activation.RELU))
    _check_kernels(b.build([y]), [torch.randn(4, 64)], "cpu.onednn_qlinear")


def test_reference_matches_dequantized_math():
    """QCONV2D's reference is conv over dequantized operands (then requantized)."""
    g = _qconv_graph(False)
    x, r = torch.randn(1, 8, 6, 6), torch.randn(1, 8, 6, 6)
    from kiln.runtime.plan import run_all

    env = run_all(g, [x, r])
    n = g.nodes[-1]
    xq = env[n.inputs[0]]
    w = qformat.dequantize_weight_int8(g.constants[n.inputs[1]], g.constants[n.inputs[2]])
    want = torch.relu(torch.nn.functional.conv2d((xq.float() - 128) * 0.02, w, g.constants[n.inputs[3]],
                                                 padding=1) + r)
    assert torch.allclose(env[n.outputs[0]], want, atol=1e-4, rtol=1e-4)
