"""Reduced precision: run GEMMs, convolutions and attention in bfloat16 (AMX on CPUs that
have it), with float32 accumulation inside the kernels and float32 everywhere else; on a
CPU with AMX, LSTM and GRU layers too (``RNN_RULES``: the recurrence's GEMMs on AMX tiles).

Each float32 LINEAR / CONV2D / MATMUL / ATTENTION becomes: operands cast to bfloat16
(constant weights converted once, at compile time), the op in bfloat16, the result cast
back to float32. A GEMM keeps its bias and activation and a conv its whole epilogue
(oneDNN computes them on the fp32 accumulator, then rounds once); a GEMM's residual add
runs in float32 after the cast. A bf16 -> f32 -> slice/reshape/permute/max-pool/pad -> bf16
round trip is removed (it is exact), and so is one around a GROUP_NORM (it computes in
float32 and rounds its result to its input's dtype). The pass changes numerics by
design; ``precision="bf16"`` opts in, and the error bound is the caller's to check.
"""
from __future__ import annotations

import torch

from kiln.ir import DType, OpKind
from kiln.ir import attrs as A

from .pattern import P

F32, BF16 = DType.FLOAT32, DType.BFLOAT16
_ACT_OPS = {A.Activation.RELU: OpKind.RELU, A.Activation.TANH: OpKind.TANH, A.Activation.SIGMOID: OpKind.SIGMOID,
            A.Activation.SILU: OpKind.SILU}


def _f32(n) -> bool:
    return n.outputs[0].dtype is F32 and all(v is None or v.dtype in (F32, DType.BOOL) for v in n.inputs)


def _bf16(rw, v):
    if v is None:
        return None
    t = rw.constant(v)
    if t is not None:
        return rw.const(t.to(torch.bfloat16), "bf16")  # converted once, at compile time
    return rw.add(OpKind.CAST, v, attrs=A.CastAttrs(BF16))


def _epilogue(rw, y, bias, residual, act: A.Activation, channel_axis: int):
    y = rw.add(OpKind.CAST, y, attrs=A.CastAttrs(F32))
    if bias is not None:
        if channel_axis != y.type.rank - 1:
            shape = [1] * y.type.rank
            shape[channel_axis] = bias.shape[0]
            t = rw.constant(bias)
            bias = rw.const(t.reshape(shape), "bias") if t is not None else \
                rw.add(OpKind.RESHAPE, bias, attrs=A.ShapeAttrs(tuple(shape)))
        y = rw.add(OpKind.ADD, y, bias)
    if residual is not None:
        y = rw.add(OpKind.ADD, y, residual)
    if act is A.Activation.GELU:
        y = rw.add(OpKind.GELU, y, attrs=A.GeluAttrs(A.GeluApprox.NONE))
    elif act is A.Activation.GELU_TANH:
        y = rw.add(OpKind.GELU, y, attrs=A.GeluAttrs(A.GeluApprox.TANH))
    elif act is A.Activation.RELU6:
        y = rw.add(OpKind.CLAMP, y, attrs=A.ClampAttrs(0.0, 6.0))
    elif act is not A.Activation.NONE:
        y = rw.add(_ACT_OPS[act], y)
    return y


def _linear(m, rw):
    """Bias and activation stay fused in the bf16 GEMM (oneDNN applies them to the fp32
    accumulator before rounding); a residual add moves after the cast, in fp32."""
    n = m.root
    x, w = n.inputs[0], n.inputs[1]
    bias = n.inputs[2] if len(n.inputs) > 2 else None
    res = n.inputs[3] if len(n.inputs) > 3 else None
    act = n.attrs.activation
    ins = [_bf16(rw, x), _bf16(rw, w)] + ([_bf16(rw, bias)] if bias is not None else [])
    if res is None:
        y = rw.add(OpKind.LINEAR, *ins, attrs=A.LinearAttrs(act))
        return rw.add(OpKind.CAST, y, attrs=A.CastAttrs(F32))
    y = rw.add(OpKind.LINEAR, *ins)
    return _epilogue(rw, y, None, res, act, y.type.rank - 1)


# ops that commute exactly with rounding f32 -> bf16 (data movement; max is monotone; a
# pad's constant is rounded either way: padded in f32 then rounded, or rounded to pad bf16)
_MOVES = (OpKind.RESHAPE, OpKind.PERMUTE, OpKind.SLICE, OpKind.EXPAND, OpKind.MAX_POOL2D, OpKind.PAD)


def _cast_round_trip(m, rw):
    """bf16 -> f32 -> slices/reshapes/permutes -> bf16 is exact: move the data in bf16, no
    casts (BERT's Q, K and V: sliced from one bf16 GEMM output, heads split, cast for the
    bf16 attention)."""
    chain, v = [], m.root.inputs[0]
    while True:
        n = rw.producer(v)
        if n is None:
            return None
        if n.op in _MOVES and rw.uses(v) == 1:
            chain.append(n)
            v = n.inputs[0]
            continue
        if n.op is OpKind.CAST and n.attrs.dtype is F32 and n.inputs[0].dtype is BF16:
            x = n.inputs[0]
            break
        return None
    for mv in reversed(chain):
        x = rw.add(mv.op, x, attrs=mv.attrs)
    return x


def _conv(m, rw):
    """The whole epilogue (bias, residual, activation) stays in the bf16 conv: oneDNN applies
    it to the fp32 accumulator, and conv chains then pass bf16 activations along."""
    n = m.root
    ins = [None if v is None else _bf16(rw, v) for v in n.inputs]
    return rw.add(OpKind.CAST, rw.add(OpKind.CONV2D, *ins, attrs=n.attrs), attrs=A.CastAttrs(F32))


def _matmul(m, rw):
    a, b = m.root.inputs
    return rw.add(OpKind.CAST, rw.add(OpKind.MATMUL, _bf16(rw, a), _bf16(rw, b)), attrs=A.CastAttrs(F32))


def _attention(m, rw):
    n = m.root
    ins = [_bf16(rw, v) if v.dtype is F32 else v for v in n.inputs]
    return rw.add(OpKind.CAST, rw.add(OpKind.ATTENTION, *ins, attrs=n.attrs), attrs=A.CastAttrs(F32))


def _rnn(m, rw):
    """An LSTM / GRU layer in bf16: x, the states and the (constant) weights cast to bf16, the
    op's outputs cast back to fp32. The CPU kernels for it (``cpu.lstm_layer_amx`` /
    ``cpu.gru_layer_amx`` on AMX tiles, ``cpu.lstm_layer_dot_bf16`` / ``cpu.gru_layer_dot_bf16``
    with AVX512-BF16) run each step's GEMM on bf16 operands with fp32 sums (an LSTM's cell
    state stays fp32 inside); the bf16 reference (torch's LSTM / GRU) is their oracle."""
    n = m.root
    a: A.RNNAttrs = n.attrs
    nstate = 2 if n.op is OpKind.LSTM else 1
    if a.bidirectional or a.proj_hoisted or any(rw.constant(w) is None for w in n.inputs[1 + nstate:]):
        return None  # weights computed at run time, or forms the kernels do not take: fp32
    outs = rw.add(n.op, *[_bf16(rw, v) for v in n.inputs], attrs=a)
    return tuple(rw.add(OpKind.CAST, v, attrs=A.CastAttrs(F32)) for v in outs)


def _norm_in_bf16(m, rw):
    """bf16 -> f32 -> GROUP_NORM -> bf16 is GROUP_NORM on the bf16 value: the op computes in
    float32 whatever its input's dtype and rounds its result once, to that dtype (the
    reference's definition) — so the channels-last norms between BiT's bf16 convolutions read
    and write bf16, without the two casts' passes over fp32 copies."""
    n = rw.producer(m.root.inputs[0])
    if n is None or n.op is not OpKind.GROUP_NORM or rw.uses(n.outputs[0]) != 1 or n.outputs[0].dtype is not F32:
        return None
    c = rw.producer(n.inputs[0])
    if c is None or c.op is not OpKind.CAST or c.inputs[0].dtype is not BF16:
        return None
    return rw.add(OpKind.GROUP_NORM, c.inputs[0], *n.inputs[1:], attrs=n.attrs)


def _is_cast_to(dt):
    return lambda n: n.attrs.dtype is dt


ROUND_TRIPS = [(P(OpKind.CAST, where=_is_cast_to(BF16)), _cast_round_trip),
               (P(OpKind.CAST, where=_is_cast_to(BF16)), _norm_in_bf16)]
RULES = ROUND_TRIPS + [
    (P(OpKind.LINEAR, where=_f32), _linear),
    (P(OpKind.CONV2D, where=_f32), _conv),
    (P(OpKind.MATMUL, where=_f32), _matmul),
    (P(OpKind.ATTENTION, where=_f32), _attention),
]
# bf16 recurrences: only where a bf16 layer kernel runs (AMX-BF16 or AVX512-BF16;
# passes/pipeline.py decides), since elsewhere a bf16 LSTM / GRU is no faster than the fp32
# C++ layer and only less exact
RNN_RULES = [(P((OpKind.LSTM, OpKind.GRU), where=_f32), _rnn)]
