"""What a pass may know about the compile it runs in, and where its decisions go.

Most passes are pure graph rewrites. A few decide by measurement (quantization keeps a
layer integer only where that is accurate and faster; sparsity compresses a weight only
where the sparse kernel wins). Kernels and plans live above the passes, so those passes get
a small ``Measurer`` from the compile driver instead of reaching up into the runtime, and
record each decision in ``PassContext.decisions``; the driver puts them in the compile's
report.
"""
from __future__ import annotations

from dataclasses import field
from typing import Protocol

import torch

from kiln.ir import Graph, Node, Value
from kiln.options import CompileOptions
from kiln.ir.record import record


class Measurer(Protocol):
    """Runs and times graphs and nodes on the compile's target (the driver provides it)."""

    def run_all(self, graph: Graph, inputs: list[torch.Tensor]) -> dict[Value, torch.Tensor]:
        """Every value ``graph`` computes on ``inputs`` (reference kernels)."""

    def run(self, graph: Graph, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``graph``'s outputs on ``inputs`` (reference kernels)."""

    def time_pair(self, a: Graph, b: Graph, inputs: list[torch.Tensor]) -> tuple[float, float]:
        """Best seconds of ``a`` and ``b`` on the target's kernels, interleaved."""

    def time_nodes(self, options: list[tuple[Node, list]]) -> list[tuple[float, str, float]]:
        """For nodes computing the same thing (each with its operands' constants): best seconds
        of the fastest kernel for each, that kernel's name and its max abs difference from the
        first node's output (infinity where it disagrees)."""


@record(frozen=False, slots=False)
class Decisions:
    """Per-layer decisions of the measuring passes, in the order they were made."""

    quantization: list = field(default_factory=list)  # passes.quantize_payoff.LayerDecision
    sparsity: list = field(default_factory=list)  # passes.sparsity.SparseDecision


@record(frozen=False, slots=False)
class PassContext:
    options: CompileOptions = field(default_factory=CompileOptions)
    measure: Measurer | None = None
    decisions: Decisions = field(default_factory=Decisions)

    @property
    def target(self) -> str:
        """The target's kind: "cpu", "cuda" or "reference"."""
        return self.options.resolved_target().kind
