"""Faults: NaN/Inf weights, graphs too large for memory — clear outcomes, no crash."""
import pytest
import torch
from torch import nn

import kiln
from kiln import KilnError
from kiln.ir import GraphBuilder, OpKind
from kiln.driver import compile_graph


def test_nan_and_inf_weights_compute_what_eager_computes():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("nan")
        m[1].running_var[1] = float("inf")
        m[4].weight[1, 3] = float("-inf")
    x = torch.randn(1, 3, 6, 6)
    out = kiln.compile(m, (x,))(x)
    with torch.no_grad():
        torch.testing.assert_close(out, m(x), equal_nan=True)


def test_a_graph_too_large_for_memory_is_refused_before_running():
    b = GraphBuilder("huge")
    x = b.input("x", (64, 1024, 1024, 1024))  # 256 GiB of float32
    g = b.build([b.add(OpKind.RELU, b.add(OpKind.EXP, x))])
    with pytest.raises(KilnError, match="GiB .* only .* GiB is available"):
        compile_graph(g)
