"""A weight used by several nodes stays one constant and is prepacked once.

A model that applies one layer many times (ALBERT's cross-layer parameter sharing) used to
get a fused QKV weight per use and a prepacked copy per node: a 0.9 GB model grew past
24 GB while compiling."""
from __future__ import annotations

import gc

import torch
from torch import nn

import kiln
from kiln.ir import GraphBuilder, OpKind
from kiln.kernels.registry import Kernel


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)
        x = x + self.o(a)
        return x + self.out(torch.relu(self.ff(x)))


class _Shared(nn.Module):
    """One block applied ``times`` times, as ALBERT does."""

    def __init__(self, d=64, times=6):
        super().__init__()
        self.block, self.times = _Block(d), times

    def forward(self, x):
        for _ in range(self.times):
            x = self.block(x)
        return x


def _const_bytes(graph) -> int:
    seen = {}
    for t in graph.constants.values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_a_layer_applied_six_times_keeps_one_set_of_weights():
    x = torch.randn(1, 16, 64)
    once, six = _Shared(times=1).eval(), _Shared(times=6).eval()
    six.load_state_dict(once.state_dict())
    c1, c6 = kiln.compile(once, (x,)), kiln.compile(six, (x,))
    with torch.no_grad():
        torch.testing.assert_close(c6(x), six(x), atol=1e-4, rtol=1e-4)
    g1, g6 = c1.compiled[0].graph, c6.compiled[0].graph
    weights = sum(p.numel() * 4 for p in six.parameters())
    # the optimized graph holds the same constants (fused QKV included) however often the block runs
    assert _const_bytes(g6) == _const_bytes(g1) <= 2 * weights
    assert sum(n.op is OpKind.LINEAR for n in g6.nodes) == 6 * sum(n.op is OpKind.LINEAR for n in g1.nodes)


def test_tied_parameters_import_as_one_constant():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, i):
            return self.head(self.emb(i))

    m, i = Tied().eval(), torch.randint(0, 10, (2, 3))
    fast = kiln.compile(m, (i,))
    torch.testing.assert_close(fast(i), m(i))
    from kiln.frontends.torch_export import export_program, from_exported

    g = from_exported(export_program(m, (i,))).graph
    assert len(g.constants) == 1


def test_prepare_runs_once_per_weight_not_per_node():
    calls = []

    def prepare(node, consts):
        calls.append(node)
        packed = consts[1].t().contiguous()
        return lambda ins, a: ins[0] @ packed

    k = Kernel(OpKind.LINEAR, "cpu", "test.counting_linear", lambda ins, a: None, prepare=prepare)
    b = GraphBuilder("g")
    x = b.input("x", (2, 4))
    w1, w2 = torch.randn(3, 4), torch.randn(3, 4)
    n1 = b.add(OpKind.LINEAR, x, b.const(w1, "w1"))
    n2 = b.add(OpKind.LINEAR, x, b.const(w1, "w1b"))
    g = b.build([n1, n2])
    first, second = g.nodes
    f1 = k.bind(first, [None, w1])
    f2 = k.bind(second, [None, w1])  # the same tensor: the same prepared function
    assert f1 is f2 and len(calls) == 1
    assert k.bind(first, [None, w2]) is not f1 and len(calls) == 2  # another weight: prepared again
    del f1, f2
    gc.collect()
    k.bind(first, [None, w1])  # nothing holds the old one any more: prepared anew, never resurrected
    assert len(calls) == 3
