"""Max pooling over channels-last activations in C++ (``kiln._C.max_pool2d_nhwc``).

A candidate beside torch's kernel for 4-D channels-last fp32/bf16 MAX_POOL2D (ResNet's
stem); ``kernels.choice`` keeps whichever measures faster on the node's shapes. The output
shape comes from the node's type (so ceil_mode needs nothing here), its batch from the
input (a dynamic plan's batch varies per call).

uint8 (quantized activations, int8-static's stem) in any declared layout: the quantized
convolutions store channels-last, so the input is read as it lies (copied to channels-last
only when it is not) and the output is stored channels-last for the next one.
"""
from __future__ import annotations

import torch

from kiln.ir import LayoutKind, Node, OpKind
from kiln.ir import attrs as A

from .nhwc import as_channels_last, nhwc_array
from .registry import register_kernel


def _accepts(node: Node) -> bool:
    x = node.inputs[0].type
    if x.rank != 4 or not all(isinstance(d, int) for d in x.shape[1:]):  # the batch may vary per call
        return False
    from kiln import _C

    if x.dtype.value == "uint8":
        return _C.max_pool_u8_supported()
    if x.layout.kind is not LayoutKind.CHANNELS_LAST or x.dtype.value not in ("float32", "bfloat16"):
        return False
    return _C.max_pool_supported()


def _prepare(node: Node, consts: list):
    from kiln import _C

    a: A.Pool2dAttrs = node.attrs
    shape = tuple(node.outputs[0].type.shape[1:])

    def run(ins, attrs):
        x = as_channels_last(ins[0])
        y = torch.empty((x.shape[0],) + shape, dtype=x.dtype, memory_format=torch.channels_last)
        _C.max_pool2d_nhwc(nhwc_array(x), nhwc_array(y), a.kernel, a.stride, a.padding, a.dilation, torch.get_num_threads())
        return y
    return run


@register_kernel(OpKind.MAX_POOL2D, "cpu", name="cpu.max_pool2d_nhwc", accepts=_accepts, prepare=_prepare,
                 dynamic=True)
def max_pool2d_nhwc(ins, attrs):
    raise RuntimeError("cpu.max_pool2d_nhwc runs through its prepared function")


# ---- max pooling of row-major (NCHW) float activations
# torch's NCHW max-pool runs one window at a time per plane and is an order of magnitude
# slower on one thread than its channels-last kernel, which vectorizes over channels (BiT's
# stem pools an NCHW tensor: its "same" padding runs in NCHW between the convolution and
# the pool). Two layout changes in C++ and the channels-last pool beat it; a candidate,
# measured against the reference like every other. Max is exact, so the result is
# bit-identical.
def _accepts_nchw(node: Node) -> bool:
    x = node.inputs[0].type
    if x.rank != 4 or not x.is_static or x.layout.kind is not LayoutKind.ROW_MAJOR:
        return False
    if x.dtype.value not in ("float32", "bfloat16") or node.outputs[0].type.layout.kind is not LayoutKind.ROW_MAJOR:
        return False
    from .layout_cpu import available

    return available()


def _prepare_nchw(node: Node, consts: list):
    import torch.nn.functional as F

    from .layout_cpu import transpose_layout

    a: A.Pool2dAttrs = node.attrs

    def run(ins, attrs):
        x = transpose_layout(ins[0], True)
        y = F.max_pool2d(x, a.kernel, a.stride, a.padding, a.dilation, a.ceil_mode)
        return transpose_layout(y, False)
    return run


@register_kernel(OpKind.MAX_POOL2D, "cpu", name="cpu.max_pool2d_via_nhwc", accepts=_accepts_nchw, prepare=_prepare_nchw)
def max_pool2d_via_nhwc(ins, attrs):
    raise RuntimeError("cpu.max_pool2d_via_nhwc runs through its prepared function")
