"""Executable plans: a compiled graph as a flat list of kernel calls over buffer slots.

The plan is built once per graph and target. Each step is (kernel function, attributes,
input slots, output slots, slots to free); running the plan touches no graph objects and
no step list: the steps are written out as one generated Python function that calls the
kernels directly (``runtime.straightline``). Buffers die right after their last use.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kiln.ir import Graph, Node, Value
from kiln.kernels.choice import choose
from kiln.kernels.registry import candidates

from .straightline import generate, step_at


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
    node_kernels: list = field(default_factory=list)  # the kernel each node runs in (cached choices)
    codegen_seconds: float = 0.0  # spent generating, tuning, loading and choosing group kernels
    pass_records: list = field(default_factory=list)
    cache_hit: bool = False
    sparsity: list = field(default_factory=list)  # passes.sparsity.SparseDecision per layer considered
    _forward: object = field(init=False, repr=False, compare=False)  # the generated function

    def __post_init__(self):
        self._forward = generate(self.steps, self.input_slots, self.output_slots, self.const_slots)

    def interpret(self, inputs: list[torch.Tensor], on_step=None) -> list[torch.Tensor]:
        """The steps run one at a time over a slot list, nothing freed: what the generated
        function must equal, and a hook for tools (``on_step(step, result)`` after each)."""
        slots: list = [None] * self.num_slots
        for i, t in self.const_slots:
            slots[i] = t
        for i, t in zip(self.input_slots, inputs):
            slots[i] = t
        for s in self.steps:
            r = s.fn([None if i is None else slots[i] for i in s.ins], s.attrs)
            for i, t in zip(s.outs, (r,) if len(s.outs) == 1 else r):
                slots[i] = t
            if on_step is not None:
                on_step(s, r)
        return [slots[i] for i in self.output_slots]

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_slots):
            raise ValueError(f"plan takes {len(self.input_slots)} inputs, got {len(inputs)}")
        try:
            return self._forward(inputs)
        except Exception as e:  # name the node; the original error stays chained
            k = step_at(e.__traceback__, self._forward)
            if k is None or not 0 <= k < len(self.steps):  # not inside a kernel call
                raise
            s = self.steps[k]
            where = f" ({s.node.scope})" if s.node.scope else ""
            raise KernelFailure(f"kernel {s.kernel} for {s.node.op.value}{where} failed: {e}") from e


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


def slots_for(graph: Graph):
    """(slot of each value, ``get(v)`` numbering values in order of first mention, the
    inputs' slots, (slot, tensor) of each constant): the buffer slots a plan runs over."""
    slot: dict[Value, int] = {}

    def get(v: Value) -> int:
        if v not in slot:
            slot[v] = len(slot)
        return slot[v]

    input_slots = tuple(get(v) for v in graph.inputs)
    const_slots = tuple((get(v), t) for v, t in graph.constants.items())
    return slot, get, input_slots, const_slots


def build_plan(graph: Graph, target: str = "cpu", kernel_choices: list[str] | None = None,
               memory: "MemoryStats | None" = None, partition=None, generate=None,
               exclude: frozenset[str] = frozenset()) -> Plan:
    """``kernel_choices`` (one kernel name per node, from the compile cache) skips measuring;
    kernels named in ``exclude`` are not candidates (the reference always is).

    With a ``partition`` and a ``generate(group) -> GeneratedKernel | None`` (see
    ``kiln.runtime.generated``), each kernel group can run as one generated kernel: it does
    when ``kernel_choices`` says so, else when it beats the group's per-node kernels by
    measurement. Steps then follow the partition's group order (a valid execution order).
    """
    slot, get, input_slots, const_slots = slots_for(graph)
    index = {n: i for i, n in enumerate(graph.nodes)}
    node_kernels: list[str] = [""] * len(graph.nodes)
    units: list[tuple] = []  # (kernel name, fn, attrs, inputs, outputs, node)
    codegen_s = 0.0
    for nodes, gen_group in _units(graph, partition, generate is not None and target != "reference"):
        chosen = []
        for n in nodes:
            cands = [k for k in candidates(n, target) if k.name not in exclude or k.target == "reference"]
            recorded = kernel_choices[index[n]] if kernel_choices is not None and index[n] < len(kernel_choices) \
                else None
            if recorded is not None:
                cands = [k for k in cands if k.name == recorded] or cands
            chosen.append(choose(n, cands, [None if v is None else graph.constants.get(v) for v in n.inputs]))
        t0 = time.perf_counter()
        gen = _generated(gen_group, nodes, chosen, graph, kernel_choices, index, generate)
        codegen_s += time.perf_counter() - t0
        if gen is not None:
            for n in nodes:
                node_kernels[index[n]] = gen.name
            units.append((gen.name, gen, None, tuple(gen_group.inputs), tuple(gen_group.outputs), nodes[-1]))
            continue
        for n, (k, fn) in zip(nodes, chosen):
            node_kernels[index[n]] = k.name
            units.append((k.name, fn, n.attrs, n.inputs, n.outputs, n))
    last_use: dict[Value, int] = {}
    for i, u in enumerate(units):
        for v in u[3]:
            if v is not None:
                last_use[v] = i
    keep = set(graph.outputs) | set(graph.inputs) | set(graph.constants)
    steps, counts = [], {}
    for i, (name, fn, attrs, ins, outs_v, node) in enumerate(units):
        counts[name] = counts.get(name, 0) + 1
        outs = tuple(get(v) for v in outs_v)
        dead = [v for v in ins if v is not None and last_use.get(v) == i and v not in keep]
        dead += [v for v in outs_v if v not in last_use and v not in keep]  # never used
        steps.append(Step(fn, attrs, tuple(None if v is None else get(v) for v in ins), outs,
                          tuple(sorted({slot[v] for v in dead})), node, name))
    plan = Plan(graph, target, tuple(steps), len(slot), input_slots, tuple(get(v) for v in graph.outputs),
                const_slots, kernel_names=counts)
    plan.node_kernels = node_kernels
    plan.codegen_seconds = codegen_s
    plan.memory = memory if memory is not None else plan_memory(graph)
    return plan


_GENERATED_KINDS = ("injective", "reduction")


def _units(graph: Graph, partition, generating: bool):
    """(nodes, group that may run as one generated kernel or None), in execution order.

    A compute group's anchor keeps its library kernel (oneDNN/MKL), so its injective tail
    (the epilogue the GEMM could not take, e.g. bf16 -> f32 cast + residual add) would be a
    kernel of its own. When that tail feeds one normalization/reduction group and nothing
    else (BERT's add before LayerNorm), it runs at the head of that group instead: one
    generated kernel, and the tail's result never goes through memory."""
    if partition is None or not generating:
        for n in graph.nodes:
            yield [n], None
        return
    owner = {n: g for g in partition.groups for n in g.nodes}
    readers: dict[Value, list[Node]] = {}
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None:
                readers.setdefault(v, []).append(n)
    returned = set(graph.outputs)
    prefix: dict[int, list[Node]] = {}  # reduction group id -> tails to run at its head
    for g in partition.groups:
        if g.kind in _GENERATED_KINDS:
            head = prefix.pop(g.id, [])
            nodes = head + list(g.nodes)
            yield nodes, (subgroup(graph, g, nodes, g.kind) if head else g)
        elif g.kind == "compute" and len(g.nodes) > 1:
            yield [g.nodes[0]], None
            tail = g.nodes[1:]
            into = _sole_reduction_consumer(tail, owner, readers, returned)
            if into is not None:
                prefix.setdefault(into.id, []).extend(tail)
            else:
                yield list(tail), subgroup(graph, g, tail)
        else:
            yield list(g.nodes), None


def _sole_reduction_consumer(tail: list[Node], owner: dict, readers: dict, returned: set):
    """The reduction group that alone reads ``tail``'s results (none of them ``returned``), else None."""
    made = [o for n in tail for o in n.outputs]
    if set(made) & returned:
        return None
    members = set(tail)
    groups = {id(owner[r]): owner[r] for v in made for r in readers.get(v, ()) if r not in members}
    if len(groups) != 1:
        return None
    (g,) = groups.values()
    return g if g.kind == "reduction" else None


def subgroup(graph: Graph, group, nodes: list[Node], kind: str = "injective"):
    """A kernel group of ``nodes`` (part of ``group``, or a tail joined to it): inputs and
    outputs recomputed."""
    from kiln.passes.partition import KernelGroup

    inside = {o for n in nodes for o in n.outputs}
    users_outside = set(graph.outputs)
    members = set(nodes)
    for n in graph.nodes:
        if n not in members:
            users_outside.update(v for v in n.inputs if v in inside)
    ins: list[Value] = []
    for n in nodes:
        for v in n.inputs:
            if v is not None and v not in inside and v not in ins:
                ins.append(v)
    return KernelGroup(group.id, kind, list(nodes), ins, [o for n in nodes for o in n.outputs if o in users_outside])


def _generated(group, nodes, chosen, graph, kernel_choices, index, generate):
    """The generated kernel for ``group`` if it runs as one (recorded choice or measured win)."""
    if group is None:
        return None
    from kiln.kernels.choice import choose_group

    from .generated import KERNEL_PREFIX

    recorded = [kernel_choices[index[n]] for n in nodes if kernel_choices is not None and index[n] < len(kernel_choices)]
    if recorded and len(recorded) == len(nodes):
        if not all(r.startswith(KERNEL_PREFIX) for r in recorded):
            return None  # the cache says per-node kernels won
        return generate(group)  # the cache says this group runs generated: no measuring
    return choose_group(group, graph, generate, [fn for _, fn in chosen], torch.get_num_threads())


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

