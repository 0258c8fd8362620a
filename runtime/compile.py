"""From an imported graph to an executable plan: verify, optimize, plan."""
from __future__ import annotations

import os

from kiln.ir import Graph, verify

from .plan import Plan, build_plan


def compile_graph(graph: Graph, target: str = "cpu", **options) -> tuple[Plan, Graph]:
    unknown = set(options) - {"passes"}
    if unknown:
        from kiln.errors import KilnError

        raise KilnError(f"unknown kiln.compile option(s): {', '.join(sorted(unknown))}")
    verify(graph)
    if os.environ.get("KILN_VERIFY") == "1":
        verify(graph)
    return build_plan(graph, target), graph
