"""The recurrent-network (LSTM/GRU) kernels of the ``cpu`` target, in C++ (``kiln._C``).

A layer runs one of three ways, chosen per layer by measurement (kernels/choice.py); the C++
layers and recurrences need AVX-512 or AVX2 + FMA (``kiln._C.recurrence_supported()``):

- ``cpu.lstm_layer`` / ``cpu.gru_layer``: the whole layer in C++ (``kiln._C.lstm_layer``);
  each step's GEMM is [x_t, h_{t-1}] @ [W_ih; W_hh]^T fused with the gates, so the input
  projection needs no pass of its own and no [T, B, G*H] buffer is written and read back;
- ``cpu.lstm_hoisted`` / ``cpu.gru_hoisted``: the input projection of every step as one
  torch GEMM first, then the C++ recurrence over it (``kiln._C.lstm_recurrence``), which
  can win when the input is much wider than the hidden state;
- ``cpu.lstm`` / ``cpu.gru``: per step one torch GEMM (h @ W_hh^T) plus one fused C++
  cell for the gates (``kiln._C.lstm_cell`` / ``gru_cell``); needs no AVX-512.

A recurrence whose projection the ``rnn_hoist`` pass moved into a LINEAR (so that the
quantizer can take it) runs the C++ recurrence alone (``cpu.lstm_recurrence``). With
``precision="bf16"`` on a CPU with AMX-BF16 or AVX512-BF16, LSTM and GRU layers are bf16 and
run on AMX tiles (``cpu.lstm_layer_amx`` / ``cpu.gru_layer_amx``) or with AVX512-BF16 dot
products (``cpu.lstm_layer_dot_bf16`` / ``cpu.gru_layer_dot_bf16``), both in
``csrc/rnn_amx.cpp`` on the same packed weights.
"""
from __future__ import annotations

import torch

from kiln.ir import Node, OpKind
from kiln.ir import attrs as A

from .nhwc import native_array as _bits  # bf16 as int16 bits, unit last-dim stride
from .registry import AMX_BF16, AVX512_BF16, register_kernel


def _native():
    from kiln import _C

    return _C


def _rnn_ok(node: Node) -> bool:
    """fp32, one direction. The time and batch dims may be symbolic (a dynamic plan): the
    kernels read them from the tensors on each call; the feature dim and the weights are
    static, and the weights are packed once for every size."""
    a = node.attrs
    x = node.inputs[0].type
    return (not a.bidirectional and x.dtype.value == "float32" and isinstance(x.shape[-1], int)
            and all(v is None or v.type.is_static for v in node.inputs[1 + (2 if node.op is OpKind.LSTM else 1):]))


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


def _native_ok(node: Node) -> bool:
    """The C++ layers take the op with its input projection (one or more layers)."""
    return _rnn_ok(node) and not node.attrs.proj_hoisted and _native().recurrence_supported()


def _recurrence_ok(node: Node) -> bool:
    """The C++ recurrence alone takes the hoisted form (the rnn_hoist pass produces it)."""
    return _rnn_ok(node) and node.attrs.proj_hoisted and _native().recurrence_supported()


def _threads() -> int:
    # torch's intra-op thread count, read at call time (a plan built at one setting runs at
    # another). The threads are torch's own OpenMP workers (kiln._C shares torch's libgomp)
    # and split each step's hidden blocks, with a spin barrier between steps.
    return torch.get_num_threads()


def _np(t: torch.Tensor | None):
    return None if t is None else t.contiguous().numpy()


def _pack_layer(w_ih, w_hh, b_ih, b_hh, gates: int):
    """Fused form: one panel over [W_ih; W_hh] per block of hidden units, biases included."""
    return _native().pack_layer_weight(_np(w_ih), _np(w_hh), _np(b_ih), _np(b_hh), gates)


def _pack_hoisted(w_ih, w_hh, b_ih, b_hh, gates: int):
    """Hoisted form: (W_ih^T, projection bias, packed W_hh, recurrent bias). LSTM adds both
    biases in the projection; GRU keeps b_hh for the cell, where r multiplies b_hn. An op
    hoisted already (w_ih None) has only its recurrent bias left."""
    if w_ih is None:
        bias, rec_bias = None, b_hh
    elif gates == 4:
        bias, rec_bias = (b_ih + b_hh if b_ih is not None else None), None
    else:
        bias, rec_bias = b_ih, b_hh
    if gates == 3 and rec_bias is None:
        rec_bias = torch.zeros(w_hh.shape[0])
    w_t = None if w_ih is None else w_ih.t().contiguous()
    rec_bias = None if rec_bias is None else rec_bias.contiguous()
    return w_t, bias, _native().pack_recurrent_weight(_np(w_hh), gates), rec_bias


def _packer(fn, pack, gates: int):
    """prepare hook: pack every layer's weights once, when the plan is built (weights
    computed at run time are packed on every call instead)."""
    nstate = 2 if gates == 4 else 1

    def prepare(node: Node, consts: list):
        packed = None
        if all(c is not None for c in consts[1 + nstate:]):
            packed = [pack(*w, gates) for w in _layers(consts, node.attrs, nstate, gates)]

        def run(ins, attrs):
            return fn(ins, attrs, packed)
        return run
    return prepare


def _seq_views(x: torch.Tensor, a: A.RNNAttrs, H: int):
    """x as a [T, B, F] view and y allocated in the layer's own layout, also seen as
    [T, B, H]: the C++ layers take strided views, so a batch-first layer copies nothing."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    T, B = (x.shape[1], x.shape[0]) if a.batch_first else (x.shape[0], x.shape[1])
    y = torch.empty((B, T, H) if a.batch_first else (T, B, H))
    tb = (lambda t: t.transpose(0, 1)) if a.batch_first else (lambda t: t)
    return tb(x), y, tb(y), B


def _hoisted_projection(x, w_t, bias):
    """Every step's x @ W_ih^T (+ bias) as one GEMM, in x's own layout."""
    flat = x.reshape(-1, x.shape[-1])
    gx = torch.mm(flat, w_t) if bias is None else torch.addmm(bias, flat, w_t)
    return gx.view(*x.shape[:-1], w_t.shape[1])


def _lstm(ins, a: A.RNNAttrs, packed, pack, layer):
    """Runs `layer(x, packed, h0, c0, hn, cn) -> y` over the layers of an LSTM op."""
    x, h0, c0 = ins[:3]
    if packed is None:
        packed = [pack(*w, 4) for w in _layers(ins, a, 2, 4)]
    hn, cn = torch.empty_like(h0), torch.empty_like(c0)
    for i, p in enumerate(packed):
        x = layer(x, p, h0[i].contiguous(), c0[i].contiguous(), hn[i], cn[i])
    return x, hn, cn


def _gru(ins, a: A.RNNAttrs, packed, pack, layer):
    x, h0 = ins[:2]
    if packed is None:
        packed = [pack(*w, 3) for w in _layers(ins, a, 1, 3)]
    hn = torch.empty_like(h0)
    for i, p in enumerate(packed):
        x = layer(x, p, h0[i].contiguous(), hn[i])
    return x, hn


def lstm_layer(ins, a: A.RNNAttrs, packed=None):
    """Every layer in C++ with the input projection inside each step (kiln._C.lstm_layer)."""
    def layer(x, p, h0, c0, hn, cn):
        xs, y, y_tb, _ = _seq_views(x, a, a.hidden_size)
        _native().lstm_layer(xs.numpy(), p, h0.numpy(), c0.numpy(), y_tb.numpy(), hn.numpy(), cn.numpy(), _threads())
        return y
    return _lstm(ins, a, packed, _pack_layer, layer)


def gru_layer(ins, a: A.RNNAttrs, packed=None):
    """Every layer in C++ with the input projection inside each step (kiln._C.gru_layer)."""
    def layer(x, p, h0, hn):
        xs, y, y_tb, _ = _seq_views(x, a, a.hidden_size)
        _native().gru_layer(xs.numpy(), p, h0.numpy(), y_tb.numpy(), hn.numpy(), _threads())
        return y
    return _gru(ins, a, packed, _pack_layer, layer)


def _lstm_recurrence(gx, p_hh, h0, c0, hn, cn, a: A.RNNAttrs):
    gx, y, y_tb, _ = _seq_views(gx, a, a.hidden_size)
    _native().lstm_recurrence(gx.numpy(), p_hh, h0.numpy(), c0.numpy(), y_tb.numpy(), hn.numpy(), cn.numpy(),
                              _threads())
    return y


def _gru_recurrence(gx, p_hh, b_hh, h0, hn, a: A.RNNAttrs):
    gx, y, y_tb, _ = _seq_views(gx, a, a.hidden_size)
    _native().gru_recurrence(gx.numpy(), p_hh, b_hh.numpy(), h0.numpy(), y_tb.numpy(), hn.numpy(), _threads())
    return y


def lstm_hoisted(ins, a: A.RNNAttrs, packed=None):
    """Per layer: one torch GEMM projects every step's input, then the C++ recurrence."""
    def layer(x, p, h0, c0, hn, cn):
        w_t, bias, p_hh, _ = p
        return _lstm_recurrence(_hoisted_projection(x, w_t, bias), p_hh, h0, c0, hn, cn, a)
    return _lstm(ins, a, packed, _pack_hoisted, layer)


def gru_hoisted(ins, a: A.RNNAttrs, packed=None):
    """Per layer: one torch GEMM projects every step's input, then the C++ recurrence."""
    def layer(x, p, h0, hn):
        w_t, bias, p_hh, b_hh = p
        return _gru_recurrence(_hoisted_projection(x, w_t, bias), p_hh, b_hh, h0, hn, a)
    return _gru(ins, a, packed, _pack_hoisted, layer)


def lstm_recurrence(ins, a: A.RNNAttrs, packed=None):
    """A hoisted LSTM layer (its input is the projection): the C++ recurrence alone."""
    def layer(x, p, h0, c0, hn, cn):
        _, _, p_hh, b_hh = p
        return _lstm_recurrence(x if b_hh is None else x + b_hh, p_hh, h0, c0, hn, cn, a)
    return _lstm(ins, a, packed, _pack_hoisted, layer)


def gru_recurrence(ins, a: A.RNNAttrs, packed=None):
    """A hoisted GRU layer (its input is the projection plus b_ih): the C++ recurrence alone."""
    def layer(x, p, h0, hn):
        _, _, p_hh, b_hh = p
        return _gru_recurrence(x, p_hh, b_hh, h0, hn, a)
    return _gru(ins, a, packed, _pack_hoisted, layer)


for _fn, _pack, _ok in ((lstm_layer, _pack_layer, _native_ok), (lstm_hoisted, _pack_hoisted, _native_ok),
                        (lstm_recurrence, _pack_hoisted, _recurrence_ok)):
    register_kernel(OpKind.LSTM, "cpu", name=f"cpu.{_fn.__name__}", accepts=_ok, prepare=_packer(_fn, _pack, 4),
                    dynamic=True)(_fn)
for _fn, _pack, _ok in ((gru_layer, _pack_layer, _native_ok), (gru_hoisted, _pack_hoisted, _native_ok),
                        (gru_recurrence, _pack_hoisted, _recurrence_ok)):
    register_kernel(OpKind.GRU, "cpu", name=f"cpu.{_fn.__name__}", accepts=_ok, prepare=_packer(_fn, _pack, 3),
                    dynamic=True)(_fn)


def _bf16_layer_ok(supported: str):
    """bf16 LSTM / GRU layers (passes/precision.py makes them) where ``kiln._C.<supported>()``.
    As the fp32 layers, they read the time and batch dims from the tensors on each call (a
    dynamic plan's may be symbolic); the feature dim and the weights are static."""
    def ok(node: Node) -> bool:
        a = node.attrs
        x = node.inputs[0].type
        return (not a.bidirectional and not a.proj_hoisted and x.dtype.value == "bfloat16"
                and isinstance(x.shape[-1], int)
                and all(v is not None and v.type.dtype == x.dtype for v in node.inputs[1:])
                and all(v.type.is_static for v in node.inputs[1 + (2 if node.op is OpKind.LSTM else 1):])
                and getattr(_native(), supported)())
    return ok


def _pack_bf16(w_ih, w_hh, b_ih, b_hh, gates: int):
    def f32(t):
        return None if t is None else t.float().contiguous().numpy()
    return _native().rnn_amx_pack(f32(w_ih), f32(w_hh), f32(b_ih), f32(b_hh))


def _bf16_layers(x, a: A.RNNAttrs, packed, run):
    """Runs ``run(x_tbi, p, i, y_tbh)`` per layer on (T, B, F) views; returns the last y."""
    H = a.hidden_size
    tb = (lambda t: t.transpose(0, 1)) if a.batch_first else (lambda t: t)
    for i, p in enumerate(packed):
        if x.stride(-1) != 1:
            x = x.contiguous()
        T, B = (x.shape[1], x.shape[0]) if a.batch_first else (x.shape[0], x.shape[1])
        y = torch.empty((B, T, H) if a.batch_first else (T, B, H), dtype=torch.bfloat16)
        run(_bits(tb(x)), p, i, _bits(tb(y)))
        x = y
    return x


def _lstm_bf16(path: str):
    name = f"lstm_layer_{path}"

    def lstm_bf16(ins, a: A.RNNAttrs, packed=None):
        x, h0, c0 = ins[:3]
        if packed is None:
            packed = [_pack_bf16(*w, 4) for w in _layers(ins, a, 2, 4)]
        hn = torch.empty(h0.shape, dtype=torch.bfloat16)
        cn = torch.empty(c0.shape, dtype=torch.float32)
        layer = getattr(_native(), name)
        y = _bf16_layers(x, a, packed, lambda xs, p, i, ys: layer(
            xs, p, _bits(h0[i].contiguous()), c0[i].float().contiguous().numpy(), ys, _bits(hn[i]), cn[i].numpy(),
            _threads()))
        return y, hn, cn.to(torch.bfloat16)
    return lstm_bf16


def _gru_bf16(path: str):
    name = f"gru_layer_{path}"

    def gru_bf16(ins, a: A.RNNAttrs, packed=None):
        x, h0 = ins[:2]
        if packed is None:
            packed = [_pack_bf16(*w, 3) for w in _layers(ins, a, 1, 3)]
        hn = torch.empty(h0.shape, dtype=torch.bfloat16)
        layer = getattr(_native(), name)
        y = _bf16_layers(x, a, packed, lambda xs, p, i, ys: layer(xs, p, _bits(h0[i].contiguous()), ys, _bits(hn[i]),
                                                                  _threads()))
        return y, hn
    return gru_bf16


# bf16 layers in C++ (kiln._C.lstm_layer_amx, ...): each step's GEMM on bf16 operands with fp32
# sums, the LSTM's cell state fp32 throughout, h rounded to bf16 once a step. The AMX path
# multiplies on tiles; the dot_bf16 path with AVX512-BF16's vdpbf16ps (CPUs without tiles).
for _path, _supported, _requires in (("amx", "rnn_amx_supported", AMX_BF16),
                                     ("dot_bf16", "rnn_dot_bf16_supported", AVX512_BF16)):
    for _op, _make, _gates in ((OpKind.LSTM, _lstm_bf16, 4), (OpKind.GRU, _gru_bf16, 3)):
        _fn = _make(_path)
        _fn.__name__ = _fn.__qualname__ = f"{_op.value}_layer_{_path}"
        register_kernel(_op, "cpu", name=f"cpu.{_op.value}_layer_{_path}", accepts=_bf16_layer_ok(_supported),
                        prepare=_packer(_fn, _pack_bf16, _gates), requires=_requires, dynamic=True)(_fn)


@register_kernel(OpKind.LSTM, "cpu", name="cpu.lstm", accepts=_rnn_ok, dynamic=True)
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


@register_kernel(OpKind.GRU, "cpu", name="cpu.gru", accepts=_rnn_ok, dynamic=True)
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
