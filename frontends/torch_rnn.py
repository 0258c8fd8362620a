"""Export ``nn.LSTM``/``nn.GRU`` as single leaf ops instead of tracing through them.

``torch.export`` traces ``aten.lstm``/``aten.gru`` through their decompositions to infer
output shapes: a fake-tensor pass over every time step of every layer, most of the
export time of a recurrent model (see ``python -m kiln.bench.compile_time lstm``) — for
ops the frontend then converts whole anyway. During export, ``rnn_leaf_ops()`` routes the two
``_VF`` calls ``nn.LSTM``/``nn.GRU`` make to the custom ops ``kiln::lstm``/``kiln::gru``:
the same signature as ``aten.lstm.input``/``aten.gru.input``, a real implementation that
calls aten, and a fake implementation that only computes shapes. Packed sequences (the
``.data`` overloads) keep the aten path.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

_LOCK = threading.Lock()


@torch.library.custom_op("kiln::lstm", mutates_args=())
def lstm(input: Tensor, hx: list[Tensor], params: list[Tensor], has_biases: bool, num_layers: int,
         dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    out, h, c = torch.ops.aten.lstm.input(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                                          batch_first)
    return out, h, c


@lstm.register_fake
def _(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return (_seq_out(input, hx[0].shape[-1] * (2 if bidirectional else 1), batch_first),
            hx[0].new_empty(hx[0].shape), hx[1].new_empty(hx[1].shape))


@torch.library.custom_op("kiln::gru", mutates_args=())
def gru(input: Tensor, hx: Tensor, params: list[Tensor], has_biases: bool, num_layers: int, dropout: float,
        train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor]:
    out, h = torch.ops.aten.gru.input(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                                      batch_first)
    return out, h


@gru.register_fake
def _(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _seq_out(input, hx.shape[-1] * (2 if bidirectional else 1), batch_first), hx.new_empty(hx.shape)


def _seq_out(x: Tensor, features: int, batch_first: bool) -> Tensor:
    # unbatched input is (T, I); batched is (T, B, I) or (B, T, I): only the last dim changes
    return x.new_empty((*x.shape[:-1], features))


class _VFWithLeafRNNs:
    """Stands in for ``torch._VF`` inside ``torch.nn.modules.rnn`` during export."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def lstm(self, *args):
        if isinstance(args[1], (list, tuple)):  # the .input overload; .data has batch_sizes here
            return lstm(args[0], list(args[1]), list(args[2]), *args[3:])
        return self._real.lstm(*args)

    def gru(self, *args):
        if isinstance(args[2], (list, tuple)):  # .input: (input, hx, params, ...); .data: (data, batch_sizes, hx, ...)
            return gru(args[0], args[1], list(args[2]), *args[3:])
        return self._real.gru(*args)


@contextlib.contextmanager
def rnn_leaf_ops():
    import torch.nn.modules.rnn as rnn_mod

    with _LOCK:  # the patch is module-global: one export at a time
        real = rnn_mod._VF
        rnn_mod._VF = _VFWithLeafRNNs(real)
        try:
            yield
        finally:
            rnn_mod._VF = real
