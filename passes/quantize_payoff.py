"""Per-layer payoff: a layer is quantized only if it stays accurate and gets faster.

For each eligible layer the quantized version is built on its own (a one-node graph and
its rewrite), run on the layer's real inputs from the first calibration batch, and
compared with float32 by SQNR; then both are timed, interleaved, with the kernels the
runtime would pick. Below ``min_sqnr`` dB or not faster: the layer stays float. Every
decision is recorded (``LayerDecision``) in the compile's report (``kiln.quantize_report``
shows it).

Graphs run and are timed through the context's ``Measurer`` (the compile driver's), so
this pass stays below the runtime in the layering.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from kiln.ir import Graph, GraphBuilder, Node, Value
from kiln.ir import qformat

from . import quantize as Q
from .calibrate import calibrate
from .context import PassContext

MIN_SQNR_DB = {"int8-dynamic": 25.0, "int8-static": 20.0, "int8-weight": 30.0, "int4-weight": 15.0}


@dataclass(frozen=True)
class LayerDecision:
    layer: str  # the source module path (scope), else the value name
    op: str
    shape: str  # input x weight
    scheme: str
    sqnr_db: float
    fp32_ms: float | None  # None when speed was not measured
    quant_ms: float | None
    quantized: bool
    reason: str


def decide(sqnr_db: float, fp32_s: float | None, quant_s: float | None, min_sqnr: float) -> tuple[bool, str]:
    """The rule: accurate enough, and faster when speed was measured."""
    if not sqnr_db >= min_sqnr:
        return False, f"SQNR {sqnr_db:.1f} dB < {min_sqnr:.1f} dB"
    if fp32_s is not None and quant_s is not None:
        if not quant_s < fp32_s:
            return False, f"not faster ({quant_s * 1e3:.3f} ms vs {fp32_s * 1e3:.3f} ms in float32)"
        return True, f"{fp32_s / quant_s:.2f}x faster, SQNR {sqnr_db:.1f} dB"
    return True, f"SQNR {sqnr_db:.1f} dB (speed not measured)"


def _single(n: Node, consts) -> tuple[Graph, dict[Value, Value]]:
    """``n`` alone: its run-time operands become inputs, its constants stay constants."""
    b = GraphBuilder("layer")
    where: dict[Value, Value] = {}
    ins = []
    for v in n.inputs:
        if v is None:
            ins.append(None)
        elif v in consts:
            ins.append(b.const(consts[v], v.name))
        else:
            ins.append(b.input(v.name or "x", v.shape, v.dtype))
            where[ins[-1]] = v
    out = b.add(n.op, *ins, attrs=n.attrs)
    where[out] = n.outputs[0]
    return b.build([out]), where


def _random_inputs(graph: Graph) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for v in graph.inputs:
        dt = v.dtype.to_torch()
        shape = [d if isinstance(d, int) else 1 for d in v.shape]
        out.append(torch.randn(shape, generator=g, dtype=dt) if dt.is_floating_point else
                   torch.zeros(shape, dtype=dt))
    return out


def quantize_pass(graph: Graph, ctx: PassContext) -> Graph:
    q = ctx.options.quantize
    ex = ctx.measure
    if ex is None:
        raise ValueError("the quantize pass needs a Measurer in its PassContext (the compile driver gives one)")
    scheme, group, observer, measure = q.scheme, q.group_size, q.observer, q.measure_payoff
    min_sqnr = MIN_SQNR_DB[scheme] if q.min_sqnr is None else float(q.min_sqnr)
    cands = [n for n in graph.nodes if Q.eligible(n, graph.constants, scheme, group)]
    if not cands:
        return graph
    static = scheme == "int8-static"
    watch = {v for n in cands for v in n.inputs if v is not None and v not in graph.constants}
    if static:
        watch |= {n.outputs[0] for n in cands}
    batches = [list(b) for b in q.calibration] or [_random_inputs(graph)]
    observers, first = calibrate(graph, batches, watch, ex.run_all)
    params = Q.static_params(observers, observer) if static else {}
    decisions, chosen, times = [], set(), {}
    for n in cands:
        d = _judge(n, graph, scheme, group, params, first, min_sqnr, measure, ex, times)
        decisions.append(d)
        if d.quantized:
            chosen.add(n.outputs[0])
    ctx.decisions.quantization.extend(decisions)
    plan = Q.QuantPlan(scheme, chosen, params, Q.keep_uint8(graph, chosen) if static else set(), group)
    return Q.apply(graph, plan)


def _judge(n: Node, graph: Graph, scheme, group, params, first, min_sqnr, measure, ex, times) -> LayerDecision:
    fp, where = _single(n, graph.constants)
    mini_out = fp.outputs[0]
    plan = Q.QuantPlan(scheme, {mini_out}, {v: params[o] for v, o in where.items() if o in params}, set(), group)
    qg = Q.apply(fp, plan)
    inputs = [first[where[v]] for v in fp.inputs]
    ref = ex.run(fp, inputs)[0]
    sqnr = qformat.sqnr_db(ref, ex.run(qg, inputs)[0])
    t_fp = t_q = None
    if measure and sqnr >= min_sqnr:
        key = (n.op, scheme, repr(n.attrs), tuple(None if v is None else repr(v.type) for v in n.inputs))
        if key not in times:
            times[key] = ex.time_pair(fp, qg, inputs)
        t_fp, t_q = times[key]
    ok, why = decide(sqnr, t_fp, t_q, min_sqnr)
    x, w = n.inputs[0], n.inputs[1]
    shape = "x".join(map(str, x.shape)) + " @ " + "x".join(map(str, w.shape))
    return LayerDecision(n.scope or n.outputs[0].name, n.op.value, shape, scheme, sqnr,
                         None if t_fp is None else t_fp * 1e3, None if t_q is None else t_q * 1e3, ok, why)

