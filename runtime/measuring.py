"""The measuring passes' ``Measurer`` (kiln.passes.context): graphs and nodes run and timed
with the runtime's plans and kernels. The compile driver hands one to the pipeline."""
from __future__ import annotations

import torch

from kiln.ir import Graph
from kiln.kernels.sparse import measure as measure_nodes
from kiln.kernels.timing import best_seconds

from .plan import build_plan, run_all

PAIR_ROUNDS = 10


class PlanMeasurer:
    """``sizes``: the example value of each symbolic size, where the graph has any (kernels
    for symbolic shapes are measured at them)."""

    def __init__(self, target: str = "cpu", sizes: dict | None = None):
        self.target = target
        self.sizes = sizes

    def run_all(self, graph: Graph, inputs: list[torch.Tensor]) -> dict:
        return run_all(graph, inputs)

    def run(self, graph: Graph, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return build_plan(graph, "reference").run(list(inputs))

    def time_pair(self, a: Graph, b: Graph, inputs: list[torch.Tensor]) -> tuple[float, float]:
        pa, pb = build_plan(a, self.target, sizes=self.sizes), build_plan(b, self.target, sizes=self.sizes)
        ta, tb = best_seconds([lambda: pa.run(list(inputs)), lambda: pb.run(list(inputs))], PAIR_ROUNDS, warmup=3)
        return ta, tb

    def time_nodes(self, options: list) -> list[tuple[float, str, float]]:
        return measure_nodes(options, self.target)
