"""Partition: cut the optimized graph into kernel groups, the units of code generation.

Fusion rule (one pass, topological order, never duplicating a node):

* a group holds at most one *anchor* — a compute op (GEMM/conv, whose epilogue was
  already folded into it), a reduction, or a normalization — plus injective ops
  (elementwise and data movement) before the anchor and after it;
* injective ops join the group of an operand's producer; a compute anchor takes injective
  consumers (epilogue) but no injective producers (its operands are materialized); a
  reduction/normalization takes injective producers and consumers;
* a second reduction never joins a group that has one (reduction boundaries);
* attention, recurrent and fallback ops are groups of their own;
* a merge that would create a cycle between groups is refused;
* a layout change whose source is read elsewhere too, and whose result only feeds
  reductions/normalizations (through reshapes), joins its consumers, not its producer: the
  producer's group would otherwise write the value twice (once per layout) and the
  reduction read the copy, where it can read the one stored value through the layout
  change as a coordinate rewrite (a group norm over a channels-last residual stream);
* a value used outside its group (or returned) is a group output, written once;
* a compute group's tail (its injective epilogue) that would be written to memory only to
  be read by several reduction groups is cloned, one copy per group, when each copy is
  cheap (a cast, a view): the plan then runs each copy at the head of its reduction group
  and the tail's value is never stored (ConvNeXt V2's bf16 GEMM output widened to f32 for
  both the GRN statistic and its apply: the bf16 value is read twice instead of an f32
  copy written and read twice).
"""
from __future__ import annotations

from dataclasses import field

from kiln.ir import Category, Graph, Node, OpKind, Value, opdef
from kiln.ir.record import record


class GroupKind:
    INJECTIVE = "injective"
    REDUCTION = "reduction"
    COMPUTE = "compute"
    ATTENTION = "attention"
    RECURRENT = "recurrent"
    FALLBACK = "fallback"


@record(frozen=False, slots=False)
class KernelGroup:
    """Nodes that run as one kernel, with the values crossing its boundary."""
    id: int
    kind: str
    nodes: list[Node] = field(default_factory=list)
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)

    @property
    def ops(self) -> list[str]:
        return [n.op.value for n in self.nodes]

    def __repr__(self) -> str:
        return f"group{self.id}<{self.kind}>[{', '.join(self.ops)}]"


@record(frozen=False, slots=False)
class Partition:
    """A graph's nodes divided into kernel groups, in a valid execution order."""
    graph: Graph
    groups: list[KernelGroup]

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.groups:
            out[g.kind] = out.get(g.kind, 0) + 1
        return out


_INJECTIVE = {Category.ELEMENTWISE, Category.MOVEMENT}
_SOLO = {Category.ATTENTION: GroupKind.ATTENTION, Category.RECURRENT: GroupKind.RECURRENT,
         Category.FALLBACK: GroupKind.FALLBACK}


def _node_kind(n: Node) -> str:
    cat = opdef(n.op).category
    if cat in _SOLO:
        return _SOLO[cat]
    if cat in _INJECTIVE:
        return GroupKind.INJECTIVE
    if cat is Category.COMPUTE:
        return GroupKind.COMPUTE
    return GroupKind.REDUCTION  # reductions and normalizations


def _feeds_only_reductions(v: Value, readers: dict) -> bool:
    """Does every use of ``v`` reach a reduction/normalization through reshapes alone?"""
    rs = readers.get(v, [])
    for r in rs:
        if r.op is OpKind.RESHAPE:
            if not _feeds_only_reductions(r.outputs[0], readers):
                return False
        elif _node_kind(r) != GroupKind.REDUCTION:
            return False
    return bool(rs)


def _layout_change_for_consumers(n: Node, readers: dict, outputs: set) -> bool:
    """A TO_LAYOUT that should start the group of its consumers (see the module's rules)."""
    if n.op is not OpKind.TO_LAYOUT or n.outputs[0] in outputs:
        return False
    src = n.inputs[0]
    return len(readers.get(src, [])) > 1 and _feeds_only_reductions(n.outputs[0], readers)


def partition(graph: Graph) -> Partition:
    part = _partition(graph)
    cloned = _clone_shared_tails(part)
    return part if cloned is None else _partition(cloned)


# cheap to compute twice: one read of the anchor's result per element, no arithmetic to speak of
_CLONABLE = {OpKind.CAST, OpKind.RESHAPE, OpKind.PERMUTE, OpKind.TO_LAYOUT}


def tail_destinations(tail: list[Node], owner: dict, readers: dict, returned: set) -> list[set] | None:
    """For each node of a compute group's ``tail``, the ids of the groups outside the tail
    that read its results, directly or through later tail nodes; None when a tail result is
    returned by the graph."""
    members = set(tail)
    dest: dict[Node, set] = {}
    for t in reversed(tail):
        d: set = set()
        for o in t.outputs:
            if o in returned:
                return None
            for r in readers.get(o, ()):
                d |= dest[r] if r in members else {owner[r].id}
        dest[t] = d
    return [dest[t] for t in tail]


def _clone_shared_tails(part: Partition) -> Graph | None:
    """The graph with the cheap nodes of compute tails that feed several reduction groups
    cloned, one copy per group (see the module's rules); None when there is nothing to clone."""
    graph = part.graph
    owner = {n: g for g in part.groups for n in g.nodes}
    by_id = {g.id: g for g in part.groups}
    readers = graph.users()
    returned = set(graph.outputs)
    clones: dict[Node, list[tuple[int, Node]]] = {}  # original -> (group id, copy) for the extra groups
    rewire: dict[int, dict[Value, Value]] = {}  # group id -> original value -> its copy for that group
    for g in part.groups:
        tail = g.nodes[1:]
        if g.kind != GroupKind.COMPUTE or not tail:
            continue
        dests = tail_destinations(tail, owner, readers, returned)
        if dests is None or not any(len(d) > 1 for d in dests) or \
                any(not d or by_id[i].kind != GroupKind.REDUCTION for d in dests for i in d) or \
                any(len(d) > 1 and t.op not in _CLONABLE for t, d in zip(tail, dests)):
            continue
        for t, d in zip(tail, dests):
            for i in sorted(d)[1:]:
                m = rewire.setdefault(i, {})
                outs = tuple(Value(o.type, f"{o.name}_g{i}") for o in t.outputs)
                copy = Node(t.op, tuple(None if v is None else m.get(v, v) for v in t.inputs), t.attrs, outs, t.scope)
                m.update(zip(t.outputs, outs))
                clones.setdefault(t, []).append((i, copy))
    if not clones:
        return None
    dest_of = {}  # tail node -> its single group id (tail nodes that read a cloned value)
    for g in part.groups:
        if g.kind == GroupKind.COMPUTE and len(g.nodes) > 1:
            dests = tail_destinations(g.nodes[1:], owner, readers, returned) or []
            dest_of.update((t, next(iter(d))) for t, d in zip(g.nodes[1:], dests) if len(d) == 1)
    nodes = []
    for n in graph.nodes:
        m = rewire.get(dest_of.get(n, owner[n].id))
        if m and n not in clones:
            ins = tuple(None if v is None else m.get(v, v) for v in n.inputs)
            nodes.append(n if ins == n.inputs else Node(n.op, ins, n.attrs, n.outputs, n.scope))
        else:
            nodes.append(n)
        nodes.extend(c for _, c in clones.get(n, ()))
    return graph.replace(nodes=tuple(nodes))


def _partition(graph: Graph) -> Partition:
    producer = {o: n for n in graph.nodes for o in n.outputs}
    readers = graph.users()
    returned = set(graph.outputs)
    group_of: dict[Node, KernelGroup] = {}
    groups: list[KernelGroup] = []
    deps: dict[int, set[int]] = {}  # group id -> ids of groups it reads from

    def reaches(src: int, dst: int) -> bool:
        """Does group src (transitively) depend on group dst?"""
        stack, seen = [src], set()
        while stack:
            g = stack.pop()
            if g == dst:
                return True
            if g in seen:
                continue
            seen.add(g)
            stack.extend(deps.get(g, ()))
        return False

    def can_join(n: Node, kind: str, g: KernelGroup) -> bool:
        if g.kind in (GroupKind.ATTENTION, GroupKind.RECURRENT, GroupKind.FALLBACK):
            return False
        if kind == GroupKind.INJECTIVE:
            pass  # joins injective, compute (epilogue) and reduction groups alike
        elif kind == GroupKind.REDUCTION:
            if g.kind != GroupKind.INJECTIVE:
                return False  # one anchor per group
        else:
            return False  # compute anchors start their own group
        others = {group_of[producer[v]].id for v in n.inputs
                  if v is not None and v in producer and group_of[producer[v]] is not g}
        return not any(reaches(o, g.id) for o in others)

    for n in graph.nodes:
        kind = _node_kind(n)
        target = None
        if kind in (GroupKind.INJECTIVE, GroupKind.REDUCTION) and \
                not _layout_change_for_consumers(n, readers, returned):
            for v in n.inputs:
                p = producer.get(v) if v is not None else None
                if p is not None and can_join(n, kind, group_of[p]):
                    target = group_of[p]
                    break
        if target is None:
            target = KernelGroup(len(groups), kind)
            groups.append(target)
            deps[target.id] = set()
        elif kind == GroupKind.REDUCTION:
            target.kind = GroupKind.REDUCTION
        target.nodes.append(n)
        group_of[n] = target
        for v in n.inputs:
            if v is not None and v in producer and group_of[producer[v]] is not target:
                deps[target.id].add(group_of[producer[v]].id)

    # group inputs/outputs
    used_outside: set[Value] = set(graph.outputs)
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None and v in producer and group_of[producer[v]] is not group_of[n]:
                used_outside.add(v)
    for g in groups:
        inside = {o for n in g.nodes for o in n.outputs}
        seen: set[Value] = set()
        for n in g.nodes:
            for v in n.inputs:
                if v is not None and v not in inside and v not in seen:
                    seen.add(v)
                    g.inputs.append(v)
        g.outputs = [o for n in g.nodes for o in n.outputs if o in used_outside]
    # groups are in a valid execution order only if every group's deps come earlier
    order = _topo_order(groups, deps)
    return Partition(graph, [groups[i] for i in order])


def subgroup(graph: Graph, group: KernelGroup, nodes: list[Node], kind: str = GroupKind.INJECTIVE) -> KernelGroup:
    """A kernel group of ``nodes`` (part of ``group``, e.g. a compute group's epilogue, or a
    tail joined to it), under ``group``'s id: its inputs and outputs recomputed (an output is
    a value read by a node outside ``nodes`` or returned)."""
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


def _topo_order(groups, deps) -> list[int]:
    state: dict[int, int] = {}
    order: list[int] = []

    def visit(i):
        s = state.get(i, 0)
        if s == 2:
            return
        if s == 1:
            raise RuntimeError("partition produced a cycle between kernel groups")
        state[i] = 1
        for d in sorted(deps[i]):
            visit(d)
        state[i] = 2
        order.append(i)

    for g in groups:
        visit(g.id)
    return order


def verify_partition(p: Partition) -> None:
    """Every node in exactly one group; groups execute in order; one anchor per group."""
    seen = [n for g in p.groups for n in g.nodes]
    if len(seen) != len(p.graph.nodes) or set(seen) != set(p.graph.nodes):
        raise AssertionError("partition does not cover every node exactly once")
    available = set(p.graph.inputs) | set(p.graph.constants)
    for g in p.groups:
        for v in g.inputs:
            if v not in available:
                raise AssertionError(f"{g!r} reads {v!r} before it is produced")
        for n in g.nodes:
            available.update(n.outputs)
        anchors = [n for n in g.nodes if _node_kind(n) != GroupKind.INJECTIVE]
        if len(anchors) > 1:
            raise AssertionError(f"{g!r} has {len(anchors)} anchors")
    missing = [v for v in p.graph.outputs if v not in available]
    if missing:
        raise AssertionError(f"graph outputs never produced: {missing}")
