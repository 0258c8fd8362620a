"""The bf16 LSTM and GRU layers on AMX tiles (``cpu.lstm_layer_amx`` / ``cpu.gru_layer_amx``)
and with AVX512-BF16 dot products (``cpu.lstm_layer_dot_bf16`` / ``cpu.gru_layer_dot_bf16``),
csrc/rnn_amx.cpp, each against torch's fp32 LSTM / GRU run on the same bf16-rounded weights and
inputs; the bf16 precision pass that makes them bf16; a compiled forecaster in bf16 against
eager fp32."""
import copy

import pytest
import torch

from kiln.options import CompileOptions
from kiln import _C
from kiln.ir import DType, GraphBuilder, OpKind
from kiln.ir import attrs as A
from kiln.kernels.registry import all_kernels, candidates

PATHS = [pytest.param("amx", marks=pytest.mark.skipif(not _C.rnn_amx_supported(), reason="needs AMX-BF16")),
         pytest.param("dot_bf16", marks=pytest.mark.skipif(not _C.rnn_dot_bf16_supported(),
                                                           reason="needs AVX512-BF16"))]
pytestmark = pytest.mark.skipif(not (_C.rnn_amx_supported() or _C.rnn_dot_bf16_supported()),
                                reason="needs a CPU with AMX-BF16 or AVX512-BF16")


def _lstm_layer(path):
    return getattr(_C, f"lstm_layer_{path}")


def _gru_layer(path):
    return getattr(_C, f"gru_layer_{path}")


def _bits(t):
    return t.view(torch.int16).numpy()


def _bf16_exact(lstm):
    """A copy whose weights are the bf16-rounded ones, in fp32 (what the kernel multiplies)."""
    out = copy.deepcopy(lstm)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.bfloat16().float())
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("T,B,In,H", [(96, 32, 8, 128), (12, 32, 128, 128), (7, 5, 3, 20), (4, 17, 40, 33),
                                     (3, 40, 64, 16), (0, 4, 8, 16)])
def test_layer_matches_fp32_on_bf16_operands(T, B, In, H, path):
    torch.manual_seed(T * 100 + B + In + H)
    lstm = torch.nn.LSTM(In, H)
    x = torch.randn(T, B, In).bfloat16()
    h0, c0 = (torch.randn(B, H) * 0.5).bfloat16(), torch.randn(B, H) * 0.5
    packed = _C.rnn_amx_pack(*(p.detach().numpy() for p in (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0,
                                                             lstm.bias_hh_l0)))
    y = torch.empty(T, B, H, dtype=torch.bfloat16)
    hn, cn = torch.empty(B, H, dtype=torch.bfloat16), torch.empty(B, H)
    _lstm_layer(path)(_bits(x), packed, _bits(h0), c0.numpy(), _bits(y), _bits(hn), cn.numpy(), 2)
    if T == 0:  # (torch's LSTM refuses empty sequences) the state passes through
        assert torch.equal(hn, h0) and torch.equal(cn, c0)
        return
    with torch.no_grad():
        ref, (rh, rc) = _bf16_exact(lstm)(x.float(), (h0.float()[None], c0[None]))
    # h is rounded to bf16 every step (the next step's operand): a few bf16 steps after T steps
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=0)
    torch.testing.assert_close(hn.float(), rh[0], atol=1e-2, rtol=0)
    torch.testing.assert_close(cn, rc[0], atol=2e-2, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_batch_first_views_and_bad_arguments(path):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, 16, batch_first=True)
    x = torch.randn(4, 6, 8).bfloat16()  # (B, T, I): the kernel takes the (T, B, I) view
    packed = _C.rnn_amx_pack(*(p.detach().numpy() for p in (lstm.weight_ih_l0, lstm.weight_hh_l0)))
    y = torch.empty(4, 6, 16, dtype=torch.bfloat16)
    h0, hn = torch.zeros(4, 16, dtype=torch.bfloat16), torch.empty(4, 16, dtype=torch.bfloat16)
    c0, cn = torch.zeros(4, 16), torch.empty(4, 16)
    _lstm_layer(path)(_bits(x.transpose(0, 1)), packed, _bits(h0), c0.numpy(), _bits(y.transpose(0, 1)), _bits(hn),
                      cn.numpy(), 1)
    with torch.no_grad():
        lstm.bias_ih_l0.zero_()
        lstm.bias_hh_l0.zero_()
        ref, _ = _bf16_exact(lstm)(x.float())
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="x"):
        _lstm_layer(path)(_bits(torch.zeros(6, 4, 7, dtype=torch.bfloat16)), packed, _bits(h0), c0.numpy(),
                          _bits(y.transpose(0, 1)), _bits(hn), cn.numpy(), 1)
    with pytest.raises(ValueError, match="h0"):
        _lstm_layer(path)(_bits(x.transpose(0, 1)), packed, _bits(torch.zeros(3, 16, dtype=torch.bfloat16)),
                          c0.numpy(), _bits(y.transpose(0, 1)), _bits(hn), cn.numpy(), 1)
    with pytest.raises(ValueError, match="threads"):
        _lstm_layer(path)(_bits(x.transpose(0, 1)), packed, _bits(h0), c0.numpy(), _bits(y.transpose(0, 1)),
                          _bits(hn), cn.numpy(), 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("T,B,In,H", [(40, 32, 8, 128), (7, 5, 3, 20), (4, 17, 40, 33), (0, 4, 8, 16)])
def test_gru_layer_matches_fp32_on_bf16_operands(T, B, In, H, path):
    torch.manual_seed(T * 100 + B + In + H + 1)
    gru = torch.nn.GRU(In, H)
    x = torch.randn(T, B, In).bfloat16()
    h0 = (torch.randn(B, H) * 0.5).bfloat16()
    packed = _C.rnn_amx_pack(*(p.detach().numpy() for p in (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0,
                                                            gru.bias_hh_l0)))
    assert packed.gates == 3
    y = torch.empty(T, B, H, dtype=torch.bfloat16)
    hn = torch.empty(B, H, dtype=torch.bfloat16)
    _gru_layer(path)(_bits(x), packed, _bits(h0), _bits(y), _bits(hn), 2)
    if T == 0:
        assert torch.equal(hn, h0)
        return
    with torch.no_grad():
        ref, rh = _bf16_exact(gru)(x.float(), h0.float()[None])
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=0)
    torch.testing.assert_close(hn.float(), rh[0], atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="LSTM"):  # GRU weights into the LSTM layer, and back
        _gru_layer(path)(_bits(x), _C.rnn_amx_pack(*(torch.randn(4 * H, d).numpy() for d in (In, H))), _bits(h0),
                         _bits(y), _bits(hn), 1)


def _lstm_graph(weights_const=True, bidirectional=False):
    b = GraphBuilder()
    x = b.input("x", (2, 5, 8), DType.FLOAT32)
    h0 = b.input("h0", (1, 2, 16), DType.FLOAT32)
    c0 = b.input("c0", (1, 2, 16), DType.FLOAT32)
    ws = [torch.randn(64, 8), torch.randn(64, 16), torch.randn(64), torch.randn(64)]
    wv = [b.const(w) if weights_const else b.input(f"w{i}", tuple(w.shape), DType.FLOAT32) for i, w in enumerate(ws)]
    outs = b.add(OpKind.LSTM, x, h0, c0, *wv, attrs=A.RNNAttrs(16, 1, bidirectional, True, True))
    return b.build(list(outs))


def test_precision_pass_makes_lstm_layers_bf16():
    from kiln.passes.pipeline import run_pipeline

    g = run_pipeline(_lstm_graph(), select=["precision"], options=CompileOptions.parse(precision="bf16", target="cpu")).graph
    lstm = next(n for n in g.nodes if n.op is OpKind.LSTM)
    assert all(v.type.dtype is DType.BFLOAT16 for v in lstm.inputs + lstm.outputs)
    assert all(v.type.dtype is DType.FLOAT32 for v in g.outputs)  # cast back for the rest of the graph
    names = {k.name for k in candidates(lstm, "cpu")}
    assert names & {"cpu.lstm_layer_amx", "cpu.lstm_layer_dot_bf16"}
    assert ("cpu.lstm_layer_amx" in names) == _C.rnn_amx_supported()
    assert ("cpu.lstm_layer_dot_bf16" in names) == _C.rnn_dot_bf16_supported()
    # run-time weights, or fp32 compiles: the layer stays fp32
    for graph, prec in ((_lstm_graph(weights_const=False), "bf16"), (_lstm_graph(), "fp32")):
        g = run_pipeline(graph, select=["precision"], options=CompileOptions.parse(precision=prec, target="cpu")).graph
        assert next(n for n in g.nodes if n.op is OpKind.LSTM).inputs[0].type.dtype is DType.FLOAT32


class _GRUForecaster(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.GRU(8, 64, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(64, 12)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_compiled_forecaster_bf16_matches_eager(family, path, monkeypatch):
    """The bf16 kernel accepts every recurrent layer of the bf16 compile and, run in place
    of the other candidates (which one is fastest is the benchmarks' question, not this
    test's), the model matches eager."""
    import kiln

    if family == "lstm":
        model, inputs = kiln.models.get("lstm")
    else:
        torch.manual_seed(0)
        model, inputs = _GRUForecaster().eval(), (torch.randn(16, 48, 8),)
    op, amx = OpKind(family), f"cpu.{family}_layer_{path}"
    others = sorted(k.name for k in all_kernels() if k.op is op and k.target == "cpu" and k.name != amx)
    monkeypatch.setenv("KILN_KERNEL_CHOICE", "first")  # no timing: the first accepting candidate runs
    compiled = kiln.compile(model, inputs, precision="bf16", exclude_kernels=others)
    layers = [n for n in compiled.compiled[0].graph.nodes if n.op is op]
    assert layers and all(amx in {k.name for k in candidates(n, "cpu")} for n in layers)
    assert compiled.compiled[0].plan.kernel_names.get(amx, 0) == len(layers)
    with torch.no_grad():
        ref = model(*inputs)
        out = compiled(*inputs)
    assert out.dtype == torch.float32
    # bf16 operands through the whole sequence: within 2% of the output's scale
    assert float((out - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


@pytest.mark.parametrize("path", PATHS)
def test_dynamic_bf16_forecaster_runs_the_bf16_layers_at_every_size(path, monkeypatch):
    """dynamic=True: the bf16 layer kernels take symbolic time and batch dims (they read them
    per call), so a dynamic bf16 plan runs them, not torch's bf16 LSTM, at every size."""
    import kiln

    model, inputs = kiln.models.get("lstm")
    layer = f"cpu.lstm_layer_{path}"
    others = sorted(k.name for k in all_kernels() if k.op is OpKind.LSTM and k.target == "cpu" and k.name != layer)
    monkeypatch.setenv("KILN_KERNEL_CHOICE", "first")
    compiled = kiln.compile(model, inputs, precision="bf16", dynamic=True, exclude_kernels=others)
    assert compiled.report.kernels.get(layer) == 2
    torch.manual_seed(1)
    for shape in ((7, 50, 8), (1, 3, 8), (33, 17, 8)):
        x = torch.randn(*shape)
        with torch.no_grad():
            ref, out = model(x), compiled(x)
        assert float((out - ref).abs().max()) <= 2e-2 * float(ref.abs().max()), shape
