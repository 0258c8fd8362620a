"""Recurrent networks: hoist each layer's input projection out of the recurrence.

A multi-layer LSTM/GRU op becomes, per layer, one LINEAR over all time steps (x @ W_ih^T
+ b_ih, plus b_hh for LSTM) and a one-layer recurrence in hoisted form. The recurrence
stays one structured op; the GEMM in front of it is an ordinary LINEAR that the rest of
the compiler (kernel choice, quantization) treats like any other.
"""
from __future__ import annotations

from kiln.ir import OpKind
from kiln.ir import attrs as A

from .pattern import P


def _hoist(m, rw):
    n = m.root
    a: A.RNNAttrs = n.attrs
    if a.proj_hoisted or a.bidirectional:
        return None
    lstm = n.op is OpKind.LSTM
    nstate = 2 if lstm else 1
    states = n.inputs[1:1 + nstate]
    ws = n.inputs[1 + nstate:]
    per = 4 if a.has_biases else 2
    if any(rw.constant(w) is None for w in ws):
        return None  # weights computed at run time: keep the op whole
    layer_in = n.inputs[0]
    hs, cs = [], []
    for layer in range(a.num_layers):
        w_ih, w_hh = ws[layer * per], ws[layer * per + 1]
        b_ih = rw.constant(ws[layer * per + 2]) if a.has_biases else None
        b_hh = ws[layer * per + 3] if a.has_biases else None
        if lstm and b_ih is not None:
            bias = rw.const(b_ih + rw.constant(b_hh), "rnn_bias")  # both biases add before the gates
            rec_bias = None
        else:
            bias = ws[layer * per + 2] if b_ih is not None else None
            rec_bias = b_hh
        xp = rw.add(OpKind.LINEAR, layer_in, w_ih, *([bias] if bias is not None else []))
        st = [rw.add(OpKind.SLICE, s, attrs=A.SliceAttrs(0, layer, layer + 1)) if a.num_layers > 1 else s
              for s in states]
        one = A.RNNAttrs(a.hidden_size, 1, False, a.batch_first, a.has_biases, proj_hoisted=True)
        outs = rw.add(n.op, xp, *st, w_hh, *([rec_bias] if rec_bias is not None else []), attrs=one)
        layer_in = outs[0]
        hs.append(outs[1])
        if lstm:
            cs.append(outs[2])

    def cat(vs):
        return vs[0] if len(vs) == 1 else rw.add(OpKind.CONCAT, *vs, attrs=A.AxisAttrs(0))

    return (layer_in, cat(hs), cat(cs)) if lstm else (layer_in, cat(hs))


RULES = [(P((OpKind.LSTM, OpKind.GRU)), _hoist)]
