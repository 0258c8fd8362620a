"""The sparsify pass: before/expected graphs, numerics, measured decisions, IR round trip."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import assert_same_outputs, assert_structural_equal, max_err_ok

import kiln
from kiln.ir import GraphBuilder, OpKind, from_json, to_json, verify
from kiln.ir import attrs as A
from kiln.ir import sparse as S
from kiln.options import CompileOptions
from kiln.passes.context import PassContext
from kiln.passes.sparsity import MARGIN, sparsify
from kiln.pruning import weight_mask
from kiln.runtime.plan import build_plan

RELU = A.LinearAttrs(A.Activation.RELU)


class _Timer:
    """A Measurer whose node timing is ``time_nodes`` (the sparsity pass needs only that)."""

    def __init__(self, time_nodes):
        self.time_nodes = time_nodes


def _sparsify(graph, mode, measure=None, target=None, log=None):
    ctx = PassContext(CompileOptions.parse(sparse=mode, target=target), None if measure is None else _Timer(measure))
    after = sparsify(graph, ctx)
    if log is not None:
        log.extend(ctx.decisions.sparsity)
    return after


def _pruned(shape, sparsity=0.75, pattern="block(4,4)", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    return w * weight_mask(w, sparsity, pattern)


def _linear_graph(w, m=6, act=RELU):
    b = GraphBuilder("lin")
    x = b.input("x", (m, w.shape[1]))
    y = b.add(OpKind.LINEAR, x, b.const(w, "w"), b.const(torch.randn(w.shape[0]), "b"), attrs=act)
    return b.build([y])


def _expected_linear(w, layout, m=6, act=A.Activation.RELU):
    e = S.encode(w, layout)
    b = GraphBuilder("lin")
    x = b.input("x", (m, w.shape[1]))
    ins = [x, b.const(e.values, "v", layout), b.const(e.indices, "i"),
           None if e.indptr is None else b.const(e.indptr, "p"), b.const(torch.randn(w.shape[0]), "b")]
    y = b.add(OpKind.SPARSE_LINEAR, *ins, attrs=A.SparseLinearAttrs(layout, tuple(w.shape), act))
    return b.build([y])


def _cpu_outputs_match(before, after, inputs):
    with torch.no_grad():
        ref = build_plan(before, "reference").run(inputs)
        out = build_plan(after, "cpu").run(inputs)
    for r, o in zip(ref, out):
        ok, err, tol = max_err_ok(o, r)
        assert ok, f"{err} > {tol}"


@pytest.mark.parametrize("mode,layout", [("csr", S.CSR), ("bsr", S.bsr(4, 4)), ("bsr(8,1)", S.bsr(8, 1))])
def test_forced_format_linear(mode, layout):
    w = _pruned((40, 32))
    before = _linear_graph(w)
    log = []
    after = _sparsify(before, mode, log=log)
    assert_structural_equal(after, _expected_linear(w, layout))
    assert_same_outputs(before, after)
    _cpu_outputs_match(before, after, [torch.randn(6, 32)])
    assert [(d.format, d.shape) for d in log] == [(repr(layout), (40, 32))]


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 0), (1, 1, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_becomes_sparse_conv(kernel, stride, padding, channels_last):
    w = _pruned((24, 8, kernel, kernel), 0.75)
    b = GraphBuilder("conv")
    x = b.input("x", (2, 8, 9, 9))
    conv = A.Conv2dAttrs((stride, stride), (padding, padding), activation=A.Activation.RELU)
    y = b.add(OpKind.CONV2D, x, b.const(w, "w"), b.const(torch.randn(24), "b"), attrs=conv)
    before = b.build([y])
    if channels_last:
        from kiln.passes.layout import channels_last as to_cl

        before = to_cl(before)
    after = _sparsify(before, "bsr")
    assert after.count(OpKind.SPARSE_CONV2D) == 1 and after.count(OpKind.CONV2D) == 0
    node = next(n for n in after.nodes if n.op is OpKind.SPARSE_CONV2D)
    assert node.attrs == A.SparseConv2dAttrs(S.bsr(4, 4), (24, 8, kernel, kernel), conv.stride, conv.padding,
                                             conv.dilation, A.Activation.RELU)
    inputs = [torch.randn(2, 8, 9, 9)]
    assert_same_outputs(before, after, inputs)
    _cpu_outputs_match(before, after, inputs)


def test_residual_operand_is_kept():
    w = _pruned((16, 16), 0.8, "unstructured")
    b = GraphBuilder("res")
    x, r = b.input("x", (5, 16)), b.input("r", (5, 16))
    y = b.add(OpKind.LINEAR, x, b.const(w, "w"), None, r, attrs=A.LinearAttrs(A.Activation.GELU))
    before = b.build([y])
    after = _sparsify(before, "csr")
    n = after.nodes[0]
    assert n.op is OpKind.SPARSE_LINEAR and n.inputs[4] is None and n.inputs[5] is r
    inputs = [torch.randn(5, 16), torch.randn(5, 16)]
    assert_same_outputs(before, after, inputs)
    _cpu_outputs_match(before, after, inputs)


def _fake_measure(sparse_fraction):
    """A timing function: dense takes 1 s, every sparse option ``sparse_fraction`` s."""
    def measure(options):
        return [(1.0, "dense", 0.0)] + [(sparse_fraction, "cpu.sparse_linear", 1e-6)] * (len(options) - 1)
    return measure


@pytest.mark.parametrize("fraction,expect_sparse", [(0.5, True), (MARGIN + 0.05, False), (2.0, False)])
def test_auto_follows_the_measurement(fraction, expect_sparse):
    w = _pruned((64, 64), 0.9)
    before = _linear_graph(w)
    log = []
    after = _sparsify(before, "auto", _fake_measure(fraction), log=log)
    assert (after.count(OpKind.SPARSE_LINEAR) == 1) == expect_sparse
    if not expect_sparse:
        assert_structural_equal(after, before)
    (d,) = log
    assert d.dense_ms == 1000.0 and set(d.sparse_ms) >= {"csr", "bsr[4, 4]"}
    assert ("faster than dense" in d.reason) == expect_sparse


def test_dense_weights_are_left_alone_and_not_timed():
    before = _linear_graph(torch.randn(32, 32))
    log = []

    def never(options):
        raise AssertionError("a dense weight must not be timed")
    after = _sparsify(before, "auto", never, log=log)
    assert_structural_equal(after, before)
    assert log == []


def test_two_four_on_the_cuda_target_and_round_trip():
    w = _pruned((16, 32), 0.5, "2:4")
    before = _linear_graph(w)
    log = []
    after = _sparsify(before, "auto", target="cuda", log=log)
    assert_structural_equal(after, _expected_linear(w, S.SPARSE_24))
    assert log[0].format == "2:4" and "not timed" in log[0].reason
    assert_same_outputs(before, after)
    back = from_json(to_json(after))
    verify(back)
    assert_structural_equal(back, after)
    assert_same_outputs(after, back)


@pytest.mark.parametrize("mode", ["csr", "bsr"])
def test_serialization_round_trip(mode):
    b = GraphBuilder("conv")
    x = b.input("x", (1, 8, 6, 6))
    y = b.add(OpKind.CONV2D, x, b.const(_pruned((16, 8, 3, 3)), "w"), attrs=A.Conv2dAttrs(padding=(1, 1)))
    y = b.add(OpKind.RESHAPE, y, attrs=A.ShapeAttrs((1, 16 * 36)))
    y = b.add(OpKind.LINEAR, y, b.const(_pruned((12, 16 * 36), seed=1), "w2"))
    after = _sparsify(b.build([y]), mode)
    assert after.count(OpKind.SPARSE_CONV2D) == 1 and after.count(OpKind.SPARSE_LINEAR) == 1
    back = from_json(to_json(after))
    verify(back)
    assert_structural_equal(back, after)
    assert_same_outputs(after, back)
    assert "@" in repr(back)  # the printer shows the sparse layouts of the weight operands


def test_type_inference_rejects_mismatched_operands():
    from kiln.ir import IRTypeError

    e = S.encode(_pruned((8, 8)), S.bsr(4, 4))
    b = GraphBuilder("bad")
    x = b.input("x", (2, 8))
    v_row_major = b.const(e.values, "v")  # missing its layout
    with pytest.raises(IRTypeError, match="layout"):
        b.add(OpKind.SPARSE_LINEAR, x, v_row_major, b.const(e.indices, "i"), b.const(e.indptr, "p"),
              attrs=A.SparseLinearAttrs(S.bsr(4, 4), (8, 8)))
    v = b.const(e.values, "v", S.bsr(4, 4))
    with pytest.raises(IRTypeError):
        b.add(OpKind.SPARSE_LINEAR, x, v, b.const(e.indices, "i"), b.const(e.indptr[:-1], "p"),
              attrs=A.SparseLinearAttrs(S.bsr(4, 4), (8, 8)))


def test_compile_option_end_to_end():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    p = kiln.sparsify(m, 0.8, "block(4,4)")
    x = torch.randn(8, 64)
    for mode in ("bsr", "csr", "auto", "off"):
        cm = kiln.compile(p, (x,), sparse=mode)
        ok, err, tol = max_err_ok(cm(x), p(x))
        assert ok, (mode, err)
        plan = cm.compiled[0].plan
        if mode in ("bsr", "csr"):
            assert plan.graph.count(OpKind.SPARSE_LINEAR) == 2 and len(cm.report.sparsity) == 2
        if mode == "off":
            assert plan.graph.count(OpKind.SPARSE_LINEAR) == 0 and cm.report.sparsity == []
    with pytest.raises(kiln.KilnError, match="sparse must be"):
        kiln.compile(p, (x,), sparse="diagonal")


@pytest.mark.parametrize("mode", ["csr", "bsr", "bsr(16,1)", "2:4"])
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_cpu_kernel_bound_directly_matches_reference(mode, op):
    """The CPU kernel itself (not whichever the timing picks) for every encoding, 2:4 included."""
    from kiln.kernels.registry import select_kernel

    pattern = "2:4" if mode == "2:4" else "unstructured"
    b = GraphBuilder(op)
    if op == "linear":
        x = b.input("x", (2, 5, 32))
        y = b.add(OpKind.LINEAR, x, b.const(_pruned((24, 32), 0.5, pattern), "w"), b.const(torch.randn(24), "b"),
                  attrs=A.LinearAttrs(A.Activation.SILU))
    else:
        x = b.input("x", (2, 4, 7, 7))
        y = b.add(OpKind.CONV2D, x, b.const(_pruned((16, 4, 3, 3), 0.5, pattern), "w"), b.const(torch.randn(16), "b"),
                  attrs=A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU))
    after = _sparsify(b.build([y]), mode)
    node = after.nodes[0]
    assert node.op in (OpKind.SPARSE_LINEAR, OpKind.SPARSE_CONV2D)
    consts = [None if v is None else after.constants.get(v) for v in node.inputs]
    k = select_kernel(node, "cpu")
    from kiln import _C

    if not _C.sparse_gemm_supported():
        pytest.skip("Kiln's sparse kernels need AVX-512, which this CPU lacks")
    assert k.name.startswith("cpu.sparse")
    xin = torch.randn(tuple(node.inputs[0].type.shape))
    ins = [xin] + consts[1:]
    ref = select_kernel(node, "reference").fn(ins, node.attrs)
    ok, err, tol = max_err_ok(k.bind(node, consts)(ins, node.attrs), ref)
    assert ok, (err, tol)


def test_the_density_sample_cannot_miss_structured_sparsity():
    """Weights of at least MIN_ZERO_FRACTION zeros in the patterns pruning makes (2:4, whole
    rows, 4x4 blocks, every other column, -0.0 from masking) all reach the exact count;
    a dense weight and one just under the threshold's half are settled by the sample."""
    from kiln.passes.sparsity import MIN_ZERO_FRACTION, SAMPLE, surely_dense

    torch.manual_seed(0)
    n, k = 768, 512
    assert n * k > SAMPLE
    dense = torch.randn(n, k)
    assert surely_dense(dense)
    two_four = (dense.reshape(-1, 4) * torch.tensor([1.0, 1.0, 0.0, 0.0])).reshape(n, k)
    rows = dense.clone()
    rows[n // 2:] = 0
    blocks = dense.clone().reshape(n // 4, 4, k // 4, 4)
    blocks[::2, :, :, :] = 0
    cols = dense.clone()
    cols[:, 1::2] = 0
    negzero = -(dense.abs() * (torch.rand(n, k) > 0.6))  # -0.0 where masked
    for w in (two_four, rows, blocks.reshape(n, k), cols, negzero):
        assert 1.0 - int(torch.count_nonzero(w)) / w.numel() >= MIN_ZERO_FRACTION - 0.05
        assert not surely_dense(w)
    assert not surely_dense(torch.zeros(16, 16))  # small weights are always counted
