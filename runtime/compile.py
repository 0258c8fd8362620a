"""From an imported graph to an executable plan: verify, run the pass pipeline (or take
the result from the compile cache), plan."""
from __future__ import annotations

import os

import torch

from kiln.errors import KilnError
from kiln.ir import Graph, verify
from kiln.target import Target

from . import cache
from .plan import Plan, build_plan

OPTIONS = {"passes", "precision"}
PRECISIONS = ("fp32", "bf16")
# quantization (passes/quantize*.py): scheme, calibration batches (lists of graph inputs),
# observer, int4 group size, SQNR floor, whether to time layers, a list receiving decisions
QUANTIZE_OPTIONS = {"calibration", "observer", "group_size", "min_sqnr", "quantize_payoff", "quantize_report"}
OPTIONS |= {"quantize"} | QUANTIZE_OPTIONS
QUANTIZE = ("none", "int8-dynamic", "int8-static", "int8-weight", "int4-weight")


def compile_graph(graph: Graph, target: "str | Target" = "cpu", passes=None, precision: str = "fp32",
                  **options) -> tuple[Plan, Graph]:
    target = Target.parse(target)
    unknown = set(options) - OPTIONS
    if unknown:
        raise KilnError(f"unknown kiln.compile option(s): {', '.join(sorted(unknown))}")
    if precision not in PRECISIONS:
        raise KilnError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    pipeline_options = {"precision": precision, **_quantize_options(options, target)}
    from kiln.ir import structural_hash
    from kiln.passes.pipeline import run_pipeline

    verify(graph)
    if isinstance(passes, str):
        passes = [] if passes == "none" else None if passes == "all" else [passes]
    # The cache holds the compile's decisions (kernel choices now; tuning results as they
    # land), keyed by the graph's structure and shapes. The pipeline itself is cheap and
    # deterministic: it reruns, and its result must hash to what the entry recorded.
    key = cache.make_key(structural_hash(graph, include_constants=False), target,
                         {"passes": passes, "precision": precision, "threads": torch.get_num_threads(),
                          **{k: v for k, v in options.items()
                             if k not in ("calibration", "quantize_report")}}) \
        if cache.enabled() else None
    try:
        result = run_pipeline(graph, select=passes, verify_each=os.environ.get("KILN_VERIFY") == "1",
                              options=pipeline_options)
    except ValueError as e:
        raise KilnError(str(e)) from None
    optimized_hash = structural_hash(result.graph, include_constants=False)
    hit = cache.load(key) if key else None
    if hit is not None and (hit.get("optimized") != optimized_hash or
                            len(hit.get("kernels", ())) != len(result.graph.nodes)):
        hit = None  # recorded for a different optimized graph: rebuild, never trust
    memory = _check_memory(result.graph)
    plan = build_plan(result.graph, target.kind, kernel_choices=hit["kernels"] if hit else None, memory=memory)
    plan.partition = result.partition
    plan.pass_records = result.records
    plan.cache_hit = hit is not None
    if key and hit is None:
        cache.store(key, {"optimized": optimized_hash, "kernels": [s.kernel for s in plan.steps]})
    return plan, result.graph


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
    """Refuse, before any allocation, a plan whose buffers cannot fit in memory; return the memory plan."""
    from .plan import plan_memory

    stats = plan_memory(graph)
    weights = sum(t.numel() * t.element_size() for t in graph.constants.values())
    io = sum(v.type.nbytes() for v in graph.inputs if v.type.is_static)
    need = (stats.arena_bytes if stats else 0) + io
    have = available_memory()
    if need > have:
        raise KilnError(f"{graph.name} needs {need / 2**30:.1f} GiB for inputs and intermediate buffers "
                        f"(plus {weights / 2**30:.1f} GiB of weights); only {have / 2**30:.1f} GiB is available")
    return stats
