"""The C++ kernels' vectorized sigmoid / tanh / GELU (csrc/simd_math.h, the recurrences'
gate functions) where they saturate: the arguments are clamped where the fp32 result stops
changing, so no step underflows into a denormal (a microcode assist per vector without
flush-to-zero). These check that the clamped forms stay exact there: probes across
[-1000, 1000], around the clamp points, and +-inf / NaN."""
import numpy as np
import pytest
import torch
from torch import nn

from kiln.ir import qformat
from kiln.kernels import int8_cpu as q

_C = pytest.importorskip("kiln._C")

PROBES = torch.cat([torch.linspace(-1000, 1000, 4001), torch.tensor([-87.5, -87.0, -86.5, -44.0, -43.5, -9.5, -9.0,
                                                                     -5.66, -4.0, 0.0, 4.0, 5.66, 9.0, 9.5, 43.5,
                                                                     44.0, 86.5, 87.0, 87.5, 88.5, 100.0])])


def _close(got, want, rel=1e-6):
    """Elementwise: |got - want| <= rel * max(1, |want|); NaN exactly where want has it."""
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    err = (got[ok].double() - want[ok].double()).abs()
    bound = rel * want[ok].double().abs().clamp(min=1.0)
    assert bool((err <= bound).all()), float((err - bound).max())


def _lstm_cell_c(i, f, g, o, c):
    """c_out of kiln._C.lstm_cell for gate pre-activations laid out [i, f, g, o]."""
    n = i.numel()
    gx = torch.cat([i, f, g, o]).reshape(1, 4 * n).contiguous()
    gh = torch.zeros_like(gx)
    h_out, c_out = torch.empty(1, n), torch.empty(1, n)
    _C.lstm_cell(gx.numpy(), gh.numpy(), c.reshape(1, n).contiguous().numpy(), h_out.numpy(), c_out.numpy())
    return c_out.reshape(n)


def test_cell_sigmoid_and_tanh_saturate_exactly():
    x = PROBES
    one, zero = torch.full_like(x, 1000.0), torch.zeros_like(x)
    # c_out = sigmoid(f) c + sigmoid(i) tanh(g); f = -1000 gives 0 * c = 0
    _close(_lstm_cell_c(x, -one, one, one, zero), torch.sigmoid(x))  # sigmoid(i) * tanh(1000) = sigmoid(x)
    _close(_lstm_cell_c(one, -one, x, one, zero), torch.tanh(x))  # sigmoid(1000) * tanh(x)
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    s1 = torch.full_like(special, 1000.0)
    _close(_lstm_cell_c(one[:3], -s1, special, s1, torch.zeros(3)), torch.tanh(special))


@pytest.mark.skipif(not q.capabilities().get("int4", False), reason="the int4 kernel needs AVX-512")
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_gemm_epilogue_activations_saturate_exactly(activation):
    # an identity weight (int4 ones, scale 1): y = act(x) exactly as the epilogue computes it
    n = 64
    w_packed = qformat.pack_int4(torch.eye(n, dtype=torch.int64))
    packed = q.prepack_int4(w_packed, torch.ones(n, 1), 64)
    x = torch.cat([PROBES, torch.zeros((-PROBES.numel()) % n)]).reshape(-1, n)
    got = q.linear_int4(x, packed, None, activation)
    want = q.ref_activation(x.double(), activation).float()
    _close(got, want, rel=2e-6)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_recurrences_with_saturated_gates_match_torch(kind):
    from kiln.ir import DType, GraphBuilder, OpKind, verify
    from kiln.ir import attrs as A
    from kiln.kernels.registry import candidates

    torch.manual_seed(0)
    rnn = kind(24, 32, batch_first=True).eval()
    with torch.no_grad():
        for p in rnn.parameters():
            p.mul_(300.0)  # gate pre-activations in the hundreds: every gate saturates
    x = torch.randn(3, 5, 24)
    states = [torch.randn(1, 3, 32)] * (2 if kind is nn.LSTM else 1)
    weights = [p.detach() for p in rnn._flat_weights]
    b = GraphBuilder("rnn")
    vals = [b.input(f"x{i}", tuple(t.shape), DType.FLOAT32) for i, t in enumerate([x, *states, *weights])]
    node = verify(b.build(b.add(OpKind.LSTM if kind is nn.LSTM else OpKind.GRU, *vals,
                                attrs=A.RNNAttrs(32, 1, batch_first=True)))).nodes[-1]
    with torch.no_grad():
        want = rnn(x, tuple(states) if kind is nn.LSTM else states[0])
        want = (want[0], *want[1]) if kind is nn.LSTM else want
        for k in candidates(node, "cpu"):
            got = k.fn([x, *states, *weights], node.attrs)
            for g, w in zip(got, want):
                assert np.isfinite(g.numpy()).all(), k.name
                torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda m: f"{k.name}: {m}")
