"""Every CPU kernel for LSTM/GRU against torch's nn.LSTM / nn.GRU, on awkward shapes.

Each kernel that accepts the node runs twice: with its weights prepacked at plan time
(constant weights, the usual case) and packed on the call (weights as run-time inputs).
Shapes: input and hidden sizes that are not multiples of 16 (AVX-512 blocks) or 8 (AVX2
blocks), batches of 1-32 rows (the tiles of one or two rows keep several accumulator
sets; larger batches are cut into balanced tiles of up to 6 rows), one time step, both
layouts, two layers, no biases;
on two threads batches both under and over the size at which the threads split the batch
rows rather than each step's hidden units.
"""
import pytest
import torch
from torch import nn

import kiln
from kiln.ir import DType, GraphBuilder, OpKind, verify
from kiln.ir import attrs as A
from kiln.kernels.registry import candidates

SHAPES = [  # T, B, F (input size), H, layers, batch_first, bias
    (1, 1, 3, 16, 1, False, True),
    (5, 7, 13, 20, 1, True, True),
    (6, 13, 8, 33, 2, False, True),
    (4, 32, 40, 128, 2, True, True),
    (3, 5, 6, 7, 1, True, False),
    (3, 29, 9, 24, 1, False, True),  # two threads split the rows 14 / 15 (tiles 4+5+5 or, AVX2, 6+6+2; 5+5+5)
    (4, 2, 9, 40, 1, True, True),  # a tile of two rows (AVX2: two accumulator sets)
    (3, 3, 6, 17, 2, False, True),  # three rows (GRU's n pass on AVX2: three sets)
]


def _node(kind, x, states, weights, a):
    b = GraphBuilder("rnn")
    vals = [b.input(f"x{i}", tuple(t.shape), DType.FLOAT32) for i, t in enumerate([x, *states, *weights])]
    out = b.add(OpKind.LSTM if kind is nn.LSTM else OpKind.GRU, *vals, attrs=a)
    g = verify(b.build(out))
    return g.nodes[-1]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("T,B,F,H,layers,batch_first,bias", SHAPES)
def test_cpu_rnn_kernels_match_torch(kind, T, B, F, H, layers, batch_first, bias, threads):
    torch.manual_seed(0)
    rnn = kind(F, H, num_layers=layers, batch_first=batch_first, bias=bias).eval()
    x = torch.randn((B, T, F) if batch_first else (T, B, F))
    states = [torch.randn(layers, B, H)] * (2 if kind is nn.LSTM else 1)
    weights = [p.detach() for p in rnn._flat_weights]
    node = _node(kind, x, states, weights, A.RNNAttrs(H, layers, batch_first=batch_first, has_biases=bias))
    ins = [x, *states, *weights]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            want = rnn(x, tuple(states) if kind is nn.LSTM else states[0])
            want = (want[0], *want[1]) if kind is nn.LSTM else want
            kernels = candidates(node, "cpu")
            assert {k.name for k in kernels} >= {f"cpu.{kind.__name__.lower()}", f"reference.{node.op.value}"}
            for k in kernels:
                consts = [None] * (1 + len(states)) + weights
                for fn in (k.bind(node, consts), k.fn):  # prepacked, and packed on the call
                    got = fn(ins, node.attrs)
                    assert len(got) == len(want)
                    for g, w in zip(got, want):
                        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda m: f"{k.name}: {m}")
    finally:
        torch.set_num_threads(old)


def test_the_fused_layers_are_candidates():
    rnn = nn.LSTM(5, 24, batch_first=True)
    x, s = torch.randn(2, 3, 5), [torch.zeros(1, 2, 24)] * 2
    node = _node(nn.LSTM, x, s, [p.detach() for p in rnn._flat_weights], A.RNNAttrs(24, 1, batch_first=True))
    names = [k.name for k in candidates(node, "cpu")]
    if kiln._C.recurrence_supported():
        assert names[:2] == ["cpu.lstm_layer", "cpu.lstm_hoisted"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_compiled_forecaster_shapes_match_eager(kind, threads):
    # the whole path: export, one op per layer, kernel choice by measurement, plan
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = kind(11, 37, num_layers=2, batch_first=True)
            self.head = nn.Linear(37, 3)

        def forward(self, x, *state):
            y, _ = self.rnn(x, *state)
            return self.head(y[:, -1])

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(9, 10, 11)
    state = (torch.randn(2, 9, 37),) * (2 if kind is nn.LSTM else 1)
    inputs = (x, state if kind is nn.LSTM else state[0])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = kiln.compile(model, inputs)
        with torch.no_grad():
            torch.testing.assert_close(fast(*inputs), model(*inputs), atol=2e-5, rtol=1e-4)
    finally:
        torch.set_num_threads(old)
