"""From an imported graph to an executable plan: verify, run the pass pipeline (or take
the result from the compile cache), plan."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from kiln.errors import KilnError
from kiln.ir import Graph, verify
from kiln.target import Target

from . import cache
from .plan import Plan, build_plan


@dataclass
class CompileFacts:
    """What a compile decided beside the plan (plans carry only what their builder made);
    kiln.driver's CompileReport takes these over."""

    partition: object = None  # kiln.passes.partition.Partition, when the pipeline ran
    pass_records: list = field(default_factory=list)
    cache_hit: bool = False
    sparsity: list = field(default_factory=list)  # passes.sparsity.SparseDecision per layer considered


OPTIONS = {"passes", "precision", "sparse", "tune", "codegen", "exclude_kernels"}
# exclude_kernels: names of per-op kernels (as ``plan.kernel_names`` spells them) never to
# use, e.g. to compare a model with and without one candidate (`python -m kiln.bench.pass_ab
# --kernel NAME`); the reference kernel cannot be excluded (it is every op's fallback), and
# generated group kernels are turned off with codegen=False instead.
# tune: how long generated kernels may autotune ("none" | "fast" | "max" | seconds per kernel
# group); codegen: whether kernel groups may run as generated (TVM) kernels at all.
# The default is "none": the schedule template's default configuration (or the tuning
# database's winner when an earlier compile tuned the group). A cold compile already pays
# for importing TVM and building one module per distinct group; "fast" adds up to 8
# builds and measurements per group, about as much again, for kernels that are memory-bound
# and gain little from tuning. Users who compile once and run long ask for "fast" or "max".
PRECISIONS = ("fp32", "bf16")
# Sparse weights are compressed only where measurement shows the sparse kernel faster
# (passes/sparsity.py), so "auto" is safe as the default: dense models pay a zero count.
DEFAULT_SPARSE = "auto"
# quantization (passes/quantize*.py): scheme, calibration batches (lists of graph inputs),
# observer, int4 group size, SQNR floor, whether to time layers, a list receiving decisions
QUANTIZE_OPTIONS = {"calibration", "observer", "group_size", "min_sqnr", "quantize_payoff", "quantize_report"}
OPTIONS |= {"quantize"} | QUANTIZE_OPTIONS
QUANTIZE = ("none", "int8-dynamic", "int8-static", "int8-weight", "int4-weight")


def compile_graph(graph: Graph, target: "str | Target" = "cpu", passes=None, precision: str = "fp32",
                  sparse: str = DEFAULT_SPARSE, tune=None, codegen: bool = True,
                  **options) -> tuple[Plan, Graph, CompileFacts]:
    from kiln.options import DEFAULT_TUNE

    target = Target.parse(target)
    tune = DEFAULT_TUNE[target.kind] if tune is None else tune
    unknown = set(options) - OPTIONS
    if unknown:
        raise KilnError(f"unknown kiln.compile option(s): {', '.join(sorted(unknown))}")
    excluded = options.get("exclude_kernels") or ()
    if isinstance(excluded, str) or not all(isinstance(k, str) for k in excluded):
        raise KilnError("exclude_kernels must be a list of kernel names, e.g. ['cpu.amx_linear']")
    if precision not in PRECISIONS:
        raise KilnError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    from kiln.codegen.autotune import Budget

    Budget.parse(tune)  # a bad value fails here, before any work
    pipeline_options = {"precision": precision, **_quantize_options(options, target)}
    from kiln.ir import structural_hash
    from kiln.passes.pipeline import run_pipeline
    from kiln.passes.sparsity import parse_mode

    try:
        parse_mode(sparse)
    except ValueError as e:
        raise KilnError(str(e)) from None

    verify(graph)
    if isinstance(passes, str):
        passes = [] if passes == "none" else None if passes == "all" else [passes]
    # The cache holds the compile's decisions (kernel choices now; tuning results as they
    # land), keyed by the graph's structure and shapes. The pipeline itself is cheap and
    # deterministic: it reruns, and its result must hash to what the entry recorded.
    key = cache.make_key(structural_hash(graph, include_constants=False), target,
                         {"passes": passes, "precision": precision, "threads": torch.get_num_threads(),
                          "sparse": sparse, "tune": tune, "codegen": codegen,
                          **{k: v for k, v in options.items()
                             if k not in ("calibration", "quantize_report")}}) \
        if cache.enabled() else None
    from kiln.kernels.sparse import measure

    sparse_log: list = []
    try:
        result = run_pipeline(graph, select=passes, verify_each=os.environ.get("KILN_VERIFY") == "1",
                              options={**pipeline_options, "sparse": sparse, "sparse_measure": measure,
                                       "sparse_log": sparse_log, "target": target.kind})
    except ValueError as e:
        raise KilnError(str(e)) from None
    if sparse == "auto" and any(d.format != "dense" for d in sparse_log) and all(v.type.is_static for v in graph.inputs):
        result = _guard_sparse(graph, result, passes, pipeline_options, target, sparse_log)
    optimized_hash = structural_hash(result.graph, include_constants=False)
    hit = cache.load(key) if key else None
    if hit is not None and (hit.get("optimized") != optimized_hash or
                            len(hit.get("kernels", ())) != len(result.graph.nodes)):
        hit = None  # recorded for a different optimized graph: rebuild, never trust
    _check_memory(result.graph)
    if target.kind == "cuda":  # Triton / CUDA C kernels, built ahead of time for the target SM
        from .cuda_steps import build_gpu_plan

        plan = build_gpu_plan(result.graph, result.partition, target, tune=tune)
        return plan, result.graph, CompileFacts(result.partition, result.records, False, sparse_log)
    generate = _generator(result.graph, target, tune) if codegen and target.kind == "cpu" else None
    plan = build_plan(result.graph, target.kind, kernel_choices=hit["kernels"] if hit else None,
                      partition=result.partition, generate=generate,
                      exclude=frozenset(options.get("exclude_kernels") or ()))
    if key and hit is None:
        cache.store(key, {"optimized": optimized_hash, "kernels": plan.node_kernels})
    return plan, result.graph, CompileFacts(result.partition, result.records, hit is not None, sparse_log)


def _guard_sparse(graph, result, passes, pipeline_options, target, sparse_log):
    """Keep the sparse graph only if its plan beats the dense plan end to end (runtime/sparse_guard.py)."""
    from kiln.passes.pipeline import run_pipeline

    from .sparse_guard import sparse_plan_wins

    dense = run_pipeline(graph, select=passes, options={**pipeline_options, "sparse": "off", "target": target.kind})
    wins, dense_ms, sparse_ms = sparse_plan_wins(build_plan(result.graph, target.kind), build_plan(dense.graph, target.kind))
    for d in sparse_log:
        if d.format != "dense":
            d.reason += (f"; whole model {dense_ms / sparse_ms:.2f}x" if wins else
                         f"; reverted to dense: the whole model ran {sparse_ms:.3f} ms sparse vs {dense_ms:.3f} ms dense")
            if not wins:
                d.format = "dense"
    return result if wins else dense


def _generator(graph: Graph, target: Target, tune):
    """``generate(group)``: the group's generated kernel (tuned within ``tune``), or None when
    the TensorIR renderer does not cover it or code generation fails (per-node kernels run)."""
    from kiln.codegen.tvm import supports
    from kiln.kernels.generated import generated_kernel

    from kiln.ir import Category, opdef

    def generate(group):
        if len(group.nodes) == 1 and opdef(group.nodes[0].op).category is Category.MOVEMENT:
            return None  # a lone view or copy: torch does it in one pass already, nothing to fuse
        if supports(group) is not None:
            return None
        try:
            return generated_kernel(group, graph, target, torch.get_num_threads(), tune)
        except Exception:  # noqa: BLE001  (a group that fails to generate runs node by node)
            return None

    return generate


def check_quantize_options(options: dict) -> str:
    """Validate the quantization options (before any tracing); return the scheme."""
    scheme = options.get("quantize") or "none"
    if scheme not in QUANTIZE:
        raise KilnError(f"quantize must be one of {', '.join(QUANTIZE)}, got {scheme!r}")
    if scheme == "none":
        extra = sorted(k for k in options if k in QUANTIZE_OPTIONS and options[k] is not None)
        if extra:
            raise KilnError(f"option(s) {', '.join(extra)} need quantize=...")
        return scheme
    from kiln.passes.calibrate import OBSERVERS

    if scheme == "int8-static" and not options.get("calibration"):
        raise KilnError("quantize='int8-static' needs calibration=[inputs, ...] (a few representative batches)")
    if scheme != "int8-static" and options.get("observer") is not None:
        raise KilnError(f"observer= applies to quantize='int8-static', not {scheme!r}")
    if (options.get("observer") or "minmax") not in OBSERVERS:
        raise KilnError(f"observer must be one of {', '.join(OBSERVERS)}, got {options['observer']!r}")
    if options.get("group_size") is not None and (scheme != "int4-weight" or options["group_size"] not in (32, 64, 128)):
        raise KilnError("group_size (32, 64 or 128) applies to quantize='int4-weight' only")
    return scheme


def _quantize_options(options: dict, target) -> dict:
    if check_quantize_options(options) == "none":
        return {}
    from .quant_exec import QuantExecutor

    out = {k: v for k, v in options.items() if k != "passes"}
    out["quant_executor"] = QuantExecutor(target.kind)
    return out


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def _check_memory(graph: Graph):
    """Refuse, before any allocation, a plan whose buffers cannot fit in memory; return what they need."""
    from .buffers import graph_memory

    stats = graph_memory(graph)
    weights = sum(t.numel() * t.element_size() for t in graph.constants.values())
    io = sum(v.type.nbytes() for v in graph.inputs if v.type.is_static)
    need = stats.peak_bytes + io
    have = available_memory()
    if need > have:
        raise KilnError(f"{graph.name} needs {need / 2**30:.1f} GiB for inputs and intermediate buffers "
                        f"(plus {weights / 2**30:.1f} GiB of weights); only {have / 2**30:.1f} GiB is available")
    return stats
