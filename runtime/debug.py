"""The accuracy debugger: which pass (or kernel) first makes a model's outputs diverge,
and at which node.

Stages are checked in order — the imported graph against the model itself, then the
graph after each pass against the imported graph (all with reference kernels), then the
final graph with the target's kernels. At the first stage whose outputs diverge beyond
tolerance, the values the stage left untouched are compared one by one with the previous
stage; the first node whose output diverges is named, with the rewritten nodes feeding it.
"""
from __future__ import annotations

from dataclasses import field

import torch

from kiln.ir import Graph, Node
from kiln.ir.record import record

from .plan import run_all


@record(frozen=False, slots=False)
class Divergence:
    stage: str  # "import", "<phase>/<pass>" or "kernels"
    error: float
    tolerance: float
    node: str = ""  # "op at scope" of the first diverging node
    rewritten: list[str] = field(default_factory=list)  # new nodes feeding it (the likely culprits)

    def __str__(self) -> str:
        s = f"outputs diverge first at stage {self.stage}: max abs error {self.error:.3g} > {self.tolerance:.3g}"
        if self.node:
            s += f"\n  first diverging node: {self.node}"
        if self.rewritten:
            s += "\n  produced from rewritten node(s): " + ", ".join(self.rewritten)
        return s


@record(frozen=False, slots=False)
class Report:
    stages: list[tuple[str, float]]  # (stage, max abs error vs reference)
    divergence: Divergence | None

    def __str__(self) -> str:
        lines = [f"{'stage':<32}{'max abs error':>16}"]
        lines += [f"{s:<32}{e:>16.3g}" for s, e in self.stages]
        lines.append(str(self.divergence) if self.divergence else "no stage diverges beyond tolerance")
        return "\n".join(lines)


def _err(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    err, scale = 0.0, 1.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf"), 1.0
        if x.is_floating_point():
            d = (x.double() - y.double()).abs()
            e = float(d.nan_to_num(nan=float("inf")).max()) if d.numel() else 0.0
            if torch.isnan(x).any() and torch.equal(torch.isnan(x), torch.isnan(y)):
                e = float(d[~torch.isnan(d)].max()) if (~torch.isnan(d)).any() else 0.0
            err = max(err, e)
            scale = max(scale, float(y.abs().nan_to_num(0, 0, 0).max()) if y.numel() else 1.0)
        elif not torch.equal(x, y):
            return float("inf"), 1.0
    return err, scale


def _describe(n: Node) -> str:
    return n.op.value + (f" at {n.scope}" if n.scope else "") + f" -> %{n.outputs[0].name}"


def _locate(before: Graph, after: Graph, inputs, rel: float, target: str = "reference",
            before_target: str = "reference") -> tuple[str, list[str]]:
    va = run_all(before, inputs, before_target)
    vb = run_all(after, inputs, target)
    before_values = set(va)
    producer = {o: n for n in after.nodes for o in n.outputs}
    for n in after.nodes:
        for o in n.outputs:
            if o not in before_values:
                continue
            err, scale = _err([vb[o]], [va[o]])
            if err > rel * scale:
                # the rewritten (new) nodes among this node's ancestors are the suspects
                suspects, stack, seen = [], list(n.inputs), set()
                while stack:
                    v = stack.pop()
                    if v is None or v in seen:
                        continue
                    seen.add(v)
                    p = producer.get(v)
                    if p is None:
                        continue
                    if v not in before_values:
                        suspects.append(_describe(p))
                    else:
                        continue  # an unchanged value that matched: stop there
                    stack.extend(p.inputs)
                new_here = any(x not in before_values for x in n.outputs)
                return _describe(n), ([] if new_here else suspects[:5])
    # every surviving value matches: the divergence is inside rewritten nodes feeding the outputs
    new = [_describe(n) for n in after.nodes if n.outputs[0] not in before_values]
    return (new[-1] if new else ""), new[-6:-1]


def debug_accuracy(graph: Graph, inputs: list[torch.Tensor], eager_outputs: list[torch.Tensor] | None = None,
                   rel: float = 1e-4, select=None, target: str = "cpu") -> Report:
    from kiln.passes.pipeline import run_pipeline

    stages: list[tuple[str, float]] = []
    ref = [run_all(graph, inputs)[v] for v in graph.outputs]
    if eager_outputs is not None:
        err, scale = _err(ref, eager_outputs)
        stages.append(("import", err))
        if err > rel * scale:
            return Report(stages, Divergence("import", err, rel * scale))
    history: list[tuple[str, Graph]] = [("input", graph)]
    run_pipeline(graph, select=select, on_pass=lambda rec, b, a: history.append((f"{rec.phase}/{rec.name}", a)))
    for (_, prev), (label, g) in zip(history, history[1:]):
        out = [run_all(g, inputs)[v] for v in g.outputs]
        err, scale = _err(out, ref)
        stages.append((label, err))
        if err > rel * scale:
            node, suspects = _locate(prev, g, inputs, rel)
            return Report(stages, Divergence(label, err, rel * scale, node, suspects))
    final = history[-1][1]
    env = run_all(final, inputs, target)
    out = [env[v] for v in final.outputs]
    err, scale = _err(out, ref)
    stages.append((f"kernels ({target})", err))
    if err > rel * scale:
        node, _ = _locate(final, final, inputs, rel, target=target)
        return Report(stages, Divergence(f"kernels ({target})", err, rel * scale, node))
    return Report(stages, None)


