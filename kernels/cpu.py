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


def _fused_ok(node: Node) -> bool:
    """The whole-layer C++ recurrence takes the hoisted form (the rnn pass produces it)."""
    return _rnn_ok(node) and node.attrs.proj_hoisted and _native().recurrence_supported()


def _threads() -> int:
    # One thread for now. The recurrences can run on torch's own OpenMP workers (kiln._C
    # shares torch's libgomp) and a layer alone is 2.2x faster on two of them, but end to
    # end the two-thread forecaster measured no faster (kiln bench models lstm); revisit
    # with `kiln bench kernels --op lstm` and the model bench together.
    return 1


def _weights_packer(w_index: int, gates: int):
    """prepare hook: pack a constant W_hh once, when the plan is built."""
    def prepare(node: Node, consts: list):
        w = consts[w_index]
        packed = None if w is None else _native().pack_recurrent_weight(w.contiguous().numpy(), gates)
        fn = lstm_fused if gates == 4 else gru_fused

        def run(ins, attrs):
            p = packed if packed is not None else _native().pack_recurrent_weight(ins[w_index].contiguous().numpy(), gates)
            return fn(ins, attrs, p)
        return run
    return prepare


def _seq_views(x: torch.Tensor, a: A.RNNAttrs, H: int):
    """gx as a [T, B, G*H] view and y allocated in the layer's own layout, also seen as
    [T, B, H]: the C++ recurrence takes strided views, so a batch-first layer copies nothing."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    T, B = (x.shape[1], x.shape[0]) if a.batch_first else (x.shape[0], x.shape[1])
    y = torch.empty((B, T, H) if a.batch_first else (T, B, H))
    tb = (lambda t: t.transpose(0, 1)) if a.batch_first else (lambda t: t)
    return tb(x), y, tb(y), B


def lstm_fused(ins, a: A.RNNAttrs, packed=None):
    """One hoisted LSTM layer: every step's GEMM and gates in C++ (kiln._C.lstm_recurrence)."""
    x, h0, c0, w_hh = ins[:4]
    b_hh = ins[4] if len(ins) > 4 else None
    if packed is None:
        packed = _native().pack_recurrent_weight(w_hh.contiguous().numpy(), 4)
    if b_hh is not None:
        x = x + b_hh
    H = a.hidden_size
    gx, y, y_tb, B = _seq_views(x, a, H)
    hn, cn = torch.empty(1, B, H), torch.empty(1, B, H)
    _native().lstm_recurrence(gx.numpy(), packed, h0[0].contiguous().numpy(), c0[0].contiguous().numpy(),
                              y_tb.numpy(), hn[0].numpy(), cn[0].numpy(), _threads())
    return y, hn, cn


def gru_fused(ins, a: A.RNNAttrs, packed=None):
    """One hoisted GRU layer: every step's GEMM and gates in C++ (kiln._C.gru_recurrence)."""
    x, h0, w_hh = ins[:3]
    H = a.hidden_size
    b_hh = ins[3] if len(ins) > 3 else torch.zeros(3 * H)
    if packed is None:
        packed = _native().pack_recurrent_weight(w_hh.contiguous().numpy(), 3)
    gx, y, y_tb, B = _seq_views(x, a, H)
    hn = torch.empty(1, B, H)
    _native().gru_recurrence(gx.numpy(), packed, b_hh.contiguous().numpy(), h0[0].contiguous().numpy(),
                             y_tb.numpy(), hn[0].numpy(), _threads())
    return y, hn


register_kernel(OpKind.LSTM, "cpu", name="cpu.lstm_fused", accepts=_fused_ok, prepare=_weights_packer(3, 4))(lstm_fused)
register_kernel(OpKind.GRU, "cpu", name="cpu.gru_fused", accepts=_fused_ok, prepare=_weights_packer(2, 3))(gru_fused)


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
