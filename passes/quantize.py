"""Quantization: LINEAR / CONV2D to integer kernels, per layer, where it pays.

Schemes (``kiln.compile(..., quantize=...)``):

- ``int8-dynamic``: LINEAR -> QLINEAR_DYNAMIC (int8 weights per output channel, activations
  per row at run time). Covers attention projections and the hoisted input projections
  of LSTM/GRU; the recurrent GEMMs inside LSTM/GRU stay float.
- ``int8-static``: LINEAR / CONV2D -> QLINEAR / QCONV2D with per-tensor uint8 activations
  whose ranges come from calibration (observer ``minmax``, ``percentile`` or ``entropy``).
  A layer whose every user is also quantized hands its output on in uint8 (requantized
  inside the kernel after bias, residual and ReLU), so conv -> relu -> add chains stay in
  int8; a float consumer reads it through DEQUANTIZE.
- ``int8-weight`` / ``int4-weight``: LINEAR -> LINEAR_WEIGHT_ONLY (float activations;
  int4 group-wise along K, group 32/64/128).

Which layers change is decided first (``quantize_payoff.decide``: SQNR of the layer's
output against float32 on calibration data, and measured time); the rewrite rules below
then only build the graph for those decisions. Weight formats: ``kiln.ir.qformat``.
"""
from __future__ import annotations

from dataclasses import field

import torch
from kiln.ir import DType, Graph, Node, OpKind, Value
from kiln.ir import attrs as A
from kiln.ir import qformat
from kiln.ir.record import record

from .pattern import P
from .rewrite import rewrite

F32 = DType.FLOAT32
_ACT_OPS = {A.Activation.RELU: OpKind.RELU, A.Activation.TANH: OpKind.TANH, A.Activation.SIGMOID: OpKind.SIGMOID,
            A.Activation.SILU: OpKind.SILU}


def _opt(n: Node, i: int) -> Value | None:
    return n.inputs[i] if len(n.inputs) > i else None


def _operands(*vs):
    """Optional trailing operands that are absent are left off."""
    vs = list(vs)
    while vs and vs[-1] is None:
        vs.pop()
    return vs


def eligible(n: Node, consts, scheme: str, group_size: int = 128) -> bool:
    """A float32 LINEAR (or, for int8-static, CONV2D) with a constant weight."""
    if n.op not in (OpKind.LINEAR, OpKind.CONV2D):
        return False
    if n.outputs[0].dtype is not F32 or n.inputs[0].dtype is not F32 or n.inputs[1] not in consts:
        return False
    if any(v is not None and v.dtype is not F32 for v in n.inputs):
        return False
    if n.op is OpKind.LINEAR:
        k = n.inputs[1].shape[1]
        return scheme != "int4-weight" or (isinstance(k, int) and k % group_size == 0)
    if n.op is OpKind.CONV2D and scheme == "int8-static":
        return n.attrs.activation in (A.Activation.NONE, A.Activation.RELU)
    return False


@record(frozen=False, slots=False)
class QuantPlan:
    """What the rewrite builds: the layers to quantize and, for static int8, each value's
    (scale, zero point) and which quantized outputs stay uint8."""

    scheme: str
    chosen: set[Value]  # output value of each LINEAR / CONV2D to quantize
    params: dict[Value, tuple[float, int]] = field(default_factory=dict)
    keep_u8: set[Value] = field(default_factory=set)
    group_size: int = 128
    alias: dict[Value, Value] = field(default_factory=dict)  # replacement value -> original


def keep_uint8(graph: Graph, chosen: set[Value]) -> set[Value]:
    """Quantized outputs that every consumer reads as a quantized input (int8 chains)."""
    users = graph.users()
    outs = set(graph.outputs)
    return {v for v in chosen if v not in outs and users.get(v) and
            all(u.outputs[0] in chosen for u in users[v])}


def _weights(rw, w: Value) -> tuple[Value, Value]:
    q, s = qformat.quantize_weight_int8(rw.constant(w))
    return rw.const(q, "w_q"), rw.const(s, "w_scale")


def _activation(rw, y: Value, act: A.Activation) -> Value:
    if act is A.Activation.GELU:
        return rw.add(OpKind.GELU, y, attrs=A.GeluAttrs(A.GeluApprox.NONE))
    if act is A.Activation.GELU_TANH:
        return rw.add(OpKind.GELU, y, attrs=A.GeluAttrs(A.GeluApprox.TANH))
    return y if act is A.Activation.NONE else rw.add(_ACT_OPS[act], y)


def _u8(rw, plan: QuantPlan, v: Value) -> tuple[Value, float, int]:
    """``v`` as uint8: the input of the DEQUANTIZE that made it, else a new QUANTIZE."""
    p = rw.producer(v)
    if p is not None and p.op is OpKind.DEQUANTIZE:
        return p.inputs[0], p.attrs.scale, p.attrs.zero_point
    scale, zp = plan.params[plan.alias.get(v, v)]
    return rw.add(OpKind.QUANTIZE, v, attrs=A.QuantizeAttrs(scale, zp)), scale, zp


def _out_qparams(plan: QuantPlan, n: Node) -> tuple[float | None, int]:
    o = n.outputs[0]
    return plan.params[o] if o in plan.keep_u8 else (None, 0)


def _finish(rw, plan: QuantPlan, root: Node, y: Value) -> Value:
    if y.dtype is DType.UINT8:
        q = y.type.quant
        y = rw.add(OpKind.DEQUANTIZE, y, attrs=A.QuantizeAttrs(q.scale, q.zero_point))
    plan.alias[y] = root.outputs[0]
    return y


def _dynamic(plan: QuantPlan):
    def fn(m, rw):
        n = m.root
        wq, ws = _weights(rw, n.inputs[1])
        y = rw.add(OpKind.QLINEAR_DYNAMIC, *_operands(n.inputs[0], wq, ws, _opt(n, 2), _opt(n, 3)),
                   attrs=A.QLinearDynamicAttrs(n.attrs.activation))
        return _finish(rw, plan, n, y)
    return fn


def _weight_only(plan: QuantPlan, bits: int):
    def fn(m, rw):
        n = m.root
        w = rw.constant(n.inputs[1])
        if bits == 8:
            q, s = qformat.quantize_weight_int8(w)
        else:
            q, s = qformat.quantize_weight_int4(w, plan.group_size)
        attrs = A.WeightOnlyAttrs(bits, 0 if bits == 8 else plan.group_size, n.attrs.activation)
        y = rw.add(OpKind.LINEAR_WEIGHT_ONLY, *_operands(n.inputs[0], rw.const(q, "w_q"), rw.const(s, "w_scale"),
                                                         _opt(n, 2), _opt(n, 3)), attrs=attrs)
        return _finish(rw, plan, n, y)
    return fn


def _static_linear(plan: QuantPlan):
    def fn(m, rw):
        n = m.root
        x, xs, xzp = _u8(rw, plan, n.inputs[0])
        wq, ws = _weights(rw, n.inputs[1])
        res, act = _opt(n, 3), n.attrs.activation
        if res is not None:  # the residual add (then activation) runs in float after the GEMM
            y = rw.add(OpKind.QLINEAR, *_operands(x, wq, ws, _opt(n, 2)), attrs=A.QLinearAttrs(xs, xzp))
            return _finish(rw, plan, n, _activation(rw, rw.add(OpKind.ADD, y, res), act))
        osc, ozp = _out_qparams(plan, n)
        y = rw.add(OpKind.QLINEAR, *_operands(x, wq, ws, _opt(n, 2)),
                   attrs=A.QLinearAttrs(xs, xzp, osc, ozp, act))
        return _finish(rw, plan, n, y)
    return fn


def _static_conv(plan: QuantPlan):
    def fn(m, rw):
        n = m.root
        a: A.Conv2dAttrs = n.attrs
        x, xs, xzp = _u8(rw, plan, n.inputs[0])
        wq, ws = _weights(rw, n.inputs[1])
        osc, ozp = _out_qparams(plan, n)
        res, rsc, rzp = _opt(n, 3), None, 0
        if res is not None and osc is not None:
            res, rsc, rzp = _u8(rw, plan, res)
        attrs = A.QConv2dAttrs(xs, xzp, a.stride, a.padding, a.dilation, a.groups, osc, ozp, a.activation,
                               rsc, rzp)
        return _finish(rw, plan, n, rw.add(OpKind.QCONV2D, *_operands(x, wq, ws, _opt(n, 2), res), attrs=attrs))
    return fn


def _dequant_quant(m, rw):
    """QUANTIZE(DEQUANTIZE(q)) with the same parameters is q."""
    p = rw.producer(m.root.inputs[0])
    if p is not None and p.op is OpKind.DEQUANTIZE and p.attrs == m.root.attrs:
        return p.inputs[0]
    return None


def rules(plan: QuantPlan) -> list:
    chosen = (lambda n: n.outputs[0] in plan.chosen)
    if plan.scheme == "int8-dynamic":
        return [(P(OpKind.LINEAR, where=chosen), _dynamic(plan))]
    if plan.scheme in ("int8-weight", "int4-weight"):
        return [(P(OpKind.LINEAR, where=chosen), _weight_only(plan, 8 if plan.scheme == "int8-weight" else 4))]
    return [(P(OpKind.CONV2D, where=chosen), _static_conv(plan)),
            (P(OpKind.LINEAR, where=chosen), _static_linear(plan)),
            (P(OpKind.QUANTIZE), _dequant_quant)]


def _pool_u8(m, rw):
    """QUANTIZE(MAX_POOL2D(y)) -> MAX_POOL2D(QUANTIZE(y)): exact, as quantization is monotone
    (the max of the quantized values is the quantized max), and the pool then moves a
    quarter of the bytes."""
    pool = rw.producer(m.root.inputs[0])
    q = rw.add(OpKind.QUANTIZE, pool.inputs[0], attrs=m.root.attrs)
    return rw.add(OpKind.MAX_POOL2D, q, attrs=pool.attrs)


def _requantize_in_conv(m, rw):
    """QUANTIZE of a float-out QCONV2D (no residual) read by nothing else: the convolution
    requantizes its own fp32 accumulator (after bias and ReLU) to those parameters, the same
    values up to rounding ties, without writing the float tensor."""
    conv = rw.producer(m.root.inputs[0])
    a: A.QConv2dAttrs = conv.attrs
    attrs = A.QConv2dAttrs(a.x_scale, a.x_zero_point, a.stride, a.padding, a.dilation, a.groups,
                           m.root.attrs.scale, m.root.attrs.zero_point, a.activation)
    return rw.add(OpKind.QCONV2D, *conv.inputs, attrs=attrs)


def _float_out_no_residual(n: Node) -> bool:
    return n.attrs.out_scale is None and (len(n.inputs) < 5 or n.inputs[4] is None) and \
        n.attrs.activation in (A.Activation.NONE, A.Activation.RELU)


# int8 chains through what follows a quantized layer (run after the layers are rewritten)
STATIC_CHAINS = [
    (P(OpKind.QUANTIZE, P(OpKind.MAX_POOL2D, single_use=True)), _pool_u8),
    (P(OpKind.QUANTIZE, P(OpKind.QCONV2D, single_use=True, where=_float_out_no_residual)), _requantize_in_conv),
]


def apply(graph: Graph, plan: QuantPlan) -> Graph:
    """Rewrite the chosen layers (``plan`` already holds every decision)."""
    if not plan.chosen:
        return graph
    graph = rewrite(graph, rules(plan), name="quantize")
    if plan.scheme == "int8-static":  # after CSE: a value quantized for two readers is one QUANTIZE
        from .cse import cse

        graph = rewrite(cse(graph), STATIC_CHAINS, name="quantize_chains")
    return merge_dynamic_siblings(graph) if plan.scheme == "int8-dynamic" else graph


def merge_dynamic_siblings(graph: Graph) -> Graph:
    """QLINEAR_DYNAMIC nodes reading the same input with the same epilogue (attention's q, k
    and v projections) become one wider GEMM and slices of its output: the input is
    quantized once, and one GEMM keeps the cores busier than three. Exact: rows are
    quantized the same way and output columns are independent."""
    consts = graph.constants
    groups: dict[tuple, list[Node]] = {}
    for n in graph.nodes:
        if (n.op is OpKind.QLINEAR_DYNAMIC and len(n.inputs) <= 4 and
                all(v in consts for v in n.inputs[1:] if v is not None)):
            groups.setdefault((n.inputs[0], n.attrs, len(n.inputs)), []).append(n)
    groups = {k: ns for k, ns in groups.items() if len(ns) > 1}
    if not groups:
        return graph
    from kiln.ir import infer_types

    first = {ns[0]: ns for ns in groups.values()}
    merged_away = {n for ns in groups.values() for n in ns[1:]}
    constants = dict(consts)
    env: dict[Value, Value] = {}
    nodes: list[Node] = []

    def const(t: torch.Tensor, like: Value) -> Value:
        v = Value(like.type.with_shape(t.shape), f"{like.name}_merged")
        constants[v] = t.contiguous()
        return v

    for n in graph.nodes:
        if n in merged_away:
            continue
        ins = tuple(None if v is None else env.get(v, v) for v in n.inputs)
        if n not in first:
            nodes.append(n if ins == n.inputs else Node(n.op, ins, n.attrs, n.outputs, n.scope))
            continue
        ns = first[n]
        cat = [const(torch.cat([consts[m.inputs[i]] for m in ns]), n.inputs[i]) for i in range(1, len(n.inputs))]
        op_ins = (ins[0], *cat)
        (t,) = infer_types(OpKind.QLINEAR_DYNAMIC, [v.type for v in op_ins], n.attrs)
        wide = Value(t, f"{n.outputs[0].name}_merged")
        nodes.append(Node(OpKind.QLINEAR_DYNAMIC, op_ins, n.attrs, (wide,), n.scope))
        start, axis = 0, t.rank - 1
        for m in ns:
            width = m.outputs[0].shape[-1]
            sa = A.SliceAttrs(axis, start, start + width)
            (st,) = infer_types(OpKind.SLICE, [t], sa)
            out = Value(st, m.outputs[0].name)
            nodes.append(Node(OpKind.SLICE, (wide,), sa, (out,), m.scope))
            env[m.outputs[0]] = out
            start += width
    from .rewrite import dead_code_elimination

    outputs = tuple(env.get(v, v) for v in graph.outputs)
    return dead_code_elimination(graph.replace(nodes=tuple(nodes), outputs=outputs, constants=constants))


def static_params(observers: dict, kind: str) -> dict[Value, tuple[float, int]]:
    return {v: qformat.per_tensor_qparams(*o.range(kind)) for v, o in observers.items()}
