"""nn.LSTM / nn.GRU through the torch frontend: exported as leaf ops, converted whole."""
import pytest
import torch
from torch import nn

import kiln
from kiln.frontends.torch_export import export_program
from kiln.ir import OpKind


class Wrap(nn.Module):
    def __init__(self, rnn, with_state):
        super().__init__()
        self.rnn, self.with_state = rnn, with_state

    def forward(self, x, *state):
        out = self.rnn(x, *state) if self.with_state else self.rnn(x)
        return out[0], out[1]


def _state(kind, layers, dirs, batch, hidden):
    shape = (layers * dirs, batch, hidden) if batch else (layers * dirs, hidden)
    h = torch.randn(shape)
    return ((h, torch.randn(shape)),) if kind is nn.LSTM else (h,)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first,bidirectional,layers,with_state,batch", [
    (True, False, 2, False, 3), (False, False, 1, True, 2), (True, True, 2, True, 4), (False, True, 1, False, 1),
    (False, False, 2, True, None),  # unbatched input (T, I)
])
def test_rnn_modules_match_eager(kind, batch_first, bidirectional, layers, with_state, batch):
    torch.manual_seed(0)
    rnn = kind(5, 12, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional).eval()
    model = Wrap(rnn, with_state)
    T, dirs = 7, 2 if bidirectional else 1
    x = torch.randn((batch, T, 5) if batch_first else (T, batch, 5)) if batch else torch.randn(T, 5)
    inputs = (x,) + (_state(kind, layers, dirs, batch, 12) if with_state else ())
    fast = kiln.compile(model, inputs)
    with torch.no_grad():
        ref = model(*inputs)
    got = fast(*inputs)
    for g, r in zip(got, ref):
        g, r = (g[0], r[0]) if isinstance(g, tuple) else (g, r)
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert kiln.explain(model, inputs).fallbacks == []


@pytest.mark.parametrize("kind,op", [(nn.LSTM, torch.ops.kiln.lstm.default), (nn.GRU, torch.ops.kiln.gru.default)])
def test_rnn_exports_as_one_leaf_op_per_module(kind, op):
    model = Wrap(kind(4, 8, num_layers=2, batch_first=True), False).eval()
    ep = export_program(model, (torch.randn(2, 50, 4),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(op) == 1
    assert not any("sigmoid" in str(t) or "tanh" in str(t) for t in targets)  # not traced step by step
    g = kiln.compile(model, (torch.randn(2, 50, 4),), passes="none").compiled[0].graph
    assert g.count(OpKind.LSTM if kind is nn.LSTM else OpKind.GRU) == 1


def test_lstm_with_projection_falls_back_by_name():
    torch.manual_seed(0)
    model = Wrap(nn.LSTM(5, 12, proj_size=4, batch_first=True), False).eval()
    x = torch.randn(2, 6, 5)
    fast = kiln.compile(model, (x,))
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(fast(x)[0], ref[0], atol=1e-5, rtol=1e-4)
    assert [f[0] for f in kiln.explain(model, (x,)).fallbacks] == ["kiln.lstm.default"]


def test_export_patch_is_undone():
    import torch.nn.modules.rnn as rnn_mod

    model = Wrap(nn.GRU(3, 4), False).eval()
    export_program(model, (torch.randn(5, 1, 3),))
    assert rnn_mod._VF is torch._VF
