"""Registers the Triton kernels for target "cuda" against the IR ops they implement.

Each registered function has the registry's calling convention ``fn(inputs, attrs)``;
``accepts`` says which nodes it serves (static shapes, float32/float16 operands, the
attribute values the kernel implements); other nodes take the reference (torch) kernel
on the device.
"""
from __future__ import annotations

from kiln.ir import DType, Node, OpKind
from kiln.kernels.registry import register_kernel

from . import attention as _attn
from . import conv as _conv
from . import gemm as _gemm
from . import norm as _norm
from . import rnn as _rnn

TARGET = "cuda"
_FLOATS = {DType.FLOAT32, DType.FLOAT16}


def _opt(ins, i):
    return ins[i] if len(ins) > i else None


def _float_static(node: Node) -> bool:
    vals = [v for v in node.inputs if v is not None] + list(node.outputs)
    return all(v.type.is_static for v in vals) and all(v.type.dtype in _FLOATS for v in node.outputs)


def _rank2(node: Node) -> bool:
    return _float_static(node) and node.inputs[0].type.rank >= 2 and node.inputs[1].type.rank >= 2


@register_kernel(OpKind.LINEAR, TARGET, "triton.linear", accepts=_float_static)
def linear(ins, a):
    return _gemm.linear(ins[0], ins[1], _opt(ins, 2), _opt(ins, 3), a.activation)


@register_kernel(OpKind.MATMUL, TARGET, "triton.bmm", accepts=_rank2)
def matmul(ins, a):
    return _gemm.matmul(ins[0], ins[1])


@register_kernel(OpKind.CONV2D, TARGET, "triton.conv2d", accepts=_float_static)
def conv2d(ins, a):
    return _conv.conv2d(ins[0], ins[1], _opt(ins, 2), _opt(ins, 3), a.stride, a.padding, a.dilation, a.groups,
                        a.activation)


def _pool_ok(node: Node) -> bool:
    return _float_static(node) and not (node.op is OpKind.AVG_POOL2D and node.attrs.ceil_mode)


@register_kernel(OpKind.MAX_POOL2D, TARGET, "triton.max_pool2d", accepts=_pool_ok)
def max_pool2d(ins, a):
    return _conv.pool2d(ins[0], a.kernel, a.stride, a.padding, a.dilation, a.ceil_mode, True)


@register_kernel(OpKind.AVG_POOL2D, TARGET, "triton.avg_pool2d", accepts=_pool_ok)
def avg_pool2d(ins, a):
    return _conv.pool2d(ins[0], a.kernel, a.stride, a.padding, a.dilation, a.ceil_mode, False, a.count_include_pad)


def _attention_ok(node: Node) -> bool:
    q, k, v = node.inputs[:3]
    return _float_static(node) and q.type.rank == 4 and k.type.rank == 4 and v.type.rank == 4 and \
        int(q.type.shape[-1]) <= 256


@register_kernel(OpKind.ATTENTION, TARGET, "triton.attention", accepts=_attention_ok)
def attention(ins, a):
    return _attn.attention(ins[0], ins[1], ins[2], _opt(ins, 3), a.causal, a.scale)


def _row_ok(node: Node) -> bool:
    x = node.inputs[0]
    if not _float_static(node):
        return False
    if node.op is OpKind.LAYER_NORM:
        n = 1
        for d in x.type.shape[x.type.rank - node.attrs.normalized_ndim:]:
            n *= int(d)
    else:
        if node.attrs.axis != x.type.rank - 1:
            return False
        n = int(x.type.shape[-1])
    return n <= _norm.MAX_ROW


@register_kernel(OpKind.LAYER_NORM, TARGET, "triton.layer_norm", accepts=_row_ok)
def layer_norm(ins, a):
    return _norm.layer_norm(ins[0], _opt(ins, 1), _opt(ins, 2), a.eps, a.normalized_ndim)


@register_kernel(OpKind.SOFTMAX, TARGET, "triton.softmax", accepts=_row_ok)
def softmax(ins, a):
    return _norm.softmax(ins[0])


@register_kernel(OpKind.LOG_SOFTMAX, TARGET, "triton.log_softmax", accepts=_row_ok)
def log_softmax(ins, a):
    return _norm.softmax(ins[0], log=True)


def _rnn_ok(node: Node) -> bool:
    a = node.attrs
    return _float_static(node) and a.proj_hoisted and a.num_layers == 1 and not a.bidirectional


@register_kernel(OpKind.LSTM, TARGET, "triton.lstm", accepts=_rnn_ok)
def lstm(ins, a):
    return _rnn.rnn_hoisted(ins[0], ins[1], ins[2], ins[3], _opt(ins, 4), a.batch_first, True)


@register_kernel(OpKind.GRU, TARGET, "triton.gru", accepts=_rnn_ok)
def gru(ins, a):
    return _rnn.rnn_hoisted(ins[0], ins[1], None, ins[2], _opt(ins, 3), a.batch_first, False)
