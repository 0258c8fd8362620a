"""oneDNN GEMM/conv kernels with prepacked weights and fused epilogues vs the reference."""
import pytest
import torch

from kiln.ir import DType, GraphBuilder, Layout, LayoutKind, OpKind
from kiln.ir import attrs as A
from kiln.kernels import onednn
from kiln.ir.reference import conv2d as ref_conv
from kiln.ir.reference import linear as ref_linear
from kiln.kernels.registry import kernels_for

pytestmark = pytest.mark.skipif(not onednn._MKLDNN, reason="torch was built without oneDNN")
ACTS = [A.Activation.NONE, A.Activation.RELU, A.Activation.GELU, A.Activation.GELU_TANH, A.Activation.SILU,
        A.Activation.TANH, A.Activation.SIGMOID]


# oneDNN's bf16 path needs AVX512-BW/VL/DQ or AVX-NE-CONVERT: on other CPUs the kernels do not
# accept bf16 nodes (tested in test_bf16_is_no_candidate_where_onednn_cannot_run_it)
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not onednn._bf16_ok(),
                                                             reason="this CPU has no oneDNN bf16 path"))


def test_bf16_is_no_candidate_where_onednn_cannot_run_it(monkeypatch):
    from kiln.kernels.registry import candidates

    b = GraphBuilder()
    x = b.input("x", (4, 16), DType.BFLOAT16)
    y = b.add(OpKind.LINEAR, x, b.const(torch.randn(8, 16).to(torch.bfloat16)), None, attrs=A.LinearAttrs())
    node = b.build([y]).nodes[0]
    for ok in (True, False):
        monkeypatch.setattr(onednn, "_bf16_ok", lambda ok=ok: ok)
        names = [k.name for k in candidates(node, "cpu")]
        assert ("cpu.onednn_linear" in names) is ok, names


def _kernel(op):
    return next(k for k in kernels_for(op, "cpu") if k.name.startswith("cpu.onednn"))


def _tol(dtype):
    return (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
def test_linear(dtype, act, residual):
    b = GraphBuilder()
    x = b.input("x", (2, 5, 16), DType.from_torch(dtype))
    w, bias = torch.randn(24, 16).to(dtype), torch.randn(24).to(dtype)
    r = b.input("r", (2, 5, 24), DType.from_torch(dtype)) if residual else None
    ins = [x, b.const(w), b.const(bias)] + ([r] if residual else [])
    y = b.add(OpKind.LINEAR, *ins, attrs=A.LinearAttrs(act))
    node = b.build([y]).nodes[0]
    args = [torch.randn(2, 5, 16).to(dtype), w, bias] + ([torch.randn(2, 5, 24).to(dtype)] if residual else [])
    fn = _kernel(OpKind.LINEAR).bind(node, [None, w, bias] + ([None] if residual else []))
    atol, rtol = _tol(dtype)
    torch.testing.assert_close(fn(args, node.attrs), ref_linear(args, node.attrs), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("act,residual", [(A.Activation.NONE, False), (A.Activation.GELU, False),
                                          (A.Activation.RELU, True)])
def test_linear_at_row_counts_it_was_not_prepared_for(dtype, act, residual):
    """A dynamic plan's GEMM, prepared at 2x5 rows, called at other lengths: rows padded up
    to a bucket, the first rows of the result kept (odd counts, bucket edges, one row)."""
    b = GraphBuilder()
    x = b.input("x", (2, 5, 16), DType.from_torch(dtype))
    w, bias = torch.randn(24, 16).to(dtype), torch.randn(24).to(dtype)
    r = b.input("r", (2, 5, 24), DType.from_torch(dtype)) if residual else None
    y = b.add(OpKind.LINEAR, *([x, b.const(w), b.const(bias)] + ([r] if residual else [])), attrs=A.LinearAttrs(act))
    node = b.build([y]).nodes[0]
    fn = _kernel(OpKind.LINEAR).bind(node, [None, w, bias] + ([None] if residual else []))
    atol, rtol = _tol(dtype)
    for batch, seq in [(1, 1), (1, 7), (3, 17), (1, 64), (1, 65), (1, 129), (2, 511)]:
        args = [torch.randn(batch, seq, 16).to(dtype), w, bias]
        args += [torch.randn(batch, seq, 24).to(dtype)] if residual else []
        got = fn(args, node.attrs)
        assert got.shape == (batch, seq, 24) and got.is_contiguous()
        torch.testing.assert_close(got, ref_linear(args, node.attrs), atol=atol, rtol=rtol)


def test_row_buckets_are_few_and_close_above():
    buckets = {onednn.row_bucket(m) for m in range(1, 513)}
    assert len(buckets) == 48 and max(buckets) == 512
    for m in range(1, 3000):
        mb = onednn.row_bucket(m)
        assert mb >= m and mb % 8 == 0 and onednn.row_bucket(mb) == mb
        assert mb - m < 8 if m <= 256 else mb <= m * 17 / 16


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("layout", ["row", "nhwc"])
@pytest.mark.parametrize("case", ["plain", "bias_relu", "residual_relu", "grouped_strided", "depthwise_relu6",
                                  "residual_relu6"])
def test_conv(dtype, layout, case):
    attrs = {"plain": A.Conv2dAttrs(padding=(1, 1)),
             "bias_relu": A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU),
             "residual_relu": A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU),
             "grouped_strided": A.Conv2dAttrs(stride=(2, 2), padding=(1, 1), groups=2),
             # MobileNet's: oneDNN's clip post-op, outputs on both sides of [0, 6]
             "depthwise_relu6": A.Conv2dAttrs(padding=(1, 1), groups=8, activation=A.Activation.RELU6),
             "residual_relu6": A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU6)}[case]
    cin = 8
    w = torch.randn(8, cin // attrs.groups, 3, 3).to(dtype)
    bias = torch.randn(8).to(dtype) if case != "plain" else None
    lay = Layout(LayoutKind.CHANNELS_LAST) if layout == "nhwc" else Layout()
    b = GraphBuilder()
    x = b.input("x", (2, cin, 7, 7), DType.from_torch(dtype))
    x = b.add(OpKind.TO_LAYOUT, x, attrs=A.LayoutAttrs(lay)) if layout == "nhwc" else x
    ins = [x, b.const(w)] + ([b.const(bias)] if bias is not None else [])
    if case.startswith("residual"):
        ins.append(b.input("r", (2, 8, 7, 7), DType.from_torch(dtype)))
    node = b.build([b.add(OpKind.CONV2D, *ins, attrs=attrs)]).nodes[-1]
    xt = (torch.randn(2, cin, 7, 7) * 4).to(dtype)
    if layout == "nhwc":
        xt = xt.contiguous(memory_format=torch.channels_last)
    args = [xt, w] + ([bias] if bias is not None else [])
    consts = [None, w] + ([bias] if bias is not None else [])
    if case.startswith("residual"):
        args.append(torch.randn(2, 8, 7, 7).to(dtype))
        consts.append(None)
    fn = _kernel(OpKind.CONV2D).bind(node, consts)
    atol, rtol = _tol(dtype)
    torch.testing.assert_close(fn(args, attrs), ref_conv(args, attrs), atol=atol, rtol=rtol)


def test_linear_takes_strided_views():
    b = GraphBuilder()
    x = b.input("x", (4, 16))
    w = torch.randn(8, 16)
    node = b.build([b.add(OpKind.LINEAR, x, b.const(w))]).nodes[0]
    fn = _kernel(OpKind.LINEAR).bind(node, [None, w])
    view = torch.randn(16, 4).t()  # a (4, 16) view with strides (1, 4)
    torch.testing.assert_close(fn([view, w], node.attrs), ref_linear([view, w], node.attrs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_mkl_packed_linear(act, residual, bias):
    """cpu.mkl_linear (MKL packed sgemm, fp32): GEMM, then bias/residual/activation."""
    from kiln.kernels import mkl

    if not mkl.available():
        pytest.skip("torch was built without MKL")
    b = GraphBuilder()
    x = b.input("x", (3, 7, 20))
    w, bv = torch.randn(24, 20), torch.randn(24)
    r = b.input("r", (3, 7, 24)) if residual else None
    ins = [x, b.const(w), b.const(bv) if bias else None] + ([r] if residual else [])
    while ins and ins[-1] is None:
        ins.pop()
    node = b.build([b.add(OpKind.LINEAR, *ins, attrs=A.LinearAttrs(act))]).nodes[0]
    assert mkl._accepts(node)
    args = [torch.randn(3, 7, 20), w, bv if bias else None] + ([torch.randn(3, 7, 24)] if residual else [])
    k = next(k for k in kernels_for(OpKind.LINEAR, "cpu") if k.name == "cpu.mkl_linear")
    fn = k.bind(node, [None, w, bv if bias else None] + ([None] if residual else []))
    torch.testing.assert_close(fn(args, node.attrs), ref_linear(args, node.attrs), atol=1e-4, rtol=1e-4)
    args[0] = torch.randn(3, 7, 40)[..., :20]  # a strided view (rows 40 apart), as a slice hands over
    torch.testing.assert_close(fn(args, node.attrs), ref_linear(args, node.attrs), atol=1e-4, rtol=1e-4)


def test_mkl_is_the_prior_for_static_fp32_linears():
    """Among candidates that measure tied, kernel choice keeps the one listed first: for a
    static fp32 linear with a constant weight that is MKL's packed sgemm (Inductor's choice
    for frozen fp32 linears), then oneDNN, the reference last -- after Kiln's own AVX2 GEMM
    where that is a candidate (CPUs without AVX-512)."""
    from kiln.kernels import mkl
    from kiln.kernels.registry import candidates

    if not mkl.available():
        pytest.skip("torch was built without MKL")
    b = GraphBuilder()
    x = b.input("x", (1, 8, 16))
    node = b.build([b.add(OpKind.LINEAR, x, b.const(torch.randn(32, 16)), b.const(torch.randn(32)))]).nodes[0]
    names = [k.name for k in candidates(node, "cpu")]
    assert names.index("cpu.mkl_linear") < names.index("cpu.onednn_linear") < names.index("reference.linear"), names
    if "cpu.avx2_linear" in names:
        assert names[0] == "cpu.avx2_linear", names


def test_mkl_packed_linear_serves_every_row_count_from_one_packed_weight():
    """cpu.mkl_linear takes symbolic leading dims (a dynamic plan): the weight packed once at
    the representative size serves any row count; at the packed size it is bit for bit the
    result of torch's own ``mkl::_mkl_linear`` (the same MKL call)."""
    from kiln.ir.types import Sym
    from kiln.kernels import mkl
    from kiln.kernels.registry import candidates

    if not mkl.available():
        pytest.skip("torch was built without MKL")
    b = GraphBuilder()
    x = b.input("x", (Sym("batch"), Sym("seq"), 32))
    w, bv = torch.randn(48, 32), torch.randn(48)
    g = b.build([b.add(OpKind.LINEAR, x, b.const(w), b.const(bv), attrs=A.LinearAttrs(A.Activation.GELU))])
    node = g.nodes[0]
    assert "cpu.mkl_linear" in [k.name for k in candidates(node, "cpu")]
    k = next(k for k in kernels_for(OpKind.LINEAR, "cpu") if k.name == "cpu.mkl_linear")
    fn = k.bind(node.at_sizes({"batch": 2, "seq": 64}), [None, w, bv])
    bias_before = bv.clone()
    for shape in [(1, 1, 32), (1, 7, 32), (2, 64, 32), (3, 129, 32), (5, 511, 32)]:
        xs = torch.randn(shape)
        torch.testing.assert_close(fn([xs, w, bv], node.attrs), ref_linear([xs, w, bv], node.attrs),
                                   atol=1e-4, rtol=1e-4)
    assert torch.equal(bv, bias_before)  # the output is never the bias's own memory
    x2 = torch.randn(128, 32)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 128)
    assert torch.equal(mkl.packed_linear(x2, mkl.pack_weight(w, 128), 48, bv),
                       torch.ops.mkl._mkl_linear(x2, packed, w, bv, 128))


def test_mkl_static_rows_run_torchs_op_on_the_same_packed_gemm():
    """A node of static shape runs torch's ``mkl::_mkl_linear`` (called from C++, not through
    ctypes): bit for bit the packed GEMM the symbolic path computes at that row count."""
    from kiln.kernels import mkl

    if not mkl.available() or mkl._TORCH_OP is None:
        pytest.skip("torch was built without MKL")
    b = GraphBuilder()
    x = b.input("x", (2, 9, 40))
    w, bv = torch.randn(24, 40), torch.randn(24)
    node = b.build([b.add(OpKind.LINEAR, x, b.const(w), b.const(bv))]).nodes[0]
    k = next(k for k in kernels_for(OpKind.LINEAR, "cpu") if k.name == "cpu.mkl_linear")
    fn = k.bind(node, [None, w, bv])
    xs = torch.randn(2, 9, 40)
    got = fn([xs, w, bv], node.attrs)
    assert got.shape == (2, 9, 24)
    assert torch.equal(got.reshape(-1, 24), mkl.packed_linear(xs.reshape(-1, 40), mkl.pack_weight(w, 18), 24, bv))
    strided = torch.randn(2, 9, 80)[..., :40]  # a slice's rows: copied, same numbers
    assert torch.equal(fn([strided, w, bv], node.attrs), fn([strided.contiguous(), w, bv], node.attrs))
