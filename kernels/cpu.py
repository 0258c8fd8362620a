"""CPU kernels that beat the reference: recurrent networks.

LSTM/GRU: the input projection of every time step is one GEMM per layer before the
recurrence (done inside the kernel for the structured op, or by a LINEAR node once the
``rnn`` pass hoisted it); each step is then one GEMM (h @ W_hh^T, into a preallocated
buffer) plus one fused C++ kernel for the gates (``kiln._C.lstm_cell`` / ``gru_cell``).
"""
from __future__ import annotations

import torch

from kiln.ir import Node, OpKind
from kiln.ir import attrs as A

from .registry import register_kernel


def _native():
    from kiln import _C

    return _C


def _rnn_ok(node: Node) -> bool:
    a = node.attrs
    x = node.inputs[0].type
    return not a.bidirectional and x.dtype.value == "float32" and x.is_static


def _layers(ins, a: A.RNNAttrs, nstate: int, gates: int):
    """Per layer: (w_ih or None when hoisted, w_hh, input bias or None, recurrent bias or None)."""
    ws = ins[1 + nstate:]
    if a.proj_hoisted:
        return [(None, ws[0], None, ws[1] if len(ws) > 1 else None)]
    per = 4 if a.has_biases else 2
    out = []
    for layer in range(a.num_layers):
        w = ws[layer * per: (layer + 1) * per]
        out.append((w[0], w[1], w[2] if a.has_biases else None, w[3] if a.has_biases else None))
    return out


def _project(layer_in, w_ih, bias, T, B, width):
    flat = layer_in.reshape(T * B, -1)
    if w_ih is None:  # hoisted: the input already is the projection
        return flat.view(T, B, width)
    if bias is not None:
        return torch.addmm(bias, flat, w_ih.t()).view(T, B, width)  # all steps, one GEMM
    return torch.mm(flat, w_ih.t()).view(T, B, width)


@register_kernel(OpKind.LSTM, "cpu", name="cpu.lstm", accepts=_rnn_ok)
def lstm_cpu(ins, a: A.RNNAttrs):
    C = _native()
    x, h0, c0 = ins[:3]
    xt = x.transpose(0, 1) if a.batch_first else x  # time-major inside
    T, B = xt.shape[0], xt.shape[1]
    H = a.hidden_size
    layer_in = xt.contiguous()
    hn, cn = torch.empty_like(h0), torch.empty_like(c0)
    gh = torch.empty(B, 4 * H)
    gh_np = gh.numpy()
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(_layers(ins, a, 2, 4)):
        if a.proj_hoisted:
            bias = None
        else:
            bias = b_ih + b_hh if b_ih is not None else None
        gx = _project(layer_in, w_ih, bias, T, B, 4 * H)
        if a.proj_hoisted and b_hh is not None:
            gx = gx + b_hh
        gx_np = gx.contiguous().numpy()
        w_hh_t = w_hh.t().contiguous()  # a row-major (H, 4H) operand is the fastest mm here
        out = torch.empty(T, B, H)
        out_np = out.numpy()
        c = c0[layer].clone()
        c_np = c.numpy()
        h = h0[layer].contiguous()
        for t in range(T):
            torch.mm(h, w_hh_t, out=gh)  # the per-step GEMM; gx[t] is added in the fused cell
            C.lstm_cell(gx_np[t], gh_np, c_np, out_np[t], c_np)
            h = out[t]
        hn[layer] = h
        cn[layer] = c
        layer_in = out
    y = layer_in.transpose(0, 1) if a.batch_first else layer_in
    return y, hn, cn


@register_kernel(OpKind.GRU, "cpu", name="cpu.gru", accepts=_rnn_ok)
def gru_cpu(ins, a: A.RNNAttrs):
    C = _native()
    x, h0 = ins[:2]
    xt = x.transpose(0, 1) if a.batch_first else x
    T, B = xt.shape[0], xt.shape[1]
    H = a.hidden_size
    layer_in = xt.contiguous()
    hn = torch.empty_like(h0)
    gh = torch.empty(B, 3 * H)
    gh_np = gh.numpy()
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(_layers(ins, a, 1, 3)):
        gx = _project(layer_in, w_ih, b_ih, T, B, 3 * H).contiguous()
        gx_np = gx.numpy()
        w_hh_t = w_hh.t().contiguous()
        bias_np = (b_hh if b_hh is not None else torch.zeros(3 * H)).contiguous().numpy()
        out = torch.empty(T, B, H)
        out_np = out.numpy()
        h = h0[layer].contiguous()
        h_np = h.numpy()
        for t in range(T):
            torch.mm(h, w_hh_t, out=gh)
            C.gru_cell(gx_np[t], gh_np, bias_np, h_np, out_np[t])
            h, h_np = out[t], out_np[t]
        hn[layer] = h
        layer_in = out
    y = layer_in.transpose(0, 1) if a.batch_first else layer_in
    return y, hn
