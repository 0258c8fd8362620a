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

import torch
from kiln.ir import Graph, GraphBuilder, Node, OpKind, Value
from kiln.ir import attrs as A
from kiln.ir import qformat
from kiln.ir.record import record

from . import quantize as Q
from .calibrate import calibrate
from .context import PassContext

MIN_SQNR_DB = {"int8-dynamic": 25.0, "int8-static": 20.0, "int8-weight": 30.0, "int4-weight": 15.0}


@record(slots=False)
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
            return False, f"not faster ({quant_s * 1e3:.3f} ms vs {fp32_s * 1e3:.3f} ms unquantized)"
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
    chain = _chains(graph, cands) if static else None
    # with precision="bf16" a layer left unquantized runs in bf16: that is what int8 must beat
    bf16 = ctx.options.precision == "bf16"
    for n in cands:
        d = _judge(n, graph, scheme, group, params, first, min_sqnr, measure, ex, times, chain, bf16)
        decisions.append(d)
        if d.quantized:
            chosen.add(n.outputs[0])
    ctx.decisions.quantization.extend(decisions)
    plan = Q.QuantPlan(scheme, chosen, params, Q.keep_uint8(graph, chosen) if static else set(), group)
    return Q.apply(graph, plan)


def _chains(graph: Graph, cands: list[Node]) -> tuple[set[Value], set[Value]]:
    """For int8-static: the values a candidate layer would read in uint8 (made by another
    candidate) and the candidates' outputs read only by candidates (handed on in uint8). A
    layer left float in such a chain pays a dequantize of its input and a quantize of its
    output; timed alone, a quantized layer would instead pay a quantize of its input that
    the chain does not have. ``_timing_graphs`` builds both sides as the chain runs them."""
    made = {n.outputs[0] for n in cands}
    users = graph.users()
    outs = set(graph.outputs)
    chained_out = {v for v in made if v not in outs and users.get(v) and
                   all(u.outputs[0] in made for u in users[v])}
    return made, chained_out


def _timing_graphs(n: Node, graph: Graph, scheme, group, params, chain):
    """(float graph, quantized graph) to time ``n`` as the int8 chain runs it: its
    run-time operands made by a candidate arrive quantized (QUANTIZE then DEQUANTIZE, the
    same in both graphs: the quantized layer reads the uint8 value directly), and an output
    handed on in uint8 is quantized after the float layer / requantized inside the
    quantized one (then dequantized on both sides, as a graph output must be float)."""
    made, chained_out = chain
    o = n.outputs[0]
    quant_out = o in chained_out and o in params

    def build(float_side: bool):
        b = GraphBuilder("layer_chain")
        where: dict[Value, Value] = {}
        ins = []
        for v in n.inputs:
            if v is None:
                ins.append(None)
            elif v in graph.constants:
                ins.append(b.const(graph.constants[v], v.name))
            else:
                x = b.input(v.name or "x", v.shape, v.dtype)
                where[x] = v
                if v in made and v in params:
                    qa = A.QuantizeAttrs(*params[v])
                    x = b.add(OpKind.DEQUANTIZE, b.add(OpKind.QUANTIZE, x, attrs=qa), attrs=qa)
                    where[x] = v
                ins.append(x)
        y = b.add(n.op, *ins, attrs=n.attrs)
        where[y] = o
        if float_side:
            if quant_out:  # quantized for the next layer (and back, as the quantized side's output is)
                qa = A.QuantizeAttrs(*params[o])
                y = b.add(OpKind.DEQUANTIZE, b.add(OpKind.QUANTIZE, y, attrs=qa), attrs=qa)
            return b.build([y])
        plan = Q.QuantPlan(scheme, {y}, {v: params[w] for v, w in where.items() if w in params},
                           {y} if quant_out else set(), group)
        return Q.apply(b.build([y]), plan)
    return build(True), build(False)


def _as_bf16(g: Graph) -> Graph:
    from . import precision
    from .rewrite import rewrite

    return rewrite(g, precision.RULES, name="bf16")


def _judge(n: Node, graph: Graph, scheme, group, params, first, min_sqnr, measure, ex, times,
           chain=None, bf16: bool = False) -> LayerDecision:
    fp, where = _single(n, graph.constants)
    mini_out = fp.outputs[0]
    plan = Q.QuantPlan(scheme, {mini_out}, {v: params[o] for v, o in where.items() if o in params}, set(), group)
    qg = Q.apply(fp, plan)
    inputs = [first[where[v]] for v in fp.inputs]
    ref = ex.run(fp, inputs)[0]
    sqnr = qformat.sqnr_db(ref, ex.run(qg, inputs)[0])
    t_fp = t_q = None
    if measure and sqnr >= min_sqnr:
        key = (n.op, scheme, repr(n.attrs), tuple(None if v is None else repr(v.type) for v in n.inputs),
               chain is not None and n.inputs[0] in chain[0], chain is not None and n.outputs[0] in chain[1])
        if key not in times:
            fp_t, q_t = _timing_graphs(n, graph, scheme, group, params, chain) if chain is not None else (fp, qg)
            times[key] = ex.time_pair(_as_bf16(fp_t) if bf16 else fp_t, q_t, inputs)
        t_fp, t_q = times[key]
    ok, why = decide(sqnr, t_fp, t_q, min_sqnr)
    x, w = n.inputs[0], n.inputs[1]
    shape = "x".join(map(str, x.shape)) + " @ " + "x".join(map(str, w.shape))
    return LayerDecision(n.scope or n.outputs[0].name, n.op.value, shape, scheme, sqnr,
                         None if t_fp is None else t_fp * 1e3, None if t_q is None else t_q * 1e3, ok, why)

