"""Per-tensor uint8 QUANTIZE / DEQUANTIZE of activations in C++ (``kiln._C.quantize_u8``,
``dequantize_u8``): int8-static's entry into and exit from a quantized chain.

The same arithmetic as the reference (``kiln.ir.qformat.quantize_tensor``), in one pass
instead of torch's four (multiply, round, add, clamp, then the cast). Elementwise, so the
output keeps the input's memory format (a channels-last activation stays channels-last).
"""
from __future__ import annotations

import torch

from kiln.ir import Node, OpKind
from kiln.ir import attrs as A

from .registry import register_kernel


def _flat(t: torch.Tensor):
    """A 1-D numpy view of ``t``'s memory in its own order (contiguous or channels-last)."""
    if t.is_contiguous():
        return t.reshape(-1).numpy()
    return t.permute(0, 2, 3, 1).reshape(-1).numpy()  # channels-last: NHWC is contiguous


def _dense(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


def _quantize_ok(node: Node) -> bool:
    from kiln import _C

    return node.inputs[0].dtype.value == "float32" and hasattr(_C, "quantize_u8")


def _dequantize_ok(node: Node) -> bool:
    from kiln import _C

    return node.inputs[0].dtype.value == "uint8" and hasattr(_C, "dequantize_u8")


@register_kernel(OpKind.QUANTIZE, "cpu", name="cpu.quantize_u8", accepts=_quantize_ok)
def quantize_u8(ins, a: A.QuantizeAttrs):
    from kiln import _C

    x = _dense(ins[0])
    y = torch.empty_like(x, dtype=torch.uint8)
    _C.quantize_u8(_flat(x), _flat(y), a.scale, a.zero_point, torch.get_num_threads())
    return y


@register_kernel(OpKind.DEQUANTIZE, "cpu", name="cpu.dequantize_u8", accepts=_dequantize_ok)
def dequantize_u8(ins, a: A.QuantizeAttrs):
    from kiln import _C

    x = _dense(ins[0])
    y = torch.empty_like(x, dtype=torch.float32)
    _C.dequantize_u8(_flat(x), _flat(y), a.scale, a.zero_point, torch.get_num_threads())
    return y
