"""Buffer lifetimes: where each intermediate value dies, and the most bytes live at once.

Both work on *units*, ``(inputs, outputs)`` pairs of values in the order they run: a
plan's steps (``runtime.plan``), or a graph's nodes one by one before any kernel is chosen
(``graph_memory``, what the compile's memory check uses). Kernels allocate their own
outputs, so these numbers describe what the allocator will hold, not offsets in an arena.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from kiln.ir import Graph, Value
from kiln.ir.record import record


@record(slots=False)
class MemoryStats:
    """A plan's activation buffers: count, total and peak bytes."""
    buffers: int  # intermediate values with a static size
    total_bytes: int  # their sum, as if none were ever freed
    peak_bytes: int  # the most held at once, each freed after its last use


def dead_values(units: Sequence[tuple[Sequence[Value | None], Sequence[Value]]], keep: set[Value]) -> list[list[Value]]:
    """Per unit, the values that die there: inputs read for the last time, and outputs nothing
    reads. Values in ``keep`` (the graph's inputs, constants and outputs) never die."""
    last_use: dict[Value, int] = {}
    for i, (ins, _) in enumerate(units):
        for v in ins:
            if v is not None:
                last_use[v] = i
    dead = []
    for i, (ins, outs) in enumerate(units):
        d = [v for v in ins if v is not None and last_use.get(v) == i and v not in keep]
        d += [v for v in outs if v not in last_use and v not in keep]  # never read
        dead.append(d)
    return dead


def memory_stats(outputs: Iterable[Sequence[Value]], dead: Iterable[Sequence[Value]],
                 sizes: dict | None = None) -> MemoryStats:
    """One sweep over the units' outputs (allocated when the unit runs, while its inputs are
    still held) and the values ``dead_values`` frees after each. ``sizes``: symbolic sizes'
    values (name -> int), so values of those shapes count too."""
    size: dict[Value, int] = {}
    live = peak = 0
    for outs, gone in zip(outputs, dead):
        for v in outs:
            if v in size:
                continue
            t = v.type if sizes is None or not v.type.symbols <= sizes.keys() else v.type.concrete(sizes)
            if t.is_static:
                size[v] = t.nbytes()
                live += size[v]
        peak = max(peak, live)
        for v in set(gone):
            live -= size.get(v, 0)
    return MemoryStats(len(size), sum(size.values()), peak)


def graph_memory(graph: Graph) -> MemoryStats:
    """The graph's nodes run one by one in order: what the intermediates need before any
    kernel is chosen (choosing measures kernels on buffers of these sizes)."""
    units = [(n.inputs, n.outputs) for n in graph.nodes]
    keep = set(graph.inputs) | set(graph.constants) | set(graph.outputs)
    return memory_stats((outs for _, outs in units), dead_values(units, keep))
