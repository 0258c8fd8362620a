"""Fused attention in C++ (``kiln._C.attention``): softmax(q k^T * scale + mask) v for fp32
and bf16 q/k/v of any strides, one pass per (batch, head, block of query rows).

A candidate beside torch's ``scaled_dot_product_attention`` (the reference kernel);
``kernels.choice`` keeps whichever measures faster on the node's shapes. Two things make it
worth having in a Transformer block: q, k and v arrive as strided views of one fused QKV
projection and are read in place, and the output is written straight into [B, S, H, D]
memory, so the head merge after it stays a view. fp32 runs on AVX-512 FMAs at about the
core's FMA rate; bf16 runs the two products on AMX tiles (tdpbf16ps, fp32 sums, P rounded to
bf16 as torch's bf16 sdpa does) where the CPU has AMX-BF16, else the same arithmetic as
AVX512-BF16 dot products (vdpbf16ps: AMD Zen 4 and later, Intel Cooper Lake) where it has
those, else widened to fp32. The
softmax is fp32 either way, with terms under exp(-80) of the row's largest dropped so no
denormal reaches the sums (``csrc/attention.cpp``).
"""
from __future__ import annotations

import math

import torch

from kiln.ir import Node, OpKind
from kiln.ir import attrs as A

from .nhwc import native_array
from .registry import register_kernel

_DTYPES = ("float32", "bfloat16")


def _accepts(node: Node) -> bool:
    if len(node.inputs) < 3:
        return False
    q, k, v = (node.inputs[i].type for i in range(3))
    # batch and sequence lengths may be symbolic: the kernel reads them from its inputs
    if not all(t.rank == 4 and isinstance(t.shape[1], int) and isinstance(t.shape[3], int) for t in (q, k, v)):
        return False
    if q.dtype.value not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return False
    if 0 in q.shape or 0 in k.shape:
        return False  # empty attention: the reference's conventions apply (a symbolic size of 0 too:
        # the kernel checks it at run time)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        m = node.inputs[3].type
        if m.rank > 4 or m.dtype.value not in _DTYPES + ("bool",):
            return False
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        padded = (1,) * (4 - m.rank) + tuple(m.shape)
        if any(d not in (1, t) for d, t in zip(padded, target)):
            return False
    from kiln import _C

    return _C.attention_supported()


def _mask_array(mask: torch.Tensor, shape: tuple):
    """An fp32 additive mask broadcast (0 strides, no copy) to ``shape``."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape).masked_fill_(~mask, -math.inf)
    elif mask.dtype != torch.float32:
        mask = mask.float()
    if mask.shape[-1] != 1 and mask.stride(-1) not in (0, 1):
        mask = mask.contiguous()  # the kernel reads a row of keys with unit (or zero) stride
    return mask.expand(shape).numpy()


def _prepare(node: Node, consts: list):
    from kiln import _C

    a: A.AttentionAttrs = node.attrs
    d = node.inputs[0].type.shape[3]
    scale = a.scale if a.scale is not None else 1.0 / math.sqrt(d)
    dtype = node.inputs[0].type.dtype.to_torch()

    def run(ins, attrs):
        b, h, sq, _ = ins[0].shape  # read per call: one plan serves every batch and length
        sk = ins[1].shape[2]
        if not (b and sq and sk):
            from kiln.ir.reference import REFERENCE

            return REFERENCE[node.op](ins, attrs)  # empty attention: the reference's conventions
        # [B, S, H, D] memory seen as [B, H, S, D]: what sdpa returns, so the merge is a view
        o = torch.empty((b, sq, h, d), dtype=dtype).transpose(1, 2)
        mask = ins[3] if len(ins) > 3 and ins[3] is not None else None
        _C.attention(native_array(ins[0]), native_array(ins[1]), native_array(ins[2]), native_array(o),
                     None if mask is None else _mask_array(mask, (b, h, sq, sk)), scale, a.causal,
                     torch.get_num_threads())
        return o
    return run


@register_kernel(OpKind.ATTENTION, "cpu", name="cpu.fused_attention", accepts=_accepts, prepare=_prepare,
                 dynamic=True)
def fused_attention(ins, attrs):
    raise RuntimeError("cpu.fused_attention runs through its prepared function")
