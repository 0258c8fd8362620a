"""What the quantize pass needs from the runtime, handed to it in the compile options:
run a graph (every value, or its outputs) and time two graphs against each other."""
from __future__ import annotations


import torch
from kiln.ir import Graph

from .plan import build_plan, run_all

REPEATS = 10


class QuantExecutor:
    def __init__(self, target: str = "cpu"):
        self.target = target

    def run_all(self, graph: Graph, inputs: list[torch.Tensor]) -> dict:
        return run_all(graph, inputs)

    def run(self, graph: Graph, inputs: list[torch.Tensor], target: str = "reference") -> list[torch.Tensor]:
        with torch.no_grad():
            return build_plan(graph, target).run(list(inputs))

    def time_pair(self, a: Graph, b: Graph, inputs: list[torch.Tensor]) -> tuple[float, float]:
        """Best-of-``REPEATS`` seconds of ``a`` and ``b`` on the target's kernels, interleaved."""
        from kiln.kernels.choice import _timed

        pa, pb = build_plan(a, self.target), build_plan(b, self.target)
        with torch.no_grad():
            for _ in range(3):
                pa.run(list(inputs))
                pb.run(list(inputs))
        ta, tb = _timed([lambda i, _: pa.run(list(i)), lambda i, _: pb.run(list(i))], inputs, None, REPEATS)
        return ta, tb
