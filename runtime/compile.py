"""From an imported graph to an executable plan: verify, run the pass pipeline, plan."""
from __future__ import annotations

import os

from kiln.errors import KilnError
from kiln.ir import Graph, verify

from .plan import Plan, build_plan

OPTIONS = {"passes"}


def compile_graph(graph: Graph, target: str = "cpu", passes=None, **options) -> tuple[Plan, Graph]:
    unknown = set(options) - OPTIONS
    if unknown:
        raise KilnError(f"unknown kiln.compile option(s): {', '.join(sorted(unknown))}")
    from kiln.passes.pipeline import run_pipeline

    verify(graph)
    if isinstance(passes, str):
        passes = [] if passes == "none" else None if passes == "all" else [passes]
    try:
        result = run_pipeline(graph, select=passes, verify_each=os.environ.get("KILN_VERIFY") == "1")
    except ValueError as e:
        raise KilnError(str(e)) from None
    plan = build_plan(result.graph, target)
    plan.partition = result.partition
    plan.pass_records = result.records
    return plan, result.graph
