"""Executable plans: a compiled graph as a flat list of kernel calls over buffer slots.

One structure and one run path serve every target. A plan is built once per graph and
target: each step is (kernel function, attributes, input slots, output slots, slots to
free), the kernel called as ``fn(inputs, attrs)`` and returning a tensor, or a sequence for
a node of several results. Running touches no graph objects and no step list: the steps are
written out as one generated Python function that calls the kernels directly
(``runtime.straightline``). Buffers die right after their last use (``runtime.buffers``).

What differs by target is small: the CPU plan calls that function directly; a cuda plan
runs it through a ``runtime.cuda_run.CudaRunner`` (constants moved to the device once,
CUDA-graph capture and replay, the "needs a GPU" check). The steps themselves come from
``build_plan`` here (CPU and reference: kernels chosen by measurement, kernel groups run as
generated TVM kernels when they win) or ``runtime.cuda_steps.build_gpu_plan``.
"""
from __future__ import annotations

import time
from dataclasses import field

import torch

from kiln.errors import KilnError
from kiln.ir import Graph, Node, Value
from kiln.ir.types import Sym, resolve_symbols
from kiln.kernels.choice import choose
from kiln.kernels.registry import candidates, is_static
from kiln.kernels.allocator import tune_allocator
from kiln.kernels.vml_dispatch import resolve_vml_dispatch
from kiln.passes.partition import subgroup, tail_destinations
from kiln.ir.record import record
from kiln.target import Target

from .buffers import MemoryStats, dead_values, memory_stats
from .straightline import generate, step_at


class KernelFailure(KilnError):
    """A kernel raised while running; names the kernel, the node's op and its scope so the
    user can find it (the kernel's own error is the cause)."""


@record(slots=False)
class Step:
    """One kernel call of a plan: the function, its operand and result slots, what it frees."""
    fn: object  # fn(inputs, attrs) -> tensor, or a sequence of tensors for several outputs
    attrs: object
    ins: tuple  # slot per operand (None for an absent optional operand)
    outs: tuple
    free: tuple  # slots whose last use is this step
    node: Node  # the node a failure names (a group kernel's last node)
    kernel: str


@record(slots=False)
class Unit:
    """A step before slots are numbered: what a plan builder decides per kernel call."""

    kernel: str
    fn: object
    attrs: object
    ins: tuple  # values (None for an absent optional operand)
    outs: tuple
    node: Node


@record(frozen=False, eq=False, slots=False)
class Plan:
    """An executable graph: the steps in order and the value slots they use."""
    graph: Graph
    target: Target
    steps: tuple[Step, ...]
    values: tuple[Value, ...]  # the value each slot holds
    input_slots: tuple[int, ...]
    output_slots: tuple[int, ...]
    const_slots: tuple[tuple[int, torch.Tensor], ...]
    memory: MemoryStats
    kernel_names: dict[str, int] = field(default_factory=dict)  # kernel -> steps running it
    node_kernels: list = field(default_factory=list)  # the kernel each node runs in (cached choices)
    codegen_seconds: float = 0.0  # spent generating, tuning, loading and choosing group kernels
    torch_ops: dict[str, str] = field(default_factory=dict)  # op -> why it runs its torch reference (cuda)
    runner: object = None  # a target's run strategy (runtime.cuda_run.CudaRunner); None: the host calls it
    chunks: object = None  # runtime.chunks.BatchChunks: a large batch runs in chunks of samples (host plans)
    chunking: str = ""  # what was decided about chunking, and why
    forward: object = field(init=False, repr=False)  # the generated function: forward(inputs, consts)
    consts: dict = field(init=False, repr=False)  # slot -> constant, as the host holds them
    sizes: tuple = field(init=False, repr=False)  # (name, input slot, axis) of each symbolic size

    def __post_init__(self):
        resolve_vml_dispatch()  # before this plan's first (parallel) call: see kernels.vml_dispatch
        if self.runner is None:  # a host-run plan: its buffers come from Kiln's pool (kernels.allocator)
            tune_allocator(pool=True)
        self.sizes = input_sizes(self.graph, self.input_slots)
        self.forward = generate(self.steps, self.input_slots, self.output_slots, self.const_slots, self.sizes)
        self.consts = dict(self.const_slots)

    def size_values(self, inputs: list) -> dict:
        """The symbolic sizes of this call, read off its inputs."""
        return {name: inputs[self.input_slots.index(slot)].shape[axis] for name, slot, axis in self.sizes}

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_slots):
            raise ValueError(f"plan takes {len(self.input_slots)} inputs, got {len(inputs)}")
        try:
            if self.runner is None:
                if self.chunks is not None:
                    return self.chunks.run(self.forward, inputs, self.consts)
                return self.forward(inputs, self.consts)
            return self.runner.run(self, inputs)
        except Exception as e:  # name the node; the original error stays chained
            failure = self._failure(e)
            if failure is None:  # not inside a kernel call
                raise
            raise failure from e

    def _failure(self, e: BaseException) -> KernelFailure | None:
        """The KernelFailure naming the step ``e`` was raised in, None when it was raised
        outside the steps."""
        k = step_at(e.__traceback__, self.forward)
        if k is None or not 0 <= k < len(self.steps):
            return None
        s = self.steps[k]
        where = f" ({s.node.scope})" if s.node.scope else ""
        return KernelFailure(f"kernel {s.kernel} for {s.node.op.value}{where} failed: {e}")

    def interpret(self, inputs: list, on_step=None, consts=None, call=None) -> list:
        """The steps run one at a time over a slot list, nothing freed: what the generated
        function must equal, and a hook for tools (``on_step(step, result)`` after each;
        ``call(step, operands)`` instead of the step's kernel; ``consts`` by slot instead of
        the plan's own)."""
        slots: list = [None] * len(self.values)
        for i, t in (consts if consts is not None else self.consts).items():
            slots[i] = t
        for i, t in zip(self.input_slots, inputs):
            slots[i] = t
        sizes = self.size_values(inputs)
        for s in self.steps:
            operands = [None if i is None else slots[i] for i in s.ins]
            r = s.fn(operands, resolve_symbols(s.attrs, sizes)) if call is None else call(s, operands)
            for i, t in zip(s.outs, (r,) if len(s.outs) == 1 else r):
                slots[i] = t
            if on_step is not None:
                on_step(s, r)
        return [slots[i] for i in self.output_slots]


def input_sizes(graph: Graph, input_slots) -> tuple:
    """(name, input slot, axis) where each symbolic size first appears as an input's dim."""
    seen: dict = {}
    for v, slot in zip(graph.inputs, input_slots):
        for axis, d in enumerate(v.type.shape):
            if isinstance(d, Sym) and d.name not in seen and d.symbols == {d.name}:
                seen[d.name] = (d.name, slot, axis)
    return tuple(seen.values())


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


def assemble(graph: Graph, target: Target, units: list[Unit], batch_chunk: int | None = 0, **built) -> Plan:
    """The plan running ``units`` in order: slots numbered, each buffer freed after its last
    use, kernels counted; ``built`` are the builder's other fields (node_kernels, ...).
    ``batch_chunk``: for a CPU plan, how its batch may run in chunks (``runtime.chunks``:
    None decides, 0 never, n samples)."""
    slot, get, input_slots, const_slots = slots_for(graph)
    keep = set(graph.outputs) | set(graph.inputs) | set(graph.constants)
    pairs = [(u.ins, u.outs) for u in units]
    dead = dead_values(pairs, keep)
    steps, counts = [], {}
    for u, gone in zip(units, dead):
        counts[u.kernel] = counts.get(u.kernel, 0) + 1
        outs = tuple(get(v) for v in u.outs)
        steps.append(Step(u.fn, u.attrs, tuple(None if v is None else get(v) for v in u.ins), outs,
                          tuple(sorted({slot[v] for v in gone})), u.node, u.kernel))
    output_slots = tuple(get(v) for v in graph.outputs)
    chunks, chunking = None, ""
    if target.kind == "cpu":
        from .chunks import plan_chunks

        chunks, chunking = plan_chunks(graph, [u.outs for u in units], dead, batch_chunk)
    return Plan(graph, target, tuple(steps), tuple(slot), input_slots, output_slots, const_slots,
                memory_stats((u.outs for u in units), dead), kernel_names=counts, chunks=chunks,
                chunking=chunking, **built)


def run_all(graph: Graph, inputs: list[torch.Tensor], target: str = "reference") -> dict[Value, torch.Tensor]:
    """Every value the graph computes (nothing freed): for debugging and differential checks."""
    plan = build_plan(graph, target)
    env: dict[Value, torch.Tensor] = dict(graph.constants)
    env.update(zip(graph.inputs, inputs))

    def keep(s: Step, r) -> None:
        for i, t in zip(s.outs, (r,) if len(s.outs) == 1 else r):
            env[plan.values[i]] = t

    with torch.no_grad():
        plan.interpret(list(inputs), keep)
    return env


def build_plan(graph: Graph, target: "str | Target" = "cpu", kernel_choices: list[str] | None = None,
               partition=None, generate=None, exclude: frozenset[str] = frozenset(), sizes: dict | None = None,
               buckets: list[dict] | None = None, batch_chunk: int | None = 0) -> Plan:
    """A plan for the CPU (or the reference kernels): per node, the fastest kernel that agrees
    with the reference. ``kernel_choices`` (one kernel name per node, from the compile cache)
    skips measuring; kernels named in ``exclude`` are not candidates (the reference always is).

    With a ``partition`` and a ``generate(group) -> GeneratedKernel | None`` (see
    ``kiln.runtime.generated``), each kernel group can run as one generated kernel: it does
    when ``kernel_choices`` says so, else when it beats the group's per-node kernels by
    measurement. Steps then follow the partition's group order (a valid execution order).

    ``sizes``: a symbolic graph's example sizes (its kernels are measured and prepared at
    them); ``buckets``: more representative sizes, each node of symbolic shapes chosen at
    each too and dispatched by size where the choices differ (``runtime.by_size``).
    ``batch_chunk``: whether a large batch runs in chunks (``runtime.chunks``; 0: never).
    """
    target = Target.parse(target)
    kind = target.kind
    index = {n: i for i, n in enumerate(graph.nodes)}
    node_kernels: list[str] = [""] * len(graph.nodes)
    units: list[Unit] = []
    codegen_s = 0.0
    for nodes, gen_group in _units(graph, partition, generate is not None and kind != "reference"):
        t0 = time.perf_counter()
        # recorded as one generated kernel: its nodes' own kernels are neither chosen nor prepared
        gen = _recorded_generated(gen_group, nodes, kernel_choices, index, generate)
        codegen_s += time.perf_counter() - t0
        chosen, per_size = [], []
        for n in nodes if gen is None else ():
            cands = [k for k in candidates(n, kind) if k.name not in exclude or k.target == "reference"]
            recorded = kernel_choices[index[n]] if kernel_choices is not None and index[n] < len(kernel_choices) \
                else None
            consts = [None if v is None else graph.constants.get(v) for v in n.inputs]
            restored = _restored_by_size(n, recorded, cands, consts)
            if restored is not None:
                chosen.append(restored)
                per_size.append(None)
                continue
            if recorded is not None:
                cands = [k for k in cands if k.name == recorded] or cands
            # a node of symbolic shapes: its candidates (dynamic kernels) measured and prepared
            # at the representative sizes; the kernel they choose serves every size
            at = n if sizes is None or is_static(n) else n.at_sizes(sizes)
            chosen.append(choose(at, cands, consts))
            per_size.append((cands, consts) if recorded is None and buckets and len(buckets) > 1 and
                            sizes is not None and not is_static(n) else None)
        t0 = time.perf_counter()
        if gen is None:
            gen = _generated(gen_group, nodes, chosen, graph, kernel_choices, index, generate, sizes)
        codegen_s += time.perf_counter() - t0
        if gen is not None:
            for n in nodes:
                node_kernels[index[n]] = gen.name
            units.append(Unit(gen.name, gen, None, tuple(gen_group.inputs), tuple(gen_group.outputs), nodes[-1]))
            continue
        for n, (k, fn), more in zip(nodes, chosen, per_size):
            name = k if isinstance(k, str) else k.name
            if more is not None:
                name, fn = _chosen_by_size(n, (k, fn), more, sizes, buckets)
            node_kernels[index[n]] = name
            units.append(Unit(name, fn, n.attrs, tuple(n.inputs), tuple(n.outputs), n))
    return assemble(graph, target, units, batch_chunk, node_kernels=node_kernels, codegen_seconds=codegen_s)


def _chosen_by_size(node: Node, first, more, sizes: dict, buckets: list[dict]) -> tuple[str, object]:
    """(recorded choice, step function) of a symbolic node chosen at every representative size:
    one kernel where they agree, else a ``BySize`` dispatch (``runtime.by_size``). ``first`` is
    the choice at ``sizes`` (the example's)."""
    from .by_size import dispatch

    cands, consts = more
    made = {(first[0].name, _key(sizes)): first[1]}
    entries = [(sizes, first[0].name)]
    for s in buckets:
        if s == sizes:
            continue
        k, fn = choose(node.at_sizes(s), cands, consts)
        made.setdefault((k.name, _key(s)), fn)
        entries.append((s, k.name))
    return dispatch(node, entries, lambda name, s: made[(name, _key(s))])


def _key(sizes: dict) -> tuple:
    return tuple(sorted(sizes.items()))


def _restored_by_size(node: Node, recorded, cands, consts):
    """(record, step function) for a recorded size-bucket choice whose kernels are all
    candidates here, each prepared at its recorded sizes; None otherwise (a plain or absent
    record, or a kernel missing here: the node is chosen again)."""
    from .by_size import decode, dispatch

    try:
        entries = decode(recorded) if isinstance(recorded, str) else None
    except ValueError:  # a damaged record: measured again, as a missing kernel is
        return None
    if entries is None or is_static(node):
        return None
    by_name = {k.name: k for k in cands}
    if any(name not in by_name for _, name in entries):
        return None
    return dispatch(node, entries, lambda name, s: by_name[name].bind(node.at_sizes(s), consts))


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
    readers = graph.users()
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
            into = _reduction_consumers(tail, owner, readers, returned)
            if into is not None:
                for t, dest in zip(tail, into):
                    prefix.setdefault(dest.id, []).append(t)
            else:
                yield list(tail), subgroup(graph, g, tail)
        else:
            yield list(g.nodes), None


def _reduction_consumers(tail: list[Node], owner: dict, readers: dict, returned: set) -> list | None:
    """For each node of ``tail``, the one reduction group that alone reads its results (the
    partition clones shared cheap tail nodes so that each feeds one); None when a tail result
    is returned or feeds several groups, or a group that is not a reduction."""
    dests = tail_destinations(tail, owner, readers, returned)
    by_id = {g.id: g for g in owner.values()}
    if dests is None or any(len(d) != 1 for d in dests):
        return None
    groups = [by_id[next(iter(d))] for d in dests]
    return groups if all(g.kind == "reduction" for g in groups) else None


def _recorded(nodes, kernel_choices, index) -> list | None:
    recorded = [kernel_choices[index[n]] for n in nodes if kernel_choices is not None and index[n] < len(kernel_choices)]
    return recorded if recorded and len(recorded) == len(nodes) else None


def _recorded_generated(group, nodes, kernel_choices, index, generate):
    """The generated kernel for ``group`` when the recorded choices say it runs as one (no
    measuring, and its nodes' own kernels are never prepared); None otherwise, or when it
    cannot be had here (its nodes' kernels are then chosen again)."""
    from .generated import KERNEL_PREFIX

    recorded = _recorded(nodes, kernel_choices, index)
    if group is None or recorded is None or not all(r.startswith(KERNEL_PREFIX) for r in recorded):
        return None
    return generate(group)


def _generated(group, nodes, chosen, graph, kernel_choices, index, generate, sizes=None):
    """The generated kernel for ``group`` if it wins by measurement; never when choices were
    recorded (``_recorded_generated`` took the recorded generated kernels). A group with a
    symbolic size is generated as one kernel for every size (named sizes become variables of
    the generated function) and measured at ``sizes``; without ``sizes`` it runs node by node."""
    static = all(v.type.is_static for n in nodes for v in (*n.inputs, *n.outputs) if v is not None)
    if group is None or _recorded(nodes, kernel_choices, index) is not None or (not static and sizes is None):
        return None
    from kiln.kernels.choice import choose_group

    return choose_group(group, graph, generate, [fn for _, fn in chosen], torch.get_num_threads(),
                        None if static else sizes)
