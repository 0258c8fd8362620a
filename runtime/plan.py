"""Executable plans: a compiled graph as a flat list of kernel calls over buffer slots.

The plan is built once per graph and target. Running it touches no graph objects: each
step is (kernel function, attributes, input slots, output slots, slots to free), so the
per-call cost is a loop over prebuilt tuples. Buffers die right after their last use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.ir import Graph, Node, Value
from kiln.kernels.choice import choose
from kiln.kernels.registry import candidates


class KernelFailure(RuntimeError):
    """A kernel raised while running; names the node so the user can find it."""


@dataclass(frozen=True)
class Step:
    fn: object
    attrs: object
    ins: tuple  # slot per operand (None for an absent optional operand)
    outs: tuple
    free: tuple  # slots whose last use is this step
    node: Node
    kernel: str


@dataclass
class MemoryStats:
    buffers: int
    total_bytes: int  # sum of all intermediate buffers
    arena_bytes: int  # planned peak with buffer reuse (kiln._C.plan_memory)


@dataclass
class Plan:
    graph: Graph
    target: str
    steps: tuple[Step, ...]
    num_slots: int
    input_slots: tuple[int, ...]
    output_slots: tuple[int, ...]
    const_slots: tuple[tuple[int, torch.Tensor], ...]
    memory: MemoryStats | None = None
    kernel_names: dict[str, int] = field(default_factory=dict)
    partition: object = None  # kiln.passes.partition.Partition, when the pipeline ran
    pass_records: list = field(default_factory=list)
    cache_hit: bool = False
    sparsity: list = field(default_factory=list)  # passes.sparsity.SparseDecision per layer considered

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        slots: list = [None] * self.num_slots
        for i, t in self.const_slots:
            slots[i] = t
        for i, t in zip(self.input_slots, inputs):
            slots[i] = t
        for s in self.steps:
            try:
                r = s.fn([None if i is None else slots[i] for i in s.ins], s.attrs)
            except Exception as e:  # name the node; the original error stays chained
                where = f" ({s.node.scope})" if s.node.scope else ""
                raise KernelFailure(f"kernel {s.kernel} for {s.node.op.value}{where} failed: {e}") from e
            if len(s.outs) == 1:
                slots[s.outs[0]] = r
            else:
                for i, t in zip(s.outs, r):
                    slots[i] = t
            for i in s.free:
                slots[i] = None
        return [slots[i] for i in self.output_slots]


def run_all(graph: Graph, inputs: list[torch.Tensor], target: str = "reference") -> dict[Value, torch.Tensor]:
    """Every value the graph computes (nothing freed): for debugging and differential checks."""
    plan = build_plan(graph, target)
    env: dict[Value, torch.Tensor] = dict(graph.constants)
    env.update(zip(graph.inputs, inputs))
    with torch.no_grad():
        for s in plan.steps:
            r = s.fn([None if v is None else env[v] for v in s.node.inputs], s.attrs)
            for v, t in zip(s.node.outputs, r if isinstance(r, tuple) else (r,)):
                env[v] = t
    return env


def build_plan(graph: Graph, target: str = "cpu", kernel_choices: list[str] | None = None,
               memory: "MemoryStats | None" = None) -> Plan:
    """``kernel_choices`` (one kernel name per node, from the compile cache) skips measuring."""
    slot: dict[Value, int] = {}

    def get(v: Value) -> int:
        if v not in slot:
            slot[v] = len(slot)
        return slot[v]

    input_slots = tuple(get(v) for v in graph.inputs)
    const_slots = tuple((get(v), t) for v, t in graph.constants.items())
    last_use: dict[Value, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            if v is not None:
                last_use[v] = i
    keep = set(graph.outputs) | set(graph.inputs) | set(graph.constants)
    steps, counts = [], {}
    for i, n in enumerate(graph.nodes):
        cands = candidates(n, target)
        if kernel_choices is not None and i < len(kernel_choices):
            cands = [k for k in cands if k.name == kernel_choices[i]] or cands
        k, fn = choose(n, cands, [None if v is None else graph.constants.get(v) for v in n.inputs])
        counts[k.name] = counts.get(k.name, 0) + 1
        outs = tuple(get(v) for v in n.outputs)
        dead = [v for v in n.inputs if v is not None and last_use.get(v) == i and v not in keep]
        dead += [v for v in n.outputs if v not in last_use and v not in keep]  # never used
        steps.append(Step(fn, n.attrs, tuple(None if v is None else get(v) for v in n.inputs), outs,
                          tuple(sorted({slot[v] for v in dead})), n, k.name))
    plan = Plan(graph, target, tuple(steps), len(slot), input_slots, tuple(get(v) for v in graph.outputs),
                const_slots, kernel_names=counts)
    plan.memory = memory if memory is not None else plan_memory(graph)
    return plan


def plan_memory(graph: Graph) -> MemoryStats | None:
    """Static buffer assignment for the graph's intermediates (sizes need static shapes)."""
    from kiln import _C

    first: dict[Value, int] = {}
    last: dict[Value, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.outputs:
            first[v] = i
            last[v] = i
        for v in n.inputs:
            if v in first:
                last[v] = i
    end = len(graph.nodes)
    for v in graph.outputs:
        if v in last:
            last[v] = end
    vals = [v for v in first if v.type.is_static]
    if not vals:
        return MemoryStats(0, 0, 0)
    sizes = [v.type.nbytes() for v in vals]
    _, arena = _C.plan_memory(sizes, [first[v] for v in vals], [last[v] for v in vals], 64)
    return MemoryStats(len(vals), sum(sizes), arena)

