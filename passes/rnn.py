"""Recurrent networks: one structured op per layer, and hoisting for the quantizer.

``SPLIT`` (fuse phase): a multi-layer LSTM/GRU op becomes a chain of one-layer ops, each
layer's output the next one's input, so every layer gets its own kernel choice. The
kernels of a layer choose by measurement between projecting the input inside every step
of the recurrence and one GEMM over all steps up front (kernels/rnn_cpu.py).

``HOIST`` (quantize phase, only when quantizing): each layer's input projection becomes
an ordinary LINEAR over all time steps (x @ W_ih^T + b_ih, plus b_hh for LSTM) in front
of a recurrence in hoisted form, so the quantizer can turn that GEMM into an integer one.
"""
from __future__ import annotations

from kiln.ir import OpKind
from kiln.ir import attrs as A

from .pattern import P


def _split(m, rw):
    n = m.root
    a: A.RNNAttrs = n.attrs
    if a.num_layers == 1 or a.proj_hoisted or a.bidirectional:
        return None
    lstm = n.op is OpKind.LSTM
    nstate = 2 if lstm else 1
    states = n.inputs[1:1 + nstate]
    ws = n.inputs[1 + nstate:]
    per = 4 if a.has_biases else 2
    one = A.RNNAttrs(a.hidden_size, 1, False, a.batch_first, a.has_biases)
    layer_in, hs, cs = n.inputs[0], [], []
    for layer in range(a.num_layers):
        st = [rw.add(OpKind.SLICE, s, attrs=A.SliceAttrs(0, layer, layer + 1)) for s in states]
        outs = rw.add(n.op, layer_in, *st, *ws[layer * per:(layer + 1) * per], attrs=one)
        layer_in = outs[0]
        hs.append(outs[1])
        if lstm:
            cs.append(outs[2])

    def cat(vs):
        return rw.add(OpKind.CONCAT, *vs, attrs=A.AxisAttrs(0))

    return (layer_in, cat(hs), cat(cs)) if lstm else (layer_in, cat(hs))


def _hoist(m, rw):
    n = m.root
    a: A.RNNAttrs = n.attrs
    if a.num_layers != 1 or a.proj_hoisted or a.bidirectional:
        return None
    lstm = n.op is OpKind.LSTM
    nstate = 2 if lstm else 1
    w_ih, w_hh, *bs = n.inputs[1 + nstate:]
    if any(rw.constant(w) is None for w in (w_ih, w_hh, *bs)):
        return None  # weights computed at run time: keep the op whole
    if lstm and bs:
        bias = rw.const(rw.constant(bs[0]) + rw.constant(bs[1]), "rnn_bias")  # both biases add before the gates
        rec_bias = None
    else:
        bias = bs[0] if bs else None
        rec_bias = bs[1] if bs else None
    xp = rw.add(OpKind.LINEAR, n.inputs[0], w_ih, *([bias] if bias is not None else []))
    hoisted = A.RNNAttrs(a.hidden_size, 1, False, a.batch_first, a.has_biases, proj_hoisted=True)
    return rw.add(n.op, xp, *n.inputs[1:1 + nstate], w_hh, *([rec_bias] if rec_bias is not None else []),
                  attrs=hoisted)


SPLIT = [(P((OpKind.LSTM, OpKind.GRU)), _split)]
HOIST = [(P((OpKind.LSTM, OpKind.GRU)), _hoist)]
