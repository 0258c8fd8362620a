"""The end-to-end guard of ``sparse="auto"``: keep the sparse graph only if its whole plan
runs faster than the dense one.

The sparsity pass times each layer alone. What that misses — layout conversions between
a sparse kernel and its neighbours, cache effects between layers, thread start-up — shows
only end to end, so when the pass chose any sparse format the compile also builds the
dense plan and runs both, interleaved, on the same random inputs.
"""
from __future__ import annotations

import statistics
import time

import torch

from kiln.ir import Graph

ROUNDS = 5
MARGIN = 0.97  # the sparse plan must take at most 97% of the dense plan's time


def _inputs(graph: Graph) -> list[torch.Tensor]:
    out = []
    for v in graph.inputs:
        dt = v.type.dtype.to_torch()
        shape = tuple(v.type.shape)
        # integer inputs (token ids, indices) as zeros: always in range
        out.append(torch.randn(shape, dtype=dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt))
    return out


def sparse_plan_wins(sparse_plan, dense_plan) -> tuple[bool, float, float]:
    """(sparse is faster, dense median ms, sparse median ms)."""
    ins = _inputs(dense_plan.graph)
    times: tuple[list, list] = ([], [])
    with torch.no_grad():
        dense_plan.run(list(ins))
        sparse_plan.run(list(ins))
        for _ in range(ROUNDS):
            for i, plan in enumerate((dense_plan, sparse_plan)):
                t = time.perf_counter()
                plan.run(list(ins))
                times[i].append(time.perf_counter() - t)
    d, s = statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3
    return s < MARGIN * d, d, s
