"""Plans rebuilt from recorded decisions: what ``kiln.load`` runs, with no measuring and no
code generation.

A saved CPU plan is its optimized graph, the kernel each node ran in (``Plan.node_kernels``),
the kernel groups it was built over (node indices per group, in execution order) and the
generated group kernels as exported TVM modules. ``restore_plan`` hands these to
``runtime.plan.build_plan`` as recorded choices — the same path the compile cache takes —
with a ``generate(group)`` that loads the shipped module instead of generating code.

Portability. A recorded kernel may not be available where the artifact is loaded: a library
kernel that needs CPU features this target lacks (``Kernel.requires``), one this host's
build or CPU does not accept, one this Kiln no longer has, or a generated kernel whose
module was built for a CPU with features this one lacks. ``unavailable`` names each; with
``strict`` that is an error, otherwise those nodes are chosen again among the kernels that
run here (by measurement, on this machine) and the rest keep their recorded kernels.
"""
from __future__ import annotations

from kiln.errors import KilnError
from kiln.ir import Graph
from kiln.kernels.registry import all_kernels, candidates, kernel_named
from kiln.passes.partition import KernelGroup, Partition, subgroup
from kiln.ir.record import record
from kiln.target import Target

from .by_size import member_kernels
from .generated import KERNEL_PREFIX
from .plan import Plan, build_plan


@record(slots=False)
class ShippedKernel:
    """A generated group kernel as an exported module on disk (verified by the caller)."""

    name: str  # KERNEL_PREFIX + the group's signature hash
    path: str  # the shared library
    config: dict  # its schedule configuration
    threads: int  # the parallel loops it was built for


@record(slots=False)
class Unavailable:
    """A recorded kernel that cannot run here, and why."""
    node: int  # index in graph.nodes
    label: str  # the node's op and scope
    kernel: str  # the recorded kernel
    why: str


def groups_of(partition) -> list[list]:
    """A partition as JSON-able records: ``[kind, group id, [node indices]]`` in execution order."""
    if partition is None:
        return None
    index = {n: i for i, n in enumerate(partition.graph.nodes)}
    return [[g.kind, g.id, [index[n] for n in g.nodes]] for g in partition.groups]


def partition_from(graph: Graph, records) -> Partition:
    """The partition ``groups_of`` recorded; each group's inputs and outputs recomputed by the
    rule the partition itself uses (so a group's signature, and its module's calling
    convention, come out the same). Raises ``KilnError`` when the records do not cover the
    graph's nodes exactly once."""
    nodes = graph.nodes
    groups, seen = [], set()
    try:
        for kind, gid, idx in records:
            members = [nodes[i] for i in idx]
            seen.update(idx)
            groups.append(subgroup(graph, KernelGroup(int(gid), str(kind)), members, str(kind)))
    except (IndexError, TypeError, ValueError) as e:
        raise KilnError(f"the recorded kernel groups do not fit the graph: {e}") from None
    if seen != set(range(len(nodes))) or sum(len(g.nodes) for g in groups) != len(nodes):
        raise KilnError("the recorded kernel groups do not cover the graph's nodes exactly once")
    return Partition(graph, groups)


def _label(node) -> str:
    return node.op.value + (f" ({node.scope})" if node.scope else "")


def unportable_kernels(target: Target) -> frozenset[str]:
    """Library kernels that need a CPU feature ``target`` lacks."""
    return frozenset(k.name for k in all_kernels() if not k.runs_on(target.features))


def unavailable(graph: Graph, node_kernels: list[str], target: Target, generated_ok: bool,
                exclude: frozenset[str] = frozenset()) -> list[Unavailable]:
    """Every node whose recorded kernel cannot run on ``target`` here, and why."""
    out = []
    for i, (n, recorded) in enumerate(zip(graph.nodes, node_kernels)):
        try:
            names = member_kernels(recorded)
        except ValueError as e:
            out.append(Unavailable(i, _label(n), recorded, str(e)))
            continue
        for name in names:
            why = _why_unavailable(n, name, target, generated_ok, exclude)
            if why is not None:
                out.append(Unavailable(i, _label(n), name, why))
                break
    return out


def _why_unavailable(n, name: str, target: Target, generated_ok: bool, exclude: frozenset) -> str | None:
    """Why kernel ``name`` cannot run node ``n`` on ``target`` here (None: it can)."""
    if name.startswith(KERNEL_PREFIX):
        return None if generated_ok else "its generated module cannot load here"
    k = kernel_named(name)
    if k is None:
        return "this Kiln has no kernel of that name"
    if k.target == "reference":
        return None
    if not k.runs_on(target.features):
        return f"it needs CPU features {', '.join(sorted(k.requires - target.features))}"
    if name in exclude:
        return "it is excluded"
    if k not in candidates(n, target.kind):
        return "this machine's build or CPU does not accept it"
    return None


def _shipped_generator(graph: Graph, shipped: dict[str, ShippedKernel], target: Target, rebuild: bool):
    """``generate(group)``: the shipped module for ``group`` (or, with ``rebuild``, the module
    built again from the group with its recorded configuration)."""
    from kiln.codegen.tvm import signature_hash
    from kiln.codegen.tvm_runtime import GeneratedKernel, load_module

    def generate(group):
        name = KERNEL_PREFIX + signature_hash(group)
        k = shipped.get(name)
        if k is None:
            raise KilnError(f"the artifact records generated kernel {name} but does not hold it")
        if rebuild:
            from .module_cache import compiled

            fn, built = compiled(group, k.config, target, k.threads)
        else:
            fn, built = load_module(k.path), False
        return GeneratedKernel(fn, group, name, k.config, built, threads=k.threads)

    return generate


def restore_plan(graph: Graph, target: Target, node_kernels: list[str], groups, shipped: dict | None, *,
                 strict: bool = False, rebuild: bool = False, exclude: frozenset[str] = frozenset(),
                 sizes: dict | None = None, batch_chunk: int | None = 0) -> tuple[Plan, list[Unavailable]]:
    """The plan the recorded choices describe, and the nodes whose kernels were chosen again.

    ``groups``: ``groups_of``'s records (None: the plan ran no generated kernels);
    ``shipped``: generated kernel name -> ``ShippedKernel`` (None: they cannot load here).
    With ``strict`` a kernel that cannot run here raises ``KilnError`` instead. ``sizes``: a
    symbolic graph's example sizes (a kernel chosen again is measured at them);
    ``batch_chunk``: the compile's setting (``runtime.chunks``).
    """
    if len(node_kernels) != len(graph.nodes):
        raise KilnError(f"the plan records {len(node_kernels)} kernel choices for {len(graph.nodes)} nodes")
    generated_ok = shipped is not None
    exclude = frozenset(exclude) | unportable_kernels(target)
    missing = unavailable(graph, node_kernels, target, generated_ok, exclude)
    if missing and strict:
        lines = "; ".join(f"{u.label}: {u.kernel} ({u.why})" for u in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise KilnError(f"{len(missing)} recorded kernel(s) cannot run on {target}: {lines}{more} "
                        f"(strict=True; without it they are chosen again here)")
    partition = partition_from(graph, groups) if groups is not None else None
    generate = None
    if partition is not None:
        if generated_ok and any(k.startswith(KERNEL_PREFIX) for k in node_kernels):
            generate = _shipped_generator(graph, shipped, target, rebuild)
        else:  # the groups still set the execution order; their kernels run node by node
            def generate(group):
                return None
    plan = build_plan(graph, target, kernel_choices=list(node_kernels), partition=partition, generate=generate,
                      exclude=exclude, sizes=sizes, batch_chunk=batch_chunk)
    return plan, missing
