"""The compile driver: import -> pass pipeline -> partition -> plan, for one set of inputs.

This is the only module that imports frontends, passes, kernels, codegen and runtime
together. It owns the caches that span them (the import cache: torch.export skipped on a
verified hit; the compile cache: kernel choices reused) and the measuring interface the
quantization and sparsity passes time layers through. Everything it decides comes back in a
``CompileReport``.
"""
from __future__ import annotations

import time
from dataclasses import field

import torch
import torch.utils._pytree as pytree

from .errors import KilnError
from .options import CompileOptions
from kiln.ir.record import record
from .report import CompileReport


@record(frozen=False, slots=False)
class Imported:
    """A model imported for one set of inputs."""

    graph: object  # kiln.ir.Graph
    out_spec: object = None  # the output pytree structure (None: ONNX, a tuple of outputs)
    out_literals: dict = field(default_factory=dict)  # output leaves that are constants, by position
    fallbacks: list = field(default_factory=list)  # (aten op, scope, why)
    input_names: list = field(default_factory=list)
    cache_hit: bool = False
    seconds: float = 0.0
    size_limits: dict = field(default_factory=dict)  # size name -> (min, max) the model or the import imposed


@record(frozen=False, slots=False)
class Compiled:
    """One specialization: a plan for one set of input shapes."""

    plan: object  # kiln.runtime.plan.Plan
    graph: object  # the optimized graph
    out_spec: object
    out_literals: dict
    input_names: list
    report: CompileReport
    size_limits: dict = field(default_factory=dict)  # size name -> (min, max) the plan serves (None: as asked)
    partition: object = None  # the kernel groups the plan was built over (kiln.save records them)


# ----------------------------------------------------------------------------- import
def import_torch(module: torch.nn.Module, args: tuple, kwargs: dict, leaves: list, name: str,
                 dynamic=None) -> Imported:
    """torch.export + conversion, or a verified entry of the import cache. ``dynamic`` (a
    ``kiln.dynamic.DynamicSpec``): the dims that vary per call become symbolic."""
    from . import import_cache
    from kiln.frontends.hf_outputs import register_output_pytrees
    from kiln.runtime import cache

    t0 = time.perf_counter()
    register_output_pytrees(module)  # before the import cache reads an output structure holding a cache
    dims, dynamic_shapes = None, None
    if dynamic is not None:
        from .dynamic import export_arguments

        args, kwargs, dynamic_shapes = export_arguments(module, args, kwargs, dynamic)
        dims = dynamic.by_position()
    key = import_cache.fingerprint(module, args, kwargs, "" if dynamic is None else repr(dynamic.dims)) \
        if cache.enabled() else None
    # a dynamic import traces (and checks a hit) on the widened examples (export_arguments)
    checked = leaves if dynamic is None else pytree.tree_leaves((args, kwargs))
    hit = import_cache.load(key, module, args, kwargs, checked) if key else None
    if hit is not None:
        graph, out_spec, literals, fallbacks, names, limits = hit
        return Imported(graph, out_spec, literals, fallbacks, names, True, time.perf_counter() - t0, limits)
    # only on a miss: importing the exporter and the ATen converters (which registers
    # kiln's custom RNN ops) is a visible share of a warm compile
    from kiln.frontends.torch_export import export_program, from_exported

    try:
        ep = export_program(module, args, kwargs, dynamic_shapes)
    except KilnError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise KilnError(f"torch.export could not trace {name}: {type(e).__name__}: {first}") from e
    limits: dict = {}
    if dynamic is not None:  # the ranges the model itself narrowed (a position table of 512 rows)
        from .dynamic import exported_limits

        limits = exported_limits(ep, dynamic)
    size_max = None if dynamic is None else {d.name: limits.get(d.name, (None, d.max))[1] for d in dynamic.dims}
    imp = from_exported(ep, name, dims, size_max)
    limits.update({n: (None, m) for n, m in imp.implied_max.items()})
    names = _input_names(ep, leaves)
    if key:
        import_cache.store(key, module, imp.graph, imp.out_spec, imp.out_literals, imp.fallbacks, names, limits)
    return Imported(imp.graph, imp.out_spec, imp.out_literals, list(imp.fallbacks), names, False,
                    time.perf_counter() - t0, limits)


def import_onnx(model, tensors: list, dynamic=None) -> Imported:
    """``dynamic`` (a ``kiln.dynamic.DynamicSpec``): the dims that vary per call become symbolic."""
    from kiln.frontends.onnx_import import from_onnx

    t0 = time.perf_counter()
    dims = dynamic.by_position() if dynamic is not None else None
    size_max = {d.name: d.max for d in dynamic.dims} if dynamic is not None else None
    limits: dict = {}
    graph = from_onnx(model, tensors, dims=dims, size_max=size_max, limits=limits)
    return Imported(graph, input_names=[v.name for v in graph.inputs], seconds=time.perf_counter() - t0,
                    size_limits={n: (None, m) for n, m in limits.items()})


def _input_names(ep, leaves) -> list[str]:
    from torch.export.graph_signature import InputKind

    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind is InputKind.USER_INPUT]
    return names if len(names) == len(leaves) else [f"input{i}" for i in range(len(leaves))]


def check_options(options: CompileOptions) -> None:
    """What ``CompileOptions.parse`` cannot check alone: pass names are the pipeline's."""
    from kiln.passes.pipeline import check_selection

    check_selection(options.passes)


# ----------------------------------------------------------------------------- compile
def compile_imported(imp: Imported, options: CompileOptions, name: str, hints: dict | None = None) -> Compiled:
    """Run the pipeline on an imported graph and build its plan. ``hints``: the example value
    of each symbolic size (a dynamic graph's kernels are chosen at those sizes)."""
    from kiln.ir import structural_hash, verify
    from kiln.passes.pipeline import run_pipeline
    from kiln.runtime import cache
    from kiln.runtime.measuring import PlanMeasurer

    target = options.resolved_target()
    graph = imp.graph
    verify(graph)
    t0 = time.perf_counter()
    # The cache holds the compile's decisions (kernel choices), keyed by the graph's
    # structure and shapes. The pipeline itself is cheap and deterministic: it reruns, and
    # its result must hash to what the entry recorded.
    key = cache.make_key(structural_hash(graph, include_constants=False), target,
                         {**options.key(), "threads": torch.get_num_threads()}) if cache.enabled() else None
    measurer = PlanMeasurer(target.kind, hints)
    try:
        result = run_pipeline(graph, options, measure=measurer)
    except ValueError as e:
        raise KilnError(str(e)) from None
    sparse = result.decisions.sparsity
    if options.sparse == "auto" and any(d.format != "dense" for d in sparse) and \
            all(v.type.is_static for v in graph.inputs):
        result = _guard_sparse(graph, result, options, measurer)
    passes_s = time.perf_counter() - t0
    optimized_hash = structural_hash(result.graph, include_constants=False)
    hit = cache.load(key) if key and not options.remeasure else None
    if hit is not None and (hit.get("optimized") != optimized_hash or
                            len(hit.get("kernels", ())) != len(result.graph.nodes)):
        hit = None  # recorded for a different optimized graph: rebuild, never trust
    _check_memory(result.graph)
    t1 = time.perf_counter()
    buckets = None
    if hints and target.kind == "cpu":
        from kiln.runtime.by_size import representative_sizes, varied_size

        buckets = representative_sizes(hints, imp.size_limits, options.size_buckets, varied_size(result.graph, hints))
    with _choice_policy(options):
        plan = _build_plan(result, options, target, hit, hints, buckets)
        accuracy, drop = _check_approximate(plan, result, buckets or [hints]) \
            if hit is None and target.kind == "cpu" else ("", None)
        if drop:  # the plan (and its packed weights) goes before the one without them is built
            plan = None
            plan = _build_plan(result, options.replace(exclude_kernels=frozenset(options.exclude_kernels) | set(drop)),
                               target, None, hints, buckets)
    plan_s = time.perf_counter() - t1
    node_kernels = plan.node_kernels
    if key and hit is None and target.kind == "cpu":  # cuda plans are not built from recorded choices
        cache.store(key, {"optimized": optimized_hash, "kernels": node_kernels})
    if target.kind == "cpu":
        # what measuring the candidates held is not what serving needs: give the pool's cached
        # blocks back, and bound it by what the plan's calls hold from here on
        from kiln.kernels.allocator import empty_cache

        empty_cache()
    report = CompileReport(
        model=name, target=str(target), options=options,
        input_shapes=tuple(tuple(v.type.shape) for v in graph.inputs),
        fallbacks=list(imp.fallbacks), kernels=dict(plan.kernel_names),
        node_kernels=[(_label(n), k) for n, k in zip(result.graph.nodes, node_kernels)],
        quantization=list(result.decisions.quantization), sparsity=list(result.decisions.sparsity),
        passes=list(result.records),
        seconds={"import": imp.seconds, "passes": passes_s, "plan": plan_s,
                 "codegen": plan.codegen_seconds, "total": imp.seconds + passes_s + plan_s},
        import_cache_hit=imp.cache_hit, compile_cache_hit=hit is not None, memory=plan.memory,
        graph_nodes=len(result.graph.nodes), accuracy=accuracy, batch_chunks=plan.chunking)
    return Compiled(plan, result.graph, imp.out_spec, imp.out_literals, imp.input_names, report, imp.size_limits,
                    result.partition)


def _label(node) -> str:
    return f"{node.op.value}" + (f" ({node.scope})" if node.scope else "")


def _choice_policy(options: CompileOptions):
    """``remeasure``: every kernel choice measured afresh, not taken from a memo or cache."""
    import contextlib

    from kiln.kernels.choice import remeasuring

    return remeasuring() if options.remeasure else contextlib.nullcontext()


def _build_plan(result, options: CompileOptions, target, hit, hints=None, buckets=None):
    from kiln.runtime.plan import build_plan

    if target.kind == "cuda":  # Triton / CUDA C kernels, built ahead of time for the target SM
        from kiln.runtime.cuda_steps import build_gpu_plan

        return build_gpu_plan(result.graph, result.partition, target, tune=options.tune_budget)
    generate = _generator(result.graph, target, options.tune_budget, hints) \
        if options.codegen and target.kind == "cpu" else None
    return build_plan(result.graph, target.kind, kernel_choices=hit["kernels"] if hit else None,
                      partition=result.partition, generate=generate, exclude=options.exclude_kernels, sizes=hints,
                      buckets=buckets, batch_chunk=options.batch_chunk)


def _check_approximate(plan, result, sizes: list) -> tuple[str, tuple]:
    """(what the check found, the kernels to build the plan again without: empty to keep it)
    -- runtime/accuracy_guard.py: a plan that uses approximate kernels must agree with the
    reference kernels end to end (a dynamic plan's at each representative size in ``sizes``,
    where its size buckets may run different kernels)."""
    from kiln.kernels.registry import all_kernels
    from kiln.runtime.accuracy_guard import bound_for, worst_relative_error
    from kiln.runtime.by_size import member_kernels
    from kiln.runtime.plan import build_plan

    every = tuple(sorted(k.name for k in all_kernels() if k.approximate))
    used = {m for k in plan.node_kernels for m in member_kernels(k)}
    uses = ", ".join(k for k in every if k in used)
    if not uses:
        return "", ()
    try:
        reference = build_plan(result.graph, "reference")
        rel = max(worst_relative_error(plan, reference, s) for s in sizes)
        found = f"the whole model was {rel:.1e} of its output's scale from the reference kernels with them"
    except Exception as e:  # noqa: BLE001  (unverifiable: the approximate kernels are not kept)
        rel, found = float("inf"), f"the end-to-end check could not run ({type(e).__name__}: {e})"
    bound = bound_for(result.graph)
    if rel <= bound:
        return f"{uses}: whole model within {rel:.1e} of the reference kernels (bound {bound:.0e})", ()
    return f"{uses} not used: {found} (bound {bound:.0e})", every


def _guard_sparse(graph, result, options: CompileOptions, measurer):
    """Keep the sparse graph only if its plan beats the dense plan end to end (runtime/sparse_guard.py)."""
    from kiln.passes.pipeline import run_pipeline
    from kiln.runtime.plan import build_plan
    from kiln.runtime.sparse_guard import sparse_plan_wins

    kind = options.resolved_target().kind
    dense = run_pipeline(graph, options.replace(sparse="off"), measure=measurer)
    wins, dense_ms, sparse_ms = sparse_plan_wins(build_plan(result.graph, kind), build_plan(dense.graph, kind))
    for d in result.decisions.sparsity:
        if d.format != "dense":
            d.reason += (f"; whole model {dense_ms / sparse_ms:.2f}x" if wins else
                         f"; reverted to dense: the whole model ran {sparse_ms:.3f} ms sparse vs {dense_ms:.3f} ms dense")
            if not wins:
                d.format = "dense"
    if wins:
        return result
    dense.decisions.sparsity = result.decisions.sparsity  # what was tried, and why it was reverted
    dense.decisions.quantization = result.decisions.quantization
    return dense


def _generator(graph, target, tune, sizes: dict | None = None):
    """``generate(group)``: the group's generated kernel (tuned within ``tune``), or None when
    the TensorIR renderer does not cover it or code generation fails (per-node kernels run).
    A group of symbolic shapes gets one kernel for every size, tuned at ``sizes``."""
    from kiln.codegen.tvm import unsupported_reason
    from kiln.ir import Category, opdef
    from kiln.runtime.generated import generated_kernel

    def generate(group):
        if len(group.nodes) == 1 and opdef(group.nodes[0].op).category is Category.MOVEMENT:
            return None  # a lone view or copy: torch does it in one pass already, nothing to fuse
        if unsupported_reason(group) is not None:
            return None
        try:
            static = all(v is None or v.type.is_static for n in group.nodes for v in (*n.inputs, *n.outputs))
            return generated_kernel(group, graph, target, torch.get_num_threads(), tune,
                                    sizes=None if static else sizes)
        except Exception:  # noqa: BLE001  (a group that fails to generate runs node by node)
            return None

    return generate


# ----------------------------------------------------------------------------- memory
def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def _check_memory(graph) -> None:
    """Refuse, before any allocation (or kernel measurement), a plan whose buffers cannot fit in memory."""
    from kiln.runtime.buffers import graph_memory

    stats = graph_memory(graph)
    weights = sum(t.numel() * t.element_size() for t in graph.constants.values())
    io = sum(v.type.nbytes() for v in graph.inputs if v.type.is_static)
    need = stats.peak_bytes + io
    have = available_memory()
    if need > have:
        raise KilnError(f"{graph.name} needs {need / 2**30:.1f} GiB for inputs and intermediate buffers "
                        f"(plus {weights / 2**30:.1f} GiB of weights); only {have / 2**30:.1f} GiB is available")
    return stats


def compile_graph(graph, options: CompileOptions | None = None) -> Compiled:
    """Compile a Kiln IR graph (already imported) with ``options``."""
    options = CompileOptions.parse(options)
    check_options(options)
    return compile_imported(Imported(graph, input_names=[v.name for v in graph.inputs]), options, graph.name)
