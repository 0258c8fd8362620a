"""The quantize phase: before/expected graphs, numerics, calibration observers, the
per-layer payoff rule, option errors and the report."""
import pytest
import torch
from conftest import assert_structural_equal, max_err_ok, run_graph
from kiln.errors import KilnError
from kiln.ir import GraphBuilder, OpKind
from kiln.ir import attrs as A
from kiln.ir import qformat
from kiln.options import CompileOptions
from kiln.passes.calibrate import Observer, entropy_threshold
from kiln.passes.pipeline import run_pipeline
from kiln.passes.quantize_payoff import decide
from kiln.runtime.measuring import PlanMeasurer


def _opts(scheme, cal=None, **kw):
    return CompileOptions.parse(quantize=scheme, calibration=cal, quantize_payoff=False, **kw)


def _mlp():
    b = GraphBuilder("mlp")
    x = b.input("x", (8, 64))
    h = b.add(OpKind.LINEAR, x, b.const(torch.randn(128, 64) * 0.1), b.const(torch.randn(128)),
              attrs=A.LinearAttrs(A.Activation.RELU))
    y = b.add(OpKind.LINEAR, h, b.const(torch.randn(16, 128) * 0.1), b.const(torch.randn(16)))
    return b.build([y])


def _quantize(graph, opts, decisions=None):
    res = run_pipeline(graph, opts, select=["quantize"], measure=PlanMeasurer("cpu"))
    if decisions is not None:
        decisions.extend(res.decisions.quantization)
    return res.graph


def test_dynamic_before_expected_and_numerics():
    g = _mlp()
    after = _quantize(g, _opts("int8-dynamic"))
    b = GraphBuilder("mlp")
    x = b.input("x", (8, 64))
    i8 = lambda n, k: b.const(torch.zeros(n, k, dtype=torch.int8))
    h = b.add(OpKind.QLINEAR_DYNAMIC, x, i8(128, 64), b.const(torch.ones(128)), b.const(torch.ones(128)),
              attrs=A.QLinearDynamicAttrs(A.Activation.RELU))
    y = b.add(OpKind.QLINEAR_DYNAMIC, h, i8(16, 128), b.const(torch.ones(16)), b.const(torch.ones(16)))
    assert_structural_equal(after, b.build([y]))
    xs = [torch.randn(8, 64)]
    ok, err, tol = max_err_ok(run_graph(after, xs)[0], run_graph(g, xs)[0], rel=2e-2)
    assert ok, (err, tol)


@pytest.mark.parametrize("scheme,bits", [("int8-weight", 8), ("int4-weight", 4)])
def test_weight_only(scheme, bits):
    g = _mlp()
    after = _quantize(g, _opts(scheme, group_size=32 if bits == 4 else None))
    nodes = [n for n in after.nodes if n.op is OpKind.LINEAR_WEIGHT_ONLY]
    assert len(nodes) == 2 and all(n.attrs.bits == bits for n in nodes)
    if bits == 4:
        assert nodes[0].attrs.group_size == 32 and after.constants[nodes[0].inputs[1]].shape == (128, 32)
    xs = [torch.randn(8, 64)]
    ok, err, tol = max_err_ok(run_graph(after, xs)[0], run_graph(g, xs)[0], rel=2e-2 if bits == 8 else 0.15)
    assert ok, (err, tol)


def _convnet():
    """conv+relu -> conv (+ residual) + relu -> mean -> linear: a residual block."""
    b = GraphBuilder("net")
    x = b.input("x", (2, 4, 8, 8))
    c1 = b.add(OpKind.CONV2D, x, b.const(torch.randn(8, 4, 3, 3) * 0.2), b.const(torch.randn(8) * 0.1),
               attrs=A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU))
    c2 = b.add(OpKind.CONV2D, c1, b.const(torch.randn(8, 8, 3, 3) * 0.1), b.const(torch.randn(8) * 0.1),
               attrs=A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU))
    c3 = b.add(OpKind.CONV2D, c2, b.const(torch.randn(8, 8, 3, 3) * 0.1), None, c1,
               attrs=A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU))
    m = b.add(OpKind.MEAN, c3, attrs=A.ReduceAttrs((2, 3)))
    y = b.add(OpKind.LINEAR, m, b.const(torch.randn(3, 8)), b.const(torch.randn(3)))
    return b.build([y])


def test_static_keeps_int8_through_conv_relu_add():
    g = _convnet()
    cal = [[torch.randn(2, 4, 8, 8)] for _ in range(3)]
    after = _quantize(g, _opts("int8-static", cal))
    ops = [n.op for n in after.nodes]
    assert ops.count(OpKind.QCONV2D) == 3 and ops.count(OpKind.QLINEAR) == 1
    assert ops.count(OpKind.QUANTIZE) == 2  # the graph input, and the mean before the linear
    convs = [n for n in after.nodes if n.op is OpKind.QCONV2D]
    # c1 feeds only quantized convs: uint8 out; c2 too; c3 feeds the float mean: float32 out
    assert [n.attrs.out_scale is not None for n in convs] == [True, True, False]
    assert convs[1].inputs[0] is convs[0].outputs[0]  # no DEQUANTIZE -> QUANTIZE between them
    assert convs[2].inputs[0] is convs[1].outputs[0]
    # c3's float32 output (oneDNN sums into a buffer of the output's type) reads c1 through
    # the one DEQUANTIZE
    deq = [n for n in after.nodes if n.op is OpKind.DEQUANTIZE]
    assert len(deq) == 1 and deq[0].inputs[0] is convs[0].outputs[0] and convs[2].inputs[4] is deq[0].outputs[0]
    xs = [torch.randn(2, 4, 8, 8)]
    ref = run_graph(g, xs)[0]
    assert qformat.sqnr_db(ref, run_graph(after, xs)[0]) > 25
    assert qformat.sqnr_db(ref, run_graph(after, xs, target="cpu")[0]) > 25  # the oneDNN kernels too


def test_static_uint8_residual_with_float_output():
    """A quantized conv whose output leaves the int8 region takes a float residual."""
    g = _convnet()
    after = _quantize(g, _opts("int8-static", [[torch.randn(2, 4, 8, 8)]], min_sqnr=-1e9))
    last = [n for n in after.nodes if n.op is OpKind.QCONV2D][-1]
    # residual c1 is uint8 (kept), output float32: the residual is dequantized for it
    assert last.inputs[4].dtype.value == "float32"


def test_sqnr_floor_keeps_layers_float():
    g = _mlp()
    rep = []
    after = _quantize(g, _opts("int4-weight", min_sqnr=80.0, group_size=32), rep)
    assert after.count(OpKind.LINEAR) == 2 and after.count(OpKind.LINEAR_WEIGHT_ONLY) == 0
    assert len(rep) == 2 and not any(d.quantized for d in rep) and all("SQNR" in d.reason for d in rep)


def test_decide():
    assert decide(40.0, 2e-3, 1e-3, 25.0) == (True, "2.00x faster, SQNR 40.0 dB")
    ok, why = decide(40.0, 1e-3, 1.2e-3, 25.0)
    assert not ok and why.startswith("not faster")
    ok, why = decide(20.0, 2e-3, 1e-3, 25.0)
    assert not ok and "SQNR 20.0 dB < 25.0 dB" in why
    assert decide(30.0, None, None, 25.0)[0]
    assert not decide(float("nan"), None, None, 25.0)[0]


def test_observers():
    o = Observer()
    x = torch.randn(100_000)
    x[0] = 1000.0  # one outlier
    o.observe(x)
    assert o.range("minmax")[1] == 1000.0
    lo, hi = o.range("percentile")
    assert 3.0 < hi < 6.0 and -6.0 < lo < -3.0
    t = entropy_threshold(torch.randn(200_000).abs())
    assert 2.0 < t < 6.0  # clips the tail of a unit normal, far below the max
    with pytest.raises(ValueError):
        o.range("nope")


def test_option_errors():
    import kiln

    m = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with pytest.raises(KilnError, match="calibration"):
        kiln.compile(m, (x,), quantize="int8-static")
    with pytest.raises(KilnError, match="quantize must be one of"):
        kiln.compile(m, (x,), quantize="int3")
    with pytest.raises(KilnError, match="need quantize"):
        kiln.compile(m, (x,), calibration=[(x,)])
    with pytest.raises(KilnError, match="observer"):
        kiln.compile(m, (x,), quantize="int8-dynamic", observer="entropy")
    with pytest.raises(KilnError, match="group_size"):
        kiln.compile(m, (x,), quantize="int4-weight", group_size=48)


def test_bf16_alias():
    import kiln

    m = torch.nn.Sequential(torch.nn.Linear(32, 32)).eval()
    x = torch.randn(4, 32)
    cm = kiln.compile(m, (x,), quantize="bf16")
    assert "bfloat16" in repr(cm.compiled[0].graph)


def test_quantize_report_contents():
    import kiln

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8)).eval()
    x = torch.randn(64, 256)
    r = kiln.quantize_report(m, (x,), quantize="int8-dynamic", calibration=[(x,)], repeats=2)
    assert [d.op for d in r.layers] == ["linear", "linear"]
    assert r.layers[0].shape == "64x256 @ 512x256" and r.layers[0].scheme == "int8-dynamic"
    for d in r.layers:
        assert d.sqnr_db > 25 and d.fp32_ms > 0 and d.quant_ms > 0
        assert d.quantized == (d.quant_ms < d.fp32_ms)  # the payoff rule, with the measured times
    assert r.output_sqnr_db > 20 and r.fp32_ms > 0 and r.quant_ms > 0
    text = str(r)
    assert "| layer | op | shape | scheme | SQNR dB | fp32 ms | quant ms | decision | reason |" in text
    assert r.quantized_layers == sum(d.quantized for d in r.layers)


def test_cli_quantize_report(capsys, tmp_path, monkeypatch):
    from kiln.cli import main

    (tmp_path / "qr_tiny.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 4)).eval(), "
        "(torch.randn(32, 128),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["quantize-report", "qr_tiny:make", "--scheme", "int8-dynamic"]) == 0
    out = capsys.readouterr().out
    assert "quantize=int8-dynamic" in out and "32x128 @ 256x128" in out and "SQNR" in out


def test_dynamic_siblings_share_one_gemm():
    """q, k, v projections of one input: one QLINEAR_DYNAMIC and three slices, same numbers."""
    from kiln.passes import quantize as Q
    from kiln.passes.rewrite import rewrite

    b = GraphBuilder("qkv")
    x = b.input("x", (2, 6, 32))
    outs = [b.add(OpKind.LINEAR, x, b.const(torch.randn(n, 32)), b.const(torch.randn(n))) for n in (32, 32, 16)]
    y = b.add(OpKind.ADD, outs[0], outs[1])
    g = b.build([y, outs[2]])
    plan = Q.QuantPlan("int8-dynamic", {n.outputs[0] for n in g.nodes if n.op is OpKind.LINEAR})
    separate = rewrite(g, Q.rules(plan))
    assert separate.count(OpKind.QLINEAR_DYNAMIC) == 3
    merged = Q.merge_dynamic_siblings(separate)
    assert merged.count(OpKind.QLINEAR_DYNAMIC) == 1 and merged.count(OpKind.SLICE) == 3
    wide = next(n for n in merged.nodes if n.op is OpKind.QLINEAR_DYNAMIC)
    assert wide.outputs[0].shape == (2, 6, 80)
    xs = [torch.randn(2, 6, 32)]
    for a, m in zip(run_graph(separate, xs), run_graph(merged, xs)):
        assert torch.allclose(a, m, atol=1e-5, rtol=1e-5)
    for r, c in zip(run_graph(g, xs), run_graph(merged, xs, target="cpu")):
        assert qformat.sqnr_db(r, c) > 30
    assert _quantize(g, _opts("int8-dynamic")).count(OpKind.QLINEAR_DYNAMIC) == 1  # in the phase too


def _stem():
    """conv+relu -> max-pool -> conv+relu -> conv (+ the pooled residual) + relu -> conv -> mean:
    ResNet's stem, a block and the next block's first convolution."""
    b = GraphBuilder("stem")
    x = b.input("x", (1, 3, 16, 16))
    c1 = b.add(OpKind.CONV2D, x, b.const(torch.randn(8, 3, 3, 3) * 0.3), b.const(torch.randn(8) * 0.1),
               attrs=A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU))
    p = b.add(OpKind.MAX_POOL2D, c1, attrs=A.Pool2dAttrs((3, 3), (2, 2), (1, 1)))
    c2 = b.add(OpKind.CONV2D, p, b.const(torch.randn(8, 8, 3, 3) * 0.1), b.const(torch.randn(8) * 0.1),
               attrs=A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU))
    c3 = b.add(OpKind.CONV2D, c2, b.const(torch.randn(8, 8, 3, 3) * 0.1), None, p,
               attrs=A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU))
    c4 = b.add(OpKind.CONV2D, c3, b.const(torch.randn(8, 8, 3, 3) * 0.1), None,
               attrs=A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU))
    return b.build([b.add(OpKind.MEAN, c4, attrs=A.ReduceAttrs((2, 3)))])


def test_static_pools_in_uint8_after_a_requantizing_conv():
    """QUANTIZE(MAX_POOL2D(conv)) -> MAX_POOL2D(conv requantizing to those parameters): the
    stem stays uint8 from the first convolution on (exact: quantization is monotone)."""
    g = _stem()
    cal = [[torch.randn(1, 3, 16, 16)] for _ in range(3)]
    after = _quantize(g, _opts("int8-static", cal))
    ops = [n.op for n in after.nodes]
    assert ops == [OpKind.QUANTIZE, OpKind.QCONV2D, OpKind.MAX_POOL2D, OpKind.QCONV2D, OpKind.QCONV2D,
                   OpKind.QCONV2D, OpKind.MEAN], ops
    c1, pool, c2, c3 = after.nodes[1:5]
    assert c1.attrs.out_scale is not None and pool.inputs[0] is c1.outputs[0]
    assert pool.outputs[0].type.quant is not None and pool.outputs[0].dtype.value == "uint8"
    assert c2.inputs[0] is pool.outputs[0] and c3.inputs[4] is pool.outputs[0]  # the residual reads it too
    assert (c2.attrs.x_scale, c2.attrs.x_zero_point) == (c1.attrs.out_scale, c1.attrs.out_zero_point)
    xs = [torch.randn(1, 3, 16, 16)]
    ref = run_graph(g, xs)[0]
    assert qformat.sqnr_db(ref, run_graph(after, xs)[0]) > 25
    assert qformat.sqnr_db(ref, run_graph(after, xs, target="cpu")[0]) > 25


def test_payoff_times_a_layer_as_the_int8_chain_runs_it():
    """In a chain, a layer left float pays a dequantize in and a quantize out; quantized, it
    reads the uint8 value directly and requantizes inside: both timing graphs show it."""
    from kiln.passes import quantize as Q
    from kiln.passes.quantize_payoff import _chains, _timing_graphs

    g = _convnet()
    cal = [[torch.randn(2, 4, 8, 8)] for _ in range(2)]
    res = run_pipeline(g, _opts("int8-static", cal), select=["quantize"], measure=PlanMeasurer("cpu"))
    assert res.graph.count(OpKind.QCONV2D) == 3
    from kiln.passes.calibrate import calibrate

    cands = [n for n in g.nodes if Q.eligible(n, g.constants, "int8-static")]
    watch = {v for n in cands for v in (*n.inputs, n.outputs[0]) if v is not None and v not in g.constants}
    observers, _ = calibrate(g, cal, watch, PlanMeasurer("cpu").run_all)
    params = Q.static_params(observers, "minmax")
    c2 = cands[1]  # reads c1 (a candidate), read only by c3 (a candidate)
    fp, qg = _timing_graphs(c2, g, "int8-static", 128, params, _chains(g, cands))
    Q_, DQ = OpKind.QUANTIZE, OpKind.DEQUANTIZE
    assert [n.op for n in fp.nodes] == [Q_, DQ, OpKind.CONV2D, Q_, DQ]
    assert [n.op for n in qg.nodes] == [Q_, OpKind.QCONV2D, DQ]
    assert qg.nodes[1].attrs.out_scale is not None and qg.nodes[1].inputs[0] is qg.nodes[0].outputs[0]
    xs = [torch.randn(2, 8, 8, 8)]
    assert qformat.sqnr_db(run_graph(fp, xs)[0], run_graph(qg, xs)[0]) > 20
