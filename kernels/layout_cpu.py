"""NCHW <-> NHWC layout changes (TO_LAYOUT) in C++ (``kiln._C.transpose_batched``).

A layout change of a 4-D tensor is one transposition per image: [C, H*W] planes become
[H*W, C] (to channels-last) or back. torch's strided copy (the reference) reads one operand
a whole row apart per element, which is several times slower than a copy on planes of a
few MB (wav2vec2's first convolution output, 512 x 3199, sits between a channels-last
convolution and a per-channel normalization); the C++ kernel copies in cache-sized tiles.
A candidate beside the reference; ``kernels.choice`` keeps the faster one per node. It
reads the input as it lies: an input already in the asked layout is returned as is, and
one in neither standard layout goes to the reference's ``contiguous``.
"""
from __future__ import annotations

import torch

from kiln.ir import LayoutKind, Node, OpKind
from kiln.ir import attrs as A

from .registry import register_kernel

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def available() -> bool:
    """Whether the native module has the transposition (without it the reference's copy runs)."""
    try:
        from kiln import _C
    except ImportError:
        return False
    return hasattr(_C, "transpose_batched")


def _accepts(node: Node) -> bool:
    x = node.inputs[0].type
    if x.rank != 4 or not x.is_static or node.attrs.layout.kind not in (LayoutKind.CHANNELS_LAST, LayoutKind.ROW_MAJOR):
        return False
    return available()


def _bits(t: torch.Tensor):
    """``t``'s storage as a numpy array of same-sized integers (any dtype moves as raw bytes)."""
    return t.view(_BITS[t.element_size()]).numpy()


def transpose_layout(x: torch.Tensor, to_channels_last: bool) -> torch.Tensor:
    """``x`` (4-D, stored row-major or channels-last) stored in the other layout."""
    from kiln import _C

    n, c, h, w = x.shape
    if to_channels_last:
        if x.is_contiguous(memory_format=torch.channels_last):
            return x
        if not x.is_contiguous() or x.element_size() not in _BITS:
            return x.contiguous(memory_format=torch.channels_last)
        y = torch.empty((n, h, w, c), dtype=x.dtype)  # NHWC storage
        _C.transpose_batched(_bits(x).reshape(n, c, h * w), _bits(y).reshape(n, h * w, c), torch.get_num_threads())
        return y.permute(0, 3, 1, 2)
    if x.is_contiguous():
        return x
    nhwc = x.permute(0, 2, 3, 1)
    if not nhwc.is_contiguous() or x.element_size() not in _BITS:
        return x.contiguous()
    y = torch.empty((n, c, h, w), dtype=x.dtype)
    _C.transpose_batched(_bits(nhwc).reshape(n, h * w, c), _bits(y).reshape(n, c, h * w), torch.get_num_threads())
    return y


def _prepare(node: Node, consts: list):
    to_cl = node.attrs.layout.kind is LayoutKind.CHANNELS_LAST
    return lambda ins, a: transpose_layout(ins[0], to_cl)


@register_kernel(OpKind.TO_LAYOUT, "cpu", name="cpu.transpose_layout", accepts=_accepts, prepare=_prepare)
def _transpose_layout(ins, a: A.LayoutAttrs):
    return transpose_layout(ins[0], a.layout.kind is LayoutKind.CHANNELS_LAST)
