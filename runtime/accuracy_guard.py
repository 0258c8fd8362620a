"""The end-to-end accuracy check of approximate kernels (Winograd convolutions).

A kernel marked ``approximate`` computes a different sum than the reference's (Winograd's
transforms trade multiplications for additions whose rounding differs in kind). Kernel
choice checks every candidate against the reference on its own node, within the dtype's
tolerance; what one node's check cannot see is how such errors add up through a deep
network (through normalizations that divide by small variances, say). So a plan that uses
one is run once more, end to end, against the reference kernels on the same random inputs,
and the compile keeps it only if every fp32 output agrees to ``REL_TOL`` of that output's
scale (the bound Kiln promises for fp32; the model suite's pass criterion) -- or, where the
graph computes in bf16 (``precision="bf16"``), to ``BF16_REL_TOL``: there the reference
kernels themselves round every bf16 value, and a plan of only exact kernels already differs
from them by about one bf16 step of the output (2^-8 of its scale: 3.6e-3 on ResNet-18 and
ResNet-50, docs/benchmarks.md), so the fp32 bound would refuse any bf16 plan; the bf16 one
lets an approximate kernel's extra rounding through while it stays within a few such steps.
"""
from __future__ import annotations

import torch

from kiln.kernels.choice import group_inputs

REL_TOL = 1e-4
BF16_REL_TOL = 1e-2


def bound_for(graph) -> float:
    """``BF16_REL_TOL`` for a graph with bf16 values, else ``REL_TOL``."""
    bf16 = any(v.type.dtype.value == "bfloat16" for n in graph.nodes for v in n.outputs if v is not None)
    return BF16_REL_TOL if bf16 else REL_TOL


def worst_relative_error(plan, reference_plan, sizes: dict | None = None) -> float:
    """The largest max|plan - reference| / max|reference| over the fp32 outputs (0 when none)."""
    # random run-time inputs at ``sizes`` (integer ones zero: always in range), as kernel choice makes them
    ins = group_inputs(plan.graph, plan.graph, sizes)
    with torch.no_grad():
        got = plan.run(list(ins))
        want = reference_plan.run(list(ins))
    worst = 0.0
    for g, w in zip(got, want):
        if not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or not w.numel():
            continue
        if not bool(torch.isfinite(w).all()):
            continue  # the reference itself overflows on these inputs: nothing to measure against
        scale = float(w.abs().max())
        err = float((g.double() - w.double()).abs().max())
        if err != err or scale == 0.0:  # NaN where the reference is finite, or any error on zeros
            rel = 0.0 if err == 0.0 else float("inf")
        else:
            rel = err / scale
        worst = max(worst, rel)
    return worst
